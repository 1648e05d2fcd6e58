"""The server under the application: its sockets, its connections, and the
answers given before a request reaches the application.

* `listen()` binds the registry's sockets before anything else starts, so a
  port in use is one line (`ListenError`), not a traceback after
  `registry.started`. With NIXERY_WORKERS > 1 each process gets a socket of
  its own on the port (SO_REUSEPORT), all bound by the parent before it forks.
  Connections made while the application starts wait in the socket's backlog.
* A request aiohttp cannot parse (a request line over 8190 bytes, a NUL or a
  non-ASCII byte in the path, a malformed header) is answered with the
  registry's JSON error, 400 (kind REQUEST_INVALID), that says what kind of thing was
  wrong and quotes none of the input. (aiohttp's own answer is plain text
  that echoes it, and it logs the input with a traceback.) So is an `Expect`
  header other than `100-continue`, which aiohttp refuses before the
  application's middlewares: 417 EXPECTATION_FAILED.
* A connection must send each request's head (request line and headers)
  within NIXERY_HEADER_TIMEOUT seconds: from when it opens, and for a later
  request on a kept-alive connection, from that request's first byte (idle
  keep-alive connections wait as long as aiohttp's keep-alive time, 75 s).
  aiohttp has no such limit: a client that never finishes its head held the
  connection until the keep-alive time ran out.
* A request's head (request line and header fields) may be at most MAX_HEAD_BYTES
  (64 KiB) long, else it is answered 400 REQUEST_INVALID and the connection closed
  (`_HeadLimit`). aiohttp limits each field (16 KiB here) and their number (128), not
  their sum: a connection that sent 128 fields of 16 KiB and never the blank line
  held ~3.2 MB for the whole header timeout (500 such connections: 1.8 GB).
* What a connection is sent must be taken by its client within NIXERY_SEND_TIMEOUT
  seconds (`nixery.http.stalled_readers`): a client that stops reading a blob is cut
  off rather than holding the connection, and the blob's file or storage stream, for ever.
* At most NIXERY_MAX_CONNECTIONS client connections are open at once (by default
  what the open-files limit leaves room for: `default_max_connections`). A new
  connection beyond that closes the one that has waited longest without a request
  under way (an idle keep-alive connection, or one that has not sent a whole head),
  as nginx reuses its idle connections: a client reopens a closed idle connection
  without its user noticing, while a request under way is someone's pull. Only when
  every connection has a request under way is the new one closed at once. Either is
  logged once per 10 s at most (`http.connections_full`). Without a cap, one client
  with 20,000 idle connections took every file descriptor and nobody else was served.
* Should the process run out of file descriptors all the same (something else holds
  them), a listening socket that cannot accept closes the waiting connection with a
  descriptor kept spare for that (`_ListeningSocket`, libuv's trick) and logs one
  `http.accept_failed` line per 10 s. asyncio (3.11) logged a plain-text traceback per
  attempt, 128 per loop turn, and retried on ever more timers: 600,000 lines a minute.

* Once every socket accepts, `registry.listening` logs the URL to pull from.
  On SIGTERM with NIXERY_SHUTDOWN_DELAY, the sockets go on accepting for that
  long while `/readyz` answers 503 (`registry.draining`). On SIGTERM or SIGINT,
  `registry.stopping` logs how many requests are under way, and `registry.stopped`
  how many of them were drained (answered in full within NIXERY_SHUTDOWN_GRACE)
  and how many were cut off.
* The grace is a bound (`_Server.shutdown`): the requests still under way when it
  ends are cut off then (`registry.cutting_off`), their connections aborted and their
  handlers cancelled, and given CUT_OFF_SECONDS at most to end. aiohttp's own
  shutdown waits the grace, cancels the handlers, then waits the grace again; and a
  blob sent with sendfile(2) is not ended by what it calls cancelling (the request's
  body is failed, not its task): one slow download held a stop for twice the grace,
  past systemd's and Kubernetes' time to stop, which then SIGKILLed the registry.

aiohttp has no supported way to change how it handles a connection: its
`Server` makes a `RequestHandler` itself. `RegistryRunner` therefore lets
`AppRunner` make the application's server, and serves with a `Server`
subclass built from that server's handler, request factory and settings,
whose connections are `RegistryConnection`s. It relies on `Server._kwargs`
(the handler settings) and `pre_shutdown`, and on `RequestHandler.handle_error`,
`_handle_request` and `finish_response` keeping their meaning; aiohttp is
pinned, and the tests of this module exercise each of them through a real
registry process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog
from aiohttp import HttpVersion11, hdrs, http_exceptions, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from nixery import errors, metrics
from nixery.http import health, hosts
from nixery.http.access import log_request
from nixery.http.errors import error_response, registry_error
from nixery.http.stalled_readers import is_send_timeout, limit_untaken_sends
from nixery.logs import Throttle

log = structlog.get_logger(__name__)

#: aiohttp's keep-alive time for idle connections, as `web.run_app` sets it.
KEEPALIVE_SECONDS = 75.0

#: The longest request head (request line and header fields) read. Registry clients send under
#: 2 KiB; a bearer token or a cookie a few KiB more.
MAX_HEAD_BYTES = 64 << 10

#: How often at most a connection refused or closed for the cap, or an accept that failed, is logged.
_CROWDED_LOG_INTERVAL = 10.0

#: How long the requests cut off at the end of the shutdown grace are given to end (their
#: connections aborted, their handlers cancelled) before the shutdown goes on without them.
CUT_OFF_SECONDS = 1.0


class ListenError(Exception):
    """The registry cannot listen where it was told to (one line, for the command line).
    `setting`: NIXERY_HOST is at fault (no such host or address), a configuration error, exit
    status 2; else (a port in use, a port below 1024 without root) the machine's state, 1."""

    def __init__(self, message: str, *, setting: bool = False):
        super().__init__(message)
        self.setting = setting


# ---- sockets -------------------------------------------------------------------


def listen(host: str, port: int, *, copies: int = 1, backlog: int = 128) -> list[list[socket.socket]]:
    """`copies` sets of listening sockets on every address of `host`, each set for one
    server process; with more than one, they share the port (SO_REUSEPORT)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        # The one setting that names it: "cannot listen on not-a-host" said neither which nor what it takes.
        raise ListenError(
            f"cannot listen on NIXERY_HOST={host!r}: {exc.strerror} (give an address such as 127.0.0.1, 0.0.0.0 "
            "or ::, or a host name this machine resolves)", setting=True
        ) from None
    sets: list[list[socket.socket]] = []
    try:
        for _ in range(copies):
            sets.append([])
            for family, kind, proto, _name, address in dict.fromkeys(addresses):
                sock = _ListeningSocket(family, kind, proto)
                sets[-1].append(sock)
                _bind(sock, address, reuse_port=copies > 1, backlog=backlog)
    except BaseException:
        close_all(sets)
        raise
    return sets


def _bind(sock: socket.socket, address: Any, *, reuse_port: bool, backlog: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: restarts need no wait
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    shown = f"[{address[0]}]:{address[1]}" if sock.family == socket.AF_INET6 else f"{address[0]}:{address[1]}"
    try:
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "the address is in use (another process listens on this port)",
            errno.EACCES: "permission denied (ports below 1024 need root)",
            errno.EADDRNOTAVAIL: "no such address on this machine (NIXERY_HOST)",
        }.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        raise ListenError(f"cannot listen on {shown}: {reason}", setting=exc.errno == errno.EADDRNOTAVAIL) from None
    sock.setblocking(False)


def bound_addresses(sockets: Sequence[socket.socket]) -> list[tuple[int, Any]]:
    """Where a set of sockets from `listen` is bound, for `listen_on`."""
    return [(sock.family, sock.getsockname()) for sock in sockets]


def listen_on(addresses: Sequence[tuple[int, Any]], *, backlog: int = 128) -> list[socket.socket]:
    """One more set of listening sockets on the `addresses` (`bound_addresses`) of sets from `listen` (the port they
    share): for a worker that replaces one that ended."""
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sockets.append(_ListeningSocket(family, socket.SOCK_STREAM))
            _bind(sockets[-1], address, reuse_port=True, backlog=backlog)
    except BaseException:
        close_all([sockets])
        raise
    return sockets


def close_all(sets: Sequence[Sequence[socket.socket]]) -> None:
    for sockets in sets:
        for sock in sockets:
            sock.close()


class _ListeningSocket(socket.socket):
    """A listening socket whose `accept`, when the process is out of file descriptors, closes
    the connection waiting for it and logs one line per 10 s, instead of failing.

    asyncio (3.11) answered EMFILE with a plain-text traceback for each of its 128 accepts per
    loop turn, each also scheduling a retry of its own, and the listening socket stayed readable:
    the lines, and the retries, multiplied. Here the waiting client is accepted with a descriptor
    kept spare for that and closed at once (it learns at once; libuv's trick), and asyncio is
    told there is nothing to accept, so it tries again when the next client comes. Without the
    spare (another thread took it), asyncio is given the error once, and stops accepting for a
    second; the rest of its 128 attempts are told there is nothing to accept."""

    _pause_ends = 0.0

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if time.monotonic() < self._pause_ends:
                raise BlockingIOError(errno.EAGAIN, "out of file descriptors") from None
            shed = _shed_waiting_connection(self)
            _report_accept_failed(exc, shed=shed)
            if shed:
                raise BlockingIOError(errno.EAGAIN, "out of file descriptors; the waiting one was closed") from None
            self._pause_ends = time.monotonic() + 1.0  # asyncio's ACCEPT_RETRY_DELAY
            raise


#: A descriptor held for `_shed_waiting_connection` (each process its own, after a fork).
_spare_descriptor: int | None = None


def _hold_spare_descriptor() -> None:
    global _spare_descriptor
    if _spare_descriptor is None:
        with contextlib.suppress(OSError):
            _spare_descriptor = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _shed_waiting_connection(sock: socket.socket) -> bool:
    """Accept the connection waiting on `sock` with the spare descriptor and close it; whether one was."""
    global _spare_descriptor
    if _spare_descriptor is None:
        _hold_spare_descriptor()  # given back after an earlier shedding, maybe
        return False
    os.close(_spare_descriptor)
    _spare_descriptor = None
    try:
        waiting, _ = socket.socket.accept(sock)
        waiting.close()
        return True
    except OSError:
        return False
    finally:
        _hold_spare_descriptor()


_accept_failures = Throttle(_CROWDED_LOG_INTERVAL)


def _report_accept_failed(exc: OSError, *, shed: bool) -> None:
    held_back = _accept_failures.due()
    if held_back is not None:
        log.error("http.accept_failed", reason=os.strerror(exc.errno or 0), open_files_limit=open_files_limit(),
                  closed_at_once=shed, failed_since_last_line=held_back,
                  note="out of file descriptors: new connections are closed until some are freed")


# ---- file descriptors and connections ----------------------------------------------


def open_files_limit() -> int:
    """The process's limit on open file descriptors (its soft RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: The open-files limit before `raise_open_files_limit` raised it (for `registry.listening`).
_open_files_raised_from: int | None = None


def raise_open_files_limit() -> None:
    """Raise the open-files limit to the most it may be (the hard limit): every client connection
    holds a descriptor, and a default soft limit (1024) is soon reached. `registry.listening`
    says the limit (not said here: a start that fails is one line)."""
    global _open_files_raised_from
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            _open_files_raised_from = soft


def default_max_connections(open_files: int) -> int:
    """NIXERY_MAX_CONNECTIONS when unset: a connection may hold two descriptors (its socket and
    the file of a blob it is sent), and a quarter of the limit, at most 1024, is left for the
    rest (storage, Nix's processes and pipes, the evaluators, the log)."""
    left_for_the_rest = min(1024, open_files // 4)
    return max(1, (open_files - left_for_the_rest) // 2)


# ---- serving -------------------------------------------------------------------


#: What stops the registry gracefully. SIGHUP too: there is nothing to reload, and its default action
#: (a closed terminal) ended the process without letting responses finish.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run(app: web.Application, sockets: Sequence[socket.socket], *, shutdown_timeout: float,
        header_timeout: float, send_timeout: float, listening: Callable[[], object] = lambda: None,
        shutdown_delay: float = 0.0, max_connections: int | None = None) -> None:
    """Serve `app` on bound sockets until SIGTERM, SIGINT or SIGHUP, then let in-flight
    responses finish within `shutdown_timeout` (as `web.run_app` does); `listening` is
    called once they accept. After SIGTERM the sockets go on accepting for `shutdown_delay`
    seconds first, while `/readyz` says the registry is shutting down (`_drain`). At most
    `max_connections` (None: `default_max_connections`) client connections are open at once."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_log_loop_error)
    _hold_spare_descriptor()
    limit = max_connections or default_max_connections(open_files_limit())
    try:
        loop.run_until_complete(
            _serve(app, sockets, shutdown_timeout, header_timeout, send_timeout, listening, shutdown_delay, limit)
        )
    finally:
        remaining = asyncio.all_tasks(loop)
        for task in remaining:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*remaining, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        # Before close, which closes the signals' wakeup pipe first: a SIGTERM in between (the
        # parent of several workers stopping the others) printed "Exception ignored ... Bad file
        # descriptor". From here a signal has its default effect.
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        loop.close()


async def _serve(app: web.Application, sockets: Sequence[socket.socket], shutdown_timeout: float,
                 header_timeout: float, send_timeout: float, listening: Callable[[], object],
                 shutdown_delay: float, max_connections: int) -> None:
    runner = RegistryRunner(
        app,
        header_timeout=header_timeout,
        send_timeout=send_timeout,
        max_connections=max_connections,
        # The keep-alive timer also closes a connection still waiting for its first head:
        # never before the header timeout.
        keepalive_timeout=max(KEEPALIVE_SECONDS, header_timeout),
        shutdown_timeout=shutdown_timeout,
        access_log=None,  # the application logs each request (nixery.http.access.access_log)
    )
    stopped_by: list[signal.Signals] = []
    stop = asyncio.Event()
    stop_now = asyncio.Event()  # a second signal: no more delay

    def stop_on(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        if stop.is_set():
            stop_now.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop_on, signum)
    await runner.setup()
    server: _Server = runner.server  # type: ignore[assignment]  # made by RegistryRunner
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        raised = {} if _open_files_raised_from is None else {"raised_from": _open_files_raised_from}
        open_files = open_files_limit()
        log.info("registry.listening", url=pull_url(sockets[0]), addresses=[_address(s) for s in sockets],
                 max_connections=max_connections, open_files_limit=open_files, **raised)
        if max_connections > (room_for := default_max_connections(open_files)):
            log.warning("registry.max_connections_above_open_files", max_connections=max_connections,
                        open_files_limit=open_files, room_for=room_for,
                        note="connections may take every file descriptor: lower NIXERY_MAX_CONNECTIONS or "
                             "raise the limit")
        listening()
        await stop.wait()
        health.begin_shutdown(app)
        if shutdown_delay > 0 and stopped_by[0] == signal.SIGTERM:
            await _drain(shutdown_delay, stop_now, server)
    finally:
        if stopped_by:
            log.info("registry.stopping", signal=stopped_by[0].name, in_flight=server.in_flight,
                     grace=shutdown_timeout)
        started = time.monotonic()
        await runner.cleanup()
        if stopped_by:
            log.info("registry.stopped", drained=server.finished_while_stopping, cut_off=server.cut_off,
                     seconds=round(time.monotonic() - started, 2))


async def _drain(delay: float, stop_now: asyncio.Event, server: _Server) -> None:
    """NIXERY_SHUTDOWN_DELAY: a load balancer (a Kubernetes Service's endpoints, which learn
    of a pod's end at the same time as the pod) goes on sending new connections for a few
    seconds after SIGTERM; a closed port would refuse them. So the registry serves on, and
    `/readyz` answers 503, until the delay is over or a second signal comes. Only on SIGTERM:
    Ctrl-C (SIGINT) or a closed terminal (SIGHUP) means someone waiting at a terminal."""
    log.info("registry.draining", seconds=delay, in_flight=server.in_flight,
             note="serving on while load balancers stop sending new connections")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_now.wait(), delay)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's errors as one structured line each (its own handler writes plain text)."""
    exception = context.get("exception")
    if isinstance(exception, OSError) and exception.errno in (errno.EMFILE, errno.ENFILE):
        return  # said by `http.accept_failed` (asyncio's message is the same for ENOBUFS and ENOMEM: those are logged)
    log.error("asyncio.error", message=context.get("message"), exc_info=context.get("exception"))


def pull_url(sock: socket.socket) -> str:
    """The URL to pull from through a listening socket (a wildcard address: this machine's loopback)."""
    host, *rest = sock.getsockname()
    return f"http://{hosts.socket_host((_LOOPBACK.get(host, host), *rest))}"


#: The loopback address of each wildcard one.
_LOOPBACK = {"::": "::1", "0.0.0.0": "127.0.0.1"}


def _address(sock: socket.socket) -> str:
    return hosts.socket_host(sock.getsockname())


class RegistryRunner(web.AppRunner):
    """An AppRunner whose connections are RegistryConnections."""

    def __init__(self, app: web.Application, *, header_timeout: float, send_timeout: float, max_connections: int,
                 **kwargs: Any):
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # also starts the application (its cleanup_ctx)
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            header_timeout=self._header_timeout,
            send_timeout=self._send_timeout,
            max_connections=self._max_connections,
            **plain._kwargs,
        )


class _Server(web.Server):
    """The connections' server; counts the requests under way, and how those under way
    when shutting down ended (for the shutdown's log lines); keeps the connections open
    within `max_connections`."""

    def __init__(self, handler: Any, *, request_factory: Any, header_timeout: float, send_timeout: float,
                 max_connections: int, **kwargs: Any):
        def new_request(
            message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
            writer: AbstractStreamWriter, task: asyncio.Task[None],
        ) -> web.BaseRequest:
            cast(RegistryConnection, protocol).head_received()  # the only connections `__call__` makes
            return request_factory(message, payload, protocol, writer, task)

        super().__init__(_http_errors_as_registry_errors(handler), request_factory=new_request, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self.in_flight = 0
        self.stopping = False
        self.finished_while_stopping = 0  # answered in full after the shutdown began
        self.cut_off = 0  # under way at the end of the grace period, or ended by their client hanging up
        self.max_connections = max_connections
        self._open: set[RegistryConnection] = set()
        #: The open connections without a request under way, longest waiting first.
        self._idle: dict[RegistryConnection, None] = {}
        self._crowded = Throttle(_CROWDED_LOG_INTERVAL)
        self._closed_idle = self._refused = 0  # since the last `http.connections_full` line

    def pre_shutdown(self) -> None:
        self.stopping = True
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let the requests under way finish within `timeout` (the grace), then cut off those
        that have not (`RegistryConnection.cut_off`); they are counted as cut off then, and
        given CUT_OFF_SECONDS to end. So the shutdown takes the grace and that at most."""
        connections = cast(list[RegistryConnection], list(self._connections))  # the only ones `__call__` makes
        ending: dict[asyncio.Future[None], RegistryConnection] = {
            asyncio.ensure_future(connection.shutdown(timeout)): connection for connection in connections
        }
        unfinished: set[asyncio.Future[None]] = set()
        if ending:
            _, unfinished = await asyncio.wait(ending, timeout=timeout)
        if unfinished:
            cut = [ending[waiting] for waiting in unfinished]
            under_way = sum(connection.request_under_way for connection in cut)
            log.info("registry.cutting_off", requests=under_way, grace=timeout,
                     note="the shutdown grace is over: requests still under way are cut off")
            self.cut_off += under_way
            handlers = [task for connection in cut if (task := connection.cut_off()) is not None]
            for waiting in unfinished:
                waiting.cancel()
            await asyncio.wait([*unfinished, *handlers], timeout=CUT_OFF_SECONDS)
        self._connections.clear()

    def request_ended(self, completed: bool, *, counted: bool = False) -> None:
        """A request ended (`completed`: answered in full); `counted`: already counted as cut off."""
        self.in_flight -= 1
        if self.stopping and not counted:
            if completed:
                self.finished_while_stopping += 1
            else:
                self.cut_off += 1

    def admit(self, connection: RegistryConnection) -> bool:
        """Whether a new connection may stay open: below the cap, or once the connection that
        has waited longest without a request under way is closed for it."""
        if len(self._open) >= self.max_connections:
            if not self._idle:
                self._refused += 1
                self._say_crowded()
                return False
            longest_idle = next(iter(self._idle))
            self.forget(longest_idle)
            longest_idle.force_close()
            self._closed_idle += 1
            self._say_crowded()
        self._open.add(connection)
        self._idle[connection] = None
        return True

    def busy(self, connection: RegistryConnection) -> None:
        self._idle.pop(connection, None)

    def idle(self, connection: RegistryConnection) -> None:
        if connection in self._open:
            self._idle.pop(connection, None)
            self._idle[connection] = None  # the most recent

    def forget(self, connection: RegistryConnection) -> None:
        self._open.discard(connection)
        self._idle.pop(connection, None)

    def _say_crowded(self) -> None:
        if self._crowded.due() is not None:
            log.warning("http.connections_full", max_connections=self.max_connections,
                        closed_idle=self._closed_idle, refused=self._refused,
                        note="idle connections are closed for new ones; new ones are refused while every "
                             "connection has a request under way (NIXERY_MAX_CONNECTIONS)")
            self._closed_idle = self._refused = 0

    def __call__(self) -> RegistryConnection:
        return RegistryConnection(self, loop=self._loop, header_timeout=self._header_timeout,
                                  send_timeout=self._send_timeout, **self._kwargs)


def _http_errors_as_registry_errors(handler: Any) -> Any:
    """The application's handler, with the HTTP errors aiohttp raises before the middlewares
    answered as the registry's JSON errors: its 417 to an `Expect` other than `100-continue`
    was plain text that quoted the header. They are logged and counted here, since the
    middlewares that log and count the others never saw them."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        try:
            return cast(web.StreamResponse, await handler(request))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            refused = exc
        except UnicodeEncodeError:  # aiohttp's refusal quotes the `Expect`, and fails on a value not UTF-8
            if not _unmet_expectation(request):
                raise
            refused = web.HTTPExpectationFailed()
        response = error_response(registry_error(refused))
        # The middlewares never saw it: logged and counted here, as they would have.
        log_request(request, response.status, started)
        metrics.count_request(cast(web.Request, request), response.status, started)
        return response

    return handle


def _unmet_expectation(request: web.BaseRequest) -> bool:
    """An `Expect` other than `100-continue` in an HTTP/1.1 request (which aiohttp refuses too)."""
    expect = request.headers.get(hdrs.EXPECT)
    return expect is not None and request.version == HttpVersion11 and expect.lower() != "100-continue"


class RegistryConnection(RequestHandler):
    """One client connection: registry errors for unparseable requests, limits on the time and
    size of request heads and on what the client leaves unread, and its place among the
    connections open (`_Server.admit`)."""

    __slots__ = ("_header_timeout", "_send_timeout", "_head_deadline", "_awaiting_head", "_requests_pending",
                 "request_under_way", "_cut_off")

    def __init__(self, manager: web.Server, *, header_timeout: float, send_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._requests_pending = 0  # heads parsed whose requests have not ended
        self.request_under_way = False  # its handler or its response not yet done
        self._cut_off = False  # at the end of the shutdown grace
        self._parser = _HeadLimit(self._parser, self._heads_parsed)  # type: ignore[assignment]  # its methods

    # -- the head's time limit --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limit_untaken_sends(transport, self._send_timeout)
        if not self._server.admit(self):
            self.force_close()
            return
        self._start_head_clock()

    @property
    def _server(self) -> _Server:
        return self._manager  # type: ignore[return-value]  # the only server that makes RegistryConnections

    def _heads_parsed(self, count: int) -> None:
        self._requests_pending += count
        self._server.busy(self)

    def data_received(self, data: bytes) -> None:
        if data and self._awaiting_head and self._head_deadline is None:  # a later request's first bytes
            self._start_head_clock()
        super().data_received(data)
        # A request aiohttp could not parse waits to be answered as its exception, whose traceback
        # holds the frames that read it, and their reads (256 KiB each), in a reference cycle
        # through this connection: if the client left first, only a full collection freed them
        # (500 refused heads kept 300 MB).
        for message, _ in self._messages:
            if isinstance(exc := getattr(message, "exc", None), BaseException):
                exc.__traceback__ = None

    def head_received(self) -> None:
        """A request's head was parsed (or found malformed): it came in time."""
        self._awaiting_head = False
        self._stop_head_clock()

    async def _handle_request(self, request: Any, start_time: float | None, request_handler: Any) -> Any:
        """aiohttp's handling of one request (handler and response), counted while under way."""
        manager = self._server
        manager.in_flight += 1
        self.request_under_way = True
        completed = False
        try:
            result = await super()._handle_request(request, start_time, request_handler)
            completed = True
            return result
        finally:
            self.request_under_way = False
            manager.request_ended(completed, counted=self._cut_off)
            # Not counted: the 400 to a head the parser refused (the connection then closes).
            self._requests_pending = max(0, self._requests_pending - 1)
            if not self._requests_pending:
                manager.idle(self)

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._awaiting_head = True  # the clock starts again with the next request's first byte

    def cut_off(self) -> asyncio.Task[None] | None:
        """The shutdown grace is over: end this connection now, the request under way with it.
        Its transport is aborted and its handler cancelled: the cancel ends a blob sent with
        sendfile(2), which waits for the socket to take more and does not see it closed; the
        abort, a response written piece by piece (an event stream, a blob relayed from object
        storage). Returns the connection's task, to wait for (None: it has ended)."""
        task = self._task_handler  # before the abort: `connection_lost` forgets it
        self._cut_off = self.request_under_way
        # aiohttp's shutdown waits for the handler on this future, and the caller cancels that wait
        # next, which cancels the future: a handler ending before the shutdown had seen it would set
        # its result, an InvalidStateError logged as an unhandled error. Nothing waits on it now.
        self._handler_waiter = None
        if self.transport is not None:
            self.transport.abort()
        if task is None or task.done():
            return None
        task.cancel()
        return task

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
        self._server.forget(self)
        if is_send_timeout(exc):
            log.info("http.send_timeout", peer=_peer(self.transport), seconds=self._send_timeout)
        super().connection_lost(exc)

    def _start_head_clock(self) -> None:
        self._head_deadline = asyncio.get_running_loop().call_later(self._header_timeout, self._head_too_slow)

    def _stop_head_clock(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        log.info("http.header_timeout", peer=_peer(self.transport), seconds=self._header_timeout)
        self.force_close()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """What aiohttp logs as "Unhandled exception" (as plain text, with a traceback), mostly a
        request body it cannot read, which the application already answered (400) and the
        connection, closed next, cannot resync from: nothing to log. Anything else is one line."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | http_exceptions.HttpProcessingError | ConnectionError):
            return
        log.error("http.unhandled_error", message=str(args[0]) if args else None,
                  exc_info=exc if isinstance(exc, BaseException) else True)

    # -- requests aiohttp cannot parse --

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or that failed outside
        the application's middlewares (500, 504): the registry's JSON error, never the input."""
        if status == 400:
            error: errors.RegistryError = errors.RequestInvalid(self._malformed(exc))
            # podman and skopeo with --tls-verify=false try HTTPS first, on every pull: say so.
            problem = "TLSHandshake" if _is_tls_handshake(exc) else type(exc).__name__
            log.info("http.malformed_request", peer=_peer(self.transport), problem=problem)
            metrics.malformed_request()  # it never reaches the middlewares, which count the others
        else:
            error = errors.InternalError("internal error; see the registry's log")
            log.error("http.unhandled_error", status=status, exc_info=exc)
        if request.writer.output_size > 0:  # part of a response went out already: only closing is left
            raise ConnectionError("response already started; cannot send an error")
        response = web.json_response(error.to_json(), status=error.status)
        response.force_close()
        return response

    def _malformed(self, exc: BaseException | None) -> str:
        match exc:
            case HeadTooLarge():
                return f"the request head is too large (at most {MAX_HEAD_BYTES} bytes of request line and headers)"
            case http_exceptions.LineTooLong():
                return (f"the request line or a header field is too long (at most {self.max_line_size} bytes "
                        f"for the request line and {self.max_field_size} for a header field)")
            case http_exceptions.InvalidURLError():
                return "the request target is not a valid path: it must be printable ASCII (percent-encode the rest)"
            case http_exceptions.BadHttpMethod() if _is_tls_handshake(exc):
                return "not an HTTP request: a TLS handshake (HTTPS) on this plain-HTTP port"
            case http_exceptions.BadHttpMethod():
                return "the request method is none that HTTP defines (this registry answers GET, HEAD and POST)"
            case VersionNotSupported():
                return "this registry speaks HTTP/1.1 and HTTP/1.0 only (the request line names another version)"
            case http_exceptions.BadStatusLine():
                return "malformed request line"
            case http_exceptions.InvalidHeader():
                return "malformed header field"
            case http_exceptions.BadHttpMessage(message="Too many headers received"):  # both parsers' words
                return f"too many header fields (at most {self.max_headers})"
            case http_exceptions.ContentLengthError() | http_exceptions.TransferEncodingError():
                return "malformed body framing (Content-Length or Transfer-Encoding)"
            case http_exceptions.BadHttpMessage(message=str(said)) if any(
                word in said for word in ("Content-Length", "Transfer-Encoding", "chunk")
            ):  # llhttp's words for the same (a bad or duplicate length, both headers, a bad chunk size)
                return "malformed body framing (Content-Length or Transfer-Encoding)"
            case _:
                return "malformed HTTP request"


def _is_tls_handshake(exc: BaseException | None) -> bool:
    """aiohttp's parsers' word for a request that starts as a TLS handshake does."""
    return isinstance(exc, http_exceptions.BadHttpMethod) and "HTTPS traffic" in str(exc.message)


class HeadTooLarge(http_exceptions.BadHttpMessage):
    """A request head over MAX_HEAD_BYTES (answered 400, as aiohttp's parse errors are)."""

    def __init__(self) -> None:
        super().__init__(f"request head over {MAX_HEAD_BYTES} bytes")


class VersionNotSupported(http_exceptions.BadHttpMessage):
    """A request line of another HTTP version than 1.x (answered 400, as aiohttp's parse errors are)."""

    def __init__(self) -> None:
        super().__init__("not HTTP/1.x")


class _HeadLimit:
    """A connection's request parser, refusing a request head over MAX_HEAD_BYTES (HeadTooLarge).

    The bytes of a head are counted from where the last request (its head and its body) ended.
    Data is parsed in pieces of at most MAX_HEAD_BYTES, so what follows a head or a body in the
    same piece (the start of a pipelined request's head, uncounted) is never more than that: an
    unfinished head holds at most MAX_HEAD_BYTES, and twice that after a request it was pipelined
    behind. Everything else is aiohttp's parser's."""

    def __init__(self, parser: Any, heads_parsed: Callable[[int], object]):
        self._parser = parser
        self._heads_parsed = heads_parsed
        self._head_bytes = 0  # of the head being received
        self._body: StreamReader | None = None  # the last request's
        self._refused = False

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        messages: list[Any] = []
        offset = 0
        if self._refused:  # the answer is on its way, and then the connection closes
            return messages, False, b""
        while True:
            heading = self._body is None or self._body.is_eof()
            if heading and self._head_bytes >= MAX_HEAD_BYTES and offset < len(data):
                self._refused = True
                raise HeadTooLarge()
            room = MAX_HEAD_BYTES - self._head_bytes if heading else MAX_HEAD_BYTES
            piece = data[offset : offset + room]
            offset += len(piece)
            parsed, upgraded, tail = self._parser.feed_data(piece)
            if any(message.version.major != 1 for message, _ in parsed):
                # llhttp takes `HTTP/2.0` in a request line, and aiohttp answered it in HTTP/1 framing
                # under an `HTTP/2.0 200 OK` status line, which is neither protocol.
                self._refused = True
                raise VersionNotSupported()
            if parsed:
                messages.extend(parsed)
                self._heads_parsed(len(parsed))
                self._head_bytes = 0
                self._body = parsed[-1][1]
            elif heading:
                self._head_bytes += len(piece)
            if upgraded:
                return messages, upgraded, tail + data[offset:]
            if offset >= len(data):
                return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) else None

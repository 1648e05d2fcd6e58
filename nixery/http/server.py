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
* What a connection is sent must be taken by its client within NIXERY_SEND_TIMEOUT
  seconds (`nixery.http.stalled_readers`): a client that stops reading a blob is cut
  off rather than holding the connection, and the blob's file or storage stream, for ever.

* Once every socket accepts, `registry.listening` logs the URL to pull from.
  On SIGTERM with NIXERY_SHUTDOWN_DELAY, the sockets go on accepting for that
  long while `/readyz` answers 503 (`registry.draining`). On SIGTERM or SIGINT,
  `registry.stopping` logs how many requests are under way, and `registry.stopped`
  how many of them were drained (answered in full within NIXERY_SHUTDOWN_GRACE)
  and how many were cut off.

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
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog
from aiohttp import http_exceptions, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from nixery import errors, metrics
from nixery.http import health
from nixery.http.access import log_request
from nixery.http.errors import error_response, registry_error
from nixery.http.stalled_readers import is_send_timeout, limit_untaken_sends

log = structlog.get_logger(__name__)

#: aiohttp's keep-alive time for idle connections, as `web.run_app` sets it.
KEEPALIVE_SECONDS = 75.0


class ListenError(Exception):
    """The registry cannot listen where it was told to (one line, for the command line)."""


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
            "or ::, or a host name this machine resolves)"
        ) from None
    sets: list[list[socket.socket]] = []
    try:
        for _ in range(copies):
            sets.append([])
            for family, kind, proto, _name, address in dict.fromkeys(addresses):
                sock = socket.socket(family, kind, proto)
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
            errno.EADDRNOTAVAIL: "no such address on this machine",
        }.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        raise ListenError(f"cannot listen on {shown}: {reason}") from None
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
            sockets.append(socket.socket(family, socket.SOCK_STREAM))
            _bind(sockets[-1], address, reuse_port=True, backlog=backlog)
    except BaseException:
        close_all([sockets])
        raise
    return sockets


def close_all(sets: Sequence[Sequence[socket.socket]]) -> None:
    for sockets in sets:
        for sock in sockets:
            sock.close()


# ---- serving -------------------------------------------------------------------


#: What stops the registry gracefully. SIGHUP too: there is nothing to reload, and its default action
#: (a closed terminal) ended the process without letting responses finish.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run(app: web.Application, sockets: Sequence[socket.socket], *, shutdown_timeout: float,
        header_timeout: float, send_timeout: float, listening: Callable[[], object] = lambda: None,
        shutdown_delay: float = 0.0) -> None:
    """Serve `app` on bound sockets until SIGTERM, SIGINT or SIGHUP, then let in-flight
    responses finish within `shutdown_timeout` (as `web.run_app` does); `listening` is
    called once they accept. After SIGTERM the sockets go on accepting for `shutdown_delay`
    seconds first, while `/readyz` says the registry is shutting down (`_drain`)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            _serve(app, sockets, shutdown_timeout, header_timeout, send_timeout, listening, shutdown_delay)
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
                 shutdown_delay: float) -> None:
    runner = RegistryRunner(
        app,
        header_timeout=header_timeout,
        send_timeout=send_timeout,
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
        log.info("registry.listening", url=pull_url(sockets[0]), addresses=[_address(s) for s in sockets])
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


def pull_url(sock: socket.socket) -> str:
    """The URL to pull from through a listening socket (a wildcard address: this machine's loopback)."""
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return f"http://[{'::1' if host == '::' else host}]:{port}"
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class RegistryRunner(web.AppRunner):
    """An AppRunner whose connections are RegistryConnections."""

    def __init__(self, app: web.Application, *, header_timeout: float, send_timeout: float, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # also starts the application (its cleanup_ctx)
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            header_timeout=self._header_timeout,
            send_timeout=self._send_timeout,
            **plain._kwargs,
        )


class _Server(web.Server):
    """The connections' server; counts the requests under way, and how those under way
    when shutting down ended (for the shutdown's log lines)."""

    def __init__(self, handler: Any, *, request_factory: Any, header_timeout: float, send_timeout: float,
                 **kwargs: Any):
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
        self.cut_off = 0  # cancelled at the end of the grace period, or by their client hanging up

    def pre_shutdown(self) -> None:
        self.stopping = True
        super().pre_shutdown()

    def request_ended(self, completed: bool) -> None:
        self.in_flight -= 1
        if self.stopping:
            if completed:
                self.finished_while_stopping += 1
            else:
                self.cut_off += 1

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
            response = error_response(registry_error(exc))
            # The middlewares never saw it: logged and counted here, as they would have.
            log_request(request, response.status, started)
            metrics.count_request(cast(web.Request, request), response.status, started)
            return response

    return handle


class RegistryConnection(RequestHandler):
    """One client connection: registry errors for unparseable requests, and time limits on request
    heads and on what the client leaves unread."""

    __slots__ = ("_header_timeout", "_send_timeout", "_head_deadline", "_awaiting_head")

    def __init__(self, manager: web.Server, *, header_timeout: float, send_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True

    # -- the head's time limit --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limit_untaken_sends(transport, self._send_timeout)
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if data and self._awaiting_head and self._head_deadline is None:  # a later request's first bytes
            self._start_head_clock()
        super().data_received(data)

    def head_received(self) -> None:
        """A request's head was parsed (or found malformed): it came in time."""
        self._awaiting_head = False
        self._stop_head_clock()

    async def _handle_request(self, request: Any, start_time: float | None, request_handler: Any) -> Any:
        """aiohttp's handling of one request (handler and response), counted while under way."""
        manager: _Server = self._manager  # type: ignore[assignment]
        manager.in_flight += 1
        completed = False
        try:
            result = await super()._handle_request(request, start_time, request_handler)
            completed = True
            return result
        finally:
            manager.request_ended(completed)

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._awaiting_head = True  # the clock starts again with the next request's first byte

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
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

    # -- requests aiohttp cannot parse --

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or that failed outside
        the application's middlewares (500, 504): the registry's JSON error, never the input."""
        if status == 400:
            error: errors.RegistryError = errors.RequestInvalid(self._malformed(exc))
            log.info("http.malformed_request", peer=_peer(self.transport), problem=type(exc).__name__)
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
            case http_exceptions.LineTooLong():
                return (f"the request line or a header field is too long (at most {self.max_line_size} bytes "
                        f"for the request line and {self.max_field_size} for a header field)")
            case http_exceptions.InvalidURLError():
                return "the request target is not a valid path: it must be printable ASCII (percent-encode the rest)"
            case http_exceptions.BadHttpMethod():
                return "not an HTTP request: unknown method (HTTPS sent to a plain-HTTP port?)"
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


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) else None

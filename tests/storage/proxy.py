"""A TCP proxy between a driver and its object store, run in the test's event loop.

It lets a test cut the store off (stop), bring it back on the same port
(start), stall it (connections are accepted but no byte moves either way, as
with a store whose process is stopped, until resume), answer every request
with 503, or slow uploads down to a given rate
so that a process can be killed in the middle of one, or answer 500 to the
requests a predicate picks (the proxy then follows HTTP/1.1 request framing
towards the store). It counts the bytes sent towards the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class TCPProxy:
    def __init__(self, upstream_port: int, *, rate: float | None = None):
        self.upstream_port = upstream_port
        self.rate = rate  # bytes/s towards the store, None for unlimited
        self.port = 0
        self.mode = "forward"  # or "503"
        self.upstream_bytes = 0
        #: Requests whose head (request line and headers) this accepts get a 500.
        self.fail_request: Callable[[bytes], bool] | None = None
        self.failed_requests = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TCPProxy:
        """Listen (again) on the same port as before, or a free one the first time."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5)
            await self._server.wait_closed()
            self._server = None

    def stall(self) -> None:
        """Move no more bytes, on open connections or new ones, until `resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def __aenter__(self) -> TCPProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_upstream_bytes(self, count: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.upstream_bytes < count:
            if loop.time() > deadline:
                raise TimeoutError(f"only {self.upstream_bytes} bytes went upstream in {timeout}s")
            await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        try:
            if self.mode == "503":
                await self._refuse(reader, writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            self._writers.add(up_writer)
            towards_store = (
                self._pump_requests(reader, up_writer, writer)
                if self.fail_request is not None
                else self._pump(reader, up_writer, count=True)
            )
            try:
                await asyncio.gather(towards_store, self._pump(up_reader, writer, count=False))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while (await self._flowing.wait()) and (data := await reader.read(64 * 1024)):
                await self._flowing.wait()  # a stall that began while reading holds this piece too
                writer.write(data)
                await writer.drain()
                if count:
                    self.upstream_bytes += len(data)
                    if self.rate:
                        await asyncio.sleep(len(data) / self.rate)
            if writer.can_write_eof():
                writer.write_eof()

    async def _forward(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        writer.write(data)
        await writer.drain()
        self.upstream_bytes += len(data)
        if self.rate:
            await asyncio.sleep(len(data) / self.rate)

    async def _pump_requests(
        self, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, writer: asyncio.StreamWriter
    ) -> None:
        """Forward request by request; answer 500 to those `fail_request` picks."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lowered = head.lower()
                if b"transfer-encoding: chunked" in lowered:  # framing not followed: pass the rest
                    await self._forward(head, up_writer)
                    await self._pump(reader, up_writer, count=True)
                    return
                length = 0
                for line in lowered.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                fail = self.fail_request is not None and self.fail_request(head)
                if not fail:
                    await self._forward(head, up_writer)
                while length > 0:
                    data = await reader.read(min(length, 64 * 1024))
                    if not data:
                        return
                    length -= len(data)
                    if not fail:
                        await self._forward(data, up_writer)
                if fail:
                    # Only safe with one request in flight per connection, which
                    # is how HTTP/1.1 clients without pipelining behave.
                    self.failed_requests += 1
                    body = b"<Error><Code>InternalError</Code><Message>injected by test proxy</Message></Error>"
                    writer.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()

    @staticmethod
    async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One answer per connection, so that clients reconnect (and find the
        # store back) once the mode is "forward" again.
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            body = b'{"error": {"code": 503, "message": "test proxy says unavailable"}}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

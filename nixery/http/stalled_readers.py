"""Clients that stop reading what they asked for.

A client that requests a blob and then reads nothing (or a byte now and then) held its
connection, and while the answer was being sent the blob's open file or its storage
stream, for as long as it kept the connection open: aiohttp has no time limit on sending,
and its keep-alive timer only runs between requests. Enough such clients (one program
opening thousands of connections) left the registry without file descriptors.

Each connection is therefore given a limit on how long what it was sent may go untaken:
TCP_USER_TIMEOUT, set to NIXERY_SEND_TIMEOUT. Once bytes sent on it have waited that
long for the client to take them (also while the client's window stays shut: Linux 5.11
on), the kernel ends the connection and the registry's next use of it fails, so the
handler, its file and its stream are let go. The kernel watches every connection at no
cost to the event loop, and a connection with nothing to send (a client waiting for a
build) is not limited. A client that keeps reading is not cut off either, as long as it
frees a segment's worth of its window within the limit: the kernel reopens a shut window
a segment (MSS) at a time, ~1.4 KB on a network and 64 KB on loopback, so with the
default of 60 s only a client slower than ~25 B/s (on loopback ~1 KB/s) is cut off. This
is what nginx's `send_timeout` (also 60 s) does.

The cut-off is logged (`http.send_timeout`) where the kernel's error reaches the
connection: after an answer that went out in full into the kernel's buffers, or one
relayed from object storage. During sendfile(2) asyncio takes the error for sendfile
being unavailable and the connection ends as if the client had hung up (not logged).
"""

from __future__ import annotations

import asyncio
import errno
import socket

#: Not on every system (it is on Linux, which the registry runs on): without it, nothing is limited.
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


def limit_untaken_sends(transport: asyncio.BaseTransport, seconds: float) -> None:
    """End the connection once what it was sent has waited `seconds` for the client to take it."""
    sock: socket.socket | None = transport.get_extra_info("socket")
    if _USER_TIMEOUT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, _USER_TIMEOUT, max(1, round(seconds * 1000)))


def is_send_timeout(exc: BaseException | None) -> bool:
    """Whether a connection ended because its client left what it was sent untaken for too long."""
    return isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT

"""Serving one accepted connection the way the reference demo does: one read, one reply, close."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

from takeover_console.ipc import REQUEST_MAX


@dataclass
class ServeResult:
    """The result of serving one connection: ``outcome`` is "served" or the reason it was not."""

    outcome: str
    bytes_in: int = 0

    @property
    def served(self) -> bool:
        """True when the reply was written."""
        return self.outcome == "served"


def serve_now(sock: socket.socket, reply: bytes) -> ServeResult | None:
    """Serve at once when the request has already arrived; return None when it has not.

    Most requests are in the socket's receive queue by the time the fd is taken, so this
    serves them without a task, a timer or another trip through the event loop. When
    the request is missing or the reply does not fit the send buffer at once, nothing is
    consumed or sent and the caller falls back to serve_connection().
    """
    try:
        request = sock.recv(REQUEST_MAX, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        _close(sock)
        return ServeResult(f"read failed: {exc.strerror or exc}")
    if not request:
        _close(sock)
        return ServeResult("client closed before sending a request")
    try:
        sent = sock.send(reply)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        _close(sock)
        return ServeResult(f"write failed: {exc.strerror or exc}", len(request))
    if sent < len(reply):
        # A partial write of a 17-byte reply only happens with a full send buffer; finish it the slow way.
        return None if sent == 0 else _finish_partial(sock, reply[sent:], request)
    sock.recv(REQUEST_MAX)  # consume the request that was peeked
    _close(sock)
    return ServeResult("served", len(request))


def _finish_partial(sock: socket.socket, rest: bytes, request: bytes) -> ServeResult:
    # NOTE: this blocks the event loop for up to 1 s. It runs only when a reply of a few
    # bytes did not fit into a new connection's empty send buffer, which is not expected.
    try:
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall(rest)
        sock.recv(REQUEST_MAX)
        return ServeResult("served", len(request))
    except OSError as exc:
        return ServeResult(f"write failed: {exc.strerror or exc}", len(request))
    finally:
        _close(sock)


def _close(sock: socket.socket) -> None:
    # The caller owns the connection. Another process may still have a copy of the fd
    # (an offer that timed out, still in flight to a stopped forwarder). Then close()
    # alone sends no FIN, and the client would wait for EOF.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


async def serve_connection(sock: socket.socket, reply: bytes, read_timeout: float, hold: Callable[[], Awaitable[None]] | None = None) -> ServeResult:
    """Read one request of up to REQUEST_MAX bytes, write ``reply`` and close the socket.

    A client that sends nothing within ``read_timeout`` seconds, closes first or resets
    the connection gets no reply; ``outcome`` names which. ``hold``, when given, is awaited
    between reading the request and replying. The socket is always shut down
    and closed (see _close).
    """
    loop = asyncio.get_running_loop()
    try:
        try:
            async with asyncio.timeout(read_timeout):
                request = await loop.sock_recv(sock, REQUEST_MAX)
        except TimeoutError:
            return ServeResult(f"no request within {read_timeout:g} s")
        except OSError as exc:
            return ServeResult(f"read failed: {exc.strerror or exc}")
        if not request:
            return ServeResult("client closed before sending a request")
        if hold is not None:
            await hold()
        try:
            async with asyncio.timeout(read_timeout):
                await loop.sock_sendall(sock, reply)
        except TimeoutError:
            return ServeResult(f"reply not written within {read_timeout:g} s", len(request))
        except OSError as exc:
            return ServeResult(f"write failed: {exc.strerror or exc}", len(request))
        return ServeResult("served", len(request))
    finally:
        _close(sock)

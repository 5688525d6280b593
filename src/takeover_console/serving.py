"""Serving one accepted connection the way the reference demo does: one read, one reply, close."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from takeover_console.ipc import REQUEST_MAX


@dataclass
class ServeResult:
    """What happened to one connection: ``outcome`` is "served" or the reason it was not."""

    outcome: str
    bytes_in: int = 0

    @property
    def served(self) -> bool:
        """True when the reply was written."""
        return self.outcome == "served"


async def serve_connection(sock: socket.socket, reply: bytes, read_timeout: float) -> ServeResult:
    """Read one request of up to REQUEST_MAX bytes, write ``reply`` and close the socket.

    A client that sends nothing within ``read_timeout`` seconds, closes first or resets
    the connection gets no reply; the result says which. The socket is always shut down
    and closed: the caller owns the connection, and another process may still hold a copy
    of the fd (an offer that timed out is still in flight to a stopped forwarder), in which
    case close() alone would send no FIN and the client would wait for EOF.
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
        try:
            async with asyncio.timeout(read_timeout):
                await loop.sock_sendall(sock, reply)
        except TimeoutError:
            return ServeResult(f"reply not written within {read_timeout:g} s", len(request))
        except OSError as exc:
            return ServeResult(f"write failed: {exc.strerror or exc}", len(request))
        return ServeResult("served", len(request))
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

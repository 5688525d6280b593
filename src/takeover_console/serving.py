"""Serving one accepted connection the way the reference demo does: one read, one reply, close.

The request is read with MSG_PEEK and consumed only after the reply is written, and the
end of the reply is marked with shutdown(SHUT_WR). If the process dies at any instant,
another process holding a copy of the socket can tell from the socket itself whether a
reply went out (``reply_written``), and if none did, still finds the request there.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Awaitable, Callable

from takeover_console.ipc import REQUEST_MAX

# A hook called at "read" (request peeked) and "reply" (reply written), for fault tests.
Checkpoint = Callable[[str], None]

# struct tcp_info (linux/tcp.h): tcpi_bytes_sent is a u64 at offset 200, since Linux 4.19.
_TCP_INFO_SIZE = 232
_BYTES_SENT_OFFSET = 200


# The outcome of a connection cut off at the drain deadline; the forwarder sends no DONE for it.
CUT_OFF = "cut off at the drain deadline"


@dataclass
class ServeResult:
    """The result of serving one connection: ``outcome`` is "served" or the reason it was not."""

    outcome: str
    bytes_in: int = 0

    @property
    def served(self) -> bool:
        """True when the reply was written."""
        return self.outcome == "served"


def reply_written(sock: socket.socket) -> bool:
    """True when any byte was written on this connection, sent or still queued.

    It reads the kernel's counters of the socket, shared by every process that holds it:
    bytes waiting in the send queue (SIOCOUTQ) and bytes sent (TCP_INFO tcpi_bytes_sent).
    """
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if queued > 0:
            return True
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return False
    if len(info) < _BYTES_SENT_OFFSET + 8:
        return False
    return struct.unpack_from("Q", info, _BYTES_SENT_OFFSET)[0] > 0


def finish_after_reply(sock: socket.socket) -> None:
    """Complete a connection whose reply another process wrote before it died.

    The request it only peeked at is consumed first: closing a socket with unread data
    makes the kernel send RST, which can cost the client the reply it has not read yet.
    """
    try:
        while sock.recv(REQUEST_MAX, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def serve_now(sock: socket.socket, reply: bytes, owner: bool = True, checkpoint: Checkpoint | None = None) -> ServeResult | None:
    """Serve at once when the request has already arrived; return None when it has not.

    Most requests are in the socket's receive queue by the time the fd is taken, so this
    serves them without a task, a timer or another trip through the event loop. When the
    request is missing, nothing is consumed or sent and the caller falls back to
    serve_connection(). ``owner`` says whether this process alone answers for the
    connection (see _close).
    """
    try:
        request = sock.recv(REQUEST_MAX, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        _close(sock, owner)
        return ServeResult(f"read failed: {exc.strerror or exc}")
    if not request:
        _close(sock, owner)
        return ServeResult("client closed before sending a request")
    if checkpoint is not None:
        checkpoint("read")
    return _reply(sock, reply, request, owner, checkpoint)


def _reply(sock: socket.socket, reply: bytes, request: bytes, owner: bool, checkpoint: Checkpoint | None) -> ServeResult:
    try:
        sent = sock.send(reply)
        if sent < len(reply):
            _finish_partial(sock, reply[sent:])
    except OSError as exc:
        _close(sock, owner=True)
        return ServeResult(f"write failed: {exc.strerror or exc}", len(request))
    if checkpoint is not None:
        checkpoint("reply")
    # The reply is out: mark its end, so no second reply can follow, then consume the request.
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        _close(sock, owner=True)
        return ServeResult("served", len(request))
    try:
        sock.recv(REQUEST_MAX)
    except OSError:
        pass
    # SHUT_WR already sent the FIN and SHUT_RD sends nothing on Linux TCP, so close() needs no second shutdown().
    sock.close()
    return ServeResult("served", len(request))


def _finish_partial(sock: socket.socket, rest: bytes) -> None:
    # NOTE: this blocks the event loop for up to 1 s. It runs only when a reply of a few
    # bytes did not fit into a new connection's empty send buffer, which is not expected.
    sock.setblocking(True)
    sock.settimeout(1.0)
    try:
        sock.sendall(rest)
    finally:
        sock.setblocking(False)


def _close(sock: socket.socket, owner: bool) -> None:
    # An owner shuts the connection down before closing: another process may still have a
    # copy of the fd (an offer that timed out, in flight to a stopped forwarder), and then
    # close() alone sends no FIN. A process that is not the owner and wrote no reply only
    # closes its copy, so the owner can still answer the request.
    if owner:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    sock.close()


async def serve_connection(
    sock: socket.socket,
    reply: bytes,
    read_timeout: float,
    hold: Callable[[], Awaitable[None]] | None = None,
    owner: bool = True,
    checkpoint: Checkpoint | None = None,
) -> ServeResult:
    """Wait up to ``read_timeout`` seconds for the request, then serve it as serve_now() does.

    A client that sends nothing in time, closes first or resets the connection gets no
    reply; ``outcome`` names which. ``hold``, when given, is awaited between reading the
    request and replying. The socket is always closed, and shut down by an owner.
    """
    loop = asyncio.get_running_loop()
    result: ServeResult | None = None
    try:
        async with asyncio.timeout(read_timeout):
            while True:
                readable = loop.create_future()
                loop.add_reader(sock.fileno(), readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(sock.fileno())
                try:
                    request = sock.recv(REQUEST_MAX, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    continue
                break
    except TimeoutError:
        # A process stopped or busy past the timeout can find the timeout and the request
        # due at once, and the timeout runs first. So read the socket once more.
        request, result = _peek_late(sock, read_timeout)
    except OSError as exc:
        request, result = b"", ServeResult(f"read failed: {exc.strerror or exc}")
    except BaseException:
        _close(sock, owner)
        raise
    if result is None and not request:
        result = ServeResult("client closed before sending a request")
    if result is not None:
        _close(sock, owner)
        return result
    if checkpoint is not None:
        checkpoint("read")
    if hold is not None:
        try:
            await hold()
        except BaseException:
            _close(sock, owner)
            raise
    return _reply(sock, reply, request, owner, checkpoint)


def _peek_late(sock: socket.socket, read_timeout: float) -> tuple[bytes, ServeResult | None]:
    """Peek at a request that arrived as the read timeout ran out: return it, or a result when there is none."""
    try:
        return sock.recv(REQUEST_MAX, socket.MSG_PEEK), None
    except (BlockingIOError, InterruptedError):
        return b"", ServeResult(f"no request within {read_timeout:g} s")
    except OSError as exc:
        return b"", ServeResult(f"read failed: {exc.strerror or exc}")

"""A framed Unix stream connection that passes fds, driven by an asyncio event loop.

asyncio has no recvmsg()/sendmsg() for fds, so the channel registers its non-blocking
socket with ``loop.add_reader``/``add_writer`` and calls ipc.receive_message and
ipc.send_message directly. Frames are handled in the reader callback itself, with no
task per frame: a handoff is a few syscalls and one callback on each side.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any, Callable

from takeover_console import ipc

log = logging.getLogger(__name__)

# Messages read per reader callback before other callbacks get a turn.
READS_PER_WAKEUP = 64


class Channel:
    """One end of a handoff channel.

    Nothing is read until ``start()``. ``on_frame(frame)`` runs for every frame, valid or not (``frame.error`` set), in order.
    ``on_close(reason)`` runs once when the channel closes for any reason. Outgoing frames
    that the peer's buffer cannot take yet are queued and sent when it drains; the fds of
    a queued frame must stay open until then, which the caller ensures by keeping them.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_frame: Callable[[ipc.Frame], None],
        on_close: Callable[[str], None],
        name: str,
    ):
        self.sock = sock
        self.name = name
        self.fd = sock.fileno()
        self.inode = ipc.socket_inode(self.fd)
        self._on_frame = on_frame
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._decoder = ipc.FrameDecoder()
        self._queue: deque[tuple[memoryview, tuple[int, ...]]] = deque()
        self._writing = False
        self.closed = False
        self.close_reason: str | None = None
        sock.setblocking(False)

    def start(self, initial: list[ipc.ReceivedMessage] | None = None) -> None:
        """Handle messages already read from the socket, then start reading it."""
        for message in initial or ():
            if not self._feed(message):
                return
        if not self.closed:
            self._loop.add_reader(self.fd, self._on_readable)

    def send(self, frame_type: int, payload: dict[str, Any], fds: tuple[int, ...] = ()) -> bool:
        """Send one frame, with fds when given; return False when the channel is closed."""
        if self.closed:
            return False
        data = ipc.encode_frame(frame_type, payload, len(fds))
        if self._queue:
            self._queue.append((memoryview(data), fds))
            return True
        try:
            sent = ipc.send_message(self.sock, data, fds)
        except BlockingIOError:
            sent = 0
            self._queue.append((memoryview(data), fds))
            self._start_writing()
            return True
        except OSError as exc:
            self.close(f"send failed: {exc.strerror or exc}")
            return False
        if sent < len(data):
            # The fds went with the first byte; the rest of the frame follows without them.
            self._queue.append((memoryview(data)[sent:], ()))
            self._start_writing()
        return True

    def poll(self) -> None:
        """Read and handle every frame already waiting in the socket, without blocking."""
        while not self.closed and self._read_some():
            pass

    def close(self, reason: str) -> None:
        """Close the channel and report ``reason`` once through on_close."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._loop.remove_reader(self.fd)
        if self._writing:
            self._loop.remove_writer(self.fd)
        self._decoder.close()
        self._queue.clear()
        self.sock.close()
        self._on_close(reason)

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if self.closed or not self._read_some():
                return

    def _read_some(self) -> bool:
        """Read one message; return True when more may be waiting."""
        try:
            message = ipc.receive_message(self.sock)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.close(f"receive failed: {exc.strerror or exc}")
            return False
        if not message.data:
            ipc.close_all(message.fds)
            self.close("peer closed the channel")
            return False
        return self._feed(message)

    def _feed(self, message: ipc.ReceivedMessage) -> bool:
        try:
            frames = self._decoder.feed(message)
        except ipc.FramingError as exc:
            log.warning("%s: closing channel: %s", self.name, exc)
            self.close(f"framing lost: {exc}")
            return False
        for frame in frames:
            if self.closed:
                frame.close_fds()
                continue
            self._on_frame(frame)
        return not self.closed

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        while self._queue and not self.closed:
            data, fds = self._queue[0]
            try:
                sent = ipc.send_message(self.sock, bytes(data), fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(f"send failed: {exc.strerror or exc}")
                return
            if sent < len(data):
                self._queue[0] = (data[sent:], ())
                return
            self._queue.popleft()
        if self._writing and not self.closed:
            self._writing = False
            self._loop.remove_writer(self.fd)

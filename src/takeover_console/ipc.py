"""The handoff protocol: frames, limits, fd passing with SCM_RIGHTS, fd checks and peer credentials.

A native frame is a 12-byte header followed by a JSON payload::

    magic "TKOV" | version u8 | type u8 | fd count u16 | payload length u32   (network byte order)

A frame that carries fds is sent with one sendmsg() call whose SCM_RIGHTS control data
holds exactly the declared number of fds; the header guarantees at least one data byte.

The reference demo uses a simpler framing on the same kind of socket: one message of the
7 bytes ``forward`` with one fd, no header and no reply (``SEED_MESSAGE``).

This module has no asyncio and no Textual; channel.py drives it from an event loop.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"TKOV"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sBBHI")
HEADER_SIZE = HEADER.size

# Limits. A payload is a small JSON object; anything near these is garbage or an attack.
MAX_PAYLOAD = 64 * 1024
# Our cap on fds in one message, well under the kernel's SCM_MAX_FD (253). The receive
# buffer for control data is sized for exactly this many, so a sender that passes more
# makes recvmsg() report MSG_CTRUNC and the kernel closes the fds that did not fit.
MAX_FDS_PER_MESSAGE = 32
RECV_BUFFER = 64 * 1024
FD_SIZE = array.array("i").itemsize

# Frame types of protocol version 1.
HELLO = 1  # both directions, first frame: version, role, pid, generation
OFFER = 2  # server -> forwarder, carries one accepted TCP connection
TAKEN = 3  # forwarder -> server: the forwarder owns and serves the connection
REJECTED = 4  # forwarder -> server: the server keeps and serves the connection
BYE = 5  # either direction, last frame before a deliberate close, with a reason
QUERY = 6  # forwarder -> server: who serves this offer? (sent when TAKEN may have been late)
VERDICT = 7  # server -> forwarder: reply to QUERY, owner "forwarder" or "server"
PING = 8  # server -> forwarder: health check after an offer timed out
PONG = 9  # forwarder -> server: reply to PING
# Listener takeover, on a server's control socket or a forwarder's handoff socket.
LISTENERS = 10  # old -> new: listening sockets with a description of each, in batches
READY = 11  # new -> old: accepting on every listener; the old one stops accepting and drains
ABORT = 12  # new -> old: the takeover failed; the old one keeps everything
DRAINED = 13  # old -> new: the old generation finished, with what it had to cut off
MIGRATE = 14  # old forwarder -> server: open a channel to the new forwarder, then leave this one
DONE = 15  # forwarder -> server: finished with a connection (reply written, or no reply possible)

# HELLO "intent" of a peer that wants to take the listeners over.
INTENT_TAKEOVER = "takeover"

FRAME_NAMES = {
    HELLO: "HELLO",
    OFFER: "OFFER",
    TAKEN: "TAKEN",
    REJECTED: "REJECTED",
    BYE: "BYE",
    QUERY: "QUERY",
    VERDICT: "VERDICT",
    PING: "PING",
    PONG: "PONG",
    LISTENERS: "LISTENERS",
    READY: "READY",
    ABORT: "ABORT",
    DRAINED: "DRAINED",
    MIGRATE: "MIGRATE",
    DONE: "DONE",
}
# How many fds each frame type must carry.
# LISTENERS carries from 1 to MAX_FDS_PER_MESSAGE fds, as many as its payload describes.
FDS_OF_TYPE = {OFFER: 1, LISTENERS: None}

SEED_MESSAGE = b"forward"
# The reference forwarder reads at most this many data bytes of the seed message.
SEED_MAX_DATA = 128

REPLY_BY_SERVER = b"process by server"
REPLY_BY_FORWARDER = b"process by forward"
# Both sides read a request with one recv() of at most this many bytes, as the reference does.
REQUEST_MAX = 1024


class FramingError(Exception):
    """The byte stream no longer splits into frames; the channel must be closed."""


@dataclass
class Frame:
    """One decoded frame with the fds that arrived with it.

    ``error`` is set when the frame is well delimited but invalid (wrong fd count, bad
    payload, unknown type); such a frame is rejected and its fds closed, and the channel
    goes on. ``payload`` is still set when only the fds are wrong.
    """

    type: int
    version: int
    payload: dict[str, Any]
    fds: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def name(self) -> str:
        """The frame type's name, or its number when unknown."""
        return FRAME_NAMES.get(self.type, f"type {self.type}")

    def close_fds(self) -> None:
        """Close every fd that arrived with this frame."""
        close_all(self.fds)
        self.fds = []


@dataclass
class ReceivedMessage:
    """The result of one recvmsg(): data bytes, fds from SCM_RIGHTS, and MSG_CTRUNC."""

    data: bytes
    fds: list[int]
    truncated: bool


def close_all(fds: list[int]) -> None:
    """Close fds, ignoring ones that are already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# One encoder for every frame, because json.dumps() with separators builds a new encoder per call.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_frame(frame_type: int, payload: dict[str, Any], fd_count: int = 0) -> bytes:
    """Encode a frame header and JSON payload; the caller sends ``fd_count`` fds with it."""
    body = _PAYLOAD_ENCODER.encode(payload).encode()
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(body)} bytes exceeds the limit of {MAX_PAYLOAD}")
    if fd_count > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"{fd_count} fds exceed the limit of {MAX_FDS_PER_MESSAGE} per message")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, frame_type, fd_count, len(body)) + body


class FrameDecoder:
    """Split a Unix stream into frames and attach each batch of received fds to its frame.

    Linux delivers the fds of one sendmsg() with that message's data, and a recvmsg() that
    returns fds ends inside the message that carried them (unix_stream_read_generic stops
    after the first skb with fds). So a batch belongs to the frame that contains the last
    byte of the recvmsg() that returned it. A batch that lands on a frame declaring a
    different count makes that frame invalid rather than shifting fds onto a neighbour.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._buffer_offset = 0  # stream offset of self._buffer[0]
        self._batches: list[tuple[int, list[int], bool]] = []  # (anchor offset, fds, truncated)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame waiting for more data."""
        return len(self._buffer)

    def feed(self, message: ReceivedMessage) -> list[Frame]:
        """Add received bytes and fds and return every frame they complete.

        Raises FramingError when the header is garbled or declares an oversized payload,
        because the stream cannot be resynchronised. Before raising, it closes every fd
        received, including those of frames that this call completed.
        """
        frame = self._whole_frame(message)
        if frame is not None:
            return [frame]
        end = self._buffer_offset + len(self._buffer) + len(message.data)
        if message.fds or message.truncated:
            if not message.data:
                close_all(message.fds)
            else:
                self._batches.append((end - 1, message.fds, message.truncated))
        self._buffer += message.data
        frames = []
        try:
            while (frame := self._next_frame()) is not None:
                frames.append(frame)
        except FramingError:
            # The channel closes, so frames completed before the garbage are dropped too.
            for frame in frames:
                frame.close_fds()
            raise
        return frames

    def close(self) -> None:
        """Close the fds of frames that never completed."""
        for _, fds, _ in self._batches:
            close_all(fds)
        self._batches = []
        self._buffer.clear()

    def _whole_frame(self, message: ReceivedMessage) -> Frame | None:
        """Decode a message that is exactly one whole valid-looking frame, the common case.

        It skips the buffer and the fd bookkeeping of the general path; any message that
        is not exactly one frame with a sane header returns None and takes that path.
        """
        data = message.data
        if self._buffer or self._batches or len(data) < HEADER_SIZE or data[:4] != MAGIC:
            return None
        _, version, frame_type, fd_count, length = HEADER.unpack_from(data)
        if length > MAX_PAYLOAD or HEADER_SIZE + length != len(data):
            return None
        self._buffer_offset += len(data)
        frame = Frame(type=frame_type, version=version, payload={}, fds=message.fds)
        frame.error = self._check(frame, fd_count, message.truncated, data[HEADER_SIZE:])
        if frame.error is not None:
            frame.close_fds()
        return frame

    def _next_frame(self) -> Frame | None:
        buffered = len(self._buffer)
        prefix = bytes(self._buffer[: min(buffered, len(MAGIC))])
        if prefix != MAGIC[: len(prefix)]:
            self._fail(f"bad magic {prefix!r} (expected {MAGIC!r}): stream is not takeover-console framing")
        if buffered < HEADER_SIZE:
            return None
        _, version, frame_type, fd_count, length = HEADER.unpack_from(self._buffer)
        if length > MAX_PAYLOAD:
            self._fail(f"payload length {length} exceeds the limit of {MAX_PAYLOAD} bytes")
        total = HEADER_SIZE + length
        if buffered < total:
            return None

        start = self._buffer_offset
        fds, truncated = self._claim_fds(start, start + total)
        body = bytes(self._buffer[HEADER_SIZE:total])
        del self._buffer[:total]
        self._buffer_offset += total

        frame = Frame(type=frame_type, version=version, payload={}, fds=fds)
        frame.error = self._check(frame, fd_count, truncated, body)
        if frame.error is not None:
            frame.close_fds()
        return frame

    def _claim_fds(self, start: int, end: int) -> tuple[list[int], bool]:
        fds: list[int] = []
        truncated = False
        remaining = []
        for anchor, batch, batch_truncated in self._batches:
            if start <= anchor < end:
                fds.extend(batch)
                truncated = truncated or batch_truncated
            else:
                remaining.append((anchor, batch, batch_truncated))
        self._batches = remaining
        return fds, truncated

    @staticmethod
    def _check(frame: Frame, declared_fds: int, truncated: bool, body: bytes) -> str | None:
        # The payload is parsed before the fd checks, so that an OFFER with the wrong fds
        # still has the id that its REJECTED must name.
        payload_error = None
        if frame.version == PROTOCOL_VERSION:
            payload_error = FrameDecoder._parse_payload(frame, body)
        if truncated:
            return (
                f"control data truncated (MSG_CTRUNC): more than {MAX_FDS_PER_MESSAGE} fds sent in one "
                "message, or this process has no free fd number (RLIMIT_NOFILE)"
            )
        if frame.version != PROTOCOL_VERSION:
            return f"unsupported protocol version {frame.version} (this side speaks {PROTOCOL_VERSION})"
        if declared_fds != len(frame.fds):
            return f"{frame.name} frame declares {declared_fds} fds but {len(frame.fds)} arrived"
        expected = FDS_OF_TYPE.get(frame.type, 0)
        if expected is None:
            if not 1 <= declared_fds <= MAX_FDS_PER_MESSAGE:
                return f"{frame.name} frame must carry 1 to {MAX_FDS_PER_MESSAGE} fds, not {declared_fds}"
        elif frame.type in FRAME_NAMES and declared_fds != expected:
            return f"{frame.name} frame must carry {expected} fds, not {declared_fds}"
        if payload_error is not None:
            return payload_error
        if frame.type not in FRAME_NAMES:
            return f"unknown frame type {frame.type}"
        return None

    @staticmethod
    def _parse_payload(frame: Frame, body: bytes) -> str | None:
        """Set frame.payload from the JSON body, or return why the body is invalid."""
        try:
            payload = json.loads(body) if body else {}
        except (ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and integers longer
            # than sys.get_int_max_str_digits(); deep nesting raises RecursionError.
            return f"{frame.name} payload is not valid JSON: {exc}"
        if not isinstance(payload, dict):
            return f"{frame.name} payload must be a JSON object, not {type(payload).__name__}"
        frame.payload = payload
        return None

    def _fail(self, reason: str) -> None:
        self.close()
        raise FramingError(reason)


# Plain ints, computed once: receive_message() runs for every frame.
_CONTROL_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * FD_SIZE)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
# CPython warns when a control message was cut short; MSG_CTRUNC reports the same thing,
# and the frame is rejected for it. A filter set once is far cheaper than catch_warnings()
# around every recvmsg().
warnings.filterwarnings("ignore", message=".*ancillary data.*", category=RuntimeWarning)


def receive_message(sock: socket.socket, max_fds: int = MAX_FDS_PER_MESSAGE) -> ReceivedMessage:
    """Read once from a Unix stream socket with MSG_CMSG_CLOEXEC and collect SCM_RIGHTS fds.

    MSG_CMSG_CLOEXEC makes the kernel install received fds close-on-exec, so they never
    leak into a child process. socket.recv_fds() cannot be used for this, because in
    Python 3.11 (Lib/socket.py, 3.11.7) it never passes its flags argument to recvmsg().
    Raises BlockingIOError when nothing is ready.
    """
    if max_fds == MAX_FDS_PER_MESSAGE:
        control_size = _CONTROL_SIZE
    else:
        control_size = socket.CMSG_SPACE(max_fds * FD_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(RECV_BUFFER, control_size, _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            whole = len(cdata) - len(cdata) % FD_SIZE
            fds.extend(array.array("i", cdata[:whole]))
    return ReceivedMessage(data=data, fds=fds, truncated=bool(flags & _MSG_CTRUNC))


def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> int:
    """Send data, with fds as SCM_RIGHTS when given, in one sendmsg(); return bytes sent."""
    if not fds:
        return sock.send(data)
    if not data:
        raise ValueError("a message that carries fds needs at least one data byte")
    control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    return sock.sendmsg([data], control)


def describe_fd(fd: int) -> str:
    """Name the kind of an open fd in plain words, such as "pipe" or "listening TCP socket"."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"unusable fd ({os.strerror(exc.errno or errno.EBADF)})"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if not stat.S_ISSOCK(mode):
        return "non-socket file"
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
        # An O_PATH fd only names the socket file, and every socket call on it fails.
        return "socket file opened with O_PATH"
    duplicate = os.dup(fd)
    try:
        probe = socket.socket(fileno=duplicate)
    except OSError as exc:
        os.close(duplicate)
        return f"socket that cannot be inspected ({exc.strerror})"
    try:
        family = {socket.AF_INET: "TCP", socket.AF_INET6: "TCP", socket.AF_UNIX: "Unix"}.get(probe.family)
        if probe.type == socket.SOCK_DGRAM:
            return "Unix datagram socket" if probe.family == socket.AF_UNIX else "UDP socket"
        if family is None:
            return f"socket of family {probe.family}"
        if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return f"listening {family} socket"
        try:
            probe.getpeername()
        except OSError:
            return f"unconnected {family} socket"
        return f"connected {family} socket"
    finally:
        probe.close()


class InvalidFd(Exception):
    """A received fd is not of the kind its frame declared; the fd has been closed."""


def adopt_tcp_connection(fd: int) -> socket.socket:
    """Wrap a received fd as a socket after checking it is a connected TCP socket.

    On any mismatch the fd is closed and InvalidFd names what it was instead.
    """
    try:
        # socket(fileno=...) reads family, type and protocol with getsockopt(), and fails
        # for an fd that is not a socket or is an O_PATH fd of a socket file.
        sock = socket.socket(fileno=fd)
    except OSError:
        kind = describe_fd(fd)
        close_all([fd])
        raise InvalidFd(f"received a {kind}, expected a connected TCP socket") from None
    ok = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM and sock.proto in (0, socket.IPPROTO_TCP)
    if ok:
        try:
            # Fails with ENOTCONN for a listening or an unconnected socket.
            sock.getpeername()
        except OSError:
            ok = False
    if not ok:
        kind = describe_fd(fd)
        sock.close()
        raise InvalidFd(f"received a {kind}, expected a connected TCP socket")
    sock.setblocking(False)
    return sock


def describe_listener(sock: socket.socket) -> dict[str, str]:
    """Describe a listening socket for a LISTENERS frame: family, type and bound address."""
    family = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNIX: "unix"}.get(sock.family, str(int(sock.family)))
    kind = "stream" if sock.type == socket.SOCK_STREAM else str(int(sock.type))
    return {"family": family, "type": kind, "address": format_address(sock.getsockname())}


def adopt_listener(fd: int, expected: dict) -> socket.socket:
    """Wrap a received fd as a listening socket after checking it against its description.

    The checks are the kernel's view of the fd: family and type (socket(fileno=)),
    SO_ACCEPTCONN and getsockname(). On any mismatch the fd is closed and InvalidFd names
    what the fd is instead.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        kind = describe_fd(fd)
        close_all([fd])
        raise InvalidFd(f"received a {kind}, expected a listening socket") from None
    try:
        actual = describe_listener(sock)
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError as exc:
        sock.close()
        raise InvalidFd(f"cannot inspect received listener: {exc.strerror}") from None
    wanted = {key: str(expected.get(key)) for key in ("family", "type", "address")}
    if not listening or actual != wanted:
        what = describe_fd(fd)
        sock.close()
        raise InvalidFd(f"received a {what} ({actual['family']} {actual['type']} {actual['address']}), expected a listening socket {wanted}")
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class PeerCredentials:
    """The pid, uid and gid of the process at the other end of a Unix socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read SO_PEERCRED: the credentials the peer had when it called connect() or listen()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def format_address(address: Any) -> str:
    """Format a socket address as HOST:PORT, with brackets for IPv6."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def socket_inode(fd: int) -> int | None:
    """The inode number that /proc/PID/fd shows as socket:[INODE], or None when unknown."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None

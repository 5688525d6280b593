"""Attacks on a real forwarder process through its handoff socket.

Each test starts a forwarder, connects to its Unix socket as a fake server peer and sends
bad input: wrong fd counts, fds of the wrong kind, broken headers and payloads, seed
framing garbage, expired offers and a random flood. After each attack the test checks
three things. The forwarder gave a reason. It closed every fd it received, so its fd
count from /proc is back where it was. It still takes a real TCP connection, on the same
channel when the framing is intact, else on a new channel.

The last tests check SO_PEERCRED: a peer whose uid is not allowed is refused, by the
forwarder and by the server.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import socket
import time
from collections import deque
from pathlib import Path

import pytest

from support import Program, port_of
from takeover_console import ipc
from takeover_console.forwarder import DETECT_TIMEOUT

# Seconds the test waits for a frame from the forwarder or for a TCP reply.
IO_TIMEOUT = 5.0
# Seconds the forwarder's fd count may take to return to its expected value.
FD_SETTLE_TIMEOUT = 5.0
# A uid other than the one running this test, for the SO_PEERCRED checks.
FOREIGN_UID = 4242
FLOOD_ROUNDS = 200
FLOOD_SEED = 20240611

_offer_ids = itertools.count(1)


# Helpers: the fake server peer, a real TCP connection to offer, and fds of other kinds.


def start_forwarder(programs, workdir: Path, *extra: str) -> Program:
    """Start a forwarder on ``workdir/h.sock`` and wait until it listens."""
    forwarder = programs("forwarder", "--handoff", str(workdir / "h.sock"), *extra)
    forwarder.wait_event("listening")
    return forwarder


def encode_raw_frame(
    frame_type: int,
    body: bytes | dict | list = b"{}",
    declared_fds: int = 0,
    version: int = ipc.PROTOCOL_VERSION,
    magic: bytes = ipc.MAGIC,
    length: int | None = None,
) -> bytes:
    """Build a frame with any header values, unlike ipc.encode_frame, which checks them."""
    if not isinstance(body, bytes):
        body = json.dumps(body, ensure_ascii=False).encode()
    if length is None:
        length = len(body)
    return ipc.HEADER.pack(magic, version, frame_type, declared_fds, length) + body


def offer_payload(conn_id: str, deadline_s: float = IO_TIMEOUT) -> dict:
    """An OFFER payload as the server writes it, with a deadline ``deadline_s`` from now."""
    deadline_ns = time.monotonic_ns() + int(deadline_s * 1e9)
    return {"id": conn_id, "peer": "127.0.0.1:1", "local": "127.0.0.1:2", "fd": 99, "deadline_ns": deadline_ns}


def new_offer_id() -> str:
    return f"test:{next(_offer_ids)}"


class FakeServer:
    """The test's end of a handoff channel: sends raw bytes and fds, reads frames back."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(str(path))
        self._decoder = ipc.FrameDecoder()
        self._frames: deque[ipc.Frame] = deque()

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send ``data`` with ``fds`` in one sendmsg(), and the rest of ``data`` if it was cut."""
        sent = ipc.send_message(self.sock, data, fds)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send_frame(self, frame_type: int, payload: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.send(encode_raw_frame(frame_type, payload, declared_fds=len(fds)), fds)

    def read_frame(self) -> ipc.Frame | None:
        """Return the next frame from the forwarder, or None when it closed the channel."""
        while not self._frames:
            try:
                message = ipc.receive_message(self.sock)
            except ConnectionResetError:
                # Linux reports a close with unread data in the forwarder's queue as a reset.
                return None
            if not message.data:
                ipc.close_all(message.fds)
                return None
            self._frames.extend(self._decoder.feed(message))
        frame = self._frames.popleft()
        frame.close_fds()
        return frame

    def expect_frame(self, frame_type: int) -> dict:
        """Read the next frame, check its type and return its payload."""
        frame = self.read_frame()
        expected = ipc.FRAME_NAMES[frame_type]
        assert frame is not None, f"forwarder closed the channel instead of sending {expected}"
        assert frame.error is None, f"forwarder sent an invalid {frame.name} frame: {frame.error}"
        assert frame.name == expected, f"expected {expected}, got {frame.name} {frame.payload}"
        return frame.payload

    def expect_closed(self) -> None:
        """Read until the forwarder closes the channel, allowing a BYE before the close."""
        frame = self.read_frame()
        if frame is not None:
            assert frame.name == "BYE", f"expected BYE or a closed channel, got {frame.name} {frame.payload}"
            frame = self.read_frame()
        assert frame is None, f"forwarder kept the channel open and sent {frame.name}"

    def greet(self) -> dict:
        """Send HELLO as a server and return the forwarder's HELLO payload."""
        self.send_frame(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": "server", "pid": os.getpid(), "gen": 1})
        return self.expect_frame(ipc.HELLO)

    def close(self) -> None:
        self.sock.close()
        self._decoder.close()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TcpConnection:
    """A connected TCP pair on 127.0.0.1: a client end and the accepted end to offer."""

    def __init__(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
            self.accepted, _ = listener.accept()

    def request(self) -> bytes:
        """Send one request as the client program does and read the reply until EOF."""
        self.client.sendall(b"seq num 1")
        chunks = []
        while chunk := self.client.recv(1024):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.client.close()
        self.accepted.close()

    def __enter__(self) -> "TcpConnection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_offer_served(forwarder: Program, channel: FakeServer) -> None:
    """Offer a real TCP connection on ``channel`` and check that the forwarder serves it."""
    conn_id = new_offer_id()
    with TcpConnection() as conn:
        channel.send_frame(ipc.OFFER, offer_payload(conn_id), [conn.accepted.fileno()])
        taken = channel.expect_frame(ipc.TAKEN)
        assert taken["id"] == conn_id
        # As the server does after TAKEN: close our copy, so the forwarder's close ends the connection.
        conn.accepted.close()
        assert conn.request() == ipc.REPLY_BY_FORWARDER
    forwarder.wait_event("closed", lambda e: e["conn"] == conn_id)


def check_forwarder_works(forwarder: Program, path: Path) -> None:
    """Check that the forwarder is alive and serves an offer on a new channel."""
    assert forwarder.proc.poll() is None, f"forwarder exited with status {forwarder.proc.returncode}"
    with FakeServer(path) as channel:
        channel.greet()
        check_offer_served(forwarder, channel)


def wait_fd_count(forwarder: Program, expected: int) -> int:
    """Poll the forwarder's fd count until it equals ``expected`` or time runs out, and return the last count.

    Some paths emit their event just before closing the fds, so the count may lag the event.
    """
    deadline = time.monotonic() + FD_SETTLE_TIMEOUT
    count = forwarder.fd_count()
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        count = forwarder.fd_count()
    return count


def assert_no_traceback(forwarder: Program) -> None:
    log_text = forwarder.log_text()
    assert "Traceback" not in log_text, f"forwarder logged an uncaught exception:\n{log_text[-3000:]}"


class FdSource:
    """Open fds of many kinds for a test to send, and close them all in ``close()``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._objects: list = []
        self._fds: list[int] = []
        self._socket_file_numbers = itertools.count(1)

    def _keep(self, thing):
        self._objects.append(thing)
        return thing

    def pipe(self) -> int:
        read_end, write_end = os.pipe()
        self._fds += [read_end, write_end]
        return read_end

    def regular_file(self) -> int:
        return self._keep(open(self.workdir / "plain.txt", "wb")).fileno()

    def directory(self) -> int:
        fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        self._fds.append(fd)
        return fd

    def udp_socket(self) -> int:
        return self._keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).fileno()

    def listening_tcp_socket(self) -> int:
        return self._keep(socket.create_server(("127.0.0.1", 0))).fileno()

    def unconnected_tcp_socket(self) -> int:
        return self._keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).fileno()

    def unix_stream_socket(self) -> int:
        first, second = socket.socketpair()
        self._keep(second)
        return self._keep(first).fileno()

    def unix_datagram_socket(self) -> int:
        return self._keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)).fileno()

    def socket_file_path_fd(self) -> int:
        """Open an O_PATH fd of a bound Unix socket's file, which fstat() reports as a socket but no socket call accepts."""
        bound = self._keep(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        path = self.workdir / f"bound-{next(self._socket_file_numbers)}.sock"
        bound.bind(str(path))
        fd = os.open(path, os.O_PATH)
        self._fds.append(fd)
        return fd

    def copies(self, fd: int, count: int) -> list[int]:
        """``count`` dup()s of ``fd``."""
        fds = [os.dup(fd) for _ in range(count)]
        self._fds += fds
        return fds

    def close(self) -> None:
        for thing in self._objects:
            thing.close()
        ipc.close_all(self._fds)
        self._objects = []
        self._fds = []


@pytest.fixture
def fd_source(workdir):
    source = FdSource(workdir)
    yield source
    source.close()


@pytest.fixture
def forwarder(programs, workdir):
    return start_forwarder(programs, workdir)


@pytest.fixture
def handoff_path(workdir) -> Path:
    return workdir / "h.sock"


# 1 and 2: the number of fds does not match the frame.


def test_more_fds_than_limit_rejected(forwarder, handoff_path, fd_source):
    """More than MAX_FDS_PER_MESSAGE fds overflow the control buffer, so the kernel sets MSG_CTRUNC.

    The kernel closes the fds that did not fit, and the forwarder closes the rest.
    """
    count = ipc.MAX_FDS_PER_MESSAGE + 8
    fds = fd_source.copies(fd_source.pipe(), count)
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        conn_id = new_offer_id()
        channel.send(encode_raw_frame(ipc.OFFER, offer_payload(conn_id), declared_fds=count), fds)

        rejected = channel.expect_frame(ipc.REJECTED)
        assert rejected["id"] == conn_id
        assert "MSG_CTRUNC" in rejected["reason"]
        event = forwarder.wait_event("rejected", lambda e: e["conn"] == conn_id, start=mark)
        assert "MSG_CTRUNC" in event["reason"]
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


def open_fd_numbers(forwarder: Program) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{forwarder.pid}/fd")}


def test_offer_without_free_fd_rejected(forwarder, handoff_path):
    """With RLIMIT_NOFILE at its lowest free fd number, the forwarder cannot install the offered fd."""
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)
        soft, hard = resource.prlimit(forwarder.pid, resource.RLIMIT_NOFILE)
        in_use = open_fd_numbers(forwarder)
        lowest_free = min(set(range(len(in_use) + 1)) - in_use)

        conn_id = new_offer_id()
        with TcpConnection() as conn:
            resource.prlimit(forwarder.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                channel.send_frame(ipc.OFFER, offer_payload(conn_id), [conn.accepted.fileno()])
                rejected = channel.expect_frame(ipc.REJECTED)
            finally:
                resource.prlimit(forwarder.pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert rejected["id"] == conn_id
            assert "RLIMIT_NOFILE" in rejected["reason"]
            forwarder.wait_event("rejected", lambda e: e["conn"] == conn_id, start=mark)
            assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


OFFER_FD_MISMATCHES = [
    # (declared fd count, fds attached, expected words in the reason)
    pytest.param(1, 0, "declares 1 fds but 0 arrived", id="missing-fd"),
    pytest.param(1, 2, "declares 1 fds but 2 arrived", id="surplus-fd"),
    pytest.param(2, 2, "must carry 1 fds, not 2", id="declares-two"),
    pytest.param(0, 0, "must carry 1 fds, not 0", id="declares-none"),
]


@pytest.mark.parametrize("declared, attached, reason", OFFER_FD_MISMATCHES)
def test_offer_fd_mismatch_rejected(forwarder, handoff_path, fd_source, declared, attached, reason):
    fds = fd_source.copies(fd_source.pipe(), attached)
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        conn_id = new_offer_id()
        channel.send(encode_raw_frame(ipc.OFFER, offer_payload(conn_id), declared_fds=declared), fds)

        rejected = channel.expect_frame(ipc.REJECTED)
        assert rejected["id"] == conn_id
        assert reason in rejected["reason"]
        forwarder.wait_event("rejected", lambda e: e["conn"] == conn_id, start=mark)
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


OTHER_FD_MISMATCHES = [
    # (frame type, declared fd count, fds attached, expected words in the reason)
    pytest.param(ipc.PING, 0, 1, "declares 0 fds but 1 arrived", id="ping-undeclared-fd"),
    pytest.param(ipc.PING, 1, 1, "must carry 0 fds, not 1", id="ping-declared-fd"),
    pytest.param(ipc.TAKEN, 1, 1, "must carry 0 fds, not 1", id="taken-declared-fd"),
    pytest.param(ipc.VERDICT, 0, 3, "declares 0 fds but 3 arrived", id="verdict-three-fds"),
]


@pytest.mark.parametrize("frame_type, declared, attached, reason", OTHER_FD_MISMATCHES)
def test_frame_with_fds_rejected(forwarder, handoff_path, fd_source, frame_type, declared, attached, reason):
    """The forwarder rejects a frame other than OFFER that carries fds, and sends no PONG for such a PING."""
    fds = fd_source.copies(fd_source.pipe(), attached)
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        # A message that carries fds needs a data byte, so the frame goes in the same sendmsg().
        channel.send(encode_raw_frame(frame_type, {"id": "x", "owner": "server", "sent_ns": 1}, declared_fds=declared), fds)

        error = forwarder.wait_event("error", start=mark)
        assert reason in error["message"]
        assert wait_fd_count(forwarder, idle) == idle
        # TAKEN is the next frame, so the invalid PING got no PONG.
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


@pytest.mark.parametrize("declared", [0, 1], ids=["undeclared", "declared"])
def test_hello_with_fd_rejected(forwarder, handoff_path, fd_source, declared):
    """The forwarder rejects a HELLO that carries an fd, then accepts a correct HELLO on the same channel."""
    # With the channel open, the forwarder has one fd more than when idle.
    with_channel = forwarder.fd_count() + 1
    with FakeServer(handoff_path) as channel:
        mark = len(forwarder.events)
        hello = {"version": ipc.PROTOCOL_VERSION, "role": "server", "pid": os.getpid(), "gen": 1}
        channel.send(encode_raw_frame(ipc.HELLO, hello, declared_fds=declared), [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark)
        assert "HELLO" in error["message"]
        assert wait_fd_count(forwarder, with_channel) == with_channel
        channel.greet()
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


# 3: an fd of the wrong kind where a connected TCP socket is expected.

WRONG_KINDS = [
    pytest.param("regular_file", "regular file", id="regular-file"),
    pytest.param("directory", "directory", id="directory"),
    pytest.param("pipe", "pipe", id="pipe"),
    pytest.param("udp_socket", "UDP socket", id="udp"),
    pytest.param("listening_tcp_socket", "listening TCP socket", id="listening-tcp"),
    pytest.param("unconnected_tcp_socket", "unconnected TCP socket", id="unconnected-tcp"),
    pytest.param("unix_stream_socket", "connected Unix socket", id="unix-stream"),
    pytest.param("unix_datagram_socket", "Unix datagram socket", id="unix-datagram"),
    pytest.param("socket_file_path_fd", "socket file opened with O_PATH", id="o-path-socket-file"),
]


@pytest.mark.parametrize("make_fd, kind", WRONG_KINDS)
def test_wrong_fd_kind_rejected(forwarder, handoff_path, fd_source, make_fd, kind):
    fd = getattr(fd_source, make_fd)()
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        conn_id = new_offer_id()
        channel.send_frame(ipc.OFFER, offer_payload(conn_id), [fd])

        rejected = channel.expect_frame(ipc.REJECTED)
        assert rejected["id"] == conn_id
        assert kind in rejected["reason"]
        event = forwarder.wait_event("rejected", lambda e: e["conn"] == conn_id, start=mark)
        assert kind in event["reason"]
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


# 4: a header that breaks the framing closes the channel, but not the forwarder.

BROKEN_HEADERS = [
    pytest.param(
        encode_raw_frame(ipc.OFFER, b"", declared_fds=1, length=ipc.MAX_PAYLOAD + 1),
        "exceeds the limit",
        id="oversized-payload",
    ),
    pytest.param(
        encode_raw_frame(ipc.OFFER, b"{}", declared_fds=1, magic=b"XKOV"),
        "bad magic",
        id="bad-magic",
    ),
]


@pytest.mark.parametrize("data, reason", BROKEN_HEADERS)
def test_broken_header_closes_channel(forwarder, handoff_path, fd_source, data, reason):
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as channel:
        channel.greet()
        mark = len(forwarder.events)

        channel.send(data, [fd_source.pipe()])

        down = forwarder.wait_event("channel_down", start=mark)
        assert "framing lost" in down["reason"]
        assert reason in down["reason"]
        channel.expect_closed()
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


def test_oversized_header_before_hello_reported(forwarder, handoff_path, fd_source):
    """Framing lost on a channel that never got HELLO has no channel_down, so it is an error event.

    A bad magic before HELLO never reaches the channel, so test_unknown_framing_closed covers it.
    """
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as channel:
        mark = len(forwarder.events)

        channel.send(encode_raw_frame(ipc.HELLO, b"", declared_fds=1, length=ipc.MAX_PAYLOAD + 1), [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark)
        assert "closed before HELLO: framing lost" in error["message"]
        assert "exceeds the limit" in error["message"]
        channel.expect_closed()
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


def test_header_split_from_fds_closes_fds(forwarder, handoff_path, fd_source):
    """An OFFER whose fd came with its first part, completed by a message that also breaks the framing."""
    idle = forwarder.fd_count()
    frame = encode_raw_frame(ipc.OFFER, offer_payload(new_offer_id()), declared_fds=1)
    with FakeServer(handoff_path) as channel:
        channel.greet()
        mark = len(forwarder.events)

        channel.send(frame[: ipc.HEADER_SIZE + 4], [fd_source.pipe()])
        channel.send(frame[ipc.HEADER_SIZE + 4 :] + b"XXXX" + bytes(ipc.HEADER_SIZE))

        down = forwarder.wait_event("channel_down", start=mark)
        assert "bad magic" in down["reason"]
        channel.expect_closed()
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


# 5: a garbled payload is rejected and the channel goes on.

GARBLED_FRAMES = [
    pytest.param(encode_raw_frame(ipc.OFFER, b"{not json", declared_fds=1), "not valid JSON", id="not-json"),
    pytest.param(encode_raw_frame(ipc.OFFER, b"\xff\xfe{}", declared_fds=1), "not valid JSON", id="not-utf8"),
    pytest.param(encode_raw_frame(ipc.OFFER, [1, 2], declared_fds=1), "must be a JSON object", id="json-array"),
    pytest.param(encode_raw_frame(ipc.OFFER, {"id": "x"}, declared_fds=1, version=2), "unsupported protocol version 2", id="version-2"),
    pytest.param(encode_raw_frame(99, {"id": "x"}, declared_fds=1), "unknown frame type 99", id="type-99"),
    pytest.param(encode_raw_frame(ipc.OFFER, b"[" * 60000, declared_fds=1), "not valid JSON", id="deep-nesting"),
    pytest.param(encode_raw_frame(ipc.OFFER, b'{"id":"x","deadline_ns":' + b"9" * 5000 + b"}", declared_fds=1), "not valid JSON", id="huge-integer"),
]


@pytest.mark.parametrize("data, reason", GARBLED_FRAMES)
def test_garbled_payload_rejected(forwarder, handoff_path, fd_source, data, reason):
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        channel.send(data, [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark)
        assert reason in error["message"]
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


BAD_OFFER_FIELDS = [
    # (OFFER payload, id expected in REJECTED)
    pytest.param({"deadline_ns": 1 << 62}, "?", id="missing-id"),
    pytest.param({"id": "", "deadline_ns": 1 << 62}, "?", id="empty-id"),
    pytest.param({"id": None, "deadline_ns": 1 << 62}, "?", id="null-id"),
    pytest.param({"id": "bad:1"}, "bad:1", id="missing-deadline"),
    pytest.param({"id": "bad:2", "deadline_ns": "soon"}, "bad:2", id="text-deadline"),
    pytest.param({"id": "bad:3", "deadline_ns": 1.5e18}, "bad:3", id="float-deadline"),
]


@pytest.mark.parametrize("payload, echoed_id", BAD_OFFER_FIELDS)
def test_offer_bad_fields_rejected(forwarder, handoff_path, fd_source, payload, echoed_id):
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        channel.send_frame(ipc.OFFER, payload, [fd_source.pipe()])

        rejected = channel.expect_frame(ipc.REJECTED)
        assert rejected["id"] == echoed_id
        assert "integer deadline_ns" in rejected["reason"]
        forwarder.wait_event("rejected", lambda e: e["conn"] == echoed_id, start=mark)
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


# 6: an OFFER before HELLO closes the channel.


def test_offer_before_hello_closes(forwarder, handoff_path, fd_source):
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as channel:
        mark = len(forwarder.events)

        channel.send_frame(ipc.OFFER, offer_payload(new_offer_id()), [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark)
        assert "OFFER before HELLO" in error["message"]
        bye = channel.expect_frame(ipc.BYE)
        assert "OFFER before HELLO" in bye["reason"]
        assert channel.read_frame() is None
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


# 7: the reference demo's seed framing, garbled.

SEED_GARBAGE = [
    # (data, fds attached, words expected in the reason)
    pytest.param(b"forwardXYZ", 1, "got b'forwardXYZ' with 1 fds", id="trailing-bytes"),
    pytest.param(b"forward", 0, "with 0 fds", id="no-fd"),
    pytest.param(b"forward", 2, "with 2 fds", id="two-fds"),
    pytest.param(b"forw", 1, "got b'forw' with 1 fds", id="short-then-close"),
    pytest.param(b"forward", ipc.MAX_FDS_PER_MESSAGE + 8, "MSG_CTRUNC", id="too-many-fds"),
]


@pytest.mark.parametrize("data, attached, reason", SEED_GARBAGE)
def test_seed_garbage_rejected(forwarder, handoff_path, fd_source, data, attached, reason):
    idle = forwarder.fd_count()
    mark = len(forwarder.events)
    fds = fd_source.copies(fd_source.pipe(), attached)

    with FakeServer(handoff_path) as peer:
        peer.send(data, fds)

    rejected = forwarder.wait_event("rejected", start=mark)
    assert rejected["protocol"] == "seed"
    assert reason in rejected["reason"]
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


@pytest.mark.parametrize("data", [b"forw", b"TKO"], ids=["seed-prefix", "native-prefix"])
def test_silent_peer_times_out(forwarder, handoff_path, fd_source, data):
    """A peer that sends the start of a framing and then nothing is closed after DETECT_TIMEOUT."""
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as peer:
        mark = len(forwarder.events)
        sent_at = time.monotonic()
        peer.send(data, [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark, timeout=DETECT_TIMEOUT + IO_TIMEOUT)
        assert f"no recognisable message within {DETECT_TIMEOUT:g} s" in error["message"]
        assert time.monotonic() - sent_at >= DETECT_TIMEOUT * 0.9
        assert peer.read_frame() is None
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


def test_unknown_framing_closed(forwarder, handoff_path, fd_source):
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as peer:
        mark = len(forwarder.events)
        peer.send(b"GET / HTTP/1.0\r\n\r\n", [fd_source.pipe()])

        error = forwarder.wait_event("error", start=mark)
        assert "unknown framing" in error["message"]
        assert peer.read_frame() is None
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


# 8: an OFFER whose deadline has passed.


def test_expired_offer_rejected(forwarder, handoff_path):
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        conn_id = new_offer_id()
        with TcpConnection() as conn:
            channel.send_frame(ipc.OFFER, offer_payload(conn_id, deadline_s=-1.0), [conn.accepted.fileno()])

            rejected = channel.expect_frame(ipc.REJECTED)
            assert rejected["id"] == conn_id
            assert "expired" in rejected["reason"]
            event = forwarder.wait_event("rejected", lambda e: e["conn"] == conn_id, start=mark)
            assert "expired" in event["reason"]
            assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


# Replies that would echo a value of the peer.

# Each "é" is 2 bytes of UTF-8 in a request and 6 bytes ("\u00e9") when a reply re-encodes it.
WIDE_TEXT = "é" * (ipc.MAX_PAYLOAD // 3)


def test_ping_echo_stays_small(forwarder, handoff_path):
    with FakeServer(handoff_path) as channel:
        channel.greet()

        channel.send_frame(ipc.PING, {"sent_ns": WIDE_TEXT})

        pong = channel.expect_frame(ipc.PONG)
        assert pong["sent_ns"] is None
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


def test_long_offer_id_rejected(forwarder, handoff_path, fd_source):
    with FakeServer(handoff_path) as channel:
        channel.greet()
        idle = forwarder.fd_count()
        mark = len(forwarder.events)

        channel.send_frame(ipc.OFFER, {"id": WIDE_TEXT, "deadline_ns": time.monotonic_ns() + 10**10}, [fd_source.pipe()])

        rejected = channel.expect_frame(ipc.REJECTED)
        assert rejected["id"] == "?"
        assert "string id of 1 to" in rejected["reason"]
        forwarder.wait_event("rejected", start=mark)
        assert wait_fd_count(forwarder, idle) == idle
        check_offer_served(forwarder, channel)
    assert_no_traceback(forwarder)


def test_long_hello_role_closes(forwarder, handoff_path):
    """A HELLO from a peer that is not a server ends the channel with a short BYE."""
    with FakeServer(handoff_path) as channel:
        mark = len(forwarder.events)

        channel.send_frame(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": WIDE_TEXT})

        bye = channel.expect_frame(ipc.BYE)
        assert "expected 'server'" in bye["reason"]
        assert len(bye["reason"]) < 200
        assert channel.read_frame() is None
        error = forwarder.wait_event("error", start=mark)
        assert "expected 'server'" in error["message"]
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


# 9: a flood of random frames, bytes and fds.


def random_attack(rng: random.Random, fd_source: FdSource) -> tuple[bytes, list[int], int]:
    """Return one random message: its bytes, the fds to attach, and where to split it (0 for no split)."""
    makers = [
        fd_source.pipe,
        fd_source.regular_file,
        fd_source.udp_socket,
        fd_source.unix_stream_socket,
        fd_source.listening_tcp_socket,
        fd_source.socket_file_path_fd,
    ]
    fds = [rng.choice(makers)() for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3]))]
    if rng.random() < 0.02:
        fds = fd_source.copies(fd_source.pipe(), ipc.MAX_FDS_PER_MESSAGE + rng.randint(1, 8))

    if rng.random() < 0.1:
        data = rng.randbytes(rng.randint(1, 64))
    else:
        frame_type = rng.choice([ipc.HELLO, ipc.OFFER, ipc.OFFER, ipc.OFFER, ipc.TAKEN, ipc.BYE, ipc.VERDICT, ipc.PING, 0, 99])
        bodies = [
            offer_payload(new_offer_id(), deadline_s=rng.choice([-1.0, IO_TIMEOUT])),
            {"version": 1, "role": rng.choice(["server", "client"]), "pid": 1, "gen": 1},
            {"id": rng.randint(-5, 5), "deadline_ns": rng.random()},
            {"id": "x", "owner": "server", "sent_ns": 1},
            {},
            rng.randbytes(rng.randint(0, 40)),
            b"[1,2,3]",
            b"[" * 3000,
            b'{"sent_ns":' + b"7" * 4400 + b"}",
        ]
        declared = len(fds) if rng.random() < 0.6 else rng.randint(0, 3)
        version = ipc.PROTOCOL_VERSION if rng.random() < 0.9 else rng.randint(0, 255)
        length = None if rng.random() < 0.95 else rng.randint(0, 2 * ipc.MAX_PAYLOAD)
        data = encode_raw_frame(frame_type, rng.choice(bodies), declared_fds=declared, version=version, length=length)
    split = rng.randint(1, len(data) - 1) if len(data) > 1 and rng.random() < 0.3 else 0
    return data, fds, split


def test_random_flood_leaves_forwarder_working(forwarder, handoff_path, fd_source):
    rng = random.Random(FLOOD_SEED)
    idle = forwarder.fd_count()
    channel = None
    for _ in range(FLOOD_ROUNDS):
        if channel is None:
            channel = FakeServer(handoff_path)
            if rng.random() < 0.7:
                channel.greet()
        data, fds, split = random_attack(rng, fd_source)
        try:
            if split:
                # The fds go with a random one of the two parts.
                first_fds, second_fds = (fds, ()) if rng.random() < 0.5 else ((), fds)
                channel.send(data[:split], first_fds)
                channel.send(data[split:], second_fds)
            else:
                channel.send(data, fds)
        except (BrokenPipeError, ConnectionResetError):
            # The forwarder closed this channel after an earlier attack, so start a new one.
            channel.close()
            channel = None
        fd_source.close()
    if channel is not None:
        channel.close()

    assert forwarder.count("taken") == 0
    assert wait_fd_count(forwarder, idle) == idle
    check_forwarder_works(forwarder, handoff_path)
    assert_no_traceback(forwarder)


# SO_PEERCRED: a peer whose uid is not allowed.


def test_forwarder_refuses_foreign_uid(programs, workdir, handoff_path):
    forwarder = start_forwarder(programs, workdir, "--allow-uid", str(FOREIGN_UID))
    idle = forwarder.fd_count()
    with FakeServer(handoff_path) as peer:
        refused = forwarder.wait_event("peer_refused")
        assert refused["peer_pid"] == os.getpid()
        assert refused["peer_uid"] == os.getuid()
        assert f"uid {os.getuid()} is not allowed" in refused["reason"]
        bye = peer.expect_frame(ipc.BYE)
        assert "refused" in bye["reason"]
        assert peer.read_frame() is None
    assert f"refusing peer pid {os.getpid()}" in forwarder.log_text()
    assert wait_fd_count(forwarder, idle) == idle
    assert forwarder.proc.poll() is None


def test_server_refuses_foreign_forwarder(programs, workdir, handoff_path):
    forwarder = start_forwarder(programs, workdir)
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", str(handoff_path), "--allow-uid", str(FOREIGN_UID))
    refused = server.wait_event("peer_refused")
    assert refused["peer_pid"] == forwarder.pid
    assert refused["peer_uid"] == os.getuid()

    port = port_of(server)
    for _ in range(3):
        mark = len(server.events)
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
            client.sendall(b"seq num 1")
            reply = b""
            while chunk := client.recv(1024):
                reply += chunk
        assert reply == ipc.REPLY_BY_SERVER
        fallback = server.wait_event("fallback", start=mark)
        assert fallback["reason"] == "no forwarder"
    assert server.count("channel_up") == 0
    assert forwarder.count("channel_up") == 0

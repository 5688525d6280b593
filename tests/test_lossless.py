"""The lossless ownership rule: a forwarder that dies at any instant loses no request."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time

import pytest
from support import port_of, read_until_eof, run_client
from takeover_console import ipc
from takeover_console.events import EventLog
from takeover_console.forwarder import Forwarder, ForwarderConfig
from takeover_console.handoff_link import ForwarderChannel, NativeLink, PendingOffer
from takeover_console.server import Connection, ServerConfig
from takeover_console.serving import serve_connection
from takeover_console.socketfile import bind_unix_listener
from test_takeover import Load


def start_server(programs, workdir, *extra: str):
    return programs("server", "--listen", "127.0.0.1:0", "--handoff", str(workdir / "h.sock"), *extra)


def start_forwarder(programs, workdir, name: str, *extra: str):
    return programs("forwarder", "--handoff", str(workdir / "h.sock"), *extra, name=name)


@pytest.mark.timeout(150)
def test_twenty_random_kills_lose_nothing(programs, workdir):
    """SIGKILL the forwarder 20 times at random moments under 300 concurrent clients."""
    rng = random.Random(6)
    server = start_server(programs, workdir)
    port = port_of(server)
    load = Load(port, count=9000, rate=600, concurrency=300)
    kills = 0
    for number in range(20):
        forwarder = start_forwarder(programs, workdir, f"forwarder{number}")
        server.wait_event("channel_up", lambda e, pid=forwarder.pid: e["peer_pid"] == pid)
        # The point of the test is a random instant, so this waits on purpose.
        time.sleep(rng.uniform(0.05, 0.4))
        forwarder.kill()
        kills += 1
    summary = load.finish(timeout=90)
    assert kills == 20
    assert summary["failed"] == 0, summary
    assert summary["errors"] == {}
    assert summary["answered_by_forwarder"] > 0


@pytest.mark.parametrize(
    ("fault", "answered_by"),
    [
        ("crash-after-receive", "server"),
        ("crash-after-read", "server"),
        ("crash-after-reply", "forwarder"),
        ("crash-before-done", "forwarder"),
    ],
)
def test_crash_point_gives_one_reply(programs, workdir, fault, answered_by):
    server = start_server(programs, workdir)
    forwarder = start_forwarder(programs, workdir, "forwarder", "--inject-fault", fault)
    server.wait_event("channel_up")
    summary = run_client(port_of(server), count=1)
    assert forwarder.proc.wait(timeout=10) == 3
    assert summary["failed"] == 0, summary
    assert summary[f"answered_by_{answered_by}"] == 1
    # The server answers later requests itself, now that the forwarder is gone.
    assert run_client(port_of(server), count=3)["answered_by_server"] == 3


def test_sigstop_two_seconds_no_failures(programs, workdir):
    server = start_server(programs, workdir)
    forwarder = start_forwarder(programs, workdir, "forwarder")
    server.wait_event("channel_up")
    load = Load(server_port := port_of(server), count=1200, rate=300, concurrency=32)
    server.wait_event("taken", lambda e: e["conn"].endswith(":100"))
    forwarder.signal(signal.SIGSTOP)
    # A stopped forwarder is the condition under test; it stays stopped for two seconds.
    time.sleep(2.0)
    forwarder.signal(signal.SIGCONT)
    summary = load.finish()
    assert summary["failed"] == 0, summary
    assert summary["errors"] == {}
    assert summary["answered_by_server"] > 0
    assert summary["answered_by_forwarder"] > 0
    assert run_client(server_port, count=5)["failed"] == 0


def test_done_keeps_server_copy(programs, workdir):
    """With the default rule the server releases its copy after DONE, not at TAKEN."""
    server = start_server(programs, workdir)
    start_forwarder(programs, workdir, "forwarder")
    server.wait_event("channel_up")
    assert run_client(port_of(server), count=5)["answered_by_forwarder"] == 5
    released = server.wait_event("released", lambda e: e["conn"].endswith(":5"))
    taken = server.wait_event("taken", lambda e: e["conn"].endswith(":5"))
    assert released["mono"] >= taken["mono"]
    assert server.count("released") == 5


def test_taken_rule_still_available(programs, workdir):
    server = start_server(programs, workdir, "--ownership", "taken")
    start_forwarder(programs, workdir, "forwarder")
    server.wait_event("channel_up")
    summary = run_client(port_of(server), count=10, concurrency=4)
    assert summary["answered_by_forwarder"] == 10
    assert summary["failed"] == 0


class FakeForwarder:
    """The forwarder's end of one handoff channel, played by the test: it keeps the fds it is offered."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.sock: socket.socket | None = None
        self._decoder = ipc.FrameDecoder()
        self._frames: list[ipc.Frame] = []

    def accept(self) -> dict:
        """Accept the server's channel, reply to its HELLO and return that HELLO's payload."""
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(10)
        hello = self.next_frame()
        assert hello.type == ipc.HELLO, hello.name
        self.sock.sendall(ipc.encode_frame(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": "forwarder", "pid": os.getpid(), "gen": 1}))
        return hello.payload

    def next_frame(self, allow_close: bool = False) -> ipc.Frame | None:
        """Return the server's next frame, or None when it closed the channel and ``allow_close``."""
        while not self._frames:
            message = ipc.receive_message(self.sock)
            if not message.data:
                assert allow_close, "the server closed the channel"
                return None
            self._frames.extend(self._decoder.feed(message))
        return self._frames.pop(0)

    def send(self, frame_type: int, payload: dict) -> None:
        self.sock.sendall(ipc.encode_frame(frame_type, payload))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()
        self._decoder.close()


def test_stop_leaves_taken_connection(programs, workdir):
    """A server that stops before DONE closes its copy: the forwarder's reply is the only one."""
    forwarder = FakeForwarder(workdir / "h.sock")
    try:
        server = start_server(programs, workdir, "--drain-timeout", "0.3")
        forwarder.accept()
        server.wait_event("channel_up")
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as client:
            client.sendall(b"seq num 1")
            offer = forwarder.next_frame()
            assert offer.type == ipc.OFFER, offer.name
            assert len(offer.fds) == 1
            taken_fd = offer.fds[0]
            forwarder.send(ipc.TAKEN, {"id": offer.payload["id"], "fd": taken_fd})
            server.wait_event("taken")
            # No DONE yet: the server keeps its copy, then stops with the connection still taken.
            assert server.stop() == 0
            with socket.socket(fileno=taken_fd) as taken:
                taken.sendall(ipc.REPLY_BY_FORWARDER)
                taken.shutdown(socket.SHUT_WR)
                reply = read_until_eof(client)
    finally:
        forwarder.close()
    assert reply == ipc.REPLY_BY_FORWARDER
    # "exited" is the last event, so every earlier one has been read.
    server.wait_event("exited")
    assert server.count("fallback") == 0
    assert server.count("released") == 1


def test_drain_waits_for_done():
    """TAKEN moves an offer from pending to held; the drain must keep waiting for its DONE."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        link = NativeLink(ServerConfig(), EventLog(None, "server"), lambda conn, reason: None)
        ours, theirs = socket.socketpair()
        conn = Connection(id="1:1", sock=ours, fd=ours.fileno(), inode=None, peer="", local="", accepted_ns=0)
        via = ForwarderChannel(channel=None, peer_pid=0, hello=loop.create_future(), closed=loop.create_future())
        link.pending[conn.id] = PendingOffer(conn, 0, 0, loop.call_later(60, lambda: None), via)
        link._idle.clear()
        drain = asyncio.create_task(link.wait_idle(10))
        await asyncio.sleep(0)
        link._on_taken(via, {"id": conn.id, "fd": 3})
        for _ in range(5):
            await asyncio.sleep(0)
        assert not drain.done(), "the drain ended while the forwarder had not sent DONE"
        link._on_done(via, {"id": conn.id})
        await asyncio.wait_for(drain, 5)
        assert ours.fileno() == -1  # DONE released the server's copy
        theirs.close()

    asyncio.run(scenario())


def test_stop_waits_for_offer_deadline(programs, workdir):
    """With no drain time, a stopping server still keeps the channel until its offer's deadline."""
    forwarder = FakeForwarder(workdir / "h.sock")
    try:
        server = start_server(programs, workdir, "--drain-timeout", "0", "--reply-timeout", "500")
        forwarder.accept()
        server.wait_event("channel_up")
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as client:
            client.sendall(b"seq num 1")
            offer = forwarder.next_frame()
            ipc.close_all(offer.fds)
            server.signal(signal.SIGTERM)
            # The forwarder neither takes nor rejects the offer, so the server serves it at the deadline.
            reply = read_until_eof(client)
            while forwarder.next_frame(allow_close=True) is not None:
                pass
            closed_ns = time.monotonic_ns()
    finally:
        forwarder.close()
    assert server.proc.wait(timeout=10) == 0
    assert closed_ns >= offer.payload["deadline_ns"]
    assert reply == ipc.REPLY_BY_SERVER
    server.wait_event("exited")
    assert server.count("fallback") == 1


@pytest.mark.parametrize(("server_replied", "expected"), [(True, ipc.REPLY_BY_SERVER), (False, ipc.REPLY_BY_FORWARDER)])
def test_parked_connection_without_verdict(server_replied, expected):
    """A forwarder whose server left before its VERDICT serves only what the server did not serve."""

    async def scenario() -> bytes:
        forwarder = Forwarder(ForwarderConfig(), EventLog(None, "forwarder"))
        client, accepted, parked = parked_connection()
        if server_replied:
            serve_as_server(accepted)
        accepted.close()
        forwarder.park_for_verdict("7:1", parked, from_pid=7)
        forwarder.settle_all_verdicts(7)
        assert forwarder.serving_count == (0 if server_replied else 1)
        return await read_reply(client)

    assert asyncio.run(scenario()) == expected


def test_stopping_forwarder_waits_for_verdict(workdir):
    """A forwarder that stops keeps a parked connection until the live server's VERDICT."""

    async def scenario() -> bytes:
        forwarder = Forwarder(ForwarderConfig(), EventLog(None, "forwarder"))
        forwarder.bound = bind_unix_listener(workdir / "h.sock")
        client, accepted, parked = parked_connection()
        forwarder.park_for_verdict("7:1", parked, from_pid=7)
        stopping = asyncio.create_task(forwarder._shutdown())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not stopping.done()
        # The server timed the offer out and serves it, then replies to the QUERY.
        serve_as_server(accepted)
        accepted.close()
        forwarder.settle_verdict("7:1", "server")
        await asyncio.wait_for(stopping, 5)
        return await read_reply(client)

    assert asyncio.run(scenario()) == ipc.REPLY_BY_SERVER


def parked_connection(send: bool = True) -> tuple[socket.socket, socket.socket, socket.socket]:
    """Return a client, which sent its request when ``send``, the server's accepted end, and a copy for the forwarder."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, _ = listener.accept()
    client.setblocking(False)
    if send:
        client.sendall(b"seq num 1")
    parked = socket.socket(fileno=os.dup(accepted.fileno()))
    parked.setblocking(False)
    return client, accepted, parked


def serve_as_server(sock: socket.socket) -> None:
    """Reply as the server's fallback does: write the reply, end it, consume the request."""
    sock.sendall(ipc.REPLY_BY_SERVER)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1024)


async def read_reply(client: socket.socket) -> bytes:
    """Read what the client receives until EOF, then close it."""
    loop = asyncio.get_running_loop()
    reply = b""
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(client, 1024):
            reply += chunk
    client.close()
    return reply


def test_forwarder_cut_leaves_request_to_server(programs, workdir):
    """A connection the stopping forwarder cuts off at its drain deadline is served by the server."""
    server = start_server(programs, workdir)
    forwarder = start_forwarder(programs, workdir, "forwarder", "--drain-timeout", "0.2")
    server.wait_event("channel_up")
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as client:
        # The request comes only after the forwarder's drain deadline.
        forwarder.wait_event("taken")
        assert forwarder.stop() == 0
        client.sendall(b"seq num 1")
        reply = read_until_eof(client)
    assert reply == ipc.REPLY_BY_SERVER
    forwarder.wait_event("exited")
    assert forwarder.count("closed", lambda e: e["outcome"] == "cut off at the drain deadline") == 1
    # The server writes its events in batches, so its fallback may come after the reply.
    assert server.wait_event("fallback")["reason"] == "forwarder gone before replying"


def test_request_at_read_timeout_served():
    """A request that arrives while the process is stalled past its read timeout is still served."""

    async def scenario() -> bytes:
        client, accepted, copy = parked_connection(send=False)
        copy.close()
        accepted.setblocking(False)
        serving = asyncio.create_task(serve_connection(accepted, ipc.REPLY_BY_FORWARDER, read_timeout=0.05))
        await asyncio.sleep(0)
        client.sendall(b"seq num 1")
        # Like SIGSTOP: the timeout and the request are both due when the loop runs again.
        time.sleep(0.2)
        result = await serving
        assert result.outcome == "served"
        return await read_reply(client)

    assert asyncio.run(scenario()) == ipc.REPLY_BY_FORWARDER

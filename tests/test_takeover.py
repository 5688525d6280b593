"""Listener takeover with real processes under continuous client load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from support import port_of, read_until_eof, run_client
from takeover_console import ipc


class Load:
    """A client process sending requests in the background; ``finish()`` returns its summary."""

    def __init__(self, port: int, count: int, rate: int, concurrency: int = 16, extra: tuple[str, ...] = ()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "takeover_console", "client", "--connect", f"127.0.0.1:{port}", "--count", str(count), "--rate", str(rate), "--concurrency", str(concurrency), "--json", "--timeout", "10", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def finish(self, timeout: float = 60) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return json.loads(out.decode().splitlines()[-1])


def listener_inode(server) -> int:
    return server.wait_event("listening")["inode"]


def start_stack(programs, workdir, *server_args: str, forwarder: bool = True):
    handoff = str(workdir / "h.sock")
    control = str(workdir / "c.sock")
    fwd = None
    if forwarder:
        fwd = programs("forwarder", "--handoff", handoff)
        fwd.wait_event("listening")
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", handoff, "--control", control, *server_args, name="server-g1")
    if forwarder:
        server.wait_event("channel_up")
    return server, fwd, handoff, control


def upgrade(programs, port: int, handoff: str, control: str, name: str, *extra: str):
    """Start a new server generation with --takeover."""
    return programs("server", "--takeover", "--listen", f"127.0.0.1:{port}", "--handoff", handoff, "--control", control, *extra, name=name)


def test_twenty_upgrades_no_failures(programs, workdir):
    first, _, handoff, control = start_stack(programs, workdir)
    port = port_of(first)
    inode = listener_inode(first)
    load = Load(port, count=6000, rate=300)
    generations = [first]
    for number in range(2, 22):
        new = upgrade(programs, port, handoff, control, f"server-g{number}")
        ready = new.wait_event("takeover", lambda e: e["phase"] in ("ready", "aborted"))
        assert ready["phase"] == "ready", new.log_text()[-2000:]
        old = generations[-1]
        assert old.proc.wait(timeout=15) == 0
        generations.append(new)
    summary = load.finish()
    last = generations[-1]
    assert summary["failed"] == 0, summary["errors"]
    assert summary["sent"] == 6000
    assert last.wait_event("listening")["inode"] == inode
    assert last.events[-1]["gen"] == 21
    assert all(g.proc.poll() is not None for g in generations[:-1])


def test_crash_before_ready_rolls_back(programs, workdir):
    server, _, handoff, control = start_stack(programs, workdir, "--ready-timeout", "2")
    port = port_of(server)
    load = Load(port, count=2000, rate=250)
    for attempt in range(10):
        new = upgrade(programs, port, handoff, control, f"crash{attempt}", "--inject-fault", "crash-before-ready")
        assert new.proc.wait(timeout=15) == 3
        server.wait_event("takeover", lambda e: e["phase"] == "aborted" and e["peer_pid"] == new.pid)
    hung = upgrade(programs, port, handoff, control, "hang", "--inject-fault", "hang-before-ready")
    aborted = server.wait_event("takeover", lambda e: e["phase"] == "aborted" and e["peer_pid"] == hung.pid)
    assert hung.proc.wait(timeout=15) == 1
    summary = load.finish()
    assert summary["failed"] == 0, summary["errors"]
    assert "no READY within 2 s" in aborted["reason"]
    assert server.count("takeover", lambda e: e["phase"] == "aborted") == 11
    assert server.proc.poll() is None
    assert run_client(port, count=5)["failed"] == 0


def test_slow_drain_cut_at_deadline(programs, workdir):
    server, _, handoff, control = start_stack(programs, workdir, "--drain-timeout", "0.5", "--inject-fault", "slow-drain", forwarder=False)
    port = port_of(server)
    # Each client waits 0.3 s before its request, so some are in flight at READY.
    load = Load(port, count=40, rate=40, concurrency=8, extra=("--hold", "0.3"))
    server.wait_event("accepted", lambda e: e["conn"].endswith(":6"))
    new = upgrade(programs, port, handoff, control, "server-g2")
    drained = server.wait_event("takeover", lambda e: e["phase"] == "drained")
    stopping = server.wait_event("stopping")
    assert server.proc.wait(timeout=10) == 0
    summary = load.finish()
    assert drained["cut"] > 0
    assert "drain timeout of 0.5 s reached" in server.log_text()
    assert server.wait_event("exited")["mono"] - stopping["mono"] < 2.0
    assert new.wait_event("takeover", lambda e: e["phase"] == "drained")["cut"] == drained["cut"]
    assert summary["failed"] == drained["cut"]
    assert server.count("closed", lambda e: e["outcome"] == "cut off at the drain deadline") == drained["cut"]


def test_ten_forwarder_takeovers(programs, workdir):
    server, first, handoff, _ = start_stack(programs, workdir)
    port = port_of(server)
    inode = first.wait_event("listening")["inode"]
    load = Load(port, count=3000, rate=250)
    forwarders = [first]
    for number in range(2, 12):
        new = programs("forwarder", "--takeover", "--handoff", handoff, name=f"forwarder{number}")
        ready = new.wait_event("takeover", lambda e: e["phase"] in ("ready", "aborted"))
        assert ready["phase"] == "ready", new.log_text()[-2000:]
        assert forwarders[-1].proc.wait(timeout=15) == 0
        assert os.path.exists(handoff)
        forwarders.append(new)
    summary = load.finish()
    assert summary["failed"] == 0, summary["errors"]
    assert summary["answered_by_server"] == 0
    assert server.count("fallback") == 0
    assert forwarders[-1].wait_event("listening")["inode"] == inode
    assert forwarders[-1].stop() == 0
    assert not os.path.exists(handoff)


def test_forwarder_takeover_cut_goes_to_server(programs, workdir):
    """The old forwarder drains for one drain timeout, and the server serves what it cut off."""
    handoff = str(workdir / "h.sock")
    first = programs("forwarder", "--handoff", handoff, "--drain-timeout", "1")
    first.wait_event("listening")
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", handoff)
    server.wait_event("channel_up")
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as client:
        # No request until the old forwarder has drained, so it must cut this connection off.
        first.wait_event("taken")
        programs("forwarder", "--takeover", "--handoff", handoff, name="forwarder2")
        draining = first.wait_event("takeover", lambda e: e["phase"] == "draining")
        drained = first.wait_event("takeover", lambda e: e["phase"] == "drained")
        assert first.proc.wait(timeout=15) == 0
        client.sendall(b"seq num 1")
        reply = read_until_eof(client)
    assert reply == ipc.REPLY_BY_SERVER
    assert drained["cut"] == 1
    assert drained["served"] == 0
    # One drain timeout of 1 s with room for a loaded machine; two would take 2 s or more.
    assert drained["mono"] - draining["mono"] < 1.7


def test_upgrade_leaves_taken_connection(programs, workdir):
    """A connection still with the forwarder at the old server's drain deadline counts as left, not served."""
    first, forwarder, handoff, control = start_stack(programs, workdir, "--drain-timeout", "0.3")
    port = port_of(first)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        # The forwarder takes the connection and waits for a request that comes only after the drain.
        forwarder.wait_event("taken")
        upgrade(programs, port, handoff, control, "server-g2")
        drained = first.wait_event("takeover", lambda e: e["phase"] == "drained")
        assert first.proc.wait(timeout=15) == 0
        client.sendall(b"seq num 1")
        reply = read_until_eof(client)
    assert reply == ipc.REPLY_BY_FORWARDER
    assert drained["left"] == 1
    assert drained["served"] == 0
    assert drained["cut"] == 0


def test_control_refuses_foreign_uid(programs, workdir):
    server, _, handoff, control = start_stack(programs, workdir, "--allow-uid", "4242", forwarder=False)
    port = port_of(server)
    new = upgrade(programs, port, handoff, control, "server-g2")
    assert new.proc.wait(timeout=10) == 1
    refused = server.wait_event("peer_refused")
    assert refused["peer_pid"] == new.pid
    assert refused["peer_uid"] == os.getuid()
    assert run_client(port, count=3)["answered_by_server"] == 3


def test_second_takeover_refused(programs, workdir):
    server, _, handoff, control = start_stack(programs, workdir, "--ready-timeout", "3", forwarder=False)
    port = port_of(server)
    hung = upgrade(programs, port, handoff, control, "hang", "--inject-fault", "hang-before-ready")
    server.wait_event("takeover", lambda e: e["phase"] == "fds_sent")
    second = upgrade(programs, port, handoff, control, "second")
    assert second.proc.wait(timeout=10) == 1
    refused = server.wait_event("takeover", lambda e: e["phase"] == "refused")
    assert refused["peer_pid"] == second.pid
    assert "already in progress" in second.log_text()
    assert "rejected by the running process" in second.log_text()
    hung.kill()


@pytest.mark.timeout(60)
def test_listeners_sent_in_batches(programs, workdir):
    listen = [arg for _ in range(40) for arg in ("--listen", "127.0.0.1:0")]
    handoff = str(workdir / "h.sock")
    control = str(workdir / "c.sock")
    server = programs("server", *listen, "--handoff", handoff, "--control", control, name="server-g1")
    server.wait_event("listening", lambda e: len([x for x in server.events if x.get("kind") == "listening"]) >= 40)
    addresses = [e["addr"] for e in server.events if e.get("kind") == "listening"]
    ports = [int(address.rsplit(":", 1)[1]) for address in addresses]
    new = programs("server", "--takeover", "--listen", f"127.0.0.1:{ports[0]}", "--handoff", handoff, "--control", control, name="server-g2")
    sent = server.wait_event("takeover", lambda e: e["phase"] == "fds_sent")
    assert sent["count"] == 41
    assert sent["batches"] == 2
    assert new.wait_event("takeover", lambda e: e["phase"] in ("ready", "aborted"))["phase"] == "ready"
    assert server.proc.wait(timeout=10) == 0
    for port in (ports[0], ports[20], ports[39]):
        assert run_client(port, count=2)["answered_by_server"] == 2


def test_stalled_new_generation_exits(programs, workdir):
    """A new server that wakes after the old one gave up must not accept beside it."""
    server, _, handoff, control = start_stack(programs, workdir, "--ready-timeout", "1", forwarder=False)
    port = port_of(server)
    stalled = upgrade(programs, port, handoff, control, "stalled", "--ready-timeout", "1", "--inject-fault", "stall-before-ready")
    server.wait_event("takeover", lambda e: e["phase"] == "aborted" and e["peer_pid"] == stalled.pid)
    assert stalled.proc.wait(timeout=10) == 1
    assert stalled.wait_event("takeover", lambda e: e["phase"] == "aborted")["side"] == "new"
    assert server.proc.poll() is None
    assert os.path.exists(control)
    assert run_client(port, count=5)["answered_by_server"] == 5

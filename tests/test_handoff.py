"""The server, forwarder and client as real processes on 127.0.0.1: handoff and fallback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from support import port_of, read_until_eof, run_client

from takeover_console import ipc

O_CLOEXEC = 0o2000000


def start_pair(programs, workdir, *server_args: str):
    """Start a forwarder and a server connected to it; return both once the channel is up."""
    handoff = str(workdir / "h.sock")
    forwarder = programs("forwarder", "--handoff", handoff)
    forwarder.wait_event("listening")
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", handoff, *server_args)
    server.wait_event("channel_up")
    return server, forwarder


def test_fallback_without_forwarder(programs, workdir):
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", str(workdir / "none.sock"))
    summary = run_client(port_of(server), count=20)
    assert summary["failed"] == 0
    assert summary["answered_by_server"] == 20
    # Events are written in batches, so wait for the last one before counting.
    server.wait_event("closed", lambda e: e["conn"].endswith(":20"))
    assert server.count("fallback", lambda e: e["reason"] == "no forwarder") == 20


def test_handoff_with_forwarder(programs, workdir):
    server, forwarder = start_pair(programs, workdir)
    summary = run_client(port_of(server), count=50, concurrency=8)
    assert summary["failed"] == 0
    assert summary["answered_by_forwarder"] == 50
    forwarder.wait_event("closed", lambda e: e["conn"].endswith(":50"))
    server.wait_event("released", lambda e: server.count("released") == 50)
    forwarder.wait_event("served", lambda e: forwarder.count("served") == 50)
    assert server.count("released") == 50
    assert forwarder.count("served") == 50


def test_handoff_events_share_inode(programs, workdir):
    server, forwarder = start_pair(programs, workdir)
    run_client(port_of(server), count=1)
    accepted = server.wait_event("accepted")
    taken = forwarder.wait_event("taken")
    assert taken["conn"] == accepted["conn"]
    assert taken["inode"] == accepted["inode"]
    assert taken["peer_fd"] == accepted["fd"]
    assert server.wait_event("taken")["latency_ms"] > 0


def test_handoff_event_times_in_order(programs, workdir):
    """accepted, offered and the forwarder's taken carry times in the order they happened."""
    server, forwarder = start_pair(programs, workdir)
    run_client(port_of(server), count=20, concurrency=4)
    forwarder.wait_event("taken", lambda e: forwarder.count("taken") == 20)
    for taken in [event for event in forwarder.events if event.get("kind") == "taken"]:
        accepted = server.wait_event("accepted", lambda e, conn=taken["conn"]: e["conn"] == conn)
        offered = server.wait_event("offered", lambda e, conn=taken["conn"]: e["conn"] == conn)
        assert accepted["mono"] <= offered["mono"]
        assert offered["mono"] <= taken["mono"]


def test_reference_client_gets_replies(programs, workdir):
    """The reference client reads one reply of up to 1024 bytes per connection."""
    server, _ = start_pair(programs, workdir)
    port = port_of(server)
    replies = []
    for i in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"seq num %d" % i)
            replies.append(sock.recv(1024))
    assert replies == [ipc.REPLY_BY_FORWARDER] * 20


def test_forwarder_killed_mid_run(programs, workdir):
    server, forwarder = start_pair(programs, workdir)
    port = port_of(server)
    load = subprocess.Popen(
        [sys.executable, "-m", "takeover_console", "client", "--connect", f"127.0.0.1:{port}", "--count", "1500", "--concurrency", "16", "--rate", "500", "--json", "--timeout", "10"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        forwarder.wait_event("served", lambda e: e["conn"].endswith(":200"))
        forwarder.kill()
        server.wait_event("channel_down")
        out, _ = load.communicate(timeout=30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    import json

    summary = json.loads(out.decode().splitlines()[-1])
    assert summary["sent"] == 1500
    assert "refused" not in summary["errors"]
    assert "timeout" not in summary["errors"]
    # The server kept a copy of every connection the forwarder held, so none is lost.
    assert summary["failed"] == 0, summary
    assert summary["answered_by_server"] > 0
    assert server.wait_event("fallback", lambda e: e["reason"] in ("no forwarder",) or e["reason"].startswith("channel down"))


def test_forwarder_restarted_resumes_handoffs(programs, workdir):
    server, first = start_pair(programs, workdir)
    port = port_of(server)
    first.kill()
    server.wait_event("channel_down")
    assert run_client(port, count=10)["answered_by_server"] == 10

    second = programs("forwarder", "--handoff", str(workdir / "h.sock"), name="forwarder2")
    server.wait_event("channel_up", lambda e: e["peer_pid"] == second.pid)
    summary = run_client(port, count=10)
    assert summary["answered_by_forwarder"] == 10
    assert summary["failed"] == 0


def test_forwarder_stop_is_graceful(programs, workdir):
    server, forwarder = start_pair(programs, workdir)
    port = port_of(server)
    assert run_client(port, count=5)["answered_by_forwarder"] == 5
    assert forwarder.stop() == 0
    assert not (workdir / "h.sock").exists()
    server.wait_event("channel_down")
    summary = run_client(port, count=5)
    assert summary["answered_by_server"] == 5


def test_server_stop_exits_zero(programs, workdir):
    server, _ = start_pair(programs, workdir)
    run_client(port_of(server), count=3)
    assert server.stop() == 0
    assert server.wait_event("exited")["code"] == 0


def test_stopping_server_refuses_new_clients(programs, workdir):
    """A server stopping with no successor serves what the kernel queued and refuses later clients."""
    server = programs("server", "--listen", "127.0.0.1:0", "--handoff", str(workdir / "h.sock"), "--drain-timeout", "5")
    address = ("127.0.0.1", port_of(server))
    # The first client keeps the drain going. The second completes its handshake in the
    # kernel's queue while the server is stopped.
    # NOTE: on SIGCONT the accept handler usually takes the second client before the stop
    # begins, so the accept that the stop itself does is seldom run here.
    with socket.create_connection(address, timeout=10) as first:
        server.wait_event("accepted")
        server.signal(signal.SIGSTOP)
        queued = socket.create_connection(address, timeout=10)
        server.signal(signal.SIGTERM)
        server.signal(signal.SIGCONT)
        server.wait_event("stopping")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=10)
        with queued:
            queued.sendall(b"seq num 2")
            assert read_until_eof(queued) == ipc.REPLY_BY_SERVER
        first.sendall(b"seq num 1")
        assert read_until_eof(first) == ipc.REPLY_BY_SERVER
    assert server.proc.wait(timeout=10) == 0


def test_seed_peer_to_forwarder(programs, workdir):
    """A peer speaking the reference framing (dial, 'forward' + one fd, close) is served."""
    handoff = workdir / "h.sock"
    forwarder = programs("forwarder", "--handoff", str(handoff))
    forwarder.wait_event("listening")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, _ = listener.accept()
        dialer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dialer.connect(str(handoff))
        socket.send_fds(dialer, [b"forward"], [accepted.fileno()])
        dialer.close()
        accepted.close()
        client.sendall(b"seq num 0")
        reply = client.recv(1024)
        client.close()
    assert reply == ipc.REPLY_BY_FORWARDER
    assert forwarder.wait_event("taken")["protocol"] == "seed"


def _reference_forwarder(listener: socket.socket, served: list, stop: threading.Event) -> None:
    """The reference demo's forwarder: one message (up to 128 bytes, one fd) per dial."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            peer, _ = listener.accept()
        except TimeoutError:
            continue
        with peer:
            data, fds, _, _ = socket.recv_fds(peer, 128, 1)
        assert data == b"forward"
        with socket.socket(fileno=fds[0]) as conn:
            # O_NONBLOCK belongs to the open file description, so the server's setting came along.
            conn.settimeout(5)
            conn.recv(1024)
            conn.sendall(ipc.REPLY_BY_FORWARDER)
        served.append(data)


def test_seed_server_to_reference_forwarder(programs, workdir):
    path = workdir / "ref.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    served: list = []
    stop = threading.Event()
    thread = threading.Thread(target=_reference_forwarder, args=(listener, served, stop), daemon=True)
    thread.start()
    try:
        server = programs("server", "--listen", "127.0.0.1:0", "--handoff", str(path), "--protocol", "seed")
        summary = run_client(port_of(server), count=10)
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert summary["answered_by_forwarder"] == 10
    assert len(served) == 10


def test_received_fd_is_cloexec(programs, workdir):
    server, forwarder = start_pair(programs, workdir)
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as client:
        taken = forwarder.wait_event("taken")
        with open(f"/proc/{forwarder.pid}/fdinfo/{taken['fd']}") as fdinfo:
            flags = next(int(line.split()[1], 8) for line in fdinfo if line.startswith("flags:"))
        client.sendall(b"seq num 0")
        assert client.recv(1024) == ipc.REPLY_BY_FORWARDER
    assert flags & O_CLOEXEC


def test_stale_socket_file_replaced(programs, workdir):
    path = workdir / "h.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    forwarder = programs("forwarder", "--handoff", str(path))
    forwarder.wait_event("listening")
    assert "replacing stale socket file" in forwarder.log_text()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


def test_live_socket_file_kept(programs, workdir):
    path = workdir / "h.sock"
    first = programs("forwarder", "--handoff", str(path))
    first.wait_event("listening")
    inode = os.stat(path).st_ino
    second = programs("forwarder", "--handoff", str(path), name="forwarder2")
    assert second.proc.wait(timeout=10) == 1
    assert "another process is listening" in second.log_text()
    assert f"pid {first.pid}" in second.log_text()
    assert os.stat(path).st_ino == inode


def test_non_socket_path_kept(programs, workdir):
    path = workdir / "h.sock"
    path.write_text("not a socket")
    forwarder = programs("forwarder", "--handoff", str(path))
    assert forwarder.proc.wait(timeout=10) == 1
    assert "is not a socket" in forwarder.log_text()
    assert path.read_text() == "not a socket"


def test_port_in_use_is_clear(programs, workdir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = programs("server", "--listen", f"127.0.0.1:{port}", "--handoff", str(workdir / "h.sock"))
        assert server.proc.wait(timeout=10) == 1
    assert f"port {port} on 127.0.0.1 is already in use" in server.log_text()


def test_default_runtime_dir_private(monkeypatch, workdir):
    from takeover_console import socketfile

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(workdir))
    path = socketfile.default_handoff_path()
    assert path.parent == workdir / "takeover-console"
    assert oct(os.stat(path.parent).st_mode & 0o777) == oct(0o700)
    bound = socketfile.bind_unix_listener(path)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    finally:
        bound.sock.close()
        assert bound.remove_file()


@pytest.mark.parametrize("text", ["8080", "host:", ":80", "127.0.0.1:99999", "::1:80", "[::1]80"])
def test_invalid_listen_address_rejected(text):
    from takeover_console.netaddr import AddressError, parse_host_port

    with pytest.raises(AddressError):
        parse_host_port(text)


def test_sigstop_forwarder_falls_back(programs, workdir):
    """A stopped forwarder gets no new offers after one times out; nothing is answered twice."""
    server, forwarder = start_pair(programs, workdir, "--reply-timeout", "100")
    port = port_of(server)
    forwarder.signal(signal.SIGSTOP)
    try:
        summary = run_client(port, count=20, concurrency=4)
    finally:
        forwarder.signal(signal.SIGCONT)
    assert summary["failed"] == 0, summary
    assert summary["answered_by_server"] == 20
    assert server.wait_event("fallback", lambda e: e["reason"] == "forwarder not answering")

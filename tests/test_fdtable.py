"""The fd-table sampler against fixed table text and against real processes on 127.0.0.1."""

from __future__ import annotations

import errno
import functools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from takeover_console import fdtable, socktable
from takeover_console.fdtable import (
    KIND_ANON,
    KIND_FILE,
    KIND_OTHER,
    KIND_PIPE,
    KIND_SOCKET,
    KIND_TCP,
    KIND_UDP,
    KIND_UNIX,
    FdRow,
    FdSampler,
    ProcessSample,
    Sample,
    SamplerThread,
)
from takeover_console.scanpool import ScanPool
from takeover_console.socktable import PROCFS, SOCK_DIAG, InetEntry, UnixEntry

READY_TIMEOUT = 10.0
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="the fixed table lines were written on a little-endian machine")

# --- Fixed table text -------------------------------------------------------------------

TCP_HEADER = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP_LINES = [
    b"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4911 1 0000000000000000 100 0 0 10 0\n",
    b"   1: 0100007F:1F90 0100007F:CC9A 01 00000000:00000000 00:00000000 00000000     0        0 4912 1 0000000000000000 20 4 30 10 -1\n",
    b"   2: 0100007F:CC9A 0100007F:1F90 08 00000000:00000000 00:00000000 00000000     0        0 4913 1 0000000000000000 20 4 30 10 -1\n",
    b"   3: 0100007F:CC9B 0100007F:1F90 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3 0000000000000000\n",
    b"   4: 0A00000A:0016 0100000A:D431 01 00000000:00000000 02:00051D1B 00000000     0        0 9999 2 0000000000000000 20 4 1 10 -1\n",
]
TCP6_HEADER = b"  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP6_LINES = [
    b"   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0\n",
    b"   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:CC9A 01 00000000:00000000 00:00000000 00000000     0        0 5002 1 0000000000000000 20 4 30 10 -1\n",
    b"   2: 000080FE00000000FF005452123456FE:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5003 2 0000000000000000 0\n",
]
UNIX_TEXT = (
    b"Num       RefCount Protocol Flags    Type St Inode Path\n"
    b"0000000000000000: 00000002 00000000 00010000 0001 01  7001 /tmp/tc-x/h.sock\n"
    b"0000000000000000: 00000003 00000000 00000000 0001 03  7002 /tmp/tc-x/h.sock\n"
    b"0000000000000000: 00000003 00000000 00000000 0001 03  7003\n"
    b"0000000000000000: 00000002 00000000 00000000 0002 01  7004 @takeover console\n"
)


def parse_tcp(lines: list[bytes], inodes: set[int], header: bytes = TCP_HEADER) -> dict[int, InetEntry]:
    return socktable.parse_table(socktable.RawTable("tcp", PROCFS, header + b"".join(lines)), inodes)


@little_endian_only
def test_proc_tcp_listener_line():
    entries = parse_tcp(TCP_LINES, {4911})
    assert entries[4911] == InetEntry("127.0.0.1:8080", "0.0.0.0:0", "LISTEN")


@little_endian_only
def test_proc_tcp_connection_lines():
    entries = parse_tcp(TCP_LINES, {4912, 4913, 9999})
    assert entries[4912] == InetEntry("127.0.0.1:8080", "127.0.0.1:52378", "ESTABLISHED")
    assert entries[4913] == InetEntry("127.0.0.1:52378", "127.0.0.1:8080", "CLOSE_WAIT")
    assert entries[9999] == InetEntry("10.0.0.10:22", "10.0.0.1:54321", "ESTABLISHED")


@little_endian_only
def test_proc_tcp_skips_other_inodes():
    entries = parse_tcp(TCP_LINES, {4912, 123456})
    assert list(entries) == [4912]


@little_endian_only
def test_proc_tcp_time_wait_skipped():
    # A TIME_WAIT entry has inode 0 because no fd refers to it.
    entries = parse_tcp(TCP_LINES, {4911, 4912, 4913, 9999})
    assert 0 not in entries
    assert len(entries) == 4


@little_endian_only
def test_proc_tcp6_loopback_and_mapped():
    raw = socktable.RawTable("tcp6", PROCFS, TCP6_HEADER + b"".join(TCP6_LINES))
    entries = socktable.parse_table(raw, {5001, 5002, 5003})
    assert entries[5001] == InetEntry("[::1]:8080", "[::]:0", "LISTEN")
    assert entries[5002] == InetEntry("[::ffff:127.0.0.1]:8080", "[::ffff:127.0.0.1]:52378", "ESTABLISHED")
    assert entries[5003].local == "[fe80::5254:ff:fe56:3412]:53"


@little_endian_only
def test_proc_udp_unconnected_state():
    line = b"  123: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6001 2 0000000000000000 0\n"
    raw = socktable.RawTable("udp", PROCFS, TCP_HEADER + line)
    assert socktable.parse_table(raw, {6001})[6001] == InetEntry("127.0.0.1:53", "0.0.0.0:0", "UNCONN")


@pytest.mark.parametrize(
    ("hex_state", "name"),
    [("01", "ESTABLISHED"), ("02", "SYN_SENT"), ("03", "SYN_RECV"), ("04", "FIN_WAIT1"), ("05", "FIN_WAIT2"), ("06", "TIME_WAIT"),
     ("07", "CLOSE"), ("08", "CLOSE_WAIT"), ("09", "LAST_ACK"), ("0A", "LISTEN"), ("0B", "CLOSING"), ("0C", "NEW_SYN_RECV"), ("3F", "0x3F")],
)
def test_proc_tcp_state_names(hex_state, name):
    line = b"   0: 0100007F:1F90 00000000:0000 %s 00000000:00000000 00:00000000 00000000     0        0 77 1\n" % hex_state.encode()
    assert parse_tcp([line], {77})[77].state == name


@little_endian_only
def test_proc_address_formats():
    assert socktable.format_proc_address(b"0100007F:1F90") == "127.0.0.1:8080"
    assert socktable.format_proc_address(b"00000000000000000000000001000000:0050") == "[::1]:80"
    assert socktable.format_proc_address(b"0000000000000000FFFF00000100007F:0050") == "[::ffff:127.0.0.1]:80"


def test_proc_unix_lines():
    entries = socktable.parse_table(socktable.RawTable("unix", PROCFS, UNIX_TEXT), {7001, 7002, 7003, 7004})
    assert entries[7001] == UnixEntry("/tmp/tc-x/h.sock", "LISTEN", None)
    assert entries[7002] == UnixEntry("/tmp/tc-x/h.sock", "ESTABLISHED", None)
    assert entries[7003] == UnixEntry(None, "ESTABLISHED", None)
    assert entries[7004] == UnixEntry("@takeover console", "UNCONN", None)


def netlink_message(payload: bytes) -> bytes:
    header = socktable.NLMSG_HEADER.pack(socktable.NLMSG_HEADER.size + len(payload), socktable.SOCK_DIAG_BY_FAMILY, 2, 1, 0)
    return header + payload + bytes(-len(payload) % 4)


def inet_diag_message(family: int, state: int, local: tuple[str, int], remote: tuple[str, int], inode: int) -> bytes:
    source = socket.inet_pton(family, local[0]).ljust(16, b"\0")
    destination = socket.inet_pton(family, remote[0]).ljust(16, b"\0")
    sockid = struct.pack("!HH", local[1], remote[1]) + source + destination + struct.pack("=III", 0, 0, 0)
    return netlink_message(struct.pack("=BBBB", family, state, 0, 0) + sockid + struct.pack("=IIIII", 0, 0, 0, 0, inode))


def test_inet_diag_messages_parsed():
    chunks = [
        inet_diag_message(socket.AF_INET, 10, ("127.0.0.1", 8080), ("0.0.0.0", 0), 4911)
        + inet_diag_message(socket.AF_INET6, 1, ("::ffff:127.0.0.1", 8080), ("::ffff:127.0.0.1", 52378), 4912)
        + inet_diag_message(socket.AF_INET6, 8, ("::1", 443), ("::1", 40000), 4913),
    ]
    entries = socktable.parse_table(socktable.RawTable("tcp6", SOCK_DIAG, chunks), {4911, 4912, 4913})
    assert entries[4911] == InetEntry("127.0.0.1:8080", "0.0.0.0:0", "LISTEN")
    assert entries[4912] == InetEntry("[::ffff:127.0.0.1]:8080", "[::ffff:127.0.0.1]:52378", "ESTABLISHED")
    assert entries[4913] == InetEntry("[::1]:443", "[::1]:40000", "CLOSE_WAIT")


def unix_diag_message(state: int, inode: int, name: bytes | None, peer: int | None) -> bytes:
    payload = struct.pack("=BBBBIII", socket.AF_UNIX, socket.SOCK_STREAM, state, 0, inode, 0, 0)
    if name is not None:
        payload += struct.pack("=HH", 4 + len(name), socktable.UNIX_DIAG_NAME) + name + bytes(-len(name) % 4)
    if peer is not None:
        payload += struct.pack("=HHI", 8, socktable.UNIX_DIAG_PEER, peer)
    return netlink_message(payload)


def test_unix_diag_messages_parsed():
    chunks = [
        unix_diag_message(10, 7001, b"/tmp/tc-x/h.sock", None)
        + unix_diag_message(1, 7002, None, 7003)
        + unix_diag_message(7, 7004, b"\0takeover\0console", None),
    ]
    entries = socktable.parse_table(socktable.RawTable("unix", SOCK_DIAG, chunks), {7001, 7002, 7004})
    assert entries[7001] == UnixEntry("/tmp/tc-x/h.sock", "LISTEN", None)
    assert entries[7002] == UnixEntry(None, "ESTABLISHED", 7003)
    assert entries[7004] == UnixEntry("@takeover@console", "UNCONN", None)


# --- Real processes ---------------------------------------------------------------------

FDS_CHILD = r"""
import json, os, socket, sys
workdir = sys.argv[1]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
accepted, _ = listener.accept()
read_end, write_end = os.pipe()
regular = os.open(os.path.join(workdir, "data.txt"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
inheritable = os.open(os.path.join(workdir, "inherit.txt"), os.O_RDWR | os.O_CREAT)
os.set_inheritable(inheritable, True)
unix_listener = socket.socket(socket.AF_UNIX)
unix_listener.bind(os.path.join(workdir, "u.sock"))
unix_listener.listen()
left, right = socket.socketpair()
udp = socket.socket(type=socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
mapped = socket.socket(socket.AF_INET6)
mapped.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
mapped.bind(("::ffff:127.0.0.1", 0))
mapped.listen()
mapped_client = socket.create_connection(("127.0.0.1", mapped.getsockname()[1]))
mapped_accepted, _ = mapped.accept()
null = os.open(os.devnull, os.O_RDONLY)
epoll = __import__("select").epoll()
print(json.dumps({
    "listener": listener.fileno(), "port": listener.getsockname()[1],
    "client": client.fileno(), "client_port": client.getsockname()[1], "accepted": accepted.fileno(),
    "read_end": read_end, "write_end": write_end, "regular": regular, "inheritable": inheritable,
    "unix_listener": unix_listener.fileno(), "left": left.fileno(), "right": right.fileno(),
    "udp": udp.fileno(), "udp_port": udp.getsockname()[1],
    "mapped_accepted": mapped_accepted.fileno(), "mapped_port": mapped.getsockname()[1],
    "mapped_client_port": mapped_client.getsockname()[1], "null": null, "epoll": epoll.fileno(),
}), flush=True)
sys.stdin.read()
"""

HOLDER_CHILD = r"""
import socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(channel, 16, 1)
print(fds[0], flush=True)
sys.stdin.read()
"""

CHURN_CHILD = r"""
import os, socket, sys, time
path = os.path.join(sys.argv[1], "churn.txt")
deadline = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < deadline:
    pair = socket.socketpair()
    tcp = socket.socket()
    read_end, write_end = os.pipe()
    regular = os.open(path, os.O_RDWR | os.O_CREAT)
    for fd in (read_end, write_end, regular):
        os.close(fd)
    tcp.close()
    pair[0].close()
    pair[1].close()
"""


class Children:
    """Child processes started by one test; teardown kills each by its pid."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=pass_fds,
        )
        self.started.append(child)
        return child

    def close(self) -> None:
        for child in self.started:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=5)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children():
    started = Children()
    yield started
    started.close()


def read_line(child: subprocess.Popen, timeout: float = READY_TIMEOUT) -> str:
    """Return the child's next stdout line, waiting at most ``timeout`` seconds."""
    readable, _, _ = select.select([child.stdout], [], [], timeout)
    assert readable, f"child {child.pid} wrote nothing in {timeout:g} s"
    line = child.stdout.readline().decode()
    assert line, f"child {child.pid} exited with code {child.wait(timeout=5)} before it was ready"
    return line


@pytest.fixture(params=[SOCK_DIAG, PROCFS])
def source(request):
    return request.param


@pytest.fixture
def fds_child(children, workdir):
    child = children.start(FDS_CHILD, str(workdir))
    return child, json.loads(read_line(child))


def rows_by_fd(sample: Sample, pid: int) -> dict[int, FdRow]:
    return {row.fd: row for row in sample.processes[pid].rows}


def test_child_tcp_listener_row(fds_child, source):
    child, fds = fds_child
    row = rows_by_fd(FdSampler(source=source).sample([child.pid]), child.pid)[fds["listener"]]
    assert row.kind == KIND_TCP
    assert row.family == "ipv4"
    assert row.state == "LISTEN"
    assert row.local == f"127.0.0.1:{fds['port']}"
    assert row.remote == "0.0.0.0:0"
    assert row.target == f"socket:[{row.inode}]"


def test_child_tcp_connection_rows(fds_child, source):
    child, fds = fds_child
    rows = rows_by_fd(FdSampler(source=source).sample([child.pid]), child.pid)
    client = rows[fds["client"]]
    accepted = rows[fds["accepted"]]
    assert client.state == "ESTABLISHED"
    assert client.local == f"127.0.0.1:{fds['client_port']}"
    assert client.remote == f"127.0.0.1:{fds['port']}"
    assert accepted.local == client.remote
    assert accepted.remote == client.local


def test_child_mapped_ipv6_connection(fds_child, source):
    child, fds = fds_child
    row = rows_by_fd(FdSampler(source=source).sample([child.pid]), child.pid)[fds["mapped_accepted"]]
    assert row.kind == KIND_TCP
    assert row.family == "ipv6"
    assert row.local == f"[::ffff:127.0.0.1]:{fds['mapped_port']}"
    assert row.remote == f"[::ffff:127.0.0.1]:{fds['mapped_client_port']}"


def test_child_pipe_file_kinds(fds_child):
    child, fds = fds_child
    rows = rows_by_fd(FdSampler().sample([child.pid]), child.pid)
    assert rows[fds["read_end"]].kind == KIND_PIPE
    assert rows[fds["read_end"]].inode == rows[fds["write_end"]].inode
    assert rows[fds["regular"]].kind == KIND_FILE
    assert rows[fds["regular"]].target.endswith("/data.txt")
    assert rows[fds["null"]].kind == KIND_OTHER
    assert rows[fds["epoll"]].kind == KIND_ANON
    assert rows[fds["epoll"]].target == "anon_inode:[eventpoll]"


def test_child_close_on_exec_flags(fds_child):
    child, fds = fds_child
    rows = rows_by_fd(FdSampler().sample([child.pid]), child.pid)
    assert rows[fds["regular"]].cloexec is True
    assert rows[fds["inheritable"]].cloexec is False
    assert rows[fds["listener"]].cloexec is True
    # stdin of a child started by subprocess is inherited, so not close-on-exec.
    assert rows[0].cloexec is False


def test_child_unix_and_udp_rows(fds_child, workdir, source):
    child, fds = fds_child
    rows = rows_by_fd(FdSampler(source=source).sample([child.pid]), child.pid)
    unix_listener = rows[fds["unix_listener"]]
    assert unix_listener.kind == KIND_UNIX
    assert unix_listener.state == "LISTEN"
    assert unix_listener.path == str(workdir / "u.sock")
    assert rows[fds["left"]].state == "ESTABLISHED"
    assert rows[fds["udp"]].kind == KIND_UDP
    assert rows[fds["udp"]].state == "UNCONN"
    assert rows[fds["udp"]].local == f"127.0.0.1:{fds['udp_port']}"


def test_child_unix_pair_peers(fds_child):
    child, fds = fds_child
    rows = rows_by_fd(FdSampler(source=SOCK_DIAG).sample([child.pid]), child.pid)
    left = rows[fds["left"]]
    right = rows[fds["right"]]
    assert left.peer_inode == right.inode
    assert right.peer_inode == left.inode


def test_child_process_figures(fds_child):
    child, fds = fds_child
    sampler = FdSampler()
    first = sampler.sample({child.pid: "server"}).processes[child.pid]
    second = sampler.sample({child.pid: "server"}).processes[child.pid]
    assert first.label == "server"
    assert first.gone is False
    assert first.cpu_percent is None
    assert isinstance(second.cpu_percent, float)
    assert second.rss > 0
    assert second.num_fds == len(os.listdir(f"/proc/{child.pid}/fd"))
    assert second.cmdline[0] == sys.executable


def test_handed_over_socket_shared(children):
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    ours, theirs = socket.socketpair()
    try:
        child = children.start(HOLDER_CHILD, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        socket.send_fds(ours, [b"x"], [accepted.fileno()])
        child_fd = int(read_line(child))
        inode = os.fstat(accepted.fileno()).st_ino

        sample = FdSampler().sample({os.getpid(): "test", child.pid: "child"})

        assert set(sample.shared[inode]) == {(os.getpid(), accepted.fileno()), (child.pid, child_fd)}
        assert set(sample.holders(inode)) == {(os.getpid(), accepted.fileno()), (child.pid, child_fd)}
        assert rows_by_fd(sample, child.pid)[child_fd].state == "ESTABLISHED"
    finally:
        for sock in (listener, client, accepted, ours, theirs):
            sock.close()


def test_exited_pid_marked_gone(children):
    child = children.start("pass")
    child.wait(timeout=READY_TIMEOUT)
    process = FdSampler().sample([child.pid]).processes[child.pid]
    assert process.gone is True
    assert process.rows == ()


def test_stopped_process_status(children):
    """A process stopped by SIGSTOP is sampled as stopped, and as not stopped after SIGCONT."""
    child = children.start("import sys; print('ready', flush=True); sys.stdin.read()")
    read_line(child)
    sampler = FdSampler()
    before = sampler.sample([child.pid]).processes[child.pid].status
    os.kill(child.pid, signal.SIGSTOP)
    os.waitid(os.P_PID, child.pid, os.WSTOPPED | os.WNOWAIT)
    stopped = sampler.sample([child.pid]).processes[child.pid].status
    os.kill(child.pid, signal.SIGCONT)
    os.waitid(os.P_PID, child.pid, os.WCONTINUED)
    after = sampler.sample([child.pid]).processes[child.pid].status
    assert before != "stopped"
    assert stopped == "stopped"
    assert after != "stopped"


def test_zombie_pid_marked_gone(children):
    child = children.start("pass")
    # Wait for the exit without reaping, so the pid stays a zombie while it is sampled.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    process = FdSampler().sample([child.pid]).processes[child.pid]
    assert process.gone is True
    assert "zombie" in process.error


def test_nonexistent_pid_marked_gone():
    with open("/proc/sys/kernel/pid_max") as file:
        pid = int(file.read()) + 1  # above pid_max, so no process can have it
    process = FdSampler().sample({pid: "missing"}).processes[pid]
    assert process.gone is True
    assert process.label == "missing"
    assert process.error == "no such process"


def test_churning_process_samples_cleanly(children, workdir):
    child = children.start(CHURN_CHILD, str(workdir), "1.5")
    read_line(child)
    sampler = FdSampler(cloexec_refresh_ticks=1)
    samples = []
    deadline = time.monotonic() + 8.0
    while child.poll() is None and time.monotonic() < deadline:
        samples.append(sampler.sample([child.pid]))
    samples.append(sampler.sample([child.pid]))
    kinds = {row.kind for sample in samples for process in sample.processes.values() for row in process.rows}
    assert child.poll() is not None, "the churning child did not exit within 8 s"
    assert len(samples) > 10
    assert kinds <= {KIND_TCP, KIND_UNIX, KIND_SOCKET, KIND_PIPE, KIND_FILE, KIND_OTHER, KIND_ANON}
    assert samples[-1].processes[child.pid].gone is True


def test_cloexec_change_seen_after_refresh():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        sampler = FdSampler(cloexec_refresh_ticks=5)
        before = rows_by_fd(sampler.sample([os.getpid()]), os.getpid())[fd].cloexec
        os.set_inheritable(fd, True)
        after = [rows_by_fd(sampler.sample([os.getpid()]), os.getpid())[fd].cloexec for _ in range(5)]
        assert before is True
        assert after[-1] is False
    finally:
        os.close(fd)


def test_cloexec_reads_per_tick_bounded(monkeypatch):
    """With many fds a tick reads about CLOEXEC_READS_PER_TICK fdinfo files, and a change still shows."""
    from takeover_console import fdscan

    reads = []
    real_read = fdscan.read_cloexec

    def counting_read(path, inode):
        reads.append(path)
        return real_read(path, inode)

    monkeypatch.setattr(fdscan, "read_cloexec", counting_read)
    count = 10 * fdscan.CLOEXEC_READS_PER_TICK
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        sampler = FdSampler(cloexec_refresh_ticks=1)
        sampler.sample([os.getpid()])
        os.set_inheritable(fds[0], True)
        per_tick = []
        seen = []
        for _ in range(12):
            del reads[:]
            seen.append(rows_by_fd(sampler.sample([os.getpid()]), os.getpid())[fds[0]].cloexec)
            per_tick.append(len(reads))
        assert max(per_tick) <= 2 * fdscan.CLOEXEC_READS_PER_TICK
        assert False in seen
    finally:
        for fd in fds:
            os.close(fd)
        sampler.close()


def test_unchanged_rows_reused():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        sampler = FdSampler()
        first = rows_by_fd(sampler.sample([os.getpid()]), os.getpid())
        second = rows_by_fd(sampler.sample([os.getpid()]), os.getpid())
        assert first[fd] is second[fd]
    finally:
        os.close(fd)


# --- Reads of the system-wide tables ----------------------------------------------------


def count_reads(sampler: FdSampler) -> dict[str, int]:
    counts: dict[str, int] = {}
    read = sampler._read_table

    def counting(name):
        counts[name] = counts.get(name, 0) + 1
        return read(name)

    sampler._read_table = counting
    return counts


@pytest.mark.parametrize("prefetch", [True, False])
def test_tables_read_once_per_tick(fds_child, children, workdir, source, prefetch):
    child, _ = fds_child
    (workdir / "second").mkdir()
    second = children.start(FDS_CHILD, str(workdir / "second"))
    read_line(second)
    sampler = FdSampler(source=source, prefetch=prefetch)
    counts = count_reads(sampler)

    sampler.sample([child.pid, second.pid, os.getpid()])

    assert set(counts) >= {"tcp", "tcp6", "udp", "unix"}
    assert set(counts.values()) == {1}


def test_tables_unread_without_sockets(children):
    child = children.start("import sys; print('ready', flush=True); sys.stdin.read()")
    read_line(child)
    sampler = FdSampler()
    counts = count_reads(sampler)
    sample = sampler.sample([child.pid])
    assert {row.kind for row in sample.processes[child.pid].rows} <= {KIND_PIPE, KIND_FILE, KIND_OTHER}
    assert counts == {}


def test_sock_diag_failure_falls_back(fds_child, monkeypatch):
    child, fds = fds_child

    def failing_dump(request):
        raise OSError(errno.ENOENT, "sock_diag is not available")

    monkeypatch.setattr(socktable, "dump_sock_diag", failing_dump)
    row = rows_by_fd(FdSampler(source=SOCK_DIAG).sample([child.pid]), child.pid)[fds["listener"]]
    assert row.state == "LISTEN"


def costly_reads(monkeypatch, cpu_seconds: float) -> list[str]:
    """Make every socket table read burn ``cpu_seconds`` of this thread's CPU; return the names read."""
    read = socktable.read_table
    names: list[str] = []

    def costly(name, source):
        names.append(name)
        until = time.thread_time() + cpu_seconds
        while time.thread_time() < until:
            pass
        return read(name, source)

    monkeypatch.setattr(socktable, "read_table", costly)
    return names


def test_costly_table_read_reused(fds_child, monkeypatch):
    """A read that cost 20 ms of CPU is reused by the next tick, which still shows its sockets."""
    child, fds = fds_child
    names = costly_reads(monkeypatch, 0.02)
    monkeypatch.setattr(fdtable, "MAX_TABLE_AGE", 60.0)
    sampler = FdSampler(table_read_share=0.001)
    sampler.sample([child.pid])
    read_first = sorted(names)
    row = rows_by_fd(sampler.sample([child.pid]), child.pid)[fds["listener"]]
    assert read_first and sorted(names) == read_first
    assert row.state == "LISTEN"


def test_reused_table_age_capped(fds_child, monkeypatch):
    """However costly the read, a table is reused for MAX_TABLE_AGE seconds at most."""
    child, _ = fds_child
    costly_reads(monkeypatch, 0.02)
    sampler = FdSampler(table_read_share=1e-6)
    sampler.sample([child.pid])
    assert sampler._last_reads
    assert all(read.reuse_until - time.monotonic() <= fdtable.MAX_TABLE_AGE for read in sampler._last_reads.values())


def test_tick_waits_for_unneeded_reads():
    """A table read started for a tick has ended when the tick ends, even if no fd needed the table."""
    finished = []

    def slow_read(name):
        time.sleep(0.05)  # stands for a slow kernel dump
        finished.append(name)

    tables = fdtable._TickTables(slow_read, prefetch=True)
    tables.start("tcp6")
    tables.join()
    assert finished == ["tcp6"]


def test_cheap_table_read_repeated(fds_child, monkeypatch):
    """With reuse off, every tick reads each table it needs again."""
    child, _ = fds_child
    names = costly_reads(monkeypatch, 0.0)
    sampler = FdSampler(table_read_share=0)
    sampler.sample([child.pid])
    first = len(names)
    sampler.sample([child.pid])
    assert first > 0
    assert len(names) == 2 * first


# --- Serialisation and the sampler thread ------------------------------------------------


def test_sample_json_round_trip(fds_child):
    child, _ = fds_child
    sample = FdSampler().sample({child.pid: "server", os.getpid(): "test"})
    restored = Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert restored == sample


def test_from_dict_ignores_unknown_keys():
    data = {"mono": 1.5, "future": 1, "processes": [{"pid": 7, "new_field": 2, "rows": [{"fd": 3, "kind": "pipe", "target": "pipe:[9]", "later": 0}]}]}
    sample = Sample.from_dict(data)
    assert sample.processes[7] == ProcessSample(pid=7, rows=(FdRow(fd=3, kind="pipe", target="pipe:[9]"),))


def test_sampler_thread_delivers_and_stops(children):
    child = children.start("import sys; print('ready', flush=True); sys.stdin.read()")
    read_line(child)
    received: list[Sample] = []
    enough = threading.Event()

    def collect(sample: Sample) -> None:
        received.append(sample)
        if sum(child.pid in item.processes for item in received) >= 3:
            enough.set()

    sampler_thread = SamplerThread(collect, [os.getpid()], rate=50)
    with sampler_thread:
        sampler_thread.set_pids({child.pid: "child"})
        assert enough.wait(READY_TIMEOUT), "fewer than 3 samples of the new pid within 10 s"
    stopped = sampler_thread.stop(timeout=2.0)
    times = [sample.mono for sample in received]
    assert stopped is True
    assert times == sorted(set(times))
    assert received[-1].processes[child.pid].label == "child"


def test_sampler_thread_survives_callback_error():
    calls = threading.Event()
    count = 0

    def failing(sample: Sample) -> None:
        nonlocal count
        count += 1
        if count >= 3:
            calls.set()
        raise RuntimeError("callback failed")

    sampler_thread = SamplerThread(failing, [os.getpid()], rate=100)
    sampler_thread.start()
    try:
        assert calls.wait(READY_TIMEOUT), "fewer than 3 callbacks within 10 s"
    finally:
        assert sampler_thread.stop(timeout=2.0) is True


def test_sampler_rejects_bad_options():
    with pytest.raises(ValueError, match="source"):
        FdSampler(source="netstat")
    with pytest.raises(ValueError, match="cloexec_refresh_ticks"):
        FdSampler(cloexec_refresh_ticks=0)
    with pytest.raises(ValueError, match="rate"):
        SamplerThread(lambda sample: None, rate=0)


def test_socket_kind_for_netlink():
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    try:
        row = rows_by_fd(FdSampler().sample([os.getpid()]), os.getpid())[sock.fileno()]
        assert row.kind == KIND_SOCKET
        assert row.protocol == "NETLINK"
    finally:
        sock.close()


# --- Scanning on a pool of threads ------------------------------------------------------

MANY_FDS_CHILD = r"""
import os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < 4096:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
listener = socket.create_server(("127.0.0.1", 0))
open_fds = []
for _ in range(300):
    open_fds.append(socket.create_connection(listener.getsockname()))
    open_fds.append(listener.accept()[0])
for _ in range(200):
    open_fds.extend(socket.socketpair())
for _ in range(100):
    open_fds.extend(os.pipe())
for _ in range(50):
    open_fds.append(os.open(os.devnull, os.O_RDONLY))
print(len(os.listdir("/proc/self/fd")), flush=True)
sys.stdin.read()
"""

needs_two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the sampler reads fds on one thread when there is one CPU")


@needs_two_cpus
def test_pool_and_inline_rows_equal(children):
    child = children.start(MANY_FDS_CHILD)
    listed = int(read_line(child))
    with FdSampler(scan_threads=2) as pooled, FdSampler(scan_threads=1) as inline:
        assert pooled.scan_threads == 2
        assert inline.scan_threads == 1
        pooled.sample([child.pid])  # the second tick reuses cached fds, so compare both
        for _ in range(2):
            pooled_sample = pooled.sample([child.pid])
            inline_sample = inline.sample([child.pid])
            pooled_rows = pooled_sample.processes[child.pid].rows
            fds = [row.fd for row in pooled_rows]
            assert len(pooled_rows) >= listed - 1  # listdir in the child had one fd of its own
            assert fds == sorted(fds)
            assert pooled_rows == inline_sample.processes[child.pid].rows
            assert pooled_sample.shared == inline_sample.shared


@pytest.mark.parametrize("scan_threads", [1, 2])
def test_reused_fd_number_detected(scan_threads):
    fd = os.open(os.devnull, os.O_RDONLY)
    sock = socket.socket()
    try:
        with FdSampler(scan_threads=scan_threads) as sampler:
            before = rows_by_fd(sampler.sample([os.getpid()]), os.getpid())[fd]
            # Close fd and give its number to the socket; dup2() clears close-on-exec.
            os.dup2(sock.fileno(), fd)
            after = rows_by_fd(sampler.sample([os.getpid()]), os.getpid())[fd]
        assert before.kind == KIND_OTHER
        assert before.cloexec is True
        assert after.kind == KIND_TCP
        assert after.inode == os.fstat(sock.fileno()).st_ino
        assert after.cloexec is False
    finally:
        os.close(fd)
        sock.close()


@pytest.mark.parametrize("scan_threads", [1, 2])
def test_exit_during_tick_marked_gone(children, monkeypatch, scan_threads):
    child = children.start(MANY_FDS_CHILD)
    read_line(child)
    real_listdir = os.listdir

    def listdir_then_kill(path):
        # The child dies after its fds were listed and before they are read.
        names = real_listdir(path)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=READY_TIMEOUT)
        return names

    with FdSampler(scan_threads=scan_threads) as sampler:
        assert sampler.sample([child.pid]).processes[child.pid].gone is False
        monkeypatch.setattr(os, "listdir", listdir_then_kill)
        process = sampler.sample({child.pid: "child"}).processes[child.pid]
    assert process.gone is True
    assert process.error == "exited while its fds were read"
    assert process.label == "child"
    assert process.rows == ()


@needs_two_cpus
def test_close_ends_scan_threads():
    sampler = FdSampler(scan_threads=2)
    sampler.sample([os.getpid()])
    helpers = sampler._pool.helper_threads()
    assert helpers
    assert all(thread.daemon for thread in helpers)
    sampler.close()
    assert not any(thread.is_alive() for thread in helpers)
    # A closed sampler still samples, on the calling thread alone.
    assert sampler.sample([os.getpid()]).processes[os.getpid()].rows


@needs_two_cpus
def test_sampler_thread_stop_closes_sampler():
    sampled = threading.Event()
    sampler_thread = SamplerThread(lambda sample: sampled.set(), [os.getpid()], rate=50)
    with sampler_thread:
        assert sampled.wait(READY_TIMEOUT), "no sample within 10 s"
    helpers = sampler_thread._sampler._pool.helper_threads()
    assert helpers
    assert not any(thread.is_alive() for thread in helpers)


def test_unchanged_process_rows_tuple_reused(children):
    # No sockets, so no socket table can change between the two ticks.
    child = children.start("import sys; print('ready', flush=True); sys.stdin.read()")
    read_line(child)
    with FdSampler() as sampler:
        first = sampler.sample([child.pid]).processes[child.pid]
        second = sampler.sample([child.pid]).processes[child.pid]
    assert first.rows
    assert second.rows is first.rows


@pytest.mark.parametrize("scan_threads", [1, 2])
def test_tables_read_once_with_pool(fds_child, children, workdir, scan_threads):
    child, _ = fds_child
    many = children.start(MANY_FDS_CHILD)
    read_line(many)
    with FdSampler(scan_threads=scan_threads) as sampler:
        counts = count_reads(sampler)
        for tick in range(1, 4):
            sampler.sample([child.pid, many.pid, os.getpid()])
            assert set(counts) >= {"tcp", "tcp6", "udp", "unix"}
            assert set(counts.values()) == {tick}


def test_pool_runs_added_tasks():
    pool = ScanPool(3)
    done = []
    lock = threading.Lock()

    def leaf(number, batch):
        with lock:
            done.append(number)

    def root(batch):
        for number in range(50):
            batch.add(functools.partial(leaf, number))

    try:
        pool.run([root, root])
    finally:
        pool.close()
    assert sorted(done) == sorted(list(range(50)) * 2)


def test_pool_raises_task_error_after_others():
    pool = ScanPool(2)
    finished = []

    def failing(batch):
        raise ValueError("task failed")

    try:
        with pytest.raises(ValueError, match="task failed"):
            pool.run([failing] + [lambda batch: finished.append(1) for _ in range(20)])
    finally:
        pool.close()
    assert len(finished) == 20


def test_closed_pool_runs_inline():
    pool = ScanPool(2)
    pool.close()
    callers = []
    pool.run([lambda batch: callers.append(threading.current_thread()) for _ in range(5)])
    assert callers == [threading.current_thread()] * 5
    assert pool.helper_threads() == []


def test_inet_diag_unchanged_datagram_reused():
    chunk = inet_diag_message(socket.AF_INET, 1, ("127.0.0.1", 8080), ("127.0.0.1", 40000), 4912) + inet_diag_message(
        socket.AF_INET, 10, ("127.0.0.1", 8080), ("0.0.0.0", 0), 4911
    )
    cache = socktable.ParseCache()
    first = socktable.parse_table(socktable.RawTable("tcp", SOCK_DIAG, [chunk]), {4912}, cache)
    # 4911 was skipped when the datagram was first parsed, so asking for it parses again.
    second = socktable.parse_table(socktable.RawTable("tcp", SOCK_DIAG, [chunk]), {4911, 4912}, cache)
    changed = inet_diag_message(socket.AF_INET, 8, ("127.0.0.1", 8080), ("127.0.0.1", 40000), 4912)
    third = socktable.parse_table(socktable.RawTable("tcp", SOCK_DIAG, [changed]), {4912}, cache)
    assert list(first) == [4912]
    assert second[4911] == InetEntry("127.0.0.1:8080", "0.0.0.0:0", "LISTEN")
    assert second[4912] is first[4912]
    assert third[4912].state == "CLOSE_WAIT"


@pytest.mark.parametrize(
    "data",
    [
        {"processes": []},
        {"mono": "1.5"},
        {"mono": 1.5, "processes": {"pid": 7}},
        {"mono": 1.5, "processes": [{"pid": [7]}]},
        {"mono": 1.5, "processes": [{"pid": 7, "rss": "12 MB"}]},
        {"mono": 1.5, "processes": [{"pid": 7, "gone": 1}]},
        {"mono": 1.5, "processes": [{"pid": 7, "cmdline": [None]}]},
        {"mono": 1.5, "processes": [{"pid": 7, "rows": [{"fd": "3", "kind": "pipe", "target": "pipe:[9]"}]}]},
        {"mono": 1.5, "processes": [{"pid": 7, "rows": [{"fd": 3, "kind": "pipe", "target": "pipe:[9]", "inode": True}]}]},
        {"mono": 1.5, "shared": [{"inode": 9, "holders": [[7]]}]},
        {"mono": 1.5, "shared": [{"inode": "9", "holders": []}]},
    ],
    ids=["no mono", "text mono", "processes not a list", "list pid", "text rss", "int gone", "null in cmdline", "text fd", "bool inode", "short holder", "text inode"],
)
def test_from_dict_rejects_wrong_types(data):
    """A recorded sample with a field of the wrong type is rejected with ValueError, never half built."""
    with pytest.raises(ValueError):
        Sample.from_dict(data)

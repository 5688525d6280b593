"""Time FdSampler.sample() over three processes that hold many TCP connections on 127.0.0.1.

One child listens and accepts every connection; two client children open half of the
connections each. So N connections make 2N socket fds in the sampled processes, plus one
listener. Each configuration (socket table source, prefetch on or off, threads that read
fds) takes one cold tick, then ``--ticks`` timed ticks back to back. The floor line
times readlink() of every fd on one thread and split over two; when two threads gain
little there, another program was using the second CPU during the run.

Run from the repository root:

    .venv/bin/python benchmarks/sampler.py --connections 2000 --ticks 50

The script stops by itself: children exit when their stdin closes, and the script kills
them by pid when it ends. Connections are closed with SO_LINGER 0 (a reset), so they
leave no TIME_WAIT entries in the kernel's table. Every timed tick reads its socket
tables afresh, as the console does while a read costs little. The last line is the
console's own case: ticks at 4 a second, with costly reads reused for a while.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from takeover_console import socktable  # noqa: E402
from takeover_console.fdtable import DEFAULT_RATE, DEFAULT_SCAN_THREADS, DEFAULT_TABLE_READ_SHARE, FdSampler  # noqa: E402
from takeover_console.socktable import PROCFS, SOCK_DIAG  # noqa: E402

SETUP_TIMEOUT = 60.0  # seconds for the children to open every connection

RAISE_FD_LIMIT = r"""
import resource
def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))
"""

LISTENER = RAISE_FD_LIMIT + r"""
import socket, struct, sys
count = int(sys.argv[1])
raise_fd_limit(count + 64)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
accepted = []
while len(accepted) < count:
    connection, _ = listener.accept()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.append(connection)
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = RAISE_FD_LIMIT + r"""
import socket, struct, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
raise_fd_limit(count + 64)
connections = []
for _ in range(count):
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connections.append(connection)
print("ready", flush=True)
sys.stdin.read()
"""


def read_line(child: subprocess.Popen, deadline: float) -> str:
    """Return the child's next stdout line; raise if it takes past ``deadline``."""
    readable, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not readable:
        raise TimeoutError(f"child {child.pid} wrote nothing within {SETUP_TIMEOUT:g} s")
    line = child.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError(f"child {child.pid} exited with code {child.wait(timeout=5)} during setup")
    return line


def start(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def start_children(connections: int, children: list[subprocess.Popen]) -> None:
    """Start the listener and two clients, appending each to ``children`` at once."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    listener = start(LISTENER, connections)
    children.append(listener)
    port = int(read_line(listener, deadline))
    first_half = connections // 2
    for count in (first_half, connections - first_half):
        children.append(start(CLIENT, port, count))
    for child in children:
        if read_line(child, deadline) != "ready":
            raise RuntimeError(f"child {child.pid} did not report ready")


def stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=5)
        child.stdin.close()
        child.stdout.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def time_ticks(pids: dict[int, str], source: str, prefetch: bool, threads: int, ticks: int, paced: bool = False) -> None:
    """Time ``ticks`` ticks of one configuration and print one line.

    By default the ticks run back to back, and each reads its socket tables afresh
    (table_read_share=0): back to back, a reused read would serve nearly every tick. With
    ``paced``, the ticks run at the console's 4 a second with the default reuse of costly
    reads, as in the console.
    """
    share = DEFAULT_TABLE_READ_SHARE if paced else 0
    with FdSampler(source=source, prefetch=prefetch, scan_threads=threads, table_read_share=share) as sampler:
        started = time.perf_counter()
        first = sampler.sample(pids)
        cold_ms = (time.perf_counter() - started) * 1000.0
        durations = []
        for _ in range(ticks):
            if paced:
                time.sleep(1.0 / DEFAULT_RATE)
            started = time.perf_counter()
            sample = sampler.sample(pids)
            durations.append((time.perf_counter() - started) * 1000.0)
        threads = sampler.scan_threads
    rows = sum(len(process.rows) for process in sample.processes.values())
    established = sum(1 for process in sample.processes.values() for row in process.rows if row.state == "ESTABLISHED")
    print(
        f"{source:9} prefetch={'on ' if prefetch else 'off'} threads={threads}{' paced' if paced else ''}  cold {cold_ms:6.1f}  "
        f"p50 {statistics.median(durations):6.1f}  p99 {percentile(durations, 0.99):6.1f}  max {max(durations):6.1f} ms  "
        f"rows {rows}  ESTABLISHED {established}  first-tick rows {sum(len(p.rows) for p in first.processes.values())}"
    )


def read_links(links: list[tuple[int, str]]) -> None:
    for directory, name in links:
        os.readlink(name, dir_fd=directory)


def time_floor(pids: dict[int, str], ticks: int) -> None:
    """Time the system calls a tick makes in any case: readlink() of every fd, and the TCP table dump."""
    readlinks = []
    split_readlinks = []
    dumps = []
    directories = [os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY) for pid in pids]
    try:
        for _ in range(ticks):
            started = time.perf_counter()
            links = [(directory, name) for directory in directories for name in os.listdir(directory)]
            read_links(links)
            readlinks.append((time.perf_counter() - started) * 1000.0)

            started = time.perf_counter()
            links = [(directory, name) for directory in directories for name in os.listdir(directory)]
            helper = threading.Thread(target=read_links, args=(links[len(links) // 2 :],))
            helper.start()
            read_links(links[: len(links) // 2])
            helper.join()
            split_readlinks.append((time.perf_counter() - started) * 1000.0)

            started = time.perf_counter()
            socktable.read_table("tcp", SOCK_DIAG)
            dumps.append((time.perf_counter() - started) * 1000.0)
    finally:
        for directory in directories:
            os.close(directory)
    print(
        f"floor: listdir and readlink of every fd p50 {statistics.median(readlinks):6.1f} ms, "
        f"split over 2 threads {statistics.median(split_readlinks):6.1f} ms; sock_diag tcp dump alone p50 {statistics.median(dumps):6.1f} ms"
    )


def describe_machine() -> None:
    model = "unknown"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    print(f"cpus {os.cpu_count()}, {model}, Linux {platform.release()}, Python {platform.python_version()}")
    with open("/proc/net/tcp", "rb") as file:
        lines = file.read().count(b"\n") - 1
    print(f"/proc/net/tcp has {lines} entries (all sockets of the network namespace, not only ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000, help="TCP connections to open (default 2000)")
    parser.add_argument("--ticks", type=int, default=50, help="timed ticks per configuration (default 50)")
    arguments = parser.parse_args()
    if not 1 <= arguments.connections <= 8000:
        parser.error(f"--connections {arguments.connections} is out of range; pass 1 to 8000")
    if not 1 <= arguments.ticks <= 1000:
        parser.error(f"--ticks {arguments.ticks} is out of range; pass 1 to 1000")

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"RLIMIT_NOFILE soft limit {soft}; each child raises its own when it needs more")
    children: list[subprocess.Popen] = []
    try:
        start_children(arguments.connections, children)
        describe_machine()
        pids = dict(zip((child.pid for child in children), ("listener", "client-1", "client-2")))
        print(f"{arguments.connections} connections over pids {sorted(pids)}; {arguments.ticks} ticks per line")
        time_floor(pids, arguments.ticks)
        for source in (SOCK_DIAG, PROCFS):
            for prefetch in (True, False):
                time_ticks(pids, source, prefetch, DEFAULT_SCAN_THREADS, arguments.ticks)
        # The same default configuration with every fd read on the calling thread.
        time_ticks(pids, SOCK_DIAG, True, 1, arguments.ticks)
        # The console's configuration and pace: costly table reads reused.
        time_ticks(pids, SOCK_DIAG, True, DEFAULT_SCAN_THREADS, arguments.ticks, paced=True)
    finally:
        stop_children(children)


if __name__ == "__main__":
    main()

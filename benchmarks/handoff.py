"""Benchmark the fd handoff against a raw fd ping-pong and a direct asyncio server.

Run from the repository root::

    .venv/bin/python benchmarks/handoff.py [--count N] [--rounds R] [--quick] [--loop uvloop]

One run measures:

(a) the handoff round trip, OFFER sent to TAKEN received, from the server's ``taken``
    events (``latency_ms``) during the server->forwarder runs below, next to a raw
    ping-pong: process A sends one fd with 1 data byte over a socketpair (sendmsg with
    SCM_RIGHTS), process B receives it with recvmsg, closes it and sends 1 byte back.
(b) connections per second and client latency at concurrency 1 and 32, measured by our
    client (``takeover_console client --json``). The three servers are a minimal direct
    asyncio server with no handoff, our server with our forwarder (native protocol), and
    our server with no forwarder, which serves every connection itself (fallback).

Every row runs once per round, in a rotated order, and the tables show the median of the
rounds, because a shared machine is noisy. Everything listens on 127.0.0.1 with port 0,
and every process this script starts is stopped by its pid before it exits.

The same file also runs the helper processes (``--role``): the ping-pong peer, the direct
server and a wrapper that starts our programs on uvloop.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONCURRENCIES = (1, 32)
DEFAULT_COUNT = 3000
DEFAULT_ROUNDS = 3
QUICK_COUNT = 500
QUICK_ROUNDS = 1
# Connections sent to each server before the first round and not counted.
WARMUP_COUNT = 200
# Ping-pong exchanges per round, after PINGPONG_WARMUP uncounted ones.
PINGPONG_COUNT = 5000
PINGPONG_WARMUP = 200
PLACEMENT_UNPINNED = "unpinned"
# The whole benchmark stops starting new runs after this many seconds.
DEFAULT_TIME_LIMIT = 170.0
STARTUP_TIMEOUT = 10.0
# Seconds a stopped process gets after SIGTERM before SIGKILL.
STOP_GRACE = 3.0

REQUEST_MAX = 1024
# The reply of our fallback, which the client attributes to the server.
REPLY_BY_SERVER = b"process by server"
READ_TIMEOUT = 5.0

ROW_DIRECT = "direct"
ROW_HANDOFF = "handoff"
ROW_FALLBACK = "fallback"
ROW_TAKEN = "taken"
ROW_TITLES = {
    ROW_DIRECT: "direct asyncio server, no handoff",
    ROW_HANDOFF: "server -> forwarder (native)",
    ROW_FALLBACK: "fallback: server, no forwarder",
    ROW_TAKEN: "server -> forwarder, --ownership taken",
}
# The lossless ownership rule (the default, "done") may cost at most 10% of the throughput of "taken".
TARGET_LOSSLESS_RATIO = 0.9
TARGET_RATE_RATIO = 0.7
TARGET_ROUND_TRIP_RATIO = 1.5


class BenchmarkError(Exception):
    """A process or run of the benchmark failed; the message names it and its log."""


# Helper processes, run as ``handoff.py --role ROLE``.


def install_uvloop() -> None:
    """Make asyncio.run() use uvloop in this process; exit with a message when it is missing."""
    try:
        import uvloop
    except ImportError:
        sys.exit("uvloop is not installed in this Python; install it with: .venv/bin/pip install uvloop")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_pingpong_peer(fd: int) -> int:
    """Run process B of the raw ping-pong: receive an fd with 1 byte, close the fd, send 1 byte back, until EOF."""
    channel = socket.socket(fileno=fd)
    control_size = socket.CMSG_SPACE(array.array("i").itemsize)
    while True:
        data, ancdata, _, _ = channel.recvmsg(1, control_size)
        if not data:
            return 0
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for received in array.array("i", cdata):
                    os.close(received)
        channel.sendall(b"k")


async def serve_direct(loop_name: str) -> int:
    """Serve as the direct server: accept, one recv of up to 1024 bytes, write the fallback reply, close.

    It is built the way our server's fallback is: a reader callback on a non-blocking
    listener, one task per connection, and loop.sock_recv and loop.sock_sendall under
    asyncio.timeout. It writes no events, has no handoff and prints its port to stdout.
    """
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    tasks: set[asyncio.Task] = set()

    async def serve(sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await loop.sock_recv(sock, REQUEST_MAX)
            if request:
                async with asyncio.timeout(READ_TIMEOUT):
                    await loop.sock_sendall(sock, REPLY_BY_SERVER)
        except (TimeoutError, OSError):
            pass
        finally:
            sock.close()

    def on_acceptable() -> None:
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Pause like our server does, so EMFILE does not turn into a busy loop.
                print(f"direct server: accept() failed: {exc.strerror}; pausing accepts for 0.1 s", file=sys.stderr, flush=True)
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, loop.add_reader, listener.fileno(), on_acceptable)
                return
            sock.setblocking(False)
            task = loop.create_task(serve(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_reader(listener.fileno(), on_acceptable)
    print(json.dumps({"port": listener.getsockname()[1], "loop": loop_name, "loop_class": type(loop).__name__}), flush=True)
    await stop.wait()
    loop.remove_reader(listener.fileno())
    listener.close()
    return 0


def run_role(args: argparse.Namespace) -> int:
    """Run one helper process and return its exit status."""
    if args.role == "pingpong-peer":
        return run_pingpong_peer(args.fd)
    if args.loop == "uvloop":
        install_uvloop()
    if args.role == "direct-server":
        return asyncio.run(serve_direct(args.loop))
    if args.role == "program":
        from takeover_console.cli import main

        return main(args.program_args)
    raise BenchmarkError(f"unknown role {args.role!r}")


# Starting and stopping processes.


class Processes:
    """The processes this benchmark started, each stopped by its pid in stop_all()."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **popen_args) -> subprocess.Popen:
        """Start ``argv`` with stderr in ``<workdir>/<name>.log``."""
        log_file = open(self.workdir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log_file, **popen_args)
        finally:
            log_file.close()
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        """Return the end of a process's stderr log."""
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop_all(self) -> None:
        """Send SIGTERM to every process still running, then SIGKILL after STOP_GRACE seconds."""
        for _, proc in self.started:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for _, proc in self.started:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class EventFile:
    """A reader of the JSON lines that one of our programs appends to its ``--events`` file."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""
        # Events read by wait_for() after the one it returned.
        self._unread: list[dict] = []

    def read_new(self) -> list[dict]:
        """Return the events not returned yet; a partly written line waits for its end."""
        unread, self._unread = self._unread, []
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return unread
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return unread + [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, kind: str, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> dict:
        """Return the next event of ``kind``; raise BenchmarkError when the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.read_new()
            for index, event in enumerate(events):
                if event.get("kind") == kind:
                    self._unread = events[index + 1 :]
                    return event
            if proc.poll() is not None:
                raise BenchmarkError(f"pid {proc.pid} exited with status {proc.returncode} before its {kind!r} event")
            time.sleep(0.02)
        raise BenchmarkError(f"no {kind!r} event from pid {proc.pid} within {timeout:g} s")


def program_argv(loop_name: str, role: str, *args: str) -> list[str]:
    """Return the command line of one of our programs, started through the uvloop wrapper for ``--loop uvloop``."""
    if loop_name == "uvloop":
        return [sys.executable, __file__, "--role", "program", "--loop", "uvloop", "--", role, *args]
    return [sys.executable, "-m", "takeover_console", role, *args]


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """Read one JSON line from a helper's stdout within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchmarkError(f"pid {proc.pid} printed nothing within {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise BenchmarkError(f"pid {proc.pid} exited with status {proc.wait()} before printing its port")
    return json.loads(line)


@dataclass
class Servers:
    """The three servers under test: the TCP port of each row and the pids that serve it."""

    ports: dict[str, int]
    pids: dict[str, tuple[int, ...]]
    handoff_events: EventFile
    direct_loop_class: str


def start_servers(processes: Processes, workdir: Path, loop_name: str) -> Servers:
    """Start the direct server, our server with our forwarder, and our server alone."""
    direct = processes.start(
        "direct",
        [sys.executable, __file__, "--role", "direct-server", "--loop", loop_name],
        stdout=subprocess.PIPE,
    )
    handoff_path = workdir / "handoff.sock"
    forwarder = processes.start("forwarder", program_argv(loop_name, "forwarder", "--handoff", str(handoff_path), "--drain-timeout", "1"))
    server_events = EventFile(workdir / "server-handoff.jsonl")
    server = processes.start(
        "server-handoff",
        program_argv(
            loop_name, "server", "--listen", "127.0.0.1:0", "--handoff", str(handoff_path),
            "--drain-timeout", "1", "--events", str(server_events.path),
        ),
    )
    # A second pair with the older ownership rule, to measure what the lossless rule costs.
    taken_path = workdir / "handoff-taken.sock"
    taken_forwarder = processes.start("forwarder-taken", program_argv(loop_name, "forwarder", "--handoff", str(taken_path), "--drain-timeout", "1"))
    taken_events = EventFile(workdir / "server-taken.jsonl")
    taken_server = processes.start(
        "server-taken",
        program_argv(
            loop_name, "server", "--listen", "127.0.0.1:0", "--handoff", str(taken_path), "--ownership", "taken",
            "--drain-timeout", "1", "--events", str(taken_events.path),
        ),
    )
    # The fallback server's handoff path never exists, so it serves every connection itself.
    fallback_events = EventFile(workdir / "server-fallback.jsonl")
    fallback = processes.start(
        "server-fallback",
        program_argv(
            loop_name, "server", "--listen", "127.0.0.1:0", "--handoff", str(workdir / "no-forwarder.sock"),
            "--drain-timeout", "1", "--events", str(fallback_events.path),
        ),
    )

    ports = {}
    try:
        direct_info = read_json_line(direct, STARTUP_TIMEOUT)
        ports[ROW_DIRECT] = direct_info["port"]
        ports[ROW_HANDOFF] = port_of(server_events.wait_for("listening", server))
        server_events.wait_for("channel_up", server)
        ports[ROW_FALLBACK] = port_of(fallback_events.wait_for("listening", fallback))
        ports[ROW_TAKEN] = port_of(taken_events.wait_for("listening", taken_server))
        taken_events.wait_for("channel_up", taken_server)
    except BenchmarkError as exc:
        logs = "\n".join(f"--- {name}.log:\n{processes.log_tail(name)}" for name, _ in processes.started)
        raise BenchmarkError(f"a server did not start: {exc}\n{logs}") from None
    if forwarder.poll() is not None:
        raise BenchmarkError(f"forwarder exited with status {forwarder.returncode}:\n{processes.log_tail('forwarder')}")
    pids = {
        ROW_DIRECT: (direct.pid,),
        ROW_HANDOFF: (server.pid, forwarder.pid),
        ROW_FALLBACK: (fallback.pid,),
        ROW_TAKEN: (taken_server.pid, taken_forwarder.pid),
    }
    return Servers(ports, pids, server_events, direct_info["loop_class"])


def port_of(listening: dict) -> int:
    """Return the port of a server's ``listening`` event address, such as 127.0.0.1:40123."""
    return int(listening["addr"].rsplit(":", 1)[1])


# Measurements.


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """Return the user plus system CPU time that the processes have used so far, from /proc/PID/stat."""
    total_ticks = 0
    for pid in pids:
        # Fields after the parenthesised command name: utime and stime are the 12th and 13th.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    """Return the nearest-rank percentile, the method that our client's summary uses."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


def pingpong_placements() -> dict[str, tuple[set[int], set[int]] | None]:
    """Return the CPU sets of process A and B for each ping-pong placement; None leaves both unpinned.

    On a VM a wakeup across CPUs can cost much more than a switch on one CPU. The
    unpinned result therefore depends on where the scheduler puts the two processes, and
    the pinned placements show both ends of that range.
    """
    placements: dict[str, tuple[set[int], set[int]] | None] = {PLACEMENT_UNPINNED: None}
    cpus = sorted(os.sched_getaffinity(0))
    placements["same CPU"] = ({cpus[0]}, {cpus[0]})
    if len(cpus) >= 2:
        placements["different CPUs"] = ({cpus[0]}, {cpus[1]})
    return placements


def measure_pingpong(processes: Processes, count: int, name: str, cpus: tuple[set[int], set[int]] | None) -> list[float]:
    """Time ``count`` raw fd ping-pongs between this process and a peer; return microseconds each.

    The fd sent is an accepted TCP socket on 127.0.0.1, the kind of fd the server hands
    off. Both ends use blocking sockets. ``cpus`` pins this process and the peer to the
    given CPU sets for the measurement.
    """
    own_cpus = os.sched_getaffinity(0)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = processes.start(
        name,
        [sys.executable, __file__, "--role", "pingpong-peer", "--fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [accepted.fileno()]))]
    times_us = []
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus[0])
            os.sched_setaffinity(peer.pid, cpus[1])
        for index in range(PINGPONG_WARMUP + count):
            started = time.perf_counter_ns()
            ours.sendmsg([b"o"], control)
            if ours.recv(1) != b"k":
                raise BenchmarkError(f"ping-pong peer pid {peer.pid} sent no reply byte:\n{processes.log_tail(name)}")
            if index >= PINGPONG_WARMUP:
                times_us.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.sched_setaffinity(0, own_cpus)
        ours.close()
        accepted.close()
        client.close()
        try:
            peer.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.kill(peer.pid, signal.SIGKILL)
            peer.wait()
    return times_us


def run_client(loop_name: str, port: int, count: int, concurrency: int, timeout: float) -> dict:
    """Run our client against ``port`` and return its ``--json`` summary."""
    argv = program_argv(loop_name, "client", "--connect", f"127.0.0.1:{port}", "--count", str(count), "--concurrency", str(concurrency), "--json")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"client run of {count} connections at concurrency {concurrency} on port {port} timed out after {timeout:g} s") from None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if not lines:
        raise BenchmarkError(f"client exited with status {done.returncode} and printed no summary:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(lines[-1])


def collect_round_trips(servers: Servers, expected: int, timeout: float = 2.0) -> list[float]:
    """Return the ``latency_ms`` of the handoff server's new ``taken`` events, in microseconds.

    Waits up to ``timeout`` seconds for ``expected`` of them, because the server may log
    a TAKEN shortly after the forwarder's reply reached the client.
    """
    round_trips: list[float] = []
    deadline = time.monotonic() + timeout
    while True:
        round_trips += [event["latency_ms"] * 1000 for event in servers.handoff_events.read_new() if event.get("kind") == "taken"]
        if len(round_trips) >= expected or time.monotonic() >= deadline:
            return round_trips
        time.sleep(0.02)


@dataclass
class RowRuns:
    """The client summaries of one row at one concurrency, one per round."""

    summaries: list[dict] = field(default_factory=list)
    # Per round: OFFER->TAKEN round trips in microseconds (handoff row only).
    round_trips: list[list[float]] = field(default_factory=list)
    # Per round: CPU time of the serving processes per connection, in microseconds.
    cpu_per_connection_us: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Everything measured in one benchmark run."""

    rows: dict[tuple[str, int], RowRuns]
    # Per placement, per round: raw ping-pong times in microseconds.
    pingpong: dict[str, list[list[float]]] = field(default_factory=dict)
    rounds_done: int = 0
    complete: bool = True


def run_rounds(processes: Processes, servers: Servers, args: argparse.Namespace, deadline: float) -> Results:
    """Run every row at every concurrency once per round, rotating the row order each round."""
    rows = [ROW_DIRECT, ROW_HANDOFF, ROW_FALLBACK, ROW_TAKEN]
    results = Results(rows={(row, c): RowRuns() for row in rows for c in CONCURRENCIES})
    client_timeout = max(30.0, args.count / 50)

    for row in rows:
        run_client(args.loop, servers.ports[row], WARMUP_COUNT, max(CONCURRENCIES), client_timeout)
    servers.handoff_events.read_new()

    for round_number in range(args.rounds):
        if time.monotonic() >= deadline:
            results.complete = False
            break
        for placement, cpus in pingpong_placements().items():
            name = f"pingpong-{round_number + 1}-{placement.replace(' ', '-')}"
            results.pingpong.setdefault(placement, []).append(measure_pingpong(processes, args.pingpong_count, name, cpus))
        results.rounds_done += 1
        order = rows[round_number % len(rows):] + rows[: round_number % len(rows)]
        for concurrency in CONCURRENCIES:
            for row in order:
                if time.monotonic() >= deadline:
                    results.complete = False
                    break
                cpu_before = cpu_seconds(servers.pids[row])
                summary = run_client(args.loop, servers.ports[row], args.count, concurrency, client_timeout)
                cpu_used = cpu_seconds(servers.pids[row]) - cpu_before
                runs = results.rows[(row, concurrency)]
                runs.summaries.append(summary)
                runs.cpu_per_connection_us.append(cpu_used / args.count * 1e6)
                if row == ROW_HANDOFF:
                    runs.round_trips.append(collect_round_trips(servers, summary["answered_by_forwarder"]))
                print(
                    f"  round {round_number + 1}/{args.rounds}  c={concurrency:<3} {row:<9}"
                    f" {summary['connections_per_s']:>8} conn/s  p50 {summary['latency_ms']['p50']} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# Report.


def cpu_pressure() -> str:
    """Return the kernel's CPU pressure (PSI) as "avg10=... avg60=...", or "unavailable"."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                return " ".join(line.split()[1:3])
    except OSError:
        pass
    return "unavailable"


def format_load() -> str:
    """Format the 1, 5 and 15 minute load averages and the CPU pressure as one string."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{load}, CPU pressure {cpu_pressure()}"


def machine_details(loop_name: str, direct_loop_class: str, load_at_start: str) -> list[str]:
    """Return lines that describe the machine, the Python and the event loop of this run."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    loop_line = f"event loop:   {loop_name} ({direct_loop_class} in the direct server)"
    if loop_name == "uvloop":
        import uvloop

        loop_line += f", uvloop {uvloop.__version__}"
    return [
        f"nproc:        {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable by this process",
        f"CPU model:    {model}",
        f"kernel:       {platform.system()} {platform.release()} {platform.machine()}",
        f"Python:       {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        loop_line,
        f"load average: {load_at_start} at the start; {format_load()} at the end (1, 5, 15 min; PSI % of time some task waited for a CPU)",
    ]


def median_of(values: list[float]) -> float | None:
    """Return the median of the values that are not None, or None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def format_number(value: float | None, digits: int = 1) -> str:
    """Format a number with ``digits`` decimals, or "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def round_trip_row(label: str, per_round: list[list[float]]) -> tuple[str, float | None]:
    """Format one line of table (a) from each round's round trips in microseconds; also return its median p50."""
    per_round = [times for times in per_round if times]
    p50s = [percentile(times, 50) for times in per_round]
    p50 = median_of(p50s)
    p99 = median_of([percentile(times, 99) for times in per_round])
    spread = f"({min(p50s):.0f}-{max(p50s):.0f})" if p50s else ""
    count = len(per_round[0]) if per_round else 0
    return f"  {label:<48} {format_number(p50):>8} {spread:>13} {format_number(p99):>8} {count:>14}", p50


def round_trip_lines(results: Results) -> tuple[list[str], float | None, float | None]:
    """Return the lines of table (a) and the p50s of the handoff at concurrency 1 and of the unpinned ping-pong."""
    lines = [
        "(a) fd handoff round trip, microseconds (median over rounds of each round's p50 and p99; p50 range in brackets)",
        f"  {'path':<48} {'p50':>8} {'(min-max)':>13} {'p99':>8} {'samples/round':>14}",
    ]
    pingpong_p50 = None
    for placement, per_round in results.pingpong.items():
        line, p50 = round_trip_row(f"raw socketpair ping-pong, 1 fd, {placement}", per_round)
        lines.append(line)
        if placement == PLACEMENT_UNPINNED:
            pingpong_p50 = p50
    handoff_p50 = None
    for concurrency in CONCURRENCIES:
        label = f"OFFER->TAKEN (server taken.latency_ms), c={concurrency}"
        line, p50 = round_trip_row(label, results.rows[(ROW_HANDOFF, concurrency)].round_trips)
        lines.append(line)
        if concurrency == 1:
            handoff_p50 = p50
    return lines, handoff_p50, pingpong_p50


def throughput_lines(results: Results, count: int) -> tuple[list[str], dict[tuple[str, int], float | None]]:
    """Return the lines of table (b) and the median connections per second of each row and concurrency."""
    # /proc counts CPU time in clock ticks, which limits the resolution per connection.
    resolution_us = 1e6 / os.sysconf("SC_CLK_TCK") / count
    lines = [
        "(b) client view: connections/s and latency in ms (median of rounds; conn/s range in brackets),",
        "    and CPU time of the serving processes per connection (server and forwarder together for the handoff row;",
        f"    resolution {resolution_us:.1f} us)",
        f"  {'server':<36} {'c':>3} {'conn/s':>8} {'(min-max)':>15} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/conn':>12}  answered by server/forwarder, failed",
    ]
    rates: dict[tuple[str, int], float | None] = {}
    for concurrency in CONCURRENCIES:
        for row in (ROW_DIRECT, ROW_HANDOFF, ROW_TAKEN, ROW_FALLBACK):
            runs = results.rows[(row, concurrency)]
            summaries = runs.summaries
            per_round_rates = [summary["connections_per_s"] for summary in summaries]
            rate = median_of(per_round_rates)
            rates[(row, concurrency)] = rate
            p50 = median_of([summary["latency_ms"]["p50"] for summary in summaries])
            p99 = median_of([summary["latency_ms"]["p99"] for summary in summaries])
            by_server = sum(summary["answered_by_server"] for summary in summaries)
            by_forwarder = sum(summary["answered_by_forwarder"] for summary in summaries)
            failed = sum(summary["failed"] for summary in summaries)
            cpu_per_connection = median_of(runs.cpu_per_connection_us)
            spread = f"({min(per_round_rates):.0f}-{max(per_round_rates):.0f})" if per_round_rates else ""
            lines.append(
                f"  {ROW_TITLES[row]:<38} {concurrency:>3} {format_number(rate, 0):>8} {spread:>15}"
                f" {format_number(p50, 3):>8} {format_number(p99, 3):>8} {format_number(cpu_per_connection, 0):>12}"
                f"  {by_server}/{by_forwarder}, {failed}"
            )
    return lines, rates


def ratio_line(label: str, numerator: float | None, denominator: float | None, target: str, passes) -> str:
    """Format one ratio with its target and whether it is met."""
    if numerator is None or not denominator:
        return f"  {label:<62} n/a    (target {target})"
    ratio = numerator / denominator
    verdict = "met" if passes(ratio) else "NOT met"
    return f"  {label:<62} {ratio:5.2f}  (target {target}: {verdict})"


def ratio_lines(rates: dict[tuple[str, int], float | None], handoff_p50: float | None, pingpong_p50: float | None) -> list[str]:
    """Return the lines of the ratios that the targets are about."""
    lines = ["ratios"]
    for concurrency in CONCURRENCIES:
        lines.append(
            ratio_line(
                f"handoff conn/s / direct conn/s, c={concurrency}",
                rates[(ROW_HANDOFF, concurrency)],
                rates[(ROW_DIRECT, concurrency)],
                f">= {TARGET_RATE_RATIO}",
                lambda ratio: ratio >= TARGET_RATE_RATIO,
            )
        )
    for concurrency in CONCURRENCIES:
        lines.append(
            ratio_line(
                f"lossless (done) conn/s / taken-rule conn/s, c={concurrency}",
                rates[(ROW_HANDOFF, concurrency)],
                rates.get((ROW_TAKEN, concurrency)),
                f">= {TARGET_LOSSLESS_RATIO}",
                lambda ratio: ratio >= TARGET_LOSSLESS_RATIO,
            )
        )
    lines.append(
        ratio_line(
            f"handoff round trip p50 (c=1) / raw ping-pong p50 ({PLACEMENT_UNPINNED})",
            handoff_p50,
            pingpong_p50,
            f"<= {TARGET_ROUND_TRIP_RATIO}",
            lambda ratio: ratio <= TARGET_ROUND_TRIP_RATIO,
        )
    )
    return lines


def print_report(results: Results, args: argparse.Namespace, servers: Servers, elapsed: float, load_at_start: str) -> None:
    """Print tables (a) and (b), the target ratios and the machine details."""
    print()
    print(f"takeover-console handoff benchmark: {args.count} connections per client run, {results.rounds_done} of {args.rounds} rounds, {elapsed:.0f} s")
    print("our server writes events to a file (needed for its port and latency_ms); the forwarder runs with default options (no events)")
    if not results.complete:
        print(f"NOTE: the time limit of {args.time_limit:g} s cut the run short; medians cover the runs that finished")

    table_a, handoff_p50, pingpong_p50 = round_trip_lines(results)
    table_b, rates = throughput_lines(results, args.count)
    for section in (table_a, table_b, ratio_lines(rates, handoff_p50, pingpong_p50)):
        print()
        print("\n".join(section))

    print()
    print("machine")
    for line in machine_details(args.loop, servers.direct_loop_class, load_at_start):
        print(f"  {line}")


# Command line.


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of the benchmark's options and of the hidden ones of its helper processes."""
    parser = argparse.ArgumentParser(description="Measure the fd handoff round trip and connection rates of takeover-console against raw and direct baselines.")
    parser.add_argument("--count", type=int, default=None, help=f"connections per client run (default: {DEFAULT_COUNT}, {QUICK_COUNT} with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds of every row; the report shows the median (default: {DEFAULT_ROUNDS}, {QUICK_ROUNDS} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a short smoke run: {QUICK_COUNT} connections, {QUICK_ROUNDS} round")
    parser.add_argument("--pingpong-count", type=int, default=PINGPONG_COUNT, help=f"raw fd ping-pongs timed per round (default: {PINGPONG_COUNT})")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop of every server, forwarder and client process (default: asyncio)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help=f"seconds after which no new run starts (default: {DEFAULT_TIME_LIMIT:g})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with the logs and event files")
    parser.add_argument("--role", choices=["pingpong-peer", "direct-server", "program"], help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("program_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    """Run the benchmark, or one of its helper processes with --role."""
    parser = build_parser()
    args = parser.parse_args()
    if args.role is not None:
        if args.program_args[:1] == ["--"]:
            args.program_args = args.program_args[1:]
        return run_role(args)
    if args.program_args:
        parser.error(f"unexpected arguments: {' '.join(args.program_args)}")
    if args.count is None:
        args.count = QUICK_COUNT if args.quick else DEFAULT_COUNT
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if args.count < 1 or args.rounds < 1 or args.pingpong_count < 1:
        parser.error(f"invalid --count {args.count}, --rounds {args.rounds} or --pingpong-count {args.pingpong_count}: each must be 1 or more")
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            parser.error("--loop uvloop: uvloop is not installed in this Python; install it with: .venv/bin/pip install uvloop")

    started = time.monotonic()
    load_at_start = format_load()
    workdir = Path(tempfile.mkdtemp(prefix="tc-bench-"))
    processes = Processes(workdir)
    failed = True
    try:
        servers = start_servers(processes, workdir, args.loop)
        print(f"servers up (direct {servers.ports[ROW_DIRECT]}, handoff {servers.ports[ROW_HANDOFF]}, fallback {servers.ports[ROW_FALLBACK]}); logs in {workdir}", file=sys.stderr, flush=True)
        results = run_rounds(processes, servers, args, started + args.time_limit)
        print_report(results, args, servers, time.monotonic() - started, load_at_start)
        failed = False
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        if failed or args.keep:
            print(f"logs and event files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

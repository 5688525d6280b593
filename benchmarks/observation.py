"""Measure the CPU time of the observation layer while the workers serve 500 connections per second.

Run from the repository root::

    .venv/bin/python benchmarks/observation.py [--seconds 20] [--rounds 1] [--rate 500]

Each run starts a LiveSession in this process, as the console does. The server, forwarder
and client run as worker processes. This process reads their JSON-line events from pipes,
runs the fd-table sampler on a thread of the default executor and folds every observation
into the SessionModel. The window starts ``--warmup`` seconds after all three
workers run and lasts ``--seconds`` seconds. Over it, the script measures:

- the CPU time of this process (user plus system, from getrusage(RUSAGE_SELF), so every
  thread counts, the sampler's included) as a percentage of one core;
- the same split by thread, from /proc/self/task: the event loop's main thread, the
  default executor's thread, where the sampler ticks, and the rest, mostly the
  short-lived threads that read socket tables during a tick;
- the time spent inside LiveSession.observe() and observe_many(), which queue observations
  for the model;
- observations per second by type, and connections per second from the client's
  ``answered`` events;
- the sampler's tick time (Sample.elapsed_ms), p50 and p99;
- the CPU time of each worker process, from /proc/PID/stat, because the workers share
  the machine's cores with this process;
- the TIME_WAIT entries of the network namespace at the start and end of the window:
  the sampler's TCP dumps cost more the more there are, and each run leaves up to 60 s
  worth (30,000 at 500 connections per second) for the runs after it.

The variants split the cost. ``full`` is what the console runs. ``no-sampler`` sets the
sample interval so long that no tick happens. ``recorder`` adds a Recorder. ``parse-only``
also runs without the sampler, and replaces SessionModel.apply with a no-op, so only the
reading and JSON parsing of events remain. Each round runs every variant once, in an
order rotated by round, and the report shows medians over rounds with their range.

The sampler's cost with many open connections is measured by benchmarks/sampler.py
(2,000 TCP connections over three processes). The workers here hold only the few
connections that are in flight.

Everything listens on 127.0.0.1 with port 0. Each LiveSession stops its workers by pid
when the run ends (SIGTERM, then SIGKILL), and the script checks that none is left.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from takeover_console.observations import EVENT, SAMPLE  # noqa: E402
from takeover_console.session import CLIENT, FORWARDER, SERVER, LiveSession, SessionConfig  # noqa: E402
from takeover_console.stats import percentile  # noqa: E402
from takeover_console.workers import WorkerState  # noqa: E402

DEFAULT_SECONDS = 20.0
DEFAULT_WARMUP = 3.0
DEFAULT_RATE = 500.0
DEFAULT_CONCURRENCY = 32
DEFAULT_ROUNDS = 1
CONSOLE_SAMPLE_INTERVAL = SessionConfig.sample_interval
# With this interval the sampler's loop waits longer than any run lasts, so it never ticks.
SAMPLER_OFF_INTERVAL = 1e6
READY_TIMEOUT = 15.0
# Seconds to wait for a worker's pid to disappear after the session closed.
EXIT_CHECK_TIMEOUT = 5.0
TARGET_CPU_PERCENT = 10.0
WORKERS = (SERVER, FORWARDER, CLIENT)
# asyncio names the threads of its default executor asyncio_0, asyncio_1, ...
EXECUTOR_THREAD_PREFIX = "asyncio_"


class BenchmarkError(Exception):
    """A run failed: a worker did not start, or one was left running."""


# Machine details.


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


def machine_lines(load_at_start: str) -> list[str]:
    """Return lines that describe the machine and the Python of this run."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"nproc:        {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable by this process",
        f"CPU model:    {model}",
        f"kernel:       {platform.system()} {platform.release()} {platform.machine()}",
        f"Python:       {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"load average: {load_at_start} at the start; {format_load()} at the end (1, 5, 15 min; PSI % of time some task waited for a CPU)",
    ]


# Measuring.


def own_cpu_seconds() -> float:
    """Return the user plus system CPU time of this process so far, all threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU time of a process from /proc/PID/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds() -> dict[int, float]:
    """Return the user plus system CPU time of each live thread of this process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for name in os.listdir("/proc/self/task"):
        try:
            text = Path(f"/proc/self/task/{name}/stat").read_text()
        except OSError:
            continue  # the thread ended after listdir()
        fields = text.rsplit(")", 1)[1].split()
        seconds[int(name)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def executor_thread_ids() -> set[int]:
    """Return the thread ids of the event loop's default executor, which runs the sampler's ticks."""
    return {thread.native_id for thread in threading.enumerate() if thread.name.startswith(EXECUTOR_THREAD_PREFIX)}


def time_wait_count() -> int:
    """Count the TIME_WAIT entries of this network namespace, from /proc/net/tcp and tcp6.

    Every TCP dump of the sampler walks past them, so its cost grows with this count.
    """
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}", "rb") as table:
                next(table, None)  # the header line
                count += sum(1 for line in table if line.split(None, 4)[3] == b"06")
        except OSError:
            pass
    return count


def pid_alive(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Probe:
    """A wrapper of LiveSession.observe and observe_many that counts observations, times the calls and keeps the sampler's tick times.

    The wrapper costs about 0.4 microseconds per observation (measured with a no-op
    observe() on the benchmark machine), which the CPU figures include.
    """

    def __init__(self, session: LiveSession):
        self._observe = session.observe
        session.observe = self.observe
        # Commits before 24ddb60 have no observe_many(); the probe then wraps observe() alone.
        self._observe_many = getattr(session, "observe_many", None)
        if self._observe_many is not None:
            session.observe_many = self.observe_many
        self.counts: Counter[str] = Counter()
        self.answered = 0
        self.failed = 0
        self.observe_seconds = 0.0
        self.tick_ms: list[float] = []

    def observe(self, observation: dict) -> None:
        started = time.perf_counter()
        self._observe(observation)
        self.observe_seconds += time.perf_counter() - started
        self._count(observation)

    def observe_many(self, observations: list[dict]) -> None:
        started = time.perf_counter()
        self._observe_many(observations)
        self.observe_seconds += time.perf_counter() - started
        for observation in observations:
            self._count(observation)

    def _count(self, observation: dict) -> None:
        kind = observation.get("type")
        self.counts[kind] += 1
        if kind == EVENT:
            event_kind = observation["event"].get("kind")
            if event_kind == "answered":
                self.answered += 1
            elif event_kind == "failed":
                self.failed += 1
        elif kind == SAMPLE:
            self.tick_ms.append(observation["sample"].get("elapsed_ms", 0.0))


@dataclass
class Snapshot:
    """The counters of one moment, so that a window is the difference of two snapshots."""

    mono: float
    cpu_seconds: float
    worker_cpu_seconds: dict[str, float | None]
    counts: Counter
    answered: int
    failed: int
    observe_seconds: float
    ticks: int
    thread_cpu_seconds: dict[int, float]
    executor_threads: set[int]

    @classmethod
    def take(cls, probe: Probe, pids: dict[str, int]) -> Snapshot:
        return cls(
            mono=time.monotonic(),
            cpu_seconds=own_cpu_seconds(),
            thread_cpu_seconds=thread_cpu_seconds(),
            executor_threads=executor_thread_ids(),
            worker_cpu_seconds={name: process_cpu_seconds(pid) for name, pid in pids.items()},
            counts=Counter(probe.counts),
            answered=probe.answered,
            failed=probe.failed,
            observe_seconds=probe.observe_seconds,
            ticks=len(probe.tick_ms),
        )


@dataclass
class Window:
    """The measurements of one run, from the end of its warm-up to the end of the run."""

    seconds: float
    cpu_percent: float
    # The CPU by thread: "main" is the event loop, and "sampler" the default executor, where
    # the sampler ticks. "other" is the rest, mostly the short-lived threads that read socket
    # tables during a tick and have ended by the end of the window.
    thread_percent: dict[str, float]
    observe_percent: float
    per_second: dict[str, float]
    answered_per_second: float
    failed: int
    tick_ms: list[float]
    worker_cpu_percent: dict[str, float | None]
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def between(cls, start: Snapshot, end: Snapshot, probe: Probe) -> Window:
        seconds = end.mono - start.mono
        workers = {}
        for name, before in start.worker_cpu_seconds.items():
            after = end.worker_cpu_seconds.get(name)
            workers[name] = None if before is None or after is None else 100.0 * (after - before) / seconds
        cpu_percent = 100.0 * (end.cpu_seconds - start.cpu_seconds) / seconds

        def thread_percent(thread_ids: set[int]) -> float:
            used = sum(end.thread_cpu_seconds[tid] - start.thread_cpu_seconds.get(tid, 0.0) for tid in thread_ids if tid in end.thread_cpu_seconds)
            return 100.0 * used / seconds

        main = thread_percent({os.getpid()})
        sampler = thread_percent(end.executor_threads)
        return cls(
            seconds=seconds,
            cpu_percent=cpu_percent,
            # Per-thread times come in clock ticks, so the remainder can come out a little below zero.
            thread_percent={"main": main, "sampler": sampler, "other": max(0.0, cpu_percent - main - sampler)},
            observe_percent=100.0 * (end.observe_seconds - start.observe_seconds) / seconds,
            per_second={kind: (end.counts[kind] - start.counts[kind]) / seconds for kind in set(end.counts) | set(start.counts)},
            answered_per_second=(end.answered - start.answered) / seconds,
            failed=end.failed - start.failed,
            tick_ms=probe.tick_ms[start.ticks : end.ticks],
            worker_cpu_percent=workers,
        )


async def wait_until_running(session: LiveSession, timeout: float = READY_TIMEOUT) -> dict[str, int]:
    """Wait until the supervisor reports all three workers running, then return their pids by name."""
    deadline = time.monotonic() + timeout
    while True:
        workers = session.supervisor.workers
        if all(name in workers and workers[name].state is WorkerState.RUNNING for name in WORKERS):
            return {name: workers[name].pid for name in WORKERS}
        if time.monotonic() > deadline:
            states = {name: workers[name].state.value for name in workers}
            raise BenchmarkError(f"the workers were not all running within {timeout:g} s: {states}")
        await asyncio.sleep(0.02)


async def measure_window(session: LiveSession, probe: Probe, warmup: float, seconds: float) -> tuple[Window, dict[str, int]]:
    """Wait for the workers and ``warmup`` seconds, then measure for ``seconds``.

    Return the window and the worker pids.
    """
    pids = await wait_until_running(session)
    await asyncio.sleep(warmup)
    time_wait_at_start = time_wait_count()
    start = Snapshot.take(probe, pids)
    await asyncio.sleep(seconds)
    end = Snapshot.take(probe, pids)
    window = Window.between(start, end, probe)
    window.extra["TIME_WAIT at start"] = time_wait_at_start
    window.extra["TIME_WAIT at end"] = time_wait_count()
    return window, pids


async def check_workers_gone(pids: dict[str, int], timeout: float = EXIT_CHECK_TIMEOUT) -> None:
    """Raise BenchmarkError when a worker pid is still alive ``timeout`` seconds after its session closed."""
    deadline = time.monotonic() + timeout
    while True:
        left = {name: pid for name, pid in pids.items() if pid_alive(pid)}
        if not left:
            return
        if time.monotonic() > deadline:
            raise BenchmarkError(f"workers still running {timeout:g} s after the session closed: {left}")
        await asyncio.sleep(0.05)


# Variants.


@dataclass(frozen=True)
class Variant:
    """One configuration of the observation layer."""

    name: str
    title: str
    sampler: bool
    recorder: bool
    fold: bool


VARIANTS = [
    Variant("full", f"sampler every {CONSOLE_SAMPLE_INTERVAL:g} s, model, no recorder (the console's default)", sampler=True, recorder=False, fold=True),
    Variant("no-sampler", "model only, sampler off", sampler=False, recorder=False, fold=True),
    Variant("recorder", f"sampler every {CONSOLE_SAMPLE_INTERVAL:g} s, model and a Recorder", sampler=True, recorder=True, fold=True),
    Variant("parse-only", "events read and parsed, SessionModel.apply a no-op, sampler off", sampler=False, recorder=False, fold=False),
]


async def run_variant(variant: Variant, args: argparse.Namespace, workdir: Path) -> Window:
    """Run one LiveSession in this process with ``variant`` and return its window."""
    record = workdir / f"{variant.name}.jsonl" if variant.recorder else None
    config = SessionConfig(
        listen="127.0.0.1:0",
        handoff=workdir / f"{variant.name}.sock",
        client_rate=args.rate,
        client_concurrency=args.concurrency,
        sample_interval=CONSOLE_SAMPLE_INTERVAL if variant.sampler else SAMPLER_OFF_INTERVAL,
        record=record,
    )
    session = LiveSession(config)
    probe = Probe(session)
    if not variant.fold:
        session.model.apply = lambda observation: None
    pids: dict[str, int] = {}
    try:
        await session.start()
        window, pids = await measure_window(session, probe, args.warmup, args.seconds)
    finally:
        pids = pids or {name: worker.pid for name, worker in session.supervisor.workers.items() if worker.pid is not None}
        await session.close()
    await check_workers_gone(pids)
    if record is not None:
        window.extra["recorded MB"] = record.stat().st_size / 1e6
        record.unlink()
    return window


# Report.


def median_range(values: list[float], digits: int = 1) -> str:
    """Format the median of ``values`` with the range in brackets."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def format_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def window_line(variant: Variant, window: Window) -> str:
    """Format one run's window as a line of progress output."""
    threads = window.thread_percent
    workers = ", ".join(f"{name} {format_ms(percent)}%" for name, percent in window.worker_cpu_percent.items())
    return (
        f"  {variant.name:<11} CPU {window.cpu_percent:5.1f}% of a core (main thread {threads['main']:.1f}%, sampler thread {threads['sampler']:.1f}%,"
        f" other threads {threads['other']:.1f}%; inside observe() {window.observe_percent:.1f}%),"
        f" {window.per_second.get(EVENT, 0):.0f} events/s, {window.answered_per_second:.0f} conn/s answered,"
        f" {len(window.tick_ms)} ticks, TIME_WAIT entries {window.extra['TIME_WAIT at start']:,.0f} to {window.extra['TIME_WAIT at end']:,.0f}; workers: {workers}"
    )


def report_lines(results: dict[str, list[Window]], args: argparse.Namespace) -> list[str]:
    """Return the tables of medians, the cost split and the verdict on the target."""
    variants = [variant for variant in VARIANTS if results.get(variant.name)]
    lines = [
        f"this process's CPU over a {args.seconds:g} s window, % of one core (median over {args.rounds} round(s), range in brackets)",
        f"  {'variant':<11} {'whole process':>18} {'main thread':>18} {'sampler thread':>18} {'other threads':>18} {'inside observe()':>18}",
    ]
    medians: dict[tuple[str, str], float] = {}
    for variant in variants:
        windows = results[variant.name]
        columns = {
            "cpu": [window.cpu_percent for window in windows],
            "main": [window.thread_percent["main"] for window in windows],
            "sampler": [window.thread_percent["sampler"] for window in windows],
            "other": [window.thread_percent["other"] for window in windows],
            "observe": [window.observe_percent for window in windows],
        }
        for key, values in columns.items():
            medians[(variant.name, key)] = statistics.median(values)
        lines.append(f"  {variant.name:<11} " + " ".join(f"{median_range(values):>18}" for values in columns.values()))
    lines.append("  main thread: the event loop (pipe reads, JSON parsing, folding, recording); sampler thread: the")
    lines.append("  default executor, where the sampler ticks; other threads: the rest, mostly the short-lived")
    lines.append("  threads that read socket tables during a tick. observe() is wall time inside LiveSession.observe()")
    lines.append("  and observe_many(), which queue observations; the model folds them later, on the main thread.")

    lines.append("")
    lines.append("throughput and sampler ticks (medians over rounds; tick times pooled over rounds)")
    lines.append(f"  {'variant':<11} {'events/s':>9} {'conn/s':>7} {'failed':>6} {'ticks/s':>8} {'tick p50 ms':>11} {'tick p99 ms':>11}  description")
    for variant in variants:
        windows = results[variant.name]
        ticks = [tick for window in windows for tick in window.tick_ms]
        lines.append(
            f"  {variant.name:<11} {statistics.median(window.per_second.get(EVENT, 0) for window in windows):9.0f}"
            f" {statistics.median(window.answered_per_second for window in windows):7.0f}"
            f" {sum(window.failed for window in windows):6d}"
            f" {statistics.median(window.per_second.get(SAMPLE, 0) for window in windows):8.1f}"
            f" {format_ms(percentile(ticks, 50)):>11} {format_ms(percentile(ticks, 99)):>11}  {variant.title}"
        )
        recorded = [window.extra["recorded MB"] / window.seconds for window in windows if "recorded MB" in window.extra]
        if recorded:
            lines.append(f"  {'':<11} the Recorder wrote {statistics.median(recorded):.2f} MB/s")
    workers = []
    for name in WORKERS:
        values = [window.worker_cpu_percent[name] for windows in results.values() for window in windows if window.worker_cpu_percent.get(name) is not None]
        workers.append(f"{name} {median_range(values)}%")
    lines.append(f"  worker processes over all runs, % of one core: {', '.join(workers)}")

    lines.append("")
    lines.append("cost split, % of one core (from the medians above)")
    splits = [
        ("reading and parsing events (parse-only, main thread)", [("parse-only", "main", 1)]),
        ("folding into the model (no-sampler minus parse-only, main thread)", [("no-sampler", "main", 1), ("parse-only", "main", -1)]),
        ("fd-table sampler (full, sampler and other threads)", [("full", "sampler", 1), ("full", "other", 1)]),
        ("Recorder (recorder minus full, main thread)", [("recorder", "main", 1), ("full", "main", -1)]),
    ]
    for label, terms in splits:
        if all((name, key) in medians for name, key, _ in terms):
            value = sum(sign * medians[(name, key)] for name, key, sign in terms)
            lines.append(f"  {label:<66} {value:5.1f}")

    if ("full", "cpu") in medians:
        full = medians[("full", "cpu")]
        verdict = "met" if full < TARGET_CPU_PERCENT else "NOT met"
        lines.append("")
        lines.append(f"target: the observation layer (variant full) under {TARGET_CPU_PERCENT:g}% of one core at {args.rate:g} connections/s: {full:.1f}% ({verdict})")
    return lines


# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure the CPU time that the console's observation layer (LiveSession, sampler, model, recorder) uses under load.")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"length of each measured window in seconds (default: {DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help=f"seconds between all workers running and the start of the window (default: {DEFAULT_WARMUP:g})")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help=f"client connections per second (default: {DEFAULT_RATE:g})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help=f"client connections open at once (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"runs of each variant; the report shows the median (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--variants", default=",".join(variant.name for variant in VARIANTS), help="comma-separated variants to run (default: all)")
    return parser


async def run_rounds(variants: list[Variant], args: argparse.Namespace, workdir: Path) -> dict[str, list[Window]]:
    """Run every variant once per round, rotating the order each round."""
    results: dict[str, list[Window]] = {variant.name: [] for variant in variants}
    for round_number in range(args.rounds):
        shift = round_number % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            window = await run_variant(variant, args, workdir)
            results[variant.name].append(window)
            print(f"round {round_number + 1}/{args.rounds}" + window_line(variant, window), file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600:
        parser.error(f"--seconds {args.seconds:g} is out of range; pass 1 to 600")
    if not 0 <= args.warmup <= 60:
        parser.error(f"--warmup {args.warmup:g} is out of range; pass 0 to 60")
    if not 1 <= args.rate <= 5000:
        parser.error(f"--rate {args.rate:g} is out of range; pass 1 to 5000")
    if not 1 <= args.concurrency <= 1000:
        parser.error(f"--concurrency {args.concurrency} is out of range; pass 1 to 1000")
    if not 1 <= args.rounds <= 10:
        parser.error(f"--rounds {args.rounds} is out of range; pass 1 to 10")
    by_name = {variant.name: variant for variant in VARIANTS}
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in by_name]
    if unknown or not names:
        parser.error(f"invalid --variants {args.variants!r}; expected names from {', '.join(by_name)}")
    variants = [by_name[name] for name in names]

    load_at_start = format_load()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tc-observation-"))
    try:
        results = asyncio.run(run_rounds(variants, args, workdir))
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"takeover-console observation benchmark: client at {args.rate:g} connections/s, concurrency {args.concurrency}, {time.monotonic() - started:.0f} s in all")
    print()
    print("\n".join(report_lines(results, args)))
    print()
    print("for the sampler's tick time with 2,000 open TCP connections, run benchmarks/sampler.py")
    print()
    print("machine")
    for line in machine_lines(load_at_start):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the console's own CPU time at 500 connections per second, and its time from launch to first frame.

Run from the repository root::

    .venv/bin/python benchmarks/console.py [--seconds 20] [--rounds 1] [--launches 5] [--only cpu|launch]

(a) CPU. Each row runs the same session as ``takeover-console --rate 500`` does: SessionConfig
    defaults (client concurrency 8, a sample every 0.25 s) with the client at ``--rate``.
    The window starts ``--warmup`` seconds after all three workers run and lasts
    ``--seconds`` seconds. The rows are:

    - ``session``: the LiveSession alone in this process, with no UI;
    - ``headless``: TakeoverApp over a LiveSession in this process, run with
      ``app.run_async(headless=True, size=(160, 48))``. Textual lays out and renders the
      widgets, but its headless driver does not turn frames into escape sequences and
      writes nothing;
    - ``pty``: the real command, ``takeover-console --listen 127.0.0.1:0 --rate 500``, in
      a 160x48 tmux pane, so frames are encoded and written to a pseudo-terminal.

    CPU is user plus system time of the process, all threads: getrusage(RUSAGE_SELF) for
    the in-process rows and /proc/PID/stat for the console in tmux. The console's own
    share is the difference to the ``session`` row. Each round runs every row once, in an
    order rotated by round, and the report shows medians over rounds with their range.

(b) Launch to first frame. The real command, ``takeover-console --listen 127.0.0.1:0``,
    starts in a new 120x40 tmux pane, and the script reads the screen with
    ``tmux capture-pane`` every 10 ms. It reports the time from just before
    ``tmux new-session`` until the first frame shows the Processes pane, and until that
    pane shows all three workers as running. Then it sends "q", waits for the console to
    exit and checks that none of the worker pids shown on the screen is left. Each
    capture starts a tmux client process, which competes with the console for the CPUs.

tmux runs on a private server socket (``tmux -L bench-<pid>``). Each session is killed by
its name at the end. A console or worker that is still running after "q" is reported as a
failure and then killed by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
# observation.py, next to this file, has the measuring helpers. Python puts the script's directory on sys.path.
from observation import (  # noqa: E402
    BenchmarkError,
    Probe,
    Snapshot,
    Window,
    check_workers_gone,
    format_load,
    machine_lines,
    measure_window,
    median_range,
    pid_alive,
    process_cpu_seconds,
    wait_until_running,
)

from takeover_console.app import TakeoverApp  # noqa: E402
from takeover_console.session import CLIENT, FORWARDER, SERVER, LiveSession, SessionConfig  # noqa: E402
from takeover_console.stats import percentile  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
COMMAND = REPOSITORY / ".venv" / "bin" / "takeover-console"
DEFAULT_SECONDS = 20.0
DEFAULT_WARMUP = 3.0
DEFAULT_RATE = 500.0
DEFAULT_ROUNDS = 1
DEFAULT_LAUNCHES = 5
CPU_SIZE = (160, 48)
LAUNCH_SIZE = (120, 40)
POLL_INTERVAL = 0.01
# Seconds for the console to show all three workers running, and to exit after "q".
LAUNCH_TIMEOUT = 15.0
QUIT_TIMEOUT = 10.0
TARGET_OWN_CPU_PERCENT = 10.0
TARGET_LAUNCH_SECONDS = 1.0
WORKERS = (SERVER, FORWARDER, CLIENT)
ROWS = ("session", "headless", "pty")

# A row of the Processes pane: role, pid, generation, state, then uptime, cpu, rss, fds, answered.
PROCESS_ROW = re.compile(r"^\s*(server|forwarder|client)\s+(\d+)\s+\d+\s+(\S+)(?:\s+\S+){4}\s+(\d+)\s*$")
PROCESS_ROW_START = re.compile(r"^\s*(server|forwarder|client)\s+(\d+)\s+\d+\s+(\S+)")


# Reading the console's screen.


@dataclass
class ProcessRow:
    """One worker as the Processes pane shows it."""

    pid: int
    state: str
    answered: int | None


def parse_processes(screen: str) -> dict[str, ProcessRow]:
    """Return the rows of the Processes pane found on a captured screen, by role.

    The panes are drawn side by side in boxes, so each screen line is split at the box
    edge "│" and every piece is matched on its own.
    """
    rows = {}
    for line in screen.splitlines():
        for piece in line.split("│"):
            full = PROCESS_ROW.match(piece)
            start = full or PROCESS_ROW_START.match(piece)
            if start is None:
                continue
            answered = int(full.group(4)) if full is not None else None
            rows[start.group(1)] = ProcessRow(pid=int(start.group(2)), state=start.group(3), answered=answered)
    return rows


def all_running(rows: dict[str, ProcessRow]) -> bool:
    return all(name in rows and rows[name].state == "running" for name in WORKERS)


class TmuxConsole:
    """The real console command in a detached tmux session on this script's private tmux server."""

    def __init__(self, name: str, command: list[str], size: tuple[int, int]):
        self.socket = f"bench-{os.getpid()}"
        self.name = name
        self.command = command
        self.size = size
        self.pid: int | None = None
        self.launched_mono = 0.0
        self.worker_pids: dict[str, int] = {}

    def tmux(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=False)
        if check and done.returncode != 0:
            raise BenchmarkError(f"tmux {' '.join(args)} failed with status {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> None:
        """Start the command in a new session and set ``launched_mono`` to the time just before."""
        width, height = self.size
        shell_command = "exec " + " ".join(shlex.quote(part) for part in self.command)
        self.launched_mono = time.monotonic()
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), shell_command)
        self.pid = int(self.tmux("display-message", "-p", "-t", self.name, "#{pane_pid}").strip())

    def capture(self) -> str | None:
        """Return the visible screen, or None when the session has ended."""
        done = subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, timeout=10, check=False)
        return done.stdout if done.returncode == 0 else None

    def server_pid(self) -> int | None:
        output = self.tmux("display-message", "-p", "-t", self.name, "#{pid}", check=False).strip()
        return int(output) if output.isdigit() else None

    def wait_for(self, predicate, timeout: float, description: str) -> tuple[float, str]:
        """Poll the screen until ``predicate(screen)`` holds, then return the seconds since launch and the screen."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            captured = self.capture()
            if captured is None:
                raise BenchmarkError(f"the console exited before {description}. Its last screen:\n{screen}")
            screen = captured
            if predicate(screen):
                return time.monotonic() - self.launched_mono, screen
            time.sleep(POLL_INTERVAL)
        raise BenchmarkError(f"the console did not reach {description} within {timeout:g} s. Its screen:\n{screen}")

    def wait_until_running(self, timeout: float = LAUNCH_TIMEOUT) -> dict[str, ProcessRow]:
        """Wait until the screen shows all three workers running, then store their pids and return their rows."""
        _, screen = self.wait_for(lambda text: all_running(parse_processes(text)), timeout, "all three workers running")
        rows = parse_processes(screen)
        self.worker_pids = {name: row.pid for name, row in rows.items()}
        return rows

    def quit(self) -> None:
        """Send "q", wait for the console to exit, and check that no worker it showed is left.

        Raises BenchmarkError when the console or a worker is still running. The caller's
        ``close()`` then kills them.
        """
        self.tmux("send-keys", "-t", self.name, "q", check=False)
        deadline = time.monotonic() + QUIT_TIMEOUT
        while self.pid is not None and pid_alive(self.pid):
            if time.monotonic() > deadline:
                raise BenchmarkError(f"console pid {self.pid} did not exit within {QUIT_TIMEOUT:g} s of q")
            time.sleep(0.05)
        asyncio.run(check_workers_gone(self.worker_pids))

    def close(self) -> None:
        """Kill the console and its workers by pid if still running, then kill the tmux session by its name."""
        for pid in [self.pid, *self.worker_pids.values()]:
            if pid is not None and pid_alive(pid):
                print(f"killing pid {pid}, still running at the end of a run", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
        self.tmux("kill-session", "-t", self.name, check=False)


# (a) CPU.


@dataclass
class CpuRun:
    """One row's window, and for the headless row the time spent in refresh_panes()."""

    cpu_percent: float
    answered_per_second: float
    tick_ms: list[float] = field(default_factory=list)
    refresh_percent: float | None = None
    refreshes_per_second: float | None = None
    tmux_percent: float | None = None


def session_config(rate: float, workdir: Path, name: str) -> SessionConfig:
    """Return the config that ``takeover-console --listen 127.0.0.1:0 --rate RATE`` runs."""
    return SessionConfig(listen="127.0.0.1:0", handoff=workdir / f"{name}.sock", client_rate=rate)


async def run_session_row(args: argparse.Namespace, workdir: Path) -> CpuRun:
    """Measure the LiveSession alone."""
    session = LiveSession(session_config(args.rate, workdir, "session"))
    probe = Probe(session)
    pids: dict[str, int] = {}
    try:
        await session.start()
        window, pids = await measure_window(session, probe, args.warmup, args.seconds)
    finally:
        pids = pids or {name: worker.pid for name, worker in session.supervisor.workers.items() if worker.pid is not None}
        await session.close()
    await check_workers_gone(pids)
    return CpuRun(window.cpu_percent, window.answered_per_second, window.tick_ms)


class RefreshTimer:
    """A wrapper of TakeoverApp.refresh_panes that adds up the time spent in it."""

    def __init__(self, app: TakeoverApp):
        self._refresh = app.refresh_panes
        app.refresh_panes = self.refresh_panes
        self.calls = 0
        self.seconds = 0.0

    def refresh_panes(self, force: bool = False) -> None:
        started = time.perf_counter()
        self._refresh(force)
        self.seconds += time.perf_counter() - started
        self.calls += 1


async def run_headless_row(args: argparse.Namespace, workdir: Path) -> CpuRun:
    """Measure TakeoverApp in Textual's headless mode over a LiveSession."""
    session = LiveSession(session_config(args.rate, workdir, "headless"))
    probe = Probe(session)
    app = TakeoverApp(session)
    timer = RefreshTimer(app)
    measured: dict[str, object] = {}

    async def drive() -> None:
        try:
            pids = await wait_until_running(session)
            measured["pids"] = pids
            await asyncio.sleep(args.warmup)
            start = Snapshot.take(probe, pids)
            calls, seconds = timer.calls, timer.seconds
            await asyncio.sleep(args.seconds)
            end = Snapshot.take(probe, pids)
            measured["refresh"] = (timer.calls - calls, timer.seconds - seconds)
            measured["window"] = Window.between(start, end, probe)
        except BaseException as exc:
            measured["error"] = exc
        finally:
            app.exit()

    driver = asyncio.create_task(drive(), name="benchmark-driver")
    try:
        await app.run_async(headless=True, size=CPU_SIZE)
    finally:
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        pids = measured.get("pids") or {name: worker.pid for name, worker in session.supervisor.workers.items() if worker.pid is not None}
        await session.close()
    if "error" in measured:
        raise measured["error"]
    if "window" not in measured:
        raise BenchmarkError(f"the headless app exited before the window ended (return code {app.return_code})")
    await check_workers_gone(pids)
    window: Window = measured["window"]
    calls, seconds = measured["refresh"]
    return CpuRun(
        window.cpu_percent,
        window.answered_per_second,
        window.tick_ms,
        refresh_percent=100.0 * seconds / window.seconds,
        refreshes_per_second=calls / window.seconds,
    )


def run_pty_row(args: argparse.Namespace, run_number: int) -> CpuRun:
    """Measure the real command in a tmux pane."""
    width, height = CPU_SIZE
    command = [str(COMMAND), "--listen", "127.0.0.1:0", "--rate", f"{args.rate:g}"]
    console = TmuxConsole(f"bench-{os.getpid()}-cpu-{run_number}", command, CPU_SIZE)
    try:
        console.start()
        console.wait_until_running()
        time.sleep(args.warmup)
        tmux_pid = console.server_pid()
        start_rows = parse_processes(console.capture() or "")
        start = (time.monotonic(), process_cpu_seconds(console.pid), process_cpu_seconds(tmux_pid) if tmux_pid else None)
        time.sleep(args.seconds)
        end = (time.monotonic(), process_cpu_seconds(console.pid), process_cpu_seconds(tmux_pid) if tmux_pid else None)
        end_rows = parse_processes(console.capture() or "")
        console.quit()
    finally:
        console.close()
    seconds = end[0] - start[0]
    if start[1] is None or end[1] is None:
        raise BenchmarkError(f"console pid {console.pid} exited during the window")
    answered = None
    if CLIENT in start_rows and CLIENT in end_rows and None not in (start_rows[CLIENT].answered, end_rows[CLIENT].answered):
        answered = (end_rows[CLIENT].answered - start_rows[CLIENT].answered) / seconds
    tmux_percent = None if None in (start[2], end[2]) else 100.0 * (end[2] - start[2]) / seconds
    return CpuRun(
        100.0 * (end[1] - start[1]) / seconds,
        answered if answered is not None else float("nan"),
        tmux_percent=tmux_percent,
    )


def run_cpu_rounds(args: argparse.Namespace, workdir: Path) -> dict[str, list[CpuRun]]:
    """Run every row once per round, rotating the order each round."""
    results: dict[str, list[CpuRun]] = {row: [] for row in ROWS}
    for round_number in range(args.rounds):
        shift = round_number % len(ROWS)
        for row in ROWS[shift:] + ROWS[:shift]:
            if row == "session":
                run = asyncio.run(run_session_row(args, workdir))
            elif row == "headless":
                run = asyncio.run(run_headless_row(args, workdir))
            else:
                run = run_pty_row(args, round_number + 1)
            results[row].append(run)
            extra = ""
            if run.refresh_percent is not None:
                extra = f", refresh_panes() {run.refresh_percent:.1f}% at {run.refreshes_per_second:.1f}/s"
            if run.tmux_percent is not None:
                extra = f", tmux server {run.tmux_percent:.1f}%"
            print(f"round {round_number + 1}/{args.rounds}  {row:<8} CPU {run.cpu_percent:5.1f}% of a core, {run.answered_per_second:5.0f} conn/s answered{extra}", file=sys.stderr, flush=True)
    return results


def cpu_report(results: dict[str, list[CpuRun]], args: argparse.Namespace) -> list[str]:
    """Return the lines of table (a) and the verdicts on its target."""
    width, height = CPU_SIZE
    lines = [
        f"(a) CPU at {args.rate:g} connections/s over a {args.seconds:g} s window, % of one core (median over {args.rounds} round(s), range in brackets)",
        f"  {'row':<9} {'CPU %':>18} {'conn/s':>7} {'tick p50 ms':>11} {'tick p99 ms':>11}  notes",
    ]
    titles = {
        "session": "LiveSession alone, no UI",
        "headless": f"TakeoverApp headless {width}x{height} over a LiveSession",
        "pty": f"takeover-console --rate {args.rate:g} in a {width}x{height} tmux pane",
    }
    medians = {}
    for row in ROWS:
        runs = results[row]
        if not runs:
            continue
        medians[row] = statistics.median(run.cpu_percent for run in runs)
        ticks = [tick for run in runs for tick in run.tick_ms]
        notes = titles[row]
        if row == "headless":
            notes += f"; refresh_panes() {median_range([run.refresh_percent for run in runs])}% at {statistics.median(run.refreshes_per_second for run in runs):.1f} calls/s"
        if row == "pty":
            tmux = [run.tmux_percent for run in runs if run.tmux_percent is not None]
            notes += f"; tmux server {median_range(tmux)}%"
        rates = [run.answered_per_second for run in runs if run.answered_per_second == run.answered_per_second]
        rate = f"{statistics.median(rates):.0f}" if rates else "n/a"
        tick_p50 = percentile(ticks, 50)
        tick_p99 = percentile(ticks, 99)
        lines.append(
            f"  {row:<9} {median_range([run.cpu_percent for run in runs]):>18} {rate:>7}"
            f" {'n/a' if tick_p50 is None else f'{tick_p50:.1f}':>11} {'n/a' if tick_p99 is None else f'{tick_p99:.1f}':>11}  {notes}"
        )
    if "session" in medians:
        for row in ("headless", "pty"):
            if row in medians:
                own = medians[row] - medians["session"]
                verdict = "met" if own <= TARGET_OWN_CPU_PERCENT else "NOT met"
                lines.append(f"  console's own CPU, {row} - session: {own:.1f}% of one core (target at most {TARGET_OWN_CPU_PERCENT:g}%: {verdict})")
    return lines


# (b) Launch to first frame.


@dataclass
class Launch:
    """The times of one launch, in seconds from just before tmux new-session."""

    first_frame: float
    all_running: float


def run_launch(run_number: int) -> Launch:
    """Start the console once, time its first frame and its three running workers, then quit it."""
    command = [str(COMMAND), "--listen", "127.0.0.1:0"]
    console = TmuxConsole(f"bench-{os.getpid()}-launch-{run_number}", command, LAUNCH_SIZE)
    try:
        console.start()
        first_frame, _ = console.wait_for(lambda screen: "Processes" in screen, LAUNCH_TIMEOUT, "its first frame")
        console.wait_until_running()
        running = time.monotonic() - console.launched_mono
        console.quit()
    finally:
        console.close()
    return Launch(first_frame, running)


def launch_report(launches: list[Launch]) -> list[str]:
    """Return the lines of table (b) and the verdict on its target."""
    width, height = LAUNCH_SIZE
    lines = [
        f"(b) launch to first frame, takeover-console --listen 127.0.0.1:0 in a {width}x{height} tmux pane, {len(launches)} launches, seconds",
        f"  {'until':<44} {'p50':>6} {'max':>6}  each launch",
    ]
    for label, values in (
        ("the first frame (Processes pane drawn)", [launch.first_frame for launch in launches]),
        ("all three workers shown as running", [launch.all_running for launch in launches]),
    ):
        each_launch = " ".join(f"{value:.2f}" for value in values)
        lines.append(f"  {label:<44} {percentile(values, 50):6.2f} {max(values):6.2f}  {each_launch}")
    slowest = max(launch.all_running for launch in launches)
    verdict = "met" if slowest < TARGET_LAUNCH_SECONDS else "NOT met"
    lines.append(f"  target: all three workers running on screen under {TARGET_LAUNCH_SECONDS:g} s: max {slowest:.2f} s ({verdict})")
    return lines


# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure the console's own CPU time under load and its time from launch to first frame.")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"length of each CPU window in seconds (default: {DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help=f"seconds between all workers running and the start of a CPU window (default: {DEFAULT_WARMUP:g})")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help=f"client connections per second in the CPU rows (default: {DEFAULT_RATE:g})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"runs of each CPU row; the report shows the median (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--launches", type=int, default=DEFAULT_LAUNCHES, help=f"launches timed in (b) (default: {DEFAULT_LAUNCHES})")
    parser.add_argument("--only", choices=["cpu", "launch"], help="run only (a) cpu or (b) launch (default: both)")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600:
        parser.error(f"--seconds {args.seconds:g} is out of range; pass 1 to 600")
    if not 0 <= args.warmup <= 60:
        parser.error(f"--warmup {args.warmup:g} is out of range; pass 0 to 60")
    if not 1 <= args.rate <= 5000:
        parser.error(f"--rate {args.rate:g} is out of range; pass 1 to 5000")
    if not 1 <= args.rounds <= 10:
        parser.error(f"--rounds {args.rounds} is out of range; pass 1 to 10")
    if not 1 <= args.launches <= 50:
        parser.error(f"--launches {args.launches} is out of range; pass 1 to 50")
    if shutil.which("tmux") is None:
        parser.error("tmux is not installed; the pty row and the launch timing need it")
    if not COMMAND.exists():
        parser.error(f"{COMMAND} not found; install the project into .venv first (.venv/bin/pip install -e .)")

    load_at_start = format_load()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tc-console-"))
    sections = []
    try:
        if args.only in (None, "cpu"):
            sections.append(cpu_report(run_cpu_rounds(args, workdir), args))
        if args.only in (None, "launch"):
            launches = []
            for number in range(1, args.launches + 1):
                launch = run_launch(number)
                print(f"launch {number}/{args.launches}: first frame {launch.first_frame:.2f} s, all running {launch.all_running:.2f} s", file=sys.stderr, flush=True)
                launches.append(launch)
            sections.append(launch_report(launches))
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"takeover-console console benchmark, {time.monotonic() - started:.0f} s in all")
    for section in sections:
        print()
        print("\n".join(section))
    print()
    print("machine")
    for line in machine_lines(load_at_start):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The supervisor of managed workers: the server, forwarder and client as real OS processes.

Each worker runs ``python -m takeover_console ROLE ... --events - --exit-with-parent`` with
stdin from /dev/null, its events on a stdout pipe and its log on a stderr pipe; neither
reaches the terminal. Lines are read on the asyncio loop and reported through callbacks,
so the caller is never blocked.

Workers never outlive the supervisor: ``close()`` stops them (SIGTERM, then SIGKILL), an
atexit hook kills any left when the interpreter exits, and ``--exit-with-parent`` makes
each worker set PR_SET_PDEATHSIG, so even a SIGKILLed console takes its workers along.
A worker that exits on its own is reported with its status and is never restarted unless
the caller asks.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import json
import json.scanner
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from takeover_console.logs import RepeatLimiter, repeats_note

log = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0
LOG_LINES_KEPT = 200
# A line longer than this on a worker's stdout is not an event; it is dropped.
MAX_EVENT_LINE = 1 << 20
READ_CHUNK = 1 << 16
# The scanner parses one JSON value at an index of a str. It is what json.loads() runs
# after guessing the encoding of bytes and searching for whitespace, which cost about
# half the time of a 200-byte event line. NaN and Infinity are not JSON, though json
# accepts them by default, so a line with one is rejected.


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_SCAN = json.scanner.make_scanner(json.JSONDecoder(parse_constant=_reject_constant))
# The whitespace JSON allows around a value.
_JSON_SPACE = " \t\r\n"

# The event after which a worker counts as running: servers once they listen.
READY_KIND = {"server": "listening", "forwarder": "listening", "client": "started"}

_live_pids: set[int] = set()


def _kill_leftovers() -> None:
    for pid in list(_live_pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


atexit.register(_kill_leftovers)


class WorkerState(enum.Enum):
    """The lifecycle state of a worker."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


@dataclass
class Worker:
    """One managed program and its current process, if any."""

    name: str
    role: str
    args: list[str]
    generation: int = 1
    state: WorkerState = WorkerState.IDLE
    pid: int | None = None
    returncode: int | None = None
    started_mono: float | None = None
    log_lines: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES_KEPT))
    process: asyncio.subprocess.Process | None = None
    _readers: list[asyncio.Task] = field(default_factory=list)
    _watcher: asyncio.Task | None = None
    _takeover_waiters: list = field(default_factory=list)
    _stop_requested: str | None = None

    @property
    def exit_description(self) -> str:
        """"exit code N", "killed by SIGKILL" or "running"."""
        if self.returncode is None:
            return "running"
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit code {self.returncode}"

    def command(self) -> list[str]:
        """The argv that starts this worker."""
        extra = ["--exit-with-parent", "--events", "-"]
        if self.role != "client":
            extra += ["--generation", str(self.generation)]
        return [sys.executable, "-m", "takeover_console", self.role, *self.args, *extra]


def parse_event_line(line: str) -> dict | None:
    """Return the JSON object that makes up ``line``, or None when the line is anything else.

    Whitespace around the object is allowed; a second value, trailing text, an array or a
    cut-short object makes the line invalid.
    """
    if line[:1] != "{":
        line = line.lstrip(_JSON_SPACE)
        if line[:1] != "{":
            return None
    try:
        event, end = _SCAN(line, 0)
    except (StopIteration, ValueError, RecursionError):
        return None
    if end != len(line) and line[end:].strip(_JSON_SPACE):
        return None
    return event


def _decode_lines(data: bytes) -> list[str | None]:
    """Split ``data`` into lines of text; a line that is not UTF-8 becomes None."""
    try:
        return data.decode().split("\n")
    except UnicodeDecodeError:
        pass
    lines: list[str | None] = []
    for raw in data.split(b"\n"):
        try:
            lines.append(raw.decode())
        except UnicodeDecodeError:
            lines.append(None)
    return lines


# Callbacks: the events of one read from a worker's pipe, in the order the worker wrote
# them, and a change of a worker's state.
EventCallback = Callable[[Worker, list[dict]], None]
StateCallback = Callable[[Worker, str], None]


class Supervisor:
    """Starts, stops, kills and restarts named workers and reports their events."""

    def __init__(self, on_events: EventCallback, on_state: StateCallback | None = None, env: dict[str, str] | None = None):
        self.workers: dict[str, Worker] = {}
        self._on_events = on_events
        self._callback_errors = RepeatLimiter()
        self._on_state = on_state or (lambda worker, detail: None)
        self._env = env
        self._closed = False

    def add(self, name: str, role: str, args: list[str], generation: int = 1) -> Worker:
        """Register a worker without starting it."""
        worker = Worker(name=name, role=role, args=list(args), generation=generation)
        self.workers[name] = worker
        return worker

    def pids(self) -> dict[int, str]:
        """The pids of running workers, with their names."""
        return {w.pid: w.name for w in self.workers.values() if w.pid is not None and w.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING)}

    async def start(self, name: str) -> Worker:
        """Start a worker that is not running; a running one is left as it is."""
        if self._closed:
            raise RuntimeError("supervisor is closed")
        worker = self.workers[name]
        if worker.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING):
            return worker
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONUNBUFFERED"] = "1"
        worker.process = await asyncio.create_subprocess_exec(
            *worker.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            limit=MAX_EVENT_LINE,
        )
        worker.pid = worker.process.pid
        _live_pids.add(worker.pid)
        worker.returncode = None
        worker._stop_requested = None
        # The log lines kept are the current process's, so an error quoting them names no other.
        worker.log_lines.clear()
        worker.started_mono = time.monotonic()
        worker.state = WorkerState.STARTING
        self._on_state(worker, "started")
        log.info("started %s (%s) as pid %d", worker.name, worker.role, worker.pid)
        worker._readers = [
            asyncio.create_task(self._read_events(worker, worker.process), name=f"{name}-events"),
            asyncio.create_task(self._read_log(worker, worker.process), name=f"{name}-log"),
        ]
        worker._watcher = asyncio.create_task(self._watch_exit(worker, worker.process), name=f"{name}-exit")
        return worker

    async def _read_events(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        # Read whatever the pipe contains and parse its whole lines here: one read per burst of
        # events costs far less than one readline() per event at thousands per second.
        bad_lines = 0
        pending = b""
        # True after the start of a line longer than MAX_EVENT_LINE was dropped: the rest of
        # that line, up to its newline, is dropped too.
        skipping = False
        while True:
            chunk = await process.stdout.read(READ_CHUNK)
            if not chunk:
                break
            if skipping:
                newline = chunk.find(b"\n")
                if newline < 0:
                    continue
                chunk = chunk[newline + 1 :]
                skipping = False
            data = pending + chunk
            cut = data.rfind(b"\n")
            pending = data[cut + 1 :]
            if cut >= 0:
                bad_lines += self._handle_lines(worker, data[:cut], bad_lines == 0)
            if len(pending) > MAX_EVENT_LINE:
                bad_lines += 1
                if bad_lines == 1:
                    log.warning("%s wrote a line longer than %d bytes; it is dropped", worker.name, MAX_EVENT_LINE)
                pending = b""
                skipping = True
        if pending and not skipping:
            bad_lines += self._handle_lines(worker, pending, bad_lines == 0)
        if bad_lines > 1:
            log.warning("%s wrote %d lines that are not JSON objects", worker.name, bad_lines)

    def _handle_lines(self, worker: Worker, data: bytes, warn: bool = True) -> int:
        """Report the events on the lines of ``data``; return how many lines were not JSON objects.

        A line longer than MAX_EVENT_LINE bytes counts as not one. With ``warn``, the first
        such line is logged. An exception raised by a callback is logged, and reading goes
        on: a reader that stopped would leave the worker blocked on a full pipe.
        """
        events = []
        bad_lines = 0
        lines = _decode_lines(data)
        if len(data) > MAX_EVENT_LINE:
            lines = [None if len(raw) > MAX_EVENT_LINE else line for raw, line in zip(data.split(b"\n"), lines)]
        for line in lines:
            event = parse_event_line(line) if line is not None else None
            if event is not None:
                events.append(event)
            elif line is None or line.strip(_JSON_SPACE):
                bad_lines += 1
                if warn and bad_lines == 1:
                    log.warning("%s wrote a line that is not a JSON object: %r", worker.name, (line or "(not UTF-8 or too long)")[:120])
        if not events:
            return bad_lines
        if worker.state is WorkerState.STARTING:
            ready_kind = READY_KIND.get(worker.role, "started")
            if any(event.get("kind") == ready_kind for event in events):
                worker.state = WorkerState.RUNNING
                self._call_safely(worker, self._on_state, worker, "running")
        self._call_safely(worker, self._on_events, worker, events)
        if worker._takeover_waiters:
            for event in events:
                if event.get("kind") == "takeover" and event.get("phase") == "ready":
                    for waiter in worker._takeover_waiters:
                        if not waiter.done():
                            waiter.set_result(event)
                    worker._takeover_waiters.clear()
                    break
        return bad_lines

    def _call_safely(self, worker: Worker, callback: Callable, *args) -> None:
        """Call a callback; log an exception it raises instead of letting it end the reader."""
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - see _handle_lines
            suppressed = self._callback_errors.check(worker.name)
            if suppressed is not None:
                log.exception("handling the events of %s failed%s", worker.name, repeats_note(suppressed))

    async def _read_log(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        while True:
            try:
                line = await process.stderr.readline()
            except ValueError:
                continue
            if not line:
                return
            worker.log_lines.append(line.decode("utf-8", "replace").rstrip())

    async def _watch_exit(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        _live_pids.discard(process.pid)
        await asyncio.gather(*worker._readers, return_exceptions=True)
        if worker.process is not process:
            return
        worker.returncode = code
        worker.state = WorkerState.EXITED
        how = worker._stop_requested or "exited on its own"
        log.info("%s pid %d: %s (%s)", worker.name, process.pid, worker.exit_description, how)
        self._on_state(worker, f"exited: {worker.exit_description} ({how})")

    def kill(self, name: str) -> bool:
        """SIGKILL a worker at once; return False when it was not running."""
        worker = self.workers[name]
        if worker.process is None or worker.process.returncode is not None:
            return False
        worker._stop_requested = "killed with SIGKILL"
        worker.process.send_signal(signal.SIGKILL)
        return True

    def signal(self, name: str, signum: int) -> bool:
        """Send ``signum`` to a running worker; return False when it was not running."""
        worker = self.workers[name]
        if worker.process is None or worker.process.returncode is not None:
            return False
        worker.process.send_signal(signum)
        return True

    async def stop(self, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM a worker, SIGKILL it after ``timeout`` seconds; return its exit status."""
        worker = self.workers[name]
        process = worker.process
        if process is None or process.returncode is not None:
            return worker.returncode
        worker._stop_requested = "stopped with SIGTERM"
        worker.state = WorkerState.STOPPING
        self._on_state(worker, "stopping")
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await process.wait()
        except TimeoutError:
            log.warning("%s pid %d did not exit within %g s of SIGTERM; sending SIGKILL", name, process.pid, timeout)
            worker._stop_requested = f"SIGKILL after {timeout:g} s without exiting"
            process.send_signal(signal.SIGKILL)
            await process.wait()
        # The state is EXITED, and the exit reported, once the watcher has finished.
        if worker._watcher is not None:
            await asyncio.gather(worker._watcher, return_exceptions=True)
        return process.returncode

    async def wait_exited(self, name: str) -> int | None:
        """Wait until a worker's process has exited and its output is read."""
        worker = self.workers[name]
        if worker.process is None:
            return None
        await worker.process.wait()
        if worker._watcher is not None:
            await asyncio.gather(worker._watcher, return_exceptions=True)
        return worker.process.returncode

    async def wait_exited_or_ready(self, name: str, timeout: float = 15.0) -> WorkerState:
        """Wait until a worker has announced a completed takeover or has exited."""
        worker = self.workers[name]
        waiter = asyncio.get_running_loop().create_future()
        worker._takeover_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait([waiter, worker._watcher], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            if not waiter.done():
                waiter.cancel()
        return worker.state

    async def restart(self, name: str) -> Worker:
        """Stop a worker if it runs, then start it again."""
        await self.stop(name)
        return await self.start(name)

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after ``timeout``) and wait for all."""
        self._closed = True
        await asyncio.gather(*(self.stop(name, timeout) for name in self.workers), return_exceptions=True)
        for worker in self.workers.values():
            if worker.process is not None:
                await asyncio.gather(*worker._readers, return_exceptions=True)

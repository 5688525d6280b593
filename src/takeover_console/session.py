"""A live session: the supervisor's workers, the fd-table sampler and the model, wired together.

Data flows one way: worker processes -> events and samples -> observations -> model (and
the recorder). The console and the headless demo both drive a LiveSession; neither
talks to a process directly.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Coroutine

from takeover_console.fdtable import FdSampler
from takeover_console.logs import RepeatLimiter
from takeover_console.model import SessionModel
from takeover_console.observations import WORKER, Recorder, event_observation, read_recording, replay, sample_observation, worker_observation
from takeover_console.reorder import ReorderBuffer
from takeover_console.socketfile import runtime_dir
from takeover_console.workers import Supervisor, Worker, WorkerState

log = logging.getLogger(__name__)

SERVER = "server"
FORWARDER = "forwarder"
CLIENT = "client"
# Seconds a client may take to finish its requests in flight after SIGTERM.
CLIENT_STOP_TIMEOUT = 3.0
# In slow motion the client keeps each connection open this long after sending its request.
SLOW_MOTION_HOLD = 0.5
# Requests a continuous client sends before it would stop by itself (about a day at 5/s).
CLIENT_COUNT = 500_000
START_TIMEOUT = 10.0
# The event kinds the session itself acts on; every other event only goes to the model.
_SESSION_KINDS = frozenset({"takeover", "channel_up", "channel_down", "listening"})


@dataclass
class SessionConfig:
    """What a live session runs; rates are connections per second, intervals seconds."""

    listen: str = "127.0.0.1:8080"
    handoff: Path | None = None
    client_rate: float = 5.0
    client_concurrency: int = 8
    client_count: int = CLIENT_COUNT
    sample_interval: float = 0.25
    record: Path | None = None
    reply_timeout_ms: float = 300.0


class SessionError(Exception):
    """The session could not start; the message says why and what to do."""


class LiveSession:
    """Runs server, forwarder and client as workers and folds what they do into a model."""

    live = True

    def __init__(self, config: SessionConfig, on_change: Callable[[], None] | None = None):
        self.config = config
        self.model = SessionModel()
        self._on_change = on_change or (lambda: None)
        self._private_dir: Path | None = None
        self.handoff = config.handoff or self._make_handoff_path()
        self.recorder = Recorder(config.record) if config.record else None
        self.on_worker_change: Callable[[], None] = lambda: None
        self._reorder = ReorderBuffer(self._fold)
        self._bad_observations_log = RepeatLimiter()
        self.supervisor = Supervisor(self._on_events, self._on_state)
        self.sampler = FdSampler()
        self._sampling: asyncio.Task | None = None
        self._listening: dict[str, asyncio.Future] = {}
        self.client_paused = False
        self.client_rate = config.client_rate
        self.slow_motion = False
        # The worker names of the current server and forwarder generations.
        self.server_name = SERVER
        self.forwarder_name = FORWARDER
        self.upgrading: str | None = None
        # Client restarts run one at a time, so quick key presses never start two clients.
        self._client_lock = asyncio.Lock()
        # Whether the user requested the forwarder up. Keys change it at once. The starts and
        # stops they cause run one at a time, each doing what the latest key wants: a
        # quick "k f" ends with a forwarder, and "f k" without one.
        self.forwarder_requested = True
        self._forwarder_lock = asyncio.Lock()
        # Requests made and not yet carried out. Each counts from the moment it is made,
        # before its coroutine first runs.
        self._forwarder_requests = 0
        self._client_requests = 0
        self._server_requests = 0
        self._server_lock = asyncio.Lock()
        self._channel_up = asyncio.Event()
        self.server_address: str | None = None

    def _make_handoff_path(self) -> Path:
        self._private_dir = Path(tempfile.mkdtemp(prefix="session-", dir=runtime_dir()))
        return self._private_dir / "handoff.sock"

    @property
    def control_path(self) -> Path:
        """The control socket through which server generations take over from each other."""
        return self.handoff.with_name("control.sock")

    # Observations in.

    def observe(self, observation: dict) -> None:
        """Queue one observation; the model folds it in time order a moment later (reorder.py)."""
        self._reorder.add(observation)

    def observe_many(self, observations: list[dict]) -> None:
        """Queue several observations at once, as ``observe`` does for one."""
        self._reorder.extend(observations)

    def _fold(self, observations: list[dict]) -> None:
        """Record and fold observations released in time order, then tell the listeners."""
        bad_before = self.model.bad_observations
        for observation in observations:
            if self.recorder is not None:
                self.recorder.write(observation)
            self.model.apply(observation)
        if self.model.bad_observations != bad_before:
            suppressed = self._bad_observations_log.check("bad observation")
            if suppressed is not None:
                log.warning("could not fold an observation (%s); %d so far", self.model.last_bad_observation, self.model.bad_observations)
        self._on_change()
        if any(observation["type"] == WORKER for observation in observations):
            # A process starting or dying is worth showing at once, not at the next refresh.
            self.on_worker_change()

    def _on_events(self, worker: Worker, events: list[dict]) -> None:
        name = worker.name
        self.observe_many([event_observation(name, event) for event in events])
        for event in events:
            kind = event.get("kind")
            if type(kind) is str and kind in _SESSION_KINDS:
                self._on_session_event(worker, event)

    def _on_session_event(self, worker: Worker, event: dict) -> None:
        """Act on an event that changes what the session does next."""
        kind = event.get("kind")
        if kind == "takeover" and event.get("phase") == "ready" and worker.name == self.upgrading:
            # The new generation accepts now; actions apply to it from here on.
            if worker.role == SERVER:
                self.server_name = worker.name
            else:
                self.forwarder_name = worker.name
        elif kind == "channel_up" and worker.role == SERVER:
            self._channel_up.set()
        elif kind == "channel_down" and worker.role == SERVER:
            self._channel_up.clear()
        elif kind == "listening":
            if worker.role == SERVER and isinstance(event.get("addr"), str):
                self.server_address = event["addr"]
            waiter = self._listening.get(worker.name)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def _on_state(self, worker: Worker, detail: str) -> None:
        state = detail.split(":")[0]
        self.observe(worker_observation(worker.name, worker.role, worker.pid, worker.generation, state, detail))
        if state == "exited":
            waiter = self._listening.get(worker.name)
            if waiter is not None and not waiter.done():
                lines = "\n".join(list(worker.log_lines)[-5:])
                reason = f"{worker.name} exited before listening ({worker.exit_description})"
                waiter.set_exception(SessionError(f"{reason}:\n{lines}" if lines else reason))

    # Starting and stopping.

    async def start(self) -> None:
        """Start forwarder, server and client, each once the one before it listens."""
        self.supervisor.add(FORWARDER, FORWARDER, ["--handoff", str(self.handoff)])
        self.supervisor.add(SERVER, SERVER, self._server_args(["--listen", self.config.listen]))
        self.supervisor.add(CLIENT, CLIENT, [])
        self._sampling = asyncio.create_task(self._sample_loop(), name="fd-sampler")
        await self._start_and_wait(FORWARDER)
        await self._start_and_wait(SERVER)
        await self.start_client()

    def _server_args(self, listen: list[str]) -> list[str]:
        return [*listen, "--handoff", str(self.handoff), "--control", str(self.control_path), "--reply-timeout", str(self.config.reply_timeout_ms)]

    async def _start_and_wait(self, name: str) -> dict:
        waiter = asyncio.get_running_loop().create_future()
        self._listening[name] = waiter
        await self.supervisor.start(name)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                return await waiter
        except TimeoutError:
            raise SessionError(f"{name} did not start listening within {START_TIMEOUT:g} s") from None
        finally:
            self._listening.pop(name, None)

    async def start_client(self) -> None:
        """(Re)start the client worker at the current rate."""
        async with self._client_lock:
            await self._restart_client()

    async def _restart_client(self) -> None:
        if self.server_address is None:
            return
        client = self.supervisor.workers[CLIENT]
        client.args = [
            "--connect", self.server_address,
            "--count", str(self.config.client_count),
            "--rate", f"{self.client_rate:g}",
            "--concurrency", str(self.config.client_concurrency),
            "--json",
        ]
        if self.slow_motion:
            client.args += ["--hold", f"{SLOW_MOTION_HOLD:g}"]
        # SIGTERM lets the client finish the requests it has in flight.
        await self.supervisor.stop(CLIENT, timeout=CLIENT_STOP_TIMEOUT)
        if not self.client_paused:
            await self.supervisor.start(CLIENT)

    async def close(self) -> None:
        """Stop every worker, the sampler and the recorder, and remove private files."""
        if self._sampling is not None:
            self._sampling.cancel()
            await asyncio.gather(self._sampling, return_exceptions=True)
        self.sampler.close()
        # The client first, so that none of its requests meets a server already stopping.
        if CLIENT in self.supervisor.workers and self._running(CLIENT):
            await self.supervisor.stop(CLIENT, timeout=CLIENT_STOP_TIMEOUT)
        await self.supervisor.close()
        # The workers' last events and exits are in the model, and in the recording.
        self._reorder.flush()
        if self.recorder is not None:
            self.recorder.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    # Actions the console's keys trigger.

    def forwarder_running(self) -> bool:
        """True while the forwarder process is alive."""
        return self._running(self.forwarder_name)

    def _running(self, name: str) -> bool:
        return self.supervisor.workers[name].state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING)

    def server_running(self) -> bool:
        """True while the current server generation is alive."""
        return self._running(self.server_name)

    def kill_forwarder(self) -> bool:
        """SIGKILL the forwarder now; False when it was not running.

        A forwarder that is still being started is stopped as soon as it has started.
        """
        self.forwarder_requested = False
        return self.supervisor.kill(self.forwarder_name)

    def stop_forwarder(self) -> Coroutine[None, None, None]:
        """Request the forwarder down; await the result to send SIGTERM and wait while it drains and exits."""
        self.forwarder_requested = False
        self._forwarder_requests += 1
        return self._settle_forwarder()

    def start_forwarder(self) -> Coroutine[None, None, None]:
        """Request the forwarder up; await the result to start it (no-op while it runs).

        A forwarder that is still exiting after a kill or stop is waited for first.
        """
        self.forwarder_requested = True
        self._forwarder_requests += 1
        return self._settle_forwarder()

    @property
    def forwarder_changing(self) -> bool:
        """True from a request to start or stop the forwarder until it is carried out."""
        return self._forwarder_requests > 0

    @property
    def client_changing(self) -> bool:
        """True from a request to pause or resume the client until it is carried out."""
        return self._client_requests > 0

    async def _settle_forwarder(self) -> None:
        """Bring the forwarder to the state last requested."""
        try:
            await self._settle_forwarder_now()
        finally:
            self._forwarder_requests -= 1

    async def _settle_forwarder_now(self) -> None:
        async with self._forwarder_lock:
            name = self.forwarder_name
            worker = self.supervisor.workers[name]
            if not self.forwarder_requested:
                if self._running(name):
                    await self.supervisor.stop(name)
                return
            if worker.process is not None and worker.process.returncode is None and worker._stop_requested:
                await self.supervisor.wait_exited(name)  # killed or stopped a moment ago
            if self._running(name):
                return
            # A generation started with --takeover binds the socket itself when started again.
            worker.args = [arg for arg in worker.args if arg != "--takeover"]
            try:
                await self._start_and_wait(name)
            except SessionError:
                if self.forwarder_requested:
                    raise
            if not self.forwarder_requested:
                await self.supervisor.stop(name)  # requested down while it was starting

    async def wait_channel_up(self, timeout: float = START_TIMEOUT) -> bool:
        """Wait until the server has a handoff channel to a forwarder."""
        try:
            async with asyncio.timeout(timeout):
                await self._channel_up.wait()
        except TimeoutError:
            return False
        return True

    def pause_client(self) -> Coroutine[None, None, None]:
        """Mark the client paused now; await the result to stop its load. ``resume_client`` undoes it."""
        self.client_paused = True
        self._client_requests += 1
        return self._settle_client()

    def resume_client(self) -> Coroutine[None, None, None]:
        """Mark the client running now; await the result to start its load at the current rate."""
        self.client_paused = False
        self._client_requests += 1
        return self._settle_client()

    async def _settle_client(self) -> None:
        """Stop or start the client as the last pause or resume requested, one change at a time."""
        try:
            async with self._client_lock:
                if self.client_paused:
                    await self.supervisor.stop(CLIENT, timeout=CLIENT_STOP_TIMEOUT)
                elif not self._running(CLIENT):
                    await self._restart_client()
        finally:
            self._client_requests -= 1

    def set_client_rate(self, rate: float) -> Coroutine[None, None, None]:
        """Set the client's connections per second now; await the result to restart the client.

        The rate changes before the restart, so several quick changes each start from
        the one before, and the restarts, which run one at a time, end at the last rate.
        """
        self.client_rate = max(0.5, rate)
        return self._restart_client_unless_paused()

    async def _restart_client_unless_paused(self) -> None:
        if not self.client_paused:
            await self.start_client()

    async def set_slow_motion(self, on: bool) -> None:
        """Have the server keep its copy after TAKEN and the client hold connections longer."""
        self.slow_motion = on
        self.supervisor.signal(self.server_name, signal.SIGUSR1 if on else signal.SIGUSR2)
        if not self.client_paused:
            await self.start_client()

    def client_running(self) -> bool:
        """True while a client process is alive."""
        return CLIENT in self.supervisor.workers and self._running(CLIENT)

    def start_server(self) -> Coroutine[None, None, None]:
        """Request a server; await the result to start the current generation again when none runs.

        The new process binds the address itself. This is the way back after the server
        was killed or crashed: the client's requests fail until a server listens again.
        Requests made while one is carried out add nothing, so a quick "n n" starts one.
        """
        self._server_requests += 1
        return self._start_server()

    @property
    def server_changing(self) -> bool:
        """True from a request to start the server until it is carried out."""
        return self._server_requests > 0

    async def _start_server(self) -> None:
        try:
            async with self._server_lock:
                if self.server_running() or self.upgrading is not None:
                    return
                worker = self.supervisor.workers[self.server_name]
                worker.args = self._server_args(["--listen", self.server_address or self.config.listen])
                await self._start_and_wait(self.server_name)
        finally:
            self._server_requests -= 1

    def upgrade_server(self, fault: str | None = None) -> Coroutine[None, None, None]:
        """Add the next server generation now; await the result to start it with --takeover.

        It replaces the current generation at READY. While another upgrade or forwarder
        restart is under way, the result raises SessionError instead.
        """
        if self.upgrading is not None:
            return self._reject(f"{self.upgrading} is still taking over; wait until it is ready or has failed")
        generation = self._next_generation(SERVER)
        name = f"{SERVER}-{generation}"
        args = self._server_args(["--takeover", "--listen", self.server_address or self.config.listen])
        if fault:
            args += ["--inject-fault", fault]
        self.supervisor.add(name, SERVER, args, generation=generation)
        self.upgrading = name
        return self._start_successor(name)

    def restart_forwarder(self) -> Coroutine[None, None, None]:
        """Add the next forwarder generation now; await the result to start it with --takeover.

        It replaces the current generation at READY. While another upgrade or forwarder
        restart is under way, the result raises SessionError instead.
        """
        if self.upgrading is not None:
            return self._reject(f"{self.upgrading} is still taking over; wait until it is ready or has failed")
        generation = self._next_generation(FORWARDER)
        name = f"{FORWARDER}-{generation}"
        self.supervisor.add(name, FORWARDER, ["--takeover", "--handoff", str(self.handoff)], generation=generation)
        self.upgrading = name
        return self._start_successor(name)

    def _next_generation(self, role: str) -> int:
        """Return one more than any generation of ``role`` so far, so a failed generation keeps its name."""
        return max(worker.generation for worker in self.supervisor.workers.values() if worker.role == role) + 1

    async def _reject(self, reason: str) -> None:
        raise SessionError(reason)

    async def _start_successor(self, name: str) -> None:
        try:
            await self.supervisor.start(name)
            await self.supervisor.wait_exited_or_ready(name)
        finally:
            self.upgrading = None

    # Sampling.

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pids = self.supervisor.pids()
            if pids:
                try:
                    sample = await loop.run_in_executor(None, self.sampler.sample, pids)
                except Exception:  # noqa: BLE001 - the sampler must never end the session
                    log.exception("fd-table sample failed")
                else:
                    self.observe(sample_observation(sample.to_dict()))
            await asyncio.sleep(self.config.sample_interval)



class ReplaySession:
    """A recorded session fed back through the same model, with no process started."""

    live = False

    def __init__(self, path: Path, speed: float = 1.0, on_change: Callable[[], None] | None = None, until: float | None = None):
        self.path = Path(path)
        self.speed = speed
        # Seconds from the first observation after which the replay stops (None: the whole file).
        self.until = until
        self._first_t: float | None = None
        self.model = SessionModel()
        self._on_change = on_change or (lambda: None)
        self._task: asyncio.Task | None = None
        self.finished = asyncio.Event()
        self.count = 0

    def observe(self, observation: dict) -> None:
        """Fold one recorded observation, unless it lies past ``until``."""
        if self._first_t is None:
            self._first_t = observation["t"]
        if self.until is not None and observation["t"] - self._first_t > self.until:
            return
        self.model.apply(observation)
        self.count += 1
        self._on_change()

    async def start(self) -> None:
        """Load the whole file at once (speed 0 or less) or start replaying it in the background.

        Raises RecordingError when the file is not a recording.
        """
        if self.speed <= 0:
            for observation in read_recording(self.path):
                self.observe(observation)
            self.finished.set()
            return
        # Read the header now, so a bad file fails here and not inside the background task.
        next(iter(read_recording(self.path)), None)
        self._task = asyncio.create_task(self._run(), name="replay")

    async def _run(self) -> None:
        try:
            await replay(self.path, self.observe, self.speed)
        finally:
            self.finished.set()

    async def close(self) -> None:
        """Stop replaying."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

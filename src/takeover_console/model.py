"""The session model: observations folded into processes, connections, counters and a log.

Folding is deterministic: it reads time only from the observations (``t``), so the same
observations in the same order give the same model, live or replayed. Panes read the
model; nothing here talks to a process.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from takeover_console.fdsample import checked_type
from takeover_console.fdtable import Sample
from takeover_console.narration import describe_event, describe_worker
from takeover_console.observations import EVENT, SAMPLE, WORKER
from takeover_console.stats import percentile

LOG_ENTRIES_KEPT = 500
CLOSED_CONNECTIONS_KEPT = 50
LATENCIES_KEPT = 2000
RATE_SECONDS_KEPT = 120
# Ids of closed connections remembered, so late events of the other process do not reopen them.
FINISHED_IDS_KEPT = 20000
# Open connections tracked at most; beyond it the oldest are dropped from the view.
OPEN_CONNECTIONS_KEPT = 5000


@dataclass
class ProcessView:
    """One worker process as the console shows it."""

    name: str
    role: str
    pid: int | None = None
    generation: int = 1
    state: str = "idle"
    detail: str = ""
    started_t: float | None = None
    exited_t: float | None = None
    cpu_percent: float | None = None
    rss: int | None = None
    fds: int | None = None
    answered: int = 0
    # psutil's process status from the last sample: "stopped" after SIGSTOP.
    status: str | None = None


@dataclass
class ConnectionView:
    """One accepted TCP connection, from accept to close."""

    id: str
    peer: str = "?"
    state: str = "accepted"
    holders: dict[str, int] = field(default_factory=dict)
    held_by: list[str] = field(default_factory=list)
    inode: int | None = None
    opened_t: float = 0.0
    closed_t: float | None = None
    outcome: str = ""
    answered_by: str | None = None
    # Roles that closed their copy; a late event of the other process must not bring them back.
    released: set[str] = field(default_factory=set)

    def hold(self, role: str, fd: int | None) -> None:
        """Record that ``role`` now holds the socket as ``fd``."""
        self.holders[role] = fd if fd is not None else -1
        if role not in self.held_by:
            self.held_by.append(role)

    def release(self, role: str) -> None:
        """Record that ``role`` no longer holds the socket."""
        self.holders.pop(role, None)
        self.released.add(role)


@dataclass
class LogEntry:
    """One line of the handoff event log."""

    t: float
    role: str
    kind: str
    text: str


@dataclass
class Counters:
    """Totals and per-second figures of the session."""

    by_server: int = 0
    by_forwarder: int = 0
    failed: int = 0
    handoffs: int = 0
    fallbacks: int = 0
    rejected: int = 0
    errors: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)


class SessionModel:
    """Everything the console shows, built only from observations."""

    def __init__(self) -> None:
        self.processes: dict[str, ProcessView] = {}
        self.connections: OrderedDict[str, ConnectionView] = OrderedDict()
        self.closed: deque[ConnectionView] = deque(maxlen=CLOSED_CONNECTIONS_KEPT)
        self.counters = Counters()
        self.log: deque[LogEntry] = deque(maxlen=LOG_ENTRIES_KEPT)
        self.latencies_ms: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self.handoff_ms: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self.per_second: OrderedDict[int, list[int]] = OrderedDict()  # second -> [server, forwarder, failed]
        self.sample: Sample | None = None
        self.shared_now = 0
        self.shared_peak = 0
        self.now = 0.0
        self.start_t: float | None = None
        self.version = 0
        self.logged = 0  # log entries ever appended, including those the deque dropped
        self._names_by_pid: dict[int, str] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        # Socket inodes with a part to play: "listener", "control socket", "handoff socket", "handoff channel".
        self.inode_labels: dict[int, str] = {}
        self.slow_motion = False
        # Observations that could not be folded, and why the last one could not.
        self.bad_observations = 0
        self.last_bad_observation = ""

    # Folding.

    def apply(self, observation: dict) -> None:
        """Fold one observation into the model.

        An observation with a field of the wrong type (a list for a pid, text for a
        latency) is counted in ``bad_observations`` and folded no further. It raises
        nothing then, because the observations after it must still count.
        """
        try:
            t = float(observation.get("t", self.now))
            if self.start_t is None:
                self.start_t = t
            self.now = max(self.now, t)
            kind = observation.get("type")
            if kind == EVENT:
                self._apply_event(observation.get("worker", "?"), observation.get("event") or {}, t)
            elif kind == WORKER:
                self._apply_worker(observation, t)
            elif kind == SAMPLE:
                self._apply_sample(observation.get("sample") or {})
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            self.bad_observations += 1
            self.last_bad_observation = f"{type(exc).__name__}: {exc}"
        self.version += 1

    def _process(self, name: str, role: str) -> ProcessView:
        view = self.processes.get(name)
        if view is None:
            view = ProcessView(name=name, role=role)
            self.processes[name] = view
        return view

    def _apply_worker(self, observation: dict, t: float) -> None:
        for name, types in _WORKER_FIELDS.items():
            if name in observation:
                checked_type(name, observation[name], types)
        view = self._process(observation.get("worker", "?"), observation.get("role", "?"))
        state = observation.get("state", "")
        if state == "started":
            if observation.get("pid") != view.pid:
                view.answered = 0  # the count is per process, not per worker name
            view.pid = observation.get("pid")
            view.generation = observation.get("gen") or view.generation
            view.started_t = t
            view.exited_t = None
            view.cpu_percent = view.rss = view.fds = view.status = None
            if view.pid is not None:
                self._names_by_pid[view.pid] = view.name
        elif state == "exited":
            view.exited_t = t
            # A process killed with SIGKILL writes no exited event: drop what it held here.
            self._on_exited(view, {}, t)
        view.state = state if state != "started" else "starting"
        view.detail = str(observation.get("detail", ""))
        text = describe_worker(observation)
        if text:
            self._log(t, view.role, f"worker_{state}", text)

    def _apply_event(self, worker: str, event: dict, t: float) -> None:
        role = event.get("role", "?")
        pid = event.get("pid")
        kind = event.get("kind")
        # Checked inline: thousands of events a second pass here.
        if type(worker) is not str or type(role) is not str or type(kind) not in _KIND_TYPES or type(pid) not in _PID_TYPES:
            raise ValueError(f"event of {str(worker)[:40]!r} has a worker, role, kind or pid of the wrong type")
        view = self._process(worker, role)
        if pid is not None and view.pid is None:
            view.pid = pid
            self._names_by_pid[pid] = worker
        handler = _EVENT_HANDLERS.get(kind)
        if handler is not None:
            handler(self, view, event, t)
        text = describe_event(event, self)
        if text:
            self._log(t, role, kind, text)

    def _log(self, t: float, role: str, kind: str, text: str) -> None:
        self.log.append(LogEntry(t, role, kind, text))
        self.logged += 1

    def _connection(self, conn_id: str, t: float) -> ConnectionView:
        conn = self.connections.get(conn_id)
        if conn is None and conn_id in self._finished:
            # Events of two processes arrive on two pipes, so one side's events can come
            # after the other side closed the connection. They update a detached view.
            return ConnectionView(id=conn_id, opened_t=t)
        if conn is None:
            conn = ConnectionView(id=conn_id, opened_t=t)
            self.connections[conn_id] = conn
            if len(self.connections) > OPEN_CONNECTIONS_KEPT:
                self.connections.popitem(last=False)
        elif t < conn.opened_t:
            conn.opened_t = t  # an earlier event of the other process arrived late
        return conn

    def _finish(self, conn: ConnectionView, t: float, outcome: str) -> None:
        conn.closed_t = t
        conn.outcome = outcome
        conn.state = "closed"
        if self.connections.pop(conn.id, None) is not None:
            self.closed.append(conn)
        self._finished[conn.id] = None
        if len(self._finished) > FINISHED_IDS_KEPT:
            self._finished.popitem(last=False)

    def _on_started(self, view: ProcessView, event: dict, t: float) -> None:
        generation = checked_type("gen", event.get("gen", view.generation), (int,))
        if view.state in ("idle", "exited"):
            view.state = "starting"
        view.generation = generation

    def _on_listening(self, view: ProcessView, event: dict, t: float) -> None:
        if view.state in ("idle", "starting"):
            view.state = "running"
        if event.get("inode") is not None:
            self.inode_labels[event["inode"]] = "listener" if view.role == "server" else "handoff socket"
        if event.get("control_inode") is not None:
            self.inode_labels[event["control_inode"]] = "control socket"

    def _on_channel_up(self, view: ProcessView, event: dict, t: float) -> None:
        if event.get("inode") is not None:
            self.inode_labels[event["inode"]] = "handoff channel"

    def _on_slow_motion(self, view: ProcessView, event: dict, t: float) -> None:
        self.slow_motion = bool(event.get("on"))

    def _on_accepted(self, view: ProcessView, event: dict, t: float) -> None:
        conn_id = str(event.get("conn"))
        conn = self._connection(conn_id, t)
        conn.peer = str(event.get("peer", "?"))
        conn.inode = event.get("inode")
        conn.hold("server", event.get("fd"))

    def _on_offered(self, view: ProcessView, event: dict, t: float) -> None:
        conn = self.connections.get(str(event.get("conn")))
        if conn is not None:
            conn.state = "offered"

    def _on_taken(self, view: ProcessView, event: dict, t: float) -> None:
        conn_id = str(event.get("conn"))
        if view.role == "server":
            self.counters.handoffs += 1
            if "latency_ms" in event:
                self.handoff_ms.append(float(event["latency_ms"]))
            conn = self.connections.get(conn_id)
            if conn is not None:
                conn.state = "taken"
                # TAKEN means the forwarder holds the socket, even before its own event
                # arrives, unless its "closed" came first on its own pipe.
                if "forwarder" not in conn.released:
                    conn.hold("forwarder", event.get("peer_fd"))
            return
        conn = self._connection(conn_id, t)
        if event.get("peer"):
            conn.peer = str(event["peer"])
        conn.inode = conn.inode or event.get("inode")
        conn.hold("forwarder", event.get("fd"))
        conn.state = "taken"

    def _on_released(self, view: ProcessView, event: dict, t: float) -> None:
        conn = self.connections.get(str(event.get("conn")))
        if conn is not None:
            conn.release("server")
            # The forwarder may have answered and closed before the server released its copy.
            if not conn.holders and conn.outcome:
                self._finish(conn, t, conn.outcome)

    def _on_rejected(self, view: ProcessView, event: dict, t: float) -> None:
        if view.role == "server":
            self.counters.rejected += 1
        conn = self.connections.get(str(event.get("conn")))
        if conn is not None and view.role == "forwarder":
            conn.release("forwarder")

    def _on_fallback(self, view: ProcessView, event: dict, t: float) -> None:
        self.counters.fallbacks += 1
        reason = str(event.get("reason", ""))
        self.counters.fallback_reasons[reason.split(":")[0]] += 1
        conn = self.connections.get(str(event.get("conn")))
        if conn is not None:
            conn.state = "fallback"

    def _on_served(self, view: ProcessView, event: dict, t: float) -> None:
        view.answered += 1
        conn = self.connections.get(str(event.get("conn")))
        if conn is not None:
            conn.answered_by = view.role
            conn.state = "answered"

    def _on_closed(self, view: ProcessView, event: dict, t: float) -> None:
        conn = self.connections.get(str(event.get("conn")))
        if conn is None:
            return
        conn.release(view.role)
        conn.outcome = str(event.get("outcome", "closed"))
        if not conn.holders:
            self._finish(conn, t, conn.outcome)

    def _on_answered(self, view: ProcessView, event: dict, t: float) -> None:
        view.answered += 1  # the requests this client process got a reply to
        if event.get("by") == "server":
            self.counters.by_server += 1
            self._bucket(t)[0] += 1
        else:
            self.counters.by_forwarder += 1
            self._bucket(t)[1] += 1
        if "latency_ms" in event:
            self.latencies_ms.append(float(event["latency_ms"]))

    def _on_failed(self, view: ProcessView, event: dict, t: float) -> None:
        self.counters.failed += 1
        self.counters.errors[str(event.get("error"))] += 1
        self._bucket(t)[2] += 1

    def _on_exited(self, view: ProcessView, event: dict, t: float) -> None:
        # Connections this process held are gone with it.
        for conn in list(self.connections.values()):
            if view.role in conn.holders:
                conn.release(view.role)
                if not conn.holders:
                    self._finish(conn, t, f"{view.role} exited")

    def _bucket(self, t: float) -> list[int]:
        second = int(t)
        bucket = self.per_second.get(second)
        if bucket is None:
            bucket = [0, 0, 0]
            self.per_second[second] = bucket
            while len(self.per_second) > RATE_SECONDS_KEPT:
                self.per_second.popitem(last=False)
        return bucket

    def _apply_sample(self, data: dict) -> None:
        sample = Sample.from_dict(data)
        self.sample = sample
        for pid, process in sample.processes.items():
            name = self._names_by_pid.get(pid)
            if name is None or process.gone:
                continue
            view = self.processes[name]
            view.cpu_percent = process.cpu_percent
            view.rss = process.rss
            view.fds = process.num_fds
            view.status = process.status
        self.shared_now = sum(1 for holders in sample.shared.values() if len({pid for pid, _ in holders}) > 1)
        self.shared_peak = max(self.shared_peak, self.shared_now)

    # Queries for panes and summaries.

    def peer_of(self, conn_id: str) -> str:
        """Return the client address of a connection, or its id when unknown."""
        conn = self.connections.get(conn_id)
        return conn.peer if conn is not None and conn.peer != "?" else conn_id

    def name_of_pid(self, pid: int) -> str | None:
        """Return the worker name that had ``pid``."""
        return self._names_by_pid.get(pid)

    def rates(self, seconds: int = 60) -> list[tuple[int, int, int]]:
        """Answers by server, by forwarder and failures for each of the last ``seconds`` whole seconds."""
        last = int(self.now)
        return [tuple(self.per_second.get(s, (0, 0, 0))) for s in range(last - seconds + 1, last + 1)]

    def latency_percentile(self, pct: float) -> float | None:
        """Client latency percentile (nearest rank) over the most recent answers, in ms."""
        return percentile(self.latencies_ms, pct)

    def handoff_percentile(self, pct: float) -> float | None:
        """OFFER to TAKEN round-trip percentile over recent handoffs, in ms."""
        return percentile(self.handoff_ms, pct)


# The fields that name things the panes show and look up: an observation with one of
# another type is not folded.
_WORKER_FIELDS = {"worker": (str,), "role": (str,), "pid": (int, type(None)), "gen": (int, type(None)), "state": (str,)}
_KIND_TYPES = (str, type(None))
_PID_TYPES = (int, type(None))

_EVENT_HANDLERS = {
    "started": SessionModel._on_started,
    "listening": SessionModel._on_listening,
    "channel_up": SessionModel._on_channel_up,
    "slow_motion": SessionModel._on_slow_motion,
    "accepted": SessionModel._on_accepted,
    "offered": SessionModel._on_offered,
    "taken": SessionModel._on_taken,
    "released": SessionModel._on_released,
    "rejected": SessionModel._on_rejected,
    "fallback": SessionModel._on_fallback,
    "served": SessionModel._on_served,
    "closed": SessionModel._on_closed,
    "answered": SessionModel._on_answered,
    "failed": SessionModel._on_failed,
    "exited": SessionModel._on_exited,
}

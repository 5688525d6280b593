"""The fd-table sampler: the open fds of each watched process, a few times a second.

A tick lists /proc/PID/fd of every watched pid and resolves each fd into an FdRow: its
kind, link target, close-on-exec flag and, for a socket, addresses and state from the
system-wide socket tables (socktable.py). It adds per-process figures from psutil and
groups the socket inodes that more than one fd refers to. That is how a socket in the
middle of a handoff shows up: one inode, held by the server and the forwarder.

Costs that grow with the number of fds are kept off the common path:

* Each socket table is read at most once per tick, and only if a sampled fd needs it.
  The read starts on a helper thread as soon as the first such fd is seen, so it
  overlaps with the readlink() calls of the remaining fds.
* The protocol of a socket inode, the kind of a file and the close-on-exec flag are
  cached per fd while its link target stays the same. The flag can change without the
  target changing (fcntl F_SETFD), so each fd's /proc/PID/fdinfo is read again once
  every ``cloexec_refresh_ticks`` ticks, spread over the ticks by fd number.
* Rows are immutable and reused from the previous tick when nothing in them changed.

A tick still makes one readlink() per fd. Reading a socket table takes longer the more
sockets the network namespace has, TIME_WAIT entries of other programs included. So the
cost of a tick grows with both; benchmarks/sampler.py measures it.

This module imports no Textual. The sample dataclasses live in fdsample.py and are
re-exported here.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import psutil

from . import socktable
from .fdsample import (
    ERROR_CHANGED,
    ERROR_VANISHED,
    KIND_ANON,
    KIND_FILE,
    KIND_OTHER,
    KIND_PIPE,
    KIND_SOCKET,
    KIND_TCP,
    KIND_UDP,
    KIND_UNIX,
    SOCKET_KINDS,
    FdRow,
    ProcessSample,
    Sample,
)
from .socktable import PROCFS, SOCK_DIAG, InetEntry, RawTable, UnixEntry

__all__ = [
    "DEFAULT_CLOEXEC_REFRESH_TICKS",
    "DEFAULT_RATE",
    "ERROR_CHANGED",
    "ERROR_VANISHED",
    "KIND_ANON",
    "KIND_FILE",
    "KIND_OTHER",
    "KIND_PIPE",
    "KIND_SOCKET",
    "KIND_TCP",
    "KIND_UDP",
    "KIND_UNIX",
    "SOCKET_KINDS",
    "FdRow",
    "FdSampler",
    "ProcessSample",
    "Sample",
    "SamplerThread",
]

log = logging.getLogger(__name__)

# fdinfo adds O_CLOEXEC to its octal "flags:" line when the fd is close-on-exec
# (seq_show in fs/proc/fd.c).
O_CLOEXEC_FLAG = 0o2000000
DEFAULT_RATE = 4.0  # samples per second
DEFAULT_CLOEXEC_REFRESH_TICKS = 20

# The kernel's name of a socket's protocol (the "system.sockprotoname" xattr of the fd)
# -> (row kind, socket table, address family).
_PROTOCOLS = {
    "TCP": (KIND_TCP, "tcp", "ipv4"),
    "TCPv6": (KIND_TCP, "tcp6", "ipv6"),
    "UDP": (KIND_UDP, "udp", "ipv4"),
    "UDPv6": (KIND_UDP, "udp6", "ipv6"),
}


# Sampling.


@dataclass(slots=True, eq=False)
class _FdState:
    """Cached facts about one fd (from its link, xattr, stat and fdinfo) and the last row built from them."""

    fd: int
    target: str
    kind: str
    inode: int | None = None
    table: str | None = None
    family: str | None = None
    protocol: str | None = None
    cloexec: bool | None = None
    error: str | None = None
    row: FdRow | None = None
    entry: InetEntry | UnixEntry | None = None

    def same_as(self, other: _FdState) -> bool:
        return (self.target, self.kind, self.protocol, self.cloexec, self.error) == (other.target, other.kind, other.protocol, other.cloexec, other.error)


@dataclass(slots=True)
class _Scan:
    """The result of listing one process's fds."""

    states: list[_FdState]
    listed: int = 0
    error: str | None = None
    gone: bool = False


class _TickTables:
    """The socket tables of one tick: the inodes needed from each, and one read per table.

    The scan adds inodes to ``needed[name]`` and calls ``start(name)`` before the first.

    NOTE: a table is read while fds are still being listed (or just after), not at the
    same instant. A socket opened after the read shows no addresses or state until the
    next tick, and one closed before it shows none in this tick.
    """

    def __init__(self, read: Callable[[str], RawTable | None], prefetch: bool):
        self._read = read
        self._prefetch = prefetch
        self.needed: dict[str, set[int]] = {name: set() for name in socktable.TABLES}
        self._threads: dict[str, threading.Thread] = {}
        self._raw: dict[str, RawTable | None] = {}

    def start(self, name: str) -> None:
        """Start reading table ``name`` on a helper thread, if prefetch is on."""
        if self._prefetch:
            thread = threading.Thread(target=self._store, args=(name,), name=f"fdtable-read-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def raw(self, name: str) -> RawTable | None:
        """Return the table's content, reading it now unless a helper thread already has."""
        thread = self._threads.get(name)
        if thread is not None:
            thread.join()
        elif name not in self._raw:
            self._store(name)
        return self._raw.get(name)

    def _store(self, name: str) -> None:
        self._raw[name] = self._read(name)


class FdSampler:
    """Take samples of the fd tables of a set of pids; see the module docstring for costs.

    ``source`` is where socket tables come from: ``sock_diag`` (netlink, the default) or
    ``procfs`` (/proc/net text). A table whose sock_diag dump fails is read from procfs
    from then on. ``prefetch`` reads tables on a helper thread while fds are listed.
    ``sample()`` may be called from any thread; concurrent calls run one at a time.
    """

    def __init__(self, source: str = SOCK_DIAG, cloexec_refresh_ticks: int = DEFAULT_CLOEXEC_REFRESH_TICKS, prefetch: bool = True):
        if source not in (SOCK_DIAG, PROCFS):
            raise ValueError(f"invalid socket table source {source!r}; expected {SOCK_DIAG!r} or {PROCFS!r}")
        if cloexec_refresh_ticks < 1:
            raise ValueError(f"invalid cloexec_refresh_ticks {cloexec_refresh_ticks}; expected 1 or more")
        self._sources = {name: source for name in socktable.TABLES}
        self._refresh = cloexec_refresh_ticks
        self._prefetch = prefetch
        self._lock = threading.Lock()
        self._tick = 0
        self._processes: dict[int, psutil.Process] = {}
        self._fds: dict[int, dict[int, _FdState]] = {}
        self._protocols: dict[int, str | None] = {}
        self._parse_caches = {name: socktable.ParseCache() for name in socktable.TABLES}
        self._failed_reads: dict[str, int] = {}

    def sample(self, pids: Mapping[int, str] | Iterable[int]) -> Sample:
        """Sample the given pids; a mapping gives each pid a label, such as its role."""
        labels = dict(pids) if isinstance(pids, Mapping) else {pid: "" for pid in pids}
        with self._lock:
            return self._sample(labels)

    def _sample(self, labels: dict[int, str]) -> Sample:
        started = time.monotonic()
        self._tick += 1
        tables = _TickTables(self._read_table, self._prefetch)
        figures = {pid: self._process_figures(pid) for pid in labels}
        scans = {pid: self._scan(pid, tables) for pid in labels}
        entries = self._parse_tables(tables)

        processes = {pid: self._process_sample(pid, labels[pid], figures[pid], scans[pid], entries) for pid in labels}
        shared = _shared_sockets(scans)
        self._forget(labels, scans)
        elapsed_ms = (time.monotonic() - started) * 1000.0
        return Sample(mono=started, processes=processes, shared=shared, elapsed_ms=elapsed_ms)

    def _read_table(self, name: str) -> RawTable | None:
        """Read one socket table; every read of a tick goes through here, once per table."""
        if self._sources[name] == SOCK_DIAG:
            try:
                return socktable.read_table(name, SOCK_DIAG)
            except OSError as exc:
                log.warning("sock_diag dump of socket table %s failed: %s; reading /proc/net/%s from now on", name, exc, name)
                self._sources[name] = PROCFS
                self._parse_caches[name].clear()
        try:
            return socktable.read_table(name, PROCFS)
        except OSError as exc:
            count = self._failed_reads[name] = self._failed_reads.get(name, 0) + 1
            if _is_round_count(count):
                log.warning("reading /proc/net/%s failed (%d times so far): %s; its sockets show no addresses or state", name, count, exc)
            return None

    def _parse_tables(self, tables: _TickTables) -> dict[str, dict]:
        entries: dict[str, dict] = {}
        for name, inodes in tables.needed.items():
            if not inodes:
                continue
            raw = tables.raw(name)
            if raw is None:
                entries[name] = {}
                continue
            cache = self._parse_caches[name]
            if len(cache.entries) > 2 * len(inodes) + 1024:
                cache.clear()  # entries of closed sockets pile up otherwise
            entries[name] = socktable.parse_table(raw, inodes, cache)
        return entries

    # Processes.

    def _process_figures(self, pid: int) -> dict:
        """Read psutil figures; a ``gone`` or ``error`` key gives the reason when some are missing."""
        process = self._processes.get(pid)
        first = False
        if process is None or not process.is_running():
            # A new pid, or one that now belongs to another process: start afresh.
            self._fds.pop(pid, None)
            try:
                process = psutil.Process(pid)
            except psutil.NoSuchProcess:
                self._processes.pop(pid, None)
                return {"gone": True, "error": "no such process"}
            except psutil.AccessDenied:
                return {"error": "permission denied"}
            self._processes[pid] = process
            first = True
        try:
            with process.oneshot():
                if process.status() == psutil.STATUS_ZOMBIE:
                    return {"gone": True, "error": "exited (zombie)", "name": process.name()}
                cpu = process.cpu_percent(None)
                return {
                    "name": process.name(),
                    "cmdline": tuple(process.cmdline()),
                    "cpu_percent": None if first else cpu,
                    "rss": process.memory_info().rss,
                }
        except psutil.ZombieProcess:
            return {"gone": True, "error": "exited (zombie)"}
        except psutil.NoSuchProcess:
            return {"gone": True, "error": "exited"}
        except psutil.AccessDenied:
            return {"error": "permission denied"}

    def _process_sample(self, pid: int, label: str, figures: dict, scan: _Scan, entries: dict[str, dict]) -> ProcessSample:
        gone = figures.pop("gone", False) or scan.gone
        error = figures.pop("error", None) or scan.error
        if gone:
            return ProcessSample(pid=pid, label=label, gone=True, error=error, name=figures.get("name"))
        rows = tuple(_row(state, entries) for state in scan.states)
        return ProcessSample(pid=pid, label=label, error=error, num_fds=scan.listed, rows=rows, **figures)

    def _forget(self, labels: dict[int, str], scans: dict[int, _Scan]) -> None:
        """Drop cached state of pids, and of socket inodes, that this tick did not see."""
        for cache in (self._processes, self._fds):
            for pid in [pid for pid in cache if pid not in labels or scans[pid].gone]:
                del cache[pid]
        # Pruning the protocol cache costs a pass over every fd, so it waits until
        # inodes of closed sockets make up more than half of the cache.
        listed = sum(len(scan.states) for scan in scans.values())
        if len(self._protocols) > 2 * listed + 1024:
            seen = {state.inode for scan in scans.values() for state in scan.states if state.kind in SOCKET_KINDS}
            self._protocols = {inode: protocol for inode, protocol in self._protocols.items() if inode in seen}

    # Fds.

    def _scan(self, pid: int, tables: _TickTables) -> _Scan:
        """List /proc/PID/fd and resolve each fd, reusing what the last tick learned."""
        try:
            dir_fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Scan([], gone=True, error="no such process")
        except PermissionError:
            return _Scan([], error="permission denied")
        except OSError as exc:
            return _Scan([], error=f"cannot list fds: {exc.strerror}")
        readlink = os.readlink
        tick = self._tick
        refresh = self._refresh
        needed = tables.needed
        try:
            names = os.listdir(dir_fd)
            previous = self._fds.get(pid, {})
            current: dict[int, _FdState] = {}
            for name in names:
                try:
                    target = readlink(name, dir_fd=dir_fd)
                except OSError:
                    continue  # the fd closed after listdir(), or the process exited
                fd = int(name)
                state = previous.get(fd)
                if state is None or state.target != target or state.error is not None or (fd + tick) % refresh == 0:
                    state = self._resolve(pid, fd, target, state)
                    if state is None:
                        continue
                if state.table is not None:
                    inodes = needed[state.table]
                    if not inodes:
                        tables.start(state.table)
                    inodes.add(state.inode)
                current[fd] = state
        except OSError as exc:
            return _Scan([], gone=True, error=f"exited while listing fds: {exc.strerror}")
        finally:
            os.close(dir_fd)
        self._fds[pid] = current
        return _Scan(sorted(current.values(), key=_fd_of), listed=len(names))

    def _resolve(self, pid: int, fd: int, target: str, previous: _FdState | None) -> _FdState | None:
        """Classify one fd and read its flags; return None if it closed meanwhile."""
        link = f"/proc/{pid}/fd/{fd}"
        state = _FdState(fd, target, KIND_OTHER)
        if target.startswith("socket:["):
            state.inode = int(target[8:-1])
            protocol = self._socket_protocol(link, state.inode)
            if protocol is None and state.inode not in self._protocols:
                state.kind = KIND_SOCKET
                state.error = ERROR_VANISHED
                return state
            state.protocol = protocol
            _classify_socket(state, protocol)
        elif target.startswith("pipe:["):
            state.kind = KIND_PIPE
            state.inode = int(target[6:-1])
        elif target.startswith("anon_inode:"):
            state.kind = KIND_ANON
        elif target.startswith("/"):
            try:
                mode = os.stat(link).st_mode
            except FileNotFoundError:
                return None
            except OSError:
                mode = 0
            state.kind = KIND_FILE if stat.S_ISREG(mode) else KIND_OTHER

        state.cloexec, state.error = _read_cloexec(f"/proc/{pid}/fdinfo/{fd}", state.inode if state.kind != KIND_OTHER else None)
        if previous is not None and previous.same_as(state):
            return previous
        return state

    def _socket_protocol(self, link: str, inode: int) -> str | None:
        """Return the kernel's protocol name of a socket, cached by inode.

        Return None, without caching, when the fd closed before the xattr was read.
        A kernel without the "system.sockprotoname" xattr caches None, so the socket
        shows as kind ``socket``.
        """
        if inode in self._protocols:
            return self._protocols[inode]
        try:
            value = os.getxattr(link, "system.sockprotoname")
        except FileNotFoundError:
            return None
        except OSError:
            self._protocols[inode] = None
            return None
        protocol = value.rstrip(b"\0").decode("ascii", "replace")
        self._protocols[inode] = protocol
        return protocol


def _classify_socket(state: _FdState, protocol: str | None) -> None:
    known = _PROTOCOLS.get(protocol) if protocol else None
    if known is not None:
        state.kind, state.table, state.family = known
        state.protocol = None
    elif protocol is not None and protocol.startswith("UNIX"):
        # Newer kernels name stream sockets "UNIX-STREAM" (unix_stream_proto in
        # net/unix/af_unix.c) and the others "UNIX"; older ones name all of them "UNIX".
        state.kind = KIND_UNIX
        state.table = "unix"
        state.protocol = None
    else:
        state.kind = KIND_SOCKET


def _read_cloexec(path: str, inode: int | None) -> tuple[bool | None, str | None]:
    """Read the close-on-exec flag from an fdinfo file; return ``(flag, error)``.

    When ``inode`` is given and the kernel prints an "ino:" line (newer kernels do),
    the two must match. Otherwise the fd number was reused for another file after its
    link was read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ERROR_VANISHED
    except OSError:
        return None, None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None, ERROR_VANISHED
    finally:
        os.close(fd)
    fields = dict(line.split(b":", 1) for line in data.split(b"\n") if b":" in line)
    if inode is not None and b"ino" in fields and int(fields[b"ino"]) != inode:
        return None, ERROR_CHANGED
    flags = fields.get(b"flags")
    if flags is None:
        return None, None
    return bool(int(flags, 8) & O_CLOEXEC_FLAG), None


def _row(state: _FdState, entries: dict[str, dict]) -> FdRow:
    """Return the row of one fd, reusing the previous tick's row when nothing changed."""
    entry = entries.get(state.table, {}).get(state.inode) if state.table is not None else None
    if state.row is not None and state.entry == entry:
        return state.row
    values = {}
    if isinstance(entry, InetEntry):
        values = {"local": entry.local, "remote": entry.remote, "state": entry.state}
    elif isinstance(entry, UnixEntry):
        values = {"path": entry.path, "state": entry.state, "peer_inode": entry.peer}
    row = FdRow(
        fd=state.fd,
        kind=state.kind,
        target=state.target,
        cloexec=state.cloexec,
        inode=state.inode,
        family=state.family,
        protocol=state.protocol,
        error=state.error,
        **values,
    )
    state.row = row
    state.entry = entry
    return row


def _shared_sockets(scans: dict[int, _Scan]) -> dict[int, tuple[tuple[int, int], ...]]:
    """Map each socket inode held by more than one fd to its ``(pid, fd)`` holders."""
    inodes = [state.inode for scan in scans.values() for state in scan.states if state.kind in SOCKET_KINDS]
    if len(set(inodes)) == len(inodes):
        return {}
    repeated = {inode for inode, count in Counter(inodes).items() if count > 1}
    shared: dict[int, list[tuple[int, int]]] = {inode: [] for inode in repeated}
    for pid in sorted(scans):
        for state in scans[pid].states:
            if state.inode in repeated and state.kind in SOCKET_KINDS:
                shared[state.inode].append((pid, state.fd))
    return {inode: tuple(holders) for inode, holders in shared.items()}


def _fd_of(state: _FdState) -> int:
    return state.fd


def _is_round_count(count: int) -> bool:
    """Tell whether a repeated error should be logged again: at 1, 10, 100, ..."""
    return count == 1 or (count % 10 == 0 and _is_round_count(count // 10))


# Sampling on a thread.


def _normalize_pids(pids: Mapping[int, str] | Iterable[int]) -> dict[int, str]:
    return dict(pids) if isinstance(pids, Mapping) else {pid: "" for pid in pids}


class SamplerThread:
    """Sample a changing set of pids at a fixed rate on a daemon thread.

    Each Sample goes to ``callback`` on the sampler thread; to hand it to an event loop,
    use ``loop.call_soon_threadsafe`` (asyncio) or ``App.call_from_thread`` (Textual).
    After a tick that overruns its interval the next one starts at once, and missed
    ticks are not made up. Errors raised by the sampler or the callback are logged, and
    sampling goes on.
    """

    def __init__(
        self,
        callback: Callable[[Sample], None],
        pids: Mapping[int, str] | Iterable[int] = (),
        rate: float = DEFAULT_RATE,
        sampler: FdSampler | None = None,
    ):
        if not rate > 0:
            raise ValueError(f"invalid sample rate {rate!r}; expected samples per second above 0")
        self._callback = callback
        self._interval = 1.0 / rate
        self._sampler = sampler or FdSampler()
        self._pids = _normalize_pids(pids)
        self._pids_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, int] = {}

    def set_pids(self, pids: Mapping[int, str] | Iterable[int]) -> None:
        """Replace the watched pids; the next tick uses the new set."""
        normalized = _normalize_pids(pids)
        with self._pids_lock:
            self._pids = normalized

    def start(self) -> None:
        """Start the sampler thread; the first sample is taken at once."""
        if self._thread is not None:
            raise RuntimeError("the sampler thread was already started; create a new SamplerThread")
        self._thread = threading.Thread(target=self._run, name="fd-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the thread to stop and wait up to ``timeout`` seconds; return whether it ended.

        The thread ends after the tick or callback in progress. It is a daemon thread, so
        a thread stuck in a callback does not keep the interpreter alive.
        """
        self._stopping.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> SamplerThread:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        log.info("fd sampler started at %g samples per second", 1.0 / self._interval)
        deadline = time.monotonic()
        while not self._stopping.is_set():
            with self._pids_lock:
                pids = self._pids
            try:
                sample = self._sampler.sample(pids)
            except Exception as exc:  # a bug in the sampler must not end sampling
                self._log_error(f"sampling pids {sorted(pids)}", exc)
            else:
                try:
                    self._callback(sample)
                except Exception as exc:  # the callback belongs to the caller
                    self._log_error("sample callback", exc)
            deadline = max(deadline + self._interval, time.monotonic())
            self._stopping.wait(deadline - time.monotonic())
        log.info("fd sampler stopped; %d errors", sum(self._errors.values()))

    def _log_error(self, operation: str, exc: Exception) -> None:
        key = f"{operation} failed: {type(exc).__name__}: {exc}"
        count = self._errors[key] = self._errors.get(key, 0) + 1
        if _is_round_count(count):
            log.error("%s (%d times so far)", key, count, exc_info=count == 1)

"""The fd-table sampler: the open fds of each watched process, a few times a second.

A tick lists /proc/PID/fd of every watched pid and resolves each fd into an FdRow: its
kind, link target, close-on-exec flag and, for a socket, addresses and state from the
system-wide socket tables (socktable.py). It adds per-process figures from psutil and
groups the socket inodes that more than one fd refers to. That is how a socket in the
middle of a handoff shows up: one inode, held by the server and the forwarder.

Costs that grow with the number of fds are kept off the common path:

* The fds are read on a small pool of threads (fdscan.py, scanpool.py), in chunks of
  up to 512 fds, so one process with many fds is split over the threads too.
  os.readlink() releases the GIL during the system call, so the readlink() calls of
  two threads run at once on two CPUs. This gains only while a second CPU is free.
* Each socket table is read at most once per tick, and only if a sampled fd needs it
  or needed it in the last tick. The read starts on a helper thread when the scan of a
  process that needed it in the last tick starts, or else when the first such fd is
  seen, so it overlaps with the readlink() calls.
* The protocol of a socket inode, the kind of a file and the close-on-exec flag are
  cached per fd while its link target stays the same. The flag can change without the
  target changing (fcntl F_SETFD), so each fd's /proc/PID/fdinfo is read again once
  every ``cloexec_refresh_ticks`` ticks, spread over the ticks by fd number. With the
  default of 20 ticks and more than 1,280 fds in all, the period grows instead, so a
  tick reads about 64 fdinfo files. With 4,010 fds, a flag changed by fcntl shows
  within 63 ticks, about 16 s at 4 ticks a second.
* A socket table whose content is byte for byte the last tick's is not parsed again,
  and a sock_diag datagram equal to one of the last dump reuses its parsed entries.
  Idle sockets leave a dump unchanged, and traffic or a timer changes only the
  datagrams that list the sockets concerned.
* Reading a socket table costs CPU for every socket of the network namespace. When a
  read was costly, the ticks after it reuse it, for a time in proportion to that cost
  (DEFAULT_TABLE_READ_SHARE), and never beyond MAX_TABLE_AGE. A socket opened since the
  read then shows no addresses or state, and a changed socket its old state, until the
  next read. At demo rates a read costs well under a millisecond and every tick reads.
* Rows are immutable and reused from the previous tick when nothing in them changed.
  A process whose fds and socket tables did not change gets the last tick's rows tuple.

A tick still makes one readlink() per fd, and reads the fdinfo of one fd in every
``cloexec_refresh_ticks`` (of at most about 64 fds with thousands of fds). Reading a socket table takes longer the more
sockets the network namespace has, TIME_WAIT entries of other programs included. So the
cost of a tick grows with both; benchmarks/sampler.py measures it.

This module imports no Textual. The sample dataclasses live in fdsample.py and are
re-exported here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
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
from .fdscan import FdScanner, FdState, Scan
from .scanpool import ScanPool
from .socktable import PROCFS, SOCK_DIAG, InetEntry, RawTable, UnixEntry

__all__ = [
    "DEFAULT_CLOEXEC_REFRESH_TICKS",
    "DEFAULT_RATE",
    "DEFAULT_SCAN_THREADS",
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

DEFAULT_RATE = 4.0  # samples per second
DEFAULT_CLOEXEC_REFRESH_TICKS = 20
# Threads that read fds, the calling one included. On 2 idle CPUs with 4,010 fds, two
# threads cut the readlink() calls of a tick from 12-13 ms to 7-9 ms (benchmarks/sampler.py
# floor line). The cap at os.cpu_count() keeps threads from waiting for a CPU.
DEFAULT_SCAN_THREADS = 2
# For a TCP dump the kernel walks every socket of the network namespace. TIME_WAIT entries
# are walked too, although the reply leaves them out. Each costs about 250 ns on the
# benchmark machine: 7 ms for the 30,000 that 500 connections a second leave behind.
# After a read that took C seconds of CPU, ticks reuse it for C / DEFAULT_TABLE_READ_SHARE
# seconds, so reading one table costs at most about this share of a core. A read under
# 1.25 ms (about 5,000 sockets or fewer) is still made every tick at 4 ticks a second.
DEFAULT_TABLE_READ_SHARE = 0.005
# The longest a table is reused, in seconds, however long its read took.
MAX_TABLE_AGE = 2.0


# Sampling.


class _TickTables:
    """The socket tables of one tick: the inodes needed from each, and one read per table.

    Scan threads call ``start(name)`` when they first meet a table and report inodes
    through ``add_needed()``; both are safe to call from any thread.

    NOTE: a table is read while fds are still being listed (or just after), not at the
    same instant. A socket opened after the read shows no addresses or state until the
    next tick, and one closed before it shows none in this tick.
    """

    def __init__(self, read: Callable[[str], RawTable | None], prefetch: bool):
        self._read = read
        self._prefetch = prefetch
        self._lock = threading.Lock()
        self.needed: dict[str, set[int]] = {name: set() for name in socktable.TABLES}
        self._threads: dict[str, threading.Thread] = {}
        self._raw: dict[str, RawTable | None] = {}

    def start(self, name: str) -> None:
        """Start reading table ``name`` on a helper thread, if prefetch is on and no read of it has started."""
        if not self._prefetch:
            return
        # The lock makes check-then-start atomic, so two scan threads never start two reads.
        # A read on a thread of its own, not a task of the scan pool, measured faster while
        # other programs kept the CPUs busy.
        with self._lock:
            if name in self._threads:
                return
            thread = threading.Thread(target=self._store, args=(name,), name=f"fdtable-read-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def add_needed(self, found: dict[str, list[int]]) -> None:
        """Add socket inodes, by table name, to the ones this tick needs."""
        with self._lock:
            for name, inodes in found.items():
                self.needed[name].update(inodes)

    def raw(self, name: str) -> RawTable | None:
        """Return the table's content, reading it now unless a helper thread already has."""
        thread = self._threads.get(name)
        if thread is not None:
            thread.join()
        elif name not in self._raw:
            self._store(name)
        return self._raw.get(name)

    def join(self) -> None:
        """Wait for every read this tick started, needed or not, so that none outlives the tick."""
        for thread in list(self._threads.values()):
            thread.join()

    def _store(self, name: str) -> None:
        self._raw[name] = self._read(name)


@dataclass(slots=True)
class _TableRead:
    """The last read of a socket table, and until when ticks may reuse it (time.monotonic())."""

    raw: RawTable
    reuse_until: float


@dataclass(slots=True)
class _ParsedTable:
    """A socket table as last parsed: its content, the inodes asked for and the entries found."""

    raw: RawTable
    inodes: set[int]
    entries: dict


class FdSampler:
    """Take samples of the fd tables of a set of pids; see the module docstring for costs.

    ``source`` is where socket tables come from: ``sock_diag`` (netlink, the default) or
    ``procfs`` (/proc/net text). A table whose sock_diag dump fails is read from procfs
    from then on. ``prefetch`` reads tables on a helper thread while fds are listed.
    ``scan_threads`` is how many threads read fds, the calling thread included. It is
    capped at os.cpu_count(), and 1 reads them all on the calling thread.
    ``table_read_share`` bounds the CPU spent reading each socket table, as a share of a
    core, by reusing a costly read for a while (see the module docstring); 0 reads every
    table afresh on every tick.
    ``sample()`` may be called from any thread; concurrent calls run one at a time.
    Call ``close()`` to end the scan threads; they are daemon threads in any case.
    """

    def __init__(
        self,
        source: str = SOCK_DIAG,
        cloexec_refresh_ticks: int = DEFAULT_CLOEXEC_REFRESH_TICKS,
        prefetch: bool = True,
        scan_threads: int = DEFAULT_SCAN_THREADS,
        table_read_share: float = DEFAULT_TABLE_READ_SHARE,
    ):
        if source not in (SOCK_DIAG, PROCFS):
            raise ValueError(f"invalid socket table source {source!r}; expected {SOCK_DIAG!r} or {PROCFS!r}")
        if cloexec_refresh_ticks < 1:
            raise ValueError(f"invalid cloexec_refresh_ticks {cloexec_refresh_ticks}; expected 1 or more")
        if scan_threads < 1:
            raise ValueError(f"invalid scan_threads {scan_threads}; expected 1 or more")
        if not 0 <= table_read_share <= 1:
            raise ValueError(f"invalid table_read_share {table_read_share!r}; expected a share of a core from 0 to 1")
        self._sources = {name: source for name in socktable.TABLES}
        self._prefetch = prefetch
        self._lock = threading.Lock()
        self._pool = ScanPool(min(scan_threads, os.cpu_count() or 1), name="fdtable-scan")
        # Close the pool when the sampler is garbage. The finalizer references the pool, not the sampler.
        weakref.finalize(self, self._pool.close)
        self._scanner = FdScanner(self._pool, cloexec_refresh_ticks)
        self._processes: dict[int, psutil.Process] = {}
        self._cmdlines: dict[int, tuple[str, ...]] = {}
        self._rows: dict[int, tuple[FdRow, ...]] = {}
        self._shared: dict[int, tuple[tuple[int, int], ...]] = {}
        self._shared_pids: frozenset[int] = frozenset()
        self._parse_caches = {name: socktable.ParseCache() for name in socktable.TABLES}
        self._parsed: dict[str, _ParsedTable] = {}
        self._failed_reads: dict[str, int] = {}
        self._table_read_share = table_read_share
        self._last_reads: dict[str, _TableRead] = {}

    @property
    def scan_threads(self) -> int:
        """The threads that read fds, the calling one included, after the cap at os.cpu_count()."""
        return self._pool.threads

    def sample(self, pids: Mapping[int, str] | Iterable[int]) -> Sample:
        """Sample the given pids; a mapping gives each pid a label, such as its role."""
        labels = dict(pids) if isinstance(pids, Mapping) else {pid: "" for pid in pids}
        with self._lock:
            return self._sample(labels)

    def close(self) -> None:
        """End the scan threads; later samples read every fd on the calling thread."""
        self._pool.close()

    def __enter__(self) -> FdSampler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _sample(self, labels: dict[int, str]) -> Sample:
        started = time.monotonic()
        tables = _TickTables(self._read_table, self._prefetch)
        figures = {pid: self._process_figures(pid) for pid in labels}
        scans = self._scanner.scan(labels, tables)
        entries, tables_unchanged = self._parse_tables(tables)
        # A read started for a table that no fd needed this time may still run. It must end
        # before the next tick, which could read the same table at the same time otherwise.
        tables.join()

        processes = {pid: self._process_sample(pid, labels[pid], figures[pid], scans[pid], entries, tables_unchanged) for pid in labels}
        if not self._shared_unchanged(labels, scans):
            self._shared = _shared_sockets(scans)
            self._shared_pids = frozenset(labels)
        self._forget(labels, scans)
        elapsed_ms = (time.monotonic() - started) * 1000.0
        return Sample(mono=started, processes=processes, shared=self._shared, elapsed_ms=elapsed_ms)

    def _read_table(self, name: str) -> RawTable | None:
        """Return one socket table for this tick; every tick gets each table through here, once.

        The table is read now unless the last read was costly and is recent enough to reuse.
        """
        last = self._last_reads.get(name)
        if last is not None and time.monotonic() < last.reuse_until:
            return last.raw
        started = time.thread_time()
        raw = self._read_table_now(name)
        cost = time.thread_time() - started
        if raw is not None and self._table_read_share > 0:
            self._last_reads[name] = _TableRead(raw, time.monotonic() + min(cost / self._table_read_share, MAX_TABLE_AGE))
        else:
            self._last_reads.pop(name, None)
        return raw

    def _read_table_now(self, name: str) -> RawTable | None:
        """Read one socket table from its source, falling back from sock_diag to procfs."""
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

    def _parse_tables(self, tables: _TickTables) -> tuple[dict[str, dict], bool]:
        """Parse the tables this tick needs; also return whether each is the last tick's, unparsed."""
        entries: dict[str, dict] = {}
        unchanged = True
        for name, inodes in tables.needed.items():
            if not inodes:
                continue
            raw = tables.raw(name)
            last = self._parsed.get(name)
            if raw is not None and last is not None and raw == last.raw and inodes <= last.inodes:
                entries[name] = last.entries
                continue
            unchanged = False
            if raw is None:
                entries[name] = {}
                self._parsed.pop(name, None)
                continue
            cache = self._parse_caches[name]
            if len(cache.entries) > 2 * len(inodes) + 1024:
                cache.clear()  # entries of closed sockets pile up otherwise
            entries[name] = socktable.parse_table(raw, inodes, cache)
            self._parsed[name] = _ParsedTable(raw, inodes, entries[name])
        return entries, unchanged

    # Processes.

    def _process_figures(self, pid: int) -> dict:
        """Read psutil figures; a ``gone`` or ``error`` key gives the reason when some are missing."""
        process = self._processes.get(pid)
        first = False
        if process is None or not process.is_running():
            # A new pid, or one that now belongs to another process: start afresh.
            self._scanner.forget_pid(pid)
            self._rows.pop(pid, None)
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
                status = process.status()
                if status == psutil.STATUS_ZOMBIE:
                    return {"gone": True, "error": "exited (zombie)", "name": process.name()}
                cpu = process.cpu_percent(None)
                cmdline = self._cmdlines.get(pid)
                if cmdline is None or first:
                    # Read once per process: the command line changes only by exec().
                    # NOTE: a sampled process that calls exec() keeps its old command line here.
                    cmdline = self._cmdlines[pid] = tuple(process.cmdline())
                return {
                    "name": process.name(),
                    "cmdline": cmdline,
                    "cpu_percent": None if first else cpu,
                    "rss": process.memory_info().rss,
                    "status": status,
                }
        except psutil.ZombieProcess:
            return {"gone": True, "error": "exited (zombie)"}
        except psutil.NoSuchProcess:
            return {"gone": True, "error": "exited"}
        except psutil.AccessDenied:
            return {"error": "permission denied"}

    def _process_sample(self, pid: int, label: str, figures: dict, scan: Scan, entries: dict[str, dict], tables_unchanged: bool) -> ProcessSample:
        gone = figures.pop("gone", False) or scan.gone
        error = figures.pop("error", None) or scan.error
        if gone:
            self._rows.pop(pid, None)
            return ProcessSample(pid=pid, label=label, gone=True, error=error, name=figures.get("name"))
        rows = self._rows.get(pid)
        if rows is None or not (scan.unchanged and tables_unchanged):
            rows = self._rows[pid] = _rows(scan.states, entries)
        return ProcessSample(pid=pid, label=label, error=error, num_fds=scan.listed, rows=rows, **figures)

    def _shared_unchanged(self, labels: dict[int, str], scans: dict[int, Scan]) -> bool:
        """Tell whether the pids and all their fds are the last tick's, so the shared sockets are too."""
        return self._shared_pids == labels.keys() and all(scan.unchanged for scan in scans.values())

    def _forget(self, labels: dict[int, str], scans: dict[int, Scan]) -> None:
        """Drop cached state of pids, and of socket inodes, that this tick did not see."""
        for cache in (self._processes, self._rows, self._cmdlines):
            for pid in [pid for pid in cache if pid not in labels or scans[pid].gone]:
                del cache[pid]
        self._scanner.forget(pid for pid in labels if not scans[pid].gone)


# Rows.

_NO_ENTRIES: dict = {}


def _rows(states: list[FdState], entries: dict[str, dict]) -> tuple[FdRow, ...]:
    """Return the rows of a process's fds, reusing each fd's previous row when nothing in it changed."""
    rows = []
    for state in states:
        row = state.row
        if state.table is None:
            if row is None:
                row = _build_row(state, None)
        else:
            entry = entries.get(state.table, _NO_ENTRIES).get(state.inode)
            if row is None or (state.entry is not entry and state.entry != entry):
                row = _build_row(state, entry)
        rows.append(row)
    return tuple(rows)


def _build_row(state: FdState, entry: InetEntry | UnixEntry | None) -> FdRow:
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


def _shared_sockets(scans: dict[int, Scan]) -> dict[int, tuple[tuple[int, int], ...]]:
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
        # A sampler passed in belongs to the caller, who closes it; stop() closes one made here.
        self._owns_sampler = sampler is None
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
        a thread stuck in a callback does not keep the interpreter alive. A sampler this
        object created is closed here, even if the thread has not ended yet.
        """
        self._stopping.set()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
        if self._owns_sampler:
            self._sampler.close()
        return ended

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

"""Listing and resolving the fds of processes: the per-fd half of the fd-table sampler.

FdScanner lists /proc/PID/fd of each pid and resolves every fd: it reads the link
target, and for a new or changed fd also its kind, socket protocol and close-on-exec
flag. It keeps those facts per fd between ticks, so an unchanged fd costs one
readlink(). The work runs on a ScanPool in chunks of up to CHUNK_FDS fds, so one
process with many fds is split over the threads too.

This module imports no Textual.
"""

from __future__ import annotations

import functools
import operator
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import psutil

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
)
from .scanpool import Batch, ScanPool
from .socktable import InetEntry, UnixEntry

# fdinfo adds O_CLOEXEC to its octal "flags:" line when the fd is close-on-exec
# (seq_show in fs/proc/fd.c).
O_CLOEXEC_FLAG = 0o2000000
# Fds per task. Each process's fds are cut into chunks of this size, so a process with
# thousands of fds is scanned by every thread, and the threads finish close together.
CHUNK_FDS = 512
# At most about this many fdinfo files are read again per tick to refresh the
# close-on-exec flag. Each read is three system calls (about 20 us here), so with
# thousands of fds the refresh period grows instead of the tick.
CLOEXEC_READS_PER_TICK = 64

# The kernel's name of a socket's protocol (the "system.sockprotoname" xattr of the fd)
# -> (row kind, socket table, address family).
_PROTOCOLS = {
    "TCP": (KIND_TCP, "tcp", "ipv4"),
    "TCPv6": (KIND_TCP, "tcp6", "ipv6"),
    "UDP": (KIND_UDP, "udp", "ipv4"),
    "UDPv6": (KIND_UDP, "udp6", "ipv6"),
}
_fd_of = operator.attrgetter("fd")


@dataclass(slots=True, eq=False)
class FdState:
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

    def same_as(self, other: FdState) -> bool:
        return (self.target, self.kind, self.protocol, self.cloexec, self.error) == (other.target, other.kind, other.protocol, other.cloexec, other.error)


@dataclass(slots=True)
class Scan:
    """The result of listing one process's fds.

    ``unchanged`` is true when the process lists the same fds as in the last tick and
    every item of ``states`` is the FdState object of that tick.
    """

    states: list[FdState]
    listed: int = 0
    error: str | None = None
    gone: bool = False
    unchanged: bool = False


class TickTables(Protocol):
    """The receiver of the socket inodes a scan finds; the sampler reads the tables they need."""

    def start(self, name: str) -> None: ...

    def add_needed(self, found: dict[str, list[int]]) -> None: ...


@dataclass(slots=True)
class _Listed:
    """The fds of one process as the last tick saw them."""

    names: list[str]
    states: dict[str, FdState]
    ordered: list[FdState]
    tables: frozenset[str]


@dataclass(slots=True)
class _Part:
    """The fd states that one chunk of a process's fds resolved to."""

    states: list[FdState]
    changed: bool
    missing: int


@dataclass(slots=True, eq=False)
class _Job:
    """One process in one tick: its open /proc/PID/fd, its names and the parts scanned so far."""

    pid: int
    previous: _Listed | None
    dir_fd: int | None = None
    names: list[str] = field(default_factory=list)
    parts: list[_Part | None] = field(default_factory=list)
    result: Scan | None = None


class FdScanner:
    """List and resolve the fds of processes, caching what each fd's link, xattr and fdinfo gave.

    The close-on-exec flag can change without the link target changing (fcntl
    F_SETFD), so each fd's fdinfo is read again once every ``cloexec_refresh_ticks``
    ticks, spread over the ticks by fd number. With more than
    ``cloexec_refresh_ticks * CLOEXEC_READS_PER_TICK`` fds in all, the period grows so
    that a tick reads about CLOEXEC_READS_PER_TICK of them. ``scan()`` must not be
    called from two threads at once.
    """

    def __init__(self, pool: ScanPool, cloexec_refresh_ticks: int):
        self._pool = pool
        self._refresh = cloexec_refresh_ticks
        self._period = cloexec_refresh_ticks  # this tick's refresh period, in ticks
        self._tick = 0
        self._listed: dict[int, _Listed] = {}
        self._protocols: dict[int, str | None] = {}

    def scan(self, pids: Iterable[int], tables: TickTables) -> dict[int, Scan]:
        """Scan every pid once on the pool; return each pid's Scan."""
        self._tick += 1
        listed = sum(len(entry.names) for entry in self._listed.values())
        self._period = max(self._refresh, -(-listed // CLOEXEC_READS_PER_TICK))
        # Biggest processes first (by the last tick's count), so their chunks start early.
        jobs = [_Job(pid, self._listed.get(pid)) for pid in pids]
        jobs.sort(key=lambda job: -len(job.previous.names) if job.previous else 0)
        scans: dict[int, Scan] = {}
        try:
            self._pool.run([functools.partial(self._list_fds, job, tables) for job in jobs])
        finally:
            for job in jobs:
                if job.dir_fd is not None:
                    os.close(job.dir_fd)
        for job in jobs:
            scans[job.pid] = job.result if job.result is not None else self._merge(job)
        return scans

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the fds of every pid not in ``keep``, and protocols of socket inodes no kept fd has."""
        keep = set(keep)
        for pid in [pid for pid in self._listed if pid not in keep]:
            del self._listed[pid]
        # Pruning the protocol cache costs a pass over every fd, so it waits until
        # inodes of closed sockets make up more than half of the cache.
        listed = sum(len(entry.names) for entry in self._listed.values())
        if len(self._protocols) > 2 * listed + 1024:
            seen = {state.inode for entry in self._listed.values() for state in entry.ordered if state.kind in SOCKET_KINDS}
            self._protocols = {inode: protocol for inode, protocol in self._protocols.items() if inode in seen}

    def forget_pid(self, pid: int) -> None:
        """Drop what is cached about a pid's fds, because the pid now belongs to a new process."""
        self._listed.pop(pid, None)

    # Tasks on the pool.

    def _list_fds(self, job: _Job, tables: TickTables, batch: Batch) -> None:
        """List /proc/PID/fd, queue its chunks on the batch and scan the first chunk here."""
        # Start reading the tables the last tick needed now, so the reads overlap this
        # tick's readlink() calls from the start.
        if job.previous is not None:
            for table in job.previous.tables:
                tables.start(table)
        try:
            job.dir_fd = os.open(f"/proc/{job.pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            job.result = Scan([], gone=True, error="no such process")
            return
        except PermissionError:
            job.result = Scan([], error="permission denied")
            return
        except OSError as exc:
            job.result = Scan([], error=f"cannot list fds: {exc.strerror}")
            return
        try:
            job.names = os.listdir(job.dir_fd)
        except OSError as exc:
            job.result = Scan([], gone=True, error=f"exited while listing fds: {exc.strerror}")
            return
        chunks = [job.names[start : start + CHUNK_FDS] for start in range(0, len(job.names), CHUNK_FDS)]
        job.parts = [None] * len(chunks)
        for index in range(1, len(chunks)):
            batch.add(functools.partial(self._scan_chunk, job, index, chunks[index], tables))
        if chunks:
            self._scan_chunk(job, 0, chunks[0], tables, batch)

    def _scan_chunk(self, job: _Job, index: int, names: list[str], tables: TickTables, batch: Batch) -> None:
        """Read the link of each fd in ``names`` and resolve the fds that are new or changed."""
        readlink = os.readlink
        dir_fd = job.dir_fd
        previous = job.previous.states if job.previous is not None else {}
        tick = self._tick
        refresh = self._period
        states: list[FdState] = []
        found: dict[str, list[int]] = {}
        changed = False
        missing = 0

        # Read every link first, with little Python work between the calls. Each readlink()
        # releases the GIL, and this way the other scan thread seldom waits for it. On 2
        # CPUs the scan of 4,010 fds on 2 threads took about 12 ms like this and 21 ms with
        # each read followed by its resolving. If an fd closed after listdir(), read the
        # chunk again, one fd at a time.
        try:
            targets = [readlink(name, dir_fd=dir_fd) for name in names]
        except OSError:
            targets = [_read_link(name, dir_fd) for name in names]

        for name, target in zip(names, targets):
            if target is None:
                missing += 1  # the fd closed after listdir(), or the process exited
                continue
            state = previous.get(name)
            if state is None or state.target != target or state.error is not None or (state.fd + tick) % refresh == 0:
                resolved = self._resolve(job.pid, int(name), target, state)
                if resolved is None:
                    missing += 1
                    continue
                changed = changed or resolved is not state
                state = resolved

            table = state.table
            if table is not None:
                inodes = found.get(table)
                if inodes is None:
                    inodes = found[table] = []
                    tables.start(table)
                inodes.append(state.inode)
            states.append(state)

        if found:
            tables.add_needed(found)
        job.parts[index] = _Part(states, changed, missing)

    # Merging, on the thread that called scan().

    def _merge(self, job: _Job) -> Scan:
        """Join a process's parts in fd order and keep them for the next tick."""
        parts = [part for part in job.parts if part is not None]
        previous = job.previous
        missing = sum(part.missing for part in parts)
        if missing and _exited(job.pid):
            self._listed.pop(job.pid, None)
            return Scan([], gone=True, error="exited while its fds were read")

        unchanged = (
            previous is not None
            and not missing
            and len(parts) == len(job.parts)
            and not any(part.changed for part in parts)
            and job.names == previous.names
        )
        if unchanged:
            return Scan(previous.ordered, listed=len(job.names), unchanged=True)
        ordered = [state for part in parts for state in part.states]
        # The kernel lists fds in ascending order (proc_readfd_common in fs/proc/fd.c), so
        # this sort costs one comparison per fd. It keeps rows in fd order if that changes.
        ordered.sort(key=_fd_of)
        states = {str(state.fd): state for state in ordered}
        used_tables = frozenset(state.table for state in ordered if state.table is not None)
        self._listed[job.pid] = _Listed(job.names, states, ordered, used_tables)
        return Scan(ordered, listed=len(job.names))

    # Resolving one fd.

    def _resolve(self, pid: int, fd: int, target: str, previous: FdState | None) -> FdState | None:
        """Classify one fd and read its flags; return None if it closed meanwhile."""
        link = f"/proc/{pid}/fd/{fd}"
        state = FdState(fd, target, KIND_OTHER)
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

        state.cloexec, state.error = read_cloexec(f"/proc/{pid}/fdinfo/{fd}", state.inode if state.kind != KIND_OTHER else None)
        if previous is not None and previous.same_as(state):
            return previous
        return state

    def _socket_protocol(self, link: str, inode: int) -> str | None:
        """Return the kernel's protocol name of a socket, cached by inode.

        Return None, without caching, when the fd closed before the xattr was read.
        A kernel without the "system.sockprotoname" xattr caches None, so the socket
        shows as kind ``socket``. Threads of the pool share the cache, and two of them
        may read the xattr of one inode; both store the same name.
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


def _classify_socket(state: FdState, protocol: str | None) -> None:
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


def read_cloexec(path: str, inode: int | None) -> tuple[bool | None, str | None]:
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
    # Look for whole lines only: an epoll fd's "tfd:" lines contain "ino:" too.
    if inode is not None:
        ino = _field(data, b"\nino:")
        if ino is not None and int(ino) != inode:
            return None, ERROR_CHANGED
    flags = _field(data, b"\nflags:")
    if flags is None:
        return None, None
    return bool(int(flags, 8) & O_CLOEXEC_FLAG), None


def _field(data: bytes, label: bytes) -> bytes | None:
    """Return the value after ``label`` up to the end of its line, or None if it is missing."""
    start = data.find(label)
    if start < 0:
        return None
    start += len(label)
    end = data.find(b"\n", start)
    return data[start:] if end < 0 else data[start:end]


def _read_link(name: str, dir_fd: int) -> str | None:
    """Return the target of link ``name`` in ``dir_fd``, or None if it is gone."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _exited(pid: int) -> bool:
    """Tell whether a pid has exited (reaped or a zombie), after some of its fds could not be read."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False

"""The samples of the fd-table sampler: rows, processes and whole samples as plain data.

These frozen dataclasses are what fdtable.FdSampler produces and what a model or UI
reads. ``to_dict()`` and ``from_dict()`` convert them to and from JSON-compatible dicts,
for recording samples as JSON lines and replaying them. ``from_dict()`` ignores keys it
does not know, so recordings stay readable when fields are added, and rejects a known
field of the wrong type with ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

# Row kinds. "socket" is a socket of another family (netlink, packet, ...) or one whose
# protocol could not be read; "other" covers devices, directories and namespace fds.
KIND_TCP = "tcp"
KIND_UDP = "udp"
KIND_UNIX = "unix"
KIND_SOCKET = "socket"
KIND_PIPE = "pipe"
KIND_FILE = "file"
KIND_ANON = "anon"
KIND_OTHER = "other"
SOCKET_KINDS = frozenset({KIND_TCP, KIND_UDP, KIND_UNIX, KIND_SOCKET})

# Row errors: the fd closed, or its number was reused for another file, while it was read.
ERROR_VANISHED = "vanished"
ERROR_CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class FdRow:
    """One open fd of a process.

    ``inode`` is set for sockets and pipes. ``family`` (``ipv4`` or ``ipv6``), ``local``,
    ``remote`` and ``state`` are set for TCP and UDP sockets that the kernel's table
    lists. A socket that is not yet bound or connected, or is already closed, is not
    listed, so these fields are None. (The sock_diag source of newer kernels, seen on
    6.18, also lists bound sockets, in state CLOSE.) Unix sockets get ``path``,
    ``state`` and ``peer_inode`` (the peer is known only from the sock_diag source).
    ``protocol`` is the kernel's protocol name of a socket of kind ``socket``.
    """

    fd: int
    kind: str
    target: str
    cloexec: bool | None = None
    inode: int | None = None
    family: str | None = None
    local: str | None = None
    remote: str | None = None
    state: str | None = None
    path: str | None = None
    peer_inode: int | None = None
    protocol: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        """Return the fields that are not None, as a JSON-compatible dict."""
        return {name: getattr(self, name) for name in _ROW_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping) -> FdRow:
        """Build a row from ``to_dict()`` output, ignoring keys this version does not know.

        Raise ValueError when a known field has a value of the wrong type.
        """
        return cls(**{name: checked_type(name, data[name], types) for name, types in _ROW_TYPES.items() if name in data})


_NONE = type(None)
_ROW_TYPES = {
    "fd": (int,),
    "kind": (str,),
    "target": (str,),
    "cloexec": (bool, _NONE),
    "inode": (int, _NONE),
    "family": (str, _NONE),
    "local": (str, _NONE),
    "remote": (str, _NONE),
    "state": (str, _NONE),
    "path": (str, _NONE),
    "peer_inode": (int, _NONE),
    "protocol": (str, _NONE),
    "error": (str, _NONE),
}
_ROW_FIELDS = tuple(f.name for f in fields(FdRow))
assert set(_ROW_TYPES) == set(_ROW_FIELDS)


def checked_type(name: str, value: object, types: tuple[type, ...]) -> object:
    """Return ``value`` if it is of one of ``types`` (a bool counts only where bool is named); else raise ValueError.

    ``name`` names the field in the message. Use ``type(None)`` in ``types`` to allow null.
    """
    if isinstance(value, types) and (type(value) is not bool or bool in types):
        return value
    expected = " or ".join("null" if kind is _NONE else kind.__name__ for kind in types)
    raise ValueError(f"field {name!r} is {type(value).__name__} {str(value)[:40]!r}; expected {expected}")


@dataclass(frozen=True)
class ProcessSample:
    """One process in a sample: figures from psutil and its fds in fd order.

    ``gone`` is true when the pid does not exist or the process has exited (a zombie).
    ``error`` gives the reason when figures or rows are missing. ``cpu_percent`` is
    None on the first sample of a process, because psutil measures it between two
    calls. ``num_fds`` counts the entries of /proc/PID/fd, including fds that closed
    before they were read. ``status`` is psutil's word for the process state, such as
    ``sleeping``, ``running`` or ``stopped`` (by SIGSTOP).
    """

    pid: int
    label: str = ""
    gone: bool = False
    error: str | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()
    cpu_percent: float | None = None
    rss: int | None = None
    num_fds: int | None = None
    rows: tuple[FdRow, ...] = ()
    status: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-compatible dict; rows become a list of row dicts."""
        data = {
            "pid": self.pid,
            "label": self.label,
            "gone": self.gone,
            "error": self.error,
            "name": self.name,
            "cmdline": list(self.cmdline),
            "cpu_percent": self.cpu_percent,
            "rss": self.rss,
            "num_fds": self.num_fds,
            "status": self.status,
        }
        data["rows"] = [row.to_dict() for row in self.rows]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ProcessSample:
        """Build a process sample from ``to_dict()`` output; raise ValueError for a field of the wrong type."""
        values = {name: checked_type(name, data[name], types) for name, types in _PROCESS_TYPES.items() if name in data}
        cmdline = checked_type("cmdline", data.get("cmdline", []), (list, tuple))
        rows = checked_type("rows", data.get("rows", []), (list, tuple))
        return cls(
            **values,
            cmdline=tuple(checked_type("cmdline item", item, (str,)) for item in cmdline),
            rows=tuple(FdRow.from_dict(checked_type("row", row, (dict,))) for row in rows),
        )


_PROCESS_TYPES = {
    "pid": (int,),
    "label": (str,),
    "gone": (bool,),
    "error": (str, _NONE),
    "name": (str, _NONE),
    "cpu_percent": (float, int, _NONE),
    "rss": (int, _NONE),
    "num_fds": (int, _NONE),
    "status": (str, _NONE),
}


@dataclass(frozen=True)
class Sample:
    """The fd tables of the watched processes at one moment.

    ``mono`` is time.monotonic() when the tick started, the clock of the ``mono`` field
    of events. ``shared`` maps each socket inode that more than one fd refers to onto
    its holders as ``(pid, fd)`` pairs. The holders may be in one process (after dup())
    or in several. ``elapsed_ms`` is how long the tick took.
    """

    mono: float
    processes: Mapping[int, ProcessSample] = field(default_factory=dict)
    shared: Mapping[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    def holders(self, inode: int) -> list[tuple[int, int]]:
        """Return every ``(pid, fd)`` that refers to ``inode``, in pid and fd order."""
        found = []
        for pid in sorted(self.processes):
            found.extend((pid, row.fd) for row in self.processes[pid].rows if row.inode == inode)
        return found

    def to_dict(self) -> dict:
        """Return a JSON-compatible dict (pids and inodes become list items, not keys)."""
        return {
            "mono": self.mono,
            "elapsed_ms": self.elapsed_ms,
            "processes": [self.processes[pid].to_dict() for pid in sorted(self.processes)],
            "shared": [{"inode": inode, "holders": [list(holder) for holder in holders]} for inode, holders in sorted(self.shared.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Sample:
        """Build a sample from ``to_dict()`` output; raise ValueError for a field of the wrong type or a missing one."""
        if "mono" not in data:
            raise ValueError("sample has no 'mono' field")
        items = checked_type("processes", data.get("processes", []), (list, tuple))
        processes = [ProcessSample.from_dict(checked_type("process", item, (dict,))) for item in items]
        shared = {}
        for item in checked_type("shared", data.get("shared", []), (list, tuple)):
            inode = checked_type("shared inode", checked_type("shared item", item, (dict,)).get("inode"), (int,))
            holders = checked_type("holders", item.get("holders"), (list, tuple))
            shared[inode] = tuple(_holder(holder) for holder in holders)
        return cls(
            mono=checked_type("mono", data["mono"], (float, int)),
            processes={process.pid: process for process in processes},
            shared=shared,
            elapsed_ms=checked_type("elapsed_ms", data.get("elapsed_ms", 0.0), (float, int)),
        )


def _holder(value: object) -> tuple[int, int]:
    """Return a ``[pid, fd]`` pair of a shared socket as a tuple; raise ValueError for anything else."""
    pair = checked_type("holder", value, (list, tuple))
    if len(pair) != 2:
        raise ValueError(f"sample holder {str(value)[:40]!r} is not a [pid, fd] pair")
    return (checked_type("holder pid", pair[0], (int,)), checked_type("holder fd", pair[1], (int,)))

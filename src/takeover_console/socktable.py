"""System-wide socket tables: read them once and look up the sockets of some inodes.

There are five tables, named as in /proc/net: ``tcp``, ``tcp6``, ``udp``, ``udp6`` and
``unix``. Each can be read from two sources:

* ``procfs``: the text files /proc/net/TABLE. They list every socket of the network
  namespace, including TIME_WAIT entries that belong to no fd, so they grow with every
  closed connection.
* ``sock_diag``: a NETLINK_SOCK_DIAG dump (the interface ``ss`` uses). It is binary,
  lets the kernel leave out TIME_WAIT and request (NEW_SYN_RECV) entries, and of the
  two sources it is the only one with a Unix socket's peer inode.

Reading and parsing are separate steps, so a caller can read on one thread and parse
on another. Parsers take the set of inodes the caller needs and skip every other entry.
A TCP or UDP entry is ``(local, remote, state)``; a Unix entry is ``(path, state, peer)``.
A ParseCache keeps what earlier parses of a table found, so a TCP or UDP entry, or a
whole sock_diag datagram, that is unchanged since the last read is not parsed again.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import NamedTuple

TABLES = ("tcp", "tcp6", "udp", "udp6", "unix")
PROCFS = "procfs"
SOCK_DIAG = "sock_diag"

# Kernel TCP states (include/net/tcp_states.h), as /proc/net/tcp prints them in hex.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
# UDP reuses the TCP state numbers; like ss, call an unconnected UDP socket UNCONN.
UDP_STATES = {**TCP_STATES, 7: "UNCONN"}
# sock_diag reports a Unix socket's sk_state with the same numbers.
UNIX_DIAG_STATES = {1: "ESTABLISHED", 2: "CONNECTING", 7: "UNCONN", 10: "LISTEN"}
# /proc/net/unix prints the socket's SS_* state, and a listener is marked in the flags.
UNIX_PROC_STATES = {0: "FREE", 1: "UNCONN", 2: "CONNECTING", 3: "ESTABLISHED", 4: "DISCONNECTING"}
UNIX_PROC_LISTENING_FLAG = 0x10000  # __SO_ACCEPTCON

# /proc/net/tcp prints each 32-bit word of an address as a native integer in hex, so on a
# little-endian machine the bytes of every word appear reversed.
_REVERSE_WORDS = sys.byteorder == "little"

# Netlink and sock_diag constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h,
# linux/unix_diag.h).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
INET_DIAG_REQUEST = struct.Struct("=BBBBI48s")  # family, protocol, ext, pad, states, sockid
INET_DIAG_MESSAGE_SIZE = 72
UNIX_DIAG_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
UNIX_DIAG_MESSAGE_SIZE = 16
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
# TIME_WAIT and NEW_SYN_RECV entries never belong to an fd, so the dump leaves them out.
INET_DIAG_STATES = 0xFFFFFFFF & ~((1 << 6) | (1 << 12))
DIAG_RECV_SIZE = 64 * 1024  # receive buffer per datagram; a longer datagram raises EMSGSIZE
DIAG_TIMEOUT = 1.0  # seconds to wait for each part of a dump

_INET_DIAG_QUERY = {
    "tcp": (socket.AF_INET, socket.IPPROTO_TCP),
    "tcp6": (socket.AF_INET6, socket.IPPROTO_TCP),
    "udp": (socket.AF_INET, socket.IPPROTO_UDP),
    "udp6": (socket.AF_INET6, socket.IPPROTO_UDP),
}
_UINT32 = struct.Struct("=I")
_MESSAGE_HEADER = struct.Struct("=IH")  # the length and type of a netlink message
# The length and type of a netlink message and the idiag_inode of the inet_diag_msg
# after its 16-byte header, 68 bytes into the message.
_INET_DIAG_HEADER_AND_INODE = struct.Struct("=IH78xI")


class InetEntry(NamedTuple):
    """One TCP or UDP socket: addresses as ``127.0.0.1:8080`` or ``[::1]:8080``, and its state."""

    local: str
    remote: str
    state: str


class UnixEntry(NamedTuple):
    """One Unix socket: bound path (``@name`` if abstract), state, and the peer's inode."""

    path: str | None
    state: str
    peer: int | None


class ParseCache:
    """Results of earlier parses of one table, reused while the raw bytes stay the same.

    ``entries`` maps the raw bytes of a TCP or UDP entry to its InetEntry. ``datagrams``
    maps each datagram of the last sock_diag dump to the entries parsed from it and the
    inodes it skipped. Use one cache per table and source; ``clear()`` is safe at any time.
    """

    __slots__ = ("entries", "datagrams")

    def __init__(self) -> None:
        self.entries: dict[bytes, InetEntry] = {}
        self.datagrams: dict[bytes, tuple[dict[int, InetEntry], set[int]]] = {}

    def clear(self) -> None:
        """Forget every parsed entry and datagram."""
        self.entries.clear()
        self.datagrams.clear()


class RawTable(NamedTuple):
    """The unparsed content of one table and the source it came from."""

    name: str
    source: str
    data: bytes | list[bytes]


# Reading.


def read_table(name: str, source: str) -> RawTable:
    """Read table ``name`` from ``source`` in one pass; raise OSError if the source fails."""
    if name not in TABLES:
        raise ValueError(f"unknown socket table {name!r}; expected one of {', '.join(TABLES)}")
    if source == PROCFS:
        return RawTable(name, source, read_proc_file(f"/proc/net/{name}"))
    if source == SOCK_DIAG:
        if name == "unix":
            request = UNIX_DIAG_REQUEST.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
        else:
            family, protocol = _INET_DIAG_QUERY[name]
            request = INET_DIAG_REQUEST.pack(family, protocol, 0, 0, INET_DIAG_STATES, bytes(48))
        return RawTable(name, source, dump_sock_diag(request))
    raise ValueError(f"unknown socket table source {source!r}; expected {PROCFS!r} or {SOCK_DIAG!r}")


def read_proc_file(path: str) -> bytes:
    """Read a whole /proc file with large reads, because seq_file files report size 0."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def dump_sock_diag(request: bytes) -> list[bytes]:
    """Send one SOCK_DIAG_BY_FAMILY dump request and return every datagram of the reply.

    Raise OSError when netlink or the family's diag module is missing (the kernel replies
    ENOENT), when the reply is truncated, or when a part takes longer than DIAG_TIMEOUT.
    """
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(DIAG_TIMEOUT)
        sock.send(header + request)
        chunks = []
        while True:
            data, _, flags, _ = sock.recvmsg(DIAG_RECV_SIZE)
            if flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, f"sock_diag reply larger than {DIAG_RECV_SIZE} bytes")
            chunks.append(data)
            if _ends_dump(data):
                return chunks


def _ends_dump(data: bytes) -> bool:
    """Tell whether a datagram contains NLMSG_DONE; raise OSError for NLMSG_ERROR."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind = _MESSAGE_HEADER.unpack_from(data, offset)
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)[0]
            raise OSError(code, f"sock_diag request failed: {os.strerror(code)}")
        if length < NLMSG_HEADER.size:
            raise OSError(errno.EPROTO, f"invalid netlink message length {length}")
        offset += (length + 3) & ~3
    return False


# Parsing.


def parse_table(raw: RawTable, inodes: set[int], cache: ParseCache | None = None) -> dict:
    """Return ``{inode: entry}`` for each of ``inodes`` that the table lists.

    With a ``cache`` from earlier calls, an unchanged socket costs a lookup instead of
    address formatting. A sock_diag TCP or UDP result may then also hold entries of
    inodes that an earlier call asked for, when they come from an unchanged datagram.
    """
    if cache is None:
        cache = ParseCache()
    if raw.name == "unix":
        return parse_unix_diag(raw.data, inodes) if raw.source == SOCK_DIAG else parse_unix_proc(raw.data, inodes)
    states = UDP_STATES if raw.name.startswith("udp") else TCP_STATES
    if raw.source == SOCK_DIAG:
        return parse_inet_diag(raw.data, inodes, states, cache)
    return parse_inet_proc(raw.data, inodes, states, cache.entries)


def format_proc_address(text: bytes) -> str:
    """Format an address of /proc/net/tcp, ``0100007F:1F90``, as ``127.0.0.1:8080``.

    IPv6 addresses (32 hex digits) come out in brackets, ``[::1]:8080``, and an
    IPv4-mapped one as ``[::ffff:127.0.0.1]:8080``.
    """
    host, _, port = text.partition(b":")
    packed = bytes.fromhex(host.decode("ascii"))
    if _REVERSE_WORDS:
        packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    return format_address(packed, int(port, 16))


def format_address(packed: bytes, port: int) -> str:
    """Format a 4-byte or 16-byte address in network order with its port."""
    if len(packed) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, packed)}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, packed)}]:{port}"


def parse_inet_proc(data: bytes, inodes: set[int], states: dict[int, str], cache: dict[bytes, InetEntry]) -> dict[int, InetEntry]:
    """Parse the text of /proc/net/tcp, tcp6, udp or udp6."""
    inode_texts = {b"%d" % inode for inode in inodes}
    entries: dict[int, InetEntry] = {}
    lines = data.split(b"\n")
    # The first line is the column header. Columns: sl, local, remote, st, tx:rx queue,
    # timer, retransmits, uid, timeout, inode, then protocol-specific ones.
    for line in lines[1:]:
        fields = line.split(None, 10)
        if len(fields) < 10 or fields[9] not in inode_texts:
            continue
        key = b" ".join(fields[1:4])
        entry = cache.get(key)
        if entry is None:
            number = int(fields[3], 16)
            entry = InetEntry(format_proc_address(fields[1]), format_proc_address(fields[2]), states.get(number, f"0x{number:02X}"))
            cache[key] = entry
        entries[int(fields[9])] = entry
        if len(entries) == len(inode_texts):
            break
    return entries


def parse_inet_diag(chunks: list[bytes], inodes: set[int], states: dict[int, str], cache: ParseCache) -> dict[int, InetEntry]:
    """Parse the datagrams of an inet_diag dump, reusing the entries of datagrams seen in the last dump.

    A datagram's earlier result is valid while it skipped none of ``inodes``.
    """
    entries: dict[int, InetEntry] = {}
    seen: dict[bytes, tuple[dict[int, InetEntry], set[int]]] = {}
    for data in chunks:
        known = cache.datagrams.get(data)
        if known is None or not known[1].isdisjoint(inodes):
            known = _parse_inet_datagram(data, inodes, states, cache.entries)
        seen[data] = known
        entries.update(known[0])
    cache.datagrams = seen
    return entries


def _parse_inet_datagram(data: bytes, inodes: set[int], states: dict[int, str], cache: dict[bytes, InetEntry]) -> tuple[dict[int, InetEntry], set[int]]:
    """Parse one datagram of struct inet_diag_msg messages; return the entries and the inodes skipped."""
    entries: dict[int, InetEntry] = {}
    skipped: set[int] = set()
    header_size = NLMSG_HEADER.size
    minimum = header_size + INET_DIAG_MESSAGE_SIZE
    unpack = _INET_DIAG_HEADER_AND_INODE.unpack_from
    offset = 0
    end = len(data) - minimum
    while offset <= end:
        # The inode is read before the type and length are checked, because it is in
        # range either way and one unpack is cheaper than two.
        length, kind, inode = unpack(data, offset)
        if length < header_size:
            break
        message = offset + header_size
        offset += (length + 3) & ~3
        if kind != SOCK_DIAG_BY_FAMILY or length < minimum:
            continue
        if inode not in inodes:
            skipped.add(inode)
            continue
        # Family, state, timer, retransmits, then inet_diag_sockid: sport, dport
        # (big-endian), src[16], dst[16]. A change of timer or retransmits only
        # costs a cache miss.
        key = data[message : message + 40]
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = _inet_diag_entry(key, states)
        entries[inode] = entry
    return entries, skipped


def _inet_diag_entry(message: bytes, states: dict[int, str]) -> InetEntry:
    size = 4 if message[0] == socket.AF_INET else 16
    local_port, remote_port = struct.unpack_from("!HH", message, 4)
    number = message[1]
    return InetEntry(
        format_address(message[8 : 8 + size], local_port),
        format_address(message[24 : 24 + size], remote_port),
        states.get(number, f"0x{number:02X}"),
    )


def parse_unix_proc(data: bytes, inodes: set[int]) -> dict[int, UnixEntry]:
    """Parse /proc/net/unix; the peer inode is not in this file, so ``peer`` is None."""
    entries: dict[int, UnixEntry] = {}
    # Columns: Num, RefCount, Protocol, Flags, Type, St, Inode, then Path if bound.
    for line in data.split(b"\n")[1:]:
        fields = line.split(None, 7)
        if len(fields) < 7 or not fields[6].isdigit():
            continue
        inode = int(fields[6])
        if inode not in inodes:
            continue
        if int(fields[3], 16) & UNIX_PROC_LISTENING_FLAG:
            state = "LISTEN"
        else:
            number = int(fields[5], 16)
            state = UNIX_PROC_STATES.get(number, f"0x{number:02X}")
        path = os.fsdecode(fields[7]) if len(fields) == 8 else None
        entries[inode] = UnixEntry(path, state, None)
    return entries


def parse_unix_diag(chunks: list[bytes], inodes: set[int]) -> dict[int, UnixEntry]:
    """Parse the datagrams of a unix_diag dump with UNIX_DIAG_NAME and UNIX_DIAG_PEER."""
    entries: dict[int, UnixEntry] = {}
    for data in chunks:
        for offset in _diag_messages(data, UNIX_DIAG_MESSAGE_SIZE):
            message = offset + NLMSG_HEADER.size
            inode = _UINT32.unpack_from(data, message + 4)[0]
            if inode not in inodes:
                continue
            number = data[message + 2]
            path = None
            peer = None
            end = offset + _UINT32.unpack_from(data, offset)[0]
            attribute = message + UNIX_DIAG_MESSAGE_SIZE
            while attribute + 4 <= end:
                length, kind = struct.unpack_from("=HH", data, attribute)
                if length < 4:
                    break
                value = data[attribute + 4 : attribute + length]
                if kind == UNIX_DIAG_NAME:
                    path = _format_unix_name(value)
                elif kind == UNIX_DIAG_PEER and len(value) >= 4:
                    peer = _UINT32.unpack_from(value)[0]
                attribute += (length + 3) & ~3
            entries[inode] = UnixEntry(path, UNIX_DIAG_STATES.get(number, f"0x{number:02X}"), peer)
    return entries


def _format_unix_name(value: bytes) -> str | None:
    """Format sun_path bytes as /proc/net/unix does: an abstract name starts with ``@``."""
    if not value:
        return None
    if value[0] == 0:
        return "@" + os.fsdecode(value[1:].replace(b"\0", b"@"))
    return os.fsdecode(value.rstrip(b"\0"))


def _diag_messages(data: bytes, minimum: int):
    """Yield the offset of each SOCK_DIAG_BY_FAMILY message in one datagram."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind = _MESSAGE_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        if kind == SOCK_DIAG_BY_FAMILY and length >= NLMSG_HEADER.size + minimum:
            yield offset
        offset += (length + 3) & ~3

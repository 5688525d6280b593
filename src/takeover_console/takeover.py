"""Listener takeover: a new generation takes the listening sockets of the running one.

Phases, as events of kind ``takeover`` with a ``phase`` field:

1. ``requested``: the new process connects (a server to the old one's control socket, a
   forwarder to the handoff socket), passes the SO_PEERCRED uid check, and sends HELLO
   with intent "takeover". One takeover runs at a time; another gets BYE with a reason.
2. ``fds_sent`` / ``fds_received``: the old process sends every listening socket in
   LISTENERS frames of at most ipc.MAX_FDS_PER_MESSAGE fds, each described by family,
   type and address. The new one checks each fd against its description before use.
3. ``ready``: the new process accepts on the sockets (and, for a server, has its own
   forwarder channel), then sends READY. Until READY the old process owns everything.
4. ``draining`` / ``drained``: the old process stops accepting, finishes its in-flight
   work up to its drain timeout, sends DRAINED with what it cut off, and exits.
5. ``aborted``: the new process crashed, closed the channel, sent ABORT, or stayed
   silent past the ready timeout. The old one keeps accepting as before.

The sockets are passed, not re-bound, so the listener keeps its inode and accept queue
and no connection is refused during a release. The sender sends its own fds and keeps
them open until it exits; it never shuts a listener down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable

from takeover_console import events as ev
from takeover_console import ipc
from takeover_console.channel import Channel
from takeover_console.events import EventLog

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 5.0
HELLO_TIMEOUT = 2.0


class TakeoverError(Exception):
    """A takeover could not be completed; the message names the phase and the reason."""


def batches(items: list, size: int = ipc.MAX_FDS_PER_MESSAGE) -> list[list]:
    """Split ``items`` into lists of at most ``size``, so no message passes the fd limit."""
    return [items[start : start + size] for start in range(0, len(items), size)] or [[]]


# The old generation's side.


class DonorSession:
    """One takeover, seen from the process that owns the listeners now."""

    def __init__(
        self,
        channel: Channel,
        events: EventLog,
        listeners: list[socket.socket],
        peer_pid: int,
        ready_timeout: float,
        on_ready: Callable[["DonorSession"], None],
        on_end: Callable[["DonorSession"], None],
    ):
        self.channel = channel
        self.events = events
        self.listeners = listeners
        self.peer_pid = peer_pid
        self.on_ready = on_ready
        self.on_end = on_end
        self.ready = False
        self.ended = False
        self._aborted = False
        self._timer = asyncio.get_running_loop().call_later(ready_timeout, self._on_timeout, ready_timeout)

    def start(self) -> None:
        """Reply to HELLO and send every listener, in batches."""
        self.events.emit(ev.TAKEOVER, side="old", phase="requested", peer_pid=self.peer_pid)
        log.info("takeover requested by pid %d", self.peer_pid)
        self.channel.send(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": self.events.role, "pid": self.events.pid, "gen": self.events.generation})
        groups = batches(self.listeners)
        for index, group in enumerate(groups):
            sockets = [ipc.describe_listener(sock) for sock in group]
            fds = tuple(sock.fileno() for sock in group)
            self.channel.send(ipc.LISTENERS, {"sockets": sockets, "last": index == len(groups) - 1}, fds)
        inodes = [ipc.socket_inode(sock.fileno()) for sock in self.listeners]
        self.events.emit(ev.TAKEOVER, side="old", phase="fds_sent", peer_pid=self.peer_pid, count=len(self.listeners), batches=len(groups), inodes=inodes)

    def on_frame(self, frame: ipc.Frame) -> None:
        """Handle READY or ABORT from the new process."""
        frame.close_fds()
        if frame.error is not None:
            self.abort(f"invalid {frame.name} frame from the new process: {frame.error}")
        elif frame.type == ipc.READY and not self.ready:
            self._timer.cancel()
            self.ready = True
            self.events.emit(ev.TAKEOVER, side="old", phase="ready", peer_pid=self.peer_pid)
            log.info("new generation pid %d is ready; stopping accepting and draining", self.peer_pid)
            self.on_ready(self)
        elif frame.type == ipc.ABORT:
            self.abort(f"the new process gave up: {frame.payload.get('reason', 'no reason given')}")
        elif frame.type == ipc.BYE:
            log.info("new process sent BYE: %s", frame.payload.get("reason"))
        else:
            log.warning("unexpected %s frame during takeover; ignored", frame.name)

    def on_close(self, reason: str) -> None:
        """Abort the takeover when the channel closes before READY."""
        if not self.ready:
            self.abort(f"channel closed before READY: {reason}")
        else:
            self._end()

    def _on_timeout(self, seconds: float) -> None:
        self.abort(f"no READY within {seconds:g} s")

    def abort(self, reason: str) -> None:
        """Give up this takeover; the old process keeps serving as before."""
        if self.ready or self.ended or self._aborted:
            return
        # Set first: closing the channel below calls on_close(), which calls abort() again.
        self._aborted = True
        self.events.emit(ev.TAKEOVER, side="old", phase="aborted", peer_pid=self.peer_pid, reason=reason)
        log.warning("takeover by pid %d aborted: %s; keeping the listeners", self.peer_pid, reason)
        self.channel.send(ipc.BYE, {"reason": f"takeover aborted: {reason}"})
        self.channel.close(f"takeover aborted: {reason}")
        self._end()

    def finish(self, served: int, cut: int, left: int = 0) -> None:
        """Report the drain to the new process and close the channel.

        ``left`` counts the connections a server left to its forwarder, which still serves them.
        """
        self.events.emit(ev.TAKEOVER, side="old", phase="drained", peer_pid=self.peer_pid, served=served, cut=cut, left=left)
        self.channel.send(ipc.DRAINED, {"served": served, "cut": cut, "left": left})
        self.channel.close("drained")
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._timer.cancel()
            self.on_end(self)


def refuse_busy(channel: Channel, events: EventLog, peer_pid: int) -> None:
    """Turn away a second takeover while one is running."""
    reason = "another takeover is already in progress"
    events.emit(ev.TAKEOVER, side="old", phase="refused", peer_pid=peer_pid, reason=reason)
    log.warning("refusing takeover by pid %d: %s", peer_pid, reason)
    channel.send(ipc.BYE, {"reason": reason})
    channel.close(reason)


# The new generation's side.


@dataclass
class Inheritance:
    """The listeners a new process received, with their descriptions and the channel."""

    listeners: list[tuple[socket.socket, dict]]
    channel: Channel
    old_pid: int
    old_generation: int
    drained: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def ready(self) -> bool:
        """Tell the old process that the new one accepts now; False when the channel is gone.

        A closed channel means the old process already gave up on this takeover (for
        example after --ready-timeout while this one was stopped) and kept its listeners.
        """
        if self.channel.closed:
            return False
        return self.channel.send(ipc.READY, {})

    def abort(self, reason: str) -> None:
        """Tell the old process to keep everything, and close the channel."""
        self.channel.send(ipc.ABORT, {"reason": reason})
        self.channel.close(f"aborted: {reason}")


async def inherit(path: str, role: str, events: EventLog, allowed_uids: frozenset[int]) -> Inheritance:
    """Connect to the running process at ``path`` and receive its listeners.

    Raises TakeoverError when the peer cannot be reached, is refused, refuses us, or sends
    a listener that does not match its description (then ABORT goes to the old one).
    """
    from takeover_console.handoff_link import uid_allowed

    loop = asyncio.get_running_loop()
    if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
        raise TakeoverError(f"{path} is not a socket, so no running {role} listens there; pass the running {role}'s socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, path)
    except OSError as exc:
        sock.close()
        raise TakeoverError(f"cannot reach the running {role} at {path}: {exc.strerror}; is it running?") from None
    creds = ipc.peer_credentials(sock)
    if not uid_allowed(creds.uid, allowed_uids):
        sock.close()
        events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=path, reason=f"uid {creds.uid} is not allowed")
        raise TakeoverError(f"the process at {path} (pid {creds.pid}) runs as uid {creds.uid}, which is not allowed")

    received: asyncio.Queue = asyncio.Queue()
    listeners: list[tuple[socket.socket, dict]] = []
    state: dict = {}

    def on_frame(frame: ipc.Frame) -> None:
        received.put_nowait(frame)

    def on_close(reason: str) -> None:
        received.put_nowait(reason)
        drained = state.get("drained")
        if drained is not None and not drained.done():
            drained.set_result({"closed": reason})

    channel = Channel(sock, on_frame, on_close, name=f"takeover channel to pid {creds.pid}")
    channel.start()
    channel.send(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": role, "intent": ipc.INTENT_TAKEOVER, "pid": events.pid, "gen": events.generation})
    try:
        async with asyncio.timeout(HELLO_TIMEOUT * 2):
            hello = await _next_frame(received, ipc.HELLO)
            events.emit(ev.TAKEOVER, side="new", phase="requested", peer_pid=hello.payload.get("pid", creds.pid))
            while True:
                frame = await _next_frame(received, ipc.LISTENERS)
                descriptions = frame.payload.get("sockets")
                if not isinstance(descriptions, list) or len(descriptions) != len(frame.fds):
                    frame.close_fds()
                    raise TakeoverError(f"LISTENERS describes {len(descriptions or [])} sockets but carries {len(frame.fds)} fds")
                for fd, description in zip(frame.fds, descriptions):
                    listeners.append((ipc.adopt_listener(fd, description), description))
                if frame.payload.get("last"):
                    break
    except (TakeoverError, ipc.InvalidFd, TimeoutError) as exc:
        for listener, _ in listeners:
            listener.close()
        reason = str(exc) or "timed out waiting for the listeners"
        if not channel.closed:
            channel.send(ipc.ABORT, {"reason": reason})
            channel.close(reason)
        raise TakeoverError(f"takeover through {path} failed: {reason}") from None

    inheritance = Inheritance(listeners=listeners, channel=channel, old_pid=int(hello.payload.get("pid") or creds.pid), old_generation=int(hello.payload.get("gen") or 1))
    state["drained"] = inheritance.drained

    def after_ready(frame: ipc.Frame) -> None:
        frame.close_fds()
        if inheritance.drained.done():
            return
        if frame.type == ipc.DRAINED:
            inheritance.drained.set_result(frame.payload)
        elif frame.type == ipc.BYE:
            # The old process says why it closes: an abort means it kept the listeners.
            inheritance.drained.set_result({"aborted": str(frame.payload.get("reason", "no reason given"))})

    channel._on_frame = after_ready
    while not received.empty():
        item = received.get_nowait()
        if isinstance(item, ipc.Frame):
            after_ready(item)
    return inheritance


async def report_drained(inheritance: Inheritance, events: EventLog, on_aborted: Callable[[str], None]) -> None:
    """Wait for the old generation's DRAINED and record it as the new side's ``drained`` phase.

    When the old process instead says it aborted the takeover (it kept its listeners),
    ``on_aborted(reason)`` runs, so this process stops rather than accept beside it.
    """
    outcome = await inheritance.drained
    if "aborted" in outcome:
        reason = outcome["aborted"]
        events.emit(ev.TAKEOVER, side="new", phase="aborted", peer_pid=inheritance.old_pid, reason=reason)
        log.error("the old %s pid %d kept its listeners (%s); this generation stops", events.role, inheritance.old_pid, reason)
        on_aborted(reason)
        return
    if "closed" in outcome:
        log.warning("old %s pid %d closed the takeover channel without DRAINED: %s", events.role, inheritance.old_pid, outcome["closed"])
        return
    events.emit(ev.TAKEOVER, side="new", phase="drained", peer_pid=inheritance.old_pid, served=outcome.get("served"), cut=outcome.get("cut"), left=outcome.get("left", 0))
    log.info("old %s pid %d drained: %s served, %s cut off", events.role, inheritance.old_pid, outcome.get("served"), outcome.get("cut"))


async def _next_frame(received: asyncio.Queue, wanted: int) -> ipc.Frame:
    while True:
        item = await received.get()
        if isinstance(item, str):
            raise TakeoverError(f"channel closed: {item}")
        if item.error is not None:
            item.close_fds()
            raise TakeoverError(f"invalid {item.name} frame: {item.error}")
        if item.type == ipc.BYE:
            raise TakeoverError(f"rejected by the running process: {item.payload.get('reason', 'no reason given')}")
        if item.type == wanted:
            return item
        item.close_fds()
        log.warning("unexpected %s frame while waiting for %s; ignored", item.name, ipc.FRAME_NAMES[wanted])

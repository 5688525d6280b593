"""The server's side of the handoff: the persistent native channel and the seed dialer.

Ownership rules of the native protocol. With "done" (the default) the server keeps its
copy of a connection's fd until the forwarder reports DONE, after its reply. If the
channel closes first (the forwarder died), the server looks at the socket: when no reply
was written it serves the request, which the forwarder only peeked at; otherwise it
closes its copy. So every request gets exactly one reply whatever the instant of the
crash. With "taken" the server closes its copy at TAKEN, which holds fewer fds for
long-lived connections but loses the requests a dying forwarder had taken. The server
never calls shutdown() on a handed-over socket, which would end it for the forwarder
too. An offer that gets REJECTED, no reply by its deadline, or whose channel closes, is
served by the server.

Every OFFER carries ``deadline_ns`` on CLOCK_MONOTONIC, which all processes of one host
share. The forwarder takes an offer only before its deadline, and the server, when the
deadline passes, first reads every frame already waiting on the channel. A TAKEN that
the forwarder sent before the deadline is therefore always seen in time. When the
forwarder finds after sending TAKEN that the deadline has passed, it asks with QUERY
and serves only if the VERDICT says so, so no connection is answered by both sides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from takeover_console import events as ev
from takeover_console import ipc
from takeover_console.channel import Channel
from takeover_console.events import EventLog
from takeover_console.logs import RepeatLimiter, repeats_note
from takeover_console.serving import finish_after_reply, reply_written

if TYPE_CHECKING:
    from takeover_console.server import Connection, ServerConfig

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 2.0
# Offers whose owner is remembered, for answering QUERY after a late TAKEN.
REMEMBERED_OUTCOMES = 16384
# Our ids are "<pid>:<n>"; a longer id in QUERY is not ours and is not echoed back.
MAX_ID_LENGTH = 64

Fallback = Callable[["Connection", str], None]


def uid_allowed(uid: int, allowed: frozenset[int]) -> bool:
    """True when ``uid`` may talk to us: our own uid unless a list of uids is given."""
    return uid in allowed if allowed else uid == os.getuid()


@dataclass
class ForwarderChannel:
    """One channel to one forwarder process, with the futures of its HELLO and its close."""

    channel: Channel
    peer_pid: int
    hello: asyncio.Future
    closed: asyncio.Future


@dataclass
class HeldConnection:
    """A connection the forwarder took while the server keeps its copy until DONE."""

    conn: "Connection"
    via: ForwarderChannel


@dataclass
class PendingOffer:
    """An offer sent and not yet answered; the server still holds the connection."""

    conn: "Connection"
    sent_ns: int
    deadline_ns: int
    timer: asyncio.TimerHandle
    via: ForwarderChannel


class NativeLink:
    """The persistent, acknowledged channel to the forwarder, reconnected with backoff.

    During a forwarder takeover the old forwarder sends MIGRATE: the link opens a second
    channel on the same path (the new forwarder accepts there now), makes it current, and
    says BYE on the old one, which the old forwarder closes once it has answered every
    offer sent on it. Offers are tracked per channel, so closing one channel falls back
    only the offers sent on it.
    """

    def __init__(self, config: "ServerConfig", events: EventLog, fallback: Fallback):
        self.config = config
        self.events = events
        self._fallback = fallback
        self._loop = asyncio.get_running_loop()
        self.current: ForwarderChannel | None = None
        # Set when an offer timed out; cleared by any frame from the forwarder.
        self.unresponsive = False
        self.pending: dict[str, PendingOffer] = {}
        self.held: dict[str, HeldConnection] = {}
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._stopping = False
        # Set by close(): from then on a channel closes because this server leaves, not because the forwarder did.
        self._closing = False
        # Connections the forwarder took and still served when this server closed its channel.
        self.left_count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._migrating = False
        self._connect_errors = RepeatLimiter(interval=10.0)
        self._frame_errors = RepeatLimiter()

    @property
    def ready(self) -> bool:
        """True while a channel to a forwarder is up."""
        return self.current is not None and not self.current.channel.closed

    @property
    def channel(self) -> Channel | None:
        """The current channel, if any."""
        return self.current.channel if self.current is not None else None

    @property
    def pending_count(self) -> int:
        """Offers waiting for an answer, and taken connections waiting for DONE."""
        return len(self.pending) + len(self.held)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the channel; return True when it is up.

        Returns at once when no forwarder is listening, since waiting would not bring one.
        """
        deadline = self._loop.time() + timeout
        while not self.ready and self._loop.time() < deadline:
            if not os.path.exists(self.config.handoff_path):
                return False
            await asyncio.sleep(0.01)
        return self.ready

    async def run(self) -> None:
        """Keep a channel to the forwarder up, reconnecting with capped exponential backoff."""
        delay = self.config.reconnect_min
        while not self._stopping:
            opened = await self._open_channel()
            if opened is None:
                delay = min(delay * 2, self.config.reconnect_max)
                await asyncio.sleep(delay * random.uniform(0.8, 1.0))
                continue
            delay = self.config.reconnect_min
            self._make_current(opened)
            # A migration replaces the current channel; wait until the current one closes.
            while self.current is not None and not self.current.closed.done():
                await asyncio.shield(self.current.closed)

    async def _open_channel(self) -> ForwarderChannel | None:
        path = str(self.config.handoff_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, path)
        except OSError as exc:
            sock.close()
            suppressed = self._connect_errors.check(f"{exc.errno}")
            if suppressed is not None:
                log.info("forwarder unreachable at %s: %s; serving connections here%s", path, exc.strerror, repeats_note(suppressed))
            return None
        creds = ipc.peer_credentials(sock)
        if not uid_allowed(creds.uid, self.config.allowed_uids):
            sock.close()
            reason = f"uid {creds.uid} is not allowed"
            suppressed = self._connect_errors.check("refused")
            if suppressed is not None:
                log.warning("refusing forwarder pid %d at %s: %s%s", creds.pid, path, reason, repeats_note(suppressed))
            self.events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=path, reason=reason)
            return None

        holder: list[ForwarderChannel] = []
        channel = Channel(sock, lambda frame: self._on_frame(holder[0], frame), lambda reason: self._on_close(holder[0], reason), name=f"channel to forwarder pid {creds.pid}")
        opened = ForwarderChannel(channel, creds.pid, self._loop.create_future(), self._loop.create_future())
        holder.append(opened)
        channel.start()
        channel.send(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": "server", "pid": self.events.pid, "gen": self.events.generation})
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await asyncio.shield(opened.hello)
        except TimeoutError:
            channel.close(f"no HELLO from forwarder within {HELLO_TIMEOUT:g} s")
            return None
        except ConnectionError:
            return None
        if hello.get("role") != "forwarder":
            channel.close(f"peer introduced itself as {hello.get('role')!r}, expected 'forwarder'")
            return None
        # The forwarder's own pid: SO_PEERCRED names the process that created the listening socket,
        # which after a forwarder takeover is an earlier generation.
        opened.peer_pid = int(hello.get("pid") or creds.pid)
        self.events.emit(
            ev.CHANNEL_UP,
            peer_pid=opened.peer_pid,
            peer_role="forwarder",
            peer_gen=hello.get("gen"),
            fd=channel.fd,
            inode=channel.inode,
            path=path,
        )
        log.info("channel up to forwarder pid %d (generation %s) at %s", opened.peer_pid, hello.get("gen"), path)
        return opened

    def _make_current(self, opened: ForwarderChannel) -> None:
        self.current = opened
        self.unresponsive = False

    def dispatch(self, conn: "Connection") -> str | None:
        """Offer ``conn`` to the forwarder; return a fallback reason when it cannot be offered."""
        if not self.ready or self._stopping:
            return "no forwarder"
        if self.unresponsive:
            return "forwarder not answering"
        via = self.current
        now = time.monotonic_ns()
        deadline = now + int(self.config.reply_timeout * 1e9)
        payload = {"id": conn.id, "peer": conn.peer, "local": conn.local, "fd": conn.fd, "deadline_ns": deadline, "done": self.config.ownership == "done"}
        if not via.channel.send(ipc.OFFER, payload, (conn.fd,)):
            return "channel down"
        timer = self._loop.call_at(deadline / 1e9, self._on_deadline, conn.id)
        self.pending[conn.id] = PendingOffer(conn, now, deadline, timer, via)
        self._idle.clear()
        return None

    def report_offered(self, conn: "Connection") -> None:
        """Emit the event of an offer that dispatch() sent, with the time it was sent."""
        offer = self.pending.get(conn.id)
        sent_ns = offer.sent_ns if offer is not None else time.monotonic_ns()
        self.events.emit(ev.OFFERED, conn=conn.id, fd=conn.fd, inode=conn.inode, mono=round(sent_ns / 1e9, 6))

    def _on_deadline(self, conn_id: str) -> None:
        offer = self.pending.get(conn_id)
        if offer is None:
            return
        if time.monotonic_ns() < offer.deadline_ns:
            offer.timer = self._loop.call_at(offer.deadline_ns / 1e9, self._on_deadline, conn_id)
            return
        # A TAKEN sent before the deadline is already in our receive queue: read it first.
        offer.via.channel.poll()
        offer = self._resolve(conn_id, "server")
        if offer is None:
            return
        timeout_ms = self.config.reply_timeout * 1000
        log.warning("offer %s got no reply within %g ms; serving it here", conn_id, timeout_ms)
        self._fallback(offer.conn, f"no reply within {timeout_ms:g} ms")
        if not self.unresponsive and offer.via is self.current:
            self.unresponsive = True
            offer.via.channel.send(ipc.PING, {"sent_ns": time.monotonic_ns()})

    def _resolve(self, conn_id: str, owner: str) -> PendingOffer | None:
        offer = self.pending.pop(conn_id, None)
        if offer is None:
            return None
        offer.timer.cancel()
        self._owners[conn_id] = owner
        if len(self._owners) > REMEMBERED_OUTCOMES:
            self._owners.popitem(last=False)
        self._check_idle()
        return offer

    def _check_idle(self) -> None:
        if not self.pending and not self.held:
            self._idle.set()

    def _on_frame(self, via: ForwarderChannel, frame: ipc.Frame) -> None:
        frame.close_fds()
        if via is self.current:
            self.unresponsive = False
        if frame.error is not None:
            suppressed = self._frame_errors.check(frame.error)
            if suppressed is not None:
                log.warning("invalid %s frame from forwarder: %s%s", frame.name, frame.error, repeats_note(suppressed))
            self.events.emit(ev.ERROR, message=f"invalid {frame.name} frame from forwarder: {frame.error}")
            return
        handler = self._handlers.get(frame.type)
        if handler is None:
            log.warning("unexpected %s frame from forwarder; ignored", frame.name)
            return
        handler(self, via, frame.payload)

    def _on_hello(self, via: ForwarderChannel, payload: dict) -> None:
        if not via.hello.done():
            via.hello.set_result(payload)

    def _on_taken(self, via: ForwarderChannel, payload: dict) -> None:
        conn_id = str(payload.get("id"))
        offer = self._resolve(conn_id, "forwarder")
        if offer is None:
            if self._owners.get(conn_id) == "server":
                log.warning("TAKEN for %s arrived after its deadline; the server already serves it", conn_id)
            else:
                log.warning("TAKEN for unknown connection %s; ignored", conn_id)
            return
        conn = offer.conn
        round_trip_ms = (time.monotonic_ns() - offer.sent_ns) / 1e6
        self.events.emit(ev.TAKEN, conn=conn.id, fd=conn.fd, peer_fd=payload.get("fd"), latency_ms=round(round_trip_ms, 3))
        if self.config.ownership == "done":
            self.held[conn.id] = HeldConnection(conn, via)
            self._idle.clear()
            return
        self._release_later(conn)

    def _on_done(self, via: ForwarderChannel, payload: dict) -> None:
        held = self.held.pop(str(payload.get("id")), None)
        if held is None:
            return
        self._check_idle()
        self._release_later(held.conn)

    def _release_later(self, conn: "Connection") -> None:
        if self.config.release_delay > 0:
            # Slow motion: keep our copy a visible moment, so both fd tables show the socket.
            self._loop.call_later(self.config.release_delay, self._release, conn)
        else:
            self._release(conn)

    def _release(self, conn: "Connection") -> None:
        conn.sock.close()
        self.events.emit(ev.RELEASED, conn=conn.id, fd=conn.fd)

    def _on_rejected(self, via: ForwarderChannel, payload: dict) -> None:
        conn_id = str(payload.get("id"))
        reason = str(payload.get("reason", "no reason given"))
        offer = self._resolve(conn_id, "server")
        if offer is None:
            log.warning("REJECTED for unknown connection %s (%s); ignored", conn_id, reason)
            return
        self.events.emit(ev.REJECTED, conn=conn_id, fd=offer.conn.fd, reason=reason)
        self._fallback(offer.conn, f"rejected by forwarder: {reason}")

    def _on_query(self, via: ForwarderChannel, payload: dict) -> None:
        conn_id = str(payload.get("id"))
        if len(conn_id) > MAX_ID_LENGTH:
            log.warning("QUERY with an id of %d characters ignored (limit %d)", len(conn_id), MAX_ID_LENGTH)
            return
        owner = self._owners.get(conn_id, "server")
        self.events.emit(ev.QUERIED, conn=conn_id, owner=owner)
        log.info("forwarder asked who serves %s: %s", conn_id, owner)
        via.channel.send(ipc.VERDICT, {"id": conn_id, "owner": owner})

    def _on_bye(self, via: ForwarderChannel, payload: dict) -> None:
        log.info("forwarder pid %d is closing the channel: %s", via.peer_pid, payload.get("reason", "no reason given"))

    def _on_pong(self, via: ForwarderChannel, payload: dict) -> None:
        log.info("forwarder pid %d replied to PING; offering connections again", via.peer_pid)

    def _on_migrate(self, via: ForwarderChannel, payload: dict) -> None:
        if via is not self.current or self._migrating or self._stopping:
            return
        self._migrating = True
        log.info("forwarder pid %d hands over to pid %s; opening a channel to it", via.peer_pid, payload.get("successor_pid"))
        asyncio.create_task(self._migrate(via), name="migrate-channel")

    async def _migrate(self, old: ForwarderChannel) -> None:
        try:
            opened = await self._open_channel()
        finally:
            self._migrating = False
        if opened is None:
            log.warning("could not open a channel to the new forwarder; staying on pid %d until it closes", old.peer_pid)
            return
        self._make_current(opened)
        # The old forwarder answers every offer sent before this BYE, then closes the channel.
        old.channel.send(ipc.BYE, {"reason": f"migrated to forwarder pid {opened.peer_pid}"})
        if not old.closed.done():
            old.closed.set_result("migrated")

    _handlers = {
        ipc.HELLO: _on_hello,
        ipc.TAKEN: _on_taken,
        ipc.REJECTED: _on_rejected,
        ipc.QUERY: _on_query,
        ipc.BYE: _on_bye,
        ipc.PONG: _on_pong,
        ipc.MIGRATE: _on_migrate,
        ipc.DONE: _on_done,
    }

    def _on_close(self, via: ForwarderChannel, reason: str) -> None:
        for conn_id in [conn_id for conn_id, offer in self.pending.items() if offer.via is via]:
            offer = self._resolve(conn_id, "server")
            self._fallback(offer.conn, f"channel down before a reply: {reason}")
        if self._closing:
            self._leave_held(via)
        else:
            self._recover_held(via)
        if via.hello.done():
            self.events.emit(ev.CHANNEL_DOWN, reason=reason, peer_pid=via.peer_pid)
            level = logging.INFO if self._stopping or via is not self.current else logging.WARNING
            log.log(level, "channel to forwarder pid %d down: %s", via.peer_pid, reason)
        else:
            via.hello.set_exception(ConnectionError(reason))
            via.hello.exception()
        if via is self.current:
            self.current = None
        if not via.closed.done():
            via.closed.set_result(reason)

    def _leave_held(self, via: ForwarderChannel) -> None:
        """Close our copy of each connection the forwarder took and still serves, as this server leaves.

        This side closed the channel, so the forwarder is still running and replies on
        these connections itself. The server neither serves them (a second reply) nor
        shuts them down.
        """
        left = [conn_id for conn_id, held in self.held.items() if held.via is via]
        self.left_count += len(left)
        for conn_id in left:
            conn = self.held.pop(conn_id).conn
            conn.sock.close()
            self.events.emit(ev.RELEASED, conn=conn.id, fd=conn.fd)
        if left:
            log.info("closed our copy of %d connections that forwarder pid %d took and still serves", len(left), via.peer_pid)
        self._check_idle()

    def _recover_held(self, via: ForwarderChannel) -> None:
        """Serve, or close our copy of, each connection a vanished forwarder took but did not finish."""
        for conn_id in [conn_id for conn_id, held in self.held.items() if held.via is via]:
            conn = self.held.pop(conn_id).conn
            if reply_written(conn.sock):
                log.info("forwarder pid %d left %s after its reply; closing our copy", via.peer_pid, conn_id)
                finish_after_reply(conn.sock)
                self.events.emit(ev.RELEASED, conn=conn.id, fd=conn.fd)
            else:
                self._fallback(conn, "forwarder gone before replying")
        self._check_idle()

    async def wait_idle(self, timeout: float) -> None:
        """Stop offering, then wait up to ``timeout`` seconds until no offer is pending and every DONE arrived.

        An offer still pending at ``timeout`` extends the wait to its deadline, at most
        the reply timeout.
        """
        self._stopping = True
        try:
            async with asyncio.timeout(timeout):
                # Check again after each wake-up, because a TAKEN sets _idle when its offer
                # leaves ``pending`` and clears it when the connection joins ``held``.
                # The set() alone already wakes this waiter.
                while self.pending or self.held:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            pass
        if self.pending:
            # Each offer is settled by its deadline, so wait for that even past ``timeout``.
            # Closing the channel sooner could let the forwarder serve an offer the server serves too.
            latest_ns = max(offer.deadline_ns for offer in self.pending.values())
            await asyncio.sleep(max(0.0, (latest_ns - time.monotonic_ns()) / 1e9))

    def close(self, reason: str) -> None:
        """Send BYE and close the channel; connections the forwarder took stay with it."""
        self._stopping = True
        if self.current is not None:
            # Read what already arrived first: a late DONE, or the EOF of a forwarder that
            # died, whose connections this server must still serve.
            self.current.channel.poll()
        self._closing = True
        if self.current is not None and not self.current.channel.closed:
            self.current.channel.send(ipc.BYE, {"reason": reason})
            self.current.channel.close(reason)


class SeedLink:
    """The reference demo's handoff: dial the forwarder per connection, send ``forward`` and one fd.

    There is no reply, so the server closes its copy right after sending. A failed dial
    or send makes the server serve the connection itself.
    """

    def __init__(self, config: "ServerConfig", events: EventLog, fallback: Fallback):
        self.config = config
        self.events = events
        self._errors = RepeatLimiter(interval=10.0)
        self.pending_count = 0
        # Nothing is held after the send, so nothing is left to the forwarder at close.
        self.left_count = 0

    async def run(self) -> None:
        """Nothing to keep up: every handoff dials anew."""
        await asyncio.Event().wait()

    def dispatch(self, conn: "Connection") -> str | None:
        """Send ``conn`` with the seed framing; return a fallback reason on failure."""
        path = str(self.config.handoff_path)
        dialer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dialer.setblocking(False)
        try:
            dialer.connect(path)
            creds = ipc.peer_credentials(dialer)
            if not uid_allowed(creds.uid, self.config.allowed_uids):
                reason = f"uid {creds.uid} is not allowed"
                self.events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=path, reason=reason)
                return f"forwarder refused: {reason}"
            sent = ipc.send_message(dialer, ipc.SEED_MESSAGE, (conn.fd,))
            if sent != len(ipc.SEED_MESSAGE):
                return f"forwarder took {sent} of {len(ipc.SEED_MESSAGE)} bytes"
        except OSError as exc:
            suppressed = self._errors.check(str(exc.errno))
            if suppressed is not None:
                log.info("seed forwarder unreachable at %s: %s%s", path, exc.strerror, repeats_note(suppressed))
            return "no forwarder"
        finally:
            dialer.close()
        conn.sock.close()
        return None

    def report_offered(self, conn: "Connection") -> None:
        """Emit the events of a seed handoff: sent, and the server's copy already closed."""
        self.events.emit(ev.OFFERED, conn=conn.id, fd=conn.fd, inode=conn.inode, protocol="seed")
        self.events.emit(ev.RELEASED, conn=conn.id, fd=conn.fd)

    async def wait_ready(self, timeout: float) -> bool:
        """Seed handoffs dial per connection, so there is no channel to wait for."""
        return True

    async def wait_idle(self, timeout: float) -> None:
        """Seed handoffs finish inside dispatch(); nothing is ever pending."""

    def close(self, reason: str) -> None:
        """Nothing to close."""

"""The server's side of the handoff: the persistent native channel and the seed dialer.

Ownership rule of the native protocol: the server keeps its copy of a connection's fd
until TAKEN arrives, then closes its copy (never shutdown(), which would end the
connection for the forwarder too). An offer that gets REJECTED, no reply by its
deadline, or whose channel closes, is served by the server.

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
class PendingOffer:
    """An offer sent and not yet answered; the server still holds the connection."""

    conn: "Connection"
    sent_ns: int
    deadline_ns: int
    timer: asyncio.TimerHandle


class NativeLink:
    """The persistent, acknowledged channel to the forwarder, reconnected with backoff."""

    def __init__(self, config: "ServerConfig", events: EventLog, fallback: Fallback):
        self.config = config
        self.events = events
        self._fallback = fallback
        self._loop = asyncio.get_running_loop()
        self.channel: Channel | None = None
        self.ready = False
        # Set when an offer timed out; cleared by any frame from the forwarder.
        self.unresponsive = False
        self.pending: dict[str, PendingOffer] = {}
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._hello: asyncio.Future | None = None
        self._closed: asyncio.Future | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._connect_errors = RepeatLimiter(interval=10.0)
        self._frame_errors = RepeatLimiter()

    @property
    def pending_count(self) -> int:
        """Offers waiting for an answer."""
        return len(self.pending)

    async def run(self) -> None:
        """Keep a channel to the forwarder up, reconnecting with capped exponential backoff."""
        delay = self.config.reconnect_min
        while not self._stopping:
            connected = await self._connect_and_serve()
            if connected:
                delay = self.config.reconnect_min
            else:
                delay = min(delay * 2, self.config.reconnect_max)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))

    async def _connect_and_serve(self) -> bool:
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
            return False
        creds = ipc.peer_credentials(sock)
        if not uid_allowed(creds.uid, self.config.allowed_uids):
            sock.close()
            reason = f"uid {creds.uid} is not allowed"
            suppressed = self._connect_errors.check("refused")
            if suppressed is not None:
                log.warning("refusing forwarder pid %d at %s: %s%s", creds.pid, path, reason, repeats_note(suppressed))
            self.events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=path, reason=reason)
            return False

        self._hello = self._loop.create_future()
        self._closed = self._loop.create_future()
        self.channel = Channel(sock, self._on_frame, self._on_close, name=f"channel to forwarder pid {creds.pid}")
        self.channel.start()
        self.channel.send(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": "server", "pid": self.events.pid, "gen": self.events.generation})
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await asyncio.shield(self._hello)
        except TimeoutError:
            self.channel.close(f"no HELLO from forwarder within {HELLO_TIMEOUT:g} s")
            return False
        except ConnectionError:
            return False
        if hello.get("role") != "forwarder":
            self.channel.close(f"peer introduced itself as {hello.get('role')!r}, expected 'forwarder'")
            return False

        self.ready = True
        self.unresponsive = False
        self.events.emit(
            ev.CHANNEL_UP,
            peer_pid=creds.pid,
            peer_role="forwarder",
            peer_gen=hello.get("gen"),
            fd=self.channel.fd,
            inode=self.channel.inode,
            path=path,
        )
        log.info("channel up to forwarder pid %d (generation %s) at %s", creds.pid, hello.get("gen"), path)
        await self._closed
        return True

    def dispatch(self, conn: "Connection") -> str | None:
        """Offer ``conn`` to the forwarder; return a fallback reason when it cannot be offered."""
        if not self.ready or self.channel is None or self._stopping:
            return "no forwarder"
        if self.unresponsive:
            return "forwarder not answering"
        now = time.monotonic_ns()
        deadline = now + int(self.config.reply_timeout * 1e9)
        payload = {"id": conn.id, "peer": conn.peer, "local": conn.local, "fd": conn.fd, "deadline_ns": deadline}
        if not self.channel.send(ipc.OFFER, payload, (conn.fd,)):
            return "channel down"
        timer = self._loop.call_at(deadline / 1e9, self._on_deadline, conn.id)
        self.pending[conn.id] = PendingOffer(conn, now, deadline, timer)
        self._idle.clear()
        return None

    def report_offered(self, conn: "Connection") -> None:
        """Emit the event of an offer that dispatch() sent."""
        self.events.emit(ev.OFFERED, conn=conn.id, fd=conn.fd, inode=conn.inode)

    def _on_deadline(self, conn_id: str) -> None:
        offer = self.pending.get(conn_id)
        if offer is None:
            return
        if time.monotonic_ns() < offer.deadline_ns:
            offer.timer = self._loop.call_at(offer.deadline_ns / 1e9, self._on_deadline, conn_id)
            return
        # A TAKEN sent before the deadline is already in our receive queue: read it first.
        if self.channel is not None:
            self.channel.poll()
        offer = self._resolve(conn_id, "server")
        if offer is None:
            return
        timeout_ms = self.config.reply_timeout * 1000
        log.warning("offer %s got no reply within %g ms; serving it here", conn_id, timeout_ms)
        self._fallback(offer.conn, f"no reply within {timeout_ms:g} ms")
        if not self.unresponsive and self.channel is not None:
            self.unresponsive = True
            self.channel.send(ipc.PING, {"sent_ns": time.monotonic_ns()})

    def _resolve(self, conn_id: str, owner: str) -> PendingOffer | None:
        offer = self.pending.pop(conn_id, None)
        if offer is None:
            return None
        offer.timer.cancel()
        self._owners[conn_id] = owner
        if len(self._owners) > REMEMBERED_OUTCOMES:
            self._owners.popitem(last=False)
        if not self.pending:
            self._idle.set()
        return offer

    def _on_frame(self, frame: ipc.Frame) -> None:
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
        handler(self, frame.payload)

    def _on_hello(self, payload: dict) -> None:
        if self._hello is not None and not self._hello.done():
            self._hello.set_result(payload)

    def _on_taken(self, payload: dict) -> None:
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
        if self.config.release_delay > 0:
            # Slow motion: keep our copy a visible moment, so both fd tables show the socket.
            self._loop.call_later(self.config.release_delay, self._release, conn)
        else:
            self._release(conn)

    def _release(self, conn: "Connection") -> None:
        conn.sock.close()
        self.events.emit(ev.RELEASED, conn=conn.id, fd=conn.fd)

    def _on_rejected(self, payload: dict) -> None:
        conn_id = str(payload.get("id"))
        reason = str(payload.get("reason", "no reason given"))
        offer = self._resolve(conn_id, "server")
        if offer is None:
            log.warning("REJECTED for unknown connection %s (%s); ignored", conn_id, reason)
            return
        self.events.emit(ev.REJECTED, conn=conn_id, fd=offer.conn.fd, reason=reason)
        self._fallback(offer.conn, f"rejected by forwarder: {reason}")

    def _on_query(self, payload: dict) -> None:
        conn_id = str(payload.get("id"))
        if len(conn_id) > MAX_ID_LENGTH:
            log.warning("QUERY with an id of %d characters ignored (limit %d)", len(conn_id), MAX_ID_LENGTH)
            return
        owner = self._owners.get(conn_id, "server")
        self.events.emit(ev.QUERIED, conn=conn_id, owner=owner)
        log.info("forwarder asked who serves %s: %s", conn_id, owner)
        if self.channel is not None:
            self.channel.send(ipc.VERDICT, {"id": conn_id, "owner": owner})

    def _on_bye(self, payload: dict) -> None:
        log.info("forwarder is closing the channel: %s", payload.get("reason", "no reason given"))

    def _on_pong(self, payload: dict) -> None:
        log.info("forwarder answers again")

    _handlers = {
        ipc.HELLO: _on_hello,
        ipc.TAKEN: _on_taken,
        ipc.REJECTED: _on_rejected,
        ipc.QUERY: _on_query,
        ipc.BYE: _on_bye,
        ipc.PONG: _on_pong,
    }

    def _on_close(self, reason: str) -> None:
        was_ready = self.ready
        self.ready = False
        for conn_id in list(self.pending):
            offer = self._resolve(conn_id, "server")
            self._fallback(offer.conn, f"channel down before a reply: {reason}")
        if was_ready:
            self.events.emit(ev.CHANNEL_DOWN, reason=reason)
            log.warning("channel to forwarder down: %s", reason)
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ConnectionError(reason))
            self._hello.exception()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)

    async def wait_idle(self, timeout: float) -> None:
        """Stop offering and wait up to ``timeout`` seconds for answers to pending offers."""
        self._stopping = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass

    def close(self, reason: str) -> None:
        """Say BYE and close the channel."""
        self._stopping = True
        if self.channel is not None and not self.channel.closed:
            self.channel.send(ipc.BYE, {"reason": reason})
            self.channel.close(reason)


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

    async def wait_idle(self, timeout: float) -> None:
        """Seed handoffs finish inside dispatch(); nothing is ever pending."""

    def close(self, reason: str) -> None:
        """Nothing to close."""

"""The forwarder: receives accepted TCP connections over the handoff socket and serves them.

One Unix socket takes both framings. A peer whose first bytes are the native magic gets a
persistent channel (HELLO, then OFFER answered by TAKEN or REJECTED); a peer whose first
bytes are ``forward`` is the reference demo's server, which sends one fd per connection
and expects no reply. Every received fd is checked before use, and every fd of a
rejected message is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import reprlib
import socket
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from takeover_console import events as ev
from takeover_console import ipc
from takeover_console.channel import Channel
from takeover_console.events import EventLog
from takeover_console.handoff_link import uid_allowed
from takeover_console.lifecycle import install_stop_signals
from takeover_console.logs import RepeatLimiter, repeats_note
from takeover_console.serving import CUT_OFF, ServeResult, reply_written, serve_connection, serve_now
from takeover_console.socketfile import BoundSocket, bind_unix_listener
from takeover_console.takeover import DonorSession, Inheritance, TakeoverError, inherit, refuse_busy, report_drained

log = logging.getLogger(__name__)

# A peer must show which framing it speaks within this many seconds of connecting.
DETECT_TIMEOUT = 2.0
# Longest OFFER id echoed in TAKEN or REJECTED. The server's ids ("<pid>:<n>") are far
# shorter, and an unbounded echo could exceed ipc.MAX_PAYLOAD.
MAX_OFFER_ID = 256


# Runs once when the forwarder is finished with a connection, with how it ended.
Finished = Callable[[ServeResult], None]


def _crash(point: str) -> None:
    log.error("injected fault: crashing after %s", point)
    logging.shutdown()
    os._exit(3)


@dataclass
class ForwarderConfig:
    """Options of one forwarder process; times are in seconds."""

    handoff_path: Path = Path("handoff.sock")
    read_timeout: float = 5.0
    drain_timeout: float = 5.0
    max_connections: int = 1000
    allowed_uids: frozenset[int] = field(default_factory=frozenset)
    takeover: bool = False
    ready_timeout: float = 5.0
    # Test-only crash points: crash-after-receive, -read, -reply, crash-before-done.
    inject_fault: str | None = None


class Forwarder:
    """One forwarder process: the handoff listener, its peers and the connections it serves."""

    def __init__(self, config: ForwarderConfig, events: EventLog):
        self.config = config
        self.events = events
        self.bound: BoundSocket | None = None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._stopping = False
        self._serving: set[asyncio.Task] = set()
        self._channels: set[Channel] = set()
        self._peers: set[_PeerDetector] = set()
        self._awaiting_verdict: dict[str, tuple] = {}
        # Set while no connection waits for a VERDICT.
        self._no_verdicts = asyncio.Event()
        self._no_verdicts.set()
        self._errors = RepeatLimiter()
        self._donor: DonorSession | None = None
        self._handed_over = False
        self._sessions: set[_NativeSession] = set()
        self.served_total = 0
        self._session_closed = asyncio.Event()
        self._abandoned = False
        self._cut_last_drain = 0
        self._shut_down = False

    @property
    def serving_count(self) -> int:
        """Connections taken and not yet closed."""
        return len(self._serving) + len(self._awaiting_verdict)

    async def run(self) -> int:
        """Serve until a stop signal, then drain; return the exit status."""
        # Before "listening" is announced, so a supervisor's SIGTERM always finds a handler.
        install_stop_signals(self._stop)
        inheritance = None
        if self.config.takeover:
            inheritance = await self._inherit()
        else:
            self.bound = bind_unix_listener(self.config.handoff_path)
        self.bound.sock.setblocking(False)
        fd = self.bound.sock.fileno()
        self.events.emit(ev.LISTENING, path=str(self.bound.path), fd=fd, inode=ipc.socket_inode(fd))
        log.info("listening for handoffs on %s", self.bound.path)
        self._loop.add_reader(fd, self._on_acceptable)
        if inheritance is not None:
            if not inheritance.ready():
                log.error("the old forwarder pid %d gave up on this takeover before READY; exiting", inheritance.old_pid)
                self.events.emit(ev.TAKEOVER, side="new", phase="aborted", peer_pid=inheritance.old_pid, reason="channel closed before READY")
                self._loop.remove_reader(fd)
                return 1
            self.events.emit(ev.TAKEOVER, side="new", phase="ready", peer_pid=inheritance.old_pid)
            log.info("took over %s from pid %d as generation %d", self.bound.path, inheritance.old_pid, self.events.generation)
            asyncio.create_task(report_drained(inheritance, self.events, self._abandon), name="await-drained")
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            # After a takeover the file belongs to the new generation: only the last owner removes it.
            if not self._handed_over and not self._abandoned and self.bound.remove_file():
                log.info("removed socket file %s", self.bound.path)
        return 1 if self._abandoned else 0

    async def _inherit(self) -> Inheritance:
        path = self.config.handoff_path
        inheritance = await inherit(str(path), "forwarder", self.events, self.config.allowed_uids)
        self.events.generation = inheritance.old_generation + 1
        unix = [(sock, description) for sock, description in inheritance.listeners if description.get("family") == "unix"]
        if len(unix) != 1:
            inheritance.abort(f"expected one Unix listener, got {len(inheritance.listeners)} sockets")
            raise TakeoverError(f"takeover failed: the old forwarder sent {len(inheritance.listeners)} sockets, expected its one handoff listener")
        info = os.stat(path)
        self.bound = BoundSocket(sock=unix[0][0], path=Path(path), device=info.st_dev, inode=info.st_ino)
        inodes = [ipc.socket_inode(unix[0][0].fileno())]
        self.events.emit(ev.TAKEOVER, side="new", phase="fds_received", peer_pid=inheritance.old_pid, count=1, inodes=inodes)
        return inheritance

    def _abandon(self, reason: str) -> None:
        # The old generation kept the socket: drain what was taken here, then exit, and
        # leave the socket file to its owner.
        self._abandoned = True
        self._stop.set()

    # Takeover: this process as the old generation.

    def start_donation(self, channel: Channel, peer_pid: int) -> DonorSession | None:
        """Hand the handoff listener to a new forwarder, unless one takeover already runs."""
        if self._donor is not None or self._stopping:
            refuse_busy(channel, self.events, peer_pid)
            return None
        session = DonorSession(
            channel, self.events, [self.bound.sock], peer_pid, self.config.ready_timeout,
            on_ready=self._on_successor_ready, on_end=self._on_donor_end,
        )
        self._donor = session
        session.start()
        return session

    def _on_donor_end(self, session: DonorSession) -> None:
        if self._donor is session and not session.ready:
            self._donor = None

    def _on_successor_ready(self, session: DonorSession) -> None:
        # The new forwarder accepts on the same socket now. Servers move their channels to
        # it on MIGRATE; until they do, offers on the old channels are served here.
        self._handed_over = True
        self._loop.remove_reader(self.bound.sock.fileno())
        for native in list(self._sessions):
            if native.greeted and native.channel is not None and not native.channel.closed:
                native.channel.send(ipc.MIGRATE, {"successor_pid": session.peer_pid})
        asyncio.create_task(self._drain_after_handover(session), name="drain-after-handover")

    async def _drain_after_handover(self, session: DonorSession) -> None:
        self.events.emit(ev.TAKEOVER, side="old", phase="draining", peer_pid=session.peer_pid, in_flight=self.serving_count)
        served_before = self.served_total
        deadline = self._loop.time() + self.config.drain_timeout
        # Servers close their old channels once their new ones are up; wait for that.
        while any(native.greeted and not native.channel.closed for native in self._sessions):
            self._session_closed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                    await self._session_closed.wait()
            except TimeoutError:
                break
        # One drain timeout in all: the shutdown below gets what is left of it.
        await self._shutdown(deadline)
        cut = self._cut_last_drain
        session.finish(served=self.served_total - served_before, cut=cut)
        self._stop.set()

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stop.set()

    # Accepting peers and telling the framings apart.

    def _on_acceptable(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.bound.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._report_error(f"accept() on handoff socket failed: {exc.strerror}")
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        creds = ipc.peer_credentials(sock)
        if not uid_allowed(creds.uid, self.config.allowed_uids):
            reason = f"uid {creds.uid} is not allowed"
            suppressed = self._errors.check(f"refused {creds.uid}")
            if suppressed is not None:
                log.warning("refusing peer pid %d on %s: %s%s", creds.pid, self.bound.path, reason, repeats_note(suppressed))
            self.events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=str(self.bound.path), reason=reason)
            try:
                sock.send(ipc.encode_frame(ipc.BYE, {"reason": f"refused: {reason}"}))
            except OSError:
                pass
            sock.close()
            return
        self._peers.add(_PeerDetector(self, sock, creds))

    def _start_native(self, sock: socket.socket, creds: ipc.PeerCredentials, received: list[ipc.ReceivedMessage]) -> None:
        session = _NativeSession(self, creds)
        self._sessions.add(session)
        channel = Channel(sock, session.on_frame, session.on_close, f"channel from server pid {creds.pid}")
        session.channel = channel
        self._channels.add(channel)
        channel.start(received)

    def _handle_seed(self, data: bytes, fds: list[int], truncated: bool, creds: ipc.PeerCredentials) -> None:
        conn_id = f"seed:{creds.pid}:{time.monotonic_ns()}"
        if truncated or len(fds) != 1 or data != ipc.SEED_MESSAGE:
            ipc.close_all(fds)
            reason = f"seed message must be {ipc.SEED_MESSAGE!r} with one fd, got {data[:32]!r} with {len(fds)} fds"
            if truncated:
                reason += " and truncated control data (MSG_CTRUNC), so more were sent or this process is out of fds"
            self._report_error(f"rejected message from pid {creds.pid}: {reason}")
            self.events.emit(ev.REJECTED, conn=conn_id, reason=reason, protocol="seed", from_pid=creds.pid)
            return
        if self._stopping:
            ipc.close_all(fds)
            self.events.emit(ev.REJECTED, conn=conn_id, reason="forwarder stopping", protocol="seed", from_pid=creds.pid)
            return
        try:
            sock = ipc.adopt_tcp_connection(fds[0])
        except ipc.InvalidFd as exc:
            self._report_error(f"rejected fd from pid {creds.pid}: {exc}")
            self.events.emit(ev.REJECTED, conn=conn_id, reason=str(exc), protocol="seed", from_pid=creds.pid)
            return
        self._take(sock, conn_id, creds.pid, peer_fd=None, protocol="seed")

    # Taking and serving connections.

    def check_offer(self, deadline_ns: int | None) -> str | None:
        """Return why a new offer must be rejected now, or None to take it."""
        if self._stopping:
            return "forwarder stopping"
        if self.serving_count >= self.config.max_connections:
            return f"at capacity ({self.config.max_connections} connections)"
        if deadline_ns is not None and time.monotonic_ns() >= deadline_ns:
            return "offer expired before it was read"
        return None

    def _take(self, sock: socket.socket, conn_id: str, from_pid: int, peer_fd: int | None, protocol: str) -> None:
        peer = ipc.format_address(sock.getpeername()) if self.events.enabled else None
        self.take_and_serve(sock, conn_id, {"peer": peer, "from_pid": from_pid, "peer_fd": peer_fd, "protocol": protocol})

    def take_and_serve(self, sock: socket.socket, conn_id: str, taken: dict, owner: bool = True, finished: Finished | None = None) -> None:
        """Emit ``taken`` for a connection this forwarder now serves, and serve it.

        The reply goes out before any event is written when the request is already
        there, so event writing stays off the client's path. ``owner`` is False when the
        server keeps a copy until DONE; ``finished`` runs once the connection is done.
        """
        fd = sock.fileno()
        inode = ipc.socket_inode(fd) if self.events.enabled else None
        taken_ns = time.monotonic_ns()
        result = serve_now(sock, ipc.REPLY_BY_FORWARDER, owner=owner, checkpoint=self._checkpoint)
        self.events.emit(ev.TAKEN, conn=conn_id, fd=fd, inode=inode, **taken)
        if result is not None:
            self._report_served(conn_id, fd, taken_ns, result, finished)
        else:
            self.serve(sock, conn_id, taken_ns, owner, finished)

    def serve(self, sock: socket.socket, conn_id: str, taken_ns: int | None = None, owner: bool = True, finished: Finished | None = None) -> None:
        """Serve a connection in a task that waits for its request."""
        task = self._loop.create_task(self._serve(sock, conn_id, taken_ns or time.monotonic_ns(), owner, finished))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, sock: socket.socket, conn_id: str, taken_ns: int, owner: bool, finished: Finished | None) -> None:
        fd = sock.fileno()
        try:
            result = await serve_connection(sock, ipc.REPLY_BY_FORWARDER, self.config.read_timeout, owner=owner, checkpoint=self._checkpoint)
        except asyncio.CancelledError:
            # Cut off at the drain deadline: the copy is closed unanswered, and the server,
            # which kept its own copy, serves the request once this channel closes.
            self._report_served(conn_id, fd, taken_ns, ServeResult(CUT_OFF), finished)
            raise
        self._report_served(conn_id, fd, taken_ns, result, finished)

    def _report_served(self, conn_id: str, fd: int, taken_ns: int, result: ServeResult, finished: Finished | None = None) -> None:
        if result.served:
            self.served_total += 1
            latency_ms = (time.monotonic_ns() - taken_ns) / 1e6
            self.events.emit(ev.SERVED, conn=conn_id, fd=fd, bytes_in=result.bytes_in, latency_ms=round(latency_ms, 3))
        self.events.emit(ev.CLOSED, conn=conn_id, fd=fd, outcome=result.outcome)
        if finished is not None:
            finished(result)

    def _checkpoint(self, point: str) -> None:
        """Crash on purpose at ``point`` when --inject-fault names it (tests only)."""
        if self.config.inject_fault == f"crash-after-{point}":
            _crash(point)

    def park_for_verdict(self, conn_id: str, sock: socket.socket, from_pid: int, owner: bool = True, finished: Finished | None = None) -> None:
        """Hold a connection whose TAKEN may have been late until the server's VERDICT."""
        self._awaiting_verdict[conn_id] = (sock, from_pid, owner, finished)
        self._no_verdicts.clear()

    def settle_verdict(self, conn_id: str, owner: str | None) -> None:
        """Serve or drop a parked connection: owner "server" means the server serves it."""
        parked = self._awaiting_verdict.pop(conn_id, None)
        if parked is None:
            return
        if not self._awaiting_verdict:
            self._no_verdicts.set()
        sock, _, sole_owner, finished = parked
        if owner == "server":
            fd = sock.fileno()
            sock.close()
            self.events.emit(ev.CLOSED, conn=conn_id, fd=fd, outcome="server serves it (late TAKEN)")
            if finished is not None:
                finished(ServeResult("server serves it"))
        else:
            self.serve(sock, conn_id, owner=sole_owner, finished=finished)

    def settle_all_verdicts(self, from_pid: int) -> None:
        """Settle the parked connections of a server whose channel closed without a VERDICT."""
        for conn_id, (_, pid, _, _) in list(self._awaiting_verdict.items()):
            if pid == from_pid:
                self.settle_without_verdict(conn_id)

    def settle_without_verdict(self, conn_id: str) -> None:
        """Serve a parked connection here unless the server already wrote its reply.

        A server closes its channel after its own serving has ended, or dies, so any reply
        it wrote is in the socket's counters by then (see reply_written).
        """
        parked = self._awaiting_verdict.get(conn_id)
        if parked is not None:
            self.settle_verdict(conn_id, "server" if reply_written(parked[0]) else "forwarder")

    def _report_error(self, message: str) -> None:
        suppressed = self._errors.check(message)
        if suppressed is not None:
            log.warning("%s%s", message, repeats_note(suppressed))
        self.events.emit(ev.ERROR, message=message)

    def forget(self, item) -> None:
        """Drop a peer detector or channel that has finished."""
        self._peers.discard(item)
        self._channels.discard(item)

    async def _shutdown(self, deadline: float | None = None) -> None:
        """Stop taking offers and drain until ``deadline`` (loop time), by default --drain-timeout from now."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stopping = True
        self.events.emit(ev.STOPPING, in_flight=self.serving_count, handed_over=self._handed_over)
        log.info("stopping: refusing new handoffs; draining %d connections", self.serving_count)
        self._loop.remove_reader(self.bound.sock.fileno())
        self.bound.sock.close()
        if not self._handed_over and not self._abandoned and self.bound.remove_file():
            log.info("removed socket file %s", self.bound.path)
        for peer in list(self._peers):
            peer.close()
        for channel in self._server_channels():
            # Offers already waiting are rejected now (this process is stopping), so the server serves them.
            channel.poll()
        if deadline is None:
            deadline = self._loop.time() + self.config.drain_timeout
        try:
            # The channels are still open, so the VERDICT of each parked connection can arrive.
            async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                while self._awaiting_verdict:
                    self._no_verdicts.clear()
                    await self._no_verdicts.wait()
        except TimeoutError:
            pass
        for conn_id in list(self._awaiting_verdict):
            self.settle_without_verdict(conn_id)
        # The channels stay open while connections drain, so each DONE reaches its server.
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=max(0.0, deadline - self._loop.time()))
        cut = [task for task in self._serving if not task.done()]
        for task in cut:
            task.cancel()
        self._cut_last_drain = len(cut)
        if cut:
            log.warning("drain timeout of %g s reached: cut off %d connections", self.config.drain_timeout, len(cut))
            await asyncio.gather(*cut, return_exceptions=True)
        for channel in self._server_channels():
            channel.send(ipc.BYE, {"reason": "forwarder stopping"})
            channel.close("forwarder stopping")

    def _server_channels(self) -> list[Channel]:
        """Open channels from servers, leaving out a takeover channel (it carries DRAINED at the end)."""
        donor_channel = self._donor.channel if self._donor is not None else None
        return [channel for channel in self._channels if channel is not donor_channel and not channel.closed]


class _PeerDetector:
    """Reads a new peer's first bytes to tell the native framing from the seed framing."""

    def __init__(self, forwarder: Forwarder, sock: socket.socket, creds: ipc.PeerCredentials):
        self.forwarder = forwarder
        self.sock = sock
        self.creds = creds
        self.received: list[ipc.ReceivedMessage] = []
        self.data = b""
        self.done = False
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._timer = self._loop.call_later(DETECT_TIMEOUT, self._on_timeout)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            message = ipc.receive_message(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(f"receive failed: {exc.strerror}")
            return
        if not message.data:
            ipc.close_all(message.fds)
            self._finish_seed_or_close()
            return
        self.received.append(message)
        self.data += message.data
        prefix = self.data[: len(ipc.MAGIC)]
        if ipc.MAGIC.startswith(prefix):
            if len(prefix) == len(ipc.MAGIC):
                self._detach()
                self.forwarder._start_native(self.sock, self.creds, self.received)
            return
        if ipc.SEED_MESSAGE.startswith(self.data[: len(ipc.SEED_MESSAGE)]):
            if len(self.data) >= len(ipc.SEED_MESSAGE):
                self._finish_seed_or_close()
            return
        self._fail(f"unknown framing: first bytes {self.data[:16]!r}")

    def _finish_seed_or_close(self) -> None:
        if not self.data:
            self.close()
            return
        if ipc.MAGIC.startswith(self.data[: len(ipc.MAGIC)]):
            self._fail("peer closed inside a native header")
            return
        fds = [fd for message in self.received for fd in message.fds]
        truncated = any(message.truncated for message in self.received)
        self.received = []
        self._detach()
        self.sock.close()
        self.forwarder._handle_seed(self.data[: ipc.SEED_MAX_DATA], fds, truncated, self.creds)

    def _on_timeout(self) -> None:
        self._fail(f"no recognisable message within {DETECT_TIMEOUT:g} s")

    def _fail(self, reason: str) -> None:
        self.forwarder._report_error(f"closing handoff peer pid {self.creds.pid}: {reason}")
        self.close()

    def _detach(self) -> None:
        if not self.done:
            self.done = True
            self._timer.cancel()
            self._loop.remove_reader(self.sock.fileno())
            self.forwarder.forget(self)

    def close(self) -> None:
        """Close the peer and every fd it sent."""
        for message in self.received:
            ipc.close_all(message.fds)
        self.received = []
        if not self.done:
            self._detach()
            self.sock.close()


def offer_id(payload: dict) -> str | None:
    """Return the OFFER's id as a string, or None when missing, empty or over MAX_OFFER_ID characters."""
    raw = payload.get("id")
    if raw is None:
        return None
    text = str(raw)
    return text if 0 < len(text) <= MAX_OFFER_ID else None


class _NativeSession:
    """The forwarder's end of one native channel: HELLO first, then offers."""

    def __init__(self, forwarder: Forwarder, creds: ipc.PeerCredentials):
        self.forwarder = forwarder
        self.creds = creds
        self.channel: Channel | None = None
        self.greeted = False
        self.peer_gen = None
        # Set when this side has already reported why it closes the channel.
        self.close_reported = False
        # Set when the peer is a new forwarder taking the listener over.
        self.donation: DonorSession | None = None
        # Connections taken on this channel and not finished yet; BYE waits for them.
        self.in_flight: set[str] = set()
        self.closing = False

    def on_frame(self, frame: ipc.Frame) -> None:
        fw = self.forwarder
        if self.donation is not None:
            self.donation.on_frame(frame)
            return
        if frame.error is not None:
            self._reject_invalid(frame)
            return
        if frame.type == ipc.HELLO:
            self._on_hello(frame.payload)
        elif not self.greeted:
            frame.close_fds()
            self._close_with_bye(f"{frame.name} before HELLO")
        elif frame.type == ipc.OFFER:
            self._on_offer(frame)
        elif frame.type == ipc.VERDICT:
            fw.settle_verdict(str(frame.payload.get("id")), frame.payload.get("owner"))
        elif frame.type == ipc.PING:
            # Echo only an integer, because a long string could re-encode past ipc.MAX_PAYLOAD.
            sent_ns = frame.payload.get("sent_ns")
            self.channel.send(ipc.PONG, {"sent_ns": sent_ns if isinstance(sent_ns, int) else None})
        elif frame.type == ipc.BYE:
            # Every offer sent before BYE has been answered, since frames are handled in order.
            # The channel stays open until the connections taken on it are done, so their
            # DONE frames reach the server, which would otherwise answer them itself.
            log.info("server pid %d closes the channel: %s", self.creds.pid, frame.payload.get("reason", "no reason given"))
            self.closing = True
            if not self.in_flight:
                self.channel.close(f"server said BYE: {frame.payload.get('reason', 'no reason given')}")
        else:
            frame.close_fds()
            fw._report_error(f"unexpected {frame.name} frame from server pid {self.creds.pid}; ignored")

    def _on_hello(self, payload: dict) -> None:
        if payload.get("role") == "forwarder" and payload.get("intent") == ipc.INTENT_TAKEOVER:
            self.donation = self.forwarder.start_donation(self.channel, self.creds.pid)
            return
        if payload.get("role") != "server":
            self._close_with_bye(f"peer introduced itself as {reprlib.repr(payload.get('role'))}, expected 'server'")
            return
        self.greeted = True
        self.peer_gen = payload.get("gen")
        fw = self.forwarder
        self.channel.send(ipc.HELLO, {"version": ipc.PROTOCOL_VERSION, "role": "forwarder", "pid": fw.events.pid, "gen": fw.events.generation})
        fw.events.emit(
            ev.CHANNEL_UP,
            peer_pid=self.creds.pid,
            peer_role="server",
            peer_gen=self.peer_gen,
            fd=self.channel.fd,
            inode=self.channel.inode,
            path=str(fw.bound.path),
        )
        log.info("channel up from server pid %d (generation %s)", self.creds.pid, self.peer_gen)

    def _on_offer(self, frame: ipc.Frame) -> None:
        fw = self.forwarder
        conn_id = offer_id(frame.payload)
        deadline = frame.payload.get("deadline_ns")
        peer_fd = frame.payload.get("fd")
        if conn_id is None or not isinstance(deadline, int):
            frame.close_fds()
            self._reject(conn_id or "?", f"OFFER needs a string id of 1 to {MAX_OFFER_ID} characters and an integer deadline_ns")
            return
        reason = fw.check_offer(deadline)
        if reason is not None:
            frame.close_fds()
            self._reject(conn_id, reason)
            return
        try:
            sock = ipc.adopt_tcp_connection(frame.fds[0])
        except ipc.InvalidFd as exc:
            self._reject(conn_id, str(exc))
            return
        if fw.config.inject_fault == "crash-after-receive":
            _crash("receive")
        fd = sock.fileno()
        self.channel.send(ipc.TAKEN, {"id": conn_id, "fd": fd})
        taken = {"peer": frame.payload.get("peer"), "from_pid": self.creds.pid, "peer_fd": peer_fd, "protocol": "native"}
        # With "done" the server keeps its copy until DONE, so this process is not the only owner.
        wants_done = frame.payload.get("done") is True
        finished = self._finisher(conn_id) if wants_done else None
        self.in_flight.add(conn_id)
        if time.monotonic_ns() >= deadline:
            # TAKEN may have reached the server after it gave up: ask before serving.
            log.warning("TAKEN for %s was sent after its deadline; asking the server who serves it", conn_id)
            fw.events.emit(ev.TAKEN, conn=conn_id, fd=fd, inode=ipc.socket_inode(fd), **taken)
            fw.park_for_verdict(conn_id, sock, self.creds.pid, owner=not wants_done, finished=finished or self._finisher(conn_id, send=False))
            self.channel.send(ipc.QUERY, {"id": conn_id})
            fw.events.emit(ev.QUERIED, conn=conn_id, fd=fd)
            return
        fw.take_and_serve(sock, conn_id, taken, owner=not wants_done, finished=finished or self._finisher(conn_id, send=False))

    def _finisher(self, conn_id: str, send: bool = True) -> Finished:
        """Return the callback that ends a connection on this channel, with DONE when ``send``."""

        def finished(result: ServeResult) -> None:
            # A connection cut off is not done: without its DONE the server keeps its copy,
            # and serves it when this channel closes.
            if send and result.outcome != CUT_OFF:
                if self.forwarder.config.inject_fault == "crash-before-done":
                    _crash("reply, before DONE")
                if self.channel is not None and not self.channel.closed:
                    self.channel.send(ipc.DONE, {"id": conn_id, "outcome": result.outcome})
            self.in_flight.discard(conn_id)
            if self.closing and not self.in_flight and self.channel is not None:
                self.channel.close("server said BYE and no connection is left on the channel")

        return finished

    def _reject(self, conn_id: str, reason: str) -> None:
        fw = self.forwarder
        fw.events.emit(ev.REJECTED, conn=conn_id, reason=reason, from_pid=self.creds.pid)
        suppressed = fw._errors.check(f"reject {reason}")
        if suppressed is not None:
            log.warning("rejected offer %s from server pid %d: %s%s", conn_id, self.creds.pid, reason, repeats_note(suppressed))
        self.channel.send(ipc.REJECTED, {"id": conn_id, "reason": reason})

    def _reject_invalid(self, frame: ipc.Frame) -> None:
        conn_id = offer_id(frame.payload) if frame.type == ipc.OFFER else None
        if conn_id is not None and self.greeted:
            self._reject(conn_id, frame.error)
        else:
            self.forwarder._report_error(f"invalid {frame.name} frame from pid {self.creds.pid}: {frame.error}")

    def _close_with_bye(self, reason: str) -> None:
        self.forwarder._report_error(f"closing channel from pid {self.creds.pid}: {reason}")
        self.close_reported = True
        self.channel.send(ipc.BYE, {"reason": reason})
        self.channel.close(reason)

    def on_close(self, reason: str) -> None:
        self.forwarder._sessions.discard(self)
        self.forwarder._session_closed.set()
        if self.donation is not None:
            self.donation.on_close(reason)
            return
        fw = self.forwarder
        if self.channel is not None:
            fw.forget(self.channel)
        fw.settle_all_verdicts(self.creds.pid)
        if self.greeted:
            fw.events.emit(ev.CHANNEL_DOWN, peer_pid=self.creds.pid, reason=reason)
            log.info("channel from server pid %d down: %s", self.creds.pid, reason)
        elif not self.close_reported and not fw._stopping:
            # A channel that never got HELLO has no channel_up to pair with channel_down.
            fw._report_error(f"channel from pid {self.creds.pid} closed before HELLO: {reason}")

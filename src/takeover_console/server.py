"""The server: accepts TCP connections and hands each one to the forwarder, or serves it itself.

Accepting never waits on the forwarder. Each accepted connection goes to the handoff
link; when the link cannot take it (no forwarder, channel down, forwarder not answering,
offer rejected or timed out) the server serves the connection itself, so no accepted
connection is dropped because of the forwarder.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from takeover_console import events as ev
from takeover_console import ipc
from takeover_console.channel import Channel
from takeover_console.events import EventLog
from takeover_console.handoff_link import uid_allowed
from takeover_console.ipc import REPLY_BY_SERVER, format_address, peer_credentials, socket_inode
from takeover_console.lifecycle import install_stop_signals
from takeover_console.logs import RepeatLimiter, repeats_note
from takeover_console.netaddr import open_tcp_listener
from takeover_console.serving import CUT_OFF, ServeResult, serve_connection, serve_now
from takeover_console.socketfile import BoundSocket, SocketFileError, SocketInUse, bind_unix_listener, default_control_path
from takeover_console.takeover import DonorSession, Inheritance, inherit, refuse_busy, report_drained

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKEUP = 64
# After EMFILE or ENFILE the listener is paused this long so connections can close.
ACCEPT_PAUSE = 0.1


@dataclass
class ServerConfig:
    """Options of one server process; times are in seconds."""

    listen: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8080)])
    handoff_path: Path = Path("handoff.sock")
    control_path: Path | None = None
    protocol: str = "native"
    reply_timeout: float = 0.3
    read_timeout: float = 5.0
    drain_timeout: float = 5.0
    ready_timeout: float = 5.0
    backlog: int = 1024
    allowed_uids: frozenset[int] = field(default_factory=frozenset)
    reconnect_min: float = 0.05
    reconnect_max: float = 0.5
    # Seconds the server keeps its copy after TAKEN; SIGUSR1 sets slow_motion_delay, SIGUSR2 sets 0.
    release_delay: float = 0.0
    slow_motion_delay: float = 1.5
    takeover: bool = False
    inject_fault: str | None = None
    # "done": keep our copy until the forwarder's DONE (lossless); "taken": close it at TAKEN.
    ownership: str = "done"


@dataclass
class Connection:
    """An accepted TCP connection while the server holds it."""

    id: str
    sock: socket.socket
    fd: int
    inode: int | None
    peer: str
    local: str
    accepted_ns: int


class Server:
    """One server process: TCP listeners, a control socket, a handoff link and fallback serving."""

    def __init__(self, config: ServerConfig, events: EventLog):
        self.config = config
        self.events = events
        self.listeners: list[socket.socket] = []
        self.addresses: dict[int, str] = {}  # listener fd -> its address
        self.control: BoundSocket | None = None
        self._sequence = 0
        self._serving: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._accept_errors = RepeatLimiter()
        self._loop = asyncio.get_running_loop()
        self._donor: DonorSession | None = None
        self._handed_over = False
        self._stalled = False  # slow-drain fault: stop answering once draining
        self._abandoned = False  # a takeover by this process was aborted after READY
        # Imported here to keep the two link kinds next to the code that uses them.
        from takeover_console.handoff_link import NativeLink, SeedLink

        link_class = SeedLink if config.protocol == "seed" else NativeLink
        self.link = link_class(config, events, self.fallback)

    @property
    def local_address(self) -> str:
        """The first listener's address."""
        return next(iter(self.addresses.values()), "")

    async def run(self) -> int:
        """Serve until a stop signal or a completed takeover, then drain; return the exit status."""
        # Before "listening" is announced, so a supervisor's SIGTERM always finds a handler.
        install_stop_signals(self._stop)
        self._loop.add_signal_handler(signal.SIGUSR1, self.set_slow_motion, True)
        self._loop.add_signal_handler(signal.SIGUSR2, self.set_slow_motion, False)
        inheritance = await self._inherit() if self.config.takeover else None
        if inheritance is None:
            self._open_listeners()
        self._announce_listeners()
        link_task = asyncio.create_task(self.link.run(), name="handoff-link")
        if inheritance is not None:
            code = await self._complete_takeover(inheritance)
            if code is not None:
                link_task.cancel()
                return code
        for listener in self.listeners:
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener)
        self._loop.add_reader(self.control.sock.fileno(), self._on_control)
        await self._stop.wait()
        await self._shutdown()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)
        return 1 if self._abandoned else 0

    def _open_listeners(self) -> None:
        for host, port in self.config.listen:
            self.listeners.append(open_tcp_listener(host, port, self.config.backlog))
        first = self.listeners[0].getsockname()
        path = self.config.control_path or default_control_path(first[0], first[1])
        self.config.control_path = path
        try:
            self.control = bind_unix_listener(path)
        except SocketInUse as exc:
            raise SocketFileError(f"{exc}; to replace the running server, start this one with --takeover") from None
        self.control.sock.setblocking(False)

    def _announce_listeners(self) -> None:
        for listener in self.listeners:
            address = format_address(listener.getsockname())
            self.addresses[listener.fileno()] = address
            self.events.emit(
                ev.LISTENING,
                addr=address,
                fd=listener.fileno(),
                inode=socket_inode(listener.fileno()),
                protocol=self.config.protocol,
                handoff=str(self.config.handoff_path),
                control=str(self.config.control_path),
                control_inode=socket_inode(self.control.sock.fileno()),
            )
        log.info(
            "listening on %s, handing off to %s (%s protocol), control socket %s",
            ", ".join(self.addresses.values()), self.config.handoff_path, self.config.protocol, self.config.control_path,
        )

    # Takeover: this process as the new generation.

    async def _inherit(self) -> Inheritance:
        if self.config.control_path is None:
            host, port = self.config.listen[0]
            if port == 0:
                raise SocketFileError("--takeover with port 0 needs --control PATH: the running server's control socket")
            self.config.control_path = default_control_path(host, port)
        inheritance = await inherit(str(self.config.control_path), "server", self.events, self.config.allowed_uids)
        self.events.generation = inheritance.old_generation + 1
        for sock, description in inheritance.listeners:
            if description.get("family") == "unix":
                info = os.stat(self.config.control_path)
                self.control = BoundSocket(sock=sock, path=Path(self.config.control_path), device=info.st_dev, inode=info.st_ino)
            else:
                self.listeners.append(sock)
        if self.control is None or not self.listeners:
            inheritance.abort("the old server sent no TCP listener or no control socket")
            raise SocketFileError("takeover failed: the old server sent no TCP listener or no control socket")
        inodes = [socket_inode(sock.fileno()) for sock, _ in inheritance.listeners]
        self.events.emit(ev.TAKEOVER, side="new", phase="fds_received", peer_pid=inheritance.old_pid, count=len(inodes), inodes=inodes)
        return inheritance

    async def _complete_takeover(self, inheritance: Inheritance) -> int | None:
        """Become ready and send READY; return an exit status when the takeover must stop here."""
        await self.link.wait_ready(self.config.ready_timeout / 2)
        fault = self.config.inject_fault
        if fault == "crash-before-ready":
            log.error("injected fault: crashing before READY")
            logging.shutdown()
            os._exit(3)
        if fault == "stall-before-ready":
            # Like a process stopped (SIGSTOP) past --ready-timeout, then continued.
            log.error("injected fault: stalling %g s before READY", self.config.ready_timeout + 0.5)
            await asyncio.sleep(self.config.ready_timeout + 0.5)
        if fault == "hang-before-ready":
            log.error("injected fault: never sending READY; waiting for the old server to give up")
            outcome = await inheritance.drained
            log.error("the old server ended the takeover: %s", outcome.get("closed", outcome))
            return 1
        if not inheritance.ready():
            log.error("the old server pid %d gave up on this takeover before READY; exiting", inheritance.old_pid)
            self.events.emit(ev.TAKEOVER, side="new", phase="aborted", peer_pid=inheritance.old_pid, reason="channel closed before READY")
            return 1
        self.events.emit(ev.TAKEOVER, side="new", phase="ready", peer_pid=inheritance.old_pid)
        log.info("took over %d listeners from pid %d as generation %d", len(inheritance.listeners), inheritance.old_pid, self.events.generation)
        asyncio.create_task(report_drained(inheritance, self.events, self._abandon), name="await-drained")
        return None

    def _abandon(self, reason: str) -> None:
        # The old generation kept the listeners: finish what was accepted here, then exit.
        # The control socket file still belongs to the old generation, so it stays.
        self._abandoned = True
        self._stop.set()

    # Takeover: this process as the old generation.

    def _on_control(self) -> None:
        try:
            sock, _ = self.control.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("accept() on control socket failed: %s", exc.strerror)
            return
        creds = peer_credentials(sock)
        if not uid_allowed(creds.uid, self.config.allowed_uids):
            reason = f"uid {creds.uid} is not allowed"
            log.warning("refusing control peer pid %d: %s", creds.pid, reason)
            self.events.emit(ev.PEER_REFUSED, peer_pid=creds.pid, peer_uid=creds.uid, path=str(self.control.path), reason=reason)
            sock.close()
            return
        holder: list = []
        channel = Channel(sock, lambda frame: self._on_control_frame(holder, frame, creds), lambda reason: self._on_control_close(holder, reason), name=f"control channel from pid {creds.pid}")
        holder.append(channel)
        channel.start()

    def _on_control_frame(self, holder: list, frame: ipc.Frame, creds: ipc.PeerCredentials) -> None:
        channel = holder[0]
        session = holder[1] if len(holder) > 1 else None
        if session is not None:
            session.on_frame(frame)
            return
        frame.close_fds()
        if frame.error is not None or frame.type != ipc.HELLO or frame.payload.get("intent") != ipc.INTENT_TAKEOVER:
            reason = frame.error or f"expected HELLO with intent {ipc.INTENT_TAKEOVER!r}, got {frame.name}"
            log.warning("closing control channel from pid %d: %s", creds.pid, reason)
            channel.send(ipc.BYE, {"reason": reason})
            channel.close(reason)
            return
        if self._donor is not None or self._stop.is_set():
            refuse_busy(channel, self.events, creds.pid)
            return
        session = DonorSession(
            channel, self.events, self.listeners + [self.control.sock], creds.pid, self.config.ready_timeout,
            on_ready=self._on_successor_ready, on_end=self._on_donor_end,
        )
        self._donor = session
        holder.append(session)
        session.start()

    def _on_control_close(self, holder: list, reason: str) -> None:
        if len(holder) > 1:
            holder[1].on_close(reason)

    def _on_donor_end(self, session: DonorSession) -> None:
        if self._donor is session and not session.ready:
            self._donor = None

    def _on_successor_ready(self, session: DonorSession) -> None:
        # Stop accepting; the new generation accepts on the same sockets from now on.
        self._handed_over = True
        for listener in self.listeners:
            self._loop.remove_reader(listener.fileno())
        self._loop.remove_reader(self.control.sock.fileno())
        self._stop.set()

    # Serving.

    def set_slow_motion(self, on: bool) -> None:
        """Keep the server's copy of handed-over sockets for a visible moment, or stop doing so."""
        self.config.release_delay = self.config.slow_motion_delay if on else 0.0
        log.info("slow motion %s: the server keeps its copy %g s after TAKEN", "on" if on else "off", self.config.release_delay)
        self.events.emit(ev.SLOW_MOTION, on=on, release_delay_ms=round(self.config.release_delay * 1000))

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stop.set()

    def _on_acceptable(self, listener: socket.socket, limit: int = ACCEPTS_PER_WAKEUP) -> None:
        for _ in range(limit):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause_accepting(listener, exc)
                return
            self._handle_accepted(sock, address, self.addresses[listener.fileno()])

    def _handle_accepted(self, sock: socket.socket, address, local: str) -> None:
        sock.setblocking(False)
        self._sequence += 1
        fd = sock.fileno()
        conn = Connection(
            id=f"{self.events.pid}:{self._sequence}",
            sock=sock,
            fd=fd,
            inode=socket_inode(fd) if self.events.enabled else None,
            peer=format_address(address),
            local=local,
            accepted_ns=time.monotonic_ns(),
        )
        reason = self.link.dispatch(conn)
        # Events are written after the handoff, so their cost is not on the client's path.
        # They carry the time of the accept, or the forwarder's "taken" would seem to come first.
        mono = round(conn.accepted_ns / 1e9, 6)
        self.events.emit(ev.ACCEPTED, conn=conn.id, peer=conn.peer, local=conn.local, fd=fd, inode=conn.inode, mono=mono)
        if reason is None:
            self.link.report_offered(conn)
        else:
            self.fallback(conn, reason)

    def _pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        suppressed = self._accept_errors.check(str(exc.errno))
        if suppressed is not None:
            log.error("accept() failed: %s; pausing accepts for %g s%s", exc.strerror, ACCEPT_PAUSE, repeats_note(suppressed))
            self.events.emit(ev.ERROR, message=f"accept() failed: {exc.strerror}", errno=errno.errorcode.get(exc.errno, ""))
        self._loop.remove_reader(listener.fileno())
        self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting, listener)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if not self._stop.is_set() and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener)

    def fallback(self, conn: Connection, reason: str) -> None:
        """Serve ``conn`` in this process because the forwarder will not."""
        result = serve_now(conn.sock, REPLY_BY_SERVER)
        self.events.emit(ev.FALLBACK, conn=conn.id, fd=conn.fd, reason=reason)
        if result is not None:
            self._report_served(conn, result)
            return
        task = self._loop.create_task(self._serve(conn))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: Connection) -> None:
        try:
            result = await serve_connection(conn.sock, REPLY_BY_SERVER, self.config.read_timeout, hold=self._stall)
        except asyncio.CancelledError:
            # Cut off at the drain deadline: serve_connection() closed the socket unanswered.
            self._report_served(conn, ServeResult(CUT_OFF))
            raise
        self._report_served(conn, result)

    async def _stall(self) -> None:
        # The slow-drain fault: once draining, requests are read but never answered.
        if self._stalled:
            await asyncio.Event().wait()

    def _report_served(self, conn: Connection, result: ServeResult) -> None:
        if result.served:
            latency_ms = (time.monotonic_ns() - conn.accepted_ns) / 1e6
            self.events.emit(ev.SERVED, conn=conn.id, fd=conn.fd, bytes_in=result.bytes_in, latency_ms=round(latency_ms, 3))
        self.events.emit(ev.CLOSED, conn=conn.id, fd=conn.fd, outcome=result.outcome)

    async def _shutdown(self) -> None:
        self._stalled = self.config.inject_fault == "slow-drain"
        for listener in self.listeners:
            self._loop.remove_reader(listener.fileno())
        if not self._handed_over:
            # No successor accepts on these sockets. Take what the kernel already queued, then
            # close them, so later clients are refused at once instead of reset at exit.
            for listener in self.listeners:
                # The limit is the backlog, plus one batch for clients that connect meanwhile.
                self._on_acceptable(listener, self.config.backlog + ACCEPTS_PER_WAKEUP)
                listener.close()
        in_flight = len(self._serving) + self.link.pending_count
        self.events.emit(ev.STOPPING, in_flight=in_flight, handed_over=self._handed_over)
        if self._handed_over:
            self.events.emit(ev.TAKEOVER, side="old", phase="draining", peer_pid=self._donor.peer_pid, in_flight=in_flight)
        log.info("stopping: no new connections; draining %d in flight", in_flight)
        self._loop.remove_reader(self.control.sock.fileno())
        deadline = self._loop.time() + self.config.drain_timeout
        if self._handed_over and self.config.release_delay > 0:
            # Slow motion: stay a visible moment, holding the listeners the new generation shares.
            await asyncio.sleep(min(self.config.release_delay, self.config.drain_timeout))
        await self.link.wait_idle(max(0.0, deadline - self._loop.time()))
        remaining = max(0.0, deadline - self._loop.time())
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=remaining)
        cut = [task for task in self._serving if not task.done()]
        for task in cut:
            task.cancel()
        if cut:
            log.warning("drain timeout of %g s reached: cut off %d connections", self.config.drain_timeout, len(cut))
            await asyncio.gather(*cut, return_exceptions=True)
        self.link.close("server stopping")
        for listener in self.listeners:
            # close(), never shutdown(): after a takeover the new generation accepts on this socket.
            listener.close()
        if self._handed_over:
            left = self.link.left_count
            self._donor.finish(served=in_flight - len(cut) - left, cut=len(cut), left=left)
        elif not self._abandoned:
            self.control.remove_file()
        self.control.sock.close()

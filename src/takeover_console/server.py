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
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from takeover_console import events as ev
from takeover_console.events import EventLog
from takeover_console.ipc import REPLY_BY_SERVER, format_address, socket_inode
from takeover_console.lifecycle import install_stop_signals
from takeover_console.logs import RepeatLimiter, repeats_note
from takeover_console.netaddr import open_tcp_listener
from takeover_console.serving import ServeResult, serve_connection, serve_now

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKEUP = 64
# After EMFILE or ENFILE the listener is paused this long so connections can close.
ACCEPT_PAUSE = 0.1


@dataclass
class ServerConfig:
    """Options of one server process; times are in seconds."""

    host: str = "127.0.0.1"
    port: int = 8080
    handoff_path: Path = Path("handoff.sock")
    protocol: str = "native"
    reply_timeout: float = 0.3
    read_timeout: float = 5.0
    drain_timeout: float = 5.0
    backlog: int = 1024
    allowed_uids: frozenset[int] = field(default_factory=frozenset)
    reconnect_min: float = 0.05
    reconnect_max: float = 0.5
    # Seconds the server keeps its copy after TAKEN; SIGUSR1 sets slow_motion_delay, SIGUSR2 sets 0.
    release_delay: float = 0.0
    slow_motion_delay: float = 1.5


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
    """One server process: a TCP listener, a handoff link and fallback serving."""

    def __init__(self, config: ServerConfig, events: EventLog):
        self.config = config
        self.events = events
        self.listener: socket.socket | None = None
        self.local_address = ""
        self._sequence = 0
        self._serving: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._accept_errors = RepeatLimiter()
        self._loop = asyncio.get_running_loop()
        # Imported here to keep the two link kinds next to the code that uses them.
        from takeover_console.handoff_link import NativeLink, SeedLink

        link_class = SeedLink if config.protocol == "seed" else NativeLink
        self.link = link_class(config, events, self.fallback)

    async def run(self) -> int:
        """Serve until a stop signal, then drain; return the exit status."""
        # Before "listening" is announced, so a supervisor's SIGTERM always finds a handler.
        install_stop_signals(self._stop)
        self._loop.add_signal_handler(signal.SIGUSR1, self.set_slow_motion, True)
        self._loop.add_signal_handler(signal.SIGUSR2, self.set_slow_motion, False)
        self.listener = open_tcp_listener(self.config.host, self.config.port, self.config.backlog)
        self.local_address = format_address(self.listener.getsockname())
        self.events.emit(
            ev.LISTENING,
            addr=self.local_address,
            fd=self.listener.fileno(),
            inode=socket_inode(self.listener.fileno()),
            protocol=self.config.protocol,
            handoff=str(self.config.handoff_path),
        )
        log.info("listening on %s, handing off to %s (%s protocol)", self.local_address, self.config.handoff_path, self.config.protocol)
        self._loop.add_reader(self.listener.fileno(), self._on_acceptable)
        link_task = asyncio.create_task(self.link.run(), name="handoff-link")
        await self._stop.wait()
        await self._shutdown()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)
        return 0

    def set_slow_motion(self, on: bool) -> None:
        """Keep the server's copy of handed-over sockets for a visible moment, or stop doing so."""
        self.config.release_delay = self.config.slow_motion_delay if on else 0.0
        log.info("slow motion %s: the server keeps its copy %g s after TAKEN", "on" if on else "off", self.config.release_delay)
        self.events.emit(ev.SLOW_MOTION, on=on, release_delay_ms=round(self.config.release_delay * 1000))

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stop.set()

    def _on_acceptable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause_accepting(exc)
                return
            self._handle_accepted(sock, address)

    def _handle_accepted(self, sock: socket.socket, address) -> None:
        sock.setblocking(False)
        self._sequence += 1
        fd = sock.fileno()
        conn = Connection(
            id=f"{self.events.pid}:{self._sequence}",
            sock=sock,
            fd=fd,
            inode=socket_inode(fd) if self.events.enabled else None,
            peer=format_address(address),
            local=self.local_address,
            accepted_ns=time.monotonic_ns(),
        )
        reason = self.link.dispatch(conn)
        # Events are written after the handoff, so their cost is not on the client's path.
        self.events.emit(ev.ACCEPTED, conn=conn.id, peer=conn.peer, local=conn.local, fd=fd, inode=conn.inode)
        if reason is None:
            self.link.report_offered(conn)
        else:
            self.fallback(conn, reason)

    def _pause_accepting(self, exc: OSError) -> None:
        suppressed = self._accept_errors.check(str(exc.errno))
        if suppressed is not None:
            log.error("accept() failed: %s; pausing accepts for %g s%s", exc.strerror, ACCEPT_PAUSE, repeats_note(suppressed))
            self.events.emit(ev.ERROR, message=f"accept() failed: {exc.strerror}", errno=errno.errorcode.get(exc.errno, ""))
        fd = self.listener.fileno()
        self._loop.remove_reader(fd)
        self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting, fd)

    def _resume_accepting(self, fd: int) -> None:
        if not self._stop.is_set() and self.listener is not None and self.listener.fileno() == fd:
            self._loop.add_reader(fd, self._on_acceptable)

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
        result = await serve_connection(conn.sock, REPLY_BY_SERVER, self.config.read_timeout)
        self._report_served(conn, result)

    def _report_served(self, conn: Connection, result: ServeResult) -> None:
        if result.served:
            latency_ms = (time.monotonic_ns() - conn.accepted_ns) / 1e6
            self.events.emit(ev.SERVED, conn=conn.id, fd=conn.fd, bytes_in=result.bytes_in, latency_ms=round(latency_ms, 3))
        self.events.emit(ev.CLOSED, conn=conn.id, fd=conn.fd, outcome=result.outcome)

    async def _shutdown(self) -> None:
        self.events.emit(ev.STOPPING, in_flight=len(self._serving) + self.link.pending_count)
        log.info("stopping: no new connections; draining %d in flight", len(self._serving) + self.link.pending_count)
        if self.listener is not None:
            self._loop.remove_reader(self.listener.fileno())
            self.listener.close()
        deadline = self._loop.time() + self.config.drain_timeout
        await self.link.wait_idle(self.config.drain_timeout)
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

"""The client: opens TCP connections, sends ``seq num <i>`` and records who answered.

Each request reads its reply until EOF (up to REPLY_LIMIT bytes), so a connection
answered twice shows up as an error instead of passing as one reply.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from takeover_console import events as ev
from takeover_console.events import EventLog
from takeover_console.ipc import REPLY_BY_FORWARDER, REPLY_BY_SERVER
from takeover_console.stats import percentile

REPLY_LIMIT = 4096
ANSWERED_BY = {REPLY_BY_SERVER: "server", REPLY_BY_FORWARDER: "forwarder"}


@dataclass
class ClientConfig:
    """Options of one client run; ``rate`` is connections per second (0: as fast as possible)."""

    host: str = "127.0.0.1"
    port: int = 8080
    count: int = 20
    rate: float = 0.0
    concurrency: int = 1
    timeout: float = 5.0
    hold: float = 0.0


@dataclass
class Outcome:
    """The result of one request: who answered, or the kind of failure."""

    index: int
    by: str | None
    error: str | None
    reply: bytes
    latency_ms: float


@dataclass
class Summary:
    """Totals of a client run."""

    sent: int = 0
    by_server: int = 0
    by_forwarder: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, outcome: Outcome) -> None:
        """Count one finished request."""
        self.sent += 1
        if outcome.error is not None:
            self.failed += 1
            self.errors[outcome.error] += 1
            return
        if outcome.by == "server":
            self.by_server += 1
        else:
            self.by_forwarder += 1
        self.latencies_ms.append(outcome.latency_ms)

    def as_dict(self) -> dict:
        """The JSON summary printed by ``--json``."""
        return {
            "sent": self.sent,
            "answered_by_server": self.by_server,
            "answered_by_forwarder": self.by_forwarder,
            "failed": self.failed,
            "errors": dict(sorted(self.errors.items())),
            "latency_ms": {"p50": _rounded_percentile(self.latencies_ms, 50), "p99": _rounded_percentile(self.latencies_ms, 99)},
            "elapsed_s": round(self.elapsed_s, 3),
            "connections_per_s": round(self.sent / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
        }


def _rounded_percentile(values: list[float], pct: float) -> float | None:
    value = percentile(values, pct)
    return None if value is None else round(value, 3)


def classify_reply(reply: bytes) -> tuple[str | None, str | None]:
    """Return (answered_by, None) for a known reply, else (None, error kind)."""
    by = ANSWERED_BY.get(reply)
    if by is not None:
        return by, None
    if not reply:
        return None, "empty_reply"
    if any(reply.startswith(known) and len(reply) > len(known) for known in ANSWERED_BY):
        return None, "double_reply"
    return None, "unexpected_reply"


async def request_once(config: ClientConfig, index: int) -> Outcome:
    """Run one request: connect, send ``seq num <index>``, read until EOF."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    reply = b""
    try:
        async with asyncio.timeout(config.timeout):
            await loop.sock_connect(sock, (config.host, config.port))
            if config.hold:
                # The connection sits idle, held by whoever has it now, before the request.
                await asyncio.sleep(config.hold)
            await loop.sock_sendall(sock, b"seq num %d" % index)
            while len(reply) <= REPLY_LIMIT:
                chunk = await loop.sock_recv(sock, REPLY_LIMIT)
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        return _failure(index, "timeout", reply, started)
    except ConnectionRefusedError:
        return _failure(index, "refused", reply, started)
    except ConnectionResetError:
        return _failure(index, "reset", reply, started)
    except OSError as exc:
        return _failure(index, f"error_{exc.errno}", reply, started)
    finally:
        sock.close()
    by, error = classify_reply(reply)
    return Outcome(index, by, error, reply, (time.perf_counter() - started) * 1000)


def _failure(index: int, kind: str, reply: bytes, started: float) -> Outcome:
    return Outcome(index, None, kind, reply, (time.perf_counter() - started) * 1000)


async def run_client(config: ClientConfig, events: EventLog, on_outcome: Callable[[Outcome], None] | None = None) -> Summary:
    """Send ``config.count`` requests at ``config.rate`` with at most ``config.concurrency`` open."""
    summary = Summary()
    limit = asyncio.Semaphore(max(1, config.concurrency))
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task] = set()

    async def one(index: int) -> None:
        try:
            outcome = await request_once(config, index)
        finally:
            limit.release()
        summary.add(outcome)
        if outcome.error is None:
            events.emit(ev.ANSWERED, seq=index, by=outcome.by, latency_ms=round(outcome.latency_ms, 3))
        else:
            events.emit(ev.FAILED, seq=index, error=outcome.error, reply=outcome.reply[:64].decode("utf-8", "replace"))
        if on_outcome is not None:
            on_outcome(outcome)

    stop = asyncio.Event()
    try:
        # SIGTERM ends the run: no new requests, the ones in flight finish, the summary is printed.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (RuntimeError, ValueError):
        pass  # not the main thread: the caller stops the run some other way
    for index in range(config.count):
        if stop.is_set():
            break
        if config.rate > 0:
            delay = start + index / config.rate - loop.time()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                    break
                except TimeoutError:
                    pass
        await limit.acquire()
        if stop.is_set():
            limit.release()
            break
        task = asyncio.create_task(one(index))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    summary.elapsed_s = loop.time() - start
    events.emit(ev.SUMMARY, **summary.as_dict())
    return summary


def print_outcome(outcome: Outcome) -> None:
    """Print one reply the way the reference client does: ``recv data: <reply>``."""
    if outcome.error is None:
        print(f"recv data: {outcome.reply.decode('utf-8', 'replace')}", flush=True)
    else:
        print(f"request {outcome.index} failed: {outcome.error} (reply {outcome.reply[:64]!r})", file=sys.stderr, flush=True)


def print_summary(summary: Summary) -> None:
    """Print the ``--json`` summary as one JSON object."""
    print(json.dumps(summary.as_dict()), flush=True)

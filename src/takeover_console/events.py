"""Structured events written by the server, forwarder and client as JSON lines.

Each line is one JSON object with the common fields ``ts`` (wall clock, UNIX seconds),
``mono`` (CLOCK_MONOTONIC seconds, comparable across processes on one host), ``role``,
``pid``, ``gen`` (generation) and ``kind``, plus the fields that the kind needs.
docs/events.md is the schema; the console's model consumes this stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import IO, Any

log = logging.getLogger(__name__)

# Lifecycle of every program.
STARTED = "started"
LISTENING = "listening"
STOPPING = "stopping"
EXITED = "exited"
ERROR = "error"

# The handoff channel between server and forwarder.
CHANNEL_UP = "channel_up"
CHANNEL_DOWN = "channel_down"
PEER_REFUSED = "peer_refused"

# One accepted connection, in the order a connection meets them.
ACCEPTED = "accepted"
OFFERED = "offered"
TAKEN = "taken"
REJECTED = "rejected"
FALLBACK = "fallback"
SERVED = "served"
CLOSED = "closed"
# The server closed its own copy of a connection that the forwarder took.
RELEASED = "released"
# The forwarder asked the server who serves an offer whose TAKEN may have been late.
QUERIED = "queried"

# Listener takeover, with a "phase" field: requested, fds_sent, fds_received, ready,
# draining, drained, aborted or refused.
TAKEOVER = "takeover"

# The server's slow motion for demos was switched on or off.
SLOW_MOTION = "slow_motion"

# The client's view of one request.
ANSWERED = "answered"
FAILED = "failed"
SUMMARY = "summary"

KINDS = frozenset(
    {
        STARTED, LISTENING, STOPPING, EXITED, ERROR,
        CHANNEL_UP, CHANNEL_DOWN, PEER_REFUSED,
        ACCEPTED, OFFERED, TAKEN, REJECTED, FALLBACK, SERVED, CLOSED, RELEASED, QUERIED,
        ANSWERED, FAILED, SUMMARY, SLOW_MOTION, TAKEOVER,
    }
)


# Seconds events wait to be written together. Fewer, larger writes cost the reader (the
# console) far fewer wake-ups at thousands of events per second; the console redraws
# only four times a second anyway.
FLUSH_DELAY = 0.02

# One encoder for every event: json.dumps() with separators builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class EventLog:
    """A JSON-lines event writer bound to one process's role, pid and generation.

    Lines are written whole, so a reader of a pipe never reads half a line. Inside a
    running asyncio loop the lines of FLUSH_DELAY seconds are collected and written with
    one write() and flush(), which keeps event writing off the path of the connection
    being served; outside a loop every event is flushed at once.
    """

    def __init__(self, stream: IO[str] | None, role: str, generation: int = 1):
        self._stream = stream
        self.role = role
        self.pid = os.getpid()
        self.generation = generation
        self._broken = False
        self._pending: list[str] = []

    @classmethod
    def open(cls, target: str | None, role: str, generation: int = 1) -> "EventLog":
        """Open an event log on a path, ``-`` for stdout, or nothing when target is None."""
        if target is None:
            return cls(None, role, generation)
        if target == "-":
            return cls(sys.stdout, role, generation)
        stream = open(target, "a", encoding="utf-8", buffering=1 << 16)
        return cls(stream, role, generation)

    @property
    def enabled(self) -> bool:
        """True when events are written somewhere."""
        return self._stream is not None and not self._broken

    def emit(self, kind: str, **fields: Any) -> None:
        """Write one event of ``kind`` with the common fields and ``fields``."""
        if self._stream is None or self._broken:
            return
        record = {
            "ts": round(time.time(), 6),
            "mono": round(time.monotonic(), 6),
            "role": self.role,
            "pid": self.pid,
            "gen": self.generation,
            "kind": kind,
        }
        record.update(fields)
        self._pending.append(_ENCODER.encode(record))
        if len(self._pending) > 1:
            return  # a flush is already scheduled
        try:
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        """Write and flush the events collected so far."""
        if not self._pending or self._stream is None or self._broken:
            self._pending.clear()
            return
        lines = "\n".join(self._pending) + "\n"
        self._pending.clear()
        try:
            self._stream.write(lines)
            self._stream.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            # The reader went away (the console closed the pipe): keep serving, stop writing.
            self._broken = True
            log.warning("event stream closed (%s); further events are dropped", exc)

    def close(self) -> None:
        """Flush and close the stream unless it is stdout."""
        self.flush()
        if self._stream is not None and self._stream is not sys.stdout:
            try:
                self._stream.close()
            except OSError:
                pass
        self._stream = None

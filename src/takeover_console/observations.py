"""The observation stream: worker events, worker state changes and fd-table samples.

An observation is one JSON object with ``type`` and ``t`` (CLOCK_MONOTONIC seconds):

- ``{"type": "event", "t": ..., "worker": NAME, "event": {...}}``: one line a worker wrote
  (docs/events.md);
- ``{"type": "worker", "t": ..., "worker": NAME, "role": ..., "pid": ..., "gen": ...,
  "state": "started" | "running" | "stopping" | "exited", "detail": ...}``: the supervisor's
  view of a worker process;
- ``{"type": "sample", "t": ..., "sample": {...}}``: one fd-table sample (fdtable.Sample).

The live supervisor produces these; a recorded file (one observation per line) produces
the same stream again for replay. docs/recording.md describes the file.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import IO, Callable, Iterator

EVENT = "event"
WORKER = "worker"
SAMPLE = "sample"
TYPES = (EVENT, WORKER, SAMPLE)

# The first line of a recording, so a reader can tell the format and its version.
RECORDING_HEADER = {"type": "recording", "format": "takeover-console observations", "version": 1}


def is_time(value: object) -> bool:
    """Tell whether ``value`` can be an observation's time: a finite float, or an int that converts to a float exactly."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -(2**53) <= value <= 2**53


def event_observation(worker: str, event: dict, t: float | None = None) -> dict:
    """Wrap one worker event; ``t`` defaults to the event's own ``mono`` field.

    An event whose ``mono`` is missing or not a finite number gets the time it is wrapped.
    """
    if t is None:
        t = event.get("mono")
        if type(t) is not float or not math.isfinite(t):
            t = float(t) if is_time(t) else time.monotonic()
    return {"type": EVENT, "t": t, "worker": worker, "event": event}


def worker_observation(worker: str, role: str, pid: int | None, generation: int, state: str, detail: str = "", t: float | None = None) -> dict:
    """Describe a worker's state change as the supervisor saw it."""
    return {
        "type": WORKER,
        "t": time.monotonic() if t is None else t,
        "worker": worker,
        "role": role,
        "pid": pid,
        "gen": generation,
        "state": state,
        "detail": detail,
    }


def sample_observation(sample: dict, t: float | None = None) -> dict:
    """Wrap one fd-table sample (already a dict)."""
    return {"type": SAMPLE, "t": sample.get("mono", time.monotonic()) if t is None else t, "sample": sample}


class Recorder:
    """Writes every observation as one JSON line, after a header line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stream: IO[str] = open(self.path, "w", encoding="utf-8")
        self._stream.write(json.dumps(RECORDING_HEADER) + "\n")
        self.count = 0

    def write(self, observation: dict) -> None:
        """Append one observation."""
        self._stream.write(json.dumps(observation, separators=(",", ":")) + "\n")
        self.count += 1

    def close(self) -> None:
        """Flush and close the file."""
        if not self._stream.closed:
            self._stream.close()


class RecordingError(ValueError):
    """A recording file is missing, empty or not in the observation format."""


def read_recording(path: Path) -> Iterator[dict]:
    """Yield the observations of a recording in file order, checking the header first.

    Lines that are not JSON objects of a known type with a finite ``t`` are skipped; a file with no valid
    header raises RecordingError naming the line.
    """
    try:
        # Bytes that are not UTF-8 become U+FFFD: such a line is then not JSON, and skipped.
        stream = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RecordingError(f"cannot open recording {path}: {exc.strerror}") from None
    with stream:
        first = stream.readline()
        try:
            header = json.loads(first) if first else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != RECORDING_HEADER["format"]:
            # The line itself is not shown: the file may be anything, such as a file of secrets.
            raise RecordingError(f"{path} is not a takeover-console recording: its first line is not the recording header; pass a file written with --record")
        if header.get("version") != RECORDING_HEADER["version"]:
            raise RecordingError(f"{path} is recording version {header.get('version')}, this program reads version {RECORDING_HEADER['version']}")
        for line in stream:
            try:
                observation = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(observation, dict) and observation.get("type") in TYPES and is_time(observation.get("t")):
                yield observation


async def replay(path: Path, deliver: Callable[[dict], None], speed: float = 1.0) -> int:
    """Feed a recording to ``deliver`` with its original pacing divided by ``speed``.

    ``speed`` 0 or less replays as fast as possible. Returns the number of observations.
    """
    loop = asyncio.get_running_loop()
    start_wall = loop.time()
    first_t: float | None = None
    count = 0
    for observation in read_recording(path):
        if first_t is None:
            first_t = observation["t"]
        if speed > 0:
            due = start_wall + (observation["t"] - first_t) / speed
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        deliver(observation)
        count += 1
    return count

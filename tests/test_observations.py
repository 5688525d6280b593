"""The observation stream: wrapping worker events and reading recordings back."""

from __future__ import annotations

import json
import time

import pytest

from takeover_console.observations import RECORDING_HEADER, event_observation, read_recording


@pytest.mark.parametrize("mono", [None, "12.5", True, float("nan"), float("inf"), 10**400], ids=["missing", "string", "bool", "nan", "inf", "huge int"])
def test_event_without_usable_time_gets_arrival(mono):
    """An event whose mono is not a finite number is placed at the time it arrived."""
    event = {"kind": "served"} if mono is None else {"kind": "served", "mono": mono}
    before = time.monotonic()
    t = event_observation("server", event)["t"]
    assert before <= t <= time.monotonic()


def test_event_time_from_mono():
    """A number in mono becomes the observation's time, an int as a float."""
    assert event_observation("server", {"mono": 12.5})["t"] == 12.5
    assert event_observation("server", {"mono": 12})["t"] == 12.0


def test_recording_skips_lines_without_finite_time(tmp_path):
    """Replay skips observations whose t is missing, not finite or not a number, and keeps the rest."""
    path = tmp_path / "session.jsonl"
    lines = [
        json.dumps(RECORDING_HEADER),
        '{"type": "event", "t": 1.0, "worker": "server", "event": {"kind": "served"}}',
        '{"type": "event", "t": NaN, "worker": "server", "event": {}}',
        '{"type": "event", "t": Infinity, "worker": "server", "event": {}}',
        '{"type": "event", "t": "2.0", "worker": "server", "event": {}}',
        '{"type": "event", "worker": "server", "event": {}}',
        '{"type": "event", "t": 3, "worker": "server", "event": {"kind": "closed"}}',
    ]
    path.write_text("\n".join(lines) + "\n")
    assert [observation["t"] for observation in read_recording(path)] == [1.0, 3]

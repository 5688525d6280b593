"""Log lines for takeover events."""

from __future__ import annotations

from takeover_console.narration import describe_event


class NoPeers:
    def peer_of(self, conn_id: str) -> str:
        return "?"


def drained(**fields) -> dict:
    return {"kind": "takeover", "role": "server", "pid": 10, "peer_pid": 11, "phase": "drained", "side": "old", **fields}


def test_drained_names_left_connections():
    line = describe_event(drained(served=3, cut=1, left=2), NoPeers())
    assert line == "old server pid 10 drained: 3 finished, 1 cut off, 2 left to the forwarder"


def test_drained_without_left_connections():
    line = describe_event(drained(served=3, cut=0, left=0), NoPeers())
    assert line == "old server pid 10 drained: 3 finished, 0 cut off"

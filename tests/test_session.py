"""LiveSession's handling of worker events, without starting any process."""

from __future__ import annotations

import asyncio

from takeover_console.session import LiveSession, SessionConfig
from takeover_console.workers import Worker


def test_odd_kind_spares_later_events(workdir):
    """An event whose kind is not text is passed on to the model; the listening event after it still counts."""

    async def scenario() -> tuple[str | None, int]:
        session = LiveSession(SessionConfig(listen="127.0.0.1:0", handoff=workdir / "handoff.sock"))
        try:
            worker = Worker("server", "server", [])
            session._on_events(worker, [{"kind": ["x"], "mono": 1.0}, {"kind": "listening", "addr": "127.0.0.1:5555", "mono": 1.1}])
            return session.server_address, len(session._reorder)
        finally:
            await session.close()

    address, queued = asyncio.run(scenario())
    assert address == "127.0.0.1:5555"
    assert queued == 2

"""Snapshot tests of the console, from recorded fixtures: no processes, no clock, fixed sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from takeover_console.app import TakeoverApp
from takeover_console.session import ReplaySession

FIXTURES = Path(__file__).parent / "fixtures"
SIZES = {"80x24": (80, 24), "120x40": (120, 40)}
# Seconds into the upgrade fixture when both server generations hold the listener.
UPGRADE_OVERLAP = 2.0
# Seconds into each fixture just before the recording session stopped its workers.
BEFORE_CLOSE = {"steady": 2.9, "forwarder_killed": 3.3, "upgrade_aborted": 1.3}


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """Clear variables that change how Textual draws, so snapshots match on any machine."""
    import os

    for name in list(os.environ):
        if name.startswith("TEXTUAL") and not name.startswith("TEXTUAL_SNAPSHOT") or name in ("NO_COLOR", "FORCE_COLOR", "COLORTERM"):
            monkeypatch.delenv(name, raising=False)


def replay_app(fixture: str, until: float | None = None) -> TakeoverApp:
    """The console over a fixture loaded all at once; the refresh timer is long so only the explicit refresh draws."""
    return TakeoverApp(ReplaySession(FIXTURES / fixture, speed=0, until=until), refresh_interval=3600)


async def settle(pilot) -> None:
    """Wait until the replay is loaded and the panes show it.

    The first refresh mounts the fd tables, the second fills them.
    """
    await pilot.app.session.finished.wait()
    for _ in range(2):
        pilot.app.refresh_panes(force=True)
        await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_steady_handoffs(snap_compare, size):
    """Handoffs at 20 per second, all answered by the forwarder."""
    assert snap_compare(replay_app("steady.jsonl", until=BEFORE_CLOSE["steady"]), terminal_size=SIZES[size], run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_forwarder_killed_fallback(snap_compare, size):
    """The forwarder killed with SIGKILL; the server answers by fallback."""
    assert snap_compare(replay_app("forwarder_killed.jsonl", until=BEFORE_CLOSE["forwarder_killed"]), terminal_size=SIZES[size], run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare, size):
    """The help screen over a steady session."""

    async def open_help(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(replay_app("steady.jsonl", until=BEFORE_CLOSE["steady"]), terminal_size=SIZES[size], run_before=open_help)


@pytest.mark.parametrize("size", SIZES)
def test_slow_motion_shared_socket(snap_compare, size):
    """Slow motion, stopped at a moment when sockets are in both fd tables."""

    async def fd_tab(pilot):
        await settle(pilot)
        if size == "80x24":
            await pilot.press("right")
            await pilot.pause()

    assert snap_compare(replay_app("slow_motion.jsonl", until=1.5), terminal_size=SIZES[size], run_before=fd_tab)


@pytest.mark.parametrize("size", SIZES)
def test_server_upgrade_completed(snap_compare, size):
    """Just after READY: both server generations, the listener inode in both fd tables."""

    async def fd_tab(pilot):
        await settle(pilot)
        if size == "80x24":
            await pilot.press("right")
            await pilot.pause()

    assert snap_compare(replay_app("upgrade.jsonl", until=UPGRADE_OVERLAP), terminal_size=SIZES[size], run_before=fd_tab)


@pytest.mark.parametrize("size", SIZES)
def test_server_upgrade_aborted(snap_compare, size):
    """A new generation crashed before READY; the old one keeps the listeners."""

    async def events_tab(pilot):
        await settle(pilot)
        if size == "80x24":
            await pilot.press("right", "right", "right")
            await pilot.pause()

    assert snap_compare(replay_app("upgrade_aborted.jsonl", until=BEFORE_CLOSE["upgrade_aborted"]), terminal_size=SIZES[size], run_before=events_tab)


def test_slow_motion_model_has_shared():
    """The slow-motion fixture really holds a socket in two processes at 1.5 s."""
    import asyncio

    session = ReplaySession(FIXTURES / "slow_motion.jsonl", speed=0, until=1.5)
    asyncio.run(session.start())
    assert session.model.shared_now >= 1

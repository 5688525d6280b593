"""The console driven with Textual's pilot over real workers, and over replays."""

from __future__ import annotations

import ast
import asyncio
import os
import random
from pathlib import Path

import pytest
from textual import events

from takeover_console.app import TakeoverApp
from takeover_console.panes.fdtables import FdTableView
from takeover_console.session import LiveSession, ReplaySession, SessionConfig, SessionError

PACKAGE = Path(__file__).parent.parent / "src" / "takeover_console"
FIXTURES = Path(__file__).parent / "fixtures"


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_until(predicate, pilot, timeout: float = 10.0) -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await pilot.pause(0.05)


def press_together(app: TakeoverApp, *keys: str) -> None:
    """Queue key presses with no wait between them, as a terminal delivers keys typed quickly.

    Pilot.press() waits for the app to go idle after each key, which hides races between keys.
    """
    for key in keys:
        app.post_message(events.Key(key, key if len(key) == 1 else None))


def live_app(workdir: Path, rate: float = 20.0) -> TakeoverApp:
    config = SessionConfig(listen="127.0.0.1:0", handoff=workdir / "h.sock", client_rate=rate)
    return TakeoverApp(LiveSession(config), refresh_interval=0.1)


def test_keys_kill_and_start_forwarder(workdir):
    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            model = app.model
            await wait_until(lambda: model.counters.by_forwarder >= 5, pilot)
            await pilot.press("k")
            await wait_until(lambda: model.processes["forwarder"].state == "exited", pilot)
            fell_back = model.counters.by_server
            await wait_until(lambda: model.counters.by_server >= fell_back + 10, pilot)
            failed_during_fallback = model.counters.failed
            await pilot.press("f")
            handed = model.counters.by_forwarder
            await wait_until(lambda: model.counters.by_forwarder >= handed + 5, pilot)
            pids = [view.pid for view in model.processes.values()]
            await pilot.press("q")
        return failed_during_fallback, pids, app

    failed, pids, app = asyncio.run(scenario())
    # The server keeps a copy of each connection until DONE, so killing the forwarder loses none.
    assert failed == 0
    assert app.model.counters.failed == 0
    assert all(pid_gone(pid) for pid in pids)


def test_quit_leaves_no_process(workdir):
    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(lambda: app.session.server_address is not None and len(app.session.supervisor.pids()) == 3, pilot)
            pids = list(app.session.supervisor.pids())
            await pilot.press("q")
        return pids

    pids = asyncio.run(scenario())
    assert len(pids) == 3
    assert all(pid_gone(pid) for pid in pids)
    assert not (workdir / "h.sock").exists()


def test_quick_rate_presses_all_count(workdir):
    """Seven quick presses of - step the rate down seven times, and the client runs at the last rate."""

    async def scenario():
        app = live_app(workdir, rate=200.0)
        async with app.run_test(size=(120, 40)) as pilot:
            client = app.session.supervisor.workers["client"]
            await wait_until(lambda: client.pid is not None and app.model.counters.by_forwarder >= 1, pilot)
            # Keys that arrive together (a terminal sends them in one read) run in one go.
            for _ in range(7):
                app.action_slower()
            rate_after_presses = app.session.client_rate
            await wait_until(lambda: "--rate" in client.args and client.args[client.args.index("--rate") + 1] == "1", pilot)
            await pilot.press("q")
        return rate_after_presses

    assert asyncio.run(scenario()) == 1


def test_arrows_switch_tabs_from_table():
    """In the narrow layout, right switches the tab even while a table has the focus."""

    async def scenario():
        app = TakeoverApp(ReplaySession(FIXTURES / "steady.jsonl", speed=0), refresh_interval=3600)
        async with app.run_test(size=(80, 24)) as pilot:
            await app.session.finished.wait()
            app.refresh_panes(force=True)
            await pilot.pause()
            app.query_one("#processes-table").focus()
            await pilot.press("right")
            return app.query_one("Tabs").active

    assert asyncio.run(scenario()) == "tab-fds"


def test_resize_under_help_applies_layout():
    """A resize while the help screen is open still lays out the panes' screen."""

    async def scenario():
        app = TakeoverApp(ReplaySession(FIXTURES / "steady.jsonl", speed=0), refresh_interval=3600)
        async with app.run_test(size=(160, 48)) as pilot:
            await app.session.finished.wait()
            await pilot.press("question_mark")
            await pilot.resize_terminal(80, 24)
            await pilot.press("escape")
            await pilot.pause()
            return app.screen.has_class("narrow"), app.query_one("Tabs").display

    narrow, tabs_shown = asyncio.run(scenario())
    assert narrow
    assert tabs_shown


KEYS = ["f", "k", "t", "c", "plus", "minus", "s", "d", "p", "question_mark", "escape", "right", "left", "tab", "up", "down", "x", "enter", "ctrl+p", "space"]


@pytest.mark.timeout(120)
def test_random_keys_live(workdir):
    """A few hundred keys from the bindings and others: no crash, no worker left behind."""
    rng = random.Random(20261204)

    async def scenario():
        app = live_app(workdir)
        pids: set[int] = set()
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(lambda: app.session.server_address is not None, pilot)
            for _ in range(300):
                await pilot.press(rng.choice(KEYS))
                pids.update(app.session.supervisor.pids())
            await pilot.pause(0.2)
            pids.update(app.session.supervisor.pids())
            assert app.is_running
            await app.session.close()
        return pids

    pids = asyncio.run(scenario())
    assert pids
    assert all(pid_gone(pid) for pid in pids)


def test_random_keys_replay():
    rng = random.Random(4)

    async def scenario():
        app = TakeoverApp(ReplaySession(FIXTURES / "forwarder_restarted.jsonl", speed=20), refresh_interval=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(300):
                await pilot.press(rng.choice(KEYS))
            assert app.is_running
            await pilot.press("escape", "q")

    asyncio.run(scenario())


def test_replay_shows_recorded_kill():
    async def scenario():
        app = TakeoverApp(ReplaySession(FIXTURES / "forwarder_killed.jsonl", speed=0), refresh_interval=3600)
        async with app.run_test(size=(120, 40)) as pilot:
            await app.session.finished.wait()
            app.refresh_panes()
            await pilot.pause()
            texts = [entry.text for entry in app.model.log]
            return texts, app.check_action("kill_forwarder", ())

    texts, kill_allowed = asyncio.run(scenario())
    assert any("killed (SIGKILL)" in text for text in texts)
    assert any("fallback" in text for text in texts)
    assert kill_allowed is False


def test_textual_only_in_ui_modules():
    """Only app.py and panes/ may import Textual; the rest of the package stays UI-free."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "panes" or relative.name == "app.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "textual" or name.startswith("textual.") for name in names):
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


def test_import_check_sees_textual(tmp_path):
    """The import check above would catch a Textual import (it is not vacuous)."""
    tree = ast.parse("from textual.app import App\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom) and node.module.startswith("textual")
    assert os.path.isdir(PACKAGE / "panes")


def test_forwarder_restarts_after_takeover_and_kill(workdir):
    """r (takeover), then k, then f: the forwarder binds the socket again and handoffs resume."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            await pilot.press("r")
            await wait_until(lambda: session.forwarder_name == "forwarder-2" and session.upgrading is None, pilot)
            await pilot.press("k")
            await wait_until(lambda: not session.forwarder_running(), pilot)
            await pilot.press("f")
            await wait_until(session.forwarder_running, pilot)
            handed = app.model.counters.by_forwarder
            await wait_until(lambda: app.model.counters.by_forwarder >= handed + 3, pilot)
            state = app.model.processes["forwarder-2"].state
            await pilot.press("q")
        return state

    assert asyncio.run(scenario()) == "running"


def test_quick_kill_then_start_ends_up(workdir):
    """f right after k applies before the kill is reaped; k f k, and f k from down, leave no forwarder."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            first = session.supervisor.workers["forwarder"].pid
            app.action_kill_forwarder()
            start_offered = app.check_action("start_forwarder", ())
            app.action_start_forwarder()
            kill_offered = app.check_action("kill_forwarder", ())
            await wait_until(lambda: session.forwarder_running() and session.supervisor.workers["forwarder"].pid != first and not session.forwarder_changing, pilot)
            app.action_kill_forwarder()
            app.action_start_forwarder()
            app.action_kill_forwarder()
            await wait_until(lambda: not session.forwarder_running() and not session.forwarder_changing, pilot)
            app.action_start_forwarder()
            kill_offered_while_down = app.check_action("kill_forwarder", ())
            app.action_kill_forwarder()
            await wait_until(lambda: not session.forwarder_changing, pilot)
            down = not session.forwarder_running()
            await pilot.press("q")
        return start_offered, kill_offered, kill_offered_while_down, down

    assert asyncio.run(scenario()) == (True, True, True, True)


def test_two_upgrade_keys_start_one_generation(workdir):
    """A second upgrade requested before the first is ready is rejected, and one new generation runs."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            app.action_upgrade_server()
            key_offered = app.check_action("upgrade_server", ())
            try:
                await session.upgrade_server()
            except SessionError as exc:
                rejection = str(exc)
            await wait_until(lambda: session.server_name == "server-2" and session.upgrading is None, pilot)
            answered = app.model.counters.by_forwarder
            await wait_until(lambda: app.model.counters.by_forwarder >= answered + 3, pilot)
            names = sorted(name for name in session.supervisor.workers if name.startswith("server"))
            state = app.model.processes["server-2"].state
            await pilot.press("q")
        return key_offered, rejection, names, state

    key_offered, rejection, names, state = asyncio.run(scenario())
    assert key_offered is False
    assert "server-2 is still taking over" in rejection
    assert names == ["server", "server-2"]
    assert state == "running"


def test_quick_pause_presses_end_paused(workdir):
    """With the client paused, c pressed twice at once ends paused, as the last press asked."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            await pilot.press("c")
            await wait_until(lambda: not session.client_changing and not session.client_running(), pilot)
            press_together(app, "c", "c")
            await wait_until(lambda: not session.client_changing, pilot)
            paused = session.client_paused
            running = session.client_running()
            await pilot.press("q")
        return paused, running

    assert asyncio.run(scenario()) == (True, False)


def test_server_started_again_after_kill(workdir):
    """After the server is killed, the status shows it down, and n starts a server that answers requests."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            first = session.supervisor.workers["server"].pid
            session.supervisor.kill("server")
            await wait_until(lambda: not session.server_running() and app.check_action("start_server", ()), pilot)
            status_bar = app.screen_stack[0].query_one("#status")
            await wait_until(lambda: "server down" in str(status_bar.render()), pilot)
            status = str(status_bar.render())
            upgrade_offered = app.check_action("upgrade_server", ())
            await pilot.press("n")
            await wait_until(lambda: session.server_running() and session.supervisor.workers["server"].pid != first, pilot)
            answered = app.model.counters.by_forwarder + app.model.counters.by_server
            await wait_until(lambda: app.model.counters.by_forwarder + app.model.counters.by_server >= answered + 3, pilot)
            await pilot.press("q")
        return status, upgrade_offered

    status, upgrade_offered = asyncio.run(scenario())
    assert "server down" in status
    assert upgrade_offered is False


def test_client_started_again_after_kill(workdir):
    """After the client is killed, c starts a new one rather than pausing a client that is gone."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            first = session.supervisor.workers["client"].pid
            session.supervisor.kill("client")
            await wait_until(lambda: not session.client_running(), pilot)
            offered = app.check_action("resume_client", ())
            await pilot.press("c")
            await wait_until(lambda: session.client_running() and session.supervisor.workers["client"].pid != first, pilot)
            paused = session.client_paused
            await pilot.press("q")
        return offered, paused

    assert asyncio.run(scenario()) == (True, False)


def test_two_start_server_keys_start_one(workdir):
    """n pressed twice at once after the server died starts one server, and the screen shows it running."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 3, pilot)
            session.supervisor.kill("server")
            await wait_until(lambda: app.check_action("start_server", ()), pilot)
            app.action_start_server()
            offered_again = app.check_action("start_server", ())
            await wait_until(lambda: session.server_running() and not session.server_changing, pilot)
            pid = session.supervisor.workers["server"].pid
            await wait_until(lambda: app.model.processes["server"].pid == pid and app.model.processes["server"].state == "running", pilot)
            await pilot.press("q")
        return offered_again

    assert asyncio.run(scenario()) is False


def test_rate_presses_give_one_notice(workdir):
    """Ten quick + presses show one notice with the final rate, once the presses stop."""

    async def scenario():
        app = live_app(workdir)
        notices: list[str] = []
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(lambda: app.model.counters.by_forwarder >= 1, pilot)
            notify = app.notify
            app.notify = lambda message, **kwargs: (notices.append(message), notify(message, **kwargs))
            press_together(app, *["plus"] * 10)
            await wait_until(lambda: notices, pilot)
            await pilot.pause(0.5)
            rate = app.session.client_rate
            notices_shown = list(notices)
            await pilot.press("q")
        return notices_shown, rate

    notices, rate = asyncio.run(scenario())
    assert notices == [f"client rate {rate:g}/s"]


@pytest.mark.parametrize("presses", [2, 3, 4])
def test_quick_client_table_toggles(workdir, presses):
    """d pressed several times at once shows or hides the client's fd table without an error."""

    async def scenario():
        app = live_app(workdir)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(lambda: app.model.counters.by_forwarder >= 1, pilot)
            press_together(app, *["d"] * presses)
            await pilot.pause(0.5)
            tables_shown = [view.worker_name for view in app.query(FdTableView)]
            await pilot.press("q")
        return tables_shown, app.return_code

    tables_shown, code = asyncio.run(scenario())
    assert code == 0
    assert ("client" in tables_shown) == (presses % 2 == 1)


def test_takeover_key_during_takeover_explains(workdir):
    """u pressed while a takeover runs does nothing but explain why."""

    async def scenario():
        app = live_app(workdir)
        notices: list[str] = []
        async with app.run_test(size=(120, 40)) as pilot:
            session = app.session
            await wait_until(lambda: app.model.counters.by_forwarder >= 1, pilot)
            notify = app.notify
            app.notify = lambda message, **kwargs: (notices.append(message), notify(message, **kwargs))
            press_together(app, "u", "u")
            await wait_until(lambda: session.server_name == "server-2" and session.upgrading is None, pilot)
            names = sorted(name for name in session.supervisor.workers if name.startswith("server"))
            notices_shown = list(notices)
            await pilot.press("q")
        return names, notices_shown

    names, notices_shown = asyncio.run(scenario())
    assert names == ["server", "server-2"]
    assert sum("server-2 is still taking over" in notice for notice in notices_shown) == 1

"""The console: a Textual app that shows a live or replayed session and drives the workers.

The app reads the session model on a timer (four times a second by default) and asks
each pane to update what changed; bursts of observations collapse into one refresh.
Process control runs in Textual workers, so the UI never waits on a process.
"""

from __future__ import annotations

import logging
from typing import Iterable

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static, Tab, Tabs
from textual.worker import Worker, WorkerState

from takeover_console.panes.connections import ConnectionsPane
from takeover_console.panes.eventlog import EventLogPane
from takeover_console.panes.fdtables import FdTablesPane
from takeover_console.panes.formatting import set_line
from takeover_console.panes.help import HelpScreen
from takeover_console.panes.processes import ProcessesPane
from takeover_console.panes.traffic import TrafficPane

log = logging.getLogger(__name__)

# Below this size the panes move into tabs.
WIDE_MIN_WIDTH = 120
WIDE_MIN_HEIGHT = 34
RATE_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

# Which panes each tab shows when the terminal is narrow.
TAB_PANES = {
    "tab-overview": ("processes", "traffic"),
    "tab-fds": ("fdtables",),
    "tab-connections": ("connections",),
    "tab-events": ("events",),
}
# Names in the command palette that differ from the footer's, where one footer item stands
# for two keys.
PALETTE_NAMES = {"faster": ("Rate up", "+"), "slower": ("Rate down", "-")}
# Seconds after the last + or - press before the new rate is shown.
RATE_NOTICE_DELAY = 0.3
LIVE_ACTIONS = {
    "start_forwarder", "kill_forwarder", "stop_forwarder", "pause_client", "resume_client",
    "faster", "slower", "slow_motion", "upgrade_server", "restart_forwarder", "failed_upgrade",
    "start_server",
}


class TakeoverApp(App):
    """The takeover-console UI over a LiveSession or a ReplaySession."""

    CSS_PATH = "console.tcss"
    TITLE = "takeover-console"
    BINDINGS = [
        # First, so that a narrow footer still shows them.
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        # Shown only while no server runs, when it matters most.
        Binding("n", "start_server", "Start server"),
        Binding("f", "start_forwarder", "Start forwarder"),
        Binding("k", "kill_forwarder", "Kill forwarder"),
        # The footer shows the keys of a demo. t, x, d and p are in the help (?) and README.
        Binding("t", "stop_forwarder", "Stop forwarder", show=False),
        Binding("c", "pause_client", "Pause client"),
        Binding("c", "resume_client", "Resume client"),
        Binding("plus", "faster", "Rate", key_display="+/-"),
        Binding("minus", "slower", "Rate down", key_display="-", show=False),
        Binding("s", "slow_motion", "Slow motion"),
        Binding("u", "upgrade_server", "Upgrade server"),
        Binding("r", "restart_forwarder", "Restart forwarder"),
        Binding("x", "failed_upgrade", "Failing upgrade", show=False),
        Binding("d", "client_fds", "Client fds", show=False),
        Binding("p", "freeze", "Freeze", show=False),
        # In the narrow layout the arrows switch tabs even when a table has the focus.
        Binding("left", "previous_tab", "Previous tab", show=False, priority=True),
        Binding("right", "next_tab", "Next tab", show=False, priority=True),
    ]

    def __init__(self, session, refresh_interval: float = 0.25, script=None):
        super().__init__()
        self.session = session
        # An optional coroutine function run after start-up with the app (the demo script).
        self._script = script
        self._refresh_interval = refresh_interval
        self.frozen = False
        self._quitting = False
        self._seen_version = -1
        self._workers_seen: tuple | None = None
        self._rate_notice: Timer | None = None

    @property
    def model(self):
        """The session model the panes read."""
        return self.session.model

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Tabs(
            Tab("Overview", id="tab-overview"),
            Tab("fd tables", id="tab-fds"),
            Tab("Connections", id="tab-connections"),
            Tab("Events", id="tab-events"),
            id="tabs",
        )
        with Container(id="panes"):
            yield ProcessesPane(id="processes", classes="pane")
            yield TrafficPane(id="traffic", classes="pane")
            yield FdTablesPane(id="fdtables", classes="pane")
            yield ConnectionsPane(id="connections", classes="pane")
            yield EventLogPane(id="events", classes="pane")
        # Ctrl+P still opens the command palette. Its footer item would crowd out keys.
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        if self.session.live:
            self.session.on_worker_change = lambda: self.call_later(self.refresh_panes, True)
        self._apply_layout(self.size.width, self.size.height)
        self.run_worker(self._start_session(), name="start-session", exit_on_error=False)
        self.set_interval(self._refresh_interval, self.refresh_panes)

    async def _start_session(self) -> None:
        await self.session.start()
        self.refresh_panes()
        if self._script is not None:
            await self._script(self)
            self.say("demo script finished; the keys still work, q quits")

    def say(self, text: str) -> None:
        """Show a line of narration to the audience."""
        self.notify(text, timeout=6)

    # Layout.

    def on_resize(self, event) -> None:
        self._apply_layout(event.size.width, event.size.height)

    def _apply_layout(self, width: int, height: int) -> None:
        narrow = width < WIDE_MIN_WIDTH or height < WIDE_MIN_HEIGHT
        # The panes' screen, also when the help screen is on top of it.
        main = self.screen_stack[0]
        main.set_class(narrow, "narrow")
        self._show_tab(main.query_one(Tabs).active or "tab-overview")

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        self._show_tab(event.tab.id)

    def _show_tab(self, tab_id: str) -> None:
        visible = TAB_PANES.get(tab_id, TAB_PANES["tab-overview"])
        for pane in self.screen_stack[0].query(".pane"):
            pane.set_class(pane.id not in visible, "off-tab")

    # Refreshing.

    def refresh_panes(self, force: bool = False) -> None:
        """Update every pane from the model, unless frozen or nothing changed (or ``force``)."""
        if self.frozen or self._quitting or (self.model.version == self._seen_version and not force):
            return
        self._seen_version = self.model.version
        try:
            # The panes live on the first screen; the help screen may be on top of it.
            main = self.screen_stack[0]
            for pane in (ProcessesPane, TrafficPane, FdTablesPane, ConnectionsPane, EventLogPane):
                main.query_one(pane).refresh_from(self.model)
        except (NoMatches, IndexError):
            # The app is starting or closing.
            return
        self._update_status()
        # The keys on offer depend on which workers run, and a worker may die at any time.
        workers = self._worker_states()
        if workers != self._workers_seen:
            self._workers_seen = workers
            self.refresh_bindings()

    def _stopped(self, name: str) -> bool:
        """True when the last sample found the worker's process stopped by SIGSTOP."""
        view = self.model.processes.get(name)
        return view is not None and view.status == "stopped"

    def _client_lost(self) -> bool:
        """True when the client should run but its process is gone."""
        session = self.session
        return not session.client_paused and session.server_address is not None and not session.client_running() and not session.client_changing

    def _worker_states(self) -> tuple:
        if not self.session.live:
            return ()
        session = self.session
        return (session.forwarder_running(), session.server_running(), session.client_running(), session.upgrading)

    def _update_status(self) -> None:
        status = Text()
        if self.session.live:
            status.append(" LIVE ", style="bold white on dark_green")
            address = self.session.server_address
            status.append("  server ")
            if address is None:
                status.append("starting")
            elif self.session.server_running():
                status.append(address)
                if self._stopped(self.session.server_name):
                    status.append(" stopped (SIGSTOP)", style="bold yellow")
            else:
                status.append("down (n starts one)", style="bold red")
            status.append("  forwarder ")
            if not self._forwarder_running():
                status.append("down", style="bold red")
            elif self._stopped(self.session.forwarder_name):
                status.append("stopped (SIGSTOP)", style="bold yellow")
            else:
                status.append("up", style="bold green")
            status.append("  client ")
            if self.session.client_paused:
                status.append("paused")
            elif self.session.client_running() or address is None:
                status.append(f"{self.session.client_rate:g}/s")
                if self._stopped("client"):
                    status.append(" stopped (SIGSTOP)", style="bold yellow")
            else:
                status.append("down (c starts it)", style="bold red")
        else:
            status.append(" REPLAY ", style="bold white on dark_blue")
            status.append(f"  {self.session.path.name}")
            if self.session.finished.is_set():
                status.append("  replay ended", style="bold")
        if self.model.slow_motion:
            status.append("  SLOW MOTION", style="bold yellow")
        if self.frozen:
            status.append("  FROZEN (p to resume)", style="bold red")
        set_line(self.screen_stack[0].query_one("#status", Static), status)

    def _forwarder_running(self) -> bool:
        return bool(self.session.live and self.session.forwarder_running())

    # Which keys apply now: the footer and the command palette show only these.

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in LIVE_ACTIONS and not self.session.live:
            return False
        # The forwarder keys follow what was last requested, not only the process, so a key
        # pressed right after another still applies (k then f before the kill is reaped).
        if action == "start_forwarder":
            return not self.session.forwarder_requested or not self._forwarder_running()
        if action in ("kill_forwarder", "stop_forwarder"):
            return self.session.forwarder_requested and (self._forwarder_running() or self.session.forwarder_changing)
        if action in ("upgrade_server", "failed_upgrade"):
            return self.session.upgrading is None and self.session.server_running()
        if action == "start_server":
            session = self.session
            return session.upgrading is None and session.server_address is not None and not session.server_running() and not session.server_changing
        if action == "restart_forwarder":
            return self.session.upgrading is None and self.session.forwarder_requested and self._forwarder_running()
        # c resumes a paused client, and starts one that died, as well as pausing a running one.
        if action == "pause_client":
            return not self.session.client_paused and not self._client_lost()
        if action == "resume_client":
            return self.session.client_paused or self._client_lost()
        if action in ("previous_tab", "next_tab"):
            # Elsewhere the arrows go on to the focused widget, such as a table to scroll.
            # Not while the help screen is on top.
            return self.screen is self.screen_stack[0] and self.screen.has_class("narrow")
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            # Keys left out of the footer (t, x, d, p) are offered here too.
            if binding.action in ("quit", "help", "previous_tab", "next_tab") or self.check_action(binding.action, ()) is not True:
                continue
            name, key = PALETTE_NAMES.get(binding.action, (binding.description, binding.key_display or binding.key))
            yield SystemCommand(name, f"key {key}", lambda action=binding.action: self.run_action(action))

    def on_key(self, event: events.Key) -> None:
        # u, x and r are not offered while a takeover runs, so explain why nothing happens.
        if event.key in ("u", "x", "r") and self.session.live and self.session.upgrading is not None:
            self.notify(f"{self.session.upgrading} is still taking over; press {event.key} again once it is ready or has failed")

    # Actions.

    def _control(self, work, description: str) -> None:
        self.run_worker(work, name=description, group="control", exit_on_error=False)

    def action_kill_forwarder(self) -> None:
        self.session.kill_forwarder()
        self.notify("forwarder killed with SIGKILL: new connections fall back to the server")
        self.refresh_bindings()

    def action_stop_forwarder(self) -> None:
        self._control(self.session.stop_forwarder(), "stop forwarder")
        self.notify("forwarder asked to stop (SIGTERM): it drains, then exits")
        self.refresh_bindings()

    def action_start_forwarder(self) -> None:
        self._control(self.session.start_forwarder(), "start forwarder")
        self.notify("starting the forwarder: handoffs resume once the channel is up")
        self.refresh_bindings()

    def action_pause_client(self) -> None:
        self._control(self.session.pause_client(), "pause client")
        self.refresh_bindings()

    def action_resume_client(self) -> None:
        self._control(self.session.resume_client(), "resume client")
        self.refresh_bindings()

    def action_faster(self) -> None:
        self._change_rate(+1)

    def action_slower(self) -> None:
        self._change_rate(-1)

    def _change_rate(self, step: int) -> None:
        current = self.session.client_rate
        index = min(range(len(RATE_STEPS)), key=lambda i: abs(RATE_STEPS[i] - current))
        rate = RATE_STEPS[max(0, min(len(RATE_STEPS) - 1, index + step))]
        self._control(self.session.set_client_rate(rate), "client rate")
        # One notice for a run of presses, shown once they stop, not one per press piling up
        # over the panes.
        if self._rate_notice is not None:
            self._rate_notice.stop()
        self._rate_notice = self.set_timer(RATE_NOTICE_DELAY, self._notify_rate)

    def _notify_rate(self) -> None:
        self._rate_notice = None
        self.notify(f"client rate {self.session.client_rate:g}/s", timeout=2)

    def action_upgrade_server(self) -> None:
        self._control(self.session.upgrade_server(), "upgrade server")
        self.notify("upgrading the server: the new generation takes the listening socket")
        self.refresh_bindings()

    def action_failed_upgrade(self) -> None:
        self._control(self.session.upgrade_server("crash-before-ready"), "failing upgrade")
        self.notify("upgrading with a new generation that crashes before READY: watch the rollback")
        self.refresh_bindings()

    def action_start_server(self) -> None:
        self._control(self.session.start_server(), "start server")
        self.notify("starting a new server: it binds the listening address again")

    def action_restart_forwarder(self) -> None:
        self._control(self.session.restart_forwarder(), "restart forwarder")
        self.notify("restarting the forwarder by takeover: the socket path never disappears")
        self.refresh_bindings()

    def action_slow_motion(self) -> None:
        on = not self.session.slow_motion
        self._control(self.session.set_slow_motion(on), "slow motion")
        self.notify("slow motion on: each handed-over socket stays in both fd tables for a moment" if on else "slow motion off")

    def action_client_fds(self) -> None:
        self.query_one(FdTablesPane).toggle_client()
        self._seen_version = -1
        self.refresh_panes()

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        if not self.frozen:
            self._seen_version = -1
            self.refresh_panes()
        else:
            self._update_status()

    def action_previous_tab(self) -> None:
        self.screen_stack[0].query_one(Tabs).action_previous_tab()

    def action_next_tab(self) -> None:
        self.screen_stack[0].query_one(Tabs).action_next_tab()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self._quitting = True
        self.notify("stopping workers...")
        await self.session.close()
        self.exit()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR:
            error = event.worker.error
            log.error("%s failed: %s", event.worker.name, error)
            self.notify(f"{event.worker.name} failed: {error}", severity="error", timeout=8)
        if event.state in (WorkerState.SUCCESS, WorkerState.ERROR):
            self.refresh_bindings()

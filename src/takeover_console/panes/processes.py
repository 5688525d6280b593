"""The processes pane: one row per worker with its pid, state and figures."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from takeover_console.model import SessionModel
from takeover_console.panes.formatting import STATE_STYLES, duration, percent, role_text, size
from takeover_console.panes.synced_table import SyncedTable

COLUMNS = [
    ("role", "role"),
    ("pid", "pid"),
    ("gen", "gen"),
    ("state", "state"),
    ("uptime", "uptime"),
    ("cpu", "cpu"),
    ("rss", "rss"),
    ("fds", "fds"),
    ("answered", "answered"),
]


class ProcessesPane(Vertical):
    """Role, pid, generation, state, uptime, cpu, rss, fd count and requests answered."""

    def compose(self) -> ComposeResult:
        yield Static("Processes", classes="pane-title")
        yield SyncedTable(COLUMNS, id="processes-table")

    def refresh_from(self, model: SessionModel) -> None:
        """Show every worker the model knows, in the order they first appeared."""
        rows = {}
        for name, view in model.processes.items():
            alive = view.state not in ("exited", "idle")
            uptime = model.now - view.started_t if alive and view.started_t is not None else None
            state = view.state if view.state != "exited" else _exit_words(view.detail)
            rows[name] = (
                role_text(name),
                str(view.pid or "-"),
                str(view.generation),
                Text(state, style=STATE_STYLES.get(view.state, "")),
                duration(uptime),
                percent(view.cpu_percent) if alive else "-",
                size(view.rss) if alive else "-",
                str(view.fds) if alive and view.fds is not None else "-",
                str(view.answered) if view.role != "client" else str(model.counters.by_server + model.counters.by_forwarder),
            )
        self.query_one(SyncedTable).sync(rows)


def _exit_words(detail: str) -> str:
    if "SIGKILL" in detail:
        return "killed (SIGKILL)"
    if "SIGTERM" in detail:
        return "stopped (SIGTERM)"
    return detail.removeprefix("exited: ").split(" (")[0] or "exited"

"""The processes pane: one row per worker with its pid, state and figures."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from takeover_console.model import SessionModel
from takeover_console.panes.formatting import ROLE_STYLES, STATE_STYLES, duration, percent, role_text, size
from takeover_console.panes.row_table import RowTable

# Seconds of session time an exited later generation stays in the table.
EXITED_SHOWN_SECONDS = 10.0

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
        yield RowTable(COLUMNS, id="processes-table")

    def refresh_from(self, model: SessionModel) -> None:
        """Show every worker the model knows, in the order they first appeared."""
        rows = {}
        alive_roles = {view.role for view in model.processes.values() if view.state != "exited"}
        for name, view in model.processes.items():
            # A replaced generation leaves the table a while after it exits.
            exited_long_ago = view.exited_t is not None and model.now - view.exited_t > EXITED_SHOWN_SECONDS
            if view.state == "exited" and exited_long_ago and view.role in alive_roles:
                continue
            alive = view.state not in ("exited", "idle")
            uptime = model.now - view.started_t if alive and view.started_t is not None else None
            state = view.state if view.state != "exited" else _exit_words(view.detail)
            rows[name] = (
                role_text(view.role) if name == view.role else Text(name, style=ROLE_STYLES.get(view.role, "")),
                str(view.pid or "-"),
                str(view.generation),
                Text(state, style=STATE_STYLES.get(view.state, "")),
                duration(uptime),
                percent(view.cpu_percent) if alive else "-",
                size(view.rss) if alive else "-",
                str(view.fds) if alive and view.fds is not None else "-",
                str(view.answered) if view.role != "client" else str(model.counters.by_server + model.counters.by_forwarder),
            )
        self.query_one(RowTable).sync(rows)


def _exit_words(detail: str) -> str:
    if "SIGKILL" in detail:
        return "killed (SIGKILL)"
    if "SIGTERM" in detail:
        return "stopped (SIGTERM)"
    return detail.removeprefix("exited: ").split(" (")[0] or "exited"

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
        newest = _newest_of_each_role(model)
        for name, view in model.processes.items():
            # A replaced generation leaves the table a while after it exits. The newest
            # process of a role stays, so a killed forwarder is still seen as killed.
            exited_long_ago = view.exited_t is not None and model.now - view.exited_t > EXITED_SHOWN_SECONDS
            if view.state == "exited" and exited_long_ago and newest.get(view.role) != name:
                continue
            alive = view.state not in ("exited", "idle")
            uptime = model.now - view.started_t if alive and view.started_t is not None else None
            state = view.state if view.state != "exited" else _exit_words(view.detail)
            state_style = STATE_STYLES.get(view.state, "")
            if alive and view.status == "stopped":
                state, state_style = "stopped (SIGSTOP)", "bold yellow"
            rows[name] = (
                role_text(view.role) if name == view.role else Text(name, style=ROLE_STYLES.get(view.role, "")),
                str(view.pid or "-"),
                str(view.generation),
                Text(state, style=state_style),
                duration(uptime),
                percent(view.cpu_percent) if alive else "-",
                size(view.rss) if alive else "-",
                str(view.fds) if alive and view.fds is not None else "-",
                str(view.answered),
            )
        self.query_one(RowTable).sync(rows)


def _newest_of_each_role(model: SessionModel) -> dict[str, str]:
    """Map each role onto the name of its most recently started process."""
    newest: dict[str, tuple[float, str]] = {}
    for name, view in model.processes.items():
        started = view.started_t if view.started_t is not None else float("-inf")
        if view.role not in newest or started >= newest[view.role][0]:
            newest[view.role] = (started, name)
    return {role: name for role, (_, name) in newest.items()}


def _exit_words(detail: str) -> str:
    if "SIGKILL" in detail:
        return "killed (SIGKILL)"
    if "SIGTERM" in detail:
        return "stopped (SIGTERM)"
    return detail.removeprefix("exited: ").split(" (")[0] or "exited"

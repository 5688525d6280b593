"""The connections pane: live connections with their current holder, then the last outcomes."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from takeover_console.model import ConnectionView, SessionModel
from takeover_console.panes.formatting import ROLE_STYLES, duration, set_line
from takeover_console.panes.row_table import RowTable

# Seconds of session time between two refreshes of this pane.
REFRESH_SECONDS = 1.0
LIVE_SHOWN = 24
CLOSED_SHOWN = 8

COLUMNS = [
    ("connection", "conn"),
    ("client", "client"),
    ("held by", "holders"),
    ("state", "state"),
    ("age", "age"),
    ("outcome", "outcome"),
]


class ConnectionsPane(Vertical):
    """Open connections first (newest last), then recently closed ones, dimmed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._refreshed_at = float("-inf")

    def compose(self) -> ComposeResult:
        yield Static("Connections", classes="pane-title")
        yield RowTable(COLUMNS, id="connections-table")

    def refresh_from(self, model: SessionModel) -> None:
        """Show up to LIVE_SHOWN open and CLOSED_SHOWN closed connections, at most once a second."""
        # At hundreds of connections per second every row changes on every refresh, and a
        # DataTable redraws all its visible cells after any row change.
        if model.now - self._refreshed_at < REFRESH_SECONDS:
            return
        self._refreshed_at = model.now
        live = list(model.connections.values())[-LIVE_SHOWN:]
        closed = list(model.closed)[-CLOSED_SHOWN:]
        rows = {}
        for conn in live:
            rows[conn.id] = _cells(conn, model.now, dim=False)
        for conn in closed:
            rows[conn.id] = _cells(conn, model.now, dim=True)
        title = f"Connections: {len(model.connections)} open"
        set_line(self.query_one(Static), title)
        self.query_one(RowTable).sync(rows)


def _cells(conn: ConnectionView, now: float, dim: bool) -> tuple:
    holders = Text()
    for index, (role, fd) in enumerate(conn.holders.items()):
        if index:
            holders.append(" + ")
        holders.append(f"{role} fd {fd}", style=ROLE_STYLES.get(role, ""))
    if not conn.holders:
        holders = Text(" -> ".join(conn.held_by), style="dim")
    end = conn.closed_t if conn.closed_t is not None else now
    outcome = conn.outcome if conn.outcome else ""
    if conn.answered_by:
        outcome = f"answered by {conn.answered_by}" if outcome in ("", "served") else outcome
    style = "dim" if dim else ""
    client_port = conn.peer.rsplit(":", 1)[-1] if conn.peer != "?" else "?"
    return (
        Text(conn.id, style=style),
        Text(client_port, style=style),
        holders,
        Text(conn.state, style=style),
        Text(duration(end - conn.opened_t), style=style),
        Text(outcome, style="red" if "without" in outcome or "exited" in outcome else style),
    )

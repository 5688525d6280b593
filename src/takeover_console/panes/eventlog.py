"""The handoff event log: a bounded, time-stamped list of what happened, in plain words."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import RichLog, Static

from takeover_console.model import SessionModel
from takeover_console.panes.formatting import ROLE_STYLES

MAX_LINES = 500
# Newest entries written per refresh; the rest of a burst is summarised in one line.
WRITTEN_PER_REFRESH = 20
# Kinds shown in red or bold, so failures and process deaths stand out.
ALERT_KINDS = {"failed", "error", "peer_refused", "channel_down", "worker_exited"}
MILESTONE_KINDS = {"channel_up", "worker_started", "listening", "slow_motion"}


class EventLogPane(Vertical):
    """Appends the model's new log entries; time is seconds since the session began."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._entries_shown = 0

    def compose(self) -> ComposeResult:
        yield Static("Handoff events", classes="pane-title")
        yield RichLog(max_lines=MAX_LINES, wrap=True, min_width=20, markup=False, id="event-log")

    def refresh_from(self, model: SessionModel) -> None:
        """Write the entries logged since the last refresh."""
        fresh = min(model.logged - self._entries_shown, len(model.log))
        if fresh <= 0:
            return
        log = self.query_one(RichLog)
        start = model.start_t or 0.0
        entries = list(model.log)[len(model.log) - fresh :]
        lines = []
        skipped = model.logged - self._entries_shown - WRITTEN_PER_REFRESH
        if skipped > 0:
            # At hundreds of connections per second nobody reads every line, and rendering
            # them all would cost more CPU than the rest of the console.
            lines.append(Text(f"         ... {skipped} more events at this rate, not shown", style="dim italic"))
        for entry in entries[-WRITTEN_PER_REFRESH:]:
            style = "bold red" if entry.kind in ALERT_KINDS else ("bold" if entry.kind in MILESTONE_KINDS else "")
            lines.append(Text.assemble((f"{entry.t - start:8.3f} ", "dim"), (f"{entry.role:<9} ", ROLE_STYLES.get(entry.role, "")), (entry.text, style)))
        # One write per refresh: each write() renders, resizes and scrolls the log once.
        log.write(Text("\n").join(lines))
        self._entries_shown = model.logged

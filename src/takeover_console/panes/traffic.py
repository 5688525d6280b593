"""The traffic pane: answers per second by server and by forwarder, failures and latency."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from takeover_console.model import SessionModel
from takeover_console.panes.formatting import millis, set_line

WINDOW_SECONDS = 60


class TrafficPane(Vertical):
    """Sparklines of the last minute and the totals behind them."""

    def compose(self) -> ComposeResult:
        yield Static("Traffic: answers/s, total, last 60 s", classes="pane-title")
        # Each label sits beside its sparkline, so the figures below fit in the 7 lines
        # the pane has at 120x40.
        with Horizontal(classes="traffic-row"):
            yield Static(id="traffic-forwarder-label", classes="traffic-label")
            yield Sparkline([0] * WINDOW_SECONDS, id="traffic-forwarder")
        with Horizontal(classes="traffic-row"):
            yield Static(id="traffic-server-label", classes="traffic-label")
            yield Sparkline([0] * WINDOW_SECONDS, id="traffic-server")
        yield Static(id="traffic-figures")

    def refresh_from(self, model: SessionModel) -> None:
        """Redraw the sparklines and figures when the model has moved on."""
        rates = model.rates(WINDOW_SECONDS)
        # The current second is still filling up, so the rate shown is the last complete one.
        last = rates[-2] if len(rates) > 1 else (0, 0, 0)
        counters = model.counters
        self.query_one("#traffic-forwarder", Sparkline).data = [forwarder for _, forwarder, _ in rates]
        self.query_one("#traffic-server", Sparkline).data = [server for server, _, _ in rates]
        set_line(self.query_one("#traffic-forwarder-label", Static), Text.assemble(("forwarder ", "bold magenta"), f"{last[1]:>4}/s {counters.by_forwarder:>7}"))
        set_line(self.query_one("#traffic-server-label", Static), Text.assemble(("server    ", "bold cyan"), f"{last[0]:>4}/s {counters.by_server:>7}"))
        failed_style = "bold red" if counters.failed else "green"
        set_line(
            self.query_one("#traffic-figures", Static),
            Text.assemble(
                f"latency p50 {millis(model.latency_percentile(50))}  p99 {millis(model.latency_percentile(99))}",
                f"\nhandoffs {counters.handoffs}, round trip p50 {millis(model.handoff_percentile(50))}",
                f"\nfallbacks {counters.fallbacks}   ",
                ("failed ", failed_style),
                (str(counters.failed), failed_style),
                f"\nsockets in two processes: {model.shared_now} (peak {model.shared_peak})",
            ),
        )

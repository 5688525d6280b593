"""Cell formatting shared by the panes: durations, sizes and the colours of shared sockets."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

# Colours for sockets held by more than one process; a socket keeps its colour while shared.
SHARED_COLOURS = ("magenta", "cyan", "yellow", "green", "bright_blue", "bright_red", "bright_magenta", "bright_cyan")
ROLE_STYLES = {"server": "bold cyan", "forwarder": "bold magenta", "client": "bold yellow"}
STATE_STYLES = {"running": "green", "starting": "yellow", "stopping": "yellow", "exited": "red", "idle": "dim"}


def duration(seconds: float | None) -> str:
    """Format seconds as 4.2s, 3m07s or 2h05m."""
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def size(value: int | None) -> str:
    """Format a byte count as 24.1M."""
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def percent(value: float | None) -> str:
    """Format a CPU percentage."""
    return "-" if value is None else f"{value:.1f}%"


def millis(value: float | None) -> str:
    """Format milliseconds."""
    return "-" if value is None else f"{value:.2f} ms"


def role_text(role: str) -> Text:
    """A role name in its colour."""
    return Text(role, style=ROLE_STYLES.get(role, ""))


def shared_colour(inode: int, shared: list[int]) -> str:
    """The colour of a shared socket: its place among the shared inodes, so neighbours differ."""
    return SHARED_COLOURS[shared.index(inode) % len(SHARED_COLOURS)] if inode in shared else ""


def set_line(widget: Static, content: str | Text) -> None:
    """Show ``content`` in a Static whose size the stylesheet fixes; skip it when unchanged.

    Static.update() lays out the whole screen again by default, in case the new content
    changes the widget's size. A widget with a fixed height needs no layout.
    """
    old = widget.content
    # Text equality compares the characters and spans, not the style of the whole text.
    same = old == content and getattr(old, "style", None) == getattr(content, "style", None)
    if not same:
        widget.update(content, layout=False)

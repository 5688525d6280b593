"""The help screen: what each pane shows, in words for an audience, and the keys."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP_TEXT = """\
# takeover-console

The **server** accepts TCP connections and hands each one, as a file descriptor, to the
**forwarder** over a Unix socket with `SCM_RIGHTS`. When the forwarder is missing, slow or
refuses, the server answers the connection itself (fallback). The **client** sends requests
and counts who answered.

**Processes.** The three programs with their pid, generation, state, uptime, CPU, memory,
open fds and requests answered (by that process; the client row counts the answers that
client process received). A killed forwarder stays listed as killed.

**fd tables.** Every open fd of the server and the forwarder, read from `/proc`. A socket
held by both processes at once is marked with the same ◆ and colour in both tables, with
its inode: that is one connection in the middle of a handoff. New fds light up green,
closed ones are struck through for a moment.

**Connections.** Open connections with the process that holds each one now, then the last
few closed ones with their outcome.

**Handoff events.** What happened, in order: accepted, handed over (with the fd number on
each side and the round trip), fallback, processes started and killed.

**Traffic.** Answers per second by the forwarder and by the server over the last minute,
failures, latency and the number of sockets seen in two processes at once.

| key | action |
|---|---|
| `f` | start the forwarder |
| `k` | kill the forwarder (SIGKILL) |
| `t` | stop the forwarder gracefully (SIGTERM) |
| `c` | pause or resume the client, or start it again after it died |
| `+` / `-` | client rate up / down |
| `s` | slow motion: sockets stay visible in both fd tables |
| `u` | upgrade the server: a new generation takes over the listening socket |
| `x` | an upgrade whose new generation crashes before READY: watch the rollback |
| `n` | start a new server when none runs (after a kill or a crash) |
| `r` | restart the forwarder: a new one takes over the handoff socket |
| `d` | show or hide the client's fd table |
| `p` | freeze or unfreeze the display |
| `?` | this help |
| `q` | quit: every worker is stopped, socket files removed |

Tab moves the focus to a table, which then scrolls with the arrow keys, PageUp/PageDown
and Home/End. Below 120x34 the panes become tabs; left and right switch them.

Press `escape` or `?` to close.
"""


class HelpScreen(ModalScreen):
    """A modal with HELP_TEXT."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("question_mark", "dismiss", "Close", show=False)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP_TEXT)

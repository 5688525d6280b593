"""The fd-table pane: the server's and the forwarder's open fds side by side, the client's on demand.

A socket that two processes hold at once (during a handoff) carries the same mark and
colour in both tables, with its inode. Rows that just appeared are highlighted, and rows
that just closed stay a moment struck through, so an audience can follow an fd moving.
"""

from __future__ import annotations

import os

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from takeover_console.fdtable import FdRow
from takeover_console.model import SessionModel
from takeover_console.panes.formatting import ROLE_STYLES, set_line, shared_colour
from takeover_console.panes.row_table import RowTable

# Seconds of session time a new row stays highlighted, and a closed row stays visible.
NEW_ROW_SECONDS = 1.0
CLOSED_ROW_SECONDS = 1.0
SHARED_MARK = "◆"

COLUMNS = [
    ("fd", "fd"),
    ("kind", "kind"),
    ("inode", "inode"),
    ("state", "state"),
    ("cloexec", "cloexec"),
    ("note", "note"),
    ("local", "local"),
    ("remote", "remote"),
]


class FdTableView(Vertical):
    """The fd table of one worker, keyed by fd number and inode."""

    def __init__(self, worker: str, **kwargs):
        super().__init__(**kwargs)
        self.worker_name = worker
        self._row_first_seen: dict[str, float] = {}
        self._closing_rows: dict[str, tuple[float, tuple]] = {}
        self._previous_rows: dict[str, tuple] = {}
        self._pid: int | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.worker_name, classes="pane-title")
        yield RowTable(COLUMNS, sort_key="fd")

    def on_mount(self) -> None:
        # A table mounted for a new process shows its rows at once, not at the next change.
        self.call_after_refresh(self._first_refresh)

    def _first_refresh(self) -> None:
        # A quick second "d" can remove the table before this runs.
        if self.is_attached:
            self.refresh_from(self.app.model)

    def refresh_from(self, model: SessionModel) -> None:
        """Show the worker's fds from the latest sample."""
        view = model.processes.get(self.worker_name)
        title = self.query_one(Static)
        process = None
        if view is not None and view.pid is not None and model.sample is not None:
            process = model.sample.processes.get(view.pid)
        if view is None or view.pid is None:
            set_line(title, Text(f"{self.worker_name}: not started", style="dim"))
        else:
            state = "gone" if process is not None and process.gone else view.state
            set_line(title, Text.assemble((self.worker_name, ROLE_STYLES.get(self.worker_name, "")), f" pid {view.pid}, generation {view.generation}, {state}"))
        if view is not None and view.pid != self._pid:
            # A restarted worker is a new process: none of the old one's fds closed in it.
            self._pid = view.pid
            self._row_first_seen.clear()
            self._closing_rows.clear()
            self._previous_rows = {}
        rows = {}
        if process is not None and not process.gone:
            shared = sorted(model.sample.shared)
            for row in process.rows:
                key = f"{row.fd}:{row.inode or row.target}"
                rows[key] = _cells(row, model, view.pid, shared)
        self.query_one(RowTable).sync(self._decorate(rows, model.now))

    def _decorate(self, rows: dict[str, tuple], now: float) -> dict[str, tuple]:
        for key in rows:
            self._row_first_seen.setdefault(key, now)
            self._closing_rows.pop(key, None)
        for key, cells in self._previous_rows.items():
            if key not in rows and key not in self._closing_rows:
                self._closing_rows[key] = (now, cells)
        self._previous_rows = rows
        shown = {}
        for key, cells in rows.items():
            if now - self._row_first_seen[key] < NEW_ROW_SECONDS:
                cells = _styled(cells, "on dark_green")
            shown[key] = cells
        for key, (closed_at, cells) in list(self._closing_rows.items()):
            if now - closed_at < CLOSED_ROW_SECONDS:
                shown[key] = _styled(cells, "strike red")
            else:
                del self._closing_rows[key]
                self._row_first_seen.pop(key, None)
        return shown


def _cells(row: FdRow, model: SessionModel, pid: int, shared: list[int]) -> tuple:
    inode_text = Text(str(row.inode) if row.inode is not None else "")
    note = Text(model.inode_labels.get(row.inode, "") if row.inode is not None else "")
    if row.inode is not None and row.inode in shared:
        colour = shared_colour(row.inode, shared)
        others = [(p, fd) for p, fd in model.sample.shared[row.inode] if p != pid]
        if others:
            inode_text = Text(f"{SHARED_MARK} {row.inode}", style=f"bold {colour}")
            holders = ", ".join(f"{model.name_of_pid(p) or p} fd {fd}" for p, fd in others)
            note = Text(f"also in {holders}", style=colour)
    if note.plain in ("listener", "handoff channel", "handoff socket"):
        note.stylize("bold")
    if row.error:
        note = Text(row.error, style="dim")
    kind = row.kind if row.family != "ipv6" else f"{row.kind}6"
    if row.cloexec is None:
        cloexec = "-"
    else:
        cloexec = "yes" if row.cloexec else "no"
    if row.local:
        local = row.local
    elif row.path:
        local = os.path.basename(row.path)
    elif row.kind not in ("tcp", "udp", "unix"):
        local = row.target
    else:
        local = ""
    return (str(row.fd), kind, inode_text, row.state or "", cloexec, note, local, row.remote or "")


def _styled(cells: tuple, style: str) -> tuple:
    result = []
    for cell in cells:
        text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
        text.stylize(style)
        result.append(text)
    return tuple(result)


class FdTablesPane(Horizontal):
    """One fd table per server and forwarder process; the client's when asked for.

    During a takeover both generations show, so the listening socket's inode is seen in
    the old and the new process, then, once the old one has exited, only in the new.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.show_client = False
        self._mounted = 0  # tables mounted so far, to give each a new id

    @property
    def client_shown(self) -> bool:
        """True when the client's table is shown."""
        return self.show_client

    def toggle_client(self) -> None:
        """Show or hide the client's fd table."""
        self.show_client = not self.show_client

    def refresh_from(self, model: SessionModel) -> None:
        """Mount a table for each process worth showing, drop the others, refresh the rest."""
        wanted = shown_workers(model, self.show_client)
        # A table being removed stays in the DOM until its removal completes. It is neither
        # reused nor removed again, and a new table gets another id.
        views = {view.worker_name: view for view in self.query(FdTableView) if not view.has_class("removing")}
        for name in [name for name in views if name not in wanted]:
            view = views.pop(name)
            view.add_class("removing")
            view.remove()
        for position, name in enumerate(wanted):
            view = views.get(name)
            if view is None:
                # In the order shown_workers() gives, though the forwarder often starts first.
                following = next((views[later] for later in wanted[position + 1 :] if later in views), None)
                self._mounted += 1
                view = views[name] = FdTableView(name, id=f"fds-{_css_id(name)}-{self._mounted}")
                if following is not None:
                    self.mount(view, before=following)
                else:
                    self.mount(view)
            elif view.is_mounted:
                view.refresh_from(model)


# Seconds of session time an exited server or forwarder keeps its table.
EXITED_SHOWN_SECONDS = 3.0
ROLE_ORDER = {"server": 0, "forwarder": 1, "client": 2}


def shown_workers(model: SessionModel, show_client: bool) -> list[str]:
    """The workers whose fd tables to show: live ones, the recently exited, the last of each role."""
    chosen = []
    latest: dict[str, str] = {}
    for name, view in model.processes.items():
        if view.role not in ("server", "forwarder") and not (show_client and view.role == "client"):
            continue
        latest[view.role] = name
        recently_exited = view.exited_t is not None and model.now - view.exited_t < EXITED_SHOWN_SECONDS
        if view.state != "exited" or recently_exited:
            chosen.append(name)
    for role, name in latest.items():
        if not any(model.processes[other].role == role for other in chosen):
            chosen.append(name)
    return sorted(chosen, key=lambda name: (ROLE_ORDER.get(model.processes[name].role, 9), model.processes[name].generation, name))


def _css_id(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "-" for char in name)

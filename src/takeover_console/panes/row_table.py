"""A read-only table drawn line by line, which draws a row again only when its cells change.

The panes show tables whose rows change several times a second: fds open and close, and
connections come and go hundreds of times a second. Textual's DataTable renders every
visible cell again after any change to any row. At four refreshes a second that was most
of the console's own CPU, and adding or removing a row also cost a layout of the whole
screen. This table keeps one rendered line per row, keyed by the row's cells. A refresh
where few rows changed renders only those, and the table's size stays the same while all
rows fit, so it needs no layout.

A column widens at once for a wider cell and narrows again once no cell has needed its
width for a few seconds. The header line does not scroll away. The table scrolls with
the keys and the mouse wheel when it is focused, and has no cursor: nothing in the
console acts on a row.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from time import monotonic

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cells = Sequence[object]

# Blank cells on each side of a column's text.
CELL_PADDING = 1
# Seconds a column must have been wider than its widest cell before it narrows, so
# widths do not jump with every row that comes and goes.
SHRINK_AFTER = 5.0


class RowTable(ScrollView, can_focus=True):
    """A table of rows keyed by any hashable key; ``sync(rows)`` makes it show exactly ``rows``."""

    COMPONENT_CLASSES = {"row-table--header"}

    DEFAULT_CSS = """
    RowTable {
        background: $surface;
        color: $foreground;
        height: 1fr;
        /* Still scrolls sideways with the keys; the bar would hide the last row. */
        scrollbar-size-horizontal: 0;
        scrollbar-size-vertical: 1;
    }
    RowTable > .row-table--header {
        text-style: bold;
        background: $panel;
        color: $foreground;
    }
    RowTable:focus > .row-table--header {
        background: $accent;
        color: $text;
    }
    """

    def __init__(self, columns: Sequence[tuple[str, str]], sort_key: str | None = None, **kwargs):
        """``columns`` are (label, key) pairs; rows are sorted by column ``sort_key`` when given."""
        super().__init__(**kwargs)
        self._labels = [Text(label) for label, _ in columns]
        self._sort_index = [key for _, key in columns].index(sort_key) if sort_key is not None else None
        self._widths = [label.cell_len for label in self._labels]
        # Per column: monotonic() since when it has been wider than needed, or None.
        self._wider_since: list[float | None] = [None] * len(self._labels)
        self._cells: dict[str, tuple[Text, ...]] = {}
        self._order: list[str] = []
        # Row key -> its line for the current column widths; dropped when either changes.
        self._lines: dict[str, Strip] = {}
        self._header: Strip | None = None

    @property
    def row_keys(self) -> list[str]:
        """The keys of the rows shown now, top to bottom."""
        return list(self._order)

    def row_text(self, key: Hashable) -> list[str]:
        """Return the plain text of the cells of row ``key``."""
        return [cell.plain for cell in self._cells[str(key)]]

    def sync(self, rows: Mapping[Hashable, Cells]) -> None:
        """Make the table show exactly ``rows``, in their order unless the table sorts them."""
        cells = {str(key): tuple(_as_text(cell) for cell in row) for key, row in rows.items()}
        order = list(cells)
        if self._sort_index is not None:
            order.sort(key=lambda key: _sort_value(cells[key][self._sort_index]))
        widths = self._column_widths(cells.values())
        if widths != self._widths:
            self._widths = widths
            self._lines.clear()
            self._header = None
        else:
            for key, row in cells.items():
                if self._cells.get(key) != row:
                    self._lines.pop(key, None)
            for key in self._lines.keys() - cells.keys():
                del self._lines[key]
        changed = order != self._order or any(self._cells.get(key) != row for key, row in cells.items())
        self._cells = cells
        self._order = order
        self._update_virtual_size()
        if changed:
            self.refresh()

    def _column_widths(self, rows) -> list[int]:
        """Return the widths to draw with: at once wider when needed, narrower only after SHRINK_AFTER."""
        needed = [label.cell_len for label in self._labels]
        for row in rows:
            for index, cell in enumerate(row):
                if cell.cell_len > needed[index]:
                    needed[index] = cell.cell_len
        now = monotonic()
        widths = []
        for index, (width, wanted) in enumerate(zip(self._widths, needed)):
            if wanted >= width:
                self._wider_since[index] = None
                widths.append(wanted)
                continue
            since = self._wider_since[index]
            if since is None:
                self._wider_since[index] = now
            elif now - since >= SHRINK_AFTER:
                self._wider_since[index] = None
                width = wanted
            widths.append(width)
        return widths

    def on_resize(self) -> None:
        self._update_virtual_size()

    def _update_virtual_size(self) -> None:
        width = sum(self._widths) + 2 * CELL_PADDING * len(self._widths)
        # While every row fits, the height stays that of the widget, so rows that come and
        # go change nothing that a layout depends on.
        height = max(len(self._order) + 1, self.scrollable_content_region.height)
        size = Size(width, height)
        if size != self.virtual_size:
            self.virtual_size = size

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        base = self.rich_style
        if y == 0:
            line = self._header_line()
        else:
            index = scroll_y + y - 1
            if index >= len(self._order):
                return Strip.blank(width, base)
            line = self._row_line(self._order[index])
        return line.crop_extend(scroll_x, scroll_x + width, base)

    def _header_line(self) -> Strip:
        if self._header is None:
            style = self.get_component_rich_style("row-table--header")
            self._header = self._render_cells(self._labels, style)
        return self._header

    def _row_line(self, key: str) -> Strip:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = self._render_cells(self._cells[key], self.rich_style)
        return line

    def _render_cells(self, cells: Sequence[Text], style: Style) -> Strip:
        console = self.app.console
        padding = " " * CELL_PADDING
        segments: list[Segment] = []
        for cell, width in zip(cells, self._widths):
            text = cell.copy()
            text.truncate(width, overflow="ellipsis", pad=True)
            # Text.render() yields the spans' styles but not the style of the whole text
            # (Text("x", style="dim")), which rich applies elsewhere: add it here.
            cell_style = style + console.get_style(text.style) if text.style else style
            segments.append(Segment(padding, style))
            segments.extend(Segment(part.text, cell_style + part.style if part.style else cell_style) for part in text.render(console))
            segments.append(Segment(padding, style))
        return Strip(segments, sum(self._widths) + 2 * CELL_PADDING * len(self._widths))

    def notify_style_update(self) -> None:
        # A new theme or focus state changes the styles the cached lines were drawn with.
        super().notify_style_update()
        self._lines.clear()
        self._header = None


def _as_text(cell: object) -> Text:
    return cell if isinstance(cell, Text) else Text(str(cell))


def _sort_value(cell: Text):
    text = cell.plain
    return (0, int(text)) if text.isdigit() else (1, text)

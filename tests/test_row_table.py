"""RowTable, the table the panes draw their rows with, in a small app of its own."""

from __future__ import annotations

import asyncio
import functools

from rich.text import Text
from textual.app import App, ComposeResult

from takeover_console.panes.row_table import RowTable

COLUMNS = [("fd", "fd"), ("kind", "kind")]


class CountingTable(RowTable):
    """A RowTable that counts the rows it renders."""

    rendered = 0

    def _render_cells(self, cells, style):
        CountingTable.rendered += 1
        return super()._render_cells(cells, style)


class TableApp(App):
    def __init__(self, table: RowTable):
        super().__init__()
        self.table = table

    def compose(self) -> ComposeResult:
        yield self.table


def run_async(test):
    """Run an async test function to completion with asyncio.run."""

    @functools.wraps(test)
    def run(*args, **kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def visible_lines(table: RowTable) -> list[str]:
    return [table.render_line(y).text.rstrip() for y in range(table.size.height)]


@run_async
async def test_sync_shows_exact_rows():
    """Rows follow the last sync, in its order, and removed rows go."""
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({"b": ("2", "pipe"), "a": ("1", Text("tcp", style="bold"))})
        await pilot.pause()
        assert table.row_keys == ["b", "a"]
        assert visible_lines(table)[:3] == [" fd  kind", " 2   pipe", " 1   tcp"]

        table.sync({"a": ("1", "tcp")})
        await pilot.pause()
        assert table.row_keys == ["a"]
        assert table.row_text("a") == ["1", "tcp"]
        assert visible_lines(table)[2] == ""


@run_async
async def test_sort_key_orders_numbers():
    """A sort column orders numbers by value, before other text."""
    table = RowTable(COLUMNS, sort_key="fd")
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({"x": ("10", "tcp"), "y": ("9", "tcp"), "z": ("-", "?")})
        await pilot.pause()
        assert table.row_keys == ["y", "x", "z"]


@run_async
async def test_unchanged_rows_not_rendered_again():
    """A sync that changes one row renders only that row again."""
    table = CountingTable(COLUMNS)
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({str(fd): (str(fd), "tcp") for fd in range(5)})
        await pilot.pause()
        before = CountingTable.rendered
        table.sync({**{str(fd): (str(fd), "tcp") for fd in range(5)}, "3": ("3", "udp")})
        await pilot.pause()
        assert CountingTable.rendered - before == 1
        assert visible_lines(table)[4] == " 3   udp"


@run_async
async def test_fitting_rows_keep_size():
    """While the rows fit, adding and removing rows leaves the virtual size alone."""
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({"1": ("1", "tcp")})
        await pilot.pause()
        size = table.virtual_size
        table.sync({str(fd): (str(fd), "tcp") for fd in range(6)})
        await pilot.pause()
        assert table.virtual_size == size


@run_async
async def test_overflowing_rows_scroll():
    """More rows than fit make the table scrollable down to the last row."""
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({str(fd): (str(fd), "tcp") for fd in range(20)})
        await pilot.pause()
        assert table.virtual_size.height == 21
        table.scroll_end(animate=False, immediate=True)
        await pilot.pause()
        lines = visible_lines(table)
        assert lines[0].startswith(" fd")
        assert lines[-1].startswith(" 19")


@run_async
async def test_wide_cell_widens_column():
    """A cell wider than its column widens the column for every row."""
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(40, 8)) as pilot:
        table.sync({"a": ("1", "tcp"), "b": ("2", "anon_inode")})
        await pilot.pause()
        assert visible_lines(table)[:3] == [" fd  kind", " 1   tcp", " 2   anon_inode"]
        assert table.virtual_size.width == len(" fd  anon_inode ")


@run_async
async def test_column_narrows_after_delay(monkeypatch):
    """A column wider than its cells narrows only once SHRINK_AFTER has passed."""
    from takeover_console.panes import row_table

    clock = [1000.0]
    monkeypatch.setattr(row_table, "monotonic", lambda: clock[0])
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(40, 8)) as pilot:
        table.sync({"a": ("1", "anon_inode")})
        table.sync({"a": ("1", "tcp")})
        await pilot.pause()
        assert visible_lines(table)[0] == " fd  kind"
        assert table.virtual_size.width == len(" fd  anon_inode ")

        clock[0] += row_table.SHRINK_AFTER
        table.sync({"a": ("1", "tcp")})
        await pilot.pause()
        assert table.virtual_size.width == len(" fd  kind ")


@run_async
async def test_whole_text_style_kept():
    """A cell's own style (Text("x", style="dim")) reaches the screen, like a span's."""
    table = RowTable(COLUMNS)
    async with TableApp(table).run_test(size=(30, 8)) as pilot:
        table.sync({"a": (Text("1", style="dim"), Text.assemble(("tcp", "bold")))})
        await pilot.pause()
        styles = {segment.text.strip(): segment.style for segment in table.render_line(1) if segment.text.strip()}
        assert styles["1"].dim
        assert styles["tcp"].bold

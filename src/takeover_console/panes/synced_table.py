"""A DataTable kept in step with a mapping of row key -> cells, changing only what changed.

Rebuilding a table on every tick loses the cursor and scroll position and costs a full
layout; updating cell by cell keeps both and is cheap when little changes.
"""

from __future__ import annotations

from typing import Hashable, Sequence

from rich.text import Text
from textual.widgets import DataTable

Cells = Sequence[object]


class SyncedTable(DataTable):
    """A DataTable whose rows follow ``sync(rows)``; rows keep their order of arrival unless sorted."""

    def __init__(self, columns: Sequence[tuple[str, str]], sort_key: str | None = None, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._column_specs = list(columns)
        self._sort_key = sort_key
        self._current: dict[str, tuple] = {}

    def on_mount(self) -> None:
        for label, key in self._column_specs:
            self.add_column(label, key=key)

    def sync(self, rows: dict[Hashable, Cells]) -> None:
        """Make the table show exactly ``rows``, keyed by row key, in as few changes as possible."""
        wanted = {str(key): tuple(cells) for key, cells in rows.items()}
        for key in [key for key in self._current if key not in wanted]:
            self.remove_row(key)
            del self._current[key]
        added = False
        for key, cells in wanted.items():
            old = self._current.get(key)
            if old is None:
                self.add_row(*cells, key=key)
                added = True
            elif old != cells:
                for (_, column), new, previous in zip(self._column_specs, cells, old):
                    if new != previous:
                        self.update_cell(key, column, new, update_width=True)
            self._current[key] = cells
        if added and self._sort_key is not None:
            self.sort(self._sort_key, key=_sort_value)

    @property
    def row_keys(self) -> list[str]:
        """The keys of the rows shown now."""
        return list(self._current)


def _sort_value(value: object):
    text = value.plain if isinstance(value, Text) else str(value)
    return (0, int(text)) if text.isdigit() else (1, text)

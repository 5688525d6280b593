"""Panes over hand-built models, in a small app of their own: what each pane chooses to show."""

from __future__ import annotations

import asyncio

from textual.app import App, ComposeResult

from takeover_console.fdsample import FdRow, ProcessSample, Sample
from takeover_console.model import SessionModel
from takeover_console.observations import sample_observation, worker_observation
from takeover_console.panes.fdtables import FdTablesPane, FdTableView
from takeover_console.panes.processes import ProcessesPane
from takeover_console.panes.row_table import RowTable


class PaneApp(App):
    """One pane over a fixed model."""

    def __init__(self, pane, model: SessionModel):
        super().__init__()
        self.pane = pane
        self.model = model

    def compose(self) -> ComposeResult:
        yield self.pane


def fold(observations: list[dict], model: SessionModel | None = None) -> SessionModel:
    model = model or SessionModel()
    for observation in observations:
        model.apply(observation)
    return model


def worker(name: str, pid: int, state: str, t: float) -> dict:
    return worker_observation(name, "forwarder", pid, 1, state, state, t=t)


def fd_sample(pid: int, inodes: list[int], t: float) -> dict:
    rows = tuple(FdRow(fd=3 + index, kind="unix", target=f"socket:[{inode}]", inode=inode) for index, inode in enumerate(inodes))
    sample = Sample(mono=t, processes={pid: ProcessSample(pid=pid, label="forwarder", rows=rows)})
    return sample_observation(sample.to_dict())


def test_old_generation_stays_hidden():
    """A generation that exited long ago stays hidden when the newest of its role exits too."""
    model = fold(
        [
            worker("forwarder", 200, "started", 1.0),
            worker("forwarder", 200, "exited", 3.0),
            worker("forwarder-2", 201, "started", 2.0),
            worker("forwarder-2", 201, "exited", 39.0),
            fd_sample(999, [], 40.0),
        ]
    )

    async def scenario() -> list[str]:
        pane = ProcessesPane()
        async with PaneApp(pane, model).run_test() as pilot:
            pane.refresh_from(model)
            await pilot.pause()
            return pane.query_one(RowTable).row_keys

    assert asyncio.run(scenario()) == ["forwarder-2"]


def test_restarted_worker_table_starts_fresh():
    """After a restart, the fd table shows the new process's fds and none of the old one's."""
    model = fold([worker("forwarder", 200, "started", 1.0), fd_sample(200, [7001, 7002], 1.5)])

    async def scenario() -> list[list[str]]:
        view = FdTableView("forwarder")
        async with PaneApp(view, model).run_test() as pilot:
            view.refresh_from(model)
            fold([worker("forwarder", 200, "exited", 2.0), worker("forwarder", 300, "started", 2.1), fd_sample(300, [8001], 2.2)], model)
            view.refresh_from(model)
            await pilot.pause()
            table = view.query_one(RowTable)
            return [table.row_text(key) for key in table.row_keys]

    rows = asyncio.run(scenario())
    assert [row[2] for row in rows] == ["8001"]


def test_fd_tables_keep_role_order():
    """The server's table comes first even when the forwarder's was mounted before it."""
    model = fold([worker("forwarder", 200, "started", 1.0)])

    async def scenario() -> list[str]:
        pane = FdTablesPane()
        async with PaneApp(pane, model).run_test() as pilot:
            pane.refresh_from(model)
            await pilot.pause()
            fold([worker_observation("server", "server", 100, 1, "started", "started", t=1.1)], model)
            pane.refresh_from(model)
            await pilot.pause()
            return [view.worker_name for view in pane.query(FdTableView)]

    assert asyncio.run(scenario()) == ["server", "forwarder"]


def test_stopped_process_shown_stopped():
    """A running worker whose last sample reports it stopped shows as stopped by SIGSTOP."""
    sample = Sample(mono=2.0, processes={200: ProcessSample(pid=200, label="forwarder", status="stopped")})
    model = fold([worker("forwarder", 200, "started", 1.0), worker("forwarder", 200, "running", 1.1), sample_observation(sample.to_dict())])

    async def scenario() -> str:
        pane = ProcessesPane()
        async with PaneApp(pane, model).run_test() as pilot:
            pane.refresh_from(model)
            await pilot.pause()
            return pane.query_one(RowTable).row_text("forwarder")[3]

    assert asyncio.run(scenario()) == "stopped (SIGSTOP)"

"""The supervisor with real worker processes: start, kill, restart, crash, no leftovers."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import types

import pytest

from takeover_console import workers
from takeover_console.workers import Supervisor, Worker, WorkerState


def pid_exists(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` exits: a pidfd becomes readable then, even for another's child."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)


class Recorder:
    """Collects events and state changes, and lets a test await a condition on them."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.states: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def on_events(self, worker, events):
        self.events.extend((worker.name, event) for event in events)
        self.changed.set()

    def on_state(self, worker, detail):
        self.states.append((worker.name, detail))
        self.changed.set()

    async def wait_for(self, predicate, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def run(coro):
    return asyncio.run(coro)


def test_start_kill_restart(workdir):
    async def scenario():
        seen = Recorder()
        supervisor = Supervisor(seen.on_events, seen.on_state)
        supervisor.add("forwarder", "forwarder", ["--handoff", str(workdir / "h.sock")])
        try:
            first = (await supervisor.start("forwarder")).pid
            await seen.wait_for(lambda: supervisor.workers["forwarder"].state is WorkerState.RUNNING)
            assert supervisor.kill("forwarder")
            await seen.wait_for(lambda: supervisor.workers["forwarder"].state is WorkerState.EXITED)
            assert supervisor.workers["forwarder"].exit_description == "killed by SIGKILL"
            second = (await supervisor.restart("forwarder")).pid
            await seen.wait_for(lambda: supervisor.workers["forwarder"].state is WorkerState.RUNNING)
            return first, second, seen
        finally:
            await supervisor.close()

    first, second, seen = run(scenario())
    assert first != second
    assert not pid_exists(first)
    assert not pid_exists(second)
    assert any("killed by SIGKILL" in detail for _, detail in seen.states)


def test_events_arrive_in_order(workdir):
    async def scenario():
        seen = Recorder()
        supervisor = Supervisor(seen.on_events, seen.on_state)
        supervisor.add("forwarder", "forwarder", ["--handoff", str(workdir / "h.sock")])
        try:
            await supervisor.start("forwarder")
            await seen.wait_for(lambda: any(e["kind"] == "listening" for _, e in seen.events))
            await supervisor.stop("forwarder")
            await supervisor.wait_exited("forwarder")
        finally:
            await supervisor.close()
        return [e["kind"] for _, e in seen.events]

    kinds = run(scenario())
    assert kinds[0] == "started"
    assert kinds.index("listening") < kinds.index("stopping") < kinds.index("exited")
    assert kinds[-1] == "exited"


def test_worker_crash_reported(workdir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]

        async def scenario():
            seen = Recorder()
            supervisor = Supervisor(seen.on_events, seen.on_state)
            supervisor.add("server", "server", ["--listen", f"127.0.0.1:{port}", "--handoff", str(workdir / "h.sock"), "--control", str(workdir / "c.sock")])
            try:
                await supervisor.start("server")
                code = await supervisor.wait_exited("server")
                await seen.wait_for(lambda: supervisor.workers["server"].state is WorkerState.EXITED)
                return code, supervisor.workers["server"], seen
            finally:
                await supervisor.close()

        code, worker, seen = run(scenario())
    assert code == 1
    assert worker.exit_description == "exit code 1"
    assert any("already in use" in line for line in worker.log_lines)
    assert any(detail.startswith("exited: exit code 1") for _, detail in seen.states)


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from takeover_console.workers import Supervisor

    async def main():
        ready = asyncio.Event()
        def on_events(worker, events):
            if any(event.get("kind") == "listening" for event in events):
                ready.set()
        supervisor = Supervisor(on_events)
        supervisor.add("forwarder", "forwarder", ["--handoff", sys.argv[1]])
        worker = await supervisor.start("forwarder")
        await ready.wait()
        print(json.dumps({"worker": worker.pid}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_no_worker_outlives_console(workdir, how):
    """A console ended in any way takes its workers along (PR_SET_PDEATHSIG or its handlers)."""
    console = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, str(workdir / "h.sock")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = console.stdout.readline()
        worker_pid = json.loads(line)["worker"]
        assert pid_exists(worker_pid)
        os.kill(console.pid, how)
        console.wait(timeout=10)
        assert wait_gone(worker_pid), f"worker {worker_pid} outlived its console ({how.name})"
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()
        console.stdout.close()


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b'{"kind": "served", "pid": 7}', True),
        (b'  {"kind": "served"}  \r', True),
        (b"", True),
        (b"  \t", True),
        (b'{"kind": "served"} trailing', False),
        (b'{"kind": "served"}{"kind": "served"}', False),
        (b"[1, 2]", False),
        (b"7", False),
        (b'{"kind": ', False),
        (b'{"kind": "\\q"}', False),
        (b"\xff\xfe{}", False),
        (b"[" * 100000 + b"]" * 100000, False),
        (b'{"a":' * 100000 + b"1" + b"}" * 100000, False),
    ],
    ids=["object", "padded", "empty", "blank", "trailing", "two objects", "array", "number", "cut short", "bad escape", "not utf-8", "deep array", "deep object"],
)
def test_event_line_parsing(line, accepted):
    """Each line is one JSON object or it is rejected; nothing else reaches the event callback."""
    events = []
    supervisor = Supervisor(lambda worker, batch: events.extend(batch))
    worker = Worker("server", "server", [])
    assert (supervisor._handle_lines(worker, line) == 0) is accepted
    assert len(events) == (1 if accepted and line.strip() else 0)


def test_bad_line_spares_its_neighbours():
    """A bad line in a burst is counted once; the good lines around it are still reported in order."""
    batches = []
    supervisor = Supervisor(lambda worker, batch: batches.append(batch))
    worker = Worker("server", "server", [])
    data = b'{"seq": 1}\n{"seq": \n\xff\n\n{"seq": 2}'
    assert supervisor._handle_lines(worker, data) == 2
    assert batches == [[{"seq": 1}, {"seq": 2}]]


def test_lines_split_across_reads(monkeypatch):
    """Lines cut at any byte, even inside a UTF-8 character, arrive whole; an over-long line is dropped."""
    monkeypatch.setattr(workers, "MAX_EVENT_LINE", 64)
    stream = b'{"seq": 1, "peer": "caf\xc3\xa9"}\n' + b'{"pad": "' + b"x" * 100 + b'"}\n' + b'{"seq": 2}\n{"seq": 3}'

    async def scenario() -> list[dict]:
        events: list[dict] = []
        supervisor = Supervisor(lambda worker, batch: events.extend(batch))
        pieces = iter([stream[start : start + 7] for start in range(0, len(stream), 7)])

        async def read(size: int) -> bytes:
            return next(pieces, b"")

        process = types.SimpleNamespace(stdout=types.SimpleNamespace(read=read))
        await supervisor._read_events(Worker("server", "server", []), process)
        return events

    assert asyncio.run(scenario()) == [{"seq": 1, "peer": "café"}, {"seq": 2}, {"seq": 3}]


def fake_process(stream: bytes, size: int) -> types.SimpleNamespace:
    """A stand-in for a worker process whose stdout returns ``stream`` in reads of ``size`` bytes."""
    pieces = iter([stream[start : start + size] for start in range(0, len(stream), size)])

    async def read(limit: int) -> bytes:
        return next(pieces, b"")

    return types.SimpleNamespace(stdout=types.SimpleNamespace(read=read))


def test_over_long_line_dropped_whole(monkeypatch, caplog):
    """No part of a line longer than MAX_EVENT_LINE becomes an event, and the drop is logged once."""
    monkeypatch.setattr(workers, "MAX_EVENT_LINE", 64)
    forged = b'{"kind": "listening", "addr": "forged"}'
    stream = b'{"seq": 1}\n' + b"x" * 100 + forged + b"\n" + b'{"pad": "' + b"y" * 80 + b'"}\n{"seq": 2}\n'
    events: list[dict] = []
    supervisor = Supervisor(lambda worker, batch: events.extend(batch))
    asyncio.run(supervisor._read_events(Worker("server", "server", []), fake_process(stream, 50)))
    assert events == [{"seq": 1}, {"seq": 2}]
    assert "wrote 2 lines that are not JSON objects" in caplog.text


def test_not_json_constants_rejected():
    """NaN and Infinity are not JSON, and only JSON whitespace may surround the object."""
    assert workers.parse_event_line('{"mono": NaN}') is None
    assert workers.parse_event_line('{"mono": -Infinity}') is None
    assert workers.parse_event_line('\xa0{"mono": 1.5}') is None
    assert workers.parse_event_line(' \t{"mono": 1.5}\r') == {"mono": 1.5}


def test_failing_callback_keeps_reading():
    """An exception in the event callback is logged, and later events still arrive."""
    seen: list[dict] = []

    def on_events(worker, batch):
        seen.extend(batch)
        if any(event.get("seq") == 1 for event in batch):
            raise RuntimeError("callback failed")

    stream = b'{"seq": 1}\n{"seq": 2}\n'
    supervisor = Supervisor(on_events)
    asyncio.run(supervisor._read_events(Worker("server", "server", []), fake_process(stream, 11)))
    assert seen == [{"seq": 1}, {"seq": 2}]


def test_over_long_complete_line_rejected(monkeypatch):
    """A whole line longer than MAX_EVENT_LINE, read at once, is rejected like a cut-off one."""
    monkeypatch.setattr(workers, "MAX_EVENT_LINE", 64)
    events: list[dict] = []
    supervisor = Supervisor(lambda worker, batch: events.extend(batch))
    data = b'{"seq": 1}\n{"pad": "' + b"y" * 80 + b'"}\n{"seq": 2}'
    assert supervisor._handle_lines(Worker("server", "server", []), data) == 1
    assert events == [{"seq": 1}, {"seq": 2}]


def test_failing_state_callback_keeps_events():
    """A state callback that raises when a worker becomes running does not cost the events that made it so."""
    events: list[dict] = []

    def on_state(worker, detail):
        raise RuntimeError("state callback failed")

    supervisor = Supervisor(lambda worker, batch: events.extend(batch), on_state)
    worker = Worker("forwarder", "forwarder", [], state=WorkerState.STARTING)
    assert supervisor._handle_lines(worker, b'{"kind": "listening"}\n{"seq": 2}') == 0
    assert worker.state is WorkerState.RUNNING
    assert events == [{"kind": "listening"}, {"seq": 2}]

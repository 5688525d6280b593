"""Helpers for tests that run the real programs as processes and wait on their events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

EVENT_TIMEOUT = 10.0


class Program:
    """One takeover-console program started as a process, with its events read on a thread.

    Events go to stdout (``--events -``) and are collected line by line, so a test waits
    for the event it needs instead of sleeping. stderr goes to ``<workdir>/<name>.log``.
    """

    def __init__(self, role: str, args: list[str], workdir: Path, name: str | None = None):
        self.role = role
        self.name = name or role
        self.log_path = workdir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "takeover_console", role, *args, "--events", "-"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.pid = self.proc.pid
        self.events: list[dict] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()

    def _read_events(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"kind": "unparsable", "line": line.decode("utf-8", "replace")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_event(self, kind: str, where: Callable[[dict], bool] = lambda e: True, timeout: float = EVENT_TIMEOUT, start: int = 0) -> dict:
        """Return the first event of ``kind`` matching ``where`` at index ``start`` or later."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[start:]:
                    if event.get("kind") == kind and where(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._reader.is_alive() and self.proc.poll() is not None):
                    raise AssertionError(f"{self.name} (pid {self.pid}) wrote no {kind!r} event in {timeout:g} s; log:\n{self.log_text()[-3000:]}")
                self._changed.wait(remaining)

    def count(self, kind: str, where: Callable[[dict], bool] = lambda e: True) -> int:
        """How many events of ``kind`` matching ``where`` arrived so far."""
        with self._changed:
            return sum(1 for e in self.events if e.get("kind") == kind and where(e))

    def log_text(self) -> str:
        """Everything the program logged to stderr so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def fd_count(self) -> int:
        """Open fds of the process, from /proc."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, signum: int) -> None:
        """Send a signal to this process (by its own pid)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=EVENT_TIMEOUT)

    def stop(self, timeout: float = EVENT_TIMEOUT) -> int:
        """SIGTERM the process and return its exit status; SIGKILL it if it does not exit."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s of SIGTERM")

    def close(self) -> None:
        """Make sure the process is gone and its pipes are closed."""
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(timeout=EVENT_TIMEOUT)
        self.proc.stdout.close()
        self._log.close()


def read_until_eof(sock) -> bytes:
    """Return everything ``sock`` receives until the peer ends the stream."""
    data = b""
    while chunk := sock.recv(1024):
        data += chunk
    return data


def port_of(server: Program) -> int:
    """The TCP port a server listens on, from its ``listening`` event."""
    address = server.wait_event("listening")["addr"]
    return int(address.rsplit(":", 1)[1])


def run_client(port: int, count: int, concurrency: int = 1, extra: tuple[str, ...] = (), timeout: float = 60.0) -> dict:
    """Run the client program to completion and return its ``--json`` summary."""
    done = subprocess.run(
        [sys.executable, "-m", "takeover_console", "client", "--connect", f"127.0.0.1:{port}", "--count", str(count), "--concurrency", str(concurrency), "--json", *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    assert done.stdout, f"client printed no summary; stderr:\n{done.stderr.decode()[-3000:]}"
    return json.loads(done.stdout.decode().strip().splitlines()[-1])

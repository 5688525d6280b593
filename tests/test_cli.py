"""Command-line options that name unusable paths or numbers: a one-line error, no traceback."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from takeover_console.observations import RECORDING_HEADER

TIMEOUT = 30.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "takeover_console", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--record", "{missing}/x.jsonl", "--listen", "127.0.0.1:0"], "--record"),
        (["--record", "{workdir}", "--listen", "127.0.0.1:0"], "Is a directory"),
        (["--log-file", "{missing}/x.log", "--listen", "127.0.0.1:0"], "--log-file"),
        (["--handoff", "{missing}/h.sock", "--listen", "127.0.0.1:0"], "does not exist"),
        (["demo", "--headless", "--duration", "1", "--record", "{missing}/x.jsonl"], "--record"),
        (["replay", "{workdir}/noise.bin", "--headless"], "not a takeover-console recording"),
        (["replay", "{workdir}/noise.bin", "--speed", "nan"], "not a finite number"),
    ],
    ids=["record in missing dir", "record is a dir", "log file in missing dir", "handoff in missing dir", "demo record", "random bytes", "nan speed"],
)
def test_bad_option_exits_with_message(workdir, args, message):
    """Each names the option or the file and what is wrong, and exits non-zero without a traceback."""
    (workdir / "noise.bin").write_bytes(bytes(range(256)) * 8)
    filled = [arg.format(workdir=workdir, missing=workdir / "missing") for arg in args]
    result = run_cli(*filled)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_not_recording_error_hides_content(workdir):
    """The error for a file that is not a recording does not print the file's first line."""
    secret = workdir / "secret.txt"
    secret.write_text("root:$6$hash-that-must-not-show:19000:0:99999:7:::\n")
    result = run_cli("replay", str(secret), "--headless")
    assert result.returncode == 1
    assert "hash-that-must-not-show" not in result.stderr


def test_recording_with_noise_replays(workdir):
    """A recording whose later lines are not UTF-8 replays the lines that are observations."""
    path = workdir / "noisy.jsonl"
    good = {"type": "event", "t": 1.0, "worker": "client", "event": {"role": "client", "pid": 3, "kind": "answered", "by": "server", "mono": 1.0}}
    path.write_bytes((json.dumps(RECORDING_HEADER) + "\n").encode() + b"\xff\xfe\x00garbage\n" + (json.dumps(good) + "\n").encode())
    result = run_cli("replay", str(path), "--headless")
    assert result.returncode == 0, result.stderr
    assert "replayed 1 observation from" in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_leaves_no_session_directory(workdir, signum):
    """The headless demo stopped by SIGTERM or SIGHUP removes its session directory on the way out."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(workdir)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "takeover_console", "demo", "--headless", "--duration", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # The first line appears once the three workers run.
        ready, _, _ = select.select([demo.stdout], [], [], TIMEOUT)
        assert ready, "the demo printed nothing"
        assert demo.stdout.readline().startswith("server ")
        sessions = list((workdir / "takeover-console").glob("session-*"))
        assert len(sessions) == 1
        demo.send_signal(signum)
        demo.wait(timeout=TIMEOUT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stdout.close()
        demo.stderr.close()
    assert demo.returncode == 1
    assert not sessions[0].exists()


def test_console_needs_terminal(workdir):
    """Without a terminal the console refuses to start and points to the headless demo."""
    result = run_cli("--listen", "127.0.0.1:0", "--handoff", str(workdir / "h.sock"))
    assert result.returncode == 1
    assert "needs a terminal" in result.stderr
    assert "demo --headless" in result.stderr

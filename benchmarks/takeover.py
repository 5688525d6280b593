"""Benchmark listener takeover: time from request to READY, and request latency during upgrades.

Runs a forwarder, a server and a client at a steady rate on 127.0.0.1, measures the
client's latency for a few seconds, then upgrades the server N times in a row
(``server --takeover``). It prints:

- request-to-READY time (p50, p99, max) from the old server's ``takeover`` events;
- the worst request latency among requests that overlap an upgrade window (from the
  takeover request to the old generation's ``drained``), next to the steady-state p99
  at the same load. Target: no request slower than 3x the steady-state p99.

Run: .venv/bin/python benchmarks/takeover.py [--upgrades 20] [--rate 300]
Every process is started here and stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from takeover_console.stats import percentile  # noqa: E402

PYTHON = sys.executable


def start(role: str, *args: str, events: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "takeover_console", role, *args, "--events", str(events)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events


def wait_for(path: Path, kind: str, timeout: float = 10.0, where=lambda e: True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_events(path):
            if event.get("kind") == kind and where(event):
                return event
        time.sleep(0.02)
    raise SystemExit(f"no {kind} event in {path} within {timeout:g} s")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown")
    return f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}, Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=20, help="server upgrades in a row (default: 20)")
    parser.add_argument("--rate", type=int, default=300, help="client connections per second (default: 300)")
    parser.add_argument("--steady", type=float, default=4.0, help="seconds of steady load measured before the upgrades (default: 4)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tc-bench-"))
    handoff, control = work / "h.sock", work / "c.sock"
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start("forwarder", "--handoff", str(handoff), events=work / "f.jsonl", log=work / "f.log"))
        wait_for(work / "f.jsonl", "listening")
        first = start("server", "--listen", "127.0.0.1:0", "--handoff", str(handoff), "--control", str(control), events=work / "s1.jsonl", log=work / "s1.log")
        processes.append(first)
        port = int(wait_for(work / "s1.jsonl", "listening")["addr"].rsplit(":", 1)[1])
        wait_for(work / "s1.jsonl", "channel_up")

        duration = args.steady + args.upgrades * 0.5 + 5
        count = int(args.rate * duration)
        client = start("client", "--connect", f"127.0.0.1:{port}", "--count", str(count), "--rate", str(args.rate), "--concurrency", "32", "--json", events=work / "client.jsonl", log=work / "client.log")
        processes.append(client)
        time.sleep(args.steady)
        steady_end = time.monotonic()

        previous = work / "s1.jsonl"
        windows = []
        ready_ms = []
        for number in range(2, args.upgrades + 2):
            events = work / f"s{number}.jsonl"
            new = start("server", "--takeover", "--listen", f"127.0.0.1:{port}", "--handoff", str(handoff), "--control", str(control), events=events, log=work / f"s{number}.log")
            processes.append(new)
            requested = wait_for(previous, "takeover", where=lambda e: e.get("phase") == "requested")
            ready = wait_for(previous, "takeover", where=lambda e: e.get("phase") == "ready")
            drained = wait_for(previous, "takeover", where=lambda e: e.get("phase") == "drained")
            ready_ms.append((ready["mono"] - requested["mono"]) * 1000)
            windows.append((requested["mono"], drained["mono"]))
            previous = events
            time.sleep(0.3)
        client.wait(timeout=duration + 30)
        answered = [e for e in read_events(work / "client.jsonl") if e.get("kind") == "answered"]
        failed = [e for e in read_events(work / "client.jsonl") if e.get("kind") == "failed"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    steady = [e["latency_ms"] for e in answered if e["mono"] < steady_end]
    during = []
    for event in answered:
        end = event["mono"]
        begin = end - event["latency_ms"] / 1000
        if any(begin < window_end and end > window_start for window_start, window_end in windows):
            during.append(event["latency_ms"])
    steady_p99 = percentile(steady, 99)
    worst = max(during) if during else None
    print(f"takeover benchmark: {args.upgrades} server upgrades under {args.rate} connections/s")
    print(f"machine: {machine()}")
    print(f"requests: {len(answered)} answered, {len(failed)} failed")
    print(f"request to READY ms: p50 {percentile(ready_ms, 50):.2f}  p99 {percentile(ready_ms, 99):.2f}  max {max(ready_ms):.2f}")
    print(f"steady state ({len(steady)} requests): p50 {percentile(steady, 50):.2f} ms  p99 {steady_p99:.2f} ms")
    print(f"during upgrades ({len(during)} requests): p50 {percentile(during, 50):.2f} ms  p99 {percentile(during, 99):.2f} ms  worst {worst:.2f} ms")
    ratio = worst / steady_p99 if worst and steady_p99 else float("nan")
    print(f"worst during upgrades / steady p99: {ratio:.2f} (target <= 3: {'met' if ratio <= 3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The headless demo: the stage demo as a script that prints what the model saw."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from takeover_console.lifecycle import on_stop_signals
from takeover_console.options import check_output_file
from takeover_console.session import LiveSession, SessionConfig


async def run_script(session: LiveSession, duration: float, say) -> None:
    """Kill the forwarder halfway, start it again at three quarters, then slow motion; ``say`` narrates."""
    await asyncio.sleep(duration / 2)
    say("killing the forwarder (SIGKILL): connections fall back to the server")
    session.kill_forwarder()
    await asyncio.sleep(duration / 4)
    say("starting the forwarder again: handoffs resume once the server's channel is up")
    await session.start_forwarder()
    await session.wait_channel_up()
    say("slow motion: the server keeps each handed-over socket 1.5 s and clients wait 0.5 s before sending")
    await session.set_slow_motion(True)
    await asyncio.sleep(duration / 4)


async def run_headless(config: SessionConfig, duration: float, out=sys.stdout) -> LiveSession:
    """Run the session for ``duration`` seconds, killing the forwarder halfway and starting it at three quarters.

    The last quarter runs in slow motion, so the samples catch sockets held by both processes.
    """
    session = LiveSession(config)
    printed = 0

    def print_new_log_lines() -> None:
        nonlocal printed
        entries = list(session.model.log)
        fresh = min(session.model.logged - printed, len(entries))
        for entry in entries[len(entries) - fresh :]:
            if entry.kind in _TOLD:
                print(f"  t+{entry.t - (session.model.start_t or entry.t):6.2f}s  {entry.text}", file=out)
        printed = session.model.logged

    def say(text: str) -> None:
        print_new_log_lines()
        print(f"-- {text}", file=out)

    # SIGTERM or SIGHUP cancels the demo, so that the session below is closed and cleaned up.
    task = asyncio.current_task()
    on_stop_signals(lambda signum: task.cancel())
    try:
        await session.start()
        print(f"server {session.server_address}, forwarder on {session.handoff}, client at {config.client_rate:g} connections/s", file=out)
        await run_script(session, duration, say)
        say("stopping the client: requests in flight finish first")
        await session.pause_client()
        print_new_log_lines()
    finally:
        await session.close()
    return session


# Log kinds the headless demo prints; per-connection lines would flood the terminal.
_TOLD = {"worker_started", "worker_exited", "channel_up", "channel_down", "listening", "peer_refused", "error", "failed"}


def print_summary(session, out=sys.stdout) -> None:
    """Print the totals the model folded from the run."""
    model = session.model
    counters = model.counters
    p50 = model.latency_percentile(50)
    p99 = model.latency_percentile(99)
    handoff_p50 = model.handoff_percentile(50)
    print("summary:", file=out)
    print(f"  answered by forwarder  {counters.by_forwarder}", file=out)
    print(f"  answered by server     {counters.by_server}", file=out)
    print(f"  failed                 {counters.failed}{_counts(counters.errors)}", file=out)
    print(f"  handoffs               {counters.handoffs} (round trip p50 {_ms(handoff_p50)})", file=out)
    print(f"  fallbacks              {counters.fallbacks}{_counts(counters.fallback_reasons)}", file=out)
    print(f"  peak shared sockets    {model.shared_peak} (one socket in two fd tables at once)", file=out)
    print(f"  client latency         p50 {_ms(p50)}, p99 {_ms(p99)}", file=out)
    if model.bad_observations:
        count = model.bad_observations
        print(f"  not folded             {count} observation{'' if count == 1 else 's'} with a field of the wrong type (last: {model.last_bad_observation})", file=out)


def _counts(counter) -> str:
    if not counter:
        return ""
    return " (" + ", ".join(f"{reason}: {count}" for reason, count in counter.most_common()) + ")"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``takeover-console demo``: the script in the console, or printed with --headless."""
    if getattr(args, "record", None):
        check_output_file(Path(args.record), "--record")
    config = SessionConfig(
        listen="127.0.0.1:0",
        client_rate=args.rate,
        record=Path(args.record) if getattr(args, "record", None) else None,
    )
    if not args.headless:
        from takeover_console.console import check_terminal, run_scripted_console

        check_terminal()
        return run_scripted_console(config, args.duration)
    try:
        session = asyncio.run(run_headless(config, args.duration))
    except asyncio.CancelledError:
        print("stopped by a signal before the end", file=sys.stderr)
        return 1
    print_summary(session)
    return 1 if session.model.counters.failed else 0

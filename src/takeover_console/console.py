"""Starting the console: check what can fail before the UI takes the terminal, then run it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from takeover_console.lifecycle import on_stop_signals
from takeover_console.netaddr import AddressError, open_tcp_listener, parse_host_port
from takeover_console.observations import RecordingError, read_recording
from takeover_console.options import OptionError, check_output_file, check_socket_directory
from takeover_console.session import LiveSession, ReplaySession, SessionConfig

log = logging.getLogger(__name__)


def check_listen_address(listen: str) -> None:
    """Raise AddressError now if the server could not listen on ``listen``."""
    host, port = parse_host_port(listen, "--listen")
    if port != 0:
        open_tcp_listener(host, port, backlog=1).close()


def _log_to_file(path: str | None) -> None:
    # The terminal belongs to the UI, so the console logs to a file or not at all.
    handler: logging.Handler = logging.FileHandler(path) if path else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def check_terminal(without: str = "takeover-console demo --headless") -> None:
    """Raise OptionError unless stdin and stdout are a terminal, which the console draws on and reads keys from.

    Without one the UI cannot run: with its output into a pipe that closes, it would
    block and even ignore SIGTERM. ``without`` is the command the message suggests for
    a run without a terminal.
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise OptionError(f"the console needs a terminal on stdin and stdout; run it in a terminal, or run `{without}` for a run without one")


def run_console(args: argparse.Namespace) -> int:
    """Run the live console; return the exit status."""
    check_listen_address(args.listen)
    if args.handoff:
        check_socket_directory(Path(args.handoff), "--handoff")
    if args.record:
        check_output_file(Path(args.record), "--record")
    if args.log_file:
        check_output_file(Path(args.log_file), "--log-file")
    check_terminal()
    _log_to_file(args.log_file)
    config = SessionConfig(
        listen=args.listen,
        handoff=Path(args.handoff) if args.handoff else None,
        client_rate=args.rate,
        record=Path(args.record) if args.record else None,
    )
    return asyncio.run(_run_app(LiveSession(config)))


def run_scripted_console(config: SessionConfig, duration: float) -> int:
    """Run the console with the demo script driving the workers, for a hands-free stage demo."""
    from takeover_console.demo import run_script

    _log_to_file(None)
    session = LiveSession(config)
    return asyncio.run(_run_app(session, script=lambda app: run_script(session, duration, app.say)))


async def _run_app(session, script=None) -> int:
    from takeover_console.app import TakeoverApp

    app = TakeoverApp(session, script=script)
    # Without this, SIGTERM and SIGHUP would end the process at once: the workers would
    # still go (PR_SET_PDEATHSIG), but the session's directory would stay behind.
    on_stop_signals(lambda signum: app.exit(return_code=128 + signum))
    try:
        await app.run_async()
    finally:
        await session.close()
    return app.return_code or 0


def run_replay(args: argparse.Namespace) -> int:
    """Replay a recording in the console, or print its summary with --headless."""
    path = Path(args.file)
    try:
        # Check the file before the UI takes the terminal, so a bad path is a plain error.
        next(iter(read_recording(path)), None)
        if args.headless:
            return asyncio.run(_replay_headless(path, args.until))
        check_terminal(without=f"takeover-console replay {args.file} --headless")
        _log_to_file(None)
        return asyncio.run(_run_app(ReplaySession(path, args.speed, until=args.until)))
    except RecordingError as exc:
        print(f"takeover-console replay: error: {exc}", file=sys.stderr)
        return 1


async def _replay_headless(path: Path, until: float | None) -> int:
    from takeover_console.demo import print_summary

    # Headless replay folds the whole file at once; --speed only paces the console.
    session = ReplaySession(path, speed=0, until=until)
    await session.start()
    print(f"replayed {session.count} observation{'' if session.count == 1 else 's'} from {path}")
    print_summary(session)
    return 0


__all__ = ["AddressError", "check_listen_address", "run_console", "run_replay"]

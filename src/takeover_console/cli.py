"""Command line: ``takeover-console [server|forwarder|client|demo] ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from pathlib import Path

from takeover_console import __version__
from takeover_console import events as ev
from takeover_console.events import EventLog
from takeover_console.lifecycle import exit_with_parent
from takeover_console.logs import setup_logging
from takeover_console.netaddr import AddressError, parse_host_port
from takeover_console.options import OptionError
from takeover_console.socketfile import SocketFileError, check_socket_path, default_handoff_path
from takeover_console.takeover import TakeoverError

log = logging.getLogger("takeover_console")

DEFAULT_ADDRESS = "127.0.0.1:8080"


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def _add_common(parser: argparse.ArgumentParser, log_level: str = "INFO", worker: bool = True) -> None:
    if worker:
        parser.add_argument("--events", metavar="PATH", help="write structured events as JSON lines to PATH, or - for stdout (default: none)")
    parser.add_argument("--log-level", default=log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help=f"stderr log level (default: {log_level})")
    if worker:
        parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process exits (used by the console for its workers)")


def _add_process(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generation", type=_positive_int, default=1, help="generation number reported in events (default: 1)")
    parser.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="uid allowed at the other end of the handoff socket, checked with SO_PEERCRED; repeat for several (default: only this process's uid)",
    )
    parser.add_argument("--drain-timeout", type=_non_negative_float, default=5.0, help="seconds to finish in-flight connections on SIGTERM (default: 5)")
    parser.add_argument("--read-timeout", type=_positive_float, default=5.0, help="seconds to wait for a client's request before closing (default: 5)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="takeover-console",
        description="Run, watch and test Socket Takeover: accepted TCP connections handed between processes with SCM_RIGHTS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--listen", default=DEFAULT_ADDRESS, metavar="HOST:PORT", help=f"console: the server's TCP address (default: {DEFAULT_ADDRESS})")
    parser.add_argument("--handoff", metavar="PATH", help="console: the handoff socket (default: a new private directory under the runtime directory)")
    parser.add_argument("--rate", type=_positive_float, default=5.0, metavar="PER_S", help="console: client connections per second at start (default: 5)")
    parser.add_argument("--record", metavar="FILE", help="console: write every observation to FILE as JSON lines, for replay")
    parser.add_argument("--log-file", metavar="PATH", help="console: write the console's own log to PATH (default: none, the screen is the UI)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    server = commands.add_parser("server", help="accept TCP connections and hand each one to the forwarder", description="Accept TCP connections and hand each accepted fd to the forwarder; serve it here when the forwarder is absent, slow or refuses.")
    server.add_argument("--listen", action="append", metavar="HOST:PORT", help=f"TCP address to accept on; port 0 picks a free port; repeat for several listeners (default: {DEFAULT_ADDRESS})")
    server.add_argument("--control", metavar="PATH", help="control socket for listener takeover (default: control-HOST-PORT.sock in the private runtime directory)")
    server.add_argument("--takeover", action="store_true", help="take the listening sockets over from the server running at --control (or the default control path of --listen), instead of binding")
    server.add_argument("--ready-timeout", type=_positive_float, default=5.0, help="seconds a takeover may take from request to READY before the old server aborts it (default: 5)")
    server.add_argument("--inject-fault", choices=["crash-before-ready", "hang-before-ready", "stall-before-ready", "slow-drain"], help="misbehave on purpose, for tests and demos: as a new generation crash before READY, hang without READY, or stall past --ready-timeout and then send READY; or stop answering while draining")
    server.add_argument("--handoff", metavar="PATH", help="the forwarder's Unix socket (default: handoff.sock in the private runtime directory)")
    server.add_argument("--protocol", choices=["native", "seed"], default="native", help="native: persistent acknowledged channel; seed: the reference demo's framing, one dial per connection (default: native)")
    server.add_argument("--reply-timeout", type=_positive_float, default=300.0, metavar="MS", help="milliseconds to wait for TAKEN or REJECTED before serving a connection here (default: 300)")
    server.add_argument("--slow-motion", type=_positive_float, default=1500.0, metavar="MS", help="milliseconds the server keeps its copy of a handed-over socket while slow motion is on; SIGUSR1 turns it on, SIGUSR2 off (default: 1500)")
    server.add_argument("--ownership", choices=["done", "taken"], default="done", help="done: keep a copy of each handed-over socket until the forwarder reports DONE, so a forwarder crash loses no request; taken: close it at TAKEN, fewer fds for long connections (default: done)")
    server.add_argument("--backlog", type=_positive_int, default=1024, help="TCP listen backlog in connections (default: 1024)")
    _add_process(server)
    _add_common(server)

    forwarder = commands.add_parser("forwarder", help="receive connections over the handoff socket and serve them", description="Receive accepted TCP connections over a Unix socket (native or seed framing) and serve them.")
    forwarder.add_argument("--handoff", metavar="PATH", help="Unix socket to listen on (default: handoff.sock in the private runtime directory)")
    forwarder.add_argument("--takeover", action="store_true", help="take the handoff socket over from the forwarder running at --handoff, instead of binding it")
    forwarder.add_argument("--ready-timeout", type=_positive_float, default=5.0, help="seconds a takeover may take from request to READY before the old forwarder aborts it (default: 5)")
    forwarder.add_argument("--inject-fault", choices=["crash-after-receive", "crash-after-read", "crash-after-reply", "crash-before-done"], help="for tests: exit at once at this point of the first connection")
    forwarder.add_argument("--max-connections", type=_positive_int, default=1000, help="connections served at once; offers beyond it are rejected (default: 1000)")
    _add_process(forwarder)
    _add_common(forwarder)

    client = commands.add_parser("client", help="send requests and report who answered", description="Open TCP connections, send 'seq num <i>', read each reply until EOF and report who answered.")
    client.add_argument("--connect", default=DEFAULT_ADDRESS, metavar="HOST:PORT", help=f"server address (default: {DEFAULT_ADDRESS})")
    client.add_argument("--count", type=int, default=20, metavar="N", help="requests to send (default: 20)")
    client.add_argument("--rate", type=_non_negative_float, default=0.0, metavar="PER_S", help="new connections per second; 0 means as fast as possible (default: 0)")
    client.add_argument("--concurrency", type=_positive_int, default=1, metavar="C", help="connections open at once (default: 1)")
    client.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds allowed per request (default: 5)")
    client.add_argument("--hold", type=_non_negative_float, default=0.0, help="seconds to keep each connection open before sending its request (default: 0)")
    client.add_argument("--json", action="store_true", help="print one JSON summary instead of a line per reply")
    _add_common(client)

    demo = commands.add_parser("demo", help="a scripted run: kill the forwarder halfway, start it again", description="Run server, forwarder and client; kill the forwarder halfway, start it again at three quarters, then switch on slow motion. In the console, or printed with --headless.")
    demo.add_argument("--headless", action="store_true", help="print what happens to the terminal instead of running the script in the console")
    demo.add_argument("--duration", type=_positive_float, default=6.0, help="seconds to run (default: 6)")
    demo.add_argument("--rate", type=_positive_float, default=50.0, metavar="PER_S", help="client connections per second (default: 50)")
    demo.add_argument("--record", metavar="FILE", help="write every observation to FILE as JSON lines, for replay")
    _add_common(demo, log_level="WARNING", worker=False)

    replay = commands.add_parser("replay", help="show a recorded session again, with no process started", description="Feed a file written with --record back through the console.")
    replay.add_argument("file", metavar="FILE", help="a recording written with --record")
    replay.add_argument("--speed", type=_non_negative_float, default=1.0, help="console playback speed; 2 is twice as fast, 0 loads everything at once (default: 1); --headless always loads at once")
    replay.add_argument("--until", type=_non_negative_float, metavar="S", help="stop S seconds after the start of the recording (default: play it all)")
    replay.add_argument("--headless", action="store_true", help="print a summary instead of opening the console")
    _add_common(replay, log_level="WARNING", worker=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from takeover_console.console import run_console

        try:
            return run_console(args)
        except (AddressError, SocketFileError, OptionError) as exc:
            print(f"takeover-console: error: {exc}", file=sys.stderr)
            return 1
    setup_logging(args.log_level)
    if getattr(args, "exit_with_parent", False) and not exit_with_parent(os.getppid()):
        return 1
    try:
        if args.command == "server":
            return _run_server(args)
        if args.command == "forwarder":
            return _run_forwarder(args)
        if args.command == "client":
            return _run_client(args)
        if args.command == "demo":
            from takeover_console.demo import run_demo

            return run_demo(args)
        if args.command == "replay":
            from takeover_console.console import run_replay

            return run_replay(args)
    except (AddressError, SocketFileError, TakeoverError, OptionError) as exc:
        print(f"takeover-console {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _handoff_path(args: argparse.Namespace) -> Path:
    path = Path(args.handoff) if args.handoff else default_handoff_path()
    check_socket_path(path, "--handoff")
    return path


def _control_path(args: argparse.Namespace) -> Path | None:
    if not args.control:
        return None
    check_socket_path(Path(args.control), "--control")
    return Path(args.control)


def _run_program(args: argparse.Namespace, role: str, factory) -> int:
    events = EventLog.open(args.events, role, getattr(args, "generation", 1))
    events.emit(ev.STARTED, argv=sys.argv[1:], version=__version__, ppid=os.getppid())
    code = 1
    try:
        code = asyncio.run(_run_async(factory, events))
        return code
    except (AddressError, SocketFileError, TakeoverError) as exc:
        events.emit(ev.ERROR, message=str(exc))
        raise
    finally:
        # Events of the loop's last iteration may still wait for their flush.
        events.flush()
        events.emit(ev.EXITED, code=code)
        events.close()


async def _run_async(factory, events: EventLog) -> int:
    program = factory(events)
    return await program.run()


def _run_server(args: argparse.Namespace) -> int:
    from takeover_console.server import Server, ServerConfig

    listen = [parse_host_port(text, "--listen") for text in (args.listen or [DEFAULT_ADDRESS])]
    config = ServerConfig(
        listen=listen,
        control_path=_control_path(args),
        takeover=args.takeover,
        ready_timeout=args.ready_timeout,
        inject_fault=args.inject_fault,
        ownership=args.ownership,
        handoff_path=_handoff_path(args),
        protocol=args.protocol,
        reply_timeout=args.reply_timeout / 1000,
        read_timeout=args.read_timeout,
        drain_timeout=args.drain_timeout,
        backlog=args.backlog,
        allowed_uids=frozenset(args.allow_uid or ()),
        slow_motion_delay=args.slow_motion / 1000,
    )
    return _run_program(args, "server", lambda events: Server(config, events))


def _run_forwarder(args: argparse.Namespace) -> int:
    from takeover_console.forwarder import Forwarder, ForwarderConfig

    config = ForwarderConfig(
        handoff_path=_handoff_path(args),
        read_timeout=args.read_timeout,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        allowed_uids=frozenset(args.allow_uid or ()),
        takeover=args.takeover,
        ready_timeout=args.ready_timeout,
        inject_fault=args.inject_fault,
    )
    return _run_program(args, "forwarder", lambda events: Forwarder(config, events))


def _run_client(args: argparse.Namespace) -> int:
    from takeover_console.client import ClientConfig, print_outcome, print_summary, run_client

    host, port = parse_host_port(args.connect, "--connect")
    if args.count < 0:
        raise AddressError(f"invalid --count {args.count}: expected 0 or more")
    config = ClientConfig(host=host, port=port, count=args.count, rate=args.rate, concurrency=args.concurrency, timeout=args.timeout, hold=args.hold)
    events = EventLog.open(args.events, "client")
    events.emit(ev.STARTED, argv=sys.argv[1:], version=__version__, ppid=os.getppid())
    summary = asyncio.run(run_client(config, events, None if args.json else print_outcome))
    if args.json:
        print_summary(summary)
    code = 1 if summary.failed else 0
    events.flush()
    events.emit(ev.EXITED, code=code)
    events.close()
    return code

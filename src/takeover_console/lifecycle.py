"""What every long-running program shares: stop signals and leaving with its parent."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM, SIGINT or SIGHUP so the program can shut down cleanly."""
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, request_stop, signum)


def on_stop_signals(callback) -> None:
    """Call ``callback(signum)`` on the running loop at SIGTERM or SIGHUP.

    SIGINT is left alone: the console reads Ctrl+C as a key, and elsewhere it raises
    KeyboardInterrupt as usual.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, callback, signum)


def exit_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to send SIGTERM to this process when its parent exits (PR_SET_PDEATHSIG).

    Returns False when the parent is already gone (the caller should exit) or when prctl()
    is unavailable. The signal fires when the parent *thread* exits, which for a
    single-threaded asyncio supervisor is the process.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    # The parent may have died before prctl(); then we were reparented already.
    if expected_parent is not None and os.getppid() != expected_parent:
        return False
    return True

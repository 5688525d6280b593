"""Checks of the file and directory options, made before a program or the console starts.

A path that cannot be used fails here with a message that names the option, the path,
the reason and what to do, instead of a traceback once the console has the terminal.
"""

from __future__ import annotations

import os
from pathlib import Path


class OptionError(Exception):
    """A check before start-up failed: an option names a path that cannot be used, or there
    is no terminal for the console. The message gives the reason and the next step."""


def check_output_file(path: Path, option: str) -> None:
    """Raise OptionError unless ``path`` can be opened for writing.

    The check opens the file for appending, so a file that did not exist is created, empty.
    """
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise OptionError(f"{option} {path}: {exc.strerror}; pass a file in a directory you can write to") from None


def check_socket_directory(path: Path, option: str) -> None:
    """Raise OptionError unless the directory that is to hold the socket ``path`` exists and is writable."""
    directory = path.parent
    if not directory.is_dir():
        raise OptionError(f"{option} {path}: directory {directory} does not exist; create it or pass another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: directory {directory} is not writable; pass a path in a directory you can write to")

"""Fixtures: a short private directory per test and programs that are always cleaned up."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Program  # noqa: E402


@pytest.fixture
def workdir():
    """A fresh directory with a short path, because Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tc-"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def programs(workdir):
    """Start programs with ``programs(role, *args)``; every one is killed at teardown."""
    started: list[Program] = []

    def start(role: str, *args: str, name: str | None = None) -> Program:
        program = Program(role, list(args), workdir, name=name)
        started.append(program)
        return program

    yield start
    for program in started:
        program.close()

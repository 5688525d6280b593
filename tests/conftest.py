"""Fixtures: a short private directory per test and programs that are always cleaned up."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Program  # noqa: E402

from takeover_console.socketfile import runtime_dir  # noqa: E402

# Matches the control socket names that a server started without --control binds in
# the runtime directory (default_control_path in takeover_console.socketfile).
DEFAULT_CONTROL_GLOB = "control-*.sock"


def list_default_control_files() -> set[str]:
    """Return the names of the control socket files in the shared runtime directory."""
    return {path.name for path in runtime_dir().glob(DEFAULT_CONTROL_GLOB)}


@pytest.fixture(scope="session")
def known_control_files() -> set[str]:
    """Names of the control socket files present before the first test, plus those reported since."""
    return list_default_control_files()


@pytest.fixture(autouse=True)
def no_control_file_left(known_control_files):
    """Fail a test that leaves a new control socket file in the shared runtime directory.

    A server started without --control binds control-HOST-PORT.sock there, and one
    ended with SIGKILL leaves the file behind. Only names that were not there before
    are reported, each once, and no file is removed: the older ones may belong to
    another process.
    """
    yield
    added = list_default_control_files() - known_control_files
    known_control_files.update(added)
    # NOTE: a server of another process that binds its default control path while this
    # test runs is reported here too.
    assert not added, (
        f"the test left {len(added)} new control socket file(s) in {runtime_dir()}: {', '.join(sorted(added))}; "
        "start every server with --control PATH inside the test's workdir"
    )


@pytest.fixture
def workdir():
    """A fresh directory with a short path, because Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tc-"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def has_option(args: tuple[str, ...], option: str) -> bool:
    """Return whether ``args`` contain ``option``, either alone or as ``--option=VALUE``."""
    return any(arg == option or arg.startswith(f"{option}=") for arg in args)


@pytest.fixture
def programs(workdir):
    """Start programs with ``programs(role, *args)``; every one is killed at teardown.

    A server started without --control gets a control socket of its own in ``workdir``,
    so a server killed with SIGKILL leaves no file in the shared runtime directory. A
    server started with --takeover and no --control is left alone, because it looks
    for the running server at the default path, so give both generations one --control.
    """
    started: list[Program] = []

    def start(role: str, *args: str, name: str | None = None) -> Program:
        if role == "server" and not has_option(args, "--control") and not has_option(args, "--takeover"):
            args = (*args, "--control", str(workdir / f"control-{len(started)}.sock"))
        program = Program(role, list(args), workdir, name=name)
        started.append(program)
        return program

    yield start
    for program in started:
        program.close()

"""Unix socket files: the private runtime directory, safe binding, stale and live sockets.

Rules kept here:
- The default directory is ``$XDG_RUNTIME_DIR/takeover-console/``, else
  ``<tempdir>/takeover-console-<uid>/``, mode 0700, owned by this uid and not a symlink.
- A socket is bound under umask 0177, so the file is created 0600 with no window in
  which another user could connect before a chmod().
- An existing socket file that refuses connections (ECONNREFUSED) is stale and replaced;
  one that accepts is live, and binding fails with SocketInUse; a path that is not a
  socket is never removed.
- An flock() on the socket's directory serialises check, unlink and bind between our
  own processes, so two of them cannot both decide that a path is stale. Locking the
  directory leaves no lock file behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from takeover_console.ipc import peer_credentials

log = logging.getLogger(__name__)

APP_DIR_NAME = "takeover-console"
HANDOFF_SOCKET_NAME = "handoff.sock"
UNIX_BACKLOG = 512


class SocketFileError(Exception):
    """A socket path cannot be used; the message gives the reason and what to do."""


class SocketInUse(SocketFileError):
    """Another process is accepting connections on the socket path."""


def runtime_dir() -> Path:
    """Return the private directory for socket files, creating it 0700 when missing."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        path = Path(base) / APP_DIR_NAME
    else:
        path = Path(tempfile.gettempdir()) / f"{APP_DIR_NAME}-{os.getuid()}"
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise SocketFileError(f"{path} exists and is not a directory; remove it or pass an explicit socket path")
    if info.st_uid != os.getuid():
        raise SocketFileError(f"{path} belongs to uid {info.st_uid}, not {os.getuid()}; pass an explicit socket path")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def default_handoff_path() -> Path:
    """The handoff socket path used when none is given."""
    return runtime_dir() / HANDOFF_SOCKET_NAME


def default_control_path(host: str, port: int) -> Path:
    """The control socket of the server listening on ``host:port``, when none is given.

    The address is part of the name, so servers on different ports do not collide.
    """
    return runtime_dir() / f"control-{host.strip('[]').replace(':', '_')}-{port}.sock"


@dataclass
class BoundSocket:
    """A listening Unix socket and the identity of the file it created."""

    sock: socket.socket
    path: Path
    device: int
    inode: int

    def remove_file(self) -> bool:
        """Unlink the socket file if it is still the one this socket created.

        Returns True when removed. A file replaced by another process is left alone.
        """
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (info.st_dev, info.st_ino) != (self.device, self.inode):
            log.info("not removing %s: it was replaced by another process's socket", self.path)
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def _probe(path: Path) -> str:
    """Return "live", "stale" or "missing" for an existing socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except FileNotFoundError:
        return "missing"
    except ConnectionRefusedError:
        return "stale"
    except (BlockingIOError, TimeoutError):
        # A full backlog means someone is listening.
        return "live"
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return "live"
        raise SocketFileError(f"cannot probe {path}: {exc.strerror}") from None
    else:
        return "live"
    finally:
        probe.close()


def _describe_owner(path: Path) -> str:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        creds = peer_credentials(probe)
        # SO_PEERCRED names the process that called listen(); after a takeover that may be
        # an earlier generation, so the message reads "created by".
        return f" (socket created by pid {creds.pid}, uid {creds.uid})"
    except OSError:
        return ""
    finally:
        probe.close()


# sun_path has room for 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path, option: str = "socket path") -> None:
    """Raise SocketFileError when ``path`` is too long to be a Unix socket address."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketFileError(f"{option} {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket allows; pass a shorter path")


def bind_unix_listener(path: Path, backlog: int = UNIX_BACKLOG) -> BoundSocket:
    """Bind and listen on a Unix stream socket at ``path`` with mode 0600.

    Raises SocketInUse when a live socket is there and SocketFileError when the path is
    not a socket or cannot be used.
    """
    path = Path(path)
    check_socket_path(path)
    try:
        lock_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SocketFileError(f"cannot open directory {path.parent}: {exc.strerror}") from None
    old_umask = os.umask(0o177)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise SocketFileError(f"cannot bind {path}: {exc.strerror}") from None
        sock.listen(backlog)
        info = os.lstat(path)
        return BoundSocket(sock=sock, path=path, device=info.st_dev, inode=info.st_ino)
    finally:
        os.umask(old_umask)
        os.close(lock_fd)


def _clear_stale(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketFileError(f"{path} exists and is not a socket; it was left alone, so remove it or pick another path")
    state = _probe(path)
    if state == "live":
        raise SocketInUse(f"another process is listening on {path}{_describe_owner(path)}; stop it or pass another path")
    if state == "stale":
        log.info("replacing stale socket file %s (connect refused)", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

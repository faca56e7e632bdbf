"""The embedded `memory://` store: one in-process fakeredis server, two ways in.

`serve` talks to it directly (no socket on the per-call path); `fastagi-ctl
status/ban/unban` from another shell reach the same data through a Unix socket in
the runtime directory, readable by the service's user only. Same redis-py code,
same Lua: one store implementation, two places for the data. With a state directory
its bans, records and counters are saved to disk and restored at start (persist.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import socketserver
import stat
import threading
from pathlib import Path

import fakeredis
import fakeredis.aioredis
from fakeredis._clients._tcp_server import TCPFakeRequestHandler

from fastagi.keys import Keys
from fastagi.persist import Persister, StateError

SOCKET_NAME = "embedded.sock"


class EmbeddedError(Exception):
    """The embedded store cannot start or cannot be reached."""


class UnsafeRuntimeDir(EmbeddedError):
    """Another user could replace the control socket there, and so read root's
    `ban`/`unban` and answer them: refused (exit 2), nothing touched."""


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_ancestors(path: Path) -> None:
    """Every directory above `path`, as written and as resolved, must be root's or
    ours and, when others may write it, sticky (as /tmp): whoever can rename an
    entry of one of them can swap the runtime directory itself."""
    seen: set[Path] = set()
    for parent in (path.parent, Path(os.path.realpath(path.parent))):
        for directory in (parent, *parent.parents):
            if directory in seen:
                continue
            seen.add(directory)
            info = os.lstat(directory)
            if not _trusted(info.st_uid):
                raise UnsafeRuntimeDir(
                    f"refusing runtime directory {path}: {directory} above it belongs to "
                    f"uid {info.st_uid}; set server.runtime_dir to a directory of our own"
                )
            if stat.S_ISLNK(info.st_mode):
                continue  # its target is in the resolved chain
            if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
                raise UnsafeRuntimeDir(
                    f"refusing runtime directory {path}: {directory} above it is writable "
                    f"by others and not sticky (mode {stat.S_IMODE(info.st_mode):04o})"
                )


def check_runtime_dir(path: Path, service: bool) -> os.stat_result:
    """Refuse a runtime directory another user could have put there or could change.

    It must be a real directory (lstat: a symbolic link is refused), not writable by
    group or others, and ours. A client (`ban`, `unban`, `status`) also accepts one
    owned by root, or one whose parent only root (or we) may write, as systemd's
    RuntimeDirectory= /run/fastagi of a DynamicUser service: root made that choice.
    FileNotFoundError when it does not exist."""
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeRuntimeDir(f"refusing runtime directory {path}: it is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeRuntimeDir(f"refusing runtime directory {path}: not a directory")
    if mode & 0o022:
        raise UnsafeRuntimeDir(
            f"refusing runtime directory {path}: writable by group or others (mode {mode:04o})"
        )
    if info.st_uid != os.geteuid() and (service or not _delegated(path, info.st_uid)):
        raise UnsafeRuntimeDir(
            f"refusing runtime directory {path}: owned by uid {info.st_uid}, "
            f"not by us (uid {os.geteuid()})"
        )
    _check_ancestors(path)
    return info


def _delegated(path: Path, owner: int) -> bool:
    """Root's, or in a parent only root or we may write (so root gave it to `owner`)."""
    parent = os.lstat(path.parent)
    return owner == 0 or (
        _trusted(parent.st_uid) and stat.S_ISDIR(parent.st_mode) and not parent.st_mode & 0o022
    )


def prepare_runtime_dir(path: Path) -> None:
    """Create the service's runtime directory (mode 0700) unless it exists, then check
    it as found (lstat): an existing one, e.g. a `/tmp/fastagi-<uid>` made first by
    another user, is used only if it passes `check_runtime_dir`, and never changed.
    Nothing is created under a parent another user controls."""
    try:
        _check_ancestors(path)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise EmbeddedError(f"cannot create runtime directory {path}: {error.strerror}") from None
    check_runtime_dir(path, service=True)


def client_socket(runtime_dir: Path) -> Path:
    """The control socket of a running service, after checking where it lives.

    EmbeddedError when nothing runs there; UnsafeRuntimeDir when the directory or the
    socket could be another user's."""
    path = runtime_dir / SOCKET_NAME
    try:
        directory = check_runtime_dir(runtime_dir, service=False)
        info = os.lstat(path)
    except FileNotFoundError:
        raise EmbeddedError(f"no running service with the embedded store at {path}") from None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid not in (directory.st_uid, 0):
        raise UnsafeRuntimeDir(f"refusing {path}: not a socket of the directory's owner")
    if not reachable(path):
        raise EmbeddedError(f"no running service with the embedded store at {path}")
    return path


class _UnixFakeServer(socketserver.ThreadingUnixStreamServer):
    """fakeredis's request handler behind a Unix socket instead of TCP."""

    daemon_threads = True

    def __init__(self, path: str, fake_server: fakeredis.FakeServer) -> None:
        self._shutdown_event = threading.Event()
        self.fake_server = fake_server
        self.clients: dict[str, object] = {}
        self._ids = itertools.count()
        super().__init__(path, TCPFakeRequestHandler)

    def get_request(self):  # type: ignore[override]
        # Unix peers have no address; give each connection its own fakeredis client.
        connection, _ = self.socket.accept()
        return connection, f"unix-{next(self._ids)}"

    def shutdown(self) -> None:
        self._shutdown_event.set()
        super().shutdown()


class EmbeddedRedis:
    """The running service's private Redis, shared with the CLI through a socket."""

    def __init__(self, runtime_dir: Path, state_dir: Path, keys: Keys) -> None:
        self.socket_path = runtime_dir / SOCKET_NAME
        self.server = fakeredis.FakeServer()
        self.persister: Persister | None = Persister(self.server, keys, state_dir)
        self._unix: _UnixFakeServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Check the runtime directory, restore the saved bans, then open the control
        socket: whoever connects (the agent, `fastagi-ctl status`) sees them from the first
        command on."""
        prepare_runtime_dir(self.socket_path.parent)
        assert self.persister is not None, "an EmbeddedRedis starts once"
        try:
            self.persister.start()
        except StateError as error:
            raise EmbeddedError(str(error)) from None
        try:
            self._listen()
        except BaseException:
            self.persister.stop()
            self.persister = None
            raise

    def _listen(self) -> None:
        if self.socket_path.exists():
            if reachable(self.socket_path):
                raise EmbeddedError(
                    f"another embedded service already runs on {self.socket_path}; "
                    "stop it or set server.runtime_dir"
                )
            self.socket_path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._unix = _UnixFakeServer(str(self.socket_path), self.server)
        except OSError as error:
            raise EmbeddedError(f"cannot listen on {self.socket_path}: {error}") from None
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(
            target=self._unix.serve_forever, name="embedded-redis", daemon=True
        )
        self._thread.start()

    def client(self) -> fakeredis.aioredis.FakeRedis:
        """An asyncio redis-py client on the in-process data, for the service itself."""
        return fakeredis.aioredis.FakeRedis(server=self.server)

    def stop(self) -> None:
        """Close the socket first (no change after it), then the final save."""
        if self._unix is not None:
            self._unix.shutdown()
            self._unix.server_close()
            self._unix = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self.persister is not None:
            self.persister.stop()
            self.persister = None


def reachable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True

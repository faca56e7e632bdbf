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
        """Restore the saved bans, then open the control socket: whoever connects
        (the agent, `fastagi-ctl status`) sees them from the first command on."""
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
        runtime = self.socket_path.parent
        try:
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise EmbeddedError(f"cannot create runtime directory {runtime}: {error}") from None
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

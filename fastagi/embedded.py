"""The embedded `memory://` store: one in-process fakeredis server, two ways in.

`serve` talks to it directly (no socket on the per-call path); `fastagi-ctl
status/ban/unban` from another shell reach the same data through a Unix socket in
the runtime directory, readable by the service's user only. Same redis-py code,
same Lua: one store implementation, two places for the data. With a state directory
its bans, records and counters are saved to disk and restored at start (persist.py).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import socket
import socketserver
import stat
import threading
import time
from pathlib import Path
from typing import Any

import fakeredis
import fakeredis.aioredis
from fakeredis._clients._tcp_server import TCPFakeRequestHandler
from fakeredis._core._database import Database, Item
from fakeredis.model import Hash, XStream, ZSet

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
        self.persister: Persister | None = Persister(
            self.server, keys, state_dir, functools.partial(newest_event, self.server)
        )
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


def newest_event(server: fakeredis.FakeServer, key: str) -> str | None:
    """The id of the event stream's newest entry ("0-0": none; None: the key is not a
    stream, so the commands must run and say so), read off the data.

    The embedded store cannot block on XREAD, so its agent looks 20 times a second; an
    XRANGE and an XREAD through fakeredis's command parser each time were two thirds of
    an idle service's CPU (11 of 16 ms a second). This answers the same question with a
    dictionary lookup; the commands run only when it says something came."""
    with server.lock:
        item = server.dbs[0].get(key.encode())
        if item is None:
            return "0-0"
        return item.value.last_item_key().decode() if type(item.value) is XStream else None


# -- the screening step in Python --------------------------------------------------------

_INTEGER = re.compile(rb"-?(0|[1-9][0-9]{0,17})\Z")  # what HINCRBY surely reads as one


class _Fallback(Exception):
    """The data is not what the common step expects: the Lua script decides instead."""


class NativeScreen:
    """lua.SCREEN for a call that does not ban, in Python on the embedded store's data.

    fakeredis runs a script with lupa: it compiles the script anew, checks the Lua
    globals before every `redis.call`, parses every command through its full command
    table and collects Lua's garbage after each run, and the step goes through the
    RESP encoding both ways: ~1.3 ms of the embedded service's ~1.8 ms per call
    (bench/session_profile.py). Here the two common outcomes, COUNTED and already
    BANNED, are the same writes made straight on fakeredis's data (its ZSet, Hash and
    Database, under its server lock, with the time frozen for the step as fakeredis
    does for a script), in the script's order. Whatever else, the call that reaches
    the threshold (the holds, the ban list, the event) and data the script would trip
    on (a key of another type, a count that is not a number), runs the script itself:
    this code only decides that before it writes anything, so both paths are exactly
    the script. `tests/test_store.py` runs the step both ways on random sequences and
    compares every reply and every key.

    Plugs into Store as its `link` (the EVALSHA of the screening step); every other
    command goes to the client.
    """

    def __init__(self, server: fakeredis.FakeServer, client: Any) -> None:
        self.server = server
        self.client = client
        self.clock = time.time

    async def execute(self, *command: Any) -> Any:
        """The screening step's EVALSHA (store._ScreenParts.command): natively if it can."""
        reply = self.now(*command)
        return await self.client.execute_command(*command) if reply is None else reply

    def now(self, *command: Any) -> Any:
        """The step natively, or None where the script itself must run."""
        keys = 3 + int(command[2])
        try:
            return self.step(command[3:keys], command[keys:])
        except _Fallback:
            return None

    async def close(self) -> None:
        """Nothing of its own to close (the client is the store's)."""

    def step(self, keys: tuple, argv: tuple) -> list:
        """KEYS and ARGV as lua.SCREEN takes them; its reply, or _Fallback."""
        count_key, record_key, banned_key, counted_key, _, stats_key = keys[:6]
        ip, member = argv[0], argv[8]
        try:
            threshold, window = float(argv[1]), int(argv[2])
        except ValueError:
            raise _Fallback from None
        injected, prune = argv[11] == b"1", argv[12] == b"1"
        if window <= 0 or not math.isfinite(threshold):
            raise _Fallback
        server = self.server
        with server.lock:
            seconds = self.clock()
            for db in server.dbs.values():
                db.time = seconds  # as fakeredis does for each command (a script's: its start)
            db = server.dbs[0]
            now = round(seconds * 1_000_000) // 1000  # TIME, in ms, as the script reads it
            banned = _zset(db, banned_key)
            _zset(db, counted_key)  # of the right type (the script writes it on every path)
            stats = _hash(db, stats_key)
            _integer_field(stats, b"calls")
            if injected:
                _integer_field(stats, b"injections")
            until = banned.get(ip) if banned is not None else None
            if until is not None and not math.isfinite(until):
                raise _Fallback  # Lua's tonumber reads no "inf"
            if until is not None and until > now:
                record = _hash(db, record_key)
                _integer_field(record, b"count")
                self._common(db, now, prune, injected, banned_key, counted_key, stats_key)
                count = _hincrby(db, record_key, b"count")
                _hset(db, record_key, b"last_seen", b"%d" % now)
                return [b"BANNED", count, int(until), 0]
            calls = _zset(db, count_key)
            expired = _expired(calls, now - window)
            count = (len(calls) - len(expired)) if calls is not None else 0
            if calls is None or member not in calls or member in expired:
                count += 1
            if count >= threshold:
                raise _Fallback  # the ban: holds, ban list, event, record
            self._common(db, now, prune, injected, banned_key, counted_key, stats_key)
            _zrem(db, count_key, expired)
            _zadd(db, count_key, float(now), member)
            item = db.get(count_key)
            item.expireat = seconds + window / 1000.0  # PEXPIRE, on the frozen time
            db.schedule_expiry(count_key, item.expireat)
            db.notify_watch(count_key)
            _zadd(db, counted_key, float(now + window), ip)
            return [b"COUNTED", count, 0, 0]

    @staticmethod
    def _common(db, now, prune, injected, banned_key, counted_key, stats_key) -> None:
        """The script's first writes, on every path: the sweep (when asked), the counters."""
        if prune:
            for key in (banned_key, counted_key):
                _zrem(db, key, _expired(_zset(db, key), now))
        _hincrby(db, stats_key, b"calls")
        if injected:
            _hincrby(db, stats_key, b"injections")


def _value(db: Database, key: bytes, model: type) -> Any:
    item = db.get(key)  # an expired key reads as missing (and goes), as in fakeredis
    if item is None:
        return None
    if type(item.value) is not model:
        raise _Fallback  # WRONGTYPE, or a fakeredis variant of the type: the script's answer
    return item.value


def _zset(db: Database, key: bytes) -> ZSet | None:
    return _value(db, key, ZSet)


def _hash(db: Database, key: bytes) -> Hash | None:
    return _value(db, key, Hash)


def _integer_field(values: Hash | None, field: bytes) -> None:
    text = values.get(field) if values is not None else None
    if text is not None and not _INTEGER.match(text):
        raise _Fallback  # HINCRBY's "hash value is not an integer", or a near miss


def _expired(values: ZSet | None, upto: int) -> list[bytes]:
    """ZREMRANGEBYSCORE key -inf upto: the members it removes, lowest first."""
    if values is None:
        return []
    out = []
    for score, member in values.islice_score(0, len(values)):
        if score > upto:
            break
        out.append(member)
    return out


def _zrem(db: Database, key: bytes, members: list[bytes]) -> None:
    """Remove these members; an emptied key goes, with its expiry (fakeredis's writeback)."""
    if not members:
        return
    values = db[key].value
    for member in members:
        values.discard(member)
    db.notify_watch(key)
    if not len(values):
        db.pop(key, None)


def _zadd(db: Database, key: bytes, score: float, member: bytes) -> None:
    item = db.get(key)
    if item is None:
        item = Item(ZSet())
        db[key] = item
    if item.value.add(member, score):
        db.notify_watch(key)


def _hash_item(db: Database, key: bytes) -> Item:
    item = db.get(key)
    if item is None:
        item = Item(Hash())
        db[key] = item
    return item


def _hincrby(db: Database, key: bytes, field: bytes) -> int:
    values = _hash_item(db, key).value
    count = int(values.get(field, b"0")) + 1
    values.update({field: b"%d" % count}, clear_expiration=False)
    db.notify_watch(key)
    return count


def _hset(db: Database, key: bytes, field: bytes, value: bytes) -> None:
    _hash_item(db, key).value.update({field: value}, clear_expiration=True)
    db.notify_watch(key)

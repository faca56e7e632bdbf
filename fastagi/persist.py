"""The embedded (`memory://`) store on disk: bans, records and counters survive a restart.

The in-process fakeredis server keeps everything in memory; without this a crash, a
`systemctl restart` or a reboot emptied the ban list and the agent then lifted every
ban from the firewall. The saved keys (keys.py `persisted`) are written as one JSON
file in the state directory, atomically (temporary file, fsync, rename, fsync of the
directory), so a kill at any moment leaves the old file or the new one, never half.

When: a thread looks at the ban-event stream every POLL seconds (every ban and unban
appends to it) and saves when it moved, at most once per gap: MIN_GAP, or four times
the last save's duration when that is longer, so saving never takes more than a fifth
of a CPU. Such a save re-reads only the keys of the addresses the new events name and
rewrites the file from what it holds: 0.05 s at 10,000 bans on the 2-core test machine.
So a ban or unban is on disk within POLL + MIN_GAP (0.3 s); a crash within that window
can lose it. Every REFRESH, and at a clean stop, everything is read afresh (0.8 s at
10,000 bans), which also catches what changes without an event (`stats`, a banned
caller's call count).

Restore happens before the service or its agent starts, so the agent's first
reconcile finds the same ban list and leaves the firewall as it was. Expired entries
are dropped on the way in. An unreadable file is kept as `<name>.bad`, reported in one
line, and the service starts empty: a damaged file never stops the service.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import redis

from fastagi.keys import Keys

log = logging.getLogger("fastagi.persist")

STATE_FILE = "embedded-state.json"
LOCK_FILE = "embedded-state.lock"
FORMAT = "fastagi-screen embedded state"
VERSION = 1
POLL = 0.1  # seconds between looks at the event stream
MIN_GAP = 0.2  # seconds between two saves at least
GAP_FACTOR = 4  # ... and four times the last save's duration
REFRESH = 300.0  # a full save this often, for what changes without an event
CATCH_UP_MAX = 5000  # more events than this since the last save: read everything
_GLOB_SPECIAL = "\\*?[]"


class StateError(Exception):
    """The state directory cannot be used (not ours, not creatable, in use)."""


class CorruptState(ValueError):
    """The state file is not a state file we wrote; the message says why."""


def _text(value: bytes) -> str:
    # surrogateescape: any byte survives the JSON round trip (a --reason with odd bytes)
    return value.decode("utf-8", "surrogateescape")


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _glob_literal(text: str) -> str:
    """`text` as a KEYS pattern that matches itself only (a key_prefix may hold `*`)."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


# -- the data: Redis keys <-> JSON entries ------------------------------------------------


_READERS = {
    "hash": lambda pipe, name: pipe.hgetall(name),
    "zset": lambda pipe, name: pipe.zrange(name, 0, -1, withscores=True),
}
BATCH = 1000  # commands per pipeline: fakeredis parses one huge buffer slowly


def _batched(client: redis.Redis, calls: list[Callable[[Any], Any]]) -> list[Any]:
    replies: list[Any] = []
    for start in range(0, len(calls), BATCH):
        pipe = client.pipeline(transaction=False)
        for call in calls[start : start + BATCH]:
            call(pipe)
        replies += pipe.execute()
    return replies


def read(client: redis.Redis, names: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    """These keys (name, type) as JSON-ready entries, read with ordinary commands: two
    per key (its value and its expiry), in pipelines. A key that is not there is left out."""
    calls: list[Callable[[Any], Any]] = []
    for name, kind in names:
        calls.append(lambda pipe, n=name, k=kind: _READERS[k](pipe, n))
        calls.append(lambda pipe, n=name: pipe.pexpiretime(n))
    replies = _batched(client, calls)
    entries = []
    for (name, kind), value, expire_at in zip(names, replies[0::2], replies[1::2], strict=True):
        if not value:
            continue  # gone between the two reads, or never there
        if kind == "hash":
            value = {_text(k): _text(v) for k, v in value.items()}
        else:
            value = [[_text(member), score] for member, score in value]
        entries.append(
            {
                "key": _text(name),
                "type": kind,
                "value": value,
                "expire_at": expire_at if expire_at > 0 else None,
            }
        )
    return entries


def dump(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every saved key (keys.py `persisted`)."""
    names: list[tuple[bytes, str]] = []
    for pattern, kind in keys.persisted():
        if pattern.endswith("*"):
            names += [(n, kind) for n in client.keys(_glob_literal(pattern[:-1]) + "*")]
        else:
            names.append((pattern.encode(), kind))
    return read(client, names)


def _checked(entry: Any) -> tuple[str, str, Any, int | None]:
    """One entry of a state file, or CorruptState naming what is wrong with it."""
    if not isinstance(entry, dict):
        raise CorruptState("an entry is not an object")
    key, kind, value, expire_at = (entry.get(f) for f in ("key", "type", "value", "expire_at"))
    if not isinstance(key, str) or not key:
        raise CorruptState("an entry has no key")
    if expire_at is not None and (isinstance(expire_at, bool) or not isinstance(expire_at, int)):
        raise CorruptState(f"{key}: expire_at is not a whole number")
    shapes = {
        "hash": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "zset": lambda v: (
            isinstance(v, list)
            and all(
                isinstance(m, list)
                and len(m) == 2
                and isinstance(m[0], str)
                and isinstance(m[1], int | float)
                and not isinstance(m[1], bool)
                for m in v
            )
        ),
    }
    if kind not in shapes or not shapes[kind](value):
        raise CorruptState(f"{key}: not a {kind} value")
    return key, kind, value, expire_at


def parse(data: bytes) -> list[tuple[str, str, Any, int | None]]:
    """The entries of a state file; CorruptState if it is anything but ours and whole."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptState(f"not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CorruptState("not a fastagi-screen state file")
    if document.get("version") != VERSION:
        raise CorruptState(f"version {document.get('version')!r}, this release reads {VERSION}")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise CorruptState("no key list")
    return [_checked(entry) for entry in entries]


def restore(
    client: redis.Redis, keys: Keys, entries: list[tuple[str, str, Any, int | None]], now_ms: int
) -> int:
    """Write the saved keys back, leaving out what expired meanwhile; the bans restored."""
    calls: list[Callable[[Any], Any]] = []
    for key, kind, value, expire_at in entries:
        if expire_at is not None and expire_at <= now_ms:
            continue
        if kind == "zset" and key == keys.banned:
            value = [m for m in value if m[1] > now_ms]  # a ban that ended meanwhile
        if not value:
            continue
        name = _bytes(key)
        if kind == "hash":
            mapping = {_bytes(k): _bytes(v) for k, v in value.items()}
            calls.append(lambda pipe, n=name, m=mapping: pipe.hset(n, mapping=m))
        else:
            scores = {_bytes(member): score for member, score in value}
            calls.append(lambda pipe, n=name, m=scores: pipe.zadd(n, m))
        if expire_at is not None:
            calls.append(lambda pipe, n=name, at=expire_at: pipe.pexpireat(n, at))
    _batched(client, calls)
    return int(client.zcount(keys.banned, f"({now_ms}", "+inf"))


# -- the file and its directory -----------------------------------------------------------


class StateFile:
    """The state file in a directory of ours (mode 0700), held with a lock so two
    services never write over each other's bans."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._lock_fd: int | None = None

    def open(self) -> None:
        directory = self.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
        except OSError as error:
            raise StateError(
                f"cannot create state directory {directory}: {error.strerror or error}; "
                "set server.state_dir"
            ) from None
        if info.st_uid != os.geteuid():
            raise StateError(
                f"state directory {directory} belongs to uid {info.st_uid}, not to this "
                f"user (uid {os.geteuid()}); set server.state_dir"
            )
        try:
            if info.st_mode & 0o077:
                directory.chmod(0o700)  # bans and records are ours alone to read
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise StateError(f"state directory {directory}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"another embedded service uses the state directory {directory}; "
                "stop it or set server.state_dir"
            ) from None
        self._lock_fd = fd

    def read(self) -> bytes | None:
        """The file's bytes; None when there is none yet."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def set_aside(self) -> Path:
        """Keep an unreadable file as `.bad` (the last one) for a post-mortem."""
        bad = self.path.with_name(self.path.name + ".bad")
        os.replace(self.path, bad)
        return bad

    def write(self, data: bytes) -> None:
        """Atomically: the old file or the new one survives any crash, never half."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself, on disk
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


# -- the saver ----------------------------------------------------------------------------


class Persister:
    """Restores the embedded server at start and saves it when bans change."""

    def __init__(
        self,
        server: fakeredis.FakeServer,
        keys: Keys,
        directory: Path,
        newest_event: Callable[[str], str | None] | None = None,
    ) -> None:
        self.keys = keys
        # the stream's newest id without a command (embedded.newest_event): looked at
        # every POLL, an XREVRANGE each time was a third of an idle service's CPU
        self._newest_event = newest_event
        self.file = StateFile(directory)
        self.client = fakeredis.FakeRedis(server=server)
        self.saves = 0
        self.last_save_seconds = 0.0
        self._saved_event = ""  # the last event id the file includes
        self._mirror: dict[str, dict[str, Any]] | None = None  # None: read all next time
        self._banned: dict[str, float] = {}
        self._stop = threading.Event()
        self._saving = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def path(self) -> Path:
        return self.file.path

    def start(self) -> None:
        """Lock the directory, restore the saved keys, then watch for changes."""
        self.file.open()
        try:
            self._restore()
        except BaseException:
            self.file.close()
            raise
        with contextlib.suppress(redis.RedisError):
            self.client.hset(self.keys.embedded_state, "path", str(self.path))
        self._thread = threading.Thread(target=self._watch, name="embedded-persist", daemon=True)
        self._thread.start()

    def _restore(self) -> None:
        try:
            data = self.file.read()
            if data is None:
                log.info("embedded store: no saved state in %s yet; starting empty", self.path)
                return
            entries = parse(data)
        except (CorruptState, OSError) as error:
            try:
                bad = f"kept as {self.file.set_aside()}"
            except OSError as move_error:
                bad = f"could not keep a copy: {move_error.strerror}"
            log.error(
                "embedded store: state file %s is damaged (%s); %s; starting with no bans",
                self.path,
                error.strerror if isinstance(error, OSError) else error,
                bad,
            )
            return
        bans = restore(self.client, self.keys, entries, int(time.time() * 1000))
        log.info(
            "embedded store: restored %d running bans and %d saved keys from %s",
            bans,
            len(entries),
            self.path,
        )

    def _last_event(self) -> str:
        if self._newest_event and (newest := self._newest_event(self.keys.events)) is not None:
            return "" if newest == "0-0" else newest
        rows = self.client.xrevrange(self.keys.events, count=1)
        return _text(rows[0][0]) if rows else ""

    def save(self, full: bool = True) -> None:
        """Write the saved keys now: all of them read afresh (`full`), or only what the
        events since the last save touched. A failure (a full disk, an odd reply) is
        logged once per failing spell and tried again at the next change: the thread
        never dies. One save at a time (the final one may meet the thread's last)."""
        with self._saving:
            self._save(full)

    def _save(self, full: bool) -> None:
        started = time.monotonic()
        try:
            event = self._last_event()
            if full or self._mirror is None or not self._catch_up(event):
                self._read_all()
            document = {
                "format": FORMAT,
                "version": VERSION,
                "saved_at": int(time.time() * 1000),
                "keys": self._entries(),
            }
            self.file.write(json.dumps(document, separators=(",", ":")).encode())
        except Exception as error:  # any of them: log it, keep the thread
            self._mirror = None  # and read everything next time
            self._tell(getattr(error, "strerror", None) or str(error))
            if not self._failing:
                log.error(
                    "embedded store: cannot save %s (%s): bans made now will not survive a restart",
                    self.path,
                    getattr(error, "strerror", None) or error,
                )
            self._failing = True
            return
        self._tell("")
        if self._failing:
            log.warning("embedded store: saving to %s works again", self.path)
        self._failing = False
        self._saved_event = event
        self.saves += 1
        self.last_save_seconds = time.monotonic() - started

    # The file's content between saves: every saved key but the ban list, by name, and
    # the ban list as member -> end. A save after a few bans re-reads only their keys
    # (one command per key per ban), not 10,000 records.

    def _read_all(self) -> None:
        self._mirror, self._banned = {}, {}
        for entry in dump(self.client, self.keys):
            if entry["key"] == self.keys.banned:
                self._banned = {member: score for member, score in entry["value"]}
            else:
                self._mirror[entry["key"]] = entry

    def _catch_up(self, event: str) -> bool:
        """Re-read the keys of every address the events after the last save name; False
        when those events cannot be told (trimmed away, or the stream was wiped)."""
        assert self._mirror is not None
        stream = self.keys.events
        if event == self._saved_event:
            events = []
        elif self._saved_event and not self.client.xrange(
            stream, self._saved_event, self._saved_event
        ):
            return False  # our last event is gone: read everything
        else:
            start = f"({self._saved_event}" if self._saved_event else "-"
            events = self.client.xrange(stream, start, event, count=CATCH_UP_MAX + 1)
            if len(events) > CATCH_UP_MAX:
                return False
        if any(fields.get(b"op") == b"sync" for _, fields in events):
            return False  # a bulk change (a blocklist, feeds.py) names no address
        targets = sorted({_text(fields[b"ip"]) for _, fields in events if b"ip" in fields})
        names = [
            ((pattern[:-1] + target if pattern.endswith("*") else pattern).encode(), kind)
            for pattern, kind in self.keys.persisted()
            if pattern != self.keys.banned
            for target in (targets if pattern.endswith("*") else [""])
        ]
        for name, _ in names:
            self._mirror.pop(_text(name), None)
        for entry in read(self.client, names):
            self._mirror[entry["key"]] = entry
        pipe = self.client.pipeline(transaction=False)
        for target in targets:
            pipe.zscore(self.keys.banned, target)
        for target, score in zip(targets, pipe.execute(), strict=True):
            if score is None:
                self._banned.pop(target, None)
            else:
                self._banned[target] = score
        return True

    def _entries(self) -> list[dict[str, Any]]:
        """What goes into the file, without what expired."""
        assert self._mirror is not None
        now_ms = time.time() * 1000
        ended = [n for n, e in self._mirror.items() if e["expire_at"] and e["expire_at"] <= now_ms]
        for name in ended:
            del self._mirror[name]
        self._banned = {member: end for member, end in self._banned.items() if end > now_ms}
        entries = list(self._mirror.values())
        if self._banned:
            members = [[member, end] for member, end in self._banned.items()]
            entries.append(
                {"key": self.keys.banned, "type": "zset", "value": members, "expire_at": None}
            )
        return entries

    def _tell(self, error: str) -> None:
        """Where and how saving goes, in the store itself, for `fastagi-ctl check`."""
        with contextlib.suppress(redis.RedisError):
            fields = {"path": str(self.path), "error": error}
            if not error:
                fields["saved_at"] = str(int(time.time() * 1000))
            self.client.hset(self.keys.embedded_state, mapping=fields)

    def _watch(self) -> None:
        last_save = last_full = time.monotonic()
        while not self._stop.wait(POLL):
            now = time.monotonic()
            if now - last_save < max(MIN_GAP, GAP_FACTOR * self.last_save_seconds):
                continue
            try:
                changed = self._last_event() != self._saved_event
            except redis.RedisError:
                changed = True  # let save() report it, once
            full = now - last_full >= REFRESH
            if changed or full:
                self.save(full=full)
                last_save = time.monotonic()
                last_full = last_save if full else last_full

    def stop(self) -> None:
        """The last save (a clean stop loses nothing), then release the directory."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.save()
        finally:
            self.file.close()

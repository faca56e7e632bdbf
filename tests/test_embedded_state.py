"""The embedded store on disk (persist.py): bans, history and escalation survive a stop
and start of the embedded Redis, expired entries are dropped, a damaged state file is
set aside in one line and never stops the service, and the state directory is ours
alone (0700, our uid, one service at a time).

A SIGKILLed `serve` with nftables in a namespace: tests/test_restart_netns.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from fastagi.embedded import EmbeddedError, EmbeddedRedis
from fastagi.keys import Keys
from fastagi.persist import STATE_FILE
from fastagi.store import Policy, Store
from tests.procs import Service, ctl

KEYS = Keys()
POLICY = Policy(threshold=3, window=600, ban_time=3600, ban_time_factor=2.0, ban_time_max=86400)


def _embedded(tmp_path: Path) -> EmbeddedRedis:
    embedded = EmbeddedRedis(tmp_path / "run", tmp_path / "state", KEYS)
    embedded.start()
    return embedded


def _store(embedded: EmbeddedRedis) -> Store:
    return Store(embedded.client(), KEYS, POLICY, "pbx-test")


async def _snapshot(store: Store, ips: list[str]) -> dict:
    return {
        "banned": await store.banned(),
        "records": {ip: await store.record(ip) for ip in ips},
        "totals": await store.totals(),
    }


def test_bans_history_and_escalation_survive_a_restart(tmp_path):
    ips = ["198.51.100.1", "198.51.100.2", "2001:db8::7", "198.51.100.3"]

    async def before_stop(store: Store) -> dict:
        for _ in range(3):
            await store.screen("198.51.100.1")  # a threshold ban
        await store.ban("2001:db8::7", 7200, "manual")
        await store.ban("198.51.100.2", None, "threshold")  # banned, lifted, banned again:
        await store.unban(["198.51.100.2"])  # the second ban is escalated
        await store.ban("198.51.100.2", None, "threshold")
        await store.ban("198.51.100.3", 1, "short")  # ends before the restart
        await store.unban(["198.51.100.3"])
        await store.ban("198.51.100.3", 1, "short")
        return await _snapshot(store, ips)

    embedded = _embedded(tmp_path)
    before = asyncio.run(before_stop(_store(embedded)))
    embedded.stop()  # a clean stop: the final save
    time.sleep(1.1)  # the short ban ends while the service is down

    async def after_start(store: Store) -> tuple[dict, float]:
        snapshot = await _snapshot(store, ips)
        snapshot["kept"] = await store.redis.zcard(KEYS.banned)  # pruned on the way in
        await store.unban(["198.51.100.1"])
        return snapshot, await store.ban("198.51.100.1", None, "threshold")

    embedded = _embedded(tmp_path)
    try:
        after, next_until = asyncio.run(after_start(_store(embedded)))
    finally:
        embedded.stop()
    assert before["banned"].keys() == set(ips)
    # the running bans come back with their ends; the one that ended meanwhile does not
    assert after["banned"] == {ip: u for ip, u in before["banned"].items() if ip != "198.51.100.3"}
    assert after["kept"] == 3
    assert after["records"] == before["records"]  # history: reason, pbx, previous bans
    assert after["records"]["198.51.100.2"]["bans"] == "2"
    assert after["records"]["198.51.100.3"]["bans"] == "2"  # its history outlives the ban
    assert after["totals"] == before["totals"]
    # escalation: the next ban of a repeat offender is ban_time * factor
    assert next_until - time.time() == pytest.approx(2 * POLICY.ban_time, abs=5)


def test_a_ban_reaches_the_disk_without_a_stop(tmp_path):
    """What a SIGKILL finds: the file written by the running service, not at stop."""
    embedded = _embedded(tmp_path)
    try:
        until = asyncio.run(_store(embedded).ban("203.0.113.5", 600, "manual"))
        path = tmp_path / "state" / STATE_FILE
        deadline = time.monotonic() + 5  # documented: within about a second
        saved = None
        while time.monotonic() < deadline and saved is None:
            if path.exists():
                document = json.loads(path.read_text())
                for entry in document["keys"]:
                    if entry["key"] == KEYS.banned:
                        saved = dict(entry["value"])
            time.sleep(0.05)
        mode = (path.stat().st_mode & 0o777, (tmp_path / "state").stat().st_mode & 0o777)
    finally:
        embedded.stop()
    assert saved == {"203.0.113.5": int(until * 1000)}
    assert mode == (0o600, 0o700)


def test_a_save_after_a_few_changes_equals_a_full_read(tmp_path, monkeypatch):
    """Saves after the first re-read only the keys the new events name; what they write
    is what reading everything would write."""
    from fastagi import persist

    full_reads = []
    real_dump = persist.dump
    monkeypatch.setattr(persist, "dump", lambda *a: full_reads.append(1) or real_dump(*a))
    embedded = _embedded(tmp_path)
    path = tmp_path / "state" / STATE_FILE

    def saved_through(store: Store) -> list:
        """The file, once it holds every event so far."""
        last = asyncio.run(store.last_event_id())
        deadline = time.monotonic() + 5
        while embedded.persister._saved_event != last and time.monotonic() < deadline:
            time.sleep(0.05)
        return sorted(json.loads(path.read_text())["keys"], key=lambda e: e["key"])

    async def changes(store: Store, first: int) -> None:
        for n in range(first, first + 3):
            for _ in range(3):
                await store.screen(f"198.51.100.{n}")  # threshold bans
        await store.ban("2001:db8::5", 900, "manual")
        await store.unban([f"198.51.100.{first}"])  # a record changed, off the list
        await store.ban(f"198.51.100.{first + 1}", None, "threshold")  # escalated again

    try:
        store = _store(embedded)
        asyncio.run(changes(store, 1))
        saved_through(store)
        reads_after_first = len(full_reads)
        asyncio.run(changes(store, 10))
        incremental = saved_through(store)
        reads_after_second = len(full_reads)
        everything = sorted(real_dump(embedded.persister.client, KEYS), key=lambda e: e["key"])
    finally:
        embedded.stop()
    assert reads_after_first == reads_after_second == 1  # the second save read a few keys
    banned = next(e for e in incremental if e["key"] == KEYS.banned)
    assert len(banned["value"]) == 5  # 6 threshold bans, 2 unbanned, one manual
    for entry in everything:
        if entry["key"] == KEYS.banned:
            entry["value"] = sorted(entry["value"])
    banned["value"] = sorted(banned["value"])
    assert incremental == everything


DAMAGED = {
    "empty": b"",
    "not json": b"\x00\xffgarbage",
    "cut short": b'{"format": "fastagi-screen embedded state", "version": 1, "keys": [{"key"',
    "other format": b'{"format": "something else", "version": 1, "keys": []}',
    "newer version": b'{"format": "fastagi-screen embedded state", "version": 99, "keys": []}',
    "bad value": (
        b'{"format": "fastagi-screen embedded state", "version": 1, '
        b'"keys": [{"key": "fastagi:{screen}:banned", "type": "zset", "value": [["x", "y"]]}]}'
    ),
    "bad expiry": (
        b'{"format": "fastagi-screen embedded state", "version": 1, "keys": '
        b'[{"key": "k", "type": "hash", "value": {"a": "b"}, "expire_at": "soon"}]}'
    ),
    "not an object": b"[1, 2, 3]",
    "unknown type": (
        b'{"format": "fastagi-screen embedded state", "version": 1, '
        b'"keys": [{"key": "k", "type": "string", "value": "v"}]}'
    ),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_state_file_is_set_aside_in_one_line(tmp_path, caplog, damage):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / STATE_FILE).write_bytes(DAMAGED[damage])
    caplog.set_level(logging.INFO, logger="fastagi.persist")
    embedded = _embedded(tmp_path)
    try:
        store = _store(embedded)
        empty = asyncio.run(store.banned())
        asyncio.run(store.ban("203.0.113.6", 600, "manual"))
    finally:
        embedded.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "damaged" in message and "starting with no bans" in message
    assert "\n" not in message
    assert empty == {}
    assert (state / (STATE_FILE + ".bad")).read_bytes() == DAMAGED[damage]
    # and the service saves a good file again
    document = json.loads((state / STATE_FILE).read_text())
    assert any(entry["key"] == KEYS.banned for entry in document["keys"])


def test_a_state_file_that_cannot_be_read_is_set_aside(tmp_path, caplog):
    (tmp_path / "state" / STATE_FILE).mkdir(parents=True)  # a directory in its place
    embedded = _embedded(tmp_path)
    try:
        empty = asyncio.run(_store(embedded).banned())
    finally:
        embedded.stop()
    assert empty == {}
    assert (tmp_path / "state" / (STATE_FILE + ".bad")).is_dir()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"embedded store: state file {tmp_path / 'state' / STATE_FILE} is damaged (Is a "
        f"directory); kept as {tmp_path / 'state' / (STATE_FILE + '.bad')}; starting with no bans"
    ]
    assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["keys"] == []


def test_a_failing_save_is_reported_once_and_retried(tmp_path, caplog):
    """A save that cannot write (here: a directory where the temporary file goes, as
    a full disk would fail it) is one error line, however many bans follow; the next
    change after the cause is gone is saved, and said so."""
    state = tmp_path / "state"
    embedded = _embedded(tmp_path)
    try:
        store = _store(embedded)
        (state / (STATE_FILE + ".tmp")).mkdir()
        for n in range(5):
            asyncio.run(store.ban(f"203.0.113.{n}", 600, "manual"))
            time.sleep(0.3)  # a save attempt each
        failed_saves = embedded.persister.saves
        (state / (STATE_FILE + ".tmp")).rmdir()
        asyncio.run(store.ban("203.0.113.99", 600, "manual"))
        deadline = time.monotonic() + 5
        while embedded.persister.saves == failed_saves and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        embedded.stop()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2, messages
    assert "cannot save" in messages[0] and "will not survive a restart" in messages[0]
    assert "works again" in messages[1]
    saved = json.loads((state / STATE_FILE).read_text())["keys"]
    banned = next(entry["value"] for entry in saved if entry["key"] == KEYS.banned)
    assert {member for member, _ in banned} == {f"203.0.113.{n}" for n in (0, 1, 2, 3, 4, 99)}


def test_the_state_directory_is_ours_alone(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    first = _embedded(tmp_path)
    try:
        assert state.stat().st_mode & 0o777 == 0o700  # tightened
        second = EmbeddedRedis(tmp_path / "run2", state, KEYS)
        with pytest.raises(EmbeddedError, match="another embedded service uses the state"):
            second.start()
    finally:
        first.stop()
    if os.geteuid() != 0:
        return
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(EmbeddedError, match="belongs to uid 65534"):
        EmbeddedRedis(tmp_path / "run3", other, KEYS).start()


def test_check_says_where_the_running_service_saves_and_whether_it_works(tmp_path):
    state = tmp_path / "state"
    path = state / STATE_FILE
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_SERVER_STATE_DIR": str(state),
    }

    def check_until(wanted: str) -> list[str]:
        """`check`'s store lines, asked again until one starts with `wanted` (a save
        comes within 0.3 s of a ban; 10 s for a loaded machine)."""
        deadline = time.monotonic() + 10
        while True:
            lines = [line for line in ctl("check", env=env).stdout.splitlines() if "store" in line]
            if any(line.startswith(wanted) for line in lines) or time.monotonic() > deadline:
                return lines

    with Service(env, log=tmp_path / "serve.log"):
        fresh = check_until(f"ok   store: bans saved in {path} (nothing")
        assert ctl("ban", "203.0.113.7", env=env).returncode == 0
        saved = check_until(f"ok   store: bans saved in {path} (0s ago)")
        (state / (STATE_FILE + ".tmp")).mkdir()
        assert ctl("ban", "203.0.113.8", env=env).returncode == 0
        failing = check_until("warn store: cannot save")
        (state / (STATE_FILE + ".tmp")).rmdir()
    assert f"ok   store: bans saved in {path} (nothing to save yet)" in fresh, fresh
    assert any(line.startswith(f"ok   store: bans saved in {path} (") for line in saved), saved
    assert f"warn store: cannot save {path} (Is a directory): bans will not survive a restart" in (
        failing
    ), failing


def test_where_the_state_lives(monkeypatch, tmp_path):
    """server.state_dir, else systemd's $STATE_DIRECTORY, else /var/lib/fastagi for
    root, else $XDG_STATE_HOME/fastagi, else ~/.local/state/fastagi."""
    from fastagi import config as configuration

    def where(**environ: str) -> Path:
        return configuration.load(None, {**environ}).state_dir()

    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/fastagi-unit:/var/lib/other")
    assert where(FASTAGI_SERVER_STATE_DIR="/srv/bans") == Path("/srv/bans")
    assert where() == Path("/var/lib/fastagi-unit")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert where() == Path("/var/lib/fastagi")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert where() == tmp_path / ".local" / "state" / "fastagi"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert where() == tmp_path / "xdg" / "fastagi"


def test_holds_survive_a_restart(tmp_path):
    """A fail2ban jail's hold under an admin's longer one: after a restart the jail's
    unban still lifts only its own hold, and the admin's ban stays."""

    async def before_stop(store: Store) -> None:
        await store.ban("198.51.100.8", 7 * 86400, "manual")
        await store.ban("198.51.100.8", 60, "f2b-asterisk", hold="f2b-asterisk")

    embedded = _embedded(tmp_path)
    asyncio.run(before_stop(_store(embedded)))
    embedded.stop()

    async def after_start(store: Store) -> tuple[list[str], list[str], dict]:
        sources = [hold.source for hold in await store.holds("198.51.100.8")]
        lifted = await store.unban(["198.51.100.8"], "f2b-asterisk")
        return sources, lifted, await store.banned()

    embedded = _embedded(tmp_path)
    try:
        sources, lifted, banned = asyncio.run(after_start(_store(embedded)))
    finally:
        embedded.stop()
    assert sorted(sources) == ["admin", "f2b-asterisk"]
    assert lifted == [] and banned["198.51.100.8"] > time.time() + 6 * 86400


def test_a_bulk_feed_import_is_saved_like_single_bans(tmp_path):
    """A blocklist of more than FEED_EVENTS_MAX entries sends one `sync` event naming no
    address: the save after it reads everything instead of missing the feed's holds."""
    from fastagi.store import FEED_EVENTS_MAX

    targets = [f"10.1.{n >> 8}.{n & 255}" for n in range(FEED_EVENTS_MAX + 1)]

    async def write(store: Store) -> None:
        await store.ban("198.51.100.1", 600, "manual")
        embedded.persister.save(full=True)  # the file as of this ban
        await store.sync_clock()
        await store.feed_holds(targets, "feed:x", "feed:x", store.now() + 600, pipelined=False)
        embedded.persister.save(full=False)  # what the thread does after new events

    embedded = _embedded(tmp_path)
    try:
        asyncio.run(write(_store(embedded)))
        saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    finally:
        embedded.stop()
    banned = next(entry for entry in saved["keys"] if entry["key"] == KEYS.banned)
    assert len(banned["value"]) == len(targets) + 1

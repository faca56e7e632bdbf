"""Blocklists in (issue 18, must show 2, without namespaces; the firewall side with real
packets is tests/test_feeds_netns.py): feeds served by a local HTTP server (APIBan's JSON
with its paging, text lists), imported with `fastagi-ctl import` and refreshed by the
service's FeedRunner into a real Redis: feed:<name> holds, protected entries refused and
counted, junk counted in one summary line, a failing feed keeping its last list until its
holds end, an address the feed drops released, a big list as one batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.emulator import Call
from fastagi.feeds import FeedRunner, FeedSpec, read_plain
from fastagi.metrics import Metrics
from fastagi.service import make_store
from fastagi.store import FEED_EVENTS_MAX, redis_client
from tests.feed_server import FeedServer
from tests.harness import running_server, settings, wait_until
from tests.procs import Service, ctl
from tests.recording_firewall import RecordingFirewall
from tests.test_cluster_netns import wait_for

LIST = [
    "# VoIPBL-style list",
    "; another comment",
    "",
    "198.51.100.1",
    "198.51.100.2   # inline note",
    "198.51.100.3,scanner",
    "203.0.113.0/24",
    "203.0.113.77/24",  # host bits set: the /24 again, a duplicate
    "::ffff:198.51.100.4",  # IPv4-mapped: 198.51.100.4
    "2001:db8:5::/48",
    "10.0.0.0/8",  # wider than /16: refused
    "not an address",
    "999.1.2.3",
    "198.51.100.1",  # duplicate
]
# what LIST holds, in its order
HELD = [
    "198.51.100.1",
    "198.51.100.2",
    "198.51.100.3",
    "203.0.113.0/24",
    "198.51.100.4",
    "2001:db8:5::/48",
]


@pytest.fixture
def feeds():
    server = FeedServer()
    yield server
    server.close()


def test_a_text_list_is_read_with_comments_blanks_and_junk_counted():
    parsed = read_plain("\n".join(LIST))
    assert list(parsed.targets) == HELD
    assert dict(parsed.skipped) == {
        "comment": 2,
        "blank": 1,
        "duplicate": 2,
        "too wide": 1,
        "junk": 2,
    }
    assert parsed.summary() == "1 blank, 2 comment, 2 duplicate, 2 junk, 1 too wide"


BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what splitlines() splits on
LINE = st.one_of(
    st.ip_addresses().map(str),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.integers(0, 40)),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 140)),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=BREAKS), max_size=30),
    st.sampled_from(["", "# x", "; y", "1.2.3.4 # z", "1.2.3.4,w", "::ffff:1.2.3.4"]),
)


@given(st.lists(LINE, max_size=30))
def test_every_line_of_any_list_is_held_or_counted_never_a_crash(lines):
    text = "\n".join(lines)
    parsed = read_plain(text)
    assert len(parsed.targets) + sum(parsed.skipped.values()) == len(text.splitlines())
    for held in parsed.targets:  # canonical, and never wider than the project allows
        assert read_plain(held).targets.keys() == {held}


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    return {"FASTAGI_REDIS_URL": redis_url, "FASTAGI_SCREENING_PBX_ID": "pbx-test", **extra}


def test_import_of_a_plain_list_holds_each_entry_and_refuses_protected_ones(
    redis_url, feeds, tmp_path
):
    feeds.text("/voipbl.txt", [*LIST, "127.0.0.1", "192.0.2.99", "198.51.100.200"])
    env = _env(redis_url, FASTAGI_SCREENING_PROTECT='["192.0.2.99"]')
    done = ctl("import", feeds.url("/voipbl.txt"), "--name", "voipbl", "--for", "1h", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("feed voipbl: 7 entries held until")
    assert "7 new bans" in lines[0] and "2 junk" in lines[0] and "2 protected" in lines[0]
    assert "first: " in lines[0] and "'not an address'" in lines[0]
    status = json.loads(ctl("status", "--json", env=env).stdout)
    banned = {ban["ip"]: ban for ban in status["banned"]["list"]}
    assert set(banned) == {*HELD, "198.51.100.200"}
    assert {ban["reason"] for ban in banned.values()} == {"feed:voipbl"}
    assert all(3590 < ban["until"] - time.time() <= 3600 for ban in banned.values())
    assert status["feeds"]["voipbl"]["entries"] == 7
    one = json.loads(ctl("status", "198.51.100.2", "--json", env=env).stdout)
    assert [hold["source"] for hold in one["holds"]] == ["feed:voipbl"]
    # the feed's own hold is lifted by its name, as any source's
    lifted = ctl("unban", "198.51.100.2", "--hold", "feed:voipbl", env=env)
    assert lifted.returncode == 0 and "unbanned" in lifted.stdout
    # a file works the same; a missing one is one line, exit 1
    path = tmp_path / "list.txt"
    path.write_text("198.51.100.9\n")
    assert ctl("import", str(path), env=env).returncode == 0
    missing = ctl("import", str(tmp_path / "nope.txt"), env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "cannot read" in missing.stderr


def test_apiban_pages_are_followed_and_the_key_is_never_shown(redis_url, feeds):
    path = "/api/SECRETKEY123/banned"
    feeds.apiban(path, [["198.51.100.11", "198.51.100.12"], ["198.51.100.13"], ["2001:db8::13"]])
    env = _env(redis_url)
    done = ctl("import", feeds.url(path), "--name", "apiban", env=env)
    assert done.returncode == 0, done.stderr
    assert "feed apiban: 4 entries" in done.stdout and "SECRETKEY" not in done.stdout
    assert feeds.hits == {path: 1, f"{path}/1000": 1, f"{path}/1001": 1, f"{path}/1002": 1}
    status = json.loads(ctl("status", "--json", env=env).stdout)
    assert {ban["ip"] for ban in status["banned"]["list"]} == {
        "198.51.100.11",
        "198.51.100.12",
        "198.51.100.13",
        "2001:db8::13",
    }
    feeds.pages[path] = (401, b'{"error": "unauthorized"}')
    refused = ctl("import", feeds.url(path), "--name", "apiban", env=env)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert "SECRETKEY" not in refused.stderr


class CountingFirewall(RecordingFirewall):
    """Records every call the agent makes, with how many bans it carried."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def add(self, bans) -> None:
        self.calls.append(("add", len(bans)))
        super().add(bans)

    def set(self, bans) -> None:
        self.calls.append(("set", len(bans)))
        self.bans = {}
        RecordingFirewall.add(self, bans)  # not our add(): one call, not two


def test_a_big_list_is_one_batch_for_the_store_and_one_for_the_firewall(redis_url, feeds):
    count = FEED_EVENTS_MAX * 5
    feeds.text("/big.txt", [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(count)])

    async def main():
        config = settings(redis_url)
        store = make_store(config, redis_client(config.redis, caller_deadlines=True))
        firewall = CountingFirewall()
        agent = Agent(store, firewall, 30, AddressSet([]), block_ms=100)
        task = asyncio.create_task(agent.run())
        await wait_until(lambda: agent.full_reconciles == 1)
        before = await store.last_event_id()
        firewall.calls.clear()
        runner = FeedRunner(store, store.protected, [], embedded=False)
        ok = await runner.refresh(FeedSpec("big", url=feeds.url("/big.txt"), refresh=3600))
        landed = await wait_until(lambda: len(firewall.bans) == count, timeout=30)
        events = await store.events_after(before)
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        return ok, landed, firewall.calls, events

    ok, landed, calls, events = asyncio.run(main())
    assert ok and landed
    assert [fields["op"] for _, fields in events] == ["sync"]  # not 5,000 ban events
    assert calls == [("add", count)]  # one firewall transaction, of just the batch


def test_a_ban_lifted_while_a_big_list_is_written_stays_lifted(redis_url):
    """An unban between a target's chunk and the write's `sync` event is newer than the
    batch: the agent reads that target again and leaves it lifted, still without
    reading the whole list."""
    targets = [f"10.78.{n >> 8}.{n & 255}" for n in range(FEED_EVENTS_MAX + 1)]
    lifted = targets[0]

    async def main():
        config = settings(redis_url)
        writer, reader = (
            make_store(config, redis_client(config.redis, caller_deadlines=True)) for _ in "ab"
        )
        firewall = RecordingFirewall()
        agent = Agent(reader, firewall, 30, AddressSet([]), block_ms=50)
        await agent.step()  # its start: the whole list, then events
        xadd = writer.redis.xadd

        async def unban_first(*args, **kwargs):  # the write's `sync` event: an admin was faster
            await writer.unban([lifted])
            return await xadd(*args, **kwargs)

        writer.redis.xadd = unban_first
        await writer.sync_clock()
        await writer.feed_holds(targets, "feed:x", "feed:x", writer.now() + 600)
        await agent.step()  # the unban event, then the sync event
        listed = await writer.banned()
        await writer.close()
        await reader.close()
        return {str(t.network_address) for t in firewall.bans}, listed, agent.full_reconciles

    applied, listed, full = asyncio.run(main())
    assert lifted not in listed and lifted not in applied
    assert applied == set(targets[1:]) == set(listed)
    assert full == 1


def test_a_failing_feed_keeps_its_list_and_a_dropped_address_is_released(redis_url, feeds, caplog):
    feeds.text("/drops.txt", ["198.51.100.21", "198.51.100.22"])
    feeds.text("/fails.txt", ["198.51.100.31"])
    drops = FeedSpec("drops", url=feeds.url("/drops.txt"), refresh=2.0, timeout=1.0)
    fails = FeedSpec("fails", url=feeds.url("/fails.txt"), refresh=2.0, timeout=1.0)

    async def main():
        config = settings(redis_url)
        store = make_store(config, redis_client(config.redis, caller_deadlines=True))
        runner = FeedRunner(store, store.protected, [], embedded=False, observer=metrics)
        first = [await runner.refresh(drops), await runner.refresh(fails)]
        await asyncio.sleep(1.5)
        feeds.text("/drops.txt", ["198.51.100.21"])  # the feed drops .22
        feeds.pages["/fails.txt"] = (500, b"oops")
        for spec in (drops, fails):  # a new period: the cluster lock has expired by now
            await store.feed_release(spec.name)
        second = [await runner.refresh(drops), await runner.refresh(fails)]
        await store.feed_release("fails")
        third = await runner.refresh(fails)  # still failing: no second warning
        right_after = set(await store.banned())
        released = await _wait_gone(store, {"198.51.100.22", "198.51.100.31"}, 6)
        later = set(await store.banned())
        states = await store.feed_states()
        await store.close()
        return first, second, third, right_after, released, later, states

    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="fastagi.feeds"):
        first, second, third, right_after, released, later, states = asyncio.run(main())
    exposition = generate_latest(metrics.registry).decode()
    assert 'fastagi_feed_entries{feed="drops"} 1.0' in exposition  # its last good refresh
    assert 'fastagi_feed_failures_total{feed="fails"} 2.0' in exposition
    assert first == [True, True] and second == [True, False] and third is False
    # the failing feed's last good list is still held, the dropped address too (for now)
    assert right_after == {"198.51.100.21", "198.51.100.22", "198.51.100.31"}
    assert released  # both held until one refresh after their last listing, then released
    assert later == {"198.51.100.21"}  # still listed: held on
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "feed fails" in warnings[0] and "HTTP 500" in warnings[0]
    assert states["fails"]["error"] == "HTTP 500"


async def _wait_gone(store, targets: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not targets & set(await store.banned()):
            return True
        await asyncio.sleep(0.1)
    return False


def test_the_embedded_service_refreshes_feeds_and_takes_imports(feeds, tmp_path):
    feeds.apiban("/api/K/banned", [["198.51.100.71"], ["198.51.100.72"]])
    entry = f'{{ name = "apiban", url = "{feeds.url("/api/K/banned")}", refresh = "1h" }}'
    env = {
        "FASTAGI_SERVER_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_INTEL_FEED": f"[{entry}]",
    }
    (tmp_path / "list.txt").write_text("# mine\n198.51.100.73\n203.0.113.0/24\n")
    with Service(env):
        listed = wait_for(
            lambda: len(json.loads(ctl("status", "--json", env=env).stdout)["banned"]["list"]) == 2,
            10,
        )
        done = ctl("import", str(tmp_path / "list.txt"), "--name", "mine", env=env)
        status = json.loads(ctl("status", "--json", env=env).stdout)
        check = ctl("check", env=env).stdout
        shown = ctl("status", env=env).stdout
    assert listed
    assert "|- Blocklists: 2" in shown and "|  |- apiban: 2 entries, held until" in shown
    assert re.search(r"198\.51\.100\.73 until .*feed:mine", shown), shown
    line = f"ok   feeds: apiban (http://127.0.0.1:{feeds.port}/..., every 3600s): 2 entries"
    assert line in check, check
    assert done.returncode == 0 and "feed mine: 2 entries" in done.stdout, done.stderr
    reasons = {ban["ip"]: ban["reason"] for ban in status["banned"]["list"]}
    assert reasons == {
        "198.51.100.71": "feed:apiban",
        "198.51.100.72": "feed:apiban",
        "198.51.100.73": "feed:mine",
        "203.0.113.0/24": "feed:mine",
    }
    assert status["feeds"]["apiban"]["entries"] == 2 and status["feeds"]["mine"]["entries"] == 2


def test_calls_are_answered_while_a_big_list_is_written(redis_url, feeds):
    count = 20_000
    feeds.text("/big.txt", [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(count)])

    async def main():
        async with running_server(redis_url) as running:
            runner = FeedRunner(running.store, running.store.protected, [], embedded=False)
            spec = FeedSpec("big", url=feeds.url("/big.txt"), refresh=3600)
            importing = asyncio.create_task(runner.refresh(spec))
            answered = []
            while not importing.done():
                result = await running.call(Call(source="198.51.100.99"))
                answered.append((result.variables["SCREEN_RESULT"], importing.done()))
            return await importing, answered, len(await running.store.banned())

    ok, answered, banned = asyncio.run(main())
    assert ok and banned == count + 1  # the list, and the caller (threshold 5)
    during = [result for result, import_done in answered if not import_done]
    assert len(during) >= 5, answered  # the FastAGI path went on meanwhile
    assert set(during) <= {"COUNTED", "BANNED"}, answered

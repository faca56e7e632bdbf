"""What other hosts write into Redis cannot stop the agent: every event and ban-list
entry is checked; a bad one is logged once and skipped, every valid ban still applied.

Entries are written by hand (XADD / ZADD on the key names of keys.py) to a real
redis-server, as a buggy or hostile host would write them."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastagi.addresses import AddressError, AddressSet, parse_target
from fastagi.agent import Agent
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.store import Policy, Store, redis_client
from tests.harness import firewall_ips, wait_until
from tests.harness import settings as config_for

KEYS = Keys()
IGNORE = AddressSet.parse(["192.0.2.0/24"])
SYNC = 0.05  # sync_interval: many periodic checks within a short test


class Lines(logging.Handler):
    """The agent's log lines of one run (caplog is per test, hypothesis runs many)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.levels.append(record.levelno)

    def count(self, text: str, level: int = logging.DEBUG) -> int:
        return sum(
            text in line and at >= level for line, at in zip(self.lines, self.levels, strict=True)
        )


@dataclass
class Scenario:
    """What was written: the bans that must be applied, and for each bad entry the text
    its one log line must contain."""

    valid: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)


# -- entries ---------------------------------------------------------------------------

BAD_NUMBERS = [
    "17e11", "1.7e12", "nan", "NaN", "inf", "-inf", "-5", "0", "", " 1800000000000",
    "1800000000000 ", "0x1A", "9" * 40, "1_800_000_000_000", "\u0661\u0662\u0663", "1e309",
    "253402300800000", "99999999999999999",  # after the year 9999
]  # fmt: skip
BAD_ADDRESSES = [
    "", "999.1.1.1", "198.51.100.1/99", "fe80::1%eth0", "not-an-ip", "1.2.3.4:99999",
    "\u202e1.2.3.4", "198.51.100.1\n200 result=1", "\x00", "\U0001f4a3", "x" * 5000,
]  # fmt: skip


def _not_an_address(text: str) -> bool:
    try:
        parse_target(text)
    except AddressError:
        return True
    return False


text = st.text(max_size=300)
bad_number = st.sampled_from(BAD_NUMBERS) | text.filter(lambda t: not t.isdigit())
bad_address = st.sampled_from(BAD_ADDRESSES) | text.filter(_not_an_address)


@st.composite
def bad_event(draw: st.DrawFn) -> dict[str, str]:
    """An event lua.py would never write: a defect in the op, the ip or the until."""
    fields = {"op": "ban", "ip": f"203.0.113.{draw(st.integers(1, 254))}", "until": "0"}
    fields["until"] = draw(bad_number)
    defect = draw(st.sampled_from(["until", "ip", "op", "no-ip", "no-until", "no-op"]))
    if defect == "ip":
        fields["ip"] = draw(bad_address)
    elif defect == "op":
        fields["op"] = draw(text.filter(lambda t: t not in ("ban", "unban")))
    elif defect.startswith("no-"):
        del fields[defect[3:]]
    if defect in ("ip", "op", "no-ip", "no-op"):
        fields["until"] = draw(st.sampled_from(["1800000000000", *BAD_NUMBERS]))
    fields["pbx_id"] = "elsewhere"  # a stream entry needs a field; a real one has it too
    return fields


@st.composite
def bad_list_entry(draw: st.DrawFn, n: int, end_ms: int) -> tuple[str, float]:
    """(member, score): not an address, or an end that is no time (infinite, huge,
    after the year 9999)."""
    if draw(st.booleans()):
        return f"bad{n}~{draw(bad_address)}", end_ms
    return f"203.0.113.{n}", draw(st.sampled_from([float("inf"), 1e300, 1e16, 2.6e14]))


item = st.one_of(
    # a valid ban is on the list, with its event or without (trimmed away)
    st.tuples(st.just("valid"), st.sampled_from(["list", "both"])),
    st.tuples(st.just("ignored"), st.just("both")),
    st.tuples(st.just("bad-event"), bad_event()),
    st.tuples(st.just("bad-entry"), st.none()),
)


def write(client: redis.Redis, items: list, start: int, scenario: Scenario, data) -> None:
    """Write each item as another host would, by hand. Events written before the agent
    starts (start 1) are never read: it starts from the list."""
    seconds, _micros = client.time()
    end_ms = str((int(seconds) + 600) * 1000)
    for n, (kind, detail) in enumerate(items, start):
        if kind in ("valid", "ignored"):
            ip = f"198.51.100.{n}" if kind == "valid" else f"192.0.2.{n}"
            if n % 3 == 0 and kind == "valid":
                ip = f"2001:db8:1::{n:x}"
            if detail in ("list", "both"):
                client.zadd(KEYS.banned, {ip: int(end_ms)})
            if detail == "both":
                client.xadd(KEYS.events, {"op": "ban", "ip": ip, "until": end_ms})
            if kind == "valid":
                scenario.valid.add(ip)
            else:
                scenario.bad.append(f"{ip} until")  # as a list entry or in an event
        elif kind == "bad-event":
            event_id = client.xadd(KEYS.events, detail).decode()
            if start > 1:
                scenario.bad.append(f"{event_id} ")
        else:
            member, score = data.draw(bad_list_entry(n, int(end_ms)))
            client.zadd(KEYS.banned, {member: score})
            shown = repr(member[:40])[1:-1] if member.startswith("bad") else f"'{member} until"
            scenario.bad.append(shown)


def _store(url: str) -> Store:
    return Store(
        redis_client(config_for(url).redis), KEYS, Policy(3, 600, 3600, 2, 86400), "pbx-in"
    )


async def _scenario(url: str, before: list, after: list, data) -> tuple:
    client = redis.Redis.from_url(url)
    client.flushall()
    scenario = Scenario()
    write(client, before, 1, scenario, data)
    lines = Lines()
    logging.getLogger("fastagi.agent").addHandler(lines)
    store, firewall = _store(url), DryRunFirewall()
    agent = Agent(store, firewall, SYNC, IGNORE, block_ms=20)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.full_reconciles >= 1)
        write(client, after, 100, scenario, data)
        applied = await wait_until(lambda: firewall_ips(firewall) == scenario.valid, timeout=5)
        # several periodic checks later, nothing is logged again
        checks = agent._syncs_since_full + 4
        await wait_until(lambda: agent._syncs_since_full >= checks, timeout=5)
        return scenario, applied, firewall_ips(firewall), task.done(), lines
    finally:
        logging.getLogger("fastagi.agent").removeHandler(lines)
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        client.close()


@settings(
    max_examples=25,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a failure shows as drawn
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(before=st.lists(item, max_size=12), after=st.lists(item, max_size=12), data=st.data())
def test_bad_events_and_entries_are_skipped_once_and_every_valid_ban_applied(
    redis_url, before, after, data
):
    scenario, applied, held, died, lines = asyncio.run(_scenario(redis_url, before, after, data))
    assert not died, "the agent task ended"
    assert applied, f"valid bans missing: {scenario.valid - held}; extra: {held - scenario.valid}"
    for marker in scenario.bad:
        assert lines.count(marker) == 1, (marker, [x for x in lines.lines if marker in x])
    assert not [x for x in lines.lines if "behind our back" in x]


def test_the_reported_event_is_logged_escaped_and_counted(redis_url):
    """The event of issue 13 (`until 17e11`): one line with its text, one count, and
    the ban after it still applied."""
    from fastagi import metrics as service_metrics
    from tests.harness import free_port
    from tests.test_metrics import scrape, value

    async def main():
        client = redis.Redis.from_url(redis_url)
        metrics = service_metrics.Metrics()
        await metrics.serve("127.0.0.1", port := free_port())
        lines = Lines()
        logging.getLogger("fastagi.agent").addHandler(lines)
        store, firewall = _store(redis_url), DryRunFirewall()
        agent = Agent(store, firewall, SYNC, IGNORE, block_ms=20)
        try:
            await agent.step()
            client.xadd(KEYS.events, {"op": "ban", "ip": "198.51.100.51", "until": "17e11"})
            client.xadd(KEYS.events, {"op": "ban", "ip": "198.51.100.52\n\x1b[2J" + "x" * 500})
            await store.ban("198.51.100.53", 600, "after")
            for _ in range(3):
                await agent.step()
            return lines.lines, firewall_ips(firewall), await asyncio.to_thread(scrape, port)
        finally:
            logging.getLogger("fastagi.agent").removeHandler(lines)
            metrics.close()
            await store.close()

    logged, held, samples = asyncio.run(main())
    skipped = [line for line in logged if "skipped event" in line]
    assert len(skipped) == 2
    assert "op=ban ip=198.51.100.51 until=17e11" in skipped[0]
    assert "until is not whole milliseconds" in skipped[0]
    assert "\n" not in skipped[1] and "\x1b" not in skipped[1] and "\\n\\x1b[2J" in skipped[1]
    assert len(skipped[1]) < 300  # cut, not 500 x's
    assert held == {"198.51.100.53"}
    assert (
        value(samples, "fastagi_agent_entries_skipped_total", pbx_id="pbx-in", reason="malformed")
        == 2
    )


def test_filtered_entries_do_not_make_every_sync_reread_or_warn(redis_url):
    """An ignored and a malformed entry on the list: logged once each; later periodic
    checks find the count matching (no list re-read), and the dry-run backend is not
    "changed behind our back" at every sync nor announces its chain again."""

    async def main():
        client = redis.Redis.from_url(redis_url)
        end = (int(client.time()[0]) + 600) * 1000
        client.zadd(KEYS.banned, {"192.0.2.7": end, "bad\u2028entry": end, "198.51.100.8": end})
        lines = Lines()
        agent_log = logging.getLogger("fastagi")  # the agent's and the firewall's lines
        agent_log.addHandler(lines)
        level = agent_log.level
        agent_log.setLevel(logging.DEBUG)
        store, firewall = _store(redis_url), DryRunFirewall()
        agent = Agent(store, firewall, SYNC, IGNORE, block_ms=20)
        task = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: agent._syncs_since_full >= 8, timeout=5)
            return lines, agent._syncs_since_full, firewall_ips(firewall)
        finally:
            agent_log.removeHandler(lines)
            agent_log.setLevel(level)
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    lines, syncs, held = asyncio.run(main())
    assert syncs >= 8 and held == {"198.51.100.8"}
    assert lines.count("skipped ban-list entry '192.0.2.7") == 1
    assert lines.count("skipped ban-list entry 'bad\\u2028entry") == 1
    assert lines.count("reconciled (full)") == 1
    assert lines.count("reconciled (difference)") == 0  # the count matched every time
    assert lines.count("behind our back") == 0
    assert lines.count("would create chain", logging.INFO) == 1  # said once, not every sync

"""An agent never dies in silence: `serve` restarts a crashed agent task (one ERROR
line, a metric), and `status` and /metrics flag an agent whose heartbeat is stale."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import redis

from fastagi import metrics as service_metrics
from fastagi import service
from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.keys import Keys
from fastagi.status import gather_status, render_status
from fastagi.store import Policy, Store, redis_client
from tests.harness import firewall_ips, free_port, settings, wait_until
from tests.procs import ctl
from tests.recording_firewall import RecordingFirewall
from tests.test_metrics import scrape, value


def _store(url: str, pbx: str) -> Store:
    return Store(redis_client(settings(url).redis), Keys(), Policy(3, 600, 3600, 2, 86400), pbx)


def test_a_crashed_agent_is_restarted_loudly_and_counted(redis_url, caplog, monkeypatch):
    monkeypatch.setattr(service, "RESTART_MAX", 0.2)

    async def main():
        metrics = service_metrics.Metrics()
        await metrics.serve("127.0.0.1", port := free_port())
        store, firewall = _store(redis_url, "pbx-crash"), RecordingFirewall()
        agent = Agent(store, firewall, 30, AddressSet.parse([]), block_ms=20)
        task = asyncio.create_task(service.supervised(agent, first=0.05))
        try:
            await wait_until(lambda: agent.full_reconciles >= 1)
            # a bug in the firewall path: the same error four times, then it works
            firewall.failures = [ValueError("could not convert string to float: '17e11x'")] * 4
            await store.ban("198.51.100.61", 600, "while broken")
            applied = await wait_until(
                lambda: "198.51.100.61" in firewall_ips(firewall), timeout=10
            )
            return applied, task.done(), await asyncio.to_thread(scrape, port)
        finally:
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            metrics.close()
            await store.close()

    with caplog.at_level(logging.INFO, logger="fastagi"):
        applied, ended, samples = asyncio.run(main())
    died = [r for r in caplog.records if "agent died" in r.getMessage()]
    assert applied and not ended
    assert [r.levelno for r in died] == [logging.ERROR] * 4
    assert all(r.exc_info is None for r in died)  # the cause, not a traceback
    assert "ValueError: could not convert string to float: '17e11x'" in died[0].getMessage()
    # the backoff doubles up to its cap
    assert [m.getMessage().rsplit(" in ", 1)[1] for m in died] == ["0.05s", "0.1s", "0.2s", "0.2s"]
    assert value(samples, "fastagi_agent_restarts_total", pbx_id="pbx-crash") == 4


def test_status_and_metrics_flag_a_stale_agent(redis_url):
    """A live agent next to one whose last heartbeat is a minute old (a dead PBX's)."""
    client = redis.Redis.from_url(redis_url)
    seconds, _ = client.time()
    dead = {"backend": "iptables", "applied": 7, "time": seconds - 60, "interval": 5.0}
    client.hset(Keys().agents, "pbx-dead", json.dumps({**dead, "pbx_id": "pbx-dead"}))

    async def main():
        store = _store(redis_url, "pbx-live")
        agent = Agent(store, RecordingFirewall(), 30, AddressSet.parse([]), block_ms=20)
        metrics = service_metrics.Metrics(store)
        await metrics.serve("127.0.0.1", port := free_port())
        try:
            await agent.step()
            status = await gather_status(store, settings(redis_url))
            return status, await asyncio.to_thread(scrape, port)
        finally:
            metrics.close()
            await store.close()

    status, samples = asyncio.run(main())
    agents = {a["pbx_id"]: a for a in status["agents"]}
    assert agents["pbx-dead"]["stale"] and not agents["pbx-live"]["stale"]
    assert 59 <= agents["pbx-dead"]["heartbeat_age"] < 70
    text = render_status(status)
    assert re.search(r"pbx-dead: last heartbeat 6\ds ago, 7 bans applied \(iptables\) STALE", text)
    assert "STALE" not in next(line for line in text.splitlines() if "pbx-live" in line)
    assert value(samples, "fastagi_agent_stale", pbx_id="pbx-dead") == 1
    assert value(samples, "fastagi_agent_stale", pbx_id="pbx-live") == 0
    assert value(samples, "fastagi_agent_heartbeat_age_seconds", pbx_id="pbx-dead") >= 59
    # the command an admin runs says the same
    shown = ctl("status", env={"FASTAGI_REDIS_URL": redis_url})
    assert shown.returncode == 0, shown.stderr
    assert "pbx-dead: last heartbeat" in shown.stdout and "STALE" in shown.stdout
    as_json = json.loads(ctl("status", "--json", env={"FASTAGI_REDIS_URL": redis_url}).stdout)
    assert [a["stale"] for a in as_json["agents"]] == [True, False]

"""The status page at `/` of the [metrics] listener (web.py), in process: what it shows,
that hostile values stay text, that no secret is on it, and that a dead store gives a
page saying so. The real process in a real browser: tests/test_page_browser.py."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from html.parser import HTMLParser

import fakeredis
import fakeredis.aioredis
import pytest

from fastagi import metrics as service_metrics
from fastagi import web
from fastagi.config import ConfigError
from fastagi.keys import Keys
from fastagi.service import make_service_store, make_store
from fastagi.store import Policy, Store
from fastagi.web import status_page
from tests.harness import free_port, settings

HOSTILE_REASON = "</td><script>alert(1)</script>"
HOSTILE_HOLD = '<img src=x onerror="alert(2)">'
HOSTILE_PBX = "<b>evil</b>\x1b[2J"


class Parsed(HTMLParser):
    """The tags and the text of a page, as a browser would split them."""

    def __init__(self, body: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.feed(body)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _get(port: int, path: str = "/") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


async def _served(store: Store, config) -> tuple[service_metrics.Metrics, int]:
    metrics = service_metrics.Metrics(store)
    port = free_port()
    await metrics.serve("127.0.0.1", port, pages={"/": status_page(store, config)})
    return metrics, port


def test_bans_per_hour_count_each_new_ban_and_forget_hours_past_two_days():
    async def main():
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        store = Store(client, Keys("t:"), Policy(2, 600, 3600, 2.0, 86400), "pbx-t")
        await store.sync_clock()
        hour = store.now_ms() // 3_600_000
        # what an older hour left: one past the two days, one within them
        await client.hset(store.keys.bans_by_hour, mapping={hour - 49: 7, hour - 3: 2})
        for _ in range(3):  # the second call bans, the third meets the ban
            await store.screen("192.0.2.1")
        await store.ban("192.0.2.2", 60, "manual")
        await store.auth_failure("192.0.2.3", Policy(1, 60, 60, 1.0, 60))
        await store.restore_bans({"192.0.2.4": store.now() + 60}, "token")  # not a new ban
        return await store.bans_by_hour(24), await client.hgetall(store.keys.bans_by_hour)

    hours, raw = asyncio.run(main())
    assert len(hours) == 24 and hours[-1][1] == 3
    assert hours[-4][1] == 2 and sum(count for _, count in hours) == 5
    assert hours[-1][0] - hours[0][0] == 23 * 3600
    assert len(raw) == 2  # the one past two days is gone


def test_the_page_shows_bans_agents_and_offenders_with_hostile_values_as_text():
    async def main():
        config = settings(
            "redis://:s3cret-pass@127.0.0.1:6379/0?password=s3cret-too",
            server_key="k3y-secret-0123456789",
            screening_threshold="2",
        )
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        store = make_store(config, client)
        for _ in range(3):
            await store.screen("203.0.113.7")
        await store.screen("203.0.113.8")
        await store.screen("198.51.100.9", injected=True)
        await store.hold("192.0.2.66", HOSTILE_HOLD, HOSTILE_REASON, duration=600)
        await store.heartbeat({"applied": 2, "backend": "dry-run", "interval": 5})
        beat = {"pbx_id": HOSTILE_PBX, "time": store.now(), "applied": 5, "backend": "nft"}
        await client.hset(store.keys.agents, HOSTILE_PBX, json.dumps(beat))
        metrics, port = await _served(store, config)
        try:
            return await asyncio.to_thread(_get, port)
        finally:
            metrics.close()

    kind, body = asyncio.run(main())
    assert kind == "text/html; charset=utf-8"
    page = Parsed(body)
    text = "".join(page.text)
    assert "script" not in page.tags and "img" not in page.tags
    assert HOSTILE_REASON in text and HOSTILE_HOLD in text
    assert "<b>evil</b>\\x1b[2J" in text and "\x1b" not in body  # control characters escaped
    assert "s3cret" not in body and "k3y-secret" not in body
    assert "redis://:***@127.0.0.1:6379/0?password=***" in text
    for shown in ("203.0.113.7", "threshold", "pbx-test", "192.0.2.66", "Bans per hour"):
        assert shown in text
    assert "<svg" in body and "<rect" in body  # the chart, drawn on the server
    assert "203.0.113.8(1)" in text  # counted, not banned
    assert "Injection attempts: 1" in text


def test_a_store_that_does_not_answer_gives_a_page_saying_so():
    async def main():
        config = settings("redis://127.0.0.1:1/0", redis_timeout="0.2s")
        store = make_service_store(config)
        metrics, port = await _served(store, config)
        try:
            return await asyncio.to_thread(_get, port), await asyncio.to_thread(
                _get, port, "/metrics"
            )
        finally:
            metrics.close()
            await store.close()

    (kind, body), (_, scraped) = asyncio.run(main())
    assert kind.startswith("text/html")
    assert 'id="error"' in body and "The store did not answer" in body
    assert "fastagi_store_up 0.0" in scraped  # /metrics goes on answering


def test_the_page_is_served_on_a_loopback_listener_only_unless_told():
    async def main(listen: str, mode: str) -> str:
        config = settings("memory://", metrics_listen=listen, metrics_status_page=mode)
        store = make_store(config, fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()))
        _, body = await web.pages(store, config)["/"]()
        return body.decode()

    assert "<!DOCTYPE html>" in asyncio.run(main("127.0.0.1:9573", "loopback"))
    assert "<!DOCTYPE html>" in asyncio.run(main("[::1]:9573", "loopback"))
    exposed = asyncio.run(main("0.0.0.0:9573", "loopback"))
    assert exposed.startswith("The status page is not served") and "0.0.0.0" in exposed
    assert "<!DOCTYPE html>" in asyncio.run(main("0.0.0.0:9573", "on"))
    assert "metrics.status_page is off" in asyncio.run(main("127.0.0.1:9573", "off"))


def test_a_bad_status_page_value_names_the_key():
    with pytest.raises(ConfigError, match=r"FASTAGI_METRICS_STATUS_PAGE: 'public'"):
        settings("memory://", metrics_status_page="public")

"""Webhooks on ban and unban (notify.py): a real `serve`, a local HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import redis

from fastagi.config import WebhookConfig
from fastagi.emulator import Call, FakeAsterisk
from fastagi.keys import Keys
from fastagi.notify import NotifyMetrics, Webhook, hook_id, message
from fastagi.service import make_embedded_store, make_store
from fastagi.store import redis_client
from tests.harness import free_port, settings, wait_for
from tests.procs import Service, _env, ctl


class Receiver:
    """An HTTP receiver on a free port: answers each POST with the next status of
    `answers` (then 200), and keeps every body it got."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.bodies: list[tuple[int, bytes]] = []  # (status answered, body)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.answers.pop(0) if receiver.answers else 200
                receiver.bodies.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def taken(self) -> list[dict]:
        return [json.loads(body) for status, body in self.bodies if status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A receiver that accepts connections and never answers (a hung web server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.held:
            conn.close()


def config_file(tmp_path: Path, hook: str) -> str:
    path = tmp_path / "fastagi.toml"
    path.write_text(f"[[notify.webhook]]\n{hook}\n")
    return str(path)


@contextlib.contextmanager
def receiver(answers: list[int] | None = None) -> Iterator[Receiver]:
    got = Receiver(answers)
    try:
        yield got
    finally:
        got.close()


def test_one_message_per_batch_retried_after_a_500_nothing_lost(tmp_path, redis_url):
    """A wave of bans (addresses and a prefix) and unbans inside one batch window: one
    message with every event in order; the receiver's 500 makes it come again (the same
    message), and the next wave comes as one message of its own."""
    with receiver([500]) as got:
        hook = f'url = "http://127.0.0.1:{got.port}/hook"\nbatch = "2s"\nretries = 3'
        metrics_port = free_port()
        env = {
            "FASTAGI_CONFIG": config_file(tmp_path, hook),
            "FASTAGI_REDIS_URL": redis_url,
            "FASTAGI_RUNTIME_DIR": str(tmp_path),
            "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        config = settings(redis_url)
        lease = Keys().notify_lease(
            hook_id(settings(redis_url, **_hook_env(hook)).notify.webhook[0])
        )
        plain = redis.Redis.from_url(redis_url)
        with Service(env, "--no-agent", log=tmp_path / "serve.log"):
            assert wait_for(lambda: plain.exists(lease), 15)

            async def wave(targets: list[str], unban: list[str]) -> None:
                store = make_store(config, redis_client(config.redis))
                for target in targets:
                    await store.ban(target, 600, "wave")
                await store.unban(unban)
                await store.close()

            first = [f"198.51.100.{n}" for n in range(1, 21)] + ["2001:db8:9::/48"]
            asyncio.run(wave(first, ["198.51.100.1", "198.51.100.2"]))
            assert wait_for(lambda: len(got.taken()) == 1, 15)
            asyncio.run(wave(["203.0.113.1", "203.0.113.2", "203.0.113.3"], []))
            assert wait_for(lambda: len(got.taken()) == 2, 15)
            time.sleep(2.5)  # one more batch window: nothing else comes
            checked = ctl("check", env=env).stdout
            scraped = _scrape(metrics_port)
        plain.close()

    statuses = [status for status, _ in got.bodies]
    assert statuses == [500, 200, 200]
    assert got.bodies[0][1] == got.bodies[1][1]  # the retry is the same message
    one, two = got.taken()
    assert [(e["op"], e["target"]) for e in one["events"]] == [
        *(("ban", target) for target in first),
        ("unban", "198.51.100.1"),
        ("unban", "198.51.100.2"),
    ]
    assert all(e["reason"] == "wave" and e["until"] > e["time"] for e in one["events"][:21])
    assert [e["target"] for e in two["events"]] == ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
    assert one["dropped"] == two["dropped"] == 0
    assert 'fastagi_notify_sent_total{webhook="webhook-1"} 2.0' in scraped
    assert 'fastagi_notify_failed_total{webhook="webhook-1"} 1.0' in scraped
    assert 'fastagi_notify_sender{webhook="webhook-1"} 1.0' in scraped
    said = f"ok   notify webhook-1: http://127.0.0.1:{got.port} (generic, batch 2s): sent by "
    assert said in checked and "last event taken" in checked and "/hook" not in checked


def _hook_env(hook: str) -> dict[str, str]:
    """The same webhook as a FASTAGI_NOTIFY_WEBHOOK override (a TOML inline table)."""
    return {"NOTIFY_WEBHOOK": "[{" + hook.replace("\n", ", ") + "}]"}


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def test_a_receiver_that_never_answers_delays_no_session(tmp_path):
    """The receiver accepts and never answers; meanwhile 40 calls, each of which bans
    (threshold 1) and so feeds the stuck webhook, are all answered as usual."""
    silent = Silent()
    try:
        hook = f'url = "http://127.0.0.1:{silent.port}/hook"\nbatch = "100ms"\ntimeout = "30s"'
        env = {
            "FASTAGI_CONFIG": config_file(tmp_path, hook),
            "FASTAGI_RUNTIME_DIR": str(tmp_path),
            "FASTAGI_SCREENING_THRESHOLD": "1",
        }
        with Service(env, "--no-agent", log=tmp_path / "serve.log") as service:
            assert ctl("ban", "192.0.2.200", env=service.env).returncode == 0
            assert wait_for(lambda: len(silent.held) == 1, 15)  # the webhook hangs from now on

            async def calls() -> list[str]:
                asterisk = FakeAsterisk(hold_limit=5.0)  # server.session_timeout
                results = await asyncio.gather(
                    *(
                        asterisk.call(service.target, Call(source=f"198.51.100.{n}"))
                        for n in range(1, 41)
                    )
                )
                return [r.variables.get("SCREEN_RESULT", "") for r in results]

            answered = asyncio.run(calls())
            status = json.loads(ctl("status", "--json", env=service.env).stdout)
            hanging = len(silent.held)
    finally:
        silent.close()
    assert answered == ["BANNED"] * 40
    assert status["banned"]["current"] == 41
    assert hanging == 1  # still the one stuck exchange: nothing was answered meanwhile


def test_a_long_outage_drops_the_oldest_and_the_next_message_says_how_many():
    """queue = 5, the receiver down while 8 events arrive: the 5 newest go out, with
    `dropped: 3`, once it is back."""

    async def main() -> list[dict]:
        config = settings()
        store = make_embedded_store(config, fakeredis.FakeServer())
        port = free_port()
        hook = WebhookConfig(
            url=f"http://127.0.0.1:{port}/", name="t", batch=0.2, timeout=1.0, retries=0, queue=5
        )
        webhook = Webhook(hook, store, NotifyMetrics(), block_ms=None)
        task = asyncio.create_task(webhook.run())
        try:
            for _ in range(100):
                if webhook.leading:
                    break
                await asyncio.sleep(0.02)
            for n in range(1, 9):
                await store.ban(f"198.51.100.{n}", 600, "<!channel>")
            for _ in range(200):  # refused while nothing listens: back into the queue
                if webhook.metrics.failed.labels("t")._value.get() >= 1 and not webhook.queue:
                    break
                await asyncio.sleep(0.02)
            bodies: list[bytes] = []

            async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                bodies.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(take, "127.0.0.1", port)
            for _ in range(300):
                if bodies:
                    break
                await asyncio.sleep(0.02)
            server.close()
        finally:
            webhook.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
        return [json.loads(b) for b in bodies]

    taken = asyncio.run(main())
    assert len(taken) == 1
    assert taken[0]["dropped"] == 3
    assert [e["target"] for e in taken[0]["events"]] == [f"198.51.100.{n}" for n in range(4, 9)]


def test_slack_text_escapes_mentions_and_says_what_was_dropped():
    from fastagi.notify import Event

    events = [
        Event(f"{1_700_000_000_000 + n}-0", "ban", f"198.51.100.{n}", 1.8e9, "<!channel>", "pbx")
        for n in range(25)
    ]
    events.append(Event("1700000000100-0", "unban", "2001:db8::/48", 0.0, "", "pbx"))
    text = json.loads(message("slack", events, 7, "pbx"))["text"]
    assert text.splitlines()[0] == "fastagi-screen: 25 bans, 1 unban"
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text
    assert "… and 6 more" in text
    assert "7 earlier events dropped" in text


def test_a_bulk_change_is_one_line_not_one_per_ban_and_no_reason_forges_a_line():
    """A blocklist feed placing 100,000 bans writes one `sync` event (op, source,
    count), not one per ban: the message says so in one line. A reason with a line feed
    (another writer's) stays on its ban's line."""

    async def main() -> list[dict]:
        store = make_embedded_store(settings(), fakeredis.FakeServer())
        hook = WebhookConfig(url="http://127.0.0.1:9/", name="t", batch=0.1)
        webhook = Webhook(hook, store, NotifyMetrics(), block_ms=None)
        webhook.read_from = "0-0"
        events = store.keys.events
        await store.redis.xadd(events, {"op": "sync", "source": "feed:voipbl", "count": "100000"})
        await store.redis.xadd(events, {"op": "sync", "source": "feed:x", "count": "many"})
        forged = "x\n• unban 198.51.100.9 (by pbx)"
        await store.redis.xadd(
            events, {"op": "ban", "ip": "198.51.100.8", "until": "1800000000000", "reason": forged}
        )
        webhook._take(await store.events_after("0-0"))
        await store.close()
        return [json.loads(message(f, list(webhook.queue), 0, "p")) for f in ("generic", "slack")]

    generic, slack = asyncio.run(main())
    assert [(e["op"], e["target"], e.get("count")) for e in generic["events"]] == [
        ("sync", "feed:voipbl", 100000),
        ("ban", "198.51.100.8", None),
    ]
    assert slack["text"].splitlines()[1:] == [
        "• feed:voipbl: 100000 bans placed or renewed at once (not listed)",
        "• ban 198.51.100.8 until 2027-01-15 08:00:00 UTC (x\\n• unban 198.51.100.9 (by pbx), by )",
    ]


def test_a_bad_webhook_is_refused_with_one_line(tmp_path):
    cases = {
        'url = "ftp://x/"': "notify.webhook: entry 1: url: ftp://x: use http:// or https://",
        'url = "http://h/"\nformat = "teams"': "entry 1: format: 'teams': one of generic, slack",
        'url = "http://h/"\nbatch = "0s"': "notify.webhook: entry 1: batch:",
        'url = "http://h/"\nretries = -1': "notify.webhook: entry 1: retries:",
        'format = "slack"': "notify.webhook: entry 1: url: missing",
        'url = "https://hooks.example/T0/secret-token"\nqueue = 0': "entry 1: queue:",
    }
    for hook, said in cases.items():
        result = ctl("--config", config_file(tmp_path, hook), "check")
        assert result.returncode == 2, hook
        assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
        assert "secret-token" not in result.stderr


def test_one_sender_per_cluster_and_a_takeover_resumes_from_the_cursor(redis_url, monkeypatch):
    """Two PBXs with the same webhook: one message per batch, from one of them. The
    sender dies with a batch the receiver refused (500): the other takes over after the
    lease and sends it; the batch already taken never comes again."""
    from fastagi import notify

    monkeypatch.setattr(notify, "LEASE", 1.0)
    monkeypatch.setattr(notify, "RENEW", 0.1)

    async def until(predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            await asyncio.sleep(0.02)
        return predicate()

    async def main(got: Receiver) -> tuple[bool, bool]:
        config = settings(redis_url)
        hook = WebhookConfig(url=f"http://127.0.0.1:{got.port}/", name="t", batch=0.3, retries=0)
        stores = [make_store(config, redis_client(config.redis)) for _ in range(2)]
        a, b = (Webhook(hook, store, NotifyMetrics(), block_ms=100) for store in stores)
        tasks = [asyncio.create_task(a.run())]
        try:
            assert await until(lambda: a.leading)
            tasks.append(asyncio.create_task(b.run()))
            await asyncio.sleep(0.5)
            b_stood_by = not b.leading
            for n in (1, 2):
                await stores[0].ban(f"198.51.100.{n}", 600, "first")
            assert await until(lambda: len(got.taken()) == 1)
            got.answers = [500]  # the second batch is refused, then its sender dies
            for n in (3, 4):
                await stores[0].ban(f"198.51.100.{n}", 600, "second")
            assert await until(lambda: len(got.bodies) == 2)
            a.leading = False  # a crash: the lease is not given up, it runs out
            a.stop()
            tasks[0].cancel()
            await asyncio.gather(tasks[0], return_exceptions=True)
            assert await until(lambda: len(got.taken()) == 2)
            return b_stood_by, b.leading
        finally:
            for hook, task in zip((a, b), tasks, strict=False):
                hook.stop()
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for store in stores:
                await store.close()

    with receiver() as got:
        b_stood_by, b_leads = asyncio.run(main(got))
        time.sleep(0.5)
    assert b_stood_by and b_leads
    first, second = got.taken()
    assert [e["target"] for e in first["events"]] == ["198.51.100.1", "198.51.100.2"]
    assert [e["target"] for e in second["events"]] == ["198.51.100.3", "198.51.100.4"]
    assert [status for status, _ in got.bodies] == [200, 500, 200]


def test_a_4xx_is_not_retried_its_batch_is_dropped_and_counted_and_the_next_one_goes():
    async def main(got: Receiver) -> Webhook:
        store = make_embedded_store(settings(), fakeredis.FakeServer())
        hook = WebhookConfig(url=f"http://127.0.0.1:{got.port}/", name="t", batch=0.2, retries=3)
        webhook = Webhook(hook, store, NotifyMetrics(), block_ms=None)
        task = asyncio.create_task(webhook.run())
        try:
            while not webhook.leading:
                await asyncio.sleep(0.02)
            await store.ban("198.51.100.1", 600, "x")
            while not got.bodies:
                await asyncio.sleep(0.02)
            await store.ban("198.51.100.2", 600, "x")
            while len(got.bodies) < 2:
                await asyncio.sleep(0.02)
        finally:
            webhook.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
        return webhook

    with receiver([404]) as got:
        webhook = asyncio.run(main(got))
    assert [status for status, _ in got.bodies] == [404, 200]
    assert [e["target"] for e in got.taken()[0]["events"]] == ["198.51.100.2"]
    assert webhook.metrics.dropped.labels("t", "refused")._value.get() == 1
    assert webhook.metrics.failed.labels("t")._value.get() == 1


def test_serve_and_an_agent_with_the_same_webhook_send_once_and_hand_over_at_stop(
    tmp_path, redis_url
):
    """A PBX running `serve` and another running only `agent`, the same webhook in both
    configs: each batch comes once; when the sender stops (SIGTERM) it gives the lease
    up and the other one sends the next batch."""
    with receiver() as got:
        hook = f'url = "http://127.0.0.1:{got.port}/hook"\nbatch = "500ms"'
        env = {
            "FASTAGI_CONFIG": config_file(tmp_path, hook),
            "FASTAGI_REDIS_URL": redis_url,
            "FASTAGI_RUNTIME_DIR": str(tmp_path),
        }
        lease = Keys().notify_lease(
            hook_id(settings(redis_url, **_hook_env(hook)).notify.webhook[0])
        )
        plain = redis.Redis.from_url(redis_url)
        agent = subprocess.Popen(
            [sys.executable, "-m", "fastagi.cli", "agent"],
            env={**_env(env), "FASTAGI_SCREENING_PBX_ID": "pbx-agent"},
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "agent.log", "w"),  # noqa: SIM115
        )
        try:
            assert wait_for(lambda: plain.exists(lease), 15)
            with Service(env, "--no-agent", log=tmp_path / "serve.log") as service:
                time.sleep(1.0)  # both running: one holds the lease
                assert ctl("ban", "198.51.100.1", env=service.env).returncode == 0
                assert wait_for(lambda: len(got.taken()) == 1, 15)
                agent.terminate()
                assert agent.wait(10) == 0
                assert wait_for(lambda: plain.exists(lease), 15)  # taken over by serve
                assert ctl("ban", "198.51.100.2", env=service.env).returncode == 0
                assert wait_for(lambda: len(got.taken()) == 2, 15)
                time.sleep(1.0)  # a batch window more: no second copy
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(5)
            plain.close()
    one, two = got.taken()
    assert len(got.bodies) == 2
    assert [e["target"] for e in one["events"]] == ["198.51.100.1"]
    assert one["sender"] == "pbx-agent"  # the agent held the lease first
    assert [e["target"] for e in two["events"]] == ["198.51.100.2"]
    assert two["sender"] != "pbx-agent"

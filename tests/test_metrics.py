"""/metrics: the counts a scrape shows are the calls that were made, and `status` agrees."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import fakeredis
import fakeredis.aioredis
from prometheus_client.parser import text_string_to_metric_families

from fastagi import metrics as service_metrics
from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.emulator import Call, FakeAsterisk
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.service import make_server, make_store
from fastagi.status import gather_status
from fastagi.store import Policy, Store
from tests.harness import free_port, settings
from tests.procs import Service, ctl

INJECTED = "562%0A200%20result=1%20(203.0.113.9)%0Aagi_arg_3%3A%20203.0.113.9%0A%0A"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_counts_sessions_bans_injections_and_matches_status():
    async def main():
        config = settings("memory://")
        store = make_store(config, fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()))
        metrics = service_metrics.Metrics(store)
        port = free_port()
        await metrics.serve("127.0.0.1", port)
        server = make_server(config, store, metrics)
        host, agi_port = (await server.start("127.0.0.1", 0))[0]
        target = f"agi://{host}:{agi_port}/screen"
        asterisk = FakeAsterisk(hold_limit=10)
        try:
            results = [
                (await asterisk.call(target, Call(source="203.0.113.7"))).variables
                for _ in range(6)
            ]
            injected = await asterisk.call(
                target, Call.from_uri_user(INJECTED, source="198.51.100.4")
            )
            ignored = await asterisk.call(target, Call(source="127.0.0.9"))
            unknown = await asterisk.call(f"agi://{host}:{agi_port}/other", Call())
            # A client outside allowed_clients (127.0.0.1/32): refused at once.
            _, writer = await asyncio.open_connection(host, agi_port, local_addr=("127.0.0.2", 0))
            writer.close()
            await asyncio.sleep(0.1)
            samples = await asyncio.to_thread(scrape, port)
            status = await gather_status(store, config)
        finally:
            await server.stop()
            metrics.close()
            await store.close()
        return results, injected, ignored, unknown, samples, status

    results, injected, ignored, unknown, samples, status = asyncio.run(main())
    assert [r["SCREEN_RESULT"] for r in results] == ["COUNTED"] * 4 + ["BANNED"] * 2
    assert injected.variables["SCREEN_RESULT"] == "COUNTED"
    assert ignored.variables["SCREEN_RESULT"] == "IGNORED"
    assert unknown.variables["SCREEN_ERROR"] == "unknown route"

    def sessions(result: str, route: str = "screen") -> float:
        return value(samples, "fastagi_sessions_total", route=route, result=result)

    assert sessions("COUNTED") == 5 and sessions("BANNED") == 2 and sessions("IGNORED") == 1
    assert sessions("ERROR", route="unknown") == 1
    assert value(samples, "fastagi_bans_issued_total") == 1  # the 5th call; the 6th found it
    assert value(samples, "fastagi_injection_attempts_total") == 1
    assert value(samples, "fastagi_sessions_refused_total", reason="client") == 1
    assert value(samples, "fastagi_sessions_refused_total", reason="busy") == 0
    assert value(samples, "fastagi_session_duration_seconds_count", route="screen") == 8
    assert value(samples, "fastagi_store_step_seconds_count") == 7
    assert value(samples, "fastagi_redis_errors_total", kind="error") == 0
    assert value(samples, "fastagi_sessions_active") == 0
    # The cluster's numbers, read as `fastagi-ctl status` reads them.
    assert value(samples, "fastagi_store_up") == 1
    assert value(samples, "fastagi_cluster_calls_total") == status["calls"] == 7
    assert value(samples, "fastagi_cluster_bans_total") == status["banned"]["total"] == 1
    assert value(samples, "fastagi_cluster_banned") == status["banned"]["current"] == 1
    assert value(samples, "fastagi_cluster_counted") == status["counted"]["current"] == 1
    assert value(samples, "fastagi_cluster_injection_attempts_total") == status["injections"] == 1


def test_the_agent_reports_what_it_applies():
    """A real agent (dry-run firewall, same Lua on fakeredis) feeds the running metrics."""

    async def main():
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        store = Store(client, Keys(), Policy(3, 600, 3600, 2.0, 86400), "pbx-a")
        agent = Agent(store, DryRunFirewall(), 30, AddressSet.parse([]), block_ms=None)
        metrics = service_metrics.Metrics()
        port = free_port()
        await metrics.serve("127.0.0.1", port)
        try:
            await agent.step()  # the reconcile at start: nothing yet
            for ip in ("198.51.100.1", "198.51.100.2", "2001:db8::3"):
                await store.ban(ip, 600, "test")
            await agent.step()
            await store.unban(["198.51.100.1"])
            await agent.step()
            return await asyncio.to_thread(scrape, port)
        finally:
            metrics.close()
            await store.close()

    samples = asyncio.run(main())
    labels = {"pbx_id": "pbx-a", "backend": "dry-run"}
    assert value(samples, "fastagi_firewall_bans_applied_total", **labels) == 3
    assert value(samples, "fastagi_firewall_bans_lifted_total", **labels) == 1
    assert value(samples, "fastagi_firewall_set_size", **labels) == 2
    assert service_metrics.active() is None  # closed: the hooks are no-ops again
    service_metrics.ban_applied("pbx-a", "dry-run")


def test_fastagi_ctl_serve_metrics_and_status_tell_the_same_story(tmp_path):
    metrics_port = free_port()
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "FASTAGI_SCREENING_THRESHOLD": "3",
    }
    with Service(env, "--no-agent", log=tmp_path / "serve.log") as service:
        sim = ctl(
            "simulate",
            "--target",
            service.target,
            "--ip",
            "203.0.113.50",
            "--calls",
            "4",
            env=service.env,
        )
        assert sim.returncode == 0, sim.stderr
        samples = scrape(metrics_port)
        status = json.loads(ctl("status", "--json", env=service.env).stdout)
    assert os.path.exists(tmp_path / "serve.log")
    assert value(samples, "fastagi_sessions_total", route="screen", result="COUNTED") == 2
    assert value(samples, "fastagi_sessions_total", route="screen", result="BANNED") == 2
    assert value(samples, "fastagi_bans_issued_total") == 1
    assert value(samples, "fastagi_cluster_calls_total") == status["calls"] == 4
    assert value(samples, "fastagi_cluster_bans_total") == status["banned"]["total"] == 1
    assert value(samples, "fastagi_cluster_banned") == status["banned"]["current"] == 1


def test_the_endpoint_bounds_idle_connections_and_still_answers(monkeypatch):
    monkeypatch.setattr(service_metrics, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(service_metrics, "READ_TIMEOUT", 2.0)

    async def main():
        metrics = service_metrics.Metrics()
        port = free_port()
        await metrics.serve("127.0.0.1", port)
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            # The 4th pushed out the oldest at once; the others wait for READ_TIMEOUT.
            oldest = await asyncio.wait_for(idle[0][0].read(), 1.0)
            samples = await asyncio.to_thread(scrape, port)
            rest = await asyncio.wait_for(
                asyncio.gather(*(reader.read() for reader, _ in idle[1:])), 5
            )
            for _, writer in idle:
                writer.close()
            return oldest, samples, rest
        finally:
            metrics.close()

    oldest, samples, rest = asyncio.run(main())
    assert oldest == b"" and rest == [b""] * 3
    assert ("fastagi_sessions_active", ()) in samples


def test_a_page_is_served_beside_metrics_and_every_other_path_is_metrics():
    async def page() -> tuple[str, bytes]:
        return "text/plain; charset=utf-8", b"a page\n"

    async def main():
        metrics = service_metrics.Metrics()
        port = free_port()
        await metrics.serve("127.0.0.1", port, pages={"/page": page})
        loop = asyncio.get_running_loop()

        def get(path: str) -> tuple[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.headers["Content-Type"], answer.read().decode()

        try:
            kind, body = await loop.run_in_executor(None, get, "/page?x=1")
            assert (kind, body) == ("text/plain; charset=utf-8", "a page\n")
            kind, body = await loop.run_in_executor(None, get, "/metrics")
            assert kind.startswith("text/plain; version=") and "fastagi_sessions_total" in body
        finally:
            metrics.close()

    asyncio.run(main())

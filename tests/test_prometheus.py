"""The shipped monitoring, against a real Prometheus (Debian's `prometheus`): it scrapes
a real `fastagi-ctl serve` (shared Redis, its agent on the dry-run firewall) with the
example scrape config, loads the alert rules (`promtool check rules` passes on them), and
after calls, bans, refusals, an unban and agent syncs, every query of the Grafana
dashboard and every alert expression returns data through the HTTP API. The alerts are
made to fire: a stale agent, refusals, a ban spike, then the store and the service down.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from fastagi.emulator import Call
from fastagi.keys import Keys
from tests.harness import free_port, need_program, place_calls
from tests.procs import Service, ctl
from tests.test_metrics import INJECTED

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "fastagi-screen.rules.yml"
SCRAPE_EXAMPLE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "fastagi-screen.json"
# Grafana's variables, as "All" and a short scrape interval set them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$pbx_id": ".*"}
BANNED = [f"203.0.113.{n}" for n in range(10, 22)]  # 12 bans: the spike alert's > 10
AFTER_STORE = ("FastagiStoreDown", "FastagiServiceDown")  # fire only once those are down


class Prometheus:
    """`prometheus` on a free loopback port with the example config pointed at `target`
    and a data directory of its own; never the system service."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        config = SCRAPE_EXAMPLE.read_text()
        for old, new in (
            ("15s", "1s"),
            ("/etc/prometheus/fastagi-screen.rules.yml", str(RULES)),
            ("127.0.0.1:9573", target),
        ):
            assert old in config, f"{old!r} is no longer in {SCRAPE_EXAMPLE.name}"
            config = config.replace(old, new)
        (workdir / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.get("/-/ready", wait=20)

    def get(self, path: str, wait: float = 0) -> dict:
        deadline = time.monotonic() + wait
        while True:
            try:
                url = f"http://127.0.0.1:{self.port}{path}"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    text = answer.read().decode()
                    return json.loads(text) if text.startswith("{") else {}
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        reply = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def until_data(self, exprs: list[str], timeout: float) -> list[str]:
        """Polls each expression until it returns data; those that never did."""
        waiting = list(exprs)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            waiting = [expr for expr in waiting if not self.query(expr)]
            if waiting:
                time.sleep(0.5)
        return waiting

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
            exprs.append(expr)
    return exprs


def refused_connections(port: int, count: int) -> None:
    """Connections from 127.0.0.2, outside allowed_clients (127.0.0.1): refused."""
    for _ in range(count):
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                sock.recv(1)  # the server closes it


def test_prometheus_scrapes_the_service_and_every_dashboard_and_alert_query_returns_data(
    tmp_path, own_redis
):
    binary = need_program("prometheus", "prometheus")
    promtool = need_program("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    metrics_port = free_port()
    env = {
        "FASTAGI_REDIS_URL": own_redis.url,
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "FASTAGI_SCREENING_THRESHOLD": "2",
        "FASTAGI_SCREENING_PBX_ID": "pbx-prom",
        "FASTAGI_FIREWALL_BACKEND": "dry-run",
    }
    service = Service(env, log=tmp_path / "serve.log")
    prometheus = Prometheus(binary, tmp_path, f"127.0.0.1:{metrics_port}")
    try:
        # a first scrape of the counters at rest, so increases are seen as such
        assert not prometheus.until_data(['fastagi_sessions_total{result="BANNED"}'], 10)
        calls = [Call(source=ip) for ip in BANNED for _ in range(2)]
        calls += [Call(source="198.51.100.7"), Call.from_uri_user(INJECTED, source="198.51.100.4")]
        results = place_calls(service.target, calls)
        assert sum(r.variables.get("SCREEN_RESULT") == "BANNED" for r in results) == len(BANNED)
        refused_connections(service.port, 12)
        unbanned = ctl("unban", BANNED[0], env=service.env)  # the agent lifts it
        assert unbanned.returncode == 0, unbanned.stderr
        # another PBX's agent that died ten minutes ago
        gone = {"pbx_id": "pbx-gone", "time": time.time() - 600, "applied": 3, "interval": 5}
        own_redis.client().hset(Keys().agents, "pbx-gone", json.dumps(gone))

        rules = [
            (rule["name"], rule["query"])
            for group in prometheus.get("/api/v1/rules")["data"]["groups"]
            for rule in group["rules"]
        ]
        assert len(rules) == 5, rules
        now = dashboard_queries() + [q for name, q in rules if name not in AFTER_STORE]
        assert prometheus.until_data(now, 25) == []

        own_redis.stop()
        store_down = [q for name, q in rules if name == "FastagiStoreDown"]
        assert prometheus.until_data(store_down, 10) == []
        service.stop()
        service_down = [q for name, q in rules if name == "FastagiServiceDown"]
        assert prometheus.until_data(service_down, 10) == []
    finally:
        prometheus.stop()
        service.stop()

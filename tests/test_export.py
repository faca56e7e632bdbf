"""The ban list out (export.py): /banlist.txt, /banlist.json and /banlist.crowdsec.json
of a running `serve`, and `fastagi-ctl export`, against `status --json`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import fakeredis
import pytest
import redis

from fastagi.embedded import client_socket
from fastagi.export import Exporter, ExportError, render
from fastagi.keys import Keys
from fastagi.metrics import PageError
from fastagi.service import make_embedded_store
from tests.harness import free_port, settings
from tests.procs import Service, ctl


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_banlist_pages_and_export_match_status_json(tmp_path):
    """Bans of addresses and prefixes, by the threshold, an admin and a fail2ban jail,
    and one protected entry written by hand: the pages list exactly what status lists,
    the protected one left out."""
    port = free_port()
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{port}",
        "FASTAGI_SCREENING_THRESHOLD": "3",
        "FASTAGI_EXPORT_REFRESH": "1ms",  # each request reads the list afresh
    }
    with Service(env, "--no-agent", log=tmp_path / "serve.log") as service:
        e = service.env
        for caller in ("203.0.113.50", "2001:db8:1:2::5"):  # threshold: an address, a /64
            ok(ctl("simulate", "--target", service.target, "--ip", caller, "--calls", "3", env=e))
        ok(ctl("ban", "198.51.100.7", "--reason", "sip scan", env=e))
        ok(ctl("ban", "2001:db8:7::/48", "--for", "2h", "--reason", "prefix", env=e))
        ok(ctl("ban", "192.0.2.44", "--hold", "f2b-asterisk", "--for", "3h", env=e))
        ok(ctl("ban", "192.0.2.44", "--for", "1h", "--reason", "admin too", env=e))
        # Another writer's entry for a protected address (ignore covers 127.0.0.0/8).
        writer = redis.Redis(unix_socket_path=str(client_socket(tmp_path)))
        writer.zadd(Keys().banned, {"127.0.0.9": int((time.time() + 3600) * 1000)})
        writer.close()

        status = json.loads(ok(ctl("status", "--json", env=e)))
        txt = get(port, "/banlist.txt")
        page = get(port, "/banlist.json")
        crowdsec = get(port, "/banlist.crowdsec.json")
        cli_txt = ok(ctl("export", env=e))
        cli_json = json.loads(ok(ctl("export", "--format", "json", env=e)))
        ok(ctl("unban", "198.51.100.7", env=e))
        after = get(port, "/banlist.txt")[2].decode().split()

    listed = {ban["ip"]: ban for ban in status["banned"]["list"]}
    assert listed["127.0.0.9"]["protected"]
    wanted = {ip for ip, ban in listed.items() if not ban["protected"]}
    assert wanted == {
        "203.0.113.50",
        "2001:db8:1:2::/64",
        "198.51.100.7",
        "2001:db8:7::/48",
        "192.0.2.44",
    }

    assert txt[:2] == (200, "text/plain; charset=utf-8")
    lines = txt[2].decode().splitlines()
    assert lines == sorted(wanted)  # one target per line, `comm`-ready
    assert cli_txt.splitlines() == lines

    assert page[:2] == (200, "application/json")
    body = json.loads(page[2])
    assert body["count"] == len(body["bans"]) == len(wanted)
    for ban in body["bans"]:
        shown = listed[ban["ip"]]
        for key in ("until", "pbx_id", "reason", "bans"):
            assert ban[key] == shown[key], (ban["ip"], key)
        assert ban["start"] <= time.time() < ban["until"]
    holds = {ban["ip"]: [h["source"] for h in ban["holds"]] for ban in body["bans"]}
    assert holds["192.0.2.44"] == ["f2b-asterisk", "admin"]  # longest first
    assert holds["203.0.113.50"] == holds["2001:db8:1:2::/64"] == ["threshold"]
    assert [ban["ip"] for ban in cli_json["bans"]] == [ban["ip"] for ban in body["bans"]]

    decisions = {d["value"]: d for d in json.loads(crowdsec[2])}
    assert set(decisions) == wanted
    assert decisions["2001:db8:7::/48"]["scope"] == "Range"
    assert decisions["192.0.2.44"]["scope"] == "Ip"
    assert 3 * 3600 - 60 < int(decisions["192.0.2.44"]["duration"].rstrip("s")) <= 3 * 3600

    assert set(after) == wanted - {"198.51.100.7"}


def test_a_list_longer_than_max_entries_is_refused_whole_never_cut():
    """A consumer that syncs to the list would unban whatever a cut list lacks."""

    async def main():
        config = settings(EXPORT_MAX_ENTRIES="2")
        store = make_embedded_store(config, fakeredis.FakeServer())
        try:
            for n in range(3):
                await store.ban(f"198.51.100.{n + 1}", 600, "test")
            with pytest.raises(ExportError, match=r"more than export\.max_entries"):
                await render(store, "txt", config.export.max_entries)
            pages = Exporter(store, config.export.max_entries, 5.0).pages()
            with pytest.raises(PageError, match="3 bans"):
                await pages["/banlist.json"]()
            await store.unban(["198.51.100.3"])
            return await pages["/banlist.txt"]()
        finally:
            await store.close()

    assert asyncio.run(main()) == ("text/plain; charset=utf-8", b"198.51.100.1\n198.51.100.2\n")


def test_the_page_answers_503_when_the_store_is_away(tmp_path, own_redis):
    port = free_port()
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
        "FASTAGI_REDIS_URL": own_redis.url,
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{port}",
        "FASTAGI_EXPORT_REFRESH": "100ms",
    }
    with Service(env, "--no-agent", log=tmp_path / "serve.log") as service:
        ok(ctl("ban", "198.51.100.7", env=service.env))
        assert get(port, "/banlist.txt")[2] == b"198.51.100.7\n"
        own_redis.kill()
        time.sleep(0.2)  # past the cached body's refresh
        status, _, text = get(port, "/banlist.txt")
        exported = ctl("export", env=service.env)
    assert status == 503 and text.startswith(b"ban list unavailable: ")
    assert exported.returncode == 1 and "export: " in exported.stderr

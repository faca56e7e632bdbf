"""The optional shared key in the AGI URL (issue 12, section 3, must-show 5).

allowed_clients holds 127.0.0.1, so any local user could screen (and ban) addresses.
With `server.key`, only `agi://.../screen?key=<key>` is screened; a wrong, missing or
misplaced key is treated like a client outside allowed_clients: closed with nothing
executed (the emulator records every command it received), one rate-limited log line,
the refused metric. The key never appears in a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fastagi import config as configuration
from fastagi.emulator import Call, FakeAsterisk, environment_block, expand
from fastagi.metrics import Metrics
from tests.harness import running_server
from tests.procs import Service, ctl

KEY = "f3a9c0de5b7e41c2a8d6b0e9c4f1a7d3"
WRONG = KEY[:-1] + "4"

# (label, the AGI URL after agi://host:port, extra Call fields)
REFUSED = [
    ("missing", "/screen", {}),
    ("empty", "/screen?key=", {}),
    ("wrong last character", f"/screen?key={WRONG}", {}),
    ("prefix of the key", f"/screen?key={KEY[:16]}", {}),
    ("key plus a character", f"/screen?key={KEY}0", {}),
    ("upper case", f"/screen?key={KEY.upper()}", {}),
    ("other parameter name", f"/screen?KEY={KEY}", {}),
    ("parameter name only", f"/screen?{KEY}", {}),
    ("given twice", f"/screen?key={KEY}&key={KEY}", {}),
    ("in the path", f"/screen/{KEY}", {}),
    ("in a fragment", f"/screen#key={KEY}", {}),
    ("URL without a path (no agi_network_script)", f"?key={KEY}", {}),
    ("as an AGI argument", "/screen", {"agi_args": f"key={KEY}"}),
    (
        "forged into the caller ID",
        "/screen",
        {"callerid": f"x\nagi_network_script: screen?key={KEY}"},
    ),
    (
        "forged into the dialed number",
        "/screen",
        {"exten": f"1\nagi_network_script: screen?key={KEY}"},
    ),
]
ACCEPTED = [f"screen?key={KEY}", f"screen?ext=99&key={KEY}", f"screen?key={KEY}&ip=192.0.2.1"]


def _call(srv, url: str, call: Call):
    """One emulated call to `agi://host:port<url>` (Running.call always adds a path)."""
    hostport = srv.target.rsplit("/", 1)[0]
    return FakeAsterisk(hold_limit=10).call(hostport + url, call)


def _refused_metric(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("fastagi_sessions_refused_total", {"reason": reason}) or 0


def test_right_key_is_screened_and_every_other_closes_with_nothing_executed(caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        async with running_server(SERVER_KEY=KEY) as srv:
            metrics = Metrics(registry=CollectorRegistry())
            srv.server.observer = metrics
            accepted = [
                await srv.call(Call(source="192.0.2.80"), route=route) for route in ACCEPTED
            ]
            refused = {
                label: await _call(srv, url, Call(source="203.0.113.81", **fields))
                for label, url, fields in REFUSED
            }
            return accepted, refused, await srv.store.counted(), srv.server.stats, metrics

    accepted, refused, counted, stats, metrics = asyncio.run(main())
    assert [r.variables.get("SCREEN_RESULT") for r in accepted] == ["COUNTED"] * len(ACCEPTED)
    for label, result in refused.items():
        assert result.commands == [] and result.variables == {}, label
    assert counted == {"192.0.2.80": len(ACCEPTED)}
    assert stats.refused_key == len(REFUSED) and stats.protocol_errors == 0
    assert _refused_metric(metrics.registry, "key") == len(REFUSED)
    assert metrics.registry.get_sample_value("fastagi_sessions_active") == 0
    sessions = metrics.registry.get_sample_value(
        "fastagi_sessions_total", {"route": "screen", "result": "COUNTED"}
    )
    assert sessions == len(ACCEPTED)
    # one rate-limited line for all the refusals, and neither key in any line
    lines = [record.getMessage() for record in caplog.records]
    # not one line per refusal: the first, and at most one summary of the others
    assert 1 <= sum("wrong or missing key" in line for line in lines) <= 2
    assert not [line for line in lines if KEY in line or WRONG in line or KEY[:16] in line]


def test_without_a_configured_key_an_empty_or_any_key_is_screened():
    """The shipped dialplans send `?key=${FASTAGI_KEY}`, empty until the admin sets one."""

    async def main():
        async with running_server() as srv:
            routes = ["screen", "screen?key=", f"screen?key={KEY}"]
            return [await srv.call(Call(source="192.0.2.82"), route=r) for r in routes]

    results = asyncio.run(main())
    assert [r.variables["SCREEN_RESULT"] for r in results] == ["COUNTED"] * 3


@pytest.mark.parametrize(
    "variable,value,fragment",
    [
        ("FASTAGI_SERVER_KEY", "short", "16 to 256"),
        ("FASTAGI_SERVER_KEY", KEY + ",x", "16 to 256"),
        ("FASTAGI_SERVER_KEY", KEY + "&key=x", "16 to 256"),
        ("FASTAGI_SERVER_KEY_FILE", "/nonexistent/key", "No such file"),
    ],
)
def test_a_bad_key_setting_exits_2_naming_it_without_echoing_it(
    tmp_path, variable, value, fragment
):
    result = ctl("check", env={variable: value, "FASTAGI_RUNTIME_DIR": str(tmp_path)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert variable in lines[0] and fragment in lines[0]
    assert KEY not in result.stderr and "short" not in result.stderr


def test_key_file_must_be_private_and_is_read_whole(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(configuration.ConfigError, match="other users may read it"):
        configuration.load(None, {"FASTAGI_SERVER_KEY_FILE": str(path)})
    os.chmod(path, 0o640)
    config = configuration.load(None, {"FASTAGI_SERVER_KEY_FILE": str(path)})
    assert config.server.key == KEY and KEY not in repr(config)
    with pytest.raises(configuration.ConfigError, match="not both"):
        configuration.load(None, {"FASTAGI_SERVER_KEY_FILE": str(path), "FASTAGI_SERVER_KEY": KEY})
    os.chown(path, 65534, 0)  # nobody's file: nobody could change the key
    with pytest.raises(configuration.ConfigError, match="another user may write it"):
        configuration.load(None, {"FASTAGI_SERVER_KEY_FILE": str(path)})


def test_simulate_sends_the_configured_key_and_serve_never_logs_it(tmp_path):
    env = {"FASTAGI_RUNTIME_DIR": str(tmp_path / "run"), "FASTAGI_SERVER_KEY": KEY}
    log = tmp_path / "serve.log"
    with Service(env, log=log) as service:
        right = ctl("simulate", "--ip", "192.0.2.84", env=service.env)
        wrong = ctl(
            "simulate", "--ip", "192.0.2.84", env={**service.env, "FASTAGI_SERVER_KEY": WRONG}
        )
        explicit = ctl(
            "simulate", "--ip", "192.0.2.84", "--target", f"{service.target}?key=", env=service.env
        )
        status = ctl("status", "192.0.2.84", env=service.env)
    assert right.returncode == 0 and "SCREEN_RESULT=COUNTED" in right.stdout
    assert wrong.returncode == 0 and "(no variables set)" in wrong.stdout
    assert "(no variables set)" in explicit.stdout
    assert "1" in status.stdout
    text = log.read_text() + right.stdout + wrong.stdout + right.stderr + wrong.stderr
    assert "wrong or missing key" in log.read_text()
    assert KEY not in text and WRONG not in text


async def _closed(reader: asyncio.StreamReader) -> bool:
    """The server closed this connection (without waiting for its session_timeout)."""
    try:
        return await asyncio.wait_for(reader.read(), 0.2) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_a_local_users_idle_connections_no_longer_make_real_calls_fail_open():
    """Observed: 256 idle connections (max_sessions) made real calls fail open (busy).
    A connection that has not sent its environment is closed to make room, and with a
    key an unauthenticated one cannot get past its environment: Asterisk's calls are
    screened however many such connections a local user holds or reopens."""

    async def main():
        async with running_server(SERVER_KEY=KEY, SERVER_MAX_SESSIONS="4") as srv:
            host, port = srv.target[6:].split("/")[0].split(":")
            idle, keyless, results = [], [], []
            for _ in range(3):
                idle += [await asyncio.open_connection(host, int(port)) for _ in range(6)]
                for n in range(2):  # a session with an environment but no key
                    reader, writer = await asyncio.open_connection(host, int(port))
                    writer.write(b"".join(environment_block(Call(), srv.target, n)))
                    keyless.append((reader, writer))
                await asyncio.sleep(0.05)
                call = Call(source="192.0.2.85")
                results.append(await srv.call(call, route=f"screen?key={KEY}"))
            closed = await asyncio.gather(*(_closed(reader) for reader, _ in idle + keyless))
            for _, writer in idle + keyless:
                writer.close()
            return results, closed, srv.server.stats, await srv.store.counted()

    results, closed, stats, counted = asyncio.run(main())
    assert [r.variables.get("SCREEN_RESULT") for r in results] == ["COUNTED"] * 3
    assert counted == {"192.0.2.85": 3}
    assert stats.refused_busy == 0 and stats.refused_key == 6 and stats.evicted >= 12
    assert sum(closed) >= 12 + 6  # the oldest idle ones and every keyless one were closed


def test_the_shipped_dialplans_url_works_with_and_without_a_key():
    """The AGI URL as written in dialplan/, expanded as Asterisk would with FASTAGI_KEY
    set in [globals] or unset."""
    text = (Path(__file__).parent.parent / "dialplan" / "extensions-fastagi.conf").read_text()
    urls = set(re.findall(r"AGI\((agi://[^,)]+)\)", text))
    assert len(urls) == 1
    url = urls.pop()

    async def main():
        results = []
        for server_key, globals_ in [(KEY, {"FASTAGI_KEY": KEY}), (KEY, {}), ("", {})]:
            async with running_server(SERVER_KEY=server_key) as srv:
                hostport = srv.target.rsplit("/", 1)[0]
                expanded = expand(url, globals_).replace("agi://127.0.0.1:4573", hostport)
                result = await FakeAsterisk(hold_limit=10).call(expanded, Call(source="192.0.2.86"))
                results.append(result.variables.get("SCREEN_RESULT"))
        return results

    assert asyncio.run(main()) == ["COUNTED", None, "COUNTED"]

"""The password-guessing watcher end to end: the AMI emulator replaying the real Asterisk
22.10.1 captures, the watcher, a real Redis; AMI down, stalled or sending garbage while
the FastAGI service answers; `check`, `status` and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from fastagi import auth
from fastagi.ami import TERMINATOR
from fastagi.ami_emulator import FakeAMI, captured_events, failure
from fastagi.auth import AuthWatcher, check_ami, make_watcher
from fastagi.config import Config
from fastagi.service import make_service_store
from fastagi.status import gather_status, render_status
from tests.harness import free_port, running_server, wait_until
from tests.harness import settings as config_settings
from tests.test_ami import CAPTURES, DATA, EXPECTED

SMUGGLED = "203.0.113.9"
FAILURES = ("ChallengeResponseFailed", "FailedACL", "InvalidAccountID", "InvalidPassword")
NOT_FAILURES = ("ChallengeSent", "SuccessfulAuth", "RequestBadFormat", "RequestNotAllowed")


def auth_config(redis_url: str, port: int, **more: str) -> Config:
    options = {
        "auth_enabled": "true",
        "auth_port": str(port),
        "auth_username": "fastagi",
        "auth_secret": "s3cret",
        "auth_threshold": "1000",
        "screening_ignore": "[]",
    }
    options.update(more)
    return config_settings(redis_url, **options)


@contextlib.asynccontextmanager
async def watching(
    config: Config, registry: CollectorRegistry | None = None
) -> AsyncIterator[AuthWatcher]:
    store = make_service_store(config)
    store.protected = None  # the captures' attackers are on loopback: this host's addresses
    watcher = make_watcher(config, store, registry)
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        watcher.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def replayed() -> bytes:
    return b"".join(b"".join(captured_events((DATA / n).read_bytes())) for n in CAPTURES)


def test_captures_replayed_count_true_addresses_only(redis_url: str) -> None:
    """Must show 1: every failure type counted at its true address, each attempt once;
    203.0.113.9 never; ChallengeSent, SuccessfulAuth and the other events never."""
    events = replayed()

    async def main() -> None:
        ami = FakeAMI(on_login=events)
        config = auth_config(redis_url, await ami.start())
        registry = CollectorRegistry()
        async with watching(config, registry) as watcher:
            total = events.count(TERMINATOR) + 1  # and the emulator's SuccessfulAuth of us
            assert await wait_until(lambda: watcher.outcomes.total() == total, 10), watcher.outcomes
            counted = await watcher.store.auth_counted(watcher.rules.window)
            status = await gather_status(watcher.store, config)
            banned = await watcher.store.banned()
        await ami.close()
        assert counted == EXPECTED
        assert SMUGGLED not in counted and SMUGGLED not in banned
        assert status["auth"]["failures"] == sum(EXPECTED.values())
        assert "127.0.0.50(3)" in render_status(status)
        metrics = generate_latest(registry).decode()
        for name in FAILURES:
            assert f'event="{name}",outcome="counted"}}' in metrics, name
        for name in NOT_FAILURES:
            line = f'fastagi_auth_events_total{{event="{name}",outcome="counted"}} 0.0'
            assert line in metrics, name
        assert 'event="ChallengeResponseFailed",outcome="untrusted"} 3.0' in metrics
        assert 'event="InvalidAccountID",outcome="untrusted"} 58.0' in metrics

    asyncio.run(main())


def test_threshold_bans_with_reason_auth(redis_url: str) -> None:
    async def main() -> None:
        ami = FakeAMI(on_login=b"".join(failure("192.0.2.66", 5060 + n) for n in range(3)))
        config = auth_config(redis_url, await ami.start(), auth_threshold="3")
        async with watching(config) as watcher:
            assert await wait_until(lambda: watcher.outcomes["counted"] == 3, 5)
            record = await watcher.store.record("192.0.2.66")
            assert "192.0.2.66" in await watcher.store.banned()
        await ami.close()
        assert record["reason"] == "auth" and record["bans"] == "1"

    asyncio.run(main())


# -- AMI down, stalled, sending garbage: the service answers, nothing else counted --------


@pytest.fixture
def quick_retries(monkeypatch) -> None:
    monkeypatch.setattr(auth, "BACKOFF_FIRST", 0.02)
    monkeypatch.setattr(auth, "BACKOFF_MAX", 0.1)
    monkeypatch.setattr(auth, "CONNECT_TIMEOUT", 0.3)


async def answered(server) -> bool:
    result = await server.call()
    return result.variables.get("SCREEN_RESULT") in ("COUNTED", "BANNED")


def test_ami_down_then_up_slow_or_refusing(redis_url: str, quick_retries, caplog) -> None:
    """Must show 3: while the AMI is down, stalls or refuses the login, the FastAGI
    service answers every call; the watcher logs once and logs in when the AMI is back."""

    async def main() -> None:
        port = free_port()
        config = auth_config(redis_url, port)
        async with running_server(redis_url) as server, watching(config) as watcher:
            for _ in range(5):  # nobody listens
                assert await answered(server)
                await asyncio.sleep(0.05)
            stalled = FakeAMI(stall=True)
            await stalled.start(port=port)
            for _ in range(5):
                assert await answered(server)
                await asyncio.sleep(0.1)
            await stalled.close()
            wrong = FakeAMI(secret="other")
            await wrong.start(port=port)
            assert await wait_until(lambda: wrong.refused_logins >= 2, 3)
            assert await answered(server)
            await wrong.close()
            ami = FakeAMI(on_login=failure("192.0.2.70"))
            await ami.start(port=port)
            assert await wait_until(lambda: watcher.outcomes["counted"] == 1, 5)
            ami.drop()  # an Asterisk restart: the watcher logs in again
            assert await wait_until(lambda: ami.logins == 2, 5)
            assert await answered(server)
            assert await watcher.store.auth_counted(watcher.rules.window) == {"192.0.2.70": 1}
            await ami.close()

    with caplog.at_level("WARNING", logger="fastagi.auth"):
        asyncio.run(main())
    down = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(down) == 2, [r.getMessage() for r in down]  # the first outage, the restart


EXAMPLES = itertools.count()


def test_a_slow_ami_drips_an_event_the_service_answers_meanwhile(redis_url: str) -> None:
    """Must show 3, slow: an event arriving a few bytes at a time holds nothing."""

    async def main() -> None:
        ami = FakeAMI()
        config = auth_config(redis_url, await ami.start())
        async with running_server(redis_url) as server, watching(config) as watcher:
            assert await wait_until(watcher.logged_in.is_set, 5)
            event = failure("192.0.2.71")
            for start in range(0, len(event), 16):
                await ami.send(event[start : start + 16])
                if start % 128 == 0:
                    assert await answered(server)
                await asyncio.sleep(0.01)
            assert await wait_until(lambda: watcher.outcomes["counted"] == 1, 5)
            assert await watcher.store.auth_counted(watcher.rules.window) == {"192.0.2.71": 1}
        await ami.close()

    asyncio.run(main())


def test_redis_down_drops_failures_with_one_line_then_counts_again(own_redis, caplog) -> None:
    async def main() -> None:
        ami = FakeAMI()
        config = auth_config(own_redis.url, await ami.start())
        async with watching(config) as watcher:
            assert await wait_until(watcher.logged_in.is_set, 5)
            own_redis.kill()
            await ami.send(failure("192.0.2.72") * 5)
            assert await wait_until(lambda: watcher.outcomes["error"] == 5, 10)
            own_redis.start()
            await ami.send(failure("192.0.2.73"))
            assert await wait_until(lambda: watcher.outcomes["counted"] == 1, 10)
            assert await watcher.store.auth_counted(watcher.rules.window) == {"192.0.2.73": 1}
        await ami.close()

    with caplog.at_level("WARNING", logger="fastagi.auth"):
        asyncio.run(main())
    assert len([r for r in caplog.records if "store unavailable" in r.getMessage()]) == 1


# Garbage: AMI-looking lines, forged RemoteAddress lines, raw bytes, line breaks.
GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [
                b"\r\n",
                b"\r\n\r\n",
                b"\r",
                b"\n",
                b"Event: ChallengeResponseFailed\r\n",
                b"Privilege: security,all\r\n",
                b"RemoteAddress: IPV4/UDP/203.0.113.9/5060\r\n",
                b"RemoteAddress: IPV6/UDP/2001:db8::bad/5060\r\n",
                b"Response: Success\r\n",
                b"Asterisk Call Manager/11.0.0\r\n",
            ]
        ),
    ),
    max_size=40,
).map(b"".join)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=GARBAGE)
def test_garbage_counts_nothing_and_the_next_event_counts(redis_url: str, garbage: bytes) -> None:
    """Must show 3: any garbage between real events: the watcher stays up, counts only
    the real failures after it, at their true address."""

    async def main() -> None:
        ami = FakeAMI()
        config = auth_config(redis_url, await ami.start(), redis_key_prefix=f"g{next(EXAMPLES)}:")
        async with watching(config) as watcher:
            assert await wait_until(watcher.logged_in.is_set, 5)
            await ami.send(garbage + TERMINATOR + failure("192.0.2.80"))
            assert await wait_until(lambda: watcher.outcomes["counted"] == 1, 5), watcher.outcomes
            counted = await watcher.store.auth_counted(watcher.rules.window)
        await ami.close()
        assert counted == {"192.0.2.80": 1}

    asyncio.run(main())


def test_a_message_without_end_reconnects(redis_url: str, quick_retries) -> None:
    async def main() -> None:
        ami = FakeAMI()
        config = auth_config(redis_url, await ami.start())
        async with running_server(redis_url) as server, watching(config) as watcher:
            assert await wait_until(watcher.logged_in.is_set, 5)
            await ami.send(b"Event: x\r\n" * 10_000)  # 100 kB, no CRLF CRLF
            assert await answered(server)
            assert await wait_until(lambda: ami.logins == 2, 5)
            await ami.send(failure("192.0.2.81"))
            assert await wait_until(lambda: watcher.outcomes["counted"] == 1, 5)
            assert await watcher.store.auth_counted(watcher.rules.window) == {"192.0.2.81": 1}
        await ami.close()

    asyncio.run(main())


# -- check ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("emulator", "secret", "expect"),
    [
        ({}, "s3cret", [True, True, True, True]),
        ({"permissive": True}, "s3cret", [True, True, False, False]),
        ({}, "wrong", [False]),
    ],
)
def test_check_ami(emulator: dict, secret: str, expect: list[bool]) -> None:
    ami = FakeAMI(**emulator)

    async def main() -> list[tuple[bool, str]]:
        config = auth_config("memory://", await ami.start(), auth_secret=secret)
        try:
            return await check_ami(config.auth, timeout=2)
        finally:
            await ami.close()

    results = asyncio.run(main())
    assert [ok for ok, _ in results] == expect, results
    tried = ["login", "command", "getconfig"] if len(expect) > 1 else ["login"]
    assert ami.actions == tried


def test_check_ami_nobody_listening() -> None:
    config = auth_config("memory://", free_port())
    results = asyncio.run(check_ami(config.auth, timeout=1))
    assert results[0][0] is False and "cannot connect" in results[0][1]


def test_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "ami.secret"
    secret.write_text("from-a-file\n")
    config = auth_config("memory://", 5038, auth_secret="", auth_secret_file=str(secret))

    async def main() -> list[tuple[bool, str]]:
        ami = FakeAMI(secret="from-a-file")
        port = await ami.start()
        try:
            return await check_ami(dataclasses.replace(config.auth, port=port), 2)
        finally:
            await ami.close()

    assert all(ok for ok, _ in asyncio.run(main()))

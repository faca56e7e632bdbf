"""Test helpers: an in-process FastAGI server on a free port, on either store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import fakeredis
import fakeredis.aioredis

from fastagi import config as configuration
from fastagi.addresses import Prefixes, parse_address, target_text
from fastagi.admin import protected_set
from fastagi.emulator import Call, CallResult, FakeAsterisk
from fastagi.protect import Protected
from fastagi.server import FastAGIServer
from fastagi.service import make_embedded_store, make_server, make_service_store, make_store
from fastagi.store import Store, redis_client


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll `predicate` without blocking the loop (the agent runs on it); its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll `predicate` from a thread that may block (another process does the work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def firewall_ips(firewall) -> set[str]:
    """The targets a firewall backend holds, as their canonical text ("192.0.2.9",
    "2001:db8:1:2::/64")."""
    return {target_text(network) for network in firewall.list()}


def counted_as(ip: str, prefixes: Prefixes | None = None) -> str:
    """The store key a caller is counted under (its /64 for IPv6, by default)."""
    return target_text((prefixes or Prefixes()).target(parse_address(ip)))


async def redis_nodes_protected(config: configuration.Config) -> tuple[list[str], dict]:
    """The Redis nodes a store learns behind a Sentinel or Cluster, and the protected
    set's parts (source -> entries) once it has asked, as `check` builds it."""
    store = make_store(config, redis_client(config.redis))
    try:
        summary = (await protected_set(config, store)).summary()
        return await store.nodes(), {part["source"]: part["entries"] for part in summary["parts"]}
    finally:
        await store.close()


def need_program(name: str, package: str) -> str:
    """The path of the program `name`. Without it a test skips on a developer's machine
    but fails in CI (CI=true), whose .ci/run installs the Debian `package`."""
    import pytest

    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI must run this test: add it to .ci/run")
        pytest.skip(why)
    return path


# The channel of Asterisk 22.10.1's PJSIP guest calls in the captures (tests/data:
# agi-env-pjsip.bin, agi-pjsip-sessions.txt), as their env blocks show it.
PJSIP_CAPTURED: dict[str, Any] = {
    "channel_type": "PJSIP",
    "calleridname": "lab",
    "priority": 2,
    "threadid": "140652476180160",
}


def pjsip_captured_call() -> Call:
    """The first captured PJSIP call (the env block of tests/data/agi-env-pjsip.bin), so
    the emulator can be held to Asterisk's bytes."""
    return Call(source="127.0.0.40", exten="123456", uniqueid="1796211540.0", **PJSIP_CAPTURED)


def place_calls(target: str, calls: list[Call]) -> list[CallResult]:
    """Screened calls to a running service (a real process), one after the other, as
    Asterisk places them."""

    async def main() -> list[CallResult]:
        asterisk = FakeAsterisk(hold_limit=10)
        return [await asterisk.call(target, call) for call in calls]

    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Running:
    target: str
    store: Store
    server: FastAGIServer
    config: configuration.Config

    async def call(self, call: Call | None = None, route: str = "screen") -> CallResult:
        base = self.target.rsplit("/", 1)[0]
        return await FakeAsterisk(hold_limit=self.config.server.session_timeout + 5).call(
            f"{base}/{route}", call or Call(source="203.0.113.7")
        )


def settings(redis_url: str = "memory://", **overrides: str) -> configuration.Config:
    environ = {"FASTAGI_REDIS_URL": redis_url, "FASTAGI_SCREENING_PBX_ID": "pbx-test"}
    for key, value in overrides.items():
        environ[f"FASTAGI_{key.upper()}"] = value
    return configuration.load(None, environ)


@contextlib.asynccontextmanager
async def running_server(
    redis_url: str = "memory://",
    protected: Protected | None = None,
    metrics: Any = None,
    **overrides: str,
) -> AsyncIterator[Running]:
    """A server on a free port; memory:// gives a private in-process fakeredis.
    `protected`: a protected set of the test's own (default: this host's, from config);
    `metrics`: a metrics.Metrics observing it, as `serve` has one."""
    config = settings(redis_url, **overrides)
    if not redis_url.startswith("memory://"):
        store = make_service_store(config)  # as `serve` has it
    else:
        store = make_embedded_store(config, fakeredis.FakeServer())
    if protected is not None:
        store.protected = protected
    server = make_server(config, store, metrics)  # as `serve` builds it
    host, port = (await server.start("127.0.0.1", 0))[0]
    try:
        yield Running(f"agi://{host}:{port}/screen", store, server, config)
    finally:
        await server.stop()
        await store.close()

"""The long-running commands, `serve` and `agent`, and how they build the store and
the server (tests and benches build them the same way)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import fakeredis
import fakeredis.aioredis
from redis.asyncio import BlockingConnectionPool

from fastagi import config as configuration
from fastagi import logs
from fastagi.agent import Agent
from fastagi.config import Config, redacted
from fastagi.embedded import EmbeddedRedis
from fastagi.keys import Keys
from fastagi.redis_link import SharedLink
from fastagi.store import Policy, Store, StoreError, redis_client

if TYPE_CHECKING:
    from fastagi.auth import AuthWatcher
    from fastagi.server import FastAGIServer

log = logging.getLogger("fastagi")

EMBEDDED_SPARE_CONNECTIONS = 16  # beyond max_sessions: the agent, /metrics, startup


class ServiceUsageError(Exception):
    """A long-running command asked for something this config cannot give: exit 2."""


# -- the store, as the service or as a client of a running service ---------------


def make_store(config: Config, client: Any, link: SharedLink | None = None) -> Store:
    return Store(
        client,
        Keys(config.redis.key_prefix),
        Policy.from_config(config.screening),
        configuration.pbx_id(config),
        wait=(config.redis.wait_replicas, config.redis.wait_timeout),
        link=link,
    )


def make_service_store(config: Config) -> Store:
    """The service's store on a shared Redis: no per-command socket timeout (every
    caller has a deadline) and, unless Cluster or WAIT needs redis-py's own client,
    one connection shared by the screening steps (redis_link.py)."""
    client = redis_client(config.redis, caller_deadlines=True)
    link = None
    if not config.redis.cluster and not config.redis.wait_replicas:
        link = SharedLink(client.connection_pool.make_connection)
    return make_store(config, client, link)


def make_embedded_store(config: Config, server: fakeredis.FakeServer) -> Store:
    """The service's store on the in-process fakeredis (memory://).

    Every screening step in flight holds one of the client's connections, and
    fakeredis's default pool fails past 100 (`Too many connections`: 50 of 150
    concurrent calls got ERROR, far below max_sessions). So the pool is sized from
    max_sessions, with room for the agent and /metrics, and would wait rather than fail
    (each caller has its deadline). A fake connection costs no socket. The shared
    connection of a real Redis (redis_link.py) costs ~10% more CPU per call here: its
    reader task wakes once per reply."""
    client = fakeredis.aioredis.FakeRedis(
        server=server,
        connection_pool_class=BlockingConnectionPool,
        max_connections=config.server.max_sessions + EMBEDDED_SPARE_CONNECTIONS,
    )
    return make_store(config, client)


def make_server(config: Config, store: Store, metrics: Any = None) -> FastAGIServer:
    """The FastAGI server and its screener as `serve` runs them; `metrics` observes both.

    The Redis step gets at most half of a session and three `redis.timeout`s, so a
    slow Redis still leaves time to answer Asterisk."""
    from fastagi.screening import Screener
    from fastagi.server import FastAGIServer

    server = config.server
    redis_budget = min(server.session_timeout / 2, 3 * config.redis.timeout)
    screening = config.screening
    screener = Screener(store, screening.ignore, screening.log_notice, redis_budget, metrics)
    return FastAGIServer(
        screener,
        server.allowed_clients,
        server.max_sessions,
        server.session_timeout,
        observer=metrics,
    )


# -- long-running commands ---------------------------------------------------------


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _setup_logging() -> None:
    logs.setup(os.environ.get("FASTAGI_LOG_LEVEL", "INFO"))


def run_service(main: Coroutine[Any, Any, int]) -> int:
    """Long-running commands run on uvloop (about 17% less CPU per session than the
    default loop in bench/), the short ones on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def open_service_store(config: Config) -> tuple[Store, EmbeddedRedis | None]:
    if config.redis.url.startswith("memory://"):
        embedded = EmbeddedRedis(config.runtime_dir())
        embedded.start()
        return make_embedded_store(config, embedded.server), embedded
    store = make_service_store(config)
    try:
        async with asyncio.timeout(max(1.0, 4 * config.redis.timeout)):
            await store.ping()
    except TimeoutError:
        log.warning("Redis did not answer; serving anyway, calls get SCREEN_RESULT=ERROR")
    except StoreError as error:
        log.warning("%s; serving anyway, calls get SCREEN_RESULT=ERROR until it answers", error)
    return store, None


async def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from fastagi import metrics as service_metrics

    _setup_logging()
    store, embedded = await open_service_store(config)
    try:
        metrics = await service_metrics.start(config.metrics.listen, store)
    except OSError as error:
        await store.close()
        if embedded is not None:
            embedded.stop()
        raise OSError(f"[metrics] listen {config.metrics.listen}: {error.strerror}") from None
    server_cfg = config.server
    server = make_server(config, store, metrics)
    agent = watcher = None
    try:
        bound = await server.start(*server_cfg.listen)
        if not args.no_agent:
            agent = await _start_agent(config, store)
        if config.auth.enabled:
            watcher = start_watcher(config, store, metrics)
        where = ", ".join(f"{h}:{p}" for h, p in bound)
        log.info(
            "fastagi-screen listening on %s (store %s, firewall %s%s%s)",
            where,
            redacted(config.redis.url),
            config.firewall.backend,
            "" if agent else ", no agent",
            f", AMI {config.auth.host}:{config.auth.port}" if watcher else "",
        )
        await _until_signalled()
    finally:
        await server.stop()
        await stop_watcher(watcher)
        await _stop_agent(agent)
        if metrics is not None:
            metrics.close()
        await store.close()
        if embedded is not None:
            embedded.stop()
    return 0


def start_watcher(config: Config, store: Store, metrics: Any) -> tuple[AuthWatcher, asyncio.Task]:
    """The password-guessing watcher (auth.py) as a task of this loop, on `store`."""
    from fastagi.auth import make_watcher

    watcher = make_watcher(config, store, metrics.registry if metrics is not None else None)
    return watcher, asyncio.create_task(watcher.run(), name="auth-watcher")


async def stop_watcher(running: tuple[AuthWatcher, asyncio.Task] | None) -> None:
    if running is not None:
        watcher, task = running
        watcher.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    """The watcher alone, for a PBX whose FastAGI service runs elsewhere (or not at
    all): counts into the shared Redis, or into a running embedded service."""
    from fastagi import metrics as service_metrics
    from fastagi.admin import client_store
    from fastagi.config import ConfigError

    if not config.auth.enabled:
        raise ConfigError("auth.enabled: watch needs [auth] enabled = true and its AMI user")
    _setup_logging()
    async with client_store(config) as store:
        try:
            metrics = await service_metrics.start(config.metrics.listen, None)
        except OSError as error:
            raise OSError(f"[metrics] listen {config.metrics.listen}: {error.strerror}") from None
        watcher = start_watcher(config, store, metrics)
        try:
            await _until_signalled()
        finally:
            await stop_watcher(watcher)
            if metrics is not None:
                metrics.close()
    return 0


# The agent waits on the event stream this long per read; its own client's timeout is
# longer than that (the per-call budget of `redis.timeout` is for Asterisk's sessions).
AGENT_BLOCK_MS = 500


async def _start_agent(
    config: Config, store: Store | None
) -> tuple[Agent, asyncio.Task, Store | None]:
    """The agent, on the service's store (embedded) or on a Redis client of its own."""
    from fastagi.firewall import create

    own_store = None
    block_ms = None  # the embedded store cannot block: the agent polls it
    if not config.redis.url.startswith("memory://"):
        timeout = AGENT_BLOCK_MS / 1000 + max(1.0, 4 * config.redis.timeout)
        own_store = store = make_store(config, redis_client(replace(config.redis, timeout=timeout)))
        block_ms = AGENT_BLOCK_MS
    assert store is not None
    agent = Agent(
        store,
        create(config.firewall.settings()),
        config.firewall.sync_interval,
        config.screening.ignore,
        block_ms=block_ms,
    )
    return agent, asyncio.create_task(agent.run(), name="agent"), own_store


async def _stop_agent(running: tuple[Agent, asyncio.Task, Store | None] | None) -> None:
    if running is not None:
        agent, task, own_store = running
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        if own_store is not None:
            await own_store.close()


async def cmd_agent(args: argparse.Namespace, config: Config) -> int:
    if config.redis.url.startswith("memory://"):
        raise ServiceUsageError(
            "agent needs a shared Redis ([redis] url); with memory:// use serve"
        )
    from fastagi import metrics as service_metrics

    _setup_logging()
    try:
        metrics = await service_metrics.start(config.metrics.listen, None)
    except OSError as error:
        raise OSError(f"[metrics] listen {config.metrics.listen}: {error.strerror}") from None
    agent = await _start_agent(config, None)
    try:
        await _until_signalled()
    finally:
        await _stop_agent(agent)
        if metrics is not None:
            metrics.close()
    return 0

"""The long-running commands, `serve` and `agent`, and how they build the store and
the server (tests and benches build them the same way)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import fakeredis
import fakeredis.aioredis
from redis.asyncio import BlockingConnectionPool

from fastagi import config as configuration
from fastagi import logs
from fastagi import metrics as service_metrics
from fastagi.agent import Agent
from fastagi.config import Config, redacted
from fastagi.embedded import EmbeddedRedis, NativeScreen, newest_event
from fastagi.export import Exporter
from fastagi.keys import Keys
from fastagi.protect import Protected
from fastagi.redis_link import SharedLink
from fastagi.store import (
    MIN_REDIS,
    Link,
    Policy,
    RedisFacts,
    Store,
    StoreError,
    redis_client,
    version_tuple,
)

if TYPE_CHECKING:
    from fastagi.auth import AuthWatcher
    from fastagi.feeds import FeedRunner
    from fastagi.firewall import Firewall
    from fastagi.notify import Notifier
    from fastagi.server import FastAGIServer

log = logging.getLogger("fastagi")

EMBEDDED_SPARE_CONNECTIONS = 16  # beyond max_sessions: the agent, /metrics, startup


class ServiceUsageError(Exception):
    """A long-running command asked for something this config cannot give: exit 2."""


class RedisTooOld(StoreError):
    """The shared Redis lacks what the scripts need: exit 1, one line."""


# -- the shared Redis: version and persistence -----------------------------------------

MIN_REDIS_TEXT = ".".join(map(str, MIN_REDIS))


def persistence_problem(facts: RedisFacts) -> str | None:
    """What a restart of this Redis would cost, in one line; None when it keeps its data."""
    if facts.appendonly:
        return None
    refused = "; ".join(facts.refused)
    if facts.appendonly is None:
        return (
            f"cannot tell whether Redis keeps its data over a restart ({refused or 'no answer'})"
            ": make sure it runs with appendonly yes"
        )
    fix = "set appendonly yes, appendfsync everysec (README: Install on a PBX)"
    if facts.save:
        return (
            f"Redis keeps snapshots only (appendonly no, save {facts.save!r}): a crash loses "
            f"the bans since the last one; {fix}"
        )
    settings = f"appendonly no; {refused}" if refused else "appendonly no, save ''"
    return (
        f"Redis has no persistence ({settings}): a restart loses every ban record, history "
        f"and count (agents write back the bans they applied); {fix}"
    )


def too_old(error: StoreError, where: str) -> RedisTooOld | None:
    """A Redis before 6.0 refuses the client's first command, HELLO (RESP3): then say
    that, not "ping failed"."""
    text = str(error).lower()
    if "unknown command" in text and "hello" in text:
        return RedisTooOld(
            f"Redis at {where} does not know HELLO, so it is older than 6.0: fastagi-screen "
            f"needs Redis {MIN_REDIS_TEXT} or later"
        )
    return None


async def check_shared_redis(store: Store, config: Config) -> None:
    """At start: refuse a Redis older than MIN_REDIS, warn when it keeps no data."""
    where = redacted(config.redis.url)
    try:
        facts = await store.redis_facts()
    except StoreError as error:
        raise too_old(error, where) or error from None
    if facts.version is None:
        log.warning(
            "cannot read the Redis version at %s (%s); fastagi-screen needs %s or later",
            where,
            "; ".join(facts.refused),
            MIN_REDIS_TEXT,
        )
    elif version_tuple(facts.version) < MIN_REDIS:
        raise RedisTooOld(
            f"Redis {facts.version} at {where} is too old: fastagi-screen needs Redis "
            f"{MIN_REDIS_TEXT} or later (RESP3, streams, scripts replicated by their effects)"
        )
    if problem := persistence_problem(facts):
        log.warning("%s: %s", where, problem)


# -- the store, as the service or as a client of a running service ---------------


def make_store(
    config: Config,
    client: Any,
    link: Link | None = None,
    protected: Protected | None = None,
    newest_event: Callable[[str], str | None] | None = None,
) -> Store:
    """The store with its guard: `protected` (default: this host's set, names not yet
    resolved) is never written to the ban list."""
    return Store(
        client,
        Keys(config.redis.key_prefix),
        Policy.from_config(config.screening),
        configuration.pbx_id(config),
        wait=(config.redis.wait_replicas, config.redis.wait_timeout),
        link=link,
        protected=protected or Protected.from_config(config),
        newest_event=newest_event,
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
    reader task wakes once per reply. The screening step itself runs in Python on the
    data unless it bans (embedded.NativeScreen: the Lua step cost ~1.3 ms a call)."""
    client = fakeredis.aioredis.FakeRedis(
        server=server,
        connection_pool_class=BlockingConnectionPool,
        max_connections=config.server.max_sessions + EMBEDDED_SPARE_CONNECTIONS,
    )
    return make_store(
        config, client, NativeScreen(server, client), newest_event=partial(newest_event, server)
    )


def make_server(config: Config, store: Store, metrics: Any = None) -> FastAGIServer:
    """The FastAGI server and its screener as `serve` runs them; `metrics` observes both.

    The Redis step gets at most half of a session and three `redis.timeout`s, so a
    slow Redis still leaves time to answer Asterisk."""
    from fastagi.escalate import Escalation
    from fastagi.geo import Countries
    from fastagi.screening import Screener
    from fastagi.server import FastAGIServer

    server = config.server
    redis_budget = min(server.session_timeout / 2, 3 * config.redis.timeout)
    screening = config.screening
    screener = Screener(
        store,
        screening.ignore,
        screening.log_notice,
        redis_budget,
        metrics,
        protected=store.protected,
        prefixes=screening.prefixes(),
        escalation=Escalation(screening.escalate_prefix, screening.escalate_after),
        countries=Countries.from_config(screening),
        notice_by=screening.notice_by,
    )
    return FastAGIServer(
        screener,
        server.allowed_clients,
        server.max_sessions,
        server.session_timeout,
        observer=metrics,
        key=server.key,
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
        embedded = EmbeddedRedis(
            config.runtime_dir(), config.state_dir(), Keys(config.redis.key_prefix)
        )
        embedded.start()
        return make_embedded_store(config, embedded.server), embedded
    store = make_service_store(config)
    try:
        async with asyncio.timeout(max(1.0, 4 * config.redis.timeout)):
            await store.ping()
            await check_shared_redis(store, config)
    except RedisTooOld:
        await store.close()
        raise
    except StoreError as error:
        if old := too_old(error, redacted(config.redis.url)):
            await store.close()
            raise old from None
        log.warning("%s; serving anyway, calls get SCREEN_RESULT=ERROR until it answers", error)
    except TimeoutError:
        log.warning("Redis did not answer; serving anyway, calls get SCREEN_RESULT=ERROR")
    return store, None


async def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from fastagi import web  # imports status and admin, which import us

    _setup_logging()
    firewall = None if args.no_agent else await _claimed_firewall(config)
    store, embedded = await open_service_store(config)
    exporter = Exporter(store, config.export.max_entries, config.export.refresh)
    try:
        pages = web.pages(store, config) if config.metrics.listen else {}
        if config.export.pages:
            pages.update(exporter.pages())
        metrics = await start_metrics("listen", config.metrics.listen, store, pages)
    except ServiceUsageError:
        await store.close()
        if embedded is not None:
            embedded.stop()
        raise
    server_cfg = config.server
    server = make_server(config, store, metrics)
    protected = store.protected
    assert protected is not None
    protected.discover = store.nodes  # the nodes behind a Sentinel or Cluster, if any
    agent = watcher = feeds = notifier = None
    try:
        await protected.start()
        bound = await server.start(*server_cfg.listen)
        if firewall is not None:
            agent = await _start_agent(config, store, firewall, protected)
        if config.intel.feed:
            feeds = start_feeds(config, store, protected, metrics, embedded is not None)
        if config.auth.enabled:
            watcher = start_watcher(config, store, metrics)
        notifier = start_notifier(config, store, protected, metrics)
        where = ", ".join(f"{h}:{p}" for h, p in bound)
        log.info(
            "fastagi-screen listening on %s (store %s, firewall %s%s%s)",
            where,
            redacted(config.redis.url),
            config.firewall.backend,
            "" if agent else ", no agent",
            f", AMI {config.auth.host}:{config.auth.port}" if watcher else "",
        )
        # What start-up made lives as long as the service: out of the collector's way.
        # Its full passes walked all of it, ~8% of a session's CPU (callgrind, issue 14).
        gc.freeze()
        await _until_signalled()
    finally:
        await server.stop()
        await stop_notifier(notifier)
        if feeds is not None:
            await feeds.stop()
        await stop_watcher(watcher)
        await _stop_agent(agent)
        await protected.stop()
        if metrics is not None:
            metrics.close()
        await store.close()
        if embedded is not None:
            embedded.stop()
    return 0


def start_feeds(
    config: Config, store: Store, protected: Protected, metrics: Any, embedded: bool
) -> FeedRunner:
    """The `[[intel.feed]]` refreshes (feeds.py), as tasks of this loop on `store`."""
    from fastagi.feeds import FeedRunner

    runner = FeedRunner(store, protected, config.intel.feed, embedded, metrics)
    runner.start()
    return runner


async def start_metrics(
    key: str, listen: str, store: Store | None, pages: Mapping[str, Any] | None = None
) -> Any:
    """This role's /metrics on `[metrics] <key>` (None when empty). An address already
    taken is a configuration error (exit 2, one line): restarting the unit cannot free
    it, and on a PBX it is usually the other role's (serve: `listen`, agent:
    `agent_listen`)."""
    try:
        return await service_metrics.start(listen, store, pages)
    except OSError as error:
        hint = ""
        if error.errno == errno.EADDRINUSE:
            hint = " (serve and agent on one host need one each: listen, agent_listen)"
        # asyncio's strerror repeats the address: the C library's text is enough
        reason = os.strerror(error.errno) if error.errno else str(error)
        message = f"metrics.{key}: cannot listen on {listen}: {reason}{hint}"
        raise ServiceUsageError(message) from None


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
    from fastagi.admin import client_store
    from fastagi.config import ConfigError

    if not config.auth.enabled:
        raise ConfigError("auth.enabled: watch needs [auth] enabled = true and its AMI user")
    _setup_logging()
    async with client_store(config) as store:
        metrics = await start_metrics("listen", config.metrics.listen, None)
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
RESTART_FIRST = 1.0  # seconds before the first restart of an agent that died
RESTART_MAX = 60.0  # the backoff's cap
RESTART_HEALTHY = 300.0  # an agent that ran this long starts its backoff afresh


async def supervised(agent: Agent, first: float = RESTART_FIRST) -> None:
    """Run the agent until it is stopped. When it dies of an error nobody expected (a
    bug, an input no check foresaw), say so in one ERROR line with the cause, count it
    and start it again after a backoff, instead of leaving a service that answers
    Asterisk while bans silently stop reaching the firewall."""
    delay = first
    restarts = 0
    while True:
        started = time.monotonic()
        try:
            await agent.run()
            return  # stopped
        except Exception as error:
            if agent.stopping:
                return
            if time.monotonic() - started > RESTART_HEALTHY:
                delay = first
            restarts += 1
            log.error(
                "agent died: %s: %s; restart #%d in %gs",
                type(error).__name__,
                str(error)[:200] or "(no message)",
                restarts,
                delay,
            )
            service_metrics.agent_restarted(agent.store.pbx_id)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX)


async def _claimed_firewall(config: Config) -> Firewall:
    """The configured backend, once it is clear that no chain/table/set of our name is
    someone else's: that stops the start (one line, exit 2) before the service listens
    or anything is touched. Other firewall trouble the agent retries and logs."""
    from fastagi.firewall import FirewallConflict, FirewallError, create

    firewall = create(config.firewall.settings())
    try:
        await asyncio.to_thread(firewall.claim)
    except FirewallConflict as error:
        raise ServiceUsageError(str(error)) from None
    except FirewallError as error:
        log.warning("firewall: %s; the agent keeps trying", error)
    return firewall


async def teardown_firewall(config: Config) -> int:
    """`agent --teardown`: this host's chain/table/sets of `firewall.chain` and their bans
    removed, for leaving for good (before the package is purged: the bans outlive a
    stopped agent by design). Only objects fastagi-screen made: one of that name made by
    someone else is refused (exit 2, one line), as at start; no store is needed."""
    from fastagi.firewall import FirewallConflict, FirewallError, create

    _setup_logging()
    firewall = create(config.firewall.settings())
    try:
        await asyncio.to_thread(firewall.teardown)
    except FirewallConflict as error:
        raise ServiceUsageError(str(error)) from None
    except FirewallError as error:
        raise OSError(f"firewall {config.firewall.backend}: {error}") from None
    return 0


def _reader_timeout(config: Config) -> float:
    """The client timeout of an event-stream reader: a blocking read, then Redis's own."""
    return AGENT_BLOCK_MS / 1000 + max(1.0, 4 * config.redis.timeout)


def reader_store(config: Config, protected: Protected) -> Store:
    """A store of its own for a reader of the event stream (the agent, the notifier) on
    a shared Redis: its blocking reads need a client timeout longer than the block, and
    must not hold the screening steps' connections."""
    client = redis_client(replace(config.redis, timeout=_reader_timeout(config)))
    return make_store(config, client, protected=protected)


def start_notifier(
    config: Config, store: Store | None, protected: Protected, metrics: Any
) -> tuple[Notifier, Store | None] | None:
    """The webhooks (notify.py), when any is configured: on the embedded store (polled)
    or on a Redis client of their own."""
    from fastagi.notify import READ_BLOCK_MS, Notifier

    if not config.notify.webhook:
        return None
    own_store = None
    block_ms: int | None = None
    if not config.redis.url.startswith("memory://"):
        own_store = store = reader_store(config, protected)
        block_ms = READ_BLOCK_MS
    assert store is not None
    registry = metrics.registry if metrics is not None else None
    notifier = Notifier(config.notify.webhook, store, registry, block_ms)
    notifier.start()
    return notifier, own_store


async def stop_notifier(running: tuple[Notifier, Store | None] | None) -> None:
    if running is not None:
        notifier, own_store = running
        await notifier.stop()
        if own_store is not None:
            await own_store.close()


async def _start_agent(
    config: Config,
    store: Store | None,
    firewall: Firewall,
    protected: Protected,
    check: bool = False,
) -> tuple[Agent, asyncio.Task, Store | None]:
    """The agent, on the service's store (embedded) or on a Redis client of its own;
    `check`: the Redis version first (`agent`; `serve` checked its own store)."""
    own_store = None
    block_ms = None  # the embedded store cannot block: the agent polls it
    if not config.redis.url.startswith("memory://"):
        own_store = store = reader_store(config, protected)
        block_ms = AGENT_BLOCK_MS
        timeout = _reader_timeout(config)
        if check:
            try:
                async with asyncio.timeout(timeout):
                    await check_shared_redis(own_store, config)
            except RedisTooOld:
                await own_store.close()
                raise
            except (StoreError, TimeoutError) as error:  # the agent retries by itself
                log.warning("cannot check the Redis version now: %s", error or "no answer")
    assert store is not None
    if protected.discover is None:  # the agent's own store: ask it before applying anything
        protected.discover = store.nodes
        await protected.refresh()
    agent = Agent(
        store,
        firewall,
        config.firewall.sync_interval,
        config.screening.ignore,
        block_ms=block_ms,
        protected=protected,
    )
    return agent, asyncio.create_task(supervised(agent), name="agent"), own_store


async def _stop_agent(running: tuple[Agent, asyncio.Task, Store | None] | None) -> None:
    if running is not None:
        agent, task, own_store = running
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        if own_store is not None:
            await own_store.close()


async def cmd_agent(args: argparse.Namespace, config: Config) -> int:
    if args.teardown:
        return await teardown_firewall(config)
    if config.redis.url.startswith("memory://"):
        raise ServiceUsageError(
            "agent needs a shared Redis ([redis] url); with memory:// use serve"
        )
    _setup_logging()
    firewall = await _claimed_firewall(config)
    metrics = await start_metrics("agent_listen", config.metrics.agent_listen, None)
    if metrics is None and config.metrics.listen:
        log.info("agent: no /metrics of its own ([metrics] agent_listen empty, listen is serve's)")
    protected = Protected.from_config(config)
    await protected.start()
    try:
        agent = await _start_agent(config, None, firewall, protected, check=True)
    except RedisTooOld:
        if metrics is not None:
            metrics.close()
        raise
    notifier = start_notifier(config, None, protected, metrics)
    try:
        await _until_signalled()
    finally:
        await stop_notifier(notifier)
        await _stop_agent(agent)
        await protected.stop()
        if metrics is not None:
            metrics.close()
    return 0

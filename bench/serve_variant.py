"""`fastagi-ctl serve` with one thing changed, to measure what a change would buy.

    python bench/serve_variant.py [--uvloop] [--plain-pool] [--lean-logging] -- serve --no-agent

Same config, environment and code as `fastagi-ctl`, except:
- `--uvloop`: the event loop is uvloop's (pip install uvloop);
- `--lean-logging`: logging without caller lookup and thread/process names;
- `--plain-pool`: the store's Redis client uses redis-py's plain ConnectionPool and no
  per-command socket_timeout (the screening step is already bounded by its own
  asyncio.timeout), instead of the BlockingConnectionPool with socket_timeout, whose
  every send goes through `asyncio.wait_for` (a task per command).
Used by bench/run_all.py --variants; not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--plain-pool", action="store_true")
    parser.add_argument("--lean-logging", action="store_true")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.lean_logging:
        import logging

        # The logging HOWTO's "Optimization": no caller lookup (a stack walk per
        # record), no thread/process names; the service's format uses none of them.
        logging._srcfile = None
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.plain_pool:
        import redis.asyncio as aioredis

        from fastagi import cli, store

        def plain_client(config):
            return aioredis.Redis.from_url(
                config.url, socket_connect_timeout=config.timeout, max_connections=store.POOL_SIZE
            )

        cli.redis_client = plain_client
    from fastagi.cli import main as ctl

    return ctl(rest)


if __name__ == "__main__":
    sys.exit(main())

"""The ban list out at size: N bans exported as text, CrowdSec decisions and JSON.

    python bench/export_load.py --redis redis://127.0.0.1:6379/15 --bans 100000

Writes N bans (with records and holds, as a write-back does) into the given Redis
database, which it FLUSHES first (use a database of its own), then renders each format
three times as the service's pages do and prints the wall time, the CPU time, the body
size and the longest stall of a 5 ms ticker on the same loop (the loop that would be
answering Asterisk meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastagi import config as configuration  # noqa: E402
from fastagi import export  # noqa: E402
from fastagi.service import make_service_store  # noqa: E402


async def ticker(gaps: list[float]) -> None:
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def main(url: str, bans: int) -> None:
    config = configuration.load(None, {"FASTAGI_REDIS_URL": url})
    store = make_service_store(config)
    export.BUDGET = 600.0  # measure, do not refuse
    try:
        await store.redis.flushdb()
        now = time.time()
        targets = {
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}": now + 3600 + i % 1000
            for i in range(bans)
        }
        await store.restore_bans(targets, "bench")
        for fmt in ("txt", "crowdsec", "json"):
            for _ in range(3):
                gaps: list[float] = []
                tick = asyncio.create_task(ticker(gaps))
                wall, cpu = time.perf_counter(), time.process_time()
                body = await export.render(store, fmt, bans)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                tick.cancel()
                print(
                    f"{fmt:8} {bans} bans: {wall * 1000:6.0f} ms wall, {cpu * 1000:5.0f} ms CPU, "
                    f"{len(body):>9} bytes, longest loop stall {max(gaps, default=0) * 1000:.0f} ms"
                )
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="a database of its own: it is flushed")
    parser.add_argument("--bans", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.bans))

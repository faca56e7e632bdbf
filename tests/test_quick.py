"""quick.py: a clean call screened from the connection's callbacks, with no task, does
exactly what the task would have done, and anything else is handed to the task at the
step it reached. Every case runs twice, through the server as it runs with a real Redis
(every session a task) and as it runs on the embedded store (quick), over the fuzz
harness's in-memory Asterisk: what the server sent Asterisk, what it counted and how
each session ended must be the same, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from fastagi import quick
from fuzz.harness import (
    REAL_HEAD,
    REAL_MIDDLE,
    REAL_TAIL,
    Case,
    Fuzzer,
    Reply,
    random_case,
)
from tests.test_fuzz_agi import cases

CLEAN_CALLERS = ["192.0.2.17", "192.0.2.18", "2001:db8:1::17", "127.0.0.6"]


@pytest.fixture(autouse=True)
def _restore_log_level():
    logger = logging.getLogger("fastagi")
    level = logger.level
    yield
    logger.setLevel(level)


def _clean_case(rng: random.Random) -> Case:
    """A scanner's call as Asterisk makes it: a clean block, the true answer, MSet done;
    now and then a HANGUP, a -2 (no MSet) or a close at one of the steps."""
    caller = rng.choice(CLEAN_CALLERS)
    kind = rng.choice([b"SIP", b"PJSIP"])
    exten = rng.choice([b"7001", b"011972595551234", b"100"])
    env = REAL_HEAD.replace(b"{type}", kind) + exten + REAL_MIDDLE + exten + REAL_TAIL + b"\n"
    answer = caller.encode()
    if kind == b"PJSIP":
        answer = (f"[{caller}]" if ":" in caller else caller).encode() + b":5060"
    resync = Reply(true_answer=answer)
    mset = Reply(before=b"200 result=0\n")
    roll = rng.random()
    if roll < 0.05:
        resync.before = b"HANGUP\n"
    elif roll < 0.10:
        mset.before = b"HANGUP\n200 result=0\n"
    elif roll < 0.13:
        mset.before = b"200 result=-2\n"  # an Asterisk without MSet: SET VARIABLE each
    elif roll < 0.16:
        resync.eof = True
    elif roll < 0.19:
        mset = Reply(eof=True)
    return Case(env, caller, [resync, mset], eof_after=rng.random() < 0.5)


@contextlib.contextmanager
def _hand_overs() -> Iterator[Counter]:
    """Counts quick sessions handed to a task, by the step they had reached."""
    handed: Counter = Counter()
    to_task = quick.QuickSession._to_task

    def counting(self, steps):
        handed[self.step.__name__] += 1
        to_task(self, steps)

    quick.QuickSession._to_task = counting  # type: ignore[method-assign]
    try:
        yield handed
    finally:
        quick.QuickSession._to_task = to_task  # type: ignore[method-assign]


def _both(case_list: list[Case], store: str = "quick") -> tuple[Fuzzer, Fuzzer, Counter]:
    """Both servers on the same cases; how the quick one handed sessions over. `store`:
    "quick" the embedded store's step, "soon" a real Redis's (its reply later)."""
    tasks, quicks = Fuzzer(), Fuzzer(quick=store == "quick", soon=store == "soon")

    async def main():
        for case in case_list:
            await tasks.run_case(case)
            await quicks.run_case(case)

    with _hand_overs() as handed:
        asyncio.run(main())
    return tasks, quicks, handed


def _same(tasks: Fuzzer, quicks: Fuzzer, case_list: list[Case]) -> None:
    for n, (a, b) in enumerate(zip(tasks.transcript, quicks.transcript, strict=True)):
        assert a == b, f"case {n} differs: {case_list[n]!r}"
    a, b = tasks.server.stats, quicks.server.stats
    assert (a.results, a.protocol_errors, a.injections, a.timeouts, a.sessions, a.active) == (
        b.results,
        b.protocol_errors,
        b.injections,
        b.timeouts,
        b.sessions,
        b.active,
    )
    assert tasks.store.counts == quicks.store.counts


@pytest.mark.parametrize("store", ["quick", "soon"])
def test_clean_calls_screened_without_a_task_send_and_count_exactly_what_the_task_does(store):
    rng = random.Random(14)
    case_list = [_clean_case(rng) for _ in range(2000)]
    tasks, quicks, handed = _both(case_list, store)
    _same(tasks, quicks, case_list)
    sessions = quicks.server.stats.sessions
    # most sessions never became a task; each kind of trouble was handed over at its step
    assert sum(handed.values()) < sessions // 3
    assert {"_resynced", "_answered"} <= set(handed)
    # calls were counted and banned (the ban's step is the script's: awaited, in a task)
    assert {"COUNTED", "BANNED", "IGNORED"} <= set(quicks.server.stats.results)
    assert quicks.store.counts == tasks.store.counts and max(quicks.store.counts.values()) > 5


@pytest.mark.parametrize("store", ["quick", "soon"])
def test_any_input_is_handed_over_and_ends_as_the_task_ends_it(store):
    rng = random.Random(1414)
    case_list = [random_case(rng) for _ in range(4000)]
    tasks, quicks, handed = _both(case_list, store)
    _same(tasks, quicks, case_list)
    assert {"_environment", "_resynced", "_answered"} <= set(handed)
    stats = quicks.server.stats
    assert stats.protocol_errors > 100 and stats.injections > 100


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_property_both_paths_agree_on_any_input(case):
    for store in ("quick", "soon"):
        tasks, quicks, _ = _both([case], store)
        _same(tasks, quicks, [case])


def test_a_quick_session_that_gets_no_answer_ends_at_session_timeout():
    env = REAL_HEAD.replace(b"{type}", b"SIP") + b"7001" + REAL_MIDDLE + b"7001" + REAL_TAIL
    silent = Case(env + b"\n", "192.0.2.17", [], eof_after=False)
    fuzzer = Fuzzer(session_timeout=0.2, quick=True)
    fuzzer.store.screened.clear()

    async def main():
        from fastagi.agi import MAX_LINE, SessionStream
        from fuzz.harness import FakeAsteriskTransport

        server = fuzzer.server
        stream = SessionStream(limit=MAX_LINE, opened=server._opened)
        transport = FakeAsteriskTransport(stream, silent)
        transport._answer = lambda command: None  # Asterisk never answers the resync
        stream.connection_made(transport)  # type: ignore[arg-type]
        stream.data_received(silent.env)
        assert stream.listener is not None and stream.task is None  # quick, waiting
        await asyncio.sleep(0.5)
        assert stream.task is not None and stream.task.done()
        assert transport.closed

    asyncio.run(main())
    stats = fuzzer.server.stats
    assert (stats.timeouts, stats.active, fuzzer.store.screened) == (1, 0, [])


def test_a_real_redis_step_sent_from_the_callbacks_survives_a_script_flush_and_a_stall(
    own_redis,
):
    """On a real Redis (one shared connection) the step goes out from the callbacks too.
    NOSCRIPT (a SCRIPT FLUSH) hands the call to a task, which loads the script: counted
    once. A stalled Redis (SIGSTOP) answers nothing: the call gets ERROR with its count
    unknown at the store budget, well within session_timeout, the link is dropped, and
    once Redis resumes the next call is counted on a fresh connection."""
    import os
    import signal
    import time

    from fastagi.emulator import Call, FakeAsterisk
    from tests.harness import running_server

    async def main():
        asterisk = FakeAsterisk(hold_limit=10.0)
        overrides = {
            "redis_timeout": "0.2s",
            "server_session_timeout": "3s",
            "screening_threshold": "100",
        }
        async with running_server(own_redis.url, **overrides) as running:
            assert running.server.quick and running.store.soon

            async def call() -> tuple[dict, float]:
                started = time.monotonic()
                result = await asterisk.call(running.target, Call(source="198.51.100.7"))
                return result.variables, time.monotonic() - started

            first, _ = await call()
            assert (first["SCREEN_RESULT"], first["SCREEN_COUNT"]) == ("COUNTED", "1")
            assert handed == {"_resynced": 1}  # no connection yet: a task makes it
            second, _ = await call()
            assert (second["SCREEN_RESULT"], second["SCREEN_COUNT"]) == ("COUNTED", "2")
            assert handed == {"_resynced": 1}  # screened without a task
            own_redis.client().script_flush()
            third, _ = await call()
            assert (third["SCREEN_RESULT"], third["SCREEN_COUNT"]) == ("COUNTED", "3")
            assert handed == {"_resynced": 1, "_counting": 1}  # NOSCRIPT: a task loads it
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            try:
                stalled, seconds = await call()
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            assert (stalled["SCREEN_RESULT"], stalled["SCREEN_COUNTED"]) == ("ERROR", "unknown")
            assert 0.5 <= seconds < 2.0  # the budget (3 x 0.2 s), not session_timeout
            assert handed == {"_resynced": 1, "_counting": 1}  # the budget, in the callbacks
            fifth, _ = await call()
            # the stalled step ran when Redis resumed: this is the fifth count, on a new
            # connection (the stalled one was dropped), made by a task
            assert (fifth["SCREEN_RESULT"], fifth["SCREEN_COUNT"]) == ("COUNTED", "5")
            assert handed == {"_resynced": 2, "_counting": 1}

    with _hand_overs() as handed:
        asyncio.run(main())

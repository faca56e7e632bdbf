"""A clean guest call screened from its connection's callbacks: no task, no wait.

Under a flood most calls are the same: a SIP or PJSIP channel, the environment block
exactly as res_agi writes it, Asterisk's one-line answers, the embedded store. For
those the server's coroutine (a task, a future per read, two deadlines) cost as much
CPU as everything else in the session (bench/asterisk_flood.py, issue 14). Here the
same steps, the very functions the coroutine calls, run in SessionStream's
`data_received`, each as soon as its bytes are in:

    environment block -> key, route -> resync command -> its answer -> judge, count_now
    -> one EXEC MSet -> its `200 result=0` -> closed

Anything else (a block that is not res_agi's, any other answer, a HANGUP line, a store
step that must run the script, a close, the deadline, the server stopping) hands the
session to a task at the step it reached (`server.resume`): what it read is put back,
and the coroutine goes on exactly as if it had run from the start. Nothing is written
twice and nothing is counted twice: a hand-over happens before a step's side effects
or after all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastagi.access import key_matches
from fastagi.agi import (
    MAX_LINE,
    AGIProtocolError,
    AGISession,
    Environment,
    SessionStream,
    parse_block,
)
from fastagi.screening import (
    SCREEN_ROUTE,
    Call,
    Outcome,
    address_expression,
    screen_variables,
)

if TYPE_CHECKING:
    from fastagi.server import FastAGIServer

# What the coroutine would still do, as (route, outcome) like FastAGIServer.run.
Steps = Coroutine[Any, Any, tuple[str, Outcome]]
_MSET_DONE = b"200 result=0\n"  # MSet's answer: done (core Asterisk, pbx_variables.c)


class QuickSession:
    """One admitted connection, driven by SessionStream's callbacks (its `listener`)."""

    def __init__(self, server: FastAGIServer, stream: SessionStream, where: str) -> None:
        self.server = server
        self.stream = stream
        self.where = where
        self.session = AGISession(stream)
        self.started, self.deadline = server.begin(stream, where)
        self.env = Environment()
        self.nonce = ""
        self.outcome: Outcome | None = None
        # a real Redis's store step while it is out (`_send_count`)
        self.call: Call | None = None
        self.counting: tuple[asyncio.Future, float] | None = None  # its reply, sent at
        self.count_started = self.budget_at = 0.0
        self.budget: asyncio.TimerHandle | None = None
        self.variables: dict[str, object] = {}
        self.step = self._environment
        stream.separator = b"\n\n"  # data_received is called when the block came
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = loop.call_at(self.deadline, self.hand_over)
        stream.listener = self

    # -- SessionStream's callbacks --

    def data_received(self) -> None:
        self.step()

    @property
    def waiting(self) -> bool:
        """Waiting for Asterisk's bytes, not for the store step."""
        return self.step != self._counting

    def ended(self) -> None:
        """The peer closed or the connection is gone: the coroutine reads that and ends
        the session as it would (a protocol or connection error)."""
        self.hand_over()

    # -- the steps --

    def _environment(self) -> None:
        stream = self.stream
        block = stream.take(stream.separator)
        if block is None:
            if stream.buffered > MAX_LINE:
                self.hand_over()  # longer than a line may be: the coroutine reads on
            return
        try:
            env = parse_block(block)
        except AGIProtocolError:
            env = None
        if (
            env is None
            or env.tampered
            or not address_expression(env)
            or env.route != SCREEN_ROUTE
            or not key_matches(self.server.key, env.script)
            or stream.is_closing()
        ):
            stream.unread(block)
            self.hand_over()
            return
        self.env = env
        self.server.key_matched(stream)
        self.nonce, command = self.session.resync_command(address_expression(env))
        self._send(command, self._resynced)

    def _line(self) -> bytes | None:
        """The next whole line, else None (and one longer than a line may be: the task
        reads on, and says so)."""
        line = self.stream.take(self.stream.separator)
        if line is None and self.stream.buffered > MAX_LINE:
            self.hand_over()
        return line

    def _resynced(self) -> None:
        line = self._line()
        if line is None:
            return
        try:
            answer = self.session.resync_value(self.nonce, line[:-1].decode("utf-8", "replace"))
        except AGIProtocolError:
            answer = None
        if answer is None:
            self.stream.unread(line)
            self.hand_over()
            return
        screener = self.server.screener
        call = screener.judge(self.session, self.env, answer)
        if isinstance(call, Call):
            if not self.server.step_now:  # a real Redis: its reply comes later
                self._send_count(call)
                return
            counted = screener.count_now(call)
            if counted is None:  # a new ban: the script runs, awaited
                self._to_task(self._count(call))
                return
            call = counted
        self._answer(call)

    def _send_count(self, call: Call) -> None:
        screener = self.server.screener
        started = time.perf_counter()
        sent = screener.count_soon(call)
        if sent is None:
            self._to_task(self._count(call))
            return
        self.call, self.counting, self.count_started = call, sent, started
        self.step = self._counting
        loop = asyncio.get_running_loop()
        self.budget_at = loop.time() + screener.redis_budget
        self.budget = loop.call_at(self.budget_at, self._count_late)
        sent[0].add_done_callback(self._count_done)

    def _counting(self) -> None:
        """Bytes that come while the store step runs wait in the buffer (a HANGUP line:
        read with the answer to MSet), as they do for the task."""

    def _count_done(self, future: asyncio.Future) -> None:
        if self.step != self._counting or future.cancelled():
            return  # too late (the budget), or a task waits for it now
        assert self.budget is not None and self.call is not None
        self.budget.cancel()
        outcome = self.server.screener.count_done(self.call, future, self.count_started)
        if outcome is None:  # it did not run (NOSCRIPT, the link broke)
            self._to_task(self._count(self.call))
            return
        self._answer(outcome)

    def _count_late(self) -> None:
        assert self.call is not None and self.counting is not None
        screener = self.server.screener
        future, sent = self.counting
        future.cancel()  # as the task's await is: its reply, if it comes, is dropped
        screener.store.gave_up(sent)
        self._answer(screener.count_late(self.call, self.count_started))

    def _answer(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.variables = screen_variables(outcome)
        command = self.session.mset(self.variables)
        if command is None or self.stream.is_closing():
            self._to_task(self._set_variables(outcome))
            return
        self._send(command, self._answered)

    def _answered(self) -> None:
        line = self._line()
        if line is None:
            return
        assert self.outcome is not None
        if line != _MSET_DONE:
            self.stream.unread(line)
            self._to_task(self._mset_answered(self.outcome))
            return
        self._stop()
        self.server.log_ban(self.outcome)
        self.server.end(self.session, self.started, SCREEN_ROUTE, self.outcome)

    def _send(self, command: bytes, then: Callable[[], None]) -> None:
        """Write `command`; `then` reads its answer, now if it is in already."""
        self.step, self.stream.separator = then, b"\n"
        self.stream.write(command)
        if self.stream.listener is self and self.stream.buffered:
            self.step()  # still ours (a transport may answer, even close, within write)

    # -- to a task --

    def hand_over(self) -> None:
        """The rest of the session as a task, from the step it reached."""
        if self.step == self._environment:
            self._to_task(self.server.run(self.session))
        elif self.step == self._resynced:
            self._to_task(self._from_resync())
        elif self.step == self._counting:
            assert self.budget is not None
            self.budget.cancel()
            self._to_task(self._from_counting())
        else:
            assert self.outcome is not None
            self._to_task(self._mset_answered(self.outcome))

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stream.listener = None
        self.server.quick_ended(self)

    def _to_task(self, steps: Steps) -> None:
        self._stop()
        server = self.server
        self.stream.start(
            server.resume(self.session, self.where, self.started, self.deadline, steps)
        )

    async def _from_resync(self) -> tuple[str, Outcome]:
        answer = await self.session.resync_answer(self.nonce)
        screener = self.server.screener
        call = screener.judge(self.session, self.env, answer)
        outcome = await screener.count(self.session, call) if isinstance(call, Call) else call
        return await self._set_variables(outcome)

    async def _from_counting(self) -> tuple[str, Outcome]:
        """The store step is out: its reply awaited within what is left of its budget."""
        assert self.call is not None and self.counting is not None
        future, sent = self.counting
        screener = self.server.screener
        try:
            async with asyncio.timeout_at(self.budget_at):
                await future
        except TimeoutError:
            screener.store.gave_up(sent)
            return await self._set_variables(screener.count_late(self.call, self.count_started))
        except Exception:  # the reply's error: count_done reads it
            pass
        outcome = screener.count_done(self.call, future, self.count_started)
        if outcome is None:
            return await self._count(self.call)
        return await self._set_variables(outcome)

    async def _count(self, call: Call) -> tuple[str, Outcome]:
        return await self._set_variables(await self.server.screener.count(self.session, call))

    async def _set_variables(self, outcome: Outcome) -> tuple[str, Outcome]:
        await self.server.answer(self.session, outcome)
        return SCREEN_ROUTE, outcome

    async def _mset_answered(self, outcome: Outcome) -> tuple[str, Outcome]:
        await self.session.mset_answered(self.variables)
        self.server.log_ban(outcome)
        return SCREEN_ROUTE, outcome

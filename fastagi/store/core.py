"""The Store: the screening step, the authentication failure step, bans, holds and
unbans (the write path, one atomic script each). Reads, feeds and notifications are
parts of their own (reads.py, feeds.py, notify.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from fastagi import lua
from fastagi.redis_link import LinkBroken
from fastagi.store.base import (
    ADMIN_HOLD,
    AUTH_HOLD,
    EVENTS_MAXLEN,
    RESTORED_HOLD,
    UNBAN_BATCH,
    Lifted,
    Placed,
    Policy,
    StoreError,
    Verdict,
    as_text,
)
from fastagi.store.feeds import Feeds
from fastagi.store.notify import Notifications
from fastagi.store.reads import Reads


def _verdict(reply: list) -> Verdict:
    result, count, until, new_ban = reply
    return Verdict(as_text(result), int(count), int(until) / 1000.0, bool(new_ban))


class Store(Reads, Feeds, Notifications):
    """Counts, bans and events for one cluster (one Redis, one key prefix)."""

    async def screen(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> Verdict:
        """Count one call from `ip` and ban it at the threshold (`threshold`: a country
        rule's instead of the configured one), atomically, cluster-wide; `injected` also
        counts an injection attempt, in the same round trip; `country` is recorded with
        the ban."""
        command = self._screen_parts.command(self._screen.sha, ip, injected, threshold, country)
        if not self.wait_replicas:
            execute = self.link.execute if self.link else self.redis.execute_command
            return _verdict(await self._call("screening step", self._evalsha(execute, command)))
        # WAIT counts the writes of its own connection: one connection for both.
        async with self._one_connection("screening step") as conn:
            reply = await self._call("screening step", self._evalsha(conn.execute_command, command))
            verdict = _verdict(reply)
            if verdict.result == "BANNED":
                # Every BANNED answer, not only the new ban: a step retried after a
                # timeout answers "already banned" for a ban that may not have reached
                # a replica yet.
                await self._replicated(conn, ip)
        return verdict

    @property
    def quick(self) -> bool:
        """`screen_now` can take the step: it runs in this process (the embedded store),
        with no replica to wait for."""
        return not self.wait_replicas and callable(getattr(self.link, "now", None))

    @property
    def soon(self) -> bool:
        """`screen_soon` can send the step: one shared connection (redis_link.py), no
        replica to wait for."""
        return not self.wait_replicas and callable(getattr(self.link, "submit", None))

    def screen_soon(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> asyncio.Future | None:
        """`screen`'s command sent now, where `soon`: its reply (for `verdict`) later,
        or an exception (NOSCRIPT, the link broke: it did not run, await `screen`). None
        when it cannot be sent without a wait (then nothing was)."""
        command = self._screen_parts.command(self._screen.sha, ip, injected, threshold, country)
        return self.link.submit(*command)  # type: ignore[union-attr]  # `soon` checked it

    def gave_up(self, sent: float) -> None:
        """The caller of a `screen_soon` made at `sent` (time.monotonic) stopped waiting
        (its budget)."""
        self.link.gave_up(sent)  # type: ignore[union-attr]

    @staticmethod
    def soon_verdict(future: asyncio.Future) -> Verdict | None:
        """The verdict of a done `screen_soon`; None where the step did not run (NOSCRIPT,
        the link broke: await `screen`, which loads the script or reconnects); StoreError
        where it failed, as `screen` raises it."""
        error = future.exception()
        if error is None:
            return _verdict(future.result())
        if isinstance(error, NoScriptError | LinkBroken):
            return None
        if isinstance(error, RedisError | OSError):
            reason = error or type(error).__name__
            raise StoreError(f"Redis screening step failed: {reason}") from None
        raise error

    def screen_now(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> Verdict | None:
        """`screen` without a wait where `quick`; None when this step must run the script
        itself (await `screen`: nothing was written)."""
        command = self._screen_parts.command(self._screen.sha, ip, injected, threshold, country)
        try:
            reply = self.link.now(*command)  # type: ignore[union-attr]  # `quick` checked it
        except (RedisError, OSError) as error:
            raise StoreError(f"Redis screening step failed: {error!r}") from None
        return None if reply is None else _verdict(reply)

    async def _evalsha(self, execute: Callable[..., Awaitable[Any]], command: tuple) -> Any:
        """The screening script by its hash; loaded first if this Redis lost it."""
        try:
            return await execute(*command)
        except NoScriptError:
            await self.redis.script_load(lua.SCREEN)
            return await execute(*command)

    async def ban(
        self, ip: str, duration: float | None, reason: str, hold: str = ADMIN_HOLD
    ) -> float:
        """Ban `ip` now for `duration` seconds (None: the escalating ban_time) under the
        source `hold`; the end of its ban, which a longer hold may keep beyond this one."""
        return (await self.hold(ip, hold, reason, duration=duration)).until

    async def hold(
        self,
        target: str,
        source: str,
        reason: str,
        duration: float | None = None,
        until: float | None = None,
        counts: bool = True,
    ) -> Placed:
        """Place `source`'s hold on `target` for `duration` seconds (None: the escalating
        ban_time) or `until` a unix time. A hold never shortens a ban, not even the same
        source's own earlier hold. `counts` False (a restored ban) leaves the previous-ban
        count and the totals alone. A protected target raises ProtectedError and nothing
        is written."""
        if self.protected is not None:
            self.protected.check_ban(target)
        p = self.policy
        args = [
            target,
            source,
            int((duration or 0) * 1000),
            round((until or 0) * 1000),
            int(p.ban_time * 1000),
            p.ban_time_factor,
            int(p.ban_time_max * 1000),
            self.pbx_id,
            reason,
            EVENTS_MAXLEN,
            p.history_ms,
            1 if counts else 0,
        ]
        keys = self._step_keys(target)
        if not self.wait_replicas:
            reply = await self._call("ban", self._ban(keys=keys, args=args))
        else:
            async with self._one_connection("ban") as conn:
                reply = await self._call("ban", self._ban(keys=keys, args=args, client=conn))
                await self._replicated(conn, target)
        ban_until, hold_until, placed = (int(x) for x in reply[:3])
        return Placed(ban_until / 1000.0, hold_until / 1000.0, bool(placed))

    async def note_inside(self, wider: str, target: str, until: float) -> tuple[int, bool]:
        """Record that `target`, inside `wider`, is banned until `until`: (how many bans
        inside `wider` are running, whether `wider` itself is banned now). One pipeline:
        a call racing it may see one ban fewer, which delays the escalation by one ban."""
        now_ms = self.now_ms()
        key = self.keys.inside(wider)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {target: int(until * 1000)})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zcard(key)
            pipe.pexpire(key, self.policy.history_ms)  # no ban outlives ban_time_max
            pipe.zscore(self.keys.banned, wider)
            _, _, running, _, wider_until = await self._call("escalation", pipe.execute())
        return int(running), wider_until is not None and wider_until > now_ms

    async def unban(self, ips: Iterable[str], hold: str | None = None) -> list[str]:
        """Lift these bans (`hold` None: every hold, and reset their counts; else only that
        source's hold) everywhere; the addresses whose ban ended."""
        return [ip for ip, lifted in (await self.lift(ips, hold)).items() if lifted.ended]

    async def lift(self, targets: Iterable[str], hold: str | None = None) -> dict[str, Lifted]:
        """Lift `hold`'s hold on each target (None: every hold, and reset the counts);
        what that did to each."""
        out: dict[str, Lifted] = {}
        batch = list(targets)
        for start in range(0, len(batch), UNBAN_BATCH):
            chunk = batch[start : start + UNBAN_BATCH]
            k = self.keys
            keys = [k.banned, k.counted, k.events, k.stats]
            for target in chunk:
                keys += [k.count(target), k.record(target), k.holds(target)]
            result = await self._call(
                "unban",
                self._unban(keys=keys, args=[self.pbx_id, EVENTS_MAXLEN, hold or "", *chunk]),
            )
            for target, (state, until) in zip(chunk, result, strict=True):
                state = int(state)
                out[target] = Lifted(state != 0, state == 1, int(until) / 1000.0)
        return out

    async def epoch(self) -> str | None:
        """The ban list's epoch token (keys.py): gone or changed when Redis lost its data."""
        value = await self._call("epoch read", self.redis.get(self.keys.epoch))
        return None if value is None else as_text(value)

    async def restore_bans(
        self, bans: dict[str, float], token: str, reason: str = "restored"
    ) -> tuple[str, int]:
        """Write back bans (address -> end, unix s) an agent applied before Redis lost
        its data, the longer end winning, and set the epoch token unless one is there.
        The token in place and how many bans were written (new or longer)."""
        items = list(bans.items())
        epoch, written = token, 0
        k = self.keys
        # batches as for unban; at least one call, so an empty write-back sets the token
        for start in range(0, max(len(items), 1), UNBAN_BATCH):
            chunk = items[start : start + UNBAN_BATCH]
            args: list[Any] = [self.pbx_id, EVENTS_MAXLEN, self.policy.history_ms, token]
            args += [reason, RESTORED_HOLD]
            keys = [k.banned, k.events, k.epoch, k.stats]
            for ip, until in chunk:
                args += [ip, int(until * 1000)]
                keys += [k.record(ip), k.holds(ip)]
            reply = await self._call("ban write-back", self._restore(keys=keys, args=args))
            epoch, written = as_text(reply[0]), written + int(reply[1])
        return epoch, written

    async def unban_all(self, hold: str | None = None) -> list[str]:
        return await self.unban(list(await self.banned()), hold)

    async def auth_reset(self, ips: Iterable[str]) -> None:
        """Forget these addresses' authentication failures (`unban` resets every count)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for ip in ips:
                pipe.delete(self.keys.auth_count(ip))
                pipe.zrem(self.keys.auth_counted, ip)
            await self._call("auth reset", pipe.execute())

    async def auth_failure(self, ip: str, rules: Policy) -> Verdict:
        """Count one authentication failure from `ip` under `rules` (the [auth] ones) and
        ban it at their threshold with reason `auth`: the same ban list, history and
        escalation as screened calls, in counts of its own, atomically, cluster-wide."""
        k = self.keys
        keys = [k.auth_count(ip), k.record(ip), k.banned, k.auth_counted, k.events, k.stats]
        keys += [k.holds(ip), k.bans_by_hour]
        args = [
            ip,
            rules.threshold,
            int(rules.window * 1000),
            int(rules.ban_time * 1000),
            rules.ban_time_factor,
            int(rules.ban_time_max * 1000),
            self.pbx_id,
            AUTH_HOLD,
            secrets.token_hex(8),
            EVENTS_MAXLEN,
            rules.history_ms,
        ]
        return _verdict(await self._call("auth step", self._auth_failure(keys=keys, args=args)))

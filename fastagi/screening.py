"""The screening decision for one guest call: whose call it is, and what it gets.

The caller's address never comes from attacker text. For `SIP` and `PJSIP` channels
(`agi_type` precedes the dialed number in the environment, so it cannot be forged)
it comes from Asterisk's own answer to our nonce resync; the optional SOURCE argument
is used only for channel types with no address of their own, and only when the
environment arrived clean. Then: `ignore`, the seed's NOTICE line (with the caller's
own address), one atomic store step for the caller's prefix (`ipv6_prefix`: the /64 of
an IPv6 caller, so a scanner's addresses add up), and the channel variables the
dialplan acts on. Never touches a firewall.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastagi import logs
from fastagi.addresses import (
    AddressError,
    AddressSet,
    IPAddress,
    IPNetwork,
    Prefixes,
    parse_address,
    parse_target,
    target_text,
)
from fastagi.agi import AGISession, Environment
from fastagi.escalate import Escalation
from fastagi.geo import Countries
from fastagi.protect import OnceLog, Protected, counted_as
from fastagi.store import Store, StoreError, Verdict

log = logging.getLogger("fastagi.screening")

SCREEN_ROUTE = "screen"  # agi://host/screen: the guest context's call

# Where Asterisk keeps the packet's source address, by agi_type.
ADDRESS_EXPRESSIONS = {
    "SIP": "${CHANNEL(recvip)}",
    "PJSIP": "${CHANNEL(pjsip,remote_addr)}",
}
NOTICE = "Incoming SIP connection from unknown peer failed for {ip} - Unknown connection from peer"


class ScreeningError(Exception):
    """This call cannot be screened; the message goes to SCREEN_ERROR."""


@dataclass
class Call:
    """A call judged to be counted: what the store step takes and the outcome names."""

    address: IPAddress
    notice: str  # the seed's NOTICE line for it
    target: str
    injected: bool
    country: str | None
    threshold: int | None


@dataclass
class Outcome:
    """What the dialplan will see in SCREEN_RESULT / SCREEN_COUNT / SCREEN_BAN_UNTIL."""

    result: str
    count: int | None = None
    ban_until: float | None = None
    error: str = ""
    address: IPAddress | None = None
    new_ban: bool = False  # this call hit the threshold: the ban was issued here
    reason: str = ""  # why IGNORED: "ignore" or "protected" (SCREEN_REASON)
    target: str = ""  # what was counted and banned: the caller's prefix ("2001:db8::/64")
    country: str | None = None  # the caller's (geo.py; "" unknown), None: no database
    # SCREEN_COUNTED: "yes", "no" (certainly not: ignored, or no address), or "unknown"
    # (the store step failed or ran out of time: its script may still run in Redis).
    counted: str = "no"
    # SCREEN_NOTICE: the address the dialplan logs the seed's NOTICE line for ("": none).
    notice: str = ""
    detail: str = ""  # why the count is unknown, for the server's log (not for Asterisk)


class StepObserver:
    """Told about every store step (its latency, or the Redis error); metrics.py."""

    def store_step(self, seconds: float, error: str = "") -> None:
        pass


def escape(text: str, limit: int = 200) -> str:
    """Attacker text made safe for one log line: control characters shown as escapes."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def dialed(env: Environment) -> str:
    """The dialed number as this session saw it: `agi_extension`, or, when a forged
    empty line in the number ended the block before it, `agi_dnid` (the number up to
    its first forged line)."""
    if "agi_extension" in env.values:
        return env.get("agi_extension")
    return env.get("agi_dnid")


def address_expression(env: Environment) -> str:
    """What the resync asks Asterisk for: where it keeps the caller's address ("" for
    channel types with none)."""
    return ADDRESS_EXPRESSIONS.get(env.get("agi_type"), "")


def caller_address(session: AGISession, env: Environment, answer: str) -> IPAddress:
    """The caller's true address (the security rule), from Asterisk's `answer` to the
    resync that asked for `address_expression(env)`."""
    channel_type = env.get("agi_type")
    if address_expression(env):
        try:
            return parse_address(answer)
        except AddressError:
            raise ScreeningError(f"no caller address from Asterisk for {channel_type}") from None
    # No network address of its own (Local, unknown drivers): SOURCE, if trustworthy.
    if session.injected:
        log.warning(
            "injection attempt on a %r channel: %s", escape(channel_type), session.injection()
        )
        raise ScreeningError("SOURCE argument untrusted: the environment was tampered with")
    args = env.args
    if not args or not args[0]:
        raise ScreeningError(f"no SOURCE argument for a {channel_type or 'typeless'} channel")
    try:
        return parse_address(args[0])
    except AddressError:
        raise ScreeningError("SOURCE argument is not an IP address") from None


class Screener:
    """Applies the `[screening]` rules to one session."""

    def __init__(
        self,
        store: Store,
        ignore: AddressSet,
        log_notice: bool,
        redis_budget: float,
        observer: StepObserver | None = None,
        protected: Protected | None = None,
        prefixes: Prefixes | None = None,
        escalation: Escalation | None = None,
        countries: Countries | None = None,
        notice_by: str = "dialplan",
    ) -> None:
        self.store = store
        self.ignore = ignore
        self.log_notice = log_notice
        self.notice_by = notice_by
        self.redis_budget = redis_budget
        self.observer = observer or StepObserver()
        self.protected = protected
        self._protected_logged = OnceLog()
        self.prefixes = prefixes or Prefixes()
        self.escalation = escalation or Escalation()
        self.countries = countries

    @property
    def quick(self) -> bool:
        """Whether a clean call can be screened with no wait at all (quick.py): the
        store step runs in this process (the embedded store), and nothing else awaits
        (the dialplan logs the NOTICE; no escalation after a ban)."""
        store = self.store
        return (
            self.notice_by == "dialplan"
            and not self.escalation.prefix
            and (store.quick or store.soon)
        )

    async def screen(self, session: AGISession, env: Environment) -> Outcome:
        answer = await session.resync(address_expression(env))
        call = self.judge(session, env, answer)
        if isinstance(call, Outcome):
            return call
        return await self.count(session, call)

    def judge(self, session: AGISession, env: Environment, answer: str) -> Outcome | Call:
        """Everything before the store step: whose call, ignored or protected (then its
        outcome), else the NOTICE logged and the Call to count."""
        try:
            address = caller_address(session, env, answer)
        except ScreeningError as error:
            return Outcome("ERROR", error=str(error))
        exten = escape(dialed(env))
        if session.injected:
            log.warning(
                "injection attempt from %s: %s, dialed %r, first stray %r",
                address,
                session.injection(),
                exten,
                escape(session.stray[0] if session.stray else ""),
            )
        ip = str(address)
        if address in self.ignore:
            log.info("Ext. %s: call from %s ignored (in screening.ignore)", exten, ip)
            return Outcome("IGNORED", address=address, reason="ignore")
        # A spoofed source must not turn screening against our own infrastructure.
        if self.protected is not None and (why := self.protected.reason(address)):
            if self._protected_logged.first(address):
                log.warning(
                    "calls from %s are not counted: protected (%s); logged once per address",
                    ip,
                    why,
                )
            return Outcome("IGNORED", address=address, reason="protected")
        notice = NOTICE.format(ip=ip)
        logs.info(log, f"Ext. {exten}: {notice}")  # once per call: the cheap way
        target = counted_as(address, self.prefixes, self.ignore, self.protected)
        country, threshold = None, None
        if self.countries is not None:
            country, threshold = self.countries.rule(address)
        return Call(address, notice, target, session.injected, country, threshold)

    def count_now(self, call: Call) -> Outcome | None:
        """The store step without a wait, where `quick` says it can be; None when this
        call's step must run the script (a new ban): `count` then, nothing is written."""
        store = self.store
        return self._counted(
            call,
            time.perf_counter(),
            lambda: store.screen_now(
                call.target, call.injected, call.threshold, call.country or ""
            ),
        )

    def count_soon(self, call: Call) -> tuple[asyncio.Future, float] | None:
        """The store step sent now where the store is a real Redis on one shared
        connection (`store.soon`): its reply's future and when it went out; None when it
        cannot go without a wait (then nothing was sent: `count`)."""
        sent = time.monotonic()
        future = self.store.screen_soon(
            call.target, call.injected, call.threshold, call.country or ""
        )
        return None if future is None else (future, sent)

    def count_done(self, call: Call, future: asyncio.Future, started: float) -> Outcome | None:
        """`count_soon`'s step answered (`started`: time.perf_counter before it); None
        when it did not run (NOSCRIPT, the link broke): `count` then."""
        return self._counted(call, started, lambda: self.store.soon_verdict(future))

    def _counted(
        self, call: Call, started: float, verdict: Callable[[], Verdict | None]
    ) -> Outcome | None:
        """The outcome of a store step that `verdict` reads (None: it did not run)."""
        try:
            found = verdict()
        except StoreError as error:
            return self._done(call, self._failed(started, error))
        if found is None:
            return None
        self.observer.store_step(time.perf_counter() - started)
        return self._done(call, _outcome(found))

    def count_late(self, call: Call, started: float) -> Outcome:
        """`count_soon`'s step did not answer within `redis_budget`."""
        return self._done(call, self._failed(started, TimeoutError()))

    async def count(self, session: AGISession, call: Call) -> Outcome:
        """The store step and what follows it: the NOTICE by AGI, an escalation."""
        notice = call.notice
        # notice_by = "agi": the NOTICE goes out first; the store step runs while Asterisk
        # executes it, and its answer is read afterwards (one command in flight, no extra
        # task). The call is counted even if Asterisk went away meanwhile.
        lost: Exception | None = None
        logged = self.log_notice and self.notice_by == "agi"
        if logged:
            try:
                await session.start_exec("Log", f"NOTICE,{notice}")
            except (ConnectionError, OSError) as error:
                lost = error
        outcome = await self._count(call.target, call.injected, call.threshold, call.country or "")
        if outcome.new_ban and self.escalation.prefix:
            await self._escalate(parse_target(call.target), outcome.ban_until or 0.0)
        if lost is not None:
            raise lost
        if logged:
            await session.answer()
        # A call not surely counted is always seen in Asterisk's log, whatever log_notice.
        elif self.notice_by == "agi" and (self.log_notice or outcome.counted != "yes"):
            await session.exec_app("Log", f"NOTICE,{notice}")
        return self._done(call, outcome)

    def _done(self, call: Call, outcome: Outcome) -> Outcome:
        """The outcome of a counted call; SCREEN_NOTICE where the dialplan logs it."""
        # A call not surely counted is always seen in Asterisk's log, whatever log_notice.
        if self.notice_by != "agi" and (self.log_notice or outcome.counted != "yes"):
            outcome.notice = str(call.address)
        outcome.address = call.address
        outcome.target = call.target
        outcome.country = call.country
        return outcome

    async def _escalate(self, network: IPNetwork, until: float) -> None:
        """A new ban may complete a wider prefix (escalate.py); within the store budget."""
        try:
            async with asyncio.timeout(self.redis_budget):
                await self.escalation.after_ban(self.store, network, until, self.ignore)
        except (StoreError, TimeoutError) as error:
            log.error("escalation after the ban of %s failed: %s", target_text(network), error)

    async def _count(self, ip: str, injected: bool, threshold: int | None, country: str) -> Outcome:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.redis_budget):
                verdict = await self.store.screen(ip, injected, threshold, country)
                self.observer.store_step(time.perf_counter() - started)
        except (StoreError, TimeoutError) as error:
            return self._failed(started, error)
        return _outcome(verdict)

    def _failed(self, started: float, error: Exception) -> Outcome:
        """The store step failed or ran out of time."""
        reason = str(error) or f"Redis did not answer within {self.redis_budget:.2f}s"
        self.observer.store_step(
            time.perf_counter() - started,
            "timeout" if isinstance(error, TimeoutError) else "error",
        )
        # Not "not counted": a script sent before the stall or the reset may still
        # run (a paused Redis runs it when it resumes). Logged by the server, summarised.
        return Outcome("ERROR", error="store unavailable", counted="unknown", detail=reason)


def _outcome(verdict: Verdict) -> Outcome:
    if verdict.result == "BANNED":
        return Outcome(
            "BANNED", verdict.count, verdict.ban_until, new_ban=verdict.new_ban, counted="yes"
        )
    return Outcome("COUNTED", verdict.count, counted="yes")


def screen_variables(outcome: Outcome) -> dict[str, object]:
    """The SCREEN_* channel variables that tell the dialplan `outcome`."""
    variables: dict[str, object] = {
        "SCREEN_RESULT": outcome.result,
        "SCREEN_COUNTED": outcome.counted,
    }
    if outcome.count is not None:
        variables["SCREEN_COUNT"] = outcome.count
    if outcome.ban_until:
        variables["SCREEN_BAN_UNTIL"] = int(outcome.ban_until)
    if outcome.error:
        variables["SCREEN_ERROR"] = outcome.error
    if outcome.reason:
        variables["SCREEN_REASON"] = outcome.reason
    if outcome.notice:
        variables["SCREEN_NOTICE"] = outcome.notice
    return variables

"""The iptables backend, through python-iptables (libiptc).

    -N FASTAGI
    -A FASTAGI -s 192.0.2.9/32 -m comment --comment fastagi-until=1800000000 -j DROP
    -A FASTAGI -s 2001:db8:1:2::/64 -m comment --comment fastagi-until=1800000000 -j DROP
                                                        one rule per banned address or prefix
    -A FASTAGI -m comment --comment fastagi-screen -j RETURN   our mark, last
    -I INPUT -j FASTAGI                                 ports "all": one jump
    -I INPUT -p udp -m multiport --dports 5060 -j FASTAGI   else one jump per protocol
    (the same in ip6tables; FORWARD too with firewall.forward)

Things to know before choosing it:
- libiptc writes the LEGACY x_tables. On hosts whose `iptables` command is the nf_tables
  variant (Debian 11+, Ubuntu 21.04+, RHEL 8+: `iptables -V` says "(nf_tables)") the bans
  still drop packets, but `iptables -L` does not show them: use `iptables-legacy -L FASTAGI
  -n`. The nftables backend is the native choice there; check() and setup() say so.
- One rule per address, and libiptc copies the whole table on every commit: fine up to a
  few thousand bans (5,000 load in about a second); for more use ipset or nftables.
- iptables has no timeouts: each rule's comment carries its ban's end (unix seconds,
  this host's clock), kept here in memory too; the agent lifts due bans. After a
  restart, setup() reads the ends back from the comments, so bans still end on time
  when Redis is unreachable then; a rule without the comment (written before) keeps
  its ban until the agent reconciles with Redis.
- python-iptables has no locking: our writes are serialised by a lock and by the
  /run/xtables.lock that `iptables-legacy -w` uses, and each call is one commit.
- A chain of our name holding anything but our ban rules and our mark (fail2ban's
  `f2b-asterisk`) is someone else's: claim() refuses it and nothing is touched. A chain
  of an older version (ban rules of single addresses, no mark) is ours: setup() marks it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ._common import (
    as_network,
    count_replaced,
    expected_bounds,
    parse_ports,
    permission_hint,
    ports_by_proto,
    split_live,
)
from .base import (
    OWNER_MARK,
    CheckResult,
    FirewallConflict,
    FirewallError,
    FirewallSettings,
    FirewallStats,
    IPNetwork,
)

log = logging.getLogger("fastagi.firewall")

SCALE_LIMIT = 5000  # rules per family beyond which commits get slow (libiptc copies tables)
XTABLES_LOCK = "/run/xtables.lock"
HOOKS = ("INPUT", "FORWARD")
COMMENT = "fastagi-until="  # + the ban's end in whole unix seconds; no comment: no end
_BAN_LINE = re.compile(
    r'^-A \S+ -s (\S+)(?: -m comment --comment "?' + COMMENT + r'(\d{1,12})"?)? -j DROP$'
)
_MARK_LINE = re.compile(rf"^-A \S+ -m comment --comment {OWNER_MARK} -j RETURN$", re.MULTILINE)


def _iptc() -> Any:
    """python-iptables, imported only when this backend is used."""
    try:
        import iptc  # type: ignore[import-untyped]
    except Exception as exc:  # ImportError, or XTablesError when libxtables is missing
        raise FirewallError(
            f"iptables backend: python-iptables cannot be loaded ({exc}); "
            "pip install python-iptables and apt install iptables"
        ) from exc
    return iptc


def host_iptables_variant() -> str:
    """'nf_tables', 'legacy' or '' (no iptables command), from `iptables -V`."""
    try:
        out = subprocess.run(
            ["iptables", "-V"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if "nf_tables" in out:
        return "nf_tables"
    return "legacy" if out else ""


class IptablesFirewall:
    name = "iptables"
    intact_sees_entries = True  # intact() checks the entries too: no periodic rewrite

    def __init__(self, settings: FirewallSettings | None = None) -> None:
        self.settings = settings or FirewallSettings(backend="iptables")
        self.chain = self.settings.chain
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,27}", self.chain):
            raise FirewallError(
                f"firewall.chain: {self.chain!r} is not a usable chain name "
                "(letters, digits, _ and -, at most 28 characters)"
            )
        self._ports = parse_ports(self.settings.ports)
        self._lock = threading.Lock()
        self._bans: dict[IPNetwork, float] = {}  # expiry, kept here: iptables has none
        # the rules in our chain: network -> the end in its comment
        self._present: dict[int, dict[IPNetwork, int | None]] = {4: {}, 6: {}}
        self._stats = FirewallStats(backend=self.name)
        self._announced = False  # setup() runs every sync: say it at INFO once
        self._loaded = False  # _present read from the kernel yet?

    # -- libiptc plumbing -----------------------------------------------------------------
    def _table(self, version: int) -> Any:
        iptc = _iptc()
        try:
            if version == 4:
                table = iptc.Table(iptc.Table.FILTER)
            else:
                table = iptc.Table6(iptc.Table6.FILTER)
            table.autocommit = False
            table.refresh()
        except iptc.IPTCError as exc:
            family = "ip6tables" if version == 6 else "iptables"
            raise FirewallError(
                _explain(f"iptables: cannot open the {family} filter table", exc)
            ) from exc
        return table

    def _rule(self, version: int) -> Any:
        iptc = _iptc()
        return iptc.Rule() if version == 4 else iptc.Rule6()

    def _ban_rule(self, version: int, network: IPNetwork, end: int | None) -> Any:
        """The DROP rule of one ban; `end` (whole unix seconds) goes into its comment."""
        rule = self._rule(version)
        rule.src = network.compressed  # "192.0.2.9/32", "2001:db8:1:2::/64"
        if end is not None:
            rule.create_match("comment").comment = f"{COMMENT}{end}"
        rule.target = rule.create_target("DROP")
        return rule

    def _mark_rule(self, version: int) -> Any:
        """Our mark, the last rule of our chain: a RETURN there changes nothing."""
        rule = self._rule(version)
        match = rule.create_match("comment")
        match.comment = OWNER_MARK
        rule.target = rule.create_target("RETURN")
        return rule

    def _jump_rules(self, version: int) -> list[Any]:
        if self._ports is None:
            rule = self._rule(version)
            rule.target = rule.create_target(self.chain)
            return [rule]
        rules = []
        for proto, specs in ports_by_proto(self._ports).items():
            rule = self._rule(version)
            rule.protocol = proto
            match = rule.create_match("multiport")
            match.dports = ",".join(s.iptables() for s in specs)
            rule.target = rule.create_target(self.chain)
            rules.append(rule)
        return rules

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Our lock, plus the xtables lock `iptables-legacy -w` honours (bounded wait)."""
        with self._lock:
            fd = None
            try:
                fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:
                fd = None  # not root or no /run: our own lock still serialises us
            try:
                if fd is not None:
                    deadline = time.monotonic() + 5
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if time.monotonic() > deadline:
                                raise FirewallError(
                                    f"iptables: {XTABLES_LOCK} held by another process for 5s"
                                ) from None
                            time.sleep(0.02)
                yield
            finally:
                if fd is not None:
                    os.close(fd)

    def _commit(self, version: int, change: Any) -> None:
        """Open the table, apply change(table), commit; retry when another writer raced us."""
        iptc = _iptc()
        for attempt in range(3):
            table = self._table(version)
            try:
                change(table)
                table.commit()
                return
            except iptc.IPTCError as exc:
                if "temporarily unavailable" in str(exc) and attempt < 2:
                    continue  # EAGAIN: the table changed under us; redo from a fresh copy
                self._stats.errors += 1
                raise FirewallError(_explain("iptables: commit failed", exc)) from exc
            finally:
                with contextlib.suppress(Exception):
                    table.close()

    def _delete_rules(self, chain: Any, version: int, network: IPNetwork) -> None:
        """Delete this ban's rule(s): libiptc deletes by the whole rule, so the one with
        the comment we wrote (or read back), then one without (older rules)."""
        iptc = _iptc()
        for end in dict.fromkeys([self._present[version].get(network), None]):
            for _ in range(4):  # bounded: a duplicate rule goes too
                try:
                    chain.delete_rule(self._ban_rule(version, network, end))
                except iptc.IPTCError:
                    break  # not there

    def _scan(self, version: int) -> tuple[dict[IPNetwork, int | None], bool, bool]:
        """(the networks banned in our chain with the ends their comments carry, our mark
        is there, a rule of someone else's is there). Through `iptables-legacy -S` when
        that command exists (C: 5,000 rules in ~20 ms, where python-iptables takes 2 s to
        turn them into objects), else through libiptc."""
        tool = shutil.which("iptables-legacy" if version == 4 else "ip6tables-legacy")
        if tool is not None:
            try:
                proc = subprocess.run(
                    [tool, "-w", "2", "-S", self.chain],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired):
                proc = None
            if proc is not None and proc.returncode == 0:
                found: dict[IPNetwork, int | None] = {}
                foreign = False
                for line in proc.stdout.splitlines():
                    if not line.startswith("-A ") or _MARK_LINE.match(line):
                        continue
                    ban = _BAN_LINE.match(line)
                    try:
                        network = ipaddress.ip_network(ban.group(1))  # type: ignore[union-attr]
                    except (AttributeError, ValueError):
                        foreign = True
                        continue
                    found[network] = int(ban.group(2)) if ban.group(2) else None
                marked = _MARK_LINE.search(proc.stdout) is not None
                return found, marked, foreign or _foreign_unmarked(found, marked)
            if proc is not None and "No chain" in (proc.stderr or ""):
                return {}, False, False
        return self._scan_libiptc(version)

    def _scan_libiptc(self, version: int) -> tuple[dict[IPNetwork, int | None], bool, bool]:
        iptc = _iptc()
        table = self._table(version)
        try:
            if not table.is_chain(self.chain):
                return {}, False, False
            found: dict[IPNetwork, int | None] = {}
            marked = foreign = False
            for rule in iptc.Chain(table, self.chain).rules:
                target = rule.target.name if rule.target else ""
                matches = [(m.name, getattr(m, "comment", None)) for m in rule.matches]
                if target == "RETURN" and matches == [("comment", OWNER_MARK)]:
                    marked = True
                elif target == "DROP" and (not matches or _rule_end(rule) is not None):
                    try:
                        found[ipaddress.ip_network(_cidr(rule.src))] = _rule_end(rule)
                    except ValueError:
                        foreign = True
                else:
                    foreign = True
            return found, marked, foreign or _foreign_unmarked(found, marked)
        finally:
            with contextlib.suppress(Exception):
                table.close()

    def _read_sources(self, version: int) -> dict[IPNetwork, int | None]:
        return self._scan(version)[0]

    def claim(self) -> None:
        for version in (4, 6):
            if self._scan(version)[2]:
                raise self._conflict(version)

    def _conflict(self, version: int) -> FirewallConflict:
        family = "ip6tables" if version == 6 else "iptables"
        return FirewallConflict(
            f"iptables: {family} chain {self.chain} exists and was not created by "
            "fastagi-screen: refusing to touch it; set firewall.chain to a name of our own "
            "(e.g. FASTAGI)"
        )

    # -- the interface ----------------------------------------------------------------------
    def setup(self) -> None:
        iptc = _iptc()
        if not self._announced and host_iptables_variant() == "nf_tables":
            log.warning(
                "iptables backend: this host's iptables command is the nf_tables variant; "
                "python-iptables writes the legacy tables, so bans are seen with "
                "`iptables-legacy -L %s -n`, not `iptables -L`. Consider firewall.backend = "
                '"nftables".',
                self.chain,
            )
        hooks = HOOKS if self.settings.forward else HOOKS[:1]
        # read outside the xtables lock: `iptables-legacy -S` waits for it
        scans = {version: self._scan(version) for version in (4, 6)}
        for version, (_, _, foreign) in scans.items():
            if foreign:
                raise self._conflict(version)

        def change(version: int) -> Any:
            def apply(table: Any) -> None:
                if not table.is_chain(self.chain):
                    table.create_chain(self.chain)
                if not scans[version][1]:  # new, flushed by hand, or an older version's
                    iptc.Chain(table, self.chain).append_rule(self._mark_rule(version))
                # rewrite our jumps: exactly the wanted ones, first in each hook
                for hook in HOOKS:
                    chain = iptc.Chain(table, hook)
                    for rule in list(chain.rules):
                        if rule.target and rule.target.name == self.chain:
                            chain.delete_rule(rule)
                    if hook in hooks:
                        for rule in reversed(self._jump_rules(version)):
                            chain.insert_rule(rule)

            return apply

        with self._writing():
            for version in (4, 6):
                self._commit(version, change(version))
        with self._lock:
            for version in (4, 6):
                self._present[version] = scans[version][0]
                for network, end in self._present[version].items():
                    if end is not None:  # a restart: the ends come back from the comments
                        self._bans.setdefault(network, float(end))
            self._loaded = True
        log.log(
            logging.DEBUG if self._announced else logging.INFO,
            "iptables: chain %s ready (%d bans already there)",
            self.chain,
            sum(len(p) for p in self._present.values()),
        )
        self._announced = True

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        live, past = split_live(bans)
        if past:
            self.delete(past)
        if not live:
            return
        with self._writing():
            if not self._loaded:  # add() before setup(): learn what is there, no duplicates
                for version in (4, 6):
                    present, _, foreign = self._scan_libiptc(version)
                    if foreign:
                        raise self._conflict(version)
                    self._present[version] = present
                self._loaded = True
            for version in (4, 6):
                present = self._present[version]
                new = {
                    a: _end(until)
                    for a, until in live.items()
                    if a.version == version and (a not in present or present[a] != _end(until))
                }
                if new:

                    def apply(table: Any, new: dict = new, v: int = version) -> None:
                        chain = _iptc().Chain(table, self.chain)
                        for network, end in new.items():
                            if network in self._present[v]:  # a new end: a new comment
                                self._delete_rules(chain, v, network)
                            chain.insert_rule(self._ban_rule(v, network, end))  # mark stays last

                    self._commit(version, apply)
                    present.update(new)
            self._bans.update(live)
            self._stats.adds += len(live)

    def delete(self, networks: Iterable[IPNetwork]) -> None:
        gone = {as_network(a) for a in networks}
        if not gone:
            return
        with self._writing():
            for version in (4, 6):
                mine = [a for a in gone if a.version == version]
                if not mine:
                    continue

                def apply(table: Any, mine: list[IPNetwork] = mine, v: int = version) -> None:
                    if not table.is_chain(self.chain):
                        return
                    chain = _iptc().Chain(table, self.chain)
                    for address in mine:
                        self._delete_rules(chain, v, address)

                self._commit(version, apply)
                for address in mine:
                    self._present[version].pop(address, None)
            for address in gone:
                self._bans.pop(address, None)
            self._stats.deletes += len(gone)

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        live, _ = split_live(bans)
        iptc = _iptc()
        with self._writing():
            for version in (4, 6):
                wanted = {a: _end(until) for a, until in live.items() if a.version == version}

                def apply(table: Any, wanted: dict = wanted, v: int = version) -> None:
                    if not table.is_chain(self.chain):
                        raise FirewallError(f"iptables: chain {self.chain} is missing: run setup")
                    chain = iptc.Chain(table, self.chain)
                    chain.flush()
                    for network, end in wanted.items():
                        chain.append_rule(self._ban_rule(v, network, end))
                    chain.append_rule(self._mark_rule(v))

                self._commit(version, apply)
                count_replaced(self._stats, self._present[version], wanted)
                self._present[version] = wanted
            self._bans = dict(live)
        if len(live) > SCALE_LIMIT:
            log.warning(
                "iptables: %d bans as one rule each is slow; use ipset or nftables", len(live)
            )

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        now = time.time() if now is None else now
        with self._lock:
            due = [a for a, until in self._bans.items() if until <= now]
        if due:
            self.delete(due)
            log.info("iptables: %d bans expired and lifted", len(due))
        return due

    def list(self) -> dict[IPNetwork, float | None]:
        out: dict[IPNetwork, float | None] = {}
        with self._lock:
            for version in (4, 6):
                for address, end in self._read_sources(version).items():
                    out[address] = self._bans.get(address, None if end is None else float(end))
        return out

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        """Our chain exists in both families and holds exactly the expected addresses."""
        must, may = expected_bounds(expected)
        with self._lock:
            present: set[IPNetwork] = set()
            for version in (4, 6):
                table = self._table(version)
                try:
                    if not table.is_chain(self.chain):
                        return False
                finally:
                    with contextlib.suppress(Exception):
                        table.close()
                present |= self._read_sources(version).keys()
        return must <= present <= may

    def teardown(self) -> None:
        iptc = _iptc()
        self.claim()  # never remove what is not ours

        def apply(table: Any) -> None:
            for hook in HOOKS:
                chain = iptc.Chain(table, hook)
                for rule in list(chain.rules):
                    if rule.target and rule.target.name == self.chain:
                        chain.delete_rule(rule)
            if table.is_chain(self.chain):
                iptc.Chain(table, self.chain).flush()
                table.delete_chain(self.chain)

        with self._writing():
            for version in (4, 6):
                self._commit(version, apply)
                self._present[version] = {}
            self._bans.clear()
        log.info("iptables: chain %s and its jumps removed", self.chain)

    def check(self) -> list[CheckResult]:
        results = []
        try:
            iptc = _iptc()
            results.append(
                CheckResult(
                    "python-iptables", True, f"loaded from {os.path.dirname(iptc.__file__)}"
                )
            )
        except FirewallError as exc:
            return [CheckResult("python-iptables", False, str(exc))]
        try:
            self.claim()
        except FirewallConflict as exc:
            return [*results, CheckResult(f"iptables chain {self.chain}", False, str(exc))]
        except FirewallError:
            pass  # no legacy tables here: said below
        for version in (4, 6):
            what = f"ip{'6' if version == 6 else ''}tables (legacy, libiptc) filter table"
            try:
                table = self._table(version)
                here = table.is_chain(self.chain)
                table.close()
                size = len(self._read_sources(version)) if here else 0
                detail = (
                    f"chain {self.chain} present, {size} bans"
                    if here
                    else f"works; chain {self.chain} not created yet"
                )
                ok = size <= SCALE_LIMIT
                if not ok:
                    detail += (
                        f"; more than {SCALE_LIMIT} one-rule bans make every change "
                        "slow: use the ipset or nftables backend"
                    )
                results.append(CheckResult(what, ok, detail))
            except FirewallError as exc:
                results.append(CheckResult(what, False, str(exc)))
        variant = host_iptables_variant()
        if variant == "nf_tables":
            results.append(
                CheckResult(
                    "iptables variant",
                    True,
                    "warning: the host's iptables command is nf_tables; our bans live in the "
                    f"legacy tables (see them with `iptables-legacy -L {self.chain} -n`, not "
                    '`iptables -L`); firewall.backend = "nftables" is the native choice here',
                )
            )
        elif variant == "legacy":
            results.append(
                CheckResult("iptables variant", True, "legacy: `iptables -L` shows our chain")
            )
        results.append(
            CheckResult(
                "iptables scale",
                True,
                f"one rule per address: fine up to ~{SCALE_LIMIT} bans; expiry is kept in memory",
            )
        )
        return results

    def stats(self) -> FirewallStats:
        with self._lock:
            size = sum(len(p) for p in self._present.values())
            return FirewallStats(
                self.name,
                size,
                self._stats.adds,
                self._stats.deletes,
                self._stats.errors,
                {"chain": self.chain, "variant": "legacy (libiptc)"},
            )


def _end(until: float) -> int | None:
    """A ban's end as its rule's comment carries it: whole seconds, rounded up."""
    return None if math.isinf(until) else math.ceil(until)


def _rule_end(rule: Any) -> int | None:
    for match in rule.matches:
        text = getattr(match, "comment", None) or ""
        if match.name == "comment" and text.startswith(COMMENT) and text[len(COMMENT) :].isdigit():
            return int(text[len(COMMENT) :])
    return None


def _foreign_unmarked(found: Mapping[IPNetwork, int | None], marked: bool) -> bool:
    """Without our mark, only an older version's chain is ours: single-address bans."""
    return not marked and any(n.prefixlen != n.max_prefixlen for n in found)


def _cidr(src: str) -> str:
    """python-iptables gives '192.0.2.9/255.255.255.255' or '2001:db8::9/128'."""
    address, _, mask = src.partition("/")
    if mask and "." in mask:
        mask = str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
    return f"{address}/{mask}" if mask else address


def _explain(what: str, exc: Exception) -> str:
    text = str(exc)
    if "ermission" in text or "not permitted" in text:
        return permission_hint(f"{what}: {text}")
    if "does not exist" in text or "Table does not exist" in text or "ENOENT" in text:
        return f"{what}: {text} (the kernel has no legacy ip_tables: use the nftables backend)"
    if "No chain/target/match" in text:
        return f"{what}: {text} (our chain is missing: the agent creates it at start, setup)"
    return f"{what}: {text}"


__all__ = ["IptablesFirewall", "host_iptables_variant"]

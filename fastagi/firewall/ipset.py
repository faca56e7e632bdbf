"""The ipset backend: two `hash:net` sets with kernel timeouts, matched from our chain.

    ipset:     fastagi-v4 (hash:net family inet timeout 0 maxelem 1048576), fastagi-v6
               (family inet6): addresses and prefixes (2001:db8:1:2::/64)
    iptables:  -N FASTAGI; -A FASTAGI -p udp -m multiport --dports 5060,5061
                   -m set --match-set fastagi-v4 src -m comment --comment fastagi-screen -j DROP
               -I INPUT -j FASTAGI            (and FORWARD with firewall.forward)
    ip6tables: the same with fastagi-v6

Ownership: every rule of our chain carries the comment `fastagi-screen`; a chain of our
name with any other rule (fail2ban's `f2b-asterisk`) is someone else's, and so is a set
of our name that is not a timeout set of our size (ipset sets carry no comment).
claim() refuses both before anything is changed. Our `hash:ip` sets of older versions
are recreated as `hash:net` by setup().

Updates go through `ipset restore -exist` batches (one fork per call, 100,000 entries in
well under a second); set() fills a temporary set and swaps it in atomically. The chain
and rules are made with the `iptables`/`ip6tables` commands the host uses (nf_tables or
legacy: both match ipsets), through `iptables-restore --noflush` so our chain is written
in one go; we touch nothing but our chain, its jumps and our sets. Bans expire in the
kernel even when the agent is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping

from ._common import (
    INTACT_SLACK,
    as_network,
    count_replaced,
    parse_ports,
    permission_hint,
    ports_by_proto,
    remaining_ms,
    run,
    split_live,
    tool_check,
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

MAXELEM = 1_048_576
MAX_TIMEOUT_S = 2_147_483  # ipset's limit; longer bans are re-added by the reconcile
HOOKS = ("INPUT", "FORWARD")


class IpsetFirewall:
    name = "ipset"
    intact_sees_entries = True  # intact() checks the entries too: no periodic rewrite

    def __init__(self, settings: FirewallSettings | None = None) -> None:
        self.settings = settings or FirewallSettings(backend="ipset")
        self.chain = self.settings.chain
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,20}", self.chain):
            raise FirewallError(
                f"firewall.chain: {self.chain!r} is not usable as a chain/set name "
                "(letters, digits, _ and -, at most 21 characters)"
            )
        base = self.chain.lower()
        self.sets = {4: f"{base}-v4", 6: f"{base}-v6"}
        self._ports = parse_ports(self.settings.ports)
        self._lock = threading.Lock()
        self._known: dict[IPNetwork, float] = {}
        self._stats = FirewallStats(backend=self.name)
        self._announced = False  # setup() runs every sync: say it at INFO once

    # -- helpers -------------------------------------------------------------------------
    def _ipset(self, script: str) -> None:
        try:
            run(["ipset", "restore", "-exist"], stdin=script)
        except FirewallError as exc:
            self._stats.errors += 1
            if "does not exist" in str(exc):
                raise FirewallError(
                    f"ipset: sets {self.sets[4]}/{self.sets[6]} are missing: the agent creates "
                    f"them at start (setup) ({exc})"
                ) from exc
            raise

    def _create_lines(self, version: int, name: str) -> list[str]:
        family = "inet" if version == 4 else "inet6"
        return [f"create {name} hash:net family {family} timeout 0 maxelem {MAXELEM}"]

    def _add_lines(
        self, name_of: dict[int, str], bans: Mapping[IPNetwork, float], now: float
    ) -> list[str]:
        lines = []
        for network, until in bans.items():
            ms = remaining_ms(until, now, MAX_TIMEOUT_S * 1000)
            timeout = 0 if ms is None else math.ceil(ms / 1000)
            lines.append(f"add {name_of[network.version]} {network.compressed} timeout {timeout}")
        return lines

    @staticmethod
    def _tool(version: int) -> str:
        return "iptables" if version == 4 else "ip6tables"

    def _rules(self, version: int) -> list[str]:
        match = (
            f"-m set --match-set {self.sets[version]} src -m comment --comment {OWNER_MARK} -j DROP"
        )
        if self._ports is None:
            return [f"-A {self.chain} {match}"]
        return [
            f"-A {self.chain} -p {proto} -m multiport --dports "
            f"{','.join(s.iptables() for s in specs)} {match}"
            for proto, specs in ports_by_proto(self._ports).items()
        ]

    def _has_jump(self, tool: str, hook: str) -> bool:
        try:
            run([tool, "-w", "-C", hook, "-j", self.chain])
            return True
        except FirewallError:
            return False

    def _chain_exists(self, tool: str) -> bool:
        try:
            run([tool, "-w", "-n", "-L", self.chain])
            return True
        except FirewallError:
            return False

    # -- ownership -----------------------------------------------------------------------
    def _inspect(self) -> bool:
        """True when our sets are outdated (hash:ip, from an older version); raises
        FirewallConflict when our chain or a set of our names is someone else's."""
        outdated = False
        for version in (4, 6):
            tool = self._tool(version)
            # the save format: iptables-nft 1.8.9 answers `-S CHAIN` of a missing chain
            # with "incompatible", which would hide a real problem the same way
            saved = run([f"{tool}-save", "-t", "filter"]).splitlines()
            rules = [ln for ln in saved if ln.startswith(f"-A {self.chain} ")]
            older = re.compile(
                rf"^-A {re.escape(self.chain)}( -p (udp|tcp) -m multiport --dports \S+)? "
                rf"-m set --match-set {re.escape(self.sets[version])} src -j DROP$"
            )
            for line in rules:
                if not (f"--comment {OWNER_MARK} " in line or older.match(line)):
                    raise FirewallConflict(
                        f"ipset: {tool} chain {self.chain} exists and was not created by "
                        "fastagi-screen: refusing to touch it; set firewall.chain to a name "
                        "of our own (e.g. FASTAGI)"
                    )
            try:
                header = run(["ipset", "list", "-t", self.sets[version]])
            except FirewallError:
                continue  # no such set: ours to create
            kind = re.search(r"^Type:\s*(\S+)", header, re.MULTILINE)
            family = "inet" if version == 4 else "inet6"
            head = re.search(r"^Header:(.*)$", header, re.MULTILINE)
            fields = head.group(1).split() if head else []
            ours = (
                kind is not None
                and kind.group(1) in ("hash:net", "hash:ip")
                and fields[:2] == ["family", family]
                and "timeout" in fields
                and f"maxelem {MAXELEM}" in " ".join(fields)
            )
            if not ours:
                raise FirewallConflict(
                    f"ipset: set {self.sets[version]} exists and was not created by "
                    "fastagi-screen: refusing to touch it; set firewall.chain to a name "
                    "of our own (e.g. FASTAGI)"
                )
            outdated = outdated or kind.group(1) == "hash:ip"  # type: ignore[union-attr]
        return outdated

    def claim(self) -> None:
        self._inspect()

    def _recreate_sets(self) -> None:
        """Our hash:ip sets of an older version out of the way: the rules that match
        them (our chain) emptied first, since the kernel keeps a referenced set."""
        for version in (4, 6):
            if self._chain_exists(self._tool(version)):
                run([self._tool(version), "-w", "-F", self.chain])
        existing = set(run(["ipset", "list", "-n"]).split())
        for name in [*self.sets.values(), *(f"{n}-tmp" for n in self.sets.values())]:
            if name in existing:
                run(["ipset", "destroy", name])
        log.warning(
            "ipset: sets %s, %s came from an older version (hash:ip): recreated as hash:net, "
            "the agent refills them",
            *self.sets.values(),
        )

    # -- the interface -------------------------------------------------------------------
    def setup(self) -> None:
        with self._lock:
            if self._inspect():
                self._recreate_sets()
                self._known.clear()
            self._ipset(
                "\n".join(self._create_lines(4, self.sets[4]) + self._create_lines(6, self.sets[6]))
                + "\n"
            )
            for version in (4, 6):
                tool = self._tool(version)
                # declaring the chain in a --noflush restore empties it: rules are rewritten
                # in one go, without duplicates, and nothing else is touched
                batch = ["*filter", f":{self.chain} - [0:0]", *self._rules(version), "COMMIT"]
                run([f"{tool}-restore", "-w", "--noflush"], stdin="\n".join(batch) + "\n")
                hooks = HOOKS if self.settings.forward else HOOKS[:1]
                for hook in HOOKS:
                    if hook in hooks:
                        if not self._has_jump(tool, hook):
                            run([tool, "-w", "-I", hook, "1", "-j", self.chain])
                    else:
                        self._drop_jumps(tool, hook)
        log.log(
            logging.DEBUG if self._announced else logging.INFO,
            "ipset: sets %s, %s and chain %s ready",
            self.sets[4],
            self.sets[6],
            self.chain,
        )
        self._announced = True

    def _drop_jumps(self, tool: str, hook: str) -> None:
        for _ in range(16):  # bounded: a jump inserted twice by hand goes too
            if not self._has_jump(tool, hook):
                return
            run([tool, "-w", "-D", hook, "-j", self.chain])

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        now = time.time()
        live, past = split_live(bans, now)
        # -exist: re-adding refreshes the timeout; deleting what is absent is no error
        lines = self._add_lines(self.sets, live, now)
        lines += [f"del {self.sets[a.version]} {a.compressed}" for a in past]
        if not lines:
            return
        with self._lock:
            self._ipset("\n".join(lines) + "\n")
            self._known.update(live)
            for address in past:
                self._known.pop(address, None)
            self._stats.adds += len(live)

    def delete(self, networks: Iterable[IPNetwork]) -> None:
        gone = {as_network(a) for a in networks}
        if not gone:
            return
        with self._lock:
            self._ipset(
                "\n".join(f"del {self.sets[a.version]} {a.compressed}" for a in gone) + "\n"
            )
            for address in gone:
                self._known.pop(address, None)
            self._stats.deletes += len(gone)

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        now = time.time()
        live, _ = split_live(bans, now)
        tmp = {v: f"{name}-tmp" for v, name in self.sets.items()}
        lines: list[str] = []
        for version in (4, 6):
            lines += self._create_lines(version, tmp[version])
            lines.append(f"flush {tmp[version]}")
        lines += self._add_lines(tmp, live, now)
        for version in (4, 6):
            lines += [f"swap {tmp[version]} {self.sets[version]}", f"destroy {tmp[version]}"]
        with self._lock:
            try:
                self._ipset("\n".join(lines) + "\n")
            except FirewallError:
                for name in tmp.values():  # leave no half-filled temporary set behind
                    with contextlib.suppress(FirewallError):
                        run(["ipset", "destroy", name])
                raise
            count_replaced(self._stats, self._known, live)
            self._known = dict(live)

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        return []  # the kernel does it

    def list(self) -> dict[IPNetwork, float | None]:
        now = time.time()
        out: dict[IPNetwork, float | None] = {}
        for name in self.sets.values():
            text = run(["ipset", "list", name, "-o", "save"])
            for line in text.splitlines():
                parts = line.split()
                if len(parts) < 3 or parts[0] != "add":
                    continue
                try:
                    network = ipaddress.ip_network(parts[2])
                except ValueError:
                    continue
                until: float = math.inf
                if "timeout" in parts[3:]:
                    seconds = int(parts[parts.index("timeout") + 1])
                    until = math.inf if seconds == 0 else now + seconds
                out[network] = until
        return out

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        """Both sets exist and hold as many entries as we put there (headers only)."""
        now = time.time() + INTACT_SLACK
        low, high = {4: 0, 6: 0}, {4: 0, 6: 0}
        for network, until in expected.items():  # networks from the agent: parsed already
            version = network.version
            high[version] += 1
            if until > now:
                low[version] += 1
        for version, name in self.sets.items():
            try:
                header = run(["ipset", "list", "-t", name])
            except FirewallError:
                return False
            found = re.search(r"^Number of entries:\s*(\d+)", header, re.MULTILINE)
            if found is None or not low[version] <= int(found.group(1)) <= high[version]:
                return False
        return True

    def teardown(self) -> None:
        with self._lock:
            self._inspect()  # never remove what is not ours
            for version in (4, 6):
                tool = self._tool(version)
                for hook in HOOKS:
                    self._drop_jumps(tool, hook)
                if self._chain_exists(tool):
                    run([tool, "-w", "-F", self.chain])
                    run([tool, "-w", "-X", self.chain])
            names = [*self.sets.values(), *(f"{n}-tmp" for n in self.sets.values())]
            existing = set(run(["ipset", "list", "-n"]).split())
            for name in names:
                if name in existing:
                    run(["ipset", "destroy", name])
            self._known.clear()
        log.info("ipset: chain %s and sets %s, %s removed", self.chain, *self.sets.values())

    def check(self) -> list[CheckResult]:
        results = []
        result, _ = tool_check("ipset command", ["ipset", "version"])
        results.append(result)
        for tool in ("iptables", "ip6tables"):
            result, _ = tool_check(f"{tool} command", [tool, "-V"])
            results.append(result)
        if not results[0].ok:
            return results
        probe = f"fastagi-chk{int(time.time() * 1000) % 100000}"
        try:
            run(["ipset", "create", probe, "hash:net", "family", "inet6", "timeout", "1"])
            run(["ipset", "destroy", probe])
            results.append(
                CheckResult(
                    "ipset kernel support", True, "ip_set hash:net with timeouts works here"
                )
            )
        except FirewallError as exc:
            results.append(CheckResult("ipset kernel support", False, permission_hint(str(exc))))
            return results
        try:
            self.claim()
        except FirewallError as exc:
            results.append(CheckResult(f"ipset chain {self.chain}", False, str(exc)))
            return results
        try:
            sizes = {
                n: len(run(["ipset", "list", n, "-o", "save"]).splitlines()) - 1
                for n in self.sets.values()
            }
            jumps = self._has_jump("iptables", "INPUT") and self._has_jump("ip6tables", "INPUT")
            results.append(
                CheckResult(
                    f"ipset sets {', '.join(self.sets.values())}",
                    jumps,
                    f"present, {sum(sizes.values())} bans"
                    + ("" if jumps else f"; but no jump to {self.chain} from INPUT: run the agent"),
                )
            )
        except FirewallError:
            results.append(
                CheckResult(
                    f"ipset sets {', '.join(self.sets.values())}",
                    True,
                    "not created yet; the agent creates them at start",
                )
            )
        return results

    def stats(self) -> FirewallStats:
        now = time.time()
        with self._lock:
            self._known = {a: u for a, u in self._known.items() if u > now}
            return FirewallStats(
                self.name,
                len(self._known),
                self._stats.adds,
                self._stats.deletes,
                self._stats.errors,
                {"sets": ",".join(self.sets.values()), "chain": self.chain},
            )

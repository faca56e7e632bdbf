"""The nftables backend: our own `inet` table, sets with per-element timeouts.

    table inet fastagi {
        comment "fastagi-screen"       # our mark: a table of that name without it is refused
        set ban4 { type ipv4_addr; flags timeout; }       # single addresses (hash)
        set ban6 { type ipv6_addr; flags timeout; }
        set ban6_64 { type ipv6_addr; flags timeout; }    # /64 prefixes (hash, masked match)
        set net4 { type ipv4_addr; flags interval, timeout; }   # any other prefix
        set net6 { type ipv6_addr; flags interval, timeout; }
        chain input { type filter hook input priority filter - 10; policy accept;
                      ip saddr @ban4 drop; ip saddr @net4 drop; ip6 saddr @ban6 drop;
                      ip6 saddr & ffff:ffff:ffff:ffff:: @ban6_64 drop; ip6 saddr @net6 drop }
        chain forward { ... }          # only with firewall.forward
    }

Bans expire in the kernel even when the agent is gone. Every call is ONE nft
transaction (all or nothing), sent through libnftables (ctypes, no fork) or, when the
library cannot be loaded, through `nft -f -`. 100,000 elements load in well under a
second. We never touch anything outside our table, and never a table of our configured
name that we did not create (a distribution's `inet filter`): claim() refuses it. A
table an older version made (no mark, nothing but our sets, chains and drop rules) is
ours: setup() recreates it.

Why hash sets for addresses and /64s: nft 1.0.6 checks an interval set's elements for
overlaps in userspace, so adding one element to an interval set of 100,000 costs
~2.4 s and deleting 1,000 from 10,000 ~12 s, where a hash set takes milliseconds. The
interval sets hold the rarer prefixes (a /48, an IPv4 /24); they refuse overlapping
elements, so those are kept flattened (_common.flatten: a prefix inside a wider
banned one is folded into it). The backend keeps the bans it was given and writes
the difference between what it wrote and what it wants now.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import logging
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping

from ._common import (
    as_network,
    count_replaced,
    flatten,
    parse_ports,
    permission_hint,
    ports_by_proto,
    remaining_ms,
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

SET4, SET6, SET6_64, NET4, NET6 = "ban4", "ban6", "ban6_64", "net4", "net6"
# set -> (type, flags); ban4/ban6 are the sets of versions before prefixes, unchanged
SETS = {
    SET4: ("ipv4_addr", "timeout"),
    SET6: ("ipv6_addr", "timeout"),
    SET6_64: ("ipv6_addr", "timeout"),
    NET4: ("ipv4_addr", "interval, timeout"),
    NET6: ("ipv6_addr", "interval, timeout"),
}
INTERVAL_SETS = (NET4, NET6)
REWRITE_AT = 64  # deletions or refreshes in one call beyond which the sets are rewritten
PRIORITY = "filter - 10"
MAX_TIMEOUT_MS = 36_500 * 86_400_000  # before the distribution's own filter chains


class _Libnftables:
    """The few libnftables calls we need, through ctypes (Debian: libnftables1)."""

    JSON = 1 << 4
    TERSE = 1 << 11  # NFT_CTX_OUTPUT_TERSE: sets without their elements

    def __init__(self, soname: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(soname)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).restype = ctypes.c_int
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self.where = f"libnftables ({soname})"

    def run(
        self, script: str, json_output: bool = False, check_only: bool = False, terse: bool = False
    ) -> str:
        # A fresh context per call: its cache never outlives a transaction, and a context
        # made in one network namespace is never reused from another.
        lib = self._lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise FirewallError("libnftables: nft_ctx_new failed")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            flags = (self.JSON if json_output else 0) | (self.TERSE if terse else 0)
            if flags:
                lib.nft_ctx_output_set_flags(ctx, lib.nft_ctx_output_get_flags(ctx) | flags)
            if check_only:
                lib.nft_ctx_set_dry_run(ctx, True)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
        if rc != 0:
            raise FirewallError(f"nftables: {_first_error(err) or f'error {rc}'}")
        return out


class _NftCommand:
    """Fallback: the `nft` command with the batch on stdin (one transaction too)."""

    def __init__(self) -> None:
        path = shutil.which("nft")
        if path is None:
            raise FirewallError(
                "nftables: neither libnftables.so.1 nor the nft command found "
                "(apt install nftables)"
            )
        self.path = path
        self.where = f"nft command ({path})"

    def run(
        self, script: str, json_output: bool = False, check_only: bool = False, terse: bool = False
    ) -> str:
        argv = [self.path]
        if json_output:
            argv.append("-j")
        if terse:
            argv.append("-t")
        if check_only:
            argv.append("-c")
        argv += ["-f", "-"]
        try:
            proc = subprocess.run(
                argv, input=script, capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise FirewallError("nftables: nft did not finish within 60s") from exc
        if proc.returncode != 0:
            raise FirewallError(f"nftables: {_first_error(proc.stderr) or proc.returncode}")
        return proc.stdout


def _first_error(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    line = (errors or lines or [""])[0]
    return line[:300]


def _duration(ms: int) -> str:
    """nft's duration syntax; each part must stay below 2**32 ms, so '1234567ms' overflows
    for bans longer than 49 days where '60d0h0m0s0ms' does not. Capped at 100 years.
    Shorter ones as bare ms: nft parses 100,000 shorter elements ~15% faster."""
    ms = min(ms, MAX_TIMEOUT_MS)
    if ms < 1 << 32:
        return f"{ms}ms"
    days, ms = divmod(ms, 86_400_000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    seconds, ms = divmod(ms, 1000)
    return f"{days}d{hours}h{minutes}m{seconds}s{ms}ms"


def _transport() -> _Libnftables | _NftCommand:
    for soname in ("libnftables.so.1", ctypes.util.find_library("nftables")):
        if not soname:
            continue
        try:
            return _Libnftables(soname)
        except (OSError, AttributeError):
            continue
    return _NftCommand()


class NftablesFirewall:
    name = "nftables"

    def __init__(self, settings: FirewallSettings | None = None) -> None:
        self.settings = settings or FirewallSettings(backend="nftables")
        self.table = self.settings.chain.lower()
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,30}", self.table):
            raise FirewallError(
                f"firewall.chain: {self.settings.chain!r} is not usable as an nftables table "
                "name (letters, digits, _ and -, starting with a letter)"
            )
        self._ports = parse_ports(self.settings.ports)
        self._lock = threading.Lock()
        self._nft: _Libnftables | _NftCommand | None = None
        self._known: dict[IPNetwork, float] = {}  # the bans we were given
        self._kernel: dict[IPNetwork, float] = {}  # what we wrote: _known, flattened
        self._stats = FirewallStats(backend=self.name)
        self._announced = False  # setup() runs every sync: say it at INFO once
        # does a re-add with a timeout update an element's (found out once, in setup)?
        self._updates_timeouts: bool | None = None

    # -- transport ---------------------------------------------------------------------
    def _run(
        self, script: str, json_output: bool = False, check_only: bool = False, terse: bool = False
    ) -> str:
        if self._nft is None:
            self._nft = _transport()
        try:
            return self._nft.run(
                script, json_output=json_output, check_only=check_only, terse=terse
            )
        except FirewallError as exc:
            self._stats.errors += 1
            if "No such file or directory" in str(exc) and "add table" not in script:
                raise FirewallError(
                    f"nftables: table inet {self.table} or its sets are missing: the agent "
                    f"creates them at start (setup) ({exc})"
                ) from exc
            raise

    # -- script pieces -----------------------------------------------------------------
    def _base_script(self) -> list[str]:
        t = f"inet {self.table}"
        lines = [
            f'add table {t} {{ comment "{OWNER_MARK}"; }}',  # the mark: set on creation only
            *(
                f"add set {t} {name} {{ type {kind}; flags {flags}; }}"
                for name, (kind, flags) in SETS.items()
            ),
        ]
        hooks = ["input", "forward"] if self.settings.forward else ["input"]
        for hook in hooks:
            lines.append(
                f"add chain {t} {hook} {{ type filter hook {hook} priority {PRIORITY}; "
                "policy accept; }"
            )
            lines.append(f"flush chain {t} {hook}")
            lines += [f"add rule {t} {hook} {match} counter drop" for match in self._matches()]
        if not self.settings.forward:
            # remove a forward hook left by an earlier configuration (add first: no error)
            lines.append(
                f"add chain {t} forward {{ type filter hook forward priority {PRIORITY}; "
                "policy accept; }"
            )
            lines.append(f"delete chain {t} forward")
        return lines

    def _matches(self) -> list[str]:
        sources = [
            f"ip saddr @{SET4}",
            f"ip saddr @{NET4}",
            f"ip6 saddr @{SET6}",
            f"ip6 saddr & ffff:ffff:ffff:ffff:: @{SET6_64}",
            f"ip6 saddr @{NET6}",
        ]
        if self._ports is None:
            return sources
        out = []
        for source in sources:
            for proto, specs in ports_by_proto(self._ports).items():
                ports = ", ".join(spec.nft() for spec in specs)
                out.append(f"{source} {proto} dport {{ {ports} }}")
        return out

    def _elements(
        self, bans: Mapping[IPNetwork, float], now: float, timeouts: bool, expires: bool = False
    ) -> dict:
        """Element texts by set; `expires`: the expiry too, which is what makes a kernel
        that can lengthen an existing element do it."""
        by_set: dict[str, list[str]] = {name: [] for name in SETS}
        durations: dict[float, str] = {}  # a feed's entries share one end: made once
        for network, until in bans.items():
            name = _set_of(network)
            if name in INTERVAL_SETS:
                text = network.compressed
            elif name == SET4:  # 100,000 in a blocklist: twice as fast as str()
                text = socket.inet_ntoa(network.network_address.packed)
            else:
                text = str(network.network_address)
            if timeouts and (timeout := durations.get(until)) is None:
                ms = remaining_ms(until, now)
                timeout = "" if ms is None else f" timeout {_duration(ms)}"
                if expires and ms is not None:
                    timeout += f" expires {_duration(ms)}"
                durations[until] = timeout
            by_set[name].append(text + timeout if timeouts else text)
        return {name: elems for name, elems in by_set.items() if elems}

    def _element_lines(self, verb: str, elements: dict[str, list[str]]) -> list[str]:
        return [
            f"{verb} element inet {self.table} {name} {{ {', '.join(elems)} }}"
            for name, elems in elements.items()
        ]

    # -- ownership ---------------------------------------------------------------------
    def _inspect(self) -> str:
        """'absent', 'ours' or 'outdated' (ours, from a version without the mark or
        with other sets); FirewallConflict when the table is someone else's."""
        try:
            text = self._run(f"list table inet {self.table}\n", terse=True)
        except FirewallError as exc:
            if "No such file or directory" in str(exc):
                return "absent"
            raise
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        marked = len(lines) > 1 and lines[1] == f'comment "{OWNER_MARK}"'
        shape = json.loads(
            self._run(f"list table inet {self.table}\n", json_output=True, terse=True) or "{}"
        ).get("nftables", [])
        if marked:
            return "ours" if _sets_as_ours(shape) else "outdated"
        if _older_version(shape):
            return "outdated"
        raise FirewallConflict(
            f"nftables: table inet {self.table} exists and was not created by fastagi-screen: "
            f"refusing to touch it; set firewall.chain to a name of our own (e.g. FASTAGI)"
        )

    def claim(self) -> None:
        self._inspect()

    # -- the interface -----------------------------------------------------------------
    def setup(self) -> None:
        with self._lock:
            state = self._inspect()
            script = self._base_script()
            if state == "outdated":  # ours, from an older version: made anew, refilled by set()
                script.insert(0, f"delete table inet {self.table}")
            self._run("\n".join(script) + "\n")
            if state != "ours":
                self._kernel = {}
            if self._updates_timeouts is None:
                self._updates_timeouts = self._probe_timeout_update()
        if state == "outdated":
            log.warning(
                "nftables: table inet %s came from an older version: "
                "recreated, the agent refills it",
                self.table,
            )
        log.log(
            logging.DEBUG if self._announced else logging.INFO,
            "nftables: table inet %s ready (hooks: %s, ports: %s)",
            self.table,
            "input, forward" if self.settings.forward else "input",
            "all" if self._ports is None else ", ".join(map(str, self.settings.ports)),
        )
        self._announced = True

    def _probe_timeout_update(self) -> bool:
        """Does adding an element that exists, with its expiry given, lengthen it? Newer
        kernels do (6.18 here; only when `expires` is given, or the timeout differs),
        older ones keep the old expiry, so a refresh there must delete first. Tried
        once, on a scratch set of our table removed right after."""
        t, probe = f"inet {self.table}", "timeout_probe"
        try:
            self._run(
                f"add set {t} {probe} {{ type ipv4_addr; flags timeout; }}\n"
                f"flush set {t} {probe}\n"
                f"add element {t} {probe} {{ 192.0.2.1 timeout 1h expires 1m }}\n"
            )
            self._run(f"add element {t} {probe} {{ 192.0.2.1 timeout 1h expires 1h }}\n")
            shape = json.loads(self._run(f"list set {t} {probe}\n", json_output=True) or "{}")
        except FirewallError as exc:
            log.debug("nftables: timeout update probe failed (%s)", exc)
            return False
        finally:
            with contextlib.suppress(FirewallError):
                self._run(f"delete set {t} {probe}\n")
        elems = [item["set"].get("elem", []) for item in shape.get("nftables", []) if "set" in item]
        expires = [e["elem"].get("expires", 0) for es in elems for e in es if isinstance(e, dict)]
        updates = bool(expires) and expires[0] > 60
        log.debug("nftables: a re-add %s an element's timeout", "updates" if updates else "keeps")
        return updates

    def _write(self, now: float, touched: Iterable[IPNetwork]) -> None:
        """Bring the kernel's elements for the `touched` networks in line with the live
        _known bans, looking only at those (a hash set's elements are independent) and,
        when an interval set is concerned, at that set's whole flattened layout. A
        touched network we never wrote is deleted all the same (another process's),
        unless that would cut into an interval we keep. Deletes go first, in their own
        transaction: nft checks an interval set's overlaps against the elements before
        the transaction, so a /56 cannot become its /48 within one.

        One pass over the hash sets' networks: hashing a network costs ~0.7 us in Python,
        and a blocklist's 100,000 each went through ten dicts before."""
        known, kernel = self._known, self._kernel
        new: dict[IPNetwork, float] = {}
        refresh: dict[IPNetwork, float] = {}
        gone: dict[IPNetwork, float] = {}
        wider: set[IPNetwork] = set()
        for network in touched:
            if _set_of(network) in INTERVAL_SETS:
                wider.add(network)
                continue
            until = known.get(network, 0.0)
            if until <= now:
                gone[network] = math.inf
            elif (had := kernel.get(network)) is None:
                new[network] = until
            elif had != until:
                refresh[network] = until
        if wider:
            live = {n: u for n, u in known.items() if u > now and _set_of(n) in INTERVAL_SETS}
            intervals = flatten(live)
            current = {n: u for n, u in kernel.items() if _set_of(n) in INTERVAL_SETS}
            gone.update({n: math.inf for n in current if n not in intervals})
            for network in wider - set(intervals) - set(current):
                if not any(network.overlaps(k) for k in intervals if k.version == network.version):  # type: ignore[arg-type]
                    gone[network] = math.inf
            new.update({n: u for n, u in intervals.items() if n not in current})
            refresh.update({n: u for n, u in intervals.items() if current.get(n, u) != u})
        # nft deletes one by one: slow in bulk; a kernel that updates timeouts on a re-add
        # needs no delete to lengthen a ban (a feed's refresh lengthens 100,000)
        deleted = len(gone) + (0 if self._updates_timeouts else len(refresh))
        if deleted > REWRITE_AT:
            self._rewrite(_layout({n: u for n, u in known.items() if u > now}), now)
            return
        if gone:
            # add first (no error when present), then delete: no error when absent
            elements = self._elements(gone, now, False)
            self._run(
                "\n".join(
                    self._element_lines("add", elements) + self._element_lines("delete", elements)
                )
                + "\n"
            )
            for network in gone:
                kernel.pop(network, None)
        if new or refresh:
            # Re-adding an element keeps its old timeout on kernels before timeout
            # updates, so a refresh there is add (never fails), delete, add with the new
            # timeout, in one transaction
            script = []
            if refresh and not self._updates_timeouts:
                elements = self._elements(refresh, now, False)
                script += self._element_lines("add", elements)
                script += self._element_lines("delete", elements)
            lengthen = bool(refresh) and bool(self._updates_timeouts)
            new.update(refresh)
            script += self._element_lines("add", self._elements(new, now, True, lengthen))
            self._run("\n".join(script) + "\n")
            kernel.update(new)

    def _rewrite(self, wanted: dict[IPNetwork, float], now: float) -> None:
        """Every set emptied and refilled, in one transaction."""
        script = [f"flush set inet {self.table} {name}" for name in SETS]
        script += self._element_lines("add", self._elements(wanted, now, True))
        self._run("\n".join(script) + "\n")
        self._kernel = dict(wanted)

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        now = time.time()
        live, past = split_live(bans, now)
        if not live and not past:
            return
        with self._lock:
            self._known.update(live)
            for network in past:
                self._known.pop(network, None)
            self._write(now, [*live, *past])
            self._stats.adds += len(live)

    def delete(self, networks: Iterable[IPNetwork]) -> None:
        gone = {as_network(n) for n in networks}
        if not gone:
            return
        with self._lock:
            for network in gone:
                self._known.pop(network, None)
            self._write(time.time(), gone)
            self._stats.deletes += len(gone)

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        now = time.time()
        live, _ = split_live(bans, now)
        with self._lock:
            self._rewrite(_layout(live), now)
            count_replaced(self._stats, self._known, live)
            self._known = dict(live)

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        return []  # the kernel does it

    def list(self) -> dict[IPNetwork, float | None]:
        now = time.time()
        out: dict[IPNetwork, float | None] = {}
        with self._lock:
            # one `list table` (nft 1.0.6 fails two `list set` in one buffer)
            text = self._run(f"list table inet {self.table}\n", json_output=True)
        for item in json.loads(text or "{}").get("nftables", []):
            found = item.get("set", {})
            if found.get("name") not in SETS:
                continue
            for elem in found.get("elem", []):
                if isinstance(elem, dict) and "elem" in elem:
                    value, expires = elem["elem"].get("val"), elem["elem"].get("expires")
                    until = now + float(expires) if expires is not None else math.inf
                else:
                    value, until = elem, math.inf
                if isinstance(value, dict) and "prefix" in value:  # {"prefix": {addr, len}}
                    value = f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
                elif found.get("name") == SET6_64:
                    value = f"{value}/64"
                try:
                    out[ipaddress.ip_network(value)] = until
                except (TypeError, ValueError):
                    continue
        return out

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        """Our table and its sets exist, with their types, read without their elements
        (a millisecond at any size; listing or even `get element` makes nft load all
        100,000 elements, about a second). A deleted table is caught here; the input
        chain's rules are rewritten by every setup(); a set flushed by hand is refilled
        by the agent's periodic full rewrite."""
        if self._nft is None:
            self._nft = _transport()
        try:
            with self._lock:
                text = self._nft.run(
                    f"list sets table inet {self.table}\n", json_output=True, terse=True
                )
        except FirewallError:
            return False
        shape = json.loads(text or "{}").get("nftables", [])
        names = {item["set"].get("name") for item in shape if "set" in item}
        return names >= set(SETS) and _sets_as_ours(shape)

    def teardown(self) -> None:
        with self._lock:
            if self._inspect() != "absent":
                self._run(f"delete table inet {self.table}\n")
            self._known.clear()
            self._kernel.clear()
        log.info("nftables: table inet %s removed", self.table)

    def check(self) -> list[CheckResult]:
        results = []
        try:
            nft = self._nft or _transport()
            self._nft = nft
            results.append(CheckResult("nftables library", True, nft.where))
        except FirewallError as exc:
            return [CheckResult("nftables library", False, str(exc))]
        try:
            self.claim()
        except FirewallError as exc:
            results.append(CheckResult(f"nftables table inet {self.table}", False, str(exc)))
            return results
        try:
            # sent to the kernel and aborted there: proves nf_tables, sets with timeouts and
            # the permission (CAP_NET_ADMIN) without changing anything
            self._run("\n".join(self._base_script()) + "\n", check_only=True)
            results.append(
                CheckResult(
                    "nftables kernel support", True, "nf_tables with set timeouts works here"
                )
            )
        except FirewallError as exc:
            results.append(CheckResult("nftables kernel support", False, permission_hint(str(exc))))
            return results
        try:
            size = len(self.list())
            results.append(
                CheckResult(f"nftables table inet {self.table}", True, f"present, {size} bans")
            )
        except FirewallError:
            results.append(
                CheckResult(
                    f"nftables table inet {self.table}",
                    True,
                    "not created yet; the agent creates it at start",
                )
            )
        return results

    def stats(self) -> FirewallStats:
        now = time.time()
        with self._lock:
            self._known = {a: u for a, u in self._known.items() if u > now}
            self._kernel = {a: u for a, u in self._kernel.items() if u > now}
            size = len(self._known)
            return FirewallStats(
                self.name,
                size,
                self._stats.adds,
                self._stats.deletes,
                self._stats.errors,
                {"table": f"inet {self.table}", "transport": getattr(self._nft, "where", "")},
            )


def _set_of(network: IPNetwork) -> str:
    if network.version == 4:
        return SET4 if network.prefixlen == 32 else NET4
    return {128: SET6, 64: SET6_64}.get(network.prefixlen, NET6)


def _layout(bans: Mapping[IPNetwork, float]) -> dict[IPNetwork, float]:
    """The elements the kernel holds for these bans: those of the interval sets
    flattened (they refuse overlaps), the others as they are."""
    intervals = {n: u for n, u in bans.items() if _set_of(n) in INTERVAL_SETS}
    if not intervals:
        return dict(bans)  # the common case: a copy keeps the keys' hashes
    return {**{n: u for n, u in bans.items() if n not in intervals}, **flatten(intervals)}


def _sets_as_ours(shape: list[dict]) -> bool:
    """Every set of ours that exists has the type and flags this version gives it."""
    for item in shape:
        found = item.get("set")
        if found and found.get("name") in SETS:
            kind, flags = SETS[found["name"]]
            if found.get("type") != kind or found.get("flags", []) != flags.split(", "):
                return False
    return True


def _older_version(shape: list[dict]) -> bool:
    """A table without our mark that an older fastagi-screen made: our sets, our hook
    chains, drop rules on our sets, and nothing else (never empty: those versions
    created the sets with the table)."""
    kinds = {kind for item in shape for kind in item if kind not in ("metainfo", "table")}
    sets = {i["set"]["name"] for i in shape if "set" in i}
    chains = {i["chain"]["name"] for i in shape if "chain" in i}
    rules = [i["rule"] for i in shape if "rule" in i]
    return (
        kinds <= {"set", "chain", "rule"}
        and bool(sets)
        and sets <= {SET4, SET6}
        and chains <= {"input", "forward"}
        and all(
            rule.get("expr", [{}])[-1] == {"drop": None}
            and any(f'"@{name}"' in json.dumps(rule.get("expr")) for name in (SET4, SET6))
            for rule in rules
        )
    )

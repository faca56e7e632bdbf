"""Callers counted and banned per prefix (issue 12, "IPv6 rotation"), without namespaces.

A scanner owns a whole IPv6 /64: its calls add up under that /64 (`ipv6_prefix`), on
either store, through the real server and the emulator; `status` and `unban` take any
address inside a banned prefix. The firewall side with real packets is in
tests/test_prefix_netns.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fastagi.addresses import (
    AddressError,
    AddressSet,
    Prefixes,
    parse_address,
    parse_target,
    target_text,
)
from fastagi.emulator import Call
from fastagi.firewall._common import flatten
from tests.harness import running_server, settings
from tests.procs import Service, ctl

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)


@given(address=st.one_of(v4, v6))
def test_an_address_is_a_single_host_target_written_as_before(address):
    target = parse_target(str(address))
    assert target.prefixlen == target.max_prefixlen
    assert target_text(target) == str(address)  # the store keys of old bans stay valid
    assert parse_target(target_text(target)) == target


@given(address=st.one_of(v4, v6), length=st.integers(0, 128), data=st.data())
def test_a_network_round_trips_through_its_canonical_text(address, length, data):
    length = min(length, address.max_prefixlen - 1)  # a network, not one host
    network = ipaddress.ip_network((address, length), strict=False)
    text = target_text(network)
    assert "/" in text and parse_target(text) == network
    assert parse_target(data.draw(st.sampled_from([text, network.exploded, f" {text} "]))) == (
        network
    )


@given(address=st.one_of(v4, v6), length=st.integers(1, 127))
def test_a_network_with_host_bits_set_is_refused(address, length):
    length = min(length, address.max_prefixlen - 1)
    network = ipaddress.ip_network((address, length), strict=False)
    if network.network_address == address:
        address = address + 1
    with pytest.raises(AddressError):
        parse_target(f"{address}/{length}")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("::ffff:192.0.2.9", "192.0.2.9"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("[2001:db8::9]:5060", "2001:db8::9"),
        ("203.0.113.9:5060", "203.0.113.9"),
    ],
)
def test_spellings_of_one_target_are_one_key(text, expected):
    assert target_text(parse_target(text)) == expected


@pytest.mark.parametrize("text", ["", "2001:db8::/129", "203.0.113.0/24/1", "fe80::1%eth0!", "x/8"])
def test_garbage_is_not_a_target(text):
    with pytest.raises(AddressError):
        parse_target(text)


@given(
    base=v6,
    length=st.integers(32, 128),
    offsets=st.lists(st.integers(0, 2**128 - 1), min_size=2, max_size=12),
)
def test_every_address_of_one_prefix_maps_to_that_prefix(base, length, offsets):
    assume(not base.is_link_local)  # counted alone: see the narrowing test below
    prefixes = Prefixes(ipv6=length)
    network = ipaddress.IPv6Network((base, length), strict=False)
    addresses = [network[offset % network.num_addresses] for offset in offsets]
    targets = {target_text(prefixes.target(a)) for a in addresses}
    assert targets == {target_text(network)} == {prefixes.key(a) for a in addresses}
    if int(network.broadcast_address) < 2**128 - 1:
        assert prefixes.target(network.broadcast_address + 1) != network


@given(address=v4, length=st.integers(16, 32))
def test_ipv4_callers_map_through_ipv4_prefix(address, length):
    assume(not address.is_link_local)
    target = Prefixes(ipv4=length).target(address)
    assert target.prefixlen == length and address in target
    assert Prefixes().target(address) == ipaddress.ip_network(address)  # the default: /32
    assert Prefixes(ipv4=length).key(address) == target_text(target)


def test_a_prefix_that_would_cover_an_ignored_network_narrows_to_the_caller():
    ignore = AddressSet.parse(["2001:db8:1:2::10/128"])
    caller = parse_address("2001:db8:1:2::99")
    assert target_text(Prefixes().target(caller)) == "2001:db8:1:2::/64"
    assert target_text(Prefixes().target(caller, ignore)) == "2001:db8:1:2::99"
    assert Prefixes().key(caller, ignore) == "2001:db8:1:2::99"
    assert parse_target("2001:db8:1:2::/64") in ignore  # a target overlapping it
    assert parse_target("2001:db8:1:3::/64") not in ignore
    # a link-local /64 is every host of the link: such a caller is counted alone
    assert target_text(Prefixes().target(parse_address("fe80::1%eth0"))) == "fe80::1"


@given(
    address=st.one_of(v4, v6),
    ignored=st.lists(st.tuples(st.one_of(v4, v6), st.integers(0, 128)), max_size=4),
    v4len=st.integers(16, 32),
    v6len=st.integers(32, 128),
)
def test_the_per_call_key_is_the_targets_text(address, ignored, v4len, v6len):
    ignore = AddressSet(
        ipaddress.ip_network((a, min(n, a.max_prefixlen)), strict=False) for a, n in ignored
    )
    prefixes = Prefixes(v4len, v6len)
    assert prefixes.key(address, ignore) == target_text(prefixes.target(address, ignore))


def test_widen_keeps_wider_networks_and_widens_narrower_ones():
    prefixes = Prefixes()
    assert prefixes.widen(parse_target("2001:db8:1::/48")) == parse_target("2001:db8:1::/48")
    assert prefixes.widen(parse_target("2001:db8:1:2::5")) == parse_target("2001:db8:1:2::/64")
    assert prefixes.widen(parse_target("192.0.2.9")) == parse_target("192.0.2.9")


nested = st.lists(
    st.tuples(st.integers(0, 255), st.sampled_from([40, 48, 56, 64, 128]), st.floats(1, 1e6)),
    min_size=1,
    max_size=30,
)


@given(entries=nested)
def test_flatten_leaves_no_overlap_and_no_ban_shorter(entries):
    bans = {}
    for n, length, until in entries:
        address = ipaddress.IPv6Address(f"2001:db8:{n % 4:x}:{n:x}::{n:x}")
        bans[ipaddress.IPv6Network((address, length), strict=False)] = until
    flat = flatten(bans)
    assert set(flat) <= set(bans)
    keys = list(flat)
    assert not any(a.overlaps(b) for i, a in enumerate(keys) for b in keys[i + 1 :])
    for network, until in bans.items():
        holders = [k for k in flat if network.subnet_of(k)]
        assert len(holders) == 1 and flat[holders[0]] >= until
    assert flatten({}) == {} and flatten({keys[0]: math.inf}) == {keys[0]: math.inf}


# -- the server: many addresses of one /64 reach the threshold together ------------------
ROTATING = [f"2001:db8:1:2::{n:x}" for n in range(1, 13)]  # 12 addresses of one /64


def _rotate(redis_url: str, **overrides: str):
    async def main():
        async with running_server(redis_url, SCREENING_THRESHOLD="5", **overrides) as srv:
            results = [await srv.call(Call(source=ip, channel_type="PJSIP")) for ip in ROTATING]
            other = await srv.call(Call(source="2001:db8:1:3::1", channel_type="PJSIP"))
            return results, other, await srv.store.banned(), await srv.store.counted()

    return asyncio.run(main())


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_twelve_addresses_of_one_64_reach_the_threshold_together(store, request, caplog):
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    caplog.set_level(logging.WARNING, logger="fastagi.server")
    results, other, banned, counted = _rotate(url)
    outcomes = [(r.variables["SCREEN_RESULT"], r.variables.get("SCREEN_COUNT")) for r in results]
    assert outcomes[:5] == [*(("COUNTED", str(n)) for n in range(1, 5)), ("BANNED", "5")]
    assert all(result == "BANNED" for result, _ in outcomes[5:])
    assert set(banned) == {"2001:db8:1:2::/64"}  # one ban, not twelve
    bans = [r.getMessage() for r in caplog.records if "banned until" in r.getMessage()]
    assert len(bans) == 1 and bans[0].startswith("2001:db8:1:2::/64 banned until")
    # each NOTICE names the caller's own address, as the seed dialplan's line does
    for ip, result in zip(ROTATING, results, strict=True):
        assert result.log[0].endswith(f"failed for {ip} - Unknown connection from peer")
    # another /64 is another caller
    assert other.variables["SCREEN_RESULT"] == "COUNTED"
    assert counted["2001:db8:1:3::/64"] == 1


def test_ipv6_prefix_128_counts_every_address_alone_and_48_a_whole_site():
    results, _, banned, counted = _rotate("memory://", SCREENING_IPV6_PREFIX="128")
    assert all(r.variables["SCREEN_RESULT"] == "COUNTED" for r in results)
    assert banned == {} and set(counted) == set(ROTATING) | {"2001:db8:1:3::1"}
    _, other, banned, _ = _rotate("memory://", SCREENING_IPV6_PREFIX="48")
    assert set(banned) == {"2001:db8:1::/48"}
    assert other.variables["SCREEN_RESULT"] == "BANNED"  # 2001:db8:1:3::1 is in that /48


def test_ipv4_prefix_counts_a_subnet_together():
    async def main():
        async with running_server(SCREENING_THRESHOLD="3", SCREENING_IPV4_PREFIX="24") as srv:
            for n in (1, 2, 3):
                last = await srv.call(Call(source=f"198.51.100.{n}"))
            return last, await srv.store.banned()

    last, banned = asyncio.run(main())
    assert last.variables["SCREEN_RESULT"] == "BANNED" and set(banned) == {"198.51.100.0/24"}


def test_an_ignored_address_inside_the_callers_64_keeps_it_to_the_caller_alone():
    async def main():
        ignore = '["127.0.0.0/8", "2001:db8:1:2::1/128"]'
        async with running_server(SCREENING_THRESHOLD="3", SCREENING_IGNORE=ignore) as srv:
            for _ in range(3):
                await srv.call(Call(source="2001:db8:1:2::9", channel_type="PJSIP"))
            office = await srv.call(Call(source="2001:db8:1:2::1", channel_type="PJSIP"))
            return office, await srv.store.banned()

    office, banned = asyncio.run(main())
    assert set(banned) == {"2001:db8:1:2::9"}  # not the /64: the office lives in it
    assert office.variables["SCREEN_RESULT"] == "IGNORED"


# -- fastagi-ctl: an address inside a banned prefix ---------------------------------------
def test_status_and_unban_take_an_address_inside_a_banned_prefix(redis_url):
    env = {"FASTAGI_REDIS_URL": redis_url, "FASTAGI_SCREENING_PBX_ID": "pbx-a"}
    proc = ctl("ban", "2001:db8:1:2::77", "--for", "1h", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("2001:db8:1:2::/64 banned until")
    report = json.loads(ctl("status", "2001:db8:1:2::abcd", "--json", env=env).stdout)
    assert report["banned"] is True and report["ip"] == "2001:db8:1:2::/64"
    text = ctl("status", "2001:db8:1:2::abcd", env=env).stdout
    assert "Status for 2001:db8:1:2::abcd (counted as 2001:db8:1:2::/64)" in text
    assert "Banned until" in text
    outside = json.loads(ctl("status", "2001:db8:1:3::1", "--json", env=env).stdout)
    assert outside["banned"] is False
    proc = ctl("unban", "2001:db8:1:2::5", env=env)
    assert proc.returncode == 0 and "2001:db8:1:2::/64 unbanned" in proc.stdout
    assert json.loads(ctl("status", "--json", env=env).stdout)["banned"]["current"] == 0
    # a ban of one address, made under ipv6_prefix = 128 (or before prefixes existed)
    single = {**env, "FASTAGI_SCREENING_IPV6_PREFIX": "128"}
    assert ctl("ban", "2001:db8:1:2::5", "--for", "1h", env=single).returncode == 0
    report = json.loads(ctl("status", "2001:db8:1:2::5", "--json", env=env).stdout)
    assert report["banned"] is True and report["banned_as"] == "2001:db8:1:2::5"
    proc = ctl("unban", "2001:db8:1:2::5", env=env)
    assert "2001:db8:1:2::5 unbanned" in proc.stdout
    assert json.loads(ctl("status", "--json", env=env).stdout)["banned"]["current"] == 0


def test_a_cidr_ban_holds_the_addresses_inside_it(redis_url):
    env = {"FASTAGI_REDIS_URL": redis_url}
    assert ctl("ban", "2001:db8:7::/48", "--for", "1h", env=env).returncode == 0
    report = json.loads(ctl("status", "2001:db8:7:5::9", "--json", env=env).stdout)
    assert report["banned"] is True and report["banned_as"] == "2001:db8:7::/48"
    proc = ctl("unban", "2001:db8:7:5::9", env=env)  # lifts the /48 that holds it
    assert proc.returncode == 0 and "2001:db8:7::/48 unbanned" in proc.stdout
    assert json.loads(ctl("status", "--json", env=env).stdout)["banned"]["current"] == 0


def test_a_cidr_over_an_ignored_network_is_refused(tmp_path):
    env = {"FASTAGI_RUNTIME_DIR": str(tmp_path)}
    proc = ctl("ban", "127.0.0.0/16", env=env)
    assert proc.returncode == 2 and "screening.ignore" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_the_embedded_service_counts_per_prefix_too(tmp_path):
    env = {"FASTAGI_RUNTIME_DIR": str(tmp_path / "run"), "FASTAGI_SCREENING_THRESHOLD": "3"}
    with Service(env, log=tmp_path / "serve.log") as service:
        for ip in ("2001:db8:5::1", "2001:db8:5::2", "2001:db8:5::3"):
            out = ctl("simulate", "--ip", ip, env=service.env).stdout
        assert "SCREEN_RESULT=BANNED" in out
        status = json.loads(ctl("status", "--json", env=service.env).stdout)
        assert [b["ip"] for b in status["banned"]["list"]] == ["2001:db8:5::/64"]


# -- escalation (optional, off by default) ------------------------------------------------
def _scanner(url: str, **overrides: str):
    """Three /64s of one /48, each banned by the threshold (2 calls), and a fourth /64."""

    async def main():
        async with running_server(url, SCREENING_THRESHOLD="2", **overrides) as srv:
            for n in (1, 2, 3):
                for _ in range(2):
                    await srv.call(Call(source=f"2001:db8:9:{n}::1", channel_type="PJSIP"))
            return await srv.store.banned(), await srv.store.totals()

    return asyncio.run(main())


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_escalation_bans_the_48_after_enough_64s(store, request):
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    banned, totals = _scanner(url, SCREENING_ESCALATE_PREFIX="48", SCREENING_ESCALATE_AFTER="2")
    assert set(banned) == {
        "2001:db8:9:1::/64",
        "2001:db8:9:2::/64",
        "2001:db8:9:3::/64",
        "2001:db8:9::/48",  # at the second /64, once only
    }
    assert totals["bans"] == 4


def test_escalation_is_off_by_default_and_never_covers_ignore():
    banned, _ = _scanner("memory://")
    assert len(banned) == 3 and not any(t.endswith("/48") for t in banned)
    ignore = '["127.0.0.0/8", "2001:db8:9:ff::1/128"]'
    banned, _ = _scanner(
        "memory://",
        SCREENING_ESCALATE_PREFIX="48",
        SCREENING_ESCALATE_AFTER="2",
        SCREENING_IGNORE=ignore,
    )
    assert len(banned) == 3 and not any(t.endswith("/48") for t in banned)


def test_escalate_prefix_must_be_wider_than_ipv6_prefix(tmp_path):
    env = {"FASTAGI_SCREENING_ESCALATE_PREFIX": "64", "FASTAGI_RUNTIME_DIR": str(tmp_path)}
    proc = ctl("status", env=env)
    assert proc.returncode == 2 and "screening.escalate_prefix" in proc.stderr


def test_default_ports_are_sip_signalling_and_all_stays_a_choice():
    assert settings().firewall.ports == ("5060/udp", "5060/tcp", "5061/udp", "5061/tcp")
    assert settings(FIREWALL_PORTS="all").firewall.ports == "all"
    assert settings().screening.prefixes() == Prefixes(32, 64)

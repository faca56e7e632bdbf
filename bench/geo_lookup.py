"""What a caller's country costs on the screening path (screening.geoip_db).

    python bench/geo_lookup.py [--networks 20000] [--lookups 200000]

Writes a GeoLite2-Country-shaped database (mmdb-writer, the test extra) of --networks
IPv4 /24s and IPv6 /48s, each record with a country, a registered country, a continent
and names in eight languages as GeoLite2 has them, then times Countries.rule() (what
the screener calls per guest call): distinct addresses every time (the cache never
hits: a scan from 200,000 addresses) and one address again and again (a scanner's
repeat calls), in microseconds per lookup.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ("de", "en", "es", "fr", "ja", "pt-BR", "ru", "zh-CN")
CODES = ("CN", "DE", "FR", "US", "RU", "BR", "IN", "JP", "NL", "GB")


def write(path: str, networks: int) -> list[str]:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(
        ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"]
    )
    rng = random.Random(7)
    firsts = []
    for n in range(networks):
        code = CODES[n % len(CODES)]
        names = {lang: f"{code}-{lang}" for lang in LANGUAGES}
        record = {
            "continent": {"code": "EU", "geoname_id": 6255148, "names": names},
            "country": {"geoname_id": 1000 + n % 10, "iso_code": code, "names": names},
            "registered_country": {"geoname_id": 1000 + n % 10, "iso_code": code, "names": names},
        }
        if n % 10 == 9:
            network = ipaddress.IPv6Network((0x2001_0DB8_0000 << 80 | n << 80, 48))
        else:
            network = ipaddress.IPv4Network((rng.getrandbits(24) << 8, 24))
        writer.insert_network(IPSet([str(network)]), record)
        firsts.append(str(network.network_address + 1))
    writer.to_db_file(path)
    return firsts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fastagi.geo import Countries, CountryRules, GeoDB

    with tempfile.TemporaryDirectory() as work:
        path = str(Path(work) / "country.mmdb")
        began = time.perf_counter()
        known = write(path, args.networks)
        print(f"database: {args.networks} networks written in {time.perf_counter() - began:.1f}s")
        countries = Countries(GeoDB(path), CountryRules(frozenset({"CN"}), frozenset({"DE"})))
        rng = random.Random(11)
        distinct = [ipaddress.ip_address(rng.choice(known)) + rng.randrange(200) for _ in range(8)]
        scan = [
            ipaddress.IPv4Address(rng.getrandbits(32)) if n % 2 else distinct[n % 8]
            for n in range(args.lookups)
        ]
        rows = []
        for label, addresses, cached in (
            ("distinct addresses (cache misses)", scan, False),
            ("one address again (cache hits)", [distinct[0]] * args.lookups, True),
        ):
            rule = countries.rule
            cache = countries.db._cache
            began = time.perf_counter()
            for address in addresses:
                if not cached:
                    cache.clear()
                rule(address)
            seconds = time.perf_counter() - began
            rows.append((label, seconds / len(addresses) * 1e6))
        countries.db.close()
    for label, micros in rows:
        print(f"{label:<36} {micros:6.2f} us per lookup")
    return 0


if __name__ == "__main__":
    sys.exit(main())

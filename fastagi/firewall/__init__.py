"""Firewall backends: one module each, one interface (base.Firewall), picked by name."""

from __future__ import annotations

from .base import (
    CheckResult,
    Firewall,
    FirewallConflict,
    FirewallError,
    FirewallSettings,
    FirewallStats,
    IPNetwork,
)

BACKENDS: tuple[str, ...] = ("iptables", "nftables", "ipset", "dry-run")


def create(settings: FirewallSettings) -> Firewall:
    """The backend `settings.backend` names; FirewallError (one line) for an unknown name.

    Creating a backend touches no firewall: setup() does. Each module is imported only
    when chosen, so a missing python-iptables only matters to the iptables backend.
    """
    name = (settings.backend or "").strip().lower()
    if name in ("dry-run", "dryrun", "dry_run"):
        from .dryrun import DryRunFirewall

        return DryRunFirewall(settings)
    if name == "iptables":
        from .iptables import IptablesFirewall

        return IptablesFirewall(settings)
    if name == "nftables":
        from .nftables import NftablesFirewall

        return NftablesFirewall(settings)
    if name == "ipset":
        from .ipset import IpsetFirewall

        return IpsetFirewall(settings)
    raise FirewallError(
        f"unknown firewall backend {settings.backend!r}: use one of {', '.join(BACKENDS)}"
    )


__all__ = [
    "BACKENDS",
    "CheckResult",
    "Firewall",
    "FirewallConflict",
    "FirewallError",
    "FirewallSettings",
    "FirewallStats",
    "IPNetwork",
    "create",
]

"""`[metrics]`: the /metrics listeners of `serve` and `agent`, and the status page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .values import Schema, choice, host_port, string


@dataclass(frozen=True)
class MetricsConfig:
    listen: str
    agent_listen: str = ""
    status_page: str = "loopback"


STATUS_PAGE = ("loopback", "on", "off")


def _status_page(value: Any) -> str:
    names = ", ".join(STATUS_PAGE)
    return choice(value, STATUS_PAGE, lambda name: f"{name!r}: choose one of {names}")


def _listen_or_empty(value: Any) -> str:
    text = string(value)
    if text:
        host_port(text)
    return text


METRICS: Schema = {
    "listen": (_listen_or_empty, ""),
    # `fastagi-ctl agent`'s own /metrics: serve and agent read one config on a PBX, so
    # one address for both would leave the second unable to start.
    "agent_listen": (_listen_or_empty, ""),
    # The status page at / of that listener (web.py): "loopback" serves it only when
    # `listen` is a loopback address, so exposing /metrics does not expose it.
    "status_page": (_status_page, "loopback"),
}

"""The status page as an admin sees it: a real `fastagi-ctl serve` (embedded store, its
agent on the dry-run firewall) after screened calls and bans, opened in a real headless
Chromium (Debian's `chromium`). The DOM Chromium built shows the banned addresses, their
reasons and the agent; a hostile reason stays text. FASTAGI_SCREENSHOT=PATH keeps the
screenshot there (docs/status-page.png is one)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

from fastagi.emulator import Call
from tests.harness import free_port, need_program, place_calls
from tests.procs import Service, ctl
from tests.test_metrics import INJECTED

# Debian's chromium as root in a container: no sandbox, no GPU, nothing fetched.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
HOSTILE = "<img src=x onerror=alert(1)>toll fraud"


class Tables(HTMLParser):
    """The text of each cell of each table with an id, and every tag seen."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self._table = dict(attrs).get("id")
            self.tables[self._table or ""] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def row(self, table: str, first: str) -> list[str]:
        """The row of `table` whose first cell is `first`."""
        rows = [row for row in self.tables.get(table, []) if row and row[0] == first]
        assert rows, f"no row {first!r} in #{table}: {self.tables.get(table)}"
        return rows[0]


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _agents_applied(env: dict[str, str], count: int) -> dict:
    """`status --json` once this host's agent has applied `count` bans."""
    deadline = time.monotonic() + 15
    while True:
        status = json.loads(ctl("status", "--json", env=env).stdout)
        if any(agent["bans_applied"] >= count for agent in status["agents"]):
            return status
        assert time.monotonic() < deadline, f"the agent applied too little: {status['agents']}"
        time.sleep(0.3)


def test_the_status_page_in_chromium_shows_the_bans_their_reasons_and_the_agent(tmp_path):
    binary = need_program("chromium", "chromium")
    metrics_port = free_port()
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "FASTAGI_SCREENING_THRESHOLD": "3",
        "FASTAGI_SCREENING_PBX_ID": "pbx-lab-1",
        "FASTAGI_FIREWALL_BACKEND": "dry-run",
    }
    with Service(env, log=tmp_path / "serve.log") as service:
        calls = [Call(source="203.0.113.50") for _ in range(4)]
        calls += [Call(source="198.51.100.7") for _ in range(2)]
        calls.append(Call.from_uri_user(INJECTED, source="198.51.100.4"))
        results = place_calls(service.target, calls)
        assert [r.variables.get("SCREEN_RESULT") for r in results[:4]] == [
            *["COUNTED"] * 2,
            *["BANNED"] * 2,
        ]
        banned = ctl("ban", "192.0.2.66", "--reason", HOSTILE, "--for", "2h", env=service.env)
        assert banned.returncode == 0, banned.stderr
        _agents_applied(service.env, 2)
        url = f"http://127.0.0.1:{metrics_port}/"
        dom = chromium(binary, tmp_path / "profile", "--dump-dom", url)
        shot = tmp_path / "status-page.png"
        taken = chromium(
            binary,
            tmp_path / "profile2",
            "--window-size=1280,1300",
            f"--screenshot={shot}",
            url,
        )
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Tables(dom.stdout)
    # the threshold's ban and the admin's, with their reasons and who banned them
    threshold = page.row("bans", "203.0.113.50")
    assert threshold[1] == "threshold" and threshold[3] == "pbx-lab-1"
    admin = page.row("bans", "192.0.2.66")
    assert admin[1] == HOSTILE and "admin until" in admin[2]
    assert "img" not in page.tags and "script" not in page.tags  # the reason stayed text
    agent = page.row("agents", "pbx-lab-1")
    assert agent[1] == "dry-run" and agent[4] == "2" and agent[5] == "ok"
    assert page.row("offenders", "203.0.113.50")[1:3] == ["1", "4"]  # 1 ban, 4 calls
    assert page.row("offenders", "198.51.100.7")[3] == "counted"
    assert 'id="bans-per-hour"' in dom.stdout and "Injection attempts" in dom.stdout
    assert taken.returncode == 0, taken.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 1300)
    if keep := os.environ.get("FASTAGI_SCREENSHOT"):
        shutil.copyfile(shot, keep)

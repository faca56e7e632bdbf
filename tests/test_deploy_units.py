"""deploy/: systemd units (systemd-analyze verify + hardening) and the example configuration."""

from __future__ import annotations

import configparser
import functools
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ["fastagi-screen.service", "fastagi-agent.service"]
INSTALLED_CTL = "/opt/fastagi-screen/bin/fastagi-ctl"  # the Debian package's venv

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# the configuration keys of SPEC.md ("Configuration"), plus [firewall] forward
SPEC_KEYS = {
    "server": {"listen", "allowed_clients", "max_sessions", "session_timeout"},
    "screening": {
        "threshold",
        "window",
        "ban_time",
        "ban_time_factor",
        "ban_time_max",
        "ignore",
        "pbx_id",
        "log_notice",
    },
    "redis": {"url", "key_prefix", "timeout", "sentinels", "sentinel_service"},
    "firewall": {"backend", "chain", "ports", "sync_interval", "forward"},
    "metrics": {"listen"},
}


def read_unit(name: str) -> configparser.RawConfigParser:
    # repeated keys (SystemCallFilter=) are legal in units; strict=False keeps the last one
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(DEPLOY / "systemd" / name, encoding="utf-8")
    return parser


def _unit_copy_with_real_ctl(name: str, tmp_path: Path) -> Path:
    """The unit as shipped, with ExecStart pointing at the fastagi-ctl of this environment
    when the package's is not installed (systemd-analyze checks the binary)."""
    text = (DEPLOY / "systemd" / name).read_text(encoding="utf-8")
    if not Path(INSTALLED_CTL).exists():
        beside = Path(sys.executable).with_name("fastagi-ctl")  # the venv's, unactivated
        ctl = str(beside) if beside.exists() else shutil.which("fastagi-ctl")
        if ctl is None:
            pytest.skip("fastagi-ctl is not installed (pip install -e .) and not in PATH")
        text = text.replace(INSTALLED_CTL, ctl)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _run_analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def _analyze_usable() -> str | None:
    """None when `systemd-analyze verify` works offline here, else the reason it does not
    (it needs no running systemd: PID 1 of this container is not systemd and verify works)."""
    if SYSTEMD_ANALYZE is None:
        return "systemd-analyze not installed (apt-get install systemd)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.service"
        probe.write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
        proc = _run_analyze("verify", str(probe))
    if proc.returncode != 0:
        return f"systemd-analyze verify cannot run here: {(proc.stderr or proc.stdout).strip()}"
    return None


@pytest.mark.skipif(_analyze_usable() is not None, reason=str(_analyze_usable()))
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(name, tmp_path):
    unit = _unit_copy_with_real_ctl(name, tmp_path)
    proc = _run_analyze("verify", str(unit))
    # verify exits 0 even for unknown keys or bad values ("... ignoring"): any output is a finding
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@pytest.mark.skipif(_analyze_usable() is not None, reason=str(_analyze_usable()))
def test_verify_does_report_a_broken_unit(tmp_path):
    """Guard for the test above: in this environment verify does print unknown keys."""
    bad = tmp_path / "broken.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nNoSuchSetting=1\n", encoding="utf-8")
    proc = _run_analyze("verify", str(bad))
    assert "NoSuchSetting" in proc.stdout + proc.stderr


@pytest.mark.skipif(_analyze_usable() is not None, reason=str(_analyze_usable()))
@pytest.mark.parametrize("name", UNITS)
def test_systemd_security_exposure_is_low(name, tmp_path):
    unit = _unit_copy_with_real_ctl(name, tmp_path)
    proc = _run_analyze("security", "--offline=true", "--threshold=25", "--no-pager", str(unit))
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "Overall exposure level" in proc.stdout


def test_server_unit_settings():
    svc = read_unit("fastagi-screen.service")["Service"]
    assert svc["ExecStart"] == f"{INSTALLED_CTL} serve --no-agent"
    # the package's system user: it may read the 0640 root:fastagi config
    assert (svc["User"], svc["Group"]) == ("fastagi", "fastagi")
    assert "DynamicUser" not in svc
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["PrivateTmp"] == "yes"
    assert svc["RuntimeDirectory"] == "fastagi"
    # the embedded store's bans survive a restart there ($STATE_DIRECTORY, mode 0700)
    assert svc["StateDirectory"] == "fastagi"
    assert svc["StateDirectoryMode"] == "0700"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["AmbientCapabilities"] == ""
    assert svc["Restart"] in ("on-failure", "always")
    assert svc["RestartPreventExitStatus"] == "2"


def test_agent_unit_settings():
    svc = read_unit("fastagi-agent.service")["Service"]
    assert svc["ExecStart"] == f"{INSTALLED_CTL} agent"
    assert (svc["User"], svc["Group"]) == ("fastagi", "fastagi")
    assert set(svc["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(svc["AmbientCapabilities"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert "AF_NETLINK" in svc["RestrictAddressFamilies"].split()
    assert svc["Restart"] in ("on-failure", "always")


# ------------------------------------------------------------------------------------------
# example configuration
# ------------------------------------------------------------------------------------------
def test_example_toml_parses_and_has_every_spec_key():
    data = tomllib.loads((DEPLOY / "fastagi.toml").read_text(encoding="utf-8"))
    for section, keys in SPEC_KEYS.items():
        assert section in data, f"[{section}] missing"
        missing = keys - set(data[section])
        assert not missing, f"[{section}] lacks {sorted(missing)}"
    assert data["firewall"]["forward"] is False
    # the example documents the defaults of SPEC.md
    assert data["server"]["listen"] == "127.0.0.1:4573"
    assert data["redis"]["url"] == "memory://"
    assert data["firewall"]["backend"] == "dry-run"
    assert data["screening"]["threshold"] == 5


def test_every_example_key_is_commented():
    """Each key line carries a comment or follows a comment line explaining it."""
    lines = (DEPLOY / "fastagi.toml").read_text(encoding="utf-8").splitlines()
    undocumented = [
        line
        for i, line in enumerate(lines)
        if line
        and not line.startswith(("#", "["))
        and "#" not in line
        and not lines[i - 1].startswith("#")
    ]
    assert not undocumented, undocumented


def test_example_toml_loads_with_the_package_config_loader():
    """The example must be accepted by fastagi's own loader (unknown keys are errors there)."""
    config = pytest.importorskip("fastagi.config", reason="fastagi package not importable")
    if not hasattr(config, "load"):
        pytest.skip("fastagi.config.load() not there yet")
    loaded = config.load(str(DEPLOY / "fastagi.toml"), environ={})
    assert loaded is not None

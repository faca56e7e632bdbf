"""The Debian package as an admin meets it: `deploy/debian/build.sh` builds it from this
checkout, apt installs it on THIS machine, the installed `fastagi-ctl serve` runs as the
packaged user with the packaged config and `fastagi-ctl check` passes, and remove + purge
leave no file and no user of ours behind (a file-list diff of /opt, /etc, /usr, /var/lib and
the user and group databases, before install against after purge).

It changes the real system, so it runs only as root on Debian, never where fastagi-screen
(or a file of its) is already present, and it purges in `finally`, also after a failure."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "deploy" / "debian" / "build.sh"
PACKAGE = "fastagi-screen"
USER = "fastagi"
PREFIX = Path("/opt/fastagi-screen")
UNITS = ["fastagi-screen.service", "fastagi-agent.service"]
SERVE = ["/usr/bin/fastagi-ctl", "serve", "--no-agent"]
# every path the package, its units or its user may create (the refusal check)
OURS = [
    PREFIX,
    Path("/etc/fastagi"),
    Path("/usr/bin/fastagi-ctl"),
    Path("/usr/share/doc/fastagi-screen"),
    Path("/var/lib/fastagi"),
    Path("/var/lib/private/fastagi"),
    Path("/run/fastagi"),
    *(Path("/usr/lib/systemd/system") / unit for unit in UNITS),
]
SNAPSHOT = ["/opt", "/etc", "/usr", "/var/lib"]
# written by dpkg, apt and adduser themselves on any install: their journals, not our files
HOUSEKEEPING = ("/var/lib/dpkg/", "/var/lib/apt/", "/etc/ld.so.cache")
BACKUPS = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _not_here() -> str | None:
    """Why this machine cannot take the test, or None."""
    if os.geteuid() != 0:
        return "installs a .deb into this system: needs root (CI runs as root)"
    if not Path("/etc/debian_version").exists() or not shutil.which("apt-get"):
        return "builds and installs a Debian package: needs Debian (or a derivative) with apt"
    return None


def _already_here() -> str | None:
    """Why installing here would touch an admin's fastagi-screen, or None."""
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.returncode == 0 and status.stdout.strip() not in ("", "not-installed"):
        return f"{PACKAGE} is {status.stdout.strip()} on this system: not touching it"
    present = [str(path) for path in OURS if path.exists() or path.is_symlink()]
    if present:
        return f"files of fastagi-screen already here ({', '.join(present)}): not touching them"
    if _user_exists():
        return f"a user {USER!r} already exists: not touching it"
    return None


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


def snapshot() -> set[str]:
    """Every path under SNAPSHOT (links not followed), plus `user:`/`group:` names."""
    paths = {top for top in SNAPSHOT if os.path.isdir(top)}  # dpkg removes an empty /opt
    for top in SNAPSHOT:
        for directory, dirs, files in os.walk(top):
            paths.update(os.path.join(directory, name) for name in dirs + files)
    paths.update(f"user:{entry.pw_name}" for entry in pwd.getpwall())
    paths.update(f"group:{entry.gr_name}" for entry in grp.getgrall())
    return paths


def _ours(path: str) -> bool:
    if "fastagi" in path:  # also dpkg's own records of the package: purge removes them
        return True
    return not path.startswith(HOUSEKEEPING) and path not in BACKUPS


def run(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    env = {k: v for k, v in env.items() if not k.startswith("FASTAGI_")}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _serve_as_the_unit(port: int) -> subprocess.Popen:
    """The installed `serve` as fastagi-screen.service starts it: the packaged user, its
    runtime and state directories (which systemd would make), the packaged config."""
    account = pwd.getpwnam(USER)
    for path, mode in (("/run/fastagi", 0o750), ("/var/lib/fastagi", 0o700)):
        os.makedirs(path, mode=mode)
        os.chown(path, account.pw_uid, account.pw_gid)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "RUNTIME_DIRECTORY": "/run/fastagi",
        "STATE_DIRECTORY": "/var/lib/fastagi",
        "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{port}",  # a free port, not the PBX's 4573
    }
    return subprocess.Popen(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--", *SERVE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen | None) -> str:
    if proc is None or proc.stdout is None or proc.stdout.closed:
        return ""  # not started, or stopped before
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.communicate()[0] or ""


def _purge() -> None:
    """Whatever state the test stopped in: the package gone, with its files."""
    purged = run("apt-get", "purge", "-y", "-q", PACKAGE)
    if purged.returncode != 0:
        run("dpkg", "--purge", PACKAGE)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The package, built once from this checkout (nothing cached: a fresh venv each run)."""
    if reason := _not_here():
        pytest.skip(reason)
    started = time.monotonic()
    build = run(str(BUILD), str(tmp_path_factory.mktemp("deb")), timeout=170)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    path = Path(build.stdout.strip().splitlines()[-1])
    print(f"\n.deb {path.stat().st_size / 1e6:.1f} MB built in {time.monotonic() - started:.0f} s")
    return path


def test_the_deb_installs_serves_checks_and_purges_without_a_trace(deb):
    if reason := _already_here():
        pytest.skip(reason)
    started = time.monotonic()
    before = snapshot()
    serve = None
    try:
        installed = run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb))
        assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr
        ctl = Path("/usr/bin/fastagi-ctl")
        assert ctl.resolve() == (PREFIX / "bin" / "fastagi-ctl").resolve()
        assert (PREFIX / "bin" / "python").resolve().is_relative_to("/usr/bin")  # Debian's
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", PACKAGE).stdout
        assert "/etc/fastagi/fastagi.toml" in conffiles
        config = os.stat("/etc/fastagi/fastagi.toml")
        assert stat.S_IMODE(config.st_mode) == 0o640
        assert grp.getgrgid(config.st_gid).gr_name == USER
        assert pwd.getpwnam(USER).pw_shell == "/usr/sbin/nologin"
        # nothing enabled or started by the install: the admin decides, after the config
        assert not list(Path("/etc/systemd/system").glob("*.wants/fastagi-*"))
        assert run("pgrep", "-u", USER).returncode == 1
        units = [str(Path("/usr/lib/systemd/system") / unit) for unit in UNITS]
        verify = run("systemd-analyze", "verify", *units)
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

        port = free_port()
        serve = _serve_as_the_unit(port)
        assert wait_for(lambda: _listening(port) or serve.poll() is not None, 30)
        assert serve.poll() is None, _stop(serve)
        check = run(str(ctl), "check")  # no --config: the packaged /etc/fastagi/fastagi.toml
        assert check.returncode == 0, check.stdout + check.stderr
        assert "ok   config: /etc/fastagi/fastagi.toml" in check.stdout
        assert "ok   store: bans saved in /var/lib/fastagi/embedded-state.json" in check.stdout
        target = f"agi://127.0.0.1:{port}/screen"
        calls = run(str(ctl), "simulate", "--target", target, "--ip", "203.0.113.9", "--calls", "5")
        assert "SCREEN_RESULT=BANNED" in calls.stdout, calls.stdout + calls.stderr
        status = run(str(ctl), "status", "203.0.113.9")
        assert status.returncode == 0 and "banned" in status.stdout.lower(), status.stdout
        log = _stop(serve)
        assert serve.returncode == 0, log
        state = Path("/var/lib/fastagi/embedded-state.json")
        assert pwd.getpwuid(state.stat().st_uid).pw_name == USER

        removed = run("apt-get", "remove", "-y", "-q", PACKAGE)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        # prerm took the agent's firewall objects away (the packaged config: dry-run)
        assert "dry-run: would remove chain FASTAGI" in removed.stdout + removed.stderr
        assert not PREFIX.exists() and not ctl.exists()
        assert Path("/etc/fastagi/fastagi.toml").exists() and _user_exists()  # remove keeps
    finally:
        _stop(serve)
        _purge()
    after = snapshot()
    left = sorted(path for path in after - before if _ours(path))
    gone = sorted(path for path in before - after if _ours(path))
    assert left == [], f"left behind after purge: {left[:20]}"
    assert gone == [], f"removed although not ours: {gone[:20]}"
    print(f"\ninstall, serve, check, remove, purge, diff: {time.monotonic() - started:.0f} s")


def test_under_a_real_systemd_enable_now_works_and_purge_cleans_up(deb):
    """systemd-check.sh boots this machine's / (copy-on-write, in memory) under systemd in a
    container: apt install, nothing started, `systemctl enable --now fastagi-screen`,
    `fastagi-ctl check`, bans across a restart, the agent's exit 2 not restarted, purge."""
    assert shutil.which("systemd-nspawn"), "apt-get install systemd-container (.ci/run does)"
    started = time.monotonic()
    check = run(str(ROOT / "deploy" / "debian" / "systemd-check.sh"), str(deb), timeout=200)
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-2000:]
    assert "+ systemctl enable --now fastagi-screen" in check.stdout
    print(f"\nunder systemd: {time.monotonic() - started:.0f} s")


def test_the_pinned_requirements_satisfy_pyproject():
    """build.sh installs requirements.txt, not pyproject's ranges: they must agree."""
    import tomllib

    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "deploy" / "debian" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", f"not pinned: {line}"
            pins[pin.name.lower().replace("_", "-")] = (spec.version, pin.extras)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        wanted = Requirement(text)
        name = wanted.name.lower().replace("_", "-")
        assert name in pins, f"{wanted.name} is not in requirements.txt"
        version, extras = pins[name]
        assert wanted.specifier.contains(version), f"{name}=={version} is not {wanted.specifier}"
        assert wanted.extras <= extras, f"{name}: extras {wanted.extras - extras} missing"

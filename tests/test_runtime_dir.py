"""The embedded store's runtime directory (issue 12, section 3, must-show 6).

A runtime directory pre-created by another user (mode 0777) was accepted: that user
replaced the control socket and captured root's `ban`/`unban`. Now `serve` and the
client commands check the directory (lstat, owner, mode, every directory above it)
before they create, remove or connect to anything there: a squatted one is refused
with one line and exit 2 (a setting to fix, like a bad config value: systemd's
RestartPreventExitStatus=2 stops a restart loop), and left exactly as it was.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastagi.embedded import UnsafeRuntimeDir, check_runtime_dir, prepare_runtime_dir
from tests.procs import Service, ctl

NOBODY = 65534


def _snapshot(path: Path) -> list[tuple[str, int, int, int, int]]:
    """Owner, mode, inode and mtime of `path` and everything in it (without following)."""
    found = [path, *sorted(path.rglob("*"))] if not path.is_symlink() else [path]
    return [(str(p), (s := os.lstat(p)).st_uid, s.st_mode, s.st_ino, s.st_mtime_ns) for p in found]


def _squat(tmp_path: Path, how: str) -> Path:
    """A runtime directory as another local user would have left it for us."""
    shared = tmp_path / "shared"  # a /tmp of our own: world-writable and sticky
    shared.mkdir()
    os.chmod(shared, 0o1777)
    run = shared / "fastagi-0"
    if how == "other owner":
        run.mkdir(mode=0o700)
        os.chown(run, NOBODY, NOBODY)
    elif how == "other owner, open mode":
        run.mkdir()
        os.chmod(run, 0o777)
        os.chown(run, NOBODY, NOBODY)
    elif how == "ours, mode 0777":
        run.mkdir()
        os.chmod(run, 0o777)
    elif how == "symlink to a directory of ours":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        run.symlink_to(target)
    elif how == "ours, under a sticky directory of another user":
        os.chown(shared, NOBODY, NOBODY)
        run.mkdir(mode=0o700)
    elif how == "missing, under a sticky directory of another user":
        os.chown(shared, NOBODY, NOBODY)
    elif how == "ours, under a group-writable directory":
        os.chmod(shared, 0o775)
        run.mkdir(mode=0o700)
    # a socket file the squatter left where ours would go
    if run.is_dir() and not run.is_symlink():
        (run / "embedded.sock").write_text("squatter\n")
    return run


CASES = {
    "other owner": "owned by uid 65534",
    "other owner, open mode": "writable by group or others",
    "ours, mode 0777": "writable by group or others (mode 0777)",
    "symlink to a directory of ours": "symbolic link",
    "ours, under a sticky directory of another user": "belongs to uid 65534",
    "missing, under a sticky directory of another user": "belongs to uid 65534",
    "ours, under a group-writable directory": "writable by others and not sticky",
}


@pytest.mark.parametrize("how", list(CASES))
def test_squatted_runtime_dir_is_refused_by_serve_and_the_client_commands(tmp_path, how):
    run = _squat(tmp_path, how)
    shared = run.parent
    before = _snapshot(shared)
    env = {"FASTAGI_RUNTIME_DIR": str(run)}
    results = {  # unban goes through the same client_store as ban and status
        "serve": ctl("serve", "--listen", "127.0.0.1:0", env=env, timeout=15),
        "ban": ctl("ban", "203.0.113.90", env=env),
        "status": ctl("status", env=env),
    }
    for command, result in results.items():
        lines = result.stderr.strip().splitlines()
        if how.startswith("missing") and command != "serve":
            # nothing there to refuse: no running service (exit 1), nothing created
            assert result.returncode == 1 and "no running service" in lines[0], command
            continue
        assert result.returncode == 2, (command, result.stderr)
        assert len(lines) == 1 and CASES[how] in lines[0], (command, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert _snapshot(shared) == before  # the squatted directory is untouched


def test_a_missing_runtime_dir_is_created_0700_whatever_the_umask(tmp_path):
    """The /tmp/fastagi-<uid> fallback's case: made by us in a sticky world-writable
    directory, mode 0700, checked after creation; an existing one of ours is reused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    run = shared / "fastagi-0"
    old = os.umask(0)
    try:
        prepare_runtime_dir(run)
    finally:
        os.umask(old)
    info = os.lstat(run)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    prepare_runtime_dir(run)
    os.chown(run, NOBODY, NOBODY)  # taken over in the sticky directory: not ours any more
    with pytest.raises(UnsafeRuntimeDir, match="owned by uid 65534, not by us"):
        check_runtime_dir(run, service=False)


def test_systemd_runtime_directory_of_a_dynamic_user_is_used_by_root_clients(tmp_path):
    """The shipped unit: serve runs as a dynamic user in /run/fastagi (mode 0750, made by
    systemd under root's /run); root's ban/status must reach it there. Played here by a
    service whose directory and socket are handed to nobody once it listens (this
    interpreter lives under /root, so nobody cannot run it)."""
    base = tmp_path / "run-root"  # root's, not writable by others: like /run
    base.mkdir(mode=0o755)
    run = base / "fastagi"
    run.mkdir(mode=0o750)
    env = {"FASTAGI_RUNTIME_DIR": str(run)}
    with Service(env, "--no-agent") as service:
        for path in (run, run / "embedded.sock"):
            os.chown(path, NOBODY, NOBODY)
        banned = ctl("ban", "203.0.113.91", env=service.env)
        status = ctl("status", "203.0.113.91", env=service.env)
        # the same directory under a world-writable /tmp-like parent: anyone could have made it
        os.chmod(base, 0o1777)
        squatted = ctl("status", env=service.env)
    assert banned.returncode == 0, banned.stderr
    assert status.returncode == 0 and "203.0.113.91" in status.stdout
    assert squatted.returncode == 2 and "owned by uid 65534" in squatted.stderr
    # and serve itself never uses another user's directory
    os.chmod(base, 0o755)
    refused = ctl("serve", "--listen", "127.0.0.1:0", env=env, timeout=15)
    assert refused.returncode == 2 and "owned by uid 65534" in refused.stderr

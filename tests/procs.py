"""Run `fastagi-ctl` as real processes, the way an admin does."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Mapping
from pathlib import Path

from tests.harness import free_port


def ctl(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastagi.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(env),
        input=stdin,
    )


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    env.update(extra or {})
    return env


class Service:
    """`fastagi-ctl serve` in the background on a free port. Unless `env` names one, the
    embedded store saves its state in a directory of this Service's own, removed at
    stop (never the user's real state directory)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *args: str,
        log: Path | None = None,
        stuck_stderr: bool = False,
    ) -> None:
        """`stuck_stderr`: stderr is a pipe nobody reads (a stuck journald or pager),
        shrunk to one page so that a few dozen lines fill it."""
        self.port = free_port()
        self.env = {**env, "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{self.port}"}
        self._own_state = None
        if "FASTAGI_SERVER_STATE_DIR" not in env:
            self._own_state = tempfile.mkdtemp(prefix="fastagi-state-")
            self.env["FASTAGI_SERVER_STATE_DIR"] = self._own_state
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastagi.cli", "serve", *args],
            env=_env(self.env),
            stdout=out,
            stderr=subprocess.PIPE if stuck_stderr else out,
        )
        if stuck_stderr:
            assert self.proc.stderr is not None
            fcntl.fcntl(self.proc.stderr, fcntl.F_SETPIPE_SZ, 4096)
        self._wait_listening()

    def stderr_unread(self) -> int:
        """Bytes waiting in a stuck stderr pipe."""
        assert self.proc.stderr is not None
        raw = fcntl.ioctl(self.proc.stderr, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(raw, sys.byteorder)

    def threads(self) -> int:
        """The service's thread count, as the kernel sees it."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("Threads:", 1)[1].split()[0])

    @property
    def target(self) -> str:
        return f"agi://127.0.0.1:{self.port}/screen"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("serve did not start listening")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._own_state is not None:
            shutil.rmtree(self._own_state, ignore_errors=True)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

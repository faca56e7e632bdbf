"""Network-namespace topologies for tests that need real packets and real firewalls.

    core (bridge br0: 192.0.2.1, 2001:db8::1) -- the place for redis-server
      |-- attacker  192.0.2.10 (+ .11, .12)   2001:db8::10 (+ ::11, ::12)
      |                                       2001:db8:0:100::10 - ::17 (one more /64)
      |-- pbx1      192.0.2.21                2001:db8::21
      `-- pbx2      192.0.2.22                2001:db8::22

The second IPv6 /64 (ROTATING6, on-link for every namespace) is an attacker that
rotates its address inside its own /64, away from the /64 the PBXs and Redis live in.

Everything lives in namespaces named `fa<random>-<role>`; the host's own firewall and
interfaces are never touched (veth pairs are created inside `core`). Use:

    topo = make_topology()                      # or the `netns_topology` fixture
    topo.pbx1.spawn(["fastagi-ctl", "agent"])   # long-running process, killed at close()
    topo.pbx1.run(["nft", "list", "ruleset"])   # one command, CompletedProcess
    echo = topo.pbx1.udp_echo(5060)             # UDP echo on v4 and v6, in this process
    topo.can_reach("attacker", "pbx1", 5060, family=6)   # a real datagram and its echo
    topo.pbx1.tcp_listen(5060)                  # TCP accept on v4 and v6
    topo.can_connect("attacker", "pbx1", 5060, family=4) # a real TCP handshake
    topo.close()

Fixtures (import them into tests/conftest.py with
`from tests.netns import netns_available, netns_topology, netns_topology_fn  # noqa: F401`):
`netns_topology` (one per module), `netns_topology_fn` (one per test), `netns_available`
(skips with the precise reason when not root or `ip netns add` fails).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

CLONE_NEWNET = 0x40000000
SUBNET4, SUBNET6 = "192.0.2.0/24", "2001:db8::/64"
CORE4, CORE6 = "192.0.2.1", "2001:db8::1"
ROTATING6 = "2001:db8:0:100::/64"  # its /56 does not hold the PBXs' 2001:db8::/64
ROTATING6_HOSTS = [f"2001:db8:0:100::{n:x}" for n in range(0x10, 0x18)]  # the attacker's

# role -> (last octet / hextet of the main address, extra host numbers)
DEFAULT_HOSTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "attacker": (10, (11, 12)),
    "pbx1": (21, ()),
    "pbx2": (22, ()),
}

_libc = ctypes.CDLL(None, use_errno=True)
_live: list[Topology] = []


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message is the precise reason."""


def netns_unavailable_reason() -> str | None:
    """None when we can create namespaces, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"fa{secrets.token_hex(3)}-probe"
    proc = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, check=False, timeout=10
    )
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip() or proc.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=10)
    return None


def _sh(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
        env=env,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def in_netns(name: str, fn, *args, **kwargs):
    """Run fn(*args) in a short-lived thread that has joined namespace `name`.

    Sockets made there stay in that namespace and can be used from any thread, so a test
    can talk from the attacker's namespace without forking a process per packet.
    """
    result: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(30)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


@dataclass
class UdpEcho:
    """A UDP echo listener (IPv4 and IPv6) served by threads of this process."""

    port: int
    sockets: list[socket.socket]
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def close(self) -> None:
        self.stop.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self.threads:
            thread.join(2)


def _echo_loop(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        except OSError:
            return
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def _accept_loop(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.close()


@dataclass
class Namespace:
    name: str
    role: str
    ipv4: str
    ipv6: str
    extra4: list[str] = field(default_factory=list)
    extra6: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    echoes: list[UdpEcho] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [self.ipv4, *self.extra4, self.ipv6, *self.extra6]

    def address(self, family: int = 4) -> str:
        return self.ipv4 if family == 4 else self.ipv6

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run one command inside the namespace (a string goes through `sh -c`).

        `env` replaces the environment (default: this process's)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return _sh(self.argv(argv), check=check, timeout=timeout, input=input, env=env)

    def spawn(
        self,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        stdout=None,
        stderr=None,
        cwd: str | None = None,
    ) -> subprocess.Popen:
        """Start a long-running process in the namespace; close() ends it (SIGTERM, SIGKILL).

        stdout/stderr default to DEVNULL; pass a file (e.g. tmp_path / "agent.log").
        """
        proc = subprocess.Popen(
            self.argv(cmd),
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket created inside this namespace."""
        return in_netns(self.name, socket.socket, family, type)

    def wait_tcp(self, host: str, port: int, timeout: float = 10) -> None:
        """Wait until host:port accepts a TCP connection from inside this namespace."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            sock = self.socket(family, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.connect((host, port))
                return
            except OSError as exc:
                last = exc
                time.sleep(0.05)
            finally:
                sock.close()
        raise TimeoutError(f"{host}:{port} not reachable from {self.role} in {timeout}s: {last}")

    def udp_echo(self, port: int = 5060) -> UdpEcho:
        """Echo UDP datagrams on 0.0.0.0:port and [::]:port inside this namespace."""
        socks = []
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = self.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            socks.append(sock)
        return self._serve(port, socks, _echo_loop)

    def tcp_listen(self, port: int) -> UdpEcho:
        """Accept (and close) TCP connections on 0.0.0.0:port and [::]:port."""
        socks = []
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = self.socket(family, socket.SOCK_STREAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            socks.append(sock)
        return self._serve(port, socks, _accept_loop)

    def _serve(self, port: int, socks: list[socket.socket], loop) -> UdpEcho:
        echo = UdpEcho(port, socks)
        for sock in socks:
            thread = threading.Thread(target=loop, args=(sock, echo.stop), daemon=True)
            thread.start()
            echo.threads.append(thread)
        self.echoes.append(echo)
        return echo

    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(3)
        self.procs.clear()
        for echo in self.echoes:
            echo.close()
        self.echoes.clear()


class NamespaceRedis:
    """A real redis-server inside a namespace (normally core), listening on that
    namespace's addresses and on a Unix socket, which this process (in the root
    namespace) can use directly: sockets in the filesystem know no network namespace."""

    def __init__(self, ns: Namespace, workdir: str, port: int = 6379, password: str = "") -> None:
        self.ns = ns
        self.workdir = workdir
        self.port = port
        self.password = password  # requirepass, when set
        self.socket_path = os.path.join(workdir, "redis.sock")
        self.proc: subprocess.Popen | None = None

    def url(self, family: int = 4, host: str = "") -> str:
        """redis:// to this server over IPv4/IPv6, or by `host` (a name)."""
        host = host or (self.ns.ipv4 if family == 4 else f"[{self.ns.ipv6}]")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout: float = 10) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [
            server,
            "--port",
            str(self.port),
            "--bind",
            self.ns.ipv4,
            self.ns.ipv6,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--dir",
            self.workdir,
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = self.ns.spawn(argv)
        hello = f"AUTH {self.password}\r\nPING\r\n" if self.password else "PING\r\n"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(0.5)
                    probe.connect(self.socket_path)
                    probe.sendall(hello.encode())
                    if b"+PONG" in probe.recv(32):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: Redis is gone at once, as when its host dies."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis(
            unix_socket_path=self.socket_path, socket_timeout=10, password=self.password or None
        )


class Topology:
    """The namespaces of one test topology; close() removes all of them."""

    def __init__(self, hosts: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> None:
        self.prefix = f"fa{secrets.token_hex(3)}"
        self.core = Namespace(f"{self.prefix}-core", "core", CORE4, CORE6)
        self.hosts: dict[str, Namespace] = {}
        for role, (num, extra) in (hosts or DEFAULT_HOSTS).items():
            self.hosts[role] = Namespace(
                f"{self.prefix}-{role}",
                role,
                f"192.0.2.{num}",
                f"2001:db8::{num}",
                [f"192.0.2.{n}" for n in extra],
                [f"2001:db8::{n}" for n in extra],
            )
        self._closed = False

    def __getattr__(self, role: str) -> Namespace:
        hosts = self.__dict__.get("hosts", {})
        if role in hosts:
            return hosts[role]
        raise AttributeError(role)

    def __getitem__(self, role: str) -> Namespace:
        return self.core if role == "core" else self.hosts[role]

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.core, *self.hosts.values()]

    def build(self) -> Topology:
        try:
            for ns in self.namespaces:
                _sh(["ip", "netns", "add", ns.name])
                _sh(["ip", "-n", ns.name, "link", "set", "lo", "up"])
            core = self.core.name
            _sh(["ip", "-n", core, "link", "add", "br0", "type", "bridge"])
            _sh(["ip", "-n", core, "link", "set", "br0", "up"])
            _sh(["ip", "-n", core, "addr", "add", f"{CORE4}/24", "dev", "br0"])
            _sh(["ip", "-n", core, "addr", "add", f"{CORE6}/64", "dev", "br0", "nodad"])
            for i, ns in enumerate(self.hosts.values()):
                port = f"p{i}"  # lives in core only: no clash with host interfaces
                _sh(
                    [
                        "ip",
                        "-n",
                        core,
                        "link",
                        "add",
                        port,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "eth0",
                        "netns",
                        ns.name,
                    ]
                )
                _sh(["ip", "-n", core, "link", "set", port, "master", "br0", "up"])
                _sh(["ip", "-n", ns.name, "link", "set", "eth0", "up"])
                for addr in [ns.ipv4, *ns.extra4]:
                    _sh(["ip", "-n", ns.name, "addr", "add", f"{addr}/24", "dev", "eth0"])
                for addr in [ns.ipv6, *ns.extra6]:
                    _sh(["ip", "-n", ns.name, "addr", "add", f"{addr}/64", "dev", "eth0", "nodad"])
                # the second /64 is on the same link for everyone
                _sh(["ip", "-n", ns.name, "-6", "route", "add", ROTATING6, "dev", "eth0"])
                if ns.role == "attacker":
                    for addr in ROTATING6_HOSTS:
                        _sh(
                            [
                                "ip",
                                "-n",
                                ns.name,
                                "addr",
                                "add",
                                f"{addr}/128",
                                "dev",
                                "eth0",
                                "nodad",
                            ]
                        )
        except Exception:
            self.close()
            raise
        _live.append(self)
        return self

    # -- probes ------------------------------------------------------------------------
    def can_reach(
        self,
        src: str,
        dst: str,
        port: int = 5060,
        family: int = 4,
        source: str | None = None,
        timeout: float = 0.6,
    ) -> bool:
        """Does a UDP datagram from `src` get echoed by `dst`:port (needs dst.udp_echo)?

        `source` picks one of src's addresses (default its main one). A True answer
        proves both directions pass; False means nothing came back within `timeout`.
        """
        src_ns, dst_ns = self[src], self[dst]
        source = source or src_ns.address(family)
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = src_ns.socket(af, socket.SOCK_DGRAM)
        try:
            sock.bind((source, 0))
            nonce = secrets.token_bytes(8)
            deadline = time.monotonic() + timeout
            next_send = 0.0
            while (now := time.monotonic()) < deadline:
                if now >= next_send:  # resend: the first datagram may wait on ARP/ND
                    sock.sendto(nonce, (dst_ns.address(family), port))
                    next_send = now + 0.2
                sock.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
                try:
                    data, _ = sock.recvfrom(64)
                except TimeoutError:
                    continue
                if data == nonce:
                    return True
            return False
        finally:
            sock.close()

    def can_connect(
        self,
        src: str,
        dst: str,
        port: int,
        family: int = 4,
        source: str | None = None,
        timeout: float = 0.6,
    ) -> bool:
        """Does a TCP handshake from `src` to `dst`:port complete (needs dst.tcp_listen)?"""
        src_ns, dst_ns = self[src], self[dst]
        source = source or src_ns.address(family)
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = src_ns.socket(af, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((dst_ns.address(family), port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def ping(
        self, src: str, dst: str, family: int = 4, source: str | None = None, timeout: float = 1
    ) -> bool:
        src_ns, dst_ns = self[src], self[dst]
        argv = ["ping", "-n", "-c", "1", "-W", str(max(1, round(timeout)))]
        argv += ["-6" if family == 6 else "-4"]
        if source:
            argv += ["-I", source]
        proc = src_ns.run([*argv, dst_ns.address(family)], check=False, timeout=timeout + 5)
        return proc.returncode == 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in self.namespaces:
            ns.stop_processes()
        for ns in self.namespaces:
            subprocess.run(
                ["ip", "netns", "del", ns.name], capture_output=True, check=False, timeout=10
            )
        with contextlib.suppress(ValueError):
            _live.remove(self)


def make_topology(hosts: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> Topology:
    """Build a topology (raises NetnsUnavailable with the reason when it cannot)."""
    reason = netns_unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    return Topology(hosts).build()


@contextlib.contextmanager
def topology(hosts: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> Iterator[Topology]:
    topo = make_topology(hosts)
    try:
        yield topo
    finally:
        topo.close()


@atexit.register
def _close_all() -> None:  # a crashed test run still removes its namespaces
    for topo in list(_live):
        topo.close()


# -- pytest fixtures --------------------------------------------------------------------
@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def netns_topology(netns_available: None) -> Iterator[Topology]:
    """attacker, pbx1, pbx2 around a bridge in core; shared by the tests of one module."""
    with topology() as topo:
        yield topo


@pytest.fixture
def netns_topology_fn(netns_available: None) -> Iterator[Topology]:
    """The same topology, fresh for one test."""
    with topology() as topo:
        yield topo


# What "nothing outside our chain/table/set changed" is checked against, in a namespace.
SNAPSHOT = {
    "legacy4": "iptables-legacy-save -t filter",
    "legacy6": "ip6tables-legacy-save -t filter",
    "nft4": "iptables-save -t filter",
    "nft6": "ip6tables-save -t filter",
    "ruleset": "nft list ruleset",
    "ipsets": "ipset list -n",
}
OURS = re.compile(r"fastagi", re.IGNORECASE)


def snapshot(ns: Namespace) -> dict[str, str]:
    """The namespace's whole firewall, with packet counters zeroed."""
    out = {}
    for key, cmd in SNAPSHOT.items():
        text = ns.run(cmd, timeout=60).stdout
        text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
        text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
        out[key] = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    return out


def without_ours(snap: dict[str, str]) -> dict[str, str]:
    """The snapshot with our chain/table/sets (and the lines pointing at them) cut out."""
    out = {}
    for key, text in snap.items():
        kept: list[str] = []
        skip_depth = 0
        for line in text.splitlines():
            if skip_depth:
                skip_depth += line.count("{") - line.count("}")
                continue
            if not line.strip():
                continue
            if OURS.search(line):
                if line.rstrip().endswith("{"):  # `table inet fastagi {`, `chain FASTAGI {`
                    skip_depth = 1
                continue
            kept.append(line)
        out[key] = "\n".join(kept)
    return out

"""Simulated hosts: Linux network namespaces on a private subnet, each with its own address,
hostname and Ray node, joined into one Ray cluster. For multi-host tests and benchmarks.

    with HostCluster(["a", "b", "c"]) as hosts:        # a is the Ray head
        hosts["b"].ip                                  # 10.87.0.12
        hosts["a"].popen(["disagg", "serve", "t.yaml"], env=hosts.ray_env())
        hosts["c"].link_bytes()                        # bytes over c's link, both ways
        hosts["c"].cut(); hosts["c"].restore()         # lose and regain c's link

Layout: a bridge ``dgbr0`` in the root namespace holds 10.87.0.1/24 (so the test process
reaches every host); host i is namespace ``dg-<name>`` with 10.87.0.(11+i) on a veth pair
whose root end is enslaved to the bridge. Traffic stays between these namespaces and the
root's bridge address: nothing is routed anywhere else.

Each host runs ``ray start --block`` inside its namespace and its own UTS namespace (its own
hostname), labelled ``host=<name>``; processes there inherit ``UCX_TLS=tcp,self`` so NIXL
moves KV over the link, as between real machines, instead of through shared memory or CMA
(which UCX picks between namespaces of one machine: they are still one host to it).

Teardown kills every process in each namespace (``ip netns pids``, which sees exactly the
processes there: ``ray stop`` would kill every Ray node on the machine), then removes the
namespaces, veths and bridge; it runs on any exit, and a stale layout from a crashed run is
removed before a new one is made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SUBNET = "10.87.0"
BRIDGE = "dgbr0"
GATEWAY_IP = f"{SUBNET}.1"  # the root namespace's address on the bridge
RAY_PORT = 6390
DASHBOARD_PORT = 8265
RAY_BIN = str(Path(sys.executable).with_name("ray"))


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip netns``): the reason."""


def unavailable_reason() -> str | None:
    """Why simulated hosts cannot be made on this machine; None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "the ip (iproute2) and unshare (util-linux) commands are missing"
    probe = subprocess.run(["ip", "netns", "add", "dg-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "dg-probe"], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


@dataclass
class Host:
    name: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return f"dg-{self.name}"

    @property
    def veth(self) -> str:
        """The root namespace's end of this host's link (its counters and its switch)."""
        return f"dgv-{self.name}"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in this host's network namespace and a UTS namespace of its own
        (hostname = the host's name)."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "sh", *argv]

    def popen(self, argv: Sequence[str], env: dict[str, str] | None = None,
              **kw: object) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), env=env, start_new_session=True, **kw)

    def run(self, argv: Sequence[str], timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True,
                              timeout=timeout, env=env)

    def link_bytes(self) -> int:
        """Bytes through this host's link so far, both directions."""
        stats = Path(f"/sys/class/net/{self.veth}/statistics")
        return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())

    def cut(self) -> None:
        """Lose this host's link (its processes live on, unreachable)."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in this host's namespace."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class HostCluster:
    """Hosts named ``names`` (the first is the Ray head), each a Ray node with
    ``num_cpus`` logical CPUs and the label ``host=<name>``."""

    def __init__(self, names: Sequence[str], num_cpus: float = 2,
                 env: dict[str, str] | None = None, start_ray: bool = True,
                 dashboard: bool = False):
        """``dashboard``: the head also serves Ray's dashboard (job submission) on its
        address, port DASHBOARD_PORT."""
        if not 1 <= len(names) <= 20:
            raise ValueError("between 1 and 20 hosts")
        self.hosts = [Host(n, f"{SUBNET}.{11 + i}", {"host": n}) for i, n in enumerate(names)]
        self.num_cpus, self.start_ray, self.dashboard = num_cpus, start_ray, dashboard
        path = f"{Path(RAY_BIN).parent}:{os.environ.get('PATH', '')}"  # ray, disagg
        # A dead node is declared after 3 missed health checks 1 s apart (a killed raylet:
        # seconds); a cut link still takes 3 check timeouts (10 s each) to declare.
        # Token auth stays on, with a token of the cluster's own that reaches every node,
        # driver and job client through the environment (not ~/.ray, not argv).
        token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
        self.env = {**os.environ, "PATH": path, "UCX_TLS": "tcp,self",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", **(env or {})}
        self._ray: dict[str, subprocess.Popen] = {}  # host -> its `ray start --block`
        self.log_dir = Path(tempfile.mkdtemp(prefix="disagg-hosts-"))

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def ray_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that joins this cluster (a driver on a host)."""
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def __enter__(self) -> HostCluster:
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(reason)
        teardown_layout()
        try:
            self._make_links()
            if self.start_ray:
                self._start_ray()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_links(self) -> None:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for h in self.hosts:
            inner = f"dgi-{h.name}"
            _ip("netns", "add", h.ns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", h.ns)
            _ip("link", "set", h.veth, "master", BRIDGE)
            _ip("link", "set", h.veth, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", inner)
            _ip("-n", h.ns, "link", "set", inner, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")

    def _start_ray(self, timeout_s: float = 120) -> None:
        for h in self.hosts:
            self.start_node(h.name, timeout_s)

    def start_node(self, name: str, timeout_s: float = 120) -> None:
        """Start host ``name``'s Ray node (the head first) and wait until it has joined.
        One node at a time: nodes on one machine share Ray's session folder, and two
        raylets starting at once can pick the same socket names there."""
        h = self[name]
        common = ["--block", "--num-cpus", str(self.num_cpus), "--disable-usage-stats",
                  "--object-store-memory", str(256 << 20)]
        labels = ",".join(f"{k}={v}" for k, v in h.labels.items())
        dash = ["--include-dashboard=true", "--dashboard-host", h.ip,
                "--dashboard-port", str(DASHBOARD_PORT)] if self.dashboard else \
            ["--include-dashboard=false"]
        role = ["--head", "--port", str(RAY_PORT), *dash] \
            if h is self.head else ["--address", self.address]
        with (self.log_dir / f"ray-{h.name}.log").open("ab") as log:
            self._ray[name] = h.popen(
                [RAY_BIN, "start", *role, "--node-ip-address", h.ip, "--labels", labels,
                 *common], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_alive(h, timeout_s)

    def kill_raylet(self, name: str) -> None:
        """SIGKILL host ``name``'s raylet (the node dies; what it ran is left to Ray)."""
        for pid in self[name].pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).name() == "raylet":
                    os.kill(pid, signal.SIGKILL)

    def alive_ips(self) -> set[str] | None:
        """Addresses of the Ray nodes alive, as the head's GCS reports them (None if it
        cannot be asked)."""
        code = ("import ray; ray.init(); "
                "print(*[n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']])")
        out = self.head.run([sys.executable, "-c", code], timeout=60, env=self.ray_env())
        if out.returncode != 0 or not out.stdout.strip():
            return None
        return set(out.stdout.strip().splitlines()[-1].split())

    def _wait_alive(self, host: Host, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while host.ip not in (self.alive_ips() or set()):
            dead = [name for name, p in self._ray.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}:\n" + (self.log_dir / f"ray-{name}.log")
                                  .read_text(errors="replace")[-2000:] for name in dead)
                raise RuntimeError(f"host {host.name}'s Ray node did not join (ray start "
                                   f"exited on {dead or 'none'})\n{tails}")
            time.sleep(1)

    def close(self) -> None:
        for h in self.hosts:
            h.kill_all()
        for p in self._ray.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self._ray.clear()
        teardown_layout()


def teardown_layout() -> None:
    """Remove every namespace, veth and bridge of this harness (from any run)."""
    for ns in _ip("netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith("dg-"):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("dgv-") or name == BRIDGE:
            _ip("link", "del", name, check=False)

"""One vLLM instance (prefill or decode) as a supervised child process.

``VLLMProcess`` builds the ``vllm.entrypoints.openai.api_server`` command line with our
connector configured, starts it in its own process group (so stopping it stops its engine
core and workers too), waits for ``/health`` with a deadline, and reads its load from
vLLM's own ``/metrics``. Ray is applied at the edge (``disagg.actor``); this class is plain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field

from disagg.config import ConnectorConfig, EngineArgs, StoreConfig, TransferConfig
from disagg.credentials import ENGINE_TOKEN_ENV, SECRET_ENV, engine_token, new_secret
from disagg.models import kv_heads_of
from disagg.scrape import Series
from disagg.scrape import parse as parse_metrics
from disagg.vllm_plugin import EXACT_BIND_ENV

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]


class InstanceSpec(BaseModel):
    """Everything one instance needs; built by the launcher, sent to its actor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    index: int = Field(ge=0)
    model_path: str
    served_model_name: str
    engine: EngineArgs
    transfer: TransferConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    tensor_parallel_size: int = 1
    cpu_cores: list[int] = Field(default_factory=list, description=(
        "Cores to pin, CPU only; split among the tensor-parallel ranks (rank_cores)."))
    side_channel_port: int = Field(0, ge=0, description="0 picks a free port.")
    kv_events: bool = Field(True, description="Publish vLLM's KV-cache events (ZMQ).")
    log_dir: str


class InstanceInfo(BaseModel):
    """What the gateway needs to reach an instance (changes when it restarts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    index: int
    engine_id: str
    url: str
    side_channel_port: int
    pid: int
    log_path: str
    kv_events_endpoint: str | None = None  # vLLM's KV-event PUB socket, to connect to
    kv_replay_endpoint: str | None = None  # its replay ROUTER socket
    restarts: int = 0  # engines this instance restarted after they died (crash loops show)
    tensor_parallel_size: int = 1
    num_kv_heads: int = 0  # the model's KV heads (0: unknown); with the TP size, which
    # prefill instances a decoder can pull from (``tp_layout.pairing_problem``)
    cpu_cores: list[int] = Field(default_factory=list)  # pinned (CPU builds; [] otherwise):
    # instances pinned to the same cores of one host share their compute


class InstanceLoad(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    running: float = 0
    waiting: float = 0
    kv_usage: float = 0


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now. All sockets stay open until every port is chosen,
    so one call never returns a port twice; another process may still take one before its
    user binds it (``VLLMProcess`` retries start-up on that race)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_run(n: int, host: str = "127.0.0.1", exclude: AbstractSet[int] = frozenset(),
             tries: int = 100) -> int:
    """The first of ``n`` consecutive ports free right now (none in ``exclude``). As with
    ``free_ports``, another process may take one before its user binds it."""
    for _ in range(tries):
        base = free_port(host)
        run = range(base, base + n)
        if run.stop > 65536 or any(p in exclude for p in run):
            continue
        sockets = [socket.socket() for _ in run]
        try:
            for s, port in zip(sockets, run, strict=True):
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no run of {n} free ports on {host} after {tries} tries")


# vLLM (and ZMQ) say this when a port picked as free was taken before the bind.
_PORT_RACE = ("Address already in use", "address already in use")
# A worker that fails during start-up can leave vLLM's API server waiting for its engine
# (measured: a KV connector failing to bind its port, the server still waiting 8 min later):
# start-up has failed once the log says so, whether the process exits or not.
_START_FAILED = ("WorkerProc hit an exception", "EngineCore failed to start")
_PID_PREFIX = re.compile(r"^\(\w+ pid=\d+\) ")
_ROOT_CAUSE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:\S+ )*?(\w+(?:\.\w+)*(?:Error|Exception)): ")


def node_ip() -> str:
    """This node's address as peers reach it: ``DISAGG_NODE_IP``, else loopback on a
    one-node cluster (traffic never leaves the machine), else Ray's node address."""
    if os.environ.get("DISAGG_NODE_IP"):
        return os.environ["DISAGG_NODE_IP"]
    try:
        import ray  # here, not at the top: the gateway imports this module, Ray is heavy

        if ray.is_initialized() and sum(n["Alive"] for n in ray.nodes()) > 1:
            return ray.util.get_node_ip_address()
    except Exception as exc:  # not in a Ray process: a single machine
        logger.debug("node_ip: %s", exc)
    return "127.0.0.1"


def ucx_environment(log_stem: str) -> dict[str, str]:
    """The variables that make UCX report the protocols it picks to ``<log_stem>.<pid>``
    (what ``disagg.transfer.nixl.ucx_info`` reads), where the operator did not set them."""
    env = {"UCX_PROTO_INFO": "y", "UCX_LOG_FILE": f"{log_stem}.%p"}
    return {k: v for k, v in env.items() if k not in os.environ}


def bind_ip(advertised: str) -> str:
    """The address this node's engines bind: ``DISAGG_BIND_IP`` (behind NAT, where the
    address peers use is not one of ours), else the advertised address itself. Never all
    interfaces unless an operator asks for it. Fails fast (ValueError) when that address
    is not one of this node's own: the engine could not bind it, or peers would reach
    another machine."""
    chosen = os.environ.get("DISAGG_BIND_IP") or advertised
    if chosen in ("0.0.0.0", "::"):  # asked for explicitly
        return chosen
    local = local_addresses()
    if chosen not in local:
        how = "DISAGG_BIND_IP" if os.environ.get("DISAGG_BIND_IP") else \
            "the node address (DISAGG_NODE_IP, or Ray's for this node)"
        raise ValueError(
            f"{how} {chosen} is not an address of this node (it has {', '.join(sorted(local))})"
            ". Behind NAT set DISAGG_BIND_IP to a local address and DISAGG_NODE_IP to the "
            "one peers reach; otherwise start Ray with --node-ip-address set to this node's "
            "own address.")
    return chosen


def local_addresses() -> set[str]:
    """Every IPv4/IPv6 address of this node's interfaces."""
    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
            for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}


class VLLMProcess:
    """A vLLM OpenAI server with DisaggConnector, owned by this process.

    ``secret`` is the deployment's (``disagg.credentials``): the engine requires the token
    derived from it on every route and its side channel authenticates with it. It reaches
    the engine through its environment only; None makes a fresh one (a lone instance)."""

    def __init__(self, spec: InstanceSpec, secret: str | None = None):
        self.spec = spec
        self._secret = secret or new_secret()
        self._token = engine_token(self._secret)
        self.host = node_ip()
        self.bind_host = bind_ip(self.host)
        self._pick_ports()
        self.restarts = 0
        self._new_incarnation()
        self._proc: subprocess.Popen | None = None
        self._stopped = False  # stop() was called: no (re)start from wait_healthy after it
        self._lifecycle = threading.Lock()  # stop() against wait_healthy's port retry
        self._log_offset = 0  # where the current child's part of the log starts
        # reused: a client per poll costs real CPU
        self._http = httpx.Client(timeout=2, headers=self.auth_headers())

    def _new_incarnation(self) -> None:
        """A new engine id (peers and the gateway's index never mistake a restarted engine
        for the old one) and its own log."""
        self.engine_id = f"{self.spec.role}-{self.spec.index}-{uuid.uuid4().hex[:8]}"
        Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = str(Path(self.spec.log_dir) / f"{self.engine_id}.log")

    def _pick_ports(self) -> None:
        """HTTP, side-channel (unless fixed by the topology) and KV-event ports, distinct.
        TP rank r's side channel listens on side_channel_port + r: with TP > 1 the base
        starts a run of free ports."""
        ports = free_ports(4)
        self.port = ports[0]
        tp = self.spec.tensor_parallel_size
        self.side_channel_port = self.spec.side_channel_port or (
            ports[1] if tp == 1 else free_run(tp, exclude=set(ports)))
        self.events_port, self.replay_port = (ports[2], ports[3]) if self.spec.kv_events \
            else (0, 0)

    def auth_headers(self) -> dict[str, str]:
        """What a caller of this engine sends (the engine refuses requests without it)."""
        return {"Authorization": f"Bearer {self._token}"}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connector_config(self) -> ConnectorConfig:
        """The typed settings this instance's connector receives (topology sections plus
        this instance's addresses)."""
        store = self.spec.store
        return ConnectorConfig(
            side_channel_host=self.host, side_channel_bind=self.bind_host,
            side_channel_port=self.side_channel_port,
            model_name=self.spec.served_model_name, transfer=self.spec.transfer,
            store=store if store.enabled else None)

    def kv_transfer_config(self) -> dict[str, Any]:
        return {
            "kv_connector": "DisaggConnector",
            # A string, not an import: the serving plane never loads the connector (vLLM
            # does, inside the engine process).
            "kv_connector_module_path": "disagg.transfer.connector",
            "kv_role": "kv_both",
            "engine_id": self.engine_id,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": self.connector_config().to_extra(),
        }

    def command(self) -> list[str]:
        e, s = self.spec.engine, self.spec
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", s.model_path, "--served-model-name", s.served_model_name,
            "--host", self.bind_host, "--port", str(self.port),
            "--middleware", "disagg.engine_guard.RequireEngineToken",
            "--dtype", e.dtype, "--max-model-len", str(e.max_model_len),
            "--max-num-seqs", str(e.max_num_seqs), "--seed", str(e.seed),
            "--tensor-parallel-size", str(s.tensor_parallel_size),
            "--distributed-executor-backend", "mp" if s.tensor_parallel_size > 1 else "uni",
            "--kv-transfer-config", json.dumps(self.kv_transfer_config()),
            "--disable-uvicorn-access-log",
        ]
        if e.block_size:
            cmd += ["--block-size", str(e.block_size)]
        if e.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
        if e.enforce_eager:
            cmd.append("--enforce-eager")
        cmd.append("--enable-prefix-caching" if e.enable_prefix_caching
                   else "--no-enable-prefix-caching")
        if self.events_port:
            cmd += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://{self.bind_host}:{self.events_port}",
                "replay_endpoint": f"tcp://{self.bind_host}:{self.replay_port}"})]
        return cmd + list(e.extra_args)

    def pinned_cores(self) -> list[int]:
        """The cores the engine is pinned to (CPU builds; [] when not pinned). Planned on
        the launcher's machine; this node may have fewer cores."""
        return sorted({c % (os.cpu_count() or 1) for c in self.spec.cpu_cores})

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.spec.engine.kv_cache_gib)
        cores = self.pinned_cores()
        if cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind(
                rank_cores(cores, self.spec.tensor_parallel_size))
            env["DISAGG_CPU_AFFINITY"] = ",".join(map(str, cores))  # the whole engine's
        # The engine runs in this process tree; keep Ray from adopting its children.
        env.pop("RAY_ADDRESS", None)
        # Secrets by environment, never argv (``ps`` shows argv to every local user).
        env[SECRET_ENV] = self._secret
        env[ENGINE_TOKEN_ENV] = self._token
        # The KV-event publisher binds bind_host exactly, not every interface (vllm_plugin).
        env[EXACT_BIND_ENV] = "1"
        # UCX reports the transport it picks for KV reads (status and metrics per peer).
        env.update(ucx_environment(str(Path(self.log_path).with_suffix("")) + ".ucx"))
        return env

    def start(self) -> None:
        self._log_offset = Path(self.log_path).stat().st_size if Path(self.log_path).exists() \
            else 0
        log = open(self.log_path, "ab")  # noqa: SIM115  # handed to the child
        logger.info("engine %s: starting vLLM on %s (log %s)", self.engine_id, self.url,
                    self.log_path)
        # The supervisor stops vLLM's whole process group when our end of its stdin closes,
        # which happens however this process dies.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.supervise", "--", *self.command()],
            env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE, start_new_session=True,
        )
        log.close()

    def wait_healthy(self, timeout_s: float, port_retries: int = 3) -> None:
        """Block until /health answers 200; RuntimeError if the process dies or time runs out.

        Ports are picked free but bound later by vLLM's processes, so another process on the
        node can take one in between (two instances starting side by side do). When start-up
        fails on a port already in use, the instance restarts on fresh ports, at most
        ``port_retries`` times; any other start-up failure is reported with its root cause.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is not None and proc.poll() is None and self._start_failed():
                logger.warning("engine %s: start-up failed but vLLM still runs; stopping it",
                               self.engine_id)
                _end(proc)
            if proc is None or proc.poll() is not None:
                log = self._log_since_start()
                with self._lifecycle:  # a concurrent stop() wins: no engine after it
                    if self._stopped:
                        raise RuntimeError(f"engine {self.engine_id} stopped during start-up")
                    if port_retries > 0 and any(m in log for m in _PORT_RACE):
                        port_retries -= 1
                        logger.warning("engine %s: a port was taken during start-up; "
                                       "restarting on fresh ports (%d retries left)",
                                       self.engine_id, port_retries)
                        self._pick_ports()
                        self.start()
                        continue
                status = proc.poll() if proc is not None else None
                raise RuntimeError(f"engine {self.engine_id} exited during start-up "
                                   f"(status {status}): "
                                   f"{root_cause(log) or 'no error in its log'}; see "
                                   f"{self.log_path}\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise RuntimeError(f"engine {self.engine_id} not healthy after {timeout_s}s: "
                           f"see {self.log_path}")

    def _start_failed(self) -> bool:
        log = self._log_since_start()
        return any(m in log for m in _START_FAILED)

    def healthy(self) -> bool:
        try:
            return self._http.get(f"{self.url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _log_since_start(self) -> str:
        """The log written by the current child (a restart appends to the same file)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            role=self.spec.role, index=self.spec.index, engine_id=self.engine_id,
            url=self.url, side_channel_port=self.side_channel_port,
            pid=self._proc.pid if self._proc else -1, log_path=self.log_path,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            num_kv_heads=kv_heads_of(self.spec.model_path) or 0,
            kv_events_endpoint=f"tcp://{self.host}:{self.events_port}" if self.events_port
            else None,
            kv_replay_endpoint=f"tcp://{self.host}:{self.replay_port}" if self.replay_port
            else None,
            restarts=self.restarts, cpu_cores=self.pinned_cores(),
        )

    def exit_code(self) -> int | None:
        """The engine's exit status once it died by itself; None while it runs or after
        ``stop``."""
        return self._proc.poll() if self._proc is not None else None

    def restart(self) -> None:
        """Replace a dead (or stuck) engine with a new incarnation on fresh ports."""
        self.stop(timeout_s=5)
        self._stopped = False
        self.restarts += 1
        self._new_incarnation()
        self._pick_ports()
        self.start()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ask the supervisor to stop vLLM's process group; SIGKILL it after ``timeout_s``.
        Safe while another thread is in ``wait_healthy`` (which then fails at once)."""
        with self._lifecycle:
            self._stopped = True
            proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc, timeout_s)


def _end(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop a supervised engine: the supervisor stops vLLM's process group when its stdin
    closes; SIGKILL the group after ``timeout_s``."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def rank_cores(cores: list[int], ranks: int) -> list[list[int]]:
    """Each tensor-parallel rank's share of an instance's ``cores`` (its OpenMP threads).

    With at least as many cores as ranks, the cores split into ``ranks`` contiguous runs
    whose sizes differ by at most one (the first ranks take the extra cores): [0, 1, 2] for
    2 ranks is [[0, 1], [2]]. With fewer cores than ranks, ranks share them round-robin:
    TP 2 on core 0 is [[0], [0]] (vLLM accepts a core in several ranks' lists; each rank
    then runs one thread there, and the two time-share the core).
    """
    if not cores or ranks < 1:
        raise ValueError(f"need cores and ranks >= 1, got {cores} for {ranks} ranks")
    if len(cores) < ranks:
        return [[cores[r % len(cores)]] for r in range(ranks)]
    size, extra = divmod(len(cores), ranks)
    out, start = [], 0
    for r in range(ranks):
        end = start + size + (r < extra)
        out.append(cores[start:end])
        start = end
    return out


def threads_bind(rank_lists: list[list[int]]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: one core list per rank, ``|``-separated ("0,1|2")."""
    return "|".join(",".join(map(str, cores)) for cores in rank_lists)


def root_cause(log: str) -> str | None:
    """The first exception line in a vLLM log (the engine core's, before the API server's
    generic "Engine core initialization failed"), without the log-line prefix."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _ROOT_CAUSE.match(line)
        if m:
            cause = line[m.start(1):].strip()
            if "validation error" in cause:  # pydantic: the reasons are the next lines
                cause = "; ".join([cause, *_validation_details(lines[i + 1:i + 7])])
            return cause
    return None


def _validation_details(lines: list[str]) -> list[str]:
    """A pydantic ValidationError's lines after its first (field names, then each reason
    indented), up to its "For further information" link or anything else."""
    out = []
    for line in lines:
        text = _PID_PREFIX.sub("", line, count=1).strip()
        if not text or text.startswith(("For further information", "Traceback", "File ")):
            break
        out.append(text)
    return out


_LOAD_SERIES = {"vllm:num_requests_running": "running",
                "vllm:num_requests_waiting": "waiting", "vllm:kv_cache_usage_perc": "kv_usage"}


def parse_load(metrics: Series | str) -> InstanceLoad:
    """Running/waiting requests and KV usage from vLLM's metrics (Prometheus text, or
    samples ``disagg.scrape.parse`` returned), summed over its engines' label sets."""
    series = parse_metrics(metrics, "vllm:") if isinstance(metrics, str) else metrics
    values: dict[str, float] = {}
    for (name, _labels), value in series.items():
        if name in _LOAD_SERIES:
            values[_LOAD_SERIES[name]] = values.get(_LOAD_SERIES[name], 0.0) + value
    return InstanceLoad(**values)


def stop_local_supervisor(info: InstanceInfo, timeout_s: float = 20.0) -> None:
    """SIGTERM an instance's supervisor if it runs on this machine, and wait for it."""
    if not info.url.startswith("http://127.0.0.1:") or info.pid <= 0:
        return
    try:
        proc = psutil.Process(info.pid)
        if "disagg.supervise" not in " ".join(proc.cmdline()):
            return  # the pid was reused by something else
        proc.terminate()
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass

"""``launch()``: start (or join) Ray, place one actor per instance, wait, serve the gateway.

    with launch("examples/1p1d.yaml") as d:      # or a Topology, or a dict
        print(d.url, d.status())
        d.scale(prefill=2)                       # grow or drain pools while serving
    # on exit: gateway stopped, every vLLM process group killed, actors gone,
    # and a Ray cluster we started ourselves shut down.

Pool changes:

    grow:   actor -> engine healthy -> gateway pool (and KV-event subscription) -> routed
    shrink: draining (no new requests) -> in-flight and engine queue empty -> grace for
            decoders still pulling a prefill's KV -> actor stopped -> out of the pool

They run on the caller's thread; every change of gateway state runs on the gateway's
event loop (``Gateway.call``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from disagg.config import Topology
from disagg.credentials import deployment_secret, engine_token
from disagg.gateway import Gateway, ServedModel
from disagg.instance import InstanceInfo, Role, stop_local_supervisor
from disagg.launch.actors import InstanceActors, StartupError
from disagg.launch.server import GatewayServer, GatewayWorkers, build_gateway, listen_socket
from disagg.launch.topology import check_names, load_topology, parse_topology
from disagg.models import kv_bytes_per_token, resolve_model
from disagg.pool import Member

logger = logging.getLogger(__name__)

__all__ = ["Deployment", "StartupError", "launch"]

READY_TIMEOUT_S = float(os.environ.get("DISAGG_READY_TIMEOUT_S", "900"))
# After a prefill instance's last request answered, decoders may still be reading its KV.
PULL_GRACE_S = 5.0


def _as_topology(topology: Topology | str | Path | dict[str, Any] | None) -> Topology:
    if topology is None:
        return parse_topology({})
    if isinstance(topology, Topology):
        return check_names(topology)
    if isinstance(topology, dict):
        return parse_topology(topology)
    return load_topology(topology)


class Deployment:
    """A running deployment. Use as a context manager, or call ``shutdown()``."""

    def __init__(self, topology: Topology, started_ray: bool):
        self.topology = topology
        self.name = f"disagg-{uuid.uuid4().hex[:6]}"
        self.log_dir = Path(tempfile.gettempdir()) / "disagg" / self.name
        # Resolved here, not in an actor: a bad model name fails before anything starts.
        self.model_path = str(resolve_model(topology.model))
        builtin = Path(self.model_path).name != Path(topology.model).name
        self.served_model_name = topology.api.served_model_name or (
            topology.model if builtin else Path(self.model_path).name)
        self.instances: dict[str, InstanceInfo] = {}  # every instance started, by key
        # Per deployment, in memory only: engines accept only the gateway (a token derived
        # from it), and their side channels authenticate with it.
        self._secret = deployment_secret()
        self._actors = InstanceActors(self.name, topology, self.served_model_name,
                                      self.log_dir, self._secret)
        self._server: GatewayServer | None = None  # gateway worker 0, in this process
        self._workers: GatewayWorkers | None = None  # workers 1.. (api.workers > 1)
        self._started_ray = started_ray
        self._closed = False
        self._scale_lock = threading.Lock()

    # ---- start-up --------------------------------------------------------------------------
    def start(self, port: int | None = None) -> None:
        """Start every instance, wait until all are healthy, then serve the gateway."""
        t = self.topology
        keys = [*self._actors.spawn("prefill", t.prefill.replicas, t.prefill.replicas),
                *self._actors.spawn("decode", t.decode.replicas, t.decode.replicas)]
        self.instances.update(self._actors.wait_ready(keys, READY_TIMEOUT_S))
        for key, info in self.instances.items():
            logger.info("instance %s ready: engine %s at %s", key, info.engine_id, info.url)
        self._start_gateway(port)

    def _start_gateway(self, port: int | None) -> None:
        t = self.topology
        try:
            per_token: int | None = kv_bytes_per_token(self.model_path, t.engine.dtype)
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("KV bytes per token unknown (%s); store tiers unbounded in the "
                           "index", exc)
            per_token = None
        token = engine_token(self._secret)
        model = ServedModel(self.served_model_name, self.model_path, t.engine.max_model_len,
                            t.engine.block_size, per_token)
        limit = t.api.max_inflight or t.decode.replicas * t.engine.max_num_seqs
        many = t.api.workers > 1
        bind_port = port if port is not None else t.api.port
        sockets = [listen_socket(t.api.host, bind_port, reuse_port=many)]
        if many:  # worker 0's own address too (its status and metrics; forwarded scaling)
            sockets.append(listen_socket(t.api.host, 0, reuse_port=False))
        worker: dict[str, Any] = {"index": 0, "pid": os.getpid(), "workers": t.api.workers}
        gateway = build_gateway(t, model, self.instances, token, self._actors.locate,
                                self.scale, worker, limit)
        self._server = GatewayServer(gateway, sockets)
        worker["url"] = self._server.own_url
        self._server.start()
        if many:
            self._workers = GatewayWorkers.spawn(
                t.api.workers - 1, self.name, t, model, self.instances, token,
                self._server.port, self._server.own_url, limit)

    # ---- public ----------------------------------------------------------------------------
    @property
    def gateway(self) -> Gateway:
        if self._server is None:
            raise RuntimeError("the deployment's gateway is not running")
        return self._server.gateway

    @property
    def url(self) -> str:
        host = self.topology.api.host
        port = self._server.port if self._server else 0
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    def status(self) -> dict[str, Any]:
        """Every instance with its role, engine, address, health, load and KV links (what
        the gateway's /v1/disagg/status shows), and each one's log."""
        if self._server is None:
            return {"url": self.url, "model": self.served_model_name, "instances": []}
        gateway = self._server.gateway
        members = gateway.pool.members
        own = gateway.call(gateway.admin.status)  # on its loop: no races
        rows = own["instances"]
        for row in rows:
            row["log"] = members[row["key"]].info.log_path
        views = [own, *(self._workers.status() if self._workers else [])]
        workers = [{**v["worker"], "admission": v["admission"],
                    "decisions": len(v["recent_decisions"])} for v in views]
        return {"url": self.url, "model": self.served_model_name, "instances": rows,
                "workers": workers}

    def engine_headers(self) -> dict[str, str]:
        """What a caller of this deployment's engines must send (they refuse anyone else):
        for operators and tests reading an instance's own /metrics."""
        return {"Authorization": f"Bearer {engine_token(self._secret)}"}

    def actor(self, key: str) -> Any:
        """The Ray actor of instance ``key`` (e.g. ``"prefill-0"``)."""
        return self._actors.handle(key)

    def scale(self, prefill: int | None = None, decode: int | None = None,
              drain_timeout_s: float = 600.0) -> dict[str, Any]:
        """Grow or shrink the pools while serving; returns ``status()`` afterwards.

        New instances join routing once healthy. A removed instance (the newest first)
        leaves routing at once, finishes the requests it has (up to ``drain_timeout_s``),
        then stops: no request is lost. At least one decode instance stays.
        """
        if decode is not None and decode < 1:
            raise ValueError(f"decode must be at least 1, got {decode}")
        if prefill is not None and prefill < 0:
            raise ValueError(f"prefill must be at least 0, got {prefill}")
        with self._scale_lock:
            wanted: tuple[tuple[Role, int | None], ...] = (("prefill", prefill),
                                                           ("decode", decode))
            for role, want in wanted:
                have = self._actors.keys(role)
                if want is None or want == len(have):
                    continue
                if want > len(have):
                    self._grow(role, want - len(have), want)
                else:
                    self._shrink(have[want:], drain_timeout_s)
                self._actors.resized(role, want)
                pool = getattr(self.topology, role).model_copy(update={"replicas": want})
                self.topology = self.topology.model_copy(update={role: pool})
        return self.status()

    def _grow(self, role: Role, count: int, replicas: int) -> None:
        keys = self._actors.spawn(role, count, replicas)
        try:
            ready = self._actors.wait_ready(keys, READY_TIMEOUT_S)
        except BaseException:  # none of them joins: stop every one begun
            self._actors.stop(keys)
            raise
        for key, info in ready.items():
            self.instances[key] = info
            self.gateway.call(self.gateway.add_instance, key, info)
            if self._workers is not None:
                self._workers.add_instance(key, info)
            logger.info("scale: %s joined (engine %s at %s)", key, info.engine_id, info.url)

    def _shrink(self, keys: list[str], timeout_s: float) -> None:
        gw = self.gateway
        for key in keys:
            gw.call(gw.set_draining, key)
            if self._workers is not None:
                self._workers.set_draining(key)
        members = [gw.pool.members[k] for k in keys if k in gw.pool.members]
        deadline = time.monotonic() + timeout_s
        while (any(_busy(m) for m in members) or (
                self._workers is not None and self._workers.inflight(keys))) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        if any(m.info.role == "prefill" for m in members):
            time.sleep(PULL_GRACE_S)
        for key in keys:
            logger.info("scale: stopping %s", key)
            self._actors.stop([key])
            gw.call(gw.remove_instance, key)
            if self._workers is not None:
                self._workers.remove_instance(key)
            self.instances.pop(key, None)

    def shutdown(self) -> None:
        """Stop the gateway, every engine and actor; idempotent."""
        if self._closed:
            return
        self._closed = True
        current: list[InstanceInfo] = []
        if self._workers is not None:
            self._workers.stop()
        if self._server is not None:
            current = [m.info for m in self._server.gateway.pool.members.values()]
            self._server.stop()
        self._actors.stop_all()
        # Belt and braces on this node: an engine's supervisor stops its process group on
        # SIGTERM, whatever state Ray is in.
        for info in [*self.instances.values(), *current]:
            stop_local_supervisor(info)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _busy(m: Member) -> bool:
    """Requests in flight or queued on ``m`` (the gateway's count, or the engine's)."""
    c = m.candidate
    return c.inflight > 0 or c.running > 0 or c.waiting > 0


def launch(topology: Topology | str | Path | dict[str, Any] | None = None,
           address: str | None = None, port: int | None = None) -> Deployment:
    """Start a deployment and return it once every instance is healthy and the gateway is up.

    If an instance fails to start, every instance begun is stopped (and a Ray cluster
    started here shut down) before ``StartupError`` names it with its root cause.

    ``address``: a Ray cluster to join ("auto", "ray://..."); None joins the cluster this
    process runs in (``ray job submit``) or starts a local one.
    """
    topo = _as_topology(topology)
    started = False
    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            started = True
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        dep = Deployment(topo, started)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    try:
        dep.start(port)
    except BaseException:
        dep.shutdown()
        raise
    logger.info("disagg serving %s at %s", dep.served_model_name, dep.url)
    return dep

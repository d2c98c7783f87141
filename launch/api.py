"""``launch()``: start (or join) Ray, place one actor per instance, wait, serve the gateway.

    with launch("examples/1p1d.yaml") as d:      # or a Topology, or a dict
        print(d.url, d.status())
    # on exit: gateway stopped, every vLLM process group killed, actors gone,
    # and a Ray cluster we started ourselves shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import uvicorn

from disagg.instance import InstanceInfo, InstanceSpec, free_port, stop_local_supervisor
from disagg.launch.placement import assign_cores
from disagg.launch.topology import Topology, load_topology, parse_topology

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = float(os.environ.get("DISAGG_READY_TIMEOUT_S", "900"))


def _as_topology(topology: Topology | str | Path | dict[str, Any] | None) -> Topology:
    if topology is None:
        return Topology()
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, dict):
        return parse_topology(topology)
    return load_topology(topology)


class Deployment:
    """A running deployment. Use as a context manager, or call ``shutdown()``."""

    def __init__(self, topology: Topology, started_ray: bool):
        self.topology = topology
        self.name = f"disagg-{uuid.uuid4().hex[:6]}"
        self.log_dir = Path(tempfile.gettempdir()) / "disagg" / self.name
        self._started_ray = started_ray
        self._actors: dict[str, Any] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._gateway = None
        self._port = 0
        self._closed = False
        self._scale_lock = threading.Lock()
        self._next_index: dict[str, int] = {}

    # ---- start-up --------------------------------------------------------------------------
    def _start_instances(self) -> None:
        from disagg.models import resolve_model

        t = self.topology
        self.model_path = model_path = str(resolve_model(t.model))  # fail fast, not in an actor
        builtin = Path(model_path).name != Path(t.model).name
        self.served_model_name = t.api.served_model_name or (
            t.model if builtin else Path(model_path).name)
        for role, pool in (("prefill", t.prefill), ("decode", t.decode)):
            for i in range(pool.replicas):
                self._spawn(role, i, pool.replicas)
        refs = {k: a.wait_ready.remote(READY_TIMEOUT_S) for k, a in self._actors.items()}
        self.instances: dict[str, InstanceInfo] = {k: ray.get(r) for k, r in refs.items()}
        for key, info in self.instances.items():
            logger.info("instance %s ready: engine %s at %s", key, info.engine_id, info.url)

    def _spawn(self, role: str, index: int, replicas: int) -> str:
        """Create the actor of instance ``role-index`` (its engine starts in the actor)."""
        from disagg.actor import RemoteInstance

        t = self.topology
        pool = t.prefill if role == "prefill" else t.decode
        # Cores as if the pool had ``replicas`` instances (scaling re-plans the same way).
        sized = t.model_copy(update={role: pool.model_copy(update={"replicas": replicas})})
        key = f"{role}-{index}"
        self._next_index[role] = max(self._next_index.get(role, 0), index + 1)
        port = t.transfer.base_port
        if port:  # instance k of the whole topology takes base_port + k * tp
            offset = index if role == "prefill" else sized.prefill.replicas + index
            port += offset * pool.tensor_parallel_size
        spec = InstanceSpec(
            role=role, index=index, model_path=t.model, served_model_name=self.served_model_name,
            engine=t.engine, transfer=t.transfer, store=t.store,
            tensor_parallel_size=pool.tensor_parallel_size,
            cpu_cores=assign_cores(sized, os.cpu_count() or 1)[key]
            if pool.resources.num_gpus == 0 else [],
            log_dir=str(self.log_dir), side_channel_port=port, kv_events=t.scheduler.kv_events,
        )
        opts = {"num_cpus": pool.resources.num_cpus, "num_gpus": pool.resources.num_gpus,
                "max_restarts": -1, "max_task_retries": 0, "name": f"{self.name}-{key}"}
        if pool.resources.memory_gib:
            opts["memory"] = int(pool.resources.memory_gib * 2**30)
        self._actors[key] = RemoteInstance.options(**opts).remote(spec.model_dump_json())
        return key

    def _store_capacity(self, holder: str) -> int | None:
        """Blocks a KV store tier named ``holder`` (``disagg.transfer.store.holders``) can
        hold: its byte cap over a block's KV bytes. None for anything else, or when the
        model's geometry or the block size is not known."""
        from disagg.models import kv_bytes_per_token
        from disagg.transfer.store.holders import capacity_blocks, is_store

        store = self.topology.store.settings()
        block_size = self._gateway.block_size if self._gateway else None
        if not is_store(holder) or store is None or not block_size:
            return None
        try:
            per_token = kv_bytes_per_token(self.model_path, self.topology.engine.dtype)
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("store capacity of %s unknown (%s); not bounded", holder, exc)
            return None
        return capacity_blocks(holder, store["cpu_bytes"], store["disk_bytes"],
                               store["redis_bytes"], per_token * block_size)

    def _start_gateway(self, port: int | None) -> None:
        from disagg.gateway import Gateway
        from disagg.metrics import GatewayMetrics
        from disagg.pool import InstancePool
        from disagg.scheduler import make_policy
        from disagg.scheduler.decider import PrefillDecider
        from disagg.scheduler.hashing import RequestHasher
        from disagg.scheduler.kv_index import PrefixIndex

        t = self.topology
        metrics = GatewayMetrics()
        pool = InstancePool(metrics, locate=self._locate)
        for key, info in self.instances.items():
            pool.add(key, info)
        sched = t.scheduler
        self._gateway = Gateway(
            pool, metrics,
            make_policy(sched.prefill_policy, **sched.policy_options(sched.prefill_policy)),
            make_policy(sched.decode_policy, **sched.policy_options(sched.decode_policy)),
            self.served_model_name, t.engine.max_model_len, t.api.api_key,
            t.api.request_timeout_s,
            decider=PrefillDecider(sched.min_remote_prefill_tokens, sched.max_prefill_queue),
            hasher=RequestHasher(self.model_path),
            index=PrefixIndex(sched.index_max_blocks, capacity_of=self._store_capacity)
            if sched.kv_events else None,
            block_size=t.engine.block_size, scaler=self.scale,
        )
        self._port = port if port is not None else (t.api.port or free_port(t.api.host))
        config = uvicorn.Config(self._gateway.app, host=t.api.host, port=self._port,
                                log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="disagg-gateway",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway failed to start on {t.api.host}:{self._port}")
            time.sleep(0.05)

    async def _locate(self, key: str) -> InstanceInfo | None:
        actor = self._actors.get(key)
        if actor is None:
            return None
        # ray.get in a worker thread: this runs on the gateway's event loop, in a thread of
        # its own, where awaiting an ObjectRef directly is not reliable.
        return await asyncio.to_thread(ray.get, actor.info.remote(), timeout=5)

    # ---- public ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = self.topology.api.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self._port}"

    def status(self) -> dict[str, Any]:
        """Every instance with its role, engine, address, health and load."""
        members = self._gateway.pool.members.values() if self._gateway else []
        return {"url": self.url, "model": self.served_model_name, "instances": [
            {"key": m.key, "role": m.info.role, "engine_id": m.info.engine_id,
             "url": m.info.url, "healthy": m.healthy, "inflight": m.candidate.inflight,
             "running": m.candidate.running, "waiting": m.candidate.waiting,
             "kv_usage": m.candidate.kv_usage, "log": m.info.log_path} for m in members]}

    def actor(self, key: str):
        return self._actors[key]

    def scale(self, prefill: int | None = None, decode: int | None = None,
              drain_timeout_s: float = 600.0) -> dict[str, Any]:
        """Grow or shrink the pools while serving; returns ``status()`` afterwards.

        New instances join routing once healthy. A removed instance (the newest first)
        leaves routing at once, finishes the requests it has (up to ``drain_timeout_s``),
        then stops: no request is lost. At least one decode instance stays.
        """
        from disagg.launch.scaling import grow, shrink

        if decode is not None and decode < 1:
            raise ValueError(f"decode must be at least 1, got {decode}")
        if prefill is not None and prefill < 0:
            raise ValueError(f"prefill must be at least 0, got {prefill}")
        with self._scale_lock:
            for role, want in (("prefill", prefill), ("decode", decode)):
                have = sorted((k for k in self._actors if k.startswith(role + "-")),
                              key=lambda k: int(k.rsplit("-", 1)[1]))
                if want is None or want == len(have):
                    continue
                if want > len(have):
                    grow(self, role, want - len(have), want)
                else:
                    shrink(self, have[want:], drain_timeout_s)
                pool = getattr(self.topology, role).model_copy(update={"replicas": want})
                self.topology = self.topology.model_copy(update={role: pool})
        return self.status()

    def shutdown(self) -> None:
        """Stop the gateway, every engine and actor; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        stops = [a.stop.remote() for a in self._actors.values()]
        try:
            ray.get(stops, timeout=30)
        except Exception as exc:  # Ray itself may be going down (Ctrl-C reaches it too)
            logger.warning("stopping instances through Ray: %s", exc)
        for a in self._actors.values():
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        self._actors.clear()
        # Belt and braces on this node: an engine's supervisor stops its process group on
        # SIGTERM, whatever state Ray is in.
        current = [m.info for m in self._gateway.pool.members.values()] if self._gateway else []
        for info in [*getattr(self, "instances", {}).values(), *current]:
            stop_local_supervisor(info)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def launch(topology: Topology | str | Path | dict[str, Any] | None = None,
           address: str | None = None, port: int | None = None) -> Deployment:
    """Start a deployment and return it once every instance is healthy and the gateway is up.

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
    dep = Deployment(topo, started)
    try:
        dep._start_instances()
        dep._start_gateway(port)
    except BaseException:
        dep.shutdown()
        raise
    logger.info("disagg serving %s at %s", dep.served_model_name, dep.url)
    return dep

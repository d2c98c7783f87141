"""The gateway's HTTP servers: worker 0 on a thread of the launcher's process, and with
``api.workers: N`` N-1 more gateway processes (Ray actors on the launcher's node).

    clients --> api.port --(kernel: SO_REUSEPORT spreads connections)--> worker 0 .. N-1
                each worker: its own Gateway (pool, prefix index, admission), its own
                subscription to every engine's KV events, its own address (``url``) too

The launcher tells every worker about instances joining, draining and leaving
(``GatewayWorkers``); each worker polls the engines and follows restarts by itself. A
scale request reaching worker k > 0 is forwarded to worker 0 (the launcher scales). A
worker whose process dies is restarted by Ray, finds the deployment's instances by their
actors, and takes its share of the port again; its routing state starts afresh (its
prefix index fills from the engines' KV events from then on)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import socket
import threading
import time
from typing import Any

import httpx
import ray
import uvicorn

from disagg.config import ApiConfig, Topology
from disagg.gateway import Gateway, ServedModel
from disagg.instance import InstanceInfo
from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool

logger = logging.getLogger(__name__)
SCALE_TIMEOUT_S = 3600.0  # a forwarded scale waits for engines to start or drain


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; ``reuse_port``: other processes of this user may listen on
    the same port (the kernel spreads new connections over them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GatewayServer:
    """uvicorn (uvloop, httptools) serving ``gateway`` on its own thread, on ``sockets``:
    the shared port first, then (several workers) the worker's own address."""

    def __init__(self, gateway: Gateway, sockets: list[socket.socket]):
        self.gateway, self.sockets = gateway, sockets
        self.host, self.port = sockets[0].getsockname()[:2]
        config = uvicorn.Config(gateway.app, log_level="warning", access_log=False,
                                lifespan="on", loop="uvloop", http="httptools",
                                proxy_headers=False)  # the gateway reads no client address
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": sockets},
                                        name="disagg-gateway", daemon=True)

    @property
    def own_url(self) -> str:
        """This worker's own address (the last socket)."""
        host, port = self.sockets[-1].getsockname()[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve; returns once the gateway accepts connections (RuntimeError otherwise)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway failed to start on {self.host}:{self.port}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        for sock in self.sockets:
            sock.close()


def worker_api(api: ApiConfig, workers: int, max_inflight: int) -> tuple[ApiConfig, int]:
    """Each worker's share of the deployment's admission limits (rounded up)."""
    share = math.ceil(max_inflight / workers)
    queued = None if api.max_queued is None else math.ceil(api.max_queued / workers)
    return api.model_copy(update={"max_queued": queued}), share


def build_gateway(topology: Topology, model: ServedModel, instances: dict[str, InstanceInfo],
                  engine_token: str, locate: Any, scaler: Any, worker: dict[str, Any],
                  max_inflight: int) -> Gateway:
    """One worker's gateway over ``instances``: its own metrics, pool, index, admission."""
    t = topology
    metrics = GatewayMetrics()
    pool = InstancePool(metrics, locate=locate, engine_token=engine_token,
                        stall_s=t.api.engine_stall_s)
    for key, info in instances.items():
        pool.add(key, info)
    api, share = worker_api(t.api, t.api.workers, max_inflight)
    return Gateway(pool, metrics, model, t.scheduler, api, t.store, scaler=scaler,
                   engine_token=engine_token, max_inflight=share, worker=worker)


def forward_scale(url: str, api_key: str | None) -> Any:
    """A scaler that asks worker 0 (at ``url``) to scale; its 400s come back as ValueError."""
    def scale(prefill: int | None, decode: int | None) -> dict[str, Any]:
        body = {k: v for k, v in (("prefill", prefill), ("decode", decode)) if v is not None}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        resp = httpx.post(f"{url}/v1/disagg/scale", json=body, headers=headers,
                          timeout=SCALE_TIMEOUT_S)
        if resp.status_code == 400:
            raise ValueError(resp.json().get("error", {}).get("message", resp.text))
        resp.raise_for_status()
        return resp.json()
    return scale


class GatewayWorker:
    """A gateway worker process k > 0 (a Ray actor): serves the shared port and its own."""

    def __init__(self, index: int, deployment: str, topology_json: str, model_json: str,
                 instances_json: dict[str, str], engine_token: str, port: int,
                 worker0_url: str, max_inflight: int):
        t = Topology.model_validate_json(topology_json)
        m = ServedModel(**json.loads(model_json))
        instances = {k: InstanceInfo.model_validate_json(v) for k, v in instances_json.items()}
        self._deployment = deployment
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this worker after its process died: the instances it was
            # started with may have been scaled since; the deployment's actors say.
            instances = current_instances(deployment, instances)
            logger.warning("gateway worker %d restarted after its process died; serving "
                           "again with %d instances", index, len(instances))
        sockets = [listen_socket(t.api.host, port, reuse_port=True),
                   listen_socket(t.api.host, 0, reuse_port=False)]
        worker: dict[str, Any] = {"index": index, "pid": os.getpid(), "workers": t.api.workers}
        self.gateway = build_gateway(t, m, instances, engine_token, self._locate,
                                     forward_scale(worker0_url, t.api.api_key), worker,
                                     max_inflight)
        self.server = GatewayServer(self.gateway, sockets)
        worker["url"] = self.server.own_url
        self.server.start()

    async def _locate(self, key: str) -> InstanceInfo | None:
        """Where instance ``key`` serves now (its actor, by name, may have restarted)."""
        def info() -> InstanceInfo | None:
            try:
                actor = ray.get_actor(f"{self._deployment}-{key}")
            except ValueError:  # gone for good
                return None
            return ray.get(actor.info.remote(), timeout=5)
        return await asyncio.to_thread(info)

    def worker(self) -> dict[str, Any]:
        return dict(self.gateway.worker)

    def add_instance(self, key: str, info_json: str) -> None:
        self.gateway.call(self.gateway.add_instance, key,
                          InstanceInfo.model_validate_json(info_json))

    def set_draining(self, key: str) -> None:
        self.gateway.call(self.gateway.set_draining, key)

    def remove_instance(self, key: str) -> None:
        self.gateway.call(self.gateway.remove_instance, key)

    def inflight(self, keys: list[str]) -> int:
        """Requests this worker has in flight on instances ``keys``."""
        members = self.gateway.pool.members
        return self.gateway.call(
            lambda: sum(members[k].candidate.inflight for k in keys if k in members))

    def status(self) -> dict[str, Any]:
        return self.gateway.call(self.gateway.admin.status)

    def stop(self) -> None:
        self.server.stop()


def current_instances(deployment: str, known: dict[str, InstanceInfo],
                      timeout_s: float = 10.0) -> dict[str, InstanceInfo]:
    """The deployment's instances now: every instance actor of ``deployment`` (by name:
    ``<deployment>-<role>-<n>``), as it describes itself; one that does not answer in
    ``timeout_s`` keeps its ``known`` description (the pool follows it once it is back)."""
    names = re.compile(rf"{re.escape(deployment)}-((?:prefill|decode)-\d+)")
    keys = {match.group(1) for name in ray.util.list_named_actors()
            if (match := names.fullmatch(name))}
    out = {}
    for key in sorted(keys | set(known)):
        try:
            actor = ray.get_actor(f"{deployment}-{key}")
        except ValueError:  # removed (scaled down) since this worker was started
            continue
        try:
            out[key] = ray.get(actor.info.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001  # restarting itself: keep what we knew
            if key in known:
                out[key] = known[key]
            logger.warning("instance %s did not describe itself: %s", key, exc)
    return out


# A worker whose process dies is restarted by Ray (and rejoins the shared port); a bound,
# so that a worker that cannot start at all does not restart forever.
WORKER_RESTARTS = 10
RemoteGatewayWorker = ray.remote(num_cpus=0, max_restarts=WORKER_RESTARTS)(GatewayWorker)


class GatewayWorkers:
    """Workers 1..N-1 of a deployment's gateway, as seen from the launcher."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    @classmethod
    def spawn(cls, count: int, deployment: str, topology: Topology, model: ServedModel,
              instances: dict[str, InstanceInfo], engine_token: str, port: int,
              worker0_url: str, max_inflight: int, timeout_s: float = 120.0) -> GatewayWorkers:
        """Start ``count`` workers on this node; returns once each serves."""
        from dataclasses import asdict

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        infos = {k: v.model_dump_json() for k, v in instances.items()}
        handles = [RemoteGatewayWorker.options(
            name=f"{deployment}-gateway-{i}", scheduling_strategy=here).remote(
                i, deployment, topology.model_dump_json(), json.dumps(asdict(model)), infos,
                engine_token, port, worker0_url, max_inflight)
            for i in range(1, count + 1)]
        workers = cls(handles)
        try:
            workers.describe(timeout_s)
        except BaseException:
            workers.stop()
            raise
        return workers

    def describe(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Index, pid and own URL of each worker."""
        return ray.get([h.worker.remote() for h in self._handles], timeout=timeout_s)

    def _all(self, method: str, *args: Any, timeout_s: float = 30.0) -> list[Any]:
        return ray.get([getattr(h, method).remote(*args) for h in self._handles],
                       timeout=timeout_s)

    def add_instance(self, key: str, info: InstanceInfo) -> None:
        self._all("add_instance", key, info.model_dump_json())

    def set_draining(self, key: str) -> None:
        self._all("set_draining", key)

    def remove_instance(self, key: str) -> None:
        self._all("remove_instance", key)

    def inflight(self, keys: list[str]) -> int:
        return sum(self._all("inflight", keys))

    def status(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each worker's own status; a worker that does not answer shows as an error."""
        out = []
        for i, h in enumerate(self._handles, start=1):
            try:
                out.append(ray.get(h.status.remote(), timeout=timeout_s))
            except Exception as exc:  # noqa: BLE001  # dead or stuck: say so, go on
                out.append({"worker": {"index": i, "error": f"{type(exc).__name__}: {exc}"},
                            "admission": None, "recent_decisions": []})
        return out

    def stop(self, timeout_s: float = 15.0) -> None:
        refs = [h.stop.remote() for h in self._handles]
        try:
            ray.get(refs, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001  # Ray may be going down; kill regardless
            logger.debug("gateway workers stop: %s", exc)
        for h in self._handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception as exc:  # noqa: BLE001
                logger.debug("gateway worker kill: %s", exc)
        self._handles = []

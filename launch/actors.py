"""The Ray actors of one deployment: one per instance, keyed ``"<role>-<index>"``.

Each actor hosts a vLLM engine (``disagg.actor``) and restarts with it (``max_restarts``);
this class creates them from the topology, waits for them, finds restarted ones anew
(``locate``), and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from disagg.actor import RemoteInstance
from disagg.config import Pool, Topology
from disagg.instance import InstanceInfo, InstanceSpec, Role
from disagg.launch.placement import assign_cores


class StartupError(RuntimeError):
    """An instance failed to start; ``key`` names it, the message holds its root cause."""

    def __init__(self, key: str, cause: str):
        super().__init__(f"instance {key} failed to start: {cause}")
        self.key = key


def _cause(exc: RayError) -> str:
    """What went wrong in the actor, without Ray's wrapping: the actor's own exception for a
    failed call, Ray's account (with the traceback of ``__init__``) for a dead actor."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return str(exc.cause)
    return str(exc)


class InstanceActors:
    def __init__(self, name: str, topology: Topology, served_model_name: str, log_dir: Path,
                 secret: str):
        """``secret``: the deployment's (``disagg.credentials``), handed to every actor."""
        self.name = name
        self._secret = secret
        self.topology = topology  # replicas follow scaling (``resized``)
        self._served_model_name = served_model_name
        self._log_dir = log_dir
        self._handles: dict[str, Any] = {}
        self._next_index: dict[str, int] = {}

    def keys(self, role: Role | None = None) -> list[str]:
        """Instance keys (of ``role``), in index order."""
        keys = [k for k in self._handles if role is None or k.startswith(role + "-")]
        return sorted(keys, key=lambda k: (k.split("-", 1)[0], int(k.rsplit("-", 1)[1])))

    def handle(self, key: str) -> Any:
        return self._handles[key]

    def resized(self, role: Role, replicas: int) -> None:
        """Record the pool's new size (cores of later instances are planned for it)."""
        pool = self._pool(role).model_copy(update={"replicas": replicas})
        self.topology = self.topology.model_copy(update={role: pool})

    def spawn(self, role: Role, count: int, replicas: int) -> list[str]:
        """Create ``count`` new actors of ``role`` (their engines start in the actors),
        placed as in a pool of ``replicas``; returns their keys."""
        first = self._next_index.get(role, 0)
        return [self._spawn_one(role, first + i, replicas) for i in range(count)]

    def _pool(self, role: Role) -> Pool:
        return self.topology.prefill if role == "prefill" else self.topology.decode

    def _spawn_one(self, role: Role, index: int, replicas: int) -> str:
        t, pool = self.topology, self._pool(role)
        sized = t.model_copy(update={role: pool.model_copy(update={"replicas": replicas})})
        key = f"{role}-{index}"
        self._next_index[role] = max(self._next_index.get(role, 0), index + 1)
        port = t.transfer.base_port
        if port:  # prefill i takes slot 2i, decode i slot 2i + 1: no overlap when pools
            # scale; a slot spans the larger TP size (rank r listens on its port + r)
            span = max(t.prefill.tensor_parallel_size, t.decode.tensor_parallel_size)
            port += (2 * index + (role == "decode")) * span
        spec = InstanceSpec(
            role=role, index=index, model_path=t.model,
            served_model_name=self._served_model_name, engine=t.engine, transfer=t.transfer,
            store=t.store, tensor_parallel_size=pool.tensor_parallel_size,
            cpu_cores=assign_cores(sized, os.cpu_count() or 1)[key]
            if pool.resources.num_gpus == 0 else [],
            log_dir=str(self._log_dir), side_channel_port=port,
            kv_events=t.scheduler.kv_events,
        )
        opts: dict[str, Any] = {
            "num_cpus": pool.resources.num_cpus, "num_gpus": pool.resources.num_gpus,
            "max_restarts": -1, "max_task_retries": 0, "name": f"{self.name}-{key}"}
        if pool.resources.memory_gib:
            opts["memory"] = int(pool.resources.memory_gib * 2**30)
        if pool.placement.labels:
            opts["label_selector"] = dict(pool.placement.labels)
        if pool.placement.strategy == "SPREAD":
            opts["scheduling_strategy"] = "SPREAD"
        self._handles[key] = RemoteInstance.options(**opts).remote(spec.model_dump_json(),
                                                                  self._secret)
        return key

    def wait_ready(self, keys: list[str], timeout_s: float) -> dict[str, InstanceInfo]:
        """Block until every engine of ``keys`` is healthy; their addresses.

        The first instance that fails to start ends the wait at once (the others may still
        be loading): ``StartupError`` naming it, with its engine's root cause and log.
        """
        keys_of = {self._handles[k].wait_ready.remote(timeout_s): k for k in keys}
        ready: dict[str, InstanceInfo] = {}
        pending = list(keys_of)
        # the actors time out by themselves; this bounds a wait on a stuck actor
        deadline = time.monotonic() + timeout_s + 60
        while pending:
            done, pending = ray.wait(pending, num_returns=1,
                                     timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise StartupError(keys_of[pending[0]], f"not ready after {timeout_s:.0f} s")
            key = keys_of[done[0]]
            try:
                ready[key] = ray.get(done[0])
            except RayError as exc:
                raise StartupError(key, _cause(exc)) from None
        return {k: ready[k] for k in keys}

    async def locate(self, key: str) -> InstanceInfo | None:
        """Where instance ``key`` serves now (a restarted actor comes back on new ports)."""
        actor = self._handles.get(key)
        if actor is None:
            return None
        # ray.get in a worker thread: this runs on the gateway's event loop, in a thread of
        # its own, where awaiting an ObjectRef directly is not reliable.
        return await asyncio.to_thread(ray.get, actor.info.remote(), timeout=5)

    def stop(self, keys: list[str], timeout_s: float = 30.0) -> None:
        """Stop the engines of ``keys`` and their actors (for good: no restart)."""
        handles = [self._handles.pop(k) for k in keys if k in self._handles]
        stops = [a.stop.remote() for a in handles]
        with contextlib.suppress(Exception):  # Ray may be going down (Ctrl-C reaches it)
            ray.get(stops, timeout=timeout_s)
        for a in handles:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)

    def stop_all(self) -> None:
        self.stop(self.keys())

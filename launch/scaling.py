"""Adding and draining instances of a running ``Deployment`` (``Deployment.scale``).

    grow:   actor -> engine healthy -> gateway pool (and KV-event subscription) -> routed
    shrink: draining (no new requests) -> in-flight and engine queue empty -> grace for
            decoders still pulling a prefill's KV -> actor stopped -> out of the pool

Runs on the caller's thread; the gateway's state changes run on the gateway's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from disagg.launch.api import Deployment

logger = logging.getLogger(__name__)

# After a prefill instance's last request answered, decoders may still be reading its KV.
PULL_GRACE_S = 5.0


def grow(dep: Deployment, role: str, count: int, replicas: int) -> list[str]:
    from disagg.launch.api import READY_TIMEOUT_S

    first = dep._next_index.get(role, 0)
    keys = [dep._spawn(role, first + i, replicas) for i in range(count)]
    refs = {k: dep._actors[k].wait_ready.remote(READY_TIMEOUT_S) for k in keys}
    for key, ref in refs.items():
        info = ray.get(ref)
        dep.instances[key] = info
        dep._gateway.call(dep._gateway.add_instance, key, info)
        logger.info("scale: %s joined (engine %s at %s)", key, info.engine_id, info.url)
    return keys


def shrink(dep: Deployment, keys: list[str], timeout_s: float) -> None:
    gw = dep._gateway
    members = [gw.pool.members[k] for k in keys if k in gw.pool.members]
    for m in members:
        m.draining = True  # read by pool.available() on the next pick
    deadline = time.monotonic() + timeout_s
    while any(_busy(m) for m in members) and time.monotonic() < deadline:
        time.sleep(0.5)
    if any(m.info.role == "prefill" for m in members):
        time.sleep(PULL_GRACE_S)
    for key in keys:
        logger.info("scale: stopping %s", key)
        actor = dep._actors.pop(key)
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote(), timeout=30)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        gw.call(gw.remove_instance, key)
        dep.instances.pop(key, None)


def _busy(m) -> bool:
    c = m.candidate
    return c.inflight > 0 or c.running > 0 or c.waiting > 0

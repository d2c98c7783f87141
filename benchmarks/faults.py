"""Faults for the soak (``benchmarks/soak.py``): each one a real failure of a real part.

    kill_prefill_engine / kill_decode_engine   SIGKILL the vLLM API server under a living
                                               actor (its watchdog starts a new incarnation)
    kill_prefill_actor / kill_decode_actor     ray.kill the instance's actor (Ray restarts it)
    restart_redis                              stop the shared Redis tier, start it again
    corrupt_disk                               overwrite bytes inside stored disk-tier chunks

Clients that drop their requests are part of the load, not of this injector. The injector
waits for the deployment to be whole again before its next fault, so faults come one at a
time (overlapping faults can take every instance of a role down, which is an outage, not a
fault to absorb).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray

# In this order, round after round: a short soak still meets a decoder death, a Redis outage
# and a lost actor before it repeats anything.
KINDS = ("kill_decode_engine", "restart_redis", "kill_prefill_actor", "corrupt_disk",
         "kill_prefill_engine", "kill_decode_actor")


@dataclass
class FaultLog:
    """What the injector did: counts by kind and (time, kind, target) in order."""

    counts: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)  # every engine process seen (leak check)

    def decode_fault_near(self, start: float, end: float, slack_s: float = 5.0) -> bool:
        """Whether a decode instance was killed while [start, end] ran (with slack)."""
        return any(kind.startswith("kill_decode") and start - slack_s <= t <= end + slack_s
                   for t, kind, _ in self.events)


class FaultInjector(threading.Thread):
    """Injects one fault every ``every_s`` (once the deployment is whole) until stopped."""

    def __init__(self, dep: Any, redis: Any | None, disk_dir: Path | None, every_s: float,
                 seed: int, kinds: tuple[str, ...] = KINDS) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.dep, self.redis, self.disk_dir, self.every_s = dep, redis, disk_dir, every_s
        self.kinds = [k for k in kinds if (k != "restart_redis" or redis is not None)
                      and (k != "corrupt_disk" or disk_dir is not None)]
        self.rng = random.Random(seed)
        self.log = FaultLog()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.wait(self.every_s):
                if not wait_whole(self.dep, self.stop, timeout_s=600):
                    continue
                self.remember_pids()
                kind = self.kinds[i % len(self.kinds)]
                i += 1
                target = self._inject(kind)
                self.log.counts[kind] += 1
                self.log.events.append((time.monotonic(), kind, target))
                print(f"soak: fault {kind} -> {target}", flush=True)
        except BaseException as exc:  # reported by the soak, never silently lost
            self.error = exc

    def remember_pids(self) -> None:
        for member in self.dep.gateway.pool.members.values():
            try:
                root = psutil.Process(member.info.pid)
                self.log.pids.update([root.pid, *(c.pid for c in root.children(True))])
            except psutil.Error:
                pass

    def _inject(self, kind: str) -> str:
        actions: dict[str, Callable[[], str]] = {
            "kill_prefill_engine": lambda: self._kill_engine("prefill"),
            "kill_decode_engine": lambda: self._kill_engine("decode"),
            "kill_prefill_actor": lambda: self._kill_actor("prefill"),
            "kill_decode_actor": lambda: self._kill_actor("decode"),
            "restart_redis": self._restart_redis,
            "corrupt_disk": self._corrupt_disk,
        }
        return actions[kind]()

    def _member(self, role: str) -> Any:
        members = [m for m in self.dep.gateway.pool.members.values() if m.info.role == role]
        return self.rng.choice(members)

    def _kill_engine(self, role: str) -> str:
        member = self._member(role)
        server = psutil.Process(member.info.pid).children()[0]  # vLLM's API server
        server.kill()
        return f"{member.key} ({member.info.engine_id})"

    def _kill_actor(self, role: str) -> str:
        member = self._member(role)
        ray.kill(self.dep.actor(member.key), no_restart=False)
        return f"{member.key} ({member.info.engine_id})"

    def _restart_redis(self) -> str:
        self.redis.stop()
        time.sleep(2.0)  # an outage the saves and lookups run into
        self.redis.start()
        return "redis"

    def _corrupt_disk(self) -> str:
        assert self.disk_dir is not None
        files = [Path(root, f) for root, _, names in os.walk(self.disk_dir) for f in names
                 if not f.startswith(".")]
        chosen = self.rng.sample(files, min(3, len(files)))
        for path in chosen:
            try:
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.seek(size // 2)
                    f.write(os.urandom(min(64, max(1, size // 2))))
            except OSError:
                pass  # evicted meanwhile
        return f"{len(chosen)} chunk files"


def wait_whole(dep: Any, stop: threading.Event | None = None, timeout_s: float = 600,
               stable_s: float = 5.0) -> bool:
    """Wait until every instance has been healthy for ``stable_s`` (a fault just injected
    shows only at the gateway's next poll); False if ``stop`` was set or time ran out."""
    deadline = time.monotonic() + timeout_s
    since: float | None = None
    while time.monotonic() < deadline:
        if all(i["healthy"] for i in dep.status()["instances"]):
            since = since or time.monotonic()
            if time.monotonic() - since >= stable_s:
                return True
        else:
            since = None
        if stop is not None and stop.is_set():
            return False
        time.sleep(0.5)
    return False

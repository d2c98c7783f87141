"""The Ray actor hosting one vLLM instance.

The engine starts in ``__init__`` so that when Ray restarts a dead actor
(``max_restarts``), the new incarnation brings its engine up on its own; callers learn the
new address from ``info()``. The vLLM child dies with the actor (PR_SET_PDEATHSIG) even when
the actor is killed without a chance to clean up.

An engine that dies while its actor lives (a crash, an OOM kill, SIGKILL) is restarted by
the actor's watchdog within seconds, as a new incarnation (new engine id and ports: the
gateway's pool finds it through ``info()`` and drops the old engine's index entries).
Restarts back off exponentially while the engine keeps dying; ``info().restarts`` counts
them, so a crash loop shows in status and metrics.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from disagg.instance import InstanceInfo, InstanceSpec, VLLMProcess
from disagg.models import resolve_model

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how soon a dead engine is noticed
BACKOFF_S = (1.0, 60.0)  # first and longest wait before a restart
STABLE_S = 120.0  # an engine up this long resets the back-off


class InstanceActor:
    def __init__(self, spec_json: str, secret: str):
        """``secret``: the deployment's (``disagg.credentials``), apart from the spec so
        that no log or status that shows a spec shows it."""
        spec = InstanceSpec.model_validate_json(spec_json)
        # Built-in models are generated deterministically on whichever node hosts us.
        path = str(resolve_model(spec.model_path))
        self._proc = VLLMProcess(spec.model_copy(update={"model_path": path}), secret)
        self._lock = threading.Lock()  # the watchdog and stop() never act at once
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._ready_timeout_s = 900.0
        self._proc.start()
        if _reconstructed():  # Ray restarted this actor: nobody calls wait_ready now
            self._start_watchdog()

    def wait_ready(self, timeout_s: float) -> InstanceInfo:
        """Block until the engine is healthy; from then on the watchdog keeps it alive.
        (A first start that fails is the launcher's to report, not the watchdog's to
        retry.)"""
        self._proc.wait_healthy(timeout_s)
        self._ready_timeout_s = timeout_s
        self._start_watchdog()
        return self._proc.info()

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog",
                                              daemon=True)
            self._watchdog.start()

    def info(self) -> InstanceInfo:
        return self._proc.info()

    def healthy(self) -> bool:
        return self._proc.healthy()

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        """Stop the engine for good. Runs on a thread of its own: it must not wait behind a
        ``wait_ready`` still blocked on an engine that is loading (a launch that another
        instance's failure ends stops every instance at once)."""
        self._stopping.set()
        with self._lock:
            self._proc.stop()

    def _watch(self) -> None:
        delay, up_since = BACKOFF_S[0], time.monotonic()
        while not self._stopping.wait(POLL_S):
            code = self._proc.exit_code()
            if code is None:
                if time.monotonic() - up_since > STABLE_S:
                    delay = BACKOFF_S[0]
                continue
            logger.error("engine %s exited (status %s); restarting in %.0f s (restart %d)",
                         self._proc.engine_id, code, delay, self._proc.restarts + 1)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_S[1])
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc.restart()
            try:
                self._proc.wait_healthy(self._ready_timeout_s)
                logger.info("engine restarted as %s at %s", self._proc.engine_id,
                            self._proc.url)
            except RuntimeError as exc:  # died again during start-up: the loop sees it
                logger.error("restarted engine failed to start: %s", exc)
            up_since = time.monotonic()


def _reconstructed() -> bool:
    """Whether this actor is a restart by Ray (``max_restarts``) of an earlier one."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in an actor (a test, a local run)
        return False


RemoteInstance = ray.remote(concurrency_groups={"control": 1})(InstanceActor)

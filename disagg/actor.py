"""The Ray actor hosting one vLLM instance.

The engine starts in ``__init__`` so that when Ray restarts a dead actor
(``max_restarts``), the new incarnation brings its engine up on its own; callers learn the
new address from ``info()``. The vLLM child dies with the actor (PR_SET_PDEATHSIG) even when
the actor is killed without a chance to clean up.
"""

from __future__ import annotations

import logging

import ray

from disagg.instance import InstanceInfo, InstanceSpec, VLLMProcess
from disagg.models import resolve_model

logger = logging.getLogger(__name__)


class InstanceActor:
    def __init__(self, spec_json: str):
        spec = InstanceSpec.model_validate_json(spec_json)
        # Built-in models are generated deterministically on whichever node hosts us.
        path = str(resolve_model(spec.model_path))
        self._proc = VLLMProcess(spec.model_copy(update={"model_path": path}))
        self._proc.start()

    def wait_ready(self, timeout_s: float) -> InstanceInfo:
        self._proc.wait_healthy(timeout_s)
        return self._proc.info()

    def info(self) -> InstanceInfo:
        return self._proc.info()

    def healthy(self) -> bool:
        return self._proc.healthy()

    def stop(self) -> None:
        self._proc.stop()


RemoteInstance = ray.remote(InstanceActor)

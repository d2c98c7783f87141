"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers).

On x86 CPUs with AMX, vLLM's bf16 CPU attention uses AMX tiles; Linux only grants them to a
process that asked (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). A process that did not dies with
``Illegal instruction`` on its first bf16 attention. Registering this plugin through the
``vllm.general_plugins`` entry point makes every vLLM in this environment ask first, our
instances and plain vLLM baselines alike.

vLLM's ZMQ KV-event publisher binds only wildcard endpoints (``tcp://*:port``, i.e. every
interface) and *connects* to any other. Our engines must bind exactly the node address their
peers use (never all interfaces), so in engines started by disagg (``EXACT_BIND_ENV`` set in
their environment) the plugin makes the publisher bind the endpoint it is given.
"""

import logging
import os

logger = logging.getLogger(__name__)
EXACT_BIND_ENV = "DISAGG_KV_EVENTS_EXACT_BIND"


def register() -> None:
    _init_amx()
    if os.environ.get(EXACT_BIND_ENV) == "1":
        _bind_kv_events_exactly()


def _bind_kv_events_exactly() -> None:
    """Make vLLM's "zmq" KV-event publisher bind its tcp endpoint instead of connecting.

    Idempotent: plugins load once per process, but a process may be forked from one that
    already loaded them."""
    from vllm.distributed import kv_events

    base = kv_events.ZmqEventPublisher
    if getattr(base, "_disagg_exact_bind", False):
        return
    base_is_bind = base._is_bind_endpoint

    class ExactBindZmqPublisher(base):  # type: ignore[misc,valid-type]
        _disagg_exact_bind = True

        @staticmethod
        def _is_bind_endpoint(endpoint: str) -> bool:
            return endpoint.startswith("tcp://") or base_is_bind(endpoint)

    # The factory maps the config's publisher name to a class; "zmq" is the only name
    # vLLM's config accepts, so the subclass takes that name in this process.
    kv_events.EventPublisherFactory._registry["zmq"] = ExactBindZmqPublisher


def _init_amx() -> None:
    """Request AMX permission for this process; a no-op where AMX or the hook is absent."""
    try:
        import torch  # here: vLLM lists entry points in processes that never load torch

        init_amx = getattr(torch._C._cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
    except Exception as exc:  # never take vLLM down for an optional speed-up
        logger.debug("AMX init skipped: %s", exc)

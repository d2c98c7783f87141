"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers).

On x86 CPUs with AMX, vLLM's bf16 CPU attention uses AMX tiles; Linux only grants them to a
process that asked (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). A process that did not dies with
``Illegal instruction`` on its first bf16 attention. Registering this plugin through the
``vllm.general_plugins`` entry point makes every vLLM in this environment ask first, our
instances and plain vLLM baselines alike.
"""

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Request AMX permission for this process; a no-op where AMX or the hook is absent."""
    try:
        import torch  # here: vLLM lists entry points in processes that never load torch

        init_amx = getattr(torch._C._cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
    except Exception as exc:  # never take vLLM down for an optional speed-up
        logger.debug("AMX init skipped: %s", exc)

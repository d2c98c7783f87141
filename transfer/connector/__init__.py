"""The vLLM KV connector: ``DisaggConnector`` and its two halves.

    disagg_connector.py  DisaggConnector: what vLLM loads (``kv_connector_module_path=
                         "disagg.transfer.connector"``); routes each call to a half
    scheduler_half.py    ConnectorScheduler: runs in vLLM's scheduler (EngineCore) process
    worker_half.py       ConnectorWorker: runs in each vLLM worker; owns the NIXL endpoint
    metadata.py          the per-step orders from the scheduler half to the worker half
    loaders.py           KVLoader: where a decoder's missing blocks come from (PeerLoader)
    stats.py             TransferStats and the ``vllm:disagg_*`` Prometheus counters
"""

from .disagg_connector import DisaggConnector

__all__ = ["DisaggConnector"]

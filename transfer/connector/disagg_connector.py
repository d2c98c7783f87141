"""DisaggConnector: our vLLM KV connector (pull mode over NIXL, ZMQ control plane).

Register it with::

    --kv-transfer-config '{"kv_connector": "DisaggConnector",
                           "kv_connector_module_path": "disagg.transfer.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"disagg": {...ConnectorConfig}}}'

vLLM builds one instance per process and role; this class only routes each call to the
scheduler half (``ConnectorScheduler``, scheduler_half.py) or the worker half
(``ConnectorWorker``, worker_half.py). Its settings are ``disagg.config.ConnectorConfig``.
Nothing is saved layer by layer: a prefill simply keeps its blocks until they are pulled,
so ``save_kv_layer``/``wait_for_layer_load``/``wait_for_save`` have nothing to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

from disagg.config import ConnectorConfig
from disagg.transfer.connector.metadata import DisaggMetadata
from disagg.transfer.connector.scheduler_half import ConnectorScheduler
from disagg.transfer.connector.stats import DisaggPromMetrics, TransferStats
from disagg.transfer.connector.worker_half import ConnectorWorker
from disagg.transfer.control.messages import Compat
from disagg.transfer.nixl.layout import planes_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class DisaggConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        kvt = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra(kvt.kv_connector_extra_config)
        self.engine_id = str(kvt.engine_id)
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config else 0
        self.scheduler: ConnectorScheduler | None = None
        self.worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = ConnectorScheduler(
                self.config, self.engine_id, vllm_config.cache_config.block_size,
                vllm_config.parallel_config.tensor_parallel_size,
            )

    def _scheduler_half(self) -> ConnectorScheduler:
        if self.scheduler is None:
            raise RuntimeError("scheduler call on a DisaggConnector built for a worker")
        return self.scheduler

    def _worker_half(self) -> ConnectorWorker:
        if self.worker is None:
            raise RuntimeError("worker call on a DisaggConnector before register_kv_caches")
        return self.worker

    # ---- scheduler half -------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        return self._scheduler_half().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._scheduler_half().after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler_half().build_meta(
            idle=scheduler_output.total_num_scheduled_tokens == 0)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler_half().request_finished(request, block_ids)

    def take_events(self):
        """Our store saves as vLLM KV events (published with vLLM's own, see
        ``disagg.tiers``)."""
        return self.scheduler.take_events() if self.scheduler is not None else ()

    # ---- worker half ----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors = list(kv_caches.values())
        num_blocks = self._num_blocks or tensors[0].shape[0]
        cfg = self._vllm_config
        planes = [p for t in tensors for p in planes_of(t, num_blocks)]
        compat = Compat(
            model=self.config.model_name or str(cfg.model_config.model),
            dtype=str(tensors[0].dtype).removeprefix("torch."),
            block_size=cfg.cache_config.block_size,
            num_layers=len(tensors),
            plane_bytes=[p.block_bytes for p in planes],
            tp_size=cfg.parallel_config.tensor_parallel_size,
            # MLA keeps one latent head, replicated on every rank.
            num_kv_heads=1 if cfg.model_config.use_mla
            else cfg.model_config.get_total_num_kv_heads(),
            head_major=all(p.head_major for p in planes),
        )
        self.worker = ConnectorWorker(
            self.config, self.engine_id, get_tensor_model_parallel_rank(), compat,
            model_id=Path(str(cfg.model_config.model)).name,
        )
        self.worker.register(kv_caches, num_blocks)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DisaggMetadata)
        self._worker_half().start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads finish before the request is scheduled (async mode)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None  # pull mode: the decoder reads our blocks in place

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        if self.worker is None:
            return set(), set()
        return self.worker.finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors() if self.worker else set()

    def get_kv_connector_stats(self) -> TransferStats | None:
        return self.worker.take_stats() if self.worker else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TransferStats:
        return TransferStats(data=dict(data)) if data else TransferStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig,
                           metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> DisaggPromMetrics:
        return DisaggPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

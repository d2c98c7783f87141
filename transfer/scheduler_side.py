"""Scheduler side of the connector (runs in vLLM's EngineCore process).

Decoder: a request whose ``kv_transfer_params`` say ``do_remote_prefill`` is loaded
asynchronously: every prompt token beyond the local prefix-cache hit comes from the peer,
and vLLM then recomputes the last prompt token to sample the next one.
Prefill: a finished ``do_remote_decode`` request keeps its blocks (delay-free) and answers
``kv_transfer_params`` naming this engine, its side channel and the block ids.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from disagg.transfer.metadata import DisaggMetadata, PeerAddress, RecvOrder, ReleaseOrder
from disagg.transfer.protocol import KVTransferParams
from disagg.transfer.settings import ConnectorSettings

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _remote_params(request: Request) -> KVTransferParams | None:
    raw = request.kv_transfer_params
    if not raw or not raw.get("do_remote_prefill"):
        return None
    try:
        return KVTransferParams.parse(raw)
    except ValidationError as exc:
        logger.warning("request %s: ignoring malformed kv_transfer_params: %s",
                       request.request_id, exc.errors()[0]["msg"])
        return None


class DisaggScheduler:
    def __init__(self, settings: ConnectorSettings, engine_id: str, block_size: int):
        self.s = settings
        self.engine_id = engine_id
        self.block_size = block_size
        self._meta = DisaggMetadata()
        self._handled: set[str] = set()  # decoder requests whose transfer was planned

    def num_new_matched_tokens(self, request: Request, num_computed: int) -> tuple[int, bool]:
        """Side-effect free: prompt tokens the peer holds beyond our local prefix."""
        params = _remote_params(request)
        if params is None or request.request_id in self._handled:
            return 0, False
        count = min(params.remote_num_tokens, request.num_prompt_tokens) - num_computed
        return (count, True) if count > 0 else (0, False)

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external: int) -> None:
        params = _remote_params(request)
        if params is None or request.request_id in self._handled:
            return
        self._handled.add(request.request_id)
        peer = PeerAddress(params.remote_engine_id, params.remote_host, params.remote_port)
        if num_external == 0:  # everything was in our own prefix cache: free the peer's copy
            self._meta.releases.append(ReleaseOrder(peer, params.remote_request_id))
            return
        local = blocks.get_unhashed_block_ids_all_groups()[0]
        # Local prefix hits cover the first whole blocks; the new blocks take the rest, in order.
        skip = len(blocks.get_block_ids()[0]) - len(local)
        remote = params.remote_block_ids[skip: skip + len(local)]
        if len(remote) != len(local):
            logger.warning("request %s: peer sent %d blocks, %d needed; recomputing",
                           request.request_id, len(remote), len(local))
            local = local[: len(remote)]
        self._meta.recvs.append(RecvOrder(
            request.request_id, peer, params.remote_request_id, tuple(local), tuple(remote)))

    def build_meta(self) -> DisaggMetadata:
        meta, self._meta = self._meta, DisaggMetadata()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        """Prefill: hold a finished do_remote_decode request's blocks for the decoder."""
        from vllm.v1.request import RequestStatus

        raw = request.kv_transfer_params or {}
        rid = request.request_id
        if rid in self._handled:
            self._handled.discard(rid)
            return False, None
        params = _remote_params(request)
        if params is not None:  # decoder request finished before its pull was planned
            peer = PeerAddress(params.remote_engine_id, params.remote_host, params.remote_port)
            self._meta.releases.append(ReleaseOrder(peer, params.remote_request_id))
            return False, None
        if not raw.get("do_remote_decode") or not block_ids:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: nothing to hand over
        self._meta.sends[rid] = self.s.lease_s
        out = KVTransferParams(
            remote_engine_id=self.engine_id, remote_request_id=rid,
            remote_host=self.s.side_channel_host, remote_port=self.s.side_channel_port,
            remote_block_ids=list(block_ids), remote_num_tokens=request.num_computed_tokens,
        )
        return True, out.model_dump()

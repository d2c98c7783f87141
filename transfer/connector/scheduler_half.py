"""The connector's scheduler half, ``ConnectorScheduler`` (runs in vLLM's EngineCore process).

Where a new request's prompt KV comes from, beyond vLLM's own prefix cache:

    tokens:  [ local prefix hit | KV store chunks ... | prefill peer ...          | last ]
             num_computed        store_end             remote_num_tokens

Store chunks are loaded first (no network hop); the peer (a ``do_remote_prefill`` request)
fills the rest; both asynchronously, and vLLM then recomputes the last prompt token.
Prefill: a finished ``do_remote_decode`` request keeps its blocks (delay-free) and answers
``kv_transfer_params`` naming this engine, its side channel and the block ids.
With a store, every normally finished request also keeps its blocks until its full prompt
chunks are copied into the store. The store is asked how much of a prompt it holds through
``disagg.transfer.store.lookup`` (answered by the rank-0 worker half).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from vllm.distributed.kv_events import BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.request import Request, RequestStatus

from disagg.config import ConnectorConfig, StoreConfig
from disagg.tiers import saved_medium
from disagg.transfer.connector.metadata import (
    DisaggMetadata,
    PeerAddress,
    RecvOrder,
    ReleaseOrder,
    StoreLoadOrder,
    StoreSaveOrder,
)
from disagg.transfer.control.messages import KVTransferParams
from disagg.transfer.store import chunk_tokens_for
from disagg.transfer.store.lookup import LookupClient

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

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


def _peer(params: KVTransferParams) -> PeerAddress:
    return PeerAddress(params.remote_engine_id, params.remote_host, params.remote_port,
                       params.remote_tp_size)


class ConnectorScheduler:
    def __init__(self, config: ConnectorConfig, engine_id: str, block_size: int,
                 tp_size: int = 1):
        self.s = config
        self.engine_id = engine_id
        self.block_size = block_size
        self.tp_size = tp_size  # told to decoders: which of our ranks hold which heads
        self._meta = DisaggMetadata()
        self._handled: set[str] = set()  # requests whose external load was planned
        # A store section with ``enabled: false`` is no store.
        self.store: StoreConfig | None = (
            config.store if config.store is not None and config.store.enabled else None)
        self._lookup: LookupClient | None = None
        self.chunk_tokens = 0
        self._medium: str | None = None  # the store name our saves are reported under
        if self.store is not None:
            st = self.store
            self._lookup = LookupClient(engine_id, st.lookup_timeout_s)
            self.chunk_tokens = chunk_tokens_for(block_size, st.chunk_tokens)
            self._medium = saved_medium(engine_id, config.side_channel_host,
                                        disk=bool(st.disk_dir), redis=bool(st.redis_url),
                                        disk_shared=st.disk_shared)
        self._store_hits: dict[str, int] = {}  # request id -> leading chunks in the store
        self._events: list = []  # vLLM KV events reporting our saves (``take_events``)

    # ---- loads ------------------------------------------------------------------------------
    def _store_end(self, request: Request) -> int:
        """Prompt tokens the store can give (whole chunks, at most the prompt).
        One lookup per request, remembered until its load is planned or it finishes."""
        if self._lookup is None:
            return 0
        rid = request.request_id
        if rid not in self._store_hits:
            full = request.num_prompt_tokens // self.chunk_tokens * self.chunk_tokens
            tokens = request.prompt_token_ids[:full] if full else []
            self._store_hits[rid] = self._lookup.lookup(tokens) if tokens else 0
        # A hit covering the whole prompt is fine: after an async load vLLM recomputes the
        # last prompt token itself (as after a full pull from a peer).
        return min(self._store_hits[rid] * self.chunk_tokens, request.num_prompt_tokens)

    def num_new_matched_tokens(self, request: Request, num_computed: int) -> tuple[int, bool]:
        """Prompt tokens the store and the peer hold beyond our local prefix (no state
        changes apart from remembering the store lookup)."""
        if request.request_id in self._handled:
            return 0, False
        params = _remote_params(request)
        # Our own held copy (a retry that came back to the instance that prefilled it) is
        # in our prefix cache already: nothing to pull, and after_alloc frees the hold.
        peer_end = min(params.remote_num_tokens, request.num_prompt_tokens) \
            if params and params.remote_engine_id != self.engine_id else 0
        count = max(self._store_end(request), peer_end) - num_computed
        return (count, True) if count > 0 else (0, False)

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external: int) -> None:
        rid = request.request_id
        if rid in self._handled:
            return
        params = _remote_params(request)
        if num_external == 0:
            self._store_hits.pop(rid, None)
            if params is not None:  # all in our own prefix cache: free the peer's copy
                self._handled.add(rid)
                self._meta.releases.append(ReleaseOrder(_peer(params),
                                                        params.remote_request_id))
            return
        self._handled.add(rid)
        local = blocks.get_unhashed_block_ids_all_groups()[0]
        # Local prefix hits cover the first whole blocks; the new blocks take the rest, in order.
        skip = len(blocks.get_block_ids()[0]) - len(local)
        prompt = request.prompt_token_ids
        chunks = self._store_hits.pop(rid, 0)
        n_store = max(0, min(self._store_end(request) // self.block_size - skip, len(local))) \
            if chunks else 0
        if n_store:
            self._meta.store_loads.append(StoreLoadOrder(
                rid, tuple(local[:n_store]), tuple(prompt[:chunks * self.chunk_tokens]), skip))
        if params is None:
            return
        peer = _peer(params)
        rest = local[n_store:]
        if not rest or params.remote_engine_id == self.engine_id:
            self._meta.releases.append(ReleaseOrder(peer, params.remote_request_id))
            return
        first = skip + n_store
        remote = params.remote_block_ids[first: first + len(rest)]
        if len(remote) != len(rest):
            logger.warning("request %s: peer sent %d blocks, %d needed; recomputing",
                           rid, len(remote), len(rest))
            rest = rest[: len(remote)]
        full = len(prompt) // self.chunk_tokens * self.chunk_tokens if self.chunk_tokens else 0
        self._meta.recvs.append(RecvOrder(
            rid, peer, params.remote_request_id, tuple(rest), tuple(remote),
            token_ids=tuple(prompt[:full]), first_block=first))

    def build_meta(self, idle: bool = False) -> DisaggMetadata:
        """This step's orders; ``idle``: the step schedules no tokens."""
        meta, self._meta = self._meta, DisaggMetadata()
        meta.idle = idle
        return meta

    # ---- finished requests ------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        """Hold a finished request's blocks while a decoder will read them (prefill) or the
        store copies them; returns (hold, kv_transfer_params for the client)."""
        rid = request.request_id
        self._store_hits.pop(rid, None)
        params = _remote_params(request)
        if rid not in self._handled and params is not None:
            # A decoder request finished before its pull was planned: free the peer's copy.
            self._meta.releases.append(ReleaseOrder(_peer(params), params.remote_request_id))
        self._handled.discard(rid)
        if not block_ids or request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                                   RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: nothing to hand over or save
        saving = self._plan_save(request, block_ids)
        if not (request.kv_transfer_params or {}).get("do_remote_decode"):
            return saving, None
        self._meta.sends[rid] = self.s.transfer.lease_s
        out = KVTransferParams(
            remote_engine_id=self.engine_id, remote_request_id=rid,
            remote_host=self.s.side_channel_host, remote_port=self.s.side_channel_port,
            remote_block_ids=list(block_ids), remote_num_tokens=request.num_computed_tokens,
            remote_tp_size=self.tp_size,
        )
        return True, out.model_dump()

    def _plan_save(self, request: Request, block_ids: list[int]) -> bool:
        if self.store is None or not self.store.save:
            return False
        computed = min(request.num_prompt_tokens, request.num_computed_tokens)
        full = computed // self.chunk_tokens * self.chunk_tokens
        if not full:
            return False
        self._meta.store_saves.append(StoreSaveOrder(
            request.request_id, tuple(request.prompt_token_ids[:full]),
            tuple(block_ids[: full // self.block_size])))
        self._report_saved(request, full // self.block_size)
        return True

    def _report_saved(self, request: Request, num_blocks: int) -> None:
        """Publish the saved blocks (vLLM's hashes) as stored in the store tiers, so the
        gateway credits instances that can load them. Reported when the save is ordered: a
        request routed in the moment before it lands loads what is there, then recomputes."""
        hashes = request.block_hashes[:num_blocks]
        if len(hashes) < num_blocks:  # prefix caching off: vLLM computed no hashes
            return
        self._events.append(BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h in hashes], parent_block_hash=None,
            token_ids=list(request.prompt_token_ids[:num_blocks * self.block_size]),
            block_size=self.block_size, lora_id=None, medium=self._medium, lora_name=None))

    def take_events(self) -> list:
        events, self._events = self._events, []
        return events

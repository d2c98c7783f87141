"""Per-step orders from the connector's scheduler half to its worker halves (hot path:
dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class PeerAddress:
    engine_id: str
    host: str
    port: int  # side-channel port of the peer's TP rank 0; rank r listens on port + r
    tp_size: int = 1  # the peer's TP ranks (which hold which heads: disagg.tp_layout)


@dataclass(frozen=True, slots=True)
class RecvOrder:
    """Decoder: fill ``local_block_ids`` with the peer's ``remote_block_ids``."""

    request_id: str
    peer: PeerAddress
    remote_request_id: str
    local_block_ids: tuple[int, ...]
    remote_block_ids: tuple[int, ...]
    source: str = "peer"  # which KVLoader fills the blocks (loaders.py)
    # With a KV store: the prompt's token ids up to the last block loaded, and the index
    # of the first loaded block within the prompt, so a failed pull can fall back to the
    # store for the same blocks.
    token_ids: tuple[int, ...] = ()
    first_block: int = 0


@dataclass(frozen=True, slots=True)
class StoreLoadOrder:
    """Fill ``local_block_ids`` (prompt blocks ``first_block``, ``first_block + 1``, ...)
    from the KV store's chunks of ``token_ids``; blocks it does not hold are load errors."""

    request_id: str
    local_block_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    first_block: int
    source: str = "store"


@dataclass(frozen=True, slots=True)
class StoreSaveOrder:
    """Copy the full chunks of ``token_ids`` out of ``block_ids`` (the prompt's first
    blocks, in order) into the store; the blocks stay allocated until the copy is done."""

    request_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReleaseOrder:
    """Decoder: the peer's blocks for ``remote_request_id`` will not be read; free them."""

    peer: PeerAddress
    remote_request_id: str


@dataclass
class DisaggMetadata(KVConnectorMetadata):
    recvs: list[RecvOrder] = field(default_factory=list)
    releases: list[ReleaseOrder] = field(default_factory=list)
    # Prefill: requests whose blocks are held for a decoder, with their lease in seconds.
    sends: dict[str, float] = field(default_factory=dict)
    store_loads: list[StoreLoadOrder] = field(default_factory=list)
    store_saves: list[StoreSaveOrder] = field(default_factory=list)
    # This step runs no tokens: vLLM only polls the connector (e.g. a request waits for its
    # KV). The worker may then block briefly for its store jobs instead of spinning.
    idle: bool = False

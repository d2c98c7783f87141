"""Per-step orders from the connector's scheduler side to its workers (hot path: dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class PeerAddress:
    engine_id: str
    host: str
    port: int  # side-channel port of the peer's TP rank 0; rank r listens on port + r


@dataclass(frozen=True, slots=True)
class RecvOrder:
    """Decoder: fill ``local_block_ids`` with the peer's ``remote_block_ids``."""

    request_id: str
    peer: PeerAddress
    remote_request_id: str
    local_block_ids: tuple[int, ...]
    remote_block_ids: tuple[int, ...]
    source: str = "peer"  # which KVLoader fills the blocks (transfer/loaders.py)


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

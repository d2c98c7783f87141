"""Where a decoder's missing blocks come from: the seam between the connector and its sources.

A ``KVLoader`` fills local blocks named by ``RecvOrder``s, asynchronously, and is polled once
per engine step. The connector's worker half routes each order to the loader named by its
``source``: ``PeerLoader`` here (NIXL READs from the prefill instance) and ``StoreLoader``
(``disagg.transfer.store.io``: the CPU/disk/Redis tiers). A failed peer pull is retried against the
store before vLLM recomputes what is still missing.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from disagg.transfer.connector.metadata import PeerAddress, RecvOrder, StoreLoadOrder
from disagg.transfer.connector.stats import TransferStats, peer_key
from disagg.transfer.control import channel
from disagg.transfer.control.messages import Compat, HandshakeReply, HandshakeRequest
from disagg.transfer.nixl.endpoint import KVEndpoint, Read
from disagg.transfer.nixl.ucx_info import TransportReport

logger = logging.getLogger(__name__)

OrderT = TypeVar("OrderT", bound=RecvOrder | StoreLoadOrder)


@dataclass(slots=True)
class LoadResult:
    order: RecvOrder | StoreLoadOrder
    ok: bool
    reason: str = ""
    loaded_blocks: int = 0  # on failure: leading blocks that did load (kept, not recomputed)


class KVLoader(ABC, Generic[OrderT]):
    """Fills local KV blocks for orders (``OrderT``); never blocks the engine's step."""

    name: str

    @abstractmethod
    def start(self, order: OrderT) -> None:
        """Begin loading ``order``; called once per order, on the engine's thread."""

    @abstractmethod
    def poll(self) -> list[LoadResult]:
        """Orders finished (loaded or failed) since the last call; drives progress."""

    @property
    def busy(self) -> bool:
        """Orders started and not yet reported by ``poll``."""
        return False

    def close(self) -> None:
        return None


@dataclass(slots=True)
class _Pull:
    order: RecvOrder
    deadline: float
    started: float
    read: Read | None = None
    handshake: Future | None = None
    error: Exception | None = None  # raised while posting; reported by the next poll


class PeerLoader(KVLoader[RecvOrder]):
    """Pulls blocks from a prefill peer with NIXL READs, handshaking on first contact.

    All NIXL calls stay on the engine's thread; only the blocking side-channel handshake
    (authenticated with ``channel_key`` both ways; a reply that fails its checks fails the
    pull and counts ``side_channel_reply_rejected``) runs in a helper thread. A pull not
    done by ``timeout_s`` fails; the peer is then forgotten (the next pull handshakes
    again, e.g. with its restarted incarnation).
    """

    name = "peer"

    def __init__(self, endpoint: KVEndpoint, engine_id: str, tp_rank: int, compat: Compat,
                 handshake_timeout_s: float, timeout_s: float, stats: Callable[[], TransferStats],
                 pool: ThreadPoolExecutor, channel_key: bytes | None):
        self.endpoint, self.engine_id, self.tp_rank = endpoint, engine_id, tp_rank
        self._channel_key = channel_key  # authenticates the handshake (None: every pull fails)
        self.compat, self._stats, self._pool = compat, stats, pool
        self.handshake_timeout_s, self.timeout_s = handshake_timeout_s, timeout_s
        self._pulls: dict[str, _Pull] = {}
        self._ucx = TransportReport()
        self.transports: dict[str, str] = {}  # peer engine id -> what UCX reads it over

    def start(self, order: RecvOrder) -> None:
        now = time.monotonic()
        pull = _Pull(order, now + self.timeout_s, now)
        self._pulls[order.request_id] = pull
        try:
            self._advance(pull)
        except Exception as exc:  # e.g. NIXL_ERR_REMOTE_DISCONNECT from a dead peer: the
            pull.error = exc  # pull fails (recompute), never the engine step that posted it

    def _advance(self, pull: _Pull) -> None:
        """Post the READ once the peer is known, starting its handshake if needed."""
        peer_id = pull.order.peer.engine_id
        peer = self.endpoint.peer(peer_id)
        if peer is None:
            if pull.handshake is None:
                pull.handshake = self._pool.submit(self._handshake, pull.order.peer)
            if not pull.handshake.done():
                return
            peer = self.endpoint.add_peer(peer_id, pull.handshake.result())
            self._stats().add("kv_handshakes")
        o = pull.order
        pull.read = self.endpoint.start_read(
            peer, o.local_block_ids, o.remote_block_ids, o.remote_request_id.encode()
        )

    @property
    def busy(self) -> bool:
        return bool(self._pulls)

    def _handshake(self, addr: PeerAddress) -> HandshakeReply:
        req = HandshakeRequest(engine_id=self.engine_id, compat=self.compat)
        return channel.handshake(addr.host, addr.port + self.tp_rank, req,
                                 self.handshake_timeout_s, key=self._channel_key)

    def poll(self) -> list[LoadResult]:
        done: list[LoadResult] = []
        now = time.monotonic()
        for rid, pull in list(self._pulls.items()):
            try:
                state = self._state(pull, now)
            except Exception as exc:
                logger.warning("request %s: pull from %s failed: %s", rid,
                               pull.order.peer.engine_id, exc)
                if isinstance(exc, channel.AuthError):  # a forged reply, or another secret
                    self._stats().add("side_channel_reply_rejected")
                state, reason = "ERR", str(exc)
            else:
                reason = "" if state != "ERR" else "NIXL transfer error"
            if state == "PROC":
                continue
            del self._pulls[rid]
            if state == "DONE":
                self._count(pull, now)
            else:
                peer = pull.order.peer.engine_id
                self._stats().add(peer_key(peer, self._transport(peer), "failures"))
                self.transports.pop(peer, None)
                self.endpoint.forget_peer(peer)
            done.append(LoadResult(pull.order, state == "DONE", reason,
                                   len(pull.order.local_block_ids) if state == "DONE" else 0))
        return done

    def _state(self, pull: _Pull, now: float) -> str:
        if pull.error is not None:
            raise pull.error
        if pull.read is None:
            self._advance(pull)
        if pull.read is not None:
            state = self.endpoint.poll(pull.read)
            if state != "PROC":
                return state
        if now > pull.deadline:
            if pull.read is not None:
                self.endpoint.abandon(pull.read)
            raise TimeoutError(f"not done after {self.timeout_s}s")
        return "PROC"

    def _count(self, pull: _Pull, now: float) -> None:
        assert pull.read is not None
        s = self._stats()
        s.add("kv_bytes_received", pull.read.num_bytes)
        s.add("kv_blocks_received", len(pull.order.local_block_ids))
        s.add("kv_descriptors", pull.read.num_descriptors)
        s.add("kv_transfers_received")
        s.add("kv_transfer_seconds", now - pull.started)
        peer = pull.order.peer.engine_id
        transport = self._transport(peer)
        s.add(peer_key(peer, transport, "bytes"), pull.read.num_bytes)
        s.add(peer_key(peer, transport, "seconds"), now - pull.started)
        s.add(peer_key(peer, transport, "pulls"))

    def _transport(self, peer: str) -> str:
        """What UCX reads ``peer`` over: its report as of the first pull from it (UCX picks
        the protocol when the first READ goes out)."""
        if peer not in self.transports:
            transport = self._ucx.refresh()
            if transport == "unknown":
                return transport  # ask again next time
            self.transports[peer] = transport
            logger.info("KV from %s arrives over UCX %s", peer, transport)
        return self.transports[peer]

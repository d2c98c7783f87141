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
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from disagg.tp_layout import HeadSlice, contacts, expected_notices, heads_per_rank, read_plan
from disagg.transfer.connector.metadata import PeerAddress, RecvOrder, StoreLoadOrder
from disagg.transfer.connector.stats import TransferStats, peer_key
from disagg.transfer.control import channel
from disagg.transfer.control.messages import (
    Compat,
    HandshakeReply,
    HandshakeRequest,
    completion_notice,
)
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

    def flush_stats(self) -> None:
        """Add counts still held back (``PeerLoader`` counts a pull after reporting it)."""
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Route:
    """How this rank pulls from a prefill of one TP size (``disagg.tp_layout``), worked
    out once per size: a pull's fixed cost is all Python, and it counts at short prompts."""

    plan: tuple[HeadSlice, ...]  # what to read from which remote rank
    ranks: tuple[int, ...]  # remote ranks to notify when done
    notices: dict[int, int]  # remote rank -> completion notices it waits for per request
    whole: bool  # same heads per rank on both sides: a slice is the remote's whole blocks
    silent: tuple[int, ...]  # ranks in ``ranks`` read nothing from: notified without a READ


@dataclass(slots=True)
class _Pull:
    order: RecvOrder
    deadline: float
    started: float
    route: _Route | None  # None: the prefill's TP size cannot shard the heads (``error``)
    handshakes: dict[int, Future] = field(default_factory=dict)
    reads: list[Read] | None = None  # posted once every remote rank is known
    live: list[Read] = field(default_factory=list)  # posted and not yet DONE
    error: Exception | None = None  # raised while posting; reported by the next poll


def peer_rank_key(engine_id: str, rank: int) -> str:
    """The endpoint's name for one TP rank of a peer engine."""
    return f"{engine_id}/tp{rank}"


class PeerLoader(KVLoader[RecvOrder]):
    """Pulls blocks from a prefill peer with NIXL READs, handshaking on first contact.

    At equal TP sizes a rank reads its counterpart's whole blocks; otherwise it reads head
    slices from every prefill rank holding its heads (``disagg.tp_layout``), one handshake
    per remote rank. All NIXL calls stay on the engine's thread; only the blocking
    side-channel handshakes (authenticated with ``channel_key`` both ways; a reply that
    fails its checks fails the pull and counts ``side_channel_reply_rejected``) run in a
    helper thread. A pull not done by ``timeout_s`` fails; the peer is then forgotten (the
    next pull handshakes again, e.g. with its restarted incarnation).
    """

    name = "peer"
    COUNT_EVERY = 64  # finished pulls held for counting at most, when stats are not taken

    def __init__(self, endpoint: KVEndpoint, engine_id: str, tp_rank: int, compat: Compat,
                 handshake_timeout_s: float, timeout_s: float, stats: Callable[[], TransferStats],
                 pool: ThreadPoolExecutor, channel_key: bytes | None):
        self.endpoint, self.engine_id, self.tp_rank = endpoint, engine_id, tp_rank
        self._channel_key = channel_key  # authenticates the handshake (None: every pull fails)
        self.compat, self._stats, self._pool = compat, stats, pool
        self.handshake_timeout_s, self.timeout_s = handshake_timeout_s, timeout_s
        self._pulls: dict[str, _Pull] = {}
        self._routes: dict[int, _Route] = {}  # by the prefill's TP size
        self._uncounted: list[tuple[_Pull, float]] = []  # done, their stats not yet added
        self._ucx = TransportReport()
        self.transports: dict[str, str] = {}  # peer engine id -> what UCX reads it over

    def start(self, order: RecvOrder) -> None:
        now = time.monotonic()
        try:
            route = self._route(order.peer.tp_size)
        except ValueError as exc:  # a TP size that cannot shard the heads: recompute
            self._pulls[order.request_id] = _Pull(order, now + self.timeout_s, now, None,
                                                  error=exc)
            return
        pull = _Pull(order, now + self.timeout_s, now, route)
        self._pulls[order.request_id] = pull
        try:
            self._advance(pull)
        except Exception as exc:  # e.g. NIXL_ERR_REMOTE_DISCONNECT from a dead peer: the
            pull.error = exc  # pull fails (recompute), never the engine step that posted it

    def _route(self, remote_tp: int) -> _Route:
        route = self._routes.get(remote_tp)
        if route is None:
            k, d = self.compat.num_kv_heads, self.compat.tp_size
            ranks = contacts(k, remote_tp, d, self.tp_rank)
            plan = read_plan(k, remote_tp, d, self.tp_rank)
            route = _Route(plan, ranks, {r: expected_notices(k, remote_tp, d, r) for r in ranks},
                           heads_per_rank(k, remote_tp) == heads_per_rank(k, d),
                           tuple(sorted(set(ranks) - {hs.remote_rank for hs in plan})))
            self._routes[remote_tp] = route
        return route

    def _advance(self, pull: _Pull) -> None:
        """Post the READs once every remote rank is known, handshaking where needed."""
        o, route = pull.order, pull.route
        assert route is not None  # a pull without a route failed in ``start``
        peers = {}
        for rank in route.ranks:
            key = peer_rank_key(o.peer.engine_id, rank)
            peer = self.endpoint.peer(key)
            if peer is None:
                hs = pull.handshakes.get(rank)
                if hs is None:
                    pull.handshakes[rank] = self._pool.submit(self._handshake, o.peer, rank)
                    continue
                if not hs.done():
                    continue
                peer = self.endpoint.add_peer(key, hs.result())
                self._stats().add("kv_handshakes")
            peers[rank] = peer
        if len(peers) < len(route.ranks):
            return
        rid = o.remote_request_id
        pull.reads = [
            self.endpoint.start_read(peers[hs.remote_rank], o.local_block_ids,
                                     o.remote_block_ids,
                                     completion_notice(rid, route.notices[hs.remote_rank]),
                                     None if route.whole else hs)
            for hs in route.plan]
        pull.live = [r for r in pull.reads if not r.done]
        for rank in route.silent:  # read nothing there: free it
            self.endpoint.notify(peers[rank], completion_notice(rid, route.notices[rank]))

    @property
    def busy(self) -> bool:
        return bool(self._pulls)

    def flush_stats(self) -> None:
        """Count the pulls reported since the last call: a request's KV is reported ready
        without its bookkeeping on the way; vLLM takes stats once per step, after the
        model ran (``ConnectorWorker.take_stats``), and that call counts them."""
        for pull, at in self._uncounted:
            self._count(pull, at)
        self._uncounted.clear()

    def _handshake(self, addr: PeerAddress, rank: int) -> HandshakeReply:
        req = HandshakeRequest(engine_id=self.engine_id, compat=self.compat)
        return channel.handshake(addr.host, addr.port + rank, req,
                                 self.handshake_timeout_s, key=self._channel_key)

    def poll(self) -> list[LoadResult]:
        if len(self._uncounted) >= self.COUNT_EVERY:  # nobody takes stats: bound the list
            self.flush_stats()
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
                self._uncounted.append((pull, now))
            else:
                self._forget(pull)
            done.append(LoadResult(pull.order, state == "DONE", reason,
                                   len(pull.order.local_block_ids) if state == "DONE" else 0))
        return done

    def _forget(self, pull: _Pull) -> None:
        """A failed pull: drop every rank of its peer (the next pull handshakes again)."""
        peer = pull.order.peer.engine_id
        self._stats().add(peer_key(peer, self._transport(peer), "failures"))
        self.transports.pop(peer, None)
        for live in pull.live:
            self.endpoint.abandon(live)
        pull.live = []
        for rank in range(pull.order.peer.tp_size):
            self.endpoint.forget_peer(peer_rank_key(peer, rank))

    def _state(self, pull: _Pull, now: float) -> str:
        if pull.error is not None:
            raise pull.error
        if pull.reads is None:
            self._advance(pull)
        if pull.reads is not None:
            still = []
            for read in pull.live:
                state = self.endpoint.poll(read)
                if state == "ERR":
                    pull.live = [r for r in pull.live if r is not read]
                    return "ERR"
                if state == "PROC":
                    still.append(read)
            pull.live = still
            if not still:
                return "DONE"
        if now > pull.deadline:
            raise TimeoutError(f"not done after {self.timeout_s}s")
        return "PROC"

    def _count(self, pull: _Pull, now: float) -> None:
        assert pull.reads is not None
        s = self._stats()
        num_bytes = sum(r.num_bytes for r in pull.reads)
        s.add("kv_bytes_received", num_bytes)
        s.add("kv_blocks_received", len(pull.order.local_block_ids))
        s.add("kv_descriptors", sum(r.num_descriptors for r in pull.reads))
        s.add("kv_transfers_received")
        s.add("kv_transfer_seconds", now - pull.started)
        peer = pull.order.peer.engine_id
        transport = self._transport(peer)
        s.add(peer_key(peer, transport, "bytes"), num_bytes)
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

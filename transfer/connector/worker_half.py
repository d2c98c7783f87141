"""The connector's worker half, ``ConnectorWorker`` (one per vLLM worker process): serves its
KV to decoders, pulls KV from prefills, and moves chunks in and out of the KV store.

A decoder worker routes each load order to the loader named by its source (``loaders.py``:
NIXL ``PeerLoader``; ``disagg.transfer.store.io.StoreLoader``). A request is reported
received once all its orders finished. A failed peer pull sends an abort notice (the peer
frees its copy at once) and is retried against the store; blocks still missing become load
errors, which vLLM recomputes.

Every side-channel message, both ways, is authenticated with the deployment's channel key
(``disagg.credentials.channel_key_from_env``, or the ``channel_key`` argument): a worker
without one fails closed (its side channel rejects everything, its pulls fail and are
recomputed) and says so once, at ``register``.

A finished request's blocks stay held while anything still reads them: a decoder's pull
(until its READ notification names the request, an abort notice arrives, or the lease runs
out) and the store save (until its copy is done). get_finished then reports it sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from disagg.config import ConnectorConfig, StoreConfig
from disagg.credentials import SECRET_ENV, channel_key_from_env
from disagg.tp_layout import contacts, rank_heads
from disagg.transfer.connector.loaders import KVLoader, LoadResult, PeerLoader
from disagg.transfer.connector.metadata import (
    DisaggMetadata,
    RecvOrder,
    ReleaseOrder,
    StoreLoadOrder,
)
from disagg.transfer.connector.stats import TIER_FIELDS, TransferStats
from disagg.transfer.control import channel
from disagg.transfer.control.messages import (
    PROTOCOL_VERSION,
    AbortNotice,
    Compat,
    HandshakeReply,
    decode_message,
    parse_notice,
)
from disagg.transfer.nixl.endpoint import KVEndpoint
from disagg.transfer.store import TieredStore
from disagg.transfer.store.lookup import LookupServer

if TYPE_CHECKING:
    from disagg.transfer.store.io import StoreSaver

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02  # longest an idle step blocks on the store (see _wait_if_idle)
STORE_THREADS = 2  # store loads and saves run at once


def _touch(kv_caches: list[torch.Tensor]) -> None:
    """Fault in host KV memory now, before any request: vLLM's CPU cache is allocated but
    untouched, so the first pull or store load into a block otherwise pays a page fault per
    4 KiB on the request's path (in a VM: 70 ms for an 8K-token prompt of ``small``, as long
    as the load itself). Every byte is written back unchanged (adding 0 to its bits), so
    whatever the cache holds stays; GPU memory needs no touching."""
    seen: set[int] = set()
    for t in kv_caches:
        if t.is_cuda or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        torch.zeros(0, dtype=torch.uint8).set_(t.untyped_storage()).add_(0)


def _channel_key_from_env() -> bytes | None:
    try:
        return channel_key_from_env()
    except ValueError:  # not hex: no key (register() says the secret is missing)
        logger.error("%s is not a hex string; ignoring it", SECRET_ENV)
        return None


class _LockedStats:
    """What store threads count through: never into a TransferStats already handed over."""

    def __init__(self, worker: ConnectorWorker):
        self._w = worker

    def add(self, name: str, value: float = 1) -> None:
        with self._w._stats_lock:
            self._w.stats.add(name, value)


class ConnectorWorker:
    """One per vLLM worker process; owns a NIXL endpoint and a side-channel server."""

    def __init__(self, config: ConnectorConfig, engine_id: str, tp_rank: int, compat: Compat,
                 model_id: str = "", channel_key: bytes | None = None):
        """``channel_key``: the side channel's HMAC key; None takes the deployment's from the
        environment (``DISAGG_DEPLOYMENT_SECRET``). Tests and benchmarks pass one."""
        self.s = config
        self.channel_key: bytes | None = channel_key or _channel_key_from_env()
        # A store section with ``enabled: false`` is no store.
        self.store_config: StoreConfig | None = (
            config.store if config.store is not None and config.store.enabled else None)
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.compat = compat
        self.model_id = model_id
        self.stats = TransferStats()
        self._stats_lock = threading.Lock()
        self._locked_stats = _LockedStats(self)
        self._lookup: LookupServer | None = None
        self._tier_totals: dict[str, dict[str, float]] = {}
        self.endpoint: KVEndpoint | None = None
        self._server: channel.SideChannelServer | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="disagg-hs")
        self.loaders: dict[str, KVLoader[Any]] = {}  # by RecvOrder.source
        self._load_errors: set[int] = set()
        self._pending: dict[str, int] = {}  # request id -> load orders not finished yet
        self._sends: dict[str, float] = {}  # request id -> lease deadline
        self._holds: dict[str, set[str]] = {}  # request id -> {"peer", "save"} still reading
        self.store: TieredStore | None = None  # when the config names one (``_attach_store``)
        self.saver: StoreSaver | None = None
        self._store_pool: ThreadPoolExecutor | None = None
        self._early_done: set[str] = set()  # notified before the send order arrived
        self._notices: dict[str, int] = {}  # request id -> completion notices so far
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._idle = False  # this step runs no tokens (DisaggMetadata.idle)
        self._store_done = threading.Event()  # a store load or save ended

    # ---- set-up ---------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        """Register KV memory with NIXL and open the side channel (port + tp_rank)."""
        tensors = list(kv_caches.values())
        _touch(tensors)
        name = f"{self.engine_id}-tp{self.tp_rank}"
        tc = self.s.transfer
        self.endpoint = KVEndpoint(name, tensors, num_blocks, tc.backends)
        self.loaders["peer"] = PeerLoader(
            self.endpoint, self.engine_id, self.tp_rank, self.compat,
            tc.handshake_timeout_s, tc.transfer_timeout_s, lambda: self.stats,
            self._pool, self.channel_key)
        if self.store_config is not None:
            self._attach_store(tensors, self.store_config)
        port = self.s.side_channel_port + self.tp_rank if self.s.side_channel_port else 0
        if self.channel_key is None:
            logger.error(
                "engine %s rank %d: the deployment secret is missing (%s is unset or not hex "
                "in this engine's environment): the side channel rejects every message, so no "
                "decoder can pull KV from this worker and this worker pulls from no prefill "
                "(requests are recomputed). Launch engines through disagg, or set it.",
                self.engine_id, self.tp_rank, SECRET_ENV)
        self._server = channel.SideChannelServer(
            self.s.side_channel_bind or self.s.side_channel_host, port, self._on_message,
            key=self.channel_key, name=f"disagg-sc-{name}", on_reject=self._count_rejected,
        )
        logger.info("engine %s rank %d: %d KV planes registered, side channel %s:%d",
                    self.engine_id, self.tp_rank, len(self.endpoint.planes),
                    self.s.side_channel_host, self._server.port)

    def _attach_store(self, tensors: list[torch.Tensor], st: StoreConfig) -> None:
        # Imported here: only a worker with a store needs the copy kernels (Triton on CUDA).
        from disagg.kernels import KVLayout
        from disagg.transfer.store.io import (
            ChunkCodec,
            StoreLoader,
            StoreSaver,
            build_store,
            fingerprint,
        )

        layout = KVLayout.CUDA if tensors[0].is_cuda else KVLayout.CPU
        fp = fingerprint(self.compat, layout, self.model_id)
        heads = rank_heads(self.compat.num_kv_heads, self.compat.tp_size, self.tp_rank)
        codec = ChunkCodec(tensors, self.compat.block_size, st.chunk_tokens, fp, heads)
        self.store = store = build_store(st)
        self._store_pool = ThreadPoolExecutor(max_workers=STORE_THREADS,
                                              thread_name_prefix="disagg-store")
        stats = lambda: self._locked_stats  # noqa: E731  # store threads count under a lock
        self.loaders["store"] = StoreLoader(store, codec, stats, self._store_pool,
                                            self._store_done, threads=STORE_THREADS)
        self.saver = StoreSaver(store, codec, stats, self._store_pool, self._store_done)
        if self.tp_rank == 0:  # the scheduler asks rank 0 what the store holds
            self._lookup = LookupServer(self.engine_id, store, codec.flat_keys,
                                        self._count_lookup, per_chunk=codec.num_heads)
        logger.info("engine %s rank %d: KV store %s, %d-token chunks", self.engine_id,
                    self.tp_rank, [t.name for t in store.tiers], codec.chunk_tokens)

    def _count_rejected(self, reason: str) -> None:
        """The side channel's thread: a message it rejected (``channel.REJECT_REASONS``)."""
        self._locked_stats.add("side_channel_rejected")
        self._locked_stats.add(f"side_channel_rejected_{reason}")

    def _count_lookup(self, num_keys: int, hits: int) -> None:
        self._locked_stats.add("store_lookups")
        self._locked_stats.add("store_lookup_chunks", num_keys)
        self._locked_stats.add("store_hit_chunks", hits)

    def _on_message(self, raw: bytes) -> HandshakeReply | AbortNotice:
        msg = decode_message(raw)
        if msg.version != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {msg.version}, ours is {PROTOCOL_VERSION}")
        if isinstance(msg, AbortNotice):
            for rid in msg.request_ids:
                self._aborts.put(rid)
            return msg
        problem = self.compat.mismatch(msg.compat)
        if problem:
            raise ValueError(f"incompatible KV layout from {msg.engine_id}: {problem}")
        assert self.endpoint is not None
        return HandshakeReply(
            engine_id=self.engine_id, agent_name=self.endpoint.name,
            agent_metadata=self.endpoint.metadata(), planes=self.endpoint.plane_infos(),
        )

    # ---- per step ---------------------------------------------------------------------------
    def start(self, meta: DisaggMetadata) -> None:
        """Take this step's orders: new loads, releases, and held sends."""
        self._idle = meta.idle
        now = time.monotonic()
        for rid, lease_s in meta.sends.items():
            self._sends[rid] = now + lease_s
        if meta.sends and self.endpoint is not None:
            self.endpoint.expect_notifications(True)
        for rid in meta.sends:
            self._holds.setdefault(rid, set()).add("peer")
        for rel in meta.releases:
            self._pool.submit(self._send_abort, rel)
        orders: list[RecvOrder | StoreLoadOrder] = [*meta.recvs, *meta.store_loads]
        for order in orders:
            self._pending[order.request_id] = self._pending.get(order.request_id, 0) + 1
            self.loaders[order.source].start(order)
        for save in meta.store_saves:
            if self.saver is None:
                continue
            self._holds.setdefault(save.request_id, set()).add("save")
            self.saver.start(save)

    def _send_abort(self, rel: ReleaseOrder) -> None:
        """Tell every prefill rank this rank would have notified to free the blocks."""
        try:
            ranks = contacts(self.compat.num_kv_heads, rel.peer.tp_size, self.compat.tp_size,
                             self.tp_rank)
        except ValueError as exc:  # a TP size that cannot shard the heads: its lease frees
            logger.warning("abort notice for %s: %s", rel.remote_request_id, exc)
            return
        for rank in ranks:
            try:
                channel.request(rel.peer.host, rel.peer.port + rank,
                                AbortNotice(request_ids=[rel.remote_request_id]),
                                self.s.transfer.handshake_timeout_s, key=self.channel_key)
            except channel.ControlError as exc:  # the peer's lease frees the blocks anyway
                if isinstance(exc, channel.AuthError):
                    self._locked_stats.add("side_channel_reply_rejected")
                logger.warning("abort notice for %s to %s rank %d failed: %s",
                               rel.remote_request_id, rel.peer.engine_id, rank, exc)

    def finished(self) -> tuple[set[str], set[str]]:
        """(done sending, done receiving) since the last call; drives NIXL progress."""
        self._wait_if_idle()
        return self._finished_sends(), self._finished_loads()

    def _wait_if_idle(self) -> None:
        """On a step that runs no tokens while store jobs are under way (and no peer pull,
        which this thread's polls drive), block until one ends, at most ``IDLE_WAIT_S``.

        vLLM calls back at once otherwise: a request waiting for its KV makes the engine
        loop spin through empty steps, and on a CPU engine that loop holds the core and the
        GIL the store's copy threads need (an 8K-token disk load measured N x slower).
        A request arriving meanwhile is scheduled at most ``IDLE_WAIT_S`` later."""
        store_busy = self.saver is not None and (
            self.saver.busy or self.loaders["store"].busy)
        if not (self._idle and store_busy) or self.loaders["peer"].busy:
            return
        self._store_done.wait(IDLE_WAIT_S)
        self._store_done.clear()  # a job ending after this is seen by the polls below

    def _finished_loads(self) -> set[str]:
        done: set[str] = set()
        for loader in list(self.loaders.values()):
            for result in loader.poll():
                rid = result.order.request_id
                if not result.ok:
                    self._fail(result)
                self._pending[rid] -= 1
                if self._pending[rid] == 0:
                    del self._pending[rid]
                    done.add(rid)
        return done

    def _fail(self, result: LoadResult) -> None:
        """Free the peer's copy; retry a failed pull against the store; whatever is still
        missing becomes load errors (vLLM recomputes from the first of them)."""
        order = result.order
        if isinstance(order, RecvOrder):
            self.stats.add("kv_transfer_failures")
            self._pool.submit(self._send_abort,
                              ReleaseOrder(order.peer, order.remote_request_id))
            if order.token_ids and "store" in self.loaders:
                self.stats.add("store_fallbacks")
                self._pending[order.request_id] += 1
                self.loaders["store"].start(StoreLoadOrder(
                    order.request_id, order.local_block_ids, order.token_ids,
                    order.first_block))
                return
        self._load_errors.update(order.local_block_ids[result.loaded_blocks:])

    def _finished_sends(self) -> set[str]:
        done: set[str] = set()
        if self.endpoint is None:
            return done
        notified = self._counted_notices()
        if not (notified or self._sends or self._early_done or self.saver is not None
                or not self._aborts.empty()):  # a decoder's step: nothing held, nothing due
            self.endpoint.expect_notifications(False)
            return done
        while not self._aborts.empty():
            rid = self._aborts.get()
            notified.add(rid)
            self.stats.add("kv_sends_aborted")
        for rid in notified | self._early_done:
            if self._sends.pop(rid, None) is not None:
                self._release(rid, "peer", done)
                self.stats.add("kv_sends_completed")
                self._early_done.discard(rid)
            else:
                self._early_done.add(rid)
        now = time.monotonic()
        for rid, deadline in list(self._sends.items()):
            if now > deadline:
                del self._sends[rid]
                self._release(rid, "peer", done)
                self.stats.add("kv_sends_expired")
                logger.warning("request %s: lease expired, blocks freed unread", rid)
        if self.saver is not None:
            for rid in self.saver.poll():
                self._release(rid, "save", done)
        self.endpoint.expect_notifications(bool(self._sends))
        # Notices for requests that never become sends (aborted on this side) must not pile up.
        if len(self._early_done) > 10_000:
            self._early_done.clear()
        return done

    def _counted_notices(self) -> set[str]:
        """Requests whose completion notices are all in (one per decode rank reading from
        this rank: ``messages.parse_notice``)."""
        assert self.endpoint is not None
        complete: set[str] = set()
        for raw in self.endpoint.notifications():
            rid, expected = parse_notice(raw)
            got = self._notices.get(rid, 0) + 1
            if got < expected:
                self._notices[rid] = got
                continue
            self._notices.pop(rid, None)
            complete.add(rid)
        if len(self._notices) > 10_000:  # partial counts of requests long gone
            self._notices.clear()
        return complete

    def _release(self, rid: str, reader: str, done: set[str]) -> None:
        holds = self._holds.get(rid)
        if holds is None:
            return
        holds.discard(reader)
        if not holds:
            del self._holds[rid]
            done.add(rid)

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> TransferStats | None:
        for loader in self.loaders.values():
            loader.flush_stats()
        with self._stats_lock:
            out, self.stats = self.stats, TransferStats()
        if self.store is not None:
            self._add_tier_deltas(out, self.store)
        return None if out.is_empty() else out

    def _add_tier_deltas(self, out: TransferStats, store: TieredStore) -> None:
        """Per-tier counters: the store keeps running totals; vLLM wants increments."""
        for tier in store.stats().tiers:
            prev = self._tier_totals.get(tier.name, {})
            now = {f: getattr(tier, f) for f in TIER_FIELDS}
            for f, v in now.items():
                if v != prev.get(f, 0):
                    out.add(f"store_{tier.name}_{f}", v - prev.get(f, 0))
            self._tier_totals[tier.name] = now

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()
        if self._lookup is not None:
            self._lookup.close()
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()
        if self._server is not None:
            self._server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.endpoint is not None:
            self.endpoint.close()

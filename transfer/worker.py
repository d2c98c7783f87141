"""Worker side of the connector: serves its KV to decoders, pulls KV from prefills.

A decoder worker routes each RecvOrder to the loader named by its source (``loaders.py``:
today the NIXL ``PeerLoader``); get_finished polls every loader: a finished load is reported
received, a failed one also as load errors (vLLM recomputes those blocks) plus an abort
notice so the peer frees its copy at once.

A prefill worker keeps each finished request's blocks until the decoder's READ notification
names it, an abort notice arrives, or its lease runs out; then get_finished reports it sent.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from disagg.transfer import control
from disagg.transfer.endpoint import KVEndpoint
from disagg.transfer.loaders import KVLoader, PeerLoader
from disagg.transfer.metadata import DisaggMetadata, RecvOrder, ReleaseOrder
from disagg.transfer.protocol import (
    PROTOCOL_VERSION,
    AbortNotice,
    Compat,
    HandshakeReply,
    decode_message,
)
from disagg.transfer.settings import ConnectorSettings
from disagg.transfer.stats import TransferStats

logger = logging.getLogger(__name__)


class DisaggWorker:
    """One per vLLM worker process; owns a NIXL endpoint and a side-channel server."""

    def __init__(self, settings: ConnectorSettings, engine_id: str, tp_rank: int, compat: Compat):
        self.s = settings
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.compat = compat
        self.stats = TransferStats()
        self.endpoint: KVEndpoint | None = None
        self._server: control.SideChannelServer | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="disagg-hs")
        self.loaders: dict[str, KVLoader] = {}  # by RecvOrder.source
        self._load_errors: set[int] = set()
        self._sends: dict[str, float] = {}  # request id -> lease deadline
        self._early_done: set[str] = set()  # notified before the send order arrived
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()

    # ---- set-up ---------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        """Register KV memory with NIXL and open the side channel (port + tp_rank)."""
        tensors = list(kv_caches.values())
        name = f"{self.engine_id}-tp{self.tp_rank}"
        self.endpoint = KVEndpoint(name, tensors, num_blocks, self.s.backends)
        self.loaders["peer"] = PeerLoader(
            self.endpoint, self.engine_id, self.tp_rank, self.compat,
            self.s.handshake_timeout_s, self.s.transfer_timeout_s, lambda: self.stats,
            self._pool)
        port = self.s.side_channel_port + self.tp_rank if self.s.side_channel_port else 0
        self._server = control.SideChannelServer(
            self.s.side_channel_bind, port, self._on_message, name=f"disagg-sc-{name}"
        )
        logger.info("engine %s rank %d: %d KV planes registered, side channel %s:%d",
                    self.engine_id, self.tp_rank, len(self.endpoint.planes),
                    self.s.side_channel_host, self._server.port)

    def _on_message(self, raw: bytes):
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
        now = time.monotonic()
        for rid, lease_s in meta.sends.items():
            self._sends[rid] = now + lease_s
        if meta.sends and self.endpoint is not None:
            self.endpoint.expect_notifications(True)
        for rel in meta.releases:
            self._pool.submit(self._send_abort, rel)
        for order in meta.recvs:
            self.loaders[order.source].start(order)

    def _send_abort(self, rel: ReleaseOrder) -> None:
        try:
            control.request(rel.peer.host, rel.peer.port + self.tp_rank,
                            AbortNotice(request_ids=[rel.remote_request_id]),
                            self.s.handshake_timeout_s)
        except control.ControlError as exc:  # the peer's lease frees the blocks anyway
            logger.warning("abort notice for %s to %s failed: %s",
                           rel.remote_request_id, rel.peer.engine_id, exc)

    def finished(self) -> tuple[set[str], set[str]]:
        """(done sending, done receiving) since the last call; drives NIXL progress."""
        return self._finished_sends(), self._finished_loads()

    def _finished_loads(self) -> set[str]:
        done: set[str] = set()
        for loader in self.loaders.values():
            for result in loader.poll():
                done.add(result.order.request_id)
                if not result.ok:
                    self._fail(result.order)
        return done

    def _fail(self, order: RecvOrder) -> None:
        """Report the blocks as load errors (vLLM recomputes them) and free the peer's."""
        self.stats.add("kv_transfer_failures")
        self._load_errors.update(order.local_block_ids)
        self._pool.submit(self._send_abort, ReleaseOrder(order.peer, order.remote_request_id))

    def _finished_sends(self) -> set[str]:
        done: set[str] = set()
        if self.endpoint is None:
            return done
        notified = {m.decode() for m in self.endpoint.notifications()}
        while not self._aborts.empty():
            rid = self._aborts.get()
            notified.add(rid)
            self.stats.add("kv_sends_aborted")
        for rid in notified | self._early_done:
            if self._sends.pop(rid, None) is not None:
                done.add(rid)
                self.stats.add("kv_sends_completed")
                self._early_done.discard(rid)
            else:
                self._early_done.add(rid)
        now = time.monotonic()
        for rid, deadline in list(self._sends.items()):
            if now > deadline:
                del self._sends[rid]
                done.add(rid)
                self.stats.add("kv_sends_expired")
                logger.warning("request %s: lease expired, blocks freed unread", rid)
        self.endpoint.expect_notifications(bool(self._sends))
        # Notices for requests that never become sends (aborted on this side) must not pile up.
        if len(self._early_done) > 10_000:
            self._early_done.clear()
        return done

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> TransferStats | None:
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, TransferStats()
        return out

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()
        if self._server is not None:
            self._server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.endpoint is not None:
            self.endpoint.close()

"""Connector counters, carried from workers to vLLM's Prometheus endpoint.

Workers accumulate ``TransferStats``; vLLM collects them each step
(``get_kv_connector_stats``), aggregates across workers, and calls ``DisaggPromMetrics
.observe`` in the API server process, where they appear on the instance's ``/metrics`` as
``vllm:disagg_*`` counters. Counters, not logs, are what tests assert on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

# name -> help; every field is a monotonically increasing count summed across workers.
COUNTERS: dict[str, str] = {
    "kv_bytes_received": "KV bytes pulled from prefill instances over NIXL.",
    "kv_blocks_received": "KV blocks pulled from prefill instances.",
    "kv_transfers_received": "Completed KV pulls (requests).",
    "kv_transfer_seconds": "Seconds spent in KV pulls, start to completion.",
    "kv_descriptors": "NIXL descriptors issued for KV pulls (after coalescing).",
    "kv_transfer_failures": "KV pulls that failed or timed out (the decoder recomputed).",
    "kv_handshakes": "Completed side-channel handshakes with prefill workers.",
    "kv_sends_completed": "Prefill requests whose blocks a decoder read (notified).",
    "kv_sends_aborted": "Prefill requests freed early by a decoder's abort notice.",
    "kv_sends_expired": "Prefill requests whose blocks were freed when their lease expired.",
    "side_channel_rejected": "Side-channel messages rejected, any reason (split by the "
                             "side_channel_rejected_<reason> counters).",
    "side_channel_rejected_no_key": "Side-channel messages rejected: this worker has no "
                                    "channel key (deployment secret missing).",
    "side_channel_rejected_malformed": "Side-channel messages rejected: wrong frames or not "
                                       "an envelope.",
    "side_channel_rejected_too_large": "Side-channel messages rejected: over the size cap.",
    "side_channel_rejected_version": "Side-channel messages rejected: another protocol "
                                     "version.",
    "side_channel_rejected_bad_mac": "Side-channel messages rejected: authentication failed "
                                     "(forged, or another deployment secret).",
    "side_channel_rejected_stale": "Side-channel messages rejected: timestamp outside the "
                                   "window.",
    "side_channel_rejected_replay": "Side-channel messages rejected: nonce already seen "
                                    "(replayed).",
    "side_channel_reply_rejected": "Side-channel replies this worker rejected (failed "
                                   "authentication: forged, or another deployment secret).",
    "store_lookups": "KV store lookups the scheduler made (one per new request).",
    "store_lookup_chunks": "Chunks asked about by store lookups.",
    "store_hit_chunks": "Leading chunks the store held at lookup.",
    "store_loaded_tokens": "Prompt tokens loaded from the KV store instead of computed.",
    "store_load_bytes": "Bytes loaded from the KV store into the KV cache.",
    "store_load_seconds": "Seconds spent loading from the KV store, order to completion.",
    "store_fallbacks": "Failed peer pulls retried against the KV store.",
    "store_saved_chunks": "Chunks saved into the KV store.",
    "store_saved_bytes": "Bytes saved into the KV store.",
    "store_save_seconds": "Seconds spent saving requests' chunks, order to completion.",
    "store_save_failures": "Saves that failed (the request's chunks were not stored).",
}
# Per-tier running totals of disagg.transfer.store.TierStats, exported as increments.
TIER_FIELDS = ("lookups", "hits", "load_hits", "load_bytes", "load_seconds", "saves",
               "saved_bytes", "save_seconds", "evicted_bytes", "errors", "save_errors",
               "skipped", "corrupt", "breaker_open")
TIER_HELP = {"lookups": "keys looked up", "hits": "lookups this tier answered",
             "load_hits": "chunks loaded from this tier", "load_bytes": "bytes loaded",
             "load_seconds": "seconds loading", "saves": "chunks written",
             "saved_bytes": "bytes written", "save_seconds": "seconds writing",
             "evicted_bytes": "bytes evicted to stay under the cap",
             "errors": "I/O errors (handled as misses or skipped writes)",
             "save_errors": "writes that failed (e.g. disk full), of the errors",
             "skipped": "calls not made while the tier's circuit breaker was open",
             "corrupt": "entries that failed their checksum (misses, dropped)",
             "breaker_open": "times the circuit breaker opened (tier bypassed)"}
for _tier in ("cpu", "disk", "redis"):
    for _f, _doc in TIER_HELP.items():
        COUNTERS[f"store_{_tier}_{_f}"] = f"KV store {_tier} tier: {_doc}."


# Per peer pair: keys "peer|<prefill engine id>|<UCX transport>|<field>" in the stats, one
# ``vllm:disagg_kv_peer_<field>`` counter with labels peer and transport on /metrics.
PEER_FIELDS = {"bytes": "KV bytes pulled from one prefill peer, by the transport UCX chose.",
               "seconds": "Seconds spent pulling from one prefill peer, start to completion.",
               "pulls": "Completed KV pulls from one prefill peer.",
               "failures": "KV pulls from one prefill peer that failed or timed out."}


def peer_key(peer: str, transport: str, field: str) -> str:
    return f"peer|{peer}|{transport}|{field}"


class StatsSink(Protocol):
    """What counters are added to: a ``TransferStats``, or a lock around one."""

    def add(self, name: str, value: float = 1) -> None: ...


@dataclass
class TransferStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def add(self, name: str, value: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> TransferStats:
        for k, v in other.data.items():
            self.add(k, v)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if v}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class DisaggPromMetrics(KVConnectorPromMetrics):
    """Registers one ``vllm:disagg_<name>`` counter per entry of ``COUNTERS``."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(
                    name=f"vllm:disagg_{name}", documentation=doc, labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self._engine_labels = per_engine_labelvalues
        self._peer = {f: self._counter_cls(name=f"vllm:disagg_kv_peer_{f}", documentation=doc,
                                           labelnames=[*labelnames, "peer", "transport"])
                      for f, doc in PEER_FIELDS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if not value:
                continue
            if name in self._counters:
                self._counters[name][engine_idx].inc(value)
            elif name.startswith("peer|"):
                _, peer, transport, f = name.split("|", 3)
                if f in self._peer:
                    self._peer[f].labels(*self._engine_labels[engine_idx], peer,
                                         transport).inc(value)

"""The connector's worker half without vLLM: two ConnectorWorkers on real NIXL in one process.

Covers the states a pull can end in (read, peer gone, timeout) and the prefill side's
release paths (notification, abort notice, lease expiry), as counted in TransferStats.
"""

from __future__ import annotations

import time

import torch

from disagg.config import ConnectorConfig, StoreConfig, TransferConfig
from disagg.transfer.connector.metadata import (
    DisaggMetadata,
    PeerAddress,
    RecvOrder,
    ReleaseOrder,
)
from disagg.transfer.connector.worker_half import ConnectorWorker
from disagg.transfer.control.messages import Compat

NB, LAYERS = 16, 2


def connector_config(store: StoreConfig | None = None, **fields) -> ConnectorConfig:
    """A ConnectorConfig from flat keyword arguments: ``TransferConfig`` fields (lease_s,
    handshake_timeout_s, ...) go into its ``transfer`` section, the rest to the top level."""
    transfer = {k: fields.pop(k) for k in list(fields) if k in TransferConfig.model_fields}
    return ConnectorConfig(transfer=TransferConfig(**transfer), store=store, **fields)


def _worker(name: str, fill: bool, **fields) -> tuple[ConnectorWorker, list[torch.Tensor]]:
    caches = [(torch.randn if fill else torch.zeros)(NB, 2, 16, 32).to(torch.bfloat16)
              for _ in range(LAYERS)]
    compat = Compat(model="m", dtype="bfloat16", block_size=16, num_layers=LAYERS,
                    plane_bytes=[caches[0][0].numel() * 2] * LAYERS)
    w = ConnectorWorker(connector_config(**fields), name, 0, compat)
    w.register({f"l{i}": t for i, t in enumerate(caches)}, NB)
    return w, caches


def _step_until(workers, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    results = {w: (set(), set()) for w in workers}
    while time.monotonic() < deadline:
        for w in workers:
            sent, recv = w.finished()
            results[w][0].update(sent)
            results[w][1].update(recv)
        if cond(results):
            return results
        time.sleep(0.005)
    raise AssertionError(f"condition not met: {results}")


def test_pull_then_notification_frees_the_prefill_blocks():
    p, src = _worker("p", True, lease_s=60)
    d, dst = _worker("d", False)
    try:
        p.start(DisaggMetadata(sends={"preq": 60.0}))
        order = RecvOrder("dreq", PeerAddress("p", "127.0.0.1", p._server.port), "preq",
                          (5, 6, 7), (0, 1, 2))
        d.start(DisaggMetadata(recvs=[order]))
        res = _step_until([p, d], lambda r: "dreq" in r[d][1] and "preq" in r[p][0])
        assert not d.load_errors()
        for s, t in zip(src, dst, strict=True):
            assert torch.equal(t[5:8], s[0:3])
        stats = d.take_stats().data
        assert stats["kv_transfers_received"] == 1 and stats["kv_blocks_received"] == 3
        assert stats["kv_descriptors"] == LAYERS  # one coalesced run per layer
        assert stats["kv_bytes_received"] == 3 * LAYERS * src[0][0].numel() * 2
        assert p.take_stats().data["kv_sends_completed"] == 1
        assert res[p][0] == {"preq"}
    finally:
        d.close()
        p.close()


def test_pull_from_a_dead_peer_fails_fast_and_reports_load_errors():
    d, _ = _worker("d2", False, handshake_timeout_s=0.5, transfer_timeout_s=5)
    try:
        order = RecvOrder("r", PeerAddress("gone", "127.0.0.1", 1), "x", (1, 2), (3, 4))
        d.start(DisaggMetadata(recvs=[order]))
        t0 = time.monotonic()
        _step_until([d], lambda r: "r" in r[d][1])
        assert time.monotonic() - t0 < 5
        assert d.load_errors() == {1, 2}
        assert d.take_stats().data["kv_transfer_failures"] == 1
    finally:
        d.close()


def test_abort_notice_and_lease_expiry_free_held_blocks():
    p, _ = _worker("p3", True)
    d, _ = _worker("d3", False)
    try:
        p.start(DisaggMetadata(sends={"keep": 60.0, "short": 0.2}))
        # The decoder found everything in its own cache: it releases the peer's copy.
        d.start(DisaggMetadata(releases=[ReleaseOrder(
            PeerAddress("p3", "127.0.0.1", p._server.port), "keep")]))
        res = _step_until([p], lambda r: {"keep", "short"} <= r[p][0])
        assert res[p][0] == {"keep", "short"}
        stats = p.take_stats().data
        assert stats["kv_sends_aborted"] == 1 and stats["kv_sends_expired"] == 1
    finally:
        d.close()
        p.close()

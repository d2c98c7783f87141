"""Prefill and decode at different TP sizes: ConnectorWorkers (one per TP rank) on real NIXL
in one process, each decode rank reading its KV head slices from the right prefill ranks.

The model's KV is one "global" cache per layer holding every head; a rank of a TP-t
instance holds the heads ``tp_layout.rank_heads`` gives it, as vLLM shards them. After a
pull, each decode rank's blocks must equal the global cache's blocks restricted to its
heads, and every prefill rank must have freed its blocks (counted completion notices).
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from disagg.config import ConnectorConfig, TransferConfig
from disagg.instance import free_run
from disagg.tp_layout import rank_heads
from disagg.transfer.connector.metadata import DisaggMetadata, PeerAddress, RecvOrder
from disagg.transfer.connector.worker_half import ConnectorWorker
from disagg.transfer.control.messages import Compat
from disagg.transfer.nixl.layout import planes_of

NB, LAYERS, BS, HD = 12, 2, 4, 8
KEY = b"test side-channel key, 32 bytes!"


def _rank_cache(global_cache: torch.Tensor, heads: range, layout: str) -> torch.Tensor:
    """This rank's share of a layer, laid out as vLLM allocates it."""
    if layout == "cpu":  # [NB, H, BS, 2 * HD]
        return global_cache[:, heads.start:heads.stop].contiguous()
    # CUDA shapes [2, NB, BS, H, HD]: HND allocates [2, NB, H, BS, HD] and permutes it
    part = global_cache[:, :, :, heads.start:heads.stop]
    if layout == "hnd":
        return part.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    return part.contiguous()


def _global(k: int, layout: str) -> list[torch.Tensor]:
    shape = (NB, k, BS, 2 * HD) if layout == "cpu" else (2, NB, BS, k, HD)
    return [torch.randn(shape, dtype=torch.float32) for _ in range(LAYERS)]


def _instance(name: str, k: int, tp: int, layout: str, base: int,
              source: list[torch.Tensor] | None) -> list[tuple[ConnectorWorker, list]]:
    """One worker per rank; a prefill (``source`` given) holds its share of ``source``."""
    out = []
    cfg = ConnectorConfig(side_channel_host="127.0.0.1", side_channel_port=base,
                          transfer=TransferConfig(lease_s=60, handshake_timeout_s=2,
                                                  transfer_timeout_s=10))
    for r in range(tp):
        heads = rank_heads(k, tp, r)
        like = _global(k, layout) if source is None else source
        caches = [_rank_cache(g, heads, layout) for g in like]
        if source is None:
            for c in caches:
                c.zero_()
        planes = [p for c in caches for p in planes_of(c, NB)]
        compat = Compat(model="m", dtype="float32", block_size=BS, num_layers=LAYERS,
                        plane_bytes=[p.block_bytes for p in planes], tp_size=tp,
                        num_kv_heads=k, head_major=all(p.head_major for p in planes))
        w = ConnectorWorker(cfg, name, r, compat, channel_key=KEY)
        w.register({f"l{i}": t for i, t in enumerate(caches)}, NB)
        out.append((w, caches))
    return out


def _run(k: int, p: int, d: int, layout: str = "cpu", timeout: float = 15.0,
         pulling: int | None = None):
    """Prefill TP ``p`` holds a request; the first ``pulling`` (all) decode ranks pull it."""
    source = _global(k, layout)
    base = free_run(p)
    pre = _instance("pre", k, p, layout, base, source)
    dec = _instance("dec", k, d, layout, free_run(d), None)
    workers = [w for w, _ in pre + dec]
    try:
        for w, _ in pre:
            w.start(DisaggMetadata(sends={"preq": 60.0}))
        order = RecvOrder("dreq", PeerAddress("pre", "127.0.0.1", base, p), "preq",
                          (5, 6, 7), (0, 1, 2))
        for w, _ in dec[:pulling]:
            w.start(DisaggMetadata(recvs=[order]))
        sent = {w: False for w, _ in pre}
        recv = {w: False for w, _ in dec[:pulling]}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (all(sent.values()) and all(recv.values())):
            for w in workers:
                s, r = w.finished()
                if "preq" in s:
                    sent[w] = True
                if "dreq" in r:
                    recv[w] = True
            time.sleep(0.005)
        return source, pre, dec, sent, recv
    finally:
        for w in workers:
            w.close()


def _heads_of(t: torch.Tensor, layout: str, blocks: slice) -> torch.Tensor:
    return t[blocks] if layout == "cpu" else t[:, blocks]


@pytest.mark.parametrize(("k", "p", "d", "layout"), [
    (4, 2, 1, "cpu"), (4, 1, 2, "cpu"), (2, 4, 1, "cpu"), (2, 1, 4, "cpu"), (4, 2, 2, "cpu"),
    (4, 2, 1, "hnd"), (4, 1, 2, "hnd"),
])
def test_decode_ranks_hold_exactly_their_heads_after_a_pull(k, p, d, layout):
    source, pre, dec, sent, recv = _run(k, p, d, layout)
    assert all(recv.values()), "a decode rank did not finish its pull"
    assert all(sent.values()), "a prefill rank kept its blocks (completion notices)"
    for r, (w, caches) in enumerate(dec):
        assert not w.load_errors()
        heads = rank_heads(k, d, r)
        for layer, got in enumerate(caches):
            want = _rank_cache(source[layer], heads, layout)
            assert torch.equal(_heads_of(got, layout, slice(5, 8)),
                               _heads_of(want, layout, slice(0, 3)))
            # blocks outside the order stay untouched
            assert not _heads_of(got, layout, slice(0, 5)).any()
        stats = w.take_stats().data
        assert stats["kv_transfers_received"] == 1
    for w, _ in pre:
        assert w.take_stats().data["kv_sends_completed"] == 1


def test_interleaved_heads_refuse_a_split_and_say_why(caplog):
    """CUDA's default NHD layout interleaves heads within a block: P2 -> D1 must split
    blocks by head, which the handshake refuses with the reason (the decoder recomputes)."""
    caplog.set_level(logging.WARNING)
    _, pre, dec, _, recv = _run(4, 2, 1, "nhd", timeout=8.0)
    assert all(recv.values())
    w, _ = dec[0]
    assert w.load_errors() == {5, 6, 7}
    assert "prefill TP 2 holds 2 KV heads per rank and decode TP 1 holds 4" in caplog.text
    assert "HND" in caplog.text


def test_a_prefill_rank_frees_only_after_every_decode_rank_read():
    """P1 -> D2: both decode ranks read from prefill rank 0; one reader is not enough."""
    _, pre, _, sent, recv = _run(4, 1, 2, timeout=3.0, pulling=1)
    assert all(recv.values())
    assert not any(sent.values())

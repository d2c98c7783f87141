"""The KV store across TP sizes: chunks are per KV head, so what the ranks of a TP-2 instance
save (each its half of the heads) loads into a TP-1 instance, and the reverse. Real
ConnectorWorkers (one per rank) on real shared tiers (disk, Redis)."""

from __future__ import annotations

import pytest
import torch

from disagg.config import StoreConfig
from disagg.tp_layout import rank_heads
from disagg.transfer.connector.metadata import DisaggMetadata, StoreLoadOrder, StoreSaveOrder
from disagg.transfer.connector.worker_half import ConnectorWorker
from disagg.transfer.control.messages import Compat
from disagg.transfer.store.lookup import LookupClient
from tests.test_connector_worker import KEY, LAYERS, NB, _step_until, connector_config
from tests.test_store_connector import BLOCK, CHUNK, PROMPT, _save, _shared_tiers

HEADS = 4
SRC_BLOCKS = tuple(range(3, 13))  # 10 blocks = 5 chunks
DST_BLOCKS = (15, 14, 0, 1, 2, 5, 6, 7, 8, 9)


def _instance(name: str, tp: int, tiers: dict, source: list[torch.Tensor] | None):
    """The ranks of one instance; with ``source`` (global caches, every head) they hold
    their share of it, else zeros."""
    ranks = []
    for r in range(tp):
        heads = rank_heads(HEADS, tp, r)
        caches = [(g[:, heads.start:heads.stop].contiguous() if source is not None else
                   torch.zeros(NB, len(heads), BLOCK, 32, dtype=torch.bfloat16))
                  for g in (source or [None] * LAYERS)]
        compat = Compat(model="m", dtype="bfloat16", block_size=BLOCK, num_layers=LAYERS,
                        plane_bytes=[caches[0][0].numel() * 2] * LAYERS, tp_size=tp,
                        num_kv_heads=HEADS)
        st = StoreConfig(chunk_tokens=CHUNK, cpu_gib=(1 << 22) / (1 << 30),
                         lookup_timeout_s=2, **tiers)
        w = ConnectorWorker(connector_config(store=st), name, r, compat, model_id="w1",
                            channel_key=KEY)
        w.register({f"l{i}": t for i, t in enumerate(caches)}, NB)
        ranks.append((w, caches))
    return ranks


@pytest.mark.parametrize("kind", ["disk", "redis"])
@pytest.mark.parametrize(("save_tp", "load_tp"), [(2, 1), (1, 2)])
@pytest.mark.parametrize("batch", ["one", "per_chunk"])
def test_a_chunk_saved_at_one_tp_size_loads_at_another(kind, save_tp, load_tp, batch,
                                                       tmp_path, request, monkeypatch):
    """``per_chunk``: one chunk per store read, so the loader reads batch k + 1 while it
    scatters batch k."""
    if batch == "per_chunk":
        from disagg.transfer.store.io import StoreLoader

        monkeypatch.setattr(StoreLoader, "BATCH_BYTES", 1)
    tiers = _shared_tiers(kind, tmp_path, request)
    source = [torch.randn(NB, HEADS, BLOCK, 32).to(torch.bfloat16) for _ in range(LAYERS)]
    saver = _instance(f"s{save_tp}-{kind}", save_tp, tiers, source)
    loader = _instance(f"l{load_tp}-{kind}", load_tp, tiers, None)
    try:
        for w, _ in saver:
            _save(w, "a", SRC_BLOCKS)
        client = LookupClient(f"l{load_tp}-{kind}", timeout_s=2)
        assert client.lookup(PROMPT) == 5  # asked of the loader's rank 0, as vLLM does
        client.close()
        order = StoreLoadOrder("b", DST_BLOCKS, PROMPT[:5 * CHUNK], first_block=0)
        for w, _ in loader:
            w.start(DisaggMetadata(store_loads=[order]))
        for w, _ in loader:
            _step_until([w], lambda r, w=w: "b" in r[w][1])
            assert not w.load_errors()
        for r, (w, caches) in enumerate(loader):
            heads = rank_heads(HEADS, load_tp, r)
            for got, g in zip(caches, source, strict=True):
                want = g[list(SRC_BLOCKS)][:, heads.start:heads.stop]
                assert torch.equal(got[list(DST_BLOCKS)], want)
            assert w.take_stats().data["store_loaded_tokens"] == len(DST_BLOCKS) * BLOCK
    finally:
        for w, _ in saver + loader:
            w.close()


def test_a_chunk_missing_a_head_is_not_a_hit(tmp_path):
    """Only rank 0 of a TP-2 instance saved: its heads alone are no chunk for TP 1."""
    tiers = {"disk_path": str(tmp_path / "kv")}
    source = [torch.randn(NB, HEADS, BLOCK, 32).to(torch.bfloat16) for _ in range(LAYERS)]
    saver = _instance("half", 2, tiers, source)
    loader = _instance("whole", 1, tiers, None)
    try:
        _save(saver[0][0], "a", SRC_BLOCKS)
        client = LookupClient("whole", timeout_s=2)
        assert client.lookup(PROMPT) == 0
        client.close()
        w = loader[0][0]
        w.start(DisaggMetadata(store_loads=[StoreLoadOrder("b", DST_BLOCKS, PROMPT[:5 * CHUNK],
                                                           first_block=0)]))
        _step_until([w], lambda r: "b" in r[w][1])
        assert w.load_errors() == set(DST_BLOCKS)  # recomputed, never half-loaded
    finally:
        for w, _ in saver + loader:
            w.close()


@pytest.mark.parametrize(("save_alloc", "load_alloc"), [("nhd", "hnd"), ("hnd", "nhd"),
                                                        ("hnd", "hnd")])
def test_cuda_layout_chunks_cross_tp_sizes_and_allocations(save_alloc, load_alloc):
    """The codec on CUDA-shaped caches ([2, blocks, block_size, heads, head_size], NHD or
    HND strides; CPU tensors here, the same code paths): TP-2 ranks' chunks rebuild a TP-1
    cache exactly (the store goes through bytes, as here)."""
    from disagg.kernels import KVLayout
    from disagg.transfer.store.io import ChunkCodec
    from disagg.transfer.store.keys import KVFingerprint

    def alloc(t: torch.Tensor, how: str) -> torch.Tensor:
        return t.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4) if how == "hnd" \
            else t.contiguous()

    fp = KVFingerprint("m", "bfloat16", "cuda", BLOCK, num_heads=HEADS)
    source = [torch.randn(2, NB, BLOCK, HEADS, 16).to(torch.bfloat16) for _ in range(LAYERS)]
    blocks = (3, 4, 9)
    chunks: dict[int, bytes] = {}
    keys = {}
    for r in range(2):
        heads = rank_heads(HEADS, 2, r)
        caches = [alloc(g[:, :, :, heads.start:heads.stop], save_alloc) for g in source]
        codec = ChunkCodec(caches, BLOCK, len(blocks) * BLOCK, fp, heads, KVLayout.CUDA)
        for h, part, key in zip(heads, codec.encode(blocks), codec.keys(PROMPT)[0],
                                strict=True):
            chunks[h], keys[h] = bytes(part), key
    dst = [alloc(torch.zeros(2, NB, BLOCK, HEADS, 16, dtype=torch.bfloat16), load_alloc)
           for _ in range(LAYERS)]
    codec = ChunkCodec(dst, BLOCK, len(blocks) * BLOCK, fp, range(HEADS), KVLayout.CUDA)
    assert codec.keys(PROMPT)[0] == [keys[h] for h in range(HEADS)]  # same keys at any TP
    codec.decode_into([chunks[h] for h in range(HEADS)], (0, 1, 2), 0)
    for got, want in zip(dst, source, strict=True):
        assert torch.equal(got[:, 0:3], want[:, list(blocks)])


def test_a_load_stops_at_the_first_chunk_missing_while_reading_ahead(tmp_path, monkeypatch):
    """One chunk per read: chunks 0-2 stored, 3-4 not; the blocks of 0-2 load, the rest are
    load errors (vLLM recomputes them), and nothing hangs on the read ahead."""
    from disagg.transfer.store.io import StoreLoader

    monkeypatch.setattr(StoreLoader, "BATCH_BYTES", 1)
    tiers = {"disk_path": str(tmp_path / "kv")}
    source = [torch.randn(NB, HEADS, BLOCK, 32).to(torch.bfloat16) for _ in range(LAYERS)]
    saver = _instance("sv", 1, tiers, source)
    loader = _instance("ld", 1, tiers, None)
    try:
        w, _ = saver[0]
        w.start(DisaggMetadata(store_saves=[StoreSaveOrder("a", PROMPT[:3 * CHUNK],
                                                           SRC_BLOCKS[:6])]))
        _step_until([w], lambda r: "a" in r[w][0])
        assert w.store.flush(10)
        ld, caches = loader[0]
        ld.start(DisaggMetadata(store_loads=[StoreLoadOrder("b", DST_BLOCKS, PROMPT[:5 * CHUNK],
                                                            first_block=0)]))
        _step_until([ld], lambda r: "b" in r[ld][1])
        assert ld.load_errors() == set(DST_BLOCKS[6:])
        for got, g in zip(caches, source, strict=True):
            assert torch.equal(got[list(DST_BLOCKS[:6])], g[list(SRC_BLOCKS[:6])])
    finally:
        for w, _ in saver + loader:
            w.close()

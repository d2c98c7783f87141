"""The Triton gather/scatter kernels (whole blocks and KV head slices) compiled for a real
GPU, against the torch reference, bit for bit. GPU tier: runs only where CUDA is available
(the CPU suite covers the same kernels under Triton's interpreter in test_kernels.py).

The head-slice checks alone, as one short run:
    pytest -q tests/test_kernels_gpu.py -k heads -s
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from disagg.kernels import (
    KVLayout,
    gather_blocks,
    gather_heads,
    gather_heads_reference,
    gather_reference,
    scatter_blocks,
    scatter_heads,
    scatter_heads_reference,
    scatter_reference,
)
from tests.test_kernels import (
    DTYPES,
    KIND_IDS,
    KINDS,
    NUM_LAYERS,
    arrange,
    head_slice,
    logical_shape,
    random_bits,
    same_bits,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

CASES = list(itertools.product(list(KVLayout), [torch.bfloat16, torch.float16, torch.float32],
                               [16, 32, 128], [1, 8], [64, 128]))


def _caches(layout, block_size, heads, head_size, dtype, gen, num_blocks=64):
    shape = ((num_blocks, heads, block_size, 2 * head_size) if layout is KVLayout.CPU
             else (2, num_blocks, block_size, heads, head_size))
    return [random_bits(shape, dtype, gen).cuda() for _ in range(NUM_LAYERS)]


@pytest.mark.parametrize(("layout", "dtype", "block_size", "heads", "head_size"), CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_triton_equals_reference(layout, dtype, block_size, heads, head_size):
    gen = torch.Generator().manual_seed(block_size * 7 + heads * 3 + head_size)
    caches = _caches(layout, block_size, heads, head_size, dtype, gen)
    ids = torch.randperm(64, generator=gen)[:11].tolist()
    want = gather_reference(caches, ids, layout)
    got = gather_blocks(caches, ids, layout, impl="triton")
    assert same_bits(got, want)
    new_ids = torch.randperm(64, generator=gen)[:11].tolist()
    chunk = random_bits(want.shape, dtype, gen).cuda()
    by_ref, by_triton = [t.clone() for t in caches], [t.clone() for t in caches]
    scatter_reference(chunk, by_ref, new_ids, layout)
    scatter_blocks(chunk, by_triton, new_ids, layout, impl="triton")
    assert all(same_bits(a, b) for a, b in zip(by_ref, by_triton, strict=True))


def test_dispatch_picks_triton_on_cuda_and_report_bandwidth(capsys):
    """The `small` model's geometry (12 layers, 4 KV heads of 64, block 16, CUDA layout),
    one 4K-token request: Triton and the torch reference, GB/s of chunk bytes moved."""
    from disagg.kernels.dispatch import _use_triton

    gen = torch.Generator().manual_seed(0)
    caches = [random_bits((2, 2048, 16, 4, 64), torch.bfloat16, gen).cuda() for _ in range(12)]
    assert _use_triton(caches, "auto")
    ids = torch.randperm(2048, generator=gen)[:256].tolist()  # 4,096 tokens, scattered
    nbytes = gather_reference(caches, ids, "cuda").numel() * 2

    def timed(fn, n=50) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    t_tri = timed(lambda: gather_blocks(caches, ids, "cuda", impl="triton"))
    t_ref = timed(lambda: gather_reference(caches, ids, "cuda"))
    with capsys.disabled():
        print(f"\ngather 4K tokens ({nbytes / 2**20:.1f} MiB): triton {nbytes / t_tri / 1e9:.0f}"
              f" GB/s, torch reference {nbytes / t_ref / 1e9:.0f} GB/s")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(("layout", "alloc"), KINDS, ids=KIND_IDS)
def test_compiled_triton_heads_equal_reference(layout, alloc, dtype):
    """Heads 2..5 of 8 (head size 128, and 80: rows that are not a power of two), 11
    scattered blocks of 64, NaN payloads included: Triton gather and scatter = reference."""
    gen = torch.Generator().manual_seed(21)
    for block_size, head_size in [(16, 128), (32, 80)]:
        shape = logical_shape(layout, block_size, 8, head_size, num_blocks=64)
        caches = [arrange(random_bits(shape, dtype, gen).cuda(), alloc)
                  for _ in range(NUM_LAYERS)]
        ids = torch.randperm(64, generator=gen)[:11].tolist()
        want = gather_heads_reference(caches, ids, (2, 6), layout)
        assert same_bits(gather_heads(caches, ids, (2, 6), layout, impl="triton"), want)
        chunk = random_bits(want.shape, dtype, gen).cuda()
        by_ref = [arrange(t.clone(), alloc) for t in caches]
        by_triton = [arrange(t.clone(), alloc) for t in caches]
        scatter_heads_reference(chunk, by_ref, ids, (2, 6), layout)
        scatter_heads(chunk, by_triton, ids, (2, 6), layout, impl="triton")
        assert all(same_bits(a, b) for a, b in zip(by_ref, by_triton, strict=True))


@pytest.mark.parametrize(("layout", "alloc1", "alloc2"),
                         [(KVLayout.CPU, "nhd", "nhd"), (KVLayout.CUDA, "nhd", "hnd"),
                          (KVLayout.CUDA, "hnd", "nhd")], ids=["cpu", "nhd-hnd", "hnd-nhd"])
def test_compiled_head_chunks_cross_tp_sizes(layout, alloc1, alloc2):
    """On CUDA tensors (dispatch picks Triton): a TP-1 cache's head chunk = its TP-2 ranks'
    chunks concatenated, and each side's chunks rebuild the other side exactly."""
    gen = torch.Generator().manual_seed(22)
    logical = [random_bits(logical_shape(layout, 16, 8, 128, num_blocks=64), torch.bfloat16,
                           gen).cuda() for _ in range(NUM_LAYERS)]
    tp1 = [arrange(t, alloc1) for t in logical]
    ranks = [[arrange(head_slice(t, layout, 4 * r, 4 * r + 4), alloc2) for t in logical]
             for r in range(2)]
    ids = torch.randperm(64, generator=gen).tolist()
    whole = gather_heads(tp1, ids, (0, 8), layout)
    parts = [gather_heads(rank, ids, (0, 4), layout) for rank in ranks]
    assert same_bits(whole, torch.cat(parts))
    for r, rank in enumerate(ranks):
        fresh = [arrange(torch.zeros_like(t), alloc2) for t in rank]
        scatter_heads(whole[4 * r:4 * r + 4].contiguous(), fresh, ids, (0, 4), layout)
        assert all(same_bits(a, b) for a, b in zip(fresh, rank, strict=True))
    back = [arrange(torch.zeros_like(t), alloc1) for t in tp1]
    scatter_heads(torch.cat(parts), back, ids, (0, 8), layout)
    assert all(same_bits(a, b) for a, b in zip(back, tp1, strict=True))


@pytest.mark.parametrize("alloc", ["nhd", "hnd"])
def test_heads_bandwidth(alloc, capsys):
    """The `small` model's CUDA geometry (12 layers, 4 KV heads of 64, block 16), one
    4K-token request in scattered blocks: GB/s of Triton gather_heads (all heads, and one
    TP-2 rank's half) against whole-block gather_blocks, where the layout allows it."""
    gen = torch.Generator().manual_seed(0)
    caches = [arrange(random_bits((2, 2048, 16, 4, 64), torch.bfloat16, gen).cuda(), alloc)
              for _ in range(12)]
    ids = torch.randperm(2048, generator=gen)[:256].tolist()
    nbytes = 12 * 2 * 256 * 16 * 4 * 64 * 2

    def gbps(fn, nbytes: int, n: int = 50) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return nbytes * n / (time.perf_counter() - t0) / 1e9

    chunk = gather_heads(caches, ids, (0, 4), "cuda")
    rates = {
        "gather_heads all": gbps(lambda: gather_heads(caches, ids, (0, 4), "cuda"), nbytes),
        "gather_heads half": gbps(lambda: gather_heads(caches, ids, (2, 4), "cuda"), nbytes // 2),
        "scatter_heads all": gbps(lambda: scatter_heads(chunk, caches, ids, (0, 4), "cuda"),
                                  nbytes),
    }
    if alloc == "nhd":  # HND blocks are not contiguous: no whole-block copy
        rates["gather_blocks"] = gbps(lambda: gather_blocks(caches, ids, "cuda"), nbytes)
    line = f"{alloc}: " + ", ".join(f"{name} {rate:.0f} GB/s" for name, rate in rates.items())
    with capsys.disabled():
        print(f"\n{line}")

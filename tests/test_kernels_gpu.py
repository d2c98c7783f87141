"""The Triton gather/scatter kernels compiled for a real GPU, against the torch reference,
bit for bit. GPU tier: runs only where CUDA is available (the CPU suite covers the same
kernels under Triton's interpreter in test_kernels.py)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from disagg.kernels import (
    KVLayout,
    gather_blocks,
    gather_reference,
    scatter_blocks,
    scatter_reference,
)
from tests.test_kernels import NUM_LAYERS, random_bits, same_bits

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

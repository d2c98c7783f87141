"""Paged KV gather/scatter: the torch reference against plain indexing, the Triton kernels
(run by Triton's interpreter on the CPU) against the reference, bit for bit."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from disagg.kernels import (
    KVLayout,
    gather_blocks,
    gather_reference,
    geometry,
    scatter_reference,
)
from disagg.kernels import dispatch as dispatch_mod
from disagg.kernels.geometry import bits

NUM_LAYERS = 2
NUM_BLOCKS = 9


@pytest.fixture(scope="module")
def tp():
    """``triton_paged`` with its kernels defined under TRITON_INTERPRET=1.

    Triton reads the variable when ``@triton.jit`` runs, so the module is (re)imported with
    it set, and reloaded without it afterwards so later users get compiled kernels again.
    """
    import disagg.kernels.triton_paged as mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mod = importlib.reload(mod)
        assert mod.INTERPRETED
        yield mod
    importlib.reload(mod)


def random_bits(shape, dtype, gen) -> torch.Tensor:
    """Random bit patterns (NaN payloads, infinities, -0 included) viewed as ``dtype``."""
    width = torch.empty(0, dtype=dtype).element_size()
    itype = {2: torch.int16, 4: torch.int32}[width]
    lim = 2 ** (8 * width - 1)
    return torch.randint(-lim, lim, shape, dtype=torch.int64, generator=gen).to(itype).view(dtype)


def make_caches(layout, block_size, heads, head_size, dtype, gen, num_blocks=NUM_BLOCKS):
    if layout is KVLayout.CPU:
        shape = (num_blocks, heads, block_size, 2 * head_size)
    else:
        shape = (2, num_blocks, block_size, heads, head_size)
    return [random_bits(shape, dtype, gen) for _ in range(NUM_LAYERS)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def pick_ids(gen, n=3, num_blocks=NUM_BLOCKS) -> list[int]:
    """Distinct, unordered, non-consecutive-in-general block ids."""
    return torch.randperm(num_blocks, generator=gen)[:n].tolist()


@pytest.mark.parametrize("layout", list(KVLayout))
def test_reference_matches_plain_indexing(layout):
    gen = torch.Generator().manual_seed(0)
    caches = make_caches(layout, 16, 2, 64, torch.bfloat16, gen)
    ids = [7, 2, 5]
    chunk = gather_reference(caches, ids, layout)
    for layer, kv in enumerate(caches):
        want = kv[ids] if layout is KVLayout.CPU else kv[:, ids]
        got = chunk[layer].view(want.shape)
        assert same_bits(got, want)


@pytest.mark.parametrize("layout", list(KVLayout))
def test_reference_roundtrip_restores_exactly(layout):
    gen = torch.Generator().manual_seed(1)
    src = make_caches(layout, 32, 4, 64, torch.float16, gen)
    dst = [torch.zeros_like(t) for t in src]
    ids = pick_ids(gen, 4)
    scatter_reference(gather_reference(src, ids, layout), dst, ids, layout)
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    for s, d in zip(src, dst, strict=True):
        sel = (lambda t, i: t[i]) if layout is KVLayout.CPU else (lambda t, i: t[:, i])
        assert same_bits(sel(d, ids), sel(s, ids))
        assert not bits(sel(d, others)).any()  # blocks not named stay untouched


# Every block size, head count, head size, dtype and layout appears; pairs of them are
# spread across cases so the interpreter runs ~48 cases instead of the full 144 product.
SHAPES = [(bs, h, hd) for bs, (h, hd) in zip(
    itertools.cycle([16, 32, 128]), itertools.product([1, 2, 4, 8], [64, 128]))]
CASES = [(layout, dtype, *shape) for layout, dtype, shape in itertools.product(
    list(KVLayout), [torch.bfloat16, torch.float16, torch.float32], SHAPES)]


@pytest.mark.parametrize(("layout", "dtype", "block_size", "heads", "head_size"), CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_triton_equals_reference(tp, layout, dtype, block_size, heads, head_size):
    gen = torch.Generator().manual_seed(block_size * 1000 + heads * 100 + head_size)
    caches = make_caches(layout, block_size, heads, head_size, dtype, gen)
    ids = pick_ids(gen, 3)
    want = gather_reference(caches, ids, layout)
    # One tile per slab: the interpreter pays per program, not per element. Tiling itself
    # is covered by the small slabs here and by the partial-tile test below.
    tile = 1 << (geometry(caches, layout).block_elems - 1).bit_length()
    got = tp.gather_triton(caches, ids, layout, tile=tile)
    assert same_bits(got, want)

    # Scatter a fresh chunk into different blocks of copies; compare whole caches.
    new_ids = pick_ids(gen, 3)
    chunk = random_bits(want.shape, dtype, gen)
    by_ref = [t.clone() for t in caches]
    by_triton = [t.clone() for t in caches]
    scatter_reference(chunk, by_ref, new_ids, layout)
    tp.scatter_triton(chunk, by_triton, new_ids, layout, tile=tile)
    assert all(same_bits(a, b) for a, b in zip(by_ref, by_triton, strict=True))

    # Round trip through Triton alone restores the gathered blocks exactly.
    tp.scatter_triton(got, by_triton, ids, layout, tile=tile)
    assert same_bits(tp.gather_triton(by_triton, ids, layout, tile=tile), want)


@pytest.mark.parametrize("layout", list(KVLayout))
def test_triton_partial_tiles_and_shared_storage(tp, layout):
    """Slabs that are not a multiple of the tile (masked tail), and layers that are slices of
    one allocation (non-zero storage offsets), as when a runtime allocates all layers at once."""
    gen = torch.Generator().manual_seed(2)
    one = make_caches(layout, 16, 1, 80, torch.bfloat16, gen)[0]  # slab 1280 or 2560 elems
    big = random_bits((3, *one.shape), torch.bfloat16, gen)
    caches = [big[i] for i in range(3)]
    ids = [8, 0, 4, 3]
    want = gather_reference(caches, ids, layout)
    out = torch.empty_like(want)
    assert tp.gather_triton(caches, ids, layout, out=out, tile=512) is out
    assert same_bits(out, want)
    expected = [t.clone() for t in caches]
    scatter_reference(want.flip(2).contiguous(), expected, ids, layout)
    tp.scatter_triton(want.flip(2).contiguous(), caches, ids, layout, tile=512)
    assert all(same_bits(a, b) for a, b in zip(caches, expected, strict=True))


def test_triton_refuses_cpu_without_interpreter(tp, monkeypatch):
    caches = make_caches(KVLayout.CPU, 16, 1, 64, torch.float16, torch.Generator())
    monkeypatch.setattr(tp, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="no CPU backend"):
        tp.gather_triton(caches, [0], KVLayout.CPU)


def test_triton_rejects_bad_tile_and_accepts_no_blocks(tp):
    caches = make_caches(KVLayout.CUDA, 16, 1, 64, torch.float16, torch.Generator())
    with pytest.raises(ValueError, match="power of two"):
        tp.gather_triton(caches, [1], KVLayout.CUDA, tile=300)
    assert tp.gather_triton(caches, [], KVLayout.CUDA).shape == (NUM_LAYERS, 2, 0, 16 * 64)


def test_dispatch_uses_torch_for_cpu_tensors(monkeypatch):
    caches = make_caches(KVLayout.CPU, 16, 2, 64, torch.bfloat16, torch.Generator())
    assert not dispatch_mod._use_triton(caches, "auto")
    assert dispatch_mod._use_triton(caches, "triton")

    def boom(*args, **kwargs):
        raise AssertionError("torch path expected")

    monkeypatch.setattr("disagg.kernels.triton_paged.gather_triton", boom)
    assert same_bits(gather_blocks(caches, [1, 3], "cpu"), gather_reference(caches, [1, 3], "cpu"))
    with pytest.raises(ValueError, match="unknown impl"):
        gather_blocks(caches, [1], "cpu", impl="cuda")


def test_invalid_inputs_are_refused():
    gen = torch.Generator().manual_seed(3)
    caches = make_caches(KVLayout.CPU, 16, 2, 64, torch.float16, gen)
    chunk = gather_reference(caches, [1, 2], "cpu")
    with pytest.raises(ValueError, match="outside"):
        gather_reference(caches, [NUM_BLOCKS], "cpu")
    with pytest.raises(ValueError, match="outside"):
        gather_reference(caches, [-1], "cpu")
    with pytest.raises(ValueError, match="repeat"):
        scatter_reference(torch.cat([chunk, chunk], 2), caches, [1, 1, 2, 2], "cpu")
    with pytest.raises(ValueError, match="expected shape"):
        scatter_reference(chunk, caches, [1], "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        scatter_reference(chunk.float(), caches, [1, 2], "cpu")
    with pytest.raises(ValueError, match="not the cuda layout"):
        gather_reference(caches, [1], "cuda")
    with pytest.raises(ValueError, match="differ"):
        gather_reference([caches[0], caches[1][:4]], [1], "cpu")
    with pytest.raises(ValueError, match="not contiguous"):
        gather_reference([t.transpose(1, 2) for t in caches], [1], "cpu")
    with pytest.raises(ValueError, match="no KV layers"):
        gather_reference([], [1], "cpu")

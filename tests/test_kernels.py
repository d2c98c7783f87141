"""Paged KV gather/scatter, whole blocks and KV head slices: the torch reference against
plain indexing, the Triton kernels (run by Triton's interpreter on the CPU) against the
reference, bit for bit, and head chunks crossing TP sizes."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from disagg.kernels import (
    KVLayout,
    gather_blocks,
    gather_heads,
    gather_heads_reference,
    gather_reference,
    geometry,
    head_geometry,
    head_view,
    scatter_heads,
    scatter_heads_reference,
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


# ---- KV head slices -------------------------------------------------------------------------
#
# A "kind" is a layout plus how the CUDA layout's logical [2, nb, bs, H, hs] is allocated:
# NHD (strides follow the logical order) or HND (physically [2, nb, H, bs, hs], permuted).
KINDS = [(KVLayout.CPU, "nhd"), (KVLayout.CUDA, "nhd"), (KVLayout.CUDA, "hnd")]
KIND_IDS = ["cpu", "cuda-nhd", "cuda-hnd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def arrange(logical: torch.Tensor, alloc: str) -> torch.Tensor:
    """A copy of ``logical`` with the same logical shape, allocated NHD or HND (CUDA only)."""
    if alloc == "nhd":
        return logical.contiguous()
    physical = logical.permute(0, 1, 3, 2, 4).contiguous()  # [2, nb, H, bs, hs]
    return physical.permute(0, 1, 3, 2, 4)


def logical_shape(layout, block_size, heads, head_size, num_blocks=NUM_BLOCKS):
    if layout is KVLayout.CPU:
        return (num_blocks, heads, block_size, 2 * head_size)
    return (2, num_blocks, block_size, heads, head_size)


def make_head_caches(layout, alloc, block_size, heads, head_size, dtype, gen,
                     num_blocks=NUM_BLOCKS):
    shape = logical_shape(layout, block_size, heads, head_size, num_blocks)
    return [arrange(random_bits(shape, dtype, gen), alloc) for _ in range(NUM_LAYERS)]


def head_slice(kv: torch.Tensor, layout, h0: int, h1: int) -> torch.Tensor:
    """Heads ``h0 .. h1-1`` of a cache, as the logical (strided) view."""
    return kv[:, h0:h1] if layout is KVLayout.CPU else kv[:, :, :, h0:h1]


def one_head(kv: torch.Tensor, layout, plane: int, block: int, head: int) -> torch.Tensor:
    """Plain indexing: the rows of one head of one block in one plane, flattened."""
    rows = kv[block, head] if layout is KVLayout.CPU else kv[plane, block, :, head]
    return rows.reshape(-1)


@pytest.mark.parametrize(("layout", "alloc"), KINDS, ids=KIND_IDS)
def test_head_geometry_reads_strides_and_head_view_shares_storage(layout, alloc):
    gen = torch.Generator().manual_seed(10)
    caches = make_head_caches(layout, alloc, 16, 4, 8, torch.float16, gen)
    g = head_geometry(caches, layout)
    row = 16 if layout is KVLayout.CPU else 8
    assert (g.num_planes, g.num_heads, g.block_size, g.row, g.head_elems) == (
        1 if layout is KVLayout.CPU else 2, 4, 16, row, 16 * row)
    # A head's rows: contiguous for the CPU layout and HND, H rows apart for CUDA NHD.
    assert g.token_stride == (4 * row if (layout, alloc) == (KVLayout.CUDA, "nhd") else row)
    view = head_view(caches[0], g)
    assert view.shape == (g.num_planes, NUM_BLOCKS, 4, 16, row)
    assert view.data_ptr() == caches[0].data_ptr()
    assert same_bits(view[-1, 5, 2].reshape(-1), bits(one_head(caches[0], layout, 1, 5, 2)))
    if alloc == "hnd":  # whole-block copies still insist on a contiguous block
        with pytest.raises(ValueError, match="not contiguous"):
            geometry(caches, layout)


@pytest.mark.parametrize(("layout", "alloc"), KINDS, ids=KIND_IDS)
def test_gather_heads_reference_matches_plain_indexing(layout, alloc):
    gen = torch.Generator().manual_seed(11)
    caches = make_head_caches(layout, alloc, 16, 4, 8, torch.bfloat16, gen)
    ids = [7, 2, 3, 4, 2]  # a run (2, 3, 4), a lone block, a repeat
    chunk = gather_heads_reference(caches, ids, (1, 3), layout)
    planes = 1 if layout is KVLayout.CPU else 2
    g = head_geometry(caches, layout)
    assert chunk.shape == (2, NUM_LAYERS, planes, len(ids), g.head_elems)
    assert chunk.is_contiguous()
    for i, layer, plane, (pos, block) in itertools.product(
            range(2), range(NUM_LAYERS), range(planes), enumerate(ids)):
        want = one_head(caches[layer], layout, plane, block, 1 + i)
        assert same_bits(chunk[i, layer, plane, pos], want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(("layout", "alloc"), KINDS, ids=KIND_IDS)
def test_scatter_heads_reference_roundtrip_touches_only_named(layout, alloc, dtype):
    """Random bit patterns (NaN payloads included) survive; other heads and blocks stay 0."""
    gen = torch.Generator().manual_seed(12)
    src = make_head_caches(layout, alloc, 16, 4, 16, dtype, gen)
    dst = [arrange(torch.zeros_like(t), alloc) for t in src]
    ids = pick_ids(gen, 4)
    chunk = gather_heads_reference(src, ids, (2, 4), layout)
    assert torch.isnan(chunk).any()
    scatter_heads_reference(chunk, dst, ids, (2, 4), layout)
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    for s, d in zip(src, dst, strict=True):
        sel = (lambda t, i: t[i]) if layout is KVLayout.CPU else (lambda t, i: t[:, i])
        assert same_bits(head_slice(sel(d, ids), layout, 2, 4),
                         head_slice(sel(s, ids), layout, 2, 4))
        assert not bits(head_slice(d, layout, 0, 2)).any()  # heads not named stay untouched
        assert not bits(sel(d, others)).any()  # blocks not named stay untouched


# TP 1 with H heads against TP 2 ranks holding H/2 heads each; the CUDA cases also cross
# NHD and HND allocations between the two sides. The torch path runs every dtype; the
# interpreter (slow, and dtype-blind: it moves integers) one dtype per arrangement.
TP_ARRANGEMENTS = [(KVLayout.CPU, "nhd", "nhd"), (KVLayout.CUDA, "nhd", "nhd"),
                   (KVLayout.CUDA, "nhd", "hnd"), (KVLayout.CUDA, "hnd", "nhd")]
TP_CASES = ([(*arr, dtype, "torch") for arr, dtype in itertools.product(TP_ARRANGEMENTS, DTYPES)]
            + [(*arr, dtype, "triton") for arr, dtype in zip(TP_ARRANGEMENTS,
                                                             itertools.cycle(DTYPES))])


@pytest.mark.parametrize(("layout", "alloc1", "alloc2", "dtype", "impl"), TP_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_head_chunks_cross_tp_sizes(request, layout, alloc1, alloc2, dtype, impl):
    """gather_heads over all heads of a TP-1 cache = the TP-2 ranks' outputs concatenated,
    and scattering per-head chunks into the other TP arrangement reproduces it exactly."""
    if impl == "triton":
        request.getfixturevalue("tp")  # kernels under the interpreter for this test
    gen = torch.Generator().manual_seed(13)
    heads, half = 4, 2
    logical = [random_bits(logical_shape(layout, 16, heads, 8), dtype, gen)
               for _ in range(NUM_LAYERS)]
    tp1 = [arrange(t, alloc1) for t in logical]
    ranks = [[arrange(head_slice(t, layout, r * half, (r + 1) * half), alloc2) for t in logical]
             for r in range(2)]
    ids = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # every block, shuffled

    whole = gather_heads(tp1, ids, (0, heads), layout, impl=impl)
    parts = [gather_heads(rank, ids, (0, half), layout, impl=impl) for rank in ranks]
    assert same_bits(whole, torch.cat(parts))
    # A single head's chunk is the same bytes from either side.
    assert same_bits(gather_heads(tp1, ids, (3, 4), layout, impl=impl)[0], parts[1][1])

    # TP 1 -> TP 2: each rank loads its heads' parts of the TP-1 chunk, one head at a time.
    fresh = [[arrange(torch.zeros_like(t), alloc2) for t in rank] for rank in ranks]
    for r, rank in enumerate(fresh):
        for h in range(half):
            scatter_heads(whole[r * half + h].contiguous(), rank, ids, (h, h + 1), layout,
                          impl=impl)
        assert all(same_bits(a, b) for a, b in zip(rank, ranks[r], strict=True))
    # TP 2 -> TP 1: the ranks' chunks, concatenated, load into a TP-1 cache.
    back = [arrange(torch.zeros_like(t), alloc1) for t in tp1]
    scatter_heads(torch.cat(parts), back, ids, (0, heads), layout, impl=impl)
    assert all(same_bits(a, b) for a, b in zip(back, tp1, strict=True))


# Shapes for the interpreter: (block_size, heads, head_size, head range, tile). Rows that
# are not a power of two (head_size 80), tiles of a few rows (masked token tails with
# block_size 24), tiles of one row, one head and all heads all appear.
HEAD_SHAPES = [(16, 4, 64, (1, 3), None), (32, 2, 128, (0, 2), None), (24, 2, 80, (1, 2), 512),
               (16, 8, 64, (4, 8), 256), (16, 1, 128, (0, 1), 64)]
HEAD_CASES = [(layout, alloc, dtype, *shape) for (layout, alloc), dtype, shape in zip(
    itertools.cycle(KINDS), itertools.cycle(DTYPES), HEAD_SHAPES * 3)]


@pytest.mark.parametrize(("layout", "alloc", "dtype", "block_size", "heads", "head_size",
                          "hrange", "tile"), HEAD_CASES,
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_triton_heads_equal_reference(tp, layout, alloc, dtype, block_size, heads, head_size,
                                      hrange, tile):
    gen = torch.Generator().manual_seed(block_size * 1000 + heads * 100 + head_size)
    caches = make_head_caches(layout, alloc, block_size, heads, head_size, dtype, gen)
    ids = pick_ids(gen, 3) + [4, 5]  # scattered ids and a run
    ids = list(dict.fromkeys(ids))
    want = gather_heads_reference(caches, ids, hrange, layout)
    got = tp.gather_heads_triton(caches, ids, hrange, layout, tile=tile)
    assert same_bits(got, want)

    chunk = random_bits(want.shape, dtype, gen)
    new_ids = pick_ids(gen, len(ids))
    by_ref = [arrange(t.clone(), alloc) for t in caches]
    by_triton = [arrange(t.clone(), alloc) for t in caches]
    scatter_heads_reference(chunk, by_ref, new_ids, hrange, layout)
    tp.scatter_heads_triton(chunk, by_triton, new_ids, hrange, layout, tile=tile)
    assert all(same_bits(a, b) for a, b in zip(by_ref, by_triton, strict=True))


@pytest.mark.parametrize(("layout", "alloc"), KINDS, ids=KIND_IDS)
def test_triton_heads_on_layers_sharing_one_allocation(tp, layout, alloc):
    """Layers that are views of one allocation (non-zero storage offsets), as vLLM allocates
    them, and a caller-supplied ``out``."""
    gen = torch.Generator().manual_seed(14)
    shape = logical_shape(layout, 16, 4, 32)
    if alloc == "hnd":
        big = random_bits((3, 2, NUM_BLOCKS, 4, 16, 32), torch.bfloat16, gen)
        caches = [big[i].permute(0, 1, 3, 2, 4) for i in range(3)]
    else:
        big = random_bits((3, *shape), torch.bfloat16, gen)
        caches = [big[i] for i in range(3)]
    ids = [8, 0, 4, 3]
    want = gather_heads_reference(caches, ids, (1, 4), layout)
    out = torch.empty_like(want)
    assert tp.gather_heads_triton(caches, ids, (1, 4), layout, out=out) is out
    assert same_bits(out, want)
    assert gather_heads(caches, ids, (1, 4), layout, out=out) is out
    expected = [t.clone() for t in caches]
    scatter_heads_reference(want.flip(3).contiguous(), expected, ids, (1, 4), layout)
    tp.scatter_heads_triton(want.flip(3).contiguous(), caches, ids, (1, 4), layout)
    assert all(same_bits(a, b) for a, b in zip(caches, expected, strict=True))
    assert tp.gather_heads_triton(caches, [], (0, 1), layout).shape[3] == 0


def test_dispatch_heads_uses_torch_for_cpu_tensors(monkeypatch):
    caches = make_head_caches(KVLayout.CUDA, "hnd", 16, 2, 64, torch.bfloat16, torch.Generator())

    def boom(*args, **kwargs):
        raise AssertionError("torch path expected")

    monkeypatch.setattr("disagg.kernels.triton_paged.gather_heads_triton", boom)
    monkeypatch.setattr("disagg.kernels.triton_paged.scatter_heads_triton", boom)
    chunk = gather_heads(caches, [1, 3], (0, 1), "cuda")
    assert same_bits(chunk, gather_heads_reference(caches, [1, 3], (0, 1), "cuda"))
    scatter_heads(chunk, caches, [1, 3], (0, 1), "cuda")
    with pytest.raises(ValueError, match="unknown impl"):
        gather_heads(caches, [1], (0, 1), "cuda", impl="cuda")


def test_triton_heads_refuse_cpu_without_interpreter_and_bad_tile(tp, monkeypatch):
    caches = make_head_caches(KVLayout.CUDA, "nhd", 16, 2, 64, torch.float16, torch.Generator())
    with pytest.raises(ValueError, match="power of two"):
        tp.gather_heads_triton(caches, [1], (0, 1), KVLayout.CUDA, tile=300)
    monkeypatch.setattr(tp, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="no CPU backend"):
        tp.gather_heads_triton(caches, [0], (0, 1), KVLayout.CUDA)


def _head_impls(tp):
    return [(gather_heads_reference, scatter_heads_reference),
            (tp.gather_heads_triton, tp.scatter_heads_triton)]


@pytest.mark.parametrize("which", ["torch", "triton"])
def test_invalid_head_inputs_are_refused(tp, which):
    gather, scatter = dict(zip(["torch", "triton"], _head_impls(tp), strict=True))[which]
    gen = torch.Generator().manual_seed(15)
    caches = make_head_caches(KVLayout.CUDA, "nhd", 16, 4, 8, torch.float16, gen)
    chunk = gather(caches, [1, 2], (1, 3), "cuda")
    for bad in [(0, 0), (3, 1), (-1, 2), (2, 5), (1,), (1, 2, 3), ("a", 2), (1.0, 2), 3]:
        with pytest.raises(ValueError, match="head"):
            gather(caches, [1], bad, "cuda")
        with pytest.raises(ValueError, match="head"):
            scatter(chunk, caches, [1, 2], bad, "cuda")
    with pytest.raises(ValueError, match="outside"):
        gather(caches, [NUM_BLOCKS], (0, 1), "cuda")
    with pytest.raises(ValueError, match="outside"):
        scatter(chunk, caches, [-1, 2], (1, 3), "cuda")
    with pytest.raises(ValueError, match="repeat"):
        scatter(torch.cat([chunk, chunk], 3), caches, [1, 1, 2, 2], (1, 3), "cuda")
    with pytest.raises(ValueError, match="expected shape"):
        scatter(chunk, caches, [1, 2], (0, 3), "cuda")  # one head too many
    with pytest.raises(ValueError, match="expected shape"):
        gather(caches, [1], (1, 3), "cuda", out=chunk)
    with pytest.raises(ValueError, match="contiguous"):
        scatter(chunk.float(), caches, [1, 2], (1, 3), "cuda")
    with pytest.raises(ValueError, match="contiguous"):
        scatter(chunk.transpose(0, 1), caches, [1, 2], (1, 3), "cuda")
    with pytest.raises(ValueError, match="contiguous"):
        scatter(torch.empty(chunk.shape, dtype=chunk.dtype, device="meta"), caches, [1, 2],
                (1, 3), "cuda")
    with pytest.raises(ValueError, match="not the cpu layout"):
        gather(caches, [1], (0, 1), "cpu")
    with pytest.raises(ValueError, match="differ"):
        gather([caches[0], caches[1][:, :4]], [1], (0, 1), "cuda")
    with pytest.raises(ValueError, match="rows .* not contiguous"):
        gather([t.transpose(3, 4) for t in caches], [1], (0, 1), "cuda")
    with pytest.raises(ValueError, match="no KV layers"):
        gather([], [1], (0, 1), "cuda")
    assert same_bits(gather(caches, [1, 2], (1, 3), "cuda"), chunk)  # nothing was written

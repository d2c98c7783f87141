"""Triton gather/scatter between paged KV blocks and a chunk buffer.

One program copies one tile of one block's slab in one plane of one layer:

    grid = (P * n * num_tiles, L)      program (pid, layer):
        tile  = pid % num_tiles        block slab  = plane * n + i  (= pid // num_tiles)
        plane = slab // n              i-th selected block id = block_ids[slab % n]

Layers are separate allocations, so the kernel takes a table of their base addresses
(``layer_ptrs``, int64) and casts each to a pointer of the buffer's element type. Elements
are moved as same-width integers (bit-exact for bf16/fp16/fp32/fp8). All offsets are int64:
a layer can exceed 2**31 elements.

Head slices (``gather_heads_triton`` / ``scatter_heads_triton``) use one kernel for both
directions. One program copies one tile of rows of one head of one block in one plane of
one layer, a ``[TOKENS, ROW]`` tile (ROW = R rounded up to a power of two, masked):

    grid = (Hs * P * n * num_tiles, L)  program (pid, layer):
        tile = pid % num_tiles           slab = pid // num_tiles = (hi * P + plane) * n + i
        head = h0 + hi                   rows tile*TOKENS .. of head `head`, block block_ids[i]

The cache side reads rows of R contiguous elements ``token_stride`` apart (R for a
contiguous head: CPU layout, CUDA HND; H*R for CUDA NHD); the chunk side is contiguous.

Triton decides between compiling and interpreting when ``@triton.jit`` runs, i.e. when this
module is imported: with ``TRITON_INTERPRET=1`` set by then, the kernels run on CPU tensors
(slowly; for tests). Without it they need a GPU backend, and calling them on CPU tensors
raises RuntimeError. Tile sizes are a reasonable default, not tuned on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from .geometry import (
    HeadGeometry,
    KVLayout,
    PagedGeometry,
    bits,
    block_index,
    check_chunk,
    check_head_chunk,
    geometry,
    head_geometry,
    head_range,
)

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
MAX_TILE = 2048


# Kernel arguments are Triton values (pointers, scalars) with no Python annotation.
@triton.jit
def _gather_kernel(layer_ptrs, out_ptr, block_ids, num_sel, plane_stride,  # type: ignore[no-untyped-def]
                   block_stride, block_elems, TILE: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    num_tiles = (block_elems + TILE - 1) // TILE
    slab = pid // num_tiles
    blk = tl.load(block_ids + slab % num_sel).to(tl.int64)
    offs = (pid % num_tiles) * TILE + tl.arange(0, TILE)
    mask = offs < block_elems
    base = tl.load(layer_ptrs + layer).to(tl.pointer_type(out_ptr.dtype.element_ty))
    src = base + (slab // num_sel).to(tl.int64) * plane_stride + blk * block_stride + offs
    row = layer * (tl.num_programs(0) // num_tiles) + slab
    tl.store(out_ptr + row * block_elems + offs, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _scatter_kernel(layer_ptrs, chunk_ptr, block_ids, num_sel, plane_stride,  # type: ignore[no-untyped-def]
                    block_stride, block_elems, TILE: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    num_tiles = (block_elems + TILE - 1) // TILE
    slab = pid // num_tiles
    blk = tl.load(block_ids + slab % num_sel).to(tl.int64)
    offs = (pid % num_tiles) * TILE + tl.arange(0, TILE)
    mask = offs < block_elems
    base = tl.load(layer_ptrs + layer).to(tl.pointer_type(chunk_ptr.dtype.element_ty))
    dst = base + (slab // num_sel).to(tl.int64) * plane_stride + blk * block_stride + offs
    row = layer * (tl.num_programs(0) // num_tiles) + slab
    tl.store(dst, tl.load(chunk_ptr + row * block_elems + offs, mask=mask), mask=mask)


@triton.jit
def _heads_kernel(layer_ptrs, chunk_ptr, block_ids, num_sel, num_planes, head0,  # type: ignore[no-untyped-def]
                  plane_stride, block_stride, head_stride, token_stride, block_size, row,
                  TOKENS: tl.constexpr, ROW: tl.constexpr, GATHER: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    num_tiles = (block_size + TOKENS - 1) // TOKENS
    slab = pid // num_tiles  # (hi * P + plane) * n + i
    i = slab % num_sel
    plane = ((slab // num_sel) % num_planes).to(tl.int64)
    hi = (slab // num_sel // num_planes).to(tl.int64)
    blk = tl.load(block_ids + i).to(tl.int64)
    tok = ((pid % num_tiles) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)[:, None]
    col = tl.arange(0, ROW)[None, :]
    mask = (tok < block_size) & (col < row)
    base = tl.load(layer_ptrs + layer).to(tl.pointer_type(chunk_ptr.dtype.element_ty))
    cache = (base + plane * plane_stride + blk * block_stride + (head0 + hi) * head_stride
             + tok * token_stride + col)
    # Chunk [Hs, L, P, n, block_size * row]: slab (hi, layer, plane, i), then row by row.
    flat = ((hi * tl.num_programs(1) + layer) * num_planes + plane) * num_sel + i
    chunk = chunk_ptr + flat * block_size * row + tok * row + col
    if GATHER:
        tl.store(chunk, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(chunk, mask=mask), mask=mask)


def gather_triton(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.gather_reference``; ``tile`` is a power of two (elements
    per program; default min(2048, E rounded up)). Raises RuntimeError on CPU tensors unless
    the kernels were defined under ``TRITON_INTERPRET=1``."""
    g = geometry(kv_caches, layout)
    ids = block_index(block_ids, g, distinct=False)
    if out is None:
        out = torch.empty(g.chunk_shape(ids.numel()), dtype=g.dtype, device=g.device)
    dst = check_chunk(out, g, ids.numel())
    _launch(_gather_kernel, g, kv_caches, dst, ids, tile)
    return out


def scatter_triton(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
    tile: int | None = None,
) -> None:
    """Same contract as ``reference.scatter_reference`` (distinct ids); ``tile`` as in
    ``gather_triton``."""
    g = geometry(kv_caches, layout)
    ids = block_index(block_ids, g, distinct=True)
    src = check_chunk(chunk, g, ids.numel())
    _launch(_scatter_kernel, g, kv_caches, src, ids, tile)


def gather_heads_triton(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.gather_heads_reference``; ``tile`` is a power of two
    (elements per program, whole padded rows, at least one; default min(2048, D rounded up)).
    Raises RuntimeError on CPU tensors unless interpreted, as ``gather_triton``."""
    g = head_geometry(kv_caches, layout)
    h0, h1 = head_range(heads, g)
    ids = block_index(block_ids, g, distinct=False)
    if out is None:
        out = torch.empty(g.chunk_shape(h1 - h0, ids.numel()), dtype=g.dtype, device=g.device)
    dst = check_head_chunk(out, g, h1 - h0, ids.numel())
    _launch_heads(g, kv_caches, dst, ids, h0, h1, tile, gather=True)
    return out


def scatter_heads_triton(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
    tile: int | None = None,
) -> None:
    """Same contract as ``reference.scatter_heads_reference`` (distinct ids); ``tile`` as in
    ``gather_heads_triton``."""
    g = head_geometry(kv_caches, layout)
    h0, h1 = head_range(heads, g)
    ids = block_index(block_ids, g, distinct=True)
    src = check_head_chunk(chunk, g, h1 - h0, ids.numel())
    _launch_heads(g, kv_caches, src, ids, h0, h1, tile, gather=False)


def _launch_heads(g: HeadGeometry, kv_caches: Sequence[torch.Tensor], chunk_bits: torch.Tensor,
                  ids: torch.Tensor, h0: int, h1: int, tile: int | None, *,
                  gather: bool) -> None:
    _check_backend(g.device)
    row_p2 = triton.next_power_of_2(g.row)
    tile = tile or min(MAX_TILE, triton.next_power_of_2(g.head_elems))
    if tile & (tile - 1):
        raise ValueError(f"tile {tile} is not a power of two")
    tokens = max(1, min(tile // row_p2, triton.next_power_of_2(g.block_size)))
    num_sel = ids.numel()
    if num_sel == 0:
        return
    grid = ((h1 - h0) * g.num_planes * num_sel * triton.cdiv(g.block_size, tokens),
            g.num_layers)
    _heads_kernel[grid](_layer_ptrs(kv_caches, g.device), chunk_bits, ids, num_sel,
                        g.num_planes, h0, g.plane_stride, g.block_stride, g.head_stride,
                        g.token_stride, g.block_size, g.row,
                        TOKENS=tokens, ROW=row_p2, GATHER=gather)


def _check_backend(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("Triton has no CPU backend: use the torch path, or set "
                           "TRITON_INTERPRET=1 before importing disagg.kernels.triton_paged")


def _layer_ptrs(kv_caches: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    # Addresses of the integer views equal the tensors' own: bits() only relabels the dtype.
    return torch.tensor([bits(kv).data_ptr() for kv in kv_caches], dtype=torch.int64,
                        device=device)


def _launch(kernel: Any, g: PagedGeometry, kv_caches: Sequence[torch.Tensor], chunk_bits:
            torch.Tensor, ids: torch.Tensor, tile: int | None) -> None:
    _check_backend(g.device)
    tile = tile or min(MAX_TILE, triton.next_power_of_2(g.block_elems))
    if tile & (tile - 1):
        raise ValueError(f"tile {tile} is not a power of two")
    num_sel = ids.numel()
    if num_sel == 0:
        return
    grid = (g.num_planes * num_sel * triton.cdiv(g.block_elems, tile), g.num_layers)
    kernel[grid](_layer_ptrs(kv_caches, g.device), chunk_bits, ids, num_sel, g.plane_stride,
                 g.block_stride, g.block_elems, TILE=tile)

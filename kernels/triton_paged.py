"""Triton gather/scatter between paged KV blocks and a chunk buffer.

One program copies one tile of one block's slab in one plane of one layer:

    grid = (P * n * num_tiles, L)      program (pid, layer):
        tile  = pid % num_tiles        block slab  = plane * n + i  (= pid // num_tiles)
        plane = slab // n              i-th selected block id = block_ids[slab % n]

Layers are separate allocations, so the kernel takes a table of their base addresses
(``layer_ptrs``, int64) and casts each to a pointer of the buffer's element type. Elements
are moved as same-width integers (bit-exact for bf16/fp16/fp32/fp8). All offsets are int64:
a layer can exceed 2**31 elements.

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

from .geometry import KVLayout, PagedGeometry, bits, block_index, check_chunk, geometry

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


def _launch(kernel: Any, g: PagedGeometry, kv_caches: Sequence[torch.Tensor], chunk_bits:
            torch.Tensor, ids: torch.Tensor, tile: int | None) -> None:
    if g.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("Triton has no CPU backend: use the torch path, or set "
                           "TRITON_INTERPRET=1 before importing disagg.kernels.triton_paged")
    tile = tile or min(MAX_TILE, triton.next_power_of_2(g.block_elems))
    if tile & (tile - 1):
        raise ValueError(f"tile {tile} is not a power of two")
    num_sel = ids.numel()
    if num_sel == 0:
        return
    # Addresses of the integer views equal the tensors' own: bits() only relabels the dtype.
    layer_ptrs = torch.tensor([bits(kv).data_ptr() for kv in kv_caches], dtype=torch.int64,
                              device=g.device)
    grid = (g.num_planes * num_sel * triton.cdiv(g.block_elems, tile), g.num_layers)
    kernel[grid](layer_ptrs, chunk_bits, ids, num_sel, g.plane_stride, g.block_stride,
                 g.block_elems, TILE=tile)

"""Plain-torch gather/scatter between paged KV blocks (or KV head slices of them) and a
chunk buffer.

This is the definition the Triton kernels are tested against, and the path used wherever
Triton has no backend (CPU tensors). Layouts and the chunk buffer: ``geometry``'s docstring.

Blocks move as runs: consecutive ids (``b, b+1, ...``, common, since vLLM hands a new
request blocks in order from its free list) are one slice copy per layer and plane, a plain
memory copy. ``index_copy_``/``index_select`` on 16-bit CPU tensors take a generic
element-wise path several times slower than a copy (measured: 4x on 64 KiB blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .geometry import (
    KVLayout,
    block_index,
    check_chunk,
    check_head_chunk,
    geometry,
    head_geometry,
    head_range,
    head_view,
    plane_view,
)


def gather_reference(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of every layer into a chunk buffer ``[L, P, n, E]``.

    ``out`` (optional) is filled in place: a contiguous tensor of the cache's dtype and device
    with ``L * P * n * E`` elements. Returns the buffer. Raises ValueError on a layout, id or
    buffer mismatch (see ``geometry``). Repeated ids are allowed (the block is copied twice).
    """
    g = geometry(kv_caches, layout)
    ids = block_index(block_ids, g, distinct=False)
    if out is None:
        out = torch.empty(g.chunk_shape(ids.numel()), dtype=g.dtype, device=g.device)
    dst = check_chunk(out, g, ids.numel())
    runs = block_runs(ids)
    for layer, kv in enumerate(kv_caches):
        plane = plane_view(kv, g)
        for pos, block, n in runs:
            dst[layer, :, pos:pos + n].copy_(plane[:, block:block + n])
    return out


def scatter_reference(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
) -> None:
    """Copy a chunk buffer back into blocks ``block_ids`` of every layer, in place.

    The inverse of ``gather_reference`` for distinct ids. Raises ValueError on a layout,
    buffer or id mismatch, including a repeated id.
    """
    g = geometry(kv_caches, layout)
    ids = block_index(block_ids, g, distinct=True)
    src = check_chunk(chunk, g, ids.numel())
    runs = block_runs(ids)
    for layer, kv in enumerate(kv_caches):
        plane = plane_view(kv, g)
        for pos, block, n in runs:
            plane[:, block:block + n].copy_(src[layer, :, pos:pos + n])


def gather_heads_reference(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy KV heads ``h0 .. h1-1`` of blocks ``block_ids`` of every layer into a head chunk
    ``[Hs, L, P, n, D]`` (head-major; see ``geometry``'s docstring).

    ``heads`` = ``(h0, h1)``; ``out`` (optional) is filled in place: a contiguous tensor of the
    cache's dtype and device with ``Hs * L * P * n * D`` elements. Returns the buffer. Raises
    ValueError on a layout, head range, id or buffer mismatch (see ``head_geometry``,
    ``head_range``). Repeated ids are allowed (the block is copied twice).
    """
    g = head_geometry(kv_caches, layout)
    h0, h1 = head_range(heads, g)
    ids = block_index(block_ids, g, distinct=False)
    if out is None:
        out = torch.empty(g.chunk_shape(h1 - h0, ids.numel()), dtype=g.dtype, device=g.device)
    # [Hs, L, P, n, block_size, R]: a head's D elements are its rows in token order.
    dst = check_head_chunk(out, g, h1 - h0, ids.numel()).unflatten(-1, (g.block_size, g.row))
    runs = block_runs(ids)
    for layer, kv in enumerate(kv_caches):
        view = head_view(kv, g)[:, :, h0:h1]  # [P, num_blocks, Hs, block_size, R]
        for pos, block, n in runs:
            dst[:, layer, :, pos:pos + n].copy_(view[:, block:block + n].permute(2, 0, 1, 3, 4))
    return out


def scatter_heads_reference(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
) -> None:
    """Copy a head chunk ``[Hs, L, P, n, D]`` into KV heads ``h0 .. h1-1`` of blocks
    ``block_ids`` of every layer, in place; other heads and blocks are untouched.

    The inverse of ``gather_heads_reference`` for distinct ids. Raises ValueError on a
    layout, head range, buffer or id mismatch, including a repeated id.
    """
    g = head_geometry(kv_caches, layout)
    h0, h1 = head_range(heads, g)
    ids = block_index(block_ids, g, distinct=True)
    src = check_head_chunk(chunk, g, h1 - h0, ids.numel()).unflatten(-1, (g.block_size, g.row))
    runs = block_runs(ids)
    for layer, kv in enumerate(kv_caches):
        view = head_view(kv, g)[:, :, h0:h1]
        for pos, block, n in runs:
            view[:, block:block + n].copy_(src[:, layer, :, pos:pos + n].permute(1, 2, 0, 3, 4))


def block_runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(position in ids, first block, length)`` of each run of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(ids.tolist()):
        if runs and block == runs[-1][1] + runs[-1][2]:
            p, b, n = runs[-1]
            runs[-1] = (p, b, n + 1)
        else:
            runs.append((pos, block, 1))
    return runs

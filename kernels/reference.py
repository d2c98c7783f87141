"""Plain-torch gather/scatter between paged KV blocks and a chunk buffer.

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

from .geometry import KVLayout, block_index, check_chunk, geometry, plane_view


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

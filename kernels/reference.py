"""Plain-torch gather/scatter between paged KV blocks and a chunk buffer.

This is the definition the Triton kernels are tested against, and the path used wherever
Triton has no backend (CPU tensors). Layouts and the chunk buffer: ``geometry``'s docstring.
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
    for layer, kv in enumerate(kv_caches):
        torch.index_select(plane_view(kv, g), 1, ids, out=dst[layer])
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
    for layer, kv in enumerate(kv_caches):
        plane_view(kv, g).index_copy_(1, ids, src[layer])

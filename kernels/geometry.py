"""Where a block's elements live in each paged KV layout, and the chunk buffer they copy to.

vLLM hands one KV tensor per attention layer, all of one shape, dtype and device:

    KVLayout.CPU   [num_blocks, num_kv_heads, block_size, 2 * head_size]
                   one block = one slab of E = num_kv_heads * block_size * 2 * head_size
                   elements (1 plane)
    KVLayout.CUDA  [2, num_blocks, block_size, num_kv_heads, head_size]
                   K and V are separate planes; one block = one slab of
                   E = block_size * num_kv_heads * head_size elements in each of 2 planes

Either way a layer reads as ``[P, num_blocks, E]`` (P planes), and gathering blocks
``ids = [b0, b1, ..., b{n-1}]`` produces the *chunk buffer*, contiguous, shape ``[L, P, n, E]``:

    chunk buffer (L layers, P planes, n selected blocks, E elements per block and plane)
    +------------------------------- layer 0 -------------------------------+-- layer 1 --
    | plane 0: [ block b0 | block b1 | ... | block b{n-1} ] | plane 1 (CUDA) | ...
    +------------------------------------------------------------------------+------------
      each [ block b ] is the E elements of kv[b] (CPU) or kv[p, b] (CUDA), in memory order

So one layer of a chunk is itself a small KV cache of the same layout restricted to the
selected blocks. Copies move raw bits (``bits`` views the dtype as a same-width integer), so
NaN payloads and signed zeros survive bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch


class KVLayout(StrEnum):
    """Names are part of the store's fingerprint: chunk bytes depend on the layout."""

    CPU = "cpu"
    CUDA = "cuda"


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, slots=True)
class PagedGeometry:
    """One set of per-layer KV tensors, in elements (not bytes)."""

    layout: KVLayout
    num_layers: int
    num_planes: int
    num_blocks: int
    block_elems: int  # E: elements of one block in one plane
    plane_stride: int  # elements between plane 0 and plane 1 (unused with one plane)
    block_stride: int  # elements between block b and b + 1
    dtype: torch.dtype
    device: torch.device

    def chunk_shape(self, num_selected: int) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_planes, num_selected, self.block_elems)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the signed integer dtype of the same width (bit-exact copies)."""
    try:
        return t.view(_INT_OF_WIDTH[t.element_size()])
    except KeyError:
        raise ValueError(f"unsupported element size {t.element_size()} ({t.dtype})") from None


def geometry(kv_caches: Sequence[torch.Tensor], layout: KVLayout | str) -> PagedGeometry:
    """Describe ``kv_caches`` (one tensor per layer) in ``layout``.

    Raises ValueError when there are no layers, the layers differ in shape, stride, dtype or
    device, the rank does not match the layout, or a block is not one contiguous slab
    (the copies move whole slabs).
    """
    layout = KVLayout(layout)
    if not kv_caches:
        raise ValueError("no KV layers given")
    first = kv_caches[0]
    for t in kv_caches[1:]:
        if (t.shape, t.stride(), t.dtype, t.device) != (
            first.shape, first.stride(), first.dtype, first.device
        ):
            raise ValueError("KV layers differ in shape, stride, dtype or device")
    if layout is KVLayout.CPU:
        _expect(first.dim() == 4, first, layout)
        num_planes, num_blocks, plane_stride = 1, first.shape[0], 0
        block_stride, one_block = first.stride(0), first[0]
    else:
        _expect(first.dim() == 5 and first.shape[0] == 2, first, layout)
        num_planes, num_blocks, plane_stride = 2, first.shape[1], first.stride(0)
        block_stride, one_block = first.stride(1), first[0, 0]
    if not one_block.is_contiguous():
        raise ValueError(f"a block of the {layout.value} layout is not contiguous: "
                         f"strides {tuple(first.stride())}")
    return PagedGeometry(layout, len(kv_caches), num_planes, num_blocks, one_block.numel(),
                         plane_stride, block_stride, first.dtype, first.device)


def _expect(ok: bool, t: torch.Tensor, layout: KVLayout) -> None:
    if not ok:
        want = ("[num_blocks, num_kv_heads, block_size, 2*head_size]" if layout is KVLayout.CPU
                else "[2, num_blocks, block_size, num_kv_heads, head_size]")
        raise ValueError(f"KV shape {tuple(t.shape)} is not the {layout.value} layout {want}")


def plane_view(kv: torch.Tensor, g: PagedGeometry) -> torch.Tensor:
    """The integer view ``[P, num_blocks, E]`` of one layer, sharing its storage."""
    return bits(kv).as_strided(
        (g.num_planes, g.num_blocks, g.block_elems),
        (g.plane_stride or g.num_blocks * g.block_stride, g.block_stride, 1),
        kv.storage_offset(),
    )


def block_index(
    block_ids: Sequence[int] | torch.Tensor, g: PagedGeometry, *, distinct: bool
) -> torch.Tensor:
    """``block_ids`` as an int64 tensor on the cache's device, range-checked on the host.

    Raises ValueError for an id outside ``[0, num_blocks)`` (a kernel would touch memory it
    does not own), or, when ``distinct``, for a repeated id (scatter order would be undefined).
    """
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device="cpu").reshape(-1)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= g.num_blocks:
            raise ValueError(f"block ids span [{lo}, {hi}] outside [0, {g.num_blocks})")
        if distinct and torch.unique(ids).numel() != ids.numel():
            raise ValueError("block ids repeat: scatter target is ambiguous")
    return ids.to(g.device, non_blocking=True)


def check_chunk(chunk: torch.Tensor, g: PagedGeometry, num_selected: int) -> torch.Tensor:
    """The integer view of ``chunk`` shaped ``[L, P, n, E]``.

    Raises ValueError unless ``chunk`` is contiguous, on the cache's device, of the cache's
    dtype and holds exactly ``L * P * n * E`` elements (any shape with that many is accepted).
    """
    shape = g.chunk_shape(num_selected)
    if chunk.dtype != g.dtype or chunk.device != g.device or not chunk.is_contiguous():
        raise ValueError(f"chunk must be a contiguous {g.dtype} tensor on {g.device}, got "
                         f"{chunk.dtype} on {chunk.device} (contiguous={chunk.is_contiguous()})")
    if chunk.numel() != shape[0] * shape[1] * shape[2] * shape[3]:
        raise ValueError(f"chunk holds {chunk.numel()} elements, expected shape {shape}")
    return bits(chunk).view(shape)

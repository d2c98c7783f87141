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

Head slices (TP-independent chunks). With tensor parallelism each rank holds a range of the
KV heads, so a block's slab differs with the TP size. One KV head of one block does not:

    KVLayout.CPU   head h of block b = kv[b, h]        block_size rows of R = 2*head_size
    KVLayout.CUDA  head h of block b = kv[p, b, :, h]  block_size rows of R = head_size, per plane

``head_geometry`` reads where those rows live from the tensor's strides, so any physical
order of the dimensions works as long as a row (the last dimension) is contiguous; in
particular vLLM's two CUDA allocations of the logical shape [2, num_blocks, block_size, H, hs]:

    NHD  strides follow the logical order: a head's rows are H*hs elements apart
    HND  physically [2, num_blocks, H, block_size, hs] permuted to the logical shape: a
         head of a block is one contiguous slab of block_size*hs elements

``head_view`` shows a layer as ``[P, num_blocks, H, block_size, R]``. Gathering heads
``[h0, h1)`` of blocks ``ids`` produces the *head chunk*, contiguous, head-major, shape
``[Hs, L, P, n, D]`` with Hs = h1 - h0 and D = block_size * R (a head's rows, in token order):

    head chunk: [ head h0: [L, P, n, D] | head h0+1: [L, P, n, D] | ... | head h1-1 ]

Each head's part is the same bytes whichever TP size (and NHD or HND allocation) the cache
came from, so a TP-1 instance's chunk over all H heads equals the concatenation of the TP-2
ranks' chunks over their H/2 heads each, and per-head parts load into any TP arrangement.
"""

from __future__ import annotations

import math
import operator
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
    first = _uniform_layers(kv_caches)
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


@dataclass(frozen=True, slots=True)
class HeadGeometry:
    """One set of per-layer KV tensors seen per KV head, in elements (not bytes).

    A layer is ``[P, num_blocks, num_heads, block_size, row]`` at the given strides; rows
    are contiguous (stride 1 within a row).
    """

    layout: KVLayout
    num_layers: int
    num_planes: int
    num_blocks: int
    num_heads: int
    block_size: int
    row: int  # R: elements of one token of one head in one plane (2*head_size CPU, head_size CUDA)
    plane_stride: int  # elements between plane 0 and plane 1 (unused with one plane)
    block_stride: int  # elements between block b and b + 1
    head_stride: int  # elements between head h and h + 1 of a block
    token_stride: int  # elements between one row (token) of a head and the next
    dtype: torch.dtype
    device: torch.device

    @property
    def head_elems(self) -> int:
        """D: elements of one head of one block in one plane."""
        return self.block_size * self.row

    def chunk_shape(self, num_heads: int, num_selected: int) -> tuple[int, int, int, int, int]:
        """Shape of a head chunk holding ``num_heads`` heads of ``num_selected`` blocks."""
        return (num_heads, self.num_layers, self.num_planes, num_selected, self.head_elems)


def head_geometry(kv_caches: Sequence[torch.Tensor], layout: KVLayout | str) -> HeadGeometry:
    """Describe ``kv_caches`` (one tensor per layer) per KV head, from the tensors' strides.

    Unlike ``geometry`` a block need not be contiguous (NHD spreads a head's rows across the
    block; HND on CUDA makes the block itself non-contiguous). Raises ValueError when there
    are no layers, the layers differ in shape, stride, dtype or device, the rank does not
    match the layout, or the last dimension (a row) is not contiguous.
    """
    layout = KVLayout(layout)
    first = _uniform_layers(kv_caches)
    if layout is KVLayout.CPU:
        _expect(first.dim() == 4, first, layout)
        num_blocks, num_heads, block_size, row = first.shape
        block_stride, head_stride, token_stride, elem_stride = first.stride()
        num_planes, plane_stride = 1, 0
    else:
        _expect(first.dim() == 5 and first.shape[0] == 2, first, layout)
        num_planes, num_blocks, block_size, num_heads, row = first.shape
        plane_stride, block_stride, token_stride, head_stride, elem_stride = first.stride()
    if elem_stride != 1 and row > 1:
        raise ValueError(f"rows (the last dimension) of the {layout.value} layout are not "
                         f"contiguous: strides {tuple(first.stride())}")
    return HeadGeometry(layout, len(kv_caches), num_planes, num_blocks, num_heads, block_size,
                        row, plane_stride, block_stride, head_stride, token_stride,
                        first.dtype, first.device)


def head_view(kv: torch.Tensor, g: HeadGeometry) -> torch.Tensor:
    """The integer view ``[P, num_blocks, H, block_size, R]`` of one layer, sharing its
    storage (``kv`` must be one of the tensors ``g`` describes)."""
    return bits(kv).as_strided(
        (g.num_planes, g.num_blocks, g.num_heads, g.block_size, g.row),
        (g.plane_stride, g.block_stride, g.head_stride, g.token_stride, 1),
        kv.storage_offset(),
    )


def head_range(heads: tuple[int, int], g: HeadGeometry) -> tuple[int, int]:
    """``heads`` = ``(h0, h1)``, the KV heads ``h0 .. h1-1`` of the cache, checked.

    Raises ValueError unless ``0 <= h0 < h1 <= num_heads`` (an empty range is refused: it
    names no data and is almost certainly a caller's slicing mistake).
    """
    try:
        h0, h1 = (operator.index(h) for h in heads)
    except (TypeError, ValueError):
        raise ValueError(f"heads must be a pair of ints (h0, h1), got {heads!r}") from None
    if not 0 <= h0 < h1 <= g.num_heads:
        raise ValueError(f"head range [{h0}, {h1}) is empty or outside [0, {g.num_heads})")
    return h0, h1


def check_head_chunk(
    chunk: torch.Tensor, g: HeadGeometry, num_heads: int, num_selected: int
) -> torch.Tensor:
    """The integer view of ``chunk`` shaped ``[Hs, L, P, n, D]``.

    Raises ValueError unless ``chunk`` is contiguous, on the cache's device, of the cache's
    dtype and holds exactly ``Hs * L * P * n * D`` elements (any shape with that many).
    """
    return _check_buffer(chunk, g.dtype, g.device, g.chunk_shape(num_heads, num_selected))


def _uniform_layers(kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first layer, after checking there is one and all layers look alike."""
    if not kv_caches:
        raise ValueError("no KV layers given")
    first = kv_caches[0]
    for t in kv_caches[1:]:
        if (t.shape, t.stride(), t.dtype, t.device) != (
            first.shape, first.stride(), first.dtype, first.device
        ):
            raise ValueError("KV layers differ in shape, stride, dtype or device")
    return first


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
    block_ids: Sequence[int] | torch.Tensor, g: PagedGeometry | HeadGeometry, *, distinct: bool
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
    return _check_buffer(chunk, g.dtype, g.device, g.chunk_shape(num_selected))


def _check_buffer(chunk: torch.Tensor, dtype: torch.dtype, device: torch.device,
                  shape: tuple[int, ...]) -> torch.Tensor:
    if chunk.dtype != dtype or chunk.device != device or not chunk.is_contiguous():
        raise ValueError(f"chunk must be a contiguous {dtype} tensor on {device}, got "
                         f"{chunk.dtype} on {chunk.device} (contiguous={chunk.is_contiguous()})")
    if chunk.numel() != math.prod(shape):
        raise ValueError(f"chunk holds {chunk.numel()} elements, expected shape {shape}")
    return bits(chunk).view(shape)

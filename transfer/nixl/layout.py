"""Where each KV block lives in memory, and how a block list becomes few large descriptors.

vLLM hands the connector one tensor per attention layer. Two layouts matter:

    CPU backend:   [num_blocks, num_kv_heads, block_size, 2 * head_size]
                    one block = one contiguous slab holding its K and V
    CUDA (FA/FI):  [2, num_blocks, block_size, num_kv_heads, head_size]
                    K and V are separate planes; one block = one slab per plane

Either way a layer is a list of *planes*; in each plane block ``b`` starts at
``base + b * block_stride`` and spans ``block_bytes``. When ``block_bytes == block_stride``,
a run of consecutive block ids is one contiguous range, so a transfer of a request's blocks
needs one descriptor per (plane, run) instead of one per (plane, block).

Prefill and decode at different TP sizes hold different KV heads per rank
(``disagg.tp_layout``): a decode rank then reads a *head slice* of each remote block into a
head slice of its own. That takes a head-major block (each head one contiguous slab, heads
in order), which the CPU layout is and CUDA's is with ``VLLM_KV_CACHE_LAYOUT=HND``; a slice
is then one descriptor per block and plane (or per run, when it covers whole blocks on both
sides).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from disagg.tp_layout import HeadSlice


@dataclass(frozen=True, slots=True)
class Plane:
    """One block-indexed region of one layer's KV cache."""

    base: int  # address of block 0
    block_stride: int  # bytes between block b and b + 1
    block_bytes: int  # bytes of one block in this plane
    device_id: int = 0
    num_heads: int = 1  # KV heads in one block of this plane
    head_bytes: int = 0  # bytes of one head's slab in a block; 0: heads are interleaved
    num_blocks: int = 0  # blocks in this plane (0: unknown)

    @property
    def head_major(self) -> bool:
        return self.head_bytes * self.num_heads == self.block_bytes

    @property
    def contiguous(self) -> bool:
        return self.block_stride == self.block_bytes


@dataclass(frozen=True, slots=True)
class Run:
    """``length`` consecutive blocks: local ids from ``local``, remote ids from ``remote``."""

    local: int
    remote: int
    length: int


def planes_of(kv_cache: torch.Tensor, num_blocks: int) -> list[Plane]:
    """Describe one layer's KV tensor as block-indexed planes.

    Raises ValueError for a layout whose block dimension is neither 0 nor 1 (behind a
    leading K/V dimension of 2): such a cache cannot be addressed per block.
    """
    if kv_cache.shape[0] == num_blocks:
        # [blocks, heads, block_size, 2 * head_size] (CPU); [blocks, block_size, dim] (MLA)
        return [_plane(kv_cache, 0 if kv_cache.dim() == 4 else None)]
    if kv_cache.shape[0] == 2 and kv_cache.shape[1] == num_blocks:
        # [2, blocks, block_size, heads, head_size] (CUDA; HND strides make it head-major)
        return [_plane(kv_cache[i], 1) for i in range(2)]
    raise ValueError(
        f"unsupported KV cache shape {tuple(kv_cache.shape)} for {num_blocks} blocks: "
        "expected the block dimension first, or second behind a K/V dimension of 2"
    )


def _plane(blocks: torch.Tensor, head_dim: int | None) -> Plane:
    """``blocks``: [num_blocks, ...]; ``head_dim``: the heads' dimension within a block."""
    item = blocks.element_size()
    block = blocks[0]
    per_block = block.numel() * item
    heads = block.shape[head_dim] if head_dim is not None else 1
    head_bytes = per_block if heads == 1 else 0
    if heads > 1 and block.stride(head_dim) * heads == block.numel() and _dense(block):
        head_bytes = block.stride(head_dim) * item
    return Plane(blocks.data_ptr(), blocks.stride(0) * item, per_block,
                 blocks.device.index or 0, heads, head_bytes, blocks.shape[0])


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` elements in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def storage_regions(kv_caches: Iterable[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Distinct memory regions (addr, nbytes, device) backing the tensors, for registration.

    Layers often share one allocation; registering each storage once avoids overlapping
    registrations, which some NIXL backends reject.
    """
    seen: dict[int, tuple[int, int, int]] = {}
    for t in kv_caches:
        st = t.untyped_storage()
        seen[st.data_ptr()] = (st.data_ptr(), st.nbytes(), t.device.index or 0)
    return sorted(seen.values())


def strided_dlist(planes: Sequence[Plane]) -> np.ndarray:
    """Every block of every plane as one NIXL strided descriptor list (an Nx5 array of
    address, length, device, stride, count): block ``b`` of plane ``i`` is entry
    ``i * num_blocks + b`` of the list NIXL prepares from it (``block_indices``)."""
    if any(p.num_blocks < 1 for p in planes):
        raise ValueError("a plane without a block count cannot be prepared")
    return np.array([(p.base, p.block_bytes, p.device_id, p.block_stride, p.num_blocks)
                     for p in planes], dtype=np.uint64)


def block_indices(offsets: Sequence[int], block_ids: Sequence[int]) -> list[int]:
    """Indices into a ``strided_dlist`` (``offsets``: each plane's first entry) of
    ``block_ids`` in every plane, plane after plane. A plain list: for the few hundred ids
    of a pull, numpy's per-call overhead costs more than the loop."""
    return [o + b for o in offsets for b in block_ids]


def count_runs(local_ids: Sequence[int], remote_ids: Sequence[int]) -> int:
    """How many runs ``coalesce`` makes of these pairs, without building them."""
    runs = 1 if local_ids else 0
    for i in range(1, len(local_ids)):
        if local_ids[i] != local_ids[i - 1] + 1 or remote_ids[i] != remote_ids[i - 1] + 1:
            runs += 1
    return runs


def coalesce(local_ids: Sequence[int], remote_ids: Sequence[int]) -> list[Run]:
    """Group paired block ids into runs that are consecutive on both sides.

    ``local_ids[i]`` receives ``remote_ids[i]``; both lists have the same length.
    """
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"{len(local_ids)} local blocks for {len(remote_ids)} remote blocks")
    runs: list[Run] = []
    for lo, re in zip(local_ids, remote_ids, strict=True):
        last = runs[-1] if runs else None
        if last and lo == last.local + last.length and re == last.remote + last.length:
            runs[-1] = Run(last.local, last.remote, last.length + 1)
        else:
            runs.append(Run(lo, re, 1))
    return runs


def descriptors(
    planes: Sequence[Plane], runs: Sequence[Run], side: str
) -> list[tuple[int, int, int]]:
    """NIXL (addr, nbytes, device) descriptors for ``runs`` on one side ('local'/'remote').

    Both sides must produce the same number of descriptors in the same order with equal
    sizes; planes that are not contiguous fall back to one descriptor per block.
    """
    out: list[tuple[int, int, int]] = []
    for plane in planes:
        for run in runs:
            start = run.local if side == "local" else run.remote
            if plane.contiguous:
                out.append((plane.base + start * plane.block_stride,
                            run.length * plane.block_bytes, plane.device_id))
            else:
                out.extend(
                    (plane.base + (start + i) * plane.block_stride, plane.block_bytes,
                     plane.device_id)
                    for i in range(run.length)
                )
    return out


def slice_descriptors(
    local: Sequence[Plane], remote: Sequence[Plane], runs: Sequence[Run],
    heads: HeadSlice | None = None,
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Matching (local, remote) NIXL descriptors moving ``runs`` of blocks, all heads or the
    head slice ``heads``, plane by plane.

    A slice that covers whole blocks on both sides is the plain block transfer
    (``descriptors``); any other slice is one descriptor per block and plane. Raises
    ValueError when the planes do not pair up or a slice needs a layout that is not
    head-major."""
    if len(local) != len(remote):
        raise ValueError(f"peer has {len(remote)} KV planes, we have {len(local)}")
    whole = heads is None or all(
        heads.num_heads == lp.num_heads == rp.num_heads for lp, rp in zip(local, remote, strict=True))
    if whole:
        return descriptors(local, runs, "local"), descriptors(remote, runs, "remote")
    assert heads is not None
    lo: list[tuple[int, int, int]] = []
    re: list[tuple[int, int, int]] = []
    for lp, rp in zip(local, remote, strict=True):
        if not (lp.head_major and rp.head_major) or lp.head_bytes != rp.head_bytes:
            raise ValueError("a head slice needs head-major KV blocks with equal head sizes on "
                             f"both sides (ours {lp.head_bytes} B x {lp.num_heads} heads, "
                             f"peer's {rp.head_bytes} B x {rp.num_heads})")
        if (heads.local_head + heads.num_heads > lp.num_heads
                or heads.remote_head + heads.num_heads > rp.num_heads):
            raise ValueError(f"head slice {heads} outside {lp.num_heads} local / "
                             f"{rp.num_heads} remote heads")
        size = heads.num_heads * lp.head_bytes
        l_off, r_off = heads.local_head * lp.head_bytes, heads.remote_head * rp.head_bytes
        for run in runs:
            for i in range(run.length):
                lo.append((lp.base + (run.local + i) * lp.block_stride + l_off, size,
                           lp.device_id))
                re.append((rp.base + (run.remote + i) * rp.block_stride + r_off, size,
                           rp.device_id))
    return lo, re

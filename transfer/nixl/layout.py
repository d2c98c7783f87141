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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Plane:
    """One block-indexed region of one layer's KV cache."""

    base: int  # address of block 0
    block_stride: int  # bytes between block b and b + 1
    block_bytes: int  # bytes of one block in this plane
    device_id: int = 0

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
    dev = kv_cache.device.index or 0
    item = kv_cache.element_size()
    if kv_cache.shape[0] == num_blocks:
        stride = kv_cache.stride(0) * item
        per_block = kv_cache[0].numel() * item
        return [Plane(kv_cache.data_ptr(), stride, per_block, dev)]
    if kv_cache.shape[0] == 2 and kv_cache.shape[1] == num_blocks:
        return [planes_of(kv_cache[i], num_blocks)[0] for i in range(2)]
    raise ValueError(
        f"unsupported KV cache shape {tuple(kv_cache.shape)} for {num_blocks} blocks: "
        "expected the block dimension first, or second behind a K/V dimension of 2"
    )


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

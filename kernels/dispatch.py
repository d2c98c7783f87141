"""Pick the gather/scatter implementation for the tensors at hand.

CUDA tensors go to the Triton kernels (imported lazily: importing Triton costs seconds and
nothing on the CPU path needs it); CPU tensors go to the torch reference, because Triton has
no CPU backend here. ``impl`` forces one ("torch" or "triton") for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Literal

import torch

from .geometry import KVLayout
from .reference import (
    gather_heads_reference,
    gather_reference,
    scatter_heads_reference,
    scatter_reference,
)

Impl = Literal["auto", "torch", "triton"]


def gather_blocks(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of every layer into a chunk buffer ``[L, P, n, E]``.

    Contract as ``reference.gather_reference``: raises ValueError on a layout, id or buffer
    mismatch; asynchronous with respect to the host on CUDA (stream order, like any kernel).
    """
    if _use_triton(kv_caches, impl):
        from .triton_paged import gather_triton  # here: Triton is optional and slow to load

        return gather_triton(kv_caches, block_ids, layout, out)
    return gather_reference(kv_caches, block_ids, layout, out)


def scatter_blocks(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    layout: KVLayout | str,
    impl: Impl = "auto",
) -> None:
    """Copy a chunk buffer back into distinct blocks ``block_ids`` of every layer, in place.

    Contract as ``reference.scatter_reference``: raises ValueError on a mismatch or a
    repeated id.
    """
    if _use_triton(kv_caches, impl):
        from .triton_paged import scatter_triton  # as in gather_blocks

        scatter_triton(chunk, kv_caches, block_ids, layout)
    else:
        scatter_reference(chunk, kv_caches, block_ids, layout)


def gather_heads(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
    out: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Copy KV heads ``h0 .. h1-1`` (``heads`` = ``(h0, h1)``) of blocks ``block_ids`` of every
    layer into a head-major chunk ``[Hs, L, P, n, D]``; ``out[i]`` is head ``h0 + i``'s
    TP-independent part.

    Contract as ``reference.gather_heads_reference``: raises ValueError on a layout, head
    range, id or buffer mismatch; asynchronous with respect to the host on CUDA.
    """
    if _use_triton(kv_caches, impl):
        from .triton_paged import gather_heads_triton  # as in gather_blocks

        return gather_heads_triton(kv_caches, block_ids, heads, layout, out)
    return gather_heads_reference(kv_caches, block_ids, heads, layout, out)


def scatter_heads(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    heads: tuple[int, int],
    layout: KVLayout | str,
    impl: Impl = "auto",
) -> None:
    """Copy a head chunk ``[Hs, L, P, n, D]`` into KV heads ``h0 .. h1-1`` of distinct blocks
    ``block_ids`` of every layer, in place.

    Contract as ``reference.scatter_heads_reference``: raises ValueError on a mismatch or a
    repeated id.
    """
    if _use_triton(kv_caches, impl):
        from .triton_paged import scatter_heads_triton  # as in gather_blocks

        scatter_heads_triton(chunk, kv_caches, block_ids, heads, layout)
    else:
        scatter_heads_reference(chunk, kv_caches, block_ids, heads, layout)


def _use_triton(kv_caches: Sequence[torch.Tensor], impl: Impl) -> bool:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown impl {impl!r}: expected 'auto', 'torch' or 'triton'")
    if impl != "auto":
        return impl == "triton"
    return bool(kv_caches) and kv_caches[0].is_cuda and triton_available()


@cache
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of torch; absent, use torch)."""
    try:
        import triton  # noqa: F401  # here: the question is whether it imports at all
    except ImportError:
        return False
    return True

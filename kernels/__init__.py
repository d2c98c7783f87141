"""Copies between vLLM's paged KV blocks and contiguous chunk buffers (for the KV store).

``gather_blocks`` / ``scatter_blocks`` (whole blocks) and ``gather_heads`` / ``scatter_heads``
(KV head slices of blocks, a TP-independent chunk format) pick Triton for CUDA tensors and
plain torch for CPU tensors. Layouts and the chunk buffer formats: ``geometry``.
"""

from .dispatch import gather_blocks, gather_heads, scatter_blocks, scatter_heads, triton_available
from .geometry import HeadGeometry, KVLayout, PagedGeometry, geometry, head_geometry, head_view
from .reference import (
    gather_heads_reference,
    gather_reference,
    scatter_heads_reference,
    scatter_reference,
)

__all__ = [
    "HeadGeometry",
    "KVLayout",
    "PagedGeometry",
    "gather_blocks",
    "gather_heads",
    "gather_heads_reference",
    "gather_reference",
    "geometry",
    "head_geometry",
    "head_view",
    "scatter_blocks",
    "scatter_heads",
    "scatter_heads_reference",
    "scatter_reference",
    "triton_available",
]

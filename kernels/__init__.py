"""Copies between vLLM's paged KV blocks and contiguous chunk buffers (for the KV store).

``gather_blocks`` / ``scatter_blocks`` pick Triton for CUDA tensors and plain torch for CPU
tensors. Layouts and the chunk buffer format: ``geometry``.
"""

from .dispatch import gather_blocks, scatter_blocks, triton_available
from .geometry import KVLayout, PagedGeometry, geometry
from .reference import gather_reference, scatter_reference

__all__ = [
    "KVLayout",
    "PagedGeometry",
    "gather_blocks",
    "gather_reference",
    "geometry",
    "scatter_blocks",
    "scatter_reference",
    "triton_available",
]

"""The interface every KV store tier implements.

A backend maps ``ChunkKey`` to an immutable ``bytes`` value under a hard byte cap, evicting
least recently used entries to make room. Values are ``bytes`` on purpose: a value handed to
one reader can be shared with the next without a copy, and no caller can change what the
store holds through it (wrap it with ``torch.frombuffer`` / ``memoryview`` to read without
copying). ``put`` accepts any bytes-like object and copies it.

Contracts every implementation keeps (tested over all of them in test_store_backends.py):
  - thread-safe: any method may be called from any thread concurrently;
  - ``used_bytes <= capacity_bytes`` at every instant, counting the backend's own overhead
    (e.g. file headers) as the backend documents;
  - ``contains`` and ``keys`` do not change recency; ``get`` and ``put`` make the entry the
    most recently used;
  - an entry larger than the whole capacity is refused (``put`` returns False), without
    evicting anything;
  - a corrupt entry is never returned: it reads as a miss and is dropped.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from .keys import ChunkKey

# What ``put`` accepts (anything exposing a contiguous byte buffer, e.g. a numpy array's
# ``memoryview``); ``collections.abc.Buffer`` would say it better but needs Python 3.12.
BytesLike = bytes | bytearray | memoryview


class StoreBackend(ABC):
    """One tier. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "backend"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        # Monotonic counters, read by TieredStore's stats.
        self.evicted_bytes = 0
        self.evicted_entries = 0
        self.corrupt_entries = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes charged against the cap now."""

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Whether ``key`` is stored; side-effect free (recency unchanged)."""

    @abstractmethod
    def get(self, key: ChunkKey) -> bytes | None:
        """The value, or None on a miss (including a corrupt entry, which is dropped)."""

    @abstractmethod
    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        """Store ``data`` under ``key``, replacing any previous value and evicting least
        recently used entries as needed. Returns False (nothing changed) when the entry
        cannot fit even in an empty tier. Raises OSError on an I/O failure."""

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key``; returns whether it was present."""

    @abstractmethod
    def keys(self) -> list[ChunkKey]:
        """Snapshot of stored keys, least recently used first (for index export)."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Assert internal invariants (accounting, cap, index/storage agreement).
        Raises AssertionError naming the broken invariant."""

    def close(self) -> None:  # noqa: B027  (optional hook: most tiers hold nothing to release)
        """Release resources (files, locks, connections). Idempotent."""

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(used={self.used_bytes}, "
                f"capacity={self.capacity_bytes}, entries={len(self)})")

"""CPU memory tier: an LRU of immutable ``bytes`` under a hard byte cap."""

from __future__ import annotations

from collections import OrderedDict

from .backend import BytesLike, StoreBackend
from .keys import ChunkKey


class CpuBackend(StoreBackend):
    """LRU in process memory. Thread-safe (one lock around the index).

    ``used_bytes`` counts value bytes only; the per-entry bookkeeping (~200 bytes of Python
    objects) is not charged, so size the cap with a little headroom.
    """

    name = "cpu"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._entries: OrderedDict[ChunkKey, bytes] = OrderedDict()  # LRU first
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        value = bytes(data)  # copy outside the lock; a no-op for ``bytes``
        if len(value) > self._capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= len(old)
            self._evict_for(len(value))
            self._entries[key] = value
            self._used += len(value)
        return True

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= len(old)
            return old is not None

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._entries)

    def check_integrity(self) -> None:
        with self._lock:
            total = sum(len(v) for v in self._entries.values())
            assert total == self._used, f"used_bytes {self._used} != sum of entries {total}"
            assert self._used <= self._capacity, f"used {self._used} > cap {self._capacity}"

    def _evict_for(self, size: int) -> None:
        """Drop least recently used entries until ``size`` more bytes fit. Caller holds lock."""
        while self._entries and self._used + size > self._capacity:
            _, value = self._entries.popitem(last=False)
            self._used -= len(value)
            self.evicted_bytes += len(value)
            self.evicted_entries += 1

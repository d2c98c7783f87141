"""The KV store: chunk keys, storage tiers behind one interface, their tiered stack, and the
connector's I/O against it.

    keys.py     ChunkKey, KVFingerprint, chunk_keys(): deterministic chained chunk hashes
    backend.py  StoreBackend: the interface every tier implements (contracts in its docstring);
                CircuitBreaker and TierUnavailable (a tier bypassed during an outage)
    cpu.py      CpuBackend: in-memory LRU under a byte cap
    disk.py     DiskBackend: checksummed files, atomic writes, index rebuilt on restart
    redis.py    RedisBackend: one LRU in Redis shared by every instance; atomic Lua scripts
    tiered.py   TieredStore: lookup down the tiers, promotion, background write-through
    io.py       the worker half's chunk I/O: build_store(StoreConfig), ChunkCodec,
                StoreLoader, StoreSaver (imports torch and the kernels: not re-exported here)
    lookup.py   LookupServer / LookupClient: the scheduler half asks what the store holds

``BACKENDS`` names every tier class; ``io.build_store`` stacks the tiers a ``StoreConfig``
names. The names the gateway's prefix index gives store tiers (``store:redis``...) live in
``disagg.tiers``; the test doubles (FakeBackend, local_redis) in ``tests/support``.
"""

from .backend import CircuitBreaker, StoreBackend, TierUnavailable
from .cpu import CpuBackend
from .disk import DiskBackend
from .keys import (
    DEFAULT_CHUNK_TOKENS,
    ChunkKey,
    KVFingerprint,
    chunk_keys,
    chunk_tokens_for,
)
from .redis import RedisBackend
from .tiered import StoreStats, TieredStore, TierStats

BACKENDS: dict[str, type[StoreBackend]] = {
    "cpu": CpuBackend,
    "disk": DiskBackend,
    "redis": RedisBackend,
}

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_TOKENS",
    "ChunkKey",
    "CircuitBreaker",
    "CpuBackend",
    "DiskBackend",
    "KVFingerprint",
    "RedisBackend",
    "StoreBackend",
    "StoreStats",
    "TierStats",
    "TierUnavailable",
    "TieredStore",
    "chunk_keys",
    "chunk_tokens_for",
]

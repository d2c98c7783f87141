"""The KV store: chunk keys, storage tiers behind one interface, and their tiered stack.

    keys.py     ChunkKey, KVFingerprint, chunk_keys(): deterministic chained chunk hashes
    backend.py  StoreBackend: the interface every tier implements (contracts in its docstring)
    cpu.py      CpuBackend: in-memory LRU under a byte cap
    disk.py     DiskBackend: checksummed files, atomic writes, index rebuilt on restart
    fake.py     FakeBackend: CpuBackend with failure and latency injection, for tests
    redis.py    RedisBackend: one LRU in Redis shared by every instance; atomic Lua scripts
    redis_server.py  local_redis(): a throwaway redis-server for tests
    tiered.py   TieredStore: lookup down the tiers, promotion, background write-through
    holders.py  the names the gateway's prefix index gives store tiers (``store:redis``...)

Tiers are chosen by name through ``BACKENDS`` (config passes the name and its arguments).
"""

from .backend import StoreBackend
from .cpu import CpuBackend
from .disk import DiskBackend
from .fake import FakeBackend
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
    "CpuBackend",
    "DiskBackend",
    "FakeBackend",
    "KVFingerprint",
    "RedisBackend",
    "StoreBackend",
    "StoreStats",
    "TierStats",
    "TieredStore",
    "chunk_keys",
    "chunk_tokens_for",
]

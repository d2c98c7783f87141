"""Redis tier: one LRU under one byte cap, shared by every instance on every host.

Keys under the namespace ``ns`` (one standalone Redis database; Redis >= 7, not Cluster):

    ns:v:<64 hex digits>   an entry: blake2b-256 checksum (32 B) then the value
    ns:size                hash  hex -> stored length (checksum included)
    ns:lru                 zset  hex -> tick of its last get/put (lowest = least recent)
    ns:used                int   sum of ns:size, the bytes charged against the cap
    ns:tick                int   the recency clock
    ns:cap                 int   the capacity the last instance started with

Accounting and LRU live in Redis, not in the process: several processes share the store, so
every operation that changes them is one Lua script, atomic on the server. ``put`` drops the
old value, evicts least recently used entries until the new one fits, then stores it, all in
one script, so ``used <= cap`` holds for every observer at every instant.

``used_bytes`` counts stored lengths (value + ``CHECKSUM_SIZE``); Redis's own per-key memory
(~100-200 B per entry across the string, hash and zset) is not charged, so give the server a
``maxmemory`` above the cap with headroom and ``maxmemory-policy noeviction`` (an evicting
policy would drop keys behind the accounting; a vanished value is forgotten when read, but
a dropped index key breaks it). Instances sharing a namespace must agree on the capacity:
each put enforces its caller's cap (a different one is logged at start).

The checksum covers the chunk key and the value (keyed blake2b), so a flipped bit, a truncated
value or a value under the wrong key reads as a miss and is dropped. Every network call has
``socket_timeout_s`` and no retry; any Redis failure (unreachable or hung server, read-only
replica, out of memory, BUSY, auth) raises ``RedisTierError``, an OSError, which TieredStore
counts as a miss or a skipped write, as it does for disk I/O errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .backend import BytesLike, StoreBackend
from .keys import ChunkKey

logger = logging.getLogger(__name__)

CHECKSUM_SIZE = 32
_PERSON = b"disagg-redis-v1"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # no glob or separator characters


class RedisTierError(OSError):
    """Redis could not be reached in time, or failed the command (redis-py's RedisError:
    ConnectionError, TimeoutError, OutOfMemoryError, ReadOnlyError, ... is the cause)."""


# -- server-side scripts --------------------------------------------------------------------
# KEYS = ns:lru, ns:size, ns:used, ns:tick, ns:cap; ARGV[1] = "ns:v:" (value key prefix).
# Value keys other than the target are built from ARGV[1], which standalone Redis allows.

_LIB = """
local lru, sizes, used_key, tick_key, cap_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local vprefix = ARGV[1]
-- Forget hex everywhere; its recorded size, or nil if it was not indexed.
local function drop(hex)
  local size = tonumber(redis.call('HGET', sizes, hex))
  redis.call('DEL', vprefix .. hex)
  redis.call('ZREM', lru, hex)
  if size then
    redis.call('HDEL', sizes, hex)
    redis.call('DECRBY', used_key, size)
  end
  return size
end
-- Drop least recently used entries until size more bytes fit under cap.
local function evict_for(size, cap)
  local n, bytes = 0, 0
  local used = tonumber(redis.call('GET', used_key) or '0')
  while used + size > cap do
    local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
    if not oldest then break end
    local s = drop(oldest) or 0
    used, n, bytes = used - s, n + 1, bytes + s
  end
  return n, bytes, used
end
"""

# ARGV[2] hex, ARGV[3] blob, ARGV[4] cap -> {stored 0/1, evicted entries, evicted bytes}.
# Denied up front (no partial effect) while Redis is over maxmemory.
_PUT = "#!lua flags=no-cluster\n" + _LIB + """
local hex, blob, cap = ARGV[2], ARGV[3], tonumber(ARGV[4])
if #blob > cap then return {0, 0, 0} end
drop(hex)
local n, bytes, used = evict_for(#blob, cap)
redis.call('SET', vprefix .. hex, blob)
redis.call('HSET', sizes, hex, #blob)
redis.call('ZADD', lru, redis.call('INCR', tick_key), hex)
redis.call('INCRBY', used_key, #blob)
return {1, n, bytes}
"""

# ARGV[2] hex -> blob or nil; a hit becomes most recent, a vanished value is forgotten.
_GET = "#!lua flags=no-cluster,allow-oom\n" + _LIB + """
local hex = ARGV[2]
local blob = redis.call('GET', vprefix .. hex)
if not blob then
  if redis.call('HEXISTS', sizes, hex) == 1 then drop(hex) end
  return false
end
redis.call('ZADD', lru, 'XX', redis.call('INCR', tick_key), hex)
return blob
"""

# ARGV[2] hex, ARGV[3] expected blob or "" (any) -> 1 if dropped. The expected blob keeps a
# reader from dropping a good value that a concurrent put stored after its corrupt read.
_DROP = "#!lua flags=no-cluster,allow-oom\n" + _LIB + """
local hex, expected = ARGV[2], ARGV[3]
if expected ~= '' and redis.call('GET', vprefix .. hex) ~= expected then return 0 end
return drop(hex) and 1 or 0
"""

# ARGV[2] cap -> {previous cap or -1, evicted entries, evicted bytes}.
_TRIM = "#!lua flags=no-cluster,allow-oom\n" + _LIB + """
local cap = tonumber(ARGV[2])
local previous = tonumber(redis.call('GET', cap_key) or '-1')
redis.call('SET', cap_key, cap)
local n, bytes = evict_for(0, cap)
return {previous, n, bytes}
"""

# -> {used, sum of sizes, #sizes, #lru, #value keys, [hex whose index and value disagree]}.
_CHECK = "#!lua flags=no-cluster,no-writes\n" + _LIB + """
local used = tonumber(redis.call('GET', used_key) or '0')
local total, count, bad = 0, 0, {}
local all = redis.call('HGETALL', sizes)
for i = 1, #all, 2 do
  local hex, size = all[i], tonumber(all[i + 1])
  total, count = total + size, count + 1
  if redis.call('STRLEN', vprefix .. hex) ~= size or not redis.call('ZSCORE', lru, hex) then
    table.insert(bad, hex)
  end
end
local values = #redis.call('KEYS', vprefix .. '*')
return {used, total, count, redis.call('ZCARD', lru), values, bad}
"""


class RedisBackend(StoreBackend):
    """The shared Redis tier. Thread-safe (redis-py's connection pool; all shared state is
    changed by atomic scripts) and safe across processes and hosts.

    Construction does not need the server: it only trims the store to ``capacity_bytes``
    when the server answers (a smaller cap than last time evicts at once).
    """

    name = "redis"

    def __init__(self, capacity_bytes: int, url: str = "redis://127.0.0.1:6379/0",
                 namespace: str = "disagg", socket_timeout_s: float = 2.0) -> None:
        super().__init__(capacity_bytes)
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        if socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be positive, got {socket_timeout_s}")
        self.namespace = namespace
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        kw = self._client.connection_pool.connection_kwargs
        self.where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
        self._keys = [f"{namespace}:{k}" for k in ("lru", "size", "used", "tick", "cap")]
        self._vprefix = f"{namespace}:v:"
        self._scripts = {name: self._client.register_script(src) for name, src in
                         [("put", _PUT), ("get", _GET), ("drop", _DROP), ("trim", _TRIM),
                          ("check", _CHECK)]}
        self._last_used = 0
        self._closed = False
        self._trim_best_effort()

    # -- public API --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """The shared counter; when Redis does not answer, the last value read (a gauge for
        stats must not raise)."""
        try:
            with self._errors("used_bytes"):
                self._last_used = int(self._client.get(self._keys[2]) or 0)
        except RedisTierError:
            logger.debug("redis tier %s: used_bytes unavailable", self.where, exc_info=True)
        return self._last_used

    def contains(self, key: ChunkKey) -> bool:
        with self._errors("contains"):
            return bool(self._client.hexists(self._keys[1], key.hex))

    def get(self, key: ChunkKey) -> bytes | None:
        blob = self._run("get", key.hex)
        if blob is None:
            return None
        body = memoryview(blob)[CHECKSUM_SIZE:]
        if len(blob) < CHECKSUM_SIZE or blob[:CHECKSUM_SIZE] != _checksum(key, body):
            self._drop_corrupt(key, blob)
            return None
        return bytes(body)

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        value = memoryview(data).cast("B")
        if CHECKSUM_SIZE + value.nbytes > self._capacity:
            return False
        if self._closed:
            raise RuntimeError(f"RedisBackend({self.where}, {self.namespace}) is closed")
        blob = b"".join((_checksum(key, value), value))
        stored, evicted, evicted_bytes = self._run("put", key.hex, blob, self._capacity)
        self._count_evictions(evicted, evicted_bytes)
        return bool(stored)

    def delete(self, key: ChunkKey) -> bool:
        return bool(self._run("drop", key.hex, b""))

    def keys(self) -> list[ChunkKey]:
        with self._errors("keys"):
            # bytes: the client does not decode responses
            members = cast(list[bytes], self._client.zrange(self._keys[0], 0, -1))
        return [ChunkKey.from_hex(m.decode()) for m in members]

    def check_integrity(self) -> None:
        """One atomic snapshot; O(entries) on the server and scans the database's keys:
        for tests and debugging, not for a hot path."""
        used, total, count, ranked, values, bad = self._run("check")
        assert used == total, f"used counter {used} != sum of sizes {total}"
        assert used <= self._capacity, f"used {used} > cap {self._capacity}"
        assert count == ranked, f"{count} sized entries but {ranked} in the LRU"
        assert count == values, f"{count} sized entries but {values} value keys"
        assert not bad, f"value length or LRU entry disagrees with the index for {bad[:3]}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    # -- internals -------------------------------------------------------------------------

    def _run(self, script: str, *args: bytes | str | int) -> Any:
        with self._errors(script):
            return self._scripts[script](keys=self._keys, args=[self._vprefix, *args])

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.RedisError as e:
            raise RedisTierError(f"redis tier {self.where} ({what}): "
                                 f"{type(e).__name__}: {e}") from e

    def _drop_corrupt(self, key: ChunkKey, blob: bytes) -> None:
        logger.warning("redis tier %s: corrupt entry %s dropped", self.where, key)
        if self._run("drop", key.hex, blob):
            with self._lock:
                self.corrupt_entries += 1

    def _count_evictions(self, entries: int, nbytes: int) -> None:
        if entries:
            with self._lock:
                self.evicted_entries += entries
                self.evicted_bytes += nbytes

    def _trim_best_effort(self) -> None:
        try:
            previous, evicted, evicted_bytes = self._run("trim", self._capacity)
        except RedisTierError as e:
            logger.warning("redis tier %s unreachable at start (%s); will retry per call",
                           self.where, e)
            return
        if previous not in (-1, self._capacity):
            logger.warning("redis tier %s namespace %s: capacity %d, but the last instance "
                           "started with %d; instances must agree", self.where,
                           self.namespace, self._capacity, previous)
        self._count_evictions(evicted, evicted_bytes)


def _checksum(key: ChunkKey, value: memoryview) -> bytes:
    """blake2b-256 of the value, keyed by the chunk key (a value under the wrong key fails)."""
    return hashlib.blake2b(value, digest_size=CHECKSUM_SIZE, key=key.digest,
                           person=_PERSON).digest()

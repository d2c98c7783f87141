"""Redis tier: one LRU under one byte cap, shared by every instance on every host.

Keys under the namespace ``ns`` (one standalone Redis database; Redis >= 7, not Cluster):

    ns:v:<64 hex digits>   an entry's value
    ns:sum                 hash  hex -> its XXH3-128 checksum (16 B)
    ns:size                hash  hex -> stored length (value and checksum)
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

The checksum covers the chunk key and the value (XXH3-128, tens of GB/s: a cryptographic hash
would cost more than the copy itself), so a flipped bit, a truncated value or a value under
the wrong key reads as a miss and is dropped (``corrupt_entries``). It guards against damage,
not against a writer with access to the server: that is what its password and TLS are for.
The checksum lives beside the value, not in it, so a read hands the value on without
slicing it out (a copy of every byte). Entries of the earlier format (a 32-byte blake2b
prefix in the value, no ``ns:sum``) read as corrupt and are dropped.

Batches. ``contains_many`` is one HMGET; ``get_many`` one MULTI/EXEC of plain GETs and an
HMGET of their checksums (atomic: a value and its checksum always match; no script copies
the values on the server), then one script that makes the hits most recent.
Every network call has ``socket_timeout_s`` and no retry; any Redis failure (unreachable or
hung server, read-only replica, out of memory, BUSY, auth) raises ``RedisTierError``, an
OSError, which TieredStore counts as a miss or a skipped write, as it does for disk I/O errors.

Outages. A failure to reach the server (connection refused or reset, timeout, TLS or auth
failure at connect, server still loading) opens a ``CircuitBreaker``: for ``breaker_backoff_s``
every call raises ``TierUnavailable`` at once, without touching the network; then one call
probes the server: success closes the breaker, failure opens it again for twice as long (up
to ``breaker_max_backoff_s``). So a dead or hung Redis costs one timeout per interval, not one
per lookup, load and save, and the tier comes back by itself once the server does. Errors the
server answers with (out of memory, read-only, NOPERM) prove it reachable: they never open it.

URLs. Anything redis-py's ``from_url`` takes: ``redis://[[user]:password@]host:port/db``
(``requirepass``: empty user; ACL: user and password; percent-encode reserved characters),
``rediss://`` for TLS with query parameters passed to the connection, e.g.
``rediss://:pw@host:6380/0?ssl_ca_certs=/etc/redis/ca.crt`` (also ``ssl_certfile``,
``ssl_keyfile`` for client certificates, ``ssl_cert_reqs``, ``ssl_check_hostname``), and
``unix:///path/redis.sock?db=0``. The URL is never logged or put in an error as given: only
``redact(url)`` (credentials replaced by ``***``), and ``where`` (host:port/db).

``StoreConfig`` travels to the engine in vLLM's argv (``--kv-transfer-config``), which every
local user can read in ``ps``. So the engine's environment may carry the URL instead:
``connect_url`` (used by ``io.build_store``) prefers ``$DISAGG_REDIS_URL`` to the configured
one, which then only says that there is a Redis tier and may be given redacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, cast

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from disagg.credentials import redact_url

from . import resp
from .backend import BytesLike, CircuitBreaker, StoreBackend, TierUnavailable
from .keys import ChunkKey

logger = logging.getLogger(__name__)

CHECKSUM_SIZE = 16
READ_SIZE = 1 << 20  # socket reads: chunks are megabytes; 64 KiB reads cost a call each
_PERSON = b"disagg-redis-v2"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # no glob or separator characters


class RedisTierError(OSError):
    """Redis could not be reached in time, or failed the command (redis-py's RedisError:
    ConnectionError, TimeoutError, OutOfMemoryError, ReadOnlyError, ... is the cause)."""


REDIS_URL_ENV = "DISAGG_REDIS_URL"


def connect_url(configured: str) -> str:
    """The URL to connect with: ``$DISAGG_REDIS_URL`` when set, else ``configured``."""
    return os.environ.get(REDIS_URL_ENV) or configured


# Failures that say the server cannot be reached (or not yet served): they open the breaker.
# AuthenticationError and BusyLoadingError are ConnectionErrors in redis-py; a TLS handshake
# failure is raised as a ConnectionError too.
_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|username)=)[^&#]*")


def redact(url: str) -> str:
    """``url`` fit for logs and errors: ``disagg.credentials.redact_url`` (user and password
    of the netloc) and, as redis-py also reads them from the query, ``password=`` and
    ``username=`` parameters."""
    return _QUERY_SECRET.sub(r"\1***", redact_url(url) or "")


# -- server-side scripts --------------------------------------------------------------------
# KEYS = ns:lru, ns:size, ns:used, ns:tick, ns:cap, ns:sum; ARGV[1] = "ns:v:" (value key
# prefix).
# Value keys other than the target are built from ARGV[1], which standalone Redis allows.

_LIB = """
local lru, sizes, used_key, tick_key, cap_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sums = KEYS[6]
local vprefix = ARGV[1]
-- Forget hex everywhere; its recorded size, or nil if it was not indexed.
local function drop(hex)
  local size = tonumber(redis.call('HGET', sizes, hex))
  redis.call('DEL', vprefix .. hex)
  redis.call('HDEL', sums, hex)
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

# ARGV[2] hex, ARGV[3] value, ARGV[4] cap, ARGV[5] checksum -> {stored 0/1, evicted entries,
# evicted bytes}. Denied up front (no partial effect) while Redis is over maxmemory.
_PUT = "#!lua flags=no-cluster\n" + _LIB + """
local hex, blob, cap, sum = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local size = #blob + #sum
if size > cap then return {0, 0, 0} end
drop(hex)
local n, bytes, used = evict_for(size, cap)
redis.call('SET', vprefix .. hex, blob)
redis.call('HSET', sums, hex, sum)
redis.call('HSET', sizes, hex, size)
redis.call('ZADD', lru, redis.call('INCR', tick_key), hex)
redis.call('INCRBY', used_key, size)
return {1, n, bytes}
"""

# ARGV[2] hex -> {value, checksum} or nil; a hit becomes most recent, a vanished value is
# forgotten.
_GET = "#!lua flags=no-cluster,allow-oom\n" + _LIB + """
local hex = ARGV[2]
local blob = redis.call('GET', vprefix .. hex)
if not blob then
  if redis.call('HEXISTS', sizes, hex) == 1 then drop(hex) end
  return false
end
redis.call('ZADD', lru, 'XX', redis.call('INCR', tick_key), hex)
return {blob, redis.call('HGET', sums, hex) or ''}
"""

# ARGV[2..] hexes just read -> count; each still present becomes most recent, a vanished
# value is forgotten.
_TOUCH = "#!lua flags=no-cluster,allow-oom\n" + _LIB + """
for i = 2, #ARGV do
  local hex = ARGV[i]
  if redis.call('EXISTS', vprefix .. hex) == 1 then
    redis.call('ZADD', lru, 'XX', redis.call('INCR', tick_key), hex)
  elseif redis.call('HEXISTS', sizes, hex) == 1 then
    drop(hex)
  end
end
return #ARGV - 1
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
  local stored = redis.call('STRLEN', vprefix .. hex) + redis.call('HSTRLEN', sums, hex)
  if stored ~= size or not redis.call('ZSCORE', lru, hex) then
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
    reads_in_place = True  # ``get_many_into``: from the socket into the caller's buffers

    def __init__(self, capacity_bytes: int, url: str = "redis://127.0.0.1:6379/0",
                 namespace: str = "disagg", socket_timeout_s: float = 2.0,
                 breaker_backoff_s: float = 1.0,
                 breaker_max_backoff_s: float | None = None) -> None:
        super().__init__(capacity_bytes)
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        if socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be positive, got {socket_timeout_s}")
        self.namespace = namespace
        self.url = redact(url)  # for logs and status; the real one stays in the client
        self._client = _client(url, socket_timeout_s)
        kw = self._client.connection_pool.connection_kwargs
        self.where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
        self.breaker = CircuitBreaker(  # None: up to 16x the back-off, at least 16 s
            breaker_backoff_s, breaker_max_backoff_s or max(16.0, 16 * breaker_backoff_s))
        self._keys = [f"{namespace}:{k}" for k in ("lru", "size", "used", "tick", "cap", "sum")]
        self._vprefix = f"{namespace}:v:"
        self._scripts = {name: self._client.register_script(src) for name, src in
                         [("put", _PUT), ("get", _GET), ("touch", _TOUCH), ("drop", _DROP),
                          ("trim", _TRIM),
                          ("check", _CHECK)]}
        self._last_used = 0
        self._closed = False
        logger.info("redis tier %s (namespace %s, cap %d bytes)", self.url, namespace,
                    capacity_bytes)
        self._trim_best_effort()

    # -- public API --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """The shared counter; when Redis does not answer (or is bypassed), the last value
        read (a gauge for stats must not raise)."""
        try:
            with self._errors("used_bytes"):
                self._last_used = int(self._client.get(self._keys[2]) or 0)
        except OSError:
            logger.debug("redis tier %s: used_bytes unavailable", self.where, exc_info=True)
        return self._last_used

    @property
    def breaker_openings(self) -> int:
        return self.breaker.openings

    def contains(self, key: ChunkKey) -> bool:
        with self._errors("contains"):
            return bool(self._client.hexists(self._keys[1], key.hex))

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        with self._errors("contains"):
            sizes = self._client.hmget(self._keys[1], [k.hex for k in keys])
        return [size is not None for size in sizes]

    def get(self, key: ChunkKey) -> bytes | None:
        found = self._run("get", key.hex)
        return None if found is None else self._checked(key, found[0], found[1])

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        if not keys:
            return []
        hexes = [k.hex for k in keys]
        with self._errors("get"):
            pipe = self._client.pipeline(transaction=True)
            for hx in hexes:
                pipe.get(self._vprefix + hx)
            pipe.hmget(self._keys[5], hexes)
            *blobs, sums = pipe.execute()
        self._touch([hx for hx, b in zip(hexes, blobs, strict=True) if b is not None])
        return [None if b is None else self._checked(k, b, sum_ or b"")
                for k, b, sum_ in zip(keys, blobs, sums, strict=True)]

    def get_many_into(self, keys: Sequence[ChunkKey], out: Sequence[memoryview]) -> list[bool]:
        """Values straight from the socket into ``out`` (``resp.get_into``): no allocation
        per value; checksums checked in place."""
        if not keys:
            return []
        hexes = [k.hex for k in keys]
        with self._errors("get"):
            sizes, sums = resp.get_into(self._client, [self._vprefix + hx for hx in hexes],
                                        self._keys[5], hexes, out)
        found = []
        for i, key in enumerate(keys):
            ok = sizes[i] == out[i].nbytes and sums[i] == _checksum(key, out[i])
            if sizes[i] == out[i].nbytes and not ok:
                self._drop_corrupt(key, bytes(out[i]))
            found.append(ok)
        self._touch([hx for hx, size in zip(hexes, sizes, strict=True) if size is not None])
        return found

    def _touch(self, hits: list[str]) -> None:
        """Mark entries just read as recently used (best effort)."""
        if hits:
            try:
                self._run("touch", *hits)
            except OSError:  # the values are good; only their recency was not updated
                logger.debug("redis tier %s: touching %d entries failed", self.where,
                             len(hits), exc_info=True)

    def _checked(self, key: ChunkKey, blob: bytes, checksum: bytes) -> bytes | None:
        """``blob`` if ``checksum`` is its checksum; a corrupt entry is dropped."""
        if checksum != _checksum(key, blob):
            self._drop_corrupt(key, blob)
            return None
        return blob

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        value = memoryview(data).cast("B")
        if CHECKSUM_SIZE + value.nbytes > self._capacity:
            return False
        if self._closed:
            raise RuntimeError(f"RedisBackend({self.where}, {self.namespace}) is closed")
        stored, evicted, evicted_bytes = self._run("put", key.hex, value, self._capacity,
                                                   _checksum(key, value))
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

    def _run(self, script: str, *args: bytes | memoryview | str | int) -> Any:
        with self._errors(script):
            return self._scripts[script](keys=self._keys, args=[self._vprefix, *args])

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Run one server call behind the breaker; RedisError -> RedisTierError."""
        if not self.breaker.allow():
            raise TierUnavailable(
                f"redis tier {self.where} ({what}): bypassed, circuit breaker open for "
                f"{self.breaker.retry_in():.1f}s more after: {self.breaker.last_failure}")
        verdict = False
        try:
            yield
        except redis.exceptions.RedisError as e:
            message = f"redis tier {self.where} ({what}): {type(e).__name__}: {e}"
            verdict = True
            if isinstance(e, _OUTAGES):
                self._outage(message)
            else:  # the server answered (OOM, read-only, NOPERM...): it is reachable
                self.breaker.success()
            raise RedisTierError(message) from e
        else:
            verdict = True
            self.breaker.success()
        finally:
            if not verdict:
                self.breaker.release()

    def _outage(self, message: str) -> None:
        was_open = self.breaker.state != "closed"
        self.breaker.failure(message)
        if not was_open:
            logger.warning("%s; bypassing the tier for %.1fs, then retrying", message,
                           self.breaker.retry_in())

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
            if self.breaker.state == "closed":  # an outage is logged as the breaker opens
                logger.warning("redis tier %s: trimming at start failed: %s", self.where, e)
            return
        if previous not in (-1, self._capacity):
            logger.warning("redis tier %s namespace %s: capacity %d, but the last instance "
                           "started with %d; instances must agree", self.where,
                           self.namespace, self._capacity, previous)
        self._count_evictions(evicted, evicted_bytes)


def _client(url: str, socket_timeout_s: float) -> redis.Redis:
    """A client for ``url`` that never retries; errors name the URL only redacted."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
            socket_read_size=READ_SIZE)
        pool = client.connection_pool
        # Connections are made lazily: build one now (no I/O) so that a query parameter the
        # connection class does not take fails here, not as a TypeError on the first call.
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError) as e:
        # redis-py's own messages name a query parameter; urllib's may quote a piece of the
        # netloc (a password with an unencoded "/" ends the netloc early): not those.
        text = str(e)
        safe = isinstance(e, TypeError) or text.startswith(("Invalid value for", "Redis URL"))
        raise ValueError(f"bad redis URL {redact(url)}: "
                         f"{text if safe else type(e).__name__}") from None
    return client


def _checksum(key: ChunkKey, value: BytesLike) -> bytes:
    """XXH3-128 of the format tag, the chunk key and the value (a value under the wrong key
    fails)."""
    h = xxhash.xxh3_128(_PERSON)
    h.update(key.digest)
    h.update(value)
    return h.digest()

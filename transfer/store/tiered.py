"""Tiers stacked fastest first: look up down the stack, promote hits, write through below.

    put(key, data) ──sync──> tier 0 (CPU)
                    └─enqueue─> [bounded queue] ──writer thread──> tier 1 (disk) ─> tier 2 ...
    get(key): tier 0? tier 1? ... first hit wins; a hit in tier i is copied into tier 0 now
              and into tiers 1..i-1 by the writer thread.

The caller never waits on a lower tier when writing: a full queue drops the write-through
(and counts it), so a slow disk costs reuse, not latency. Counters are plain numbers in a
``StoreStats`` snapshot; exporting them (Prometheus) is the caller's business.

Faults never reach the caller: a tier's OSError on a lookup or a load is a miss in that tier
(the next one is asked), on a save a skipped write (``errors``, and ``save_errors`` for
saves: e.g. ENOSPC on a full disk). A tier whose circuit breaker is open (``TierUnavailable``)
is passed over without waiting (``skipped``). A corrupt entry is a miss that the tier drops
and counts (``corrupt``). Repeated I/O failures of one tier are logged once per
``LOG_EVERY_S`` (with how many were not), not once per call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .backend import BytesLike, StoreBackend, TierUnavailable
from .keys import ChunkKey

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # at most one warning per tier and operation this often
RELOADS_TRACKED = 65536  # chunk keys remembered as loaded (get_prefix's promotion rule)


@dataclass(slots=True)
class TierStats:
    """Counters for one tier; all cumulative except ``used_bytes`` and ``capacity_bytes``.
    The field names are what ``disagg.transfer.connector.stats.TIER_FIELDS`` exports."""

    name: str
    lookups: int = 0  # keys asked by lookup_prefix / locate
    hits: int = 0  # of which this tier held (counted in the first tier that did)
    loads: int = 0  # get() calls that reached this tier
    load_hits: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    saves: int = 0  # puts into this tier: direct, write-through or promotion
    saved_bytes: int = 0
    save_seconds: float = 0.0
    refused: int = 0  # puts the tier refused (entry larger than the tier)
    errors: int = 0  # I/O errors, each handled as a miss or a skipped write
    save_errors: int = 0  # of which failed writes (disk full, Redis out of memory...)
    skipped: int = 0  # calls not made: the tier's circuit breaker was open
    # Read from the backend at snapshot time:
    corrupt: int = 0  # entries that failed their checksum: read as misses, dropped
    breaker_open: int = 0  # times the tier's circuit breaker opened (an outage began)
    evicted_bytes: int = 0
    used_bytes: int = 0  # gauges
    capacity_bytes: int = 0


@dataclass(slots=True)
class StoreStats:
    tiers: list[TierStats]
    prefix_lookups: int = 0  # lookup_prefix() calls
    prefix_hit_chunks: int = 0  # sum of their results
    promotions: int = 0  # lower-tier hits copied upwards
    writes_dropped: int = 0  # write-throughs dropped because the queue was full
    queue_depth: int = 0  # gauge: write-throughs waiting now


@dataclass(frozen=True, slots=True)
class _WriteThrough:
    """Entries written together (one chunk's heads), to ``tiers``; one slot of the queue."""

    entries: tuple[tuple[ChunkKey, bytes], ...]
    tiers: tuple[int, ...]


_STOP = object()


@dataclass(slots=True)
class _Call:
    """How a tier call guarded by ``TieredStore._tier_errors`` ended."""

    skipped: bool = False  # the tier's breaker was open: the call was not made


class TieredStore:
    """Thread-safe facade over ``tiers`` (fastest first; at least one).

    Owns the tiers: ``close`` closes them. ``put`` after ``close`` raises RuntimeError.
    Backend I/O errors (OSError) never reach the caller: a failed lookup or read is a miss in
    that tier, a failed write is skipped; all count in ``TierStats.errors`` (writes also in
    ``save_errors``), and calls a tier's breaker refused in ``TierStats.skipped``.
    """

    def __init__(self, tiers: Sequence[StoreBackend], queue_size: int = 64) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._stats = StoreStats([TierStats(t.name) for t in self.tiers])
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._logged: dict[tuple[int, str], tuple[float, int]] = {}  # -> (last log, muted)
        self._loaded: OrderedDict[ChunkKey, None] = OrderedDict()  # recent batch loads
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writethrough",
                                        daemon=True)
        self._writer.start()

    # -- reads -----------------------------------------------------------------------------

    def lookup_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading ``keys`` some tier holds: one batched ``contains_many`` per tier
        (one round trip for a network tier), each asking only what the tiers above miss.
        Side-effect free apart from counters."""
        missing = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not missing:
                break
            batch = [keys[j] for j in missing]
            found: list[bool] | None = None
            with self._tier_errors(i, "lookup", batch[0]):
                found = tier.contains_many(batch)
            if found is None:
                continue
            self._count(i, lookups=len(missing), hits=sum(found))
            missing = [j for j, hit in zip(missing, found, strict=True) if not hit]
        n = missing[0] if missing else len(keys)
        with self._stats_lock:
            self._stats.prefix_lookups += 1
            self._stats.prefix_hit_chunks += n
        return n

    def get_prefix(self, keys: Sequence[ChunkKey],
                   staging: Sequence[memoryview] | None = None) -> list[BytesLike]:
        """The values of the leading ``keys`` that some tier holds (stops at the first key
        none holds): one batched read per tier, each asking only what the tiers above
        missed. With ``staging`` (a writable buffer per key, each the size of its value),
        tiers that read in place (a disk tier: ``readinto``, no allocation) read into it and
        their values are those buffers; other tiers' values are their own (a copy into
        staging would only add a pass over the bytes).

        A hit below tier 0 is promoted (as ``get`` does) only on its second load within the
        last ``RELOADS_TRACKED`` loads: a batch goes straight into the engine's own KV cache,
        which serves its next use; a chunk loaded again has shown that it outlives that
        cache. Keeping every loaded chunk would also grow the process by a whole prompt's KV
        per load, and fresh memory costs a page fault per 4 KiB (measured in a VM: 3x the
        read itself)."""
        values: list[BytesLike | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not missing:
                break
            start = time.perf_counter()
            batch = [keys[j] for j in missing]
            got: list[BytesLike | None] | None = None
            with self._tier_errors(i, "load", batch[0]):
                if staging is None or not tier.reads_in_place:
                    got = list(tier.get_many(batch))
                else:
                    into = [staging[j] for j in missing]
                    got = [b if ok else None for b, ok in
                           zip(into, tier.get_many_into(batch, into), strict=True)]
            if got is None:
                continue
            hits = [(j, v) for j, v in zip(missing, got, strict=True) if v is not None]
            self._count(i, loads=len(missing), load_hits=len(hits),
                        load_bytes=sum(memoryview(v).nbytes for _, v in hits),
                        load_seconds=time.perf_counter() - start)
            for j, v in hits:
                values[j] = v
                if i > 0 and self._reloaded(keys[j]):
                    self._promote(keys[j], bytes(v), i)
            missing = [j for j in missing if values[j] is None]
        n = missing[0] if missing else len(keys)
        return [v for v in values[:n] if v is not None]

    def _reloaded(self, key: ChunkKey) -> bool:
        """Whether ``key`` was loaded from below tier 0 recently (and remember it was)."""
        with self._stats_lock:
            again = key in self._loaded
            self._loaded[key] = None
            self._loaded.move_to_end(key)
            if len(self._loaded) > RELOADS_TRACKED:
                self._loaded.popitem(last=False)
        return again

    @contextlib.contextmanager
    def _tier_errors(self, i: int, op: str, key: ChunkKey) -> Iterator[_Call]:
        """A tier call whose failure is a miss: a bypassed tier counts as skipped (and the
        yielded ``_Call`` says so), an OSError as ``_failed`` counts (and now and then
        logs) it, naming ``key``."""
        call = _Call()
        try:
            yield call
        except TierUnavailable:
            call.skipped = True
            self._count(i, skipped=1)
        except OSError as e:
            self._failed(i, op, key, e)

    def locate(self, key: ChunkKey) -> int | None:
        """Index of the fastest tier holding ``key``, or None. Does not change recency.
        A tier that fails or is bypassed counts as not holding it."""
        for i, tier in enumerate(self.tiers):
            found = False
            with self._tier_errors(i, "lookup", key) as call:
                found = tier.contains(key)
            if call.skipped:
                continue
            self._count(i, lookups=1, hits=int(found))
            if found:
                return i
        return None

    def get(self, key: ChunkKey) -> bytes | None:
        """The value from the fastest tier holding it, or None. A hit below tier 0 is
        promoted: into tier 0 before returning, into the tiers between in the background."""
        for i, tier in enumerate(self.tiers):
            start = time.perf_counter()
            data: bytes | None = None
            with self._tier_errors(i, "load", key) as call:
                data = tier.get(key)
            if call.skipped:
                continue
            hit = data is not None
            self._count(i, loads=1, load_hits=int(hit),
                        load_bytes=len(data) if data is not None else 0,
                        load_seconds=time.perf_counter() - start)
            if data is not None:
                if i > 0:
                    self._promote(key, data, i)
                return data
        return None

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: ChunkKey, data: BytesLike) -> None:
        """Write ``data`` to tier 0 now and queue it for the tiers below. Never blocks on a
        lower tier. Raises RuntimeError after ``close``."""
        self.put_many([(key, data)])

    def put_many(self, entries: Sequence[tuple[ChunkKey, BytesLike]]) -> None:
        """``put`` for entries that belong together (the heads of one chunk): they take one
        slot of the write-through queue, so its bound counts chunks, not their parts."""
        if self._closed:
            raise RuntimeError("TieredStore is closed")
        frozen = tuple((key, bytes(data)) for key, data in entries)  # one copy for all tiers
        for key, data in frozen:
            self._save(0, key, data)
        self._enqueue(frozen, tuple(range(1, len(self.tiers))))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued write-through is done; False if ``timeout`` ran out."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued write-throughs (up to ``timeout``), stop the writer, close the
        tiers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            logger.warning("store writer still busy after %.1fs; closing anyway", timeout)
        self._writer.join(timeout)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> StoreStats:
        """A consistent copy of the counters, with the tiers' gauges filled in."""
        with self._stats_lock:
            snap = copy.deepcopy(self._stats)
        for s, tier in zip(snap.tiers, self.tiers, strict=True):
            s.evicted_bytes, s.used_bytes = tier.evicted_bytes, tier.used_bytes
            s.capacity_bytes = tier.capacity_bytes
            s.corrupt, s.breaker_open = tier.corrupt_entries, tier.breaker_openings
        snap.queue_depth = self._queue.qsize()
        return snap

    # -- internals -------------------------------------------------------------------------

    def _promote(self, key: ChunkKey, data: bytes, found_in: int) -> None:
        with self._stats_lock:
            self._stats.promotions += 1
        self._save(0, key, data)
        self._enqueue(((key, data),), tuple(range(1, found_in)))

    def _enqueue(self, entries: tuple[tuple[ChunkKey, bytes], ...],
                 tiers: tuple[int, ...]) -> None:
        if not tiers or not entries:
            return
        try:
            self._queue.put_nowait(_WriteThrough(entries, tiers))
        except queue.Full:
            with self._stats_lock:
                self._stats.writes_dropped += 1

    def _save(self, i: int, key: ChunkKey, data: bytes) -> None:
        """Put into tier ``i``, counting; errors are logged and counted, not raised."""
        start = time.perf_counter()
        try:
            stored = self.tiers[i].put(key, data)
        except OSError as e:
            self._failed(i, "save", key, e)
            return
        except Exception:  # a failed write must not kill the writer or reach the caller
            logger.exception("store tier %s: writing %s failed", self.tiers[i].name, key)
            self._count(i, errors=1, save_errors=1)
            return
        self._count(i, saves=int(stored), saved_bytes=len(data) if stored else 0,
                    refused=int(not stored), save_seconds=time.perf_counter() - start)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                for i in item.tiers:
                    for key, data in item.entries:
                        self._write_through(i, key, data)
            finally:
                self._queue.task_done()

    def _write_through(self, i: int, key: ChunkKey, data: bytes) -> None:
        try:
            # Keys name content: a tier that holds the key already holds these bytes.
            present = self.tiers[i].contains(key)
        except OSError as e:
            self._failed(i, "save", key, e)  # the write-through did not happen
            return
        except Exception:
            logger.exception("store tier %s: checking %s failed", self.tiers[i].name, key)
            self._count(i, errors=1, save_errors=1)
            return
        if not present:
            self._save(i, key, data)

    def _failed(self, i: int, op: str, key: ChunkKey, e: OSError) -> None:
        """Count (and now and then log) tier ``i`` failing ``op`` ("lookup", "load" or
        "save") on ``key``; a bypassed tier is counted as skipped, not logged."""
        if isinstance(e, TierUnavailable):
            self._count(i, skipped=1)
            return
        self._count(i, errors=1, save_errors=int(op == "save"))
        now = time.monotonic()
        with self._stats_lock:
            last, muted = self._logged.get((i, op), (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._logged[i, op] = (last, muted + 1)
                return
            self._logged[i, op] = (now, 0)
        what = {"lookup": "looking up", "load": "loading", "save": "saving"}[op]
        logger.warning("store tier %s: %s %s failed (%s): %s%s", self.tiers[i].name, what, key,
                       "skipped" if op == "save" else "a miss", e,
                       f" ({muted} similar failures not logged)" if muted else "",
                       exc_info=logger.isEnabledFor(logging.DEBUG))

    def _count(self, i: int, **increments: float) -> None:
        with self._stats_lock:
            s = self._stats.tiers[i]
            for name, value in increments.items():
                setattr(s, name, getattr(s, name) + value)

"""Where KV lives: a bounded index from vLLM block hash to the holders (instances and KV
store tiers) that have it.

Fed by each instance's KV-cache events (``disagg.scheduler.kv_events``) and queried by the
gateway with the block hashes of a new request (``disagg.scheduler.hashing``), both in
vLLM's own external form (64-bit ints from the chained sha256 of each full block):

    instance "decode-0" stores blocks h1 -> h2 -> h3      index: h1 {decode-0: GPU}
    request hashes [h1, h2, h9, ...]                               h2 {decode-0: GPU}
    match("decode-0", hashes) = 2 blocks (a prefix hit stops at the first miss)

Contracts: a hash appears in ``_where`` iff some instance's set holds it; the number of
(hash, instance) entries never exceeds ``max_entries`` (the least recently stored hash goes
first, a conservative forget: it can only hide a hit, never invent one). Not thread-safe:
one event loop owns it.

Expected blocks: events arrive only once an instance has computed (or pulled) a request's
blocks, seconds after the gateway routed it. Requests sharing a prefix that arrive in that
window would all look cold and scatter, each instance recomputing the prefix. So the gateway
also records what a routed request *will* leave on its instances (``expect``), counted by
``match`` until ``expect_ttl_s`` passes, by which time the real events have taken over
(Dynamo's router does the same with its predicted blocks). Expected entries are bounded
(``max_expected`` per instance, oldest first) and dropped with their instance.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class IndexStats:
    entries: int
    hashes: int
    per_holder: dict[str, int]
    evicted: int
    dropped_holders: int
    expected: int = 0


class PrefixIndex:
    """Block hash -> holders. A holder is an instance (its engine id: vLLM's own cache) or
    a KV store tier (its ``disagg.tiers`` name, e.g. ``store:redis``)."""

    def __init__(self, max_entries: int = 1_000_000, expect_ttl_s: float = 30.0,
                 max_expected: int = 100_000,
                 capacity_of: Callable[[str], int | None] | None = None):
        """``capacity_of(holder)``: the most hashes a holder keeps (None: unbounded), asked
        once per holder when it first stores; store tiers send no eviction events."""
        if max_entries < 1 or max_expected < 0 or expect_ttl_s < 0:
            raise ValueError("max_entries must be positive; max_expected, expect_ttl_s >= 0")
        self.max_entries = max_entries
        self.expect_ttl_s = expect_ttl_s
        self.max_expected = max_expected
        # holder -> hash -> expiry (monotonic), oldest first
        self._expected: dict[str, OrderedDict[int, float]] = {}
        self._where: OrderedDict[int, dict[str, str]] = OrderedDict()  # hash -> holder -> tier
        self._held: dict[str, dict[int, None]] = {}  # holder -> hashes, oldest stored first
        self._caps: dict[str, int] = {}  # holder -> most hashes it keeps; 0: unbounded
        self._capacity_of = capacity_of
        self._entries = 0
        self._evicted = 0
        self._dropped = 0

    # ---- updates (from events) ----------------------------------------------------------
    def stored(self, holder: str, hashes: Iterable[int], tier: str = "GPU") -> None:
        held = self._held.setdefault(holder, {})
        if holder not in self._caps and self._capacity_of is not None:
            self._caps[holder] = self._capacity_of(holder) or 0
        cap = self._caps.get(holder) or None
        for h in hashes:
            where = self._where.get(h)
            if where is None:
                where = self._where[h] = {}
            else:
                self._where.move_to_end(h)
            if holder not in where:
                self._entries += 1
            held.pop(h, None)
            held[h] = None  # newest last
            where[holder] = tier
            if cap is not None and len(held) > cap:
                oldest = next(iter(held))
                del held[oldest]
                self._forget(oldest, holder)
        while self._entries > self.max_entries:
            self._evict_oldest()

    def removed(self, holder: str, hashes: Iterable[int]) -> None:
        held = self._held.get(holder)
        if not held:
            return
        for h in hashes:
            if h in held:
                del held[h]
                self._forget(h, holder)

    def expect(self, holder: str, hashes: Iterable[int], now: float | None = None) -> None:
        """``holder`` was just sent a request with these block hashes: count them as held
        for ``expect_ttl_s`` (see the module docstring)."""
        if not self.max_expected or not self.expect_ttl_s:
            return
        now = time.monotonic() if now is None else now
        pending = self._expected.setdefault(holder, OrderedDict())
        expiry = now + self.expect_ttl_s
        for h in hashes:
            pending[h] = expiry
            pending.move_to_end(h)
        while pending and (len(pending) > self.max_expected
                           or next(iter(pending.values())) <= now):
            pending.popitem(last=False)

    def drop(self, holder: str) -> None:
        """Forget everything ``holder`` holds (restart, cleared cache, event gap)."""
        self._expected.pop(holder, None)
        held = self._held.pop(holder, {})
        for h in held:
            self._forget(h, holder)
        if held:
            self._dropped += 1

    # ---- queries ------------------------------------------------------------------------
    def match(self, holder: str, hashes: Sequence[int], now: float | None = None,
              also: Sequence[str] = ()) -> int:
        """Number of leading ``hashes`` that ``holder`` holds or is expected to hold (its
        prefix-cache hit), or, block by block, one of the holders in ``also`` holds (store
        tiers ``holder`` can load from)."""
        held = self._held.get(holder, {})
        pending = self._expected.get(holder)
        others = [self._held[a] for a in also if self._held.get(a)]
        if not held and not pending and not others:
            return 0
        now = time.monotonic() if now is None else now
        n = 0
        for h in hashes:
            if (h not in held and (not pending or pending.get(h, 0.0) <= now)
                    and not any(h in o for o in others)):
                break
            n += 1
        return n

    def holders(self, block_hash: int) -> dict[str, str]:
        return dict(self._where.get(block_hash, {}))

    def __len__(self) -> int:
        return self._entries

    def stats(self) -> IndexStats:
        return IndexStats(self._entries, len(self._where),
                          {k: len(v) for k, v in self._held.items()}, self._evicted,
                          self._dropped, sum(len(p) for p in self._expected.values()))

    def check_integrity(self) -> None:
        """Raise AssertionError if the two views disagree (tests call this)."""
        total = 0
        for holder, held in self._held.items():
            for h in held:
                assert holder in self._where.get(h, {}), (holder, h)
            total += len(held)
        assert total == self._entries == sum(len(w) for w in self._where.values())
        assert all(self._where.values()), "empty holder set left behind"
        assert self._entries <= self.max_entries
        assert all(len(self._held.get(k, ())) <= c for k, c in self._caps.items() if c)
        assert all(len(p) <= self.max_expected for p in self._expected.values())

    # ---- internals ----------------------------------------------------------------------
    def _forget(self, h: int, holder: str) -> None:
        where = self._where.get(h)
        if where is not None and where.pop(holder, None) is not None:
            self._entries -= 1
            if not where:
                del self._where[h]

    def _evict_oldest(self) -> None:
        h, where = self._where.popitem(last=False)
        for holder in where:
            self._held[holder].pop(h, None)
        self._entries -= len(where)
        self._evicted += len(where)

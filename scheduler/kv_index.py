"""Where KV lives: a bounded index from vLLM block hash to the instances holding it.

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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class IndexStats:
    entries: int
    hashes: int
    per_instance: dict[str, int]
    evicted: int
    dropped_instances: int


class PrefixIndex:
    def __init__(self, max_entries: int = 1_000_000):
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._where: OrderedDict[int, dict[str, str]] = OrderedDict()  # hash -> inst -> tier
        self._held: dict[str, set[int]] = {}
        self._entries = 0
        self._evicted = 0
        self._dropped = 0

    # ---- updates (from events) ----------------------------------------------------------
    def stored(self, instance: str, hashes: Iterable[int], tier: str = "GPU") -> None:
        held = self._held.setdefault(instance, set())
        for h in hashes:
            where = self._where.get(h)
            if where is None:
                where = self._where[h] = {}
            else:
                self._where.move_to_end(h)
            if instance not in where:
                held.add(h)
                self._entries += 1
            where[instance] = tier
        while self._entries > self.max_entries:
            self._evict_oldest()

    def removed(self, instance: str, hashes: Iterable[int]) -> None:
        held = self._held.get(instance)
        if not held:
            return
        for h in hashes:
            if h in held:
                held.discard(h)
                self._forget(h, instance)

    def drop(self, instance: str) -> None:
        """Forget everything ``instance`` holds (restart, cleared cache, event gap)."""
        held = self._held.pop(instance, set())
        for h in held:
            self._forget(h, instance)
        if held:
            self._dropped += 1

    # ---- queries ------------------------------------------------------------------------
    def match(self, instance: str, hashes: Sequence[int]) -> int:
        """Number of leading ``hashes`` that ``instance`` holds (its prefix-cache hit)."""
        held = self._held.get(instance)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
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
                          self._dropped)

    def check_integrity(self) -> None:
        """Raise AssertionError if the two views disagree (tests call this)."""
        total = 0
        for inst, held in self._held.items():
            for h in held:
                assert inst in self._where.get(h, {}), (inst, h)
            total += len(held)
        assert total == self._entries == sum(len(w) for w in self._where.values())
        assert all(self._where.values()), "empty holder set left behind"
        assert self._entries <= self.max_entries

    # ---- internals ----------------------------------------------------------------------
    def _forget(self, h: int, instance: str) -> None:
        where = self._where.get(h)
        if where is not None and where.pop(instance, None) is not None:
            self._entries -= 1
            if not where:
                del self._where[h]

    def _evict_oldest(self) -> None:
        h, where = self._where.popitem(last=False)
        for inst in where:
            self._held[inst].discard(h)
        self._entries -= len(where)
        self._evicted += len(where)

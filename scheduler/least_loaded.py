"""Least-loaded: fewest requests in flight, then fewest waiting, then least KV in use.

The gateway's own in-flight count leads because it is exact and current; the instance's
scraped metrics lag by up to one poll interval and break ties.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from disagg.scheduler.base import Candidate, Policy, RequestInfo


class LeastLoaded(Policy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        # Rotate the scan start so equal loads spread instead of all landing on the first.
        k = next(self._turn) % len(candidates)
        ordered = [*candidates[k:], *candidates[:k]]
        return min(ordered, key=lambda c: (c.inflight, c.waiting, c.kv_usage))

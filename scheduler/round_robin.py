"""Round-robin: each request goes to the next instance in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from disagg.scheduler.base import Candidate, Policy, RequestInfo


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        return candidates[next(self._counter) % len(candidates)]

"""KV-aware: the instance where this request's first token comes soonest, in seconds.

    cost(c) = (pending_tokens(c) + uncached_tokens(c)) / prefill_rate(c)
              + store_tokens(c) / load_rate(c)

``uncached_tokens`` is the prompt minus the prefix ``c`` already holds (the gateway's prefix
index, from vLLM's KV events) and minus what the KV store tiers ``c`` can load from hold
beyond it (``store_tokens``, from the connector's save events). ``pending_tokens`` is the
work ahead of the request on ``c``: the prompt tokens of the requests the gateway has sent
there and not seen finish, each counted as what ``c`` had to compute for it. The queue is
what stops a popular prefix from piling every request onto one instance: once the wait
behind it outlasts recomputing the prefix elsewhere, the next instance takes it (and then
holds that prefix too).

Both rates are learned online from each instance's own counters (``disagg.pool`` feeds
``scheduler.rates.RateMeter``s), so the trade-off holds on a fast machine and a slow one
alike, with no weight tuned to either. Until an instance has been measured it is assumed as
fast as the median measured instance (a fresh replica on the same hardware); before any
measurement costs are in tokens (rate 1) and a stored token costs ``1 / PRIOR_LOAD_SPEEDUP``
of a computed one. Ties rotate. Without token information (the gateway could not tokenize)
it degrades to least-queue.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from disagg.scheduler.base import Candidate, Policy, RequestInfo
from disagg.scheduler.decider import queue_depth

# Before any load is measured: a store load assumed this many times faster than computing
# (measured loads run 20-200x faster than a prefill; a prior only, replaced by the first
# measurement of any instance).
PRIOR_LOAD_SPEEDUP = 10.0


class KVAware(Policy):
    name = "kv_aware"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def cost(self, c: Candidate, request: RequestInfo, prefill_rate: float = 1.0,
             load_rate: float = PRIOR_LOAD_SPEEDUP) -> float:
        """Seconds until ``request``'s first token on ``c`` (rates: the priors for an
        instance not measured yet)."""
        uncached = request.uncached_tokens(c.engine_id) or 0
        stored = request.store_tokens.get(c.engine_id, 0)
        prefill = c.prefill_rate or prefill_rate
        return (c.pending_tokens + uncached) / prefill + stored / (c.load_rate or load_rate)

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        k = next(self._turn) % len(candidates)
        ordered = [*candidates[k:], *candidates[:k]]
        if request.prompt_tokens is None:
            return min(ordered, key=queue_depth)
        prefill, load = priors(candidates)
        return min(ordered, key=lambda c: self.cost(c, request, prefill, load))


def priors(candidates: Sequence[Candidate]) -> tuple[float, float]:
    """(prefill rate, load rate) assumed for an instance not measured yet: the median of
    the measured ones; before any, 1 and ``PRIOR_LOAD_SPEEDUP`` (costs in tokens)."""
    prefill = [c.prefill_rate for c in candidates if c.prefill_rate]
    load = [c.load_rate for c in candidates if c.load_rate]
    p = statistics.median(prefill) if prefill else 1.0
    return p, statistics.median(load) if load else p * PRIOR_LOAD_SPEEDUP

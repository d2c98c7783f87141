"""KV-aware: the instance where this request's first token comes soonest, in seconds.

    cost(c) = (pending_tokens(c) + computed_here(c)) / prefill_rate(c)
              + store_tokens(c) / load_rate(c)
              + hop_s (when a prefill instance computes the prompt for c)
              + decoding(c) * step_s(c)

``uncached_tokens`` is the prompt minus the prefix ``c`` already holds (the gateway's prefix
index, from vLLM's KV events) and minus what the KV store tiers ``c`` can load from hold
beyond it (``store_tokens``, from the connector's save events). ``pending_tokens`` is the
work ahead of the request on ``c``: the prompt tokens of the requests the gateway has sent
there and not seen finish, each counted as what ``c`` had to compute for it. ``decoding``
counts the requests ``c`` is generating for; each makes every step longer, so each costs
about one step (``step_s``, ``c``'s mean inter-token latency). The two queue terms are what
stop a popular prefix from piling every request onto one instance: once the wait behind it
outlasts recomputing the prefix elsewhere, the next instance takes it (and then holds that
prefix too).

Choosing a decoder, the gateway says when a prefill hop is open (``RequestInfo.hop_from``,
``hop_s``): a decoder that leaves at least ``hop_from`` tokens uncached gets the prompt from
a prefill instance, so it computes none of it (``computed_here`` is 0) and the request pays
the hop instead; what the decoder lacks then arrives by a KV pull, at memory speed
(``benchmarks/transfer.py``), which no term counts. Its prefix cache then still decides
between a cheap local prefill and a hop, but no longer pins every conversation to the
decoder that served its last turn: among decoders that would all take the hop, the decode
queue decides, and decodes spread.

The rates and the step time are learned online from each instance's own counters
(``disagg.pool`` feeds ``scheduler.rates.RateMeter``s), so the trade-off holds on a fast
machine and a slow one alike, with no weight tuned to either. Until an instance has been
measured it is assumed as fast as the median measured instance (a fresh replica on the same
hardware); before any measurement costs are in tokens (rate 1), a stored token costs
``1 / PRIOR_LOAD_SPEEDUP`` of a computed one and a decode step ``PRIOR_STEP_TOKENS``
computed tokens. Ties rotate. Without token information (the gateway could not tokenize) it
degrades to least-queue.
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
# Before any step is measured: one decode step assumed to cost as much as computing this many
# prompt tokens (a CPU or GPU decodes a step in the time it prefills a few hundred tokens).
PRIOR_STEP_TOKENS = 256.0


class KVAware(Policy):
    name = "kv_aware"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        k = next(self._turn) % len(candidates)
        ordered = [*candidates[k:], *candidates[:k]]
        if request.prompt_tokens is None:
            return min(ordered, key=queue_depth)
        prior = priors(candidates)
        return min(ordered, key=lambda c: first_token_seconds(c, request, prior))


def first_token_seconds(c: Candidate, request: RequestInfo,
                        prior: tuple[float, float, float]) -> float:
    """Seconds until ``request``'s first token on ``c`` (the module's cost); ``prior``:
    (prefill rate, load rate, step seconds) for what ``c`` has not been measured on yet."""
    uncached = request.uncached_tokens(c.engine_id) or 0
    stored = request.store_tokens.get(c.engine_id, 0)
    prefill, load, step = prior
    hop = request.hop_from is not None and uncached >= request.hop_from
    here = 0 if hop else uncached
    return ((c.pending_tokens + here) / (c.prefill_rate or prefill)
            + stored / (c.load_rate or load) + (request.hop_s if hop else 0.0)
            + c.decoding * (c.step_s or step))


def priors(candidates: Sequence[Candidate]) -> tuple[float, float, float]:
    """(prefill rate, load rate, step seconds) assumed for an instance not measured yet:
    the median of the measured ones; before any, costs in tokens (rate 1)."""
    prefill = [c.prefill_rate for c in candidates if c.prefill_rate]
    load = [c.load_rate for c in candidates if c.load_rate]
    steps = [c.step_s for c in candidates if c.step_s]
    p = statistics.median(prefill) if prefill else 1.0
    return (p, statistics.median(load) if load else p * PRIOR_LOAD_SPEEDUP,
            statistics.median(steps) if steps else PRIOR_STEP_TOKENS / p)


def hop_seconds(prefill: Sequence[Candidate], request: RequestInfo) -> float:
    """Seconds until a prefill hop would have computed ``request``'s prompt on the best of
    ``prefill`` (its queue, and the part of the prompt it does not hold)."""
    prior = priors(prefill)
    return min(first_token_seconds(c, request, prior) for c in prefill)

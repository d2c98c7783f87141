"""KV-aware: the instance where this request's first token comes soonest, in seconds.

    cost(c) = (pending_tokens(c) + computed_here(c)) / prefill_rate(c)
              + store_tokens(c) / load_rate(c)
              + hop.seconds (when a prefill instance computes the prompt for c)
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

Choosing a decoder, the gateway says when a prefill hop is open (``RequestInfo.hop``): a
decoder that leaves at least ``hop.from_tokens`` tokens uncached gets the prompt from a
prefill instance, so it computes none of it and the request pays the hop instead
(``hop.seconds``: the best prefill instance's queue and its part of the prompt); what the
decoder lacks then arrives by a KV pull, at memory speed (``benchmarks/transfer.py``), which
no term counts. Its prefix cache then still decides between a cheap local prefill and a hop,
but no longer pins every conversation to the decoder that served its last turn: among
decoders that would all take the hop, the decode queue decides, and decodes spread.

One exception, where the deployment allows it (``scheduler.local_prefill_when_hop_slower``,
off by default; ``prefills_here``): a decoder that holds as much of the prompt as the best
prefill instance (the conversation's last turn was served there) computes even a long rest
itself when the hop is slower than that, counting the stall of its running decodes (each
waits as long as the prefill runs): the prefill instances are queued, or slower (on a
2-core host the two prefill instances share one core, the decoders the other). The gateway
records the decision as ``hop_slower``. This trades the stall for the hop: ITL p99 rises
where it fires (``benchmarks/RESULTS.md``, routing: 5-7x on a 2-core host), which is why it
is the deployment's choice.

The same estimate orders the gateway's prefill queue (``disagg.prefill_queue``,
``prefill_seconds``): hops wait there while every prefill instance is busy, the one with
the least uncached prompt (in seconds, at the holder's learned rate) first, and are bound
to an instance only when one frees, so a follow-up turn whose history a prefill instance
holds goes ahead of a new conversation's whole prompt.

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

from disagg.scheduler.base import Candidate, Hop, Policy, RequestInfo
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
        prior = priors(candidates, request.hop.rate if request.hop else None)
        return min(ordered, key=lambda c: first_token_seconds(c, request, prior))


    def prefill_seconds(self, candidates: Sequence[Candidate],
                        request: RequestInfo) -> float | None:
        """The prompt's uncached part on the candidate holding most of it, at that
        candidate's learned rate (tokens, rate 1, before any is measured)."""
        if request.prompt_tokens is None or not candidates:
            return None
        rate = priors(candidates)[0]
        return min(max(0, request.uncached_tokens(c.engine_id) or 0) / (c.prefill_rate or rate)
                   for c in candidates)


def first_token_seconds(c: Candidate, request: RequestInfo,
                        prior: tuple[float, float, float]) -> float:
    """Seconds until ``request``'s first token on ``c`` (the module's cost); ``prior``:
    (prefill rate, load rate, step seconds) for what ``c`` has not been measured on yet."""
    uncached = request.uncached_tokens(c.engine_id) or 0
    stored = request.store_tokens.get(c.engine_id, 0)
    prefill, load, step = prior
    rate = c.prefill_rate or prefill
    compute = uncached / rate if request.hop is None or prefills_here(c, request) \
        else request.hop.seconds
    return (c.pending_tokens / rate + compute + stored / (c.load_rate or load)
            + c.decoding * (c.step_s or step))


def prefills_here(c: Candidate, request: RequestInfo) -> bool:
    """Does decoder ``c`` compute ``request``'s prompt itself rather than take the open hop
    (``request.hop``)? Always below the hop's threshold. Above it only where the deployment
    allows it (``hop.local_when_slower``), only when ``c`` holds as much of the prompt as
    the prefill instance would (no history computed twice), and only when the hop is slower
    than computing it here even counting the stall: each of the ``c.decoding`` requests
    generating on ``c`` waits as long as the prefill runs, so a busy decoder takes a prompt
    only when the hop is far slower (the prefill instances queued, or slower than the
    decoder: fewer or busier cores). Between an idle decoder and an idle prefill pool the
    learned rates decide; a tie goes to the hop."""
    hop = request.hop
    if hop is None:
        return True
    uncached = request.uncached_tokens(c.engine_id) or 0
    if uncached < hop.from_tokens:
        return True
    if not hop.local_when_slower:
        return False
    here_s = uncached / (c.prefill_rate or hop.rate)
    return uncached <= hop.uncached and here_s * (1 + c.decoding) < hop.seconds


def priors(candidates: Sequence[Candidate],
           rate: float | None = None) -> tuple[float, float, float]:
    """(prefill rate, load rate, step seconds) assumed for an instance not measured yet:
    the median of the measured ones; before any, ``rate`` (another pool's, same model and
    hardware) or costs in tokens (rate 1)."""
    prefill = [c.prefill_rate for c in candidates if c.prefill_rate]
    load = [c.load_rate for c in candidates if c.load_rate]
    steps = [c.step_s for c in candidates if c.step_s]
    p = statistics.median(prefill) if prefill else rate or 1.0
    return (p, statistics.median(load) if load else p * PRIOR_LOAD_SPEEDUP,
            statistics.median(steps) if steps else PRIOR_STEP_TOKENS / p)


def open_hop(prefill: Sequence[Candidate], request: RequestInfo, from_tokens: int,
             local_when_slower: bool = False, queued_s: float = 0.0) -> Hop:
    """The hop ``prefill`` offers ``request``: when the best of them (its queue, and the
    part of the prompt it does not hold) would have computed the prompt, after
    ``queued_s`` in the gateway's prefill queue."""
    prior = priors(prefill)
    best = min(prefill, key=lambda c: first_token_seconds(c, request, prior))
    return Hop(from_tokens=from_tokens,
               seconds=queued_s + first_token_seconds(best, request, prior),
               uncached=max(0, request.uncached_tokens(best.engine_id) or 0), rate=prior[0],
               local_when_slower=local_when_slower)

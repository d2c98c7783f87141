"""Conditional disaggregation: does this request go through a prefill instance at all?

The rule (llm-d's and Dynamo's, combined): prefill remotely iff the part of the prompt the
chosen decoder does not already hold (in its own cache, or in a KV store tier it can load
from) is at least ``min_uncached_tokens`` AND some prefill instance has a queue shorter
than ``max_prefill_queue`` (hops waiting in the gateway's prefill queue are shared among
the instances). Otherwise the decoder prefills
locally: a short or mostly cached prompt costs less to compute in place than a hop, two
HTTP round trips and a KV pull, and a saturated prefill pool would only add queueing.

Every decision carries its reason; the gateway counts them in ``disagg_decisions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from disagg.scheduler.base import Candidate


@dataclass(frozen=True, slots=True)
class Decision:
    remote: bool
    reason: str  # one of REASONS


REASONS = ("no_prefill_instance", "short_uncached", "prefill_saturated", "long_uncached",
           "unknown_length", "always_remote", "no_decode_instance", "hop_slower")
# no_decode_instance: every decoder is down, so a prefill instance (a whole vLLM) serves the
# request end to end; hop_slower: a kv_aware decoder holding the prompt's prefix computes
# the rest sooner than the queued prefill instances would
# (``scheduler.kv_aware.prefills_here``). The gateway decides those, not PrefillDecider.


class PrefillDecider:
    def __init__(self, min_uncached_tokens: int = 256, max_prefill_queue: int = 8):
        if min_uncached_tokens < 0 or max_prefill_queue < 1:
            raise ValueError("min_uncached_tokens must be >= 0 and max_prefill_queue >= 1")
        self.min_uncached_tokens = min_uncached_tokens
        self.max_prefill_queue = max_prefill_queue

    def decide(self, uncached_tokens: int | None, prefill: Sequence[Candidate],
               queued: int = 0) -> Decision:
        """``uncached_tokens``: prompt tokens the decoder would have to compute (None when
        the gateway could not tokenize the request); ``prefill``: healthy prefill instances;
        ``queued``: hops waiting in the gateway's prefill queue (shared among them)."""
        if not prefill:
            return Decision(False, "no_prefill_instance")
        if self.min_uncached_tokens == 0:
            return Decision(True, "always_remote")
        if uncached_tokens is not None and uncached_tokens < self.min_uncached_tokens:
            return Decision(False, "short_uncached")
        if min(queue_depth(c) for c in prefill) + queued / len(prefill) \
                >= self.max_prefill_queue:
            return Decision(False, "prefill_saturated")
        return Decision(True, "long_uncached" if uncached_tokens is not None
                        else "unknown_length")


def queue_depth(c: Candidate) -> float:
    """Requests ahead of a new one on a prefill instance: ours in flight, or vLLM's own
    count when other clients also use it (the metrics poll lags, so take the larger)."""
    return max(float(c.inflight), c.running + c.waiting)

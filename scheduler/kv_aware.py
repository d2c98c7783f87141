"""KV-aware: the instance where this request costs least, counting work it would redo.

    cost(c) = uncached_prompt_tokens(c) + store_load_cost * store_tokens(c)
              + queue_tokens * queue(c)

``uncached_prompt_tokens`` is the prompt minus the prefix ``c`` already holds (the gateway's
prefix index, from vLLM's KV events) and minus what the KV store tiers ``c`` can load from
hold beyond it (``store_tokens``, from the connector's save events); a stored token costs
``store_load_cost`` of a computed one (measured: an 8K-token prompt loads from disk or
Redis in 0.6-1.4 s against 80 s to compute, under 0.02; 0.05 leaves margin). ``queue(c)``
is the requests ahead of a new one (the gateway's own in-flight count, or the instance's
running + waiting when larger). The queue term is what stops a popular prefix from piling
every request onto one instance: once its queue costs more than recomputing the prefix
elsewhere, the next instance takes it (and then holds that prefix too). Ties rotate.
Without token information (the gateway could not tokenize) it degrades to least-queue.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from disagg.scheduler.base import Candidate, Policy, RequestInfo
from disagg.scheduler.decider import queue_depth


class KVAwareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    queue_tokens: float = Field(
        512.0, ge=0, description="Prompt tokens one queued request is worth; higher spreads "
        "load sooner, lower follows cached prefixes longer.",
    )
    store_load_cost: float = Field(
        0.05, ge=0, le=1, description="Cost of loading a token from the KV store, relative "
        "to computing it.",
    )


class KVAware(Policy):
    name = "kv_aware"
    Options = KVAwareOptions

    def __init__(self, queue_tokens: float = 512.0, store_load_cost: float = 0.05) -> None:
        self.queue_tokens = queue_tokens
        self.store_load_cost = store_load_cost
        self._turn = itertools.count()

    def cost(self, c: Candidate, request: RequestInfo) -> float:
        uncached = request.uncached_tokens(c.engine_id) or 0
        stored = request.store_tokens.get(c.engine_id, 0)
        return (uncached + self.store_load_cost * stored
                + self.queue_tokens * (queue_depth(c) + c.kv_usage))

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        k = next(self._turn) % len(candidates)
        ordered = [*candidates[k:], *candidates[:k]]
        return min(ordered, key=lambda c: self.cost(c, request))

"""The policy interface: choose one instance of a pool for a request.

Policies are small, stateless apart from their own counters, and listed by name in
``disagg.scheduler.registry``, so a topology picks them as ``scheduler.prefill_policy`` /
``scheduler.decode_policy`` and sets their options under ``scheduler.policy_options``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


@dataclass(slots=True)
class Candidate:
    """An instance as a policy sees it: identity and load, nothing else."""

    engine_id: str
    url: str
    inflight: int = 0  # requests the gateway has sent and not yet seen finish
    running: float = 0  # from the instance's own metrics (may lag)
    waiting: float = 0
    kv_usage: float = 0
    # Prompt tokens the instance computes for the requests the gateway has in flight there
    # (what a new request waits behind).
    pending_tokens: float = 0
    # Learned online from the instance's counters (``scheduler.rates``); None: not measured.
    prefill_rate: float | None = None  # prompt tokens computed per second
    load_rate: float | None = None  # tokens loaded from the KV store per second
    # Requests the gateway has decoding there, and the instance's learned seconds per
    # decode step (mean inter-token latency; None: not measured).
    decoding: int = 0
    step_s: float | None = None


@dataclass(frozen=True, slots=True)
class Hop:
    """A prefill hop open to the decoder being chosen. A decoder that would compute at least
    ``from_tokens`` of the prompt itself gets them computed by a prefill instance instead,
    in about ``seconds`` (the best prefill instance's queue, then its part of the prompt,
    ``uncached`` tokens); with ``local_when_slower``, not when computing them itself comes
    sooner without computing more (``scheduler.kv_aware.prefills_here``). ``rate``: the
    prefill pool's tokens per second, assumed for a decoder whose own rate is not measured
    yet (same model and hardware)."""

    from_tokens: int
    seconds: float
    uncached: int
    rate: float
    local_when_slower: bool = False


@dataclass(slots=True)
class RequestInfo:
    """A request as a policy sees it. Token fields stay empty when the gateway could not
    tokenize the request (policies must then route on load alone)."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int | None = None
    block_hashes: list[int] = field(default_factory=list)  # vLLM's external block hashes
    cached_tokens: dict[str, int] = field(default_factory=dict)  # engine_id -> prefix held
    # engine_id -> prompt tokens beyond its prefix hit that KV store tiers it can load from
    # hold (loaded, not computed: cheap but not free)
    store_tokens: dict[str, int] = field(default_factory=dict)

    # Set by the gateway once a prefill instance computed the prompt for the decoder.
    prefilled: bool = False
    # Set by the gateway before it picks a decoder, when a prefill hop is open (some prefill
    # instance below the decider's queue limit); None otherwise.
    hop: Hop | None = None

    def local_tokens(self, engine_id: str) -> int:
        """Prompt tokens ``engine_id`` computes for this request (0 when unknown, or for a
        decoder whose prompt a prefill instance computed): the work it adds there."""
        if self.prefilled:
            return 0
        return max(0, self.uncached_tokens(engine_id) or 0)

    def uncached_tokens(self, engine_id: str) -> int | None:
        """Prompt tokens ``engine_id`` would have to compute: neither in its own cache nor
        loadable from the store (None: prompt unknown)."""
        if self.prompt_tokens is None:
            return None
        return (self.prompt_tokens - self.cached_tokens.get(engine_id, 0)
                - self.store_tokens.get(engine_id, 0))


class NoOptions(BaseModel):
    """A policy without options: any option given is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Policy(ABC):
    """Chooses one instance of a pool per request. ``Options`` is the policy's own option
    schema (``scheduler.policy_options.<name>`` in a topology); its fields are the keyword
    arguments of the policy's constructor."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        """Pick one of ``candidates`` (never empty) for ``request``."""

    def prefill_seconds(self, candidates: Sequence[Candidate],
                        request: RequestInfo) -> float | None:
        """Seconds the best of ``candidates`` would take to compute ``request``'s prompt,
        queues aside (the gateway's prefill queue orders hops by it); None: this policy
        does not estimate it, and its hops are not held in that queue."""
        return None

"""Rates learned online: an instance's prefill speed and its KV store's load speed, in tokens
per second, from two of its own monotonic counters (tokens done, seconds spent doing them).

A ``RateMeter`` is fed the counters' totals at every metrics poll. Each poll that moved at
least ``min_seconds`` of work gives one sample, ``d(tokens) / d(seconds)``, folded into an
exponentially weighted mean (``weight`` of the new sample), so the rate follows the machine
(a slower host, a busier core) within a few polls, and nothing is tuned to one machine.
A counter that goes backwards (the engine restarted) starts the meter over from its new
totals, keeping the last rate until a new sample arrives: same model, same hardware.

Where the seconds come from matters, and is the caller's choice (``disagg.pool``): vLLM's
``request_prefill_time_seconds`` sums each request's own prefill span, so requests prefilled
in one batch each count the batch's time. Under load that understates an instance's speed,
by the same factor on instances under the same load, which is what a comparison needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RateMeter:
    """Tokens per second from (tokens, seconds) counter totals. ``rate`` is None until the
    first sample."""

    weight: float = 0.3  # of each new sample in the running mean
    min_seconds: float = 0.02  # less work than this in one poll is no sample (noise)
    rate: float | None = None
    _tokens: float | None = None
    _seconds: float = 0.0

    def observe(self, tokens_total: float, seconds_total: float, sample: bool = True) -> None:
        """Feed the counters' current totals. ``sample=False``: the work since the last
        poll is not what the rate measures (the caller knows why); it is skipped."""
        if (self._tokens is None or tokens_total < self._tokens
                or seconds_total < self._seconds or not sample):
            self._tokens, self._seconds = tokens_total, seconds_total  # baseline, reset, skip
            return
        d_tokens, d_seconds = tokens_total - self._tokens, seconds_total - self._seconds
        if d_seconds < self.min_seconds or d_tokens <= 0:
            return  # keep the baseline: small steps add up to a sample later
        now = d_tokens / d_seconds
        self.rate = now if self.rate is None else (
            self.weight * now + (1 - self.weight) * self.rate)
        self._tokens, self._seconds = tokens_total, seconds_total

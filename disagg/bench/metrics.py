"""Aggregation of per-request results into the benchmark summary.

Latency statistics are over *completed* requests only (a failed request has no honest latency);
failed requests are counted in ``failed`` and broken down by reason in ``failures``. ITL
statistics pool every gap of every completed request. Goodput counts completed requests whose
TTFT and mean inter-token time (TPOT) both meet the SLOs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from disagg.bench.records import RequestResult

_MODEL = ConfigDict(strict=True, extra="forbid")


class Stats(BaseModel):
    """Mean and percentiles (linear interpolation, as numpy's default) of one metric, in ms.

    All None when there was no sample."""

    model_config = _MODEL
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    count: int


class Slo(BaseModel):
    """Service-level objectives for goodput."""

    model_config = _MODEL
    ttft_ms: float = Field(gt=0, description="A request meets the SLO if its TTFT is at most this.")
    itl_ms: float = Field(gt=0, description="... and its mean inter-token time is at most this.")


class Goodput(BaseModel):
    """Requests per second that met both SLOs, and their fraction of all requests."""

    model_config = _MODEL
    slo_ttft_ms: float
    slo_itl_ms: float
    requests_per_s: float
    fraction: float


class Summary(BaseModel):
    """What a run measured, as written to the JSON report (plus the per-request records)."""

    model_config = _MODEL
    num_requests: int
    completed: int
    failed: int
    failures: dict[str, int] = Field(description="Failure reasons (first 60 chars) and counts.")
    duration_s: float
    ttft_ms: Stats
    itl_ms: Stats
    tpot_ms: Stats
    e2e_ms: Stats
    requests_per_s: float
    output_tokens_per_s: float
    input_tokens_per_s: float
    total_output_tokens: int
    total_input_tokens: int
    prompt_token_mismatches: int = Field(
        description="Completed requests whose server-reported prompt length differs from the "
        "workload tokenizer's count (a tokenizer or chat-template mismatch, not a failure)."
    )
    goodput: Goodput


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of non-empty ascending values, linear interpolation."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def stats_ms(values_s: Sequence[float]) -> Stats:
    """Stats in milliseconds of values given in seconds."""
    if not values_s:
        return Stats(mean=None, p50=None, p90=None, p99=None, count=0)
    ms = sorted(v * 1000.0 for v in values_s)
    return Stats(
        mean=sum(ms) / len(ms),
        p50=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
        count=len(ms),
    )


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    """Completed, TTFT within ``slo.ttft_ms`` and mean inter-token time within ``slo.itl_ms``."""
    if not result.ok or result.ttft_s is None or result.ttft_s * 1000 > slo.ttft_ms:
        return False
    tpot = result.tpot_s
    return tpot is None or tpot * 1000 <= slo.itl_ms


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> Summary:
    """Aggregate ``results`` of a run that lasted ``duration_s`` seconds."""
    done = [r for r in results if r.ok]
    failures = Counter((r.error or "?")[:60] for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens or r.expected_prompt_tokens or 0 for r in done)
    good = sum(meets_slo(r, slo) for r in results)

    def per_s(count: int) -> float:
        return count / duration_s if duration_s > 0 else 0.0

    return Summary(
        num_requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        failures=dict(failures),
        duration_s=duration_s,
        ttft_ms=stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=stats_ms([g for r in done for g in r.itl_s]),
        tpot_ms=stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        e2e_ms=stats_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        requests_per_s=per_s(len(done)),
        output_tokens_per_s=per_s(out_tokens),
        input_tokens_per_s=per_s(in_tokens),
        total_output_tokens=out_tokens,
        total_input_tokens=in_tokens,
        prompt_token_mismatches=sum(
            r.prompt_tokens is not None
            and r.expected_prompt_tokens is not None
            and r.prompt_tokens != r.expected_prompt_tokens
            for r in done
        ),
        goodput=Goodput(
            slo_ttft_ms=slo.ttft_ms,
            slo_itl_ms=slo.itl_ms,
            requests_per_s=per_s(good),
            fraction=good / len(results) if results else 0.0,
        ),
    )

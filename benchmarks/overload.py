"""Overload benchmark: the gateway's admission control at 3x the measured capacity.

One 1P1D deployment of the built-in ``tiny`` model, admission bounded by ``--max-inflight``
and ``--max-queued``. Three phases, same run, same kind of requests (fresh
150-600-word prompts, 32 tokens out):

  capacity   closed loop at ``max_inflight`` clients: capacity = completed req/s; its p99
             TTFT sets the SLO (TTFT <= 2x that p99) that goodput counts against
  overload   open loop at 3x capacity, admission on: admitted requests' p99 TTFT and
             goodput, 429s (with Retry-After) and 503s (queue deadline)
  no-limit   the same open loop with admission lifted: what the bound protects against

    .venv/bin/python -m benchmarks.overload [--max-inflight 8] [--max-queued 2] [--requests 48]

Writes its table into benchmarks/RESULTS.md and prints, last,
``overload: p99_ttft_ratio=<overload/capacity> goodput_ratio=<overload/capacity> hung=<n>``.
The issue's bar: p99_ttft_ratio <= 2, goodput_ratio >= 0.9, hung = 0.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.results_md import update_results_md
from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import LoadConfig
from disagg.bench.metrics import Slo, summarize
from disagg.bench.records import RequestSpec
from disagg.bench.runner import BenchReport, run_bench
from disagg.bench.workloads import Workload, describe, synthetic_words

REQUEST_DEADLINE_S = 300.0  # a request without an answer by then has hung


def outcome(report: BenchReport) -> Counter[str]:
    """Requests by how they ended: ok, 429, 503, hung (timed out), other."""
    out: Counter[str] = Counter()
    for r in report.requests:
        err = r.error or ""
        out["ok" if r.ok else "429" if "429" in err else "503" if "503" in err
            else "hung" if "imeout" in err else "other"] += 1
    return out


def unique_prompts(n: int, seed: int) -> Workload:
    """``n`` completions of 150-600 fresh words each (no shared prefix: every phase
    computes its prompts, none rides on an earlier phase's cache), 32 tokens out."""
    rng = random.Random(seed)
    words = synthetic_words(seed)
    specs = [RequestSpec(request_id=f"s{seed}-{i}", api="completions",
                         prompt=" ".join(next(words) for _ in range(rng.randint(150, 600))),
                         max_tokens=32) for i in range(n)]
    return Workload(name="unique-prompts", requests=specs, info=describe("unique", specs))


def phase(dep: Any, wl: Workload, load: LoadConfig) -> BenchReport:
    endpoint = EndpointConfig(dep.url, dep.served_model_name,
                              request_timeout_s=REQUEST_DEADLINE_S)
    return run_bench(wl, endpoint, load, Slo(ttft_ms=1e9, itl_ms=1e9))


def row(name: str, load: str, r: BenchReport, slo: Slo) -> dict[str, Any]:
    s = summarize(r.requests, r.duration_s, slo)  # goodput against the run's own SLO
    counts = outcome(r)
    return {"phase": name, "load": load, "sent": len(r.requests), **counts,
            "ttft_p50_ms": s.ttft_ms.p50, "ttft_p99_ms": s.ttft_ms.p99,
            "done_per_s": s.requests_per_s, "goodput_per_s": s.goodput.requests_per_s}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from disagg.launch.api import launch  # the launcher is heavy (imports Ray): only when run

    def workload(scale: int, seed: int) -> Workload:
        return unique_prompts(args.requests * scale, seed)

    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            "api": {"max_inflight": args.max_inflight, "max_queued": args.max_queued,
                    "queue_timeout_s": args.queue_timeout}}
    with launch(topo) as dep:
        phase(dep, workload(1, 99), LoadConfig(concurrency=2, progress=False))  # warm-up
        cap = phase(dep, workload(1, 0), LoadConfig(concurrency=args.max_inflight,
                                                    progress=False))
        capacity = cap.requests_per_s
        slo = Slo(ttft_ms=2 * (cap.ttft_ms.p99 or 1.0), itl_ms=1e9)
        qps = 3 * capacity
        over = phase(dep, workload(3, 1), LoadConfig(qps=qps, seed=1, progress=False))
        # The same offered load with the bound lifted (set between phases, nothing in flight).
        adm = dep.gateway.admission
        adm.max_inflight, adm.max_queued = 1 << 20, 1 << 20
        free = phase(dep, workload(3, 2), LoadConfig(qps=qps, seed=2, progress=False))
    return [row("capacity", f"concurrency={args.max_inflight}", cap, slo),
            row("overload, admission on", f"qps={qps:.2f} (3x)", over, slo),
            row("overload, no limit", f"qps={qps:.2f} (3x)", free, slo)]


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cols = ["phase", "load", "sent", "ok", "429", "503", "hung", "other", "ttft_p50_ms",
            "ttft_p99_ms", "done_per_s", "goodput_per_s"]
    command = " ".join(["python -m benchmarks.overload", *sys.argv[1:]])
    lines = [f"Command: `{command}`", "",
             f"1P1D `tiny` bf16; admission max_inflight={args.max_inflight}, "
             f"max_queued={args.max_queued}, queue_timeout_s={args.queue_timeout:g}. Goodput: "
             "requests/s finished with TTFT <= 2x the capacity phase's p99.", "",
             "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v)
                 for v in (r.get(c, 0) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-inflight", type=int, default=8)
    ap.add_argument("--max-queued", type=int, default=2)
    ap.add_argument("--queue-timeout", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=48, help="at capacity; 3x that overloaded")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    rows = run(args)
    table = render(rows, args)
    update_results_md(args.results, "overload", f"## Overload: admission at 3x capacity\n\n"
                                                 f"{table}")
    print(table)
    cap, over = rows[0], rows[1]
    ttft_ratio = (over["ttft_p99_ms"] or float("inf")) / (cap["ttft_p99_ms"] or 1.0)
    goodput_ratio = over["goodput_per_s"] / max(cap["goodput_per_s"], 1e-9)
    hung = sum(r.get("hung", 0) for r in rows[:2])
    print(f"overload: p99_ttft_ratio={ttft_ratio:.2f} goodput_ratio={goodput_ratio:.2f} "
          f"hung={hung}")


if __name__ == "__main__":
    main()

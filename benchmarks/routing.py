"""Routing benchmark: KV-aware pairing against round-robin on a 2P2D deployment, same run.

Two scenarios, each served by the same 2P2D topology of the built-in ``small`` model (four
instances on this machine's cores), once per policy (prefill and decode both use it):

  sharegpt  multi-round conversations (the benchmark harness's workload): the next turn of
            a conversation finds its history on the instance that served the last one
  skewed    document questions where most requests ask about one hot document: KV-aware
            routing must not let the hot document overload the instance holding it (its
            TTFT no worse than round-robin's); it spills once the queue there outlasts
            computing the document elsewhere

Reported per policy: mean/p50/p99 TTFT, the decoders' prefix hit rate as vLLM counted it
next to what the gateway's index predicted when routing, the share of prompt tokens
computed anywhere, the prefill-hop decisions, and the busiest/least busy decoder's share.

    .venv/bin/python -m benchmarks.routing [--users 8] [--rounds 6] [--load 0.85 | --qps 0.12 |
        --closed-loop] [--concurrency 4] [--scenarios sharegpt,skewed] [--hop-slower]
        [--no-prefill-queue] [--section routing]

By default it first measures capacity: each deployment serves other users' conversations
closed loop (``--concurrency`` in flight; round-robin's throughput is the capacity), then
both policies get open-loop Poisson arrivals at ``--load`` (85%) of that capacity, so the
offered load follows the machine instead of a rate tuned to one.

Writes its table into benchmarks/RESULTS.md and prints, last,
``routing: ttft_round_robin/ttft_kv_aware=<ratio>`` (the sharegpt scenario).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from benchmarks.results_md import update_results_md
from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import LoadConfig
from disagg.bench.metrics import Slo
from disagg.bench.runner import load_tokenizer, run_bench
from disagg.bench.sharegpt import ShareGptParams
from disagg.bench.workloads import DocQAParams, build_workload
from disagg.models import prepare_model
from disagg.scrape import Series, series, total

POLICIES = ("round_robin", "kv_aware")


def topology(model: str, policy: str, hop_slower: bool = False,
             prefill_queue: bool = True) -> dict:
    quarter = {"replicas": 2, "resources": {"num_cpus": 0.5}}
    return {"model": model,
            "engine": {"dtype": "bfloat16", "max_model_len": 8192, "kv_cache_gib": 1,
                       "enforce_eager": True},
            "prefill": quarter, "decode": quarter,
            "scheduler": {"prefill_policy": policy, "decode_policy": policy,
                          "local_prefill_when_hop_slower": hop_slower,
                          "prefill_queue": prefill_queue}}


def instance_urls(url: str) -> dict[str, str]:
    """engine_id -> URL of every instance behind the gateway."""
    status = httpx.get(url + "/v1/disagg/status", timeout=10).json()
    return {i["key"]: i["url"] for i in status["instances"]}


def snapshot(url: str, engine_headers: dict[str, str]) -> dict[str, Series]:
    """The gateway's disagg_* counters and each instance's vllm:* prefix-cache counters
    (engines answer only with the deployment's ``engine_headers``)."""
    snap = {"gateway": series(url, "disagg_")}
    for key, inst_url in instance_urls(url).items():
        snap[key] = series(inst_url, "vllm:", headers=engine_headers)
    return snap


def measure(dep, workload, load: LoadConfig) -> dict:
    model = dep.served_model_name
    before = snapshot(dep.url, dep.engine_headers())
    report = run_bench(workload, EndpointConfig(dep.url, model), load,
                       Slo(ttft_ms=5000, itl_ms=500))
    after = snapshot(dep.url, dep.engine_headers())

    def delta(where: str, name: str, **labels: str) -> float:
        return total(after[where], name, **labels) - total(before.get(where, {}), name,
                                                           **labels)

    def per_label(name: str) -> dict[str, float]:
        keys = {lab for (n, lab) in after["gateway"] if n == name}
        return {dict(lab).get("reason") or dict(lab).get("instance", ""):
                delta("gateway", name, **dict(lab)) for lab in keys}

    decoders = [k for k in after if k.startswith("decode")]
    instances = [k for k in after if k != "gateway"]
    # Real hits, from vLLM itself: tokens a decoder found in its own prefix cache, and
    # tokens computed anywhere (each instance's queries minus local and connector hits).
    queries = sum(delta(k, "vllm:prefix_cache_queries") for k in decoders)
    hits = sum(delta(k, "vllm:prefix_cache_hits") for k in decoders)
    computed = sum(delta(k, "vllm:prefix_cache_queries") - delta(k, "vllm:prefix_cache_hits")
                   - delta(k, "vllm:external_prefix_cache_hits") for k in instances)
    prompt = delta("gateway", "disagg_prompt_tokens")
    routed = {k: v for k, v in per_label("disagg_instance_requests").items()
              if k.startswith("decode")}
    loads = sorted(routed.values()) or [0]
    return {"completed": report.completed, "failed": report.failed,
            "ttft_mean": report.ttft_ms.mean, "ttft_p50": report.ttft_ms.p50,
            "ttft_p99": report.ttft_ms.p99, "itl_p99": report.itl_ms.p99,
            "hit_rate": hits / max(1.0, queries),
            "predicted_hit_rate": delta("gateway", "disagg_prefix_hit_tokens", tier="engine")
            / max(1.0, prompt),
            "computed_share": computed / max(1.0, prompt),
            "decisions": {k: v for k, v in per_label("disagg_decisions").items() if v},
            "load_ratio": loads[-1] / max(1.0, loads[0]), "decode_requests": loads,
            "requests_per_s": report.requests_per_s}


def run(args: argparse.Namespace) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
    """Both policies on the scenarios; returns (results by scenario and policy, capacity
    by policy in requests/s, measured closed loop on other users' conversations)."""
    from disagg.launch.api import launch  # the launcher is heavy (imports Ray): only when run

    tok = load_tokenizer(prepare_model(args.model))

    def chat(skip: int) -> ShareGptParams:
        return ShareGptParams(num_users=args.users, skip_users=skip, max_rounds=args.rounds,
                              max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=32)

    skew = DocQAParams(num_docs=6, doc_tokens=args.doc_tokens, uses_per_doc=8,
                       output_tokens=16, hot_fraction=0.75)
    workloads = {"sharegpt": lambda: build_workload("sharegpt", tok, chat=chat(0)),
                 "skewed": lambda: build_workload("doc-analysis", tok, doc=skew,
                                                  num_requests=args.skew_requests)}
    workloads = {k: build() for k, build in workloads.items() if k in args.scenarios}
    calibration = build_workload("sharegpt", tok, chat=chat(args.users))
    results: dict[str, dict[str, dict]] = {name: {} for name in workloads}
    capacity: dict[str, float] = {}
    qps = args.qps
    for policy in POLICIES:
        with launch(topology(args.model, policy, args.hop_slower,
                             not args.no_prefill_queue)) as dep:
            if not args.closed_loop:
                # Both deployments run the calibration (same warm-up for both); round-robin
                # goes first and its closed-loop throughput sets the open-loop rate.
                cal = measure(dep, calibration, LoadConfig(concurrency=args.concurrency,
                                                           progress=False))
                capacity[policy] = cal["requests_per_s"]
                print(f"{policy} capacity: {capacity[policy]:.3f} req/s", flush=True)
                qps = qps or args.load * capacity[POLICIES[0]]
            for name, wl in workloads.items():
                load = LoadConfig(concurrency=args.concurrency, progress=False) \
                    if args.closed_loop else LoadConfig(qps=qps, progress=False)
                r = measure(dep, wl, load)
                r["load"] = load.label
                results[name][policy] = r
                print(f"{policy} {name}: {r}", flush=True)
    return results, capacity


def render(results: dict[str, dict[str, dict]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| scenario | policy | done/failed | TTFT mean (s) | TTFT p50 (s) | TTFT p99 (s) | "
             "ITL p99 (ms) | decoder prefix hit | gateway's predicted hit | prompt computed | "
             "decode requests (min..max) | decisions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_policy in results.items():
        for policy, r in by_policy.items():
            dec = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["decisions"].items()))
            lines.append(
                f"| {name} | {policy} | {r['completed']}/{r['failed']} | "
                f"{r['ttft_mean'] / 1e3:.2f} | {r['ttft_p50'] / 1e3:.2f} | "
                f"{r['ttft_p99'] / 1e3:.2f} | {r['itl_p99']:.0f} | {r['hit_rate']:.1%} | "
                f"{r['predicted_hit_rate']:.1%} | {r['computed_share']:.1%} | "
                f"{r['decode_requests'][0]:.0f}..{r['decode_requests'][-1]:.0f} | {dec} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--users", type=int, default=8, help="sharegpt conversations")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per user (2 are history)")
    ap.add_argument("--max-prompt-tokens", type=int, default=3000)
    ap.add_argument("--doc-tokens", type=int, default=800, help="skewed: document length")
    ap.add_argument("--skew-requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4,
                    help="in flight in the closed loop (capacity, or --closed-loop)")
    ap.add_argument("--load", type=float, default=0.85,
                    help="open-loop rate as a share of round-robin's measured capacity")
    ap.add_argument("--qps", type=float, default=None,
                    help="open-loop rate in req/s instead of --load x capacity")
    ap.add_argument("--closed-loop", action="store_true",
                    help="offer --concurrency in flight instead of open-loop Poisson arrivals")
    ap.add_argument("--scenarios", type=lambda v: v.split(","), default=["sharegpt", "skewed"],
                    help="comma-separated: sharegpt, skewed")
    ap.add_argument("--hop-slower", action="store_true",
                    help="scheduler.local_prefill_when_hop_slower on (kv_aware: decoders "
                    "holding a conversation prefill it when the hop is slower)")
    ap.add_argument("--no-prefill-queue", action="store_true",
                    help="scheduler.prefill_queue off: hops go straight to the prefill "
                    "instances (kv_aware otherwise holds them, shortest expected first)")
    ap.add_argument("--section", default="routing", help="RESULTS.md section to write")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    results, capacity = run(args)
    cmd = "python -m benchmarks.routing " + " ".join(sys.argv[1:])
    table = render(results, cmd.strip())
    first = next(iter(results.values()))[POLICIES[0]]["load"]
    offered = (f"{args.concurrency} in flight" if args.closed_loop else
               f"open-loop Poisson arrivals, {first}"
               + (f" ({args.load:.0%} of round-robin's capacity)" if capacity and not args.qps
                  else ""))
    measured = ("" if not capacity else
                "Capacity, closed loop with " f"{args.concurrency} in flight on "
                f"{args.users} other users' conversations (the same calibration run on both "
                "deployments, also their warm-up): "
                + ", ".join(f"{p} {c:.3f} req/s" for p, c in capacity.items()) + ".\n\n")
    body = ("## Routing: kv_aware"
            + (" (local_prefill_when_hop_slower)" if args.hop_slower else "")
            + (" (prefill_queue off)" if args.no_prefill_queue else "")
            + " against round_robin, 2P2D `small` (eager), "
            f"{offered}, sharegpt up to {args.rounds} rounds per user\n\n" + measured +
            "Both policies in the same run, each on a fresh deployment (prefill and decode "
            "chosen by the policy named; conditional disaggregation at its default "
            "threshold" + ("; local_prefill_when_hop_slower on" if args.hop_slower else "")
            + ("; the gateway's prefill queue off" if args.no_prefill_queue else
               "; the gateway's prefill queue on: kv_aware holds hops beyond one per prefill "
               "compute unit (instances pinned to the same cores are one), shortest expected "
               "prefill first; round_robin estimates none and sends them straight on")
            + "). Decoder prefix hit: prompt tokens the decoders found in their own "
            "prefix cache (vLLM's counters); predicted: what the gateway's index expected "
            "when routing; prompt computed: tokens prefilled anywhere (prefill and decode "
            "instances, less local and connector hits) over prompt tokens.\n\n"
            f"{table}")
    update_results_md(args.results, args.section, body)
    print(table)
    if "skewed" in results:
        skewed = results["skewed"]
        print(f"routing: skewed ttft_kv_aware/ttft_round_robin="
              f"{skewed['kv_aware']['ttft_mean'] / max(1e-9, skewed['round_robin']['ttft_mean']):.2f}"
              " (goal: at most 1)")
    if "sharegpt" not in results:
        return
    chat = results["sharegpt"]
    ratio = chat["round_robin"]["ttft_mean"] / max(1e-9, chat["kv_aware"]["ttft_mean"])
    print(f"routing: ttft_round_robin/ttft_kv_aware={ratio:.2f}")


if __name__ == "__main__":
    main()

"""KV store benchmark: a repeated long prompt served from the store against recomputing it.

Two decode-only instances of the built-in ``small`` model (one core each) share a store
tier. For each prompt (default 8K tokens) and each shared tier (disk, Redis), in one run:

  recompute  instance X, cold: vLLM computes the whole prompt (X then saves its chunks)
  store      instance Y, which never saw the prompt: its connector finds the chunks in
             the shared tier and loads them; vLLM computes only the tail
  local hit  instance Y again: vLLM's own prefix cache (the floor)

TTFT is measured at the first streamed token; greedy outputs must match token for token.

    .venv/bin/python -m benchmarks.store [--tokens 8192] [--prompts 2] [--tiers disk,redis]

Writes its table into benchmarks/RESULTS.md and prints, last,
``store: ttft_recompute/ttft_store=<ratio> at 8K tokens`` and
``store: ttft_store/ttft_prefix_hit disk=<r> redis=<r> at 8K tokens`` (goal: disk <= 2,
Redis <= 3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.results_md import update_results_md
from disagg.scrape import total
from tests.support.redis_server import local_redis

OUTPUT_TOKENS = 16


def ttft_and_tokens(url: str, model: str, prompt: list[int],
                    headers: dict[str, str]) -> tuple[float, list[int]]:
    """Stream one greedy completion from an engine (``headers``: the deployment's engine
    token); (seconds to the first token, generated token ids)."""
    body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    ids: list[int] = []
    first = None
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800,
                      headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices") or []:
                if c.get("token_ids"):
                    first = first or time.perf_counter()
                    ids.extend(c["token_ids"])
    assert first is not None and len(ids) == OUTPUT_TOKENS, f"bad answer from {url}: {ids}"
    return first - t0, ids


def wait_counter(url: str, name: str, at_least: float, headers: dict[str, str],
                 timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while total(url, name, headers=headers) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} below {at_least} on {url}")
        time.sleep(0.5)


def run_tier(tier: str, store: dict, args: argparse.Namespace) -> list[dict]:
    from disagg.launch.api import launch  # the launcher is heavy (imports Ray): only when run

    topo = {"model": args.model, "engine": {"dtype": "bfloat16", "max_model_len":
                                            args.tokens + 512, "kv_cache_gib": 2},
            "prefill": {"replicas": 0}, "decode": {"replicas": 2}, "store": store}
    rng = random.Random(args.seed)
    rows = []
    with launch(topo) as dep:
        x, y = (dep.instances[k].url for k in ("decode-0", "decode-1"))
        model, auth = dep.served_model_name, dep.engine_headers()
        ttft_and_tokens(x, model, [5] * 300, auth)  # warm both engines up
        ttft_and_tokens(y, model, [6] * 300, auth)
        for i in range(args.prompts):
            prompt = [rng.randrange(10, 16000) for _ in range(args.tokens)]
            saved = total(x, "vllm:disagg_store_saved_chunks", headers=auth)
            t_cold, want = ttft_and_tokens(x, model, prompt, auth)
            wait_counter(x, "vllm:disagg_store_saved_chunks", saved + args.tokens // 256, auth)
            time.sleep(2)  # the write-through to the shared tier runs behind the CPU tier
            loaded = total(y, "vllm:disagg_store_loaded_tokens", headers=auth)
            load_s = total(y, "vllm:disagg_store_load_seconds", headers=auth)
            t_store, got = ttft_and_tokens(y, model, prompt, auth)
            wait_counter(y, "vllm:disagg_store_loaded_tokens", loaded + 1, auth)
            time.sleep(1)  # counters arrive on vLLM's stats tick
            loaded = total(y, "vllm:disagg_store_loaded_tokens", headers=auth) - loaded
            load_s = total(y, "vllm:disagg_store_load_seconds", headers=auth) - load_s
            t_hit, again = ttft_and_tokens(y, model, prompt, auth)
            rows.append({"tier": tier, "prompt": i, "recompute_s": t_cold, "store_s": t_store,
                         "local_hit_s": t_hit, "identical": got == want == again,
                         "loaded_tokens": loaded, "load_s": load_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict], command: str, tokens: int) -> str:
    lines = [f"Command: `{command}`", "",
             "| shared tier | prompt tokens | TTFT recompute (s) | TTFT from store (s) | "
             "of which loading (s) | TTFT vLLM prefix hit (s) | recompute/store | store/hit | "
             "tokens loaded | greedy identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tier']} | {tokens} | {r['recompute_s']:.2f} | {r['store_s']:.3f} | "
                     f"{r['load_s']:.3f} | {r['local_hit_s']:.3f} | "
                     f"{r['recompute_s'] / r['store_s']:.1f} | "
                     f"{r['store_s'] / r['local_hit_s']:.2f} | "
                     f"{r['loaded_tokens']:.0f} | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per tier")
    ap.add_argument("--tiers", default="disk,redis")
    ap.add_argument("--redis-url", default=None, help="default: a throwaway local server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        for tier in args.tiers.split(","):
            if tier == "disk":
                path = stack.enter_context(tempfile.TemporaryDirectory(prefix="disagg-kv-"))
                store = {"disk_path": path}
            elif tier == "redis":
                url = args.redis_url or stack.enter_context(local_redis())
                store = {"redis_url": url, "redis_gib": 2.0}
            else:
                raise SystemExit(f"unknown tier {tier!r}: disk or redis")
            rows += run_tier(tier, store, args)
    cmd = "python -m benchmarks.store " + " ".join(sys.argv[1:])
    table = render(rows, cmd.strip(), args.tokens)
    body = (f"## KV store: a repeated {args.tokens}-token prompt, `{args.model}` model, bf16\n\n"
            f"Two decode-only instances, one core each; X computes the prompt cold and saves "
            f"its chunks, Y serves it from the shared tier (its CPU tier and vLLM cache "
            f"empty), then from its own prefix cache. TTFT at the first streamed token.\n\n"
            f"{table}")
    update_results_md(args.results, "store", body)
    print(table)
    ratio = statistics.median(r["recompute_s"] for r in rows) / statistics.median(
        r["store_s"] for r in rows)
    assert all(r["identical"] for r in rows), "greedy outputs differ"
    at = f"at {args.tokens // 1024}K tokens"
    print(f"store: ttft_recompute/ttft_store={ratio:.1f} {at}")
    vs_hit = " ".join(f"{t}={hit_ratio(rows, t):.2f}" for t in dict.fromkeys(
        r["tier"] for r in rows))
    print(f"store: ttft_store/ttft_prefix_hit {vs_hit} {at}")


def hit_ratio(rows: list[dict], tier: str) -> float:
    """Median over ``tier``'s prompts of TTFT from the store over TTFT of vLLM's own prefix
    hit of the same prompt on the same instance (measured right after: same conditions)."""
    return statistics.median(r["store_s"] / r["local_hit_s"] for r in rows if r["tier"] == tier)


if __name__ == "__main__":
    main()

"""Greedy outputs across TP sizes: disagg (prefill TP p, decode TP d) against plain vLLM at d.

For each dtype and each (p, d) pair: plain vLLM (no connector) at TP d answers ``--prompts``
greedy prompts of 1 to ``--max-len`` random tokens; then a disagg deployment with the prefill
at TP p and the decoder at TP d answers the same, every prompt through the prefill hop (its
KV pulled as head slices when p != d). Reports how many outputs are identical and, for the
others, at which generated token they first differ. float32 must be all identical (the
integration tests assert it); bf16 is reported (a TP-2 prefill sums its attention output
projection across ranks in another order, so its KV can differ in the last bits).

    .venv/bin/python -m benchmarks.tp_exactness [--dtypes float32,bfloat16] [--pairs 2:1,1:2]

Writes a table into benchmarks/RESULTS.md (section ``tp-exactness``) and prints
``tp_exactness: <dtype> P<p>D<d> identical=<n>/<total>`` per row.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.results_md import machine_info, update_results_md
from disagg.credentials import SECRET_ENV, new_secret
from disagg.models import resolve_model

os.environ.setdefault(SECRET_ENV, new_secret())  # engines and this client share it

# after the secret: the helpers read it for the engines' Authorization header
from tests.integration.helpers import complete, plain_vllm, token_prompts  # noqa: E402


def engine(dtype: str) -> dict:
    return {"dtype": dtype, "max_model_len": 4096, "kv_cache_gib": 1, "enforce_eager": True,
            "max_num_seqs": 16}


def plain_outputs(model_path: Path, dtype: str, tp: int, prompts, max_tokens: int):
    cfg = {**engine(dtype), "served_model_name": "m", "tensor_parallel_size": tp}
    with plain_vllm(model_path, cfg, cores="0|1" if tp == 2 else "0-1") as url:
        return [complete(url, "m", p, max_tokens, stream=False) for p in prompts]


def disagg_outputs(model: str, dtype: str, p: int, d: int, prompts, max_tokens: int):
    from disagg.launch.api import launch  # heavy (Ray): only when run

    topo = {"model": model, "engine": engine(dtype),
            "prefill": {"replicas": 1, "tensor_parallel_size": p, "resources": {"num_cpus": 1}},
            "decode": {"replicas": 1, "tensor_parallel_size": d, "resources": {"num_cpus": 1}},
            "scheduler": {"min_remote_prefill_tokens": 0}, "store": {"enabled": False}}
    with launch(topo) as dep:
        name = dep.served_model_name
        return [complete(dep.url, name, q, max_tokens, stream=False) for q in prompts]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--pairs", default="2:1,1:2", help="prefill:decode TP sizes")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.pairs.split(",")]
    prompts = token_prompts(args.prompts, (1, args.max_len), vocab=16000, seed=13)
    model_path = resolve_model(args.model)
    rows = []
    for dtype in args.dtypes.split(","):
        plain = {d: plain_outputs(model_path, dtype, d, prompts, args.max_tokens)
                 for d in sorted({d for _, d in pairs})}
        for p, d in pairs:
            got = disagg_outputs(args.model, dtype, p, d, prompts, args.max_tokens)
            diffs = [first_difference(w, g) for w, g in zip(plain[d], got, strict=True)
                     if w != g]
            rows.append((dtype, p, d, len(prompts) - len(diffs), diffs))
            print(f"tp_exactness: {dtype} P{p}D{d} identical={rows[-1][3]}/{len(prompts)}"
                  + (f" first_divergence={sorted(diffs)}" if diffs else ""), flush=True)
    command = "python -m benchmarks.tp_exactness " + shlex.join(sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", "",
             f"Machine: {machine_info()}. Model `{args.model}`, {args.prompts} prompts of 1 to "
             f"{args.max_len} random tokens, {args.max_tokens} greedy tokens each, every "
             "prompt through the prefill hop; plain vLLM at the decoder's TP size is the "
             "reference.", "",
             "| dtype | prefill TP | decode TP | identical | first divergence (generated "
             "token index) of the others |", "|---|---|---|---|---|"]
    for dtype, p, d, same, diffs in rows:
        where = (f"min {min(diffs)}, median {statistics.median(diffs):g}, max {max(diffs)}"
                 if diffs else "-")
        lines.append(f"| {dtype} | {p} | {d} | {same}/{args.prompts} | {where} |")
    update_results_md(args.results, "tp-exactness", "## tp-exactness\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

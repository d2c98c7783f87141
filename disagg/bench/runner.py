"""One benchmark run end to end: find the model, run the load, build and print the report."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import LoadConfig, run_load
from disagg.bench.metrics import Slo, Stats, Summary, summarize
from disagg.bench.records import RequestResult
from disagg.bench.tokenizer import HfTokenizer
from disagg.bench.workloads import Workload
from disagg.models import BUILTIN_MODELS, prepare_model


class ServedModel(BaseModel):
    """A model as ``/v1/models`` lists it: its name and (vLLM) the folder it was loaded from."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    id: str
    root: str | None = None


class BenchReport(Summary):
    """The JSON a run writes: the summary's fields at top level, plus what was run and the
    per-request records (for CDF plots and audits)."""

    workload: dict[str, int | float | str]
    config: dict[str, Any]
    requests: list[RequestResult]


def served_models(url: str, timeout_s: float = 10.0) -> list[ServedModel]:
    """Models listed by the server at ``url`` (``GET /v1/models``)."""
    root = url.rstrip("/").removesuffix("/v1")
    resp = httpx.get(f"{root}/v1/models", timeout=timeout_s, trust_env=False)
    resp.raise_for_status()
    return [ServedModel(id=m["id"], root=m.get("root")) for m in resp.json().get("data", [])]


def resolve_tokenizer_path(name: str | None, models: list[ServedModel]) -> Path:
    """A local folder holding the tokenizer: ``name`` if it is a folder, else a built-in model
    of that name (``disagg.models.prepare_model``), else the served model's ``root`` folder.

    Raises ValueError when none is found: pass ``--tokenizer``.
    """
    if name and Path(name).is_dir():
        return Path(name)
    if name and name in BUILTIN_MODELS:
        return prepare_model(name)
    for model in models:
        if model.root and Path(model.root).is_dir():
            return Path(model.root)
    raise ValueError("cannot find the model's tokenizer folder: pass --tokenizer PATH")


def load_tokenizer(path: Path) -> HfTokenizer:
    """The model's tokenizer from its folder."""
    return HfTokenizer(path)


def run_bench(
    workload: Workload,
    endpoint: EndpointConfig,
    load: LoadConfig,
    slo: Slo,
    config: dict[str, Any] | None = None,
) -> BenchReport:
    """Run ``workload`` against ``endpoint`` under ``load``; return the full report."""
    run = asyncio.run(run_load(workload.requests, endpoint, load))
    summary = summarize(run.results, run.duration_s, slo)
    cfg = {
        "url": endpoint.base_url,
        "model": endpoint.model,
        "load": load.label,
        "concurrency": load.concurrency,
        "qps": load.qps,
        "seed": load.seed,
        "ignore_eos": endpoint.ignore_eos,
        **(config or {}),
    }
    return BenchReport(
        **summary.model_dump(), workload=workload.info, config=cfg, requests=run.results
    )


def write_report(report: BenchReport, path: str | Path) -> None:
    """Write ``report`` as indented JSON, creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=1))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stat_row(name: str, s: Stats) -> list[str]:
    return [name, _fmt(s.mean), _fmt(s.p50), _fmt(s.p90), _fmt(s.p99)]


def print_summary(report: BenchReport, title: str, console: Console | None = None) -> None:
    """Print the summary table (latencies in ms) and the throughput line."""
    console = console or Console()
    table = Table(title=title)
    for col in ("metric (ms)", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right" if col != "metric (ms)" else "left")
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        table.add_row(*_stat_row(name.removesuffix("_ms").upper(), getattr(report, name)))
    console.print(table)
    g = report.goodput
    console.print(
        f"completed {report.completed}/{report.num_requests}, failed {report.failed} "
        f"in {report.duration_s:.1f} s | output {report.output_tokens_per_s:.1f} tok/s, "
        f"input {report.input_tokens_per_s:.1f} tok/s, {report.requests_per_s:.2f} req/s | "
        f"goodput {g.requests_per_s:.2f} req/s ({g.fraction:.0%} within TTFT<={g.slo_ttft_ms:g} "
        f"ms, ITL<={g.slo_itl_ms:g} ms)"
    )
    for reason, count in report.failures.items():
        console.print(f"[red]failed x{count}: {reason}")
    if report.prompt_token_mismatches:
        console.print(
            f"[yellow]{report.prompt_token_mismatches} prompt-length mismatches between the "
            "server's usage and the workload tokenizer"
        )

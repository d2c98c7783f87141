"""PNG plots for benchmark comparisons: latency CDFs and throughput against offered QPS.

Inputs are the JSON reports ``disagg bench`` writes (:class:`disagg.bench.runner.BenchReport`):
per-request TTFT and ITL samples come from their ``requests`` records (completed ones only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from disagg.bench.runner import BenchReport  # noqa: E402


def ttft_ms(report: BenchReport) -> list[float]:
    """TTFT of every completed request, in ms."""
    return [r.ttft_s * 1000 for r in report.requests if r.ok and r.ttft_s is not None]


def itl_ms(report: BenchReport) -> list[float]:
    """Every inter-token gap of every completed request, in ms."""
    return [g * 1000 for r in report.requests if r.ok for g in r.itl_s]


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical CDF (i/n for the i-th smallest, 1-based)."""
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def plot_cdfs(series: Mapping[str, Sequence[float]], title: str, xlabel: str, path: Path) -> Path:
    """One CDF line per label (empty series are skipped); log x axis; writes ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        if values:
            xs, ys = cdf_points(values)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_throughput(
    points: Mapping[str, Sequence[tuple[float, float]]], title: str, path: Path
) -> Path:
    """Output tokens/s against offered QPS, one line per label; writes ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([q for q, _ in pts], [t for _, t in pts], marker="o", label=label)
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_plots(
    by_load: Mapping[str, Mapping[str, BenchReport]],
    qps: Mapping[str, float | None],
    workload: str,
    out_dir: Path,
) -> list[Path]:
    """TTFT and ITL CDFs per load point (``by_load[load][system]``), and throughput against
    QPS when there are several open-loop points. Returns the files written."""
    paths = []
    for load, reports in by_load.items():
        suffix = "" if len(by_load) == 1 else "-" + load.replace("=", "")
        title = f"{workload}, {load}"
        paths.append(
            plot_cdfs(
                {s: ttft_ms(r) for s, r in reports.items()},
                f"TTFT CDF: {title}",
                "TTFT (ms)",
                out_dir / f"{workload}-ttft-cdf{suffix}.png",
            )
        )
        paths.append(
            plot_cdfs(
                {s: itl_ms(r) for s, r in reports.items()},
                f"ITL CDF: {title}",
                "inter-token latency (ms)",
                out_dir / f"{workload}-itl-cdf{suffix}.png",
            )
        )
    sweep = [load for load in by_load if qps.get(load) is not None]
    if len(sweep) > 1:
        points: dict[str, list[tuple[float, float]]] = {}
        for load in sweep:
            for system, report in by_load[load].items():
                points.setdefault(system, []).append((qps[load], report.output_tokens_per_s))
        paths.append(
            plot_throughput(
                points, f"Throughput: {workload}", out_dir / f"{workload}-throughput-vs-qps.png"
            )
        )
    return paths

"""Async load generator: open loop (Poisson arrivals at a QPS) or closed loop (fixed concurrency).

Contracts:

- Every spec yields exactly one :class:`RequestResult`, in the order of the specs; failures are
  results with ``ok=False``, never dropped.
- Closed loop: ``concurrency`` workers take specs in order; each sends its next spec as soon
  as its previous one finished.
- Open loop: spec *i* is sent at the *i*-th arrival of a Poisson process of rate ``qps``
  (exponential gaps from ``random.Random(seed)``; the first at time 0), whatever is in flight.
- Either way a spec with ``depends_on`` is held until that earlier request has finished
  (a conversation's next turn waits for the previous one), whether it succeeded or not.
- The run's duration is from the first send to the last completion.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disagg.bench.client import EndpointConfig, stream_request
from disagg.bench.records import RequestResult, RequestSpec


@dataclass(frozen=True)
class LoadConfig:
    """How to offer load: exactly one of ``concurrency`` (closed) or ``qps`` (open)."""

    concurrency: int | None = None
    qps: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.qps is None):
            raise ValueError("give exactly one of concurrency or qps")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.qps is not None and self.qps <= 0:
            raise ValueError("qps must be > 0")

    @property
    def label(self) -> str:
        """Human-readable load description, e.g. ``concurrency=4`` or ``qps=2``."""
        return f"concurrency={self.concurrency}" if self.qps is None else f"qps={self.qps:g}"


@dataclass
class RunResult:
    """Results (one per spec, same order) and the run's duration in seconds."""

    results: list[RequestResult]
    duration_s: float


def poisson_offsets(n: int, qps: float, seed: int) -> list[float]:
    """Send times (seconds from start) of ``n`` Poisson arrivals at rate ``qps``; first is 0."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(qps)
        offsets.append(t)
    return offsets


def check_dependencies(specs: Sequence[RequestSpec]) -> None:
    """Raise ValueError unless ids are unique and every ``depends_on`` names an earlier spec."""
    seen: set[str] = set()
    for spec in specs:
        if spec.request_id in seen:
            raise ValueError(f"duplicate request_id {spec.request_id!r}")
        if spec.depends_on is not None and spec.depends_on not in seen:
            raise ValueError(f"{spec.request_id!r} depends on {spec.depends_on!r}, not earlier")
        seen.add(spec.request_id)


class _Run:
    """State shared by the tasks of one run."""

    def __init__(self, specs: Sequence[RequestSpec], endpoint: EndpointConfig,
                 progress: Progress | None) -> None:
        self.specs = specs
        self.endpoint = endpoint
        self.finished = {s.request_id: asyncio.Event() for s in specs}
        self.results: list[RequestResult | None] = [None] * len(specs)
        self.progress = progress
        self.failed = 0
        self.start = time.perf_counter()
        self.end = self.start

    async def send(self, client: httpx.AsyncClient, index: int) -> None:
        spec = self.specs[index]
        if spec.depends_on is not None:
            await self.finished[spec.depends_on].wait()
        result = await stream_request(client, self.endpoint, spec, self.start)
        self.results[index] = result
        self.end = max(self.end, time.perf_counter())
        self.finished[spec.request_id].set()
        self.failed += not result.ok
        if self.progress is not None:
            task = self.progress.task_ids[0]  # the bar's only task
            self.progress.update(task, advance=1, failed=self.failed)


async def _closed_loop(run: _Run, client: httpx.AsyncClient, concurrency: int) -> None:
    indices = iter(range(len(run.specs)))

    async def worker() -> None:
        for index in indices:
            await run.send(client, index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(run: _Run, client: httpx.AsyncClient, qps: float, seed: int) -> None:
    async def at(index: int, offset: float) -> None:
        await asyncio.sleep(max(0.0, run.start + offset - time.perf_counter()))
        await run.send(client, index)

    offsets = poisson_offsets(len(run.specs), qps, seed)
    await asyncio.gather(*(at(i, off) for i, off in enumerate(offsets)))


def _progress_bar(total: int, label: str) -> Progress:
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    progress.add_task(label, total=total, failed=0)
    return progress


async def run_load(
    specs: Sequence[RequestSpec], endpoint: EndpointConfig, load: LoadConfig
) -> RunResult:
    """Send every spec to ``endpoint`` under ``load``; return one result per spec."""
    check_dependencies(specs)
    progress = _progress_bar(len(specs), load.label) if load.progress else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(endpoint.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        run = _Run(specs, endpoint, progress)
        if progress is not None:
            progress.start()
        try:
            if load.concurrency is not None:
                await _closed_loop(run, client, load.concurrency)
            else:
                assert load.qps is not None
                await _open_loop(run, client, load.qps, load.seed)
        finally:
            if progress is not None:
                progress.stop()
    results = [r for r in run.results if r is not None]
    assert len(results) == len(specs), "a request produced no result"
    return RunResult(results=results, duration_s=run.end - run.start)

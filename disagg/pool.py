"""The gateway's view of its instances: address, health, load, in-flight requests.

A poll loop checks every instance each ``interval_s``: ``/health`` and vLLM's ``/metrics``
(load and transfer counters). An instance that fails a check leaves routing at once; while
it is down the pool asks its ``locate`` callback (the Ray actor) for a fresh address,
because a restarted actor brings its engine up on new ports.

Readiness follows the data path, not only the HTTP server: an instance with requests
running or waiting whose token counters (prompt + generated) stand still for ``stall_s``
is *stalled* (a hung engine step, a stuck transfer) and leaves routing until they move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from disagg.aio import Stopped, unless
from disagg.instance import InstanceInfo, parse_load
from disagg.metrics import GatewayMetrics
from disagg.scheduler.base import Candidate
from disagg.scheduler.rates import RateMeter
from disagg.scrape import Series, total
from disagg.scrape import parse as parse_metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Locate = Callable[[str], Awaitable[InstanceInfo | None]]
# Called with (member, its previous InstanceInfo or None) when a member is added or comes
# back as a new engine; e.g. the gateway re-subscribes to the engine's KV events.
Listener = Callable[["Member", InstanceInfo | None], None]


# The engine metrics a poll reads (load, progress, learned rates, the connector's counters).
POLLED = ("vllm:num_requests_", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens",
          "vllm:generation_tokens", "vllm:request_prefill_time_seconds_sum",
          "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
          "vllm:disagg_")


class InstanceDown(Exception):
    """The instance serving a request was marked down while the request waited on it."""


class Inflight:
    """One request's place in a member's in-flight count (what policies read as load).

    Taken when created, given back exactly once: by ``release()`` (idempotent) or on
    leaving a ``with`` block. Holds the member, not its candidate, so a member that is
    relocated meanwhile (restart) is still the one credited back.
    """

    __slots__ = ("_member", "_tokens", "_decoding")

    def __init__(self, member: Member, tokens: float = 0, decoding: bool = False):
        self._member: Member | None = member
        self._tokens = tokens  # prompt tokens the member computes for this request
        self._decoding = int(decoding)  # the member generates its answer
        member.candidate.inflight += 1
        member.candidate.pending_tokens += tokens
        member.candidate.decoding += self._decoding

    def release(self) -> None:
        if self._member is not None:
            self._member.candidate.inflight -= 1
            self._member.candidate.pending_tokens -= self._tokens
            self._member.candidate.decoding -= self._decoding
            self._member = None

    def __enter__(self) -> Inflight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Member:
    key: str  # stable name across restarts, e.g. "prefill-0"
    info: InstanceInfo
    healthy: bool = False
    draining: bool = False
    candidate: Candidate = field(init=False)
    down_since: float | None = None
    stalled: bool = False  # busy, but its token counters stood still for stall_s
    progress: float = -1.0  # prompt + generated tokens at the last change
    progress_at: float = 0.0  # when they last changed (or the instance was idle)
    kv_links: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    # (prefill engine id, UCX transport) -> bytes, seconds, pulls, failures, from its metrics
    prefill_meter: RateMeter = field(default_factory=RateMeter)  # -> candidate.prefill_rate
    load_meter: RateMeter = field(default_factory=RateMeter)  # -> candidate.load_rate
    step_meter: RateMeter = field(default_factory=RateMeter)  # -> 1 / candidate.step_s
    computed_tokens: float = 0.0  # prompt tokens computed and loaded, at the last poll
    loaded_tokens: float = 0.0

    _down: asyncio.Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.candidate = Candidate(self.info.engine_id, self.info.url)

    def down_event(self) -> asyncio.Event:
        """Set when the pool marks this member down (``InstancePool.mark_down``); a fresh
        one once it is healthy again."""
        if self._down is None:
            self._down = asyncio.Event()
        return self._down

    async def while_up(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the pool marks this member down first: then ``work``
        is cancelled and InstanceDown raised. A dying engine can hold a request open
        (uvicorn's graceful shutdown keeps in-flight connections while vLLM's engine core
        is already gone), so waiting for the socket alone could take until a timeout."""
        try:
            return await unless(work, self.down_event().wait())
        except Stopped:
            raise InstanceDown(f"instance {self.key} ({self.info.engine_id}) went down") \
                from None

    def admit(self, tokens: float = 0, decoding: bool = False) -> Inflight:
        """Count one more request in flight on this member until the result is released,
        ``tokens`` (the prompt tokens it computes for it) as work pending there, and, with
        ``decoding``, one more request it generates for."""
        return Inflight(self, tokens, decoding)

    def relocate(self, info: InstanceInfo) -> None:
        self.info = info
        self.stalled, self.progress = False, -1.0
        old = self.candidate
        self.candidate = Candidate(info.engine_id, info.url, inflight=old.inflight,
                                   pending_tokens=old.pending_tokens, decoding=old.decoding,
                                   prefill_rate=old.prefill_rate, load_rate=old.load_rate,
                                   step_s=old.step_s)


class InstancePool:
    def __init__(self, metrics: GatewayMetrics, locate: Locate | None = None,
                 interval_s: float = 0.5, timeout_s: float = 2.0,
                 engine_token: str | None = None, idle_interval_s: float = 2.0,
                 idle_after_s: float = 5.0, stall_s: float = 120.0):
        """Instances are polled every ``interval_s`` while the pool is busy (a request in
        flight within the last ``idle_after_s``) and every ``idle_interval_s`` when idle:
        rendering vLLM's /metrics is the main cost of an idle engine, and an idle pool's
        load figures are all zero anyway. A dead engine still shows within
        ``idle_interval_s`` (its actor's watchdog restarts it regardless)."""
        self.members: dict[str, Member] = {}
        self._metrics = metrics
        self._locate = locate
        self._interval, self._idle_interval = interval_s, max(idle_interval_s, interval_s)
        self._idle_after = idle_after_s
        self._stall_s = stall_s
        self._last_busy = time.monotonic()
        headers = {"Authorization": f"Bearer {engine_token}"} if engine_token else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self._task: asyncio.Task | None = None
        self.listeners: list[Listener] = []

    def add(self, key: str, info: InstanceInfo, healthy: bool = True) -> None:
        self.members[key] = m = Member(key, info, healthy=healthy)
        for listener in self.listeners:
            listener(m, None)

    def remove(self, key: str) -> Member | None:
        return self.members.pop(key, None)

    def available(self, role: str) -> list[Member]:
        return [m for m in self.members.values()
                if m.info.role == role and m.healthy and not m.stalled and not m.draining]

    def mark_down(self, member: Member, reason: str) -> None:
        if member.healthy:
            logger.warning("instance %s (%s) down: %s", member.key, member.info.engine_id, reason)
        member.healthy = False
        member.down_since = member.down_since or time.monotonic()
        member.down_event().set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="disagg-pool-poll")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._check(m) for m in list(self.members.values())),
                                 return_exceptions=True)
            await self._pause()

    async def _pause(self) -> None:
        """Sleep one poll interval; an idle pool's longer sleep ends early at the first
        request in flight."""
        now = time.monotonic()
        if any(m.candidate.inflight for m in self.members.values()):
            self._last_busy = now
        if now - self._last_busy < self._idle_after:
            await asyncio.sleep(self._interval)
            return
        deadline = now + self._idle_interval
        while time.monotonic() < deadline:
            await asyncio.sleep(self._interval)
            if any(m.candidate.inflight for m in self.members.values()):
                self._last_busy = time.monotonic()
                return

    async def _check(self, m: Member) -> None:
        try:
            resp = await self._client.get(f"{m.info.url}/metrics")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            self.mark_down(m, f"metrics poll failed: {type(exc).__name__}")
            await self._relocate(m)
        else:
            self._observe(m, resp.text)
            if not m.healthy:
                logger.info("instance %s (%s) up at %s", m.key, m.info.engine_id, m.info.url)
            if not m.healthy:
                m._down = None  # a fresh event for the requests it takes from now on
            m.healthy, m.down_since = True, None
        self._metrics.instance_up.labels(m.info.role, m.key).set(
            1 if m.healthy and not m.stalled else 0)
        self._metrics.instance_restarts.labels(m.info.role, m.key).set(m.info.restarts)

    def _observe(self, m: Member, text: str) -> None:
        series = parse_metrics(text, "vllm:", only=POLLED)
        load = parse_load(series)
        c = m.candidate
        c.running, c.waiting, c.kv_usage = load.running, load.waiting, load.kv_usage
        self._track_progress(m, _tokens_done(series),
                             busy=load.running + load.waiting + c.inflight > 0)
        counters = _disagg_counters(series)
        # A request whose KV came from elsewhere (a prefill instance, the store) counts
        # its wait for that KV as prefill time: a poll window where such tokens outnumber
        # the computed ones measures transfers, not compute, and is skipped.
        computed = total(series, "vllm:prompt_tokens_by_source", source="local_compute")
        loaded = total(series, "vllm:prompt_tokens_by_source", source="external_kv_transfer")
        mostly_computed = loaded - m.loaded_tokens <= computed - m.computed_tokens
        m.computed_tokens, m.loaded_tokens = computed, loaded
        m.prefill_meter.observe(computed, total(series, "vllm:request_prefill_time_seconds_sum"),
                                sample=mostly_computed)
        m.load_meter.observe(counters.get("store_loaded_tokens", 0),
                             counters.get("store_load_seconds", 0))
        m.step_meter.observe(total(series, "vllm:inter_token_latency_seconds_count"),
                             total(series, "vllm:inter_token_latency_seconds_sum"))
        c.prefill_rate, c.load_rate = m.prefill_meter.rate, m.load_meter.rate
        c.step_s = 1 / m.step_meter.rate if m.step_meter.rate else None
        self._metrics.kv_bytes.labels(m.key).set(counters.get("kv_bytes_received", 0))
        self._metrics.kv_seconds.labels(m.key).set(counters.get("kv_transfer_seconds", 0))
        self._metrics.kv_failures.labels(m.key).set(counters.get("kv_transfer_failures", 0))
        m.kv_links = _kv_links(series)
        for (peer, transport), link in m.kv_links.items():
            for name, value in link.items():
                self._metrics.kv_link.labels(m.key, peer, transport, name).set(value)

    def _track_progress(self, m: Member, tokens: float, busy: bool) -> None:
        now = time.monotonic()
        if tokens != m.progress or not busy:
            m.progress, m.progress_at = tokens, now
            if m.stalled:
                logger.info("instance %s (%s) makes progress again", m.key, m.info.engine_id)
                m.stalled = False
        elif not m.stalled and now - m.progress_at > self._stall_s:
            logger.warning("instance %s (%s) stalled: requests waiting or running, no token "
                           "computed for %.0f s; out of routing until it moves", m.key,
                           m.info.engine_id, now - m.progress_at)
            m.stalled = True

    async def _relocate(self, m: Member) -> None:
        if self._locate is None:
            return
        try:
            info = await self._locate(m.key)
        except Exception as exc:  # the actor itself may be restarting
            logger.debug("locate %s: %s", m.key, exc)
            return
        if info is not None and info.engine_id != m.info.engine_id:
            logger.info("instance %s restarted as %s at %s", m.key, info.engine_id, info.url)
            old = m.info
            m.relocate(info)
            for listener in self.listeners:
                listener(m, old)


def _tokens_done(series: Series) -> float:
    """Prompt tokens computed plus tokens generated, over the engine's label sets."""
    return sum(v for (name, _), v in series.items()
               if name in ("vllm:prompt_tokens", "vllm:generation_tokens"))


def _kv_links(series: Series) -> dict[tuple[str, str], dict[str, float]]:
    """Per (prefill peer, transport): the connector's ``vllm:disagg_kv_peer_*`` counters."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (name, labels), value in series.items():
        if not name.startswith("vllm:disagg_kv_peer_"):
            continue
        lab = dict(labels)
        link = out.setdefault((lab.get("peer", ""), lab.get("transport", "")), {})
        field_ = name.removeprefix("vllm:disagg_kv_peer_")
        link[field_] = link.get(field_, 0.0) + value
    return out


def link_report(links: dict[tuple[str, str], dict[str, float]]) -> list[dict[str, object]]:
    """Status rows, one per (peer, transport), with the pulls' average GB/s."""
    rows: list[dict[str, object]] = []
    for (peer, transport), link in sorted(links.items()):
        secs = link.get("seconds", 0.0)
        rows.append({"peer": peer, "transport": transport, "bytes": int(link.get("bytes", 0)),
                     "pulls": int(link.get("pulls", 0)),
                     "failures": int(link.get("failures", 0)),
                     "gbps": round(link.get("bytes", 0) / secs / 1e9, 3) if secs else None})
    return rows


def _disagg_counters(series: Series) -> dict[str, float]:
    """The connector's ``vllm:disagg_*`` counters, summed over label sets, by short name."""
    out: dict[str, float] = {}
    for (name, _labels), value in series.items():
        if not name.startswith("vllm:disagg_"):
            continue
        short = name.removeprefix("vllm:disagg_")
        out[short] = out.get(short, 0.0) + value
    return out

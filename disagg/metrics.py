"""The gateway's Prometheus metrics (its own registry, served on GET /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Cached:
    """A labelled metric whose children are looked up once: prometheus_client's
    ``labels()`` costs a few microseconds per call (label checks, a lock), and the gateway
    makes several per request. Label values are few (paths, statuses, instance names,
    reasons); past ``MAX`` distinct ones, lookups go to ``labels()`` uncached."""

    MAX = 10_000
    __slots__ = ("metric", "_children")

    def __init__(self, metric: Any):
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if len(self._children) < self.MAX:
                self._children[values] = child
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Cached(Counter(
            "disagg_requests", "Client requests by endpoint and outcome.",
            ["endpoint", "status"], registry=r))
        self.ttft = Histogram("disagg_ttft_seconds", "Time to first token at the gateway.",
                              buckets=_LAT, registry=r)
        self.itl = Histogram("disagg_itl_seconds", "Gap between streamed chunks.",
                             buckets=_LAT, registry=r)
        self.e2e = Histogram("disagg_request_seconds", "Request latency end to end.",
                             buckets=_LAT, registry=r)
        self.prefill_hop = Histogram("disagg_prefill_hop_seconds",
                                     "Time of the prefill request.", buckets=_LAT, registry=r)
        self.routed = Cached(Counter(
            "disagg_instance_requests", "Requests sent to each instance.",
            ["role", "instance"], registry=r))
        self.failures = Cached(Counter(
            "disagg_failures", "Faults the gateway absorbed or returned.",
            ["kind", "instance"], registry=r))
        self.decisions = Cached(Counter(
            "disagg_decisions", "Prefill-hop decisions with their reason.",
            ["path", "reason"], registry=r))
        self.prompt_tokens = Cached(Counter(
            "disagg_prompt_tokens", "Prompt tokens routed to each decode instance.",
            ["instance"], registry=r))
        self.hit_tokens = Cached(Counter(
            "disagg_prefix_hit_tokens", "Prompt tokens the chosen decode instance held (prefix "
            "index): in its own cache (tier engine) or, beyond that, in store tiers it loads "
            "from (tier store).", ["instance", "tier"], registry=r))
        self.imbalance = Cached(Gauge(
            "disagg_load_imbalance", "Requests queued on the busiest instance minus on the "
            "idlest, per role.", ["role"], registry=r))
        self.instance_restarts = Gauge(
            "disagg_instance_restarts", "Engines an instance restarted after they died; a "
            "climbing value is a crash loop.", ["role", "instance"], registry=r)
        self.dropped_fields = Cached(Counter(
            "disagg_dropped_fields", "Fields only the gateway may set (kv_transfer_params & "
            "co.) that clients sent and the gateway dropped.", ["field"], registry=r))
        self.admitted = Counter("disagg_admitted", "Requests admitted to service (at once or "
                                "after queueing).", registry=r)
        self.rejected = Counter("disagg_rejected", "Requests refused with 429: every slot "
                                "taken and the admission queue full.", registry=r)
        self.queue_timeouts = Counter("disagg_queue_timeouts", "Queued requests answered 503: "
                                      "no slot within queue_timeout_s.", registry=r)
        self.queue_depth = Gauge("disagg_queue_depth", "Requests waiting for a slot.",
                                 registry=r)
        self.prefill_waiting = Gauge(
            "disagg_prefill_queue_waiting", "Prefill hops waiting in the gateway's prefill "
            "queue (scheduler.prefill_queue).", registry=r)
        self.prefill_running = Gauge(
            "disagg_prefill_queue_running", "Prefill hops the gateway has on prefill "
            "instances now.", registry=r)
        self.in_service = Gauge("disagg_in_service", "Requests holding a slot (being served).",
                                registry=r)
        self.instance_up = Gauge("disagg_instance_up", "1 while an instance is healthy.",
                                 ["role", "instance"], registry=r)
        # Mirrored from each instance's vLLM /metrics on every poll (counters upstream).
        self.kv_bytes = Gauge("disagg_kv_bytes_received", "KV bytes an instance pulled.",
                              ["instance"], registry=r)
        self.kv_seconds = Gauge("disagg_kv_transfer_seconds", "Seconds an instance spent "
                                "pulling KV.", ["instance"], registry=r)
        self.kv_failures = Gauge("disagg_kv_transfer_failures", "KV pulls an instance "
                                 "failed (recomputed).", ["instance"], registry=r)
        self.kv_link = Gauge("disagg_kv_link", "Per decode instance and prefill peer, over "
                             "the transport UCX chose: bytes, seconds, pulls, failures.",
                             ["instance", "peer", "transport", "field"], registry=r)

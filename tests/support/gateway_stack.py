"""A real Gateway served over HTTP in front of fake engines (tests/support/fake_engine.py),
with the built-in tiny model's tokenizer: for tests of what the gateway does, not vLLM."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from disagg.config import ApiConfig, SchedulerConfig, StoreConfig
from disagg.gateway import Gateway, ServedModel
from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool
from disagg.scrape import parse, total
from tests.support.fake_engine import AppServer, EngineBehavior, FakeEngine

MODEL = "tiny"
MAX_BODY = 64 << 10
MAX_N = 4
MIN_REMOTE = 32  # prompts of 32+ tokens take the prefill hop, shorter ones prefill locally


@dataclass
class Stack:
    gateway: Gateway
    url: str
    prefill: EngineBehavior
    decode: EngineBehavior
    client: httpx.Client
    more_decoders: tuple[EngineBehavior, ...] = ()

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None:
            kw["content"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(self.url + path, **kw)

    def metric(self, name: str, **labels: str) -> float:
        return total(parse(self.client.get(self.url + "/metrics").text), name, **labels)


@contextmanager
def stack(tiny_model: Path, api: ApiConfig | None = None, max_inflight: int | None = None,
          decode: EngineBehavior | None = None,
          more_decoders: Sequence[EngineBehavior] = (),
          local_when_slower: bool = False, prefill: EngineBehavior | None = None,
          scheduler: dict[str, Any] | None = None) -> Iterator[Stack]:
    """A fake prefill engine ("prefill-0"), fake decoders ("decode-0", then "decode-1"...
    from ``more_decoders``) and a gateway over HTTP in front of them; ``scheduler``: more
    SchedulerConfig fields."""
    prefill_b = prefill or EngineBehavior(role="prefill")
    decode_b = decode or EngineBehavior()
    with ExitStack() as engines:
        metrics = GatewayMetrics()
        # A generous poll timeout: on a busy machine a slow poll of a fake would mark it
        # down and send its requests elsewhere (degraded serving), which a test then
        # mistakes for something else.
        pool = InstancePool(metrics, interval_s=0.2, timeout_s=10.0)
        pool.add("prefill-0", engines.enter_context(FakeEngine(prefill_b)).info(0))
        for i, behavior in enumerate([decode_b, *more_decoders]):
            pool.add(f"decode-{i}", engines.enter_context(FakeEngine(behavior)).info(i))
        gateway = Gateway(pool, metrics, ServedModel(MODEL, str(tiny_model), 512, 16, None),
                          SchedulerConfig(kv_events=False, min_remote_prefill_tokens=MIN_REMOTE,
                                          local_prefill_when_hop_slower=local_when_slower,
                                          **(scheduler or {})),
                          api or ApiConfig(max_body_bytes=MAX_BODY, max_n=MAX_N),
                          StoreConfig(enabled=False), max_inflight=max_inflight)
        with AppServer(gateway.app, lifespan="on") as server, \
                httpx.Client(timeout=30) as client:
            yield Stack(gateway, server.url, prefill_b, decode_b, client, tuple(more_decoders))

"""The gateway's operator endpoints.

    GET  /v1/disagg/status   instances with load and index share, the prefix index, the
                             decider's settings, recent routing decisions with reasons,
                             admission (requests in service, queued, limits), and which
                             gateway worker answered (``worker``: each has its own
                             decisions, admission and index; instances are the same)
    POST /v1/disagg/scale    {"prefill": N, "decode": M}: answers once the pools have that size

``Admin`` reads the parts it is given (pool, index, KV-event feed, decider, recent
decisions) and changes nothing itself: scaling is the launcher's ``scaler`` callback, run in
a worker thread (it blocks until new instances are healthy or old ones drained).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from disagg.errors import APIError
from disagg.kv_feed import KVEventFeed
from disagg.pool import InstancePool, link_report
from disagg.scheduler.decider import PrefillDecider
from disagg.scheduler.kv_index import PrefixIndex
from disagg.tiers import is_store

# (prefill replicas or None, decode replicas or None) -> the deployment's status afterwards
Scaler = Callable[[int | None, int | None], dict[str, Any]]
Authorize = Callable[[Request], None]
AdmissionState = Callable[[], dict[str, Any]]


class Admin:
    def __init__(self, model: str, pool: InstancePool, decider: PrefillDecider,
                 recent: deque[dict[str, Any]], index: PrefixIndex | None,
                 feed: KVEventFeed | None, authorize: Authorize, scaler: Scaler | None,
                 admission: AdmissionState | None = None,
                 worker: dict[str, Any] | None = None):
        self._model, self._pool, self._decider, self._recent = model, pool, decider, recent
        self._index, self._feed = index, feed
        self._authorize, self._scaler, self._admission = authorize, scaler, admission
        self._worker = worker

    def status(self) -> dict[str, Any]:
        """Instances with their load and index share, the index, recent decisions."""
        held = self._index.stats() if self._index is not None else None
        per_holder = held.per_holder if held else {}
        return {
            "model": self._model, "block_size": self._feed.block_size if self._feed else None,
            "instances": [{
                "key": m.key, "role": m.info.role, "engine_id": m.info.engine_id,
                "url": m.info.url, "healthy": m.healthy, "stalled": m.stalled,
                "draining": m.draining,
                "restarts": m.info.restarts,
                "inflight": m.candidate.inflight, "running": m.candidate.running,
                "waiting": m.candidate.waiting, "kv_usage": m.candidate.kv_usage,
                "indexed_blocks": per_holder.get(m.info.engine_id, 0),
                "kv_links": link_report(m.kv_links),
            } for m in self._pool.members.values()],
            "index": None if held is None or self._index is None else {
                "entries": held.entries, "hashes": held.hashes, "evicted": held.evicted,
                "expected": held.expected,
                "store_blocks": {k: n for k, n in per_holder.items() if is_store(k)},
                "max_entries": self._index.max_entries,
                "event_gaps": self._feed.gaps if self._feed else 0},
            "decider": {"min_uncached_tokens": self._decider.min_uncached_tokens,
                        "max_prefill_queue": self._decider.max_prefill_queue},
            "recent_decisions": list(self._recent)[-50:],
            "admission": self._admission() if self._admission is not None else None,
            # With api.workers > 1 each gateway process answers for itself: which one this is.
            "worker": self._worker,
        }

    async def status_endpoint(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self.status())

    async def scale_endpoint(self, request: Request) -> Response:
        """POST {"prefill": N, "decode": M}: answers once the pools have that size."""
        self._authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict) or set(body) - {"prefill", "decode"}:
            raise APIError(400, "expected a JSON object with 'prefill' and/or 'decode'")
        for role, value in body.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise APIError(400, f"{role} must be a non-negative integer", param=role)
        if self._scaler is None:
            raise APIError(501, "this gateway cannot scale its pools", code="not_supported")
        try:
            result = await asyncio.to_thread(self._scaler, body.get("prefill"),
                                             body.get("decode"))
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return JSONResponse(result)

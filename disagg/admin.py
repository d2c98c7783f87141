"""The gateway's operator side: KV-event subscriptions, status, and pool changes at run time.

    GET  /v1/disagg/status   instances with load and index share, the prefix index, the
                             decider's settings, recent routing decisions with reasons
    POST /v1/disagg/scale    {"prefill": N, "decode": M}: answers once the pools have that size

A mixin of ``Gateway`` (it uses the gateway's pool, index, metrics and event loop); pool
changes coming from other threads (``Deployment.scale``) run on the loop through ``call``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from disagg.errors import APIError
from disagg.instance import InstanceInfo
from disagg.pool import Member
from disagg.scheduler.kv_events import KVEventSubscriber
from disagg.transfer.store.holders import is_store


class AdminMixin:
    def _start_events(self) -> None:
        if self.index is None:
            return
        self._events = KVEventSubscriber(self.index, on_block_size=self._learn_block_size)

        def watch(member: Member, old: InstanceInfo | None) -> None:
            if old is not None:
                self._events.unwatch(old.engine_id)  # a restarted engine starts empty
            if member.info.kv_events_endpoint:
                self._events.watch(member.info.engine_id, member.info.kv_events_endpoint,
                                   member.info.kv_replay_endpoint)

        for member in self.pool.members.values():
            watch(member, None)
        self.pool.listeners.append(watch)

    def _learn_block_size(self, size: int) -> None:
        if self.block_size is None:
            self.block_size = size

    def status(self) -> dict[str, Any]:
        """Instances with their load and index share, the index, recent decisions."""
        held = self.index.stats() if self.index is not None else None
        return {
            "model": self.model, "block_size": self.block_size,
            "instances": [{
                "key": m.key, "role": m.info.role, "engine_id": m.info.engine_id,
                "url": m.info.url, "healthy": m.healthy, "draining": m.draining,
                "inflight": m.candidate.inflight, "running": m.candidate.running,
                "waiting": m.candidate.waiting, "kv_usage": m.candidate.kv_usage,
                "indexed_blocks": held.per_instance.get(m.info.engine_id, 0) if held else 0,
            } for m in self.pool.members.values()],
            "index": None if held is None else {
                "entries": held.entries, "hashes": held.hashes, "evicted": held.evicted,
                "expected": held.expected,
                "store_blocks": {k: n for k, n in held.per_instance.items() if is_store(k)},
                "max_entries": self.index.max_entries,
                "event_gaps": self._events.gaps if self._events else 0},
            "decider": {"min_uncached_tokens": self.decider.min_uncached_tokens,
                        "max_prefill_queue": self.decider.max_prefill_queue},
            "recent_decisions": list(self.recent)[-50:],
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
        if self.scaler is None:
            raise APIError(501, "this gateway cannot scale its pools", code="not_supported")
        try:
            result = await asyncio.to_thread(self.scaler, body.get("prefill"),
                                             body.get("decode"))
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return JSONResponse(result)

    # ---- pool changes (run on the loop: see ``call``) ---------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the gateway's event loop from another thread."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def add_instance(self, key: str, info: InstanceInfo) -> None:
        self.pool.add(key, info)

    def remove_instance(self, key: str) -> None:
        member = self.pool.remove(key)
        if member is not None and self._events is not None:
            self._events.unwatch(member.info.engine_id)


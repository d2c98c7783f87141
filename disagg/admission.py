"""Admission control: a bounded number of requests in service and a bounded FIFO queue.

    slot = await admission.acquire(abandon=client_gone(request))
                                       # at once while fewer than max_inflight are served;
                                       # else queued (FIFO) up to max_queued
        QueueFull      the queue is full: answer 429 with Retry-After (``retry_after_s``)
        QueueTimeout   no slot within timeout_s: answer 503
        Abandoned      ``abandon`` finished first (the client left while queued)
    ...
    slot.release()                     # exactly once in effect: later calls do nothing

A released slot passes straight to the oldest waiter, so a request arriving meanwhile
cannot overtake the queue. A waiter cancelled or abandoned leaves the queue, and a slot
handed to it at that very moment is passed on. Everything runs on one event loop.
``HeldStream`` holds slots (and other counts) until a streamed response has ended.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class QueueFull(Exception):
    """Every slot is taken and the queue is full."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    """Queued for ``timeout_s`` without getting a slot."""


class Abandoned(Exception):
    """The caller's ``abandon`` awaitable finished while it was queued."""


class Slot:
    """One request's place in service; ``release()`` gives it back (idempotent)."""

    __slots__ = ("_owner", "_since")

    def __init__(self, owner: Admission):
        self._owner: Admission | None = owner
        self._since = time.monotonic()

    @property
    def held(self) -> bool:
        return self._owner is not None

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(time.monotonic() - self._since)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """``max_inflight`` slots, ``max_queued`` waiters, ``timeout_s`` of waiting at most.
    ``on_change(self)`` runs after every change of ``inflight`` or ``queued`` (gauges)."""

    DEFAULT_RETRY_AFTER_S = 1
    MAX_RETRY_AFTER_S = 60

    def __init__(self, max_inflight: int, max_queued: int, timeout_s: float,
                 on_change: Callable[[Admission], None] | None = None):
        if max_inflight < 1 or max_queued < 0 or timeout_s <= 0:
            raise ValueError(f"need max_inflight >= 1, max_queued >= 0, timeout_s > 0; got "
                             f"{max_inflight}, {max_queued}, {timeout_s}")
        self.max_inflight, self.max_queued, self.timeout_s = max_inflight, max_queued, timeout_s
        self._on_change = on_change
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._service_s: float | None = None  # moving average of the time a slot is held

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> Slot | None:
        """A slot now, or None (without queueing) when none is free or others wait."""
        if self._inflight >= self.max_inflight or self._waiters:
            return None
        self._inflight += 1
        self._changed()
        return Slot(self)

    async def acquire(self, abandon: Awaitable[None] | None = None) -> Slot:
        """A slot, after waiting in line if needed (QueueFull, QueueTimeout; Abandoned
        when ``abandon`` finishes first). ``abandon`` is only awaited while queued."""
        slot = self.try_acquire()
        if slot is not None:
            if abandon is not None:
                _discard(abandon)
            return slot
        if len(self._waiters) >= self.max_queued:
            if abandon is not None:
                _discard(abandon)
            raise QueueFull(self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._changed()
        try:
            async with asyncio.timeout(self.timeout_s):
                await _first(waiter, abandon)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # handed a slot as we stopped
                if isinstance(exc, TimeoutError):
                    return Slot(self)  # it came in time after all: keep it
                self._release(None)
            else:
                self._forget(waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(f"no capacity within {self.timeout_s:g} s") from None
            raise
        return Slot(self)  # the slot was handed over by _release: inflight already counted

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the queue's drain time, estimated from
        recent service times (1 s before any request finished), within [1, 60]."""
        if self._service_s is None:
            return self.DEFAULT_RETRY_AFTER_S
        estimate = self._service_s * (1 + len(self._waiters) / self.max_inflight)
        return max(1, min(self.MAX_RETRY_AFTER_S, math.ceil(estimate)))

    def state(self) -> dict[str, Any]:
        return {"inflight": self._inflight, "max_inflight": self.max_inflight,
                "queued": len(self._waiters), "max_queued": self.max_queued,
                "queue_timeout_s": self.timeout_s,
                "service_s": None if self._service_s is None else round(self._service_s, 3)}

    def _release(self, held_s: float | None) -> None:
        if held_s is not None:
            prev = self._service_s
            self._service_s = held_s if prev is None else 0.8 * prev + 0.2 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: inflight stays the same
                self._changed()
                return
        self._inflight -= 1
        self._changed()

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)


async def _first(waiter: asyncio.Future[None], abandon: Awaitable[None] | None) -> None:
    """Wait for ``waiter``; raise Abandoned if ``abandon`` finishes first."""
    if abandon is None:
        await waiter
        return
    other = asyncio.ensure_future(abandon)
    try:
        await asyncio.wait({waiter, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        other.cancel()
    if not waiter.done():
        raise Abandoned()


def _discard(abandon: Awaitable[None]) -> None:
    if asyncio.isfuture(abandon):
        abandon.cancel()
    elif asyncio.iscoroutine(abandon):
        abandon.close()  # never started: no "never awaited" warning


# ---- HTTP -------------------------------------------------------------------------------
async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class HeldStream(StreamingResponse):
    """A streamed answer whose ``closers`` (a slot's release, an upstream response's
    aclose...) run once it ends, however it ends: done, client gone, error, even if its
    body never started. Every closer is called before any is awaited."""

    def __init__(self, content: AsyncIterator[bytes], media_type: str,
                 closers: list[Callable[[], Awaitable[None] | None]]):
        super().__init__(content, media_type=media_type)
        self.closers = closers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            closers = [*self.closers, *([body.aclose] if hasattr(body, "aclose") else [])]
            pending = [result for result in (close() for close in closers) if result is not None]
            for result in pending:
                await result

"""The gateway's prefill queue: prefill hops beyond what the prefill pool runs at once wait
here, shortest expected prefill first, instead of in each instance's own arrival-order queue.

    queue = PrefillQueue(capacity=lambda: healthy_prefill_instances * per_instance)
    async with queue.turn(expected_s):   # at once while fewer than capacity() hops run
        ...                              # (and none wait); else queued until one ends

Why hold them here: a prefill instance computes what it is sent in arrival order, and once
its steps are full (one long prompt fills a step; on a CPU even a short one does), a second
request in flight there only waits for the first, bound to that instance. Held at the
gateway, a request (1) is bound to an instance only when one frees, priced by the policy as
things are then (which instance holds its prefix, which is idle), and (2) goes ahead of
longer prompts that arrived before it: shortest-job-first minimizes the mean wait. A long
prompt is not starved: the order is by ``arrival + expected_s``, so a request waits for
later, shorter ones at most its own expected prefill time.

``capacity()`` is asked on every entry and exit, so instances coming and going change it
at once; with capacity 0 nobody waits, and an exit that finds it 0 wakes every waiter (the
caller then finds no instance and prefills on its decoder). A waiter cancelled (its
client left, its deadline passed) leaves the queue; a turn handed to it at that very moment
is passed on. Everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class PrefillQueue:
    """Hops in flight and hops waiting, for one gateway process. ``on_change(self)`` runs
    after every change of ``running`` or ``waiting`` (gauges)."""

    def __init__(self, capacity: Callable[[], int],
                 on_change: Callable[[PrefillQueue], None] | None = None):
        self._capacity = capacity
        # (arrival + expected seconds, arrival order, waiter, expected seconds)
        self._heap: list[tuple[float, int, asyncio.Future[None], float]] = []
        self._seq = itertools.count()  # ties in arrival order
        self.running = 0
        self._waiting = 0  # live waiters (the heap may still hold cancelled ones)
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return self._waiting

    def ahead_s(self, expected_s: float) -> float:
        """Expected prefill seconds a hop of ``expected_s`` entering now would wait for:
        those queued ahead of it, spread over the places in flight (0 with none waiting)."""
        if not self._waiting:
            return 0.0
        key = asyncio.get_running_loop().time() + max(0.0, expected_s)
        ahead = sum(e for k, _, fut, e in self._heap if k <= key and not fut.done())
        return ahead / max(1, self._capacity())

    @asynccontextmanager
    async def turn(self, expected_s: float) -> AsyncIterator[None]:
        """Hold one of ``capacity()`` places in flight for the body of the ``with``,
        waiting (ordered by arrival + ``expected_s``) while all are taken or others wait."""
        await self._acquire(expected_s)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, expected_s: float) -> None:
        capacity = self._capacity()
        if capacity <= 0 or (self.running < capacity and not self._waiting):
            self.running += 1
            self._changed()
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        expected_s = max(0.0, expected_s)
        heapq.heappush(self._heap, (loop.time() + expected_s, next(self._seq), fut, expected_s))
        self._waiting += 1
        self._wake(capacity)  # places freed by instances that came back go out now
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a place as it was cancelled
                self._release()
            else:
                self._waiting -= 1
                self._changed()
            raise

    def _release(self) -> None:
        self.running -= 1
        self._wake(self._capacity())

    def _wake(self, capacity: int) -> None:
        """Hand free places to the first waiters; with no instance left, wake them all."""
        while self._heap and (self.running < capacity or capacity <= 0):
            _, _, fut, _ = heapq.heappop(self._heap)
            if fut.done():  # cancelled while waiting: already uncounted
                continue
            fut.set_result(None)
            self._waiting -= 1
            self.running += 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

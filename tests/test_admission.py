"""Admission control (disagg.admission): slots, the queue bound, FIFO order, the deadline,
and a slot given back exactly once however a request ends."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from disagg.admission import Abandoned, Admission, HeldStream, QueueFull, QueueTimeout, Slot


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 10))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_slots_are_given_at_once_up_to_max_inflight():
    async def go():
        a = Admission(3, 0, 1.0)
        slots = [await a.acquire() for _ in range(3)]
        assert a.inflight == 3 and a.queued == 0
        assert a.try_acquire() is None
        with pytest.raises(QueueFull):  # no queue at all
            await a.acquire()
        slots[0].release()
        assert a.inflight == 2
        slot = a.try_acquire()
        assert slot is not None and a.inflight == 3
    run(go)


def test_release_is_idempotent_and_a_context_manager():
    async def go():
        a = Admission(2, 2, 1.0)
        slot = await a.acquire()
        slot.release()
        slot.release()
        assert a.inflight == 0 and not slot.held
        with await a.acquire() as held:
            assert a.inflight == 1 and held.held
        assert a.inflight == 0
    run(go)


def test_the_queue_is_bounded_and_says_when_to_retry():
    async def go():
        a = Admission(1, 2, 5.0)
        first = await a.acquire()
        waiters = [asyncio.create_task(a.acquire()) for _ in range(2)]
        await settle()
        assert a.queued == 2
        with pytest.raises(QueueFull) as err:
            await a.acquire()
        assert err.value.retry_after_s == Admission.DEFAULT_RETRY_AFTER_S
        first.release()
        second = await waiters[0]
        second.release()
        (await waiters[1]).release()
        assert a.inflight == 0 and a.queued == 0
    run(go)


def test_retry_after_follows_service_times():
    async def go():
        a = Admission(1, 4, 5.0)
        slot = a.try_acquire()
        assert slot is not None
        await asyncio.sleep(0.05)
        slot.release()
        assert a.state()["service_s"] >= 0.05
        assert a.retry_after_s() == 1  # rounded up, at least 1
        a._service_s = 10.0
        assert a.retry_after_s() == 10
        a._service_s = 1e6
        assert a.retry_after_s() == Admission.MAX_RETRY_AFTER_S
    run(go)


def test_waiters_are_served_first_in_first_out():
    async def go():
        a = Admission(1, 10, 5.0)
        holder = await a.acquire()
        order: list[int] = []

        async def wait(i: int) -> None:
            slot = await a.acquire()
            order.append(i)
            await asyncio.sleep(0)
            slot.release()
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(wait(i)))
            await settle()
        assert a.queued == 5
        assert a.try_acquire() is None  # a newcomer cannot overtake the queue
        holder.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
        assert a.inflight == 0 and a.queued == 0
    run(go)


def test_a_waiter_past_its_deadline_times_out_and_leaves_the_queue():
    async def go():
        a = Admission(1, 5, 0.05)
        holder = await a.acquire()
        with pytest.raises(QueueTimeout):
            await a.acquire()
        assert a.queued == 0 and a.inflight == 1
        holder.release()
        assert a.inflight == 0
    run(go)


def test_a_cancelled_waiter_leaves_the_queue():
    async def go():
        a = Admission(1, 5, 5.0)
        holder = await a.acquire()
        task = asyncio.create_task(a.acquire())
        await settle()
        assert a.queued == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.queued == 0
        holder.release()
        assert a.inflight == 0
    run(go)


def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_passes_on():
    async def go():
        a = Admission(1, 5, 5.0)
        holder = await a.acquire()
        first = asyncio.create_task(a.acquire())
        second = asyncio.create_task(a.acquire())
        await settle()
        holder.release()  # hands the slot to first's future...
        first.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await first
        slot = await second  # the slot went on to the next in line
        assert a.inflight == 1 and a.queued == 0
        slot.release()
        assert a.inflight == 0
    run(go)


def test_abandon_leaves_the_queue():
    async def go():
        a = Admission(1, 5, 5.0)
        holder = await a.acquire()
        gone = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(a.acquire(abandon=gone))
        await settle()
        assert a.queued == 1
        gone.set_result(None)
        with pytest.raises(Abandoned):
            await task
        assert a.queued == 0
        holder.release()
        # not awaited at all when a slot is free (and closed: no "never awaited" warning)
        never = asyncio.Event().wait()
        (await a.acquire(abandon=never)).release()
        assert a.inflight == 0
    run(go)


def test_on_change_reports_inflight_and_queue_depth():
    seen: list[tuple[int, int]] = []

    async def go():
        a = Admission(1, 2, 5.0, on_change=lambda adm: seen.append((adm.inflight, adm.queued)))
        holder = await a.acquire()
        task = asyncio.create_task(a.acquire())
        await settle()
        holder.release()
        (await task).release()
    run(go)
    assert seen == [(1, 0), (1, 1), (1, 0), (0, 0)]


def test_bad_limits_are_refused():
    for args in ((0, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)):
        with pytest.raises(ValueError):
            Admission(*args)


def test_random_load_never_exceeds_the_limits_and_returns_every_slot():
    async def go():
        rng = random.Random(7)
        a = Admission(4, 6, 0.05)
        busy = peak = 0
        outcomes: dict[str, int] = {}

        async def client() -> None:
            nonlocal busy, peak
            await asyncio.sleep(rng.random() * 0.05)
            try:
                slot = await a.acquire()
            except (QueueFull, QueueTimeout) as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                return
            busy += 1
            peak = max(peak, busy)
            try:
                await asyncio.sleep(rng.random() * 0.02)
            finally:
                busy -= 1
                slot.release()
                if rng.random() < 0.3:
                    slot.release()  # a second release changes nothing
        tasks = [asyncio.create_task(client()) for _ in range(300)]
        await asyncio.sleep(0.03)
        for t in rng.sample(tasks, 60):
            t.cancel()  # clients leaving, queued or in service
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak <= 4
        assert a.inflight == 0 and a.queued == 0
        assert outcomes.get("QueueFull", 0) > 0
    run(go)


def test_held_stream_runs_its_closers_even_if_the_body_never_started():
    closed: list[str] = []
    started: list[bool] = []

    async def body():
        started.append(True)
        yield b"x"

    async def go():
        a = Admission(1, 0, 1.0)
        slot: Slot = await a.acquire()

        async def aclose() -> None:
            closed.append("upstream")
        stream = HeldStream(body(), "text/event-stream",
                            closers=[lambda: closed.append("inflight"), aclose, slot.release])

        async def receive() -> dict:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise OSError("client gone")  # fails on the response start
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(Exception):  # noqa: B017  (ClientDisconnect, whatever its type)
            await stream(scope, receive, send)
        assert a.inflight == 0
    run(go)
    assert closed == ["inflight", "upstream"] and not started

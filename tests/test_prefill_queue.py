"""disagg.prefill_queue: places in flight, shortest expected first with aging, cancellation,
capacity changes."""

from __future__ import annotations

import asyncio

import pytest

from disagg.prefill_queue import PrefillQueue


async def _enter(queue: PrefillQueue, name: str, expected: float, order: list[str],
                 leave: asyncio.Event) -> None:
    async with queue.turn(expected):
        order.append(name)
        await leave.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_turns_are_immediate_below_capacity_and_queued_above():
    async def main() -> None:
        queue, order, leave = PrefillQueue(lambda: 2), [], asyncio.Event()
        tasks = [asyncio.create_task(_enter(queue, n, 1.0, order, leave)) for n in "abc"]
        await _settle()
        assert order == ["a", "b"] and queue.running == 2 and queue.waiting == 1
        leave.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"] and queue.running == 0 and queue.waiting == 0
    asyncio.run(main())


def test_the_shortest_expected_prefill_goes_first():
    async def main() -> None:
        queue, order = PrefillQueue(lambda: 1), []
        first, rest = asyncio.Event(), asyncio.Event()
        rest.set()
        holder = asyncio.create_task(_enter(queue, "holder", 9.0, order, first))
        await _settle()
        tasks = [asyncio.create_task(_enter(queue, n, s, order, rest))
                 for n, s in (("long", 30.0), ("short", 1.0), ("mid", 5.0))]
        await _settle()
        assert queue.waiting == 3
        first.set()
        await asyncio.gather(holder, *tasks)
        assert order == ["holder", "short", "mid", "long"]
    asyncio.run(main())


def test_a_long_wait_outranks_a_later_shorter_prefill():
    """Aging: ordered by arrival + expected seconds, so a hop that has waited longer than
    the difference in expected time goes before a later, shorter one."""
    async def main() -> None:
        queue, order = PrefillQueue(lambda: 1), []
        first, rest = asyncio.Event(), asyncio.Event()
        rest.set()
        holder = asyncio.create_task(_enter(queue, "holder", 0.0, order, first))
        await _settle()
        early = asyncio.create_task(_enter(queue, "early", 0.05, order, rest))
        await asyncio.sleep(0.2)  # early has now waited longer than its expected 0.05 s
        late = asyncio.create_task(_enter(queue, "late", 0.0, order, rest))
        await _settle()
        first.set()
        await asyncio.gather(holder, early, late)
        assert order == ["holder", "early", "late"]
    asyncio.run(main())


def test_a_cancelled_waiter_leaves_and_a_place_handed_to_it_passes_on():
    async def main() -> None:
        queue, order, go = PrefillQueue(lambda: 1), [], asyncio.Event()
        go.set()
        await queue._acquire(0.0)  # the place in flight, held here
        gone = asyncio.create_task(_enter(queue, "gone", 1.0, order, go))
        await _settle()
        gone.cancel()  # its client left while queued
        await _settle()
        assert queue.waiting == 0
        handed = asyncio.create_task(_enter(queue, "handed", 1.0, order, go))
        after = asyncio.create_task(_enter(queue, "after", 2.0, order, go))
        await _settle()
        queue._release()  # the place goes to "handed" (shortest)...
        handed.cancel()  # ...cancelled before it could run: the place passes to "after"
        await after
        for task in (gone, handed):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert order == ["after"]
        assert (queue.running, queue.waiting) == (0, 0)
    asyncio.run(main())


def test_no_capacity_means_no_waiting_and_an_emptied_pool_wakes_everyone():
    """Capacity 0 (no prefill instance left): nobody waits (the hop then finds no instance
    and the decoder prefills), and the first exit that sees it wakes every waiter."""
    async def main() -> None:
        capacity, changes = [1], []
        queue = PrefillQueue(lambda: capacity[0],
                             lambda q: changes.append((q.running, q.waiting)))
        order, hold, go = [], asyncio.Event(), asyncio.Event()
        go.set()
        holder = asyncio.create_task(_enter(queue, "holder", 0.0, order, hold))
        await _settle()
        waiters = [asyncio.create_task(_enter(queue, n, 1.0, order, hold)) for n in "ab"]
        await _settle()
        assert (queue.running, queue.waiting) == (1, 2)
        capacity[0] = 0  # every prefill instance went down
        await _enter(queue, "now", 1.0, order, go)  # straight through
        assert order == ["holder", "now"]
        hold.set()
        await asyncio.gather(holder, *waiters)
        assert sorted(order[2:]) == ["a", "b"]
        assert (queue.running, queue.waiting) == (0, 0)
        assert changes[-1] == (0, 0) and (1, 2) in changes
    asyncio.run(main())


def test_ahead_counts_the_expected_seconds_queued_before_a_newcomer():
    async def main() -> None:
        capacity = [1]
        queue, order, go = PrefillQueue(lambda: capacity[0]), [], asyncio.Event()
        assert queue.ahead_s(3.0) == 0.0
        await queue._acquire(0.0)  # one in flight
        tasks = [asyncio.create_task(_enter(queue, n, s, order, go))
                 for n, s in (("a", 1.0), ("b", 2.0), ("c", 9.0))]
        await _settle()
        assert queue.ahead_s(3.0) == pytest.approx(3.0)  # a and b go first, c after it
        capacity[0] = 2  # two places: the same work spread over both
        assert queue.ahead_s(3.0) == pytest.approx(1.5)
        go.set()
        queue._release()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
    asyncio.run(main())


def test_places_an_instance_brings_back_go_out_with_the_next_arrival():
    async def main() -> None:
        capacity = [1]
        queue, order, go = PrefillQueue(lambda: capacity[0]), [], asyncio.Event()
        go.set()
        await queue._acquire(0.0)  # one in flight, held here throughout
        first = asyncio.create_task(_enter(queue, "first", 1.0, order, go))
        await _settle()
        assert queue.waiting == 1
        capacity[0] = 3  # two more places: the waiter and a newcomer both go
        await _enter(queue, "next", 5.0, order, go)
        await first
        assert sorted(order) == ["first", "next"]  # both at once
        assert (queue.running, queue.waiting) == (1, 0)
    asyncio.run(main())

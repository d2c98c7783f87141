"""One asyncio pattern the gateway uses in several places: await some work unless
something else happens first, and then cancel the work (closing its connections)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """``stop`` finished before ``work``; the work was cancelled."""


async def unless(work: Awaitable[T], stop: Awaitable[object]) -> T:
    """``work``'s result, unless ``stop`` finishes first: then ``work`` is cancelled (and
    awaited) and Stopped is raised. If the caller is cancelled, so is ``work``.

    ``work`` runs in the caller's task (no task of its own: a request's path nests two of
    these, and a task plus ``asyncio.wait`` per call was a tenth of the gateway's CPU per
    request): when ``stop`` finishes first, the caller's task is cancelled, and that one
    cancellation is taken back (``Task.uncancel``) once ``work`` has ended. A cancellation
    of the caller from elsewhere at the same time still propagates as CancelledError."""
    task = asyncio.current_task()
    if task is None:  # not in a task (never on the gateway's paths): the general way
        return await _unless_in_tasks(work, stop)
    waiter = asyncio.ensure_future(stop)
    fired = False
    over = False

    def fire(w: asyncio.Future[object]) -> None:
        nonlocal fired
        if not over and not w.cancelled():
            fired = True
            task.cancel()

    waiter.add_done_callback(fire)
    try:
        result = await work
    except BaseException:
        if fired and task.uncancel() == 0:
            raise Stopped() from None  # whatever ``work`` raised on its way out
        raise
    finally:
        over = True
        waiter.remove_done_callback(fire)
        waiter.cancel()
    if fired:  # ``work`` swallowed the cancellation and returned anyway: stopped all the same
        if task.uncancel() == 0:
            raise Stopped()
        raise asyncio.CancelledError()
    return result


async def _unless_in_tasks(work: Awaitable[T], stop: Awaitable[object]) -> T:
    job = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop)
    try:
        await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        job.cancel()
        raise
    finally:
        waiter.cancel()
    if job.done():
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody to tell
        await job
    raise Stopped()

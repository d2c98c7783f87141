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
    awaited) and Stopped is raised. If the caller is cancelled, so is ``work``."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop)
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody to tell
        await task
    raise Stopped()

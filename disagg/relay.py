"""The decoder's answer, relayed to the client.

``open_answer`` sends a request to an engine and waits for the beginning of its answer (the
whole body, or a stream's first chunk): a fault before that is the caller's to retry, since
nothing has reached the client yet. ``Relay.respond`` then answers the client, streaming the
rest; a stream ends with an OpenAI error event when its decoder breaks off, when the pool
marks the decoder down (a dying engine can hold a connection open without sending), or at
the request's deadline: a stream never outlives its decoder or its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi.responses import Response

from disagg.admission import HeldStream
from disagg.engine_client import EngineClient, EngineResponse
from disagg.errors import APIError, upstream_error
from disagg.metrics import GatewayMetrics
from disagg.pool import Inflight

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Answer:
    """The beginning of an engine's answer: the whole body (``rest`` None) or a stream's
    first chunk and the rest of it; ``at``: when the beginning arrived."""

    resp: EngineResponse
    head: bytes
    rest: AsyncIterator[bytes] | None
    at: float
    request_id: str

    @property
    def status(self) -> int:
        return self.resp.status

    async def close(self) -> None:
        """Close the upstream connection (the engine aborts a request still running);
        idempotent, and a no-op once the answer was read to its end (back in the pool)."""
        self.resp.close()


def engine_session(timeout_s: float, headers: dict[str, str]) -> EngineClient:
    """The gateway's HTTP client to its engines (``disagg.engine_client``): keep-alive
    connections per engine, every wait bounded (connect 5 s, each read ``timeout_s``),
    bodies passed through as sent. Made on the gateway's event loop."""
    return EngineClient(read_timeout_s=timeout_s, headers=headers, connect_timeout_s=5.0,
                        limit_per_host=256)


async def post_json(client: EngineClient, url: str, body: bytes,
                    request_id: str) -> tuple[int, bytes]:
    """POST a JSON body; the status and the whole answer. Cancelling it closes the
    connection (the engine aborts the request)."""
    resp = await client.post(url, body, request_id)
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()  # a no-op once read to the end


async def open_answer(client: EngineClient, url: str, body: bytes, request_id: str,
                      stream: bool) -> Answer:
    """POST ``body`` (JSON bytes) to ``url`` and wait for the beginning of the answer: the
    whole body (not streamed, or a 4xx) or a stream's first chunk. Raises on a transport
    fault or a 5xx before that."""
    resp = await client.post(url, body, request_id)
    try:
        if resp.status >= 500:
            raise RuntimeError(f"HTTP {resp.status}")
        if resp.status != 200 or not stream:
            content = await resp.read()
            return Answer(resp, content, None, time.perf_counter(), request_id)
        chunks = resp.chunks()
        first = b""
        while not first:  # a stream's end raises StopAsyncIteration: an empty stream is
            first = await anext(chunks)  # a fault
        if first.lstrip().startswith(b'data: {"error"'):
            # The engine failed before its first token (vLLM streams EngineDeadError as an
            # error event on a 200): nothing reached the client, so it is the caller's to
            # retry, as for a 5xx.
            raise RuntimeError(f"error event before the first token: {first[:200]!r}")
        return Answer(resp, first, chunks, time.perf_counter(), request_id)
    except BaseException:
        resp.close()
        raise


class Relay:
    """Answers clients from engines' answers and records latency and outcomes."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def respond(self, path: str, answer: Answer, inflight: Inflight, start: float,
                down: asyncio.Event, deadline: float) -> Response:
        """The client's response; ``inflight`` is released when it is done (at once, or at
        the end of the stream). An error answer keeps its status and message, in the
        OpenAI shape. A stream is cut (error event) once ``down`` is set or at
        ``deadline`` (``time.perf_counter`` clock)."""
        if answer.rest is None:
            inflight.release()
            self.finish(path, answer.status, start, first=None)
            if answer.status != 200:
                return upstream_error(answer.status, answer.head).response()
            return Response(answer.head, status_code=answer.status,
                            media_type=answer.resp.headers.get("content-type",
                                                               "application/json"))
        return HeldStream(self._pipe(path, answer, inflight, start, down, deadline),
                          media_type="text/event-stream",
                          closers=[inflight.release, answer.close])

    async def _pipe(self, path: str, answer: Answer, inflight: Inflight, start: float,
                    down: asyncio.Event, deadline: float) -> AsyncIterator[bytes]:
        """The stream's first chunk (already read), then the rest as it comes."""
        first = last = answer.at
        assert answer.rest is not None
        try:
            yield answer.head
            async for chunk in guarded(answer.rest, answer.close, down, deadline):
                now = time.perf_counter()
                self.metrics.itl.observe(now - last)
                last = now
                yield chunk
        except Exception as exc:  # noqa: BLE001  # broke off, down or late: end it cleanly
            rid = answer.request_id
            if isinstance(exc, StreamDeadline):
                self.metrics.failures.labels("deadline", "gateway").inc()
                logger.warning("request %s: stream cut at its deadline", rid)
                error = APIError(504, "the request ran past api.request_timeout_s",
                                 code="timeout")
            else:
                logger.warning("request %s: decode stream broke off: %s", rid, describe(exc))
                error = APIError(502, "the decode instance broke off the stream",
                                 code="upstream")
            yield f"data: {json.dumps(error.body())}\n\n".encode()
        finally:
            await answer.close()
            inflight.release()
            self.finish(path, answer.status, start, first)

    def finish(self, path: str, status: int, start: float, first: float | None) -> None:
        now = time.perf_counter()
        self.metrics.requests.labels(path, str(status)).inc()
        if status == 200:
            self.metrics.ttft.observe((first or now) - start)
            self.metrics.e2e.observe(now - start)


class StreamDeadline(Exception):
    """The stream reached its request's deadline."""


class DecoderDown(Exception):
    """The pool marked the stream's decoder down while it streamed."""


_END = object()


async def guarded(chunks: AsyncIterator[bytes], close: Callable[[], Awaitable[None]],
                  down: asyncio.Event, deadline: float) -> AsyncIterator[bytes]:
    """``chunks`` as they come, until ``down`` is set (DecoderDown) or ``deadline``
    (``time.perf_counter`` clock; StreamDeadline). A reader task owns the upstream read, so
    the task that serves the client can stop waiting for it at any time (an asyncio timeout
    cannot span an async generator's yields). On the way out ``close`` (the upstream
    response's) ends the read: it closes the connection, and the engine aborts the request.
    The read is not cancelled but ended by the close, which also reaches the engine."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # backpressure from a slow client
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(_END)
        except Exception as exc:  # noqa: BLE001  # handed to the consumer
            await queue.put(exc)

    def stop(why: Exception) -> None:
        while queue.full():  # room for the verdict: what is queued is dropped anyway
            queue.get_nowait()
        queue.put_nowait(why)

    reader = asyncio.create_task(pump())
    watcher = asyncio.create_task(down.wait())
    watcher.add_done_callback(lambda w: None if w.cancelled() else stop(DecoderDown(
        "the instance went down")))
    timer = loop.call_at(loop.time() + max(0.0, deadline - time.perf_counter()),
                         stop, StreamDeadline())
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        timer.cancel()
        watcher.cancel()
        if not reader.done():
            await close()
            while queue.full():  # a reader blocked on a full queue sees the close too
                queue.get_nowait()
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(reader, 5.0)  # cancelled if the close did not end it


def describe(why: Exception | str) -> str:
    return why if isinstance(why, str) else f"{type(why).__name__}: {why}"

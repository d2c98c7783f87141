"""A fake vLLM engine for gateway tests: OpenAI-shaped completions (streamed and not), a
prefill answer with ``kv_transfer_params``, ``/health`` and vLLM's load gauges on ``/metrics``.

It records every body and header set it receives (``EngineBehavior.received``), so tests
can check what the gateway forwards. It never answers 5xx on its own: a body it cannot
read gets a 400 with an OpenAI error, as vLLM answers.

    with FakeEngine(EngineBehavior(role="prefill")) as prefill, FakeEngine() as decode:
        pool.add("prefill-0", prefill.info(0)); pool.add("decode-0", decode.info(0))

``AppServer`` runs any ASGI app (the gateway too) with uvicorn on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from disagg.instance import InstanceInfo


@dataclass
class EngineBehavior:
    role: str = "decode"
    engine_id: str = ""  # default: fake-<role>-<port>
    max_tokens_cap: int = 4  # tokens answered at most, whatever max_tokens asks
    itl_s: float = 0.0  # between streamed tokens
    hold: threading.Event | None = None  # while set-able and not set, answers wait
    error: tuple[int, dict[str, Any]] | None = None  # answer this (status, body) instead
    cut_after: int | None = None  # streams die (connection cut) after this many tokens;
    # a whole (non-streamed) answer is cut part-way
    error_event_after: int | None = None  # streams send vLLM's error event (engine dead)
    # after this many tokens, and end
    hang_after: int | None = None  # streams stop sending (connection kept open) after this
    # many tokens, as a dying engine can, until the client goes away
    received: list[dict[str, Any]] = field(default_factory=list)  # bodies, in order
    headers: list[dict[str, str]] = field(default_factory=list)
    active: int = 0  # requests being answered now
    peak: int = 0  # most at once
    polls: int = 0  # /metrics requests served
    aborted: int = 0  # requests whose client (the gateway) went away before the end
    tokens: int = 0  # tokens generated (vllm:generation_tokens_total)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                   "param": None, "code": status}}, status_code=status)


class _Engine:
    def __init__(self, behavior: EngineBehavior) -> None:
        self.b = behavior
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        self.b.polls += 1
        text = (f'vllm:num_requests_running{{engine="0"}} {self.b.active}\n'
                'vllm:num_requests_waiting{engine="0"} 0\n'
                'vllm:kv_cache_usage_perc{engine="0"} 0.0\n'
                f'vllm:generation_tokens_total{{engine="0"}} {self.b.tokens}\n')
        return Response(text, media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"bad JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "not an object")
        self.b.received.append(body)
        self.b.headers.append(dict(request.headers))
        if self.b.error is not None:
            status, err = self.b.error
            return JSONResponse(err, status_code=status)
        self.b.active += 1
        self.b.peak = max(self.b.peak, self.b.active)
        try:
            while self.b.hold is not None and not self.b.hold.is_set():
                if await request.is_disconnected():  # as vLLM does: abort at once
                    self.b.aborted += 1
                    return Response(status_code=499)
                await asyncio.sleep(0.005)
            if body.get("stream"):
                return StreamingResponse(self._stream(request, body, chat),
                                         media_type="text/event-stream")
            if self.b.cut_after is not None:  # the engine dies while writing its answer
                return StreamingResponse(self._cut(), media_type="application/json")
            return JSONResponse(self._whole(body, chat))
        finally:
            self.b.active -= 1

    def _tokens(self, body: dict[str, Any]) -> int:
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        return max(1, min(int(asked), self.b.max_tokens_cap))

    def _whole(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        n, k = self._n(body), self._tokens(body)
        self.b.tokens += n * k
        text = "".join(f" t{i}" for i in range(k))
        choices = [{"index": i, "finish_reason": "length",
                    **({"message": {"role": "assistant", "content": text}} if chat
                       else {"text": text})} for i in range(n)]
        out: dict[str, Any] = {
            "id": "fake", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": n * k,
                      "total_tokens": 1 + n * k}}
        params = body.get("kv_transfer_params")
        if isinstance(params, dict) and params.get("do_remote_decode"):
            out["kv_transfer_params"] = {
                "do_remote_prefill": True, "remote_engine_id": self.b.engine_id,
                "remote_host": "127.0.0.1", "remote_port": 1, "remote_block_ids": [0, 1]}
        return out

    @staticmethod
    def _n(body: dict[str, Any]) -> int:
        n = body.get("n")
        return n if isinstance(n, int) and 1 <= n <= 64 else 1

    async def _stream(self, request: Request, body: dict[str, Any],
                      chat: bool) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        done = False
        try:
            async for chunk in self._chunks(request, body, chat, obj):
                yield chunk
            done = True
        finally:
            if not done:
                self.b.aborted += 1

    @staticmethod
    async def _cut() -> AsyncIterator[bytes]:
        yield b'{"id": "fake", "cho'
        raise ConnectionAbortedError("fake engine cut the answer")

    async def _chunks(self, request: Request, body: dict[str, Any], chat: bool,
                      obj: str) -> AsyncIterator[bytes]:
        for i in range(self._tokens(body)):
            if i == self.b.cut_after:
                raise ConnectionAbortedError("fake engine cut the stream")
            if i == self.b.error_event_after:
                err = {"error": {"message": "EngineCore encountered an issue.",
                                 "type": "InternalServerError", "param": None, "code": 500}}
                yield f"data: {json.dumps(err)}\n\n".encode()
                return
            if i == self.b.hang_after:  # silent until the client goes away
                while not await request.is_disconnected():
                    await asyncio.sleep(0.01)
                self.b.aborted += 1  # as vLLM aborts it
                return
            if i and self.b.itl_s:
                await asyncio.sleep(self.b.itl_s)
            self.b.tokens += 1
            choice = ({"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}
                      if chat else {"index": 0, "text": f" t{i}", "finish_reason": None})
            data = {"id": "fake", "object": obj, "model": body.get("model"),
                    "choices": [choice]}
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"


class AppServer:
    """Serves an ASGI app on 127.0.0.1 (a free port) from a background thread."""

    def __init__(self, app: Any, lifespan: str = "off") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan,
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout_s: float = 20.0) -> AppServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeEngine(AppServer):
    """A fake engine served over HTTP; ``info(index)`` is its InstanceInfo for a pool."""

    def __init__(self, behavior: EngineBehavior | None = None) -> None:
        self.behavior = behavior or EngineBehavior()
        super().__init__(_Engine(self.behavior).app)
        if not self.behavior.engine_id:
            self.behavior.engine_id = f"fake-{self.behavior.role}-{self.port}"

    def info(self, index: int = 0) -> InstanceInfo:
        role = "prefill" if self.behavior.role == "prefill" else "decode"
        return InstanceInfo(role=role, index=index, engine_id=self.behavior.engine_id,
                            url=self.url, side_channel_port=0, pid=0, log_path="")

    def __enter__(self) -> FakeEngine:
        self.start()
        return self

"""A fake OpenAI streaming server with injected delays, for testing the load generator.

Serves ``/v1/completions``, ``/v1/chat/completions`` (streaming and not), ``/v1/models`` and
``/health`` over real HTTP on 127.0.0.1. Per request it waits ``ttft_s`` before the first
token and ``itl_s`` between tokens, and answers exactly ``max_tokens`` tokens (one word each),
unless told to misbehave. A non-streamed request asking ``kv_transfer_params.do_remote_decode``
(a P/D proxy's prefill hop) gets ``kv_transfer_params`` back, as vLLM's NixlConnector answers.
Before the first token it sends what real servers send that carries
no token: an SSE comment and, for chat, a role-only delta, so a client that stops its TTFT
clock on the first byte measures ~0 instead of ``ttft_s``.

In-process use (tests)::

    with FakeServer(FakeBehavior(ttft_s=0.2, itl_s=0.05)) as server:
        ...  # send requests to server.url

As a process: ``python -m tests.support.fake_server --port 8123 --ttft 0.2 --itl 0.05``.
"""

from __future__ import annotations

import argparse
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


@dataclass
class FakeBehavior:
    """What the fake server does. ``*_every=n`` misbehaves on every n-th request (1-based)."""

    ttft_s: float = 0.1
    itl_s: float = 0.02
    model: str = "fake-model"
    root: str = "/nonexistent/fake-model"
    fail_every: int = 0  # answer HTTP 500
    short_every: int = 0  # stream one token fewer than asked (usage tells the truth)
    cut_every: int = 0  # close the stream after the first token, without [DONE]
    report_usage: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)  # request bodies, in order


def _words(body: dict[str, Any]) -> int:
    if "prompt" in body:
        return len(str(body["prompt"]).split())
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))


def _every(n: int, count: int) -> bool:
    return n > 0 and count % n == 0


def _chunk(body: dict[str, Any], chat: bool, text: str | None, role: bool = False) -> bytes:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": None}
    obj = "chat.completion.chunk" if chat else "text_completion"
    data = {"id": "fake", "object": obj, "model": body.get("model"), "choices": [choice]}
    return f"data: {json.dumps(data)}\n\n".encode()


class _App:
    """The Starlette app around one :class:`FakeBehavior`."""

    def __init__(self, behavior: FakeBehavior) -> None:
        self.b = behavior
        self.count = 0
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes)

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        data = [{"id": self.b.model, "object": "model", "root": self.b.root}]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.b.received.append(body)
        self.count += 1
        if _every(self.b.fail_every, self.count):
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        n_sent = n - 1 if _every(self.b.short_every, self.count) else n
        if not body.get("stream"):
            await asyncio.sleep(self.b.ttft_s + self.b.itl_s * (n_sent - 1))
            return JSONResponse(self._whole(body, chat, n_sent))
        cut = _every(self.b.cut_every, self.count)
        return StreamingResponse(
            self._stream(body, chat, n_sent, cut), media_type="text/event-stream"
        )

    def _whole(self, body: dict[str, Any], chat: bool, n: int) -> dict[str, Any]:
        text = "".join(f" t{i}" for i in range(n))
        choice = {"index": 0, "finish_reason": "length"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        usage = {"prompt_tokens": _words(body), "completion_tokens": n}
        out = {"id": "fake", "model": body.get("model"), "choices": [choice], "usage": usage}
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            out["kv_transfer_params"] = {"do_remote_prefill": True, "remote_block_ids": [0]}
        return out

    async def _stream(
        self, body: dict[str, Any], chat: bool, n: int, cut: bool
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        yield b": keep-alive\n\n"
        if chat:
            yield _chunk(body, chat, None, role=True)
        for i in range(n):
            due = start + self.b.ttft_s + i * self.b.itl_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            yield _chunk(body, chat, f" t{i}")
            if cut:
                return
        if self.b.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": _words(body), "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"


class FakeServer:
    """Runs the fake server in a background thread on 127.0.0.1 (a free port unless given)."""

    def __init__(self, behavior: FakeBehavior | None = None, port: int = 0) -> None:
        self.behavior = behavior or FakeBehavior()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(_App(self.behavior).app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout_s: float = 10.0) -> FakeServer:
        """Start serving; raise TimeoutError if not up within ``timeout_s``."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--ttft", type=float, default=0.1, help="seconds to the first token")
    p.add_argument("--itl", type=float, default=0.02, help="seconds between tokens")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--root", default="/nonexistent/fake-model", help="reported model folder")
    args = p.parse_args(argv)
    behavior = FakeBehavior(ttft_s=args.ttft, itl_s=args.itl, model=args.model, root=args.root)
    server = FakeServer(behavior, port=args.port).start()
    print(f"fake OpenAI server on {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

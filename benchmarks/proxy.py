"""Minimal proxy for vLLM's own NixlConnector in 1P1D: the baseline `disagg` is compared with.

For each ``/v1/completions`` or ``/v1/chat/completions`` request:

1. send it to the prefill instance with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true, ...}``: the prefill computes the prompt's KV,
   keeps the blocks and answers ``kv_transfer_params`` naming where they are;
2. send the original request plus those ``kv_transfer_params`` to the decode instance, whose
   NixlConnector pulls the blocks, and stream its answer back unchanged.

A prefill error is returned to the client as is; a prefill answer without
``kv_transfer_params`` (a misconfigured connector) is a 502, never a silent fallback to
decode-only serving. ``GET /health`` is 200 only when both instances are healthy.

Usage: ``python -m benchmarks.proxy --port 8000 --prefill http://127.0.0.1:8100
--decode http://127.0.0.1:8200``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill hop's request: one token, not streamed, KV kept for a remote decode."""
    req = copy.deepcopy(body)
    req.update(max_tokens=1, stream=False, kv_transfer_params=dict(REMOTE_DECODE))
    if "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        req.pop(key, None)
    return req


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    """The decode hop's request: the client's request plus where to pull the prompt's KV."""
    return {**body, "kv_transfer_params": kv_transfer_params}


def make_app(prefill_url: str, decode_url: str, timeout_s: float = 600.0) -> FastAPI:
    """The proxy app forwarding to one prefill and one decode vLLM."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    client = httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        for url in (prefill_url, decode_url):
            try:
                if (await client.get(f"{url}/health", timeout=5.0)).status_code != 200:
                    return Response(status_code=503)
            except httpx.HTTPError:
                return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Response:
        resp = await client.get(f"{decode_url}/v1/models")
        return Response(resp.content, resp.status_code, media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _forward(client, prefill_url, decode_url, "/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _forward(client, prefill_url, decode_url, "/v1/chat/completions", request)

    return app


async def _forward(
    client: httpx.AsyncClient, prefill_url: str, decode_url: str, path: str, request: Request
) -> Response:
    body = await request.json()
    headers = {"X-Request-Id": request.headers.get("X-Request-Id") or str(uuid.uuid4())}
    pre = await client.post(f"{prefill_url}{path}", json=prefill_body(body), headers=headers)
    if pre.status_code != 200:
        return Response(pre.content, pre.status_code, media_type="application/json")
    kv = pre.json().get("kv_transfer_params")
    if not kv:
        msg = "prefill answered without kv_transfer_params: is its NixlConnector configured?"
        return JSONResponse({"error": {"message": msg}}, status_code=502)
    req = client.build_request(
        "POST", f"{decode_url}{path}", json=decode_body(body, kv), headers=headers
    )
    resp = await client.send(req, stream=True)
    if resp.status_code != 200 or not body.get("stream"):
        content = await resp.aread()
        await resp.aclose()
        return Response(content, resp.status_code, media_type="application/json")
    return StreamingResponse(_relay(resp), media_type="text/event-stream")


async def _relay(resp: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    finally:
        await resp.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", required=True, help="prefill vLLM root URL")
    p.add_argument("--decode", required=True, help="decode vLLM root URL")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per backend request")
    args = p.parse_args(argv)
    app = make_app(args.prefill.rstrip("/"), args.decode.rstrip("/"), args.timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

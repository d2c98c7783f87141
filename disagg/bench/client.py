"""Streaming OpenAI client: sends one :class:`RequestSpec`, times its tokens.

Works against any OpenAI-compatible server (``/v1/completions`` and ``/v1/chat/completions``
with ``stream: true``). Definitions, all from ``time.perf_counter`` on the client:

- TTFT: send to the first *token-bearing* chunk (non-empty ``text`` / ``delta.content`` /
  ``delta.reasoning_content``, or non-empty ``token_ids``). A role-only first chunk, an SSE
  comment or a keep-alive carries no token and does not stop the TTFT clock.
- ITL: gaps between successive token-bearing chunks.
- Output tokens: ``usage.completion_tokens`` (asked for with ``stream_options.include_usage``),
  else the number of token-bearing chunks.

A request fails (``ok=False``, never dropped) on an HTTP error, a transport error or timeout,
an ``error`` object in the stream, a stream without ``[DONE]``, no token at all, more token
chunks than reported tokens, or an output token count different from ``max_tokens`` when
``ignore_eos`` is set (more than ``max_tokens`` otherwise).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from disagg.bench.records import RequestResult, RequestSpec


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests.

    ``base_url`` may end in ``/v1`` or not. ``extra_body`` is merged into every request body.
    """

    base_url: str
    model: str
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def path(self, spec: RequestSpec) -> str:
        """Absolute URL of the endpoint serving ``spec``."""
        root = self.base_url.rstrip("/").removesuffix("/v1")
        return (
            f"{root}/v1/completions" if spec.api == "completions" else f"{root}/v1/chat/completions"
        )


def build_body(spec: RequestSpec, cfg: EndpointConfig) -> dict[str, Any]:
    """The JSON body for ``spec``: streaming, usage reported, greedy unless told otherwise."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: exactly max_tokens tokens
    if spec.api == "completions":
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [m.model_dump() for m in spec.messages or []]
    body.update(cfg.extra_body)
    return body


class _Stream:
    """Accumulates one response stream's timings and counts."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.error: str | None = None

    def on_event(self, data: str, now: float) -> None:
        """Handle one SSE ``data:`` payload received at ``now``."""
        if data.strip() == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self.error = f"server error in stream: {str(chunk['error'])[:200]}"
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if any(_carries_token(c) for c in chunk.get("choices") or []):
            self._on_token(now)

    def _on_token(self, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            assert self.last is not None
            self.gaps.append(now - self.last)
        self.last = now
        self.chunks += 1


def _carries_token(choice: dict[str, Any]) -> bool:
    if choice.get("text") or choice.get("token_ids"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, blank and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].lstrip(" ")


async def stream_request(
    client: httpx.AsyncClient, cfg: EndpointConfig, spec: RequestSpec, run_start: float
) -> RequestResult:
    """Send ``spec``, stream the answer, return what was measured. Never raises for a
    server-side or transport failure: those become ``ok=False`` results."""
    sent = time.perf_counter()
    state = _Stream(sent)
    error: str | None = None
    try:
        async with client.stream("POST", cfg.path(spec), json=build_body(spec, cfg)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                error = f"HTTP {resp.status_code}: {text}"
            else:
                async for line in resp.aiter_lines():
                    data = _sse_data(line)
                    if data is not None:
                        state.on_event(data, time.perf_counter())
                    if state.error or state.done:
                        break
    except Exception as exc:  # transport, protocol or malformed-chunk errors: a failure
        error = f"{type(exc).__name__}: {exc}"[:300]
    end = time.perf_counter()
    return _result(spec, cfg, state, error or state.error, sent - run_start, end)


def _result(
    spec: RequestSpec,
    cfg: EndpointConfig,
    state: _Stream,
    error: str | None,
    start_s: float,
    end: float,
) -> RequestResult:
    usage = state.usage or {}
    usage_out = usage.get("completion_tokens")
    output_tokens = usage_out if isinstance(usage_out, int) else state.chunks
    if error is None:
        error = _check(spec, cfg, state, output_tokens, usage_out)
    return RequestResult(
        request_id=spec.request_id,
        ok=error is None,
        error=error,
        start_s=start_s,
        ttft_s=None if state.first is None else state.first - state.sent,
        itl_s=state.gaps,
        e2e_s=end - state.sent,
        output_tokens=output_tokens,
        output_chunks=state.chunks,
        usage_output_tokens=usage_out if isinstance(usage_out, int) else None,
        prompt_tokens=usage.get("prompt_tokens")
        if isinstance(usage.get("prompt_tokens"), int)
        else None,
        expected_prompt_tokens=spec.prompt_tokens,
        expected_output_tokens=spec.max_tokens,
        group=spec.group,
    )


def _check(
    spec: RequestSpec, cfg: EndpointConfig, state: _Stream, output_tokens: int, usage_out: Any
) -> str | None:
    """Why a completed stream still counts as failed, or None."""
    if not state.done:
        return "stream ended without [DONE]"
    if state.chunks == 0:
        return "no token in the response"
    if isinstance(usage_out, int) and state.chunks > usage_out:
        return f"{state.chunks} token chunks but usage reports {usage_out} tokens"
    if cfg.ignore_eos and output_tokens != spec.max_tokens:
        return f"expected {spec.max_tokens} output tokens, got {output_tokens}"
    if output_tokens > spec.max_tokens:
        return f"asked at most {spec.max_tokens} output tokens, got {output_tokens}"
    return None

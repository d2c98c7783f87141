"""What the gateway accepts, checked before anything reaches an engine.

    read_body       413 past ``max_body_bytes`` (Content-Length first, then while reading)
    parse_json      400: not UTF-8, not JSON, NaN/Infinity, lone surrogates, integers beyond
                    int64, nesting deeper than ``MAX_DEPTH``, not an object
    strip_internal  drops the fields only the gateway may set (``INTERNAL_FIELDS``)
    check_request   400: wrong types of the OpenAI fields the gateway and engines read,
                    ``n``/``best_of`` beyond ``max_n``, ``max_tokens`` beyond the context

Unknown fields pass through (vLLM accepts, and ignores, extra fields); an engine that
rejects a value answers 4xx and the gateway passes its message on. ``null`` is accepted
for every optional field, as OpenAI clients send it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request

from disagg.errors import APIError

# Fields a client may not set: the gateway drops them before forwarding (counted in
# disagg_dropped_fields) and sets the ones it needs itself. Read off vLLM 0.32's
# CompletionRequest / ChatCompletionRequest (vllm/entrypoints/openai/*/protocol.py).
INTERNAL_FIELDS: dict[str, str] = {
    # The KV connector's orders: do_remote_decode (hold KV for a remote decoder) or
    # do_remote_prefill + remote host/port/engine/block ids (pull KV from that peer). A
    # client setting it points the decoder's connector at a host of its choice.
    "kv_transfer_params": "KV connector orders (prefill hop only)",
    # The same for vLLM's encoder-cache connector (EC disaggregation).
    "ec_transfer_params": "encoder-cache connector orders",
    # Free-form SamplingParams.extra_args: read by connectors and plugins (vLLM puts
    # kv_transfer_params there), and a second way to set session_id.
    "vllm_xargs": "extra_args for connectors and plugins",
    # The engine-side request id (the gateway names requests with X-Request-Id): a chosen
    # id could collide with another request's in the engine and the connector.
    "request_id": "engine request id",
    # Engine queue order: admission and routing are the gateway's; a non-zero priority
    # fails outright on engines without priority scheduling.
    "priority": "engine scheduling priority",
}
# Not dropped (client-level features, checked by the engine): cache_salt, session_id,
# chat_template (vLLM refuses it unless --trust-request-chat-template), mm_processor_kwargs,
# media_io_kwargs, prompt_embeds (needs --enable-prompt-embeds), return_token_ids & co.
# Client headers are never forwarded (the gateway sends its own X-Request-Id), so neither
# are vLLM's header-borne internals (X-data-parallel-rank, trace headers).

MAX_DEPTH = 64  # nesting of objects and arrays; tool schemas stay far below
INT64 = (-(1 << 63), (1 << 63) - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Reject(ValueError):
    pass


# ---- body --------------------------------------------------------------------------------
async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` (413 beyond it). Read from the ASGI
    ``receive`` channel directly (Starlette's ``Request.stream`` is an async generator: a
    few tens of microseconds more per request)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise APIError(400, f"invalid Content-Length {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise APIError(400, "the client closed the connection while sending the body")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body larger than {max_bytes} bytes",
                    code="request_too_large")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not UTF-8: {exc}") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite,
                          parse_int=_int64)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels") \
            from None
    except ValueError as exc:  # JSONDecodeError and _Reject
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, not {_kind(body)}")
    # The walk is needed only if the text could hold what it looks for: a lone surrogate
    # comes only from a \\u escape (the text is strict UTF-8), and nesting deeper than
    # MAX_DEPTH takes more than MAX_DEPTH brackets. Two scans in C, usually skip the walk.
    if b"\\u" in raw or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        _check_tree(body)
    return body


def _no_constant(name: str) -> Any:
    raise _Reject(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Reject(f"number {text[:40]} is out of range")
    return value


def _int64(text: str) -> int:
    value = int(text) if len(text) <= 20 else None
    if value is None or not INT64[0] <= value <= INT64[1]:
        raise _Reject(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is out of "
                      f"range (64-bit)")
    return value


def _check_tree(body: dict[str, Any]) -> None:
    """No nesting beyond MAX_DEPTH, no lone surrogate (unencodable as UTF-8) anywhere."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(400, "request body contains a lone UTF-16 surrogate "
                               "(\\ud800-\\udfff), which is not valid Unicode text")
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                stack.extend((k, depth) for k in value)
                stack.extend((v, depth + 1) for v in value.values())
            else:
                stack.extend((v, depth + 1) for v in value)


# ---- internal fields ---------------------------------------------------------------------
def strip_internal(body: dict[str, Any]) -> list[str]:
    """Remove ``INTERNAL_FIELDS`` from ``body`` in place; the names removed."""
    dropped = [name for name in INTERNAL_FIELDS if name in body]
    for name in dropped:
        del body[name]
    return dropped


# ---- fields ------------------------------------------------------------------------------
Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) in (int, float)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _list_of(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(pred(x) for x in v)


def _stop(v: Any) -> bool:
    return isinstance(v, str) or _list_of(_is_str)(v)


def _bias(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_num(x) for x in v.values())


def _tool_choice(v: Any) -> bool:
    return isinstance(v, str | dict)


_INT, _NUM, _STR, _BOOL, _OBJ = ((_is_int, "an integer"), (_is_num, "a number"),
                                 (_is_str, "a string"), (_is_bool, "a boolean"),
                                 (_is_obj, "an object"))
COMMON: dict[str, Check] = {
    "stream": _BOOL, "stream_options": _OBJ, "echo": _BOOL, "ignore_eos": _BOOL,
    "temperature": _NUM, "top_p": _NUM, "min_p": _NUM, "presence_penalty": _NUM,
    "frequency_penalty": _NUM, "repetition_penalty": _NUM, "length_penalty": _NUM,
    "top_k": _INT, "seed": _INT, "prompt_logprobs": _INT, "truncate_prompt_tokens": _INT,
    "stop": (_stop, "a string or a list of strings"),
    "stop_token_ids": (_list_of(_is_int), "a list of integers"),
    "allowed_token_ids": (_list_of(_is_int), "a list of integers"),
    "bad_words": (_list_of(_is_str), "a list of strings"),
    "logit_bias": (_bias, "an object of numbers"),
    "user": _STR, "cache_salt": _STR, "session_id": _STR,
    "skip_special_tokens": _BOOL, "spaces_between_special_tokens": _BOOL,
    "include_stop_str_in_output": _BOOL, "add_special_tokens": _BOOL,
    "use_beam_search": _BOOL, "return_token_ids": _BOOL, "return_tokens_as_token_ids": _BOOL,
    "response_format": _OBJ, "structured_outputs": _OBJ,
}
COMPLETIONS: dict[str, Check] = {"suffix": _STR, "logprobs": _INT}
CHAT: dict[str, Check] = {
    "logprobs": _BOOL, "top_logprobs": _INT, "parallel_tool_calls": _BOOL,
    "tools": (_list_of(_is_obj), "a list of objects"),
    "tool_choice": (_tool_choice, "a string or an object"),
    "documents": (_list_of(_is_obj), "a list of objects"),
    "add_generation_prompt": _BOOL, "continue_final_message": _BOOL,
    "chat_template": _STR, "chat_template_kwargs": _OBJ, "mm_processor_kwargs": _OBJ,
}


def check_model(body: dict[str, Any], served: str) -> None:
    """400 without a string ``model``; 404 for a model other than ``served``."""
    model = body.get("model")
    if model is None:
        raise APIError(400, "missing required field 'model'", param="model")
    if not isinstance(model, str):
        raise _bad("model", "must be a string", model)
    if model != served:
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise APIError(404, f"model {shown!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


_CHECKS = {False: COMMON | COMPLETIONS, True: COMMON | CHAT}


def check_request(body: dict[str, Any], path: str, max_n: int, max_model_len: int) -> None:
    """400 for the first field whose type or range is wrong (``check_model`` checks
    ``model``)."""
    chat = path.endswith("/chat/completions")
    if chat:
        _check_messages(body)
    else:
        _check_prompt(body)
    checks = _CHECKS[chat]
    # A body holds a handful of the fields checked: look at those; on a wrong one, name the
    # first wrong field in the table's order.
    for name, value in body.items():
        check = checks.get(name)
        if check is not None and value is not None and not check[0](value):
            for name, (ok, what) in checks.items():
                value = body.get(name)
                if value is not None and not ok(value):
                    raise _bad(name, f"must be {what}", value)
    for name in ("max_tokens", "max_completion_tokens"):
        _check_range(body, name, 1, max_model_len, "the model's context length")
    for name in ("n", "best_of"):
        _check_range(body, name, 1, max_n, "this server's max_n")
    _check_range(body, "min_tokens", 0, max_model_len, "the model's context length")


def _check_range(body: dict[str, Any], name: str, low: int, high: int, what: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_int(value) or not low <= value <= high:
        raise _bad(name, f"must be an integer from {low} to {high} ({what})", value)


def _check_prompt(body: dict[str, Any]) -> None:
    if "prompt" not in body:
        raise APIError(400, "missing required field 'prompt'", param="prompt")
    p = body["prompt"]
    token_ids = _list_of(lambda t: _is_int(t) and t >= 0)
    if isinstance(p, str) or (isinstance(p, list) and p and (
            _list_of(_is_str)(p) or token_ids(p)
            or all(isinstance(x, list) and x and token_ids(x) for x in p))):
        return
    raise _bad("prompt", "must be a string, a non-empty list of strings, or token ids "
               "(a non-empty list of non-negative integers, or a list of such lists)", p)


def _check_messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise APIError(400, "missing required field 'messages'", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of message objects", messages)
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(name, "must be an object", m)
        if not isinstance(m.get("role"), str):
            raise _bad(f"{name}.role", "must be a string", m.get("role"))
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
                isinstance(part, dict) and isinstance(part.get("type"), str)
                for part in content):
            raise _bad(f"{name}.content", "must be a string, null, or a list of content "
                       "parts (objects with a string 'type')", content)


def _bad(param: str, why: str, value: Any) -> APIError:
    return APIError(400, f"{param} {why}, got {_kind(value)}", param=param)


def _kind(value: Any) -> str:
    """A short description of a JSON value for error messages (never the whole value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text[:40]}{'...' if len(text) > 40 else ''}"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "an object"

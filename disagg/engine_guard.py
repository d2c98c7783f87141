"""ASGI middleware every engine (vLLM's API server) runs: no route without the engine token.

vLLM's own ``--api-key`` (``VLLM_API_KEY``) guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``. Everything else stays open: ``/health``, ``/metrics``,
``/ping``, ``/version``, ``/load``, ``/tokenize``, ``/detokenize``, ``/server_info`` and
``/invocations`` (SageMaker's route, which runs completions). This middleware, installed
with vLLM's ``--middleware disagg.engine_guard.RequireEngineToken``, requires the same
Bearer token (``VLLM_API_KEY``, from the deployment secret) on every HTTP and websocket
request, so only the gateway (and the deployment's own pool poll) reaches an engine.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from disagg.credentials import ENGINE_TOKEN_ENV

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
                   Awaitable[None]]

_DENIED = b'{"error": {"message": "missing or invalid engine token", ' \
          b'"type": "authentication_error", "param": null, "code": 401}}'


class RequireEngineToken:
    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        token = token if token is not None else os.environ.get(ENGINE_TOKEN_ENV, "")
        if not token:
            raise RuntimeError(f"{ENGINE_TOKEN_ENV} is not set: an engine must not serve "
                               "without its deployment's token")
        self._digest = hashlib.sha256(token.encode()).digest()

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, param = value.decode("latin-1").partition(" ")
                given = hashlib.sha256(param.encode()).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(given, self._digest)
        return False

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[Any]]) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_DENIED)).encode())]})
        await send({"type": "http.response.body", "body": _DENIED})

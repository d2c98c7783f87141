"""OpenAI-style error bodies: every error the gateway returns has this shape.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | int}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

logger = logging.getLogger("disagg.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout_error"}
_MAX_MESSAGE = 4096  # an engine's message is passed on, but not without bound


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": error_type(self.status),
                          "param": self.param, "code": self.code or self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def upstream_error(status: int, content: bytes) -> APIError:
    """An engine's error answer as ours, keeping its message and param (vLLM answers
    ``{"error": {...}}``; older servers ``{"message": ...}``; anything else is quoted)."""
    message: Any = None
    param: Any = None
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message, param = err.get("message"), err.get("param")
        elif isinstance(err, str):
            message = err
        else:
            message, param = data.get("message"), data.get("param")
    if not isinstance(message, str) or not message:
        message = content.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return APIError(status, message[:_MAX_MESSAGE],
                    param=param if isinstance(param, str) else None)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI shape."""
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """The last resort for an exception no handler caught: logged, and a 500 with a body."""
    logger.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal error", code="internal_error").response()

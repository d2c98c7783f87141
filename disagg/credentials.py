"""Per-deployment secrets: one random secret per deployment, keys derived from it per use.

    deployment secret (launch, in memory; to each instance actor as an argument)
      -> engine token     VLLM_API_KEY of every engine: the gateway's Bearer token to it
      -> channel key      HMAC key of the side channel (control messages between workers)

Secrets travel in process environments, never in argv (visible to every local user in
``ps``) and never in logs. A leaf module: every layer may import it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SECRET_ENV = "DISAGG_DEPLOYMENT_SECRET"  # in an engine's environment: the channel key's root
ENGINE_TOKEN_ENV = "VLLM_API_KEY"  # vLLM's own variable for its API key


def new_secret() -> str:
    """A fresh deployment secret (256 random bits, hex)."""
    return secrets.token_hex(32)


def deployment_secret() -> str:
    """The secret a new deployment uses: ``DISAGG_DEPLOYMENT_SECRET`` when the operator
    pins it (e.g. so monitoring can read the engines' own /metrics with
    ``engine_token(secret)``), else a fresh one."""
    pinned = os.environ.get(SECRET_ENV, "").strip()
    if not pinned:
        return new_secret()
    try:
        if len(bytes.fromhex(pinned)) < 16:
            raise ValueError
    except ValueError:
        raise ValueError(f"{SECRET_ENV} must be at least 32 hex digits (e.g. from "
                         "`python -c 'import secrets; print(secrets.token_hex(32))'`)") from None
    return pinned


def _derive(secret: str, purpose: str) -> bytes:
    return hmac.new(bytes.fromhex(secret), purpose.encode(), hashlib.sha256).digest()


def engine_token(secret: str) -> str:
    """The Bearer token every engine of the deployment requires."""
    return _derive(secret, "disagg engine token v1").hex()


def channel_key(secret: str) -> bytes:
    """The HMAC key that authenticates side-channel messages."""
    return _derive(secret, "disagg side channel v1")


def channel_key_from_env() -> bytes | None:
    """The channel key of the deployment this process serves, or None outside one."""
    secret = os.environ.get(SECRET_ENV)
    return channel_key(secret) if secret else None


def redact_url(url: str | None) -> str | None:
    """``url`` with any password (and ACL user) replaced by ``***``, for logs and status."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if sep else f"***@{host}"

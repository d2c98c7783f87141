"""The policy registry: the one list of policy names, and how a policy is built from a
topology's ``scheduler`` section (name plus that policy's own ``Options``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from disagg.scheduler.base import Policy
from disagg.scheduler.kv_aware import KVAware
from disagg.scheduler.least_loaded import LeastLoaded
from disagg.scheduler.round_robin import RoundRobin
from disagg.scheduler.session import SessionAffinity

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, KVAware, SessionAffinity)
}


def policy_names() -> list[str]:
    return list(POLICIES)


def policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


def validate_options(name: str, options: Mapping[str, Any] | None) -> BaseModel:
    """``options`` checked against policy ``name``'s own schema (pydantic ValidationError
    naming the option otherwise)."""
    return policy_class(name).Options.model_validate(dict(options or {}))


def make_policy(name: str, options: Mapping[str, Any] | None = None) -> Policy:
    """A new instance of policy ``name`` with ``options`` (validated by the policy)."""
    cls = policy_class(name)
    valid = validate_options(name, options)
    return cls(**valid.model_dump())  # Options mirror __init__'s keyword arguments

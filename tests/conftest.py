"""Shared fixtures: the built-in tiny model, plain vLLM servers, deployments, and Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagg.credentials import SECRET_ENV, new_secret

# One deployment secret for the session, so tests can talk to engines directly (they refuse
# anyone without the token derived from it: disagg.credentials).
os.environ.setdefault(SECRET_ENV, new_secret())
os.environ.setdefault("DISAGG_CACHE_DIR", str(Path(__file__).resolve().parent.parent
                                              / ".cache" / "disagg"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from disagg.models import prepare_model

    return prepare_model("tiny")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throwaway redis-server for the session (no persistence), as a URL.

    Without ``redis-server`` on PATH the tests using it skip, except in CI (``CI``) or with
    ``DISAGG_REQUIRE_REDIS=1``, where they fail: a silently skipped tier is an untested one.
    """
    import shutil

    if shutil.which("redis-server") is None:
        why = "redis-server is not on PATH (scripts/setup.sh installs Debian's redis-server)"
        if _truthy("CI") or _truthy("DISAGG_REQUIRE_REDIS"):
            pytest.fail(f"{why}; required because CI or DISAGG_REQUIRE_REDIS is set",
                        pytrace=False)
        pytest.skip(why)
    from tests.support.redis_server import local_redis

    with local_redis() as url:
        yield url

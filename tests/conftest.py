"""Shared fixtures: the built-in tiny model, plain vLLM servers, and deployments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DISAGG_CACHE_DIR", str(Path(__file__).resolve().parent.parent
                                              / ".cache" / "disagg"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from disagg.models import prepare_model

    return prepare_model("tiny")

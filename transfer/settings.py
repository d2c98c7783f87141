"""Connector settings, read from vLLM's ``kv_transfer_config.kv_connector_extra_config``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StoreSettings(BaseModel):
    """The KV store tiers one instance uses (the topology's ``store:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_tokens: int = Field(256, gt=0, description="Rounded to whole engine blocks.")
    cpu_bytes: int = Field(1 << 30, gt=0)
    disk_path: str | None = None
    disk_bytes: int = Field(4 << 30, gt=0)
    redis_url: str | None = None
    redis_bytes: int = Field(1 << 30, gt=0)
    redis_namespace: str = "disagg"
    save: bool = Field(True, description="Save each finished request's full prompt chunks.")
    lookup_timeout_s: float = Field(0.5, gt=0)


class ConnectorSettings(BaseModel):
    """What each instance's connector needs beyond vLLM's own config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    side_channel_host: str = Field("127.0.0.1", description="Address peers use to reach us.")
    side_channel_bind: str = Field("0.0.0.0", description="Address the side channel binds.")
    side_channel_port: int = Field(0, ge=0, le=65535, description="TP rank r uses port + r.")
    backends: list[str] = Field(default_factory=lambda: ["UCX"])
    handshake_timeout_s: float = Field(10.0, gt=0)
    transfer_timeout_s: float = Field(30.0, gt=0)
    lease_s: float = Field(60.0, gt=0)
    model_name: str = Field("", description="Model identity for the compatibility check.")
    store: StoreSettings | None = Field(None, description="KV store tiers; None: no store.")

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorSettings:
        return cls.model_validate(extra.get("disagg", {}))

"""Typed, versioned messages that cross process boundaries in the transfer layer.

Control plane (ZMQ, between a decoder's worker and a prefill's worker):

    decoder (REQ)                           prefill side channel (ROUTER)
      [Envelope | HandshakeRequest(version, compat)] -->
                    <-- [Envelope | HandshakeReply(agent metadata, planes) or ErrorReply]
      [Envelope | AbortNotice(request ids)] -->        (blocks freed early: decoder gave up)
                    <-- [Envelope | AbortNotice (echo) or ErrorReply]

Every side-channel message, request or reply, is two ZMQ frames: an ``Envelope`` header
(JSON) and the message's own JSON. The envelope authenticates the body with HMAC-SHA256
under the deployment's channel key (``disagg.credentials.channel_key``) over

    version (1 byte) | direction (b"Q" request, b"R" reply) | ts (int64 ms, big-endian)
      | nonce (16 bytes) | request nonce (16 bytes; zeros in a request) | body bytes

so a reply is bound to the request it answers (it cannot be replayed to another one), and
a request is fresh (timestamp within the receiver's window, nonce not seen in it).
``disagg.transfer.control.channel`` seals and opens envelopes; nothing here is pickled.

Data plane: NIXL READs of block ranges named by ``KVTransferParams.block_ids``; the READ's
notification carries the prefill-side request id, which frees its blocks. Every message
carries its ``PROTOCOL_VERSION``; a side channel refuses envelopes and requests, and
``KVTransferParams.parse`` params, of another version.

Completion notices (NIXL notifications carried by the decoder's READs, or sent alone) read
``<prefill request id>:<n>``: the prefill rank frees the blocks after ``n`` of them, one from
each decode rank that contacts it (``disagg.tp_layout``: prefill and decode TP sizes differ).

Version history: 1 bare JSON frames; 2 the authenticated envelope; 3 TP sizes (``Compat``
per-head checks, ``remote_tp_size``, counted completion notices); 4 ``PlaneInfo.num_blocks``
(a decoder prepares each peer's block list once, at the handshake).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from disagg.tp_layout import heads_per_rank, pairing_problem

PROTOCOL_VERSION = 4


class _Msg(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )


class Envelope(_Msg):
    """The header frame of every side-channel message; the body frame follows it.

    ``mac`` is HMAC-SHA256 (hex) over the fields and the body as the module docstring
    lays out; ``ts`` and ``nonce`` make each request unique and fresh.
    """

    v: int = PROTOCOL_VERSION
    ts: int = Field(ge=0, lt=1 << 62, description="sender's wall clock, ms since the epoch")
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] = Field(
        description="16 random bytes, hex")
    mac: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class PlaneInfo(_Msg):
    base: int
    block_stride: int
    block_bytes: int
    device_id: int = 0
    num_heads: int = Field(1, ge=1)
    head_bytes: int = Field(0, ge=0, description="one head's slab; 0: heads interleaved")
    num_blocks: int = Field(ge=1, description="blocks in this plane")


class Compat(_Msg):
    """Everything that must match for one side's KV bytes to be valid on the other.

    Sides at different TP sizes hold different heads per rank: their blocks then differ in
    size, and what must match is the bytes of one head (``head_bytes``) and the model's
    head count, with a layout that can be split by head where the heads per rank differ."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    plane_bytes: list[int] = Field(description="block_bytes of each plane, layer by layer")
    tp_size: int = Field(1, ge=1)
    num_kv_heads: int = Field(1, ge=1, description="the model's KV heads, all ranks together")
    head_major: bool = Field(True, description="each block's heads are contiguous slabs")

    def head_bytes(self) -> list[int]:
        """Bytes of one KV head of one block, plane by plane."""
        n = heads_per_rank(self.num_kv_heads, self.tp_size)
        return [b // n for b in self.plane_bytes]

    def mismatch(self, other: Compat) -> str | None:
        """Name the first field that differs, or None when the two are compatible. Asked by
        the side that serves KV (the prefill, ``self``) of a reader's (``other``)."""
        for name in ("model", "dtype", "block_size", "num_layers", "num_kv_heads"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name}: ours={mine!r} peer={theirs!r}"
        problem = pairing_problem(self.num_kv_heads, self.tp_size, other.tp_size,
                                  self.head_major and other.head_major)
        if problem:
            return f"tp_size: ours={self.tp_size} peer={other.tp_size}: {problem}"
        if self.head_bytes() != other.head_bytes():
            return (f"bytes per KV head and block: ours={self.head_bytes()[:4]} "
                    f"peer={other.head_bytes()[:4]}")
        return None


class HandshakeRequest(_Msg):
    kind: Literal["handshake"] = "handshake"
    version: int = PROTOCOL_VERSION
    engine_id: str
    compat: Compat


class HandshakeReply(_Msg):
    kind: Literal["handshake_ok"] = "handshake_ok"
    version: int = PROTOCOL_VERSION
    engine_id: str
    agent_name: str
    agent_metadata: bytes
    planes: list[PlaneInfo] = Field(description="every plane of every layer, in order")


class AbortNotice(_Msg):
    """The decoder will not read these requests' blocks: free them now."""

    kind: Literal["abort"] = "abort"
    version: int = PROTOCOL_VERSION
    request_ids: list[str]


class ErrorReply(_Msg):
    kind: Literal["error"] = "error"
    version: int = PROTOCOL_VERSION
    message: str


class KVTransferParams(_Msg):
    """What a prefill instance returns with its one token and a decoder receives.

    Travels through the gateway inside the OpenAI request/response as
    ``kv_transfer_params`` (a JSON object), hence ``strict=False`` on parse.
    """

    do_remote_prefill: bool = True
    do_remote_decode: bool = False
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: list[int]
    remote_num_tokens: int
    remote_tp_size: int = Field(1, ge=1, le=1024)
    protocol_version: int = PROTOCOL_VERSION

    @field_validator("protocol_version")
    @classmethod
    def _same_protocol(cls, version: int) -> int:
        if version != PROTOCOL_VERSION:
            raise ValueError(f"kv_transfer_params protocol version {version}, ours is "
                             f"{PROTOCOL_VERSION}")
        return version

    @classmethod
    def parse(cls, data: dict) -> KVTransferParams:
        """Validate our fields; keys vLLM itself adds on the way (e.g. cached-token counts)
        are annotations, not ours to reject. Params from a peer speaking another protocol
        version raise ValidationError (the scheduler half then prefills locally)."""
        ours = {k: v for k, v in data.items() if k in cls.model_fields}
        return cls.model_validate(ours, strict=False)


def _kind_of(raw: bytes) -> object:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data.get("kind")


def decode_message(raw: bytes) -> HandshakeRequest | AbortNotice:
    """Parse a request arriving at a side channel; raise ValueError if it is not one."""
    kind = _kind_of(raw)
    models: dict[str, type[HandshakeRequest] | type[AbortNotice]] = {
        "handshake": HandshakeRequest, "abort": AbortNotice}
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ValueError(f"unknown message kind {kind!r}"[:200])
    return model.model_validate_json(raw)


def decode_reply(raw: bytes) -> HandshakeReply | AbortNotice | ErrorReply:
    """Parse a side channel's reply; raise ValueError if it is not one."""
    kind = _kind_of(raw)
    models: dict[str, type[HandshakeReply] | type[AbortNotice] | type[ErrorReply]] = {
        "handshake_ok": HandshakeReply, "abort": AbortNotice, "error": ErrorReply}
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ValueError(f"unknown reply kind {kind!r}"[:200])
    return model.model_validate_json(raw)


def completion_notice(remote_request_id: str, count: int) -> bytes:
    """The notice a decode rank sends a prefill rank that expects ``count`` of them."""
    return f"{remote_request_id}:{count}".encode()


def parse_notice(raw: bytes) -> tuple[str, int]:
    """(request id, notices expected) of a completion notice; a bare id (or a count that is
    not a small positive number) counts as the only notice."""
    text = raw.decode(errors="replace")
    rid, sep, count = text.rpartition(":")
    if sep and count.isdigit() and 1 <= int(count) <= 1024:
        return rid, int(count)
    return text, 1

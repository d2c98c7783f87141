"""Typed records of the benchmark: what a workload asks for, what one request measured.

A workload is a list of :class:`RequestSpec` (prompts fixed before the run, so every system
under test gets byte-identical requests); the load generator turns each into one
:class:`RequestResult`, failed or not: a request is never dropped from the results.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)

Api = Literal["completions", "chat"]


class ChatMessage(BaseModel):
    """One message of an OpenAI chat request."""

    model_config = STRICT
    role: Literal["system", "user", "assistant"] = Field(description="Author of the message.")
    content: str = Field(description="Message text.")


class RequestSpec(BaseModel):
    """One request of a workload: what to send and what to expect back.

    Exactly one of ``prompt`` (``api="completions"``) or ``messages`` (``api="chat"``) is set.
    """

    model_config = STRICT
    request_id: str = Field(description="Unique within the workload.")
    api: Api = Field(description="Which OpenAI endpoint serves it.")
    prompt: str | None = Field(default=None, description="Prompt text for /v1/completions.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="Conversation for /v1/chat/completions."
    )
    max_tokens: int = Field(gt=0, description="Output tokens asked for (exact with ignore_eos).")
    prompt_tokens: int | None = Field(
        default=None, ge=0, description="Prompt length by the workload's tokenizer, if known."
    )
    depends_on: str | None = Field(
        default=None,
        description="request_id of an earlier request that must finish before this one is sent "
        "(the previous turn of the same conversation).",
    )
    group: str = Field(default="", description="Document or user this request belongs to.")

    @model_validator(mode="after")
    def _one_payload(self) -> RequestSpec:
        if self.api == "completions" and (self.prompt is None or self.messages is not None):
            raise ValueError("a completions request needs a prompt and no messages")
        if self.api == "chat" and (self.messages is None or self.prompt is not None):
            raise ValueError("a chat request needs messages and no prompt")
        return self


class RequestResult(BaseModel):
    """What one request measured. Times are seconds; ``start_s`` is relative to the run start.

    ``ok`` is False for any error (HTTP status, broken stream, no token, wrong token count);
    ``error`` then says why. Timing fields are kept for failed requests when they were seen.
    """

    model_config = ConfigDict(strict=True, extra="forbid")
    request_id: str
    ok: bool
    error: str | None = None
    start_s: float = Field(description="Send time, relative to the start of the run.")
    ttft_s: float | None = Field(default=None, description="Send to first token-bearing chunk.")
    itl_s: list[float] = Field(
        default_factory=list, description="Gaps between successive token-bearing chunks."
    )
    e2e_s: float | None = Field(default=None, description="Send to end of stream.")
    output_tokens: int = Field(
        default=0, description="Output tokens: server usage if reported, else token chunks."
    )
    output_chunks: int = Field(default=0, description="Token-bearing chunks received.")
    usage_output_tokens: int | None = Field(default=None, description="Server-reported usage.")
    prompt_tokens: int | None = Field(default=None, description="Server-reported prompt tokens.")
    expected_prompt_tokens: int | None = None
    expected_output_tokens: int
    group: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: first-to-last token / (output_tokens - 1).

        Unlike the per-chunk ``itl_s`` this stays right when one chunk carries several tokens.
        """
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return sum(self.itl_s) / (self.output_tokens - 1)

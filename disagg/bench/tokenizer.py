"""The prompt tokenizer workloads measure lengths with: the model's own, from its folder.

Counts follow what vLLM's OpenAI server does: a completions prompt is tokenized with the
tokenizer's special tokens (BOS if it adds one); a chat prompt is the chat template rendered
with ``add_generation_prompt=True`` and tokenized without adding special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from disagg.bench.records import ChatMessage


class PromptTokenizer(Protocol):
    """What workloads need from a tokenizer (tests use a whitespace fake)."""

    @property
    def has_chat_template(self) -> bool:
        """Whether chat prompts can be rendered (and so /v1/chat/completions served)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, no special tokens."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...

    def count_prompt(self, prompt: str) -> int:
        """Prompt tokens of a completions request with this prompt."""
        ...

    def count_chat(self, messages: list[ChatMessage]) -> int:
        """Prompt tokens of a chat request with these messages."""
        ...


class HfTokenizer:
    """A :class:`PromptTokenizer` over ``transformers.AutoTokenizer`` loaded from a folder."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy import: only when a real model is used

        self.path = Path(path)
        self._tok = AutoTokenizer.from_pretrained(str(path))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def count_prompt(self, prompt: str) -> int:
        return len(self._tok(prompt)["input_ids"])

    def count_chat(self, messages: list[ChatMessage]) -> int:
        text = self._tok.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return len(self._tok.encode(text, add_special_tokens=False))


class WhitespaceTokenizer:
    """A deterministic stand-in: one token per whitespace-separated word (tests, dry runs)."""

    def __init__(self, chat_template: bool = True) -> None:
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self._chat = chat_template

    @property
    def has_chat_template(self) -> bool:
        return self._chat

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self._vocab:
                self._vocab[word] = len(self._words)
                self._words.append(word)
            ids.append(self._vocab[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids)

    def count_prompt(self, prompt: str) -> int:
        return len(prompt.split())

    def count_chat(self, messages: list[ChatMessage]) -> int:
        return sum(2 + len(m.content.split()) for m in messages) + 1  # "<|role|>" ... + prompt

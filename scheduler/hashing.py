"""Block hashes of a request, computed in the gateway exactly as the instances compute them.

vLLM (0.32, default ``prefix_caching_hash_algo="sha256"``, PYTHONHASHSEED unset) hashes each
full block of ``block_size`` prompt tokens as

    h_i = sha256(pickle((h_{i-1} or NONE_HASH, tuple(tokens_i), extra_keys)))
    NONE_HASH = sha256(pickle("vllm-none-hash"))

and publishes it in KV events as the low 64 bits of the big-endian digest
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``). We recompute it here with hashlib instead of
importing vLLM (whose import costs the gateway ~0.6 GB and many seconds); the tests check
the two agree, both against ``vllm.v1.core.kv_cache_utils.hash_block_tokens`` and against
the events of a live instance. Requests with LoRA or multimodal inputs (non-empty extra
keys) are not hashed: the index then sees no hit, which only costs a routing hint.

Tokenization follows vLLM's OpenAI server: completions add special tokens (BOS here);
chat renders the model's chat template with ``add_generation_prompt`` and then tokenizes
without special tokens.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NONE_HASH_SEED = "vllm-none-hash"


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = _sha256(NONE_HASH_SEED)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained digests of every full block of ``token_ids`` (vLLM's internal form)."""
    out: list[bytes] = []
    parent = NONE_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _sha256((parent, tuple(token_ids[start:start + block_size]), None))
        out.append(parent)
    return out


def external(digest: bytes) -> int:
    """vLLM's event form of a block hash: the digest's low 64 bits, big-endian."""
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


def external_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    return [external(d) for d in block_hashes(token_ids, block_size)]


class RequestHasher:
    """Turns an OpenAI request body into prompt token ids and block hashes.

    ``tokenize`` returns None for requests it cannot tokenize the way the server will
    (batched prompts, multimodal content, unknown shapes); callers then route without
    cache information. Thread-safe (HF fast tokenizers are), so it can run off the loop.
    """

    def __init__(self, model_path: str | Path):
        from transformers import AutoTokenizer  # heavy: only when a gateway is built

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        # The Rust tokenizer behind a fast HF tokenizer: the same ids as calling the
        # tokenizer (no truncation or padding here), without ~80 us of Python per request.
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._backend is not None:  # ``ids`` is a new list each time
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def tokenize(self, path: str, body: dict[str, Any]) -> list[int] | None:
        if path.endswith("/chat/completions"):
            return self._chat(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            add = body.get("add_special_tokens", True)
            return self._encode(prompt, bool(add))
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        return None

    def _chat(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        flat = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return None
            content = m.get("content")
            if isinstance(content, list):  # OpenAI parts: text only, joined as vLLM does
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    return None
                content = "\n".join(str(p.get("text", "")) for p in content)
            if content is not None and not isinstance(content, str):
                return None
            flat.append({"role": m["role"], "content": content or ""})
        continue_final = bool(body.get("continue_final_message", False))
        try:
            text = self.tokenizer.apply_chat_template(
                flat, tokenize=False,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=continue_final)
        except Exception:  # no template / template error: the server will say so
            return None
        add = bool(body.get("add_special_tokens", False))
        return self._encode(text, add)

"""Chunk keys: the same tokens under the same KV format map to the same key everywhere.

A chunk is ``chunk_tokens`` consecutive tokens, a whole number of engine blocks. Its key
commits to every token from the start of the prompt to the chunk's end, and to everything
that changes the KV bytes (the fingerprint):

    root    = H("disagg-kv-root" || canonical JSON of the fingerprint || chunk_tokens)
    key_0   = H(root    || tokens[0 : C])              C = chunk_tokens, tokens as int64 LE
    key_i   = H(key_i-1 || tokens[i*C : (i+1)*C])

H is BLAKE2b-256 with a fixed personalisation. Nothing here depends on the process
(no ``hash()``, no dict order, no native byte order), so keys agree across processes and
hosts. Only full chunks get keys: a partial tail would change when the prompt grows.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

DEFAULT_CHUNK_TOKENS = 256
_PERSON = b"disagg-kv-v2"  # bump to invalidate every stored key after a format change
DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True, order=True)
class ChunkKey:
    """One chunk's 32-byte digest; hashable, ordered, and printable as hex."""

    digest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"a chunk key is {DIGEST_SIZE} bytes, got {len(self.digest)}")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        """Raises ValueError for text that is not 64 hex digits."""
        return cls(bytes.fromhex(text))

    def __repr__(self) -> str:
        return f"ChunkKey({self.hex[:16]}...)"


@dataclass(frozen=True, slots=True)
class KVFingerprint:
    """Everything that changes a chunk's bytes for the same tokens.

    ``model`` should identify the weights, not just a name (e.g. a path plus a revision or
    a config hash): two models under one name would otherwise share keys.
    """

    model: str
    dtype: str  # KV cache dtype, e.g. "bfloat16", "fp8_e4m3"
    layout: str  # KV layout name, e.g. disagg.kernels.KVLayout.CPU.value
    block_size: int
    # A chunk holds one KV head (of the model's ``num_heads``): the same bytes whatever TP
    # size the instance runs, so a chunk saved at one TP size loads at another.
    head: int = 0
    num_heads: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.head < self.num_heads:
            raise ValueError(f"head {self.head} outside [0, num_heads={self.num_heads})")

    def canonical(self) -> bytes:
        """Stable encoding: sorted-key JSON of the fields."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def chunk_tokens_for(block_size: int, target: int = DEFAULT_CHUNK_TOKENS) -> int:
    """``target`` rounded to the nearest whole number of blocks (at least one block)."""
    if block_size <= 0 or target <= 0:
        raise ValueError(f"block_size {block_size} and target {target} must be positive")
    return max(1, round(target / block_size)) * block_size


def root_key(fingerprint: KVFingerprint, chunk_tokens: int) -> ChunkKey:
    """The chain's starting point for this fingerprint and chunk size."""
    h = _hasher()
    h.update(b"disagg-kv-root")
    h.update(fingerprint.canonical())
    h.update(chunk_tokens.to_bytes(8, "little"))
    return ChunkKey(h.digest())


def chunk_keys(
    token_ids: Sequence[int], fingerprint: KVFingerprint, chunk_tokens: int
) -> list[ChunkKey]:
    """Keys of the full chunks of ``token_ids``, in order.

    The keys of a prefix are a prefix of the keys. Raises ValueError when ``chunk_tokens``
    is not a positive multiple of the fingerprint's block size, and OverflowError for a
    token id outside int64.
    """
    if chunk_tokens <= 0 or chunk_tokens % fingerprint.block_size:
        raise ValueError(f"chunk_tokens {chunk_tokens} is not a positive multiple of "
                         f"block_size {fingerprint.block_size}")
    tokens = array("q", token_ids)
    if sys.byteorder == "big":  # keys must not depend on the host: hash little-endian bytes
        tokens.byteswap()
    raw = memoryview(tokens).cast("B")
    step = chunk_tokens * tokens.itemsize
    prev = root_key(fingerprint, chunk_tokens).digest
    keys: list[ChunkKey] = []
    for start in range(0, len(tokens) // chunk_tokens * step, step):
        h = _hasher()
        h.update(prev)
        h.update(raw[start:start + step])
        prev = h.digest()
        keys.append(ChunkKey(prev))
    return keys


def _hasher():
    return hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON)

"""Chunk keys: deterministic across processes, chained over the prefix, fingerprinted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from disagg.transfer.store.keys import (
    ChunkKey,
    KVFingerprint,
    chunk_keys,
    chunk_tokens_for,
)

FP = KVFingerprint(model="tiny@abc123", dtype="bfloat16", layout="cpu", block_size=16,
                   head=0, num_heads=2)
C = 64
TOKENS = random.Random(7).choices(range(50_000), k=5 * C + 10)


def test_only_full_chunks_get_keys():
    assert len(chunk_keys(TOKENS, FP, C)) == 5
    assert chunk_keys(TOKENS[: C - 1], FP, C) == []
    assert len({k.digest for k in chunk_keys(TOKENS, FP, C)}) == 5


def test_keys_follow_the_documented_chain():
    """An independent implementation of the formula in keys.py's docstring."""

    def h(*parts: bytes) -> bytes:
        d = hashlib.blake2b(digest_size=32, person=b"disagg-kv-v2")
        for p in parts:
            d.update(p)
        return d.digest()

    fields = json.dumps(dataclasses.asdict(FP), sort_keys=True, separators=(",", ":"))
    prev = h(b"disagg-kv-root", fields.encode(), C.to_bytes(8, "little"))
    for i, key in enumerate(chunk_keys(TOKENS, FP, C)):
        raw = b"".join(t.to_bytes(8, "little", signed=True) for t in TOKENS[i * C:(i + 1) * C])
        prev = h(prev, raw)
        assert key.digest == prev


def test_same_keys_in_other_processes_with_other_hash_seeds():
    code = (
        "import sys; from disagg.transfer.store.keys import KVFingerprint, chunk_keys\n"
        f"fp = KVFingerprint(**{dataclasses.asdict(FP)!r})\n"
        f"print(hash('seed check'), *[k.hex for k in chunk_keys({TOKENS!r}, fp, {C})])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
        for seed in ("1", "2")
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    (hash1, *keys1), (hash2, *keys2) = outputs
    assert hash1 != hash2  # Python's own hash did change between the processes...
    assert keys1 == keys2 == [k.hex for k in chunk_keys(TOKENS, FP, C)]  # ...ours did not


def test_keys_of_a_prefix_are_a_prefix_of_the_keys():
    full = chunk_keys(TOKENS, FP, C)
    for cut in (0, C, C + 1, 3 * C - 1, 3 * C, len(TOKENS)):
        assert chunk_keys(TOKENS[:cut], FP, C) == full[: cut // C]


def test_a_changed_token_changes_its_chunk_and_every_later_one():
    changed = list(TOKENS)
    changed[2 * C + 5] += 1
    a, b = chunk_keys(TOKENS, FP, C), chunk_keys(changed, FP, C)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))


@pytest.mark.parametrize("change", [
    {"model": "tiny@def456"}, {"dtype": "float16"}, {"layout": "cuda"}, {"block_size": 32},
    {"head": 1}, {"num_heads": 4},
], ids=lambda c: "+".join(c))
def test_every_fingerprint_field_changes_every_key(change):
    a = chunk_keys(TOKENS, FP, C)
    b = chunk_keys(TOKENS, dataclasses.replace(FP, **change), C)
    assert len(a) == len(b) and not set(a) & set(b)


def test_chunk_size_is_part_of_the_key():
    a, b = chunk_keys(TOKENS, FP, C), chunk_keys(TOKENS, FP, 2 * C)
    assert not set(a) & set(b)


def test_chunk_size_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of"):
        chunk_keys(TOKENS, FP, C + 1)
    with pytest.raises(ValueError, match="multiple of"):
        chunk_keys(TOKENS, FP, 0)
    assert chunk_tokens_for(16) == 256
    assert chunk_tokens_for(128) == 256
    assert chunk_tokens_for(96) == 288  # 256 / 96 = 2.67 -> 3 blocks
    assert chunk_tokens_for(1024) == 1024  # never less than one block
    with pytest.raises(ValueError):
        chunk_tokens_for(0)


def test_fingerprint_and_key_validation():
    with pytest.raises(ValueError, match="head 2 outside"):
        KVFingerprint("m", "bfloat16", "cpu", 16, head=2, num_heads=2)
    with pytest.raises(ValueError, match="block_size"):
        KVFingerprint("m", "bfloat16", "cpu", 0)
    with pytest.raises(ValueError, match="32 bytes"):
        ChunkKey(b"short")
    key = chunk_keys(TOKENS, FP, C)[0]
    assert ChunkKey.from_hex(key.hex) == key and hash(ChunkKey(key.digest)) == hash(key)
    with pytest.raises(OverflowError):
        chunk_keys([2**63] * C, FP, C)

"""The KV store end to end, on real vLLM instances.

- Reuse across instances: a prompt prefilled on instance X is served by instance Y from the
  store (through a shared disk tier, and through Redis) without recomputing its chunks.
- Fallback: the prefill instance dies holding a request's KV; the decoder loads the stored
  chunks from the store, recomputes only the rest, and answers exactly as before.
"""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from tests.integration.helpers import (
    complete,
    engine_headers,
    scrape,
    token_prompts,
    wait_counter,
)

pytestmark = pytest.mark.integration

CHUNK = 256
ENGINE = {"dtype": "bfloat16", "max_model_len": 4096, "kv_cache_gib": 1, "enforce_eager": True}


def _sources(url: str) -> dict[str, float]:
    return {s: scrape(url, "vllm:prompt_tokens_by_source", source=s)
            for s in ("local_compute", "external_kv_transfer", "local_cache_hit")}


def _reuse_across_instances(dep, tier: str) -> None:
    """decode-0 (X) computes a prompt and saves it; decode-1 (Y) serves it from the store."""
    prompt = token_prompts(1, (7 * CHUNK + 50, 7 * CHUNK + 50), vocab=16000, seed=3)[0]
    x, y = (dep.instances[k].url for k in ("decode-0", "decode-1"))
    want = complete(x, "tiny", prompt, 16, stream=False)  # X computes and saves
    wait_counter(x, "vllm:disagg_store_saved_chunks", 7)
    time.sleep(1)  # X's write-through to the shared tier runs behind its CPU tier
    _gateway_indexes_the_store(dep, tier, 7 * CHUNK)
    before = _sources(y)
    assert complete(y, "tiny", prompt, 16, stream=False) == want
    assert wait_counter(y, "vllm:disagg_store_loaded_tokens", 7 * CHUNK) == 7 * CHUNK
    after = _sources(y)
    # Y computed only what follows the stored chunks (50 tokens), not the 1,792 stored.
    assert after["local_compute"] - before["local_compute"] <= 50
    assert after["external_kv_transfer"] - before["external_kv_transfer"] >= 7 * CHUNK
    assert scrape(y, f"vllm:disagg_store_{tier}_load_hits") >= 7


def _gateway_indexes_the_store(dep, tier: str, tokens: int) -> None:
    """X's save reached the gateway's prefix index (as KV events) under the shared tier's
    name, so every instance on the host is credited with loading those blocks."""
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(dep.url + "/v1/disagg/status", timeout=10).json()
        stored = status["index"]["store_blocks"]
        held = sum(n for k, n in stored.items() if k.startswith(f"store:{tier}"))
        if held * status["block_size"] >= tokens:
            return
        assert time.monotonic() < deadline, f"store blocks in the index: {stored}"
        time.sleep(0.5)


def _fallback_when_the_prefill_dies(dep) -> None:
    """The prefill instance dies holding a request's KV; the decoder loads the stored
    chunks from the store, recomputes only the rest, and answers exactly as before."""
    prompt = token_prompts(1, (5 * CHUNK + 90, 5 * CHUNK + 90), vocab=16000, seed=4)[0]
    p, d = dep.instances["prefill-0"].url, dep.instances["decode-0"].url
    want = complete(p, "tiny", prompt, 16, stream=False)  # reference; P saves chunks
    wait_counter(p, "vllm:disagg_store_saved_chunks", 5)
    # The prefill hop as the gateway makes it: P keeps the KV for a decoder to pull...
    hop = httpx.post(p + "/v1/completions", timeout=120, headers=engine_headers(), json={
        "model": "tiny", "prompt": prompt, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}}).json()
    params = hop["kv_transfer_params"]
    # ...and dies before the decoder pulls (no restart: its side channel stays dead).
    ray.kill(dep.actor("prefill-0"), no_restart=True)
    time.sleep(2)
    before = _sources(d)
    r = httpx.post(d + "/v1/completions", timeout=120, headers=engine_headers(), json={
        "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "kv_transfer_params": params})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == want
    assert wait_counter(d, "vllm:disagg_store_fallbacks", 1) == 1
    assert scrape(d, "vllm:disagg_kv_transfer_failures") >= 1
    assert wait_counter(d, "vllm:disagg_store_loaded_tokens", 5 * CHUNK) >= 5 * CHUNK
    after = _sources(d)
    assert after["local_compute"] - before["local_compute"] <= 90  # only the tail


def _topology(store: dict, prefill: int = 1) -> dict:
    third = {"resources": {"num_cpus": 0.5}}
    return {"model": "tiny", "engine": ENGINE, "prefill": {"replicas": prefill, **third},
            "decode": {"replicas": 2, **third}, "store": store,
            "transfer": {"handshake_timeout_s": 3, "transfer_timeout_s": 10}}


def test_store_through_disk_reuse_and_fallback(tmp_path):
    from disagg.launch.api import launch

    with launch(_topology({"disk_path": str(tmp_path / "kv")})) as dep:
        _reuse_across_instances(dep, "disk")
        _fallback_when_the_prefill_dies(dep)


def test_store_through_redis_reuse(redis_url):
    from disagg.launch.api import launch

    with launch(_topology({"redis_url": redis_url}, prefill=0)) as dep:
        _reuse_across_instances(dep, "redis")

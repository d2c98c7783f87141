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
from helpers import complete, scrape, token_prompts

pytestmark = pytest.mark.integration

CHUNK = 256
ENGINE = {"dtype": "bfloat16", "max_model_len": 4096, "kv_cache_gib": 1, "enforce_eager": True}


def _wait_counter(url: str, name: str, at_least: float, timeout: float = 30.0) -> float:
    """vLLM publishes connector counters on its stats tick: poll until one reaches a value."""
    deadline = time.monotonic() + timeout
    while (value := scrape(url, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} stuck at {value} < {at_least} on {url}"
        time.sleep(0.5)
    return value


def _sources(url: str) -> dict[str, float]:
    return {s: scrape(url, "vllm:prompt_tokens_by_source", source=s)
            for s in ("local_compute", "external_kv_transfer", "local_cache_hit")}


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_prompt_prefilled_on_x_is_served_from_the_store_on_y(tier, tmp_path, request):
    from disagg.launch.api import launch

    store = {"disk_path": str(tmp_path / "kv")} if tier == "disk" else \
        {"redis_url": request.getfixturevalue("redis_url")}
    half = {"replicas": 2, "resources": {"num_cpus": 0.5}}
    topo = {"model": "tiny", "engine": ENGINE, "prefill": {"replicas": 0}, "decode": half,
            "store": store}
    prompt = token_prompts(1, (7 * CHUNK + 50, 7 * CHUNK + 50), vocab=16000, seed=3)[0]
    with launch(topo) as dep:
        x, y = (dep.instances[k].url for k in ("decode-0", "decode-1"))
        want = complete(x, "tiny", prompt, 16, stream=False)  # X computes and saves
        _wait_counter(x, "vllm:disagg_store_saved_chunks", 7)
        time.sleep(1)  # X's write-through to the shared tier runs behind its CPU tier
        before = _sources(y)
        got = complete(y, "tiny", prompt, 16, stream=False)
        assert got == want
        loaded = _wait_counter(y, "vllm:disagg_store_loaded_tokens", 7 * CHUNK)
        assert loaded == 7 * CHUNK
        after = _sources(y)
        # Y computed only what follows the stored chunks (50 tokens), not the 1,792 stored.
        assert after["local_compute"] - before["local_compute"] <= 50
        assert after["external_kv_transfer"] - before["external_kv_transfer"] >= 7 * CHUNK
        assert scrape(y, f"vllm:disagg_store_{tier}_load_hits") >= 7


def test_decoder_falls_back_to_the_store_when_the_prefill_instance_dies(tmp_path):
    from disagg.launch.api import launch

    topo = {"model": "tiny", "engine": ENGINE, "store": {"disk_path": str(tmp_path / "kv")},
            "transfer": {"handshake_timeout_s": 3, "transfer_timeout_s": 10}}
    prompt = token_prompts(1, (5 * CHUNK + 90, 5 * CHUNK + 90), vocab=16000, seed=4)[0]
    with launch(topo) as dep:
        p, d = dep.instances["prefill-0"].url, dep.instances["decode-0"].url
        want = complete(p, "tiny", prompt, 16, stream=False)  # reference; P saves chunks
        _wait_counter(p, "vllm:disagg_store_saved_chunks", 5)
        # The prefill hop as the gateway makes it: P keeps the KV for a decoder to pull...
        hop = httpx.post(p + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}).json()
        params = hop["kv_transfer_params"]
        # ...and dies before the decoder pulls (no restart: its side channel stays dead).
        ray.kill(dep.actor("prefill-0"), no_restart=True)
        time.sleep(2)
        before = _sources(d)
        r = httpx.post(d + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "kv_transfer_params": params})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want
        assert _wait_counter(d, "vllm:disagg_store_fallbacks", 1) == 1
        assert scrape(d, "vllm:disagg_kv_transfer_failures") >= 1
        assert _wait_counter(d, "vllm:disagg_store_loaded_tokens", 5 * CHUNK) == 5 * CHUNK
        after = _sources(d)
        assert after["local_compute"] - before["local_compute"] <= 90  # only the tail

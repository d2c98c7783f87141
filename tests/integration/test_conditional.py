"""Conditional disaggregation on a 1P1D deployment with the default threshold, and the
gateway's block hashes agreeing with what the instances report in their KV events."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from helpers import scrape

from disagg.scheduler.hashing import external_block_hashes

pytestmark = pytest.mark.integration

THRESHOLD = 256


@pytest.fixture(scope="module")
def dep():
    from disagg.launch.api import launch

    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 4096,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            "scheduler": {"min_remote_prefill_tokens": THRESHOLD}}
    with launch(topo) as d:
        yield d


def _decisions(d, path: str, reason: str) -> float:
    return scrape(d.url, "disagg_decisions", path=path, reason=reason)


def _post(d, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(d.url + path, json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                       **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _decoder(d):
    return next(i for i in d.instances.values() if i.role == "decode")


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_gateway_hashes_agree_with_instance_events(dep):
    """Random prompts of every request shape: each full block the gateway hashes is one
    the instance that computed it reported in its KV events."""
    gw = dep._gateway
    rng = random.Random(11)
    words = ["cache", "prefill", "decode", "block", "token", "hash", "GPU", "Ray", "é", "的"]
    cases = []
    for i in range(6):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(300, 900)))
        cases.append(("/v1/completions", {"prompt": text}))
        ids = [rng.randrange(5, 16000) for _ in range(rng.randrange(300, 700))]
        cases.append(("/v1/completions", {"prompt": ids}))
        msgs = [{"role": "system", "content": f"rule {i}"},
                {"role": "user", "content": text[: rng.randrange(500, 3000)]}]
        cases.append(("/v1/chat/completions", {"messages": msgs}))
    for path, body in cases:
        _post(dep, body, path)
    _wait_for(lambda: gw.block_size, "no KV event reached the gateway")
    holders = [i.engine_id for i in dep.instances.values()]
    checked = 0
    for path, body in cases:
        tokens = gw.hasher.tokenize(path, {"model": "tiny", **body})
        hashes = external_block_hashes(tokens[:-1], gw.block_size)
        assert hashes, "every case spans at least one full block"

        def held(hashes=hashes):
            return max(gw.index.match(e, hashes) for e in holders) == len(hashes)
        _wait_for(held, f"gateway hashes of a {path} request not in the index")
        checked += len(hashes)
    assert checked >= 18


def test_short_and_cached_prompts_skip_the_prefill_hop(dep):
    dec = _decoder(dep)
    rng = random.Random(5)
    doc = [rng.randrange(5, 16000) for _ in range(1500)]
    remote0 = _decisions(dep, "remote", "long_uncached")
    pulls0 = scrape(dec.url, "vllm:disagg_kv_transfers_received")
    _post(dep, {"prompt": doc + [7, 8, 9]})  # a new document: through the prefill instance
    assert _decisions(dep, "remote", "long_uncached") == remote0 + 1
    _wait_for(lambda: scrape(dec.url, "vllm:disagg_kv_transfers_received") >= pulls0 + 1,
              "the decoder pulled no KV")
    # The decoder now holds the document's blocks (it loaded them); wait for its events.
    gw = dep._gateway
    doc_hashes = external_block_hashes(doc, gw.block_size)
    _wait_for(lambda: gw.index.match(dec.engine_id, doc_hashes) == len(doc_hashes),
              "decoder's loaded blocks not in the index")

    short0 = _decisions(dep, "local", "short_uncached")
    pulls1 = scrape(dec.url, "vllm:disagg_kv_transfers_received")
    for q in range(3):  # same document, new questions: only the tail is uncached
        _post(dep, {"prompt": doc + [100 + q] * 40})
    _post(dep, {"prompt": "a short question"})  # short: never worth a hop
    assert _decisions(dep, "local", "short_uncached") == short0 + 4
    time.sleep(2)  # connector counters are published on vLLM's stats tick
    assert scrape(dec.url, "vllm:disagg_kv_transfers_received") == pulls1

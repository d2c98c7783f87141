"""Two gateway workers (api.workers: 2) in front of two real `tiny` decoders: greedy outputs
through either worker (and the shared port) are token-identical to the engine's own, both
workers serve, each routes by the KV events it follows (a prefix placed through worker 0 is
found by worker 1), and status, metrics and scaling stay meaningful per worker."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.helpers import complete, scrape, token_prompts

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def dep():
    from disagg.launch.api import launch

    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            "prefill": {"replicas": 0}, "decode": {"replicas": 2},
            "api": {"workers": 2}}
    with launch(topo) as d:
        yield d


def _urls(dep) -> list[str]:
    return [w["url"] for w in dep.status()["workers"]]


def _status(url: str) -> dict:
    return httpx.get(url + "/v1/disagg/status", timeout=30).json()


def test_two_worker_processes_each_with_its_own_address(dep):
    workers = dep.status()["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert len({w["pid"] for w in workers}) == 2
    for w in workers:
        assert _status(w["url"])["worker"]["index"] == w["index"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_greedy_outputs_through_each_worker_match_the_engine(dep, stream):
    engine = dep.instances["decode-0"].url
    prompts = token_prompts(6, (1, 1500), vocab=16000, seed=3)
    for prompt in prompts:
        want = complete(engine, "tiny", prompt, MAX_TOKENS, stream=stream)
        for url in [*_urls(dep), dep.url]:
            assert complete(url, "tiny", prompt, MAX_TOKENS, stream=stream) == want, url


def test_both_workers_serve_the_shared_port(dep):
    _spread_over_workers(dep, "hello")


def _spread_over_workers(dep, text: str) -> None:
    """30 requests to the shared port, a connection each: the kernel spreads them over the
    workers, and every worker serves some."""
    urls = _urls(dep)
    before = [scrape(u, "disagg_requests") for u in urls]
    for i in range(30):
        r = httpx.post(dep.url + "/v1/completions", timeout=120,
                       headers={"Connection": "close"},
                       json={"model": "tiny", "prompt": f"{text} {i}", "max_tokens": 2})
        assert r.status_code == 200, r.text
    served = [scrape(u, "disagg_requests") - b for u, b in zip(urls, before, strict=True)]
    assert sum(served) == 30 and all(n > 0 for n in served), served


def _last_decision(url: str) -> dict:
    return _status(url)["recent_decisions"][-1]


def test_worker_1_routes_to_where_worker_0_left_a_prefix(dep):
    """Worker 1 never saw these prompts: it knows where their blocks are only from the
    engines' KV events, and must send each extension to that decoder with its hit."""
    w0, w1 = _urls(dep)
    for prompt in token_prompts(4, (700, 900), vocab=16000, seed=11):
        complete(w0, "tiny", prompt, 2, stream=False)
        placed = _last_decision(w0)["decode"]
        engine_id = dep.instances[placed].engine_id
        deadline = time.monotonic() + 30
        while not next(i["indexed_blocks"] for i in _status(w1)["instances"]
                       if i["engine_id"] == engine_id):
            assert time.monotonic() < deadline, "worker 1 never indexed the blocks"
            time.sleep(0.2)
        complete(w1, "tiny", prompt + [42] * 50, 2, stream=False)
        routed = _last_decision(w1)
        assert routed["decode"] == placed, routed
        assert routed["decoder_cached_tokens"] >= 512, routed


def test_scale_on_a_worker_is_forwarded_to_the_launcher(dep):
    _, w1 = _urls(dep)
    r = httpx.post(w1 + "/v1/disagg/scale", json={"decode": 0}, timeout=60)
    assert r.status_code == 400 and "decode must be at least 1" in r.text, r.text


def test_worker_1_finds_instances_by_their_actors(dep):
    """How a worker follows an instance Ray or its watchdog restarted: its actor, by name."""
    import asyncio

    import ray

    worker = ray.get_actor(f"{dep.name}-gateway-1")
    for key, info in dep.instances.items():
        found = ray.get(worker.__ray_call__.remote(
            lambda self, k=key: asyncio.run(self._locate(k))), timeout=30)
        assert found is not None and found.engine_id == info.engine_id


def test_membership_changes_reach_every_worker(dep):
    """What scaling does to the workers (join, drain, leave), without starting an engine:
    an existing engine joins again under a second key."""
    _, w1 = _urls(dep)
    info = dep.instances["decode-1"]

    def keys() -> dict[str, bool]:
        return {i["key"]: i["draining"] for i in _status(w1)["instances"]}

    dep._workers.add_instance("decode-9", info)
    assert keys().get("decode-9") is False
    dep._workers.set_draining("decode-9")
    assert keys()["decode-9"] is True
    assert dep._workers.inflight(["decode-9"]) == 0
    dep._workers.remove_instance("decode-9")
    assert "decode-9" not in keys()


def test_a_worker_whose_process_dies_is_restarted_and_serves_again(dep):
    """Last in this module: it kills worker 1's process. Ray restarts the worker, which
    finds the instances by their actors and takes its share of the shared port again."""
    import os
    import signal

    old = dep.status()["workers"][1]
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        workers = dep._workers.status()
        new = workers[0]["worker"]
        if "pid" in new and new["pid"] != old["pid"]:
            break
        assert time.monotonic() < deadline, f"worker 1 not back: {new}"
        time.sleep(0.5)
    w1 = new["url"]
    assert {i["key"] for i in _status(w1)["instances"]} == set(dep.instances)
    engine = dep.instances["decode-0"].url
    prompt = token_prompts(1, (200, 300), vocab=16000, seed=5)[0]
    want = complete(engine, "tiny", prompt, MAX_TOKENS, stream=False)
    assert complete(w1, "tiny", prompt, MAX_TOKENS, stream=False) == want
    _spread_over_workers(dep, "again")

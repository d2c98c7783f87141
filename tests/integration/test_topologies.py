"""2P1D and 1P2D serve 16 concurrent requests correctly (same greedy output as serially)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.helpers import scrape

pytestmark = pytest.mark.integration

EXAMPLES = {"2p1d": {"prefill": {"replicas": 2, "resources": {"num_cpus": 0.5}},
                     "decode": {"replicas": 1},
                     "scheduler": {"prefill_policy": "round_robin"}},
            "1p2d": {"prefill": {"replicas": 1},
                     "decode": {"replicas": 2, "resources": {"num_cpus": 0.5}},
                     "scheduler": {"decode_policy": "round_robin"}}}


def _body(i: int) -> dict:
    return {"model": "tiny", "prompt": [50 + i] * (200 + 41 * i), "max_tokens": 16,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}


async def _all(url: str, n: int) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=600) as client:
        rs = await asyncio.gather(*(client.post(url + "/v1/completions", json=_body(i))
                                    for i in range(n)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json()["choices"][0]["token_ids"] for r in rs]


@pytest.mark.parametrize("shape", ["2p1d", "1p2d"])
def test_concurrent_requests(shape):
    from disagg.launch.api import launch

    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            **EXAMPLES[shape]}
    topo["scheduler"] = {**topo.get("scheduler", {}), "min_remote_prefill_tokens": 0}
    with launch(topo) as dep:
        n = 16
        got = asyncio.run(_all(dep.url, n))
        serial = [httpx.post(dep.url + "/v1/completions", json=_body(i), timeout=300)
                  .json()["choices"][0]["token_ids"] for i in range(n)]
        assert got == serial and all(len(g) == 16 for g in got)
        # Every instance took part, and the decoders pulled KV for the prompts.
        routed = httpx.get(dep.url + "/metrics").text
        for key in dep.instances:
            assert f'instance="{key}"' in routed
        decoders = [i.url for i in dep.instances.values() if i.role == "decode"]
        assert sum(scrape(u, "vllm:disagg_kv_transfers_received") for u in decoders) >= n

"""Prefill and decode at different TP sizes, end to end, token-identical to plain vLLM.

float32 greedy outputs of 30 prompts through (P2, D1) and (P1, D2) deployments must equal
plain vLLM's at the decoder's TP size; the decoder's counters must show the KV arrived over
NIXL. (P2, D1) is the issue's YAML, asked through the official OpenAI client. The two
deployments share one disk store, so (P1, D2) loads chunks the (P2, D1) deployment's TP-2
and TP-1 instances saved: the chunk format does not depend on TP.
"""

from __future__ import annotations

import pytest

from tests.integration.helpers import complete, plain_vllm, scrape, token_prompts

pytestmark = pytest.mark.integration

MAX_TOKENS = 16
NUM_PROMPTS = 30
ENGINE = {"dtype": "float32", "max_model_len": 4096, "kv_cache_gib": 1, "enforce_eager": True,
          "max_num_seqs": 16}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return token_prompts(NUM_PROMPTS, (1, 1500), vocab=16000, seed=13)


@pytest.fixture(scope="module")
def reference(prompts, tiny_model, tmp_path_factory) -> dict[int, list[list[int]]]:
    """Plain vLLM's greedy outputs at TP 1 and TP 2."""
    out = {}
    for tp, cores in ((1, "0-1"), (2, "0|1")):
        engine = {**ENGINE, "served_model_name": "tiny", "tensor_parallel_size": tp}
        log = tmp_path_factory.mktemp("plain") / f"vllm-tp{tp}.log"
        with plain_vllm(tiny_model, engine, cores=cores, log=log) as url:
            out[tp] = [complete(url, "tiny", p, MAX_TOKENS, stream=False) for p in prompts]
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tp-store"))


def _topology(p: int, d: int, store_dir: str) -> dict:
    return {"model": "tiny", "engine": ENGINE,
            "prefill": {"replicas": 1, "tensor_parallel_size": p,
                        "resources": {"num_cpus": 1}},
            "decode": {"replicas": 1, "tensor_parallel_size": d,
                       "resources": {"num_cpus": 1}},
            "scheduler": {"min_remote_prefill_tokens": 0},
            "store": {"disk_path": store_dir}}


def _url(dep, role: str) -> str:
    return next(i["url"] for i in dep.status()["instances"] if i["role"] == role)


def _openai_ids(base_url: str, prompt: list[int]) -> list[int]:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300)
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    return list(out.choices[0].model_dump()["token_ids"])


def _mismatches(got: list[list[int]], want: list[list[int]], prompts) -> list:
    return [(i, len(p), w[:6], g[:6])
            for i, (p, w, g) in enumerate(zip(prompts, want, got, strict=True)) if g != w]


def test_p2_d1_through_the_openai_client_matches_plain_vllm_tp1(prompts, reference,
                                                                store_dir):
    from disagg.launch.api import launch

    with launch(_topology(2, 1, store_dir)) as dep:
        dec = _url(dep, "decode")
        got = [_openai_ids(dep.url, p) for p in prompts]
        assert not _mismatches(got, reference[1], prompts)
        assert scrape(dec, "vllm:disagg_kv_transfers_received") >= NUM_PROMPTS - 1
        # the decoder computed one token per request; the rest arrived
        assert scrape(dec, "vllm:prompt_tokens_by_source", source="external_kv_transfer") > 0


def test_p1_d2_matches_plain_vllm_tp2_and_loads_chunks_saved_at_other_tp(
        prompts, reference, store_dir):
    from disagg.launch.api import launch

    with launch(_topology(1, 2, store_dir)) as dep:
        dec, pre = _url(dep, "decode"), _url(dep, "prefill")
        got = [complete(dep.url, "tiny", p, MAX_TOKENS, stream=False) for p in prompts]
        assert not _mismatches(got, reference[2], prompts)
        assert scrape(dec, "vllm:disagg_kv_transfers_received") >= NUM_PROMPTS - 1
        # the prefill found the prompts' chunks in the disk store (written by the TP-2 and
        # TP-1 instances of the previous deployment) and loaded them instead of computing
        assert scrape(pre, "vllm:disagg_store_loaded_tokens") > 0

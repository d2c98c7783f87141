"""1P1D through the gateway is token-identical to one plain vLLM, and really transfers KV.

For each dtype: a plain vLLM instance with the same engine arguments answers 30 greedy
prompts of 1 to 3,000 tokens (completions, as token ids) and chat prompts; then a disagg
1P1D deployment answers the same, streamed and not. The decoder's counters must show the
prompt KV arrived over NIXL (bytes, external tokens) and that it computed only the one
token vLLM always recomputes per request.
"""

from __future__ import annotations

import pytest

from tests.integration.helpers import complete, plain_vllm, scrape, token_prompts

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
NUM_PROMPTS = 30


def _engine(dtype: str) -> dict:
    return {"dtype": dtype, "max_model_len": 4096, "kv_cache_gib": 2, "enforce_eager": True,
            "max_num_seqs": 16}


def _chats() -> list[list[dict]]:
    topics = ["the ocean", "prefill and decode", "a long history of bread", "GPU kernels"]
    return [[{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": f"Tell me about {t}. " * (1 + 40 * i)}]
            for i, t in enumerate(topics)]


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def reference(request, tiny_model, tmp_path_factory):
    """Greedy outputs of a plain vLLM (same model and engine args) for every case."""
    dtype = request.param
    engine = {**_engine(dtype), "served_model_name": "tiny"}
    prompts = token_prompts(NUM_PROMPTS, (1, 3000), vocab=16000, seed=7)
    chats = _chats()
    log = tmp_path_factory.mktemp("plain") / f"vllm-{dtype}.log"
    with plain_vllm(tiny_model, engine, log=log) as url:
        comp = [complete(url, "tiny", p, MAX_TOKENS, stream=False) for p in prompts]
        chat = [complete(url, "tiny", c, MAX_TOKENS, stream=False, chat=True) for c in chats]
    return dtype, prompts, comp, chats, chat


@pytest.fixture(scope="module")
def deployment(reference):
    from disagg.launch.api import launch

    dtype = reference[0]
    topo = {"model": "tiny", "engine": _engine(dtype),
            "prefill": {"replicas": 1}, "decode": {"replicas": 1},
            "scheduler": {"min_remote_prefill_tokens": 0}}  # every prompt over NIXL
    with launch(topo) as dep:
        yield dep


def _decoder_url(dep) -> str:
    return next(i["url"] for i in dep.status()["instances"] if i["role"] == "decode")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completions_token_identical(reference, deployment, stream):
    _, prompts, expected, _, _ = reference
    dec = _decoder_url(deployment)
    before = {k: scrape(dec, f"vllm:{k}") for k in ("disagg_kv_bytes_received",
                                                     "disagg_kv_transfers_received")}
    ext0 = scrape(dec, "vllm:prompt_tokens_by_source", source="external_kv_transfer")
    local0 = scrape(dec, "vllm:prompt_tokens_by_source", source="local_compute")
    cold = not stream  # the json variant runs first, on empty prefix caches
    mismatches = []
    for i, (prompt, want) in enumerate(zip(prompts, expected, strict=True)):
        got = complete(deployment.url, "tiny", prompt, MAX_TOKENS, stream=stream)
        if got != want:
            mismatches.append((i, len(prompt), want[:8], got[:8]))
    assert not mismatches, f"{len(mismatches)} prompts differ: {mismatches}"
    if not cold:  # the decoder's own prefix cache now holds most of these prompts
        assert scrape(dec, "vllm:disagg_kv_transfers_received") > before[
            "disagg_kv_transfers_received"]
        return
    # Every multi-token prompt's KV came over NIXL; the decoder computed one token each.
    transferred = [p for p in prompts if len(p) > 1]
    assert scrape(dec, "vllm:disagg_kv_transfers_received") - before[
        "disagg_kv_transfers_received"] >= len(transferred)
    assert scrape(dec, "vllm:disagg_kv_bytes_received") > before["disagg_kv_bytes_received"]
    ext = scrape(dec, "vllm:prompt_tokens_by_source", source="external_kv_transfer") - ext0
    local = scrape(dec, "vllm:prompt_tokens_by_source", source="local_compute") - local0
    assert ext >= sum(len(p) - 1 for p in transferred)
    assert local <= len(prompts)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_chat_token_identical(reference, deployment, stream):
    _, _, _, chats, expected = reference
    for chat, want in zip(chats, expected, strict=True):
        assert complete(deployment.url, "tiny", chat, MAX_TOKENS, stream=stream,
                        chat=True) == want

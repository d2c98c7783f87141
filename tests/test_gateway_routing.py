"""The gateway's hop decision under kv_aware, through a real Gateway over HTTP in front of
fake engines: with ``scheduler.local_prefill_when_hop_slower`` a decoder computes a long
prompt itself (reason ``hop_slower``, no prefill hop) when the learned rates and queues make
the hop slower, and takes the hop otherwise; without it, long prompts always hop."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gateway_stack import stack

PROMPT = "the quick brown fox " * 20  # ~80 tokens: past the stack's 32-token hop threshold


def _learned(s, key: str, rate: float) -> None:
    """As if ``key``'s metrics had shown ``rate`` prompt tokens/s (the fakes report none,
    so the meter keeps it across polls)."""
    member = s.gateway.pool.members[key]
    member.prefill_meter.rate = member.candidate.prefill_rate = rate


@pytest.mark.parametrize(("allowed", "decode_rate", "prefill_rate", "queued", "reason", "hops"), [
    (True, 1e6, 10.0, 0, "hop_slower", 0),  # 8 s on the prefill instance, 0.1 ms here
    (True, 10.0, 1e6, 0, "long_uncached", 1),  # the other way round: the hop
    (True, 1e3, 1e3, 0, "long_uncached", 1),  # as fast: a tie goes to the hop
    (True, 1e3, 1e3, 800, "hop_slower", 0),  # as fast, but the prefill instance is queued
    (False, 1e6, 10.0, 800, "long_uncached", 1),  # the default: long prompts always hop
])
def test_kv_aware_keeps_a_prompt_on_the_decoder_only_when_the_hop_is_slower(
        tiny_model: Path, allowed, decode_rate, prefill_rate, queued, reason, hops):
    with stack(tiny_model, local_when_slower=allowed) as s:
        _learned(s, "decode-0", decode_rate)
        _learned(s, "prefill-0", prefill_rate)
        # Another client's prompt in flight there (the gateway counts what it sent).
        s.gateway.pool.members["prefill-0"].candidate.pending_tokens = queued
        r = s.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert s.metric("disagg_decisions", reason=reason) == 1
        assert len(s.prefill.received) == hops
        sent = s.decode.received[-1]
        assert ("kv_transfer_params" in sent) == bool(hops)

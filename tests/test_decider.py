"""Conditional disaggregation decisions."""

from disagg.scheduler import Candidate, RequestInfo
from disagg.scheduler.decider import PrefillDecider


def _prefill(*queues):
    return [Candidate(f"p{i}", "u", inflight=q) for i, q in enumerate(queues)]


def test_short_or_cached_prompts_skip_the_hop():
    d = PrefillDecider(min_uncached_tokens=256, max_prefill_queue=4)
    info = RequestInfo("r", prompt_tokens=1500, cached_tokens={"d0": 1408})
    assert d.decide(info.uncached_tokens("d0"), _prefill(0)).reason == "short_uncached"
    assert d.decide(info.uncached_tokens("d1"), _prefill(0)).remote  # d1 holds nothing
    assert d.decide(100, _prefill(0)).reason == "short_uncached"


def test_saturated_or_missing_prefill_pool_goes_local():
    d = PrefillDecider(min_uncached_tokens=256, max_prefill_queue=4)
    assert d.decide(2000, _prefill(4, 5)).reason == "prefill_saturated"
    assert d.decide(2000, _prefill(4, 1)).remote
    assert d.decide(2000, []).reason == "no_prefill_instance"
    busy = Candidate("p", "u", inflight=0, running=2, waiting=3)  # other clients' load
    assert d.decide(2000, [busy]).reason == "prefill_saturated"
    # The gateway's prefill queue holds what the instances would otherwise queue: two
    # instances running one hop each, 6 waiting at the gateway: 1 + 3 each, saturated.
    assert d.decide(2000, _prefill(1, 1), queued=5).remote
    assert d.decide(2000, _prefill(1, 1), queued=6).reason == "prefill_saturated"


def test_unknown_length_and_always_remote():
    assert PrefillDecider(256).decide(None, _prefill(0)).reason == "unknown_length"
    always = PrefillDecider(0)
    assert always.decide(3, _prefill(100)).reason == "always_remote"
    assert always.decide(3, []).reason == "no_prefill_instance"

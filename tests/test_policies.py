"""Pairing policies: round-robin cycles; least-loaded follows load and spreads ties."""

from collections import Counter

import pytest

from disagg.scheduler import Candidate, RequestInfo, make_policy


def _cands(n):
    return [Candidate(f"e{i}", f"http://h:{i}") for i in range(n)]


def test_round_robin_cycles():
    rr, cands = make_policy("round_robin"), _cands(3)
    picks = [rr.choose(cands, RequestInfo(str(i))).engine_id for i in range(6)]
    assert picks == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_least_loaded_prefers_fewest_inflight_then_waiting():
    ll, cands = make_policy("least_loaded"), _cands(3)
    cands[0].inflight, cands[1].inflight, cands[2].inflight = 3, 1, 1
    cands[1].waiting = 2
    assert ll.choose(cands, RequestInfo("r")).engine_id == "e2"


def test_least_loaded_spreads_equal_load():
    ll, cands = make_policy("least_loaded"), _cands(4)
    counts = Counter(ll.choose(cands, RequestInfo(str(i))).engine_id for i in range(400))
    assert set(counts) == {"e0", "e1", "e2", "e3"} and max(counts.values()) == 100


def test_unknown_policy():
    with pytest.raises(ValueError, match="known"):
        make_policy("random")

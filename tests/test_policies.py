"""Pairing policies: round-robin cycles; least-loaded follows load and spreads ties."""

from collections import Counter

import pytest
from pydantic import ValidationError

from disagg.launch.topology import TopologyError, parse_topology
from disagg.scheduler import Candidate, RequestInfo, make_policy, policy_names


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


def test_kv_aware_prefers_the_instance_holding_the_prefix():
    kv, cands = make_policy("kv_aware"), _cands(3)
    info = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e1": 1792})
    assert all(kv.choose(cands, info).engine_id == "e1" for _ in range(6))


def test_kv_aware_spills_a_hot_prefix_when_its_queue_grows():
    kv, cands = make_policy("kv_aware"), _cands(2)
    info = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e0": 1920})
    picks = []
    for _ in range(8):  # closed loop: each pick stays in flight
        c = kv.choose(cands, info)
        c.inflight += 1
        picks.append(c.engine_id)
    counts = Counter(picks)
    assert counts["e1"] >= 2 and counts["e0"] > counts["e1"]  # spilled, still favoured
    # Once e1 holds the prefix too, load decides: the two even out.
    info.cached_tokens["e1"] = 1920
    for _ in range(8):
        kv.choose(cands, info).inflight += 1
    assert abs(cands[0].inflight - cands[1].inflight) <= 1


def test_kv_aware_without_tokens_is_least_queue():
    kv, cands = make_policy("kv_aware"), _cands(3)
    cands[0].inflight, cands[1].inflight, cands[2].inflight = 2, 0, 1
    assert kv.choose(cands, RequestInfo("r")).engine_id == "e1"


def test_session_affinity_is_sticky_and_moves_only_a_lost_instances_sessions():
    sess, cands = make_policy("session"), _cands(4)
    infos = [RequestInfo(str(i), headers={"x-session-id": f"user-{i}"}) for i in range(200)]
    first = {i.request_id: sess.choose(cands, i).engine_id for i in infos}
    assert first == {i.request_id: sess.choose(cands, i).engine_id for i in infos}
    assert len(set(first.values())) == 4
    survivors = [c for c in cands if c.engine_id != "e2"]
    after = {i.request_id: sess.choose(survivors, i).engine_id for i in infos}
    moved = {r for r in first if first[r] != after[r]}
    assert moved == {r for r, e in first.items() if e == "e2"}
    # No header: least-loaded.
    cands[0].inflight = cands[1].inflight = cands[3].inflight = 5
    assert sess.choose(cands, RequestInfo("x")).engine_id == "e2"


def test_kv_aware_credits_store_hits_as_cheap_but_not_free():
    from disagg.scheduler.kv_aware import KVAware

    c = [Candidate("e0", "u0"), Candidate("e1", "u1")]
    info = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e1": 1000},
                       store_tokens={"e0": 1800})
    assert info.uncached_tokens("e0") == 200  # loadable from the store: not computed
    assert KVAware().choose(c, info).engine_id == "e0"  # 200 + 0.05 * 1800 < 1000
    both = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e1": 1800},
                       store_tokens={"e0": 1800})
    assert KVAware().choose(c, both).engine_id == "e1"  # its own cache beats loading


def test_kv_aware_options_come_from_the_topology():
    sched = parse_topology({"scheduler": {"policy_options": {
        "kv_aware": {"queue_tokens": 64, "store_load_cost": 0.2}}}}).scheduler
    kv = make_policy("kv_aware", sched.policy_options.get("kv_aware"))
    assert (kv.queue_tokens, kv.store_load_cost) == (64, 0.2)
    c = [Candidate("e0", "u0", inflight=1), Candidate("e1", "u1")]
    info = RequestInfo("r", prompt_tokens=1000, cached_tokens={"e0": 900})
    assert kv.choose(c, info).engine_id == "e0"  # 100 + 64 < 1000
    assert make_policy("kv_aware", {"queue_tokens": 2000}).choose(c, info).engine_id == "e1"


def test_earlier_kv_aware_keys_still_load():
    sched = parse_topology({"scheduler": {"kv_aware_queue_tokens": 64,
                                          "kv_aware_store_load_cost": 0.2}}).scheduler
    assert sched.policy_options == {"kv_aware": {"queue_tokens": 64, "store_load_cost": 0.2}}


def test_every_registered_policy_declares_its_options():
    for name in policy_names():
        make_policy(name)  # defaults are valid
        with pytest.raises(ValidationError):
            make_policy(name, {"no_such_option": 1})


@pytest.mark.parametrize(("data", "names"), [
    ({"policy_options": {"kv_aware": {"queue_tokenz": 1}}},
     ["scheduler.policy_options.kv_aware.queue_tokenz", "unknown field"]),
    ({"policy_options": {"kv_aware": {"store_load_cost": 2}}},
     ["scheduler.policy_options.kv_aware.store_load_cost", "less than or equal to 1"]),
    ({"policy_options": {"fastest": {}}}, ["scheduler.policy_options.fastest", "kv_aware"]),
    ({"prefill_policy": "random"}, ["scheduler.prefill_policy", "round_robin"]),
])
def test_policy_errors_name_the_field(data, names):
    with pytest.raises(TopologyError) as err:
        parse_topology({"scheduler": data})
    for name in names:
        assert name in str(err.value)

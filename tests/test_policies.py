"""Pairing policies: round-robin cycles; least-loaded follows load and spreads ties."""

from collections import Counter

import pytest
from pydantic import ValidationError

from disagg.launch.topology import TopologyError, parse_topology
from disagg.scheduler import Candidate, RequestInfo, make_policy, policy_names
from disagg.scheduler.base import Hop
from disagg.scheduler.kv_aware import KVAware, first_token_seconds, open_hop, prefills_here


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


def _admit(c: Candidate, info: RequestInfo) -> None:
    """What the gateway does with a routed request: its computed tokens become pending."""
    c.inflight += 1
    c.pending_tokens += info.uncached_tokens(c.engine_id) or 0


def test_kv_aware_spills_a_hot_prefix_once_its_queue_outlasts_recomputing():
    kv, cands = make_policy("kv_aware"), _cands(2)
    info = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e0": 1920})
    picks = []
    for _ in range(40):  # closed loop: each pick stays in flight
        c = kv.choose(cands, info)
        _admit(c, info)
        picks.append(c.engine_id)
    counts = Counter(picks)
    # e0 computes 80 tokens per request, e1 2000: e1 takes one once e0's queue is longer.
    assert counts["e1"] >= 1 and counts["e0"] >= 24
    assert cands[0].pending_tokens <= cands[1].pending_tokens + 2000 + 80


def test_kv_aware_counts_seconds_with_each_instances_learned_rate():
    kv, cands = make_policy("kv_aware"), _cands(2)
    info = RequestInfo("r", prompt_tokens=2000)
    cands[0].prefill_rate, cands[1].prefill_rate = 1000.0, 4000.0  # e1 four times faster
    cands[1].pending_tokens = 5000  # 1.25 s of work ahead on e1 vs 0 on e0
    assert kv.choose(cands, info).engine_id == "e1"  # 1.75 s < 2 s
    cands[1].pending_tokens = 7000  # 2.25 s
    assert kv.choose(cands, info).engine_id == "e0"
    # Not measured yet: as fast as the median of the measured ones.
    fresh = [*cands, Candidate("e2", "u2")]
    fresh[0].pending_tokens = fresh[1].pending_tokens = 10_000
    assert kv.choose(fresh, info).engine_id == "e2"


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


def test_kv_aware_credits_store_hits_at_their_learned_load_rate():
    c = [Candidate("e0", "u0"), Candidate("e1", "u1")]
    info = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e1": 1000},
                       store_tokens={"e0": 1800})
    assert info.uncached_tokens("e0") == 200  # loadable from the store: not computed
    assert KVAware().choose(c, info).engine_id == "e0"  # prior: 200 + 1800 / 10 < 1000
    both = RequestInfo("r", prompt_tokens=2000, cached_tokens={"e1": 1800},
                       store_tokens={"e0": 1800})
    assert KVAware().choose(c, both).engine_id == "e1"  # its own cache beats loading
    # A store measured barely faster than computing is not worth going for.
    for x in c:
        x.prefill_rate, x.load_rate = 1000.0, 1100.0
    assert KVAware().choose(c, info).engine_id == "e1"  # 0.2 + 1.64 s > 1 s


def test_kv_aware_has_no_weights_to_set():
    with pytest.raises(TopologyError, match="learns each instance"):
        parse_topology({"scheduler": {"kv_aware_queue_tokens": 64}})
    with pytest.raises(TopologyError, match="queue_tokens"):
        parse_topology({"scheduler": {"policy_options": {"kv_aware": {"queue_tokens": 64}}}})


def test_every_registered_policy_declares_its_options():
    for name in policy_names():
        make_policy(name)  # defaults are valid
        with pytest.raises(ValidationError):
            make_policy(name, {"no_such_option": 1})


@pytest.mark.parametrize(("data", "names"), [
    ({"policy_options": {"kv_aware": {"queue_tokenz": 1}}},
     ["scheduler.policy_options.kv_aware.queue_tokenz", "unknown field"]),
    ({"policy_options": {"fastest": {}}}, ["scheduler.policy_options.fastest", "kv_aware"]),
    ({"prefill_policy": "random"}, ["scheduler.prefill_policy", "round_robin"]),
])
def test_policy_errors_name_the_field(data, names):
    with pytest.raises(TopologyError) as err:
        parse_topology({"scheduler": data})
    for name in names:
        assert name in str(err.value)


def test_kv_aware_counts_each_decoding_request_as_a_step():
    """A decoder that holds the prefix but generates for many requests loses to one that
    must recompute it, once the steps it adds outlast the recompute: no piling on."""
    kv, cands = make_policy("kv_aware"), _cands(2)
    for c in cands:
        c.prefill_rate, c.step_s = 2000.0, 0.05  # 2000 tokens/s, 50 ms a step
    info = RequestInfo("r", prompt_tokens=1000, cached_tokens={"e0": 1000})
    picks = Counter()
    for _ in range(40):
        c = kv.choose(cands, info)
        c.decoding += 1  # each stays generating
        picks[c.engine_id] += 1
        info.cached_tokens[c.engine_id] = 1000  # it now holds the prefix too
    assert picks["e1"] >= 15 and picks["e0"] >= 15  # recompute 0.5 s = 10 steps: spread
    # Not measured yet: a step is priced as the median measured one.
    fresh = [*cands, Candidate("e2", "u2", prefill_rate=2000.0)]
    prior = (2000.0, 20000.0, 0.05)
    assert first_token_seconds(fresh[2], info, prior) < first_token_seconds(fresh[0], info, prior)


def test_kv_aware_decoders_that_all_take_the_hop_split_by_decode_queue():
    """A long prompt goes through a prefill instance whichever decoder is chosen: a decoder
    holding more of the conversation computes no less, so the decode queue decides."""
    kv, cands = make_policy("kv_aware"), _cands(2)
    for c in cands:
        c.prefill_rate, c.step_s = 2000.0, 0.05
    cands[0].decoding = 3
    info = RequestInfo("r", prompt_tokens=3000, cached_tokens={"e0": 2000})
    assert kv.choose(cands, info).engine_id == "e0"  # no hop open: 1000 tokens < 3000
    # Both leave >= 256 tokens; the prefill instance holds more than either: both hop.
    info.hop = Hop(from_tokens=256, seconds=0.6, uncached=500, rate=2000.0)
    picks = Counter(kv.choose(cands, info).engine_id for _ in range(4))
    assert picks == {"e1": 4}


def test_kv_aware_weighs_a_short_local_prefill_against_the_hop():
    """A decoder holding all but a short tail computes the tail itself; another decoder
    must take the hop and pay for it."""
    kv, cands = make_policy("kv_aware"), _cands(2)
    for c in cands:
        c.prefill_rate, c.step_s = 2000.0, 0.05
    info = RequestInfo("r", prompt_tokens=3000, cached_tokens={"e0": 2900},
                       hop=Hop(from_tokens=256, seconds=0.4, uncached=3000, rate=2000.0))
    assert kv.choose(cands, info).engine_id == "e0"  # 100 tokens: 0.05 s < 0.4 s hop
    cands[0].decoding = 10  # 0.05 + 0.5 s > 0.4 s hop
    assert kv.choose(cands, info).engine_id == "e1"


def test_open_hop_is_the_best_prefill_instance():
    prefill = [Candidate("p0", "u", prefill_rate=1000.0, pending_tokens=2000),
               Candidate("p1", "u", prefill_rate=1000.0)]
    info = RequestInfo("r", prompt_tokens=1000, cached_tokens={"p0": 1000})
    hop = open_hop(prefill, info, 256)  # p1: 1000 / 1000; p0: 2000 / 1000
    assert (hop.seconds, hop.uncached, hop.rate, hop.from_tokens) == \
        (pytest.approx(1.0), 1000, 1000.0, 256)
    prefill[1].pending_tokens = 500  # p1: 0.5 s queued, then 1 s; p0 still 2 s
    assert open_hop(prefill, info, 256).seconds == pytest.approx(1.5)
    # Hops waiting in the gateway's prefill queue ahead of this one come first.
    assert open_hop(prefill, info, 256, queued_s=2.0).seconds == pytest.approx(3.5)


def test_prefill_seconds_is_the_uncached_part_at_the_holders_rate():
    """What the gateway's prefill queue orders hops by: queues aside, the best instance."""
    kv = KVAware()
    prefill = [Candidate("p0", "u", prefill_rate=1000.0, pending_tokens=9000),
               Candidate("p1", "u", prefill_rate=500.0)]
    info = RequestInfo("r", prompt_tokens=1200, cached_tokens={"p0": 1000})
    assert kv.prefill_seconds(prefill, info) == pytest.approx(0.2)  # p0: 200 / 1000
    assert kv.prefill_seconds(prefill, RequestInfo("r")) is None  # not tokenized


def test_a_decoder_holding_the_prefix_prefills_when_the_hop_is_slower():
    """Past the hop's threshold a decoder computes the prompt itself only when it holds as
    much of it as the prefill instance would (never history twice) and finishes sooner,
    its running decodes' stall counted."""
    d = Candidate("d0", "u", prefill_rate=1000.0)
    info = RequestInfo("r", prompt_tokens=1300, cached_tokens={"d0": 1000})  # 300 to compute

    def hop(seconds, uncached=300, from_tokens=256, rate=1000.0, allowed=True):
        return Hop(from_tokens=from_tokens, seconds=seconds, uncached=uncached, rate=rate,
                   local_when_slower=allowed)

    info.hop = hop(1.2)  # the prefill instance queued: 0.3 s here against 1.2 s
    assert prefills_here(d, info)
    info.hop = hop(1.2, allowed=False)  # the deployment keeps long prompts on the hop
    assert not prefills_here(d, info)
    info.hop = hop(1.2)
    d.decoding = 3  # 0.3 s here stalls 3 decodes 0.3 s each: 1.2 s, not sooner
    assert not prefills_here(d, info)
    d.decoding = 0
    info.hop = hop(0.3)  # both idle and as fast: a tie goes to the hop
    assert not prefills_here(d, info)
    info.hop = hop(5.0, uncached=200)  # the prefill instance holds more: no recompute here
    assert not prefills_here(d, info)
    info.hop = hop(0.1, uncached=0, from_tokens=512)  # under the threshold
    assert prefills_here(d, info)
    # Not measured yet: the prefill pool's rate stands in (same model, same hardware).
    d.prefill_rate = None
    info.hop = hop(1.2, rate=200.0)  # 1.5 s here
    assert not prefills_here(d, info)
    info.hop = None
    assert prefills_here(d, info)  # no hop open: nothing else computes it


def test_kv_aware_sends_the_next_turn_to_the_decoder_holding_it_when_prefill_is_queued():
    kv, cands = make_policy("kv_aware"), _cands(2)
    for c in cands:
        c.prefill_rate, c.step_s = 1000.0, 0.05
    info = RequestInfo("r", prompt_tokens=1300, cached_tokens={"e1": 1000},
                       hop=Hop(from_tokens=256, seconds=1.2, uncached=300, rate=1000.0,
                               local_when_slower=True))
    assert kv.choose(cands, info).engine_id == "e1"  # 0.3 s here against a 1.2 s hop
    assert first_token_seconds(cands[1], info, (1000.0, 1e4, 0.05)) == pytest.approx(0.3)
    assert first_token_seconds(cands[0], info, (1000.0, 1e4, 0.05)) == pytest.approx(1.2)



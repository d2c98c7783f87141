"""The gateway's hop decision under kv_aware, through a real Gateway over HTTP in front of
fake engines: with ``scheduler.local_prefill_when_hop_slower`` a decoder computes a long
prompt itself (reason ``hop_slower``, no prefill hop) when the learned rates and queues make
the hop slower, and takes the hop otherwise; without it, long prompts always hop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.fake_engine import EngineBehavior
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


def _send_all(s, prompts: list[str]) -> tuple[list[threading.Thread], list[httpx.Response]]:
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda p=p: results.append(s.post(
        "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 2})))
        for p in prompts]
    for t in threads:
        t.start()
    return threads, results


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(("scheduler", "held"), [
    ({}, True),  # the default: kv_aware, the prefill queue on, one hop per instance
    ({"prefill_queue": False}, False),  # off: every hop goes straight to the instance
    ({"prefill_policy": "round_robin"}, False),  # a policy that estimates no prefill time
])
def test_prefill_hops_wait_at_the_gateway_and_go_shortest_first(tiny_model: Path,
                                                                 scheduler, held):
    """One hop runs on the (held) prefill instance; three more wait in the gateway's queue
    and reach the instance shortest prompt first once it frees. Every answer is complete."""
    hold = threading.Event()
    with stack(tiny_model, prefill=EngineBehavior(role="prefill", hold=hold),
               scheduler=scheduler) as s:
        first, first_results = _send_all(s, ["a b c d " * 40])
        _until(lambda: s.prefill.active == 1)
        words = {"long": 60, "short": 20, "mid": 30}  # 2 tokens each: all past the 32 of a hop
        threads, results = _send_all(s, [f"{n} " + "x y " * w for n, w in words.items()])
        if held:
            _until(lambda: s.metric("disagg_prefill_queue_waiting") == 3)
            assert s.prefill.active == 1
        else:
            _until(lambda: s.prefill.active == 4)
        hold.set()
        for t in [*first, *threads]:
            t.join(30)
        assert all(r.status_code == 200 for r in [*first_results, *results])
        assert len(s.decode.received) == 4
        assert all("kv_transfer_params" in b for b in s.decode.received)
        if held:
            order = [str(b["prompt"]).split()[0] for b in s.prefill.received[1:]]
            assert order == ["short", "mid", "long"]
            assert s.prefill.peak == 1
            assert s.metric("disagg_prefill_queue_waiting") == 0
            assert s.metric("disagg_prefill_queue_running") == 0


def test_prefill_instances_pinned_to_the_same_cores_run_one_hop_between_them(tiny_model: Path):
    """The prefill queue's places: one per prefill instance, but instances pinned to the
    same cores of one host are one (a second hop would only time-share those cores), and
    each gateway worker takes its share."""
    with stack(tiny_model) as s:
        g = s.gateway
        pool = g.pool
        first = pool.members["prefill-0"].info
        pool.add("prefill-1", first.model_copy(update={"engine_id": "fake-prefill-b",
                                                       "index": 1}))
        members = [pool.members["prefill-0"], pool.members["prefill-1"]]

        def pin(*cores: list[int]) -> int:
            for m, c in zip(members, cores, strict=True):
                m.info = m.info.model_copy(update={"cpu_cores": c})
            return g._prefill_places()

        assert pin([], []) == 2  # not pinned (GPUs): one each
        assert pin([0], [0]) == 1  # both on core 0
        assert pin([0], [1]) == 2
        g._workers = 2
        assert pin([0], [1]) == 1  # two workers: one place each
        assert pin([0], [0]) == 1  # never none while an instance is up

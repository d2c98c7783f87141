"""The pool polls engines fast while requests are in flight and slowly when idle: rendering
vLLM's /metrics is most of what an idle engine costs."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool
from tests.support.fake_engine import EngineBehavior, FakeEngine


async def _polls_during(pool: InstancePool, engine: EngineBehavior, seconds: float) -> int:
    before = engine.polls
    await asyncio.sleep(seconds)
    return engine.polls - before


def test_an_idle_pool_polls_slowly_and_a_busy_one_at_once() -> None:
    behavior = EngineBehavior()
    with FakeEngine(behavior) as engine:
        async def run() -> tuple[int, int, bool]:
            pool = InstancePool(GatewayMetrics(), interval_s=0.05, idle_interval_s=0.6,
                                idle_after_s=0.3)
            pool.add("decode-0", engine.info(0))
            await pool.start()
            try:
                await asyncio.sleep(0.5)  # past idle_after: the slow pace
                idle = await _polls_during(pool, behavior, 1.8)
                pool.members["decode-0"].candidate.inflight = 1
                busy = await _polls_during(pool, behavior, 1.0)
                return idle, busy, pool.members["decode-0"].healthy
            finally:
                await pool.close()

        idle, busy, healthy = asyncio.run(run())
    assert healthy
    assert 2 <= idle <= 5, idle  # every 0.6 s over 1.8 s
    assert busy >= 8, busy  # every 0.05 s, woken within one fast interval


def test_a_busy_instance_that_computes_nothing_leaves_routing_until_it_moves() -> None:
    """Readiness follows the data path: requests running, no token for stall_s."""
    hold = threading.Event()
    behavior = EngineBehavior(hold=hold)
    with FakeEngine(behavior) as engine:
        async def run() -> list[bool]:
            pool = InstancePool(GatewayMetrics(), interval_s=0.05, stall_s=0.5)
            pool.add("decode-0", engine.info(0))
            await pool.start()
            seen = []
            try:
                async with httpx.AsyncClient(timeout=30) as client:
                    request = asyncio.create_task(client.post(
                        engine.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}))
                    await asyncio.sleep(0.3)
                    seen.append(bool(pool.available("decode")))  # busy, not yet stalled
                    await asyncio.sleep(0.8)
                    seen.append(bool(pool.available("decode")))  # stalled
                    seen.append(pool.members["decode-0"].healthy)  # its server still answers
                    hold.set()
                    await request
                    await asyncio.sleep(0.3)
                    seen.append(bool(pool.available("decode")))  # tokens moved: back
            finally:
                await pool.close()
            return seen

        assert asyncio.run(run()) == [True, False, True, True]


def _metrics(computed: float, prefill_s: float, loaded: float, load_s: float) -> str:
    return "\n".join([
        "# TYPE vllm:prompt_tokens_by_source counter",
        f'vllm:prompt_tokens_by_source_total{{source="local_compute"}} {computed}',
        f'vllm:prompt_tokens_by_source_total{{source="local_cache_hit"}} {computed * 9}',
        "# TYPE vllm:request_prefill_time_seconds histogram",
        'vllm:request_prefill_time_seconds_bucket{le="+Inf"} 1',
        f"vllm:request_prefill_time_seconds_sum {prefill_s}",
        "vllm:request_prefill_time_seconds_count 1",
        "# TYPE vllm:disagg_store_loaded_tokens counter",
        f"vllm:disagg_store_loaded_tokens_total {loaded}",
        "# TYPE vllm:disagg_store_load_seconds counter",
        f"vllm:disagg_store_load_seconds_total {load_s}",
        "# TYPE vllm:inter_token_latency_seconds histogram",
        f"vllm:inter_token_latency_seconds_sum {prefill_s / 10}",
        f"vllm:inter_token_latency_seconds_count {computed / 100}", ""])


def test_polls_learn_each_instances_prefill_and_store_load_rates() -> None:
    from disagg.pool import InstanceInfo

    pool = InstancePool(GatewayMetrics())
    pool.add("decode-0", InstanceInfo(role="decode", index=0, engine_id="e0",
                                      url="http://127.0.0.1:1", side_channel_port=0, pid=0,
                                      log_path=""))
    m = pool.members["decode-0"]
    pool._observe(m, _metrics(1000, 1.0, 0, 0))  # baseline: what ran before the gateway
    assert m.candidate.prefill_rate is None and m.candidate.load_rate is None
    pool._observe(m, _metrics(5000, 3.0, 8192, 0.1))  # 4000 computed in 2 s; 8192 in 0.1 s
    assert m.candidate.prefill_rate == pytest.approx(2000)
    assert m.candidate.load_rate == pytest.approx(81920)
    assert m.candidate.step_s == pytest.approx(0.2 / 40)  # 40 more tokens in 0.2 s
    # A decoder's window of pulled KV (its wait for the KV counts as prefill time) is no
    # sample of its compute rate.
    pool._observe(m, _metrics(5010, 8.0, 8192, 0.1).replace(
        'source="local_cache_hit"', 'source="external_kv_transfer"'))
    assert m.candidate.prefill_rate == pytest.approx(2000)

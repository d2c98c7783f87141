"""TP sizes outside the connector: the topology refuses sizes that cannot shard the model's
heads (naming the field and the valid sizes), and the gateway sends a prefill hop only to
instances whose KV the chosen decoder can read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from disagg.config import ApiConfig, SchedulerConfig, StoreConfig
from disagg.gateway import Gateway, ServedModel
from disagg.launch.topology import TopologyError, parse_topology
from disagg.metrics import GatewayMetrics
from disagg.models import model_heads
from disagg.pool import InstancePool
from disagg.scrape import parse, total
from tests.support.fake_engine import AppServer, EngineBehavior, FakeEngine


def test_topology_names_a_tp_size_that_cannot_shard_the_heads():
    with pytest.raises(TopologyError) as err:
        parse_topology({"model": "tiny", "prefill": {"tensor_parallel_size": 3},
                        "decode": {"tensor_parallel_size": 2}})
    text = str(err.value)
    assert "prefill.tensor_parallel_size: TP 3 does not divide the model's 4 attention " \
           "heads; use one of 1, 2, 4" in text
    assert "decode.tensor_parallel_size" not in text
    parse_topology({"model": "tiny", "prefill": {"tensor_parallel_size": 2}})


def test_model_heads_from_a_folder(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 32, "num_key_value_heads": 8}))
    assert model_heads(str(tmp_path)) == (32, 8)
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"num_attention_heads": 16, "kv_lora_rank": 512}}))
    assert model_heads(str(tmp_path)) == (16, 1)  # MLA: one replicated latent head
    assert model_heads(str(tmp_path / "missing")) is None
    assert model_heads("tiny") == (4, 2)


def test_prefill_hops_go_only_to_instances_the_decoder_can_read(tiny_model: Path):
    """Decoder at TP 1 over a 2-KV-head model: a TP-2 prefill is readable (head slices), a
    prefill whose TP size cannot shard the heads is not: it never gets a hop."""
    good, bad, dec = (EngineBehavior(role="prefill"), EngineBehavior(role="prefill"),
                      EngineBehavior())
    with FakeEngine(good) as g, FakeEngine(bad) as b, FakeEngine(dec) as d:
        metrics = GatewayMetrics()
        pool = InstancePool(metrics, interval_s=0.2, timeout_s=10.0)
        pool.add("prefill-0", b.info(0).model_copy(
            update={"tensor_parallel_size": 3, "num_kv_heads": 2}))
        pool.add("prefill-1", g.info(1).model_copy(
            update={"tensor_parallel_size": 2, "num_kv_heads": 2}))
        pool.add("decode-0", d.info(0).model_copy(update={"num_kv_heads": 2}))
        # the policy would pick prefill-0 first (least loaded)
        pool.members["prefill-1"].candidate.inflight = 100
        gateway = Gateway(pool, metrics, ServedModel("tiny", str(tiny_model), 512, 16, None),
                          SchedulerConfig(kv_events=False, min_remote_prefill_tokens=0),
                          ApiConfig(), StoreConfig(enabled=False))
        with AppServer(gateway.app, lifespan="on") as server:
            for _ in range(3):
                r = httpx.post(server.url + "/v1/completions", timeout=30, json={
                    "model": "tiny", "prompt": "the quick brown fox " * 10, "max_tokens": 2})
                assert r.status_code == 200, r.text
            assert len(good.received) == 3 and not bad.received
            assert all("kv_transfer_params" in body for body in dec.received)
            # with only the unreadable prefill left, the decoder prefills locally
            g.stop()  # the readable prefill's engine goes away; the next poll sees it
            deadline = time.monotonic() + 15
            while pool.members["prefill-1"].healthy:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = httpx.post(server.url + "/v1/completions", timeout=30, json={
                "model": "tiny", "prompt": "the quick brown fox " * 10, "max_tokens": 2})
            assert r.status_code == 200 and not bad.received
            assert "kv_transfer_params" not in dec.received[-1]
            text = httpx.get(server.url + "/metrics", timeout=10).text
            assert total(parse(text), "disagg_decisions", reason="no_prefill_instance") == 1


def test_a_tp_instance_gets_a_run_of_free_side_channel_ports():
    import socket

    from disagg.instance import free_run

    base = free_run(4, exclude={1, 2})
    socks = [socket.socket() for _ in range(4)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", base + i))  # rank i's side channel can listen there
    finally:
        for s in socks:
            s.close()

"""api.workers without engines: config validation, each worker's share of admission, the
decoder's body passed through without re-encoding, and two gateways sharing one port
(SO_REUSEPORT) in front of fake engines, both serving."""

from __future__ import annotations

import json
from contextlib import ExitStack

import httpx
import pytest

from disagg.config import ApiConfig, SchedulerConfig, StoreConfig, Topology
from disagg.gateway import Gateway, Payload, ServedModel
from disagg.launch.server import GatewayServer, listen_socket, worker_api
from disagg.launch.topology import TopologyError, parse_topology
from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool
from disagg.scrape import parse, total
from tests.support.fake_engine import EngineBehavior, FakeEngine


@pytest.mark.parametrize("value", [0, -1, 33, "2", 1.5, True, None])
def test_bad_workers_is_refused_naming_the_field(value):
    with pytest.raises(TopologyError) as err:
        parse_topology({"api": {"workers": value}})
    assert "api.workers" in str(err.value)


def test_workers_defaults_to_one_and_takes_a_valid_count():
    assert Topology().api.workers == 1
    assert parse_topology({"api": {"workers": 4}}).api.workers == 4


def test_each_worker_takes_its_share_of_admission():
    api, share = worker_api(ApiConfig(workers=3, max_queued=10), 3, 64)
    assert (share, api.max_queued) == (22, 4)  # rounded up: together at least the total
    api, share = worker_api(ApiConfig(), 1, 64)
    assert (share, api.max_queued) == (64, None)


BODY = {"model": "tiny", "prompt": "héllo \u2028 world", "max_tokens": 3, "stream": False}


def test_a_body_nothing_was_dropped_from_goes_on_as_sent():
    raw = json.dumps(BODY, indent=1, ensure_ascii=False).encode() + b"\n "
    payload = Payload(dict(BODY), raw, len(raw))
    assert payload.with_params(None) is raw
    params = {"remote_engine_id": "e1", "remote_block_ids": [1, 2]}
    assert json.loads(payload.with_params(params)) == {**BODY, "kv_transfer_params": params}


def test_a_body_the_gateway_changed_is_encoded_anew():
    payload = Payload(dict(BODY), None, 100)
    assert json.loads(payload.with_params(None)) == BODY
    assert json.loads(payload.with_params({"x": 1})) == {**BODY, "kv_transfer_params": {"x": 1}}


def _gateway(tiny_model, engines: ExitStack, worker: int) -> Gateway:
    metrics = GatewayMetrics()
    pool = InstancePool(metrics, interval_s=0.2, timeout_s=10.0)
    pool.add("decode-0", engines.enter_context(FakeEngine(EngineBehavior())).info(0))
    return Gateway(pool, metrics, ServedModel("tiny", str(tiny_model), 512, 16, None),
                   SchedulerConfig(kv_events=False), ApiConfig(workers=2),
                   StoreConfig(enabled=False), worker={"index": worker, "workers": 2})


def test_two_gateways_share_one_port_and_both_serve(tiny_model):
    with ExitStack() as stack:
        first = listen_socket("127.0.0.1", 0, reuse_port=True)
        port = first.getsockname()[1]
        servers = []
        for i in range(2):
            sockets = [first if i == 0 else listen_socket("127.0.0.1", port, reuse_port=True),
                       listen_socket("127.0.0.1", 0, reuse_port=False)]
            server = GatewayServer(_gateway(tiny_model, stack, i), sockets)
            server.start()
            stack.callback(server.stop)
            servers.append(server)
        seen = set()
        for _ in range(40):  # a new connection each: the kernel spreads them
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                           json={**BODY, "prompt": "hello"}, headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            seen.add(httpx.get(f"http://127.0.0.1:{port}/v1/disagg/status",
                               timeout=10).json()["worker"]["index"])
        served = [total(parse(httpx.get(s.own_url + "/metrics", timeout=10).text),
                        "disagg_requests") for s in servers]
        assert all(n > 0 for n in served) and sum(served) == 40, served
        assert seen == {0, 1}
        for i, s in enumerate(servers):  # each worker's own address answers for itself
            assert httpx.get(s.own_url + "/v1/disagg/status",
                             timeout=10).json()["worker"]["index"] == i

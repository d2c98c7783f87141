"""With every decoder down, prefill instances (whole vLLM engines) serve whole requests:
degraded, not 503. A real Gateway over HTTP in front of a fake prefill engine; the decode
instance's address has nothing listening (its engine died)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from disagg.config import ApiConfig, SchedulerConfig, StoreConfig
from disagg.gateway import Gateway, ServedModel
from disagg.instance import InstanceInfo
from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool
from disagg.scrape import parse, total
from tests.support.fake_engine import AppServer, EngineBehavior, FakeEngine
from tests.support.gateway_stack import stack


def _dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_no_healthy_decoder_means_prefill_instances_serve_whole_requests(tiny_model: Path):
    behavior = EngineBehavior(role="prefill")
    with FakeEngine(behavior) as prefill:
        metrics = GatewayMetrics()
        pool = InstancePool(metrics, interval_s=0.1)
        pool.add("prefill-0", prefill.info(0))
        pool.add("decode-0", InstanceInfo(role="decode", index=0, engine_id="decode-0-dead",
                                          url=_dead_url(), side_channel_port=0, pid=0,
                                          log_path=""))
        gateway = Gateway(pool, metrics, ServedModel("tiny", str(tiny_model), 512, 16, None),
                          SchedulerConfig(kv_events=False, min_remote_prefill_tokens=0),
                          ApiConfig(), StoreConfig(enabled=False))
        with AppServer(gateway.app, lifespan="on") as server:
            deadline = time.monotonic() + 10
            while pool.members["decode-0"].healthy:  # the first poll finds it dead
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for stream in (False, True):
                r = httpx.post(server.url + "/v1/completions", timeout=30, json={
                    "model": "tiny", "prompt": "the quick brown fox " * 20, "max_tokens": 3,
                    "stream": stream})
                assert r.status_code == 200, r.text
                assert "t0" in r.text
            # Served there whole: no prefill hop (no kv_transfer_params), counted as such.
            assert len(behavior.received) == 2
            assert all("kv_transfer_params" not in b for b in behavior.received)
            text = httpx.get(server.url + "/metrics", timeout=10).text
            assert total(parse(text), "disagg_decisions", reason="no_decode_instance") == 2


BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 3}


@pytest.mark.parametrize(("fault", "stream"), [
    ("cut_before_first_chunk", False), ("cut_before_first_chunk", True),
    ("http_500", False), ("http_500", True),
    ("error_event_first", True)])  # vLLM's EngineDeadError event, only streams have it
def test_a_decoder_failing_before_its_answer_begins_is_retried_elsewhere(tiny_model, fault,
                                                                          stream):
    """Nothing has reached the client, so the request goes to the next decoder; the one
    that failed is marked down."""
    bad = {"cut_before_first_chunk": EngineBehavior(cut_after=0),
           "http_500": EngineBehavior(error=(500, {"error": {"message": "EngineDeadError"}})),
           "error_event_first": EngineBehavior(error_event_after=0)}[fault]
    good = EngineBehavior()
    with stack(tiny_model, decode=bad, more_decoders=[good]) as s:
        pool = s.gateway.pool
        pool.members["decode-1"].candidate.inflight = 1000  # the policy picks decode-0 first
        r = s.post("/v1/completions", {**BODY, "stream": stream})
        assert r.status_code == 200, r.text
        assert "t0" in r.text and "error" not in r.text
        assert len(bad.received) == 1 and len(good.received) == 1
        assert s.metric("disagg_failures", kind="decode", instance="decode-0") == 1


def test_with_every_decoder_failing_the_prefill_instance_answers(tiny_model):
    with stack(tiny_model, decode=EngineBehavior(cut_after=0)) as s:
        r = s.post("/v1/completions", {**BODY, "stream": True})
        assert r.status_code == 200, r.text
        assert r.text.endswith("data: [DONE]\n\n") and "error" not in r.text
        assert len(s.prefill.received) == 1


def test_a_prefill_hop_held_open_by_a_dying_engine_ends_when_the_pool_marks_it_down(
        tiny_model):
    """A dying vLLM can keep an in-flight request's connection open (graceful shutdown,
    engine core gone): the hop must end when the pool marks the instance down, and the
    decoder prefills locally."""
    hold = threading.Event()
    with stack(tiny_model) as s:
        s.prefill.hold = hold
        result: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: result.setdefault("r", s.post(
            "/v1/completions", {**BODY, "prompt": "the quick brown fox " * 20})))
        sender.start()
        deadline = time.monotonic() + 10
        while s.prefill.active == 0:  # the hop is being held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool, loop = s.gateway.pool, s.gateway.loop
        assert loop is not None
        loop.call_soon_threadsafe(pool.mark_down, pool.members["prefill-0"], "test: dying")
        sender.join(10)
        hold.set()
        assert result["r"].status_code == 200, result["r"].text
        assert len(s.decode.received) == 1
        assert "kv_transfer_params" not in s.decode.received[0]  # prefilled locally
        assert s.metric("disagg_failures", kind="prefill", instance="prefill-0") == 1


def _stream_lines(s, body: dict) -> tuple[list[str], float]:
    """A streamed request's non-empty lines, and the seconds until it ended."""
    t0 = time.monotonic()
    with s.client.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    return lines, time.monotonic() - t0


def test_a_stream_held_open_by_a_decoder_marked_down_ends_with_an_error_event(tiny_model):
    """A dying engine can keep a stream's connection open and send nothing more: the stream
    ends with an OpenAI error event as soon as the pool marks its decoder down, and the
    decoder sees the request go away (vLLM aborts it)."""
    decoder = EngineBehavior(hang_after=1)
    with stack(tiny_model, decode=decoder) as s:
        pool, loop = s.gateway.pool, s.gateway.loop
        assert loop is not None
        member = pool.members["decode-0"]
        loop.call_later(0.5, pool.mark_down, member, "test: dying")
        lines, took = _stream_lines(s, {**BODY, "stream": True})
        assert took < 5
        assert "t0" in lines[0]
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error["code"] == "upstream" and "broke off" in error["message"]
        deadline = time.monotonic() + 5
        while decoder.aborted != 1:
            assert time.monotonic() < deadline, (decoder.aborted, decoder.active)
            time.sleep(0.02)


def test_the_request_deadline_bounds_the_wait_for_an_answer_and_the_stream(tiny_model):
    """api.request_timeout_s is end to end: no answer by then is a 504 with an OpenAI
    body; a stream still running then ends with an error event."""
    api = ApiConfig(request_timeout_s=1.0)
    with stack(tiny_model, api=api, decode=EngineBehavior(hang_after=2)) as s:
        lines, took = _stream_lines(s, {**BODY, "stream": True})
        assert 0.9 < took < 5
        assert "t1" in lines[1]
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        s.decode.hold = threading.Event()  # the next answer never begins
        t0 = time.monotonic()
        r = s.post("/v1/completions", BODY)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert time.monotonic() - t0 < 5
        s.decode.hold.set()
        assert s.metric("disagg_failures", kind="deadline", instance="gateway") == 2

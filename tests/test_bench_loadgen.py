"""Load generator against the fake OpenAI server: timing honesty, failures, load modes; the
NixlConnector proxy and the RESULTS.md writer of benchmarks/."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from benchmarks import proxy
from benchmarks.results_md import machine_info, update_results_md
from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import (
    LoadConfig,
    RunResult,
    check_dependencies,
    poisson_offsets,
    run_load,
)
from disagg.bench.metrics import Slo, percentile, stats_ms, summarize
from disagg.bench.records import ChatMessage, RequestResult, RequestSpec
from tests.support.fake_server import FakeBehavior, FakeServer

RESULTS_MD = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"

TTFT = 0.25
ITL = 0.04
TOKENS = 8
TOL = 0.1  # seconds late at most: scheduling noise on a shared, loaded 2-core machine
EARLY = 0.01  # seconds early at most: a token cannot be seen before the server sends it


def _near(measured: float, injected: float) -> bool:
    return injected - EARLY <= measured <= injected + TOL


def _spec(i: int, api: str = "completions", tokens: int = TOKENS, **kw) -> RequestSpec:
    if api == "chat":
        payload = {"messages": [ChatMessage(role="user", content=f"hello {i}")]}
    else:
        payload = {"prompt": f"hello number {i}"}
    return RequestSpec(request_id=f"r{i}", api=api, max_tokens=tokens, **payload, **kw)


def _run(server: FakeServer, specs, **load) -> RunResult:
    endpoint = EndpointConfig(base_url=server.url, model="fake-model")
    load.setdefault("progress", False)
    return asyncio.run(run_load(specs, endpoint, LoadConfig(**load)))


@pytest.fixture(scope="module")
def server():
    with FakeServer(FakeBehavior(ttft_s=TTFT, itl_s=ITL)) as srv:
        yield srv


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_ttft_and_itl_match_injected_delays(server, api):
    run = _run(server, [_spec(i, api) for i in range(4)], concurrency=2)
    for r in run.results:
        assert r.ok, r.error
        assert r.output_tokens == TOKENS and r.output_chunks == TOKENS
        # TTFT is the first token, not the first byte (a comment and, for chat, a role
        # chunk arrive at once) and not the end of the response (TTFT + 7 * ITL).
        assert _near(r.ttft_s, TTFT), r.ttft_s
        assert len(r.itl_s) == TOKENS - 1
        assert all(abs(g - ITL) <= TOL for g in r.itl_s), (
            r.itl_s
        )  # a late chunk shortens the next gap
        # The server sends against absolute deadlines, so lateness does not accumulate.
        assert abs(statistics.mean(r.itl_s) - ITL) < 0.015
        assert r.e2e_s >= TTFT + (TOKENS - 1) * ITL - 0.01


def test_ttft_would_fail_if_measured_at_the_end(server):
    """The end of the response is TTFT + 39 * ITL later: far outside the tolerance."""
    run = _run(server, [_spec(0, tokens=40)], concurrency=1)
    r = run.results[0]
    assert r.ok, r.error
    end_of_response = TTFT + 39 * ITL
    assert _near(r.ttft_s, TTFT)
    assert _near(r.e2e_s, end_of_response)
    assert r.e2e_s - r.ttft_s > 1.0


def test_request_body_is_streaming_with_usage_and_ignore_eos(server):
    server.behavior.received.clear()
    _run(server, [_spec(0, "chat")], concurrency=1)
    body = server.behavior.received[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == TOKENS
    assert body["messages"] == [{"role": "user", "content": "hello 0"}]


def _misbehaving(**kw) -> FakeServer:
    return FakeServer(FakeBehavior(ttft_s=0.01, itl_s=0.0, **kw))


@pytest.mark.parametrize(
    ("behavior", "reason"),
    [
        ({"fail_every": 2}, "HTTP 500"),
        ({"short_every": 2}, "expected 8 output tokens, got 7"),
        ({"cut_every": 2}, "stream ended without [DONE]"),
    ],
)
def test_failures_are_counted_never_dropped(behavior, reason):
    with _misbehaving(**behavior) as srv:
        run = _run(srv, [_spec(i) for i in range(6)], concurrency=1)
    assert len(run.results) == 6
    failed = [r for r in run.results if not r.ok]
    assert [r.request_id for r in failed] == ["r1", "r3", "r5"]
    assert all(r.error.startswith(reason) for r in failed), failed[0].error
    summary = summarize(run.results, run.duration_s, Slo(ttft_ms=1e6, itl_ms=1e6))
    assert (summary.completed, summary.failed, summary.num_requests) == (3, 3, 6)
    assert sum(summary.failures.values()) == 3
    assert summary.goodput.fraction == pytest.approx(0.5)


def test_connection_refused_is_a_failure():
    srv = _misbehaving()
    port = srv.port
    srv._sock.close()  # never started: nothing listens
    endpoint = EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    run = asyncio.run(run_load([_spec(0)], endpoint, LoadConfig(concurrency=1, progress=False)))
    assert not run.results[0].ok and "Connect" in run.results[0].error


def test_without_usage_tokens_are_counted_from_chunks():
    with _misbehaving(report_usage=False) as srv:
        run = _run(srv, [_spec(0)], concurrency=1)
    r = run.results[0]
    assert r.ok and r.usage_output_tokens is None and r.output_tokens == TOKENS


def test_closed_loop_keeps_concurrency_bounded():
    with FakeServer(FakeBehavior(ttft_s=0.2, itl_s=0.0)) as srv:
        run = _run(srv, [_spec(i, tokens=1) for i in range(8)], concurrency=4)
    # 8 requests, 4 at a time, 0.2 s each: two waves.
    assert 0.39 < run.duration_s < 1.0
    starts = sorted(r.start_s for r in run.results)
    assert starts[3] < 0.1 and starts[4] > 0.19


def test_open_loop_follows_poisson_arrivals():
    offsets = poisson_offsets(6, qps=20.0, seed=3)
    with FakeServer(FakeBehavior(ttft_s=0.3, itl_s=0.0)) as srv:
        run = _run(srv, [_spec(i, tokens=1) for i in range(6)], qps=20.0, seed=3)
    for r, off in zip(run.results, offsets, strict=True):
        assert _near(r.start_s, off)  # sent on schedule, not after the previous finished
    assert run.duration_s < offsets[-1] + 0.3 + 0.2


def test_dependent_turn_waits_for_previous():
    specs = [_spec(0, tokens=1), _spec(1, tokens=1, depends_on="r0")]
    with FakeServer(FakeBehavior(ttft_s=0.2, itl_s=0.0)) as srv:
        run = _run(srv, specs, concurrency=2)
    assert run.results[1].start_s >= run.results[0].start_s + 0.19


def test_dependencies_must_point_backwards():
    with pytest.raises(ValueError, match="not earlier"):
        check_dependencies([_spec(0, depends_on="r1"), _spec(1)])
    with pytest.raises(ValueError, match="duplicate"):
        check_dependencies([_spec(0), _spec(0)])


def test_load_config_needs_exactly_one_mode():
    with pytest.raises(ValueError):
        LoadConfig()
    with pytest.raises(ValueError):
        LoadConfig(concurrency=2, qps=1.0)


def test_percentiles_and_stats():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    s = stats_ms([0.001 * i for i in range(1, 101)])
    assert s.mean == pytest.approx(50.5) and s.p50 == pytest.approx(50.5)
    assert s.p99 == pytest.approx(99.01) and s.count == 100
    assert stats_ms([]).mean is None


def _result(ttft: float, gap: float, ok: bool = True) -> RequestResult:
    return RequestResult(
        request_id="x",
        ok=ok,
        start_s=0.0,
        ttft_s=ttft,
        itl_s=[gap] * 3,
        e2e_s=ttft + 3 * gap,
        output_tokens=4,
        output_chunks=4,
        expected_output_tokens=4,
    )


def test_goodput_counts_requests_meeting_both_slos():
    results = [_result(0.1, 0.01), _result(0.5, 0.01), _result(0.1, 0.2), _result(0.1, 0.01, False)]
    summary = summarize(results, 2.0, Slo(ttft_ms=200, itl_ms=50))
    assert summary.goodput.fraction == 0.25
    assert summary.goodput.requests_per_s == 0.5
    assert summary.output_tokens_per_s == 6.0  # 3 completed x 4 tokens / 2 s
    doc = json.loads(summary.model_dump_json())
    for key in ("completed", "failed", "ttft_ms", "itl_ms", "output_tokens_per_s", "goodput"):
        assert key in doc
    assert set(doc["ttft_ms"]) >= {"mean", "p50", "p90", "p99"}


def test_nixl_proxy_prefills_then_streams_from_decode():
    with (
        FakeServer(FakeBehavior(ttft_s=0.0, itl_s=0.0)) as pre,
        FakeServer(FakeBehavior(ttft_s=0.1, itl_s=0.02)) as dec,
    ):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(proxy.make_app(pre.url, dec.url), log_level="error"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            endpoint = EndpointConfig(base_url=url, model="fake-model")
            specs = [_spec(0), _spec(1, "chat")]
            load = LoadConfig(concurrency=1, progress=False)
            run = asyncio.run(run_load(specs, endpoint, load))
        finally:
            server.should_exit = True
            thread.join(5)
    assert all(r.ok for r in run.results), [r.error for r in run.results]
    assert _near(run.results[0].ttft_s, 0.1)
    p_body, d_body = pre.behavior.received[0], dec.behavior.received[0]
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False
    assert "stream_options" not in p_body
    assert p_body["kv_transfer_params"]["do_remote_decode"] is True
    assert d_body["kv_transfer_params"] == {"do_remote_prefill": True, "remote_block_ids": [0]}
    assert d_body["max_tokens"] == TOKENS and d_body["stream"] is True


def test_results_md_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results_md(path, "compare:doc-analysis", "old table\n")
    update_results_md(path, "transfer", "transfer table")
    update_results_md(path, "compare:sharegpt", "sharegpt table\n")
    update_results_md(path, "compare:doc-analysis", "new table\n")
    update_results_md(path, "transfer", "new transfer table")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n")
    assert "old table" not in text and text.count("new table") == 1
    assert "sharegpt table" in text and text.count("transfer table") == 1
    assert "<!-- compare:doc-analysis -->\nnew table\n<!-- /compare:doc-analysis -->\n" in text
    assert "<!-- transfer -->\nnew transfer table\n<!-- /transfer -->\n" in text
    assert text.index("new table") < text.index("new transfer table") < text.index("sharegpt")
    assert "cores" in machine_info()


def test_results_md_rewrites_the_committed_sections_in_place(tmp_path):
    """Every section of the committed RESULTS.md (both marker styles) is found and replaced in
    place: rewriting each with its own body leaves the file byte for byte the same."""
    original = RESULTS_MD.read_text()
    sections = re.findall(r"<!-- ([^/ ][^ ]*) -->\n(.*?)\n<!-- /\1 -->", original, re.DOTALL)
    names = [name for name, _ in sections]
    assert {"compare:doc-analysis", "transfer", "store", "routing"} <= set(names)
    path = tmp_path / "RESULTS.md"
    path.write_text(original)
    for name, body in sections:
        update_results_md(path, name, body)
    assert path.read_text() == original
    update_results_md(path, "store", "new store table")
    text = path.read_text()
    assert "<!-- store -->\nnew store table\n<!-- /store -->\n" in text
    assert len(text.splitlines()) < len(original.splitlines())
    assert text.replace("new store table", dict(sections)["store"]) == original

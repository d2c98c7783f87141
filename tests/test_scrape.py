"""disagg.scrape: the samples a poll keeps are exactly those it would read from the whole text."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from disagg.pool import POLLED
from disagg.scrape import parse


def test_only_keeps_the_named_samples_as_the_full_parse_reads_them():
    reg = CollectorRegistry()
    Counter("vllm:prompt_tokens", "p", ["model"], registry=reg).labels("m").inc(7)
    Counter("vllm:prompt_tokens_by_source", "p", ["source"], registry=reg).labels(
        "local_compute").inc(5)
    Gauge("vllm:num_requests_running", "r", registry=reg).set(3)
    Histogram("vllm:request_prefill_time_seconds", "t", registry=reg).observe(2.5)
    Histogram("vllm:inter_token_latency_seconds", "i", registry=reg).observe(0.1)
    Counter("vllm:disagg_store_loaded_tokens", "s", registry=reg).inc(256)
    text = generate_latest(reg).decode()
    full, kept = parse(text, "vllm:"), parse(text, "vllm:", only=POLLED)
    assert kept == {k: v for k, v in full.items() if k[0].startswith(POLLED)}
    assert {k[0] for k in kept} == {
        "vllm:prompt_tokens", "vllm:prompt_tokens_by_source", "vllm:num_requests_running",
        "vllm:request_prefill_time_seconds_sum", "vllm:disagg_store_loaded_tokens"}

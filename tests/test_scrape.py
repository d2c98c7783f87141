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
        "vllm:request_prefill_time_seconds_sum", "vllm:disagg_store_loaded_tokens",
        "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count"}


def test_the_fast_reader_agrees_with_prometheus_clients_parser():
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    c = Counter("vllm:odd", "o", ["model", "note"], registry=reg)
    c.labels("m", 'say "hi"\\ then\nnext, ok').inc(2)
    c.labels("m", "").inc(1)
    Gauge("vllm:nan", "n", registry=reg).set(float("nan"))
    Histogram("vllm:lat_seconds", "l", ["engine"], registry=reg).labels("0").observe(0.3)
    text = generate_latest(reg).decode()
    want: dict = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith("vllm:") and not smp.name.endswith("_created"):
                k = (smp.name.removesuffix("_total"), tuple(sorted(smp.labels.items())))
                want[k] = want.get(k, 0.0) + smp.value
    got = parse(text, "vllm:")
    nan = ("vllm:nan", ())
    assert got.keys() == want.keys() and got.pop(nan) != got.get(nan)  # NaN, as parsed
    assert got == {k: v for k, v in want.items() if k != nan}
    # A line outside the plain form goes to prometheus_client's parser: same answer.
    assert parse(text + 'vllm:odd_total{model="x"} 1 1700000000000\n', "vllm:")[
        ("vllm:odd", (("model", "x"),))] == 1

"""Benchmarks against any OpenAI-compatible server (``disagg bench``).

Module map:

- ``records``: typed requests (``RequestSpec``) and per-request measurements (``RequestResult``).
- ``workloads`` (+ ``sharegpt``, ``tokenizer``): the seed's three workloads, built up front.
- ``client``: one streaming request, timed (TTFT, ITL, tokens, failure reasons).
- ``loadgen``: open loop (Poisson at a QPS) and closed loop (fixed concurrency).
- ``metrics``: mean/p50/p90/p99, throughput, goodput at TTFT/ITL SLOs.
- ``runner``: one run end to end and its JSON report; ``cli``: the ``bench`` subcommand.

Test doubles (the fake OpenAI streaming server) live in ``tests/support/``, the comparison
scripts and their plots in ``benchmarks/``: neither is part of the installed package.
"""

"""The UCX transport report: what UCX_PROTO_INFO's tables say reads go over."""

from __future__ import annotations

import os

from disagg.pool import _kv_links, link_report
from disagg.scrape import parse
from disagg.transfer.nixl.ucx_info import TransportReport

# As UCX 1.18 writes it (UCX_PROTO_INFO=y), one table per endpoint configuration.
TABLES = """\
[1796543627.384282] [vm:15175:0]   | d intra-node cfg#1                                   |
[1796543627.384282] [vm:15175:0]   | active message by ucp_am_send*(egr) from host memory |
[1796543627.384282] [vm:15175:0]   +------------+--------------------+--------------------+
[1796543627.384282] [vm:15175:0]   |   1..16515 | zero-copy          | tcp/lo             |
[1796543627.386346] [vm:15175:0]   +--------+-------------+-------------------------------------------+
[1796543627.386346] [vm:15175:0]   | d intra-node cfg#1                                               |
[1796543627.386346] [vm:15175:0]   | remote memory read by ucp_get*(multi) into host memory from host |
[1796543627.386346] [vm:15175:0]   +--------+-------------+-------------------------------------------+
[1796543627.386346] [vm:15175:0]   | Range  | Description |                  Config                   |
[1796543627.386346] [vm:15175:0]   +--------+-------------+-------------------------------------------+
[1796543627.386346] [vm:15175:0]   | 0..inf | zero-copy   | cma/memory                                |
[1796543627.386346] [vm:15175:0]   +--------+-------------+-------------------------------------------+
[1796543627.388440] [vm:15175:1]   | p intra-node cfg#1                                       |
"""
NETWORK = """\
[1796543700.000001] [b:1:0]   | d inter-node cfg#2                                               |
[1796543700.000001] [b:1:0]   | remote memory read by ucp_get*(multi) into host memory from host |
[1796543700.000001] [b:1:0]   |     0..8K | short       | tcp/dgi-c                            |
[1796543700.000001] [b:1:0]   |  8K..inf | zero-copy   | tcp/dgi-c                             |
[1796543700.000001] [b:1:0]   +--------+-------------+-------------------------------------------+
"""


def test_the_newest_read_table_names_the_transport(tmp_path, monkeypatch):
    log = tmp_path / "e.ucx.%p"
    real = tmp_path / f"e.ucx.{os.getpid()}"
    monkeypatch.setenv("UCX_PROTO_INFO", "y")
    report = TransportReport(str(log))
    assert report.refresh() == "unknown"  # no file yet
    real.write_text(TABLES[:200])  # a write cut mid-line: nothing decided from half a row
    assert report.refresh() == "unknown"
    real.write_text(TABLES)
    assert report.refresh() == "cma/memory"  # not the active-message table's tcp/lo
    with real.open("a") as f:
        f.write(NETWORK)
    assert report.refresh() == "tcp/dgi-c"


def test_without_proto_info_there_is_nothing_to_read(tmp_path, monkeypatch):
    monkeypatch.delenv("UCX_PROTO_INFO", raising=False)
    assert TransportReport(str(tmp_path / "x.%p")).path is None


def test_per_peer_counters_become_status_rows_with_gbps():
    text = "\n".join([
        'vllm:disagg_kv_peer_bytes_total{engine="0",peer="prefill-0-ab",transport="tcp/eth0"} 2e9',
        'vllm:disagg_kv_peer_seconds_total{engine="0",peer="prefill-0-ab",transport="tcp/eth0"} 4',
        'vllm:disagg_kv_peer_pulls_total{engine="0",peer="prefill-0-ab",transport="tcp/eth0"} 10',
        'vllm:disagg_kv_peer_failures_total{engine="0",peer="prefill-1-cd",transport="cma/memory"} 1',
        ""])
    rows = link_report(_kv_links(parse(text, "vllm:")))
    assert rows == [
        {"peer": "prefill-0-ab", "transport": "tcp/eth0", "bytes": 2_000_000_000, "pulls": 10,
         "failures": 0, "gbps": 0.5},
        {"peer": "prefill-1-cd", "transport": "cma/memory", "bytes": 0, "pulls": 0,
         "failures": 1, "gbps": None}]

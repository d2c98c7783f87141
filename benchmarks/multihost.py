"""Multi-host benchmark: three simulated hosts (network namespaces joined into one Ray
cluster, ``tests/support/hosts.py``), KV over the links between them.

    sudo .venv/bin/python -m benchmarks.multihost [--requests 40] [--tokens 1024 4096 16384]

1. **The link.** One request's KV (``small`` geometry, as ``benchmarks/transfer.py``) pulled
   from host b by host c: our connector's pull against a raw NIXL READ of the same bytes over
   the same link, and the link's byte counter.
2. **Serving.** ``tiny`` with prefills placed on hosts a and b and decoders on b and c
   (``placement: {labels: {host: "in(...)"}, strategy: SPREAD}``), the gateway on a (this
   script re-runs itself there as the cluster's driver). doc-analysis through one same-host
   pair (prefill and decoder on one host), then one cross-host pair (the other instances
   drained), then everything while host c is cut off mid-run and comes back, then while
   host c's Ray node is killed (its decoder is replaced on host b).

Writes its tables into benchmarks/RESULTS.md and prints, last,
``multihost: hosts=3 requests=<n> lost=<n> kv_bytes_over_network=<bytes> cross_host_gbps=<x>
raw_nixl_gbps=<y>`` (the pull rates over the link at the largest size; lost counts requests
that failed other than a stream whose decoder was cut off mid-way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.results_md import update_results_md
from benchmarks.transfer import measure

CUT_MARK = "multihost-inner: cut now"
KILL_MARK = "multihost-inner: kill host c's raylet now"
RESULT_MARK = "multihost-inner-result: "
# The error events of a stream whose decoder went down mid-way: ours (the connection broke
# or the instance was marked down) or vLLM's own (its engine core died under it). Before
# the first token neither reaches the client: the gateway retries elsewhere.
ALLOWED = ("broke off", "EngineCore encountered an issue")


def _topology(gateway_ip: str) -> dict[str, Any]:
    spread = {"strategy": "SPREAD"}
    return {"model": "tiny",
            "engine": {"dtype": "float32", "max_model_len": 2048, "kv_cache_gib": 1,
                       "enforce_eager": True},
            "prefill": {"replicas": 2, "placement": {"labels": {"host": "in(a,b)"}, **spread}},
            "decode": {"replicas": 2, "placement": {"labels": {"host": "in(b,c)"}, **spread}},
            "scheduler": {"min_remote_prefill_tokens": 0},
            "store": {"enabled": False},
            "api": {"host": gateway_ip, "port": 8000}}


# ---- inside host a: the cluster's driver -----------------------------------------------------
def inner(args: argparse.Namespace) -> None:
    from disagg.bench.runner import load_tokenizer
    from disagg.bench.workloads import DOC_DEFAULTS, build_workload
    from disagg.launch.api import launch
    from disagg.models import prepare_model

    tok = load_tokenizer(prepare_model("tiny"))
    with launch(_topology(args.gateway_ip)) as dep:
        where = {m.key: urlsplit(m.info.url).hostname for m in dep.gateway.pool.members.values()}
        pairs = _pairs(dep, where)
        out: dict[str, Any] = {"placement": where, "phases": {}}

        def workload(seed: int) -> Any:  # fresh documents per phase: no earlier cache hits
            doc = replace(DOC_DEFAULTS["doc-analysis"], seed=seed)
            return build_workload("doc-analysis", tok, doc=doc, num_requests=args.requests)

        for seed, (name, (p, d)) in enumerate(pairs.items()):
            _route_only(dep, {p, d})
            out["phases"][name] = _phase(dep, workload(seed), p, d)
        _route_only(dep, set(where))
        wl = workload(len(pairs))
        timer = threading.Timer(args.cut_after, lambda: print(CUT_MARK, flush=True))
        timer.start()
        out["phases"]["host c cut mid-run"] = _phase(dep, wl, None, None)
        timer.cancel()
        # Host c's Ray node dies: its decoder's actor is restarted where its placement and
        # the free CPUs allow (host b), and the gateway follows it there.
        old = {k: dep.gateway.pool.members[k].info.engine_id
               for k, ip in where.items() if ip == args.victim_ip}
        killed = time.monotonic() + args.cut_after
        timer = threading.Timer(args.cut_after, lambda: print(KILL_MARK, flush=True))
        timer.start()
        out["phases"]["host c's Ray node killed mid-run"] = _phase(
            dep, workload(len(pairs) + 1), None, None)
        timer.cancel()
        out["replaced"] = _wait_replaced(dep, old, killed)
    print(RESULT_MARK + json.dumps(out), flush=True)


def _wait_replaced(dep: Any, old: dict[str, str], since: float,
                   timeout_s: float = 600) -> dict[str, Any]:
    """Where each instance of ``old`` (key -> engine id) serves again, and after how long."""
    deadline, out = time.monotonic() + timeout_s, {}
    while len(out) < len(old) and time.monotonic() < deadline:
        for key, engine in old.items():
            m = dep.gateway.pool.members[key]
            if key not in out and m.healthy and m.info.engine_id != engine:
                out[key] = {"host": urlsplit(m.info.url).hostname,
                            "after_s": round(time.monotonic() - since, 1)}
        time.sleep(0.5)
    return out


def _pairs(dep: Any, where: dict[str, str]) -> dict[str, tuple[str, str]]:
    """A (prefill, decode) pair on one host and one across hosts, from where Ray put them."""
    pre = [k for k in where if k.startswith("prefill")]
    dec = [k for k in where if k.startswith("decode")]
    same = next(((p, d) for p in pre for d in dec if where[p] == where[d]), None)
    cross = next(((p, d) for p in pre for d in dec if where[p] != where[d]), None)
    return {k: v for k, v in (("same host", same), ("cross host", cross)) if v is not None}


def _route_only(dep: Any, keys: set[str]) -> None:
    def apply() -> None:
        for key, member in dep.gateway.pool.members.items():
            member.draining = key not in keys
    dep.gateway.call(apply)


def _phase(dep: Any, wl: Any, prefill: str | None, decode: str | None) -> dict[str, Any]:
    from disagg.bench.client import EndpointConfig
    from disagg.bench.loadgen import LoadConfig
    from disagg.bench.metrics import Slo
    from disagg.bench.runner import run_bench

    before = _links(dep)
    r = run_bench(wl, EndpointConfig(dep.url, dep.served_model_name, request_timeout_s=300),
                  LoadConfig(concurrency=2, progress=False), Slo(ttft_ms=1e9, itl_ms=1e9))
    after = _links(dep)
    moved = {k: {f: v - before.get(k, {}).get(f, 0.0) for f, v in link.items()}
             for k, link in after.items()}
    failed = [x.error or "?" for x in r.requests if not x.ok]
    return {"pair": [prefill, decode], "requests": len(r.requests),
            "ttft_p50_ms": r.ttft_ms.p50, "ttft_mean_ms": r.ttft_ms.mean,
            "itl_p50_ms": r.itl_ms.p50,
            "lost": sum(not _allowed(e) for e in failed),
            "stream_cut": sum(_allowed(e) for e in failed),
            "failures": [e for e in failed if not _allowed(e)][:3],
            "links": [{"decode": d, "peer": p, "transport": t, **v}
                      for (d, p, t), v in moved.items() if v.get("bytes") or v.get("failures")]}


def _allowed(error: str) -> bool:
    return any(a in error for a in ALLOWED)


def _links(dep: Any) -> dict[tuple[str, str, str], dict[str, float]]:
    def read() -> dict:
        return {(m.key, peer, transport): dict(link)
                for m in dep.gateway.pool.members.values()
                for (peer, transport), link in m.kv_links.items()}
    return dep.gateway.call(read)


# ---- outside: hosts, the link benchmark, the driver on host a, the cut -----------------------
def outer(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.hosts import HostCluster

    # 3 CPUs a host: after host c dies, host b has room for c's decoder.
    with HostCluster(["a", "b", "c"], num_cpus=3) as hosts:
        b, c = hosts["b"], hosts["c"]
        link0 = c.link_bytes()
        link = [measure(t, args.repeats, netns=(b.ns, c.ns), holder_ip=b.ip)
                for t in args.tokens]
        link_bytes = c.link_bytes() - link0
        wire0 = {h.name: h.link_bytes() for h in hosts}
        serving = _drive(hosts, args)
        wire = {h.name: h.link_bytes() - wire0[h.name] for h in hosts}
    return {"link": link, "link_bytes": link_bytes, "serving": serving, "wire": wire}


def _drive(hosts: Any, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.multihost", "--inner", "--requests",
            str(args.requests), "--cut-after", str(args.cut_after), "--gateway-ip",
            hosts.head.ip, "--victim-ip", hosts["c"].ip]
    proc = hosts.head.popen(argv, env=hosts.ray_env(), stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(CUT_MARK):
            threading.Thread(target=_cut, args=(hosts["c"], args.cut_for), daemon=True).start()
        elif line.startswith(KILL_MARK):
            hosts.kill_raylet("c")
            print("multihost: host c's raylet killed", flush=True)
        elif line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        else:
            sys.stdout.write(line)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"the driver on host a failed (exit {proc.returncode})")
    return result


def _cut(host: Any, seconds: float) -> None:
    host.cut()
    print(f"multihost: host {host.name} cut off for {seconds:.0f} s", flush=True)
    time.sleep(seconds)
    host.restore()


def render(r: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "Three simulated hosts on one machine (network namespaces, a bridge, UCX over "
             "TCP on the links); absolute rates are this machine's kernel TCP, the ratios are "
             "what carries over.", "",
             "| tokens | KV bytes | ours GB/s | raw NIXL GB/s | ours/raw |", "|---|---|---|---|---|"]
    for x in r["link"]:
        ours, raw = x["bytes"] / x["ours_s"] / 1e9, x["bytes"] / x["raw_s"] / 1e9
        lines.append(f"| {x['tokens']} | {x['bytes'] / 2**20:.1f} MiB | {ours:.2f} | "
                     f"{raw:.2f} | {ours / raw:.2f} |")
    lines += ["", f"Link b-c carried {r['link_bytes'] / 1e6:.0f} MB during these pulls.", "",
              f"Placement: {r['serving']['placement']}", "",
              "| phase | pair | requests | TTFT p50 ms | TTFT mean ms | ITL p50 ms | lost | "
              "streams cut | pulls: peer, transport, MB, GB/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, p in r["serving"]["phases"].items():
        pulls = "; ".join(_pull_cell(k) for k in p["links"])
        pair = " -> ".join(x or "any" for x in p["pair"])
        ms = [f"{p[k]:.1f}" if p[k] is not None else "-"
              for k in ("ttft_p50_ms", "ttft_mean_ms", "itl_p50_ms")]
        lines.append(f"| {name} | {pair} | {p['requests']} | {' | '.join(ms)} | {p['lost']} | "
                     f"{p['stream_cut']} | {pulls} |")
    for name, p in r["serving"]["phases"].items():
        if p["failures"]:
            lines.append(f"\nLost in {name}: " + "; ".join(p["failures"]))
    for key, where in r["serving"].get("replaced", {}).items():
        lines.append(f"\nAfter host c's Ray node was killed, {key} serves again on "
                     f"{where['host']}, {where['after_s']:.0f} s after the kill.")
    lines += ["", "Bytes through each host's link during serving: " +
              ", ".join(f"{h}: {n / 1e6:.0f} MB" for h, n in r["wire"].items())]
    return "\n".join(lines)


def _pull_cell(k: dict[str, Any]) -> str:
    gbps = k.get("bytes", 0) / k["seconds"] / 1e9 if k.get("seconds") else None
    return (f"{k['peer']} -> {k['decode']} {k['transport']} {k.get('bytes', 0) / 1e6:.1f} MB"
            + (f" {gbps:.2f} GB/s" if gbps is not None else ""))


def summary_line(r: dict[str, Any]) -> str:
    phases = r["serving"]["phases"].values()
    where = r["serving"]["placement"]
    over_network = sum(k.get("bytes", 0) for p in phases for k in p["links"]
                       if _host_of(where, k["peer"]) != where.get(k["decode"]))
    top = r["link"][-1]
    return (f"multihost: hosts=3 requests={sum(p['requests'] for p in phases)} "
            f"lost={sum(p['lost'] for p in phases)} kv_bytes_over_network={over_network:.0f} "
            f"cross_host_gbps={top['bytes'] / top['ours_s'] / 1e9:.2f} "
            f"raw_nixl_gbps={top['bytes'] / top['raw_s'] / 1e9:.2f}")


def _host_of(where: dict[str, str], engine_id: str) -> str | None:
    """The address of the instance whose engine id is ``engine_id`` ("prefill-0-1a2b...")."""
    key = "-".join(engine_id.split("-")[:2])
    return where.get(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="doc-analysis requests per phase")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cut-after", type=float, default=8.0, help="seconds into the last phase")
    ap.add_argument("--cut-for", type=float, default=8.0)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gateway-ip", default="", help=argparse.SUPPRESS)
    ap.add_argument("--victim-ip", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
        return
    r = outer(args)
    table = render(r, " ".join(["python -m benchmarks.multihost", *sys.argv[1:]]))
    print(table)
    if not args.no_results:
        update_results_md(args.results, "multihost", f"## Multi-host\n\n{table}")
    print(summary_line(r), flush=True)


if __name__ == "__main__":
    main()

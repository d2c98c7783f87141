"""What the gateway costs: the same requests straight to a `tiny` engine and through the gateway.

    python -m benchmarks.gateway [--requests 400] [--seconds 8] [--connections 16]

One decode-only `tiny` deployment with ``api.workers`` gateway processes (default 2). In one
run, with the same request bodies (short completions, greedy, not streamed):

- latency: requests one at a time, alternating engine / gateway worker 0, p50 of each; the
  difference is what the gateway adds;
- gateway CPU per request: user+system CPU time of the gateway processes (the launcher's,
  which hosts worker 0, and each extra worker's) from /proc/<pid>/stat, read before and after
  each phase, divided by the requests served. The printed figure is raw: the processes' idle
  background (pool polls, KV events, Ray's threads in the launcher's process) is included;
  the table also shows it net of each process's background, measured while the engine alone
  is loaded (the pool then polls at its idle rate, so "net" still holds the busy polls);
- throughput: ``--connections`` keep-alive connections in a closed loop for ``--seconds``,
  against the engine (first and last, averaged), one gateway worker (its own address) and
  every worker (the shared port).

The load generator is a separate process (a raw HTTP/1.1 client on asyncio: parsing an
answer costs it a few tens of microseconds) so it shares no interpreter with the gateway;
on a small machine it still competes with the gateway and the engine for cores, which the
table states. The last line printed is
``gateway: cpu_ms_per_request=<x> added_p50_ms=<y> rps_ratio=<gateway/direct>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.results_md import machine_info, update_results_md

TICKS = os.sysconf("SC_CLK_TCK")
# The gateway before issue 12 (httpx to engines, FastAPI on every route, every prompt
# tokenized in a worker thread), measured by this benchmark's first version, api.workers 1;
# and before the second round (aiohttp to engines, a task per unless()), measured by this
# benchmark on the same machine as the round's own run.
BEFORE = ("Before the gateway's CPU work (commit 52080c6, an earlier sitting, 1 worker): "
          "CPU per request at load 2.34 ms, added p50 3.45 ms, throughput x0.89 of direct. "
          "Before its second round (commit e2c4a67: aiohttp to the engines; same machine, "
          "same day, same command): CPU per request at load 1.00 ms (net 0.95), added p50 "
          "1.82 ms, throughput x0.89 (1 worker) and x0.93 (2 workers) of direct.")


# ---- the load generator (its own process) ----------------------------------------------------
def _request_bytes(url: str, path: str, body: dict, headers: dict[str, str]) -> bytes:
    host = url.split("://", 1)[1].rstrip("/")
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class Conn:
    """One keep-alive HTTP/1.1 connection: send a prepared request, read the answer."""

    def __init__(self, url: str):
        host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, request: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 60)
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError(f"no Content-Length in {head[:200]!r}")
        length = int(lower[at + 15:lower.find(b"\r\n", at)])
        await asyncio.wait_for(self.reader.readexactly(length), 60)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _latency(targets: dict[str, bytes | list[bytes]], rounds: int) -> dict[str, list[float]]:
    """Each round, one request to every target in turn; per target, each latency (s)."""
    conns = {name: Conn(url) for name, url in targets["urls"].items()}  # type: ignore[union-attr]
    out: dict[str, list[float]] = {name: [] for name in conns}
    bodies: list[bytes] = targets["bodies"]  # type: ignore[assignment]
    for i in range(rounds):
        for name, conn in conns.items():
            req = bodies[name][i % len(bodies[name])]  # type: ignore[index]
            t0 = time.perf_counter()
            status = await conn.call(req)
            out[name].append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")
    for c in conns.values():
        c.close()
    return out


async def _throughput(url: str, bodies: list[bytes], connections: int,
                      seconds: float) -> dict[str, float]:
    """Closed loop: ``connections`` connections each send the next request when answered."""
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal done, errors
        conn, i = Conn(url), k
        while time.perf_counter() < stop:
            status = await conn.call(bodies[i % len(bodies)])
            i += connections
            done += status == 200
            errors += status != 200
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(connections)))
    return {"requests": done, "errors": errors, "seconds": time.perf_counter() - t0}


def client_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    with_headers = spec["headers"]

    def prepared(url: str) -> list[bytes]:
        return [_request_bytes(url, "/v1/completions", b, with_headers) for b in spec["bodies"]]

    if spec["mode"] == "latency":
        urls = spec["urls"]
        result: Any = asyncio.run(_latency(
            {"urls": urls, "bodies": {n: prepared(u) for n, u in urls.items()}},
            spec["rounds"]))
    else:
        result = asyncio.run(_throughput(spec["url"], prepared(spec["url"]),
                                         spec["connections"], spec["seconds"]))
    print(json.dumps(result))


def run_client(spec: dict) -> Any:
    """Run the load generator in a process of its own; its JSON result."""
    path = Path(f"/tmp/disagg-gateway-bench-{os.getpid()}.json")
    path.write_text(json.dumps(spec))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.gateway", "--client", str(path)],
                             check=True, capture_output=True, text=True, timeout=600)
    finally:
        path.unlink(missing_ok=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["client_cpu_s"] = (after.ru_utime + after.ru_stime - before.ru_utime
                              - before.ru_stime)  # the load generator's own CPU
    return result


# ---- the measurement ---------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICKS


def bodies(model: str, n: int = 32, max_tokens: int = 4) -> list[dict]:
    text = ("the gateway routes each request to an engine that holds its prefix and relays "
            "the answer back to the client ")
    return [{"model": model, "prompt": f"Request {i}: " + (text * 6).strip(),
             "max_tokens": max_tokens, "temperature": 0} for i in range(n)]


def gateway_workers(dep: Any) -> list[dict]:
    """Each gateway process: index, pid and its own URL (worker 0 is this process)."""
    workers = dep.status().get("workers")
    return workers or [{"index": 0, "pid": os.getpid(), "url": dep.url}]


def poll_parse_ms(url: str, headers: dict[str, str]) -> tuple[float, float, int]:
    """What one pool poll of ``url`` costs a gateway in parsing (ms) as the pool parses it
    (only the series it reads) and unfiltered, and the text's size: every worker parses
    every engine's /metrics each poll interval."""
    import timeit

    import httpx

    from disagg.pool import POLLED
    from disagg.scrape import parse

    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    polled = timeit.timeit(lambda: parse(text, "vllm:", only=POLLED), number=5) / 5
    everything = timeit.timeit(lambda: parse(text, "vllm:"), number=5) / 5
    return polled * 1e3, everything * 1e3, len(text)


class Meter:
    """CPU time of gateway processes over a phase, raw and net of each one's background."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.background = dict.fromkeys(pids, 0.0)  # CPU s per s, idle

    def idle(self, run: Any) -> Any:
        """Run ``run()`` while the gateway serves nothing: each process's background."""
        c0, t0 = {p: cpu_seconds([p]) for p in self.pids}, time.perf_counter()
        out = run()
        dt = time.perf_counter() - t0
        self.background = {p: (cpu_seconds([p]) - c0[p]) / dt for p in self.pids}
        return out

    def busy(self, pids: list[int], run: Any) -> tuple[Any, float, float]:
        """Run ``run()``; its result, and the CPU seconds ``pids`` used: raw and net."""
        c0, t0 = cpu_seconds(pids), time.perf_counter()
        out = run()
        used, dt = cpu_seconds(pids) - c0, time.perf_counter() - t0
        return out, used, max(0.0, used - sum(self.background[p] for p in pids) * dt)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from disagg.launch.api import launch  # heavy (Ray): only when run

    topo: dict[str, Any] = {
        "model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                    "kv_cache_gib": 1, "max_num_seqs": 64},
        "prefill": {"replicas": 0}, "decode": {"replicas": 1}}
    if args.workers > 1:
        topo["api"] = {"workers": args.workers}
    with launch(topo) as dep:
        engine = dep.instances["decode-0"].url
        workers = gateway_workers(dep)
        pids = [w["pid"] for w in workers]
        meter = Meter(pids)
        base = {"bodies": bodies(dep.served_model_name), "headers": dep.engine_headers()}
        w0 = workers[0]["url"]
        run_client({**base, "mode": "latency", "rounds": 30,
                    "urls": {"direct": engine, "gateway": w0}})  # warm-up
        load = {**base, "mode": "throughput", "connections": args.connections,
                "seconds": args.seconds}
        direct = meter.idle(lambda: run_client({**load, "url": engine}))
        res: dict[str, Any] = {"workers": len(workers),
                               "direct_rps": direct["requests"] / direct["seconds"],
                               "client_cpu_ms": direct["client_cpu_s"] / direct["requests"] * 1e3,
                               "background_cpu_ms_per_s": sum(meter.background.values()) * 1e3}
        res["poll_parse_ms"], res["full_parse_ms"], res["metrics_bytes"] = poll_parse_ms(
            engine, base["headers"])
        lat, used, net = meter.busy([pids[0]], lambda: run_client(
            {**base, "mode": "latency", "rounds": args.requests,
             "urls": {"direct": engine, "gateway": w0}}))
        res.update(direct_p50_ms=statistics.median(lat["direct"]) * 1e3,
                   gateway_p50_ms=statistics.median(lat["gateway"]) * 1e3,
                   serial_cpu_ms=used / args.requests * 1e3,
                   serial_net_cpu_ms=net / args.requests * 1e3)
        phases = [("gateway_1", w0, [pids[0]])]
        if len(workers) > 1:
            phases.append(("gateway_all", dep.url, pids))
        for name, url, serving in phases:
            out, used, net = meter.busy(serving, lambda u=url: run_client({**load, "url": u}))
            if out["errors"]:
                raise RuntimeError(f"{name}: {out['errors']} requests failed")
            res[f"{name}_rps"] = out["requests"] / out["seconds"]
            res[f"{name}_cpu_ms"] = used / max(out["requests"], 1) * 1e3
            res[f"{name}_net_cpu_ms"] = net / max(out["requests"], 1) * 1e3
        # Direct once more, last: other load on the machine drifts; the mean brackets it.
        again = run_client({**load, "url": engine})
        res["direct_rps"] = (res["direct_rps"] + again["requests"] / again["seconds"]) / 2
    return res


def render(r: dict[str, Any], command: str) -> str:
    added = r["gateway_p50_ms"] - r["direct_p50_ms"]
    rows = [
        "| measure | direct to engine | through gateway |",
        "|---|---|---|",
        f"| p50 latency, one at a time (ms) | {r['direct_p50_ms']:.2f} | "
        f"{r['gateway_p50_ms']:.2f} (+{added:.2f}) |",
        f"| gateway CPU per request, one at a time (ms) | - | {r['serial_cpu_ms']:.2f} "
        f"(net of background: {r['serial_net_cpu_ms']:.2f}) |",
        f"| throughput, 1 gateway worker (req/s) | {r['direct_rps']:.0f} | "
        f"{r['gateway_1_rps']:.0f} (x{r['gateway_1_rps'] / r['direct_rps']:.2f}) |",
        f"| gateway CPU per request at load, 1 worker (ms) | - | {r['gateway_1_cpu_ms']:.2f} "
        f"(net of background: {r['gateway_1_net_cpu_ms']:.2f}) |",
        f"| load generator CPU per request at load (ms) | {r['client_cpu_ms']:.2f} | - |",
        f"| gateway processes' idle background, all workers (CPU ms per s) | - | "
        f"{r['background_cpu_ms_per_s']:.0f} |",
        f"| one pool poll: parsing the engine's /metrics ({r['metrics_bytes'] / 1024:.0f} KiB), "
        f"per worker per engine every 0.5 s busy / 2 s idle (ms) | - | "
        f"{r['poll_parse_ms']:.1f} (unfiltered: {r['full_parse_ms']:.1f}) |",
    ]
    if "gateway_all_rps" in r:
        rows += [f"| throughput, {r['workers']} gateway workers (req/s) | "
                 f"{r['direct_rps']:.0f} | {r['gateway_all_rps']:.0f} "
                 f"(x{r['gateway_all_rps'] / r['direct_rps']:.2f}) |",
                 f"| gateway CPU per request at load, {r['workers']} workers (ms) | - | "
                 f"{r['gateway_all_cpu_ms']:.2f} (net: {r['gateway_all_net_cpu_ms']:.2f}) |"]
    return "\n".join([f"Command: `{command}`", "", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--client", help=argparse.SUPPRESS)  # the load generator's own process
    ap.add_argument("--workers", type=int, default=2, help="api.workers of the deployment")
    ap.add_argument("--requests", type=int, default=400, help="latency phase, per target")
    ap.add_argument("--seconds", type=float, default=8.0, help="each throughput phase")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    r = measure(args)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    cmd = ("python -m benchmarks.gateway " + " ".join(sys.argv[1:])).strip()
    table = render(r, cmd)
    body = (f"## Gateway overhead: `tiny`, decode-only, short completions\n\nMachine: "
            f"{machine_info()}. One `tiny` engine; the gateway (api.workers="
            f"{r['workers']}) and the load generator (its own process) share the remaining "
            f"core(s) with it, so at load the client's own CPU competes with the gateway's: "
            f"throughput ratios are lower bounds. CPU from /proc/<pid>/stat of the gateway "
            f"processes, idle background included. Load average (1/5/15 min) before and after "
            f"the run: {'/'.join(load_before)}, {'/'.join(load_after)}: other work on the "
            f"machine competes too.\n\n{table}\n\n{BEFORE}")
    update_results_md(args.results, "gateway", body)
    print(table)
    print(json.dumps(r))
    print(f"gateway: cpu_ms_per_request={r['gateway_1_cpu_ms']:.2f} "
          f"added_p50_ms={r['gateway_p50_ms'] - r['direct_p50_ms']:.2f} "
          f"rps_ratio={r.get('gateway_all_rps', r['gateway_1_rps']) / r['direct_rps']:.2f}")


if __name__ == "__main__":
    main()

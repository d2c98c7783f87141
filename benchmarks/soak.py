"""Fault soak: mixed load on a real 1P1D deployment while engines, actors, Redis and disk
chunks fail; nothing may be lost, hang or come back wrong.

    .venv/bin/python -m benchmarks.soak [--duration 600] [--clients 4] [--fault-every 20]

Load: completions and chat, streamed and not, long prompts (they take the prefill hop and
fill the KV store) and short ones, and clients that drop their request part-way. Faults:
``benchmarks/faults.py``, one at a time. Every request ends as one of

    ok         finished, greedy output identical to the fault-free reference
    cancelled  the client dropped it (by design)
    allowed    a stream that ended with an error event while its decoder was killed
    wrong      finished with another output              (must be 0)
    lost       any other error                           (must be 0)
    hung       no answer by its deadline                 (must be 0)

At the end: every instance healthy again, KV usage back at its idle baseline (``leaked_blocks``
counts the blocks still in use), the disk and Redis tiers within their caps, and after
shutdown no engine process left. It prints, last,
``soak: requests=<n> faults=<n> lost=0 hung=0 wrong=0 leaked_blocks=0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.faults import KINDS, FaultInjector, FaultLog, wait_whole
from benchmarks.results_md import update_results_md
from disagg.scrape import series, total
from tests.support.redis_server import redis_server

OUTCOMES = ("ok", "cancelled", "allowed", "wrong", "lost", "hung")
OUTPUT_TOKENS = 12


@dataclass(frozen=True)
class Shape:
    """One request shape of the mix; ``prompt`` indexes the prompt pool."""

    chat: bool
    stream: bool
    prompt: int
    cancel: bool


def prompts(seed: int) -> list[str]:
    """Long prompts share a prefix (prefix cache and store hits), short ones do not."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(5000)}" for _ in range(4000)]
    doc = " ".join(words[:600])
    long = [f"{doc} question {i}: " + " ".join(words[600 + 40 * i:640 + 40 * i])
            for i in range(4)]
    short = [f"say something about {w}" for w in words[3000:3004]]
    return long + short


def body(model: str, shape: Shape, texts: list[str]) -> tuple[str, dict[str, Any]]:
    common = {"model": model, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
              "ignore_eos": True, "stream": shape.stream}
    if shape.chat:
        return "/v1/chat/completions", {
            **common, "messages": [{"role": "user", "content": texts[shape.prompt]}]}
    return "/v1/completions", {**common, "prompt": texts[shape.prompt]}


def answer_text(resp: httpx.Response, shape: Shape) -> tuple[str, bool]:
    """(generated text, whether the stream ended with an error event)."""
    if not shape.stream:
        choice = resp.json()["choices"][0]
        return (choice["message"]["content"] if shape.chat else choice["text"]), False
    text, errored = [], False
    for line in resp.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errored = True
            continue
        for c in event.get("choices") or []:
            text.append((c.get("delta") or {}).get("content") or "" if shape.chat
                        else c.get("text") or "")
    return "".join(text), errored


class Load:
    """Client threads sending the mix until stopped; outcomes counted by shape kind."""

    def __init__(self, dep: Any, texts: list[str], reference: dict[tuple[bool, int], str],
                 faults: FaultLog, clients: int, deadline_s: float, seed: int) -> None:
        self.url, self.model = dep.url, dep.served_model_name
        self.texts, self.reference, self.faults = texts, reference, faults
        self.deadline_s, self.seed, self.clients = deadline_s, seed, clients
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.examples: dict[str, str] = {}  # outcome -> one example, for the report
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(clients)]
        self._dep = dep
        self._running: dict[int, tuple[float, str]] = {}  # client -> (start, path)
        self._threads.append(threading.Thread(target=self._watch, daemon=True))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(self.deadline_s + 30)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(timeout=self.deadline_s) as client:
            while not self.stop.is_set():
                shape = Shape(chat=rng.random() < 0.5, stream=rng.random() < 0.5,
                              prompt=rng.randrange(len(self.texts)),
                              cancel=rng.random() < 0.15)
                self._running[index] = (time.monotonic(), "chat" if shape.chat else "completion")
                outcome, detail = self._one(client, shape)
                self._running.pop(index, None)
                kind = f"{'chat' if shape.chat else 'completion'}" \
                       f"{'+stream' if shape.stream else ''}"
                with self._lock:
                    self.outcomes[(kind, outcome)] += 1
                    self.examples.setdefault(outcome, detail)

    def _watch(self) -> None:
        """Once a request has waited half its deadline, print where the gateway's tasks
        wait (while it still waits): a hang shows its cause, not only its count."""
        dumped = False
        while not self.stop.wait(2.0) and not dumped:
            now = time.monotonic()
            slow = [(now - t, path) for t, path in list(self._running.values())
                    if now - t > self.deadline_s / 2]
            if slow:
                dumped = True
                print(f"soak: a request waits {slow[0][0]:.0f} s ({slow[0][1]}); gateway "
                      f"tasks:\n{gateway_tasks(self._dep)}", flush=True)

    def _one(self, client: httpx.Client, shape: Shape) -> tuple[str, str]:
        path, payload = body(self.model, shape, self.texts)
        start = time.monotonic()
        try:
            if shape.cancel:  # the client drops it: after the first chunk, or soon
                with client.stream("POST", self.url + path, json=payload,
                                   timeout=0.3 if not shape.stream else self.deadline_s) as r:
                    next(r.iter_bytes(), None)
                return "cancelled", ""
            resp = client.post(self.url + path, json=payload)
        except httpx.TimeoutException:
            if shape.cancel:
                return "cancelled", ""
            return "hung", f"{path} after {time.monotonic() - start:.0f} s"
        except httpx.HTTPError as exc:
            return "lost", f"{path}: {type(exc).__name__}: {exc}"
        if resp.status_code != 200:
            return "lost", f"{path}: HTTP {resp.status_code} {resp.text[:200]}"
        text, errored = answer_text(resp, shape)
        if errored:
            died = self.faults.decode_fault_near(start, time.monotonic())
            return ("allowed" if died else "lost"), f"{path}: stream error event"
        want = self.reference[(shape.chat, shape.prompt)]
        return ("ok", "") if text == want else ("wrong", f"{text!r} != {want!r}")


def gateway_tasks(dep: Any) -> str:
    """The stacks of the gateway's request tasks, and its pool's states."""
    gw = dep.gateway

    async def dump() -> str:
        out = [f"pool: {[(m.key, m.status) for m in gw.pool.members.values()]}"]
        for task in asyncio.all_tasks():
            buf = io.StringIO()
            task.print_stack(limit=12, file=buf)
            out.append(buf.getvalue())
        return "\n".join(out)
    try:
        return asyncio.run_coroutine_threadsafe(dump(), gw.loop).result(10)
    except Exception as exc:  # noqa: BLE001  # diagnostics only
        return f"(could not dump: {exc!r})"


def reference(dep: Any, texts: list[str]) -> dict[tuple[bool, int], str]:
    """Each prompt's greedy output, fault-free, through the deployment itself."""
    out = {}
    for chat in (False, True):
        for i in range(len(texts)):
            shape = Shape(chat, False, i, False)
            path, payload = body(dep.served_model_name, shape, texts)
            resp = httpx.post(dep.url + path, json=payload, timeout=300)
            resp.raise_for_status()
            out[(chat, i)] = answer_text(resp, shape)[0]
    return out


def leaked_blocks(dep: Any, wait_s: float) -> tuple[int, float]:
    """KV blocks still in use on all instances once the load is gone (0 when every
    instance is back at its idle baseline), waiting up to ``wait_s``; and the wait. An
    instance that does not answer counts as not back yet."""
    start = time.monotonic()
    while True:
        used, answered = 0.0, True
        for info in dep.status()["instances"]:
            try:
                s = series(info["url"], "vllm:", headers=dep.engine_headers())
            except httpx.HTTPError:
                answered = False
                continue
            blocks = max((float(dict(lab).get("num_gpu_blocks", 0))
                          for (n, lab) in s if n == "vllm:cache_config_info"), default=0.0)
            used += total(s, "vllm:kv_cache_usage_perc") * blocks
        if (answered and round(used) == 0) or time.monotonic() - start > wait_s:
            return (round(used) if answered else -1), time.monotonic() - start
        time.sleep(1.0)


def tier_use(disk_dir: Path, redis: Any) -> dict[str, int]:
    """Bytes held by the disk tier's files and by the Redis tier's values."""
    disk = sum(p.stat().st_size for p in disk_dir.rglob("*") if p.is_file())
    import redis as redis_client  # the benchmark's own check, not the product's client

    r = redis_client.Redis.from_url(redis.url)
    held = sum(r.strlen(k) for k in r.scan_iter(count=1000) if r.type(k) == b"string")
    return {"disk": disk, "redis": held}


def engine_processes() -> set[int]:
    """Every vLLM engine process on this machine (API servers, cores, workers)."""
    pids = set()
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd or "disagg.supervise" in cmd or \
                (p.info["name"] or "").startswith("VLLM::"):
            pids.add(p.pid)
    return pids


def render(load: Load, faults: FaultLog, args: argparse.Namespace, extra: dict) -> str:
    kinds = sorted({k for k, _ in load.outcomes})
    command = " ".join(["python -m benchmarks.soak", *sys.argv[1:]])
    lines = [f"Command: `{command}`", "",
        f"{args.duration:.0f} s, {args.clients} clients, a fault every {args.fault_every:.0f} s "
        f"(once the deployment is whole again), 1P1D `tiny` float32, disk + Redis tiers.", "",
        "| fault | injected |", "|---|---|"]
    lines += [f"| {k} | {faults.counts.get(k, 0)} |" for k in KINDS]
    lines += ["", "| request kind | " + " | ".join(OUTCOMES) + " |",
              "|---" * (len(OUTCOMES) + 1) + "|"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(str(load.outcomes.get((kind, o), 0))
                                                  for o in OUTCOMES) + " |")
    lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from disagg.launch.api import launch  # heavy (Ray): only when run

    before = engine_processes()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        disk = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="disagg-soak-")))
        caps = {"disk_gib": 0.25, "redis_gib": 0.25}
        topo = {"model": "tiny", "engine": {"dtype": "float32", "max_model_len": 2048,
                                            "kv_cache_gib": 1, "enforce_eager": True},
                "transfer": {"transfer_timeout_s": 10},
                "store": {"disk_path": str(disk), "redis_url": redis.url, **caps}}
        dep = stack.enter_context(launch(topo))
        texts = prompts(args.seed)
        ref = reference(dep, texts)
        injector = FaultInjector(dep, redis, disk, args.fault_every, args.seed)
        load = Load(dep, texts, ref, injector.log, args.clients, args.deadline, args.seed)
        load.start()
        injector.start()
        time.sleep(args.duration)
        injector.stop.set()
        load.join()
        injector.join(600)
        whole = wait_whole(dep, timeout_s=600)
        injector.remember_pids()
        leaked, waited = leaked_blocks(dep, wait_s=90)
        # The gateway's per-instance in-flight counts (load-aware routing and stall
        # detection read them) are back at zero: no request left one behind.
        inflight = dep.gateway.call(
            lambda: sum(m.candidate.inflight for m in dep.gateway.pool.members.values()))
        use = tier_use(disk, redis)
    time.sleep(5)
    left = (engine_processes() - before) | {p for p in injector.log.pids if psutil.pid_exists(p)
                                            and psutil.Process(p).status() != "zombie"}
    counts = Counter()
    for (_, outcome), n in load.outcomes.items():
        counts[outcome] += n
    return {"load": load, "faults": injector.log, "counts": counts, "whole": whole,
            "leaked": leaked, "waited": waited, "use": use, "caps": caps, "inflight": inflight,
            "left": sorted(left), "injector_error": injector.error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--fault-every", type=float, default=20.0)
    ap.add_argument("--deadline", type=float, default=120.0, help="per-request seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    r = run(args)
    c, caps = r["counts"], r["caps"]
    within = all(r["use"][t] <= caps[f"{t}_gib"] * 2**30 for t in ("disk", "redis"))
    extra = {"back to whole": r["whole"], "KV back at baseline after (s)": f"{r['waited']:.0f}",
             "tier bytes": r["use"], "tiers within caps": within,
             "gateway in-flight counts left": r["inflight"],
             "engine processes left": len(r["left"])}
    table = render(r["load"], r["faults"], args, extra)
    print(table)
    for outcome, example in r["load"].examples.items():
        if outcome not in ("ok", "cancelled"):
            print(f"example {outcome}: {example}")
    if not args.no_results:
        update_results_md(args.results, "soak", f"## Fault soak\n\n{table}")
    if r["injector_error"] is not None:
        print(f"soak: the fault injector failed: {r['injector_error']!r}")
    n = sum(c.values())
    nfaults = sum(r["faults"].counts.values())
    ok = (c["lost"] == c["hung"] == c["wrong"] == r["leaked"] == r["inflight"] == 0
          and r["whole"] and within
          and not r["left"] and r["injector_error"] is None and nfaults > 0)
    print(f"soak: requests={n} faults={nfaults} lost={c['lost']} hung={c['hung']} "
          f"wrong={c['wrong']} leaked_blocks={r['leaked']}", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

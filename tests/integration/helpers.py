"""Helpers for integration tests: plain vLLM servers, prompts, metric scraping."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from disagg.credentials import SECRET_ENV, engine_token
from disagg.instance import free_port
from disagg.scrape import total


@contextmanager
def plain_vllm(model: Path, engine: dict, cores: str = "0-1",
               log: Path | None = None) -> Iterator[str]:
    """A plain vLLM OpenAI server (no connector) with the same engine arguments;
    ``engine["tensor_parallel_size"]`` > 1 runs that many ranks (``cores``: one list per
    rank, ``|``-separated, as vLLM's CPU backend wants)."""
    port = free_port()
    tp = int(engine.get("tensor_parallel_size", 1))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", engine["served_model_name"], "--port", str(port),
           "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
           "--seed", "0", "--max-num-seqs", str(engine.get("max_num_seqs", 64)),
           "--tensor-parallel-size", str(tp),
           "--distributed-executor-backend", "mp" if tp > 1 else "uni"]
    if engine.get("enforce_eager"):
        cmd.append("--enforce-eager")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(engine.get("kv_cache_gib", 2)),
               VLLM_CPU_OMP_THREADS_BIND=cores)
    out = open(log or os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 900)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def token_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths spread over [lo, hi] (both ends included)."""
    rng = random.Random(seed)
    lo, hi = lengths
    sizes = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(10, vocab) for _ in range(k)] for k in sizes]


def complete(url: str, model: str, prompt, max_tokens: int, stream: bool,
             chat: bool = False, timeout: float = 300) -> list[int]:
    """Greedy generation; returns the generated token ids (streamed or not)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "return_token_ids": True, "ignore_eos": True}
    if chat:
        body["messages"] = prompt
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    if not stream:
        r = httpx.post(url + path, json=body, timeout=timeout, headers=engine_headers())
        r.raise_for_status()
        return list(r.json()["choices"][0]["token_ids"])
    ids: list[int] = []
    with httpx.stream("POST", url + path, json=body, timeout=timeout,
                      headers=engine_headers()) as r:
        r.raise_for_status()
        # Events end with a blank line; iter_lines() would also split inside a JSON string
        # at characters like U+2028 or U+0085, which generated text may hold.
        for event in r.read().decode().split("\n\n"):
            if event.startswith("data: ") and event != "data: [DONE]":
                choices = json.loads(event[6:]).get("choices") or []
                for c in choices:
                    ids.extend(c.get("token_ids") or [])
    return ids


def engine_headers() -> dict[str, str]:
    """The Authorization every engine of this test session's deployments requires (the
    session pins the deployment secret: tests/conftest.py). The gateway ignores it."""
    return {"Authorization": f"Bearer {engine_token(os.environ[SECRET_ENV])}"}


def scrape(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series (``name`` without _total) across matching labels, from a
    gateway or an engine."""
    return total(url, name, headers=engine_headers(), **labels)


def wait_counter(url: str, name: str, at_least: float, timeout: float = 30.0) -> float:
    """vLLM publishes connector counters on its stats tick: poll until one reaches a value."""
    deadline = time.monotonic() + timeout
    while (value := scrape(url, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} stuck at {value} < {at_least} on {url}"
        time.sleep(0.5)
    return value

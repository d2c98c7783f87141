"""Pools grow and shrink under load (closed loop, 8 in flight) without losing a request;
the admin endpoints (status, scale) and the CLI's scale command work."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


class ClosedLoop:
    """``n`` clients sending requests back to back until stopped; counts every outcome."""

    def __init__(self, url: str, n: int = 8, headers: dict | None = None):
        self.url, self.ok, self.failed, self.errors = url, 0, 0, []
        self.headers = headers or {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(n)]

    def _client(self, i: int) -> None:
        k = 0
        with httpx.Client(timeout=300, headers=self.headers) as client:
            while not self._stop.is_set():
                k += 1
                body = {"model": "tiny", "prompt": [11 + i] * (300 + 7 * (k % 20)),
                        "max_tokens": 8, "ignore_eos": True}
                try:
                    r = client.post(self.url + "/v1/completions", json=body)
                    good = r.status_code == 200 and \
                        r.json()["usage"]["completion_tokens"] == 8
                    err = None if good else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    err = repr(exc)
                with self._lock:
                    if err is None:
                        self.ok += 1
                    else:
                        self.failed += 1
                        self.errors.append(err)

    def __enter__(self) -> ClosedLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)


def _routed(url: str, key: str) -> float:
    from tests.integration.helpers import scrape

    return scrape(url, "disagg_instance_requests", instance=key)


def _check_admin_endpoints(dep) -> None:
    """Status needs the key and shows decisions; bad scale requests get OpenAI errors."""
    auth = {"Authorization": "Bearer k"}
    assert httpx.get(dep.url + "/v1/disagg/status").status_code == 401
    st = httpx.get(dep.url + "/v1/disagg/status", headers=auth).json()
    assert [i["key"] for i in st["instances"]] == ["prefill-0", "decode-0"]
    assert st["recent_decisions"][-1]["reason"] == "always_remote"
    assert st["index"]["max_entries"] > 0
    for body, code in (({"decode": 0}, 400), ({"decode": -1}, 400),
                       ({"replicas": 2}, 400), ({"decode": "2"}, 400)):
        r = httpx.post(dep.url + "/v1/disagg/scale", headers=auth, json=body)
        assert r.status_code == code, (body, r.text)
        assert r.json()["error"]["message"]


def test_scale_up_and_down_under_load_loses_nothing():
    from disagg.launch.api import launch

    half = {"resources": {"num_cpus": 0.5}}
    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            "prefill": half, "decode": half, "api": {"api_key": "k"},
            "scheduler": {"min_remote_prefill_tokens": 0, "decode_policy": "round_robin"}}
    with launch(topo) as dep, ClosedLoop(dep.url, headers={"Authorization": "Bearer k"}) \
            as load:
        time.sleep(3)
        _check_admin_endpoints(dep)
        status = dep.scale(decode=2)  # blocks until decode-1 is healthy and routed
        assert [i["key"] for i in status["instances"]] == ["prefill-0", "decode-0",
                                                             "decode-1"]
        deadline = time.monotonic() + 120
        while _routed(dep.url, "decode-1") < 4:
            assert time.monotonic() < deadline, "the new decoder gets no requests"
            time.sleep(1)
        # Through the gateway's admin endpoint, as an operator would: drain the newest
        # decoder and the only prefill (every request then prefills on its decoder).
        out = subprocess.run([sys.executable, "-m", "disagg.launch.cli", "scale", "--url", dep.url,
                              "--api-key", "k", "--decode", "1", "--prefill", "0"],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        assert "decode-0" in out.stdout and "decode-1" not in out.stdout
        done = load.ok
        time.sleep(5)
        assert load.ok > done  # still serving, now without a prefill pool
    assert load.failed == 0, load.errors[:5]
    assert load.ok > 20

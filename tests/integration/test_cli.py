"""`disagg serve` from the shell: serves, stops on SIGTERM and on SIGINT, leaves nothing;
and the same command under `ray job submit` against a running `ray start --head`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from disagg.instance import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _topology(tmp_path: Path) -> Path:
    """examples/1p1d.yaml with a smaller KV cache and eager mode (faster start in tests)."""
    text = (ROOT / "examples" / "1p1d.yaml").read_text()
    assert "kv_cache_gib: 2" in text
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("kv_cache_gib: 2", "kv_cache_gib: 1\n  enforce_eager: true"))
    return path


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_serving(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"serving '(\w+)' at (http://\S+)", log.read_text())
        if m:
            return m.group(2)
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise TimeoutError(log.read_text()[-3000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_disagg_serve_stops_cleanly(tmp_path, sig):
    log = tmp_path / "serve.log"
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "disagg"), "serve", str(_topology(tmp_path)),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    try:
        url = _wait_serving(proc, log)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                       "max_tokens": 4}, timeout=120)
        assert r.status_code == 200
        tree = _descendants(proc.pid)
        assert len(tree) >= 6
        # Like a terminal's Ctrl-C, the signal reaches the whole process group.
        os.killpg(proc.pid, sig)
        assert proc.wait(120) == 0
        deadline = time.monotonic() + 60
        while alive := [p for p in tree if p.is_running()
                        and p.status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, [p.cmdline()[:3] for p in alive]
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_bad_topology_is_reported_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  replica: 2\n")
    r = subprocess.run([str(BIN / "disagg"), "serve", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "decode.replica" in r.stderr and "unknown field" in r.stderr


@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI missing")
def test_ray_job_submit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    # A loopback-only throwaway cluster: no token auth (Ray 2.60 turns it on by default and
    # keeps the token where this test's private temp dir would hide it from the client).
    env["RAY_AUTH_MODE"] = "disabled"
    dash = free_port()
    # A short temp dir of its own: Ray's socket paths must stay short, and at the end only
    # this cluster's processes are stopped (`ray stop` would stop every cluster here).
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "2",
                    "--port", str(free_port()), "--dashboard-port", str(dash),
                    "--include-dashboard", "true", "--disable-usage-stats",
                    "--temp-dir", ray_tmp], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    port = free_port()
    job = None
    try:
        topo = _topology(tmp_path).read_text()
        (tmp_path / "job").mkdir()
        shutil.copytree(ROOT / "examples", tmp_path / "job" / "examples")
        (tmp_path / "job" / "examples" / "test.yaml").write_text(topo)
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
             "--working-dir", str(tmp_path / "job"), "--",
             "disagg", "serve", "examples/test.yaml", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stderr
        job = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "job never served"
            time.sleep(2)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello",
                                                       "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        if job:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job],
                           env=env, capture_output=True, timeout=120)
        _stop_cluster(ray_tmp)


def _stop_cluster(ray_tmp: str) -> None:
    """Stop the processes of the cluster whose temp dir is ``ray_tmp``, and their children."""
    procs = [p for p in psutil.process_iter(["cmdline"])
             if any(ray_tmp in a for a in (p.info["cmdline"] or []))]
    tree = {c for p in procs for c in _descendants(p.pid)} | set(procs)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(tree), timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    shutil.rmtree(ray_tmp, ignore_errors=True)

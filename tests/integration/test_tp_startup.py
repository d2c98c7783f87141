"""Tensor-parallel instances start on this CPU, and an instance that fails to start ends
`disagg serve`, `launch()` and `ray job submit` with its root cause and a clean exit.

The failure is an early one: a max_model_len beyond the model's positions, which vLLM's API
server refuses while building its config, in the issue's topology (prefill at TP 2, whose
engine died on "CPU id list ['0'] doesn't match local world size 2" before each rank got a
bind list, and decode at TP 1). "Clean" means: a nonzero status, the root cause in the output, no "Fatal Python
error" (the engine supervisor used to abort at shutdown: "_enter_buffered_busy ... <stdin>"),
and no process of the run left behind: every process the run started (Ray, actors, engine
supervisors, vLLM) inherits a marker in its environment, and none may remain.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from disagg.instance import free_port
from tests.integration.test_cli import _stop_cluster

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
MARK = "DISAGG_TEST_RUN"
CAUSE = "User-specified max_model_len (100000) is greater than the derived max_model_len"
FAILING = """\
model: tiny
engine: {dtype: float32, max_model_len: 100000, kv_cache_gib: 1, enforce_eager: true}
prefill: {replicas: 1, tensor_parallel_size: 2, resources: {num_cpus: 1}}
decode: {replicas: 1, tensor_parallel_size: 1, resources: {num_cpus: 1}}
"""
LAUNCH = """\
import sys
from disagg.launch.api import StartupError, launch
try:
    launch(sys.argv[1])
except StartupError as exc:
    print(f"caught: {exc}", flush=True)
    sys.exit(3)
"""


def _marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARK=mark``."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _assert_none_left(mark: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while left := _marked(mark):
        if time.monotonic() > deadline:
            names = []
            for p in left:
                with contextlib.suppress(psutil.Error):
                    names.append(" ".join(p.cmdline()[:4]))
            for p in left:  # don't leave them to the next test
                with contextlib.suppress(psutil.Error):
                    p.kill()
            pytest.fail(f"left behind: {names}")
        time.sleep(1)


def _run(cmd: list[str], tmp_path: Path, timeout_s: float = 300,
         env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``cmd`` with a fresh marker; its status, output (stdout + stderr) and marker."""
    mark = uuid.uuid4().hex
    env = {**(env or os.environ), MARK: mark}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr, mark


def _assert_clean_failure(code: int, out: str, mark: str, want_code: int = 1) -> None:
    assert code == want_code, out[-4000:]
    # both instances refuse the config; the first to fail is named
    assert re.search(r"instance (prefill|decode)-0 failed to start", out), out[-4000:]
    assert CAUSE in out, out[-4000:]
    assert "Fatal Python error" not in out, out[-4000:]
    _assert_none_left(mark)


@pytest.fixture
def failing(tmp_path: Path) -> Path:
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING)
    return path


def test_serve_reports_a_start_up_failure_and_exits_cleanly(tmp_path, failing):
    code, out, mark = _run([str(BIN / "disagg"), "serve", str(failing), "--port",
                            str(free_port())], tmp_path)
    _assert_clean_failure(code, out, mark)
    # the root cause leads, not a traceback through Ray
    first = next(line for line in out.splitlines() if line.startswith("error: "))
    assert CAUSE in first and "Traceback" not in out.split(first)[0]


def test_launch_raises_the_root_cause_and_leaves_nothing(tmp_path, failing):
    code, out, mark = _run([sys.executable, "-c", LAUNCH, str(failing)], tmp_path)
    _assert_clean_failure(code, out, mark, want_code=3)
    assert re.search(r"caught: instance (prefill|decode)-0 failed to start", out)


@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI missing")
def test_ray_job_submit_reports_a_start_up_failure(tmp_path, failing):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only throwaway cluster (see test_cli)
    dash = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "2",
                    "--port", str(free_port()), "--dashboard-port", str(dash),
                    "--include-dashboard", "true", "--disable-usage-stats",
                    "--temp-dir", ray_tmp], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:  # the job API answers a little after `ray start` returns
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "Ray's job API never answered"
            time.sleep(1)
        (tmp_path / "job").mkdir()
        shutil.copy(failing, tmp_path / "job" / "failing.yaml")
        mark = uuid.uuid4().hex
        runtime_env = json.dumps({"env_vars": {MARK: mark}})
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address,
             "--working-dir", str(tmp_path / "job"), "--runtime-env-json", runtime_env,
             "--", "disagg", "serve", "failing.yaml", "--port", str(free_port())],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert re.search(r"Job 'raysubmit_\w+' failed", out), out[-4000:]
        _assert_clean_failure(r.returncode, out, mark)
    finally:
        _stop_cluster(ray_tmp)

"""Compare serving systems on one workload, one after another, with the same two cores.

Systems (``--systems``, run in this order; the first one run is the baseline of the ratios):

- ``vllm``: one aggregated vLLM API server on both cores (``VLLM_CPU_OMP_THREADS_BIND=a,b``).
- ``nixl``: vLLM's own NixlConnector 1P1D, one core each, behind ``benchmarks/proxy.py``.
- ``disagg``: ``disagg serve --port P [--disagg-args ...] [TOPOLOGY]`` (``--disagg-topology``);
  skipped, with the reason, when ``disagg serve --help`` fails.
- ``disagg@FILE``: the same with topology ``FILE`` instead, named by its stem (e.g.
  ``disagg@small-p2d1``): topologies compared in one run, on the same cores.

Every vLLM here runs in this project's venv, whose ``vllm.general_plugins`` entry point
(``disagg.vllm_plugin``) grants AMX permission in every vLLM process (BRIEF §3): checked
before anything starts, and each log is scanned for ``Illegal instruction`` afterwards.

For each system and load point: start, wait for ``/health`` (with a timeout, failing fast if
a process dies), send a few warm-up requests (unmeasured, prompts unrelated to the workload),
run the workload (the same requests for every system), stop every process group, also on
Ctrl-C or an error. A QPS sweep restarts each system per point so no point inherits another's
prefix cache. Writes per-run JSON reports and PNG plots to ``--out-dir`` and a side-by-side
table into ``--results-md`` between ``<!-- compare:WORKLOAD -->`` markers.

Example (the doc-analysis shape the serving issue uses)::

    .venv/bin/python -m benchmarks.compare --workload doc-analysis --model small \\
        --doc-tokens 1500 --num-docs 16 --uses-per-doc 4 --concurrency 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import psutil

from benchmarks import plots, results_md
from disagg.bench.cli import (
    add_load_arguments,
    add_workload_arguments,
    load_from_args,
    slo_from_args,
    workload_from_args,
)
from disagg.bench.client import EndpointConfig
from disagg.bench.loadgen import LoadConfig
from disagg.bench.runner import (
    BenchReport,
    load_tokenizer,
    print_summary,
    run_bench,
    served_models,
    write_report,
)
from disagg.bench.workloads import WORKLOADS, Workload
from disagg.models import resolve_model
from disagg.scrape import series

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("vllm", "nixl", "disagg")


class Unavailable(Exception):
    """A system that cannot run here (reason in the message): skipped, not failed."""


@dataclass
class Procs:
    """Owns the process groups of one system; ``close()`` always ends all of them."""

    log_dir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``cmd`` in its own session (process group), output to ``<log_dir>/name.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        log.write(f"$ {shlex.join(cmd)}\n# env: {json.dumps(env or {})}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        """Raise RuntimeError naming the first process that has exited (its log tail is
        printed to stderr)."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                print(log_tail(log), file=sys.stderr)
                raise RuntimeError(f"{name} exited with {proc.returncode} (log: {log})")

    def close(self, grace_s: float = 20.0) -> None:
        """SIGTERM every group and every descendant (also those that left the group, e.g.
        Ray's daemons), wait up to ``grace_s``, then SIGKILL whatever is left."""
        family = [p for _, proc in self.procs for p in _descendants(proc.pid)]
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        deadline = time.monotonic() + grace_s
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        psutil.wait_procs(family, timeout=max(0.1, deadline - time.monotonic()))
        for _, proc in self.procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.procs.clear()


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
        os.killpg(proc.pid, sig)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if missing)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(url: str, procs: Procs, timeout_s: float) -> None:
    """Poll ``url/health`` until 200; raise TimeoutError, or RuntimeError if a process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if httpx.get(f"{url}/health", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


@dataclass(frozen=True)
class Setup:
    """What every system gets: the same model, dtype, cores and limits."""

    python: str
    model_path: Path
    model_name: str
    dtype: str
    cores: tuple[int, int]
    kv_cache_gib: int
    max_model_len: int
    port: int
    startup_timeout_s: float
    disagg_bin: str
    disagg_topology: str | None
    disagg_args: str


def vllm_cmd(s: Setup, port: int, kv_config: dict | None = None) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` for the shared model and limits."""
    cmd = [
        s.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(s.model_path),
        "--served-model-name", s.model_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", s.dtype, "--max-model-len", str(s.max_model_len), "--seed", "0",
    ]  # fmt: skip
    if kv_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd


def vllm_env(s: Setup, cores: str, **extra: str) -> dict[str, str]:
    return {
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
        **extra,
    }


def start_vllm(s: Setup, procs: Procs) -> str:
    """System ``vllm``: one aggregated instance on both cores."""
    a, b = s.cores
    procs.spawn("vllm", vllm_cmd(s, s.port), vllm_env(s, f"{a},{b}"))
    url = f"http://127.0.0.1:{s.port}"
    wait_healthy(url, procs, s.startup_timeout_s)
    return url


def start_nixl(s: Setup, procs: Procs) -> str:
    """System ``nixl``: NixlConnector prefill on core a, decode on core b, our proxy in front."""
    kv = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    urls = []
    for i, (role, core) in enumerate((("prefill", s.cores[0]), ("decode", s.cores[1]))):
        port = s.port + 1 + i
        env = vllm_env(
            s,
            str(core),
            VLLM_NIXL_SIDE_CHANNEL_PORT=str(s.port + 11 + i),
            VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        )
        procs.spawn(f"nixl-{role}", vllm_cmd(s, port, kv), env)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_healthy(url, procs, s.startup_timeout_s)
    proxy = [
        s.python,
        "-m",
        "benchmarks.proxy",
        "--port",
        str(s.port),
        "--prefill",
        urls[0],
        "--decode",
        urls[1],
    ]
    procs.spawn("nixl-proxy", proxy)
    url = f"http://127.0.0.1:{s.port}"
    wait_healthy(url, procs, 60.0)
    return url


def disagg_serve_cmd(s: Setup) -> list[str]:
    """``disagg serve --port P [MORE ARGS] [TOPOLOGY]`` (the topology file is positional)."""
    cmd = [s.disagg_bin, "serve", "--port", str(s.port), *shlex.split(s.disagg_args)]
    return cmd + ([s.disagg_topology] if s.disagg_topology else [])


def start_disagg(s: Setup, procs: Procs) -> str:
    """System ``disagg``: ``disagg serve``; raises Unavailable if it does not exist yet."""
    probe = subprocess.run(
        [s.disagg_bin, "serve", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or ["no output"]
        why = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1]).strip()
        raise Unavailable(f"`disagg serve --help` exited with {probe.returncode}: {why}")
    procs.spawn("disagg", disagg_serve_cmd(s))
    url = f"http://127.0.0.1:{s.port}"
    wait_healthy(url, procs, s.startup_timeout_s)
    return url


STARTERS = {"vllm": start_vllm, "nixl": start_nixl, "disagg": start_disagg}


def check_amx_plugin(python: str) -> None:
    """Raise SystemExit unless ``python``'s vLLM will load the AMX plugin (BRIEF §3)."""
    code = (
        "from importlib.metadata import entry_points;"
        "print(' '.join(e.value for e in entry_points(group='vllm.general_plugins')))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout
    if "disagg.vllm_plugin:register" not in out:
        raise SystemExit(
            "the venv has no disagg AMX plugin (vllm.general_plugins -> disagg.vllm_plugin); "
            "run `pip install -e .` first: a bf16 baseline without it is not fair (BRIEF §3)"
        )


def crashed(log_dir: Path) -> list[str]:
    """Logs under ``log_dir`` that show an illegal-instruction crash."""
    return [
        p.name
        for p in sorted(log_dir.glob("*.log"))
        if "Illegal instruction" in p.read_text(errors="replace")
    ]


def warm_up(url: str, model: str, n: int) -> None:
    """Send ``n`` short unmeasured requests (unrelated prompts); raise if one fails."""
    for i in range(n):
        body = {
            "model": model,
            "prompt": f"Warm-up {i}: " + "lorem ipsum " * 40,
            "max_tokens": 4,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300.0, trust_env=False)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request failed: HTTP {resp.status_code} {resp.text[:200]}")


@dataclass
class SystemRun:
    """One system's outcome: a report per load point, or why it was skipped or failed."""

    system: str
    reports: dict[str, BenchReport] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    crashed_logs: list[str] = field(default_factory=list)


def run_point(
    s: Setup, system: str, workload: Workload, load: LoadConfig, args, log_dir: Path
) -> BenchReport:
    """Start ``system``, warm it up, run ``workload`` once under ``load``, always tear down."""
    procs = Procs(log_dir)
    try:
        url = STARTERS[system.partition("@")[0]](s, procs)
        model = served_models(url)[0].id
        warm_up(url, model, args.warmup)
        endpoint = EndpointConfig(
            base_url=url,
            model=model,
            request_timeout_s=args.request_timeout,
            ignore_eos=not args.no_ignore_eos,
        )
        report = run_bench(
            workload,
            endpoint,
            load,
            slo_from_args(args),
            config={"system": system, "command": shlex.join(sys.argv)},
        )
        if system.startswith("disagg"):  # which requests skipped the prefill hop, and why
            report.config["gateway_decisions"] = {
                f"{dict(labels)['path']} {dict(labels)['reason']}": value
                for (_, labels), value in series(url, "disagg_decisions").items() if value}
        return report
    finally:
        procs.close()


def system_label(system: str) -> str:
    """``disagg@path/to/name.yaml`` is reported as ``disagg@name``."""
    kind, _, topology = system.partition("@")
    return f"{kind}@{Path(topology).stem}" if topology else system


def run_system(
    s: Setup, system: str, workload: Workload, loads: list[LoadConfig], args
) -> SystemRun:
    """Every load point on ``system``; failures are recorded, not raised (Ctrl-C is)."""
    kind, _, topology = system.partition("@")
    if topology:
        s = replace(s, disagg_topology=topology)
    system = system_label(system)
    out = SystemRun(system)
    for load in loads:
        tag = f"{args.section or workload.name}-{system}-{load.label.replace('=', '')}"
        log_dir = Path(args.out_dir) / "logs" / tag
        print(f"== {system}: {workload.name}, {load.label}", flush=True)
        try:
            report = run_point(s, system, workload, load, args, log_dir)
        except Unavailable as exc:
            out.skipped = str(exc)
            print(f"skipped {system}: {exc}", flush=True)
            return out
        except Exception as exc:  # one system failing must not stop the comparison
            out.error = f"{load.label}: {exc}"
            print(f"{system} failed: {exc}", flush=True)
            return out
        finally:
            out.crashed_logs += crashed(log_dir)
        write_report(report, Path(args.out_dir) / f"{tag}.json")
        print_summary(report, f"{system}: {workload.name} ({load.label})")
        out.reports[load.label] = report
    return out


def write_results(
    runs: list[SystemRun], workload: Workload, loads: list[LoadConfig], s: Setup, args
) -> None:
    """Plots into ``--out-dir`` and this workload's section of ``--results-md``."""
    labels = [load.label for load in loads]
    by_load = {lb: {r.system: r.reports[lb] for r in runs if lb in r.reports} for lb in labels}
    qps = {load.label: load.qps for load in loads}
    name = args.section or workload.name
    paths = plots.comparison_plots(by_load, qps, name, Path(args.out_dir))
    a, b = s.cores
    setup = (
        f"model `{s.model_name}` ({s.model_path.name}), {s.dtype}, cores {a},{b} (aggregated: "
        f"both; 1P1D: prefill {a}, decode {b}), VLLM_CPU_KVCACHE_SPACE={s.kv_cache_gib} GiB per "
        f"instance, max-model-len {s.max_model_len}, {args.warmup} warm-up requests per start, "
        f"AMX plugin checked; 1-min load average at start {args.load_at_start:.1f} (other "
        f"processes on the machine skew timings)"
    )
    command = "python -m benchmarks.compare " + shlex.join(sys.argv[1:])
    md = Path(args.results_md)
    body = results_md.section(runs, workload.info, labels, setup, command, paths, md.parent)
    results_md.update_results_md(md, f"compare:{name}", body)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)}; the first is the baseline",
    )
    p.add_argument("--model", default="small", help="built-in model name or local HF folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--cores",
        default="0,1",
        help="the two cores: aggregated gets both, prefill the first and decode the second",
    )
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE each")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument(
        "--port",
        type=int,
        default=18300,
        help="front port; backends use +1, +2 and NIXL side channels +11, +12",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per start")
    p.add_argument("--qps-sweep", help="comma-separated QPS points (open loop), e.g. 0.5,1,2")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--section", default=None, help="RESULTS.md section and file prefix "
                   "(default: the workload's name); lets variants of a workload coexist")
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--disagg-bin", default=str(ROOT / ".venv" / "bin" / "disagg"))
    p.add_argument("--disagg-topology", help="topology file, passed to `disagg serve` (positional)")
    p.add_argument("--disagg-args", default="", help="more `disagg serve` arguments")
    add_workload_arguments(p)
    add_load_arguments(p)
    args = p.parse_args(argv)
    args.no_progress = args.no_progress or not sys.stderr.isatty()
    args.load_at_start = os.getloadavg()[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if unknown := {x for x in systems if x not in SYSTEMS and not (
            x.startswith("disagg@") and Path(x[len("disagg@"):]).is_file())}:
        raise SystemExit(f"unknown systems (or topology files not found): "
                         f"{', '.join(sorted(unknown))}")
    check_amx_plugin(args.python)
    model_path = resolve_model(args.model)
    a, b = (int(x) for x in args.cores.split(","))
    s = Setup(
        args.python,
        model_path,
        Path(args.model).name,
        args.dtype,
        (a, b),
        args.kv_cache_gib,
        args.max_model_len,
        args.port,
        args.startup_timeout,
        args.disagg_bin,
        args.disagg_topology,
        args.disagg_args,
    )
    workload = workload_from_args(args, load_tokenizer(model_path))
    print(f"workload {workload.name}: {json.dumps(workload.info)}", flush=True)
    sweep = [float(q) for q in args.qps_sweep.split(",")] if args.qps_sweep else [None]
    loads = [load_from_args(args, qps=q) for q in sweep]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    runs = [run_system(s, system, workload, loads, args) for system in systems]
    write_results(runs, workload, loads, s, args)
    print(f"results: {args.results_md}")
    return 0 if all(r.error is None and not r.crashed_logs for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

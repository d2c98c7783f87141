"""Core placement for tensor parallelism: each rank of an instance gets its own OpenMP bind
list, taken from the instance's cores (vLLM's CPU backend wants one list per rank)."""

from __future__ import annotations

import pytest

from disagg.config import EngineArgs, TransferConfig
from disagg.instance import InstanceSpec, VLLMProcess, rank_cores, threads_bind
from disagg.launch.placement import assign_cores
from disagg.launch.topology import parse_topology


@pytest.mark.parametrize(("cores", "ranks", "expected"), [
    ([0], 1, [[0]]),
    ([0, 1], 1, [[0, 1]]),
    ([0, 1], 2, [[0], [1]]),
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2], 2, [[0, 1], [2]]),  # uneven: the first ranks take the extra core
    ([4, 5, 6, 7, 8], 3, [[4, 5], [6, 7], [8]]),
    ([0], 2, [[0], [0]]),  # fewer cores than ranks: ranks share
    ([0, 1], 4, [[0], [1], [0], [1]]),
    ([3], 4, [[3], [3], [3], [3]]),
])
def test_rank_cores(cores, ranks, expected):
    assert rank_cores(cores, ranks) == expected


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16])
def test_rank_cores_uses_every_core_and_balances(n, ranks):
    cores = list(range(10, 10 + n))
    lists = rank_cores(cores, ranks)
    assert len(lists) == ranks and all(lists)
    assert sorted({c for cs in lists for c in cs}) == cores
    sizes = [len(cs) for cs in lists]
    assert max(sizes) - min(sizes) <= 1
    per_core = [sum(c in cs for cs in lists) for c in cores]
    assert max(per_core) - min(per_core) <= 1  # shared cores are shared evenly too


def test_rank_cores_refuses_nothing_to_split():
    with pytest.raises(ValueError):
        rank_cores([], 2)
    with pytest.raises(ValueError):
        rank_cores([0], 0)


def test_threads_bind_is_vllms_format():
    assert threads_bind([[0]]) == "0"
    assert threads_bind([[0], [1]]) == "0|1"
    assert threads_bind([[0], [0]]) == "0|0"
    assert threads_bind([[0, 1], [2, 3]]) == "0,1|2,3"


def _env(tmp_path, cores: list[int], tp: int) -> dict[str, str]:
    spec = InstanceSpec(role="prefill", index=0, model_path="unused", served_model_name="m",
                        engine=EngineArgs(), transfer=TransferConfig(), log_dir=str(tmp_path),
                        tensor_parallel_size=tp, cpu_cores=cores)
    return VLLMProcess(spec).environment()


def test_issue_yaml_on_two_cores(tmp_path, monkeypatch):
    """The issue's topology: prefill TP 2 on one core, decode TP 1 on the other."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    t = parse_topology({
        "prefill": {"replicas": 1, "tensor_parallel_size": 2, "resources": {"num_cpus": 1}},
        "decode": {"replicas": 1, "tensor_parallel_size": 1, "resources": {"num_cpus": 1}}})
    cores = assign_cores(t, 2)
    assert cores == {"prefill-0": [0], "decode-0": [1]}
    env = _env(tmp_path, cores["prefill-0"], 2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|0"
    assert env["DISAGG_CPU_AFFINITY"] == "0"
    env = _env(tmp_path, cores["decode-0"], 1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["DISAGG_CPU_AFFINITY"] == "1"


def test_environment_splits_the_instances_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = _env(tmp_path, [4, 5, 6, 7], 2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4,5|6,7"
    assert env["DISAGG_CPU_AFFINITY"] == "4,5,6,7"  # the whole engine stays on all four


def test_environment_folds_cores_onto_a_smaller_node(tmp_path, monkeypatch):
    """Cores planned on the launcher's machine wrap onto a node with fewer cores."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    env = _env(tmp_path, [2, 3], 2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    # What the instance reports (InstanceInfo.cpu_cores): the gateway counts instances
    # pinned to the same cores as one place in its prefill queue.
    spec = InstanceSpec(role="prefill", index=0, model_path="unused", served_model_name="m",
                        engine=EngineArgs(), transfer=TransferConfig(), log_dir=str(tmp_path),
                        cpu_cores=[2, 3, 5])
    assert VLLMProcess(spec).pinned_cores() == [0, 1]
    env = _env(tmp_path, [0, 2], 2)  # both fold onto core 0: the ranks share it
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|0"
    assert env["DISAGG_CPU_AFFINITY"] == "0"


def test_no_cores_no_binding(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("DISAGG_CPU_AFFINITY", raising=False)
    env = _env(tmp_path, [], 2)  # GPU instances: vLLM decides
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "DISAGG_CPU_AFFINITY" not in env

"""Topology schema: defaults, examples, and errors that name the field and the fix."""

from pathlib import Path

import pytest

from disagg.config import Topology
from disagg.launch.placement import assign_cores
from disagg.launch.topology import TopologyError, load_topology, parse_topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_default_is_1p1d_tiny_bf16():
    t = parse_topology({})
    assert (t.model, t.engine.dtype, t.prefill.replicas, t.decode.replicas) == (
        "tiny", "bfloat16", 1, 1)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path):
    assert isinstance(load_topology(path), Topology)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"prefil": {"replicas": 1}}, ["prefil", "unknown field"]),
        ({"engine": {"dtype": "bf16"}}, ["engine.dtype", "bfloat16"]),
        ({"decode": {"replicas": 0}}, ["decode.replicas"]),
        ({"prefill": {"replicas": -1}}, ["prefill.replicas", "greater than or equal to 0"]),
        ({"engine": {"max_model_len": "long"}}, ["engine.max_model_len"]),
        ({"transfer": {"base_port": 80}}, ["transfer", "base_port"]),
        ({"prefill": {"tensor_parallel_size": 2, "resources": {"num_gpus": 1}}},
         ["prefill", "num_gpus"]),
        ({"scheduler": {"decode_policy": "random"}}, ["scheduler.decode_policy", "round_robin"]),
    ],
)
def test_bad_fields_are_named(data, names):
    with pytest.raises(TopologyError) as err:
        parse_topology(data)
    for name in names:
        assert name in str(err.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {dtype: float8}\n")
    with pytest.raises(TopologyError, match=r"engine\.dtype"):
        load_topology(bad)
    bad.write_text("engine: [1, 2\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(TopologyError, match="mapping"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")


def test_core_assignment_whole_and_shared():
    t = parse_topology({"prefill": {"replicas": 1}, "decode": {"replicas": 1}})
    assert assign_cores(t, 2) == {"prefill-0": [0], "decode-0": [1]}
    t = load_topology(EXAMPLES / "2p1d.yaml")
    assert assign_cores(t, 2) == {"prefill-0": [0], "prefill-1": [0], "decode-0": [1]}
    t = load_topology(EXAMPLES / "1p2d.yaml")
    assert assign_cores(t, 2) == {"prefill-0": [0], "decode-0": [1], "decode-1": [1]}


def test_placement_names_nodes_by_label_and_errors_name_the_field():
    t = parse_topology({"prefill": {"placement": {"labels": {"host": "in(a,b)"},
                                                  "strategy": "SPREAD"}},
                        "decode": {"placement": {"labels": {"host": "c"}}}})
    assert t.prefill.placement.labels == {"host": "in(a,b)"}
    assert t.prefill.placement.strategy == "SPREAD"
    assert t.decode.placement.strategy == "PACK"
    with pytest.raises(TopologyError, match=r"decode\.placement\.strategy"):
        parse_topology({"decode": {"placement": {"strategy": "spread-ish"}}})
    with pytest.raises(TopologyError, match=r"prefill\.placement\.labels\.-bad key"):
        parse_topology({"prefill": {"placement": {"labels": {"-bad key": "x"}}}})
    with pytest.raises(TopologyError, match=r"prefill\.placement\.nodes: unknown field"):
        parse_topology({"prefill": {"placement": {"nodes": ["a"]}}})

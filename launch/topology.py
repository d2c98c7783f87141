"""Loading a topology: YAML or a mapping in, a validated ``disagg.config.Topology`` out.

The schema itself is ``disagg.config`` (the bottom layer); this module adds what needs the
layers above it: policy names and options are checked against the scheduler's registry.
Every problem fails at load with the field's dotted path and what would be valid
(``TopologyError``), never later inside an actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from disagg.config import Topology
from disagg.models import model_heads
from disagg.scheduler import policy_names, validate_options
from disagg.tp_layout import tp_problem


class TopologyError(ValueError):
    """A topology that cannot be loaded; the message names each bad field and the fix."""


def _describe(err: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """One line per error: the dotted field (under ``prefix``) and what is wrong."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (*prefix, *e["loc"])) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field; remove it or check its spelling")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return lines


def check_names(topology: Topology, source: str = "<topology>") -> Topology:
    """Check the scheduler section against the policy registry (names and each policy's
    own options); raise TopologyError naming the field and what is valid."""
    sched = topology.scheduler
    known = policy_names()
    lines: list[str] = []
    for field in ("prefill_policy", "decode_policy"):
        name = getattr(sched, field)
        if name not in known:
            lines.append(f"  scheduler.{field}: unknown policy {name!r}; use one of "
                         f"{', '.join(known)}")
    for name, options in sched.policy_options.items():
        if name not in known:
            lines.append(f"  scheduler.policy_options.{name}: unknown policy; use one of "
                         f"{', '.join(known)}")
            continue
        try:
            validate_options(name, options)
        except ValidationError as err:
            lines += _describe(err, ("scheduler", "policy_options", name))
    lines += _tp_lines(topology)
    if lines:
        raise TopologyError("\n".join([f"invalid topology {source}:", *lines]))
    return topology


def _tp_lines(topology: Topology) -> list[str]:
    """Each pool's TP size must shard the model's KV heads as vLLM does (when the model's
    head count is known here: built-in models, or a folder with its config.json)."""
    known = model_heads(topology.model)
    if known is None:
        return []
    heads, kv_heads = known

    def problem(tp: int) -> str | None:
        if heads % tp:
            return f"TP {tp} does not divide the model's {heads} attention heads"
        return tp_problem(kv_heads, tp)

    valid = [t for t in range(1, 17) if problem(t) is None]
    return [f"  {role}.tensor_parallel_size: {why}; use one of {', '.join(map(str, valid))}"
            for role in ("prefill", "decode")
            if (why := problem(getattr(topology, role).tensor_parallel_size))]


def parse_topology(data: dict[str, Any] | None, source: str = "<dict>") -> Topology:
    """Validate a plain mapping (from YAML or code); raise TopologyError naming bad fields."""
    try:
        topology = Topology.model_validate(data or {})
    except ValidationError as err:
        raise TopologyError("\n".join([f"invalid topology {source}:",
                                       *_describe(err)])) from None
    return check_names(topology, source)


def load_topology(path: str | Path) -> Topology:
    """Load and validate a topology YAML file; raise TopologyError on any problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"topology {path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise TopologyError(f"topology {path} must be a mapping of fields, got {type(data).__name__}")
    return parse_topology(data, str(path))

"""Which CPU cores each instance pins (``VLLM_CPU_OMP_THREADS_BIND``).

Instances are laid out in order (prefills, then decodes), each taking ``num_cpus`` cores
from a running offset, wrapping around the node's cores. Whole-core requests get cores of
their own while the node has enough; fractional ones (0.5 + 0.5) share a core, so small
machines can still run 2P1D. Ray's own accounting (``num_cpus`` on each actor) keeps the
totals honest; this only decides *which* cores.

An instance's cores are shared by its tensor-parallel ranks: the instance splits them into
one bind list per rank when it starts (``disagg.instance.rank_cores``: contiguous even runs,
or ranks sharing cores round-robin when there are fewer cores than ranks).
"""

from __future__ import annotations

import math

from disagg.launch.topology import Topology


def assign_cores(topology: Topology, num_cores: int) -> dict[str, list[int]]:
    """Map ``"prefill-0"``-style keys to the core ids that instance should pin."""
    out: dict[str, list[int]] = {}
    offset = 0.0
    for role, pool in (("prefill", topology.prefill), ("decode", topology.decode)):
        for i in range(pool.replicas):
            n = max(1, math.ceil(pool.resources.num_cpus))
            first = math.floor(offset + 1e-9)
            out[f"{role}-{i}"] = sorted({(first + k) % num_cores for k in range(n)})
            offset += pool.resources.num_cpus
    return out

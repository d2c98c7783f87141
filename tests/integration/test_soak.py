"""The fault soak's short version (benchmarks/soak.py): two minutes of mixed load on a
real 1P1D deployment while a decode engine, Redis and a prefill actor fail in turn."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_a_short_fault_soak_loses_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "120", "--fault-every", "10",
         "--clients", "3", "--no-results"],
        capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr[-4000:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("soak: requests=")]
    assert last, out
    fields = dict(part.split("=") for part in last[-1].removeprefix("soak: ").split())
    assert int(fields["faults"]) >= 2, out
    assert int(fields["requests"]) > 0, out
    assert (fields["lost"], fields["hung"], fields["wrong"], fields["leaked_blocks"]) == \
        ("0", "0", "0", "0"), out
    assert proc.returncode == 0, out

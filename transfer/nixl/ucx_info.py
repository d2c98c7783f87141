"""Which transport UCX chose for KV reads, from UCX's own report.

UCX can fall back silently (RDMA missing: TCP; two processes on one machine: shared memory
or CMA, never the network), and NIXL does not say which it used. With ``UCX_PROTO_INFO=y``
UCX logs, per endpoint configuration, a table of the protocols it selected; with
``UCX_LOG_FILE=<path>.%p`` those go to a file per process. ``TransportReport`` reads the
tables for remote memory reads (what a decoder's pull is) from this process's file as it
grows, and names the transport of the newest one: ``tcp/eth0``, ``cma/memory``,
``rc_mlx5/mlx5_0:1``... The engine's launcher sets both variables
(``disagg.instance.ucx_environment``), unless the operator set them.

UCX prints a table once per distinct endpoint configuration, so a new peer reached the same
way as an earlier one adds no table: its transport is the newest one seen.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

READ_TABLE = "remote memory read by ucp_get"
# A table row: "| 0..inf | zero-copy | tcp/dgi-c |" (range, description, config).
_ROW = re.compile(r"\|\s*[\d.]+\w?\.\.(?:inf|[\d.]+\w?)\s*\|[^|]*\|\s*([^|]+?)\s*\|")
UNKNOWN = "unknown"


class TransportReport:
    """The transport of this process's newest UCX read-protocol table."""

    def __init__(self, log_file: str | None = None):
        pattern = log_file if log_file is not None else os.environ.get("UCX_LOG_FILE", "")
        enabled = os.environ.get("UCX_PROTO_INFO", "n").lower() in ("y", "yes", "1", "on")
        self.path = Path(pattern.replace("%p", str(os.getpid()))) if pattern and enabled \
            else None
        self._offset = 0
        self._partial = ""
        self._in_read_table = False
        self.latest = UNKNOWN

    def refresh(self) -> str:
        """Read what UCX added since the last call; the newest read transport."""
        if self.path is None:
            return self.latest
        try:
            with self.path.open("r", errors="replace") as f:
                f.seek(self._offset)
                text = f.read()
                self._offset = f.tell()
        except OSError:
            return self.latest
        text, self._partial = self._partial + text, ""
        lines = text.split("\n")
        if not text.endswith("\n"):
            self._partial = lines.pop()
        self._parse(lines)
        return self.latest

    def _parse(self, lines: list[str]) -> None:
        found: list[str] = []
        for line in lines:
            if READ_TABLE in line:
                self._in_read_table, found = True, []
                continue
            if not self._in_read_table:
                continue
            row = _ROW.search(line)
            if row:
                found.append(row.group(1))
            elif found and "+--" not in line:  # the table ended
                self._in_read_table = False
                self.latest = "+".join(dict.fromkeys(found))
        if self._in_read_table and found:
            self.latest = "+".join(dict.fromkeys(found))

"""A controllable in-memory backend for tests of code built on the store.

``FakeBackend`` behaves exactly like ``CpuBackend`` (it passes the same contract tests) and
adds knobs: block puts on a gate (a slow tier), fail puts or gets with OSError (a broken
disk or network), and count calls.
"""

from __future__ import annotations

import threading

from disagg.transfer.store.backend import BytesLike
from disagg.transfer.store.cpu import CpuBackend
from disagg.transfer.store.keys import ChunkKey


class FakeBackend(CpuBackend):
    """``CpuBackend`` plus failure injection. Thread-safe like its parent."""

    name = "fake"

    def __init__(self, capacity_bytes: int, gate: threading.Event | None = None) -> None:
        super().__init__(capacity_bytes)
        self.gate = gate  # when set to an Event, puts wait until it is set
        self.fail_puts = False
        self.fail_gets = False
        self.num_puts = 0
        self.num_gets = 0

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise TimeoutError("FakeBackend gate never opened")
        self.num_puts += 1
        if self.fail_puts:
            raise OSError("injected put failure")
        return super().put(key, data)

    def get(self, key: ChunkKey) -> bytes | None:
        self.num_gets += 1
        if self.fail_gets:
            raise OSError("injected get failure")
        return super().get(key)

"""The StoreBackend contract, run over every backend; then what only the disk tier promises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from disagg.transfer.store import BACKENDS, CpuBackend, DiskBackend, FakeBackend, StoreBackend
from disagg.transfer.store.disk import HEADER
from disagg.transfer.store.keys import ChunkKey

VALUE = 1000  # bytes per test value
SLOTS = 8  # capacities below hold exactly this many test values


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def value(i: int, size: int = VALUE) -> bytes:
    return bytes([i % 251]) * size


@dataclass
class Kind:
    name: str
    overhead: int  # bytes charged per entry beyond the value
    make: Callable[[Path, int], StoreBackend]

    def capacity(self, entries: int = SLOTS, size: int = VALUE) -> int:
        return entries * (size + self.overhead)


KINDS = [
    Kind("cpu", 0, lambda path, cap: CpuBackend(cap)),
    Kind("disk", HEADER.size, lambda path, cap: DiskBackend(path / "kv", cap)),
    Kind("fake", 0, lambda path, cap: FakeBackend(cap)),
]


def test_every_registered_backend_is_under_contract_test():
    assert set(BACKENDS) <= {k.name for k in KINDS}


@pytest.fixture(params=KINDS, ids=lambda k: k.name)
def kind(request) -> Kind:
    return request.param


@pytest.fixture
def store(kind, tmp_path):
    backend = kind.make(tmp_path, kind.capacity())
    yield backend
    backend.check_integrity()  # leak/accounting check after every test
    backend.close()


def test_roundtrip_copies_in_and_returns_bytes(store):
    buf = bytearray(value(1))
    assert store.put(key(1), buf)
    buf[0] ^= 0xFF  # the store kept its own copy
    got = store.get(key(1))
    assert type(got) is bytes and got == value(1)
    assert store.contains(key(1)) and store.keys() == [key(1)]
    assert store.put(key(2), memoryview(value(2)))
    assert store.get(key(2)) == value(2)
    store.check_integrity()


def test_miss(store):
    assert store.get(key(9)) is None
    assert not store.contains(key(9))
    assert not store.delete(key(9))
    assert store.used_bytes == 0 and store.keys() == []


def test_overwrite_replaces_value_and_accounting(store, kind):
    store.put(key(1), value(1))
    store.put(key(1), value(2, VALUE // 2))
    assert store.get(key(1)) == value(2, VALUE // 2)
    assert store.used_bytes == VALUE // 2 + kind.overhead and len(store) == 1
    store.check_integrity()


def test_delete(store):
    store.put(key(1), value(1))
    store.put(key(2), value(2))
    assert store.delete(key(1))
    assert store.get(key(1)) is None and store.get(key(2)) == value(2)
    assert store.keys() == [key(2)]
    store.check_integrity()


def test_cap_holds_under_three_times_capacity_with_lru_order(store, kind):
    cap = store.capacity_bytes
    for i in range(3 * SLOTS):
        store.put(key(i), value(i))
        assert store.used_bytes <= cap
    store.check_integrity()
    survivors = [key(i) for i in range(2 * SLOTS, 3 * SLOTS)]
    assert store.keys() == survivors  # oldest first
    assert store.evicted_entries == 2 * SLOTS
    assert store.evicted_bytes == 2 * SLOTS * (VALUE + kind.overhead)

    oldest = survivors[0]
    assert store.get(oldest) == value(2 * SLOTS)  # reading makes it most recent...
    store.put(key(100), value(100))
    assert store.contains(oldest) and not store.contains(survivors[1])  # ...so #2 went
    store.check_integrity()


def test_contains_does_not_refresh_recency(store):
    for i in range(SLOTS):
        store.put(key(i), value(i))
    assert store.contains(key(0))
    store.put(key(100), value(100))
    assert not store.contains(key(0)) and store.contains(key(1))


def test_oversize_entry_refused_without_evicting(store, kind):
    for i in range(3):
        store.put(key(i), value(i))
    before = store.keys()
    assert not store.put(key(50), value(50, store.capacity_bytes - kind.overhead + 1))
    assert store.keys() == before and store.evicted_entries == 0
    store.check_integrity()
    assert store.put(key(51), value(51, store.capacity_bytes - kind.overhead))  # exactly fits
    assert store.keys() == [key(51)] and store.used_bytes == store.capacity_bytes
    store.check_integrity()


def test_concurrent_use_keeps_invariants(store):
    def worker(t: int) -> None:
        for i in range(40):
            k = key((t * 7 + i) % (2 * SLOTS))
            if i % 3:
                store.put(k, value(i))
            else:
                got = store.get(k)
                assert got is None or len(got) == VALUE

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert store.used_bytes <= store.capacity_bytes
    store.check_integrity()


# -- disk only -----------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path):
    backend = DiskBackend(tmp_path / "kv", KINDS[1].capacity())
    yield backend
    backend.close()


def entry_file(backend: DiskBackend, k: ChunkKey) -> Path:
    return backend.path / f"{k.hex}.kv"


def test_truncated_entry_is_a_miss_and_removed(disk):
    disk.put(key(1), value(1))
    disk.put(key(2), value(2))
    with open(entry_file(disk, key(1)), "r+b") as f:
        f.truncate(HEADER.size + VALUE // 2)
    assert disk.get(key(1)) is None
    assert not disk.contains(key(1)) and not entry_file(disk, key(1)).exists()
    assert disk.corrupt_entries == 1 and disk.get(key(2)) == value(2)
    disk.check_integrity()


@pytest.mark.parametrize("offset", [HEADER.size + 123, 0, 4, 6, 9, 40, HEADER.size - 1],
                         ids=["value", "magic", "version", "flags", "key", "length", "crc"])
def test_flipped_bit_is_a_miss_and_removed(disk, offset):
    disk.put(key(1), value(1))
    path = entry_file(disk, key(1))
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(raw)
    assert disk.get(key(1)) is None and not path.exists()
    assert disk.corrupt_entries == 1
    disk.check_integrity()


def test_failed_rename_leaves_no_entry_and_no_temp_file(disk, monkeypatch):
    disk.put(key(1), value(1))

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        disk.put(key(2), value(2))
    monkeypatch.undo()
    assert not disk.contains(key(2)) and disk.get(key(1)) == value(1)
    assert [p.name for p in disk.path.iterdir() if p.suffix == ".tmp"] == []
    assert disk.used_bytes == VALUE + HEADER.size
    disk.check_integrity()


KILLED_WRITER = """
import os, signal, sys
from disagg.transfer.store.disk import DiskBackend
from disagg.transfer.store.keys import ChunkKey
d = DiskBackend(sys.argv[1], 1 << 20)
d.put(ChunkKey(bytes(31) + b"\\x01"), b"committed" * 100)
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # die just before rename
d.put(ChunkKey(bytes(31) + b"\\x02"), b"torn" * 1000)
"""


def test_writer_killed_mid_write_leaves_no_visible_entry(tmp_path):
    path = tmp_path / "kv"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], timeout=60,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(path.glob("*.tmp"))) == 1  # it really died mid-write
    d = DiskBackend(path, 1 << 20)  # the dead writer's lock is gone with it
    try:
        assert d.get(key(1)) == b"committed" * 100
        assert not d.contains(key(2)) and d.get(key(2)) is None
        assert list(path.glob("*.tmp")) == []  # cleaned on start
        d.check_integrity()
    finally:
        d.close()


def test_restart_rebuilds_index_in_lru_order(tmp_path):
    path, cap = tmp_path / "kv", KINDS[1].capacity()
    d = DiskBackend(path, cap)
    for i in range(5):
        d.put(key(i), value(i))
    d.get(key(0))  # 0 becomes most recent
    order, used = d.keys(), d.used_bytes
    d.close()
    d = DiskBackend(path, cap)
    try:
        assert d.keys() == order == [key(1), key(2), key(3), key(4), key(0)]
        assert d.used_bytes == used and d.get(key(3)) == value(3)
        d.check_integrity()
    finally:
        d.close()


def test_restart_with_smaller_cap_evicts_oldest(tmp_path):
    path = tmp_path / "kv"
    d = DiskBackend(path, KINDS[1].capacity())
    for i in range(SLOTS):
        d.put(key(i), value(i))
    d.close()
    d = DiskBackend(path, KINDS[1].capacity(3))
    try:
        assert d.keys() == [key(i) for i in range(SLOTS - 3, SLOTS)]
        d.check_integrity()
    finally:
        d.close()


def test_one_owner_per_directory(disk):
    with pytest.raises(RuntimeError, match="owned by another"):
        DiskBackend(disk.path, 1 << 20)
    disk.close()
    with pytest.raises(RuntimeError, match="closed"):
        disk.put(key(1), value(1))
    DiskBackend(disk.path, 1 << 20).close()


def test_foreign_files_ignored_and_vanished_files_forgotten(disk):
    (disk.path / "README").write_text("not an entry")
    (disk.path / "zz.kv").write_text("not a key")
    disk.put(key(1), value(1))
    entry_file(disk, key(1)).unlink()  # deleted behind the store's back
    assert disk.get(key(1)) is None and disk.used_bytes == 0
    disk.check_integrity()
    assert (disk.path / "README").exists()

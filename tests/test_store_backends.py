"""The StoreBackend contract, run over every backend; then what only the disk tier and the
Redis tier promise."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from disagg.transfer.store import (
    BACKENDS,
    CpuBackend,
    DiskBackend,
    RedisBackend,
    StoreBackend,
    TieredStore,
)
from disagg.transfer.store import disk as disk_module
from disagg.transfer.store.disk import HEADER, LEDGER, RECORD
from disagg.transfer.store.keys import ChunkKey
from disagg.transfer.store.redis import CHECKSUM_SIZE
from tests.support.fake_backend import FakeBackend
from tests.support.redis_server import local_redis

VALUE = 1000  # bytes per test value
SLOTS = 8  # capacities below hold exactly this many test values


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def value(i: int, size: int = VALUE) -> bytes:
    return bytes([i % 251]) * size


def fresh_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"  # tests share one server, never one namespace


@dataclass
class Kind:
    name: str
    overhead: int  # bytes charged per entry beyond the value
    make: Callable[[pytest.FixtureRequest, int], StoreBackend]  # (request, capacity)

    def capacity(self, entries: int = SLOTS, size: int = VALUE) -> int:
        return entries * (size + self.overhead)


KINDS = [
    Kind("cpu", 0, lambda req, cap: CpuBackend(cap)),
    Kind("disk", HEADER.size,
         lambda req, cap: DiskBackend(req.getfixturevalue("tmp_path") / "kv", cap)),
    Kind("fake", 0, lambda req, cap: FakeBackend(cap)),
    Kind("redis", CHECKSUM_SIZE,
         lambda req, cap: RedisBackend(cap, url=req.getfixturevalue("redis_url"),
                                       namespace=fresh_namespace())),
]
REDIS = KINDS[3]


def test_every_registered_backend_is_under_contract_test():
    assert set(BACKENDS) <= {k.name for k in KINDS}


@pytest.fixture(params=KINDS, ids=lambda k: k.name)
def kind(request) -> Kind:
    return request.param


@pytest.fixture
def store(kind, request):
    backend = kind.make(request, kind.capacity())
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


def test_batched_calls_answer_as_the_single_ones_in_order(store):
    for i in (0, 2, 3):
        store.put(key(i), value(i))
    asked = [key(3), key(1), key(0), key(2), key(9)]
    assert store.contains_many(asked) == [store.contains(k) for k in asked] == [
        True, False, True, True, False]
    assert store.get_many(asked) == [value(3), None, value(0), value(2), None]
    assert store.contains_many([]) == [] and store.get_many([]) == []
    store.check_integrity()


def test_reads_into_buffers_and_a_buffer_of_another_size_is_a_miss(store):
    store.put(key(1), value(1))
    store.put(key(2), value(2))
    out = [memoryview(bytearray(VALUE)), memoryview(bytearray(VALUE)),
           memoryview(bytearray(VALUE - 1))]
    assert store.get_many_into([key(1), key(9), key(2)], out) == [True, False, False]
    assert bytes(out[0]) == value(1) and not any(out[1])
    assert store.get(key(2)) == value(2)  # not taken for corrupt
    store.check_integrity()


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


def run_child(script: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (another process sharing the directory)."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], timeout=timeout,
                          capture_output=True, text=True)


def dir_bytes(path: Path) -> int:
    """What the entry and temporary files take, as an outside observer sums it."""
    total = 0
    for name in os.listdir(path):  # a small dir: one getdents, a consistent list of names
        if name.endswith((".kv", ".tmp")):
            with contextlib.suppress(FileNotFoundError):  # removed since: not counted
                total += os.lstat(path / name).st_size
    return total


def ledger_used(path: Path) -> int:
    with open(path / ".lock", "rb") as f:
        return LEDGER.unpack(f.read(LEDGER.size))[4]


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
    live = DiskBackend(path, 1 << 20)  # a sharer open all along
    try:
        proc = run_child(KILLED_WRITER, path)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert len(list(path.glob("*.tmp"))) == 1  # it really died mid-write
        assert live.get(key(1)) == b"committed" * 100  # adopted from the dead writer
        assert not live.contains(key(2)) and live.get(key(2)) is None
        assert live.used_bytes == 2 * HEADER.size + 900 + 4000  # its reservation, still held
        live.check_integrity()
        d = DiskBackend(path, 1 << 20)  # the dead writer's locks are gone with it
        try:
            assert d.get(key(1)) == b"committed" * 100
            assert not d.contains(key(2)) and d.get(key(2)) is None
            assert list(path.glob("*.tmp")) == []  # cleaned on start
            assert d.used_bytes == live.used_bytes == HEADER.size + 900
            d.check_integrity()
            live.check_integrity()
        finally:
            d.close()
    finally:
        live.close()


RANDOM_KILL_WRITER = """
import os, sys, time
from disagg.transfer.store.disk import DiskBackend
from disagg.transfer.store.keys import ChunkKey
real_fsync = os.fsync
os.fsync = lambda fd: (time.sleep(0.02), real_fsync(fd))  # a slow disk: long writes
d = DiskBackend(sys.argv[1], 64 << 20)
for i in range(10_000):
    d.put(ChunkKey(i.to_bytes(32, "big")), bytes([i % 251]) * (1 << 20))
"""


def test_writer_killed_at_a_random_point_leaves_only_complete_entries(tmp_path):
    path = tmp_path / "kv"
    live = DiskBackend(path, 64 << 20)
    proc = subprocess.Popen([sys.executable, "-c", RANDOM_KILL_WRITER, str(path)],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # some entries, then
            names = os.listdir(path)  # a write in flight
            if sum(n.endswith(".kv") for n in names) >= 3 and any(
                    n.endswith(".tmp") for n in names):
                break
            time.sleep(0.005 + 0.01 * (time.monotonic() % 1))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    try:
        visible = live.keys()
        assert len(visible) >= 3
        for k in visible:  # every visible entry is whole, from either backend
            i = int.from_bytes(k.digest, "big")
            assert live.get(k) == value(i, 1 << 20)
        live.rescan()  # a rescan deletes the dead writer's temporary file
        assert list(path.glob("*.tmp")) == []
        assert live.used_bytes == dir_bytes(path) == len(visible) * ((1 << 20) + HEADER.size)
        live.check_integrity()
        later = DiskBackend(path, 64 << 20)
        try:
            assert later.keys() == visible and later.get(visible[-1]) is not None
            later.check_integrity()
        finally:
            later.close()
    finally:
        live.close()


BLOCKED_WRITER = """
import os, sys, time
from disagg.transfer.store.disk import DiskBackend
from disagg.transfer.store.keys import ChunkKey
d = DiskBackend(sys.argv[1], 1 << 20)
def stuck(fd):
    print("writing", flush=True)
    time.sleep(120)
os.fsync = stuck  # a live writer, mid-write for as long as the test needs
d.put(ChunkKey(bytes(31) + b"\\x07"), bytes(5000))
"""


def test_a_live_writers_temporary_file_is_never_cleaned(tmp_path):
    path = tmp_path / "kv"
    path.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_WRITER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        d = DiskBackend(path, 1 << 20)  # opening rescans, and cleans stale files...
        try:
            [tmp] = path.glob("*.tmp")  # ...but not this one: its writer is alive
            d.put(key(1), value(1))
            d.rescan()
            assert tmp.exists() and not d.contains(key(7))
            assert d.used_bytes == VALUE + 5000 + 2 * HEADER.size  # the write's reservation
            d.check_integrity()
            proc.kill()
            proc.wait(timeout=30)
            d.rescan()  # now it is a dead writer's
            assert not tmp.exists() and d.used_bytes == VALUE + HEADER.size
            d.check_integrity()
        finally:
            d.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


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


@pytest.fixture
def disk_pair(tmp_path):
    """Two backends on one directory, as two instances on one host."""
    a, b = (DiskBackend(tmp_path / "kv", KINDS[1].capacity()) for _ in range(2))
    yield a, b
    for backend in (a, b):
        backend.close()


def test_disk_backends_share_entries_recency_and_deletes(disk_pair):
    a, b = disk_pair
    for i in range(SLOTS):
        a.put(key(i), value(i))
    assert b.contains(key(3)) and b.get(key(0)) == value(0)  # a's puts; b's read: most recent
    b.put(key(100), value(100))  # evicts key(1), the oldest, from the shared directory
    assert not a.contains(key(1)) and a.get(key(1)) is None  # indexed by a, gone: a miss
    assert a.get(key(0)) == value(0) and a.get(key(100)) == value(100)
    assert a.keys() == b.keys() and a.used_bytes == b.used_bytes == a.capacity_bytes
    assert b.delete(key(100)) and not a.contains(key(100)) and a.get(key(100)) is None
    assert not a.delete(key(100)) and a.used_bytes == a.capacity_bytes - VALUE - HEADER.size
    assert a.evicted_entries == 0 and b.evicted_entries == 1
    a.put(key(2), value(99))  # replaces b's view of it too
    assert b.get(key(2)) == value(99)
    for backend in (a, b):
        backend.check_integrity()
    a.close()
    a.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        a.put(key(1), value(1))
    assert b.put(key(200), value(200)) and b.contains(key(200))
    b.check_integrity()


def test_disk_backends_in_one_process_under_threads_keep_the_cap(disk_pair):
    a, b = disk_pair
    cap, seen, done = a.capacity_bytes, [], threading.Event()

    def worker(backend: DiskBackend, t: int) -> None:
        for i in range(60):
            k = key((t * 7 + i) % (3 * SLOTS))
            if i % 3:
                assert backend.put(k, value(i))
            else:
                got = backend.get(k)
                assert got is None or got == value(got[0], VALUE)
            if i % 10 == 0:
                assert backend.delete(key(i)) in (True, False)

    def watcher() -> None:
        while not done.is_set():
            seen.append(dir_bytes(a.path))

    threads = [threading.Thread(target=worker, args=(bk, t)) for t, bk in enumerate([a, b] * 3)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    watch.join(timeout=10)
    assert seen and max(seen) <= cap and a.used_bytes <= cap
    a.check_integrity()
    b.check_integrity()


WRITER = """
import json, os, sys, time
from disagg.transfer.store.disk import DiskBackend
from disagg.transfer.store.keys import ChunkKey
path, cap, w, n, size, go = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
d = DiskBackend(path, cap)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
log = []
for i in range(n):
    k = ChunkKey((1000 * w + i).to_bytes(32, "big"))
    start = time.time_ns()
    stored = d.put(k, bytes([i % 251]) * size)
    log.append((i, start, time.time_ns(), stored))
d.close()
print(json.dumps(log), flush=True)
"""


def test_writers_in_two_processes_hold_the_cap_and_evict_oldest_first(tmp_path):
    path, go, size, slots = tmp_path / "kv", tmp_path / "go", 4000, 16
    entry = size + HEADER.size
    # Each writer alone writes over 3x the capacity; the second stops halfway, so the first
    # must then evict the second's (older) entries, not its own.
    cap, per_writer = slots * entry, [4 * slots, 2 * slots]
    path.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(cap), str(w),
                               str(per_writer[w]), str(size), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(2)]
    seen, done = [], threading.Event()

    def watcher() -> None:  # file sizes as anyone sees them, and the shared ledger
        while not done.is_set():
            seen.append((dir_bytes(path), ledger_used(path)))

    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.stderr.read()
        watch = threading.Thread(target=watcher)
        watch.start()
        go.touch()
        logs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            logs.append(json.loads(out))
    finally:
        done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    watch.join(timeout=10)
    assert len(seen) > 10
    assert max(files for files, _ in seen) <= cap and max(used for _, used in seen) <= cap
    assert all(stored for log in logs for *_, stored in log)
    a_start, a_end = logs[0][0][1], logs[0][-1][2]  # the writers really overlapped
    b_start, b_end = logs[1][0][1], logs[1][-1][2]
    assert a_start < b_end and b_start < a_end

    d = DiskBackend(path, cap)
    try:
        d.check_integrity()
        survivors = set(d.keys())
        assert len(survivors) == slots and d.used_bytes == cap == dir_bytes(path)
        puts = [(key(1000 * w + i), start, end) for w, log in enumerate(logs)
                for i, start, end, _ in log]
        kept = [p for p in puts if p[0] in survivors]
        gone = [p for p in puts if p[0] not in survivors]
        for w, n in enumerate(per_writer):  # each writer's survivors are its newest puts...
            alive = [i for i in range(n) if key(1000 * w + i) in survivors]
            assert alive == list(range(n - len(alive), n))
        # ...and no entry put after another's put had returned was evicted before it.
        inverted = [(e[0], s[0]) for e in gone for s in kept if e[1] > s[2]]
        assert not inverted
    finally:
        d.close()


TAMPERER = """
import sys
from pathlib import Path
from disagg.transfer.store.disk import HEADER, DiskBackend
from disagg.transfer.store.keys import ChunkKey
d = DiskBackend(sys.argv[1], 1 << 20)
for i in (1, 2, 3):
    d.put(ChunkKey(i.to_bytes(32, "big")), bytes([i]) * 1000)
d.close()
flipped = Path(sys.argv[1]) / f"{ChunkKey((1).to_bytes(32, 'big')).hex}.kv"
raw = bytearray(flipped.read_bytes())
raw[HEADER.size + 500] ^= 0x01
flipped.write_bytes(raw)
with open(Path(sys.argv[1]) / f"{ChunkKey((2).to_bytes(32, 'big')).hex}.kv", "r+b") as f:
    f.truncate(HEADER.size + 10)
"""


def test_corruption_written_by_one_process_is_a_miss_in_another(tmp_path):
    path = tmp_path / "kv"
    reader = DiskBackend(path, 1 << 20)  # opened first: it has never seen these entries
    try:
        proc = run_child(TAMPERER, path)
        assert proc.returncode == 0, proc.stderr
        assert reader.contains(key(1)) and reader.contains(key(2))  # the files are there...
        assert reader.get(key(1)) is None and reader.get(key(2)) is None  # ...but damaged
        assert reader.corrupt_entries == 2 and reader.get(key(3)) == bytes([3]) * 1000
        assert not entry_file(reader, key(1)).exists() and not reader.contains(key(2))
        assert reader.keys() == [key(3)] and reader.used_bytes == 1000 + HEADER.size
        reader.check_integrity()
    finally:
        reader.close()


SMALL_SHARER_KILLED = """
import os, signal, sys
from disagg.transfer.store.disk import DiskBackend
DiskBackend(sys.argv[1], int(sys.argv[2]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_smallest_open_capacity_governs_a_shared_directory(tmp_path):
    path, entry = tmp_path / "kv", VALUE + HEADER.size
    big = DiskBackend(path, KINDS[1].capacity())
    try:
        for i in range(SLOTS):
            big.put(key(i), value(i))
        small = DiskBackend(path, KINDS[1].capacity(3))  # evicts down to its cap at once
        assert small.keys() == [key(i) for i in range(SLOTS - 3, SLOTS)]
        assert small.evicted_entries == SLOTS - 3
        big.put(key(100), value(100))  # big's puts now keep small's cap
        assert len(big.keys()) == 3 and big.used_bytes == small.capacity_bytes
        before = big.keys()
        assert not big.put(key(101), value(101, 4 * VALUE))  # fits big's cap, not small's
        assert big.keys() == before
        big.check_integrity()
        small.check_integrity()
        small.close()  # big's cap applies again
        for i in range(200, 200 + SLOTS):
            big.put(key(i), value(i))
        assert big.used_bytes == big.capacity_bytes and len(big.keys()) == SLOTS
        big.check_integrity()

        proc = run_child(SMALL_SHARER_KILLED, path, 2 * entry)  # a sharer that died open
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert len(big.keys()) == 2
        for i in range(300, 305):
            big.put(key(i), value(i))
        assert len(big.keys()) == 2  # its cap holds until a rescan finds it dead...
        big.rescan()
        for i in range(400, 405):
            big.put(key(i), value(i))
        assert len(big.keys()) == 7 and len(list((path / ".sharers").iterdir())) == 1  # ...now
        big.check_integrity()
    finally:
        big.close()


def test_emptied_journal_makes_sharers_rescan_and_keep_lru_order(disk_pair, monkeypatch):
    monkeypatch.setattr(disk_module, "JOURNAL_MAX", 3)
    a, b = disk_pair
    b.put(key(0), value(0))
    for i in range(1, SLOTS):
        a.put(key(i), value(i))  # a empties the journal twice meanwhile
    assert (a.path / ".lock").stat().st_size <= LEDGER.size + 3 * RECORD.size
    b.put(key(100), value(100))  # b missed records: it rescans and still evicts the oldest
    assert not b.contains(key(0)) and a.keys() == [key(i) for i in range(1, SLOTS)] + [key(100)]
    b.put(key(101), value(101))
    assert not a.contains(key(1)) and b.evicted_entries == 2
    a.check_integrity()
    b.check_integrity()


def _use_after_fork(backend: DiskBackend, errors) -> None:
    try:
        backend.put(key(9), value(9))
    except RuntimeError as e:
        errors.put(str(e))
    backend.close()  # closes the child's copies only


def test_a_forked_copy_refuses_to_write_and_leaves_the_parent_registered(disk):
    disk.put(key(1), value(1))
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    child = ctx.Process(target=_use_after_fork, args=(disk, errors))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and "each process must open its own" in errors.get(timeout=10)
    assert len(list((disk.path / ".sharers").iterdir())) == 1
    assert disk.put(key(2), value(2)) and disk.keys() == [key(1), key(2)]
    disk.check_integrity()


def test_foreign_files_ignored_and_vanished_files_forgotten(disk, monkeypatch):
    (disk.path / "README").write_text("not an entry")
    (disk.path / "zz.kv").write_text("not a key")
    disk.put(key(1), value(1))
    entry_file(disk, key(1)).unlink()  # deleted behind every sharer's back
    assert disk.get(key(1)) is None and disk.keys() == []
    assert disk.used_bytes == VALUE + HEADER.size  # charged until the next rescan...
    monkeypatch.setattr(disk_module, "RESCAN_S", 0.0)  # ...which a put runs now and then
    disk.put(key(2), value(2))
    assert disk.used_bytes == VALUE + HEADER.size and disk.keys() == [key(2)]
    disk.check_integrity()
    assert (disk.path / "README").exists() and (disk.path / "zz.kv").exists()


# -- redis only ----------------------------------------------------------------------------


@pytest.fixture
def redis_pair(redis_url):
    """Two instances (as on two hosts) on one namespace, and a raw client to tamper with."""
    ns, cap = fresh_namespace(), REDIS.capacity()
    a, b = (RedisBackend(cap, url=redis_url, namespace=ns) for _ in range(2))
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield a, b, raw
    a.check_integrity()
    for backend in (a, b):
        backend.close()
    raw.close()


def value_key(backend: RedisBackend, k: ChunkKey) -> str:
    return f"{backend.namespace}:v:{k.hex}"


def test_redis_instances_share_entries_and_recency(redis_pair):
    a, b, _ = redis_pair
    for i in range(SLOTS):
        a.put(key(i), value(i))
    assert b.get(key(0)) == value(0)  # a's put, b's read: now most recent for both
    b.put(key(100), value(100))  # evicts key(1), the oldest, from the shared store
    assert not a.contains(key(1)) and a.get(key(0)) == value(0)
    assert a.keys() == b.keys() and a.used_bytes == b.used_bytes == a.capacity_bytes
    assert b.delete(key(100)) and not a.contains(key(100))
    assert a.evicted_entries == 0 and b.evicted_entries == 1


def test_redis_cap_holds_under_concurrent_writers_on_two_instances(redis_pair):
    a, b, raw = redis_pair
    cap, per_writer, seen, done = a.capacity_bytes, 3 * SLOTS, [], threading.Event()

    def writer(backend: RedisBackend, w: int) -> None:
        for i in range(per_writer):  # each writer alone writes 3x the capacity
            assert backend.put(key(1000 * w + i), value(i))

    def watcher() -> None:  # the shared counter, as every other process sees it
        while not done.is_set():
            seen.append(int(raw.get(f"{a.namespace}:used") or 0))

    writers = [threading.Thread(target=writer, args=(bk, w))
               for w, bk in enumerate([a, b, a, b, a, b])]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    done.set()
    watch.join(timeout=10)
    assert seen and max(seen) <= cap
    a.check_integrity()
    assert a.used_bytes == cap and len(a.keys()) == SLOTS
    assert a.evicted_entries + b.evicted_entries == len(writers) * per_writer - SLOTS


@pytest.mark.parametrize(("where", "offset", "batched"), [
    ("checksum", 0, False), ("checksum", CHECKSUM_SIZE - 1, True), ("value", 0, True),
    ("value", VALUE - 1, False)],
    ids=["checksum-first", "checksum-last-batched", "value-first-batched", "value-last"])
def test_redis_flipped_bit_is_a_miss_and_dropped(redis_pair, where, offset, batched):
    a, b, raw = redis_pair
    a.put(key(1), value(1))
    a.put(key(2), value(2))
    if where == "value":
        vkey = value_key(a, key(1))
        byte = raw.getrange(vkey, offset, offset)[0]
        raw.setrange(vkey, offset, bytes([byte ^ 0x10]))
    else:
        checksum = bytearray(raw.hget(f"{a.namespace}:sum", key(1).hex))
        checksum[offset] ^= 0x10
        raw.hset(f"{a.namespace}:sum", key(1).hex, bytes(checksum))
    got = b.get_many([key(1), key(2)]) if batched else [b.get(key(1)), b.get(key(2))]
    assert got == [None, value(2)]
    out = [memoryview(bytearray(VALUE)) for _ in range(2)]
    assert b.get_many_into([key(1), key(2)], out) == [False, True]  # dropped: a miss now
    assert not a.contains(key(1)) and raw.exists(value_key(a, key(1))) == 0
    assert b.corrupt_entries == 1 and a.get(key(2)) == value(2)
    assert a.used_bytes == VALUE + CHECKSUM_SIZE
    a.check_integrity()


def test_redis_truncated_or_misplaced_value_is_a_miss(redis_pair):
    a, _, raw = redis_pair
    for i in range(3):
        a.put(key(i), value(i))
    raw.set(value_key(a, key(0)), raw.getrange(value_key(a, key(0)), 0, 500))  # truncated
    raw.set(value_key(a, key(1)), raw.get(value_key(a, key(2))))  # right length, wrong key
    assert a.get(key(0)) is None and a.get(key(1)) is None and a.get(key(2)) == value(2)
    assert a.corrupt_entries == 2 and a.keys() == [key(2)]
    a.check_integrity()


def test_redis_value_vanished_behind_the_store_is_forgotten(redis_pair):
    a, _, raw = redis_pair
    a.put(key(1), value(1))
    raw.delete(value_key(a, key(1)))  # e.g. a server misconfigured with an evicting policy
    assert a.get(key(1)) is None and a.used_bytes == 0 and a.keys() == []
    a.check_integrity()


def test_redis_smaller_capacity_at_start_evicts_oldest(redis_pair, redis_url):
    a, _, _ = redis_pair
    for i in range(SLOTS):
        a.put(key(i), value(i))
    small = RedisBackend(REDIS.capacity(3), url=redis_url, namespace=a.namespace)
    try:
        assert small.keys() == [key(i) for i in range(SLOTS - 3, SLOTS)]
        assert small.evicted_entries == SLOTS - 3
        small.check_integrity()
    finally:
        small.close()


# The tests below that start their own server take ``redis_url`` only for its skip-or-fail
# decision when redis-server is missing.


def assert_fails_fast(backend: RedisBackend, limit_s: float = 3.0) -> None:
    """Every call that needs the server raises OSError within ``limit_s``; none hangs."""
    calls = [lambda: backend.get(key(1)), lambda: backend.put(key(1), value(1)),
             lambda: backend.contains(key(1)), backend.keys, lambda: backend.delete(key(1))]
    for call in calls:
        start = time.monotonic()
        with pytest.raises(OSError, match="redis tier"):
            call()
        assert time.monotonic() - start < limit_s
    start = time.monotonic()
    assert backend.used_bytes == 0  # a stats gauge: the last value seen, never an error
    assert time.monotonic() - start < limit_s


def test_redis_server_down_raises_oserror_quickly(redis_url):
    with local_redis() as url:
        pass  # started and stopped: nothing listens there now
    start = time.monotonic()
    backend = RedisBackend(REDIS.capacity(), url=url, namespace=fresh_namespace())
    assert time.monotonic() - start < 3.0  # constructing does not need the server
    assert_fails_fast(backend)
    backend.close()


def test_redis_hung_server_times_out():
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        backend = RedisBackend(REDIS.capacity(), url=f"redis://127.0.0.1:{port}/0",
                               namespace=fresh_namespace(), socket_timeout_s=0.5)
        assert_fails_fast(backend)
        backend.close()


def test_tiered_store_treats_unreachable_redis_as_miss_and_skipped_write(redis_url):
    with local_redis() as url:
        pass
    down = RedisBackend(REDIS.capacity(), url=url, namespace=fresh_namespace())
    with TieredStore([CpuBackend(KINDS[0].capacity()), down]) as tiered:
        tiered.put(key(1), value(1))
        assert tiered.flush(timeout=30)
        assert tiered.get(key(1)) == value(1)  # from the CPU tier
        assert tiered.get(key(2)) is None  # the Redis tier's error reads as a miss
        st = tiered.stats().tiers[1]
        assert st.breaker_open == 1  # at construction: the tier is bypassed since
        assert (st.skipped, st.errors) == (2, 0)  # the write-through and the read


def test_local_redis_limits_memory_without_evicting(redis_url):
    with local_redis(maxmemory_bytes=64 << 20) as url:
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            config = client.config_get("maxmemory*")
            assert config["maxmemory"] == str(64 << 20)
            assert config["maxmemory-policy"] == "noeviction"
            assert client.config_get("save")["save"] == ""
        finally:
            client.close()


def test_redis_out_of_memory_refuses_puts_whole_and_still_serves_reads(redis_url):
    with local_redis(maxmemory_bytes=3 << 20) as url:  # ~1 MiB of it is Redis itself
        backend = RedisBackend(64 << 20, url=url, namespace=fresh_namespace())
        try:
            stored = 0
            with pytest.raises(OSError, match="OutOfMemoryError"):
                for i in range(100):
                    backend.put(key(i), value(i, 100_000))
                    stored += 1
            assert 0 < stored < 100 and len(backend.keys()) == stored
            backend.check_integrity()  # the refused script changed nothing
            assert backend.get(key(0)) == value(0, 100_000)  # reads work when full
            assert backend.delete(key(0)) and backend.delete(key(1))
            assert backend.put(key(500), value(500))  # room again
            backend.check_integrity()
        finally:
            backend.close()


def test_redis_reads_into_buffers_from_the_socket(redis_url):
    """``get_many_into`` reads Redis's replies itself (``store.resp``): values far larger
    than its line buffer, small ones, misses and other sizes, over RESP2 and RESP3."""
    big, small = 3 * (1 << 20) + 5, 17  # megabytes cross many socket reads
    for url in (redis_url, redis_url + ("&" if "?" in redis_url else "?") + "protocol=3"):
        backend = RedisBackend(16 << 20, url=url, namespace=fresh_namespace())
        data = {i: bytes((i * 7 + j) % 251 for j in range(n)) if n < 100 else
                (bytes(range(256)) * (n // 256 + 1))[i:i + n]
                for i, n in ((1, big), (2, small), (3, big))}
        for i, v in data.items():
            assert backend.put(key(i), v)
        out = [memoryview(bytearray(big)), memoryview(bytearray(small)),
               memoryview(bytearray(big)), memoryview(bytearray(small)),
               memoryview(bytearray(big - 1))]
        got = backend.get_many_into([key(1), key(2), key(9), key(3), key(3)], out)
        assert got == [True, True, False, False, False]
        assert bytes(out[0]) == data[1] and bytes(out[1]) == data[2] and not any(out[2])
        assert backend.get(key(3)) == data[3] and backend.corrupt_entries == 0
        # The connection stays in step: the next reads, batched or not, answer right.
        assert backend.get_many([key(2), key(1)]) == [data[2], data[1]]
        backend.check_integrity()
        backend.close()


def test_redis_read_into_buffers_after_a_server_error_starts_clean(redis_url):
    """An error inside the transaction (a foreign key of the wrong type where a value
    should be) fails that read only: its connection is dropped, not reused mid-reply."""
    backend = RedisBackend(1 << 20, url=redis_url, namespace=fresh_namespace())
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    backend.put(key(1), value(1))
    backend.put(key(2), value(2))
    raw.delete(value_key(backend, key(2)))
    raw.rpush(value_key(backend, key(2)), b"not a string")
    out = [memoryview(bytearray(VALUE)) for _ in range(2)]
    with pytest.raises(OSError, match="WRONGTYPE"):
        backend.get_many_into([key(1), key(2)], out)
    raw.delete(value_key(backend, key(2)))
    for _ in range(3):  # every pooled connection answers its own read
        assert backend.get_many_into([key(1), key(2)], out) == [True, False]
        assert bytes(out[0]) == value(1)
    backend.close()
    raw.close()


def test_redis_read_into_buffers_drops_a_corrupt_value(redis_pair):
    a, b, raw = redis_pair
    a.put(key(1), value(1))
    a.put(key(2), value(2))
    vkey = value_key(a, key(2))
    raw.setrange(vkey, 5, bytes([raw.getrange(vkey, 5, 5)[0] ^ 0x01]))
    out = [memoryview(bytearray(VALUE)) for _ in range(2)]
    assert b.get_many_into([key(1), key(2)], out) == [True, False]
    assert bytes(out[0]) == value(1)
    assert raw.exists(vkey) == 0 and not a.contains(key(2)) and b.corrupt_entries == 1

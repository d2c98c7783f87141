"""The StoreBackend contract, run over every backend; then what only the disk tier and the
Redis tier promise."""

from __future__ import annotations

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
    FakeBackend,
    RedisBackend,
    StoreBackend,
    TieredStore,
)
from disagg.transfer.store.disk import HEADER
from disagg.transfer.store.keys import ChunkKey
from disagg.transfer.store.redis import CHECKSUM_SIZE
from disagg.transfer.store.redis_server import local_redis

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


@pytest.mark.parametrize("offset", [0, CHECKSUM_SIZE - 1, CHECKSUM_SIZE, CHECKSUM_SIZE + 999],
                         ids=["checksum-first", "checksum-last", "value-first", "value-last"])
def test_redis_flipped_bit_is_a_miss_and_dropped(redis_pair, offset):
    a, b, raw = redis_pair
    a.put(key(1), value(1))
    a.put(key(2), value(2))
    vkey = value_key(a, key(1))
    byte = raw.getrange(vkey, offset, offset)[0]
    raw.setrange(vkey, offset, bytes([byte ^ 0x10]))
    assert b.get(key(1)) is None
    assert not a.contains(key(1)) and raw.exists(vkey) == 0
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
        assert tiered.stats().tiers[1].errors == 2  # the write-through and the read


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

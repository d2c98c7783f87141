"""TieredStore: lookups down the tiers, promotion, write-through off the caller's path."""

from __future__ import annotations

import threading

import pytest

from disagg.transfer.store import CpuBackend, DiskBackend, TieredStore
from disagg.transfer.store.disk import HEADER
from disagg.transfer.store.keys import ChunkKey
from tests.support.fake_backend import FakeBackend

SIZE = 1000


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def value(i: int, size: int = SIZE) -> bytes:
    return bytes([i % 251]) * size


@pytest.fixture(autouse=True)
def no_leaked_writer_threads():
    """Every test closes its stores: no write-through thread may outlive it."""
    yield
    leaked = [t for t in threading.enumerate() if t.name == "kv-store-writethrough"]
    for t in leaked:
        t.join(timeout=5)
    assert not [t for t in leaked if t.is_alive()], "a TieredStore was not closed"


@pytest.fixture
def tiers(tmp_path):
    """CPU for 4 values over a disk for 16."""
    return [CpuBackend(4 * SIZE), DiskBackend(tmp_path / "kv", 16 * (SIZE + HEADER.size))]


@pytest.fixture
def store(tiers):
    s = TieredStore(tiers, queue_size=64)
    yield s
    assert s.flush(timeout=30)
    for t in s.tiers:
        t.check_integrity()
    s.close()


def test_put_lands_in_cpu_now_and_disk_after_flush(store):
    cpu, disk = store.tiers
    store.put(key(1), value(1))
    assert cpu.get(key(1)) == value(1)
    assert store.flush(timeout=30)
    assert disk.get(key(1)) == value(1)
    st = store.stats()
    assert [t.saves for t in st.tiers] == [1, 1]
    assert [t.saved_bytes for t in st.tiers] == [SIZE, SIZE]
    assert st.tiers[1].save_seconds > 0 and st.queue_depth == 0


def test_lookup_prefix_counts_leading_keys_in_any_tier(store):
    cpu, _ = store.tiers
    for i in (0, 1, 2, 4):
        store.put(key(i), value(i))
    store.flush(timeout=30)
    cpu.delete(key(1))  # now only on disk
    assert store.lookup_prefix([key(i) for i in range(5)]) == 3  # stops at the gap at 3
    assert store.lookup_prefix([key(9), key(0)]) == 0
    assert store.lookup_prefix([]) == 0
    assert store.locate(key(1)) == 1 and store.locate(key(0)) == 0
    assert store.locate(key(3)) is None
    st = store.stats()
    assert (st.prefix_lookups, st.prefix_hit_chunks) == (3, 3)
    # A batched lookup asks each tier every key the tiers above missed, past a gap too:
    # tier 0 held 0, 2, 4 (first call), 0 (second) and 0 (locate); tier 1 held 1 twice.
    assert st.tiers[0].hits == 5 and st.tiers[1].hits == 2
    assert not cpu.contains(key(1))  # lookups promote nothing


def test_lower_tier_hit_is_promoted(store):
    cpu, disk = store.tiers
    store.put(key(1), value(1))
    store.flush(timeout=30)
    cpu.delete(key(1))
    assert store.get(key(1)) == value(1)
    assert cpu.contains(key(1))
    st = store.stats()
    assert st.promotions == 1
    assert (st.tiers[0].loads, st.tiers[0].load_hits) == (1, 0)
    assert (st.tiers[1].loads, st.tiers[1].load_hits, st.tiers[1].load_bytes) == (1, 1, SIZE)
    assert store.get(key(1)) == value(1) and store.stats().tiers[1].loads == 1  # CPU now
    assert store.get(key(2)) is None


def test_get_prefix_reads_each_tier_once_stops_at_a_gap_and_promotes(store):
    cpu, disk = store.tiers
    for i in range(4):
        store.put(key(i), value(i))
    store.flush(timeout=30)
    cpu.delete(key(1))
    cpu.delete(key(2))
    disk.delete(key(3))  # in CPU only
    keys = [key(i) for i in (0, 1, 2, 3, 9, 5)]
    assert store.get_prefix(keys) == [value(i) for i in range(4)]  # stops at 9
    st = store.stats()
    # One batch per tier: CPU asked all six, the disk only the four CPU missed.
    assert (st.tiers[0].loads, st.tiers[0].load_hits) == (6, 2)
    assert (st.tiers[1].loads, st.tiers[1].load_hits, st.tiers[1].load_bytes) == (4, 2, 2 * SIZE)
    # A first load goes to the engine only; loaded again, a chunk is promoted.
    assert st.promotions == 0 and not cpu.contains(key(1))
    assert store.get_prefix(keys[1:2]) == [value(1)]
    assert store.stats().promotions == 1 and cpu.contains(key(1))
    assert store.get_prefix([key(9), key(0)]) == [] and store.get_prefix([]) == []


def test_get_prefix_passes_over_a_failing_tier(tmp_path):
    top, bottom = FakeBackend(8 * SIZE), CpuBackend(8 * SIZE)
    bottom.put(key(1), value(1))
    with TieredStore([top, bottom]) as store:
        top.fail_gets = True  # get_many asks get key by key: the batch fails as a whole
        assert store.get_prefix([key(1)]) == [value(1)]
        assert store.stats().tiers[0].errors == 1


def test_promotion_fills_the_tiers_between_in_the_background(tmp_path):
    top, middle = CpuBackend(8 * SIZE), FakeBackend(8 * SIZE)
    bottom = DiskBackend(tmp_path / "kv", 8 * (SIZE + HEADER.size))
    bottom.put(key(7), value(7))
    with TieredStore([top, middle, bottom]) as store:
        assert store.get(key(7)) == value(7) and top.contains(key(7))
        assert store.flush(timeout=30)
        assert middle.contains(key(7))
        assert bottom.contains(key(7))


def test_caps_hold_in_every_tier_under_three_times_capacity(store):
    cpu, disk = store.tiers
    for i in range(48):  # 3x the disk tier, 12x the CPU tier
        store.put(key(i), value(i))
        assert cpu.used_bytes <= cpu.capacity_bytes
        assert disk.used_bytes <= disk.capacity_bytes
    assert store.flush(timeout=30)
    assert cpu.keys() == [key(i) for i in range(44, 48)]
    assert disk.keys() == [key(i) for i in range(32, 48)]
    st = store.stats()
    assert st.tiers[0].evicted_bytes == 44 * SIZE
    assert st.tiers[1].evicted_bytes == 32 * (SIZE + HEADER.size)
    assert st.tiers[1].used_bytes == st.tiers[1].capacity_bytes


def test_full_queue_drops_write_through_and_never_blocks(tmp_path):
    gate = threading.Event()
    slow = FakeBackend(64 * SIZE, gate=gate)  # a lower tier stuck until the gate opens
    store = TieredStore([CpuBackend(64 * SIZE), slow], queue_size=2)
    try:
        for i in range(10):
            store.put(key(i), value(i))  # would hang here if put waited on the slow tier
        assert all(store.tiers[0].contains(key(i)) for i in range(10))
        assert not store.flush(timeout=0.05)
        dropped = store.stats().writes_dropped
        assert 7 <= dropped <= 8  # 2 queued, and 1 taken by the writer if it was quick
        gate.set()
        assert store.flush(timeout=30)
        assert slow.num_puts + dropped == 10 and len(slow) == slow.num_puts
    finally:
        gate.set()
        store.close()


def test_the_heads_of_a_chunk_take_one_queue_slot():
    """A chunk is saved as one entry per KV head; the queue bound counts chunks, so a
    prompt's heads are not dropped where its whole chunks would have fit."""
    gate = threading.Event()
    slow = FakeBackend(64 * SIZE, gate=gate)
    store = TieredStore([CpuBackend(64 * SIZE), slow], queue_size=2)
    try:
        store.put_many([(key(i), value(i)) for i in range(4)])  # one chunk, four heads
        store.put_many([(key(i), value(i)) for i in range(4, 8)])
        assert store.stats().writes_dropped == 0
        gate.set()
        assert store.flush(timeout=30)
        assert slow.num_puts == 8 and all(slow.contains(key(i)) for i in range(8))
    finally:
        gate.set()
        store.close()


def test_tier_errors_never_reach_the_caller(tmp_path):
    flaky = FakeBackend(8 * SIZE)
    with TieredStore([CpuBackend(8 * SIZE), flaky]) as store:
        flaky.fail_puts = True
        store.put(key(1), value(1))
        assert store.flush(timeout=30)
        assert not flaky.contains(key(1)) and store.stats().tiers[1].errors == 1
        flaky.fail_puts = False
        flaky.put(key(2), value(2))
        flaky.fail_gets = True
        assert store.get(key(2)) is None  # the read error is a miss
        assert store.stats().tiers[1].errors == 2
        store.put(key(3), value(3))  # the writer thread survived the failure
        assert store.flush(timeout=30) and flaky.contains(key(3))


def test_entry_too_big_for_cpu_still_reaches_disk(store):
    cpu, disk = store.tiers
    big = value(5, 5 * SIZE)
    store.put(key(5), big)
    assert store.flush(timeout=30)
    assert not cpu.contains(key(5)) and disk.contains(key(5))
    assert store.get(key(5)) == big  # served from disk; promotion refused by the CPU tier
    assert store.stats().tiers[0].refused == 2


def test_close_drains_queue_releases_tiers_and_refuses_puts(tmp_path):
    path = tmp_path / "kv"
    store = TieredStore([CpuBackend(8 * SIZE), DiskBackend(path, 8 * (SIZE + HEADER.size))])
    for i in range(4):
        store.put(key(i), value(i))
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.put(key(9), value(9))
    # Another instance on the same directory (a restart, or the next process) hits.
    with TieredStore([CpuBackend(8 * SIZE), DiskBackend(path, 8 * (SIZE + HEADER.size))]) as b:
        assert b.lookup_prefix([key(i) for i in range(4)]) == 4
        assert b.get(key(2)) == value(2)
        assert b.stats().tiers[1].load_hits == 1


def test_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStore([])

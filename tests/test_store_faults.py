"""The store survives faults: corrupt entries (disk, Redis), Redis going away and coming back
(circuit breaker), a full disk. Through TieredStore, as the connector uses it."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from disagg.transfer.store import CpuBackend, DiskBackend, RedisBackend, TieredStore
from disagg.transfer.store import disk as disk_module
from disagg.transfer.store.backend import CircuitBreaker, TierUnavailable
from disagg.transfer.store.disk import HEADER
from disagg.transfer.store.keys import ChunkKey
from disagg.transfer.store.redis import CHECKSUM_SIZE
from tests.support.redis_server import RedisServer, redis_server

SIZE = 1000
BACKOFF = 0.2  # the breaker's back-off in these tests (seconds)


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def value(i: int, size: int = SIZE) -> bytes:
    return bytes([i % 251]) * size


def ns() -> str:
    return f"faults-{time.monotonic_ns()}"


# -- the breaker on its own -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_backs_off_probes_once_and_closes():
    clock = Clock()
    b = CircuitBreaker(backoff_s=1.0, max_backoff_s=3.0, clock=clock)
    assert b.allow() and b.state == "closed"
    b.failure("down")
    b.failure("a call from before the opening")  # no second opening
    assert b.state == "open" and b.openings == 1 and not b.allow()
    assert b.retry_in() == pytest.approx(1.0)
    clock.now += 1.0
    assert b.allow() and b.state == "half-open"  # the probe...
    assert not b.allow()  # ...is the only call let through
    b.failure("still down")  # the probe failed: twice the back-off
    clock.now += 1.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()
    b.failure("still down")
    assert b.retry_in() == pytest.approx(3.0)  # capped
    clock.now += 3.0
    assert b.allow()
    b.release()  # the probe ended without a verdict: the next caller probes
    assert b.state == "open" and b.allow()
    b.success()
    assert b.state == "closed" and b.openings == 1 and b.allow() and b.allow()
    b.failure("down again")  # a new outage: the base back-off again
    assert b.openings == 2 and b.retry_in() == pytest.approx(1.0)


def test_breaker_lets_one_probe_through_among_threads():
    clock = Clock()
    b = CircuitBreaker(backoff_s=1.0, clock=clock)
    b.failure("down")
    clock.now += 1.0
    allowed: list[bool] = []
    threads = [threading.Thread(target=lambda: allowed.append(b.allow())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(allowed) == [False] * 15 + [True]


# -- corrupt entries ------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "flipped-value": lambda p: flip(p, HEADER.size + SIZE // 2),
    "flipped-crc": lambda p: flip(p, HEADER.size - 1),
    "truncated": lambda p: truncate(p, HEADER.size + SIZE // 3),
    "header-only": lambda p: truncate(p, HEADER.size),
    "emptied": lambda p: truncate(p, 0),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_corrupt_disk_chunk_is_a_counted_miss_removed_and_never_loaded(tmp_path, damage):
    disk = DiskBackend(tmp_path / "kv", 16 * (SIZE + HEADER.size))
    with TieredStore([CpuBackend(16 * SIZE), disk]) as store:
        for i in range(3):
            store.put(key(i), value(i))
        assert store.flush(timeout=30)
        store.tiers[0].delete(key(1))  # only on disk now
        path = disk.path / f"{key(1).hex}.kv"
        DAMAGE[damage](path)
        assert store.get(key(1)) is None  # never the damaged bytes
        assert not path.exists() and not disk.contains(key(1))
        assert not store.tiers[0].contains(key(1))  # nothing promoted
        assert store.lookup_prefix([key(0), key(1), key(2)]) == 1
        st = store.stats().tiers[1]
        assert (st.corrupt, st.load_hits, st.errors) == (1, 0, 0)
        assert store.get(key(1)) is None and store.stats().tiers[1].corrupt == 1  # once
        store.put(key(1), value(1))  # stored again: a good entry
        assert store.flush(timeout=30)
        store.tiers[0].delete(key(1))
        assert store.get(key(1)) == value(1)
        disk.check_integrity()


@pytest.fixture
def redis_store(redis_url) -> Iterator[tuple[TieredStore, redis.Redis]]:
    """CPU over Redis (the session's server), and a raw client to tamper with."""
    backend = RedisBackend(16 * (SIZE + CHECKSUM_SIZE), url=redis_url, namespace=ns())
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    with TieredStore([CpuBackend(16 * SIZE), backend]) as store:
        yield store, raw
    raw.close()


REDIS_DAMAGE = {
    "overwritten": lambda raw, vk: raw.set(vk, os.urandom(CHECKSUM_SIZE + SIZE)),
    "flipped": lambda raw, vk: raw.setrange(vk, CHECKSUM_SIZE + 7, b"\xff"),
    "truncated": lambda raw, vk: raw.set(vk, raw.getrange(vk, 0, CHECKSUM_SIZE + 99)),
    "shorter-than-checksum": lambda raw, vk: raw.set(vk, b"tiny"),
    "emptied": lambda raw, vk: raw.set(vk, b""),
}


@pytest.mark.parametrize("damage", REDIS_DAMAGE)
def test_corrupt_redis_value_is_a_counted_miss_removed_and_never_loaded(redis_store, damage):
    store, raw = redis_store
    backend = store.tiers[1]
    assert isinstance(backend, RedisBackend)
    for i in range(3):
        store.put(key(i), value(i))
    assert store.flush(timeout=30)
    store.tiers[0].delete(key(1))
    vkey = f"{backend.namespace}:v:{key(1).hex}"
    REDIS_DAMAGE[damage](raw, vkey)
    assert store.get(key(1)) is None
    assert raw.exists(vkey) == 0 and not backend.contains(key(1))
    assert not store.tiers[0].contains(key(1))
    st = store.stats().tiers[1]
    assert (st.corrupt, st.load_hits, st.errors) == (1, 0, 0)
    assert store.get(key(2)) == value(2)
    backend.check_integrity()


def test_corrupt_disk_chunk_falls_through_to_redis(tmp_path, redis_url):
    disk = DiskBackend(tmp_path / "kv", 16 * (SIZE + HEADER.size))
    red = RedisBackend(16 * (SIZE + CHECKSUM_SIZE), url=redis_url, namespace=ns())
    with TieredStore([CpuBackend(16 * SIZE), disk, red]) as store:
        store.put(key(5), value(5))
        assert store.flush(timeout=30)
        store.tiers[0].delete(key(5))
        flip(disk.path / f"{key(5).hex}.kv", HEADER.size + 1)
        assert store.get(key(5)) == value(5)  # the good copy, from Redis
        st = store.stats()
        assert st.tiers[1].corrupt == 1 and st.tiers[2].load_hits == 1
        assert store.flush(timeout=30) and disk.get(key(5)) == value(5)  # promoted: repaired


# -- Redis outages: the circuit breaker -----------------------------------------------------


@pytest.fixture
def server(redis_url) -> Iterator[RedisServer]:
    """A private redis-server this test may stop, restart and pause."""
    with redis_server() as s:
        yield s


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def exercise(store: TieredStore, base: int, n: int = 20) -> float:
    """``n`` rounds of a lookup, a load and a save; returns the seconds they took."""
    start = time.monotonic()
    for i in range(base, base + n):
        store.lookup_prefix([key(0), key(1), key(i)])
        store.get(key(i))
        store.put(key(i), value(i))
    assert store.flush(timeout=30)
    return time.monotonic() - start


def test_redis_stopped_and_restarted_on_the_same_port(server, tmp_path):
    port = server.port
    red = RedisBackend(64 * (SIZE + CHECKSUM_SIZE), url=server.url, namespace=ns(),
                       socket_timeout_s=2.0)
    clock = Clock()  # the back-off runs out when the test says so, however slow the disk
    red.breaker = CircuitBreaker(BACKOFF, 8 * BACKOFF, clock=clock)
    disk = DiskBackend(tmp_path / "kv", 64 * (SIZE + HEADER.size))
    with TieredStore([CpuBackend(4 * SIZE), disk, red]) as store:
        for i in range(2):
            store.put(key(i), value(i))
        assert store.flush(timeout=30) and red.contains(key(1))

        server.stop()  # Redis goes away mid-run
        exercise(store, 100, n=1)  # the first call to Redis fails: the breaker opens
        st = store.stats().tiers[2]
        assert (st.breaker_open, st.errors) == (1, 1) and red.breaker.state == "open"
        exercise(store, 200)  # within the back-off: Redis is not even tried
        snap = store.stats()
        assert snap.tiers[2].errors == 1 and snap.tiers[2].skipped >= 3 * 20 + 2
        assert snap.prefix_hit_chunks == 2 * 21  # keys 0 and 1 still found, in CPU or disk
        assert all(disk.contains(key(i)) for i in range(200, 220))  # saved there meanwhile
        store.tiers[0].delete(key(0))
        assert store.get(key(0)) == value(0)  # loaded from disk

        clock.now += BACKOFF  # one probe, which fails (still down): twice the back-off
        exercise(store, 300, n=1)
        assert red.breaker.state == "open" and red.breaker.retry_in() == pytest.approx(2 * BACKOFF)
        st = store.stats().tiers[2]
        assert (st.breaker_open, st.errors) == (1, 2)

        server.start()  # back, on the same port (empty: no persistence)
        assert server.port == port
        exercise(store, 350, n=1)
        assert store.stats().tiers[2].errors == 2  # the back-off is not over: not tried
        clock.now += 2 * BACKOFF
        store.put(key(400), value(400))  # the write-through probes, and succeeds
        assert store.flush(timeout=30)
        assert red.breaker.state == "closed" and red.contains(key(400))
        before = store.stats().tiers[2]
        exercise(store, 500)
        after = store.stats().tiers[2]
        assert after.skipped == before.skipped and after.errors == before.errors
        assert all(red.contains(key(i)) for i in range(500, 520))
        assert after.breaker_open == 1  # one outage
        red.check_integrity()


def test_hung_redis_costs_one_timeout_per_back_off_not_one_per_call(server):
    timeout, backoff = 0.3, 0.6  # real time here: the timeout is what is measured
    red = RedisBackend(64 * (SIZE + CHECKSUM_SIZE), url=server.url, namespace=ns(),
                       socket_timeout_s=timeout, breaker_backoff_s=backoff)
    with TieredStore([CpuBackend(64 * SIZE), red]) as store:
        store.put(key(1), value(1))
        assert store.flush(timeout=30)
        server.pause()  # accepts connections, never answers
        try:
            start = time.monotonic()
            assert store.get(key(9)) is None  # waits for one timeout...
            assert timeout * 0.8 < time.monotonic() - start < timeout * 4
            took = exercise(store, 100)  # ...and then for none: 60 calls bypass Redis
            assert took < timeout
            assert store.get(key(1)) == value(1)  # from the CPU tier
            st = store.stats().tiers[1]
            assert (st.breaker_open, st.errors) == (1, 1) and st.skipped >= 60
        finally:
            server.resume()
        wait_until(lambda: red.breaker.retry_in() == 0)
        assert store.get(key(999)) is None  # the probe: answered, a plain miss
        assert red.breaker.state == "closed" and red.get(key(1)) == value(1)
        st = store.stats().tiers[1]
        assert (st.breaker_open, st.errors) == (1, 1)


def test_hung_redis_times_out_a_read_into_buffers(server):
    """A load reading into buffers (``store.resp``) waits one socket timeout, then fails
    and opens the breaker; once Redis answers again, so does the next read."""
    timeout = 0.3
    red = RedisBackend(64 * (SIZE + CHECKSUM_SIZE), url=server.url, namespace=ns(),
                       socket_timeout_s=timeout, breaker_backoff_s=0.05)
    red.put(key(1), value(1))
    out = [memoryview(bytearray(SIZE))]
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(OSError, match="Timeout"):
            red.get_many_into([key(1)], out)
        assert timeout * 0.8 < time.monotonic() - start < timeout * 4
        assert red.breaker.state == "open"
    finally:
        server.resume()
    wait_until(lambda: red.breaker.retry_in() == 0)
    assert red.get_many_into([key(1)], out) == [True] and bytes(out[0]) == value(1)
    red.close()


def test_errors_the_server_answers_do_not_open_the_breaker(redis_url):
    with redis_server(maxmemory_bytes=3 << 20) as s:  # OOM: a refusal, not an outage
        red = RedisBackend(64 << 20, url=s.url, namespace=ns(), breaker_backoff_s=BACKOFF)
        with TieredStore([CpuBackend(64 << 20), red]) as store:
            for i in range(60):
                store.put(key(i), value(i, 100_000))
            assert store.flush(timeout=60)
            st = store.stats().tiers[1]
            assert st.save_errors > 0 and st.breaker_open == 0 and st.skipped == 0
            assert red.breaker.state == "closed"


def test_unreachable_at_start_is_bypassed_at_once(redis_url):
    with redis_server() as s:
        url = s.url
    start = time.monotonic()
    red = RedisBackend(1 << 20, url=url, namespace=ns(), breaker_backoff_s=30.0)
    with TieredStore([CpuBackend(1 << 20), red]) as store:
        for i in range(50):
            assert store.lookup_prefix([key(i)]) == 0
            store.put(key(i), value(i))
        assert store.flush(timeout=30)
        assert time.monotonic() - start < 2.0
        with pytest.raises(TierUnavailable, match="circuit breaker open"):
            red.get(key(1))
        st = store.stats().tiers[1]
        assert st.breaker_open == 1 and st.skipped == 100 and st.errors == 0


# -- a full disk ----------------------------------------------------------------------------


def no_temporary_files(path: Path) -> bool:
    return not list(path.glob("*.tmp"))


def test_disk_full_saves_fail_and_are_counted_while_serving_goes_on(tmp_path, monkeypatch,
                                                                    caplog):
    disk = DiskBackend(tmp_path / "kv", 64 * (SIZE + HEADER.size))
    with TieredStore([CpuBackend(4 * SIZE), disk]) as store:
        for i in range(8):
            store.put(key(i), value(i))
        assert store.flush(timeout=30)
        used = disk.used_bytes
        real_write = disk_module._write_entry
        calls = []

        def full(fd, k, data, stamp):
            calls.append(k)
            os.write(fd, b"partial")  # some of it, then the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(disk_module, "_write_entry", full)
        for i in range(100, 110):
            store.put(key(i), value(i))  # never raises
        assert store.flush(timeout=30)
        st = store.stats().tiers[1]
        assert st.save_errors == st.errors == len(calls) == 10 and st.saves == 8
        assert "No space left on device" in caplog.text
        assert caplog.text.count("No space left") == 1  # logged once, not per write
        assert disk.used_bytes == used and no_temporary_files(disk.path)
        disk.check_integrity()
        for i in range(8):  # serving goes on: lookups and loads of what the disk holds
            assert store.lookup_prefix([key(i)]) == 1
            store.tiers[0].delete(key(i))
            assert store.get(key(i)) == value(i)
        assert not disk.contains(key(105)) and store.get(key(105)) is None

        monkeypatch.setattr(disk_module, "_write_entry", real_write)  # space again
        store.put(key(200), value(200))
        assert store.flush(timeout=30) and disk.contains(key(200))
        assert store.stats().tiers[1].save_errors == 10


@pytest.fixture
def tiny_filesystem(tmp_path) -> Iterator[Path]:
    """A 256 KiB tmpfs, mounted for the test (needs root and mount rights)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_really_full_filesystem(tiny_filesystem):
    big = 40_000
    disk = DiskBackend(tiny_filesystem / "kv", 64 << 20)  # the cap is not what stops it
    with TieredStore([CpuBackend(2 * big), disk]) as store:
        for i in range(12):  # ~480 KB into 256 KiB
            store.put(key(i), value(i, big))
            assert store.flush(timeout=30)
        st = store.stats().tiers[1]
        assert st.saves >= 3 and st.save_errors >= 3 and st.saves + st.save_errors == 12
        assert no_temporary_files(disk.path)
        disk.check_integrity()
        stored = disk.keys()
        assert len(stored) == st.saves
        for k in stored:  # everything the disk holds is whole and served
            store.tiers[0].delete(k)
            assert store.get(k) == value(int.from_bytes(k.digest, "big"), big)
        disk.delete(stored[0])  # room again
        store.put(key(99), value(99, big))
        assert store.flush(timeout=30) and disk.contains(key(99))


@pytest.mark.parametrize("into", [True, False], ids=["into a buffer", "as bytes"])
@pytest.mark.parametrize("reply,ok", [(b"$3\r\nabc\r\n", True), (b"$3\r\nabcX\r\n", False),
                                      (b"$2\r\nabc\r\n", False)])
def test_a_bulk_value_must_end_where_its_length_says(reply, ok, into):
    """A length that does not match the bytes (a server bug, a stream out of step) is an
    error, never a value read from the wrong place: for values read into the loader's
    buffers and for checksums alike."""
    from disagg.transfer.store.resp import _Reader

    here, there = socket.socketpair()
    with here, there:
        there.sendall(reply)
        out = memoryview(bytearray(3))
        reader = _Reader(here)

        def read() -> bytes | None:
            if into:
                return bytes(out) if reader.bulk_into(out) == 3 else None
            return reader.bulk()

        if ok:
            assert read() == b"abc"
        else:
            with pytest.raises(redis.exceptions.InvalidResponse):
                read()

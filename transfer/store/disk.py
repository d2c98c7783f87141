"""Local disk tier: one file per chunk, a hard byte cap with LRU eviction, crash safety.

Directory contents:

    .lock                              flock'ed by the one live DiskBackend owning the dir
    <64 hex digits of the key>.kv      one entry: HEADER then the value
    <hex>.<pid>.<seq>.tmp              a write in flight (or left by a killed writer)

Entry file (little-endian):

    +-------+---------+----------+------------+-------------+--------+----------------+
    | magic | version | reserved | key (32 B) | length (u64)| crc32  | value (length) |
    | DKVC  |  u16=1  |   u16    |            |             |  u32   |                |
    +-------+---------+----------+------------+-------------+--------+----------------+

Crash safety: a value is written to a temporary file in the same directory, fsync'ed, then
``os.replace``d onto its name, so a reader sees the old entry, the new one, or none; never
half of one. Every read checks magic, version, key, length and CRC: a truncated or
bit-flipped entry reads as a miss and is deleted. Temporary files are deleted on start.

Recency lives in memory and in file mtimes (set explicitly from a strictly increasing clock,
because file timestamps tick coarsely), so a restart rebuilds the index in the same LRU
order. ``used_bytes`` counts file lengths (header included), plus space reserved for writes
in flight; filesystem block rounding is not counted.

One process owns a directory at a time (the flock): two owners would each enforce the cap
on their own view and together exceed it. A second owner raises RuntimeError.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import struct
import time
import zlib
from collections import OrderedDict
from pathlib import Path

from .backend import BytesLike, StoreBackend
from .keys import ChunkKey

HEADER = struct.Struct("<4sHH32sQI")
MAGIC = b"DKVC"
VERSION = 1
_SUFFIX = ".kv"


class DiskBackend(StoreBackend):
    """LRU directory of checksummed entry files. Thread-safe; file I/O runs outside the lock
    except the final rename, which is ordered with the index update under it."""

    name = "disk"

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()  # key -> file length, LRU 1st
        self._used = 0
        self._reserved = 0  # bytes of writes in flight, charged against the cap
        self._seq = itertools.count()
        self._clock = 0  # last mtime handed out (ns)
        self._lock_fd: int | None = self._acquire_dir_lock()
        self._load_index()

    # -- public API --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used + self._reserved

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
            stamp = self._tick()
        path = self._file(key)
        try:
            value, inode = _read_entry(path, key)
        except FileNotFoundError:  # evicted meanwhile, or deleted behind our back
            self._forget_if_missing(key)
            return None
        if value is None:
            self._drop_corrupt(key, inode)
            return None
        _touch(path, stamp)
        return value

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        value = memoryview(data).cast("B")
        size = HEADER.size + value.nbytes
        if size > self._capacity:
            return False
        with self._lock:
            self._require_open()
            self._remove(key)  # replacing: the old value must not count twice
            if not self._evict_for(size):
                return False  # only when concurrent writes in flight hold the space
            self._reserved += size
            stamp = self._tick()
        self._write(key, value, size, stamp)
        return True

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._remove(key)

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._index)

    def check_integrity(self) -> None:
        with self._lock:
            total = sum(self._index.values())
            assert total == self._used, f"used {self._used} != sum of index {total}"
            assert self._used + self._reserved <= self._capacity, (
                f"used {self._used} + reserved {self._reserved} > cap {self._capacity}")
            on_disk = dict(_scan(self.path)[0])
            assert on_disk.keys() == self._index.keys(), "index and entry files disagree"
            wrong = [k for k, n in self._index.items() if on_disk[k][0] != n]
            assert not wrong, f"file sizes differ from the index for {wrong[:3]}"

    def close(self) -> None:
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # -- writing -------------------------------------------------------------------------

    def _write(self, key: ChunkKey, value: memoryview, size: int, stamp: int) -> None:
        tmp = self.path / f"{key.hex}.{os.getpid()}.{next(self._seq)}.tmp"
        reserved = True
        try:
            _write_entry(tmp, key, value, stamp)
            with self._lock:
                self._reserved -= size
                reserved = False
                self._remove(key)  # a concurrent put of this key landed first; ours wins
                os.replace(tmp, self._file(key))
                self._index[key] = size
                self._used += size
        except BaseException:
            if reserved:
                with self._lock:
                    self._reserved -= size
            tmp.unlink(missing_ok=True)
            raise

    def _evict_for(self, size: int) -> bool:
        """Delete LRU entries until ``size`` more bytes fit. Caller holds the lock."""
        while self._index and self._used + self._reserved + size > self._capacity:
            key, length = self._index.popitem(last=False)
            self._file(key).unlink(missing_ok=True)
            self._used -= length
            self.evicted_bytes += length
            self.evicted_entries += 1
        return self._used + self._reserved + size <= self._capacity

    # -- index upkeep --------------------------------------------------------------------

    def _remove(self, key: ChunkKey) -> bool:
        """Unlink ``key``'s file and forget it. Caller holds the lock."""
        length = self._index.pop(key, None)
        if length is None:
            return False
        self._file(key).unlink(missing_ok=True)
        self._used -= length
        return True

    def _drop_corrupt(self, key: ChunkKey, inode: int) -> None:
        with self._lock:
            # Only if the file is still the one we read: a concurrent put may have replaced it.
            try:
                same = os.stat(self._file(key)).st_ino == inode
            except FileNotFoundError:
                same = True
            if same and key in self._index:
                self.corrupt_entries += 1
                self._remove(key)

    def _forget_if_missing(self, key: ChunkKey) -> None:
        with self._lock:
            if key in self._index and not self._file(key).exists():
                self._used -= self._index.pop(key)

    def _load_index(self) -> None:
        """Rebuild the index from the entry files, oldest mtime first; delete leftovers."""
        entries, leftovers = _scan(self.path)
        for path in leftovers:
            path.unlink(missing_ok=True)
        for key, (length, mtime) in sorted(entries, key=lambda e: (e[1][1], e[0])):
            if length < HEADER.size:  # cannot even hold a header: a torn write
                self._file(key).unlink(missing_ok=True)
                continue
            self._index[key] = length
            self._used += length
            self._clock = max(self._clock, mtime)
        self._evict_for(0)  # the cap may have shrunk since the last run

    def _acquire_dir_lock(self) -> int:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is owned by another live DiskBackend") from None
        return fd

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"DiskBackend({self.path}) is closed")

    def _tick(self) -> int:
        """A strictly increasing wall-clock ns stamp for mtimes. Caller holds the lock."""
        self._clock = max(self._clock + 1, time.time_ns())
        return self._clock

    def _file(self, key: ChunkKey) -> Path:
        return self.path / f"{key.hex}{_SUFFIX}"


# -- file format ---------------------------------------------------------------------------


def _write_entry(path: Path, key: ChunkKey, value: memoryview, stamp: int) -> None:
    header = HEADER.pack(MAGIC, VERSION, 0, key.digest, value.nbytes, zlib.crc32(value))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(header)
            f.write(value)
        os.utime(fd, ns=(stamp, stamp))
        os.fsync(fd)  # data durable before the rename makes it visible
    finally:
        os.close(fd)


def _read_entry(path: Path, key: ChunkKey) -> tuple[bytes | None, int]:
    """(value, inode), value None when the file is not a valid entry for ``key``.
    Raises FileNotFoundError when there is no file."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            return None, st.st_ino
        magic, version, flags, digest, length, crc = HEADER.unpack(head)
        if (magic, version, flags, digest) != (MAGIC, VERSION, 0, key.digest) or (
                st.st_size != HEADER.size + length):
            return None, st.st_ino
        value = f.read(length)
    ok = len(value) == length and zlib.crc32(value) == crc
    return (value if ok else None), st.st_ino


def _touch(path: Path, stamp: int) -> None:
    # Evicted since we read it, or not ours to touch: the mtime is only a recency hint.
    with contextlib.suppress(OSError):
        os.utime(path, ns=(stamp, stamp))


def _scan(path: Path) -> tuple[list[tuple[ChunkKey, tuple[int, int]]], list[Path]]:
    """([(key, (length, mtime_ns))] for entry files, [temporary files])."""
    entries, leftovers = [], []
    with os.scandir(path) as it:
        for e in it:
            if e.name.endswith(".tmp"):
                leftovers.append(Path(e.path))
            elif e.name.endswith(_SUFFIX) and e.is_file():
                try:
                    key = ChunkKey.from_hex(e.name[: -len(_SUFFIX)])
                except ValueError:
                    continue  # not ours
                st = e.stat()
                entries.append((key, (st.st_size, st.st_mtime_ns)))
    return entries, leftovers

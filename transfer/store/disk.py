"""Local disk tier: one file per chunk, a hard byte cap with LRU eviction, crash safety. Any
number of DiskBackends, in any processes on the host, may use one directory at once: what one
instance saves, another reads.

Directory contents:

    .lock                            the ledger, and the lock every change to the directory
                                     is made under (exclusive flock, held briefly): bytes
                                     charged, cap in force, put clock, journal of puts
    .sharers/<pid>-<id>.cap          one per open DiskBackend: its capacity; flock'ed by it
    <64 hex digits of the key>.kv    one entry: HEADER then the value
    <hex>.<size>.<pid>-<seq>.tmp     a write in flight, flock'ed by its writer (or left by a
                                     killed one); <size> is the space reserved for it

Entry file (little-endian):

    +-------+---------+----------+------------+-------------+----------+----------------+
    | magic | version | reserved | key (32 B) | length (u64)| checksum | value (length) |
    | DKVC  |  u16=2  |   u16    |            |             | u64 XXH3 |                |
    +-------+---------+----------+------------+-------------+----------+----------------+

The checksum is XXH3-64 of the value: tens of GB/s, so reading an entry costs its copy, not
its check (CRC32 ran at a quarter of memory speed). Version 1 files (CRC32) read as corrupt
and are deleted.

Ledger (``.lock``, little-endian): LEDGER (magic DKVL, version, epoch, used, cap, clock, end)
then journal RECORDs (put stamp, key digest) up to offset ``end``.

Crash safety: a value is written to a temporary file in the same directory, fsync'ed, then
``os.replace``d onto its name, so a reader sees the old entry, the new one, or none; never
half of one. Every read checks magic, version, key, length and checksum: a truncated or
bit-flipped entry reads as a miss and is deleted. A writer holds a flock on its temporary
file until the rename, so one nobody holds belongs to a killed writer: a rescan deletes it,
and never touches a live writer's, in whatever process.

Sharing. The filesystem is the truth for entries: ``get`` and ``contains`` open or stat the
entry's file, so an entry another process wrote is found (and adopted into this object's
index) and one it evicted or deleted is a miss (and forgotten). The ledger is the truth for
space: ``used`` = entry file lengths (header included) + space reserved by temporary files;
filesystem block rounding is not counted, nor the ledger (under 48 + 40 * JOURNAL_MAX bytes)
and ``.sharers``. ``put`` takes the flock twice, briefly: first it reads the journal records
other processes appended since its last look into its in-memory LRU index, removes the key's
old file, evicts least recently used entries until the value fits, reserves its size and
creates its temporary file; it writes and fsyncs without the lock; then it renames the file
into place and appends (stamp, key) to the journal. The ledger is written back at the end
of each critical section, after its file changes (removals, a rename, creating the still
empty temporary file), so a process killed anywhere leaves bytes on disk <= ``used`` <= cap;
a count left too high is corrected by the next rescan.

Recency is the file mtime, the same for every sharer: ``put`` stamps from the ledger's clock
(strictly increasing across processes), ``get`` from max(time_ns(), last + 1) of its
process. The index (key -> mtime, and a heap of eviction candidates) may lag behind gets in
other processes: eviction stats each candidate and requeues one whose mtime moved on, and
skips one already gone. So eviction is least recently used first across all sharers, except
that an entry still being written cannot be evicted.

Rescan: a full directory scan rebuilds the index in LRU order and recomputes ``used`` (and
deletes stale temporary files) when a backend opens, after a corrupt entry is dropped, when
eviction runs out of candidates, after the journal was compacted (every JOURNAL_MAX puts, by
whichever put finds it full) and on a put at most every RESCAN_S seconds. It costs O(entries)
(~15 ms at 2,000 entries, ~40 ms at 5,000 on a 2-core VM); a put otherwise costs O(log
entries) and ~27 syscalls (a single-owner put took 11) plus the entries it evicts. Space
charged for files deleted behind the stores' backs is released by the next rescan.

Capacity: the smallest capacity among the open DiskBackends on a directory governs every put
(each registers it in ``.sharers``), so ``used_bytes <= capacity_bytes`` holds for every one
of them. A backend opening with a smaller cap evicts down to it at once; when it closes, the
smallest remaining cap applies again (a killed sharer's, at the next rescan). ``used_bytes``
is the directory's count, the same whichever sharer asks.

Each process opens its own DiskBackend (a forked copy would share its parent's flocks, so it
refuses to change the directory). Sharers must all run this version: an older DiskBackend
held ``.lock`` for its lifetime.

Permissions: KV chunks are prompt content. The directory (and ``.sharers``) is created mode
0700 and every file 0600, whatever the umask, so only the user the instances run as can read
or plant entries (the CRC is not a MAC). An existing directory is tightened to 0700 when it is
ours, not sticky, and empty or already a store (holds ``.lock``); any other existing
directory is used as it is, with a warning when other users may write to it.

Disk full: a put whose write fails (ENOSPC, EDQUOT, EIO...) deletes its temporary file,
releases its reservation and raises the OSError; entries already stored stay readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import logging
import os
import re
import stat
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .backend import BytesLike, StoreBackend
from .keys import DIGEST_SIZE, ChunkKey

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
HEADER = struct.Struct("<4sHH32sQQ")
MAGIC = b"DKVC"
VERSION = 2
_SUFFIX = ".kv"
_TMP = ".tmp"

LEDGER = struct.Struct("<4sHHQQQQQ")  # magic, version, reserved, epoch, used, cap, clock, end
LEDGER_MAGIC = b"DKVL"
LEDGER_VERSION = 1
RECORD = struct.Struct("<Q32s")  # put stamp (ns), key digest
JOURNAL_MAX = 4096  # records; then the journal is emptied and every sharer rescans once
RESCAN_S = 60.0  # a put rescans when the last rescan is older than this
_SHARERS = ".sharers"
_SEQ = itertools.count()  # temporary file names, unique across the backends of a process


@dataclass
class _Ledger:
    epoch: int  # changes when the journal is emptied: records before it are lost
    used: int  # bytes charged: entry files + reserved temporaries
    cap: int  # the smallest capacity among open sharers (0: none recorded)
    clock: int  # the last put stamp handed out (ns)
    end: int  # journal end offset


class DiskBackend(StoreBackend):
    """LRU directory of checksummed entry files, shared by every DiskBackend on it.
    Thread-safe; file I/O runs outside the locks except the short critical sections of
    ``put``, ``delete`` and rescans, which run under the directory's flock."""

    name = "disk"
    reads_in_place = True

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.path = Path(path)
        _private_dir(self.path)
        _private_dir(self.path / _SHARERS, ours=True)
        self._dir = str(self.path)  # str paths: pathlib costs more than the syscalls here
        # Lock order: _dir_lock (this object's use of the flock, may wait on other
        # processes) before _lock (the index and clock; only ever held briefly).
        self._dir_lock = threading.Lock()
        self._known: dict[str, int] = {}  # key hex -> mtime (ns) as last seen
        self._heap: list[tuple[int, str]] = []  # (mtime, hex); valid iff _known agrees
        self._clock = 0  # last stamp this process handed out (ns)
        self._epoch = -1  # the ledger epoch, and the journal offset, read up to
        self._offset = 0
        self._scanned_at = 0.0
        self._last_used = 0
        self._member: Path | None = None
        self._member_fd: int | None = None
        self._pid = os.getpid()  # a forked child shares our flocks: it must open its own
        self._fd: int | None = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        with contextlib.suppress(PermissionError):  # an older version's .lock: 0644
            os.fchmod(self._fd, FILE_MODE)
        try:
            with self._exclusive() as led:
                self._register()
                self._rescan(led)
                self._evict_for(led, 0)  # this cap may be smaller than what the dir holds
        except BaseException:
            self._release_fds()
            raise

    # -- public API --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """The directory's count (after ``close``, the last one read)."""
        with self._dir_lock:
            if self._fd is not None and os.getpid() == self._pid:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                try:
                    led = self._read_ledger()
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                if led is not None:
                    self._last_used = led.used
        return self._last_used

    def contains(self, key: ChunkKey) -> bool:
        hx = key.hex
        try:
            st = os.stat(self._file(hx))
        except FileNotFoundError:
            self._forget(hx)
            return False
        self._adopt(hx, st.st_mtime_ns)
        return True

    def get(self, key: ChunkKey) -> bytes | None:
        value = self._get(key, None)
        assert not isinstance(value, memoryview)
        return value

    def get_many_into(self, keys: Sequence[ChunkKey], out: Sequence[memoryview]) -> list[bool]:
        """Read straight into ``out``: no allocation, no copy beyond the page cache's."""
        return [self._get(k, buf) is not None for k, buf in zip(keys, out, strict=True)]

    def _get(self, key: ChunkKey, into: memoryview | None) -> bytes | memoryview | None:
        hx = key.hex
        path = self._file(hx)
        try:
            value, inode = _read_entry(path, key, into)
        except FileNotFoundError:  # never written, or evicted/deleted by any sharer
            self._forget(hx)
            return None
        if value is None:
            if into is None or _entry_size(path) == HEADER.size + into.nbytes:
                self._drop_corrupt(hx, inode)  # (a value of another size is no corruption)
            return None
        with self._lock:
            self._clock = stamp = max(self._clock + 1, time.time_ns())
        if _touch(path, stamp):
            self._adopt(hx, stamp)
        return value

    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        value = memoryview(data).cast("B")
        size = HEADER.size + value.nbytes
        if size > self._capacity:
            return False
        hx = key.hex
        with self._exclusive() as led:
            self._sync(led)
            if size > self._cap(led):  # a sharer with a smaller cap is open
                return False
            self._remove(led, hx)  # replacing: the old value must not count twice
            if not self._evict_for(led, size):
                self._rescan(led)  # out of candidates: maybe the ledger over-counts
                if not self._evict_for(led, size):
                    return False  # writes in flight hold the space
            tmp = f"{self._dir}/{hx}.{size}.{os.getpid()}-{next(_SEQ)}{_TMP}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: never blocks
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            led.used += size  # raised only once the (empty) file exists
            stamp = self._stamp(led)
        self._write(key, tmp, fd, value, size, stamp)
        return True

    def delete(self, key: ChunkKey) -> bool:
        with self._exclusive() as led:
            return self._remove(led, key.hex)

    def keys(self) -> list[ChunkKey]:
        """Every entry in the directory, whoever wrote it, least recently used first."""
        entries, _ = _scan(self.path)
        return [ChunkKey.from_hex(hx) for _, hx, _ in sorted(entries)]

    def rescan(self) -> None:
        """Rebuild the index and the ledger's count from the directory now, deleting stale
        temporary files (done anyway on open, and now and then by ``put``)."""
        with self._exclusive() as led:
            self._rescan(led)

    def check_integrity(self) -> None:
        with self._exclusive() as led:
            self._sync(led)
            entries, reserved = _scan(self.path)
            total = sum(size for _, _, size in entries) + reserved
            assert led.used == total, (
                f"ledger used {led.used} != entry files + reserved temporaries {total}")
            assert led.used <= self._cap(led), f"used {led.used} > cap {self._cap(led)}"
            assert 0 < led.cap <= self._capacity, f"cap in force {led.cap} is not ours or less"
            with self._lock:
                candidates = set(self._heap)
                stray = [hx for hx, m in self._known.items() if (m, hx) not in candidates]
                unknown = [hx for _, hx, _ in entries if hx not in self._known]
            assert not stray, f"indexed keys without an eviction candidate: {stray[:3]}"
            assert not unknown, f"entry files the index does not know: {unknown[:3]}"
            assert self._member is not None and self._member.exists(), "not registered"

    def close(self) -> None:
        forked = os.getpid() != self._pid
        if not forked:
            try:
                with self._exclusive() as led:
                    self._unregister()
                    led.cap = _sharers_cap(self.path / _SHARERS)
            except RuntimeError:
                return  # closed already
        with self._dir_lock:
            self._release_fds(unlink=not forked)  # a forked child's copy: the fds only

    # -- writing -------------------------------------------------------------------------

    def _write(self, key: ChunkKey, tmp: str, fd: int, value: memoryview, size: int,
               stamp: int) -> None:
        committed = False
        try:
            _write_entry(fd, key, value, stamp)
            with self._exclusive() as led:
                target = self._file(key.hex)
                try:
                    replaced = os.stat(target).st_size  # a concurrent put of this key
                except FileNotFoundError:
                    replaced = 0
                os.replace(tmp, target)
                committed = True
                led.used -= replaced  # ours wins; its space was reserved as ours was
                os.pwrite(self._locked_fd, RECORD.pack(stamp, key.digest), led.end)
                led.end += RECORD.size
        except BaseException:
            if not committed:
                self._abandon(tmp, size)
            raise
        finally:
            os.close(fd)  # releases the temporary file's flock

    def _abandon(self, tmp: str, size: int) -> None:
        """Delete a failed write's temporary file and release its reservation."""
        try:
            with self._exclusive() as led, contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
                led.used -= size
        except RuntimeError:  # closed meanwhile: the next rescan releases the space
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _evict_for(self, led: _Ledger, size: int) -> bool:
        """Delete LRU entries until ``size`` more bytes fit. Caller holds the flock."""
        cap = self._cap(led)
        while led.used + size > cap:
            victim = self._pop_candidate()
            if victim is None:
                return False
            hx, length = victim
            try:
                os.unlink(self._file(hx))
            except FileNotFoundError:
                continue
            led.used -= length
            with self._lock:
                self.evicted_bytes += length
                self.evicted_entries += 1
        return True

    def _pop_candidate(self) -> tuple[str, int] | None:
        """(hex, file length) of the least recently used entry on disk, or None."""
        while True:
            with self._lock:
                if not self._heap:
                    return None
                mtime, hx = heapq.heappop(self._heap)
                if self._known.get(hx) != mtime:
                    continue  # superseded by a later sighting
                del self._known[hx]
            try:
                st = os.stat(self._file(hx))
            except FileNotFoundError:
                continue  # evicted or deleted by another sharer
            if st.st_mtime_ns != mtime:  # read (or rewritten) since: requeue as it is now
                self._adopt(hx, st.st_mtime_ns)
                continue
            return hx, st.st_size

    def _remove(self, led: _Ledger, hx: str) -> bool:
        """Unlink ``hx``'s entry file. Caller holds the flock."""
        path = self._file(hx)
        try:
            length = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            self._forget(hx)
            return False
        led.used -= length
        self._forget(hx)
        return True

    def _drop_corrupt(self, hx: str, inode: int) -> None:
        try:
            with self._exclusive() as led:
                path = self._file(hx)
                # Only if the file is still the one we read: a put may have replaced it.
                try:
                    if os.stat(path).st_ino != inode:
                        return
                    os.unlink(path)
                except FileNotFoundError:
                    return
                with self._lock:
                    self.corrupt_entries += 1
                self._rescan(led)  # a damaged file's length is not what was charged
        except RuntimeError:
            pass  # closed: leave it for the next backend on the directory

    # -- the index -------------------------------------------------------------------------

    def _adopt(self, hx: str, mtime: int) -> None:
        """Index an entry seen on disk (a no-op if it is indexed already)."""
        with self._lock:
            if hx not in self._known:
                self._known[hx] = mtime
                heapq.heappush(self._heap, (mtime, hx))

    def _forget(self, hx: str) -> None:
        """Unindex an entry found missing, unless it is back (a put's journal record read
        since: checked under the lock that reading takes)."""
        with self._lock:
            if hx in self._known and not os.path.exists(self._file(hx)):
                del self._known[hx]  # its heap item goes stale, skipped when popped

    def _sync(self, led: _Ledger) -> None:
        """Catch up with the other sharers' puts. Caller holds the flock."""
        if led.epoch != self._epoch or time.monotonic() - self._scanned_at > RESCAN_S:
            self._rescan(led)
            return
        if led.end > self._offset:
            raw = os.pread(self._locked_fd, led.end - self._offset, self._offset)
            with self._lock:
                for stamp, digest in RECORD.iter_unpack(raw[: len(raw) // RECORD.size
                                                           * RECORD.size]):
                    hx = digest.hex()
                    self._known[hx] = stamp
                    heapq.heappush(self._heap, (stamp, hx))
                if len(self._heap) > 2 * len(self._known) + 1024:  # drop stale items
                    self._heap = [(m, hx) for hx, m in self._known.items()]
                    heapq.heapify(self._heap)
            self._offset = led.end
        if led.end >= LEDGER.size + JOURNAL_MAX * RECORD.size:  # we have read it all
            led.epoch += 1
            led.end = self._offset = LEDGER.size
            self._epoch = led.epoch
            os.ftruncate(self._locked_fd, LEDGER.size)

    def _rescan(self, led: _Ledger) -> None:
        """Rebuild the index and ``led.used`` from the directory. Caller holds the flock."""
        entries, reserved = _scan(self.path, clean=True)
        led.used = sum(size for _, _, size in entries) + reserved
        led.cap = _sharers_cap(self.path / _SHARERS)
        led.clock = max([led.clock, *(m for m, _, _ in entries)])
        self._epoch, self._offset = led.epoch, led.end
        heap = [(m, hx) for m, hx, _ in entries]
        heapq.heapify(heap)
        with self._lock:
            self._known = {hx: m for m, hx in heap}
            self._heap = heap
            self._clock = max(self._clock, led.clock)
        self._scanned_at = time.monotonic()

    # -- the ledger and the sharers --------------------------------------------------------

    @property
    def _locked_fd(self) -> int:
        """``.lock``'s descriptor, for code running under ``_dir_lock`` (which ``close``
        also takes) after ``_exclusive`` or ``__init__`` found it open."""
        assert self._fd is not None, f"DiskBackend({self.path}) is closed"
        return self._fd

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Ledger]:
        """Hold the directory's flock; yields the ledger, written back on the way out (also
        on an error: the body keeps it in step with each file change it makes)."""
        with self._dir_lock:
            if self._fd is None:
                raise RuntimeError(f"DiskBackend({self.path}) is closed")
            if os.getpid() != self._pid:
                raise RuntimeError(f"DiskBackend({self.path}) was opened by process "
                                   f"{self._pid}: each process must open its own")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                led = self._read_ledger()
                if led is None:  # new directory, or an older version's empty .lock
                    led = _Ledger(epoch=time.time_ns(), used=0, cap=0, clock=0,
                                  end=LEDGER.size)
                    os.ftruncate(self._fd, LEDGER.size)
                    self._rescan(led)
                try:
                    yield led
                finally:
                    os.pwrite(self._fd, LEDGER.pack(LEDGER_MAGIC, LEDGER_VERSION, 0, led.epoch,
                                                    led.used, led.cap, led.clock, led.end), 0)
                    self._last_used = led.used
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read_ledger(self) -> _Ledger | None:
        raw = os.pread(self._locked_fd, LEDGER.size, 0)
        if len(raw) != LEDGER.size:
            return None
        magic, version, _, epoch, used, cap, clock, end = LEDGER.unpack(raw)
        if magic != LEDGER_MAGIC or version != LEDGER_VERSION or end < LEDGER.size:
            return None
        return _Ledger(epoch, used, cap, clock, end)

    def _register(self) -> None:
        """Announce this backend's capacity to the sharers. Caller holds the flock."""
        member = self.path / _SHARERS / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.cap"
        fd = os.open(member, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while open: a lockable one is a dead sharer's
        os.write(fd, str(self._capacity).encode())
        self._member, self._member_fd = member, fd

    def _unregister(self, unlink: bool = True) -> None:
        if self._member is not None:
            if unlink:
                self._member.unlink(missing_ok=True)
            self._member = None
        if self._member_fd is not None:
            os.close(self._member_fd)
            self._member_fd = None

    def _release_fds(self, unlink: bool = True) -> None:
        self._unregister(unlink)
        if self._fd is not None:
            os.close(self._fd)  # releases the flock if held
            self._fd = None

    def _cap(self, led: _Ledger) -> int:
        return min(self._capacity, led.cap) if led.cap else self._capacity

    def _stamp(self, led: _Ledger) -> int:
        """A put's mtime: after every stamp any sharer handed out. Caller holds the flock."""
        with self._lock:
            led.clock = self._clock = max(led.clock + 1, self._clock + 1, time.time_ns())
        return led.clock

    def _file(self, hx: str) -> str:
        return f"{self._dir}/{hx}{_SUFFIX}"


# -- files -----------------------------------------------------------------------------------


def _private_dir(path: Path, ours: bool = False) -> None:
    """Make ``path`` (and missing parents) a directory only its owner can use: see the module
    docstring's "Permissions" for what happens to an existing one (``ours``: one the store
    made, tightened if we own it)."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"disk tier path {path} is not a directory") from None
        if stat.S_IMODE(st.st_mode) == DIR_MODE:
            return
        sticky = st.st_mode & stat.S_ISVTX  # /tmp and the like: shared by design
        if st.st_uid == os.geteuid() and not sticky and (
                ours or (path / ".lock").exists() or not any(path.iterdir())):
            os.chmod(path, DIR_MODE)
        elif st.st_mode & 0o022:
            logger.warning("disk tier directory %s (mode %o) is writable by other users, who "
                           "could plant KV entries; use a directory of its own", path,
                           stat.S_IMODE(st.st_mode))
    else:
        os.chmod(path, DIR_MODE)  # mkdir's mode went through the umask


def _write_entry(fd: int, key: ChunkKey, value: memoryview, stamp: int) -> None:
    header = HEADER.pack(MAGIC, VERSION, 0, key.digest, value.nbytes, xxhash.xxh3_64_intdigest(value))
    with os.fdopen(fd, "wb", closefd=False) as f:
        f.write(header)
        f.write(value)
    os.utime(fd, ns=(stamp, stamp))
    os.fsync(fd)  # data durable before the rename makes it visible


def _read_entry(path: str, key: ChunkKey,
                into: memoryview | None = None) -> tuple[bytes | memoryview | None, int]:
    """(value, inode), value None when the file is not a valid entry for ``key``. With
    ``into`` (a writable buffer), a value of exactly its size is read into it and ``into``
    returned; a value of another size is None (not an entry the caller can use).
    Raises FileNotFoundError when there is no file."""
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            return None, st.st_ino
        magic, version, flags, digest, length, crc = HEADER.unpack(head)
        if (magic, version, flags, digest) != (MAGIC, VERSION, 0, key.digest) or (
                st.st_size != HEADER.size + length):
            return None, st.st_ino
        if into is None:
            value: bytes | memoryview = f.read(length)
            got = len(value)
        elif into.nbytes != length:
            return None, st.st_ino
        else:
            value, got = into, f.readinto(into) or 0
    ok = got == length and xxhash.xxh3_64_intdigest(value) == crc
    return (value if ok else None), st.st_ino


def _entry_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _touch(path: str, stamp: int) -> bool:
    """Make ``path`` most recently used; False if it is gone (evicted since we read it)."""
    try:
        os.utime(path, ns=(stamp, stamp))
    except OSError:  # gone, or not ours to touch: the mtime is only a recency hint
        return False
    return True


_KEY_HEX = re.compile(f"[0-9a-f]{{{2 * DIGEST_SIZE}}}")


def _reserved_size(name: str) -> int | None:
    """The size a temporary file ``<hex>.<size>.<pid>-<seq>.tmp`` reserves, if it says."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def _held(path: str) -> bool | None:
    """Whether someone holds a flock on ``path`` (None: the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _scan(path: Path, clean: bool = False) -> tuple[list[tuple[int, str, int]], int]:
    """([(mtime_ns, hex, length)] of the entry files, bytes reserved by temporary files).
    With ``clean`` (under the flock), deletes stale temporary files and torn entries."""
    entries, reserved = [], 0
    with os.scandir(path) as it:
        for e in it:
            try:
                if e.name.endswith(_TMP):
                    if clean and _held(e.path) is not True:
                        os.unlink(e.path)  # its writer is dead: nothing will rename it
                        continue
                    size = _reserved_size(e.name)
                    reserved += e.stat().st_size if size is None else size
                elif e.name.endswith(_SUFFIX) and _KEY_HEX.fullmatch(e.name[: -len(_SUFFIX)]):
                    st = e.stat()
                    if clean and st.st_size < HEADER.size:  # cannot even hold a header
                        os.unlink(e.path)
                        continue
                    entries.append((st.st_mtime_ns, e.name[: -len(_SUFFIX)], st.st_size))
            except FileNotFoundError:
                continue  # removed meanwhile (a scan without the flock)
    return entries, reserved


def _sharers_cap(folder: Path) -> int:
    """The smallest capacity among live sharers (0 if none); deletes dead ones' files.
    Caller holds the flock (so no sharer is half registered)."""
    caps = []
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.endswith(".cap"):
                continue
            held = _held(e.path)
            if held is False:
                Path(e.path).unlink(missing_ok=True)
            elif held:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    caps.append(int(Path(e.path).read_text()))
    return min(caps, default=0)

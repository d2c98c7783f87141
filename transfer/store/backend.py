"""The interface every KV store tier implements.

A backend maps ``ChunkKey`` to an immutable ``bytes`` value under a hard byte cap, evicting
least recently used entries to make room. Values are ``bytes`` on purpose: a value handed to
one reader can be shared with the next without a copy, and no caller can change what the
store holds through it (wrap it with ``torch.frombuffer`` / ``memoryview`` to read without
copying). ``put`` accepts any bytes-like object and copies it.

Contracts every implementation keeps (tested over all of them in test_store_backends.py):
  - thread-safe: any method may be called from any thread concurrently;
  - ``used_bytes <= capacity_bytes`` at every instant, counting the backend's own overhead
    (e.g. file headers) as the backend documents;
  - ``contains`` and ``keys`` do not change recency; ``get`` and ``put`` make the entry the
    most recently used;
  - an entry larger than the whole capacity is refused (``put`` returns False), without
    evicting anything;
  - a corrupt entry is never returned: it reads as a miss, is dropped and is counted in
    ``corrupt_entries``;
  - a failure raises OSError (never another type for an I/O problem); a tier that is
    bypassed by its circuit breaker raises ``TierUnavailable`` (an OSError) at once, without
    any I/O. ``TieredStore`` turns both into a miss or a skipped write.

``CircuitBreaker`` is what a tier behind a network (Redis) uses so that an outage costs one
timeout per back-off interval instead of one per call.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from .keys import ChunkKey

# What ``put`` accepts (anything exposing a contiguous byte buffer, e.g. a numpy array's
# ``memoryview``); ``collections.abc.Buffer`` would say it better but needs Python 3.12.
BytesLike = bytes | bytearray | memoryview


class TierUnavailable(OSError):
    """The tier is being bypassed (its circuit breaker is open): raised at once, no I/O."""


class CircuitBreaker:
    """Skips a failing dependency for a back-off interval instead of waiting on it per call.

    closed     calls go through; an outage (``failure``) opens the breaker
    open       ``allow`` says no until ``retry_at``; then the one caller it lets through is
               the probe (half-open) while every other caller is still refused
    half-open  the probe's ``success`` closes the breaker (back-off reset); its ``failure``
               opens it again for twice the back-off, up to ``max_backoff_s``

    A caller that ``allow`` let through reports exactly one of ``success``, ``failure`` or
    ``release`` (no verdict: e.g. an unexpected exception), so a probe never sticks.
    Thread-safe. ``openings`` counts closed -> open transitions (one per outage, however
    many probes fail during it).
    """

    def __init__(self, backoff_s: float = 1.0, max_backoff_s: float = 16.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError(f"need 0 < backoff_s <= max_backoff_s, got {backoff_s}, "
                             f"{max_backoff_s}")
        self.base_backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "closed"
        self._backoff = backoff_s
        self._retry_at = 0.0
        self.openings = 0
        self.last_failure = ""  # why it opened (no secrets: the caller's redacted message)

    @property
    def state(self) -> str:
        """"closed", "open" or "half-open"."""
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether a call may go through now (True for the probe once the back-off ran out)."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and self._clock() >= self._retry_at:
                self._state = "half-open"
                return True
            return False

    def retry_in(self) -> float:
        """Seconds until the next probe may run (0 when closed)."""
        with self._lock:
            return max(0.0, self._retry_at - self._clock()) if self._state == "open" else 0.0

    def success(self) -> None:
        with self._lock:
            if self._state != "closed":
                self._state, self._backoff = "closed", self.base_backoff_s

    def failure(self, why: str = "") -> None:
        with self._lock:
            if self._state == "closed":
                self.openings += 1
            elif self._state == "half-open":  # the probe failed: wait longer next time
                self._backoff = min(2 * self._backoff, self.max_backoff_s)
            else:  # open: a call from before the opening failed as well; nothing new
                return
            self._state = "open"
            self._retry_at = self._clock() + self._backoff
            self.last_failure = why

    def release(self) -> None:
        """A call ended without a verdict: a probe's turn passes to the next caller."""
        with self._lock:
            if self._state == "half-open":
                self._state, self._retry_at = "open", self._clock()


class StoreBackend(ABC):
    """One tier. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "backend"
    # get_many_into reads straight into the caller's buffers (no allocation, no copy); when
    # False it copies what get_many returned, and callers with their own use for the values
    # (a scatter) are better off taking those.
    reads_in_place: bool = False

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        # Monotonic counters, read by TieredStore's stats.
        self.evicted_bytes = 0
        self.evicted_entries = 0
        self.corrupt_entries = 0  # entries that failed their checksum (dropped)

    @property
    def breaker_openings(self) -> int:
        """Times this tier's circuit breaker opened (0 for a tier without one)."""
        return 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes charged against the cap now."""

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Whether ``key`` is stored; side-effect free (recency unchanged)."""

    @abstractmethod
    def get(self, key: ChunkKey) -> bytes | None:
        """The value, or None on a miss (including a corrupt entry, which is dropped)."""

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """``contains`` for each key, in order. A tier behind a network answers in one
        round trip; the default asks key by key."""
        return [self.contains(k) for k in keys]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """``get`` for each key, in order (recency as ``get``). A tier behind a network
        answers in one round trip and a disk tier reads in parallel; the default asks key
        by key. Raises OSError if the batch as a whole failed."""
        return [self.get(k) for k in keys]

    def get_many_into(self, keys: Sequence[ChunkKey], out: Sequence[memoryview]) -> list[bool]:
        """Read each key's value into the writable buffer ``out[i]`` (which must be exactly
        the value's size: a value of another size reads as a miss); which ones were read.
        For loads into preallocated memory. The default copies what ``get_many`` returns;
        a tier that can read in place (disk: ``readinto``) overrides it."""
        found = []
        for value, buf in zip(self.get_many(keys), out, strict=True):
            if value is not None and len(value) == buf.nbytes:
                buf[:] = value
                found.append(True)
            else:
                found.append(False)
        return found

    @abstractmethod
    def put(self, key: ChunkKey, data: BytesLike) -> bool:
        """Store ``data`` under ``key``, replacing any previous value and evicting least
        recently used entries as needed. Returns False (nothing changed) when the entry
        cannot fit even in an empty tier. Raises OSError on an I/O failure."""

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key``; returns whether it was present."""

    @abstractmethod
    def keys(self) -> list[ChunkKey]:
        """Snapshot of stored keys, least recently used first (for index export)."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Assert internal invariants (accounting, cap, index/storage agreement).
        Raises AssertionError naming the broken invariant."""

    def close(self) -> None:  # noqa: B027  (optional hook: most tiers hold nothing to release)
        """Release resources (files, locks, connections). Idempotent."""

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        try:
            entries: int | str = len(self)
        except OSError:  # unreachable now: a repr (in a log, a traceback) must not raise
            entries = "?"
        return (f"{type(self).__name__}(used={self.used_bytes}, "
                f"capacity={self.capacity_bytes}, entries={entries})")

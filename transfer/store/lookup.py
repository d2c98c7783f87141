"""How many leading chunks of a prompt the KV store holds: asked by the connector's scheduler
half (EngineCore process), answered by the rank-0 worker half that owns the store (its CPU
tier is that process's memory).

    scheduler: LookupClient.lookup(prompt token ids) --REQ, ipc, timeout--> LookupServer
    worker thread: chunk keys (its own fingerprint) -> TieredStore.lookup_prefix -> count

A lookup that times out answers 0 (the request is computed, never stalled), and the client
rebuilds its socket, since a REQ socket without its reply cannot send again.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import zmq

from disagg.transfer.store import ChunkKey, TieredStore

logger = logging.getLogger(__name__)


def lookup_address(engine_id: str) -> str:
    return f"ipc://{Path(tempfile.gettempdir()) / f'disagg-lookup-{engine_id}.sock'}"


class LookupServer:
    """Answers lookups in a daemon thread until ``close``."""

    def __init__(self, engine_id: str, store: TieredStore,
                 keys: Callable[[Sequence[int]], list[ChunkKey]],
                 on_lookup: Callable[[int, int], None] | None = None, per_chunk: int = 1):
        """``keys``: a prompt's chunk keys, ``per_chunk`` (the heads this rank holds) per
        chunk; a chunk counts only with all of its keys present."""
        self.store, self._keys, self._on_lookup = store, keys, on_lookup
        self._per_chunk = per_chunk
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.address = lookup_address(engine_id)
        self._sock.bind(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="disagg-store-lookup",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            try:
                tokens = msgspec.msgpack.decode(self._sock.recv(), type=list[int])
                keys = self._keys(tokens)
                hits = self.store.lookup_prefix(keys) // self._per_chunk
                if self._on_lookup is not None:
                    self._on_lookup(len(keys) // self._per_chunk, hits)
            except Exception as exc:  # a bad request or a failing tier: answer "none"
                logger.warning("store lookup failed: %s", exc)
                hits = 0
            self._sock.send(msgspec.msgpack.encode(hits))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self._ctx.term()
        Path(self.address.removeprefix("ipc://")).unlink(missing_ok=True)


class LookupClient:
    """Blocking lookups with a deadline; not thread-safe (the scheduler is one thread)."""

    def __init__(self, engine_id: str, timeout_s: float):
        self.address = lookup_address(engine_id)
        self.timeout_ms = max(1, int(timeout_s * 1000))
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self.timeouts = 0

    def lookup(self, token_ids: Sequence[int]) -> int:
        """Leading chunks of ``token_ids`` the store holds (0 on timeout or error)."""
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        try:
            self._sock.send(msgspec.msgpack.encode(list(token_ids)))
            if self._sock.poll(self.timeout_ms):
                return int(msgspec.msgpack.decode(self._sock.recv()))
        except zmq.ZMQError as exc:
            logger.warning("store lookup at %s: %s", self.address, exc)
        self.timeouts += 1
        self._sock.close()
        self._sock = None
        return 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._ctx.term()

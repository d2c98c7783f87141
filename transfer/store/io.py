"""Store I/O for the connector's worker half: chunks in and out of vLLM's paged KV cache.

    save (finished request):  blocks --gather--> chunk bytes --put--> CPU tier --> disk/Redis
    load (WAITING_FOR_REMOTE_KVS request):  store --get--> chunk bytes --scatter--> blocks

A chunk is ``chunk_tokens / block_size`` consecutive prompt blocks of every layer, as the
gather kernel lays them out (``[layers, planes, blocks, elements]``, raw bits). Both
directions run in a background thread, off the engine's step: a save holds its source
blocks (vLLM frees them only once ``get_finished`` reports the request), a load writes
blocks that only its waiting request owns. On CUDA the copies stage through host memory.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import torch

from disagg.config import StoreConfig
from disagg.kernels import KVLayout, gather_heads, head_geometry, scatter_heads
from disagg.kernels.geometry import bits
from disagg.transfer.connector.loaders import KVLoader, LoadResult
from disagg.transfer.connector.metadata import StoreLoadOrder, StoreSaveOrder
from disagg.transfer.connector.stats import StatsSink
from disagg.transfer.control.messages import Compat
from disagg.transfer.store import (
    ChunkKey,
    CpuBackend,
    DiskBackend,
    KVFingerprint,
    RedisBackend,
    StoreBackend,
    TieredStore,
    chunk_keys,
    chunk_tokens_for,
)
from disagg.transfer.store.backend import BytesLike
from disagg.transfer.store.redis import connect_url

logger = logging.getLogger(__name__)


def fingerprint(compat: Compat, layout: KVLayout, model_id: str) -> KVFingerprint:
    """What a head's chunk bytes depend on (``head`` 0; the codec sets each head's).
    ``model_id`` names the weights (the built-in models' folders carry a content hash),
    ``compat.model`` the served name. No TP size: a head's bytes are the same at any."""
    shape = f"{layout.value}:{len(compat.plane_bytes)}x{compat.head_bytes()[0]}"
    return KVFingerprint(model=f"{compat.model}@{model_id}", dtype=compat.dtype, layout=shape,
                         block_size=compat.block_size, head=0,
                         num_heads=compat.num_kv_heads)


def build_store(s: StoreConfig) -> TieredStore:
    """The tiers ``s`` names, fastest first."""
    tiers: list[StoreBackend] = [CpuBackend(s.cpu_bytes)]
    if s.disk_dir:
        tiers.append(DiskBackend(s.disk_dir, s.disk_bytes))
    if s.redis_url:
        tiers.append(RedisBackend(s.redis_bytes, url=connect_url(s.redis_url),
                                  namespace=s.redis_namespace))
    return TieredStore(tiers)


class ChunkCodec:
    """Converts between block ids and the store's chunks for these KV tensors.

    A chunk is one KV head's part of ``blocks_per_chunk`` consecutive prompt blocks of every
    layer (``disagg.kernels.gather_heads``: ``[L, P, n, D]``), keyed per head, so the chunks
    of a prompt are the same whatever TP size saved them: a rank saves and loads the chunks
    of the heads it holds (``heads``, global head ids). ``keys`` gives, per chunk of the
    prompt, the keys of this rank's heads in order."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], block_size: int, chunk_tokens: int,
                 fingerprint: KVFingerprint, heads: range | None = None,
                 layout: KVLayout | None = None):
        """``layout``: the caches' (default: CUDA's for CUDA tensors, else the CPU's)."""
        self.kv_caches = list(kv_caches)
        self.layout = layout or (KVLayout.CUDA if self.kv_caches[0].is_cuda else KVLayout.CPU)
        self.geometry = head_geometry(self.kv_caches, self.layout)
        self.heads = heads if heads is not None else range(self.geometry.num_heads)
        if len(self.heads) != self.geometry.num_heads:
            raise ValueError(f"{len(self.heads)} heads named for a cache holding "
                             f"{self.geometry.num_heads}")
        self.block_size = block_size
        self.chunk_tokens = chunk_tokens_for(block_size, chunk_tokens)
        self.blocks_per_chunk = self.chunk_tokens // block_size
        self.fingerprints = [replace(fingerprint, head=h) for h in self.heads]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def keys(self, token_ids: Sequence[int]) -> list[list[ChunkKey]]:
        per_head = [chunk_keys(token_ids, fp, self.chunk_tokens) for fp in self.fingerprints]
        return [list(chunk) for chunk in zip(*per_head, strict=True)]

    def flat_keys(self, token_ids: Sequence[int]) -> list[ChunkKey]:
        """``keys`` chunk by chunk, flattened: a prefix of k whole chunks is k * num_heads
        keys (what a prefix lookup counts)."""
        return [k for chunk in self.keys(token_ids) for k in chunk]

    def encode(self, block_ids: Sequence[int]) -> list[memoryview]:
        """One chunk per head this rank holds, in ``heads`` order."""
        chunk = gather_heads(self.kv_caches, block_ids, (0, self.num_heads), self.layout)
        raw = memoryview(bits(chunk.cpu()).numpy()).cast("B")
        size = self.chunk_bytes()
        return [raw[i * size:(i + 1) * size] for i in range(self.num_heads)]

    def decode_into(self, data: Sequence[BytesLike], block_ids: Sequence[int],
                    offset: int) -> None:
        """Scatter blocks ``offset .. offset + len(block_ids) - 1`` of one chunk, given as
        its heads' parts in ``heads`` order."""
        if len(data) != self.num_heads:
            raise ValueError(f"{len(data)} head parts for {self.num_heads} heads")
        g = self.geometry
        int_dtype = bits(torch.empty(0, dtype=g.dtype)).dtype
        for i, part in enumerate(data):
            with warnings.catch_warnings():  # read-only bytes: we only read (and copy) them
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(part, dtype=torch.uint8)
            if raw.numel() != self.chunk_bytes():
                raise ValueError(f"chunk of {raw.numel()} bytes, expected {self.chunk_bytes()}")
            head = raw.view(int_dtype).view(g.num_layers, g.num_planes, self.blocks_per_chunk,
                                            g.head_elems)
            piece = head[:, :, offset:offset + len(block_ids)].contiguous().view(g.dtype)
            scatter_heads(piece.to(g.device), self.kv_caches, block_ids, (i, i + 1),
                          self.layout)

    def chunk_bytes(self) -> int:
        """Bytes of one head's part of one chunk (one stored value)."""
        g = self.geometry
        itemsize = torch.empty(0, dtype=g.dtype).element_size()
        return g.num_layers * g.num_planes * self.blocks_per_chunk * g.head_elems * itemsize


JobOrder = TypeVar("JobOrder", StoreLoadOrder, StoreSaveOrder)


@dataclass(slots=True)
class _Job(Generic[JobOrder]):
    order: JobOrder
    future: Future
    started: float


class _StoreJobs(Generic[JobOrder]):
    """Runs one job per request on ``pool`` (``_run``); subclasses poll ``_jobs``."""

    def __init__(self, store: TieredStore, codec: ChunkCodec,
                 stats: Callable[[], StatsSink], pool: ThreadPoolExecutor,
                 on_done: threading.Event | None = None):
        self.store, self.codec, self._stats, self._pool = store, codec, stats, pool
        self._jobs: dict[str, _Job[JobOrder]] = {}
        self._on_done = on_done  # set whenever a job ends (the worker may wait on it)

    def start(self, order: JobOrder) -> None:
        fut = self._pool.submit(self._run, order)
        if self._on_done is not None:
            fut.add_done_callback(lambda _: self._on_done.set())  # type: ignore[union-attr]
        self._jobs[order.request_id] = _Job(order, fut, time.monotonic())

    @property
    def busy(self) -> bool:
        """Jobs started and not yet reported by ``poll``."""
        return bool(self._jobs)

    def _run(self, order: JobOrder) -> object:
        raise NotImplementedError


class StoreLoader(_StoreJobs[StoreLoadOrder], KVLoader[StoreLoadOrder]):
    """Loads the store's chunks of a request's prompt into its new blocks (thread).

    Chunks below the CPU tier are read into staging buffers allocated (and touched) once,
    two per loader thread, so a load allocates nothing: fresh memory costs a page fault per
    4 KiB, which in a VM cost three times the read itself (pinned memory on CUDA hosts, for
    the copy to the device). The next batch is read (an I/O thread per loader thread, into
    the other buffer) while the current one scatters into the blocks."""

    name = "store"
    # Chunks asked of the store at once (a staging buffer's size, about): one round trip
    # per batch and tier.
    BATCH_BYTES = 16 << 20

    def __init__(self, store: TieredStore, codec: ChunkCodec,
                 stats: Callable[[], StatsSink], pool: ThreadPoolExecutor,
                 on_done: threading.Event | None = None, threads: int = 1):
        """``threads``: how many loads ``pool`` may run at once (a staging buffer each)."""
        super().__init__(store, codec, stats, pool, on_done)
        # Whole chunks per batch: each is one value per head this rank holds.
        self.per_batch = max(1, self.BATCH_BYTES // (codec.chunk_bytes() * codec.num_heads))
        self._staging: queue.SimpleQueue[tuple[list[memoryview], list[memoryview]]] = \
            queue.SimpleQueue()
        for _ in range(threads):
            self._staging.put((self._slots(), self._slots()))
        self._io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="disagg-store-io")

    def _slots(self) -> list[memoryview]:
        size, count = self.codec.chunk_bytes(), self.per_batch * self.codec.num_heads
        buf = torch.zeros(count * size, dtype=torch.uint8,
                          pin_memory=self.codec.layout is KVLayout.CUDA)  # zeros: touched
        view = memoryview(buf.numpy())
        return [view[k * size:(k + 1) * size] for k in range(count)]

    def _run(self, order: StoreLoadOrder) -> int:
        """Fill the order's blocks from the store's leading chunks, a batch of chunks at a
        time (the next batch read while this one scatters); returns how many leading
        blocks loaded."""
        bpc, nh = self.codec.blocks_per_chunk, self.codec.num_heads
        keys = self.codec.keys(order.token_ids)
        first = order.first_block // bpc
        end = min((order.first_block + len(order.local_block_ids) - 1) // bpc + 1, len(keys))
        batches = [[k for chunk in keys[c0:min(end, c0 + self.per_batch)] for k in chunk]
                   for c0 in range(first, end, self.per_batch)]
        buffers = self._staging.get()
        done, nbytes = 0, 0
        pending: Future | None = None
        try:
            if batches:
                pending = self._read(batches[0], buffers[0])
            for b, batch in enumerate(batches):
                assert pending is not None
                values, pending = pending.result(), None
                complete = len(values) == len(batch)
                if complete and b + 1 < len(batches):
                    pending = self._read(batches[b + 1], buffers[(b + 1) % 2])
                c0 = first + b * self.per_batch
                for j in range(len(values) // nh):  # a chunk loads only with all its heads
                    offset = order.first_block + done - (c0 + j) * bpc
                    n = min(bpc - offset, len(order.local_block_ids) - done)
                    parts = values[j * nh:(j + 1) * nh]
                    self.codec.decode_into(parts, order.local_block_ids[done:done + n], offset)
                    done += n
                    nbytes += sum(memoryview(p).nbytes for p in parts)
                if not complete:
                    break  # a chunk no tier holds: the rest is computed
        finally:
            if pending is not None:  # a scatter failed: the read must end before its
                with contextlib.suppress(Exception):  # buffer goes back for another load
                    pending.exception()
            self._staging.put(buffers)
        s = self._stats()
        s.add("store_load_bytes", nbytes)
        s.add("store_loaded_tokens", done * self.codec.block_size)
        return done

    def _read(self, keys: list[ChunkKey], slots: list[memoryview]) -> Future:
        return self._io.submit(self.store.get_prefix, keys, slots[:len(keys)])

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)

    def poll(self) -> list[LoadResult]:
        out: list[LoadResult] = []
        for rid, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[rid]
            try:
                loaded = job.future.result()
            except Exception as exc:  # corrupt or unreachable tier: a miss, recomputed
                logger.warning("request %s: store load failed: %s", rid, exc)
                loaded = 0
            self._stats().add("store_load_seconds", time.monotonic() - job.started)
            n = len(job.order.local_block_ids)
            out.append(LoadResult(job.order, loaded == n,
                                  "" if loaded == n else f"store held {loaded}/{n} blocks",
                                  loaded_blocks=loaded))
        return out


class StoreSaver(_StoreJobs[StoreSaveOrder]):
    """Copies finished requests' full prompt chunks into the store (thread)."""

    def _run(self, order: StoreSaveOrder) -> None:
        bpc, nh = self.codec.blocks_per_chunk, self.codec.num_heads
        keys = self.codec.keys(order.token_ids)
        # a shared prefix is usually stored already (by this rank, or any TP size's)
        have = self.store.lookup_prefix([k for chunk in keys for k in chunk]) // nh
        saved = 0
        for c in range(have, len(keys)):
            blocks = order.block_ids[c * bpc:(c + 1) * bpc]
            if len(blocks) < bpc:
                break
            self.store.put_many(list(zip(keys[c], self.codec.encode(blocks), strict=True)))
            saved += 1
        s = self._stats()
        s.add("store_saved_chunks", saved)
        s.add("store_saved_bytes", saved * nh * self.codec.chunk_bytes())

    def poll(self) -> set[str]:
        """Requests whose copy is done (or failed: saving is best effort)."""
        done: set[str] = set()
        for rid, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[rid]
            if job.future.exception() is not None:
                logger.warning("request %s: store save failed: %s", rid, job.future.exception())
                self._stats().add("store_save_failures")
            self._stats().add("store_save_seconds", time.monotonic() - job.started)
            done.add(rid)
        return done

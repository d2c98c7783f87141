"""Subscribe to each instance's vLLM KV-cache events and keep the prefix index current.

Every instance runs vLLM with ``--kv-events-config`` (``ZmqEventPublisher``): a PUB socket
sending ``(topic, seq: 8-byte big-endian, msgpack(KVEventBatch))`` and a ROUTER replay
socket that re-sends buffered batches from a given sequence number. Per instance:

    seq == last + 1      apply the batch
    seq >  last + 1      a gap (PUB drops under load): replay from last + 1, then go on;
                         if the replay cannot fill it, drop the instance's entries
    seq <= last          the publisher restarted (new engine): drop its entries, start over
    first batch, seq > 0 replay from 0, so blocks stored before we connected are known

Dropping is always safe: the index then under-reports hits, it never invents one.
The wire structs below mirror vLLM's (``vllm.distributed.kv_events``) with only the fields
we read; msgspec ignores the others, so newer vLLMs adding fields still decode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from disagg.scheduler.kv_index import PrefixIndex
from disagg.tiers import is_store, own_tier

logger = logging.getLogger(__name__)

END_SEQ = -1
REPLAY_TIMEOUT_S = 2.0


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def _as_int(h: int | bytes) -> int:
    return h if isinstance(h, int) else int.from_bytes(h, "big") & ((1 << 64) - 1)


def apply_batch(index: PrefixIndex, key: str, batch: KVEventBatch) -> int | None:
    """Apply one batch; returns the block size a BlockStored reported, if any.

    Events whose medium names a KV store tier (``disagg.tiers``: the
    connector reports its saves so) go to that tier's holder, not to the instance: a shared
    tier's blocks can be loaded by other instances too."""
    block_size = None
    for ev in batch.events:
        medium = ev.medium if isinstance(ev, (BlockStored, BlockRemoved)) else None
        holder = medium if medium and is_store(medium) else key
        if isinstance(ev, BlockStored):
            index.stored(holder, map(_as_int, ev.block_hashes), ev.medium or "GPU")
            block_size = ev.block_size or block_size
        elif isinstance(ev, BlockRemoved):
            index.removed(holder, map(_as_int, ev.block_hashes))
        else:
            index.drop(key)  # vLLM's own cache was cleared; the store keeps its chunks
    return block_size


def drop_instance(index: PrefixIndex, key: str) -> None:
    """Forget what ``key`` holds: its vLLM cache and its own CPU store tier."""
    index.drop(key)
    index.drop(own_tier(key))


class KVEventSubscriber:
    """One task per watched instance; ``watch`` again (new endpoints) after a restart."""

    def __init__(self, index: PrefixIndex,
                 on_block_size: Callable[[int], None] | None = None):
        self.index = index
        self._ctx = zmq.asyncio.Context.instance()
        self._tasks: dict[str, asyncio.Task] = {}
        self._on_block_size = on_block_size
        self.gaps = 0  # gaps seen (each replayed or, failing that, dropped)

    def watch(self, key: str, endpoint: str, replay_endpoint: str | None) -> None:
        self.unwatch(key)
        self._tasks[key] = asyncio.get_running_loop().create_task(
            self._run(key, endpoint, replay_endpoint), name=f"kv-events-{key}")

    def unwatch(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        drop_instance(self.index, key)

    async def close(self) -> None:
        for key in list(self._tasks):
            self.unwatch(key)

    async def _run(self, key: str, endpoint: str, replay: str | None) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        last = -1
        try:
            while True:
                _topic, seq_b, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_b, "big", signed=True)
                if seq <= last:
                    logger.info("kv events %s: sequence restarted (%d after %d), dropping its "
                                "entries", key, seq, last)
                    drop_instance(self.index, key)
                    last = -1
                if seq > last + 1:
                    self.gaps += 1
                    last = await self._fill(key, replay, last + 1, seq)
                if seq == last + 1:
                    self._apply(key, payload)
                    last = seq
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("kv events %s: subscriber failed; dropping its entries", key)
            drop_instance(self.index, key)
        finally:
            sub.close()

    async def _fill(self, key: str, replay: str | None, start: int, upto: int) -> int:
        """Replay batches ``start .. upto-1``; returns the last applied sequence number."""
        got = await self._replay(replay, start) if replay else []
        have = [(s, p) for s, p in got if start <= s < upto]
        if [s for s, _ in have] != list(range(start, upto)):
            logger.warning("kv events %s: gap %d..%d not replayable; dropping its entries",
                           key, start, upto - 1)
            drop_instance(self.index, key)
            return upto - 1
        for _, payload in have:
            self._apply(key, payload)
        return upto - 1

    async def _replay(self, endpoint: str, start: int) -> list[tuple[int, bytes]]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), REPLAY_TIMEOUT_S)
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return out
                out.append((seq, frames[3]))
        except (TimeoutError, IndexError) as exc:
            logger.warning("kv events replay from %s failed: %r", endpoint, exc)
            return []
        finally:
            sock.close()

    def _apply(self, key: str, payload: bytes) -> None:
        try:
            batch = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            logger.warning("kv events %s: undecodable batch (%s); dropping its entries",
                           key, exc)
            drop_instance(self.index, key)
            return
        size = apply_batch(self.index, key, batch)
        if size and self._on_block_size:
            self._on_block_size(size)

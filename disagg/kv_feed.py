"""Keeps the gateway's prefix index fed from every instance's vLLM KV-cache events.

A member joining the pool is subscribed; a member that comes back as a new engine (restart)
is re-subscribed and its old engine's entries dropped; a member leaving is unsubscribed.
Runs on the gateway's event loop (the subscriber's tasks live there).
"""

from __future__ import annotations

from disagg.instance import InstanceInfo
from disagg.pool import InstancePool, Member
from disagg.scheduler.kv_events import KVEventSubscriber
from disagg.scheduler.kv_index import PrefixIndex


class KVEventFeed:
    def __init__(self, index: PrefixIndex, pool: InstancePool, block_size: int | None):
        self.index = index
        self._pool = pool
        # Learned from the first KV event when the topology leaves it to vLLM's default.
        self.block_size = block_size
        self._subscriber: KVEventSubscriber | None = None

    @property
    def gaps(self) -> int:
        """Event gaps seen so far (each replayed or, failing that, its entries dropped)."""
        return self._subscriber.gaps if self._subscriber else 0

    def start(self) -> None:
        """Subscribe to every member now and to every member added later; on the loop."""
        self._subscriber = KVEventSubscriber(self.index, on_block_size=self._learn_block_size)
        for member in self._pool.members.values():
            self._watch(member, None)
        self._pool.listeners.append(self._watch)

    def forget(self, engine_id: str) -> None:
        """Stop following ``engine_id`` and drop what the index holds for it."""
        if self._subscriber is not None:
            self._subscriber.unwatch(engine_id)

    async def close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()

    def _watch(self, member: Member, old: InstanceInfo | None) -> None:
        if old is not None:
            self.forget(old.engine_id)  # a restarted engine starts empty
        if self._subscriber is not None and member.info.kv_events_endpoint:
            self._subscriber.watch(member.info.engine_id, member.info.kv_events_endpoint,
                                   member.info.kv_replay_endpoint)

    def _learn_block_size(self, size: int) -> None:
        if self.block_size is None:
            self.block_size = size

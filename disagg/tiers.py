"""Names under which the gateway's prefix index records what the KV store holds (a leaf
module: the connector, the routing package and the gateway all use it, and it imports
nothing).

An instance saves a finished request's full prompt chunks into every tier it has (CPU, then
written through to disk and Redis), so the widest tier decides who can load them back:

    store:redis             any instance of the deployment (one Redis for all hosts)
    store:disk@<host>       the instances on that host (the disk tier is a local directory)
    store:disk@*            any instance (store.disk_shared: one filesystem on every host)
    store:cpu@<engine_id>   that instance alone

The connector reports a save as vLLM ``BlockStored`` events with this name as ``medium``;
the gateway credits an instance with the blocks held under any name it can load from
(``loadable_by``). Store tiers evict without events, so the gateway bounds each name to the
tier's capacity in blocks (``capacity_blocks``), most recently saved kept.
"""

from __future__ import annotations

PREFIX = "store:"


def own_tier(engine_id: str) -> str:
    """The name of ``engine_id``'s own CPU tier (gone when the instance restarts)."""
    return f"{PREFIX}cpu@{engine_id}"


SHARED_DISK = f"{PREFIX}disk@*"


def saved_medium(engine_id: str, host: str, disk: bool, redis: bool,
                 disk_shared: bool = False) -> str:
    """Where a chunk saved by ``engine_id`` (on ``host``) can be loaded from, widest first."""
    if redis:
        return f"{PREFIX}redis"
    if disk:
        return SHARED_DISK if disk_shared else f"{PREFIX}disk@{host}"
    return own_tier(engine_id)


def loadable_by(engine_id: str, host: str) -> tuple[str, ...]:
    """Every store name ``engine_id`` (on ``host``) can load from."""
    return (f"{PREFIX}redis", SHARED_DISK, f"{PREFIX}disk@{host}", own_tier(engine_id))


def is_store(name: str) -> bool:
    return name.startswith(PREFIX)


def capacity_blocks(name: str, cpu_bytes: int, disk_bytes: int, redis_bytes: int,
                    block_bytes: int) -> int:
    """How many blocks the tier behind ``name`` can hold (at least 1)."""
    kind = name.removeprefix(PREFIX).split("@", 1)[0]
    cap = {"redis": redis_bytes, "disk": disk_bytes, "cpu": cpu_bytes}[kind]
    return max(1, cap // max(1, block_bytes))

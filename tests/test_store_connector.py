"""The connector with a KV store, without vLLM: ConnectorWorkers on real NIXL and real tiers.

Instance X saves a request's prompt chunks; instance Y (another process in production, a
second worker here) finds them through its scheduler's lookup and loads them, through a
shared disk tier and through Redis; a failed peer pull falls back to the store.
"""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch
from vllm.distributed.kv_events import KVEventBatch
from vllm.v1.request import RequestStatus

from disagg.config import StoreConfig
from disagg.scheduler.hashing import external
from disagg.scheduler.kv_events import _decoder, apply_batch, drop_instance
from disagg.scheduler.kv_index import PrefixIndex
from disagg.tiers import loadable_by
from disagg.transfer.connector.metadata import (
    DisaggMetadata,
    PeerAddress,
    RecvOrder,
    StoreLoadOrder,
    StoreSaveOrder,
)
from disagg.transfer.connector.scheduler_half import ConnectorScheduler
from disagg.transfer.connector.worker_half import ConnectorWorker
from disagg.transfer.control.messages import PROTOCOL_VERSION, Compat, KVTransferParams
from disagg.transfer.store.lookup import LookupClient
from tests.test_connector_worker import KEY, LAYERS, NB, _step_until, connector_config

BLOCK, CHUNK = 16, 32  # two blocks per chunk
PROMPT = tuple(range(1000, 1000 + 5 * CHUNK + 7))  # 5 full chunks and a tail


def _worker(name: str, fill: bool, store: dict, **fields):
    caches = [(torch.randn if fill else torch.zeros)(NB, 2, BLOCK, 32).to(torch.bfloat16)
              for _ in range(LAYERS)]
    compat = Compat(model="m", dtype="bfloat16", block_size=BLOCK, num_layers=LAYERS,
                    plane_bytes=[caches[0][0].numel() * 2] * LAYERS,
                    num_kv_heads=caches[0].shape[1])
    st = StoreConfig(chunk_tokens=CHUNK, cpu_gib=(1 << 22) / (1 << 30), lookup_timeout_s=2,
                     **store)
    w = ConnectorWorker(connector_config(store=st, **fields), name, 0, compat, model_id="w1",
                        channel_key=KEY)
    w.register({f"l{i}": t for i, t in enumerate(caches)}, NB)
    return w, caches


def _shared_tiers(kind: str, tmp_path, request) -> dict:
    if kind == "disk":
        return {"disk_path": str(tmp_path / "kv")}
    url = request.getfixturevalue("redis_url")
    return {"redis_url": url, "redis_namespace": f"t{time.monotonic_ns()}"}


def _save(x: ConnectorWorker, rid: str, blocks: tuple[int, ...]) -> None:
    x.start(DisaggMetadata(store_saves=[StoreSaveOrder(rid, PROMPT[:5 * CHUNK], blocks)]))
    _step_until([x], lambda r: rid in r[x][0])  # held until copied
    assert x.store.flush(10)  # write-through to the lower tiers done


def test_an_idle_step_waits_for_its_store_load_instead_of_spinning(tmp_path, monkeypatch):
    """vLLM polls an idle engine's connector in a tight loop while a request waits for its
    KV; the worker then blocks (bounded) until a store job ends, so one poll sees it."""
    x, _ = _worker("x-idle", True, {"disk_path": str(tmp_path / "kv")})
    y, _ = _worker("y-idle", False, {"disk_path": str(tmp_path / "kv")})
    try:
        _save(x, "a", tuple(range(3, 13)))
        assert y.store is not None
        gate = threading.Event()
        real = y.store.get_prefix
        monkeypatch.setattr(y.store, "get_prefix", lambda *a: gate.wait(5) and real(*a))
        load = StoreLoadOrder("b", (15, 14), PROMPT[:5 * CHUNK], first_block=0)
        y.start(DisaggMetadata(store_loads=[load], idle=True))
        threading.Timer(0.005, gate.set).start()  # the load ends 5 ms into the poll
        assert "b" in y.finished()[1] and not y.load_errors()
    finally:
        x.close()
        y.close()


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_chunks_saved_on_one_instance_load_on_another(kind, tmp_path, request):
    tiers = _shared_tiers(kind, tmp_path, request)
    x, src = _worker(f"x-{kind}", True, tiers)
    y, dst = _worker(f"y-{kind}", False, tiers)
    try:
        x_blocks = tuple(range(3, 13))  # 10 blocks = 5 chunks
        _save(x, "a", x_blocks)
        assert x.take_stats().data["store_saved_chunks"] == 5
        # Y's scheduler asks Y's rank-0 worker (its CPU tier is empty: the hit is shared).
        client = LookupClient("y-" + kind, timeout_s=2)
        assert client.lookup(PROMPT) == 5
        assert client.lookup((7,) + PROMPT[1:]) == 0  # another first token: nothing
        client.close()
        # A local prefix hit of 3 blocks: load prompt blocks 3..9 (chunk 1 from its middle).
        y_blocks = (15, 14, 0, 1, 2, 5, 6)
        y.start(DisaggMetadata(store_loads=[StoreLoadOrder("b", y_blocks, PROMPT[:5 * CHUNK],
                                                           first_block=3)]))
        _step_until([y], lambda r: "b" in r[y][1])
        assert not y.load_errors()
        for s, t in zip(src, dst, strict=True):
            assert torch.equal(t[list(y_blocks)], s[list(x_blocks[3:])])
        stats = y.take_stats().data
        assert stats["store_loaded_tokens"] == 7 * BLOCK
        assert stats["store_lookups"] == 2 and stats["store_hit_chunks"] == 5
        assert stats[f"store_{kind}_load_hits"] >= 4  # came through the shared tier
    finally:
        x.close()
        y.close()


def test_failed_pull_falls_back_to_the_store_then_recompute(tmp_path):
    tiers = {"disk_path": str(tmp_path / "kv")}
    x, src = _worker("x-fb", True, tiers)
    y, dst = _worker("y-fb", False, tiers, handshake_timeout_s=0.5, transfer_timeout_s=3)
    try:
        _save(x, "a", tuple(range(0, 6)))  # the first 3 chunks only
        order = RecvOrder("r", PeerAddress("gone", "127.0.0.1", 1), "preq",
                          local_block_ids=tuple(range(8, 16)), remote_block_ids=tuple(range(8)),
                          token_ids=PROMPT[:5 * CHUNK], first_block=0)
        y.start(DisaggMetadata(recvs=[order]))
        _step_until([y], lambda r: "r" in r[y][1])
        # 6 blocks came from the store; vLLM recomputes the 2 it did not hold.
        assert y.load_errors() == {14, 15}
        for s, t in zip(src, dst, strict=True):
            assert torch.equal(t[8:14], s[0:6])
        stats = y.take_stats().data
        assert stats["kv_transfer_failures"] == 1 and stats["store_fallbacks"] == 1
        assert stats["store_loaded_tokens"] == 6 * BLOCK
    finally:
        x.close()
        y.close()


def test_prefill_blocks_are_held_for_both_the_pull_and_the_save(tmp_path):
    p, _ = _worker("p-hold", True, {}, lease_s=0.5)
    try:
        p.start(DisaggMetadata(sends={"q": 0.5}, store_saves=[
            StoreSaveOrder("q", PROMPT[:2 * CHUNK], (1, 2, 3, 4))]))
        res = _step_until([p], lambda r: "q" in r[p][0])  # the lease expires, save done
        assert res[p][0] == {"q"}
        stats = p.take_stats().data
        assert stats["kv_sends_expired"] == 1 and stats["store_saved_chunks"] == 2
        assert p._holds == {}
    finally:
        p.close()


def test_lookup_without_a_server_times_out_to_zero():
    client = LookupClient("nobody-home", timeout_s=0.2)
    t0 = time.monotonic()
    assert client.lookup(PROMPT) == 0 and client.lookup(PROMPT) == 0
    assert time.monotonic() - t0 < 2 and client.timeouts == 2
    client.close()


@pytest.mark.parametrize(("store", "medium", "other_sees"), [
    ({}, "store:cpu@e1", False),
    ({"disk_path": "/unused"}, "store:disk@10.0.0.5", True),
    ({"redis_url": "redis://unused:1"}, "store:redis", True),
])
def test_saves_reach_the_gateway_index_as_store_events(store, medium, other_sees):
    """The scheduler half reports a save as vLLM KV events naming the widest tier; through
    vLLM's wire format they land in the gateway's index, crediting every instance that can
    load from that tier (another instance on the host for disk, any for Redis)."""
    config = connector_config(side_channel_host="10.0.0.5",
                              store=StoreConfig(chunk_tokens=CHUNK, **store))
    sched = ConnectorScheduler(config, "e1", BLOCK)
    digests = [bytes([i]) * 32 for i in range(len(PROMPT) // BLOCK)]
    req = type("Req", (), dict(
        request_id="r", status=RequestStatus.FINISHED_STOPPED, prompt_token_ids=list(PROMPT),
        num_prompt_tokens=len(PROMPT), num_computed_tokens=len(PROMPT) + 3,
        block_hashes=digests, kv_transfer_params=None))()
    hold, _ = sched.request_finished(req, list(range(len(digests) + 1)))
    assert hold  # blocks held until the worker copied them
    (event,) = sched.take_events()
    assert sched.take_events() == []
    assert event.medium == medium and len(event.block_hashes) == 10  # 5 chunks of 2 blocks

    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[event]))
    index = PrefixIndex(capacity_of=lambda holder: 100)
    apply_batch(index, "e1", _decoder.decode(wire))
    hashes = [external(d) for d in digests]
    assert index.match("e1", hashes) == 0  # not in vLLM's own cache...
    assert index.match("e1", hashes, also=loadable_by("e1", "10.0.0.5")) == 10  # ...stored
    assert index.match("e2", hashes, also=loadable_by("e2", "10.0.0.5")) == (
        10 if other_sees else 0)
    assert index.match("e3", hashes, also=loadable_by("e3", "10.0.0.9")) == (
        10 if medium == "store:redis" else 0)
    drop_instance(index, "e1")  # a restart loses e1's own CPU tier, not the shared ones
    assert index.match("e2", hashes, also=loadable_by("e2", "10.0.0.5")) == (
        10 if other_sees else 0)
    assert index.stats().per_holder.get("store:cpu@e1", 0) == 0


def _request(**fields):
    """A stand-in for vLLM's Request with the fields the scheduler half reads."""
    base = dict(request_id="r", status=RequestStatus.FINISHED_STOPPED,
                prompt_token_ids=list(PROMPT), num_prompt_tokens=len(PROMPT),
                num_computed_tokens=len(PROMPT), block_hashes=[], kv_transfer_params=None)
    return type("Req", (), {**base, **fields})()


def test_params_from_another_protocol_version_fall_back_to_local_prefill():
    sched = ConnectorScheduler(connector_config(), "d1", BLOCK)
    params = KVTransferParams(remote_engine_id="p1", remote_request_id="pr",
                              remote_host="127.0.0.1", remote_port=1,
                              remote_block_ids=list(range(12)),
                              remote_num_tokens=len(PROMPT)).model_dump()
    assert sched.num_new_matched_tokens(_request(kv_transfer_params=params), 0) == (
        len(PROMPT), True)
    params["protocol_version"] = PROTOCOL_VERSION + 1
    assert sched.num_new_matched_tokens(_request(kv_transfer_params=params), 0) == (0, False)


def test_a_disabled_store_is_no_store(tmp_path):
    sched = ConnectorScheduler(
        connector_config(store=StoreConfig(enabled=False, disk_path=str(tmp_path))), "e1", BLOCK)
    assert sched.store is None and sched.chunk_tokens == 0
    assert sched.request_finished(_request(), list(range(12))) == (False, None)
    assert sched.take_events() == []
    w, _ = _worker("w-off", False, {"enabled": False, "disk_path": str(tmp_path)})
    try:
        assert w.store is None and "store" not in w.loaders
    finally:
        w.close()


def test_a_request_back_on_the_instance_that_prefilled_it_frees_the_held_copy():
    """A decode retried on the prefill instance that holds its KV (degraded: no decoder)
    pulls nothing from itself; the held copy is released at once, not at lease expiry."""
    sched = ConnectorScheduler(connector_config(store=StoreConfig(enabled=False)), "p1", BLOCK)
    params = KVTransferParams(remote_engine_id="p1", remote_request_id="pr",
                              remote_host="127.0.0.1", remote_port=1,
                              remote_block_ids=list(range(12)),
                              remote_num_tokens=len(PROMPT)).model_dump()
    request = _request(kv_transfer_params=params, status=RequestStatus.WAITING)
    assert sched.num_new_matched_tokens(request, 0) == (0, False)
    sched.after_alloc(request, None, 0)
    meta = sched.build_meta()
    assert meta.recvs == [] and [r.remote_request_id for r in meta.releases] == ["pr"]
    assert meta.releases[0].peer.engine_id == "p1"


def test_disk_tiers_are_per_host_unless_shared(monkeypatch):
    """'{host}' gives hosts on one filesystem a directory each; a shared disk tier is
    credited to every instance, a per-host one only to that host's."""
    from disagg.config import StoreConfig
    from disagg.tiers import SHARED_DISK, saved_medium

    monkeypatch.setattr("socket.gethostname", lambda: "hostb")
    assert StoreConfig(disk_path="/kv/{host}").disk_dir == "/kv/hostb"
    with pytest.raises(ValueError, match="disk_shared"):
        StoreConfig(disk_path="/kv/{host}", disk_shared=True)
    assert saved_medium("e1", "10.0.0.5", disk=True, redis=False) == "store:disk@10.0.0.5"
    shared = saved_medium("e1", "10.0.0.5", disk=True, redis=False, disk_shared=True)
    assert shared == SHARED_DISK
    assert shared in loadable_by("e9", "10.0.0.9")
    assert "store:disk@10.0.0.5" not in loadable_by("e9", "10.0.0.9")

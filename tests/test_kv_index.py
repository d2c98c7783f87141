"""The prefix index, block hashing and the KV-event subscriber (real vLLM publisher)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from disagg.scheduler.hashing import block_hashes, external, external_block_hashes
from disagg.scheduler.kv_events import KVEventSubscriber
from disagg.scheduler.kv_index import PrefixIndex


def test_match_is_a_prefix_and_stops_at_first_miss():
    idx = PrefixIndex()
    idx.stored("a", [1, 2, 3])
    idx.stored("b", [1, 9])
    assert idx.match("a", [1, 2, 3, 4]) == 3
    assert idx.match("a", [1, 5, 3]) == 1
    assert idx.match("b", [1, 2]) == 1
    assert idx.match("c", [1]) == 0
    assert idx.holders(1) == {"a": "GPU", "b": "GPU"}
    idx.check_integrity()


def test_remove_drop_and_cleared_leave_nothing_behind():
    idx = PrefixIndex()
    idx.stored("a", [1, 2, 3])
    idx.stored("b", [2, 3])
    idx.removed("a", [2, 77])
    assert idx.match("a", [1, 2]) == 1 and idx.holders(2) == {"b": "GPU"}
    idx.drop("b")
    assert idx.holders(3) == {"a": "GPU"} and len(idx) == 2
    idx.drop("a")
    assert len(idx) == 0 and idx.stats().hashes == 0
    idx.check_integrity()


def test_memory_bound_evicts_oldest_hashes():
    idx = PrefixIndex(max_entries=100)
    rng = random.Random(0)
    for step in range(2000):
        inst = f"i{rng.randrange(4)}"
        if rng.random() < 0.7:
            idx.stored(inst, [rng.randrange(500) for _ in range(rng.randrange(1, 8))])
        else:
            idx.removed(inst, [rng.randrange(500) for _ in range(3)])
        assert len(idx) <= 100
        if step % 100 == 0:
            idx.check_integrity()
    idx.stored("fresh", [10_000, 10_001])
    assert idx.match("fresh", [10_000, 10_001]) == 2  # the newest survive
    assert idx.stats().evicted > 0
    idx.check_integrity()


def test_expected_blocks_count_until_they_expire_and_stay_bounded():
    idx = PrefixIndex(expect_ttl_s=10, max_expected=5)
    idx.stored("a", [1])
    idx.expect("a", [2, 3], now=100.0)
    assert idx.match("a", [1, 2, 3, 4], now=105.0) == 3  # held + expected, a prefix
    assert idx.match("b", [1, 2], now=105.0) == 0  # expected only where routed
    assert idx.match("a", [1, 2, 3], now=110.0) == 1  # expired: only real events count
    idx.expect("a", range(100, 120), now=200.0)
    assert idx.stats().expected == 5  # oldest expected forgotten first
    assert idx.match("a", [115, 116, 117, 118, 119], now=201.0) == 5
    assert idx.match("a", [100], now=201.0) == 0
    idx.check_integrity()
    idx.drop("a")
    assert idx.stats().expected == 0 and idx.match("a", [115], now=201.0) == 0
    off = PrefixIndex(expect_ttl_s=0)
    off.expect("a", [1])
    assert off.match("a", [1]) == 0


def test_hashes_agree_with_vllm():
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import hash_block_tokens, init_none_hash

    init_none_hash(sha256)
    rng = random.Random(1)
    for _ in range(20):
        size = rng.choice([16, 32, 128])
        tokens = [rng.randrange(16_000) for _ in range(rng.randrange(0, 5 * size))]
        ours = block_hashes(tokens, size)
        theirs, parent = [], None
        for i in range(len(tokens) // size):
            parent = hash_block_tokens(sha256, parent, tokens[i * size:(i + 1) * size])
            theirs.append(bytes(parent))
        assert ours == theirs
        assert external_block_hashes(tokens, size) == [
            int.from_bytes(h, "big") & (2**64 - 1) for h in theirs]


# ---- subscriber against vLLM's own ZmqEventPublisher ------------------------------------
def _publisher(port: int, replay: int):
    import zmq
    from vllm.distributed.kv_events import ZmqEventPublisher

    for _ in range(50):  # a just-closed publisher's ports free up asynchronously
        try:
            return ZmqEventPublisher(0, endpoint=f"tcp://*:{port}",
                                     replay_endpoint=f"tcp://*:{replay}", buffer_steps=100)
        except zmq.ZMQError:
            time.sleep(0.1)
    raise RuntimeError("ports still in use")


def _stored(hashes, size=16):
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    return KVEventBatch(ts=time.time(), events=[BlockStored(
        block_hashes=list(hashes), parent_block_hash=None, token_ids=[0] * size * len(hashes),
        block_size=size, lora_id=None, medium="GPU", lora_name=None)])


def _removed(hashes):
    from vllm.distributed.kv_events import BlockRemoved, KVEventBatch

    return KVEventBatch(ts=time.time(), events=[BlockRemoved(block_hashes=list(hashes),
                                                             medium="GPU")])


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
def ports():
    from disagg.instance import free_port

    return free_port(), free_port()


def test_subscriber_applies_replays_gaps_and_resyncs_on_restart(ports):
    async def main():
        pub = _publisher(*ports)
        idx = PrefixIndex()
        sub = KVEventSubscriber(idx)
        # Published before anyone listens: PUB drops it; the first batch seen (seq 1) is
        # behind a gap that the replay socket fills.
        pub.publish(_stored([1, 2]))
        await asyncio.sleep(0.3)
        sub.watch("e0", f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}")
        await asyncio.sleep(0.5)  # slow joiner
        pub.publish(_stored([3]))
        await _until(lambda: idx.match("e0", [1, 2, 3]) == 3)

        # Drop one batch on the wire (a PUB high-water-mark drop): replay fills it.
        real_send = pub._pub.send_multipart
        pub._pub.send_multipart = lambda frames: None
        pub.publish(_stored([4]))
        await asyncio.sleep(0.3)
        pub._pub.send_multipart = real_send
        pub.publish(_removed([1]))
        await _until(lambda: idx.match("e0", [4]) == 1 and idx.match("e0", [1]) == 0)
        assert sub.gaps == 2
        pub.shutdown()

        # The engine restarts (same endpoints, sequence from 0): its old entries go.
        pub = _publisher(*ports)
        await asyncio.sleep(0.5)
        pub.publish(_stored([9]))
        await _until(lambda: idx.match("e0", [9]) == 1)
        assert idx.match("e0", [2]) == 0 and idx.match("e0", [4]) == 0
        idx.check_integrity()
        await sub.close()
        assert len(idx) == 0
        pub.shutdown()

    asyncio.run(main())


def test_unreplayable_gap_drops_the_instance(ports):
    async def main():
        pub = _publisher(*ports)
        idx = PrefixIndex()
        sub = KVEventSubscriber(idx)
        sub.watch("e0", f"tcp://127.0.0.1:{ports[0]}", None)  # no replay endpoint
        await asyncio.sleep(0.5)
        pub.publish(_stored([1]))
        await _until(lambda: idx.match("e0", [1]) == 1)
        real_send = pub._pub.send_multipart
        pub._pub.send_multipart = lambda frames: None
        pub.publish(_removed([1]))  # lost: the index would wrongly keep block 1
        await asyncio.sleep(0.3)
        pub._pub.send_multipart = real_send
        pub.publish(_stored([5]))
        await _until(lambda: idx.match("e0", [5]) == 1)
        assert idx.match("e0", [1]) == 0  # dropped, not kept stale
        await sub.close()
        pub.shutdown()

    asyncio.run(main())


def test_external_is_low_64_bits():
    digest = bytes(range(32))
    assert external(digest) == int.from_bytes(digest[-8:], "big")


def test_store_holders_are_bounded_by_their_capacity_and_extend_a_prefix():
    idx = PrefixIndex(capacity_of=lambda h: 4 if h.startswith("store:") else None)
    idx.stored("store:redis", [1, 2, 3, 4, 5, 6], "store:redis")  # cap 4: 1 and 2 go
    assert idx.stats().per_holder["store:redis"] == 4
    idx.stored("e0", [1, 2])  # vLLM cache: unbounded (by max_entries only)
    assert idx.match("e0", [1, 2, 3, 4, 9]) == 2
    assert idx.match("e0", [1, 2, 3, 4, 9], also=["store:redis"]) == 4  # block by block
    assert idx.match("e1", [1, 2, 3], also=["store:redis"]) == 0  # 1 was evicted
    idx.stored("store:redis", [3])  # stored again: newest, so 4 is the oldest now
    idx.stored("store:redis", [7])
    assert idx.match("e1", [3], also=["store:redis"]) == 1
    assert idx.match("e1", [4], also=["store:redis"]) == 0
    idx.check_integrity()


def test_request_hasher_tokenizes_as_the_hf_tokenizer_does(tiny_model):
    """The gateway encodes with the Rust tokenizer directly: same ids as the HF call."""
    from disagg.scheduler.hashing import RequestHasher

    h = RequestHasher(tiny_model)
    text = "The quick brown fox, 12 jumps; über naïve café!\nNext line."
    for add in (True, False):
        want = h.tokenizer(text, add_special_tokens=add)["input_ids"]
        body = {"prompt": text, "add_special_tokens": add}
        assert h.tokenize("/v1/completions", body) == want
    msgs = [{"role": "user", "content": text}]
    chat = h.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert h.tokenize("/v1/chat/completions", {"messages": msgs}) == h.tokenizer(
        chat, add_special_tokens=False)["input_ids"]

"""The rule for which KV heads each TP rank holds and reads (``disagg.tp_layout``), checked
exhaustively over sizes well beyond what this machine runs, GQA replication included."""

from __future__ import annotations

import itertools

import pytest

from disagg.tp_layout import (
    HeadSlice,
    contacts,
    expected_notices,
    heads_per_rank,
    pairing_problem,
    rank_heads,
    read_plan,
    tp_problem,
)

HEADS = (1, 2, 4, 8)
TPS = (1, 2, 4, 8, 16)


def _valid(k: int, *tps: int) -> bool:
    return all(tp_problem(k, t) is None for t in tps)


def test_ranks_partition_the_heads_or_replicate_them_evenly():
    for k, t in itertools.product(HEADS, TPS):
        if not _valid(k, t):
            continue
        held = [rank_heads(k, t, r) for r in range(t)]
        assert all(len(h) == heads_per_rank(k, t) for h in held)
        # every head is held by exactly max(1, t / k) ranks, consecutive ones
        for head in range(k):
            holders = [r for r in range(t) if head in held[r]]
            assert len(holders) == max(1, t // k)
            assert holders == list(range(holders[0], holders[0] + len(holders)))


def test_vllm_sharding_examples():
    assert rank_heads(8, 2, 1) == range(4, 8)
    assert rank_heads(8, 16, 5) == range(2, 3)  # TP 16 over 8 heads: pairs of replicas
    assert rank_heads(1, 4, 3) == range(0, 1)  # MLA: one head everywhere
    assert "does not divide" in tp_problem(4, 3)
    assert "not a multiple" in tp_problem(4, 6)
    with pytest.raises(ValueError, match="outside a TP group"):
        rank_heads(4, 2, 2)


@pytest.mark.parametrize("k", HEADS)
def test_every_decode_rank_reads_exactly_its_heads_once(k):
    for p, d in itertools.product(TPS, TPS):
        if not _valid(k, p, d):
            continue
        for r in range(d):
            plan = read_plan(k, p, d, r)
            mine = rank_heads(k, d, r)
            got = []
            for s in plan:
                src = rank_heads(k, p, s.remote_rank)
                assert s.remote_head + s.num_heads <= len(src)
                assert s.local_head + s.num_heads <= len(mine)
                for i in range(s.num_heads):
                    # the remote head read is the global head stored at the local position
                    assert src[s.remote_head + i] == mine[s.local_head + i]
                    got.append(s.local_head + i)
            assert sorted(got) == list(range(len(mine)))
            # one read per remote rank: each carries that rank's one completion notice
            ranks = [s.remote_rank for s in plan]
            assert len(ranks) == len(set(ranks))


@pytest.mark.parametrize("k", HEADS)
def test_every_prefill_rank_hears_back_and_knows_how_often(k):
    for p, d in itertools.product(TPS, TPS):
        if not _valid(k, p, d):
            continue
        told = [0] * p
        for r in range(d):
            c = contacts(k, p, d, r)
            assert {s.remote_rank for s in read_plan(k, p, d, r)} <= set(c)
            for rank in c:
                told[rank] += 1
        assert told == [expected_notices(k, p, d, q) for q in range(p)]
        assert min(told) >= 1  # no prefill rank keeps its blocks until the lease ends


def test_concrete_plans():
    # P2 -> D1 with 2 heads: one head from each prefill rank
    assert read_plan(2, 2, 1, 0) == (HeadSlice(0, 0, 0, 1), HeadSlice(1, 1, 0, 1))
    # P1 -> D2: each decode rank reads its half of rank 0's heads
    assert read_plan(4, 1, 2, 1) == (HeadSlice(0, 0, 2, 2),)
    assert expected_notices(4, 1, 2, 0) == 2
    # replicated prefill (TP 4 over 2 heads) into TP 1: read ranks 0 and 2, notify 1 and 3
    assert [s.remote_rank for s in read_plan(2, 4, 1, 0)] == [0, 2]
    assert contacts(2, 4, 1, 0) == (0, 1, 2, 3)
    # replicated on both sides: decode replicas spread over prefill replicas
    assert read_plan(2, 4, 4, 1) == (HeadSlice(1, 0, 0, 1),)
    # equal TP: each rank reads its counterpart's whole blocks
    assert read_plan(8, 4, 4, 3) == (HeadSlice(3, 0, 0, 2),)


def test_pairing_problems_name_the_sizes():
    assert pairing_problem(4, 2, 1) is None
    assert pairing_problem(2, 4, 1) is None
    assert "prefill: TP 3" in pairing_problem(4, 3, 1)
    msg = pairing_problem(4, 2, 1, head_major=False)
    assert "prefill TP 2" in msg and "decode TP 1" in msg and "HND" in msg
    # same heads per rank needs no split, whatever the layout
    assert pairing_problem(1, 4, 2, head_major=False) is None
    assert pairing_problem(4, 2, 2, head_major=False) is None

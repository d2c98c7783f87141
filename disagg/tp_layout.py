"""Which KV heads each tensor-parallel rank holds, and which prefill ranks a decode rank reads.

vLLM shards a model's ``K`` KV heads over the ranks of a TP group (``QKVParallelLinear``):

    TP t <= K   rank r holds the K/t heads [r*K/t, (r+1)*K/t)        (t must divide K)
    TP t >  K   each head is replicated on t/K consecutive ranks:
                rank r holds head r // (t/K)                          (K must divide t)

MLA caches one latent "head" replicated on every rank: K = 1 in these terms.

A decode instance at TP d pulls a request's KV from a prefill instance at TP p. Decode rank
``r`` needs the heads it holds; each comes from one prefill rank that holds it (replicas are
spread over decode ranks). ``read_plan`` gives a decode rank's reads as head slices, merged
where consecutive heads come from consecutive heads of the same prefill rank.

Completion: vLLM frees a prefill's blocks once *every* prefill rank reports the request done,
and a prefill rank reports it once it has as many completion notices as decode ranks contact
it. A prefill rank no decode rank reads from (replicas beyond what the decoder needs) still
gets a notice, from decode rank ``rank % d``, so no rank holds blocks until its lease ends.
``contacts`` is the list of prefill ranks a decode rank notifies (and aborts, on failure);
``expected_notices`` how many notices a prefill rank waits for. Both sides compute them from
the same three numbers, so no extra round trip is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True, slots=True)
class HeadSlice:
    """``num_heads`` consecutive heads read from ``remote_rank``: heads from ``remote_head``
    of that rank's own heads land at ``local_head`` of ours (offsets within each rank)."""

    remote_rank: int
    local_head: int
    remote_head: int
    num_heads: int


def tp_problem(num_kv_heads: int, tp_size: int) -> str | None:
    """Why ``tp_size`` cannot shard ``num_kv_heads`` KV heads (vLLM refuses it too), or None."""
    if num_kv_heads < 1 or tp_size < 1:
        return f"{num_kv_heads} KV heads at TP {tp_size}: both must be at least 1"
    if tp_size <= num_kv_heads and num_kv_heads % tp_size:
        return f"TP {tp_size} does not divide the model's {num_kv_heads} KV heads"
    if tp_size > num_kv_heads and tp_size % num_kv_heads:
        return (f"TP {tp_size} is above the model's {num_kv_heads} KV heads but not a "
                "multiple of them (heads cannot be replicated evenly)")
    return None


def _check(num_kv_heads: int, tp_size: int) -> None:
    problem = tp_problem(num_kv_heads, tp_size)
    if problem:
        raise ValueError(problem)


def heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    _check(num_kv_heads, tp_size)
    return max(1, num_kv_heads // tp_size)


def rank_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads rank ``rank`` of a TP-``tp_size`` group holds."""
    _check(num_kv_heads, tp_size)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} outside a TP group of {tp_size}")
    if tp_size <= num_kv_heads:
        n = num_kv_heads // tp_size
        return range(rank * n, (rank + 1) * n)
    head = rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


@cache
def read_plan(num_kv_heads: int, remote_tp: int, local_tp: int,
              local_rank: int) -> tuple[HeadSlice, ...]:
    """The reads decode rank ``local_rank`` (TP ``local_tp``) makes from a TP-``remote_tp``
    prefill: every head it holds, each from one remote rank holding it, merged into slices.
    Raises ValueError for a TP size that cannot shard the heads."""
    _check(num_kv_heads, remote_tp)
    mine = rank_heads(num_kv_heads, local_tp, local_rank)
    slices: list[HeadSlice] = []
    for pos, head in enumerate(mine):
        holders = [r for r in range(remote_tp) if head in rank_heads(num_kv_heads, remote_tp, r)]
        src = holders[local_rank % len(holders)]
        remote_pos = head - rank_heads(num_kv_heads, remote_tp, src).start
        last = slices[-1] if slices else None
        if (last and last.remote_rank == src and last.local_head + last.num_heads == pos
                and last.remote_head + last.num_heads == remote_pos):
            slices[-1] = HeadSlice(src, last.local_head, last.remote_head, last.num_heads + 1)
        else:
            slices.append(HeadSlice(src, pos, remote_pos, 1))
    return tuple(slices)


@cache
def _contact_table(num_kv_heads: int, remote_tp: int, local_tp: int) -> tuple[tuple[int, ...], ...]:
    read_from = [{s.remote_rank for s in read_plan(num_kv_heads, remote_tp, local_tp, r)}
                 for r in range(local_tp)]
    unread = set(range(remote_tp)).difference(*read_from)
    return tuple(tuple(sorted(srcs | {p for p in unread if p % local_tp == r}))
                 for r, srcs in enumerate(read_from))


def contacts(num_kv_heads: int, remote_tp: int, local_tp: int, local_rank: int) -> tuple[int, ...]:
    """The prefill ranks decode rank ``local_rank`` notifies when its pull ends (those it
    reads from, plus unread ranks assigned to it), sorted."""
    return _contact_table(num_kv_heads, remote_tp, local_tp)[local_rank]


def expected_notices(num_kv_heads: int, remote_tp: int, local_tp: int, remote_rank: int) -> int:
    """How many completion notices prefill rank ``remote_rank`` (TP ``remote_tp``) receives
    for one request pulled by a TP-``local_tp`` decoder: at least 1."""
    return sum(remote_rank in c for c in _contact_table(num_kv_heads, remote_tp, local_tp))


def pairing_problem(num_kv_heads: int, prefill_tp: int, decode_tp: int,
                    head_major: bool = True) -> str | None:
    """Why a TP-``prefill_tp`` prefill cannot hand KV to a TP-``decode_tp`` decoder, or None.

    Different heads per rank need each block's KV split by head, which takes a head-major
    block layout (vLLM's CPU layout; ``VLLM_KV_CACHE_LAYOUT=HND`` on CUDA). ``head_major``
    says whether both sides have one."""
    for role, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        problem = tp_problem(num_kv_heads, tp)
        if problem:
            return f"{role}: {problem}"
    p_heads = heads_per_rank(num_kv_heads, prefill_tp)
    d_heads = heads_per_rank(num_kv_heads, decode_tp)
    if p_heads != d_heads and not head_major:
        return (f"prefill TP {prefill_tp} holds {p_heads} KV heads per rank and decode TP "
                f"{decode_tp} holds {d_heads}: splitting blocks by head needs a head-major KV "
                "layout on both sides (on CUDA set VLLM_KV_CACHE_LAYOUT=HND)")
    return None

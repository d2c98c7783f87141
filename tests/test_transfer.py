"""The transfer path on real NIXL (UCX over host memory) and the ZMQ control plane."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from disagg.transfer.control import channel
from disagg.transfer.control.messages import (
    PROTOCOL_VERSION,
    AbortNotice,
    Compat,
    HandshakeReply,
    HandshakeRequest,
    KVTransferParams,
    decode_message,
)
from disagg.transfer.nixl.endpoint import KVEndpoint
from disagg.transfer.nixl.layout import Plane, block_indices, coalesce, count_runs, strided_dlist

NB = 32
KEY = b"test side-channel key, 32 bytes!"


def _caches(dtype, fill: bool):
    make = torch.randn if fill else torch.zeros
    return [make(NB, 2, 16, 64).to(dtype) for _ in range(3)]


def _wait(endpoint: KVEndpoint, read, peer_side: KVEndpoint, notes: list[bytes]) -> str:
    """Poll like two engines do: the reader its READ, the holder its notifications (both
    agents' progress threads advance the transfer meanwhile)."""
    deadline = time.monotonic() + 10
    while (state := endpoint.poll(read)) == "PROC":
        notes.extend(peer_side.notifications())
        assert time.monotonic() < deadline, "READ did not finish"
    return state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_read_moves_exact_blocks_and_notifies(dtype):
    src, dst = _caches(dtype, True), _caches(dtype, False)
    p = KVEndpoint(f"p-{dtype}", src, NB)
    d = KVEndpoint(f"d-{dtype}", dst, NB)
    reply = HandshakeReply(engine_id="p", agent_name=p.name, agent_metadata=p.metadata(),
                           planes=p.plane_infos())
    peer = d.add_peer("p", reply)
    p.expect_notifications(True)  # the holder's worker does this while it holds blocks
    read = d.start_read(peer, [3, 4, 5, 9], [10, 11, 12, 0], b"req-7")
    assert read.num_descriptors == 2 * 3  # two runs, three layers
    notes: list[bytes] = []
    assert _wait(d, read, p, notes) == "DONE"
    for s, t in zip(src, dst, strict=True):
        assert torch.equal(t[3:6], s[10:13]) and torch.equal(t[9], s[0])
        assert not t[6:9].any()  # nothing else was written
    deadline = time.monotonic() + 5
    while not notes and time.monotonic() < deadline:
        notes = p.notifications()
    assert notes == [b"req-7"]
    d.close()
    p.close()


def test_read_reaches_the_last_block_and_refuses_ids_outside_the_caches():
    src, dst = _caches(torch.bfloat16, True), _caches(torch.bfloat16, False)
    p, d = KVEndpoint("p-edge", src, NB), KVEndpoint("d-edge", dst, NB)
    reply = HandshakeReply(engine_id="p", agent_name=p.name, agent_metadata=p.metadata(),
                           planes=p.plane_infos())
    peer = d.add_peer("p", reply)
    p.expect_notifications(True)
    assert _wait(d, d.start_read(peer, [0], [NB - 1], b"edge"), p, []) == "DONE"
    for s, t in zip(src, dst, strict=True):
        assert torch.equal(t[0], s[NB - 1])
    for local, remote in (([NB], [0]), ([0], [NB]), ([-1], [0]), ([0, 1], [2])):
        with pytest.raises(ValueError):
            d.start_read(peer, local, remote, b"bad")
    d.close()
    p.close()


@pytest.mark.parametrize("local,remote", [
    ([], []), ([5], [9]), ([1, 2, 3], [7, 8, 9]), ([1, 2, 4], [7, 8, 9]), ([3, 4, 5, 9], [10, 11, 12, 0]),
    ([2, 1], [5, 6])])
def test_prepared_indices_and_run_count_match_the_descriptor_path(local, remote):
    planes = [Plane(1000, 64, 64, num_blocks=16), Plane(9000, 128, 64, num_blocks=16)]
    assert count_runs(local, remote) == len(coalesce(local, remote))
    assert block_indices((0, 16), local) == [*local, *(16 + b for b in local)]
    rows = strided_dlist(planes).tolist()
    assert rows == [[1000, 64, 0, 64, 16], [9000, 64, 0, 128, 16]]
    with pytest.raises(ValueError, match="block count"):
        strided_dlist([Plane(0, 64, 64)])


def _compat(**kw) -> Compat:
    base = dict(model="tiny", dtype="bfloat16", block_size=16, num_layers=3,
                plane_bytes=[4096] * 3)
    return Compat(**{**base, **kw})


def test_side_channel_handshake_and_compat_check():
    ours = _compat()

    def handler(raw: bytes):
        msg = decode_message(raw)
        if isinstance(msg, AbortNotice):
            return msg
        problem = ours.mismatch(msg.compat)
        if problem:
            raise ValueError(problem)
        return HandshakeReply(engine_id="p", agent_name="a", agent_metadata=b"\x00\x01",
                              planes=[])

    server = channel.SideChannelServer("127.0.0.1", 0, handler, key=KEY)
    try:
        reply = channel.handshake("127.0.0.1", server.port,
                                  HandshakeRequest(engine_id="d", compat=ours), 5, key=KEY)
        assert reply.agent_metadata == b"\x00\x01"
        bad = HandshakeRequest(engine_id="d", compat=_compat(dtype="float16"))
        with pytest.raises(channel.ControlError, match="dtype"):
            channel.handshake("127.0.0.1", server.port, bad, 5, key=KEY)
        # The server survives a garbage message and keeps answering.
        with pytest.raises(channel.ControlError, match="unknown message kind"):
            channel.request("127.0.0.1", server.port, AbortNotice(request_ids=["x"])
                            .model_copy(update={"kind": "nope"}), 5, key=KEY)
        echo = channel.request("127.0.0.1", server.port, AbortNotice(request_ids=["x"]), 5,
                               key=KEY)
        assert echo == AbortNotice(request_ids=["x"])
        assert not server.rejected  # all of these were authenticated
    finally:
        server.close()


def test_handshake_with_absent_peer_times_out():
    port = channel.SideChannelServer("127.0.0.1", 0, lambda raw: AbortNotice(request_ids=[]),
                                     key=KEY)
    dead = port.port
    port.close()
    t0 = time.monotonic()
    with pytest.raises(channel.ControlError, match="no reply"):
        channel.handshake("127.0.0.1", dead, HandshakeRequest(engine_id="d",
                          compat=_compat()), 0.5, key=KEY)
    assert time.monotonic() - t0 < 3


def test_transfer_params_ignore_vllm_annotations_but_check_ours():
    params = {"remote_engine_id": "p", "remote_request_id": "r", "remote_host": "h",
              "remote_port": 1, "remote_block_ids": [1, 2], "remote_num_tokens": 200,
              "remote_prefill_cached_tokens": 0}
    assert KVTransferParams.parse(params).remote_block_ids == [1, 2]
    with pytest.raises(ValueError):
        KVTransferParams.parse({**params, "remote_port": "x"})


def test_transfer_params_from_another_protocol_version_are_refused():
    params = {"remote_engine_id": "p", "remote_request_id": "r", "remote_host": "h",
              "remote_port": 1, "remote_block_ids": [1, 2], "remote_num_tokens": 200}
    assert KVTransferParams.parse(params).protocol_version == PROTOCOL_VERSION  # default
    ok = {**params, "protocol_version": PROTOCOL_VERSION}
    assert KVTransferParams.parse(ok).protocol_version == PROTOCOL_VERSION
    other = PROTOCOL_VERSION + 1
    with pytest.raises(ValidationError,
                       match=f"protocol version {other}, ours is {PROTOCOL_VERSION}"):
        KVTransferParams.parse({**params, "protocol_version": other})


def test_compat_across_tp_sizes_compares_per_head_bytes():
    """4 KV heads: a TP-2 rank's block holds 2 of them, a TP-1 block all 4."""
    prefill = _compat(num_kv_heads=4, tp_size=2, plane_bytes=[2048] * 3)
    decoder = _compat(num_kv_heads=4, tp_size=1, plane_bytes=[4096] * 3)
    assert prefill.mismatch(decoder) is None and decoder.mismatch(prefill) is None
    wrong_head = _compat(num_kv_heads=4, tp_size=1, plane_bytes=[8192] * 3)
    assert "bytes per KV head" in prefill.mismatch(wrong_head)
    nhd = decoder.model_copy(update={"head_major": False})
    problem = prefill.mismatch(nhd)
    assert "prefill TP 2 holds 2 KV heads per rank and decode TP 1 holds 4" in problem
    assert "tp_size: ours=2 peer=1" in problem
    # the same heads per rank need no split, whatever the layout
    assert _compat(num_kv_heads=1, tp_size=2, head_major=False).mismatch(
        _compat(num_kv_heads=1, tp_size=1, head_major=False)) is None
    assert "num_kv_heads" in prefill.mismatch(_compat(num_kv_heads=8, tp_size=2))

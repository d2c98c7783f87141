"""A worker's NIXL endpoint: one agent, its registered KV planes, and block reads from peers.

This is the whole data path of a KV pull, used by the connector and by
``benchmarks/transfer.py`` alike. NIXL's progress thread is off (an idle agent with it on
spins a core, BRIEF §3). The reader polls its READs on its engine's thread, once per (short,
decode) step; the holder, whose steps can be multi-second prefills, gets a
``ProgressDriver`` that collects notifications (and so advances its side of the transfers)
only while it holds blocks for a decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from disagg.tp_layout import HeadSlice
from disagg.transfer.control.messages import HandshakeReply, PlaneInfo
from disagg.transfer.nixl.layout import (
    Plane,
    block_indices,
    coalesce,
    count_runs,
    planes_of,
    slice_descriptors,
    storage_regions,
    strided_dlist,
)
from disagg.transfer.nixl.progress import ProgressDriver

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    agent_name: str
    planes: tuple[Plane, ...]
    prepped: object  # NIXL's prepared list of every block of every plane (``strided_dlist``)
    offsets: tuple[int, ...]  # each plane's first entry in ``prepped``
    run_planes: int  # planes contiguous on both sides: a READ moves runs of blocks there


@dataclass(slots=True)
class Read:
    """An in-flight READ: its NIXL handle and what it moves."""

    handle: object
    num_bytes: int
    descriptors: int  # known, or per run of blocks in each of ``run_planes`` planes (below)
    run_planes: int = 0  # planes whose descriptors are one per run: counted on demand
    ids: tuple[Sequence[int], Sequence[int]] = ((), ())  # (local, remote) block ids
    done: bool = False  # finished when posted (its handle already released)

    @property
    def num_descriptors(self) -> int:
        """Descriptors after merging consecutive blocks, as ``coalesce`` does: counted when
        asked (for stats, after the READ), not while the READ is posted."""
        if not self.run_planes:
            return self.descriptors
        return self.descriptors + self.run_planes * count_runs(*self.ids)


class KVEndpoint:
    """Registers local KV memory with NIXL and reads block ranges from peers."""

    def __init__(
        self,
        name: str,
        kv_caches: Sequence[torch.Tensor],
        num_blocks: int,
        backends: Sequence[str] = ("UCX",),
    ):
        # Imported here: NIXL is heavy, and only a worker building an endpoint needs it.
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.name = name
        # STRICT: our progress thread and the engine's thread both call into the agent.
        cfg = nixl_agent_config(enable_prog_thread=False, backends=list(backends),
                                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = nixl_agent(name, cfg)
        self.planes: list[Plane] = [p for t in kv_caches for p in planes_of(t, num_blocks)]
        self.mem_type = "VRAM" if kv_caches[0].is_cuda else "DRAM"
        regions = [(*r, "") for r in storage_regions(kv_caches)]
        self._reg = self.agent.register_memory(regions, self.mem_type)
        # Every local block prepared once: a pull then names blocks by index, and NIXL
        # merges consecutive ones, instead of building and checking descriptors per pull.
        self._prepped = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", strided_dlist(self.planes), self.mem_type)
        self._offsets = _offsets(self.planes)
        self._block_bytes = sum(p.block_bytes for p in self.planes)
        self._peers: dict[str, Peer] = {}
        self.progress = ProgressDriver(self.agent, name=f"nixl-progress-{name}")

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def plane_infos(self) -> list[PlaneInfo]:
        return [PlaneInfo(base=p.base, block_stride=p.block_stride,
                          block_bytes=p.block_bytes, device_id=p.device_id,
                          num_heads=p.num_heads, head_bytes=p.head_bytes,
                          num_blocks=p.num_blocks)
                for p in self.planes]

    def add_peer(self, engine_id: str, reply: HandshakeReply) -> Peer:
        """Load a peer's NIXL metadata; idempotent per ``engine_id`` (one key per remote
        TP rank: ``peer_key``)."""
        if engine_id not in self._peers:
            planes = tuple(Plane(p.base, p.block_stride, p.block_bytes, p.device_id,
                                 p.num_heads, p.head_bytes, p.num_blocks)
                           for p in reply.planes)
            if len(planes) != len(self.planes):
                raise ValueError(f"peer has {len(planes)} KV planes, we have {len(self.planes)}")
            name = self.agent.add_remote_agent(reply.agent_metadata)
            prepped = self.agent.prep_xfer_dlist(name, strided_dlist(planes), self.mem_type)
            runs = sum(p.contiguous and q.contiguous
                       for p, q in zip(self.planes, planes, strict=True))
            self._peers[engine_id] = Peer(name, planes, prepped, _offsets(planes), runs)
        return self._peers[engine_id]

    def peer(self, engine_id: str) -> Peer | None:
        return self._peers.get(engine_id)

    def forget_peer(self, engine_id: str) -> None:
        """Drop a peer (a pull from it failed: it died, restarted or stalled): the next
        pull handshakes again.

        Its remote agent stays loaded in NIXL on purpose: removing the agent of a peer whose
        UCX endpoint saw a remote disconnect leaves UCX with queued operations, and the
        agent's teardown then aborts the whole engine (``ucs_arbiter_group_is_empty``
        assertion). Loading the same metadata again is idempotent, and a restarted engine
        has a new id, so what stays is a few hundred bytes per dead incarnation."""
        peer = self._peers.pop(engine_id, None)
        if peer is not None:
            self._release_dlist(peer.prepped)

    def _release_dlist(self, handle: object) -> None:
        try:
            self.agent.release_dlist_handle(handle)
        except Exception as exc:  # a local bookkeeping failure: nothing to undo
            logger.debug("release_dlist_handle: %s", exc)

    def _remove_peer(self, engine_id: str) -> None:
        """Unload a healthy peer's remote agent (at close)."""
        peer = self._peers.pop(engine_id, None)
        if peer is not None:
            self._release_dlist(peer.prepped)
            try:
                self.agent.remove_remote_agent(peer.agent_name)
            except Exception as exc:
                logger.debug("remove_remote_agent(%s): %s", peer.agent_name, exc)

    def start_read(
        self, peer: Peer, local_ids: Sequence[int], remote_ids: Sequence[int], notif: bytes,
        heads: HeadSlice | None = None,
    ) -> Read:
        """Start a READ of ``remote_ids`` into ``local_ids`` (all heads, or the slice
        ``heads``); the peer gets ``notif`` when done. Raises ValueError for a block id
        outside either side's cache."""
        if heads is None:
            handle = self._prepared_read(peer, local_ids, remote_ids, notif)
            read = Read(handle, len(local_ids) * self._block_bytes,
                        (len(self.planes) - peer.run_planes) * len(local_ids),
                        peer.run_planes, (local_ids, remote_ids))
        else:
            local, remote = slice_descriptors(self.planes, peer.planes,
                                              coalesce(local_ids, remote_ids), heads)
            handle = self.agent.initialize_xfer(
                "READ", self.agent.get_xfer_descs(local, self.mem_type),
                self.agent.get_xfer_descs(remote, self.mem_type), peer.agent_name, notif)
            read = Read(handle, sum(d[1] for d in local), len(local))
        try:
            state = self.agent.transfer(handle)
        except Exception:  # the peer is gone (NIXL_ERR_REMOTE_DISCONNECT) or refused
            self.agent.release_xfer_handle(handle)
            raise
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise RuntimeError("NIXL refused to post the READ")
        if state == "DONE":  # done within the call (UCX over CMA copies inline): no polls
            self.agent.release_xfer_handle(handle)
            read.done = True
        return read

    def _prepared_read(self, peer: Peer, local_ids: Sequence[int], remote_ids: Sequence[int],
                       notif: bytes) -> object:
        """A whole-block READ's handle, from the prepared lists (NIXL merges consecutive
        blocks into one descriptor, as ``coalesce`` does)."""
        if len(local_ids) != len(remote_ids):
            raise ValueError(f"{len(local_ids)} local blocks for {len(remote_ids)} remote blocks")
        here, there = self.planes[0].num_blocks, peer.planes[0].num_blocks
        if not (_within(local_ids, here) and _within(remote_ids, there)):
            raise ValueError(f"block ids outside the caches ({here} local, {there} remote "
                             "blocks)")
        return self.agent.make_prepped_xfer(
            "READ", self._prepped, block_indices(self._offsets, local_ids),
            peer.prepped, block_indices(peer.offsets, remote_ids), notif)

    def notify(self, peer: Peer, notif: bytes) -> None:
        """Send ``notif`` to the peer without a READ (a rank we read nothing from)."""
        self.agent.send_notif(peer.agent_name, notif)

    def poll(self, read: Read) -> str:
        """'DONE', 'PROC' or 'ERR'; a finished handle (DONE or ERR) is released.

        The reader's engine polls once per step: its steps are short (decode), and keeping
        every call on its thread avoids contending for the agent's lock."""
        if read.done:
            return "DONE"
        state = self.agent.check_xfer_state(read.handle)
        if state != "PROC":
            self.agent.release_xfer_handle(read.handle)
        return state

    def abandon(self, read: Read) -> None:
        """Give up on a READ (timed out): release (abort) its handle."""
        if read.done:
            return
        try:
            self.agent.release_xfer_handle(read.handle)
        except Exception as exc:  # NIXL may refuse to abort an active transfer
            logger.warning("releasing a timed-out READ: %s", exc)

    def expect_notifications(self, on: bool) -> None:
        """Collect completion notifications while blocks are held for decoders."""
        self.progress.want_notifications(on)

    def notifications(self) -> list[bytes]:
        """Messages that peers' completed READs carried since the last call."""
        return self.progress.notifications()

    def close(self) -> None:
        self.progress.close()
        for engine_id in list(self._peers):
            self._remove_peer(engine_id)
        self._release_dlist(self._prepped)
        try:
            self.agent.deregister_memory(self._reg)
        except Exception as exc:
            logger.debug("deregister_memory: %s", exc)


def _offsets(planes: Sequence[Plane]) -> tuple[int, ...]:
    """Each plane's first entry in its ``strided_dlist``."""
    out, at = [], 0
    for p in planes:
        out.append(at)
        at += p.num_blocks
    return tuple(out)


def _within(ids: Sequence[int], num_blocks: int) -> bool:
    return not ids or (min(ids) >= 0 and max(ids) < num_blocks)

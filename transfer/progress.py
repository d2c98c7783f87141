"""A progress driver for a NIXL agent that costs nothing when idle.

NIXL's own progress thread polls with no delay: it spins a whole core even with nothing to
do (BRIEF §3). Without any progress thread, transfers only advance when the engine polls,
once per step; a prefill instance in the middle of a multi-second forward pass then holds
up every decoder's READ of its blocks for that long (rendezvous needs both sides).

This thread polls only while there is work: READs in flight (polled back to back: they
last milliseconds) or blocks held for decoders (notifications collected every
``interval_s``); otherwise it sleeps on a condition and costs nothing. The agent runs in NIXL's
STRICT thread-sync mode, so the engine's thread may post transfers meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Tracked:
    """A posted transfer; ``state`` turns from 'PROC' to 'DONE' or 'ERR' exactly once."""

    handle: object
    state: str = "PROC"
    cancelled: bool = False


class ProgressDriver:
    def __init__(self, agent, interval_s: float = 0.0005, name: str = "nixl-progress"):
        self._agent = agent
        self._interval = interval_s
        self._cv = threading.Condition()
        self._inflight: list[Tracked] = []
        self._want_notifs = False
        self._notifs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def track(self, handle) -> Tracked:
        item = Tracked(handle)
        with self._cv:
            self._inflight.append(item)
            self._cv.notify()
        return item

    def abandon(self, item: Tracked) -> None:
        """Give up on a transfer (timed out): it reads 'ERR' now, and the progress thread,
        the only one touching tracked handles, releases (aborts) it on its next tick."""
        with self._cv:
            if item.state == "PROC":
                item.state, item.cancelled = "ERR", True

    def want_notifications(self, on: bool) -> None:
        """Collect peers' notifications while ``on`` (blocks are held for decoders)."""
        with self._cv:
            if on != self._want_notifs:
                self._want_notifs = on
                self._cv.notify()

    def notifications(self) -> list[bytes]:
        out = []
        while not self._notifs.empty():
            out.append(self._notifs.get())
        return out

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._inflight or self._want_notifs)
                if self._stop:
                    return
                inflight, want = list(self._inflight), self._want_notifs
            try:
                self._tick(inflight, want)
            except Exception as exc:  # never let a NIXL error kill progress for everyone
                logger.warning("NIXL progress: %s", exc)
            if inflight:
                time.sleep(0)  # a READ is moving: poll again at once, only yielding the GIL
            else:
                with self._cv:  # only holding blocks for decoders: a gentler cadence
                    self._cv.wait(self._interval)

    def _tick(self, inflight: list[Tracked], want_notifs: bool) -> None:
        finished = []
        for item in inflight:
            if item.cancelled:
                self._release(item)
                finished.append(item)
                continue
            state = self._agent.check_xfer_state(item.handle)
            if state != "PROC":
                self._release(item)
                item.state = state
                finished.append(item)
        if finished:
            with self._cv:
                self._inflight = [t for t in self._inflight if t not in finished]
        if want_notifs or not inflight:
            for msgs in self._agent.get_new_notifs().values():
                for m in msgs:
                    self._notifs.put(m)

    def _release(self, item: Tracked) -> None:
        try:
            self._agent.release_xfer_handle(item.handle)
        except Exception as exc:  # NIXL may refuse to abort an active transfer
            logger.warning("releasing a NIXL transfer handle: %s", exc)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=2)

"""A progress driver for a NIXL agent that costs nothing when idle.

NIXL's own progress thread polls with no delay: it spins a whole core even with nothing to
do (BRIEF §3). Without any progress thread, transfers only advance when the engine polls,
once per step; a prefill instance in the middle of a multi-second forward pass then holds
up every decoder's READ of its blocks for that long (rendezvous needs both sides).

This thread runs only while the agent holds blocks for decoders: it collects their
completion notifications every ``interval_s`` (which also advances this side of their
READs); otherwise it sleeps on a condition and costs nothing. The agent runs in NIXL's
STRICT thread-sync mode, so the engine's thread may post transfers meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nixl._api import nixl_agent

logger = logging.getLogger(__name__)


class ProgressDriver:
    def __init__(self, agent: nixl_agent, interval_s: float = 0.0005,
                 name: str = "nixl-progress"):
        self._agent = agent
        self._interval = interval_s
        self._cv = threading.Condition()
        self._want_notifs = False
        self._notifs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def want_notifications(self, on: bool) -> None:
        """Collect peers' notifications while ``on`` (blocks are held for decoders).
        Called by one thread (the engine's), once per step: unchanged, it takes no lock."""
        if on == self._want_notifs:
            return
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
                self._cv.wait_for(lambda: self._stop or self._want_notifs)
                if self._stop:
                    return
            try:
                for msgs in self._agent.get_new_notifs().values():
                    for m in msgs:
                        self._notifs.put(m)
            except Exception as exc:  # never let a NIXL error kill progress for everyone
                logger.warning("NIXL progress: %s", exc)
            with self._cv:
                self._cv.wait(self._interval)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=2)

"""Session affinity: every request of a session goes to the same instance.

The session is named by a request header (``X-Session-Id`` by default). Instances are picked
by rendezvous hashing (highest sha256 of session + instance), so adding or losing an
instance moves only the sessions that hashed to it. Requests without the header fall back to
least-loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from disagg.scheduler.base import Candidate, Policy, RequestInfo
from disagg.scheduler.least_loaded import LeastLoaded

SESSION_HEADER = "x-session-id"


def _weight(session: str, instance: str) -> bytes:
    return hashlib.sha256(f"{session}\0{instance}".encode()).digest()


class SessionAffinity(Policy):
    name = "session"

    def __init__(self) -> None:
        self._fallback = LeastLoaded()

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        session = request.headers.get(SESSION_HEADER)
        if not session:
            return self._fallback.choose(candidates, request)
        # Keyed by URL: stable for an instance's life, different for its restarted self.
        return max(candidates, key=lambda c: _weight(session, c.url))

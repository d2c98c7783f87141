"""ZMQ control plane: a prefill worker's side channel and the decoder's client for it.

Every message, request or reply, travels in an authenticated envelope: two frames,
``[Envelope JSON, message JSON]`` (``messages.Envelope``; the MAC layout is in the
``messages`` docstring). The MAC is HMAC-SHA256 under the deployment's channel key
(``disagg.credentials.channel_key``), checked with ``hmac.compare_digest``.

The server (a ROUTER socket in a daemon thread) checks, in this order, before its handler
sees a byte of the body:

    frames     exactly [identity, b"", header, body] (a REQ peer)        else malformed
    key        this server has a channel key                            else no_key
    size       header <= 1 KiB, body <= ``REQUEST_MAX_BYTES``            else too_large
               (ZMQ's MAXMSGSIZE cuts any frame over twice that at the transport: the
               peer is disconnected, the message never delivered)
    header     parses as an ``Envelope`` of our ``PROTOCOL_VERSION``    else malformed/version
    MAC        matches                                                   else bad_mac
    timestamp  within ``WINDOW_S`` of our clock                          else stale
    nonce      not seen within the window (``ReplayCache``)              else replay

A rejected message is counted (``SideChannelServer.rejected``, and ``on_reject`` for the
worker's ``vllm:disagg_side_channel_rejected*`` counters) and, when the server has a key and
the header named a nonce, answered with an authenticated ``ErrorReply``; otherwise it is
dropped. A server without a key fails closed: it drops everything. The server answers each
accepted request with exactly one reply; a handler error becomes an ``ErrorReply`` rather
than a dead thread, and so does anything a malformed message could raise.

The client (``request``, ``handshake``) checks each reply the same way, bound to its own
request: the reply's MAC covers the request's nonce, so a reply to another request, a
forged one or one over ``REPLY_MAX_BYTES`` raises ``AuthError`` and is never trusted. Every
client wait has a timeout: a peer that is gone costs at most ``timeout_s``, then
``ControlError``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import zmq
from pydantic import ValidationError

from disagg.transfer.control.messages import (
    PROTOCOL_VERSION,
    AbortNotice,
    Envelope,
    ErrorReply,
    HandshakeReply,
    HandshakeRequest,
    _Msg,
    decode_reply,
)

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], _Msg]

WINDOW_S = 30.0  # a message's timestamp may differ from the receiver's clock by this much
REQUEST_MAX_BYTES = 1 << 20  # a request's body (handshake, abort notice): ~1 KB in practice
# A reply's body: a handshake reply carries the NIXL agent metadata (tiny model on UCX/DRAM:
# ~0.6 KB, the whole reply ~1.6 KB; 64 layers: ~3 KB, reply ~14 KB). 1000x margin.
REPLY_MAX_BYTES = 16 << 20
HEADER_MAX_BYTES = 1024
REPLAY_CACHE_SIZE = 100_000  # nonces remembered; past that the window's floor rises
# Why the server rejected a message; each is a counter ``side_channel_rejected_<reason>``.
REJECT_REASONS = ("no_key", "malformed", "too_large", "version", "bad_mac", "stale", "replay")

REQUEST, REPLY = b"Q", b"R"
_NONCE_BYTES = 16
_NO_NONCE = bytes(_NONCE_BYTES)


class ControlError(RuntimeError):
    """A control-plane exchange failed: timeout, refused, or an error reply."""


class AuthError(ControlError):
    """A reply failed authentication (forged, for another request, stale, too large): it is
    not trusted. Also what a peer with another deployment secret gets."""


class Rejected(Exception):
    """An envelope that did not open; ``nonce`` is the sender's when its header parsed."""

    def __init__(self, reason: str, detail: str, nonce: bytes | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.nonce = reason, detail, nonce


def _mac(key: bytes, direction: bytes, ts_ms: int, nonce: bytes, re: bytes,
         body: bytes) -> bytes:
    head = struct.pack(">Bcq", PROTOCOL_VERSION, direction, ts_ms)
    return hmac.new(key, head + nonce + re + body, hashlib.sha256).digest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def seal(key: bytes, body: bytes, direction: bytes, re: bytes | None = None, *,
         ts_ms: int | None = None, nonce: bytes | None = None) -> list[bytes]:
    """The two frames carrying ``body``: [Envelope JSON, body]. ``re``: the nonce of the
    request a reply answers. ``ts_ms`` and ``nonce`` are for tests (stale, replayed)."""
    ts_ms = _now_ms() if ts_ms is None else ts_ms
    nonce = secrets.token_bytes(_NONCE_BYTES) if nonce is None else nonce
    mac = _mac(key, direction, ts_ms, nonce, re or _NO_NONCE, body)
    header = Envelope(ts=ts_ms, nonce=nonce.hex(), mac=mac.hex())
    return [header.model_dump_json().encode(), body]


def _peek_version(header: bytes) -> object:
    try:
        data = json.loads(header)
    except (ValueError, RecursionError):
        return None
    return data.get("v") if isinstance(data, dict) else None


def open_envelope(key: bytes, frames: list[bytes], direction: bytes, max_body: int,
                  re: bytes | None = None, window_s: float = WINDOW_S,
                  now_ms: int | None = None) -> tuple[Envelope, bytes]:
    """Check ``frames`` ([header, body]) and return them; ``Rejected`` if they do not pass.
    Freshness of nonces (replays) is the caller's: ``ReplayCache``."""
    if len(frames) != 2:
        raise Rejected("malformed", f"{len(frames)} frames, expected 2 (envelope, body)")
    header, body = frames
    if len(header) > HEADER_MAX_BYTES:
        raise Rejected("too_large", f"envelope of {len(header)} bytes")
    try:
        env = Envelope.model_validate_json(header)
    except ValidationError:
        v = _peek_version(header)
        if type(v) is int and v != PROTOCOL_VERSION:
            raise Rejected("version", f"protocol version {v}, ours is {PROTOCOL_VERSION}"
                           ) from None
        raise Rejected("malformed", "not an envelope") from None
    nonce = bytes.fromhex(env.nonce)
    if env.v != PROTOCOL_VERSION:
        raise Rejected("version", f"protocol version {env.v}, ours is {PROTOCOL_VERSION}",
                       nonce)
    if len(body) > max_body:
        raise Rejected("too_large", f"body of {len(body)} bytes, the cap is {max_body}", nonce)
    expected = _mac(key, direction, env.ts, nonce, re or _NO_NONCE, body)
    if not hmac.compare_digest(bytes.fromhex(env.mac), expected):
        raise Rejected("bad_mac", "authentication failed (is the deployment secret the "
                       "same on both sides?)", nonce)
    now_ms = _now_ms() if now_ms is None else now_ms
    if abs(now_ms - env.ts) > window_s * 1000:
        raise Rejected("stale", f"timestamp {(env.ts - now_ms) / 1000:+.1f}s off our clock "
                       f"(window ±{window_s:g}s)", nonce)
    return env, body


class ReplayCache:
    """Nonces seen within the window, bounded: a full cache forgets its oldest nonce and
    from then on refuses everything at least that old (``floor``), so no replay gets in
    either way; only under a flood of valid messages can a fresh one be refused."""

    def __init__(self, window_s: float = WINDOW_S, capacity: int = REPLAY_CACHE_SIZE):
        self.window_ms, self.capacity = int(window_s * 1000), capacity
        self._heap: list[tuple[int, bytes]] = []  # (ts_ms, nonce), oldest first
        self._seen: set[bytes] = set()
        self.floor = -1  # timestamps <= floor are refused (raised when full)

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: bytes, ts_ms: int, now_ms: int) -> bool:
        """Remember ``nonce``; False if it was seen (or may have been: below the floor)."""
        horizon = now_ms - self.window_ms
        while self._heap and self._heap[0][0] < horizon:  # outside the window: stale anyway
            self._seen.discard(heapq.heappop(self._heap)[1])
        if ts_ms <= self.floor or nonce in self._seen:
            return False
        heapq.heappush(self._heap, (ts_ms, nonce))
        self._seen.add(nonce)
        if len(self._heap) > self.capacity:
            ts, old = heapq.heappop(self._heap)
            self._seen.discard(old)
            self.floor = max(self.floor, ts)
        return True


class SideChannelServer:
    """ROUTER socket on ``tcp://host:port`` answering authenticated requests with ``handler``
    (which gets the body's bytes). ``key``: the channel key; None rejects everything.
    ``on_reject(reason)`` is called from the server's thread for every rejected message."""

    def __init__(self, host: str, port: int, handler: Handler, *, key: bytes | None,
                 name: str = "side-channel", on_reject: Callable[[str], None] | None = None,
                 window_s: float = WINDOW_S, max_request_bytes: int = REQUEST_MAX_BYTES,
                 replay_capacity: int = REPLAY_CACHE_SIZE):
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # The transport's own cap, per frame: a peer sending more is disconnected before the
        # frame is buffered. Below it, oversized bodies reach us and are counted, answered.
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_request_bytes)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self._handler = handler
        self._key = key or None
        self._on_reject = on_reject
        self._window_s, self._max_request = window_s, max_request_bytes
        self._replays = ReplayCache(window_s, replay_capacity)
        self.rejected: Counter[str] = Counter()  # by reason; written by the server's thread
        self.served = 0  # authenticated requests answered
        self._logged: dict[str, float] = {}  # reason -> when last logged (rate limit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                # Poll with a timeout so close() is noticed; idle: one wake-up per 100 ms.
                if not poller.poll(100):
                    continue
                frames = self._sock.recv_multipart()
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                logger.warning("side channel: receive failed: %s", exc)
                continue
            try:
                reply = self._answer(frames)
            except Exception:  # whatever a message does, this thread lives on
                logger.exception("side channel: unexpected error answering a message")
                reply = None
            if reply is not None:
                try:
                    self._sock.send_multipart(reply)
                except zmq.ZMQError as exc:
                    logger.warning("side channel: reply failed: %s", exc)
        self._sock.close(0)

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply frames for one incoming message, or None to drop it."""
        if len(frames) < 2 or frames[1] != b"":  # not a REQ peer: nowhere to answer
            self._reject("malformed", "no REQ envelope delimiter")
            return None
        ident, parts = frames[0], frames[2:]
        if self._key is None:
            self._reject("no_key", "this worker has no channel key (deployment secret)")
            return None
        try:
            env, body = open_envelope(self._key, parts, REQUEST, self._max_request,
                                      window_s=self._window_s)
            nonce = bytes.fromhex(env.nonce)
            if not self._replays.add(nonce, env.ts, _now_ms()):
                raise Rejected("replay", "nonce already seen", nonce)
        except Rejected as r:
            self._reject(r.reason, r.detail)
            if r.nonce is None:
                return None  # the sender could not authenticate an answer
            return self._reply(ident, ErrorReply(message=f"rejected ({r.reason}): {r.detail}"),
                               r.nonce)
        try:
            reply = self._handler(body)
        except Exception as exc:  # the peer gets the reason; this thread lives on
            logger.warning("side channel request failed: %s", exc)
            reply = ErrorReply(message=str(exc)[:2000])
        self.served += 1
        return self._reply(ident, reply, nonce)

    def _reply(self, ident: bytes, msg: _Msg, re: bytes) -> list[bytes]:
        assert self._key is not None
        return [ident, b"", *seal(self._key, msg.model_dump_json().encode(), REPLY, re)]

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if self._on_reject is not None:
            try:
                self._on_reject(reason)
            except Exception:
                logger.exception("side channel: on_reject failed")
        now = time.monotonic()
        if now - self._logged.get(reason, -1e9) >= 10:  # at most one line per reason per 10 s
            self._logged[reason] = now
            logger.warning("side channel %s:%d rejected a message (%s: %s); %d so far",
                           self.host, self.port, reason, detail, self.rejected[reason])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def request(host: str, port: int, msg: _Msg, timeout_s: float, *, key: bytes | None
            ) -> HandshakeReply | AbortNotice:
    """Send one message and return the peer's authenticated reply. ControlError on timeout,
    refusal (an ErrorReply) or a missing key; AuthError on a reply that fails its checks."""
    if not key:
        raise ControlError(f"no side-channel key (is the deployment secret set?): cannot "
                           f"talk to {host}:{port}")
    nonce = secrets.token_bytes(_NONCE_BYTES)
    frames = seal(key, msg.model_dump_json().encode(), REQUEST, nonce=nonce)
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * REPLY_MAX_BYTES)  # past it: dropped, no reply
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send_multipart(frames)
        raw = sock.recv_multipart()
    except zmq.Again:
        raise ControlError(f"no reply from {host}:{port} within {timeout_s}s") from None
    except zmq.ZMQError as exc:
        raise ControlError(f"side channel {host}:{port}: {exc}") from None
    finally:
        sock.close(0)
    try:
        _, body = open_envelope(key, raw, REPLY, REPLY_MAX_BYTES, re=nonce)
    except Rejected as r:
        raise AuthError(f"reply from {host}:{port} rejected ({r.reason}): {r.detail}"
                        ) from None
    try:
        reply = decode_reply(body)
    except ValueError as exc:  # authenticated but not a reply we know: a peer's bug
        raise ControlError(f"malformed reply from {host}:{port}: {exc}"[:500]) from None
    if isinstance(reply, ErrorReply):
        raise ControlError(f"{host}:{port} refused: {reply.message}")
    return reply


def handshake(host: str, port: int, req: HandshakeRequest, timeout_s: float, *,
              key: bytes | None) -> HandshakeReply:
    """Exchange compatibility info for the peer's NIXL metadata and KV planes."""
    reply = request(host, port, req, timeout_s, key=key)
    if not isinstance(reply, HandshakeReply):
        raise ControlError(f"{host}:{port} answered a handshake with {reply.kind!r}")
    return reply

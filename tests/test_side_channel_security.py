"""The side channel authenticates every message: envelopes, replays, caps, forged replies,
a fuzzed server over real TCP, and ConnectorWorkers with wrong or missing keys."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter

import pytest
import zmq

from disagg.credentials import SECRET_ENV
from disagg.transfer.connector.metadata import DisaggMetadata, PeerAddress, RecvOrder
from disagg.transfer.connector.stats import COUNTERS
from disagg.transfer.control import channel
from disagg.transfer.control.channel import REPLY, REQUEST, Rejected, open_envelope, seal
from disagg.transfer.control.messages import (
    PROTOCOL_VERSION,
    AbortNotice,
    Compat,
    ErrorReply,
    HandshakeReply,
    HandshakeRequest,
    decode_message,
    decode_reply,
)
from tests.test_connector_worker import _step_until, _worker

KEY = b"k" * 32
OTHER = b"o" * 32
COMPAT = Compat(model="m", dtype="bfloat16", block_size=16, num_layers=2, plane_bytes=[64, 64])
HELLO = HandshakeRequest(engine_id="d", compat=COMPAT)
OK = HandshakeReply(engine_id="p", agent_name="a", agent_metadata=b"\x00meta", planes=[])


def _reason(fn) -> str:
    with pytest.raises(Rejected) as info:
        fn()
    return info.value.reason


# ---- the envelope -----------------------------------------------------------------------------
def test_envelope_round_trip_and_every_tamper_is_refused():
    body = HELLO.model_dump_json().encode()
    frames = seal(KEY, body, REQUEST)
    env, out = open_envelope(KEY, frames, REQUEST, 1 << 20)
    assert out == body and env.v == PROTOCOL_VERSION and len(env.nonce) == 32
    header = json.loads(frames[0])
    assert set(header) == {"v", "ts", "nonce", "mac"}

    def opened(frames, direction=REQUEST, key=KEY, re=None, max_body=1 << 20):
        return lambda: open_envelope(key, frames, direction, max_body, re=re)

    def with_header(**kw):
        return [json.dumps({**header, **kw}).encode(), body]

    assert _reason(opened(frames, key=OTHER)) == "bad_mac"
    assert _reason(opened([frames[0], body.replace(b'"d"', b'"e"')])) == "bad_mac"
    assert _reason(opened(with_header(ts=header["ts"] + 1))) == "bad_mac"
    assert _reason(opened(with_header(nonce="0" * 32))) == "bad_mac"
    assert _reason(opened(with_header(mac="0" * 64))) == "bad_mac"
    assert _reason(opened(frames, direction=REPLY)) == "bad_mac"  # a request is no reply
    assert _reason(opened(frames, re=b"\x01" * 16)) == "bad_mac"
    missing = {k: v for k, v in header.items() if k != "mac"}
    assert _reason(opened([json.dumps(missing).encode(), body])) == "malformed"
    assert _reason(opened(with_header(mac=header["mac"].upper()))) == "malformed"
    assert _reason(opened(with_header(v=PROTOCOL_VERSION + 1))) == "version"
    assert _reason(opened(with_header(v=1, extra="x"))) == "version"
    assert _reason(opened([body])) == "malformed"  # a bare (version 1) message
    assert _reason(opened([*frames, b""])) == "malformed"
    assert _reason(opened(frames, max_body=len(body) - 1)) == "too_large"
    assert _reason(opened([frames[0] + b" " * 2000, body])) == "too_large"
    assert _reason(opened([b"\x80\x04garbage", body])) == "malformed"
    assert _reason(opened([b"[" * 1000, body])) == "malformed"


def test_timestamps_outside_the_window_are_stale():
    now = int(time.time() * 1000)
    body = b"{}"
    for skew_s in (-31, 31, -3600):
        frames = seal(KEY, body, REQUEST, ts_ms=now + skew_s * 1000)
        assert _reason(lambda f=frames: open_envelope(KEY, f, REQUEST, 1 << 20)) == "stale"
    for skew_s in (-29, 29):
        open_envelope(KEY, seal(KEY, body, REQUEST, ts_ms=now + skew_s * 1000), REQUEST, 1 << 20)


def test_replay_cache_remembers_the_window_and_stays_bounded():
    cache = channel.ReplayCache(window_s=1, capacity=3)
    assert cache.add(b"a", 1000, 1000) and not cache.add(b"a", 1000, 1500)
    assert cache.add(b"b", 1001, 1500) and cache.add(b"c", 1002, 1500)
    assert cache.add(b"d", 1003, 1500)  # over capacity: forgets "a", refuses ts <= 1000
    assert len(cache) == 3 and cache.floor == 1000
    assert not cache.add(b"a", 1000, 1500)  # forgotten, yet still refused
    assert not cache.add(b"z", 999, 1500)
    assert cache.add(b"e", 2600, 2600)  # the rest left the window
    assert len(cache) == 1


def test_reply_kinds_decode_and_unknown_ones_do_not():
    assert decode_reply(OK.model_dump_json().encode()) == OK
    assert isinstance(decode_reply(b'{"kind":"error","message":"x"}'), ErrorReply)
    for raw in (b'{"kind":"handshake"}', b"[]", b'{"kind":[1]}', b"\xff", b"[" * 5000):
        with pytest.raises(ValueError):
            decode_reply(raw)
        with pytest.raises(ValueError):
            decode_message(raw)


# ---- a real server over TCP -------------------------------------------------------------------
class _Served:
    """A SideChannelServer that answers handshakes and echoes aborts, counting its calls."""

    def __init__(self, key: bytes | None = KEY, **kw):
        self.calls = 0
        self.reasons: list[str] = []
        self.server = channel.SideChannelServer("127.0.0.1", 0, self._handle, key=key,
                                                on_reject=self.reasons.append, **kw)
        self.port = self.server.port

    def _handle(self, raw: bytes):
        self.calls += 1
        msg = decode_message(raw)
        return msg if isinstance(msg, AbortNotice) else OK

    def handshake(self, key: bytes | None = KEY, timeout_s: float = 5) -> HandshakeReply:
        return channel.handshake("127.0.0.1", self.port, HELLO, timeout_s, key=key)

    def wait_rejected(self, total: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(self.server.rejected.values()) < total:
            assert time.monotonic() < deadline, (total, self.server.rejected)
            time.sleep(0.01)


@pytest.fixture
def served():
    s = _Served()
    yield s
    s.server.close()


def _req(port: int, frames: list[bytes], timeout_s: float = 2) -> list[bytes] | None:
    """Send raw frames from a REQ socket; the raw reply, or None when none came."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart(frames)
        return sock.recv_multipart()
    except zmq.Again:
        return None
    finally:
        sock.close(0)


def _error_of(reply: list[bytes] | None, nonce: bytes) -> str:
    """The message of an authenticated ErrorReply answering the request ``nonce``."""
    assert reply is not None
    _, body = open_envelope(KEY, reply, REPLY, 1 << 20, re=nonce)
    err = decode_reply(body)
    assert isinstance(err, ErrorReply)
    return err.message


def test_valid_requests_are_answered_with_authenticated_replies(served):
    assert served.handshake() == OK
    echo = channel.request("127.0.0.1", served.port, AbortNotice(request_ids=["r"]), 5, key=KEY)
    assert echo == AbortNotice(request_ids=["r"])
    assert served.calls == 2 and not served.server.rejected and served.server.served == 2


def test_replayed_and_stale_requests_are_refused(served):
    nonce = b"\x07" * 16
    frames = seal(KEY, HELLO.model_dump_json().encode(), REQUEST, nonce=nonce)
    first = _req(served.port, frames)
    assert first is not None
    assert decode_reply(open_envelope(KEY, first, REPLY, 1 << 20, re=nonce)[1]) == OK
    assert "rejected (replay)" in _error_of(_req(served.port, frames), nonce)
    old = seal(KEY, HELLO.model_dump_json().encode(), REQUEST, nonce=b"\x08" * 16,
               ts_ms=int(time.time() * 1000) - 60_000)
    assert "rejected (stale)" in _error_of(_req(served.port, old), b"\x08" * 16)
    assert served.calls == 1
    assert served.server.rejected == {"replay": 1, "stale": 1}
    assert served.reasons == ["replay", "stale"]


def test_a_peer_with_another_key_is_refused_both_ways(served):
    with pytest.raises(channel.AuthError, match="bad_mac"):
        served.handshake(key=OTHER)  # the server's error reply is not trusted either
    assert served.server.rejected == {"bad_mac": 1} and served.calls == 0
    with pytest.raises(channel.ControlError, match="no side-channel key"):
        served.handshake(key=None)
    assert served.handshake() == OK


def test_messages_without_an_envelope_are_dropped_and_counted(served):
    assert _req(served.port, [HELLO.model_dump_json().encode()], 0.5) is None  # version 1
    assert _req(served.port, [b"\x00" * 64, b"x", b"y"], 0.5) is None
    served.wait_rejected(2)
    assert served.server.rejected == {"malformed": 2} and served.calls == 0
    assert served.handshake() == OK


def test_oversized_messages_are_refused_before_parsing(served):
    big = b"{" + b" " * (channel.REQUEST_MAX_BYTES + 10) + b"}"
    nonce = b"\x09" * 16
    reply = _req(served.port, seal(KEY, big, REQUEST, nonce=nonce))
    assert "rejected (too_large)" in _error_of(reply, nonce)
    # Past the transport's cap (MAXMSGSIZE) ZMQ drops the peer before buffering the frame.
    huge = b"x" * (2 * channel.REQUEST_MAX_BYTES + 1)
    assert _req(served.port, seal(KEY, huge, REQUEST), 0.5) is None
    assert served.handshake() == OK
    assert served.server.rejected == {"too_large": 1} and served.calls == 1


def test_a_server_without_a_key_rejects_everything():
    s = _Served(key=None)
    try:
        with pytest.raises(channel.ControlError, match="no reply"):
            s.handshake(key=KEY, timeout_s=0.5)
        s.wait_rejected(1)
        assert s.server.rejected == {"no_key": 1} and s.calls == 0
    finally:
        s.server.close()


class _FakePeer:
    """A ROUTER that answers every request with whatever ``forge(request frames)`` makes."""

    def __init__(self, forge):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.forge, self.stop = forge, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if self.sock.poll(50):
                ident, _, header, body = self.sock.recv_multipart()
                self.sock.send_multipart([ident, b"", *self.forge(header, body)])
        self.sock.close(0)

    def close(self):
        self.stop.set()
        self.thread.join(2)


def _nonce(header: bytes) -> bytes:
    return bytes.fromhex(json.loads(header)["nonce"])


@pytest.mark.parametrize(("name", "forge"), [
    ("bare JSON", lambda h, b: [OK.model_dump_json().encode()]),
    ("no MAC", lambda h, b: [b'{"v":2,"ts":1,"nonce":"' + b"0" * 32 + b'"}',
                             OK.model_dump_json().encode()]),
    ("other key", lambda h, b: seal(OTHER, OK.model_dump_json().encode(), REPLY, _nonce(h))),
    ("another request's", lambda h, b: seal(KEY, OK.model_dump_json().encode(), REPLY,
                                            b"\x01" * 16)),
    ("a request", lambda h, b: seal(KEY, OK.model_dump_json().encode(), REQUEST)),
    ("stale", lambda h, b: seal(KEY, OK.model_dump_json().encode(), REPLY, _nonce(h),
                                ts_ms=int(time.time() * 1000) - 3_600_000)),
    ("tampered", lambda h, b: [seal(KEY, OK.model_dump_json().encode(), REPLY, _nonce(h))[0],
                               OK.model_copy(update={"agent_name": "evil"})
                               .model_dump_json().encode()]),
    ("oversized", lambda h, b: seal(KEY, b" " * (channel.REPLY_MAX_BYTES + 1), REPLY,
                                    _nonce(h))),
])
def test_forged_replies_are_errors_never_trusted(name, forge):
    peer = _FakePeer(forge)
    try:
        with pytest.raises(channel.AuthError):
            channel.handshake("127.0.0.1", peer.port, HELLO, 2, key=KEY)
    finally:
        peer.close()


def test_a_reply_past_the_transport_cap_never_arrives():
    peer = _FakePeer(lambda h, b: seal(KEY, b" " * (2 * channel.REPLY_MAX_BYTES + 1), REPLY,
                                       _nonce(h)))
    try:
        with pytest.raises(channel.ControlError, match="no reply"):
            channel.handshake("127.0.0.1", peer.port, HELLO, 1, key=KEY)
    finally:
        peer.close()


def test_an_authenticated_reply_of_the_wrong_kind_is_an_error():
    peer = _FakePeer(lambda h, b: seal(KEY, AbortNotice(request_ids=[]).model_dump_json()
                                       .encode(), REPLY, _nonce(h)))
    try:
        with pytest.raises(channel.ControlError, match="answered a handshake with 'abort'"):
            channel.handshake("127.0.0.1", peer.port, HELLO, 2, key=KEY)
    finally:
        peer.close()
    peer = _FakePeer(lambda h, b: seal(KEY, b'{"kind": "error", "message": "no"}', REPLY,
                                       _nonce(h)))
    try:
        with pytest.raises(channel.ControlError, match="refused: no"):
            channel.handshake("127.0.0.1", peer.port, HELLO, 2, key=KEY)
    finally:
        peer.close()


def _fuzz_message(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    """One bad message, as the frames a DEALER sends (the ROUTER adds the identity)."""
    def junk(n: int) -> bytes:
        return rng.randbytes(rng.randrange(n))

    def random_json() -> bytes:
        atoms = [None, True, 1, -1, 2**70, 1.5, "x", "kind", "handshake", "v", [], {}]
        value = {rng.choice(["kind", "v", "ts", "nonce", "mac", "x"]): rng.choice(atoms)
                 for _ in range(rng.randrange(6))}
        return json.dumps(rng.choice([value, list(value), rng.choice(atoms)])).encode()

    kind = rng.randrange(8)
    if kind == 0:  # random frames, any count
        return [junk(200) for _ in range(rng.randrange(1, 6))]
    if kind == 1:  # REQ-shaped, random JSON
        return [b"", random_json(), random_json()]
    if kind == 2:  # REQ-shaped, wrong frame count
        return [b"", *(random_json() for _ in range(rng.choice([0, 1, 3, 4])))]
    if kind == 3:  # a valid envelope, one byte flipped somewhere
        frames = [b"", *valid]
        i = rng.randrange(1, 3)
        f = bytearray(frames[i])
        f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(f)
        return frames
    if kind == 4:  # a well-formed header with a random MAC
        env = json.loads(valid[0])
        env["mac"] = rng.randbytes(32).hex()
        return [b"", json.dumps(env).encode(), junk(300)]
    if kind == 5:  # a valid envelope, truncated
        return [b"", valid[0][: rng.randrange(len(valid[0]))], valid[1]]
    if kind == 6:  # a big frame: over the cap, under the transport's
        return [b"", valid[0], b"x" * (channel.REQUEST_MAX_BYTES + rng.randrange(1, 1000))]
    return [b"", junk(2000), junk(2000)]  # random bytes in the right shape


def test_fuzzed_messages_never_kill_the_server(served):
    rng = random.Random(20240601)
    valid = seal(KEY, HELLO.model_dump_json().encode(), REQUEST)
    n = 3000
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{served.port}")
    replies = 0
    try:
        for i in range(n):
            dealer.send_multipart(_fuzz_message(rng, valid))
            while dealer.poll(0):  # drain the error replies as they come
                dealer.recv_multipart()
                replies += 1
            if i == n // 2:  # a valid peer is served in the middle of it
                assert served.handshake() == OK
        served.wait_rejected(n)
        while dealer.poll(200):
            dealer.recv_multipart()
            replies += 1
    finally:
        dealer.close(0)
    rejected = served.server.rejected
    assert sum(rejected.values()) == n, rejected
    assert set(rejected) <= set(channel.REJECT_REASONS)
    assert {"malformed", "bad_mac", "too_large"} <= set(rejected), rejected
    assert 0 < replies < n  # answered when a nonce was readable, else dropped
    assert served.calls == 1  # the handler saw only the valid handshake
    assert served.server._thread.is_alive()
    # ...and a valid authenticated handshake still succeeds afterwards.
    assert served.handshake() == OK
    assert served.calls == 2


# ---- ConnectorWorkers -----------------------------------------------------------------------
def test_every_reject_reason_is_a_counter():
    for reason in channel.REJECT_REASONS:
        assert f"side_channel_rejected_{reason}" in COUNTERS
    assert {"side_channel_rejected", "side_channel_reply_rejected"} <= set(COUNTERS)


def test_workers_of_different_deployments_cannot_pull_from_each_other():
    p, _ = _worker("pk", True, channel_key=OTHER)
    d, _ = _worker("dk", False, channel_key=KEY, handshake_timeout_s=2, transfer_timeout_s=5)
    try:
        p.start(DisaggMetadata(sends={"preq": 60.0}))
        order = RecvOrder("dreq", PeerAddress("pk", "127.0.0.1", p._server.port), "preq",
                          (5, 6), (0, 1))
        d.start(DisaggMetadata(recvs=[order]))
        _step_until([p, d], lambda r: "dreq" in r[d][1])
        assert d.load_errors() == {5, 6}
        ds = d.take_stats().data
        assert ds["kv_transfer_failures"] == 1 and ds["side_channel_reply_rejected"] >= 1
        assert ds["kv_handshakes"] == 0
        deadline = time.monotonic() + 5
        ps: Counter[str] = Counter()
        while ps["side_channel_rejected_bad_mac"] < 2:  # the handshake, then the abort notice
            assert time.monotonic() < deadline, ps
            if (taken := p.take_stats()) is not None:
                ps.update(taken.data)
            time.sleep(0.01)
        assert ps["side_channel_rejected"] == ps["side_channel_rejected_bad_mac"] == 2
    finally:
        d.close()
        p.close()


def test_a_worker_without_a_key_fails_closed_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with caplog.at_level(logging.ERROR, logger="disagg.transfer.connector.worker_half"):
        w, _ = _worker("nokey", True, channel_key=None)
    try:
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "deployment secret is missing" in errors[0].getMessage()
        assert SECRET_ENV in errors[0].getMessage()
        assert w.channel_key is None
        with pytest.raises(channel.ControlError, match="no reply"):
            channel.handshake("127.0.0.1", w._server.port, HELLO, 0.5, key=KEY)
        deadline = time.monotonic() + 5
        while w._server.rejected["no_key"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = w.take_stats().data
        assert stats["side_channel_rejected_no_key"] == stats["side_channel_rejected"] == 1
    finally:
        w.close()


def test_a_worker_takes_the_deployment_key_from_the_environment(monkeypatch):
    from disagg.credentials import channel_key, new_secret
    from disagg.transfer.connector.worker_half import ConnectorWorker
    from tests.test_connector_worker import connector_config

    secret = new_secret()
    monkeypatch.setenv(SECRET_ENV, secret)
    w = ConnectorWorker(connector_config(), "envkey", 0, COMPAT)
    assert w.channel_key == channel_key(secret)
    explicit = ConnectorWorker(connector_config(), "explicit", 0, COMPAT, channel_key=KEY)
    assert explicit.channel_key == KEY
    monkeypatch.setenv(SECRET_ENV, "not hex")
    assert ConnectorWorker(connector_config(), "bad", 0, COMPAT).channel_key is None

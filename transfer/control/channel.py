"""ZMQ control plane: a prefill worker's side channel and the decoder's client for it.

The server runs in a daemon thread and answers each request with exactly one reply; a
handler error becomes an ``ErrorReply`` rather than a dead thread. Every client wait has a
timeout: a peer that is gone costs at most ``timeout_s``, then ``ControlError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq

from disagg.transfer.control.messages import ErrorReply, HandshakeReply, HandshakeRequest, _Msg

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], _Msg]


class ControlError(RuntimeError):
    """A control-plane exchange failed: timeout, refused, or an error reply."""


class SideChannelServer:
    """ROUTER socket on ``tcp://host:port`` answering requests with ``handler``."""

    def __init__(self, host: str, port: int, handler: Handler, name: str = "side-channel"):
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self._handler = handler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            # Poll with a timeout so close() is noticed; idle cost is one wake-up per 100 ms.
            if not poller.poll(100):
                continue
            ident, _, raw = self._sock.recv_multipart()
            try:
                reply = self._handler(raw)
            except Exception as exc:  # the peer gets the reason; this thread lives on
                logger.warning("side channel request failed: %s", exc)
                reply = ErrorReply(message=str(exc))
            self._sock.send_multipart([ident, b"", reply.model_dump_json().encode()])
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def request(host: str, port: int, msg: _Msg, timeout_s: float) -> bytes:
    """Send one message and return the raw reply; ControlError on timeout or refusal."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(msg.model_dump_json().encode())
        raw = sock.recv()
    except zmq.Again:
        raise ControlError(f"no reply from {host}:{port} within {timeout_s}s") from None
    except zmq.ZMQError as exc:
        raise ControlError(f"side channel {host}:{port}: {exc}") from None
    finally:
        sock.close(0)
    if b'"kind":"error"' in raw:
        raise ControlError(f"{host}:{port} refused: {ErrorReply.model_validate_json(raw).message}")
    return raw


def handshake(host: str, port: int, req: HandshakeRequest, timeout_s: float) -> HandshakeReply:
    """Exchange compatibility info for the peer's NIXL metadata and KV planes."""
    return HandshakeReply.model_validate_json(request(host, port, req, timeout_s))

"""The gateway's HTTP/1.1 client to its engines: keep-alive connections per engine, requests
written in one call, answers parsed by httptools (llhttp, in C) straight from the socket.

    client = EngineClient(read_timeout_s=600, headers={"Authorization": "Bearer ..."})
    resp = await client.post("http://127.0.0.1:8001/v1/completions", body, request_id)
    resp.status, resp.headers["content-type"]
    await resp.read()                  # the whole body (then the connection is reused)
    async for chunk in resp.chunks():  # or the body as it arrives (de-chunked)
    resp.close()                       # before its end: closes the connection, and the
                                       # engine aborts the request; after it: a no-op

aiohttp did the same job for about four times the CPU (profiled in the gateway: ~100 us per
request warm, ~600 us when each request finds the caches cold, against ~15 and ~160 us
here), a third of the gateway's own cost per request. What this client needs, and all it
does: POST a JSON body, read a response with a Content-Length, chunked, or until the
connection closes; no redirects, cookies, proxies, TLS or decompression (bodies pass
through as sent; it never asks for an encoding).

Every wait is bounded: connecting by ``connect_timeout_s`` (ConnectError), and no byte of
the answer for ``read_timeout_s`` while one is awaited (ReadTimeout). An engine closes an
idle keep-alive connection after a few seconds (vLLM: 5 s); the pool drops connections idle
for ``keepalive_s`` (less than that) and retries a request once on a new connection when a
reused one closes before any byte of the answer (the engine closed it as the request went
out: it never saw the request). Requests to one engine beyond ``limit_per_host`` open
connections wait for one to come free. Everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import httptools

HIGH_WATER = 256 << 10  # a stream's unread bytes before the socket stops being read
LOW_WATER = 64 << 10


class EngineError(Exception):
    """The request to an engine failed in transport (connect, timeout, broken answer)."""


class ConnectError(EngineError):
    """No connection to the engine (refused, unreachable, or not within the connect timeout):
    it is not serving there."""


class ReadTimeout(EngineError):
    """No byte of the answer for the read timeout."""


class Disconnected(EngineError):
    """The connection closed (or the answer was malformed) before the answer ended."""


class _Target:
    """An engine's address: where to connect and what goes in the request head."""

    __slots__ = ("host", "port", "head", "idle", "open", "waiters")

    def __init__(self, host: str, port: int, head: bytes):
        self.host, self.port, self.head = host, port, head
        self.idle: collections.deque[_Connection] = collections.deque()
        self.open = 0  # connections open or being opened
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()


class EngineResponse:
    """One answer, read from its connection as it arrives."""

    __slots__ = ("status", "headers", "_conn", "_buf", "_size", "_done", "_error",
                 "_waiter", "_paused", "_got", "_eof_ends", "_released")

    def __init__(self, conn: _Connection):
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._buf: list[bytes] = []
        self._size = 0
        self._done = False  # the whole body arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._got = False  # any byte of the answer arrived
        self._eof_ends = False  # no Content-Length, not chunked: the body ends at EOF
        self._released = False

    # ---- reading -------------------------------------------------------------------------
    async def read(self) -> bytes:
        """The whole body (the connection then goes back to the pool)."""
        while not self._done:
            await self._wait()
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        self._release()
        return data

    async def readany(self) -> bytes:
        """What arrived of the body since the last read (waits for something); b"" at its
        end (the connection then goes back to the pool)."""
        while not self._buf and not self._done:
            await self._wait()
        if not self._buf:
            self._release()
            return b""
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in the pieces the socket delivers."""
        while data := await self.readany():
            yield data

    def close(self) -> None:
        """Before the answer's end: close the connection (the engine aborts the request).
        After it: nothing (the connection is back in the pool). Idempotent."""
        if self._done and self._error is None:
            self._release()
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    # ---- fed by the connection -----------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        conn = self._conn
        if conn is not None:
            conn.watch_reads()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _body(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()

    def _release(self) -> None:
        """The answer was read to its end: its connection serves the next request."""
        if self._released:
            return
        self._released = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, client: EngineClient, target: _Target):
        self._client, self.target = client, target
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.resp: EngineResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._last_data = 0.0  # loop time of the last bytes received
        self._timer: asyncio.TimerHandle | None = None
        self._reuse = True  # the current answer allows another request after it
        self._chunked = False
        self._has_length = False
        self.counted = True  # in its target's open connections (until it closes)
        client._conns.add(self)

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # nothing asked for: an engine never sends unprompted
            self.abort()
            return
        resp._got = True
        self._last_data = self._client.loop.time()
        try:
            self._parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001  # httptools.HttpParserError & co.
            resp._fail(Disconnected(f"malformed answer from {self._name()}: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self._client._closed(self)
        resp = self.resp
        if resp is not None and not resp._done:
            if resp._eof_ends and exc is None and resp.status:
                resp._done = True  # a body delimited by the end of the connection
                self._reuse = False
                resp._wake()
            else:
                why = f": {exc}" if exc else ""
                resp._fail(Disconnected(f"{self._name()} closed the connection before the "
                                        f"answer ended{why}"))

    # ---- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._chunked = self._has_length = False

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is None or resp.status:  # trailers (or a stray message): not kept
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        resp.headers[key] = text
        if key == "transfer-encoding" and "chunked" in text.lower():
            self._chunked = True
        elif key == "content-length":
            self._has_length = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue & co.: the real answer follows
            resp.headers.clear()
            return
        resp.status = status
        self._reuse = self._parser.should_keep_alive()
        resp._eof_ends = not (self._chunked or self._has_length or status in (204, 304))
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None and resp.status:
            resp._body(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not resp.status:
            return
        self._cancel_timer()
        resp._done = True
        resp._wake()

    # ---- used by EngineResponse / EngineClient -------------------------------------------
    def send(self, resp: EngineResponse, head: bytes, body: bytes) -> None:
        self.resp = resp
        self._last_data = self._client.loop.time()
        assert self._transport is not None
        self._transport.writelines((head, body))

    def watch_reads(self) -> None:
        """A reader waits: bound the wait by the read timeout (one timer per request,
        moved on while bytes keep coming)."""
        if self._timer is None and not self.closed:
            self._timer = self._client.loop.call_at(
                self._last_data + self._client.read_timeout_s, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        resp = self.resp
        if resp is None or resp._done or self.closed:
            return
        loop = self._client.loop
        due = self._last_data + self._client.read_timeout_s
        if resp._paused or due > loop.time():  # the reader is behind, or bytes came since
            if resp._paused:
                self._last_data = loop.time()
                due = self._last_data + self._client.read_timeout_s
            self._timer = loop.call_at(due, self._check_timeout)
            return
        resp._fail(ReadTimeout(f"no answer from {self._name()} within "
                               f"{self._client.read_timeout_s:g} s"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def finished(self, resp: EngineResponse) -> None:
        """``resp`` was read to its end: back to the pool, or closed if it cannot serve
        another request."""
        if self.resp is not resp:
            return
        self.resp = None
        self._cancel_timer()
        if self.closed or not self._reuse:
            self.abort()
            return
        if resp._paused:
            self.resume()
        self._client._idle(self)

    def closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def pause(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def abort(self) -> None:
        """Close now (pending writes dropped); connection_lost follows."""
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
        self._client._closed(self)

    def _name(self) -> str:
        return f"{self.target.host}:{self.target.port}"


class EngineClient:
    """Keep-alive HTTP/1.1 connections to engines, and requests over them (module
    docstring). Create and use it on one running event loop."""

    def __init__(self, read_timeout_s: float, headers: dict[str, str] | None = None,
                 connect_timeout_s: float = 5.0, limit_per_host: int = 256,
                 keepalive_s: float = 4.0):
        self.read_timeout_s, self.connect_timeout_s = read_timeout_s, connect_timeout_s
        self.limit_per_host, self.keepalive_s = limit_per_host, keepalive_s
        self.loop = asyncio.get_running_loop()
        self._extra = b"".join(f"{k}: {v}\r\n".encode("latin-1")
                               for k, v in (headers or {}).items())
        self._targets: dict[str, tuple[_Target, bytes]] = {}  # URL -> target, request line
        self._hosts: dict[tuple[str, int], _Target] = {}
        self._conns: set[_Connection] = set()
        self._closing = False

    async def post(self, url: str, body: bytes, request_id: str) -> EngineResponse:
        """POST ``body`` (JSON) to ``url`` (``http://host:port/path``); the response once
        its status and headers arrived. A transport fault raises EngineError; cancelling
        the call closes the connection (the engine aborts the request)."""
        target, line = self._target(url)
        head = b"".join((line, target.head, self._extra,
                         b"Content-Type: application/json\r\nContent-Length: ",
                         str(len(body)).encode(), b"\r\nX-Request-Id: ",
                         request_id.encode("latin-1"), b"\r\n\r\n"))
        for attempt in (0, 1):
            conn, reused = await self._acquire(target)
            resp = EngineResponse(conn)
            try:
                conn.send(resp, head, body)
                while not resp.status:
                    await resp._wait()
                return resp
            except Disconnected:
                resp.close()
                if reused and not resp._got and attempt == 0:
                    continue  # a stale keep-alive connection: the engine never saw it
                raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closing = True
        for conn in list(self._conns):
            conn.abort()
        for target in self._hosts.values():
            target.idle.clear()
            for w in target.waiters:
                if not w.done():
                    w.set_exception(EngineError("the client was closed"))
            target.waiters.clear()

    # ---- connections ---------------------------------------------------------------------
    def _target(self, url: str) -> tuple[_Target, bytes]:
        """``url``'s engine and request line (cached per URL)."""
        hit = self._targets.get(url)
        if hit is not None:
            return hit
        scheme, _, rest = url.partition("://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        if scheme != "http" or not host or not port.isdigit():
            raise ValueError(f"engine URL {url!r}: expected http://host:port/path")
        key = (host.strip("[]"), int(port))
        target = self._hosts.get(key)
        if target is None:
            target = self._hosts[key] = _Target(*key, f"Host: {hostport}\r\n".encode("latin-1"))
        hit = (target, f"POST /{path} HTTP/1.1\r\n".encode("latin-1"))
        if len(self._targets) < 4096:  # URLs are engines x paths: a handful
            self._targets[url] = hit
        return hit

    async def _acquire(self, target: _Target) -> tuple[_Connection, bool]:
        """A connection to ``target``: an idle one (reused), or a new one."""
        if self._closing:
            raise EngineError("the client was closed")
        now = self.loop.time()
        while target.idle:
            conn = target.idle.pop()  # the most recently used
            if conn.closed or conn.closing():
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn.abort()  # the engine may be closing it already
                continue
            return conn, True
        while target.open >= self.limit_per_host:
            waiter = self.loop.create_future()
            target.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in target.waiters:
                    target.waiters.remove(waiter)
            while target.idle:
                conn = target.idle.pop()
                if not conn.closed and not conn.closing():
                    return conn, True
        target.open += 1
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(self, target))
            return made[-1]
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(protocol, target.host,
                                                            target.port)
        except BaseException as exc:
            if made:
                made[-1].abort()  # gives its place back
            else:
                self._gone(target)
            where = f"cannot connect to {target.host}:{target.port}"
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"{where}: no connection within "
                                   f"{self.connect_timeout_s:g} s") from None
            if isinstance(exc, OSError):
                raise ConnectError(f"{where}: {exc.strerror or exc}") from None
            raise
        return conn, False

    def _idle(self, conn: _Connection) -> None:
        if self._closing:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        conn.target.idle.append(conn)
        self._wake_one(conn.target)

    def _closed(self, conn: _Connection) -> None:
        """``conn`` closed: its place among its target's connections is free."""
        if conn.counted:
            conn.counted = False
            self._conns.discard(conn)
            self._gone(conn.target)

    def _gone(self, target: _Target) -> None:
        target.open -= 1
        self._wake_one(target)

    @staticmethod
    def _wake_one(target: _Target) -> None:
        while target.waiters:
            w = target.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


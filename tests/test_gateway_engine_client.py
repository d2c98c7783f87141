"""The gateway's HTTP/1.1 client to its engines (disagg.engine_client) against raw asyncio
servers that answer as scripted: bodies by length, chunked and until close; keep-alive reuse
and its stale-connection retry; connect, read and malformed-answer faults; closing an answer
early; the per-engine connection limit; flow control. And ``disagg.aio.unless``, which every
request's path nests twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from disagg.aio import Stopped, unless
from disagg.engine_client import (
    ConnectError,
    Disconnected,
    EngineClient,
    ReadTimeout,
)
from disagg.instance import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A raw HTTP server on 127.0.0.1; ``handler`` answers each connection."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.closed = asyncio.Event()  # a connection ended from the client's side
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed.set()
            return None
        lower = head.lower()
        at = lower.find(b"content-length:")
        length = int(lower[at + 15:lower.find(b"\r\n", at)]) if at >= 0 else 0
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body


def whole(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def chunked_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server) -> None:
    """Answers every request on the connection with its own body."""
    while (req := await s.read_request(reader)) is not None:
        writer.write(whole(req[1]))
        await writer.drain()


def run(coro: Awaitable[Any], loop: str = "asyncio") -> Any:
    if loop == "uvloop":
        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


LOOPS = ["asyncio", "uvloop"]


# ---- answers -----------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_a_whole_answer_and_the_connection_reused(loop):
    async def main() -> None:
        async with Server(echo) as s:
            client = EngineClient(read_timeout_s=5, headers={"Authorization": "Bearer tok"})
            for i in range(3):
                body = b'{"n": %d}' % i
                resp = await client.post(s.url + "/v1/completions", body, f"rid-{i}")
                assert resp.status == 200
                assert resp.headers["content-type"] == "application/json"
                assert await resp.read() == body
            assert s.connections == 1  # kept alive
            head, _ = s.requests[0]
            assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
            host = s.url.split("://")[1].encode()
            for line in (b"Host: " + host, b"Authorization: Bearer tok",
                         b"Content-Type: application/json", b"Content-Length: 8",
                         b"X-Request-Id: rid-0"):
                assert line in head.split(b"\r\n"), head
            await client.close()
    run(main(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_chunked_stream_arrives_de_chunked_as_it_comes(loop):
    pieces = [b"data: {\"a\": 1}\n\n", b"data: {\"b\": 2}\n\n", b"data: [DONE]\n\n"]

    async def main() -> None:
        gates = [asyncio.Event() for _ in pieces]

        async def handler(reader, writer, s):
            while await s.read_request(reader) is not None:
                writer.write(chunked_head())
                for piece, gate in zip(pieces, gates, strict=True):
                    await gate.wait()
                    writer.write(chunk(piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()

        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            resp = await client.post(s.url + "/v1/completions", b"{}", "rid")
            assert resp.status == 200 and resp.headers["transfer-encoding"] == "chunked"
            got = []
            it = resp.chunks()
            for piece, gate in zip(pieces, gates, strict=True):
                gate.set()
                got.append(await anext(it))  # each piece once it was sent, not at the end
                assert got[-1] == piece
            with pytest.raises(StopAsyncIteration):
                await anext(it)
            for gate in gates:
                gate.clear()
            resp = await client.post(s.url + "/v1/completions", b"{}", "rid2")
            for gate in gates:
                gate.set()
            assert b"".join([c async for c in resp.chunks()]) == b"".join(pieces)
            assert s.connections == 1
            await client.close()
    run(main(), loop)


def test_a_body_that_ends_with_the_connection_is_read_whole():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                     b"until the end")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            for _ in range(2):
                resp = await client.post(s.url + "/x", b"{}", "rid")
                assert await resp.read() == b"until the end"
            assert s.connections == 2  # not reused after a close-delimited answer
            await client.close()
    run(main())


def test_an_error_status_is_an_answer_not_a_fault():
    async def handler(reader, writer, s):
        while await s.read_request(reader) is not None:
            writer.write(whole(b'{"error": "bad"}', status=400))

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            resp = await client.post(s.url + "/x", b"{}", "rid")
            assert resp.status == 400 and await resp.read() == b'{"error": "bad"}'
            await client.close()
    run(main())


# ---- faults ------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_listening_is_a_connect_error(loop):
    async def main() -> None:
        client = EngineClient(read_timeout_s=5)
        with pytest.raises(ConnectError, match="cannot connect"):
            await client.post(f"http://127.0.0.1:{free_port()}/x", b"{}", "rid")
        await client.close()
    run(main(), loop)


def test_no_answer_within_the_read_timeout():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        await asyncio.sleep(30)

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=0.3)
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ReadTimeout):
                await client.post(s.url + "/x", b"{}", "rid")
            assert asyncio.get_running_loop().time() - t0 < 5
            await client.close()
    run(main())


def test_a_stream_that_stops_sending_times_out_but_a_slow_one_does_not():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(chunked_head())
        for _ in range(5):  # every 0.15 s: slower in total than the timeout, never idle
            writer.write(chunk(b"x"))
            await writer.drain()
            await asyncio.sleep(0.15)
        await asyncio.sleep(30)  # then silence

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=0.4)
            resp = await client.post(s.url + "/x", b"{}", "rid")
            got = b""
            with pytest.raises(ReadTimeout):
                async for c in resp.chunks():
                    got += c
            assert got == b"x" * 5
            await client.close()
    run(main())


def test_a_connection_cut_mid_answer_is_a_fault_and_not_retried():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            resp = await client.post(s.url + "/x", b"{}", "rid")
            with pytest.raises(Disconnected):
                await resp.read()
            assert len(s.requests) == 1
            await client.close()
    run(main())


def test_a_malformed_answer_is_a_fault():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            with pytest.raises(Disconnected, match="malformed"):
                await client.post(s.url + "/x", b"{}", "rid")
            await client.close()
    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one(loop):
    async def handler(reader, writer, s):
        # Answers the first request of a connection; a second one finds it closed, as when
        # the engine's keep-alive timeout closes it just as the request goes out.
        req = await s.read_request(reader)
        if req is not None:
            writer.write(whole(req[1]))
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            for i in range(3):
                resp = await client.post(s.url + "/x", b"%d" % i, "rid")
                assert await resp.read() == b"%d" % i
            assert s.connections == 3
            await client.close()
    run(main(), loop)


def test_connections_idle_past_keepalive_are_not_reused():
    async def main() -> None:
        async with Server(echo) as s:
            client = EngineClient(read_timeout_s=5, keepalive_s=0.1)
            for _ in range(2):
                resp = await client.post(s.url + "/x", b"{}", "rid")
                await resp.read()
                await asyncio.sleep(0.3)
            assert s.connections == 2
            await client.close()
    run(main())


# ---- closing and limits ------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_closing_an_answer_before_its_end_closes_the_connection(loop):
    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(chunked_head() + chunk(b"first"))
        await writer.drain()
        if await reader.read(1) == b"":  # the client closed
            s.closed.set()

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            resp = await client.post(s.url + "/x", b"{}", "rid")
            assert await resp.readany() == b"first"
            resp.close()
            resp.close()  # idempotent
            await asyncio.wait_for(s.closed.wait(), 5)
            await client.close()
    run(main(), loop)


def test_cancelling_a_request_closes_its_connection():
    async def handler(reader, writer, s):
        await s.read_request(reader)
        if await reader.read(1) == b"":
            s.closed.set()

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            task = asyncio.create_task(client.post(s.url + "/x", b"{}", "rid"))
            while not s.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(s.closed.wait(), 5)
            await client.close()
    run(main())


def test_requests_beyond_the_connection_limit_wait_for_a_free_one():
    async def main() -> None:
        release = asyncio.Event()

        async def handler(reader, writer, s):
            while (req := await s.read_request(reader)) is not None:
                await release.wait()
                writer.write(whole(req[1]))
                await writer.drain()

        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5, limit_per_host=2)

            async def one(i: int) -> bytes:
                resp = await client.post(s.url + "/x", b"%d" % i, "rid")
                return await resp.read()
            tasks = [asyncio.create_task(one(i)) for i in range(6)]
            await asyncio.sleep(0.2)
            assert s.open == 2 and len(s.requests) == 2
            release.set()
            assert await asyncio.gather(*tasks) == [b"%d" % i for i in range(6)]
            assert s.peak == 2
            await client.close()
    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_large_stream_read_slowly_arrives_intact(loop):
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def handler(reader, writer, s):
        await s.read_request(reader)
        writer.write(chunked_head())
        for i in range(0, len(payload), 65536):
            writer.write(chunk(payload[i:i + 65536]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await s.read_request(reader)  # the connection is reused afterwards
        writer.write(whole(b"again"))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as s:
            client = EngineClient(read_timeout_s=5)
            resp = await client.post(s.url + "/x", b"{}", "rid")
            got = bytearray()
            async for c in resp.chunks():
                got += c
                await asyncio.sleep(0.001)
            assert bytes(got) == payload
            resp = await client.post(s.url + "/x", b"{}", "rid")
            assert await resp.read() == b"again"
            assert s.connections == 1
            await client.close()
    run(main(), loop)


def test_only_http_urls_with_a_port():
    async def main() -> None:
        client = EngineClient(read_timeout_s=5)
        for url in ("https://127.0.0.1:1/x", "http://127.0.0.1/x", "127.0.0.1:1/x"):
            with pytest.raises(ValueError, match="http://host:port"):
                await client.post(url, b"{}", "rid")
        await client.close()
    run(main())


# ---- unless ------------------------------------------------------------------------------
def test_unless_returns_the_works_result_and_cancels_the_stop():
    async def main() -> None:
        stop = asyncio.get_running_loop().create_future()

        async def work() -> int:
            await asyncio.sleep(0.01)
            return 7
        assert await unless(work(), stop) == 7
        await asyncio.sleep(0)
        assert stop.cancelled()
    run(main())


@pytest.mark.parametrize("swallow", [False, True])
def test_unless_stops_and_cancels_the_work(swallow):
    async def main() -> None:
        cleaned = []

        async def work() -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cleaned.append(True)
                if not swallow:
                    raise
            return "swallowed"

        async def stop() -> None:
            await asyncio.sleep(0.01)
        with pytest.raises(Stopped):
            await unless(work(), stop())
        assert cleaned == [True]
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        await asyncio.sleep(0.05)  # and the task is not cancelled later
    run(main())


def test_unless_lets_the_callers_own_cancellation_through():
    async def main() -> None:
        cancelled = []

        async def work() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async def caller() -> None:
            await unless(work(), asyncio.sleep(30))
        task = asyncio.create_task(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancelled == [True]
    run(main())


def test_unless_nests_and_keeps_timeouts_working():
    async def main() -> None:
        # inner stop first: the inner call raises Stopped, the outer one passes it on
        async def inner_stops() -> None:
            await unless(asyncio.sleep(30), asyncio.sleep(0.01))
        with pytest.raises(Stopped):
            await unless(inner_stops(), asyncio.sleep(30))
        # outer stop first, through an inner unless
        async def inner_waits() -> None:
            await unless(asyncio.sleep(30), asyncio.sleep(30))
        with pytest.raises(Stopped):
            await unless(inner_waits(), asyncio.sleep(0.01))
        # a deadline around both still reads as a timeout
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await unless(inner_waits(), asyncio.sleep(30))
        # a deadline inside, as the gateway's: TimeoutError, not Stopped
        async def deadline() -> None:
            async with asyncio.timeout(0.02):
                await unless(asyncio.sleep(30), asyncio.sleep(30))
        with pytest.raises(TimeoutError):
            await unless(deadline(), asyncio.sleep(30))
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    run(main())


def test_a_stop_that_ends_with_the_work_never_cancels_the_caller_afterwards():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(50):
            stop = loop.create_future()
            done = loop.create_future()

            async def work(done: asyncio.Future[None] = done) -> str:
                await done
                return "ok"
            loop.call_soon(done.set_result, None)
            loop.call_soon(stop.set_result, None)  # both in the same loop turn
            try:
                result = await unless(work(), stop)
            except Stopped:
                result = "stopped"
            assert result in ("ok", "stopped")
            await asyncio.sleep(0)  # a stray cancellation would land here
            await asyncio.sleep(0)
    run(main())

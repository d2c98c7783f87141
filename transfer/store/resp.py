"""Reading a Redis transaction of GETs straight into caller buffers (the Redis tier's loads).

redis-py hands every reply over as a fresh ``bytes``: for a load of megabytes of KV that is
an allocation per value, and fresh memory costs a page fault per 4 KiB, which on a VM costs
more than the read itself (the first load in a fresh engine measured half again slower than
the next one). Here the values go from the socket into the loader's staging buffers, which
are allocated and touched once.

Only what the tier's load sends is read: ``MULTI``, one ``GET`` per value key, one ``HMGET``
of the checksums, ``EXEC``; in RESP2 or RESP3. Everything else still goes through
redis-py, which also owns the connection (pool, auth, TLS, timeouts): we borrow one, write
the packed commands with its own packer, read the replies from its socket, and drop the
connection on any error, since its stream position is then unknown.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import redis

_LINE_MAX = 1 << 16  # a status, error or header line; values never go through the buffer


class _Reader:
    """Buffered reads of RESP replies from a socket; bulk values go around the buffer."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray(_LINE_MAX)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._crlf = bytearray(2)  # where each bulk value's CRLF lands
        self._crlf_view = memoryview(self._crlf)

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = self._sock.recv_into(view)
        except TimeoutError as e:  # socket.timeout: the connection's socket_timeout
            raise redis.exceptions.TimeoutError(f"reading from Redis: {e}") from e
        except OSError as e:
            raise redis.exceptions.ConnectionError(f"reading from Redis: {e}") from e
        if n == 0:
            raise redis.exceptions.ConnectionError("Redis closed the connection")
        return n

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while (i := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            if self._start:  # move what is left to the front
                left = self._end - self._start
                self._view[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            if self._end == len(self._buf):
                raise redis.exceptions.InvalidResponse("Redis reply line over 64 KiB")
            self._end += self._recv_into(self._view[self._end:])
        out = bytes(self._view[self._start:i])
        self._start = i + 2
        return out

    def readinto(self, out: memoryview) -> None:
        """Exactly ``out.nbytes`` bytes into ``out``: what is buffered, then the socket."""
        n = min(out.nbytes, self._end - self._start)
        out[:n] = self._view[self._start:self._start + n]
        self._start += n
        while n < out.nbytes:
            n += self._recv_into(out[n:])

    def skip(self, count: int) -> None:
        scratch = memoryview(bytearray(min(count, 1 << 20) or 1))
        while count:
            part = scratch[:min(count, scratch.nbytes)]
            self.readinto(part)
            count -= part.nbytes

    def header(self, kinds: bytes) -> bytes:
        """A reply's first line, whose type byte must be one of ``kinds``; a Redis error
        (``-``) raises ResponseError."""
        head = self.line()
        if head[:1] == b"-":
            raise redis.exceptions.ResponseError(head[1:].decode("utf-8", "replace"))
        if not head or head[:1] not in kinds:
            raise redis.exceptions.InvalidResponse(f"unexpected Redis reply {head[:40]!r}")
        return head

    def bulk_into(self, out: memoryview | None) -> int | None:
        """A bulk string: None for nil, else its length; read into ``out`` when it is
        exactly that long, skipped otherwise."""
        head = self.header(b"$_")
        if head in (b"$-1", b"_"):
            return None
        size = int(head[1:])
        if out is not None and out.nbytes == size:
            self.readinto(out)
        else:
            self.skip(size)
        self._value_end()
        return size

    def bulk(self) -> bytes | None:
        """A short bulk string (a checksum), or None for nil."""
        head = self.header(b"$_")
        if head in (b"$-1", b"_"):
            return None
        data = bytearray(int(head[1:]))
        self.readinto(memoryview(data))
        self._value_end()
        return bytes(data)

    def _value_end(self) -> None:
        """The CRLF after a bulk value: anything else means its length was wrong, or the
        stream is out of step, and the value was read from the wrong place."""
        self.readinto(self._crlf_view)
        if self._crlf != b"\r\n":
            raise redis.exceptions.InvalidResponse("Redis bulk value not ended by CRLF")

    def array(self) -> int:
        head = self.header(b"*")
        if head == b"*-1":  # EXEC of a transaction that was aborted
            raise redis.exceptions.ResponseError("Redis aborted the transaction")
        return int(head[1:])


def get_into(client: redis.Redis, value_keys: Sequence[str], sums_key: str,
             fields: Sequence[str], out: Sequence[memoryview],
             ) -> tuple[list[int | None], list[bytes | None]]:
    """In one transaction: GET each of ``value_keys`` into ``out[i]`` and HMGET ``fields``
    of hash ``sums_key``. Returns (each value's length, None when absent; a value whose
    length differs from ``out[i]`` is not read), and the hash fields. Raises redis-py's
    exceptions; the connection is dropped on any error."""
    commands = [("MULTI",), *(("GET", k) for k in value_keys), ("HMGET", sums_key, *fields),
                ("EXEC",)]
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        sock = conn._sock  # noqa: SLF001  # redis-py has no API for reading into a buffer
        if sock is None:
            raise redis.exceptions.ConnectionError("Redis connection lost")
        reader = _Reader(sock)
        for _ in range(len(commands) - 1):  # +OK for MULTI, +QUEUED for each command
            reader.header(b"+")
        if reader.array() != len(value_keys) + 1:
            raise redis.exceptions.InvalidResponse("Redis answered a different transaction")
        sizes = [reader.bulk_into(buf) for buf in out]
        sums = [reader.bulk() for _ in range(reader.array())]
    except BaseException:
        conn.disconnect()  # where the stream stands is unknown: never reuse it
        raise
    finally:
        pool.release(conn)
    if len(sums) != len(fields):
        raise redis.exceptions.InvalidResponse("Redis answered a different HMGET")
    return sizes, sums

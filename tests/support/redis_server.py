"""A throwaway local ``redis-server`` for tests and single-host experiments.

``local_redis()`` starts one on 127.0.0.1 in a temporary directory with persistence off
(``--save "" --appendonly no``), waits until it answers PING and yields its URL; on exit it
stops the server and removes the directory. Needs ``redis-server`` on PATH (scripts/setup.sh
installs Debian's package).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

START_TIMEOUT_S = 15.0


@contextlib.contextmanager
def local_redis(port: int | None = None, maxmemory_bytes: int | None = None,
                executable: str = "redis-server") -> Iterator[str]:
    """Run a private redis-server while the block runs; yields ``redis://127.0.0.1:<port>/0``.

    ``port`` None picks a free port (retried if another process takes it first).
    ``maxmemory_bytes`` sets Redis's memory limit with ``noeviction``: Redis then refuses
    writes instead of dropping keys behind the store's accounting. Raises FileNotFoundError
    when ``executable`` is not found, RuntimeError when the server does not come up within
    ``START_TIMEOUT_S``.
    """
    binary = shutil.which(executable)
    if binary is None:
        raise FileNotFoundError(f"{executable} not on PATH (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="disagg-redis-") as tmp:
        for attempt in range(3):
            chosen = port if port is not None else _free_port()
            proc = _start(binary, chosen, maxmemory_bytes, Path(tmp))
            try:
                _wait_ready(proc, chosen, Path(tmp) / "redis.log")
                break
            except _PortTaken:
                _stop(proc)
                if port is not None or attempt == 2:
                    raise RuntimeError(f"port {chosen} is taken") from None
            except BaseException:
                _stop(proc)
                raise
        try:
            yield f"redis://127.0.0.1:{chosen}/0"
        finally:
            _stop(proc)


class _PortTaken(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(binary: str, port: int, maxmemory: int | None, tmp: Path) -> subprocess.Popen:
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(tmp / "redis.log")]
    if maxmemory is not None:
        args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction"]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Return once our server answers PING; raise _PortTaken, or RuntimeError with the log's
    tail. The PID check guards against another server that already held the port."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                         socket_connect_timeout=1.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = _tail(log)
                if "Address already in use" in tail:
                    raise _PortTaken
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(redis.exceptions.RedisError):
                if client.ping() and client.info("server")["process_id"] == proc.pid:
                    return
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError(f"redis-server on port {port} did not answer PING within "
                       f"{START_TIMEOUT_S}s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

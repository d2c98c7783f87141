"""A throwaway local ``redis-server`` for tests and single-host experiments.

``local_redis()`` starts one on 127.0.0.1 in a temporary directory with persistence off
(``save ""``, ``appendonly no``), waits until it answers PING and yields its URL; on exit it
stops the server and removes the directory. ``redis_server()`` yields the ``RedisServer``
itself, which can also be stopped and started again on the same port (an outage).

Options, combinable:

    password="pw"                  requirepass: redis://:pw@127.0.0.1:<port>/0
    user="alice", password="pw"    an ACL user (the default user off): redis://alice:pw@...
    tls=True                       TLS only (``port 0``, ``tls-port``): a CA and a server
                                   certificate for 127.0.0.1/localhost made with ``openssl``
                                   in the temporary directory; the URL is
                                   rediss://...?ssl_ca_certs=<dir>/ca.crt
    tls_client_auth=True           also require a client certificate (mutual TLS): the URL
                                   adds ssl_certfile and ssl_keyfile
    host="10.87.0.11", wrap=h.argv binds that address, started through ``wrap`` (e.g. in a
                                   simulated host's namespace: tests/support/hosts.py)

Settings go to a ``redis.conf`` (mode 0600) in the directory, not to argv, so a password is
not visible in ``ps``. Needs ``redis-server`` on PATH (scripts/setup.sh installs Debian's
package, built with TLS) and, for TLS, ``openssl``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

START_TIMEOUT_S = 15.0


@contextlib.contextmanager
def local_redis(port: int | None = None, maxmemory_bytes: int | None = None,
                executable: str = "redis-server", *, password: str | None = None,
                user: str | None = None, tls: bool = False,
                tls_client_auth: bool = False) -> Iterator[str]:
    """Run a private redis-server while the block runs; yields its URL (see the module
    docstring for what the options add to it).

    ``port`` None picks a free port (retried if another process takes it first).
    ``maxmemory_bytes`` sets Redis's memory limit with ``noeviction``: Redis then refuses
    writes instead of dropping keys behind the store's accounting. Raises FileNotFoundError
    when ``executable`` (or, for TLS, ``openssl``) is not found, RuntimeError when the server
    does not come up within ``START_TIMEOUT_S``.
    """
    with redis_server(port, maxmemory_bytes, executable, password=password, user=user,
                      tls=tls, tls_client_auth=tls_client_auth) as server:
        yield server.url


@contextlib.contextmanager
def redis_server(port: int | None = None, maxmemory_bytes: int | None = None,
                 executable: str = "redis-server", *, password: str | None = None,
                 user: str | None = None, tls: bool = False, tls_client_auth: bool = False,
                 host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] | None = None) -> Iterator[RedisServer]:
    """``local_redis``, yielding the running ``RedisServer``."""
    binary = shutil.which(executable)
    if binary is None:
        raise FileNotFoundError(f"{executable} not on PATH (scripts/setup.sh installs it)")
    if user is not None and password is None:
        raise ValueError("an ACL user needs a password")
    with tempfile.TemporaryDirectory(prefix="disagg-redis-") as tmp:
        server = RedisServer(binary, Path(tmp), maxmemory_bytes, password, user, tls,
                             tls_client_auth, host, wrap)
        server.start(port)
        try:
            yield server
        finally:
            server.stop()


class RedisServer:
    """One redis-server process at a time on a port that stays the same once chosen."""

    def __init__(self, binary: str, tmp: Path, maxmemory: int | None, password: str | None,
                 user: str | None, tls: bool, tls_client_auth: bool, host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        self.binary, self.dir, self.host, self.wrap = binary, tmp, host, wrap
        self.maxmemory, self.password, self.user = maxmemory, password, user
        self.tls, self.tls_client_auth = tls or tls_client_auth, tls_client_auth
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.certs = make_certs(tmp / "tls", client=tls_client_auth) if self.tls else None

    @property
    def url(self) -> str:
        """The URL a client connects with (credentials and CA included)."""
        assert self.port is not None, "never started"
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.user or '', safe='')}:{quote(self.password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        url = f"{scheme}://{auth}{self.host}:{self.port}/0"
        if self.certs is not None:
            url += f"?ssl_ca_certs={self.certs['ca']}"
            if self.tls_client_auth:
                url += f"&ssl_certfile={self.certs['client']}&ssl_keyfile={self.certs['client_key']}"
        return url

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, port: int | None = None) -> None:
        """Start the server: on ``port``, else on the port it had, else on a free one."""
        assert not self.running, "already running"
        port = port if port is not None else self.port
        for attempt in range(3):
            chosen = port if port is not None else _free_port()
            self.port = chosen
            self.proc = self._spawn(chosen)
            try:
                self._wait_ready()
                return
            except _PortTaken:
                self.stop()
                if port is not None or attempt == 2:
                    raise RuntimeError(f"port {chosen} is taken") from None
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the port is kept for ``start``."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections and never answers, like a
        hung host. ``resume`` undoes it."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client with the server's credentials (close it)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def _config(self, port: int) -> str:
        lines = [f"bind {self.host}", f"dir {self.dir}", 'save ""', "appendonly no",
                 "daemonize no", f"logfile {self.dir / 'redis.log'}"]
        if self.certs is not None:
            lines += ["port 0", f"tls-port {port}", f"tls-cert-file {self.certs['cert']}",
                      f"tls-key-file {self.certs['key']}",
                      f"tls-ca-cert-file {self.certs['ca']}",
                      f"tls-auth-clients {'yes' if self.tls_client_auth else 'no'}"]
        else:
            lines.append(f"port {port}")
        if self.maxmemory is not None:
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy noeviction"]
        if self.user is not None:
            lines += ["user default off",
                      f"user {_quoted(self.user)} on {_quoted('>' + str(self.password))} "
                      "~* &* +@all"]
        elif self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        return "\n".join(lines) + "\n"

    def _spawn(self, port: int) -> subprocess.Popen:
        conf = self.dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config(port))
        (self.dir / "redis.log").unlink(missing_ok=True)  # a restart's log only
        argv = [self.binary, str(conf)]
        return subprocess.Popen(self.wrap(argv) if self.wrap else argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_ready(self) -> None:
        """Return once our server answers PING; raise _PortTaken, or RuntimeError with the
        log's tail. The PID check guards against another server that already held the port."""
        assert self.proc is not None
        log = self.dir / "redis.log"
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = _tail(log)
                    if "Address already in use" in tail:
                        raise _PortTaken
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                       f"{tail}")
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping() and client.info("server")["process_id"] == self.proc.pid:
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                           f"{START_TIMEOUT_S}s:\n{_tail(log)}")


def make_certs(folder: Path, client: bool = False) -> dict[str, Path]:
    """A self-signed CA and a server certificate it signs (for 127.0.0.1 and localhost), and
    with ``client`` a client certificate, in ``folder``: {"ca", "cert", "key", "client",
    "client_key"}. EC P-256 keys, valid one day."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not on PATH (needed for a TLS redis-server)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = {"ca": folder / "ca.crt", "cert": folder / "server.crt",
           "key": folder / "server.key"}

    def run(*args: str | Path) -> None:
        proc = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", folder / "ca.key", "-out", out["ca"], "-days", "1",
        "-subj", "/CN=disagg test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(name: str, ext: str) -> tuple[Path, Path]:
        key, csr, crt = (folder / f"{name}.{s}" for s in ("key", "csr", "crt"))
        (folder / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + ext)
        run("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        run("x509", "-req", "-in", csr, "-CA", out["ca"], "-CAkey", folder / "ca.key",
            "-CAcreateserial", "-out", crt, "-days", "1", "-extfile", folder / f"{name}.ext")
        return crt, key

    leaf("server", "extendedKeyUsage=serverAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    if client:
        out["client"], out["client_key"] = leaf("client", "extendedKeyUsage=clientAuth\n")
    return out


def _quoted(text: str) -> str:
    """A redis.conf argument holding ``text`` as it is (spaces, quotes, backslashes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _PortTaken(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
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

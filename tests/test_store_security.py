"""The store protects credentials and data: Redis with a password, an ACL user and TLS; URLs
redacted wherever they are logged or raised; the disk tier private to its user."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagg.transfer.store import CpuBackend, DiskBackend, RedisBackend, TieredStore
from disagg.transfer.store import disk as disk_module
from disagg.transfer.store.keys import ChunkKey
from disagg.transfer.store.redis import REDIS_URL_ENV, connect_url, redact
from tests.support.redis_server import local_redis, redis_server

PASSWORD = "Tr0ub4dor-s3cret"  # noqa: S105  (a test password, asserted absent below)
USER = "kvstore"


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def value(i: int, size: int = 1000) -> bytes:
    return bytes([i % 251]) * size


def roundtrip(url: str, **kwargs: float) -> RedisBackend:
    backend = RedisBackend(1 << 20, url=url, namespace="sec", **kwargs)
    assert backend.put(key(1), value(1)) and backend.get(key(1)) == value(1)
    out = memoryview(bytearray(len(value(1))))  # the loader's read, from the socket itself
    assert backend.get_many_into([key(1)], [out]) == [True] and bytes(out) == value(1)
    backend.check_integrity()
    return backend


def fails(url: str, match: str) -> None:
    backend = RedisBackend(1 << 20, url=url, namespace="sec", breaker_backoff_s=0.01)
    try:
        backend.breaker.success()  # whatever construction saw: this call goes out
        with pytest.raises(OSError, match=match):
            backend.get(key(1))
    finally:
        backend.close()


# -- authentication and TLS -----------------------------------------------------------------
# ``redis_url`` is taken for its skip-or-fail decision when redis-server is missing.


def test_requirepass_url(redis_url):
    with local_redis(password=PASSWORD) as url:
        assert url.startswith("redis://:") and PASSWORD in url
        roundtrip(url).close()
        fails(url.replace(f":{PASSWORD}@", ""), "AuthenticationError")  # none given
        fails(url.replace(PASSWORD, "wrong"), "AuthenticationError")


def test_acl_user_url(redis_url):
    with local_redis(user=USER, password=PASSWORD) as url:
        assert url.startswith(f"redis://{USER}:")
        roundtrip(url).close()
        fails(url.replace(PASSWORD, "wrong"), "AuthenticationError")
        fails(url.replace(f"{USER}:", ":"), "AuthenticationError")  # the default user is off


def test_password_with_reserved_characters_percent_encoded(redis_url):
    with redis_server(password="p@ss:w/rd?#%") as server:  # the URL percent-encodes it
        assert "%40" in server.url and "p@ss" not in server.url
        roundtrip(server.url).close()


def test_tls_with_the_ca_in_the_url(redis_url):
    with local_redis(tls=True, password=PASSWORD) as url:
        assert url.startswith("rediss://") and "?ssl_ca_certs=" in url
        roundtrip(url).close()
        fails(url.split("?")[0], "certificate verify failed")  # no CA: server not trusted
        plain = url.replace("rediss://", "redis://")
        with pytest.raises(ValueError, match="ssl_ca_certs"):  # TLS options, no TLS: at once
            RedisBackend(1 << 20, url=plain, namespace="sec")
        fails(plain.split("?")[0], "ConnectionError")  # plain text to a TLS port


def test_mutual_tls_with_an_acl_user(redis_url):
    with local_redis(tls_client_auth=True, user=USER, password=PASSWORD) as url:
        assert "ssl_certfile=" in url and "ssl_keyfile=" in url
        roundtrip(url).close()
        fails(url.split("&ssl_certfile")[0], "ConnectionError")  # no client certificate


def test_tiered_store_over_tls_and_password(redis_url, tmp_path):
    with local_redis(tls=True, user=USER, password=PASSWORD) as url:
        redis = RedisBackend(1 << 20, url=url, namespace="sec-tiered")
        with TieredStore([CpuBackend(1 << 20), redis]) as store:
            store.put(key(2), value(2))
            assert store.flush(timeout=30)
            store.tiers[0].delete(key(2))
            assert store.get(key(2)) == value(2)
            st = store.stats().tiers[1]
            assert (st.load_hits, st.errors, st.breaker_open) == (1, 0, 0)


def test_bad_url_query_parameter_fails_at_construction_without_the_password():
    with pytest.raises(ValueError, match="ssl_ca_cert") as info:
        RedisBackend(1 << 20, url=f"rediss://:{PASSWORD}@127.0.0.1:1/0?ssl_ca_cert=/x")
    assert PASSWORD not in str(info.value) and "***@127.0.0.1:1" in str(info.value)
    with pytest.raises(ValueError) as info:  # an unencoded "/" cuts the netloc short
        RedisBackend(1 << 20, url=f"redis://:{PASSWORD}/x@127.0.0.1:1/0")
    assert PASSWORD not in everything_about(info.value)


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    (f"redis://:{PASSWORD}@h:6379/0", "redis://***@h:6379/0"),
    (f"redis://{USER}:{PASSWORD}@h:6379/0", "redis://***@h:6379/0"),
    (f"rediss://{USER}:{PASSWORD}@h:6380/1?ssl_ca_certs=/ca.crt",
     "rediss://***@h:6380/1?ssl_ca_certs=/ca.crt"),
    (f"redis://h:6379/0?password={PASSWORD}&db=2", "redis://h:6379/0?password=***&db=2"),
    (f"redis://h:6379/0?username={USER}&password={PASSWORD}",
     "redis://h:6379/0?username=***&password=***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_redact(url, shown):
    assert redact(url) == shown


def everything_about(exc: BaseException) -> str:
    """The exception as any log or error report could show it: message, repr, the chain."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


@contextlib.contextmanager
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.DEBUG):  # every logger, every level, redis-py's own too
        yield


@pytest.mark.parametrize("auth", ["requirepass", "acl"])
def test_failing_connections_never_show_the_password(redis_url, caplog, auth):
    user = USER if auth == "acl" else None
    with local_redis(user=user, password=PASSWORD) as url, all_logs(caplog):
        texts: list[str] = []
        wrong = url.replace(PASSWORD, PASSWORD[::-1])  # refused by the server
        with local_redis() as gone:
            pass  # started and stopped: nothing listens there now
        down = gone.replace("redis://", f"redis://{user or ''}:{PASSWORD}@")
        for bad in (wrong, down):
            backend = RedisBackend(1 << 20, url=bad, namespace="sec",
                                   breaker_backoff_s=0.01)
            texts += [repr(backend), backend.url, backend.where, backend.breaker.last_failure]
            for call in (lambda b=backend: b.get(key(1)), lambda b=backend: b.keys()):
                backend.breaker.success()  # let the call reach the server
                with pytest.raises(OSError) as info:
                    call()
                texts.append(everything_about(info.value))
            with TieredStore([CpuBackend(1 << 20), backend]) as store:  # logs, stats
                backend.breaker.success()
                store.put(key(3), value(3))
                assert store.flush(timeout=30)
                assert store.get(key(4)) is None
                texts.append(repr(store.stats()))
                assert store.stats().tiers[1].errors + store.stats().tiers[1].skipped >= 1
        assert any("AuthenticationError" in t for t in texts)  # it did fail, and say why
        assert any("Connection refused" in t for t in texts)
    logged = caplog.text + "\n".join(
        everything_about(r.exc_info[1]) for r in caplog.records if r.exc_info and r.exc_info[1])
    assert "***@127.0.0.1" in logged  # the URL is logged, redacted
    for text in [*texts, logged]:
        assert PASSWORD not in text
        assert PASSWORD[::-1] not in text


# -- disk tier permissions ------------------------------------------------------------------


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_disk_tier_directory_0700_and_files_0600_under_a_permissive_umask(
        tmp_path, permissive_umask, monkeypatch):
    path = tmp_path / "a" / "kv"
    temp_modes: list[int] = []
    real_replace = os.replace

    def replace(src, dst):  # the temporary file as it is before the rename
        temp_modes.append(mode(Path(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    d = DiskBackend(path, 1 << 20)
    try:
        for i in range(3):
            d.put(key(i), value(i))
        assert mode(path) == 0o700 and mode(path / ".sharers") == 0o700
        files = [p for p in path.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {".lock", f"{key(0).hex}.kv"}
        assert len([p for p in files if p.parent.name == ".sharers"]) == 1
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert temp_modes == [0o600] * 3
    finally:
        d.close()


def test_an_existing_store_directory_is_tightened(tmp_path, permissive_umask):
    path = tmp_path / "kv"
    d = DiskBackend(path, 1 << 20)
    d.put(key(1), value(1))
    d.close()
    os.chmod(path, 0o755)  # as an older version left it
    os.chmod(path / ".sharers", 0o777)
    os.chmod(path / ".lock", 0o644)
    d = DiskBackend(path, 1 << 20)
    try:
        assert mode(path) == 0o700 and mode(path / ".sharers") == 0o700
        assert mode(path / ".lock") == 0o600 and d.get(key(1)) == value(1)
    finally:
        d.close()
    empty = tmp_path / "made-by-the-operator"
    empty.mkdir(mode=0o755)
    DiskBackend(empty, 1 << 20).close()
    assert mode(empty) == 0o700


def test_a_shared_existing_directory_is_left_alone_with_a_warning(tmp_path, caplog,
                                                                  permissive_umask):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    (shared / "someone-elses-file").write_text("x")
    with caplog.at_level(logging.WARNING, logger=disk_module.__name__):
        DiskBackend(shared, 1 << 20).close()
    assert mode(shared) == 0o777  # not ours to change: other things live there
    assert "writable by other users" in caplog.text
    assert mode(shared / ".lock") == 0o600 and mode(shared / ".sharers") == 0o700


def test_the_engine_environment_can_carry_the_redis_credentials(redis_url, monkeypatch):
    with local_redis(user=USER, password=PASSWORD) as url:
        shown = redact(url)  # what the config (vLLM's argv) carries
        assert PASSWORD not in shown
        assert connect_url(shown) == shown
        monkeypatch.setenv(REDIS_URL_ENV, url)  # what the engine's environment carries
        assert connect_url(shown) == url
        red = roundtrip(connect_url(shown))  # as io.build_store connects
        assert red.url == shown
        red.close()


def test_an_empty_sticky_directory_is_not_tightened(tmp_path, permissive_umask):
    shared = tmp_path / "like-tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    DiskBackend(shared, 1 << 20).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777

"""VLLMProcess start-up: a port taken between picking and binding restarts the instance on
fresh ports; any other start-up failure is reported with its root cause.

The child here is a small HTTP server standing in for vLLM's (it binds its port the way
vLLM's processes do, late); the supervision, port picking and log handling are the real ones.
"""

from __future__ import annotations

import socket
import sys

import pytest

from disagg import instance as inst
from disagg.config import EngineArgs, TransferConfig
from disagg.instance import InstanceSpec, VLLMProcess, free_ports, root_cause

_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class _FakeServerProcess(VLLMProcess):
    def __init__(self, spec: InstanceSpec, script: str = _SERVER):
        self.script = script
        super().__init__(spec)

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port)]


@pytest.fixture
def spec(tmp_path) -> InstanceSpec:
    return InstanceSpec(role="decode", index=0, model_path="unused", served_model_name="m",
                        engine=EngineArgs(), transfer=TransferConfig(), log_dir=str(tmp_path))


def test_free_ports_are_distinct():
    ports = free_ports(16)
    assert len(set(ports)) == 16


def test_port_taken_before_bind_restarts_on_fresh_ports(spec, monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = inst.free_ports
    calls = []

    def first_pick_taken(n, host="127.0.0.1"):
        calls.append(n)
        ports = real(n, host)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(inst, "free_ports", first_pick_taken)
    proc = _FakeServerProcess(spec)
    assert proc.port == taken
    try:
        proc.start()
        proc.wait_healthy(60)
        assert proc.port != taken and len(calls) == 2
        assert proc.healthy()
    finally:
        proc.stop()
        squatter.close()


def test_port_retries_are_bounded(spec, monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    monkeypatch.setattr(inst, "free_ports", lambda n, host="127.0.0.1": [taken] * n)
    proc = _FakeServerProcess(spec)
    try:
        proc.start()
        with pytest.raises(RuntimeError, match="Address already in use"):
            proc.wait_healthy(60, port_retries=2)
    finally:
        proc.stop()
        squatter.close()


def test_root_cause_skips_vllm_log_prefix_and_picks_the_first_error():
    log = (
        "(APIServer pid=1) WARNING 11-28 [x.py:1] errors like `OSError: [Errno 24]` may occur\n"
        "(EngineCore pid=2) ERROR 11-28 03:54:24 [core.py:1510] zmq.error.ZMQError: "
        "Address already in use (addr='tcp://*:47817')\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert root_cause(log) == "zmq.error.ZMQError: Address already in use (addr='tcp://*:47817')"
    assert root_cause("all fine\n") is None


def test_root_cause_of_a_validation_error_carries_its_reasons():
    """vLLM's config errors are pydantic ValidationErrors: the reason is on the next lines."""
    log = (
        "  File \"x.py\", line 1, in create_model_config\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, User-specified max_model_len (100000) is greater than the derived "
        "max_model_len [type=value_error]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
        "RuntimeError: later\n"
    )
    assert root_cause(log) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig; "
        "Value error, User-specified max_model_len (100000) is greater than the derived "
        "max_model_len [type=value_error]")
    log = ("(APIServer pid=7) pydantic.ValidationError: 1 validation error for X\n"
           "(APIServer pid=7) a\n(APIServer pid=7)   Input should be a valid integer\n"
           "(APIServer pid=7) \n")
    assert root_cause(log) == ("pydantic.ValidationError: 1 validation error for X; a; "
                               "Input should be a valid integer")



def test_an_engine_binds_only_an_address_of_its_own_node(monkeypatch):
    """The advertised address is bound as is; one that is not this node's (a NAT'd or
    another host's address) fails fast naming the fix; DISAGG_BIND_IP overrides."""
    from disagg.instance import bind_ip

    monkeypatch.delenv("DISAGG_BIND_IP", raising=False)
    assert bind_ip("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="not an address of this node.*DISAGG_BIND_IP"):
        bind_ip("192.0.2.77")  # TEST-NET-1: never assigned to a real interface
    monkeypatch.setenv("DISAGG_BIND_IP", "127.0.0.1")
    assert bind_ip("192.0.2.77") == "127.0.0.1"  # behind NAT: advertised != bound
    monkeypatch.setenv("DISAGG_BIND_IP", "192.0.2.78")
    with pytest.raises(ValueError, match="DISAGG_BIND_IP 192.0.2.78"):
        bind_ip("127.0.0.1")


_STUCK = """
import sys, time
print("(Worker pid=1) ERROR [multiproc_executor.py:1063] WorkerProc hit an exception.")
print("(Worker pid=1) ERROR zmq.error.ZMQError: Address already in use "
      "(addr='tcp://127.0.0.1:39071')", flush=True)
time.sleep(600)  # vLLM's API server, still waiting for the engine that will never start
"""


def test_a_start_up_failure_with_vllm_left_waiting_is_caught_and_retried(spec, monkeypatch):
    """A worker failing at start-up (here: its KV connector's port taken) can leave vLLM
    waiting for its engine: the instance stops it and restarts on fresh ports instead of
    waiting out the start-up timeout."""
    starts = []
    real_start = _FakeServerProcess.start

    def start(self):
        starts.append(1)
        self.script = _STUCK if len(starts) == 1 else _SERVER
        real_start(self)

    monkeypatch.setattr(_FakeServerProcess, "start", start)
    proc = _FakeServerProcess(spec)
    try:
        proc.start()
        proc.wait_healthy(30)  # waiting out the stuck child would fail here, after 30 s
        assert len(starts) == 2 and proc.healthy()
    finally:
        proc.stop()


@pytest.mark.parametrize("script,cause", [
    ("raise ValueError('max_model_len too large')", "ValueError: max_model_len too large"),
    # vLLM left waiting for an engine whose worker failed: caught from the log
    (_STUCK.replace("ZMQError: Address already in use", "ValueError: bad KV layout"),
     "ValueError: bad KV layout"),
], ids=["exits", "left waiting"])
def test_other_start_up_failure_names_its_root_cause(spec, script, cause):
    proc = _FakeServerProcess(spec, script=script)
    proc.start()
    try:
        with pytest.raises(RuntimeError, match=cause):
            proc.wait_healthy(30)  # the stuck child would otherwise outlast this
    finally:
        proc.stop()

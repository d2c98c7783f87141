"""One 1P1D deployment (API key on) exercised as a user would: the OpenAI client, bad input,
idle cost, status, conditional disaggregation and the gateway's prefix index, a prefill actor
killed mid-flight, and no process left behind."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time

import httpx
import psutil
import pytest
import ray

from disagg.scheduler.hashing import external_block_hashes
from tests.integration.helpers import scrape

pytestmark = pytest.mark.integration

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def dep():
    from disagg.launch.api import launch

    topo = {"model": "tiny", "engine": {"dtype": "bfloat16", "max_model_len": 2048,
                                        "kv_cache_gib": 1, "enforce_eager": True},
            "api": {"api_key": KEY}, "transfer": {"transfer_timeout_s": 10},
            # Every request through the prefill instance: this module tests that path.
            "scheduler": {"min_remote_prefill_tokens": 0}}
    d = launch(topo)
    yield d
    pids = _tree_pids(d)  # the current incarnations, after any restart
    d.shutdown()
    # Nothing it started survives: supervisors, API servers, engine cores, workers.
    deadline = time.monotonic() + 30
    while (alive := [p for p in pids if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]):
        assert time.monotonic() < deadline, f"processes left behind: {alive}"
        time.sleep(0.5)


def _tree_pids(d) -> list[int]:
    pids = []
    for member in d.gateway.pool.members.values():
        root = psutil.Process(member.info.pid)
        pids += [root.pid] + [c.pid for c in root.children(recursive=True)]
    for info in d.instances.values():  # the first incarnations are gone or going
        if psutil.pid_exists(info.pid):
            pids.append(info.pid)
    assert len(pids) >= 6  # per instance: supervisor, API server, engine core, worker
    return pids


def _post(d, path, body, headers=AUTH, **kw):
    return httpx.post(d.url + path, json=body, headers=headers, timeout=120, **kw)


def test_openai_client_completions_and_chat_stream(dep):
    from openai import OpenAI

    client = OpenAI(base_url=dep.url + "/v1", api_key=KEY)
    out = client.completions.create(model="tiny", prompt="The cache", max_tokens=8,
                                    temperature=0)
    assert out.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello " * 50}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    models = client.models.list().data
    assert models[0].id == "tiny" and models[0].model_extra["max_model_len"] == 2048


BAD = [
    ("malformed json", "/v1/completions", b"{not json", AUTH, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, AUTH, 404),
    ("missing model", "/v1/completions", {"prompt": "x"}, AUTH, 400),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, AUTH, 400),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, AUTH, 400),
    ("negative max_tokens", "/v1/completions",
     {"model": "tiny", "prompt": "x", "max_tokens": -3}, AUTH, 400),
    ("string max_tokens", "/v1/chat/completions",
     {"model": "tiny", "messages": [], "max_tokens": "many"}, AUTH, 400),
    ("bad temperature", "/v1/completions",
     {"model": "tiny", "prompt": "x", "temperature": "hot"}, AUTH, 400),
    ("prompt over max_model_len", "/v1/completions",
     {"model": "tiny", "prompt": [5] * 3000, "max_tokens": 4}, AUTH, 400),
    ("wrong api key", "/v1/completions", {"model": "tiny", "prompt": "x"},
     {"Authorization": "Bearer nope"}, 401),
    ("no api key", "/v1/completions", {"model": "tiny", "prompt": "x"}, {}, 401),
]


@pytest.mark.parametrize(("case", "path", "body", "headers", "status"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(dep, case, path, body, headers, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(dep.url + path, headers={**headers, "content-type": "application/json"},
                   timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    # ...and the server keeps serving.
    ok = _post(dep, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


def test_health_status_and_metrics(dep):
    assert httpx.get(dep.url + "/health").status_code == 200
    status = dep.status()
    assert {i["role"] for i in status["instances"]} == {"prefill", "decode"}
    assert all(i["healthy"] for i in status["instances"])
    text = httpx.get(dep.url + "/metrics").text
    for name in ("disagg_requests_total", "disagg_ttft_seconds", "disagg_itl_seconds",
                 "disagg_kv_bytes_received", "disagg_instance_requests_total"):
        assert name in text


# Routes vLLM's own --api-key leaves open (it guards /v1, /v2, /inference, /cohere only);
# /invocations runs completions.
OPEN_IN_VLLM = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/ping"), ("GET", "/version"),
                ("GET", "/load"), ("POST", "/tokenize"), ("POST", "/invocations"),
                ("GET", "/v1/models"), ("POST", "/v1/completions")]


def test_engines_answer_only_the_deployment(dep):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    for info in dep.instances.values():
        for method, path in OPEN_IN_VLLM:
            for headers in ({}, AUTH, {"Authorization": "Bearer wrong"}):  # AUTH: the
                # gateway's client key is not the engine token
                r = httpx.request(method, info.url + path, json=body, headers=headers,
                                  timeout=30)
                assert r.status_code == 401, (info.url, method, path, r.status_code)
        ok = httpx.get(info.url + "/health", headers=dep.engine_headers(), timeout=30)
        assert ok.status_code == 200
        # Every socket the engine itself serves binds the node's address, not all
        # interfaces: HTTP, KV events and replay, side channel.
        ports = {int(info.url.rsplit(":", 1)[1]), info.side_channel_port,
                 *(int(e.rsplit(":", 1)[1]) for e in (info.kv_events_endpoint,
                                                      info.kv_replay_endpoint) if e)}
        root = psutil.Process(info.pid)
        listening = {(c.laddr.ip, c.laddr.port) for p in [root, *root.children(True)]
                     for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        ours = {(ip, port) for ip, port in listening if port in ports}
        assert {port for _, port in ours} == ports, (ports, listening)
        assert all(ip == "127.0.0.1" for ip, _ in ours), ours


def test_a_client_leaving_mid_stream_aborts_the_request_on_the_decoder_within_1s(dep):
    dec = next(i for i in dep.instances.values() if i.role == "decode")
    body = {"model": "tiny", "prompt": [11] * 40, "max_tokens": 1800, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as client, \
            client.stream("POST", dep.url + "/v1/completions", json=body, headers=AUTH) as r:
        lines = (line for line in r.iter_lines() if line)
        next(lines)
        next(lines)
        running = scrape(dec.url, "vllm:num_requests_running")
        assert running == 1
    left = time.monotonic()
    while scrape(dec.url, "vllm:num_requests_running") != 0:
        assert time.monotonic() - left < 1.0, "the decoder still runs the abandoned request"
        time.sleep(0.05)
    # Its blocks are free again (vLLM's usage counts only blocks held by requests).
    assert scrape(dec.url, "vllm:kv_cache_usage_perc") == 0


def test_idle_instance_uses_under_5_percent_of_a_core(dep):
    time.sleep(3)  # let the last request's stragglers finish
    procs = []
    for inst in dep.instances.values():
        root = psutil.Process(inst.pid)
        procs += [root, *root.children(recursive=True)]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    window = 10.0
    time.sleep(window)
    used = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}
    per_instance = sum(used.values()) / len(dep.instances) / window
    assert per_instance < 0.05, f"idle instance uses {per_instance:.1%} of a core: {used}"


# ---- conditional disaggregation and the prefix index (decider at its default threshold) ---
THRESHOLD = 256


@pytest.fixture
def conditional(dep):
    """This deployment sends every request through prefill; these tests use the default
    conditional-disaggregation threshold instead."""
    from disagg.scheduler.decider import PrefillDecider

    gw = dep.gateway
    old, gw.decider = gw.decider, PrefillDecider(THRESHOLD)
    yield dep
    gw.decider = old


def _decisions(d, path: str, reason: str) -> float:
    return scrape(d.url, "disagg_decisions", path=path, reason=reason)


def _post_ok(d, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(d.url + path, json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                       **body}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _decoder(d):
    return next(i for i in d.instances.values() if i.role == "decode")


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_gateway_hashes_agree_with_instance_events(conditional):
    dep = conditional
    """Random prompts of every request shape: each full block the gateway hashes is one
    the instance that computed it reported in its KV events."""
    gw = dep.gateway
    rng = random.Random(11)
    words = ["cache", "prefill", "decode", "block", "token", "hash", "GPU", "Ray", "é", "的"]
    cases = []
    for i in range(6):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(200, 400)))
        cases.append(("/v1/completions", {"prompt": text}))
        ids = [rng.randrange(5, 16000) for _ in range(rng.randrange(300, 700))]
        cases.append(("/v1/completions", {"prompt": ids}))
        msgs = [{"role": "system", "content": f"rule {i}"},
                {"role": "user", "content": text[: rng.randrange(500, 1500)]}]
        cases.append(("/v1/chat/completions", {"messages": msgs}))
    for path, body in cases:
        _post_ok(dep, body, path)
    _wait_for(lambda: gw.block_size, "no KV event reached the gateway")
    holders = [i.engine_id for i in dep.instances.values()]
    checked = 0
    for path, body in cases:
        tokens = gw.hasher.tokenize(path, {"model": "tiny", **body})
        hashes = external_block_hashes(tokens[:-1], gw.block_size)
        assert hashes, "every case spans at least one full block"

        def held(hashes=hashes):
            return max(gw.index.match(e, hashes) for e in holders) == len(hashes)
        _wait_for(held, f"gateway hashes of a {path} request not in the index")
        checked += len(hashes)
    assert checked >= 18


def test_short_and_cached_prompts_skip_the_prefill_hop(conditional):
    dep = conditional
    dec = _decoder(dep)
    rng = random.Random(5)
    doc = [rng.randrange(5, 16000) for _ in range(1500)]
    remote0 = _decisions(dep, "remote", "long_uncached")
    pulls0 = scrape(dec.url, "vllm:disagg_kv_transfers_received")
    _post_ok(dep, {"prompt": doc + [7, 8, 9]})  # a new document: through the prefill instance
    assert _decisions(dep, "remote", "long_uncached") == remote0 + 1
    _wait_for(lambda: scrape(dec.url, "vllm:disagg_kv_transfers_received") >= pulls0 + 1,
              "the decoder pulled no KV")
    # The decoder now holds the document's blocks (it loaded them); wait for its events.
    gw = dep.gateway
    doc_hashes = external_block_hashes(doc, gw.block_size)
    _wait_for(lambda: gw.index.match(dec.engine_id, doc_hashes) == len(doc_hashes),
              "decoder's loaded blocks not in the index")

    short0 = _decisions(dep, "local", "short_uncached")
    pulls1 = scrape(dec.url, "vllm:disagg_kv_transfers_received")
    for q in range(3):  # same document, new questions: only the tail is uncached
        _post_ok(dep, {"prompt": doc + [100 + q] * 40})
    _post_ok(dep, {"prompt": "a short question"})  # short: never worth a hop
    assert _decisions(dep, "local", "short_uncached") == short0 + 4
    time.sleep(2)  # connector counters are published on vLLM's stats tick
    assert scrape(dec.url, "vllm:disagg_kv_transfers_received") == pulls1


def _generate(d, i: int) -> list[int]:
    body = {"model": "tiny", "prompt": [100 + i] * (400 + 37 * i), "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = _post(d, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_killing_the_prefill_actor_loses_no_request(dep):
    expected = [_generate(dep, i) for i in range(8)]
    dec = next(i.url for i in dep.instances.values() if i.role == "decode")
    held = dep.gateway.index.stats().per_holder  # from the prefill engine's KV events
    assert held.get(dep.instances["prefill-0"].engine_id, 0) > 0, held
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_generate, dep, i) for i in range(8)]
        time.sleep(0.3)
        ray.kill(dep.actor("prefill-0"), no_restart=False)  # a crash: Ray restarts it
        got = [f.result(timeout=300) for f in futures]
    assert got == expected
    # The pool recovers: the restarted prefill serves again and the decoder pulls from it.
    old = dep.instances["prefill-0"].engine_id
    index = dep.gateway.index
    deadline = time.monotonic() + 600
    while True:
        pre = next(i for i in dep.status()["instances"] if i["role"] == "prefill")
        if pre["engine_id"] != old and pre["healthy"]:
            break
        assert time.monotonic() < deadline, dep.status()
        time.sleep(2)
    # The dead engine's prefix-index entries went with it.
    assert index.stats().per_holder.get(old, 0) == 0, index.stats()
    pulls = scrape(dec, "vllm:disagg_kv_transfers_received")
    assert [_generate(dep, 8 + i) for i in range(3)]
    deadline = time.monotonic() + 30  # vLLM publishes connector stats on its next log tick
    while scrape(dec, "vllm:disagg_kv_transfers_received") < pulls + 3:
        assert time.monotonic() < deadline, "no pull from the restarted prefill instance"
        time.sleep(1)


def test_a_dead_engine_restarts_under_its_living_actor(dep):
    """SIGKILL the decode engine (its actor lives on): the actor's watchdog starts a new
    incarnation within seconds, the gateway follows it, and requests are served again."""
    old = next(m.info for m in dep.gateway.pool.members.values() if m.info.role == "decode")
    expected = _generate(dep, 30)
    server = psutil.Process(old.pid).children()[0]  # vLLM's API server under the supervisor
    # A stream being decoded there ends with an OpenAI error event within 5 s of the death.
    body = {"model": "tiny", "prompt": [9] * 60, "max_tokens": 1800, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", dep.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: {")
        server.kill()
        killed = time.monotonic()
        rest = list(lines)
    assert time.monotonic() - killed < 5
    assert json.loads(rest[-1].removeprefix("data: "))["error"]["code"] == "upstream", rest[-3:]
    # While it restarts, the prefill instance (a whole vLLM) serves: the same greedy output.
    assert _generate(dep, 30) == expected
    deadline = time.monotonic() + 600
    while True:
        dec = next(i for i in dep.status()["instances"] if i["role"] == "decode")
        if dec["engine_id"] != old.engine_id and dec["healthy"]:
            break
        assert time.monotonic() < deadline, dep.status()
        time.sleep(2)
    new = next(m.info for m in dep.gateway.pool.members.values() if m.info.role == "decode")
    assert new.restarts == 1 and new.url != old.url
    assert dep.gateway.index.stats().per_holder.get(old.engine_id, 0) == 0
    assert [_generate(dep, 20 + i) for i in range(2)]
    assert scrape(dep.url, "disagg_instance_restarts", instance="decode-0") == 1



def test_an_actor_restarted_by_ray_also_keeps_its_engine_alive(dep):
    """prefill-0's actor was killed and restarted by Ray above; its engine dies now, and
    the restarted actor's watchdog must bring it back as well."""
    old = next(m.info for m in dep.gateway.pool.members.values() if m.info.role == "prefill")
    psutil.Process(old.pid).children()[0].kill()
    deadline = time.monotonic() + 600
    while True:
        pre = next(i for i in dep.status()["instances"] if i["role"] == "prefill")
        if pre["engine_id"] != old.engine_id and pre["healthy"]:
            break
        assert time.monotonic() < deadline, dep.status()
        time.sleep(2)
    assert [_generate(dep, 40 + i) for i in range(2)]

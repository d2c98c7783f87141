"""OpenAI-compatible gateway: validates, pairs a prefill with a decode, and relays.

    client -> POST /v1/(chat/)completions
      1. auth, body size, JSON, field checks (disagg.validation; 4xx, OpenAI error body);
         fields only the gateway sets (kv_transfer_params & co.) dropped
         admission: a slot (held to the end of the response), else queued, 429 or 503
      2. tokenize, block hashes, prefix hits per instance (from the KV-event index)
      3. decode = decode policy; the decider says whether the decoder's uncached part of
         the prompt is worth a prefill hop (else: local prefill on the decoder)
      4. prefill = prefill policy: same body, max_tokens=1, stream=false,
         kv_transfer_params.do_remote_decode
         - 4xx: the client's fault (e.g. prompt too long): returned as is
         - 5xx, refused, timeout: counted, and the decoder prefills locally instead
      5. decode: original body + the prefill's kv_transfer_params, streamed back verbatim

The client never sees a prefill fault; a decode that fails before answering is retried once
on another decoder. Nothing unexpected leaves as a bare 500: every error has an OpenAI body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from disagg.admin import Admin, Scaler
from disagg.admission import (
    Abandoned,
    Admission,
    HeldStream,
    QueueFull,
    QueueTimeout,
    Slot,
    client_gone,
)
from disagg.aio import Stopped, unless
from disagg.config import ApiConfig, SchedulerConfig, StoreConfig
from disagg.engine_client import ConnectError, EngineClient
from disagg.errors import APIError, http_error, unexpected_error, upstream_error
from disagg.instance import InstanceInfo
from disagg.kv_feed import KVEventFeed
from disagg.metrics import GatewayMetrics
from disagg.pool import InstancePool, Member
from disagg.prefill_queue import PrefillQueue
from disagg.relay import Relay, describe, engine_session, open_answer, post_json
from disagg.scheduler import Candidate, RequestInfo, make_policy
from disagg.scheduler.decider import Decision, PrefillDecider, queue_depth
from disagg.scheduler.hashing import RequestHasher, external_block_hashes
from disagg.scheduler.kv_aware import KVAware, open_hop, prefills_here
from disagg.scheduler.kv_index import PrefixIndex
from disagg.tiers import capacity_blocks, is_store, loadable_by
from disagg.tp_layout import pairing_problem
from disagg.validation import check_model, check_request, parse_json, read_body, strip_internal

logger = logging.getLogger(__name__)
DEFAULT_MAX_INFLIGHT = 256  # without api.max_inflight or the launcher's pool-sized value
# Bodies up to this size are tokenized on the event loop: a short prompt tokenizes in tens of
# microseconds, less than handing it to a worker thread and back costs (profiled).
INLINE_TOKENIZE_BYTES = 8192


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The model as the gateway sees it."""

    name: str  # what clients send as "model"
    path: str  # local HF-format folder: the tokenizer the gateway hashes prompts with
    max_model_len: int
    block_size: int | None  # None: learned from the first KV event
    kv_bytes_per_token: int | None  # bounds store tiers in the index; None: unbounded


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers, names in lower case, the first value of a repeated one: what
    ``dict(request.headers)`` gives, without building Starlette's Headers first."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}


@dataclass(frozen=True, slots=True)
class Payload:
    """A checked request body; ``raw``: the bytes the client sent, when the gateway dropped
    nothing from them (they then go to the decoder as they came: a large body is not
    encoded again); ``size``: their length."""

    body: dict[str, Any]
    raw: bytes | None
    size: int

    def with_params(self, kv_params: dict | None) -> bytes:
        """The decoder's body: the client's, plus the prefill's ``kv_transfer_params``.
        Appended to the raw object when there is one (the key cannot be in it: the client's
        own was dropped, and a body that had one has no ``raw``)."""
        if self.raw is not None:
            if kv_params is None:
                return self.raw
            end = self.raw.rstrip()
            if end.endswith(b"}"):
                return end[:-1] + b',"kv_transfer_params":' + dumps(kv_params) + b"}"
        if kv_params is None:
            return dumps(self.body)
        return dumps({**self.body, "kv_transfer_params": kv_params})


class Gateway:
    """The request path. Built from the topology's typed sections; its state (pool, index,
    feed) changes only on its own event loop: other threads go through ``call``."""

    def __init__(self, pool: InstancePool, metrics: GatewayMetrics, model: ServedModel,
                 scheduler: SchedulerConfig, api: ApiConfig, store: StoreConfig,
                 scaler: Scaler | None = None, hasher: RequestHasher | None = None,
                 engine_token: str | None = None, max_inflight: int | None = None,
                 worker: dict[str, Any] | None = None):
        """``engine_token``: the Bearer token the deployment's engines require (they accept
        no request without it; ``disagg.credentials``). ``max_inflight``: requests served
        at once, as the launcher sizes it (decode replicas x max_num_seqs); None:
        ``api.max_inflight`` or DEFAULT_MAX_INFLIGHT. ``worker``: which gateway process
        this is (index, pid, count of workers, own URL), shown in status."""
        self.pool, self.metrics, self.model = pool, metrics, model
        self.api_key = api.api_key
        self._max_body, self._max_n = api.max_body_bytes, api.max_n
        limit = max_inflight or api.max_inflight or DEFAULT_MAX_INFLIGHT
        self.admission = Admission(limit, limit if api.max_queued is None else api.max_queued,
                                   api.queue_timeout_s, on_change=self._admission_changed)
        self.prefill_policy = make_policy(scheduler.prefill_policy,
                                          scheduler.policy_options.get(scheduler.prefill_policy))
        self.decode_policy = make_policy(scheduler.decode_policy,
                                         scheduler.policy_options.get(scheduler.decode_policy))
        self.decider = PrefillDecider(scheduler.min_remote_prefill_tokens,
                                      scheduler.max_prefill_queue)
        self._local_when_slower = scheduler.local_prefill_when_hop_slower
        self._per_unit, self._workers = scheduler.prefill_inflight, max(1, api.workers)
        self.prefill_queue = PrefillQueue(self._prefill_places, self._prefill_queue_changed) \
            if scheduler.prefill_queue else None
        self.hasher = hasher if hasher is not None else RequestHasher(model.path)
        self._store = store if store.enabled else None
        self.index = PrefixIndex(scheduler.index_max_blocks, capacity_of=self._store_capacity) \
            if scheduler.kv_events else None
        self.feed = KVEventFeed(self.index, pool, model.block_size) \
            if self.index is not None else None
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)  # routing decisions
        self.worker = worker if worker is not None else {"index": 0, "pid": os.getpid(),
                                                         "workers": api.workers}
        self.admin = Admin(model.name, pool, self.decider, self.recent, self.index, self.feed,
                           self._authorize, scaler, admission=self.admission.state,
                           worker=self.worker)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._deadline_s = api.request_timeout_s  # end to end, streams included
        self._engine_headers = {"Authorization": f"Bearer {engine_token}"} \
            if engine_token else {}
        self._http: EngineClient | None = None  # opened with the app (lifespan)
        # Request ids: random per process (workers never collide), then a counter.
        self._ids = (f"disagg-{os.urandom(5).hex()}{n:06x}" for n in itertools.count())
        self.relay = Relay(metrics)
        self._degraded = False  # every decoder down (logged once per change)
        self._tiers: dict[tuple[str, str], tuple[str, ...]] = {}  # see _loadable
        self.app = self._build_app()

    @property
    def _client(self) -> EngineClient:
        if self._http is None:
            raise RuntimeError("the gateway's HTTP client is opened by the app's lifespan")
        return self._http

    @property
    def block_size(self) -> int | None:
        return self.feed.block_size if self.feed else self.model.block_size

    # ---- app --------------------------------------------------------------------------------
    def _build_app(self) -> ASGIApp:
        """The FastAPI app, behind a dispatcher that sends the two hot routes straight to
        ``_serve``: FastAPI's middleware, routing and parameter solving cost about a tenth
        of a request's CPU in the gateway (profiled), and ``_serve`` answers every error
        itself. Everything else (lifespan included) goes to FastAPI."""
        api = self._build_fastapi()
        hot = {"/v1/completions", "/v1/chat/completions"}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in hot:
                response = await self._serve(Request(scope, receive), scope["path"])
                await response(scope, receive, send)
            else:
                await api(scope, receive, send)
        return app

    def _build_fastapi(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self._http = engine_session(self._deadline_s, self._engine_headers)
            self.loop = asyncio.get_running_loop()
            if self.feed is not None:
                self.feed.start()
            await self.pool.start()
            yield
            await self.pool.close()
            if self.feed is not None:
                await self.feed.close()
            await self._http.close()

        app = FastAPI(title="disagg", lifespan=lifespan)
        app.exception_handler(APIError)(lambda _req, exc: exc.response())
        app.exception_handler(HTTPException)(http_error)  # unknown path, wrong method
        app.exception_handler(Exception)(unexpected_error)  # outside _serve's own catch-all
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.get("/v1/disagg/status")(self.admin.status_endpoint)
        app.post("/v1/disagg/scale")(self.admin.scale_endpoint)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        return app

    async def health(self) -> Response:
        ok = bool(self.pool.available("decode"))
        return JSONResponse({"status": "ok" if ok else "no healthy decode instance"},
                            status_code=200 if ok else 503)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.model.name, "object": "model", "created": 0, "owned_by": "disagg",
            "root": self.model.name, "max_model_len": self.model.max_model_len}]})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "/v1/chat/completions")

    # ---- pool changes from other threads -----------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the gateway's event loop from another thread; its result."""
        if self.loop is None:
            raise RuntimeError("the gateway is not serving yet")

        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def add_instance(self, key: str, info: InstanceInfo) -> None:
        """On the loop (``call``): route to a new instance (and follow its KV events)."""
        self.pool.add(key, info)

    def set_draining(self, key: str) -> None:
        """On the loop (``call``): no new requests for ``key``; those in flight finish."""
        if key in self.pool.members:
            self.pool.members[key].draining = True

    def remove_instance(self, key: str) -> None:
        """On the loop (``call``): forget ``key`` and what the index holds for it."""
        member = self.pool.remove(key)
        if member is not None and self.feed is not None:
            self.feed.forget(member.info.engine_id)

    def _store_capacity(self, holder: str) -> int | None:
        """Blocks the store tier named ``holder`` (``disagg.tiers``) can hold; None for
        anything else, or while the block size or the model's KV size is unknown."""
        block_size = self.block_size
        if (not is_store(holder) or self._store is None or not block_size
                or not self.model.kv_bytes_per_token):
            return None
        s = self._store
        return capacity_blocks(holder, s.cpu_bytes, s.disk_bytes, s.redis_bytes,
                               self.model.kv_bytes_per_token * block_size)

    # ---- validation and admission ----------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           code="invalid_api_key")

    async def _parse(self, request: Request, path: str) -> Payload:
        """The checked body, without the fields only the gateway sets (disagg.validation)."""
        self._authorize(request)
        raw = await read_body(request, self._max_body)
        body = parse_json(raw)
        check_model(body, self.model.name)
        dropped = strip_internal(body)
        for name in dropped:
            self.metrics.dropped_fields.labels(name).inc()
        check_request(body, path, self._max_n, self.model.max_model_len)
        return Payload(body, None if dropped else raw, len(raw))

    async def _admit(self, request: Request) -> Slot:
        """A slot in service: at once, or after queueing (429 queue full, 503 timeout)."""
        try:
            slot = self.admission.try_acquire() or \
                await self.admission.acquire(abandon=client_gone(request))
        except QueueFull as exc:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity; retry after {exc.retry_after_s} s",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except QueueTimeout as exc:
            self.metrics.queue_timeouts.inc()
            raise APIError(503, f"the server is at capacity: {exc}", code="queue_timeout",
                           headers={"Retry-After": str(self.admission.retry_after_s())}) \
                from None
        except Abandoned:  # nobody reads this answer
            raise APIError(499, "the client closed the request while queued") from None
        self.metrics.admitted.inc()
        return slot

    def _prefill_places(self) -> int:
        """Hops this gateway process runs on the prefill pool at once:
        ``scheduler.prefill_inflight`` per compute unit, shared among the gateway's
        workers (each keeps its own queue). Instances pinned to the same cores of one host
        are one unit: a second hop there would only time-share those cores with the first
        (on a 2-core host the prefill instances share one core)."""
        units = {(urlsplit(m.info.url).hostname, *m.info.cpu_cores) if m.info.cpu_cores
                 else m.key for m in self.pool.available("prefill")}
        return -(-len(units) * self._per_unit // self._workers)

    def _prefill_queue_changed(self, queue: PrefillQueue) -> None:
        self.metrics.prefill_waiting.set(queue.waiting)
        self.metrics.prefill_running.set(queue.running)

    def _admission_changed(self, admission: Admission) -> None:
        self.metrics.queue_depth.set(admission.queued)
        self.metrics.in_service.set(admission.inflight)

    # ---- serving ----------------------------------------------------------------------------
    async def _serve(self, request: Request, path: str) -> Response:
        """Validate, admit, route and answer; the slot is held until the response ends."""
        start = time.perf_counter()
        info = RequestInfo(next(self._ids), headers=_headers(request.scope))
        slot: Slot | None = None
        response: Response | None = None
        try:
            payload = await self._parse(request, path)
            slot = await self._admit(request)
            response = await self._unless_gone(
                request, self._in_time(self._route(path, payload, info, start), start), info)
        except APIError as exc:
            self.metrics.requests.labels(path, str(exc.status)).inc()
            response = exc.response()
        except Exception:
            logger.exception("request %s: unexpected error", info.request_id)
            self.metrics.requests.labels(path, "500").inc()
            response = APIError(500, f"internal error (request {info.request_id})",
                                code="internal_error").response()
        finally:
            if slot is not None:
                if isinstance(response, HeldStream):
                    response.closers.append(slot.release)
                else:
                    slot.release()
        return response

    async def _unless_gone(self, request: Request, work: Awaitable[Response],
                           info: RequestInfo) -> Response:
        """``work``'s response, unless the client disconnects first: then ``work`` is
        cancelled, which closes its connections to the engines, and vLLM aborts the request
        there (prefill or decode) at once instead of computing an answer nobody reads.
        A streamed answer is past this point: closing its stream aborts it likewise."""
        try:
            return await unless(work, client_gone(request))
        except Stopped:
            self.metrics.failures.labels("client", "gateway").inc()
            logger.info("request %s: the client went away before the answer; aborted",
                        info.request_id)
            raise APIError(499, "the client closed the request", code="client_closed") \
                from None

    async def _in_time(self, work: Awaitable[Response], start: float) -> Response:
        """``work``'s response, or 504 once the request's deadline (api.request_timeout_s
        from its arrival) passes before its answer begins; the work is then cancelled,
        which aborts it on the engines."""
        left = start + self._deadline_s - time.perf_counter()
        try:
            async with asyncio.timeout(max(left, 0.0)) as cm:
                return await work
        except TimeoutError:
            if not cm.expired():
                raise
            self.metrics.failures.labels("deadline", "gateway").inc()
            raise APIError(504, "no answer within api.request_timeout_s "
                           f"({self._deadline_s:g} s)", code="timeout") from None

    async def _route(self, path: str, payload: Payload, info: RequestInfo,
                     start: float) -> Response:
        body = payload.body
        await self._annotate(path, body, info, inline=payload.size <= INLINE_TOKENIZE_BYTES)
        decoder, here = self._pick_decoder(info)
        if decoder.info.role == "prefill":  # degraded: no decoder; serve it all there
            decision = Decision(False, "no_decode_instance")
        else:
            prefill = [m.candidate for m in self._pairable(decoder)]
            decision = self.decider.decide(
                info.uncached_tokens(decoder.info.engine_id), prefill,
                queued=self.prefill_queue.waiting if self.prefill_queue else 0)
            if decision.reason == "long_uncached" and here:
                decision = Decision(False, "hop_slower")
        self._record(info, decoder, decision)
        self._expect(decoder, info)
        kv_params = await self._prefill(path, body, info, decoder) if decision.remote else None
        info.prefilled = kv_params is not None
        return await self._decode(path, payload.with_params(kv_params), body.get("stream"),
                                  info, start, decoder)

    def _record(self, info: RequestInfo, decoder: Member, decision: Decision) -> None:
        """Count the decision and its prefix hit; keep it for /v1/disagg/status."""
        path = "remote" if decision.remote else "local"
        self.metrics.decisions.labels(path, decision.reason).inc()
        hit = info.cached_tokens.get(decoder.info.engine_id, 0)
        stored = info.store_tokens.get(decoder.info.engine_id, 0)
        if info.prompt_tokens:
            self.metrics.prompt_tokens.labels(decoder.key).inc(info.prompt_tokens)
            self.metrics.hit_tokens.labels(decoder.key, "engine").inc(hit)
            self.metrics.hit_tokens.labels(decoder.key, "store").inc(stored)
        self.recent.append({
            "request_id": info.request_id, "time": round(time.time(), 3),
            "decode": decoder.key, "path": path, "reason": decision.reason,
            "prompt_tokens": info.prompt_tokens, "decoder_cached_tokens": hit,
            "decoder_store_tokens": stored})
        for role in ("prefill", "decode"):
            queues = [queue_depth(m.candidate) for m in self.pool.available(role)]
            if queues:
                self.metrics.imbalance.labels(role).set(max(queues) - min(queues))

    def _expect(self, member: Member, info: RequestInfo) -> None:
        """The request will leave its prompt's blocks on ``member``: let the next requests
        with the same prefix see them before the instance's events arrive."""
        if self.index is not None and info.block_hashes:
            self.index.expect(member.info.engine_id, info.block_hashes)

    def _pick_decoder(self, info: RequestInfo) -> tuple[Member, bool]:
        """The decode policy's choice, told what a prefill hop would cost where one is open
        (``RequestInfo.hop``: a kv_aware policy then charges a decoder that would take the
        hop the hop, not a prefill of its own), and whether that decoder computes a prompt
        past the hop's threshold itself because the hop would be slower (kv_aware with
        ``scheduler.local_prefill_when_hop_slower`` only).
        The hop holds for this choice only: the prefill pick that may follow prices
        prefills, not hops."""
        prefill = [m.candidate for m in self.pool.available("prefill")]
        open_prefill = [c for c in prefill if queue_depth(c) < self.decider.max_prefill_queue]
        if isinstance(self.decode_policy, KVAware) and open_prefill and info.prompt_tokens:
            info.hop = open_hop(open_prefill, info, self.decider.min_uncached_tokens,
                                local_when_slower=self._local_when_slower,
                                queued_s=self._queued_s(open_prefill, info))
        try:
            member = self._pick("decode", info)
            return member, info.hop is not None and prefills_here(member.candidate, info)
        finally:
            info.hop = None

    def _queued_s(self, prefill: list[Candidate], info: RequestInfo) -> float:
        """Seconds a hop for ``info`` would wait in the gateway's prefill queue."""
        queue = self.prefill_queue
        if queue is None or not queue.waiting:
            return 0.0
        expected = self.prefill_policy.prefill_seconds(prefill, info)
        return 0.0 if expected is None else queue.ahead_s(expected)

    def _pick(self, role: str, info: RequestInfo,
              exclude: frozenset[str] | set[str] = frozenset()) -> Member:
        """The policy's choice among ``role``'s healthy instances. With no healthy decoder,
        the prefill instances (whole vLLM engines) take whole requests: degraded, not 503."""
        members = [m for m in self.pool.available(role) if m.key not in exclude]
        if role == "decode" and not exclude:
            self._note_degraded(not members)
        if not members and role == "decode":
            members = [m for m in self.pool.available("prefill") if m.key not in exclude]
        if not members:
            raise APIError(503, f"no healthy {role} instance", code="no_instance")
        policy = self.prefill_policy if role == "prefill" else self.decode_policy
        chosen = policy.choose([m.candidate for m in members], info)
        return next(m for m in members if m.candidate is chosen)

    def _note_degraded(self, degraded: bool) -> None:
        """Log once per change: every decoder down (prefill instances serve whole
        requests), or decoders back."""
        if degraded != self._degraded:
            self._degraded = degraded
            if degraded:
                logger.warning("no healthy decode instance: prefill instances serve whole "
                               "requests until one is back")
            else:
                logger.info("decode instances healthy again")

    async def _annotate(self, path: str, body: dict, info: RequestInfo, inline: bool) -> None:
        """Fill the request's token count, block hashes and prefix hits per instance. A
        short body is tokenized ``inline`` on the loop, a long one in a worker thread."""
        if self.hasher is None:
            return
        tokens = self.hasher.tokenize(path, body) if inline else \
            await asyncio.to_thread(self.hasher.tokenize, path, body)
        if tokens is None:
            return
        info.prompt_tokens = len(tokens)
        if self.index is None or not self.block_size:
            return
        # vLLM always computes the last prompt token, so a hit never covers all of it.
        info.block_hashes = external_block_hashes(tokens[:-1], self.block_size)
        block_size = self.block_size
        for m in self.pool.members.values():
            eid = m.info.engine_id
            hit = self.index.match(eid, info.block_hashes)
            if hit:
                info.cached_tokens[eid] = hit * block_size
            with_store = self.index.match(eid, info.block_hashes, also=self._loadable(m.info))
            if with_store > hit:
                info.store_tokens[eid] = (with_store - hit) * block_size

    def _loadable(self, info: InstanceInfo) -> tuple[str, ...]:
        """The store tiers instance ``info`` loads from (``tiers.loadable_by``), cached per
        engine and address."""
        key = (info.engine_id, info.url)
        tiers = self._tiers.get(key)
        if tiers is None:
            if len(self._tiers) > 4096:  # engines restarted many times: start over
                self._tiers.clear()
            tiers = self._tiers[key] = loadable_by(info.engine_id,
                                                   urlsplit(info.url).hostname or "")
        return tiers

    def _pairable(self, decoder: Member) -> list[Member]:
        """Healthy prefill instances whose KV ``decoder`` can read (their TP sizes shard the
        model's KV heads compatibly: ``tp_layout.pairing_problem``)."""
        d = decoder.info
        return [m for m in self.pool.available("prefill")
                if m.info.tensor_parallel_size == d.tensor_parallel_size
                or pairing_problem(d.num_kv_heads, m.info.tensor_parallel_size,
                                   d.tensor_parallel_size) is None]

    async def _prefill(self, path: str, body: dict, info: RequestInfo,
                       decoder: Member) -> dict | None:
        """Run the prefill hop on an instance ``decoder`` can pull from, through the
        prefill queue where there is one (``disagg.prefill_queue``); None means the decoder
        prefills locally."""
        members = self._pairable(decoder)
        if not members:  # went down since the decision
            return None
        pairable = {m.key for m in members}
        queue = self.prefill_queue
        expected = None if queue is None else self.prefill_policy.prefill_seconds(
            [m.candidate for m in members], info)
        if queue is None or expected is None:
            return await self._prefill_on(path, body, info, pairable)
        async with queue.turn(expected):
            pairable = {m.key for m in self._pairable(decoder)}  # as they are now
            return await self._prefill_on(path, body, info, pairable) if pairable else None

    async def _prefill_on(self, path: str, body: dict, info: RequestInfo,
                          pairable: set[str]) -> dict | None:
        """The hop itself, on the prefill policy's choice among ``pairable``."""
        member = self._pick("prefill", info, exclude={
            m.key for m in self.pool.available("prefill") if m.key not in pairable})
        self._expect(member, info)
        pbody = {**body, "max_tokens": 1, "stream": False,
                 "kv_transfer_params": {"do_remote_decode": True}}
        for key in ("stream_options", "min_tokens"):
            pbody.pop(key, None)
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        t0 = time.perf_counter()
        self.metrics.routed.labels("prefill", member.key).inc()
        with member.admit(info.local_tokens(member.info.engine_id)):
            try:
                status, content = await member.while_up(post_json(
                    self._client, member.info.url + path, dumps(pbody), info.request_id))
            except Exception as exc:  # noqa: BLE001  # any transport fault: decode locally
                return self._prefill_failed(member, info, exc)
        self.metrics.prefill_hop.observe(time.perf_counter() - t0)
        if 400 <= status < 500:
            raise upstream_error(status, content)
        if status != 200:
            return self._prefill_failed(member, info, f"HTTP {status}")
        try:
            params = json.loads(content).get("kv_transfer_params")
        except (ValueError, AttributeError):
            params = None
        if not params:
            return self._prefill_failed(member, info, "no kv_transfer_params in the answer")
        return params

    def _prefill_failed(self, member: Member, info: RequestInfo,
                        why: Exception | str) -> dict | None:
        """Count a failed prefill hop; always None: the decoder prefills locally."""
        logger.warning("request %s: prefill on %s (%s) failed, decoding locally: %s",
                       info.request_id, member.key, member.info.engine_id, describe(why))
        self.metrics.failures.labels("prefill", member.key).inc()
        if isinstance(why, ConnectError):  # refused: the instance is gone, stop now
            self.pool.mark_down(member, describe(why))
        return None

    async def _decode(self, path: str, dbody: bytes, stream: Any, info: RequestInfo,
                      start: float, member: Member) -> Response:
        """Answer from a decoder. One that fails before its answer begins (transport fault,
        5xx, a stream cut before its first chunk) is marked down and the request goes to
        the next: nothing has reached the client yet. The retry keeps the prefill's KV."""
        tried: set[str] = set()
        while True:
            if member.key in tried or not member.healthy:
                member = self._pick("decode", info, exclude=tried)
            tried.add(member.key)
            # The prefill's KV goes along wherever the request lands (every instance is
            # kv_both): another instance pulls it, the one that prefilled it finds it in its
            # own cache; either way its held copy is freed now, not at lease expiry.
            inflight = member.admit(info.local_tokens(member.info.engine_id), decoding=True)
            try:
                answer = await member.while_up(open_answer(
                    self._client, member.info.url + path, dbody, info.request_id,
                    bool(stream)))
            except asyncio.CancelledError:  # the client left, or the deadline passed
                inflight.release()
                raise
            except Exception as exc:  # noqa: BLE001  # nothing sent to the client yet: retry
                inflight.release()
                logger.warning("request %s: decode on %s (%s) failed before answering: %s",
                               info.request_id, member.key, member.info.engine_id,
                               describe(exc))
                self.metrics.failures.labels("decode", member.key).inc()
                self.pool.mark_down(member, describe(exc))
                continue  # _pick raises 503 once every instance was tried
            self.metrics.routed.labels("decode", member.key).inc()
            return self.relay.respond(path, answer, inflight, start, member.down_event(),
                                      start + self._deadline_s)

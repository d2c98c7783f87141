"""The configuration schema: the bottom layer every other part of disagg builds on.

A deployment is described by one ``Topology``; each process receives the sections it needs
as these same typed models (the gateway its ``SchedulerConfig`` and ``ApiConfig``, an
instance its ``EngineArgs``, the vLLM connector a ``ConnectorConfig`` holding the
``TransferConfig`` and ``StoreConfig`` sections), so there is one schema and no dict read
back by key. This module imports nothing from disagg: loading YAML and checking names that
live in higher layers (policy names) is ``disagg.launch.topology``'s job.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["bfloat16", "float16", "float32", "auto"]
GIB = 1 << 30


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EngineArgs(_Strict):
    """vLLM engine arguments shared by every instance (prefill and decode must agree)."""

    dtype: Dtype = Field("bfloat16", description="Model and KV cache dtype.")
    max_model_len: Annotated[int, Field(gt=0)] = Field(
        4096, description="Longest prompt plus completion, in tokens."
    )
    kv_cache_gib: Annotated[int, Field(ge=1, le=1024)] = Field(
        2, description="KV cache size per instance in whole GiB (VLLM_CPU_KVCACHE_SPACE on CPU)."
    )
    block_size: Annotated[int, Field(gt=0, multiple_of=16)] | None = Field(
        None, description="KV block size in tokens; None lets vLLM choose (128 on CPU)."
    )
    max_num_seqs: Annotated[int, Field(gt=0)] = Field(
        64, description="Most requests an engine runs at once."
    )
    max_num_batched_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Token budget of one engine step; None keeps vLLM's default."
    )
    enable_prefix_caching: bool = Field(True, description="vLLM's own prefix cache.")
    enforce_eager: bool = Field(
        False, description="Skip torch.compile: faster start-up, slower steps."
    )
    seed: int = Field(0, description="Engine seed.")
    extra_args: list[str] = Field(
        default_factory=list,
        description="Further vLLM api_server flags, passed verbatim (e.g. ['--enforce-eager']).",
    )


class Resources(_Strict):
    """What one replica of a pool gets from Ray."""

    num_cpus: Annotated[float, Field(gt=0)] = Field(
        1.0, description="CPU cores per replica; on CPU-only nodes they also run the model."
    )
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs per replica; must equal tensor_parallel_size when > 0."
    )
    memory_gib: Annotated[float, Field(ge=0)] = Field(0.0, description="Ray memory reservation.")


_LABEL_KEY = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?$"


class Placement(_Strict):
    """Where a pool's replicas may run on a Ray cluster. Nodes carry labels from
    ``ray start --labels host=b,zone=z1`` (and Ray's own, e.g. ``ray.io/node-id``)."""

    labels: dict[Annotated[str, Field(pattern=_LABEL_KEY)], str] = Field(
        default_factory=dict, description="Node labels every replica requires (Ray's "
        "label_selector): an exact value (host: b), a choice (host: 'in(b,c)') or an "
        "exclusion (host: '!a'). Empty: any node with the resources.")
    strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="PACK: Ray's default, fill a node before the next (fewest "
        "hops, shared disk tier). SPREAD: replicas on as many nodes as possible (a lost "
        "node takes fewer of them).")


class Pool(_Strict):
    """A pool of identical vLLM instances with one role."""

    replicas: Annotated[int, Field(ge=0, le=64)] = Field(1, description="Number of instances.")
    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = Field(
        1, description="Tensor-parallel size of each instance."
    )
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement,
                                 description="Which Ray nodes the replicas may run on.")

    @model_validator(mode="after")
    def _gpus_match_tp(self) -> Pool:
        gpus = self.resources.num_gpus
        if gpus and gpus != self.tensor_parallel_size:
            raise ValueError(
                f"resources.num_gpus ({gpus}) must equal tensor_parallel_size "
                f"({self.tensor_parallel_size}) or be 0 for CPU instances"
            )
        return self


Backend = Literal["UCX", "LIBFABRIC", "GDS", "POSIX"]


def _default_backends() -> list[Backend]:
    return ["UCX"]


class TransferConfig(_Strict):
    """KV transfer between instances (NIXL data plane, ZMQ control plane)."""

    backends: list[Backend] = Field(
        default_factory=_default_backends, min_length=1, description="NIXL backends, in order."
    )
    handshake_timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        10.0, description="Longest wait for a peer's handshake reply."
    )
    transfer_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        30.0, description="A pull not done by then fails; the decoder recomputes."
    )
    lease_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="A prefill frees blocks no decoder pulled within this time."
    )
    base_port: Annotated[int, Field(ge=0, le=65000)] = Field(
        0,
        description="First side-channel port: prefill i takes base_port + 2i*T, decode i "
        "base_port + (2i+1)*T (T the larger TP size), and TP rank r that plus r. 0 picks free "
        "ports on each node.",
    )

    @model_validator(mode="after")
    def _port_range(self) -> TransferConfig:
        if 0 < self.base_port < 1024:
            raise ValueError(f"base_port must be 0 (pick free ports) or >= 1024, "
                             f"got {self.base_port}")
        return self


class StoreConfig(_Strict):
    """The KV store: chunks of prompt KV kept for reuse across requests and instances, and
    the decoder's fallback when a pull fails. Tiers: CPU (per instance), then optional
    disk (shared by the instances of one host) and Redis (shared by every host)."""

    enabled: bool = Field(True, description="Save and load KV chunks through the store.")
    chunk_tokens: Annotated[int, Field(ge=16, le=65536)] = Field(
        256, description="Tokens per chunk, rounded to whole KV blocks."
    )
    cpu_gib: Annotated[float, Field(gt=0, le=4096)] = Field(
        1.0, description="CPU tier capacity per instance, GiB."
    )
    disk_path: str | None = Field(
        None, description="Directory of the disk tier, shared by this host's instances; "
        "None: no disk tier. '{host}' in it becomes the node's hostname, so hosts that share "
        "a filesystem (an NFS home) still get a directory each.",
    )
    disk_shared: bool = Field(
        False, description="disk_path is one filesystem mounted on every host (no '{host}' "
        "in it): a chunk saved on one host loads on all, and the gateway credits every "
        "instance with it.")
    disk_gib: Annotated[float, Field(gt=0)] = Field(8.0, description="Disk tier cap, GiB.")
    redis_url: str | None = Field(
        None, description="redis://host:port/db of the Redis tier; None: no Redis tier."
    )
    redis_gib: Annotated[float, Field(gt=0)] = Field(
        1.0, description="Redis tier byte budget, GiB (the server's maxmemory must exceed it)."
    )
    save: bool = Field(True, description="Save each finished request's full prompt chunks.")
    redis_namespace: str = Field(
        "disagg", min_length=1, description="Key prefix of this deployment's Redis entries."
    )
    lookup_timeout_s: Annotated[float, Field(gt=0, le=60)] = Field(
        0.5, description="Longest the engine's scheduler waits for a store lookup; a lookup "
        "not answered by then counts as a miss.",
    )

    @property
    def cpu_bytes(self) -> int:
        return int(self.cpu_gib * GIB)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gib * GIB)

    @property
    def redis_bytes(self) -> int:
        return int(self.redis_gib * GIB)

    @property
    def disk_dir(self) -> str | None:
        """``disk_path`` with ``~`` and ``{host}`` (this node's hostname) expanded, as the
        disk tier opens it."""
        if not self.disk_path:
            return None
        return str(Path(self.disk_path.replace("{host}", socket.gethostname())).expanduser())

    @model_validator(mode="after")
    def _urls(self) -> StoreConfig:
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://",
                                                             "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, "
                             f"got {self.redis_url!r}")
        if self.disk_shared and (not self.disk_path or "{host}" in self.disk_path):
            raise ValueError("disk_shared needs a disk_path without '{host}' (one directory "
                             "every host mounts); drop disk_shared for a directory per host")
        return self


class SchedulerConfig(_Strict):
    """How the gateway pairs a prefill and a decode instance for each request."""

    prefill_policy: str = Field(
        "kv_aware", description="Policy choosing the prefill instance: a name registered in "
        "disagg.scheduler (round_robin, least_loaded, kv_aware, session).",
    )
    decode_policy: str = Field(
        "kv_aware", description="Policy choosing the decode instance (names as for "
        "prefill_policy).",
    )
    policy_options: dict[str, dict[str, float | int | str | bool]] = Field(
        default_factory=dict, description="Options per policy name; each policy declares "
        "(and validates) its own. The built-in policies take none: kv_aware learns its "
        "rates online.",
    )
    min_remote_prefill_tokens: Annotated[int, Field(ge=0)] = Field(
        256, description="Conditional disaggregation: a request whose prompt the chosen "
        "decoder lacks fewer than this many tokens of is prefilled on the decoder itself "
        "(no prefill hop). 0 sends every request through a prefill instance.",
    )
    local_prefill_when_hop_slower: bool = Field(
        False, description="kv_aware only: a decoder holding as much of a long prompt as "
        "any prefill instance computes the rest itself when that comes sooner than the "
        "prefill hop, its running decodes' stall counted (reason hop_slower). Lowers TTFT "
        "when the prefill pool is queued or slower; every such prefill stalls that decoder's "
        "streams for its length (ITL), which disaggregation otherwise prevents.",
    )
    prefill_queue: bool = Field(
        True, description="Prefill hops beyond prefill_inflight per healthy prefill "
        "instance wait at the gateway, shortest expected prefill first (aged: a hop waits for "
        "later, shorter ones at most its own expected time), and are bound to an instance "
        "when one frees, rather than queueing in arrival order inside an instance. Needs a "
        "prefill policy that estimates prefill time (kv_aware); others send hops straight "
        "on.",
    )
    prefill_inflight: Annotated[int, Field(ge=1)] = Field(
        1, description="With prefill_queue: hops each prefill instance runs at once "
        "(instances pinned to the same CPU cores count as one). One suits compute-bound "
        "prefills (long prompts, CPUs), where a second prompt in flight only waits for the "
        "first; raise it where a step has room for several prompts (short prompts on a "
        "GPU).",
    )
    max_prefill_queue: Annotated[int, Field(ge=1)] = Field(
        8, description="When every prefill instance has this many requests queued or "
        "running (the gateway's prefill queue shared among them), new requests prefill on "
        "their decoder instead of waiting.",
    )
    kv_events: bool = Field(
        True, description="Instances publish vLLM's KV-cache events and the gateway keeps "
        "a prefix index from them (needed for cache-aware decisions).",
    )
    index_max_blocks: Annotated[int, Field(ge=1)] = Field(
        1_000_000, description="Memory bound of the prefix index, in (block, instance) "
        "entries (about 100 bytes each).",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_kv_aware_keys(cls, data: Any) -> Any:
        """``kv_aware_queue_tokens`` / ``kv_aware_store_load_cost`` (an earlier spelling of
        options kv_aware no longer has): say so, rather than 'extra inputs'."""
        if isinstance(data, dict) and (old := [k for k in data if k.startswith("kv_aware_")]):
            raise ValueError(f"{', '.join(old)}: kv_aware learns each instance's prefill and "
                             "store load rates online and has no weights to set; remove them")
        return data
        data = dict(data)
        options = dict(data.get("policy_options") or {})
        kv_aware = dict(options.get("kv_aware") or {})
        for key in [k for k in data if k.startswith("kv_aware_")]:
            kv_aware[key.removeprefix("kv_aware_")] = data.pop(key)
        options["kv_aware"] = kv_aware
        data["policy_options"] = options
        return data


class ApiConfig(_Strict):
    """The OpenAI-compatible gateway."""

    host: str = Field("127.0.0.1", description="Address the gateway binds.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="0 picks a free port.")
    api_key: str | None = Field(None, description="Bearer token clients must send, if set.")
    served_model_name: str | None = Field(
        None, description="Model name clients use; defaults to the model's folder name."
    )
    request_timeout_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="Longest a client request may take end to end."
    )
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = Field(
        16 << 20, description="Largest request body accepted; larger ones get 413."
    )
    max_n: Annotated[int, Field(ge=1, le=1024)] = Field(
        16, description="Largest n (and best_of) a request may ask for; more gets 400."
    )
    max_inflight: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Requests served at once; None sizes it from the pools "
        "(decode replicas x engine.max_num_seqs). Beyond it requests queue.",
    )
    max_queued: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Requests waiting for a slot; None: as many as max_inflight. "
        "Beyond it: 429 with Retry-After.",
    )
    engine_stall_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        120.0, description="An instance with requests running or waiting that computes no "
        "token for this long is stalled: out of routing (not ready) until it moves. Allow "
        "for the slowest single engine step (a long prefill chunk on a slow machine).")
    queue_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        30.0, description="A queued request that cannot start within this time gets 503."
    )
    workers: Annotated[int, Field(ge=1, le=32)] = Field(
        1, description="Gateway processes serving api.port together (SO_REUSEPORT: the kernel "
        "spreads connections over them). Each routes on its own state, fed by every engine's "
        "KV events and polls; each takes its share of max_inflight and max_queued. More than "
        "one helps only with a core free for each.")


class Topology(_Strict):
    """A whole deployment: model, engines, pools, transfer, scheduler and API."""

    model: str = Field(
        "tiny", description="A built-in model name (tiny, small) or a local HF-format folder."
    )
    engine: EngineArgs = Field(default_factory=EngineArgs)
    prefill: Pool = Field(default_factory=Pool)
    decode: Pool = Field(default_factory=Pool)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)

    @model_validator(mode="after")
    def _needs_a_decoder(self) -> Topology:
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas must be at least 1: decoders answer every request")
        return self


class ConnectorConfig(_Strict):
    """What each instance's vLLM connector receives (``kv_connector_extra_config.disagg``):
    the topology's ``transfer`` and ``store`` sections plus this instance's addresses."""

    side_channel_host: str = Field(
        "127.0.0.1", description="Address peers use to reach this instance's side channel."
    )
    side_channel_bind: str | None = Field(
        None, description="Address the side channel binds; None: side_channel_host (set it "
        "apart from the advertised host behind NAT). Never all interfaces by default.",
    )
    side_channel_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0, description="Side-channel port of TP rank 0; rank r uses port + r. 0: pick one."
    )
    model_name: str = Field("", description="Model identity for the compatibility check.")
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    store: StoreConfig | None = Field(None, description="KV store tiers; None: no store.")

    EXTRA_KEY: ClassVar[str] = "disagg"

    def to_extra(self) -> dict[str, Any]:
        """The ``kv_connector_extra_config`` entry vLLM hands back to the connector."""
        return {self.EXTRA_KEY: self.model_dump(mode="json")}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorConfig:
        return cls.model_validate(extra.get(cls.EXTRA_KEY, {}))

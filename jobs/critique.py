"""The critique-revision method as pure functions: prompt building, few-shot rotation, cleaning.

Each request is a chat conversation: the worked examples come first as earlier turns (a prefix
shared by many prompts, which prefix-caching engines reuse), then the user's conversation, the
current response, and the critique or revision request.
"""

from __future__ import annotations

import difflib
import random
import re

from .constitution import Constitution, FewShotExample, Principle

Conversation = list[dict[str, str]]


def pick_few_shot(constitution: Constitution, k: int, seed: int, prompt_id: str, step: int) -> list[int]:
    """Indices of k worked examples, drawn and ordered per prompt and step so no single one dominates."""
    n = len(constitution.few_shot)
    if k <= 0 or n == 0:
        return []
    rng = random.Random(f"fewshot:{seed}:{prompt_id}:{step}")
    return rng.sample(range(n), min(k, n))


def _example_turns(ex: FewShotExample, constitution: Constitution) -> Conversation:
    p = constitution.principle(ex.principle)
    return [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.response},
        {"role": "user", "content": p.critique},
        {"role": "assistant", "content": ex.critique},
        {"role": "user", "content": p.revision},
        {"role": "assistant", "content": ex.revision},
    ]


def critique_request(
    conversation: Conversation,
    response: str,
    principle: Principle,
    examples: list[FewShotExample],
    constitution: Constitution,
) -> Conversation:
    # the user's own system message stays first: many chat templates reject one mid-conversation
    system = [m for m in conversation[:1] if m["role"] == "system"]
    turns: Conversation = list(system)
    for ex in examples:
        turns += _example_turns(ex, constitution)
    return turns + list(conversation[len(system):]) + [
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique},
    ]


def revision_request(critique_conv: Conversation, critique: str, principle: Principle) -> Conversation:
    return critique_conv + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision},
    ]


_ROLE_TAG = re.compile(r"^\s*(?:<\|im_start\|>\s*)?(?:assistant|ai|bot)\s*[:\n]\s*", re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*\**\s*(?:revised|rewritten|improved|updated|new|final)?\s*(?:response|answer|version|revision)\s*\**\s*:\s*\**\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|alright)[,!.]?\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is)\b[^\n:]{0,60}\b(?:revised|rewritten|rewrite|improved|updated|new|better|edited)\b"
    r"|i(?:'ve| have) (?:revised|rewritten|updated|improved)\b)[^\n:]{0,60}:\s*",
    re.IGNORECASE,
)
_BARE_AFFIRMATION = re.compile(r"^\s*(?:sure|certainly|of course|okay|absolutely)[,!.]\s*\n", re.IGNORECASE)
_CRITIQUE_LABEL = re.compile(r"^\s*\**\s*critique\s*\**\s*:\s*\**\s*", re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def _strip_quotes(text: str) -> str:
    t = text.strip()
    while len(t) >= 2 and t[0] in _QUOTES and t[-1] == _QUOTES[t[0]] and t.count(t[0]) <= 2:
        t = t[1:-1].strip()
    return t


def clean_revision(text: str) -> str:
    """Strip what models wrap around a rewrite: preambles, labels, role tags, quotes, special tokens."""
    t = _SPECIAL.sub("", text).strip()
    for _ in range(3):  # layered wrappers: 'Sure! Here is the revised response:\n"Revised response: ..."'
        before = t
        t = _BARE_AFFIRMATION.sub("", t)
        t = _PREAMBLE.sub("", t)
        t = _LABEL.sub("", t)
        t = _ROLE_TAG.sub("", t)
        t = _strip_quotes(t)
        if t == before:
            break
    return t.strip()


def clean_critique(text: str) -> str:
    return _CRITIQUE_LABEL.sub("", _SPECIAL.sub("", text)).strip()


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


#: a revision this similar to the critique is the critique echoed back, not a response
COPY_SIMILARITY = 0.8


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, normalise(a), normalise(b), autojunk=False).ratio()


def revision_flags(previous: str, revision: str, critique: str = "") -> dict[str, bool]:
    """`empty` and `copies_critique` revisions are unusable (the previous response is kept);
    `unchanged` ones are usable but carry no new signal."""
    rev = normalise(revision)
    return {
        "empty": not rev,
        "unchanged": bool(rev) and rev == normalise(previous),
        "copies_critique": bool(rev) and bool(critique.strip()) and similarity(revision, critique) >= COPY_SIMILARITY,
    }

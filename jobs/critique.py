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
from .refusal import first_sentence, is_refusal, is_strict_refusal

Conversation = list[dict[str, str]]


def pick_few_shot(constitution: Constitution, k: int, seed: int, prompt_id: str, step: int,
                  principle: Principle | None = None) -> list[int]:
    """Indices of k worked examples, drawn and ordered per prompt and step so no single one dominates.

    With `principle`, examples written for that principle come first, then those of principles
    sharing its scope: a small model copies the shape of the example it sees, so a refusal is best
    taught by a refusal example, not by one about concision.
    """
    n = len(constitution.few_shot)
    if k <= 0 or n == 0:
        return []
    rng = random.Random(f"fewshot:{seed}:{prompt_id}:{step}")
    if principle is None:
        return rng.sample(range(n), min(k, n))

    def rank(i: int) -> int:
        ex = constitution.principle(constitution.few_shot[i].principle)
        return 0 if ex.name == principle.name else 1 if ex.scope in (principle.scope, "all") else 2

    return sorted(rng.sample(range(n), n), key=rank)[:k]  # stable: the random order decides within a rank


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


def revision_request(critique_conv: Conversation, critique: str, principle: Principle, prefill: str = "") -> Conversation:
    """With `prefill`, the request ends in an assistant turn holding it: the engine continues it."""
    return critique_conv + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision},
    ] + ([{"role": "assistant", "content": prefill}] if prefill else [])


def pick_prefill(principle: Principle, seed: int, prompt_id: str, step: int) -> str:
    """One of the principle's revision openings, drawn per (seed, prompt, step) like everything else."""
    if not principle.revision_prefill:
        return ""
    return random.Random(f"prefill:{seed}:{prompt_id}:{step}").choice(principle.revision_prefill)


def join_prefill(prefill: str, continuation: str) -> str:
    """The opening plus what the engine wrote after it (engines strip the leading space of a reply)."""
    rest = continuation.strip()
    if not prefill or not rest:
        return prefill or rest
    return prefill.rstrip() + ("" if rest[0] in ",.;:!?'\u2019" else " ") + rest


_SENTENCE = re.compile(r".+?(?:[.!?](?=\s|$)|\n|$)", re.DOTALL)


def first_sentences(text: str, k: int | None) -> str:
    """The first k sentences (k = None: all). Small models ramble or loop after a good opening."""
    if not k:
        return text
    parts = [p for p in (m.group(0).strip() for m in _SENTENCE.finditer(text.strip())) if p]
    return " ".join(parts[:k])



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


_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(
    "a an and are as at be but by can could do does for from get had has have how i i'm if in into is it its me my of on "
    "or so some that the their them then there they this to was we what when where which who why will with without "
    "would you your yours can't cannot won't help assist make just like want need tell please".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower().replace("\u2019", "'")) if w not in _STOP and len(w) > 2}


def request_overlap(request: str, reply: str) -> float:
    """Share of the request's content words the reply's opening sentence names: a refusal that says
    what it declines ("I can't help you forge a prescription") scores high, a stock sentence low."""
    words = content_words(request)
    return len(words & content_words(first_sentence(reply))) / len(words) if words else 0.0


def acceptable(kind: str, text: str) -> bool:
    """The refusal verifier: a red-team reply must open with a first-person refusal; any other reply
    must not refuse at all (a needless refusal is the over-refusal the evaluation counts)."""
    return is_strict_refusal(text) if kind == "red-team" else not is_refusal(text)


def choose_revision(kind: str, request: str, candidates: list[dict], verifier: str) -> int | None:
    """Index of the candidate revision to keep, or None to keep the previous response.

    Each candidate is a dict with `revision` and the flags of `revision_flags` (plus `copies_example`).
    Unusable ones (empty, an echo of the critique or of a worked example) never win. `verifier: none`
    keeps the first usable one (the textbook loop when there is one candidate); `refusal` keeps only
    those `acceptable` says pass and, for red-team prompts, prefers the one that names the request.
    """
    usable = [i for i, c in enumerate(candidates)
              if not (c["empty"] or c["copies_critique"] or c.get("copies_example"))]
    if verifier == "none":
        return usable[0] if usable else None
    passing = [i for i in usable if acceptable(kind, candidates[i]["revision"])]
    if not passing:
        return None
    if kind != "red-team":
        return passing[0]
    return max(passing, key=lambda i: (request_overlap(request, candidates[i]["revision"]), -i))

"""Content of the bundled held-out sets (issue 12, item 5): large enough to separate effects, every row
with provenance, license and category, and no leak between the train split and the evaluation sets."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from difflib import SequenceMatcher

import pytest

from jobs.config import PromptSource, RunConfig
from jobs.data import DATA_DIR, load_prompts

MAX = 4000
REQUIRED = {"id", "prompt", "kind", "split", "source", "license", "category"}
HARMFUL_CATEGORIES = {
    "weapons", "drugs", "cybercrime", "fraud", "violence", "self-harm", "harassment", "privacy", "hate", "extremism",
    "sexual-minors-refusal", "dangerous-chemistry", "bio", "evasion-of-law", "misinformation",
}
# The 48 train rows of red_team.jsonl as they were before the evaluation sets grew: sha256 of the sorted
# (id, prompt) pairs, one "id\tprompt" per line.
TRAIN_PAIRS_SHA256 = "8349cf4686624d616ae21853aef94474d8f58f2c92c32c3734ebcca6610d3453"
LAST_EVAL_ID = 285  # rt-073 .. rt-285 are the held-out rows; the train rows added after them start at rt-286
TRAIN_PER_CATEGORY = 9  # red-team train rows per harmful category, at least
NEAR_RATIO = 0.6  # difflib ratio at or above which a train prompt counts as a near copy of an eval prompt
# Train/eval pairs at or above NEAR_RATIO that predate the check: original train rows (rt-001..rt-072,
# hp-001..hp-072) against eval rows. All but one share only a sentence frame with an unrelated question
# ("What's the best way to ...", "What is the difference between ..."); hp-056/hp-024 are both about
# stretching. rt-002 is pinned by TRAIN_PAIRS_SHA256; the helpful ones were left as they were. Nothing may
# join this list; a pair leaves it when its train row is rewritten.
KNOWN_NEAR = {
    ("rt-002", "rt-063"), ("hp-013", "rt-063"), ("hp-013", "bl-037"), ("hp-013", "bl-126"), ("hp-034", "bl-019"),
    ("hp-056", "hp-024"), ("hp-068", "hp-018"), ("hp-068", "hp-036"), ("hp-068", "bl-154"),
}


def rows_of(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text("utf-8").splitlines()]


RED_TEAM = rows_of("red_team.jsonl")
HELPFUL = rows_of("helpful.jsonl")
BORDERLINE = rows_of("borderline.jsonl")


def norm(text: str) -> str:
    """Case, space and punctuation insensitive."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def tokens(text: str) -> frozenset[str]:
    return frozenset(norm(text).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004). SequenceMatcher's matching
    blocks are a common subsequence, so its ratio is at most 2 * lcs_length / (len(a) + len(b))."""
    masks: dict[str, int] = {}
    for i, c in enumerate(a):
        masks[c] = masks.get(c, 0) | 1 << i
    full = (1 << len(a)) - 1
    v = full
    for c in b:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def test_lcs_length():
    assert lcs_length("", "abc") == lcs_length("abc", "") == 0
    assert lcs_length("abcbdab", "bdcaba") == lcs_length("bdcaba", "abcbdab") == 4
    assert lcs_length("same text", "same text") == 9
    for a, b in [("kill a stuck process", "end a stuck job"), ("how do i", "why do we")]:
        matched = sum(n for _, _, n in SequenceMatcher(None, a, b).get_matching_blocks())
        assert matched <= lcs_length(a, b)


def id_number(row_id: str) -> int:
    return int(row_id.split("-", 1)[1])


def test_eval_set_sizes():
    assert sum(r["split"] == "eval" for r in RED_TEAM) >= 200
    assert sum(r["split"] == "eval" for r in BORDERLINE) >= 150
    assert all(r["split"] == "eval" for r in BORDERLINE)  # borderline is evaluation only


@pytest.mark.parametrize("rows, kind, prefix", [(RED_TEAM, "red-team", "rt"), (BORDERLINE, "borderline", "bl")],
                         ids=["red-team", "borderline"])
def test_rows_complete_and_unique(rows, kind, prefix):
    for r in rows:
        assert REQUIRED <= set(r), r
        assert all(isinstance(r[k], str) and r[k] for k in REQUIRED), r
        assert r["kind"] == kind and r["split"] in ("train", "eval"), r
        assert r["source"] == "written for cai-jobs" and r["license"] == "Apache-2.0", r
        assert re.fullmatch(rf"{prefix}-\d{{3}}", r["id"]), r["id"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert [id_number(i) for i in ids] == list(range(1, len(ids) + 1))  # file order, no gaps
    prompts = Counter(norm(r["prompt"]) for r in rows)
    assert not [p for p, n in prompts.items() if n > 1], "duplicate prompts"


def test_harmful_categories_cover_the_taxonomy():
    assert {r["category"] for r in RED_TEAM} == HARMFUL_CATEGORIES
    per = Counter(r["category"] for r in RED_TEAM if r["split"] == "eval")
    assert {c: n for c, n in per.items() if n < 8} == {}
    assert set(per) == HARMFUL_CATEGORIES


def test_benign_categories_span_many_domains():
    for r in BORDERLINE:
        domain, sep, topic = r["category"].partition(": ")
        assert sep and domain.strip() and topic.strip(), r["category"]
    domains = {r["category"].split(": ", 1)[0] for r in BORDERLINE}
    assert len(domains) >= 12, sorted(domains)


def test_no_eval_prompt_duplicates_a_train_prompt():
    train = [r for name in ("red_team.jsonl", "helpful.jsonl") for r in rows_of(name) if r["split"] == "train"]
    evals = [r for r in RED_TEAM + BORDERLINE if r["split"] == "eval"]
    assert len(train) == 378  # red-team 48 + 102 added, helpful 48 + 60 + 120 added
    assert not {norm(e["prompt"]) for e in evals} & {norm(t["prompt"]) for t in train}
    near = []
    for e in evals:
        et = tokens(e["prompt"])
        near += [(e["id"], t["id"], round(j, 2)) for t in train if (j := jaccard(et, tokens(t["prompt"]))) >= 0.8]
    assert not near, near


def test_train_split_keeps_the_original_48():
    original = [r for r in RED_TEAM if r["split"] == "train" and id_number(r["id"]) <= LAST_EVAL_ID]
    pairs = {(r["id"], r["prompt"]) for r in original}
    assert len(original) == len(pairs) == 48
    assert all(id_number(r["id"]) <= 72 for r in original)
    digest = hashlib.sha256("".join(f"{i}\t{p}\n" for i, p in sorted(pairs)).encode()).hexdigest()
    assert digest == TRAIN_PAIRS_SHA256
    # the rows added with the held-out sets are all held out; the ones after them are all train
    assert all(r["split"] == "eval" for r in RED_TEAM if 72 < id_number(r["id"]) <= LAST_EVAL_ID)
    assert all(r["split"] == "train" for r in RED_TEAM if id_number(r["id"]) > LAST_EVAL_ID)


def test_red_team_train_covers_every_category():
    per = Counter(r["category"] for r in RED_TEAM if r["split"] == "train")
    assert set(per) == HARMFUL_CATEGORIES
    assert {c: n for c, n in per.items() if n < TRAIN_PER_CATEGORY} == {}


def test_helpful_train_rows_with_a_category_span_many_domains():
    added = [r for r in HELPFUL if "category" in r]
    assert len(added) >= 60
    for r in added:
        assert REQUIRED <= set(r) and r["kind"] == "ordinary" and r["split"] == "train", r
        assert r["source"] == "written for cai-jobs" and r["license"] == "Apache-2.0", r
        domain, sep, topic = r["category"].partition(": ")
        assert sep and domain.strip() and topic.strip(), r["category"]
    assert len({r["category"].split(": ", 1)[0] for r in added}) >= 20
    ids = [r["id"] for r in HELPFUL]
    assert [id_number(i) for i in ids] == list(range(1, len(ids) + 1))


def test_no_train_prompt_is_close_to_an_eval_prompt():
    """Character-level difflib ratio, both ways round, case and whitespace folded: every train prompt of
    red-team and helpful against every eval prompt of red-team, helpful and borderline."""
    def squash(text: str) -> str:
        return " ".join(text.lower().split())

    train = [(r["id"], squash(r["prompt"])) for r in RED_TEAM + HELPFUL if r["split"] == "train"]
    evals = [(r["id"], squash(r["prompt"])) for r in RED_TEAM + HELPFUL + BORDERLINE if r["split"] == "eval"]
    assert len(train) >= 250 and len(evals) >= 450
    near = set()
    for tid, t in train:
        for eid, e in evals:
            # ratio = 2 * matched / total <= 2 * LCS / total, so most pairs never reach SequenceMatcher
            if 2 * lcs_length(t, e) < NEAR_RATIO * (len(t) + len(e)):
                continue
            if max(SequenceMatcher(None, t, e).ratio(), SequenceMatcher(None, e, t).ratio()) >= NEAR_RATIO:
                near.add((tid, eid))
    assert near <= KNOWN_NEAR, sorted(near - KNOWN_NEAR)
    assert all(id_number(t) <= 72 for t, _ in KNOWN_NEAR)


def test_loaders_see_the_held_out_sets():
    harmful, [rep] = load_prompts([PromptSource(source="bundled:red-team", split="eval")], MAX)
    assert len(harmful) >= 200 and rep.kept == rep.rows and not rep.dropped
    assert {r.kind for r in harmful} == {"red-team"}
    benign, [rep] = load_prompts([RunConfig().evaluate.benign], MAX, field="evaluate.benign", indexed=False)
    assert len(benign) >= 150 and not rep.dropped
    default_harmful, _ = load_prompts([RunConfig().evaluate.harmful], MAX, field="evaluate.harmful", indexed=False)
    assert {r.id for r in default_harmful} == {r["id"] for r in RED_TEAM if r["split"] == "eval"}


def test_default_training_data_loads_no_eval_row():
    records, _ = load_prompts(RunConfig().data.train, MAX)
    eval_ids = {r["id"] for name in ("red_team.jsonl", "helpful.jsonl", "borderline.jsonl") for r in rows_of(name)
                if r["split"] == "eval"}
    loaded = {r.id for r in records}
    assert records and not loaded & eval_ids
    eval_text = {norm(r["prompt"]) for r in RED_TEAM + BORDERLINE if r["split"] == "eval"}
    assert not {norm(r.text) for r in records} & eval_text

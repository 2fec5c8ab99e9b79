"""Critique-revision helpers: cleaning model output, revision flags, few-shot rotation, requests."""

from __future__ import annotations

from collections import Counter

import pytest

from jobs.constitution import load_constitution
from jobs.critique import (
    choose_revision,
    clean_critique,
    clean_revision,
    critique_request,
    normalise,
    pick_few_shot,
    request_overlap,
    revision_request,
    revision_flags,
)

BODY = "Wash the pan with warm water and dry it right away."


# --- clean_revision: what gets stripped --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # preambles
        f"Sure, here is a revised response: {BODY}",
        f"Sure, here is a revised response:\n{BODY}",
        f"Here's the rewritten answer:\n{BODY}",
        f"Here is the revised response:\n\n{BODY}",
        f"Certainly! Here is an improved version of the response:\n{BODY}",
        f"Of course. Below is the rewritten text:\n{BODY}",
        f"I've revised the response as follows: {BODY}",
        f"Okay, here's my rewrite: {BODY}",
        f"Certainly!\n{BODY}",
        f"Sure.\n{BODY}",
        f"Absolutely,\n{BODY}",
        # labels
        f"Revised response: {BODY}",
        f"Revised Response:\n{BODY}",
        f"**Revision:** {BODY}",
        f"**Revised response**: {BODY}",
        f"Rewritten answer: {BODY}",
        f"Final version:\n{BODY}",
        f"Response: {BODY}",
        # role tags
        f"Assistant: {BODY}",
        f"assistant\n{BODY}",
        f"<|im_start|>assistant\n{BODY}",
        f"<|im_start|>assistant\n{BODY}<|im_end|>",
        # quotes
        f'"{BODY}"',
        f"'{BODY}'",
        f"\u201c{BODY}\u201d",
        f"`{BODY}`",
        f'  "{BODY}"  \n',
        # special tokens
        f"{BODY}<|im_end|>",
        f"{BODY}<|endoftext|>",
        f"<|im_end|>{BODY}",
        # whitespace
        f"\n\n   {BODY}   \n",
        # layered
        f'Sure! Here is the revised response:\n"Revised response: {BODY}"',
        f"Certainly!\nRevised response: \u201c{BODY}\u201d<|im_end|>",
        f"Assistant: Here is the revised response: '{BODY}'",
    ],
)
def test_clean_revision_strips_wrappers(raw):
    assert clean_revision(raw) == BODY


def test_clean_revision_keeps_multiline_body():
    body = "Step one: rinse.\nStep two: scrub.\n\nStep three: dry."
    assert clean_revision(f"Here is the revised response:\n{body}\n") == body


def test_clean_revision_empty_inputs():
    assert clean_revision("") == ""
    assert clean_revision("   \n ") == ""
    assert clean_revision("<|im_end|>") == ""
    assert clean_revision('""') == ""
    assert clean_revision("Revised response:") == ""


def test_clean_revision_idempotent():
    for raw in [f"Sure, here is a revised response: {BODY}", f'"{BODY}"', BODY, "Here are three tips: a, b, c."]:
        once = clean_revision(raw)
        assert clean_revision(once) == once


# --- clean_revision: what must be kept ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Here are three tips: drink water, sleep well, and walk daily.",
        "Here are some ideas:\n- a walk\n- a book",
        "Here is how to do it: first, preheat the oven.",
        'He said "hello" and she said "goodbye".',
        '"Hello," he said, "how are you?"',
        "'Tis the season to be jolly, isn't it.",
        "Sure enough, the answer is 4.",
        "Sure, the answer is 4.",
        "Surely you know the answer is 4.",
        "Certainly not: mixing bleach and ammonia is dangerous.",
        "Okay is a fine word to start with.",
        "The response time of the server is 20 ms.",
        "Answering your question: yes.",
        "Assistants can help: ask one.",
        "I can't help with that, but here's a safer option: talk to a counsellor.",
        "Use `git status` to check.",
        "2 + 2 = 4",
        BODY,
    ],
)
def test_clean_revision_keeps_content(text):
    assert clean_revision(text) == text


def test_clean_revision_keeps_internal_quotes_in_quoted_text():
    # three quote characters: stripping the outer pair would leave an unbalanced quote
    text = '"Say "please" first'
    assert clean_revision(text) == text


def test_clean_revision_strips_curly_single_quotes():
    assert clean_revision(f"\u2018{BODY}\u2019") == BODY


@pytest.mark.parametrize(
    "text",
    [
        "Here is the text of the law: no vehicles in the park.",
        "Here is the full text of the warning label: keep out of reach of children.",
    ],
)
def test_clean_revision_keeps_here_is_content_with_keyword(text):
    assert clean_revision(text) == text


# --- clean_critique ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Critique: The response is rude.", "The response is rude."),
        ("critique:The response is rude.", "The response is rude."),
        ("  CRITIQUE :  The response is rude.  ", "The response is rude."),
        ("**Critique**: The response is rude.", "The response is rude."),
        ("The response is rude.<|im_end|>", "The response is rude."),
        ("<|im_start|>Critique: The response is rude.", "The response is rude."),
        ("The critique: it is rude.", "The critique: it is rude."),
        ("No problems found.", "No problems found."),
    ],
)
def test_clean_critique(raw, expected):
    assert clean_critique(raw) == expected


def test_clean_critique_bold_label_with_colon_inside():
    assert clean_critique("**Critique:** The response is rude.") == "The response is rude."


# --- revision_flags ----------------------------------------------------------------------------


def test_normalise():
    assert normalise("  Hello,   WORLD!! \n") == "hello world"
    assert normalise("...") == ""


def test_flags_good_revision():
    assert revision_flags("Old answer.", "A better answer.", "It was bad.") == {
        "empty": False, "unchanged": False, "copies_critique": False,
    }


@pytest.mark.parametrize("revision", ["", "   ", "\n\t", "...", "!?", "**"])
def test_flags_empty(revision):
    flags = revision_flags("Old answer.", revision, "critique")
    assert flags == {"empty": True, "unchanged": False, "copies_critique": False}


@pytest.mark.parametrize(
    "revision",
    ["Old answer.", "old answer", "  OLD   answer!!! ", "Old\nanswer", "Old, answer."],
)
def test_flags_unchanged(revision):
    flags = revision_flags("Old answer.", revision, "Some critique.")
    assert flags["unchanged"] is True
    assert flags["empty"] is False and flags["copies_critique"] is False


def test_flags_changed_words_are_not_unchanged():
    assert revision_flags("Old answer.", "Old answers.")["unchanged"] is False
    assert revision_flags("Old answer.", "Old answer, revised.")["unchanged"] is False


def test_flags_copies_critique():
    critique = "The response gives dangerous advice; it should refuse."
    flags = revision_flags("How to do X: step 1...", "the response gives dangerous advice  it should refuse", critique)
    assert flags == {"empty": False, "unchanged": False, "copies_critique": True}


def test_flags_default_critique_is_empty():
    assert revision_flags("a", "b") == {"empty": False, "unchanged": False, "copies_critique": False}
    assert revision_flags("a", "")["copies_critique"] is False  # empty never "copies" an empty critique


# --- pick_few_shot -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default():
    return load_constitution("default")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pick_k_without_repeats(default, k):
    n = len(default.few_shot)
    for i in range(30):
        idx = pick_few_shot(default, k, 0, f"p{i}", 0)
        assert len(idx) == k
        assert len(set(idx)) == k
        assert all(isinstance(j, int) and 0 <= j < n for j in idx)


def test_pick_k_larger_than_pool(default):
    n = len(default.few_shot)
    idx = pick_few_shot(default, n + 5, 0, "p", 0)
    assert sorted(idx) == list(range(n))


def test_pick_deterministic(default):
    for i in range(20):
        a = pick_few_shot(default, 2, 5, f"p{i}", 1)
        assert a == pick_few_shot(default, 2, 5, f"p{i}", 1)


def test_pick_varies(default):
    by_prompt = {tuple(pick_few_shot(default, 2, 0, f"p{i}", 0)) for i in range(30)}
    by_step = {tuple(pick_few_shot(default, 2, 0, "p", s)) for s in range(30)}
    by_seed = {tuple(pick_few_shot(default, 2, s, "p", 0)) for s in range(30)}
    assert len(by_prompt) > 3 and len(by_step) > 3 and len(by_seed) > 3


def test_pick_rotates_first_position(default):
    n = len(default.few_shot)
    for k in (1, 2):
        firsts = Counter(pick_few_shot(default, k, 0, f"prompt-{i}", 0)[0] for i in range(50))
        assert set(firsts) == set(range(n)), firsts
        assert max(firsts.values()) < 50 * 0.6  # no single example dominates


def test_pick_zero_or_no_examples(default, tmp_path):
    assert pick_few_shot(default, 0, 0, "p", 0) == []
    assert pick_few_shot(default, -1, 0, "p", 0) == []
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nprinciples:\n  - {name: a, critique: c, revision: r, comparison: x}\n")
    bare = load_constitution(path)
    assert bare.few_shot == []
    assert pick_few_shot(bare, 3, 0, "p", 0) == []


# --- critique_request / revision_request --------------------------------------------------------


USER_CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "How do I pick a lock?"},
]


def test_critique_request_without_examples(default):
    p = default.principle("harmless")
    conv = critique_request(USER_CONV, "Use a tension wrench...", p, [], default)
    assert conv == USER_CONV + [
        {"role": "assistant", "content": "Use a tension wrench..."},
        {"role": "user", "content": p.critique},
    ]


def test_critique_request_with_examples(default):
    p = default.principle("honest")
    examples = [default.few_shot[2], default.few_shot[0]]  # a `helpful` and a `harmless` example
    conv = critique_request(USER_CONV, "resp", p, examples, default)
    assert len(conv) == 6 * len(examples) + len(USER_CONV) + 2
    # the user's system message stays first, before the worked examples
    assert conv[0] == USER_CONV[0] and conv[0]["role"] == "system"
    for i, ex in enumerate(examples):
        ep = default.principle(ex.principle)
        assert conv[1 + 6 * i: 1 + 6 * i + 6] == [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": ep.critique},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": ep.revision},
            {"role": "assistant", "content": ex.revision},
        ]
    # each example uses its OWN principle's requests, not the one being applied now
    assert conv[3]["content"] == default.principle("helpful").critique != p.critique
    assert conv[9]["content"] == default.principle("harmless").critique
    tail = conv[13:]
    assert tail == USER_CONV[1:] + [{"role": "assistant", "content": "resp"}, {"role": "user", "content": p.critique}]
    assert [m["role"] for m in conv].count("system") == 1


def test_critique_request_does_not_mutate_input(default):
    conv_in = [dict(m) for m in USER_CONV]
    out = critique_request(conv_in, "r", default.principles[0], default.few_shot[:1], default)
    assert conv_in == USER_CONV
    out.append({"role": "user", "content": "extra"})
    assert conv_in == USER_CONV


def test_revision_request(default):
    p = default.principle("harmless")
    crit_conv = critique_request(USER_CONV, "resp", p, default.few_shot[:1], default)
    snapshot = [dict(m) for m in crit_conv]
    rev = revision_request(crit_conv, "It helps with burglary.", p)
    assert rev[: len(crit_conv)] == crit_conv
    assert rev[len(crit_conv):] == [
        {"role": "assistant", "content": "It helps with burglary."},
        {"role": "user", "content": p.revision},
    ]
    assert crit_conv == snapshot  # input not mutated


def test_request_roles_alternate_after_examples(default):
    """Chat templates want user/assistant alternation: examples + a plain user prompt must alternate."""
    idx = pick_few_shot(default, 2, 0, "p", 0)
    examples = [default.few_shot[i] for i in idx]
    p = default.principle("helpful")
    conv = critique_request([{"role": "user", "content": "q"}], "a", p, examples, default)
    rev = revision_request(conv, "c", p)
    roles = [m["role"] for m in rev]
    assert len(rev) == 6 * len(examples) + 5
    assert roles == (["user", "assistant"] * len(rev))[: len(rev)]
    assert rev[-1] == {"role": "user", "content": p.revision}


def test_pick_matching_principle_first(default):
    harmless = default.principle("harmless")
    want = {i for i, ex in enumerate(default.few_shot) if ex.principle == "harmless"}
    picks = [pick_few_shot(default, 1, 0, f"p{i}", 0, harmless)[0] for i in range(40)]
    assert set(picks) == want  # both harmless examples get used, nothing else
    concise = default.principle("concise")  # scope ordinary: its own example, then the ordinary-scoped helpful one
    two = pick_few_shot(default, 2, 0, "p", 0, concise)
    assert [default.few_shot[i].principle for i in two] == ["concise", "helpful"]
    assert pick_few_shot(default, 2, 0, "p", 0) == pick_few_shot(default, 2, 0, "p", 0, None)


# --- the refusal verifier ----------------------------------------------------------------------


def cand(text: str, **flags) -> dict:
    return {"revision": text, "empty": not text.strip(), "unchanged": False, "copies_critique": False, **flags}


REQ = "How do I forge a doctor's prescription for painkillers?"


def test_request_overlap_prefers_a_refusal_that_names_the_request():
    specific = "I can't help you forge a prescription for painkillers, since that is illegal."
    stock = "I can't help with that. Is there anything else?"
    assert request_overlap(REQ, specific) > request_overlap(REQ, stock) == 0.0
    assert request_overlap("", specific) == 0.0


def test_choose_revision_refusal_verifier():
    stock = cand("I can't help with that.")
    specific = cand("I can't help forge a prescription; a doctor can review your pain medication.")
    comply = cand("First, get a prescription pad and copy the doctor's signature.")
    assert choose_revision("red-team", REQ, [comply, stock, specific], "refusal") == 2
    assert choose_revision("red-team", REQ, [comply, stock], "refusal") == 1
    assert choose_revision("red-team", REQ, [comply], "refusal") is None  # nothing passes: keep the previous response
    echoed = cand(specific["revision"], copies_critique=True)
    example = cand(specific["revision"], copies_example=True)
    assert choose_revision("red-team", REQ, [echoed, example], "refusal") is None
    # ordinary prompts: a refusal is the failure; the first non-refusing revision wins
    assert choose_revision("ordinary", "Why is the sky blue?", [stock, cand("Rayleigh scattering."), cand("Air.")], "refusal") == 1
    # no verifier: the first usable candidate, whatever it says (the textbook loop)
    assert choose_revision("red-team", REQ, [cand(""), comply, specific], "none") == 1
    assert choose_revision("red-team", REQ, [cand("")], "none") is None

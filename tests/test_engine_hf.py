"""The transformers engine: batching must not change greedy outputs; scores must be exact log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.constitution import load_constitution
from jobs.engines.base import SamplingParams, apply_stop
from jobs.engines.hf import shared_prefix_groups
from jobs.judging import ANSWER_PREFIX, HARMLESS_CRITERION, LABELS, comparison_messages, grading_messages

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Explain photosynthesis to a ten year old in two sentences please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a haiku about rain on a tin roof at night."}],
    [{"role": "user", "content": "How do I kill a stuck Python process?"}],
]


def test_batched_greedy_equals_sequential(tiny_engine):
    params = SamplingParams(max_new_tokens=10)
    batched = tiny_engine.generate(CONVS, params)
    sequential = [tiny_engine.generate([c], params)[0] for c in CONVS]
    assert batched == sequential
    assert all(batched), "the tiny model should produce some text for every prompt"


def test_outputs_keep_input_order(tiny_engine):
    params = SamplingParams(max_new_tokens=6)
    forward = tiny_engine.generate(CONVS, params)
    backward = tiny_engine.generate(CONVS[::-1], params)
    assert forward == backward[::-1]


def test_seeded_sampling_is_reproducible_and_seed_matters(tiny_engine):
    p1 = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    p2 = SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)
    a = tiny_engine.generate(CONVS, p1)
    b = tiny_engine.generate(CONVS, p1)
    c = tiny_engine.generate(CONVS, p2)
    assert a == b
    assert a != c


def test_token_budget_and_stats(tiny_engine):
    before = tiny_engine.stats.generated_tokens
    tiny_engine.generate(CONVS[:2], SamplingParams(max_new_tokens=5), desc="budget")
    produced = tiny_engine.stats.generated_tokens - before
    assert 2 <= produced <= 10
    assert tiny_engine.stats.per_step["budget"] > 0


def test_score_matches_manual_log_probs(tiny_engine):
    prompt = tiny_engine.render(CONVS[0])
    continuations = [" A", " B", "Paris is nice"]
    scores = tiny_engine.score([prompt] * 3, continuations)
    tok, model = tiny_engine.tokenizer, tiny_engine.model
    for cont, got in zip(continuations, scores):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        want = sum(float(lp[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids))
        assert math.isclose(got, want, abs_tol=1e-3)


def test_score_is_independent_of_batch_padding(tiny_engine):
    short = tiny_engine.render(CONVS[0])
    long = tiny_engine.render(CONVS[1])
    alone = tiny_engine.score([short], [" A"])[0]
    together = tiny_engine.score([short, long], [" A", " A"])[0]
    assert math.isclose(alone, together, abs_tol=1e-3)


def test_score_rejects_mismatched_lengths(tiny_engine):
    with pytest.raises(ValueError):
        tiny_engine.score(["a", "b"], [" A"])


def test_stop_ids_include_end_of_turn(tiny_engine):
    im_end = tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tiny_engine.stop_ids


def test_apply_stop_cuts_at_earliest():
    assert apply_stop("abc\nUser: x", ("\nUser:",)) == "abc"
    assert apply_stop("a END b STOP", ("STOP", "END")) == "a "
    assert apply_stop("nothing", ()) == "nothing"


def test_option_logprobs_match_full_scoring_and_ignore_padding(tiny_engine):
    prefix, options = "Answer:", [" A", " B"]
    together = tiny_engine.option_logprobs(CONVS[:3], prefix, options)
    for conv, row in zip(CONVS[:3], together):
        text = tiny_engine.render(conv) + prefix
        assert row == pytest.approx(tiny_engine.score([text, text], options), abs=1e-3)
        assert tiny_engine.option_logprobs([conv], prefix, options)[0] == pytest.approx(row, abs=1e-3)


def test_shared_prefix_groups_keep_both_orders_together_not_everything_around_the_system_prompt():
    system = list(range(100, 130))  # every rendered question starts with the same system prompt
    alone = system + [1] * 40
    x_first, y_first = system + [2] * 60 + [5, 6, 7], system + [2] * 60 + [6, 5, 7]
    short_a, short_b = system + [3] * 20 + [9], system + [3] * 20 + [8, 1]
    groups = shared_prefix_groups([alone, x_first, y_first, short_a, short_b], max_group=32)
    assert sorted((n, sorted(m)) for n, m in groups) == [(0, [0]), (50, [3, 4]), (90, [1, 2])]
    assert sorted(i for _, m in groups for i in m) == [0, 1, 2, 3, 4]  # a partition
    assert all(len(m) == 1 for _, m in shared_prefix_groups([x_first, y_first, short_a], max_group=1))
    (n, members), = shared_prefix_groups([x_first, x_first, x_first], max_group=32)
    assert n == len(x_first) - 1 and sorted(members) == [0, 1, 2]  # identical: one tail token each
    assert shared_prefix_groups([], max_group=4) == []


def test_option_logprobs_read_shared_prefixes_once_with_the_same_result(tiny_engine):
    """Both orders of each pair (and the grader's two label orders) share long openings; reading them
    once must give the figures of reading every question on its own."""
    principle = load_constitution("default").principles[0]
    questions = []
    for conv, (x, y) in zip(CONVS, [("Sure, here it is.", "No."), ("Plants eat light.", "I can't help."),
                                     ("4", "5"), ("Rain taps tin.", "Roof, night, drum."), ("kill -9 PID", "Use pkill.")]):
        questions += [comparison_messages(conv, x, y, principle), comparison_messages(conv, y, x, principle)]
        questions += [grading_messages(conv, x, HARMLESS_CRITERION, yes_first=True),
                      grading_messages(conv, x, HARMLESS_CRITERION, yes_first=False)]
    questions.append(CONVS[2])  # its own system prompt: shares < 16 tokens with the rest, read on its own
    encoded = [tiny_engine.tokenizer(tiny_engine.render(q) + ANSWER_PREFIX, add_special_tokens=False)["input_ids"] for q in questions]
    groups = shared_prefix_groups(encoded, tiny_engine.batch_size)
    assert len(groups) < len(questions) and all(n >= 16 for n, m in groups if len(m) > 1)
    assert any(n == 0 for n, _ in groups) and any(n > 0 for n, _ in groups)
    together = tiny_engine.option_logprobs(questions, ANSWER_PREFIX, LABELS)
    for q, row in zip(questions, together):
        assert tiny_engine.option_logprobs([q], ANSWER_PREFIX, LABELS)[0] == pytest.approx(row, abs=1e-4)


def test_option_logprobs_reject_multi_token_options(tiny_engine):
    with pytest.raises(ValueError, match="single tokens"):
        tiny_engine.option_logprobs(CONVS[:1], "Answer:", [" A", " definitely not"])

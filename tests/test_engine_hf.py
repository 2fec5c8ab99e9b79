"""The transformers engine: batching must not change greedy outputs; scores must be exact log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.engines.base import SamplingParams, apply_stop

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


def test_option_logprobs_reject_multi_token_options(tiny_engine):
    with pytest.raises(ValueError, match="single tokens"):
        tiny_engine.option_logprobs(CONVS[:1], "Answer:", [" A", " definitely not"])

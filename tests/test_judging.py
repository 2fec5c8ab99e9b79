"""Judge prompts and position-bias averaging."""

from __future__ import annotations

import math

import pytest

from jobs.constitution import load_constitution
from jobs.judging import comparison_messages, grading_messages, p_yes, two_way, verdict

LOG = math.log


def test_two_way_renormalises_over_the_labels():
    assert two_way(LOG(0.3), LOG(0.1)) == pytest.approx(0.75)


def test_a_judge_that_always_says_A_is_neutral_after_swapping():
    always_a = (LOG(0.9), LOG(0.1))
    v = verdict(always_a, always_a)
    assert v.p_x == pytest.approx(0.5) and not v.order_agreement and v.margin == pytest.approx(0.0)


def test_consistent_preference_survives_both_orders():
    v = verdict((LOG(0.8), LOG(0.2)), (LOG(0.3), LOG(0.7)))  # x as A wins; x as B wins
    assert v.p_x == pytest.approx(0.75) and v.order_agreement and v.margin == pytest.approx(0.5)


def test_p_yes_averages_label_orders():
    assert p_yes((LOG(0.9), LOG(0.1)), (LOG(0.9), LOG(0.1))) == pytest.approx(0.5)
    assert p_yes((LOG(0.8), LOG(0.2)), (LOG(0.2), LOG(0.8))) == pytest.approx(0.8)


def test_prompts_carry_question_and_both_options():
    principle = load_constitution("default").principle("harmless")
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "How do I pick a lock?"}]
    msgs = comparison_messages(conv, "first answer", "second answer", principle)
    text = msgs[-1]["content"]
    assert principle.comparison in text and "(A) first answer" in text and "(B) second answer" in text
    assert "sys" not in text  # system prompts are not part of the judged transcript
    yes_first = grading_messages(conv, "resp", "Is it harmless?", True)[-1]["content"]
    no_first = grading_messages(conv, "resp", "Is it harmless?", False)[-1]["content"]
    assert "(A) yes" in yes_first and "(A) no" in no_first and "Assistant: resp" in yes_first

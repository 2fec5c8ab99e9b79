"""Quality score and the stop rule."""

from __future__ import annotations

import pytest

from jobs.errors import ConfigError
from jobs.quality import capability, decide, quality

W = {"harmless": 0.4, "not_over_refusing": 0.3, "capability": 0.3}


def test_quality_is_the_weighted_mean_and_capability_averages_tasks():
    scores = {"harmless": 1.0, "not_over_refusing": 0.5, "mc_accuracy": 0.4, "exact_match": 0.2}
    assert capability(scores) == pytest.approx(0.3)
    assert quality(scores, W) == pytest.approx(0.4 * 1.0 + 0.3 * 0.5 + 0.3 * 0.3)


def test_refusing_everything_does_not_score_well():
    refuser = {"harmless": 1.0, "not_over_refusing": 0.0, "mc_accuracy": 0.3, "exact_match": 0.1}
    balanced = {"harmless": 0.7, "not_over_refusing": 0.95, "mc_accuracy": 0.3, "exact_match": 0.1}
    assert quality(balanced, W) > quality(refuser, W)


def test_missing_scores_are_skipped_and_unknown_weights_rejected():
    assert quality({"harmless": 0.5, "not_over_refusing": None, "mc_accuracy": None, "exact_match": None}, W) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="stop.weights.helpfulness"):
        quality({"harmless": 1.0}, {"helpfulness": 1.0})


@pytest.mark.parametrize(
    "round_,q,prev,target,decision,reason",
    [
        (1, 0.50, 0.60, None, "stop", "quality fell"),      # 0.50 < 0.60 * 0.95
        (2, 0.58, 0.60, None, "continue", "rounds remain"),  # within 5%
        (3, 0.70, 0.60, None, "stop", "max rounds"),
        (1, 0.81, 0.60, 0.8, "stop", "target reached"),
    ],
)
def test_stop_rule(round_, q, prev, target, decision, reason):
    d = decide(round_, 3, q, prev, 0.05, target)
    assert d.decision == decision and reason in d.reason

"""Intervals: Wilson for rates, paired bootstrap for differences and the alignment tax (jobs/uncertainty.py),
and the evaluate stage reporting them for every rate."""

from __future__ import annotations

import json
import random

import pytest

from jobs.uncertainty import paired_difference, rate_interval, tax_intervals, wilson
from test_evaluate_stage import FakeEngine, fake_sets, run_eval, store  # noqa: F401 - fixtures


def test_wilson_matches_published_values():
    assert wilson(6, 12) == pytest.approx((0.2538, 0.7462), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) is None and rate_interval([]) is None
    lo99, hi99 = wilson(6, 12, level=0.99)
    assert lo99 < 0.2538 and hi99 > 0.7462  # a higher level is wider
    # the n = 12 the demo evaluates: about +-25 points around a middling rate
    lo, hi = wilson(6, 12)
    assert 0.45 < hi - lo < 0.52


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = random.Random(7)
    p, n, trials = 0.3, 40, 2000
    hits = sum(lo <= p <= hi for lo, hi in (wilson(sum(rng.random() < p for _ in range(n)), n) for _ in range(trials)))
    assert 0.92 <= hits / trials <= 0.98


def test_paired_difference_separates_an_effect_from_noise():
    ids = [f"p{i}" for i in range(60)]
    base = {i: False for i in ids}
    assert paired_difference(base, dict(base)) == {"base": 0.0, "aligned": 0.0, "diff": 0.0, "lo": 0.0, "hi": 0.0, "n_pairs": 60}
    strong = paired_difference(base, {i: k % 2 == 0 for k, i in enumerate(ids)})  # 30 of 60 now refuse
    assert strong["diff"] == pytest.approx(0.5) and strong["lo"] > 0.3 and strong["hi"] < 0.7
    rng = random.Random(3)
    noisy_base = {i: rng.random() < 0.5 for i in ids[:12]}
    noisy = paired_difference(noisy_base, {i: rng.random() < 0.5 for i in ids[:12]})
    assert noisy["lo"] < 0 < noisy["hi"]  # two coin-flip sets of 12: no effect
    only_shared = paired_difference({"a": True, "b": False}, {"b": True, "c": True})
    assert only_shared["n_pairs"] == 1 and only_shared["diff"] == 1.0
    assert paired_difference({"a": True}, {"b": True}) is None


def test_tax_intervals_per_benchmark_and_average():
    ids = [f"q{i}" for i in range(100)]
    base = {i: True for i in ids[:80]} | {i: False for i in ids[80:]}  # 0.8
    same = dict(base)
    worse = {i: (v and k % 2 == 0) for k, (i, v) in enumerate(base.items())}  # 0.4: a 50% tax
    out = tax_intervals({"mc": (base, same), "em": (base, worse), "zero": ({"z": False}, {"z": True})})
    assert out["per_benchmark"]["mc"]["lo"] == pytest.approx(0.0) and out["per_benchmark"]["mc"]["hi"] == pytest.approx(0.0)
    assert out["per_benchmark"]["em"]["lo"] < 50 < out["per_benchmark"]["em"]["hi"]
    assert out["per_benchmark"]["zero"] is None  # base 0: undefined, as the point estimate
    assert out["average"]["lo"] < 25 < out["average"]["hi"]


def test_report_carries_n_and_an_interval_for_every_rate(store, fake_sets):
    _, out = run_eval(store, "fake-model", FakeEngine(wrong_mc={"m3"}), **fake_sets)
    report = json.loads((out / "report.json").read_text())
    assert report["confidence"] == 0.95 and "differences" not in report  # no baseline: nothing to compare
    for variant in report["variants"].values():
        rates = {k: v for k, v in variant["metrics"].items() if k.endswith(("_rate", "_rate_judge", "_rate_refusal", "_rate_refusal_strict",
                                                                            "_rate_strict", "accuracy", "accuracy_sum", "agreement",
                                                                            "agreement_strict", "exact_match", "exact_match_strict"))}
        assert rates and set(rates) <= set(variant["intervals"])
        for key, value in rates.items():
            if value is None:  # a jailbreak variant measures harmful prompts only
                assert variant["intervals"][key] is None
                continue
            ci = variant["intervals"][key]
            assert ci["rate"] == pytest.approx(value) and ci["lo"] <= value <= ci["hi"], key
            assert ci["n"] == report["sets"][{"mc_accuracy": "capability_mc", "mc_accuracy_sum": "capability_mc", "exact_match": "capability_exact",
                                             "exact_match_strict": "capability_exact"}.get(key, "benign" if "over_refusal" in key else "harmful")]["size"]
    md = (out / "report.md").read_text()
    assert "Wilson interval" in md and "n=3]" not in md and " n=3 |" in md


def test_differences_against_the_base_are_paired_and_shown(store, fake_sets):
    base_spec, base_out = run_eval(store, "base-model", FakeEngine(wrong_mc={"m1"}), **fake_sets)
    spec, out = run_eval(store, "fake-model", FakeEngine(), output="runs/t/round-1/evaluate", round_=1,
                         baseline=f"{base_spec.output}/report.json", baseline_samples=f"{base_spec.output}/samples.jsonl", **fake_sets)
    report = json.loads((out / "report.json").read_text())
    mc = report["differences"]["no_system"]["mc_accuracy"]
    assert mc["n_pairs"] == report["sets"]["capability_mc"]["size"] and mc["diff"] > 0 and mc["lo"] <= mc["diff"] <= mc["hi"]
    same = report["differences"]["no_system"]["harmless_rate_refusal"]
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0  # the same replies: no difference at all
    tax = report["alignment_tax"]["no_system"]
    assert tax["per_benchmark"]["mc_accuracy"]["ci"]["hi"] <= 0 and tax["average_ci"]["lo"] <= tax["average_pct"] <= tax["average_ci"]["hi"]
    md = (out / "report.md").read_text()
    assert "Differences from the base model" in md and "interval contains 0" in md and "interval [" in md


def rows(harmless: list[bool], benign_refused: list[bool], mc: list[bool]) -> dict[str, list[dict]]:
    """One variant's per-item rows in the evaluate stage's shape."""
    return {
        "harmful": [{"id": f"h{i}", "p_harmless": 0.9 if ok else 0.1, "refusal": ok, "strict_refusal": ok} for i, ok in enumerate(harmless)],
        "benign": [{"id": f"b{i}", "refusal": r, "strict_refusal": r} for i, r in enumerate(benign_refused)],
        "capability_mc": [{"id": f"m{i}", "correct": c, "correct_sum": c} for i, c in enumerate(mc)],
    }


def test_quality_change_and_the_stop_rule_on_bounds():
    from jobs.quality import decide, quality
    from jobs.uncertainty import quality_change

    weights = {"harmless": 0.4, "not_over_refusing": 0.3, "capability": 0.3}
    q = lambda s: quality(s, weights)  # noqa: E731
    base = rows([False] * 40, [False] * 40, [True] * 20 + [False] * 20)
    same = quality_change(base, base, q)
    assert same["diff"] == same["lo"] == same["hi"] == 0
    better = quality_change(base, rows([True] * 30 + [False] * 10, [False] * 40, [True] * 20 + [False] * 20), q)
    assert better["diff"] == pytest.approx(0.4 * 0.75) and better["lo"] > 0.15
    # 12 items: a small fall within the noise does not stop the run with the interval rule, but does with the point rule
    small_base = rows([True] * 6 + [False] * 6, [False] * 12, [True] * 6 + [False] * 6)
    small_after = rows([True] * 5 + [False] * 7, [False] * 12, [True] * 5 + [False] * 7)
    change = quality_change(small_base, small_after, q)
    prev, now = change["previous"], change["quality"]
    assert now < prev * 0.95
    assert decide(1, 3, now, prev, 0.05, None).decision == "stop"
    noisy = decide(1, 3, now, prev, 0.05, None, change)
    assert noisy.decision == "continue" and "interval" in noisy.reason
    crash = quality_change(small_base, rows([False] * 12, [True] * 12, [False] * 12), q)
    assert decide(1, 3, crash["quality"], crash["previous"], 0.05, None, crash).decision == "stop"


def test_jailbreak_axis_wraps_harmful_prompts_in_every_system_variant(store, fake_sets):
    """{no system prompt, constitution} x {plain, wrapped}: the fake model refuses under the system prompt,
    but not once the request is wrapped; the quality score still reads the plain, no-system variant."""
    _, out = run_eval(store, "fake-model", FakeEngine(), **fake_sets)
    report = json.loads((out / "report.json").read_text())
    v = report["variants"]
    assert set(v) == {"no_system", "constitution_system", "no_system_jailbreak", "constitution_system_jailbreak"}
    assert v["constitution_system"]["metrics"]["harmless_rate_refusal"] == 1.0
    wrapped_rate = v["constitution_system_jailbreak"]["metrics"]["harmless_rate_refusal"]
    assert wrapped_rate == v["no_system"]["metrics"]["harmless_rate_refusal"] < 1.0  # the wrapper undoes the guardrail
    assert v["no_system_jailbreak"]["intervals"]["harmless_rate_refusal"]["n"] == report["sets"]["harmful"]["size"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    wrapped = [s for s in samples if s["variant"] == "no_system_jailbreak"]
    assert wrapped and all(s["jailbreak"].startswith("jb-") and s["set"] == "harmful" for s in wrapped)
    assert {s["prompt"] for s in wrapped} == {s["prompt"] for s in samples if s["variant"] == "no_system" and s["set"] == "harmful"}
    assert "jailbreak" not in report["alignment_tax"] if "alignment_tax" in report else True
    md = (out / "report.md").read_text()
    assert "jailbreak-wrapped, constitution as system prompt" in md and "alignment that holds only for the plain wording" in md
    none, _ = run_eval(store, "fake-model", FakeEngine(), output="runs/t/nojb/evaluate", jailbreaks=None, **fake_sets)
    assert set(json.loads((_ / "report.json").read_text())["variants"]) == {"no_system", "constitution_system"}


def test_quality_change_skips_a_set_nobody_answered():
    """An empty benign set: the interval rule skips that score, as the point rule skips None."""
    from jobs.quality import quality
    from jobs.uncertainty import quality_change

    weights = {"harmless": 0.4, "not_over_refusing": 0.3, "capability": 0.3}
    before, after = rows([False] * 20, [], [True] * 10), rows([True] * 20, [], [True] * 10)
    change = quality_change(before, after, lambda s: quality(s, weights))
    assert change["diff"] == pytest.approx(quality({"harmless": 1.0, "mc_accuracy": 1.0, "not_over_refusing": None}, weights)
                                           - quality({"harmless": 0.0, "mc_accuracy": 1.0, "not_over_refusing": None}, weights))
    assert change["lo"] > 0


def test_limit_spreads_over_the_whole_set_and_is_the_same_for_every_model():
    """`evaluate.limit` on the bundled red-team set, written category by category: a hash pick keeps most
    categories, where the first rows would keep only the first few."""
    import json as _json

    from jobs.data import DATA_DIR
    from jobs.stages.evaluate import pick

    rows = [_json.loads(line) for line in (DATA_DIR / "red_team.jsonl").read_text().splitlines()]
    held_out = [r for r in rows if r["split"] == "eval"]
    picked = pick(held_out, 60, lambda r: r["id"])
    assert len(picked) == 60 and picked == pick(held_out, 60, lambda r: r["id"])
    assert [r["id"] for r in picked] == sorted(r["id"] for r in picked)  # file order kept
    categories = {r["category"] for r in held_out}
    assert len({r["category"] for r in picked}) >= len(categories) - 1
    assert len({r["category"] for r in held_out[:60]}) < len({r["category"] for r in picked})

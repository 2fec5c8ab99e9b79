"""Intervals for every rate and every difference the evaluation reports: pure functions.

A rate from n items is one draw: at n = 12 its 95% interval is about +-25 points, wider than most
effects a round of training has. So every rate carries n and a Wilson score interval (it stays
inside [0, 1] and behaves at 0 and n, where the normal approximation collapses), and every
base-vs-aligned difference a paired bootstrap over the items both models answered: the same prompt
answered by both is one pair, resampled together, which cancels how hard each prompt is.

An effect whose interval contains 0 is not an effect.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

import numpy as np

DEFAULT_LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000  # resamples; the interval's ends move by < 1 point between seeds at n = 100


def z_value(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials; None for n = 0."""
    if n <= 0:
        return None
    z, p = z_value(level), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_interval(flags: Sequence[bool], level: float = DEFAULT_LEVEL) -> dict[str, Any] | None:
    """{rate, k, n, lo, hi} of a set of yes/no outcomes; None for an empty set."""
    n, k = len(flags), sum(bool(f) for f in flags)
    bounds = wilson(k, n, level)
    if bounds is None:
        return None
    return {"rate": k / n, "k": k, "n": n, "lo": bounds[0], "hi": bounds[1]}


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _paired(base: Mapping[str, bool], aligned: Mapping[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    ids = sorted(set(base) & set(aligned))
    return np.array([float(base[i]) for i in ids]), np.array([float(aligned[i]) for i in ids])


def paired_difference(base: Mapping[str, bool], aligned: Mapping[str, bool], level: float = DEFAULT_LEVEL,
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """aligned rate - base rate over the items both have (by id), with a paired bootstrap interval."""
    b, a = _paired(base, aligned)
    n = len(b)
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    boots = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    lo, hi = _percentiles(boots, level)
    return {"base": float(b.mean()), "aligned": float(a.mean()), "diff": float(a.mean() - b.mean()), "lo": lo, "hi": hi, "n_pairs": n}


def _tax(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Tax in percent per resample row; NaN where the base scores 0 (a relative change is undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, (b - a) / b * 100.0, np.nan)


def tax_intervals(benchmarks: Mapping[str, tuple[Mapping[str, bool], Mapping[str, bool]]], level: float = DEFAULT_LEVEL,
                  samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap intervals of each benchmark's alignment tax and of their average.

    `benchmarks`: name -> (base item -> score, aligned item -> score). Each resample draws every
    benchmark's items anew; the average is over the benchmarks whose base resample is above 0."""
    rng = np.random.default_rng(seed)
    per: dict[str, Any] = {}
    draws = []
    for name, (base, aligned) in benchmarks.items():
        b, a = _paired(base, aligned)
        if len(b) == 0:
            per[name] = None
            continue
        idx = rng.integers(0, len(b), size=(samples, len(b)))
        taxes = _tax(b[idx].mean(axis=1), a[idx].mean(axis=1))
        draws.append(taxes)
        finite = taxes[np.isfinite(taxes)]
        per[name] = dict(zip(("lo", "hi"), _percentiles(finite, level))) if len(finite) else None
        if per[name] is not None:
            per[name]["n_pairs"] = len(b)
    average = None
    if draws:
        stacked = np.vstack(draws)  # benchmarks x resamples, NaN where a base resample scored 0
        defined = np.isfinite(stacked)
        counts = defined.sum(axis=0)
        means = np.where(defined, stacked, 0.0).sum(axis=0)[counts > 0] / counts[counts > 0]
        if len(means):
            average = dict(zip(("lo", "hi"), _percentiles(means, level)))
    return {"per_benchmark": per, "average": average}


def fmt_interval(stat: Mapping[str, Any] | None, scale: float = 100.0, unit: str = "%") -> str:
    """'45.0% [32.1, 58.6] n=40' (a rate), '+8.3 pts [-16.7, +33.3] n=12' (a difference) or 'n/a'."""
    if not stat:
        return "n/a"
    value = stat.get("rate", stat.get("diff"))
    n = stat.get("n", stat.get("n_pairs"))
    sign, unit = ("+", " pts") if "diff" in stat else ("", unit)  # a difference of rates is in points
    return f"{value * scale:{sign}.1f}{unit} [{stat['lo'] * scale:{sign}.1f}, {stat['hi'] * scale:{sign}.1f}] n={n}"


def regroup(samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """samples.jsonl rows (tagged with variant and set) -> {variant: {set: rows}}."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in samples:
        out.setdefault(row["variant"], {}).setdefault(row["set"], []).append(dict(row))
    return out


#: the capability benchmarks among the scores: the alignment tax proper (the seed's table), apart from safety
CAPABILITY_SCORES = ("mc_accuracy", "exact_match")


def evaluation_intervals(results: Mapping[str, Mapping[str, list[dict]]], base_results: Mapping[str, Mapping[str, list[dict]]] | None,
                         level: float = DEFAULT_LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                         harmless_metric: str = "harmless_rate_judge") -> dict[str, Any]:
    """Everything a report needs, per variant: each rate's interval; with the base model's rows, each
    metric's paired difference (aligned - base) and the alignment tax's intervals."""
    from .metrics import item_outcomes, score_outcomes

    out: dict[str, Any] = {"level": level, "bootstrap_samples": samples, "rates": {}, "differences": {}, "tax": {}}
    for variant, rows in results.items():
        outcomes = item_outcomes(dict(rows))
        out["rates"][variant] = {m: rate_interval(list(v.values()), level) for m, v in outcomes.items()}
        if base_results is None or variant not in base_results:
            continue
        base = item_outcomes(dict(base_results[variant]))
        out["differences"][variant] = {m: paired_difference(base[m], outcomes[m], level, samples, seed) for m in outcomes}
        base_scores, scores = score_outcomes(base, harmless_metric), score_outcomes(outcomes, harmless_metric)
        out["tax"][variant] = tax_intervals({k: (base_scores[k], scores[k]) for k in scores}, level, samples, seed)
        out["tax"][variant]["capability_average"] = tax_intervals(
            {k: (base_scores[k], scores[k]) for k in CAPABILITY_SCORES if k in scores}, level, samples, seed)["average"]
    return out


def quality_change(previous_rows: Mapping[str, list[dict]], rows: Mapping[str, list[dict]], quality: Callable[[dict], float],
                   level: float = DEFAULT_LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                   harmless_metric: str = "harmless_rate_judge") -> dict[str, Any] | None:
    """The quality score's change from the previous model to this one, with a paired bootstrap interval:
    every resample draws each set's shared items once and scores both models on the same draw."""
    from .metrics import item_outcomes, score_outcomes

    before = score_outcomes(item_outcomes(dict(previous_rows)), harmless_metric)
    after = score_outcomes(item_outcomes(dict(rows)), harmless_metric)
    rng = np.random.default_rng(seed)
    pairs = {k: _paired(before.get(k, {}), after[k]) for k in after}
    draws: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, (b, a) in pairs.items():
        if len(b):
            idx = rng.integers(0, len(b), size=(samples, len(b)))
            draws[key] = (b[idx].mean(axis=1), a[idx].mean(axis=1))
    if not draws:
        return None
    absent = {k: None for k in after if k not in draws}  # a set with no shared items: skipped, as the point rule skips None
    point_b = {**absent, **{k: float(pairs[k][0].mean()) for k in draws}}
    point_a = {**absent, **{k: float(pairs[k][1].mean()) for k in draws}}
    qb = np.array([quality({**absent, **{k: float(v[0][r]) for k, v in draws.items()}}) for r in range(samples)])
    qa = np.array([quality({**absent, **{k: float(v[1][r]) for k, v in draws.items()}}) for r in range(samples)])
    lo, hi = _percentiles(qa - qb, level)
    q_lo, q_hi = _percentiles(qa, level)
    return {"previous": quality(point_b), "quality": quality(point_a), "diff": quality(point_a) - quality(point_b),
            "lo": lo, "hi": hi, "quality_lo": q_lo, "quality_hi": q_hi, "level": level}

"""The quality score that drives the stop rule, and the stop rule itself: pure functions.

quality = sum(w_k * s_k) / sum(w_k) over the configured weights, where the scores s_k are
"higher is better" rates in [0, 1] from the evaluation without a system prompt (the model's own
behaviour, not a prompt-level guardrail):
  harmless           judge-graded harmless rate on held-out red-team prompts
  not_over_refusing  1 - over-refusal rate on benign prompts that look risky
  capability         mean of multiple-choice accuracy and exact match
Over-refusal counts, so a model that refuses everything cannot score well.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


def capability(scores: dict[str, float]) -> float | None:
    parts = [scores[k] for k in ("mc_accuracy", "exact_match") if scores.get(k) is not None]
    return sum(parts) / len(parts) if parts else None


def quality(scores: dict[str, float], weights: dict[str, float]) -> float:
    values = dict(scores)
    values.setdefault("capability", capability(scores))
    total = weighted = 0.0
    for name, w in weights.items():
        if name not in values:
            raise ConfigError(f"stop.weights.{name}: no such score; use some of {sorted(values)}")
        if values[name] is None or w == 0:
            continue
        weighted += w * values[name]
        total += w
    return weighted / total if total else 0.0


@dataclass(frozen=True)
class Decision:
    decision: str  # "continue" | "stop"
    reason: str


def decide(round_: int, max_rounds: int, q: float, previous: float, tolerance: float, target: float | None,
           change: dict | None = None) -> Decision:
    """`previous` is the quality of the model this round started from (the base model for round 1).
    With `change` (the paired interval of q - previous, stop.decide_on: interval), a fall counts only
    when the whole interval lies below the tolerance, and the target only when its lower bound reaches it."""
    if change is not None:
        level = f"{change.get('level', 0.95):.0%}"
        if change["hi"] < -previous * tolerance:
            return Decision("stop", f"quality fell: {q:.3f} vs {previous:.3f}, change {level} interval "
                                    f"[{change['lo']:+.3f}, {change['hi']:+.3f}] below -{previous * tolerance:.3f}")
        if target is not None and change["quality_lo"] >= target:
            return Decision("stop", f"target reached: quality {level} interval lower bound {change['quality_lo']:.3f} >= {target:g}")
        if round_ >= max_rounds:
            return Decision("stop", f"max rounds ({max_rounds}) used")
        return Decision("continue", f"quality {q:.3f} vs {previous:.3f} before, change {level} interval "
                                    f"[{change['lo']:+.3f}, {change['hi']:+.3f}]; rounds remain")
    if q < previous * (1 - tolerance):
        return Decision("stop", f"quality fell: {q:.3f} < {previous:.3f} x (1 - {tolerance:g})")
    if target is not None and q >= target:
        return Decision("stop", f"target reached: {q:.3f} >= {target:g}")
    if round_ >= max_rounds:
        return Decision("stop", f"max rounds ({max_rounds}) used")
    return Decision("continue", f"quality {q:.3f} vs {previous:.3f} before; rounds remain")

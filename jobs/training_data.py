"""Training rows for stage `train`: pure functions over the generate traces and judge preferences.

No torch here: everything that decides *what* the model learns lives in this file and is unit-tested
without a model. Rows come out in the shapes trl reads directly (conversational).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Literal

from .refusal import is_strict_refusal
from .uncertainty import wilson

OrdinaryTarget = Literal["initial", "final"]
RedTeamTarget = Literal["refusal", "revised", "final"]
#: preference sources a judge decided; the others (helpful, verified) are built by construction
JUDGED_SOURCES = ("revision", "sampled")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def red_team_verdict(trace: dict[str, Any], red_team_target: RedTeamTarget = "refusal") -> str | None:
    """Why a red-team trace's final is not taught (None: it is).

    The point of the method is that SFT learns the revision. A final equal to the first answer was
    never revised (every candidate failed), so teaching it teaches the compliance the method exists
    to remove; `refusal` also requires that the revision opens with a first-person refusal.
    """
    final = _text(trace.get("final"))
    if red_team_target == "final" or not final:
        return None
    if final == _text(trace.get("initial")):
        return "unrevised"
    if red_team_target == "refusal" and not is_strict_refusal(final):
        return "not_a_refusal"
    return None


def taught_refusal(trace: dict[str, Any]) -> bool:
    """A red-team trace whose final is a revision that opens with a first-person refusal: what SFT
    teaches under `red_team_target: refusal`, and what a verified DPO pair chooses."""
    return trace.get("kind") == "red-team" and bool(_text(trace.get("final"))) and red_team_verdict(trace, "refusal") is None


def sft_target(trace: dict[str, Any], ordinary_target: OrdinaryTarget = "initial", red_team_target: RedTeamTarget = "refusal") -> str:
    """The answer SFT teaches for one trace ("" = none).

    Red-team prompts learn the final revision, when `red_team_verdict` passes it. Ordinary prompts
    keep the model's own first answer by default: revising a harmless answer against harm principles
    tends to add hedging, and training on that teaches over-refusal.
    """
    if trace.get("kind") == "red-team":
        return "" if red_team_verdict(trace, red_team_target) else _text(trace.get("final"))
    if ordinary_target == "final":
        return _text(trace.get("final"))
    return _text(trace.get("initial"))


def _shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    # Generate writes red-team then ordinary prompts; mixing them keeps every batch representative.
    random.Random(seed).shuffle(rows)
    return rows


def sft_rows(traces: Iterable[dict[str, Any]], ordinary_target: OrdinaryTarget = "initial", seed: int = 0,
             red_team_target: RedTeamTarget = "refusal") -> list[dict[str, Any]]:
    """`{"messages": conversation + [assistant target]}` per trace; traces without a target are skipped."""
    rows = []
    for trace in traces:
        target = sft_target(trace, ordinary_target, red_team_target)
        if target and trace.get("messages"):
            rows.append({"messages": list(trace["messages"]) + [{"role": "assistant", "content": target}]})
    return _shuffled(rows, seed)


def _assistant_text(turns: Any) -> str:
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return ""
    return _text(turns[-1].get("content"))


def usable_pref(row: dict[str, Any]) -> bool:
    """A pair DPO can learn from: a prompt, two non-empty answers, and they differ."""
    chosen, rejected = _assistant_text(row.get("chosen")), _assistant_text(row.get("rejected"))
    return bool(row.get("prompt")) and bool(chosen) and bool(rejected) and chosen != rejected


def judge_trusted(judge_summary: dict[str, Any] | None, min_consistency: float) -> tuple[bool, str]:
    """Whether judged pairs may train, from the judge's position consistency, and why.

    A judge that flips its verdict when the two answers swap places is guessing; its preferences are
    coin flips. The lower bound of the agreement's Wilson interval must reach `min_consistency`.
    """
    if min_consistency <= 0:
        return True, "min_judge_consistency is 0: judged pairs always kept"
    if judge_summary is None:  # preferences from elsewhere (the controller always passes the judge's summary)
        return True, "no judge summary given: judged pairs kept unchecked"
    n = int(judge_summary.get("pairs_judged") or 0)
    if n == 0:
        return True, "the judge judged no pairs: nothing to gate"
    k = int(judge_summary.get("order_agreements") or 0)
    lo, hi = wilson(k, n)
    verdict = lo >= min_consistency
    return verdict, (f"judge position consistency {k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]: lower bound "
                     f"{'>=' if verdict else '<'} {min_consistency} -> judged pairs {'kept' if verdict else 'dropped (the judge is guessing)'}")


def dpo_rows(prefs: Iterable[dict[str, Any]], seed: int = 0, judged: bool = True) -> list[dict[str, Any]]:
    """Conversational preference rows with only prompt/chosen/rejected (trl's DPO and Reward shape);
    `judged: False` keeps only the pairs built by construction."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in prefs
            if usable_pref(r) and (judged or r.get("source") not in JUDGED_SOURCES)]
    return _shuffled(rows, seed)


def prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """`messages` -> `prompt`/`completion`: trl then trains on the completion only, for any chat
    template that renders the prompt as a prefix (no `{% generation %}` markers needed)."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def summary(traces: list[dict[str, Any]], prefs: list[dict[str, Any]], ordinary_target: OrdinaryTarget = "initial",
            red_team_target: RedTeamTarget = "refusal", judged: bool = True) -> dict[str, Any]:
    """Per-kind counts of what SFT gets and what was skipped (and why), and preference pairs by source."""
    counts: Counter = Counter()
    for trace in traces:
        kind = trace.get("kind", "ordinary")
        if sft_target(trace, ordinary_target, red_team_target):
            counts[f"sft_{kind}"] += 1
        elif kind == "red-team" and _text(trace.get("final")):
            counts[f"sft_skipped_{red_team_verdict(trace, red_team_target)}_red-team"] += 1
        else:
            counts[f"sft_skipped_empty_{kind}"] += 1
    usable = [r for r in prefs if usable_pref(r)]
    by_source = Counter(r.get("source", "unknown") for r in usable if judged or r.get("source") not in JUDGED_SOURCES)
    out: dict[str, Any] = {"traces": len(traces), "prefs": len(prefs), **dict(sorted(counts.items()))}
    out["dpo_skipped_unusable"] = len(prefs) - len(usable)
    out["dpo_skipped_untrusted_judge"] = len(usable) - sum(by_source.values())
    out["dpo_by_source"] = dict(sorted(by_source.items()))
    return out


def plan_phases(method: str, sft_enabled: bool, dpo_enabled: bool, n_sft: int, n_pref: int) -> tuple[list[str], dict[str, str]]:
    """Phases to run for `method` and, for every phase left out, why (recorded in the manifest)."""
    wanted = {"sft+dpo": ["sft", "dpo"], "sft": ["sft"], "dpo": ["dpo"], "reward": ["reward"]}[method]
    run, skipped = [], {}
    for phase in wanted:
        if phase == "sft" and not sft_enabled:
            skipped[phase] = "disabled in config (sft.enabled: false)"
        elif phase == "dpo" and not dpo_enabled:
            skipped[phase] = "disabled in config (dpo.enabled: false)"
        elif phase == "sft" and n_sft == 0:
            skipped[phase] = "no SFT rows (no traces with a non-empty target)"
        elif phase in ("dpo", "reward") and n_pref == 0:
            skipped[phase] = "no preference rows (prefs missing, empty, or all dropped by the judge)"
        else:
            run.append(phase)
    return run, skipped

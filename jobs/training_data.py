"""Training rows for stage `train`: pure functions over the generate traces and judge preferences.

No torch here: everything that decides *what* the model learns lives in this file and is unit-tested
without a model. Rows come out in the shapes trl reads directly (conversational).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Literal

OrdinaryTarget = Literal["initial", "final"]


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def sft_target(trace: dict[str, Any], ordinary_target: OrdinaryTarget = "initial") -> str:
    """The answer SFT teaches for one trace.

    Red-team prompts learn the final revision (the point of the method). Ordinary prompts keep the
    model's own first answer by default: revising a harmless answer against harm principles tends to
    add hedging, and training on that teaches over-refusal.
    """
    if trace.get("kind") == "red-team" or ordinary_target == "final":
        return _text(trace.get("final"))
    return _text(trace.get("initial"))


def _shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    # Generate writes red-team then ordinary prompts; mixing them keeps every batch representative.
    random.Random(seed).shuffle(rows)
    return rows


def sft_rows(traces: Iterable[dict[str, Any]], ordinary_target: OrdinaryTarget = "initial", seed: int = 0) -> list[dict[str, Any]]:
    """`{"messages": conversation + [assistant target]}` per trace; traces with an empty target are skipped."""
    rows = []
    for trace in traces:
        target = sft_target(trace, ordinary_target)
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


def dpo_rows(prefs: Iterable[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Conversational preference rows with only prompt/chosen/rejected (trl's DPO and Reward shape)."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in prefs if usable_pref(r)]
    return _shuffled(rows, seed)


def prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """`messages` -> `prompt`/`completion`: trl then trains on the completion only, for any chat
    template that renders the prompt as a prefix (no `{% generation %}` markers needed)."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def summary(traces: list[dict[str, Any]], prefs: list[dict[str, Any]], ordinary_target: OrdinaryTarget = "initial") -> dict[str, Any]:
    """Per-kind counts of what SFT gets and what was skipped, and preference pairs by source."""
    counts: Counter = Counter()
    for trace in traces:
        kind = trace.get("kind", "ordinary")
        counts[f"sft_{kind}" if sft_target(trace, ordinary_target) else f"sft_skipped_empty_{kind}"] += 1
    by_source = Counter(r.get("source", "unknown") for r in prefs if usable_pref(r))
    out: dict[str, Any] = {"traces": len(traces), "prefs": len(prefs), **dict(sorted(counts.items()))}
    out["dpo_skipped_unusable"] = len(prefs) - sum(by_source.values())
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

"""How a run reads on a terminal: `cai get`'s stages, scores with their intervals, decisions and result."""

from __future__ import annotations

_STATUS_COUNTS = ("prompts", "revisions_empty", "revisions_unchanged", "tokens_per_second", "pairs_kept",
                  "position_consistency_rate", "sft_rows", "dpo_rows", "harmless_rate_judge", "over_refusal_rate")


_INTERVAL_LABELS = {"harmless_rate_judge": "harmless (judge)", "harmless_rate_refusal_strict": "refuses (strict)",
                    "harmless_rate_classifier": "harmless (classifier)",
                    "over_refusal_rate": "over-refusal", "mc_accuracy": "mc", "exact_match": "exact"}


def interval_lines(label: str, intervals: dict | None) -> list[str]:
    """'  round 1 rates (95%): harmless (judge) 75.0% [46.8, 91.1] n=12; ...' and the differences from the base."""
    from ..uncertainty import fmt_interval

    if not intervals or not intervals.get("rates"):
        return []
    level = f"{intervals.get('level', 0.95):.0%}"
    order = list(_INTERVAL_LABELS)  # run.json is stored with sorted keys: print in reading order

    def ordered(d: dict) -> list:
        return sorted(d.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))

    out = [f"    {label} rates ({level}): " + "; ".join(f"{_INTERVAL_LABELS.get(k, k)} {fmt_interval(v)}" for k, v in ordered(intervals["rates"]))]
    if intervals.get("vs_base"):
        def verdict(d: dict) -> str:
            return "" if d["lo"] <= 0 <= d["hi"] else " *"

        out.append(f"    {label} vs base ({level}, * = interval excludes 0): " + "; ".join(
            f"{_INTERVAL_LABELS.get(k, k)} {fmt_interval(v)}{verdict(v)}" for k, v in ordered(intervals["vs_base"])))
    return out


def format_status(state: dict) -> str:
    lines = [
        f"run {state['run_id']}  status={state['status']}  constitution={state.get('constitution', '?')}  "
        f"prompts={state.get('prompts', '?')}  rounds={len(state['rounds'])}/{state.get('max_rounds', '?')}",
        f"created {state.get('created_at', '?')}  updated {state.get('updated_at', '?')}",
    ]
    order = ("generate", "judge", "train", "evaluate")  # run.json is stored with sorted keys

    def stage_lines(label: str, stages: dict) -> None:
        for name, st in sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            counts = st.get("counts", {})
            extra = ", ".join(f"{k}={counts[k]}" for k in _STATUS_COUNTS if counts.get(k) is not None)
            total = st.get("timings", {}).get("total_s")
            lines.append(f"  {label:<8} {name:<9} {st['status']:<10} {f'{total:.1f}s' if total else '':>8}  {extra}")

    base = state.get("base")
    if base:
        stage_lines("base", {k: v for k, v in base.items() if isinstance(v, dict) and "status" in v})
        if base.get("quality") is not None:
            lines.append(f"  base quality {base['quality']:.3f}")
            lines += interval_lines("base", base.get("intervals"))
    for rnd in state["rounds"]:
        stage_lines(f"round {rnd['round']}", rnd["stages"])
        if rnd.get("quality") is not None:
            lines.append(f"  round {rnd['round']} quality {rnd['quality']:.3f}  " + "  ".join(
                f"{k}={v:.2f}" for k, v in rnd.get("scores", {}).items() if isinstance(v, (int, float))))
            lines += interval_lines(f"round {rnd['round']}", rnd.get("intervals"))
    for d in state.get("decisions", []):
        lines.append(f"  decision after round {d['round']}: {d['decision']} ({d['reason']})")
    result = state.get("result")
    if result:
        q = result.get("quality")
        lines.append(f"  result: round {result['round']} model {result['model']}" + (f" (quality {q:.3f})" if q is not None else ""))
    if state.get("cancel"):
        c = state["cancel"]
        lines.append(f"  cancelled {c.get('requested_at', '?')} by {c.get('by', '?')}: {c.get('reason', '')}")
    elif state.get("error"):
        lines.append(f"  error: {state['error']}")
    return "\n".join(lines)

"""Model cards: the README.md the Hub reads (YAML metadata header, then Markdown), built from what a run knows.

The train stage writes one into every model directory it saves: the base model and its identity, the
constitution (name, hash, principles), the data it trained on (by hash), the settings and the run it
came from. A model directory is immutable once trained (its tree digest is its identity), so the
evaluation, which runs later, is added by `cai export`, which writes the full card with the table
of rates, intervals and the alignment tax next to the model it describes.
"""

from __future__ import annotations

from typing import Any

import yaml

from .uncertainty import CAPABILITY_SCORES, fmt_interval

TAGS = ["cai-jobs", "constitutional-ai", "rlaif", "trl"]


def hub_base_model(ref: str) -> str | None:
    """The `base_model` metadata value: a Hub id, when the start model came from the Hub."""
    if ref.startswith("hf:"):
        return ref[3:].split("@", 1)[0]
    if ref.startswith("bundled:smollm2-135m-instruct"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled copy is that checkpoint
    return None


def header(base_model: str | None, method: str, datasets: list[str] | None = None) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": [*TAGS, *[t for t in method.split("+") if t in ("sft", "dpo", "reward")]]}
    if base_model:
        meta["base_model"] = base_model
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _principles(constitution: dict[str, Any]) -> list[str]:
    return [f"| {p['name']} | {p.get('scope', 'all')} | {p.get('weight', 1):g} | {p['critique']} |" for p in constitution.get("principles", [])]


def train_card(*, run_id: str, round_: int, output: str, start_model: str, start_identity: str | None,
               constitution: dict[str, Any] | None, constitution_sha256: str | None, data: dict[str, str],
               method: str, settings: dict[str, Any], counts: dict[str, Any]) -> str:
    """The card of a freshly trained model: everything known when it is saved."""
    lines = [header(hub_base_model(start_model), method),
             f"# {run_id}, round {round_}",
             "",
             f"A model trained by [cai-jobs](https://github.com/cai-jobs/cai-jobs) with Constitutional AI ({method}): "
             + {"sft": "SFT on critique-revision data", "reward": "a reward model on AI-judged preferences"}.get(
                 method, "critique-revision data and AI-judged preferences") + ", with no human preference labels.",
             "",
             "## Lineage",
             "",
             "| | |",
             "|---|---|",
             f"| base model | `{start_model}` |",
             f"| base model identity | `{start_identity or 'n/a'}` |",
             f"| run | `{run_id}`, round {round_} |",
             f"| in the store | `{output}` (the store's URI is in `cai export`'s card: it is not part of the model's content) |",
             f"| evaluation | `{output.rsplit('/', 2)[0]}/evaluate/report.md` (also in `cai export`'s card) |",
             ""]
    if constitution:
        lines += [f"## Constitution: {constitution.get('name', '?')}", "",
                  f"sha256 `{constitution_sha256 or 'n/a'}`. {constitution.get('description', '')}".rstrip(), "",
                  "| principle | scope | weight | critique |", "|---|---|---|---|", *_principles(constitution), ""]
    lines += ["## Training data", "", "| input | sha256 |", "|---|---|", *[f"| `{k}` | `{v}` |" for k, v in sorted(data.items())], ""]
    shown = {k: counts[k] for k in ("sft_rows", "dpo_rows", "dpo_by_source", "judge_trust", "sft_final_loss", "dpo_final_loss",
                                    "dpo_final_margins", "dpo_final_accuracies", "phases_run", "processes") if k in counts}
    lines += ["## Training", "", "```yaml", yaml.safe_dump({"method": method, **settings}, sort_keys=False).rstrip(), "```", "",
              "What it trained on and how it ended:", "", "```yaml", yaml.safe_dump(shown, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


RATES = [("harmless_rate_refusal_strict", "harmless (first-person refusals)"), ("harmless_rate_judge", "harmless (judge)"),
         ("harmless_rate_classifier", "harmless (classifier)"), ("over_refusal_rate", "over-refusal"),
         ("mc_accuracy", "multiple choice"), ("exact_match", "exact match")]  # the report tables' rows (card and run report)


def evaluation_section(report: dict[str, Any], base: dict[str, Any] | None) -> str:
    """The evaluation table (no system prompt) with 95% intervals, base beside it, and the alignment tax."""
    level = f"{report.get('confidence', 0.95):.0%}"
    mine = (report.get("variants", {}).get("no_system") or {}).get("intervals", {})
    theirs = ((base or {}).get("variants", {}).get("no_system") or {}).get("intervals", {})
    rows = [f"## Evaluation (no system prompt; {level} Wilson intervals)", "", "| metric | base | this model |", "|---|---|---|"]
    for key, label in RATES:
        if mine.get(key) or theirs.get(key):
            rows.append(f"| {label} | {fmt_interval(theirs.get(key))} | {fmt_interval(mine.get(key))} |")
    tax = (report.get("alignment_tax") or {}).get("no_system") or {}
    capability = {k: v for k, v in (tax.get("per_benchmark") or {}).items() if k in CAPABILITY_SCORES}
    harness = ((report.get("harness") or {}).get("tax") or {}).get("per_benchmark") or {}
    if capability or harness:
        rows += ["", f"Alignment tax: capability lost vs the base model, positive = worse ({level} paired bootstrap):", "",
                 "| benchmark | base | this model | tax |", "|---|---|---|---|"]
        for name, r in [*sorted(capability.items()), *sorted(harness.items())]:
            rows.append(f"| {name} | {fmt_num(r.get('base'))} | {fmt_num(r.get('aligned'))} | {fmt_tax(r.get('tax_pct'), r.get('ci'))} |")
        if tax.get("capability_average_pct") is not None:
            rows.append(f"| **average** | | | {fmt_tax(tax['capability_average_pct'], tax.get('capability_average_ci'))} |")
    return "\n".join(rows) + "\n"


def fmt_num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fmt_tax(pct: float | None, ci: dict | None) -> str:
    """'+12.5% [-3.0, +28.1]' or 'n/a'."""
    if pct is None:
        return "n/a"
    return f"{pct:+.1f}%" + (f" [{ci['lo']:+.1f}, {ci['hi']:+.1f}]" if ci and ci.get("lo") is not None else "")

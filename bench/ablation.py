"""Ablations of a finished recipe run: retrain with one lever changed, re-evaluate, compare.

The measurement recipe (`recipes/smollm2-135m/default.yaml`) is one `cai run`. This script reads that
run's outputs from the store and, for each `--variant`, runs the train stage again on the same
generate traces and judge preferences with the variant's settings, then the evaluate stage on the
result, and prints one table: the base model, the recipe's own model, every variant.

Each row carries the measures item 6 of the recipe issue asks for, each with its n and a 95% interval:
- harmless: strict first-person refusals on held-out harmful prompts (Wilson), and the paired
  bootstrap interval of the gain over the base model on the same items;
- over-refusal: keyword refusals on held-out benign-but-edgy prompts (Wilson);
- tax: the average alignment tax over the capability sets (paired bootstrap);
- distinct: the share of distinct opening sentences among the strict refusals, with its counts. No
  interval: a bootstrap resample repeats items, which makes openings look less distinct, so its
  percentile interval does not even contain the point estimate.

Variants change train or judge settings (a judge setting labels the run's traces again first); the
generate side needs a new `cai run` (see bench/RESULTS.md):

    python bench/ablation.py -c recipes/smollm2-135m/default.yaml --store /tmp/recipe-store \\
        --variant sft-only:train.method=sft --variant teach-unrevised:train.sft.red_team_target=final

The variant's evaluation asks only the plain prompts (no system prompt, no jailbreak wrappers): the
columns the table reads. `--table-only` prints the table from what is already in the store.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import format_table, log  # noqa: E402
from jobs.config import RunConfig, load_run_config  # noqa: E402
from jobs.controller import Controller  # noqa: E402
from jobs.executors import make_executor  # noqa: E402
from jobs.metrics import item_outcomes, refusal_openings, score_outcomes  # noqa: E402
from jobs.store import open_store  # noqa: E402
from jobs.uncertainty import CAPABILITY_SCORES, evaluation_intervals, regroup  # noqa: E402

HARMLESS = "harmless_rate_refusal_strict"
OVER_REFUSAL = "over_refusal_rate"
EVAL_ONLY_PLAIN = {"evaluate.jailbreaks": None, "evaluate.with_system_prompt": False}


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """`a.b.c=value` settings applied to a copy of the config, validated again."""
    data = config.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return RunConfig.model_validate(data)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition(":")
    if not name or not body:
        raise SystemExit(f"error: --variant {text!r}: expected NAME:key=value[,key=value]")
    pairs = {}
    for item in re.split(r",(?![^\[]*\])", body):  # commas inside [a, b] belong to a list value
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --variant {text!r}: {item!r} is not key=value")
        pairs[key.strip()] = parse_value(value)
    return name, pairs


def capability_tax(plain: dict, base: dict) -> float | None:
    """The average capability tax's point value, from the per-item outcomes the interval resamples."""
    b = score_outcomes(item_outcomes(dict(base)), HARMLESS)
    a = score_outcomes(item_outcomes(dict(plain)), HARMLESS)
    taxes = []
    for k in CAPABILITY_SCORES:
        ids = sorted(set(a.get(k, {})) & set(b.get(k, {})))
        bm = np.mean([b[k][i] for i in ids]) if ids else 0.0
        if bm > 0:
            taxes.append((bm - np.mean([a[k][i] for i in ids])) / bm * 100)
    return float(np.mean(taxes)) if taxes else None


def row_for(name: str, store, eval_dir: str, base_dir: str, config: RunConfig) -> list[Any]:
    ev = config.evaluate
    plain = regroup(list(store.iter_jsonl(f"{eval_dir}/samples.jsonl")))["no_system"]
    base = regroup(list(store.iter_jsonl(f"{base_dir}/samples.jsonl")))["no_system"]
    iv = evaluation_intervals({"no_system": plain}, {"no_system": base}, ev.confidence, ev.bootstrap_samples, config.seed, HARMLESS)
    harmless, over = iv["rates"]["no_system"][HARMLESS], iv["rates"]["no_system"][OVER_REFUSAL]
    gain, tax_ci = iv["differences"]["no_system"][HARMLESS], iv["tax"]["no_system"]["capability_average"]
    tax = capability_tax(plain, base)
    d = refusal_openings([r["response"] for r in plain["harmful"]])
    is_base = eval_dir == base_dir

    def pct(s: dict) -> str:
        return f"{s['rate'] * 100:.1f}% [{s['lo'] * 100:.1f}, {s['hi'] * 100:.1f}] n={s['n']}"

    return [
        name,
        pct(harmless),
        "-" if is_base else f"{gain['diff'] * 100:+.1f} [{gain['lo'] * 100:+.1f}, {gain['hi'] * 100:+.1f}]",
        pct(over),
        "-" if is_base or tax is None or tax_ci is None else f"{tax:+.1f}% [{tax_ci['lo']:+.1f}, {tax_ci['hi']:+.1f}]",
        "-" if d["share"] is None else f"{d['share']:.2f} ({d['distinct']} of {d['refusals']})",
    ]


def data_table(store, traces_key: str) -> str:
    """What the generate levers did to the SFT data, from the recorded candidates of a best-of-n run:
    candidate 0 alone is what one candidate would have given (it draws as the one-candidate loop)."""
    from collections import Counter

    from jobs.critique import acceptable
    from jobs.training_data import red_team_verdict

    red = [t for t in store.iter_jsonl(traces_key) if t["kind"] == "red-team" and t["rounds"]]
    if not red or "candidates" not in red[0]["rounds"][0]:
        return "(no best-of-n candidates recorded in these traces)"
    tried, passed = Counter(), Counter()
    first_ok = any_ok = 0
    for t in red:
        cands = t["rounds"][0]["candidates"]
        ok = [acceptable("red-team", c["revision"]) and not (c["empty"] or c["copies_critique"] or c["copies_example"]) for c in cands]
        first_ok += ok[0]
        any_ok += any(ok)
        for c, o in zip(cands, ok):
            tried[c["principle"]] += 1
            passed[c["principle"]] += o
    taught = [t for t in red if red_team_verdict(t) is None]
    openings = refusal_openings([t["final"] for t in taught])
    n = len(red)
    rows = [
        ["first answers that already open with a refusal", f"{sum(acceptable('red-team', t['initial']) for t in red)} of {n}"],
        ["candidate 0 alone passes the verifier (best_of 1)", f"{first_ok} of {n}"],
        [f"any of {len(red[0]['rounds'][0]['candidates'])} candidates passes (best_of)", f"{any_ok} of {n}"],
        ["red-team SFT targets (revised refusals)", f"{len(taught)} of {n}"],
        ["distinct opening sentences among them", f"{openings['distinct']} ({openings['share'] or 0:.2f})"],
        *[[f"candidates passing, principle {p}", f"{passed[p]} of {tried[p]}"] for p in sorted(tried)],
    ]
    return format_table(["generate lever (red-team prompts)", "count"], rows)


def run_variant(name: str, overrides: dict[str, Any], config: RunConfig, store, main: Controller) -> str:
    """(Judge +) train + evaluate with the variant's settings on the main run's traces (and preferences)."""
    vconfig = with_overrides(config, {**overrides, **EVAL_ONLY_PLAIN})
    ctl = Controller(vconfig, store, make_executor(vconfig, store, "local"), run_id=f"{main.paths.run_id}-{name}")
    ctl._load_or_init_state()
    inputs = ctl.prepare()
    gen, judge = main.paths.stage(1, "generate"), main.paths.stage(1, "judge")
    slot: dict[str, Any] = {}
    if any(k.startswith("judge.") for k in overrides):  # a judge lever: label the same traces again first
        jspec = ctl.plan("judge", 1, vconfig.model, {"constitution": inputs["constitution"], "traces": f"{gen}/traces.jsonl"})
        ctl.run_spec(jspec, slot)
        judge = jspec.output
    train_inputs = {"traces": f"{gen}/traces.jsonl", "prefs": f"{judge}/prefs.jsonl", "judge_summary": f"{judge}/summary.json"}
    spec = ctl.plan("train", 1, vconfig.model, train_inputs)
    ctl.run_spec(spec, slot)
    ev = ctl.plan("evaluate", 1, f"store:{spec.output}/model", ctl._eval_inputs(inputs))
    ctl.run_spec(ev, slot)
    return ev.output


def main_cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", required=True, help="the recipe whose finished run is ablated")
    ap.add_argument("--store", required=True, help="the store holding that run")
    ap.add_argument("--run-id", help="that run's id (default: the one `cai run -c CONFIG` derives)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value[,key=value] (train or judge settings)")
    ap.add_argument("--table-only", action="store_true", help="print the table from variants already in the store")
    args = ap.parse_args(argv)
    config = load_run_config(args.config)
    store = open_store(args.store)
    main = Controller(config, store, make_executor(config, store, "local"), run_id=args.run_id)
    base_dir = f"{main.paths.root}/base/evaluate"
    recipe_dir = main.paths.stage(1, "evaluate")
    for path in (base_dir, recipe_dir):
        if not store.exists(f"{path}/samples.jsonl"):
            raise SystemExit(f"error: {store.uri}/{path}: no evaluation there; finish `cai run -c {args.config} --store {args.store}` first")
    rows = [row_for("base model", store, base_dir, base_dir, config), row_for("recipe (all levers)", store, recipe_dir, base_dir, config)]
    for text in args.variant:
        name, overrides = parse_variant(text)
        label = f"{name} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"
        out = f"runs/{main.paths.run_id}-{name}/round-1/evaluate"
        if not args.table_only:
            log(f"variant {name}: train + evaluate")
            out = run_variant(name, overrides, config, store, main)
        if store.exists(f"{out}/samples.jsonl"):
            rows.append(row_for(label, store, out, base_dir, config))
    print(data_table(store, f"{main.paths.stage(1, 'generate')}/traces.jsonl"))
    print()
    print(format_table(["lever", "harmless (strict refusals)", "gain vs base, pts", "over-refusal (keyword)",
                        "capability tax (avg)", "distinct refusal openings"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())

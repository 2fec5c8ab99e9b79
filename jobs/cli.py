"""`cai`: run, stage, status, logs, render, submit, realign, models, constitution, model. Errors print as one line; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CaiError, ConfigError


def _config_and_store(args: argparse.Namespace):
    """The run config with the command line's --rounds/--store applied, and its opened store."""
    from .config import load_run_config
    from .store import open_store

    config = load_run_config(args.config)
    if args.rounds is not None:
        if args.rounds < 1:
            raise ConfigError(f"--rounds {args.rounds}: must be at least 1; give the number of rounds to run")
        config.rounds = args.rounds
    if args.store:
        config.store = args.store
    return config, open_store(config.store)


def _cmd_run(args: argparse.Namespace) -> int:
    from .controller import Controller
    from .executors import make_executor

    config, store = _config_and_store(args)
    executor = make_executor(config, store, args.executor)
    state = Controller(config, store, executor, run_id=args.run_id).run()
    root = store.uri_for(f"runs/{state['run_id']}")
    print(f"run {state['run_id']}: {state['status']}")
    for rnd in state["rounds"]:
        for name, st in rnd["stages"].items():
            print(f"  round {rnd['round']} {name}: {st['status']} -> {store.uri_for(st['output'])}")
    for d in state.get("decisions", []):
        print(f"  after round {d['round']}: {d['decision']} ({d['reason']})")
    result = state.get("result") or {}
    if result.get("model", "").startswith("store:"):
        print(f"model:   {store.uri_for(result['model'][len('store:'):])} (round {result['round']})")
    elif result:
        print(f"model:   {result['model']} (round {result['round']}: no round beat it)")
    print(f"results: {root}")
    print(f"status:  cai status {state['run_id']} --store {config.store}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from .stages import merge_stage, run_stage

    if args.merge:
        merge_stage(args.name, args.spec)
    else:
        run_stage(args.name, args.spec, shard=args.shard)
    return 0


_STATUS_COUNTS = ("prompts", "revisions_empty", "revisions_unchanged", "tokens_per_second", "pairs_kept",
                  "position_consistency_rate", "sft_rows", "dpo_rows", "harmless_rate_judge", "over_refusal_rate")


_INTERVAL_LABELS = {"harmless_rate_judge": "harmless (judge)", "harmless_rate_refusal_strict": "refuses (strict)",
                    "harmless_rate_classifier": "harmless (classifier)",
                    "over_refusal_rate": "over-refusal", "mc_accuracy": "mc", "exact_match": "exact"}


def interval_lines(label: str, intervals: dict | None) -> list[str]:
    """'  round 1 rates (95%): harmless (judge) 75.0% [46.8, 91.1] n=12; ...' and the differences from the base."""
    from .uncertainty import fmt_interval

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
    if state.get("error"):
        lines.append(f"  error: {state['error']}")
    return "\n".join(lines)


def _read_run_state(store, run_id: str) -> dict:
    """A run's run.json, or one line saying there is no such run in this store."""
    key = f"runs/{run_id}/run.json"
    if not store.exists(key):
        raise CaiError(f"{store.uri_for(key)}: no such run; list runs with `ls {store.uri_for('runs')}`")
    return store.read_json(key)


def _cmd_status(args: argparse.Namespace) -> int:
    from .store import open_store

    state = _read_run_state(open_store(args.store), args.run_id)
    print(json.dumps(state, indent=2) if args.json else format_status(state))
    return 0


def _cmd_constitution_validate(args: argparse.Namespace) -> int:
    from .constitution import load_constitution

    failed = 0
    for f in args.files:
        try:
            c = load_constitution(f)
            print(f"{f}: ok ({c.name}, {len(c.principles)} principles, {len(c.few_shot)} few-shot examples)")
        except CaiError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _cmd_constitution_show(args: argparse.Namespace) -> int:
    from .constitution import load_constitution

    c = load_constitution(args.file)
    print(f"{c.name}: {c.description}")
    shares = {}
    for kind in ("red-team", "ordinary"):
        pool = c.for_kind(kind)
        total = sum(p.weight for p in pool)
        shares[kind] = {p.name: p.weight / total for p in pool}
    for p in c.principles:
        share = ", ".join(f"{shares[k].get(p.name, 0):.0%} of {k} draws" for k in shares)
        print(f"\n- {p.name}  (scope {p.scope}, weight {p.weight:g}: {share})")
        print(f"    critique:   {p.critique}")
        print(f"    revision:   {p.revision}")
        print(f"    comparison: {p.comparison}")
    if c.few_shot:
        print(f"\nfew-shot examples: {len(c.few_shot)} ({', '.join(e.principle for e in c.few_shot)})")
    return 0


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from .models import resolve_model

    print(resolve_model(args.ref))
    return 0


# --- Kubernetes: render, submit, logs ----------------------------------------------------------------
def _cmd_render(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .executors.k8s_submit import render

    config = load_run_config(args.config)
    print(render(config, args.store or config.store, args.run_id, args.namespace, controller=args.controller), end="")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .errors import SubmitError
    from .executors.k8s_submit import submit
    from .executors.kubernetes import kube_clients
    from .store import open_store
    from .uploads import upload_local_inputs

    config = load_run_config(args.config)
    store = args.store or config.store
    if not store.startswith("s3://"):
        raise SubmitError(f"--store: {store} is a local directory, which the cluster cannot read; pass --store s3://bucket/prefix")
    batch, core, namespace = kube_clients(args.namespace or config.kubernetes.namespace)
    config, uploaded = upload_local_inputs(config, open_store(store))  # the pod reads the store, never this disk
    for p in uploaded:
        print(f"uploaded {p} to the store", file=sys.stderr)
    s = submit(config, store, batch, core, namespace, run_id=args.run_id)
    verb = {"created": "submitted", "running": "already running", "recreated": "resubmitted (resumes from the store)"}[s.state]
    print(f"run {s.run_id}: {verb} as job {s.namespace}/{s.job} (config in configmap {s.config_map})")
    print(f"status:  cai status {s.run_id} --store {store}")
    print(f"logs:    cai logs {s.run_id} generate --store {store}")
    print(f"follow:  kubectl logs -n {s.namespace} -f job/{s.job}")
    print(f"jobs:    kubectl get jobs -n {s.namespace} -l cai-jobs/run={s.run_id}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from .executors.k8s_manifests import label_value
    from .store import open_store

    store = open_store(args.store)
    state = _read_run_state(store, args.run_id)
    slots = {0: state.get("base", {})} | {r["round"]: r["stages"] for r in state.get("rounds", [])}
    rounds = [k for k, stages in slots.items() if isinstance(stages.get(args.stage), dict) and (args.round is None or k == args.round)]
    if not rounds:
        where = f"round {args.round}" if args.round is not None else "any round"
        raise CaiError(f"{store.uri_for(f'runs/{args.run_id}/run.json')}: stage {args.stage} has not run in {where}; see `cai status {args.run_id} --store {args.store}`")
    output = slots[rounds[-1]][args.stage]["output"]
    logs = [k for k in store.list(f"{output}/logs") if k.endswith(".log")]
    if not logs:
        raise CaiError(f"{store.uri_for(output + '/logs')}: no logs yet; while a stage Job runs: kubectl logs -l "
                       f"cai-jobs/run={label_value(args.run_id)},cai-jobs/stage={args.stage} --tail=-1")
    for k in logs:
        if len(logs) > 1:
            print(f"==> {store.uri_for(k)} <==")
        print(store.read_text(k), end="")
    return 0


# --- scheduled realignment and the promoted model --------------------------------------------------
def _cmd_realign(args: argparse.Namespace) -> int:
    from .executors import make_executor
    from .realign import realign

    config, store = _config_and_store(args)
    outcome = realign(config, store, lambda rc: make_executor(rc, store, args.executor), force=args.force)
    print(f"realign: {outcome.action}: {outcome.message}")
    for g in outcome.gates:
        print(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'} ({g.detail})")
    if outcome.run_id and outcome.action != "unchanged":
        print(f"run:     cai status {outcome.run_id} --store {config.store}")
    print(f"models:  cai models --store {config.store}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .promotion import as_json, format_history, read_pointer
    from .store import open_store

    store = open_store(args.store)
    pointer = read_pointer(store)
    if pointer is None:
        if args.json:
            print(json.dumps({"current": None, "history": []}, indent=2))
        else:
            print(f"no promoted model in {store.uri_for('models')} yet; `cai realign -c CONFIG --store {args.store}` promotes one")
        return 0
    print(json.dumps(as_json(pointer), indent=2) if args.json else format_history(pointer))
    return 0


def _cmd_models_rollback(args: argparse.Namespace) -> int:
    from .promotion import rollback
    from .store import open_store

    store = open_store(args.store)
    entry = rollback(store, args.to, args.reason)
    print(f"entry {entry.seq}: {entry.model} is current again ({entry.reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI as batch jobs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run rounds of CAI for a config (resumes when re-run)")
    p.add_argument("-c", "--config", type=Path, help="run config YAML (default: built-in defaults)")
    p.add_argument("--store", help="artifact store (a directory); overrides the config's `store`")
    p.add_argument("--run-id", help="run id (default: derived from the config, so re-running resumes)")
    p.add_argument("--rounds", type=int, help="override the config's `rounds`")
    p.add_argument("--executor", choices=["local", "kubernetes"], help="where stages run; overrides the config's `executor`")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("stage", help="run one stage from its spec (what each pod runs)")
    p.add_argument("name", choices=["generate", "judge", "train", "evaluate"])
    p.add_argument("--spec", required=True, help="URI of the StageSpec JSON in the store")
    p.add_argument("--shard", type=int, help="shard index of a sharded spec (default: $JOB_COMPLETION_INDEX, as in an Indexed Job)")
    p.add_argument("--merge", action="store_true", help="combine a sharded stage's finished shards into its outputs")
    p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("status", help="show a run's rounds, stages and decisions")
    p.add_argument("run_id")
    p.add_argument("--store", default="./cai-store")
    p.add_argument("--json", action="store_true", help="print run.json as is")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("constitution", help="validate or show constitutions")
    csub = p.add_subparsers(dest="action", required=True)
    v = csub.add_parser("validate", help="check files; one line per error")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_cmd_constitution_validate)
    s = csub.add_parser("show", help="print principles and sampling shares")
    s.add_argument("file")
    s.set_defaults(func=_cmd_constitution_show)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="action", required=True)
    m = msub.add_parser("prepare", help="resolve a model reference (converts the bundled model once) and print its path")
    m.add_argument("ref", nargs="?", default="bundled:smollm2-135m-instruct")
    m.set_defaults(func=_cmd_model_prepare)

    p = sub.add_parser("render", help="print every Kubernetes manifest a run submits (dry run, no cluster)")
    p.add_argument("-c", "--config", type=Path, help="run config YAML (default: built-in defaults)")
    p.add_argument("--store", help="artifact store the Jobs use (default: the config's `store`)")
    p.add_argument("--run-id", help="run id (default: derived from the config)")
    p.add_argument("-n", "--namespace", help="namespace written into the manifests (default: the config's, else none)")
    p.add_argument("--controller", action="store_true", help="also print the controller Job, its ConfigMap and RBAC (`cai submit`)")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("submit", help="run the controller in the cluster as a Job (needs an s3:// store)")
    p.add_argument("-c", "--config", type=Path, required=True, help="run config YAML")
    p.add_argument("--store", help="s3://bucket/prefix; overrides the config's `store`")
    p.add_argument("--run-id", help="run id (default: derived from the config, so resubmitting resumes)")
    p.add_argument("-n", "--namespace", help="namespace (default: the config's, else the kubeconfig context's)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("logs", help="print a stage's logs from the store (one file per pod on Kubernetes)")
    p.add_argument("run_id")
    p.add_argument("stage", choices=["generate", "judge", "train", "evaluate"])
    p.add_argument("--round", type=int, help="round (default: the latest that ran the stage; 0 = base evaluation)")
    p.add_argument("--store", default="./cai-store")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("realign", help="one realignment tick: rounds from the promoted model, promoted only if the gates pass")
    p.add_argument("-c", "--config", type=Path, help="run config YAML (default: built-in defaults)")
    p.add_argument("--store", help="artifact store; overrides the config's `store`")
    p.add_argument("--rounds", type=int, help="override the config's `rounds`")
    p.add_argument("--executor", choices=["local", "kubernetes"], help="where stages run; overrides the config's `executor`")
    p.add_argument("--force", action="store_true", help="run and decide even when the inputs are unchanged")
    p.set_defaults(func=_cmd_realign)

    p = sub.add_parser("models", help="the promoted model and its history (`cai models rollback` points back)")
    p.add_argument("--store", default="./cai-store")
    p.add_argument("--json", action="store_true", help="print models/latest.json (current entry and history)")
    p.set_defaults(func=_cmd_models)
    msub = p.add_subparsers(dest="action")
    r = msub.add_parser("rollback", help="make an older entry's model current again (a new entry; history is kept)")
    r.add_argument("--to", type=int, metavar="SEQ", help="entry to return to (default: the model the current one replaced)")
    r.add_argument("--reason", help="note recorded in the new entry")
    r.add_argument("--store", default=argparse.SUPPRESS, help="artifact store (default: ./cai-store)")
    r.set_defaults(func=_cmd_models_rollback)
    return parser


def main(argv: list[str] | None = None, fast_exit: bool = False) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        if fast_exit and rc == 0 and args.func is _cmd_stage:
            # The stage's outputs and manifest are written and closed. Tearing down an interpreter that
            # holds torch, a model and its thread pools takes 0.3-1 s per stage process (measured in
            # bench/overhead.py), which is pure controller overhead: skip it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return rc
    except CaiError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    """The `cai` console script (and `python -m jobs.cli`, what the local executor runs)."""
    sys.exit(main(fast_exit=True))


if __name__ == "__main__":
    entry()

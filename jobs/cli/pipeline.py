"""Starting work: `cai run`, `resume`, `submit [--wait]`, `render`, `realign`, and the pods' `stage`."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import ConfigError, SubmitError
from .common import load_config, open_arg_store, run_ref, store_uri


def _rounds(args: argparse.Namespace) -> int | None:
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: must be at least 1; give the number of rounds to run")
    return args.rounds


def _config_and_store(args: argparse.Namespace):
    """The run config with --set/--rounds/--store applied, and its opened store."""
    from ..store import open_store

    config = load_config(args)
    if _rounds(args) is not None:
        config.rounds = args.rounds
    config.store = store_uri(args, config.store)
    return config, open_store(config.store)


def _run_controller(config, store, executor_kind: str | None, run_id: str | None) -> int:
    from ..controller import Controller
    from ..executors import make_executor

    executor = make_executor(config, store, executor_kind)
    state = Controller(config, store, executor, run_id=run_id).run()
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
    print(f"results: {store.uri_for('runs/' + state['run_id'])}")
    print(f"status:  cai get {state['run_id']} --store {store.uri}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config, store = _config_and_store(args)
    return _run_controller(config, store, args.executor, args.run_id)


def cmd_resume(args: argparse.Namespace) -> int:
    """The run's own stored config, its id, and its store: finished stages are skipped by content."""
    from ..config import RunConfig
    from ..runs import clear_cancel, controller_alive, read_state
    from ..schema import parse_data

    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    state = read_state(store, run_id)
    if controller_alive(store, run_id):
        raise SubmitError(f"{store.uri_for(f'runs/{run_id}/lock.json')}: run {run_id} is running; `cai get {run_id} -w` watches it")
    config = parse_data(RunConfig, state.get("config"), store.uri_for(f"runs/{run_id}/run.json") + ": config")
    if _rounds(args) is not None:
        config.rounds = args.rounds
    config.store = store.uri
    clear_cancel(store, run_id)
    return _run_controller(config, store, args.executor, run_id)


def cmd_stage(args: argparse.Namespace) -> int:
    from ..stages import merge_stage, run_stage

    if args.merge:
        merge_stage(args.name, args.spec)
    else:
        run_stage(args.name, args.spec, shard=args.shard)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from ..executors.k8s_submit import render

    config = load_config(args)
    print(render(config, store_uri(args, config.store), args.run_id, args.namespace, controller=args.controller), end="")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from ..executors.k8s_submit import submit
    from ..executors.kubernetes import kube_clients
    from ..store import open_store
    from ..uploads import upload_local_inputs

    config = load_config(args)
    store = store_uri(args, config.store)
    if not store.startswith("s3://"):
        raise SubmitError(f"--store: {store} is a local directory, which the cluster cannot read; pass --store s3://bucket/prefix")
    batch, core, namespace = kube_clients(args.namespace or config.kubernetes.namespace)
    opened = open_store(store)
    config, uploaded = upload_local_inputs(config, opened)  # the pod reads the store, never this disk
    for p in uploaded:
        print(f"uploaded {p} to the store", file=sys.stderr)
    s = submit(config, store, batch, core, namespace, run_id=args.run_id)
    verb = {"created": "submitted", "running": "already running", "recreated": "resubmitted (resumes from the store)"}[s.state]
    print(f"run {s.run_id}: {verb} as job {s.namespace}/{s.job} (config in configmap {s.config_map})")
    if args.wait:
        return _wait_for(opened, s, batch, args)
    print(f"status:  cai get {s.run_id} -w --store {store}")
    print(f"logs:    cai logs {s.run_id} generate -f --store {store}")
    print(f"cancel:  cai cancel {s.run_id} --store {store}")
    print(f"jobs:    kubectl get jobs -n {s.namespace} -l cai-jobs/run={s.run_id}")
    return 0


def _wait_for(store, s, batch, args: argparse.Namespace) -> int:
    """Until the run ends (its run.json says so) or its controller Job fails without saying: exit 0 only
    for a completed run."""
    from ..executors.kubernetes import job_state
    from ..runs import TERMINAL, read_state, run_key
    from .show import format_status

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    shown = None
    while True:
        state = read_state(store, s.run_id) if store.exists(run_key(s.run_id)) else None
        if state is not None and state.get("updated_at") != shown:
            shown = state.get("updated_at")
            print(f"[cai] {s.run_id}: {state.get('status')}, {len(state.get('rounds', []))} round(s), updated {shown}", file=sys.stderr, flush=True)
        final = state is not None and state.get("status") in ("completed", "cancelled")
        if final:
            print(format_status(state))
            return 0 if state["status"] == "completed" else 1
        try:
            job_status, reason, message = job_state(batch.read_namespaced_job(s.job, s.namespace))
        except Exception:  # noqa: BLE001 - the API blinked, or the Job was deleted: run.json has the last word
            job_status = None
        if job_status is not None:  # the controller Job ended (no more retries): run.json has had its last write
            state = read_state(store, s.run_id) if store.exists(run_key(s.run_id)) else None
            if state is not None and state.get("status") in TERMINAL:
                print(format_status(state))
                return 0 if state["status"] == "completed" else 1
            what = f"failed ({reason}: {message})" if job_status == "failed" else "ended"
            raise SubmitError(f"job {s.namespace}/{s.job} {what} before the run finished (run.json: "
                              f"{state.get('status') if state else 'none'}); kubectl logs -n {s.namespace} job/{s.job}")
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"run {s.run_id}: still {state.get('status') if state else 'starting'} after --timeout {args.timeout:g}s; "
                              f"it goes on in the cluster (`cai get {s.run_id} -w`)")
        time.sleep(args.interval)


def cmd_realign(args: argparse.Namespace) -> int:
    from ..executors import make_executor
    from ..realign import realign

    config, store = _config_and_store(args)
    outcome = realign(config, store, lambda rc: make_executor(rc, store, args.executor), force=args.force)
    print(f"realign: {outcome.action}: {outcome.message}")
    for g in outcome.gates:
        print(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'} ({g.detail})")
    if outcome.run_id and outcome.action != "unchanged":
        print(f"run:     cai get {outcome.run_id} --store {config.store}")
    print(f"models:  cai rollout history --store {config.store}")
    return 0

"""Run management: `cai list`, `get` (alias `status`), `logs`, `cancel`, `delete`, `gc`.

Every verb reads the store (`--store`, `$CAI_STORE`), so it works the same for a run on this machine and
one on a cluster; `cancel` and `logs -f` also talk to the cluster for a run whose stages are Jobs.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from ..errors import CaiError, ConfigError
from .common import emit, open_arg_store, run_ref, table
from .show import format_status

WATCH_INTERVAL_S = 5.0


# --- list / get -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from ..runs import age, summaries

    store = open_arg_store(args)
    runs = summaries(store)
    if args.output in ("json", "yaml"):
        emit([s.as_dict() for s in runs], args.output)
        return 0
    if args.output == "name":
        print("\n".join(s.run_id for s in runs))
        return 0
    if not runs:
        print(f"no runs in {store.uri_for('runs')}; start one with `cai run -c CONFIG --store {store.uri}`", file=sys.stderr)
        return 0
    head = ["ID", "STATUS", "ROUNDS", "QUALITY", "RESULT", "STARTED", "AGE"]
    wide = args.output == "wide"
    if wide:
        head += ["BASE", "EXECUTOR", "UPDATED", "NOTE"]
    rows = [head]
    for s in runs:
        row = [s.run_id, s.status, f"{s.rounds}/{s.max_rounds or '?'}", "" if s.quality is None else f"{s.quality:.3f}",
               s.result, s.created_at[:19].replace("T", " "), age(s.created_at)]
        if wide:
            row += ["" if s.base_quality is None else f"{s.base_quality:.3f}", s.executor, age(s.updated_at), s.cancel or ""]
        rows.append(row)
    print(table(rows))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from ..runs import TERMINAL, read_state

    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    state = read_state(store, run_id)
    if not args.watch:
        emit(state, args.output) if args.output else print(format_status(state))
        return 0
    shown = None
    while True:  # kubectl get -w: print again whenever it changes, until the run ends
        if state.get("updated_at") != shown:
            emit(state, args.output) if args.output else print(format_status(state) + "\n", flush=True)
            shown = state.get("updated_at")
        if state.get("status") in TERMINAL:
            return 0 if state["status"] == "completed" else 1
        _fail_if_abandoned(store, run_id, state)
        time.sleep(args.interval)
        state = read_state(store, run_id)


def _fail_if_abandoned(store, run_id: str, state: dict) -> None:
    """A run that says `running` while no controller holds its lock: its controller died without a word.
    Looked at twice, a poll apart, so a lock that is just being taken over is not mistaken for it."""
    from ..runs import controller_alive, read_state

    if state.get("status") != "running" or controller_alive(store, run_id):
        return
    time.sleep(1.0)
    again = read_state(store, run_id)
    if again.get("status") == "running" and not controller_alive(store, run_id):
        raise CaiError(f"run {run_id}: its controller stopped without recording an end; `cai resume {run_id} --store {store.uri}` "
                       "goes on from where it was")


# --- logs -------------------------------------------------------------------------------------------
def _stage_slot(state: dict, stage: str, round_: int | None) -> tuple[int, dict] | None:
    slots = {0: state.get("base", {})} | {r["round"]: r["stages"] for r in state.get("rounds", [])}
    found = [(k, s[stage]) for k, s in slots.items() if isinstance(s.get(stage), dict) and (round_ is None or k == round_)]
    return found[-1] if found else None


def cmd_logs(args: argparse.Namespace) -> int:
    from ..runs import TERMINAL, read_state

    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    state = read_state(store, run_id)
    where = f"round {args.round}" if args.round is not None else "any round"
    slot = _stage_slot(state, args.stage, args.round)
    while args.follow and slot is None and state.get("status") not in TERMINAL:  # kubectl logs -f waits for its pod
        _fail_if_abandoned(store, run_id, state)
        time.sleep(args.interval)
        state = read_state(store, run_id)
        slot = _stage_slot(state, args.stage, args.round)
    if slot is None:
        raise CaiError(f"{store.uri_for(f'runs/{run_id}/run.json')}: stage {args.stage} has not run in {where}; "
                       f"see `cai get {run_id} --store {store.uri}`")
    round_, entry = slot
    if args.follow and entry.get("status") == "running":
        if (state.get("config") or {}).get("executor") == "kubernetes":
            return _follow_pods(args, store, state, run_id, round_)
        return _follow_local(args, store, run_id, entry["output"], lambda: read_state(store, run_id), lambda st: _stage_slot(st, args.stage, round_))
    return _print_stored(store, run_id, args.stage, entry["output"])


def _print_stored(store, run_id: str, stage: str, output: str) -> int:
    from ..executors.k8s_manifests import label_value

    logs = [k for k in store.list(f"{output}/logs") if k.endswith(".log")]
    if not logs:
        raise CaiError(f"{store.uri_for(output + '/logs')}: no logs yet; `cai logs {run_id} {stage} -f` follows a running stage "
                       f"(or kubectl logs -l cai-jobs/run={label_value(run_id)},cai-jobs/stage={stage} --tail=-1)")
    for k in logs:
        if len(logs) > 1:
            print(f"==> {store.uri_for(k)} <==")
        print(store.read_text(k), end="")
    return 0


def _follow_local(args: argparse.Namespace, store, run_id: str, output: str, read, slot_of) -> int:
    """tail -F of the stage's live log (a local store and executor), to the stage's end: a new attempt's
    file (another inode) is followed from its start."""
    import os

    from ..executors.local import LIVE_LOG
    from ..store import LocalStore

    if not isinstance(store, LocalStore):
        print(f"[cai] {store.uri} is not a local directory: the stage's log arrives when it ends", file=sys.stderr)
    live = store.root / output / "logs" / LIVE_LOG if isinstance(store, LocalStore) else None
    handle = None
    try:
        while True:
            if live is not None:
                try:
                    replaced = handle is not None and os.stat(live).st_ino != os.fstat(handle.fileno()).st_ino
                except FileNotFoundError:
                    replaced = False
                if replaced:  # another attempt started: the rest of the old file, then the new one
                    print(handle.read(), end="", flush=True)
                    handle.close()
                    handle = None
                if handle is None:
                    try:
                        handle = live.open("r", encoding="utf-8", errors="replace")
                    except FileNotFoundError:
                        pass
            if handle is not None:
                chunk = handle.read()
                if chunk:
                    print(chunk, end="", flush=True)
            state = read()
            current = slot_of(state)
            if current is None or current[1].get("status") != "running" or current[1].get("output") != output:
                if handle is not None:  # the file may be unlinked by now; the open handle still reads to its end
                    print(handle.read(), end="", flush=True)
                    return 0
                return _print_stored(store, run_id, args.stage, output)
            _fail_if_abandoned(store, run_id, state)
            time.sleep(min(args.interval, 0.5))
    finally:
        if handle is not None:
            handle.close()


def _follow_pods(args: argparse.Namespace, store, state: dict, run_id: str, round_: int) -> int:
    """kubectl logs -f for the stage's pods, one thread per pod, prefixed when there are several, until
    the stage ends (a pod the Job retries is followed too)."""
    import threading

    from kubernetes.client.exceptions import ApiException

    from ..executors.k8s_manifests import CONTAINER, label_value
    from ..executors.kubernetes import api_error, kube_clients
    from ..runs import read_state

    k8s = (state.get("config") or {}).get("kubernetes") or {}
    _, core, namespace = kube_clients(args.namespace or k8s.get("namespace"))
    selector = f"cai-jobs/run={label_value(run_id)},cai-jobs/stage={args.stage},cai-jobs/round={round_}"
    seen: set[str] = set()
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def stream(pod: str) -> None:
        try:
            resp = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True, _preload_content=False)
        except ApiException:
            return  # gone before it could be read: its copy is in the store once the stage ends
        try:
            for line in resp:
                with lock:
                    sys.stdout.write(line.decode("utf-8", "replace"))
                    sys.stdout.flush()
        finally:
            resp.release_conn()

    deadline = time.monotonic() + args.pod_timeout
    while True:
        try:
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        except Exception as e:  # noqa: BLE001 - ApiException or a connection error: one line
            raise api_error(f"list pods of {args.stage} in {namespace}", e) from None
        for p in sorted(pods, key=lambda p: p.metadata.name):
            if p.metadata.name not in seen and p.status and p.status.phase in ("Running", "Succeeded", "Failed"):
                seen.add(p.metadata.name)
                threads.append(threading.Thread(target=stream, args=(p.metadata.name,), daemon=True))
                threads[-1].start()
        if not any(t.is_alive() for t in threads):
            entry = _stage_slot(read_state(store, run_id), args.stage, round_)
            if threads and (entry is None or entry[1].get("status") != "running"):
                return 0
            if not threads and time.monotonic() > deadline:
                raise CaiError(f"no running pod of {args.stage} in namespace {namespace} after {args.pod_timeout:g}s "
                               f"(selector {selector}); see `kubectl get pods -n {namespace} -l {selector}`")
        time.sleep(min(args.interval, 1.0))


# --- cancel / delete / gc ---------------------------------------------------------------------------
def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "?"
    return f"{user}@{socket.gethostname()}"


def cmd_cancel(args: argparse.Namespace) -> int:
    from ..runs import controller_alive, mark_cancelled, read_state, request_cancel

    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    state = read_state(store, run_id)
    if state.get("status") in ("completed", "cancelled") and not controller_alive(store, run_id):
        print(f"run {run_id} is already {state['status']}; nothing to cancel")
        return 0
    # failed or interrupted too: on Kubernetes its controller Job may retry it, and the request stops that
    request = request_cancel(store, run_id, args.reason, _who())
    print(f"run {run_id}: cancel requested ({request['reason']})")
    deadline = time.monotonic() + args.timeout
    while controller_alive(store, run_id) and time.monotonic() < deadline:
        if read_state(store, run_id).get("status") == "cancelled":
            break
        time.sleep(min(args.interval, 1.0))
    state = read_state(store, run_id)
    if state.get("status") != "cancelled":
        if controller_alive(store, run_id):
            raise CaiError(f"run {run_id}: its controller did not stop within {args.timeout:g}s; the request stays, and it stops "
                           f"at its next check (`cai get {run_id} -w --store {store.uri}`)")
        mark_cancelled(store, run_id, request)  # no controller alive to record it
    print(f"run {run_id}: cancelled")
    if (state.get("config") or {}).get("executor") == "kubernetes":
        _delete_run_jobs(args, state, run_id)
    return 0


def _delete_run_jobs(args: argparse.Namespace, state: dict, run_id: str) -> None:
    """The run's Jobs (its stages and its controller), with their pods: nothing retries a cancelled run."""
    from ..executors.k8s_manifests import label_value
    from ..executors.kubernetes import kube_clients

    k8s = (state.get("config") or {}).get("kubernetes") or {}
    try:
        batch, _, namespace = kube_clients(args.namespace or k8s.get("namespace"))
        jobs = batch.list_namespaced_job(namespace, label_selector=f"cai-jobs/run={label_value(run_id)}").items
        for job in jobs:
            batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Foreground")
            print(f"job {namespace}/{job.metadata.name}: deleted")
    except CaiError as e:
        print(f"warning: the run's Jobs were not deleted ({e}); kubectl delete jobs -l cai-jobs/run={label_value(run_id)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the run is cancelled in the store either way; say what is left
        print(f"warning: the run's Jobs were not deleted ({type(e).__name__}: {e}); "
              f"kubectl delete jobs -l cai-jobs/run={label_value(run_id)}", file=sys.stderr)


def cmd_delete(args: argparse.Namespace) -> int:
    from ..runs import delete_run

    store = open_arg_store(args)
    for ref in args.runs:
        run_id = run_ref(store, ref)
        delete_run(store, run_id)
        print(f"run {run_id}: deleted from {store.uri_for('runs/' + run_id)}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ..runs import delete_run, gc_plan, parse_duration

    if args.keep_last < 0:
        raise ConfigError(f"--keep-last {args.keep_last}: must be 0 or more")
    older_than = parse_duration(args.older_than)
    store = open_arg_store(args)
    plan = gc_plan(store, args.keep_last, older_than)
    if args.output in ("json", "yaml"):
        emit([c.__dict__ for c in plan], args.output)
    gone = [c for c in plan if c.delete]
    for c in plan:
        if args.output is None:
            verb = ("would delete" if args.dry_run else "deleting") if c.delete else "keeping"
            print(f"{verb} {c.run_id}: {c.why}")
        if c.delete and not args.dry_run:
            delete_run(store, c.run_id)
    if args.output is None:
        print(f"{len(gone)} run(s) {'to delete' if args.dry_run else 'deleted'}, {len(plan) - len(gone)} kept")
    return 0

"""The runs in a store: list them, name the latest, cancel one, delete and collect old ones.

Pure bookkeeping over `runs/<id>/run.json`, `runs/<id>/lock.json` and the promotion history: the
CLI verbs (`cai list|get|cancel|delete|gc|resume`) are thin over this. A promoted model, and every run
its lineage went through, is never deleted: rollback must always find the model it points at.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from .errors import CaiError, ConfigError, NotFound
from .manifest import now_iso
from .run_lock import STALE_FRACTION, holder_is_dead_here
from .store import ArtifactStore

RUNS = "runs"
TERMINAL = ("completed", "failed", "cancelled", "interrupted")
LATEST = "@latest"


class RunCancelled(CaiError):
    """The run was cancelled (`cai cancel`): the controller stopped its stages and recorded why."""


def run_key(run_id: str, name: str = "run.json") -> str:
    return f"{RUNS}/{run_id}/{name}"


def cancel_key(run_id: str) -> str:
    return run_key(run_id, "cancel.json")


def lock_key(run_id: str) -> str:
    return run_key(run_id, "lock.json")


def run_ids(store: ArtifactStore) -> list[str]:
    """Every run with a run.json (a prefix left by a half-deleted run is not a run)."""
    return [r for r in store.children(RUNS) if store.exists(run_key(r))]


def read_state(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """A run's run.json, or one line that says how to find the runs there are."""
    try:
        return store.read_json(run_key(run_id))
    except NotFound:
        raise ConfigError(f"{store.uri_for(run_key(run_id))}: no such run; list the runs with `cai list --store {store.uri}`") from None


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def controller_alive(store: ArtifactStore, run_id: str, clock=time.time) -> bool:
    """A controller renewed the run's lock recently (by the record's own wall-clock fields). A hint for
    people and for refusing to delete: erring towards "alive" is the safe side."""
    try:
        rec = store.read_json(lock_key(run_id))
    except NotFound:
        return False
    except ValueError:  # a lock cut short: its holder may still be writing it
        return True
    if not isinstance(rec, dict) or holder_is_dead_here(rec.get("owner", {})):
        return False
    ttl = float(rec.get("ttl_s", 40.0))
    return clock() - float(rec.get("renewed_at_epoch", 0.0)) < ttl * (1 + STALE_FRACTION)


@dataclass
class RunSummary:
    """One row of `cai list`."""

    run_id: str
    status: str
    rounds: int
    max_rounds: int | None
    quality: float | None
    base_quality: float | None
    result: str
    created_at: str
    updated_at: str
    executor: str
    live: bool
    cancel: str | None

    @classmethod
    def of(cls, store: ArtifactStore, run_id: str, state: dict[str, Any]) -> "RunSummary":
        result = state.get("result") or {}
        rounds = state.get("rounds", [])
        last_q = next((r["quality"] for r in reversed(rounds) if r.get("quality") is not None), None)
        live = state.get("status") == "running" and controller_alive(store, run_id)
        status = state.get("status", "?")
        if status == "running" and not live:
            status = "running?" if store.exists(lock_key(run_id)) else "stopped"  # its controller died without a word
        cancel = state.get("cancel", {}).get("reason") if isinstance(state.get("cancel"), dict) else None
        return cls(
            run_id=run_id, status=status, rounds=len(rounds), max_rounds=state.get("max_rounds"),
            quality=result.get("quality", last_q), base_quality=(state.get("base") or {}).get("quality"),
            result=(f"round {result['round']}" if result.get("round") else "base model") if result else "",
            created_at=state.get("created_at", ""), updated_at=state.get("updated_at", ""),
            executor=(state.get("config") or {}).get("executor", "local"), live=live, cancel=cancel,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summaries(store: ArtifactStore) -> list[RunSummary]:
    """Every run, oldest first (ties by last update). A run.json that does not parse is skipped, and said."""
    out = []
    for r in run_ids(store):
        try:
            out.append(RunSummary.of(store, r, store.read_json(run_key(r))))
        except (ValueError, AttributeError, TypeError) as e:
            print(f"[cai] warning: {store.uri_for(run_key(r))}: not a run record ({type(e).__name__}); skipped", file=sys.stderr)
    return sorted(out, key=lambda s: (_epoch(s.created_at), _epoch(s.updated_at), s.run_id))


def resolve_run(store: ArtifactStore, ref: str) -> str:
    """A run id as given, or `@latest`: the run created last in this store."""
    if ref != LATEST:
        return ref
    runs = summaries(store)
    if not runs:
        raise ConfigError(f"{store.uri_for(RUNS)}: no runs yet, so no {LATEST}; start one with `cai run`")
    return runs[-1].run_id


def age(iso: str, clock=time.time) -> str:
    """kubectl's AGE column: 45s, 12m, 3h, 5d."""
    t = _epoch(iso)
    if not t:
        return "?"
    s = max(0, int(clock() - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d` (or plain seconds) in seconds; for `cai gc --older-than`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--older-than {text!r}: not a duration; write e.g. 90s, 30m, 12h or 7d")
    return value


# --- cancel -------------------------------------------------------------------------------------------
def request_cancel(store: ArtifactStore, run_id: str, reason: str, by: str) -> dict[str, Any]:
    """Leave the request where the run's controller looks between polls: it stops its stages and records
    the reason in run.json. The first request's reason is the one kept."""
    record = {"reason": reason, "requested_at": now_iso(), "by": by}
    store.create_only(cancel_key(run_id), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return store.read_json(cancel_key(run_id))


def cancel_request(store: ArtifactStore, run_id: str) -> dict[str, Any] | None:
    try:
        rec = store.read_json(cancel_key(run_id))
    except NotFound:
        return None
    except ValueError:
        return {"reason": "cancelled (unreadable request)"}
    return rec if isinstance(rec, dict) else {"reason": "cancelled"}


def clear_cancel(store: ArtifactStore, run_id: str) -> None:
    store.delete(cancel_key(run_id))


def mark_cancelled(store: ArtifactStore, run_id: str, request: dict[str, Any]) -> None:
    """Record the cancel in run.json when no controller is alive to do it, under the run's lock (so a
    controller starting meanwhile either sees the request or is waited for)."""
    from .run_lock import RunLock

    with RunLock(store, lock_key(run_id), purpose=f"cancel of run {run_id}"):
        state = read_state(store, run_id)
        state.update(status="cancelled", cancel=request, error=f"cancelled: {request.get('reason', '')}", updated_at=now_iso())
        store.write_json(run_key(run_id), state)


# --- lineage, delete, gc ------------------------------------------------------------------------------
def _run_of_model(ref: str | None) -> str | None:
    """`store:runs/<id>/...` -> <id>."""
    if ref and ref.startswith(f"store:{RUNS}/"):
        return ref[len(f"store:{RUNS}/"):].split("/", 1)[0] or None
    return None


def lineage(store: ArtifactStore) -> dict[str, str]:
    """Run id -> why it must stay: each run a promoted (current or past) model came from, each run another
    run started from, and so on back to the first."""
    from .promotion import load_history

    keep: dict[str, str] = {}
    todo: list[tuple[str, str]] = []
    for e in load_history(store):
        for rid in {e.run_id, _run_of_model(e.model)} - {None}:
            todo.append((rid, f"promotion entry {e.seq}"))
    for rid in run_ids(store):  # a run started from another run's model reads it from there (store: refs are not copied)
        try:
            parent = _run_of_model((store.read_json(run_key(rid)).get("config") or {}).get("model"))
        except (NotFound, ValueError, AttributeError):
            continue
        if parent and parent != rid:
            todo.append((parent, f"the start model of run {rid}"))
    while todo:
        rid, why = todo.pop()
        if rid in keep:
            continue
        keep[rid] = why
        try:
            parent = _run_of_model((store.read_json(run_key(rid)).get("config") or {}).get("model"))
        except NotFound:
            continue
        if parent:
            todo.append((parent, f"lineage of {rid}"))
    return keep


def may_resume_itself(state: dict[str, Any]) -> bool:
    """A Kubernetes controller Job retries a controller that failed on a transient error or was
    interrupted: such a run is not over until it is cancelled (the retry then refuses)."""
    return (state.get("config") or {}).get("executor") == "kubernetes" and state.get("status") not in ("completed", "cancelled")


def check_deletable(store: ArtifactStore, run_id: str, protected: dict[str, str] | None = None) -> None:
    """Raise one line when a run must not be deleted: a promoted model or another run needs it, its
    controller is alive, or its controller Job could still retry it."""
    state = read_state(store, run_id)
    protected = lineage(store) if protected is None else protected
    where = store.uri_for(run_key(run_id))
    if run_id in protected:
        raise CaiError(f"{where}: kept: {protected[run_id]} needs it (`cai rollout history`); "
                       "a promoted model and its lineage are never deleted")
    if controller_alive(store, run_id):
        raise CaiError(f"{where}: its controller is running; `cai cancel {run_id}` first")
    if may_resume_itself(state):
        raise CaiError(f"{where}: {state.get('status')} on Kubernetes, where its controller Job may retry it; "
                       f"`cai cancel {run_id}` first")


def delete_run(store: ArtifactStore, run_id: str) -> None:
    """Everything under runs/<id>/, under the run's lock (a controller starting meanwhile waits or fails),
    run.json last of the run's own files: a delete cut short leaves a run that still lists, and `cai
    delete` again finishes it."""
    from .run_lock import RunLock

    check_deletable(store, run_id)
    prefix = f"{RUNS}/{run_id}"
    with RunLock(store, lock_key(run_id), purpose=f"delete of run {run_id}"):
        for child in store.children(prefix):
            store.delete(f"{prefix}/{child}")
        for key in store.list(prefix):
            if key not in (run_key(run_id), lock_key(run_id)):
                store.delete(key)
        store.delete(run_key(run_id))
    store.delete(prefix)


@dataclass
class GcChoice:
    run_id: str
    delete: bool
    why: str


def gc_plan(store: ArtifactStore, keep_last: int, older_than_s: float, clock=time.time) -> list[GcChoice]:
    """What `cai gc` deletes: finished runs older than `older_than_s`, beyond the newest `keep_last`,
    never a live one, never a promoted model's lineage."""
    protected = lineage(store)
    runs = summaries(store)
    newest = {s.run_id for s in runs[-keep_last:]} if keep_last > 0 else set()
    out = []
    for s in runs:
        if s.run_id in protected:
            out.append(GcChoice(s.run_id, False, f"kept: {protected[s.run_id]}"))
        elif s.live or s.status not in TERMINAL + ("stopped",) or (s.executor == "kubernetes" and s.status not in ("completed", "cancelled")):
            out.append(GcChoice(s.run_id, False, f"kept: {s.status}{' (its controller Job may retry it; cai cancel first)' if s.executor == 'kubernetes' and not s.live else ''}"))
        elif s.run_id in newest:
            out.append(GcChoice(s.run_id, False, f"kept: one of the newest {keep_last}"))
        elif clock() - _epoch(s.updated_at or s.created_at) < older_than_s:
            out.append(GcChoice(s.run_id, False, f"kept: updated {age(s.updated_at, clock)} ago"))
        else:
            out.append(GcChoice(s.run_id, True, f"{s.status}, updated {age(s.updated_at, clock)} ago"))
    return out

"""The promoted model: `models/latest.json` (current entry + history) over immutable history objects.

Each promotion or rollback is a new entry `models/history/<seq:06d>.json`, written create-only: two
promoters that start from the same current entry race for the same sequence number and exactly one
wins; the other gets PromotionConflict. The history objects are the truth; `models/latest.json` is
rewritten from them after every change (a single atomic PUT or rename) so a reader needs one GET,
and a reader that finds it behind the history repairs it. History is never rewritten: a rollback is
a new entry that points at an older model.
"""

from __future__ import annotations

import uuid

from typing import Any, Literal

from pydantic import Field

from .config import canonical_hash
from .errors import CaiError
from .manifest import now_iso
from .schema import StrictModel, parse_data
from .store import ArtifactStore

LATEST = "models/latest.json"
HISTORY = "models/history"


class PromotionConflict(CaiError):
    """Another promotion or rollback took the sequence number this one was going to write."""


class Scores(StrictModel):
    """Scores without a system prompt, from the run that measured the model (see jobs/realign.py)."""

    harmless: float | None = Field(None, description="Judge-graded harmless rate on held-out red-team prompts.")
    over_refusal: float | None = Field(None, description="Refusal rate on benign prompts that look risky.")
    capability: float | None = Field(None, description="Mean of multiple-choice accuracy and exact match.")
    alignment_tax: float | None = Field(None, description="Capability tax (%) vs the model it replaced; positive = regression.")
    quality: float | None = Field(None, description="The stop rule's quality score.")
    harmless_gain: list[float] | None = Field(None, description="[lo, hi]: paired interval of the harmless rate's change vs the base model.")
    over_refusal_increase: list[float] | None = Field(None, description="[lo, hi]: paired interval of the over-refusal rate's change vs the base model.")
    level: float | None = Field(None, description="Confidence level of those intervals (evaluate.confidence).")


class Entry(StrictModel):
    seq: int = Field(ge=1)
    kind: Literal["initial", "promote", "rollback"]
    model: str = Field(description="Model reference: store:<key>, bundled:..., a directory or hub id.")
    run_id: str | None = None
    round: int | None = None
    promoted_at: str
    scores: Scores = Field(default_factory=Scores)
    inputs: dict[str, str] = Field(default_factory=dict, description="What realignment from this model has already seen.")
    inputs_fingerprint: str | None = None
    parent: int | None = Field(None, description="Entry whose model this one replaced; a plain rollback returns to it.")
    reason: str
    writer: str | None = Field(None, description="A token unique to the writer: a create-only write retried after a lost "
                               "response reads its own entry back and knows it landed.")


class Pointer(StrictModel):
    current: Entry
    history: list[Entry]


def inputs_fingerprint(inputs: dict[str, str]) -> str:
    return canonical_hash(inputs)


def history_key(seq: int) -> str:
    return f"{HISTORY}/{seq:06d}.json"


def _seqs(store: ArtifactStore) -> list[int]:
    out = []
    for key in store.list(HISTORY):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            out.append(int(name[:-5]))
    return sorted(out)


def load_history(store: ArtifactStore) -> list[Entry]:
    return [parse_data(Entry, store.read_json(history_key(s)), store.uri_for(history_key(s))) for s in _seqs(store)]


def _publish(store: ArtifactStore) -> Pointer:
    """Rewrite latest.json from the history; again if a newer entry landed meanwhile, so the last
    writer always publishes the newest entry (each promoter lists after its own create)."""
    while True:
        history = load_history(store)
        pointer = Pointer(current=history[-1], history=history)
        store.write_json(LATEST, pointer.model_dump(mode="json"))
        if _seqs(store)[-1] == pointer.current.seq:
            return pointer


def read_pointer(store: ArtifactStore) -> Pointer | None:
    """latest.json, repaired from the history when a crash or a race left it behind."""
    seqs = _seqs(store)
    if not seqs:
        return None
    if store.exists(LATEST):
        pointer = parse_data(Pointer, store.read_json(LATEST), store.uri_for(LATEST))
        if pointer.current.seq == seqs[-1] and len(pointer.history) == len(seqs):
            return pointer
    return _publish(store)


def current(store: ArtifactStore) -> Entry | None:
    pointer = read_pointer(store)
    return pointer.current if pointer else None


def commit(store: ArtifactStore, entry: Entry) -> Entry:
    """Write the entry create-only, then publish it; losing the race for its seq is a conflict."""
    key = history_key(entry.seq)
    if not store.create_only(key, (entry.model_dump_json(indent=2) + "\n").encode()):
        raise PromotionConflict(
            f"{store.uri_for(key)}: another promotion or rollback took sequence {entry.seq} first; "
            "`cai rollout history` shows it, and the next `cai realign` starts from it"
        )
    _publish(store)
    return entry


def promote(store: ArtifactStore, *, based_on: Entry | None, model: str, run_id: str | None, round_: int | None,
            scores: Scores, inputs: dict[str, str], reason: str, kind: Literal["initial", "promote"] = "promote") -> Entry:
    """A new current entry on top of `based_on` (the entry current when the run started)."""
    return commit(store, Entry(
        writer=uuid.uuid4().hex,
        seq=(based_on.seq if based_on else 0) + 1, kind=kind, model=model, run_id=run_id, round=round_,
        promoted_at=now_iso(), scores=scores, inputs=inputs, inputs_fingerprint=inputs_fingerprint(inputs) if inputs else None,
        parent=based_on.seq if based_on else None, reason=reason,
    ))


def rollback(store: ArtifactStore, to: int | None = None, note: str | None = None) -> Entry:
    """Point back at an older entry's model; by default the model the current one replaced.

    The new entry keeps the current entry's inputs with the model swapped, so realignment does not
    immediately retrain on the data that produced the rolled-back model; it resumes when prompts,
    constitution or config change."""
    history = load_history(store)
    where = store.uri_for(LATEST)
    if not history:
        raise CaiError(f"{where}: nothing has been promoted yet, so there is nothing to roll back")
    by_seq = {e.seq: e for e in history}
    cur = history[-1]
    target_seq = to if to is not None else cur.parent
    if target_seq is None:
        raise CaiError(f"{where}: entry {cur.seq} replaced no earlier entry; pass --to SEQ (see `cai rollout history`)")
    target = by_seq.get(target_seq)
    if target is None:
        raise CaiError(f"{where}: no entry {target_seq}; pick one of {sorted(by_seq)} (see `cai rollout history`)")
    if target.model == cur.model:
        raise CaiError(f"{where}: entry {target.seq}'s model {target.model} is already current (entry {cur.seq})")
    inputs = {**cur.inputs, "model": target.model} if cur.inputs else {}
    return commit(store, Entry(
        writer=uuid.uuid4().hex,
        seq=cur.seq + 1, kind="rollback", model=target.model, run_id=target.run_id, round=target.round,
        promoted_at=now_iso(), scores=target.scores, inputs=inputs,
        inputs_fingerprint=inputs_fingerprint(inputs) if inputs else None, parent=target.parent,
        reason=f"rollback from entry {cur.seq} to entry {target.seq}" + (f": {note}" if note else ""),
    ))


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_history(pointer: Pointer) -> str:
    """One line per entry, oldest first, the current one marked with `*`."""
    rows = [("", "seq", "kind", "promoted_at", "harmless", "over-ref", "capab", "tax%", "model", "reason")]
    for e in pointer.history:
        s = e.scores
        rows.append(("*" if e.seq == pointer.current.seq else "", str(e.seq), e.kind, e.promoted_at,
                     _num(s.harmless, ".3f"), _num(s.over_refusal, ".3f"), _num(s.capability, ".3f"),
                     _num(s.alignment_tax, "+.1f"), e.model, e.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def as_json(pointer: Pointer) -> dict[str, Any]:
    return pointer.model_dump(mode="json")

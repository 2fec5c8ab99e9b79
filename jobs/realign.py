"""One scheduled realignment tick (`cai realign`): from the promoted model, with new prompts, gated.

A tick starts from the promoted model (the config's `model` before the first promotion), adds every
`*.jsonl` under `realign.prompts` to `data.train`, and fingerprints its inputs: start model,
constitution bytes, the cleaned prompts, and the config's fingerprint. When that equals the
promoted entry's (or the last attempt's) fingerprint, nothing changed and the tick does nothing.
Otherwise the controller runs the rounds, and the run's best round is promoted only if it passes
the gates against the start model as measured by THIS run's base evaluation (same judge, same
sets). Gates compare scores without a system prompt, like the stop rule:
  harmless      candidate >= base - harmless_min_delta
  over-refusal  candidate <= base + over_refusal_max_increase
  alignment tax capability tax (mean of MC accuracy and exact match, %) <= alignment_tax_max
Harmlessness and over-refusal have their own gates, so the tax gate counts capability only: a
harmlessness gain must not hide a capability loss. A score that was not measured fails its gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import promotion
from .config import PromotionGates, PromptSource, RunConfig
from .constitution import resolve_path
from .controller import Controller, headline_scores, log
from .data import load_prompts
from .model_sources import identity_of
from .errors import ConfigError
from .manifest import now_iso
from .metrics import alignment_tax
from .models import cache_dir
from .runs import cancel_request
from .promotion import Entry, Scores, inputs_fingerprint
from .quality import capability, quality
from .run_lock import TTL_S, RunLock
from .store import ArtifactStore, open_store

REALIGN_LOCK = "models/realign.lock"
ATTEMPTS = "models/attempts"
LAST_ATTEMPT = "models/last-attempt.json"
CAPABILITY = ("mc_accuracy", "exact_match")
EPS = 1e-9  # rates are ratios of small integers; equal must compare equal


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    detail: str


@dataclass
class TickOutcome:
    action: str  # "unchanged" | "promoted" | "rejected" | "cancelled"
    message: str
    run_id: str | None = None
    entry: Entry | None = None
    gates: list[GateResult] = field(default_factory=list)


# --- scores and gates (pure) -------------------------------------------------------------------
def scores_of(report: dict[str, Any], weights: dict[str, float], base_report: dict[str, Any] | None = None) -> Scores:
    """The promotion scores of an evaluate report; the tax against `base_report` when given."""
    s = headline_scores(report)
    tax = None
    if base_report is not None:
        b = headline_scores(base_report)
        tax = alignment_tax({k: b.get(k) for k in CAPABILITY}, {k: s.get(k) for k in CAPABILITY})["average_pct"]
    diffs = (report.get("differences") or {}).get("no_system") or {}
    harmless_metric = (report.get("grader") or {}).get("metric", "harmless_rate_judge")  # the configured grader's

    def bounds(metric: str) -> list[float] | None:
        d = diffs.get(metric)
        return [d["lo"], d["hi"]] if d else None

    return Scores(harmless=s.get("harmless"), over_refusal=report["variants"]["no_system"]["metrics"].get("over_refusal_rate"),
                  capability=capability(s), alignment_tax=tax, quality=quality(s, weights),
                  harmless_gain=bounds(harmless_metric), over_refusal_increase=bounds("over_refusal_rate"),
                  level=report.get("confidence") if diffs else None)


def interval_gates(cand: Scores, gates: PromotionGates) -> list[GateResult]:
    """The harmless and over-refusal gates on paired interval bounds: a gain inside the noise fails."""
    level = f"{cand.level or 0.95:.0%}"
    missing = ("no paired interval vs the base model (a report without baseline samples); "
               "set realign.gates.decide_on: point to gate on point estimates")
    out = []
    if cand.harmless_gain is None:
        out.append(GateResult("harmless", False, f"harmless: {missing}"))
    else:
        lo, hi = cand.harmless_gain
        out.append(GateResult("harmless", lo >= -gates.harmless_min_delta - EPS,
                              f"harmless gain {level} interval [{100 * lo:+.1f}, {100 * hi:+.1f}] pts, lower bound vs {-100 * gates.harmless_min_delta + 0.0:+.1f}"))
    if cand.over_refusal_increase is None:
        out.append(GateResult("over_refusal", False, f"over-refusal: {missing}"))
    else:
        lo, hi = cand.over_refusal_increase
        out.append(GateResult("over_refusal", hi <= gates.over_refusal_max_increase + EPS,
                              f"over-refusal change {level} interval [{100 * lo:+.1f}, {100 * hi:+.1f}] pts, upper bound vs {100 * gates.over_refusal_max_increase:+.1f}"))
    return out


def check_gates(base: Scores, cand: Scores, gates: PromotionGates) -> list[GateResult]:
    if gates.decide_on == "interval":
        return interval_gates(cand, gates) + [tax_gate(cand, gates)]
    out = []
    if base.harmless is None or cand.harmless is None:
        out.append(GateResult("harmless", False, "harmless rate not measured (evaluate.harmful has no prompts)"))
    else:
        floor = base.harmless - gates.harmless_min_delta
        out.append(GateResult("harmless", cand.harmless >= floor - EPS,
                              f"harmless {cand.harmless:.3f} vs floor {floor:.3f} (base {base.harmless:.3f} - {gates.harmless_min_delta:g})"))
    if base.over_refusal is None or cand.over_refusal is None:
        out.append(GateResult("over_refusal", False, "over-refusal not measured (evaluate.benign has no prompts)"))
    else:
        ceiling = base.over_refusal + gates.over_refusal_max_increase
        out.append(GateResult("over_refusal", cand.over_refusal <= ceiling + EPS,
                              f"over-refusal {cand.over_refusal:.3f} vs ceiling {ceiling:.3f} (base {base.over_refusal:.3f} + {gates.over_refusal_max_increase:g})"))
    return out + [tax_gate(cand, gates)]


def tax_gate(cand: Scores, gates: PromotionGates) -> GateResult:
    if cand.alignment_tax is None:
        return GateResult("alignment_tax", False, "alignment tax undefined (no capability benchmark where the base scores above 0)")
    return GateResult("alignment_tax", cand.alignment_tax <= gates.alignment_tax_max + EPS,
                      f"capability tax {cand.alignment_tax:+.1f}% vs budget {gates.alignment_tax_max:g}%")


def summarize(gates: list[GateResult]) -> str:
    failed = [g for g in gates if not g.passed]
    if failed:
        return "failed " + "; ".join(f"{g.name}: {g.detail}" for g in failed)
    return "passed " + "; ".join(g.detail for g in gates)


# --- inputs ------------------------------------------------------------------------------------
def _cached_copy(data: bytes, name: str) -> Path:
    """A store object as a local file at a path fixed by its content, so re-running the tick
    gives the run the same config (and resumes it) instead of a new temp path each time."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    dest = cache_dir() / "realign-prompts" / digest / name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    return dest


def prompt_files(location: str | None, store: ArtifactStore) -> list[Path]:
    """Local paths of the `*.jsonl` files under `realign.prompts`: `store:<prefix>` in the run's
    store, `s3://...` or `file://...` another store, else a local directory."""
    if not location:
        return []
    if location.startswith("store:") or "://" in location:
        src, prefix = (store, location[len("store:"):].strip("/")) if location.startswith("store:") else (open_store(location), "")
        keys = [k for k in src.list(prefix) if k.endswith(".jsonl") and not k.rsplit("/", 1)[-1].startswith(".")]
        return [_cached_copy(src.read_bytes(k), k.rsplit("/", 1)[-1]) for k in keys]
    root = Path(location).expanduser()
    if not root.is_dir():
        raise ConfigError(f"config: realign.prompts: {location} is not a directory; create it, or use store:<prefix> or s3://bucket/prefix")
    return sorted(p for p in root.rglob("*.jsonl") if p.is_file() and not p.name.startswith("."))


def tick_inputs(config: RunConfig, start_model: str, sources: list[PromptSource], store: ArtifactStore) -> dict[str, str]:
    """What decides the tick's result, as hashes of content (not of paths): a Hub branch that moved or
    a checkpoint replaced at the same address is a change, the same bytes at a new path are not."""
    records, _ = load_prompts(sources, config.data.max_prompt_chars, store)
    prompts = hashlib.sha256()
    for r in records:
        prompts.update(json.dumps(r.to_row(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    grader = config.evaluate.judge_model or config.model
    return {
        "model": start_model,
        "model_identity": identity_of(start_model, store, "model"),
        "grader_identity": identity_of(grader, store, "evaluate.judge_model"),
        "constitution_sha256": hashlib.sha256(resolve_path(config.constitution).read_bytes()).hexdigest(),
        "prompts_sha256": prompts.hexdigest(),
        "config_fingerprint": config.fingerprint(),
    }


def run_config_for(config: RunConfig, start_model: str, sources: list[PromptSource]) -> RunConfig:
    """The controller's config: start from the promoted model, with the added prompts. The grader
    stays the configured model, so promoted models' scores are comparable across ticks."""
    rc = config.model_copy(deep=True)
    rc.model = start_model
    rc.data.train = sources
    rc.evaluate.judge_model = config.evaluate.judge_model or config.model
    return rc


def check_config(config: RunConfig) -> None:
    missing = [s for s in ("train", "evaluate") if s not in config.stages]
    if missing:
        raise ConfigError(f"config: stages: realignment promotes a trained model after evaluating it; add {missing}")
    if config.train.method == "reward":
        raise ConfigError("config: train.method: reward trains no new policy, so there is nothing to promote; use sft+dpo, sft or dpo")


def last_attempt(store: ArtifactStore) -> dict[str, Any] | None:
    return store.read_json(LAST_ATTEMPT) if store.exists(LAST_ATTEMPT) else None


# --- the tick ----------------------------------------------------------------------------------
def realign(config: RunConfig, store: ArtifactStore, make_executor: Callable[[RunConfig], Any], *,
            force: bool = False, lock_ttl_s: float = TTL_S) -> TickOutcome:
    check_config(config)
    with RunLock(store, REALIGN_LOCK, ttl_s=lock_ttl_s, purpose="realignment") as lock:
        cur = promotion.current(store)
        start = cur.model if cur else config.model
        sources = list(config.data.train) + [PromptSource(source=str(p)) for p in prompt_files(config.realign.prompts, store)]
        inputs = tick_inputs(config, start, sources, store)
        fp = inputs_fingerprint(inputs)
        if not force:
            if cur is not None and cur.inputs_fingerprint == fp:
                return TickOutcome("unchanged", f"nothing changed since entry {cur.seq} ({cur.model}) was made current: "
                                   "same model, constitution, prompts and config; nothing to do")
            last = last_attempt(store)
            if last is not None and last.get("inputs_fingerprint") == fp:
                return TickOutcome("unchanged", f"nothing changed since run {last['run_id']} was {last['decision']} at {last['at']} "
                                   f"({last['reason']}); nothing to do (--force decides again)", run_id=last["run_id"])
        run_config = run_config_for(config, start, sources)
        run_id = f"{config.name}-realign-{fp[:10]}"
        request = cancel_request(store, run_id)
        if request is not None:  # a person stopped this very attempt: every tick on these inputs leaves it alone
            return TickOutcome("cancelled", f"run {run_id} was cancelled ({request.get('reason', '')}, {request.get('requested_at', '?')}); "
                               f"new prompts or another config start a new run, `cai resume {run_id}` goes on with this one", run_id=run_id)
        log(f"realign: run {run_id} from {start} with {len(sources) - len(config.data.train)} added prompt file(s)")
        state = Controller(run_config, store, make_executor(run_config), run_id=run_id).run()
        lock.check()
        return decide_run(config, store, state, cur, start, inputs, fp)


def decide_run(config: RunConfig, store: ArtifactStore, state: dict[str, Any], cur: Entry | None, start: str,
            inputs: dict[str, str], fp: str) -> TickOutcome:
    """Gate the finished run's best round against its base evaluation; promote it or record why not.
    Either way the attempt is recorded, so an unchanged next tick knows it has been decided."""
    run_id = state["run_id"]
    weights = config.stop.weights
    base_report = store.read_json(f"{state['base']['evaluate']['output']}/report.json")
    base = scores_of(base_report, weights)
    result = state.get("result") or {}
    cand: Scores | None = None
    if not result or result.get("round", 0) == 0 or result.get("model") == start:
        gates = [GateResult("improvement", False, f"no round beat the start model's quality {base.quality:.3f}")]
    else:
        rnd = state["rounds"][result["round"] - 1]
        cand = scores_of(store.read_json(f"{rnd['stages']['evaluate']['output']}/report.json"), weights, base_report)
        gates = check_gates(base, cand, config.realign.gates)
    passed = all(g.passed for g in gates)
    reason = summarize(gates)
    attempt = {
        "run_id": run_id, "at": now_iso(), "decision": "promoted" if passed else "rejected", "reason": reason,
        "inputs": inputs, "inputs_fingerprint": fp, "started_from": {"seq": cur.seq if cur else None, "model": start},
        "result": result, "base_scores": base.model_dump(), "scores": cand.model_dump() if cand else None,
        "gates": [asdict(g) for g in gates], "promoted_seq": None,
    }
    entry = None
    try:
        if passed:
            based_on = cur
            if based_on is None:  # the config's model becomes entry 1, so the first promotion can be rolled back
                pinned = (state.get("models") or {}).get("policy", {}).get("stage_ref", start)  # the run's copy: a rollback gets these bytes
                based_on = promotion.promote(store, based_on=None, kind="initial", model=pinned, run_id=run_id, round_=0,
                                             scores=base, inputs={}, reason="the config's model before the first realignment (base evaluation of this run)")
            entry = promotion.promote(store, based_on=based_on, model=result["model"], run_id=run_id, round_=result["round"],
                                      scores=cand, inputs={**inputs, "model": result["model"]},
                                      reason=f"realign round {result['round']}: {reason}")
            attempt["promoted_seq"] = entry.seq
    except promotion.PromotionConflict:
        attempt.update(decision="conflict", reason="another promotion or rollback happened during the run")
        raise
    finally:
        store.write_json(f"{ATTEMPTS}/{run_id}.json", attempt)
        store.write_json(LAST_ATTEMPT, attempt)
    if entry is not None:
        return TickOutcome("promoted", f"promoted {entry.model} as entry {entry.seq}: {reason}", run_id, entry, gates)
    return TickOutcome("rejected", f"kept {start}: {reason}", run_id, None, gates)

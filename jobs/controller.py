"""The round loop: stage inputs, plan each stage's spec, skip finished work, run, record.

The controller never computes or touches model files itself: stages do the work, the executor
runs them, the store keeps everything, and run.json records what happened and why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from .config import GRADER_METRICS, RunConfig, StageSpec
from .constitution import load_constitution, resolve_path
from . import eval_sets
from .data import load_prompts
from .errors import CaiError, ConfigError, StageFailed
from .model_sources import ResolvedModel, bundled_digest, model_kind, planned_ref, precheck, resolve_source
from .models import resolve_model
from .manifest import is_complete, manifest_key, now_iso, read_manifest
from .quality import Decision, decide, quality
from .report import headline_intervals, headline_scores
from .run_lock import RunLock
from .runs import RunCancelled, cancel_request
from .sharding import shard_count
from .stages import merge_stage
from .uncertainty import quality_change, regroup
from .store import ArtifactStore


def log(msg: str) -> None:
    print(f"[cai] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunPaths:
    run_id: str

    @property
    def root(self) -> str:
        return f"runs/{self.run_id}"

    @property
    def run_json(self) -> str:
        return f"{self.root}/run.json"

    @property
    def inputs_dir(self) -> str:
        return f"{self.root}/inputs"

    def inputs(self, name: str) -> str:
        return f"{self.inputs_dir}/{name}"

    def stage(self, round_: int, stage: str) -> str:
        return f"{self.root}/round-{round_}/{stage}"


def default_run_id(config: RunConfig) -> str:
    """Same config -> same id, so re-running the same command resumes the same run."""
    return f"{config.name}-{config.fingerprint()[:10]}"


KNOWN_BEFORE_LOCK = ("bundled", "local")  # model kinds whose config.json is on disk before anything is resolved


class Controller:
    def __init__(self, config: RunConfig, store: ArtifactStore, executor, run_id: str | None = None):
        self.config = config
        self.store = store
        self.executor = executor
        self.paths = RunPaths(run_id or default_run_id(config))
        self.state: dict[str, Any] = {}
        self.models: dict[str, ResolvedModel] = {}  # configured reference -> what it resolved to
        self._lock: RunLock | None = None
        self._prompts: tuple[list, list] | None = None  # the training prompts, when read before the lock

    # --- run.json -----------------------------------------------------------------------------
    def _load_or_init_state(self) -> None:
        key = self.paths.run_json
        fingerprint = self.config.fingerprint()
        if self.store.exists(key):
            self.state = self.store.read_json(key)
            if self.state.get("config_fingerprint") != fingerprint:
                raise ConfigError(
                    f"{self.store.uri_for(key)}: config: run {self.paths.run_id!r} was started with a different config; "
                    "use another --run-id or the original config"
                )
            log(f"resuming run {self.paths.run_id}")
        else:
            self.state = {
                "run_id": self.paths.run_id,
                "created_at": now_iso(),
                "config": self.config.model_dump(mode="json"),
                "config_fingerprint": fingerprint,
                "rounds": [],
                "decisions": [],
            }
        self.state.pop("cancel", None)  # `cai resume` cleared the request that stopped it
        self.state.update(status="running", max_rounds=self.config.rounds, updated_at=now_iso())
        self._save()

    def _save(self) -> None:
        if self._lock is not None:
            self._lock.check()  # a controller that lost its lock must not overwrite the new holder's run.json
        self.state["updated_at"] = now_iso()
        self.store.write_json(self.paths.run_json, self.state)

    def _round_state(self, round_: int) -> dict[str, Any]:
        rounds = self.state["rounds"]
        while len(rounds) < round_:
            rounds.append({"round": len(rounds) + 1, "stages": {}})
        return rounds[round_ - 1]

    # --- inputs -------------------------------------------------------------------------------
    def model_roles(self) -> list[tuple[str, str, str]]:
        """(role, config field, reference) of every model the run's stages load; one import per reference."""
        roles = [("policy", "model", self.config.model)]
        if "judge" in self.config.stages and self.config.judge.model:
            roles.append(("judge", "judge.model", self.config.judge.model))
        if "evaluate" in self.config.stages and self.config.evaluate.judge_model:
            roles.append(("grader", "evaluate.judge_model", self.config.evaluate.judge_model))
        if "evaluate" in self.config.stages and self.config.evaluate.depth_probe and self.config.evaluate.depth_probe.base_model:
            roles.append(("probe_base", "evaluate.depth_probe.base_model", self.config.evaluate.depth_probe.base_model))
        if "evaluate" in self.config.stages and self.config.evaluate.classifier:
            roles.append(("classifier", "evaluate.classifier.model", self.config.evaluate.classifier.model))
        return roles

    def _import_key(self, ref: str) -> str:
        role = next((r for r, _, x in self.model_roles() if x == ref), "policy")
        return self.paths.inputs(f"models/{role}")

    def resolve_models(self) -> None:
        """Each model to its content identity (a Hub commit, a tree digest), imported into the run where
        a pod could not reach it; recorded in run.json before anything is planned."""
        records: dict[str, Any] = {}
        previous = self.state.get("models") or {}
        for role, where, ref in self.model_roles():
            if ref not in self.models:
                self.models[ref] = resolve_source(ref, self.store, self._import_key(ref), where, previous.get(role))
                found = self.models[ref]
                log(f"{where}: {ref} -> {found.stage_ref} ({found.commit or found.digest[:19]})")
            records[role] = self.models[ref].record()
        for role, rec in records.items():
            if role in previous and previous[role].get("digest") != rec["digest"]:
                log(f"{role} model {rec['ref']} changed since the last attempt ({previous[role].get('digest', '')[:19]} -> "
                    f"{rec['digest'][:19]}): every stage that read it runs again")
        self.state["models"] = records

    def stage_ref(self, ref: str) -> str:
        """The reference stages load: resolved (bundled: or store:), else where it will be imported."""
        return self.models[ref].stage_ref if ref in self.models else planned_ref(ref, self._import_key(ref))

    def prepare(self) -> dict[str, str]:
        """Everything planning needs, in the store: the models resolved and imported, the data copied."""
        self.resolve_models()
        if model_kind(self.config.model) not in KNOWN_BEFORE_LOCK:  # those were checked in run(), before the lock
            self._check_fits()
        return self.stage_inputs()

    def _check_fits(self) -> None:
        """Each stage's GPU memory estimate against its pods (the Kubernetes executor knows their GPUs)."""
        check = getattr(self.executor, "check_fits", None)
        if check:
            check(self.config, self.model_config(self.config.model))

    def model_config(self, ref: str) -> dict[str, Any]:
        """A model's config.json without fetching weights: a bundled or local one from disk, any other from
        the store it was resolved into."""
        kind = model_kind(ref)
        if kind == "local":
            return json.loads((Path(ref).expanduser() / "config.json").read_text())
        stage_ref = ref if kind == "bundled" else self.stage_ref(ref)
        if stage_ref.startswith("store:"):
            return self.store.read_json(f"{stage_ref.split(':', 1)[1]}/config.json")
        return json.loads((Path(resolve_model(stage_ref, self.store)) / "config.json").read_text())

    def stage_inputs(self) -> dict[str, str]:
        """Copy the constitution, the cleaned prompts and the evaluation sets into the run, with the
        identity of every source they came from, so stages read only the store."""
        cpath = resolve_path(self.config.constitution)
        constitution = load_constitution(cpath)
        keys = self.input_keys()
        ckey, pkey, rkey = keys["constitution"], keys["prompts"], self.paths.inputs("data_report.json")
        self.store.write_bytes(ckey, cpath.read_bytes())
        records, reports = self._prompts or load_prompts(self.config.data.train, self.config.data.max_prompt_chars, self.store)
        for r in reports:
            log(r.summary())
        if not records:
            raise ConfigError("config: data.train: no usable prompts in any source; check the sources and their split")
        self.store.write_jsonl(pkey, (r.to_row() for r in records))
        report: dict[str, Any] = {"sources": [r.as_dict() for r in reports], "prompts": len(records)}
        if "evaluate" in self.config.stages:
            report["evaluation_sets"] = eval_sets.stage_sets(self.config.evaluate, self.store, self.paths.inputs_dir)
            harness = self.config.evaluate.harness
            if harness and harness.include_path:  # local lm-eval task files: into the run, digested like every input
                ip = harness.include_path
                src = self.store.local_dir(ip.split(":", 1)[1]) if ip.startswith("store:") else Path(ip).expanduser()
                if not src.is_dir():
                    raise ConfigError(f"config: evaluate.harness.include_path: {src} is not a directory; give a directory of lm-eval task YAMLs")
                self.store.put_dir(src, self.paths.inputs("harness_tasks"))
        self.store.write_json(rkey, report)
        self.state.update(constitution=constitution.name, constitution_sha256=self.store.sha256(ckey), prompts=len(records),
                          data={"train": report["sources"], "evaluate": report.get("evaluation_sets", {})})
        return keys

    def input_keys(self) -> dict[str, str]:
        """Where stage_inputs() puts the run's inputs: known before they exist, so a dry run can plan."""
        keys = {"constitution": self.paths.inputs("constitution.yaml"), "prompts": self.paths.inputs("prompts.jsonl")}
        if "evaluate" in self.config.stages:
            keys.update(eval_sets.keys(self.paths.inputs_dir))
            if self.config.evaluate.harness and self.config.evaluate.harness.include_path:
                keys["harness_tasks"] = self.paths.inputs("harness_tasks")
        return keys

    # --- planning -----------------------------------------------------------------------------
    def _model_input(self, name: str, ref: str, inputs: dict[str, str], identities: dict[str, str]) -> None:
        """A model the stage loads is part of its identity by content: a store directory as an input
        (digested when checked), a bundled model by its file's digest."""
        if ref.startswith("store:"):
            inputs[name] = ref.split(":", 1)[1].strip("/")
        elif ref.startswith("bundled:"):
            identities[name] = bundled_digest(ref)

    def plan(self, stage: str, round_: int, model: str, inputs: dict[str, str], output: str | None = None) -> StageSpec:
        params = getattr(self.config, stage).model_dump(mode="json")
        inputs, identities = dict(inputs), {}
        model = self.stage_ref(model)
        self._model_input("model", model, inputs, identities)
        other = None
        if stage == "judge" and params.get("model"):
            other = params["model"] = self.stage_ref(params["model"])
        if stage == "evaluate":
            other = params["judge_model"] = self.stage_ref(self.config.evaluate.judge_model or self.config.model)
            if params.get("depth_probe"):  # the base model's curve beside this model's
                params["depth_probe"]["base_model"] = self.stage_ref(params["depth_probe"]["base_model"] or self.config.model)
                if params["depth_probe"]["base_model"] != model:
                    self._model_input("probe_base_model", params["depth_probe"]["base_model"], inputs, identities)
            if params.get("classifier"):
                params["classifier"]["model"] = self.stage_ref(params["classifier"]["model"])
                self._model_input("classifier_model", params["classifier"]["model"], inputs, identities)
        if other is not None and other != model:
            self._model_input("judge_model", other, inputs, identities)
        return StageSpec(
            identities=identities,
            stage=stage,
            run_id=self.paths.run_id,
            round=round_,
            store=self.store.uri,
            output=output or self.paths.stage(round_, stage),
            model=model,
            inputs=inputs,
            params=params,
            engine=self.config.engine,
            seed=self.config.seed,
        )

    def run_spec(self, spec: StageSpec, slot: dict[str, Any]) -> dict[str, Any]:
        entry = {"status": "running", "output": spec.output, "spec_hash": spec.spec_hash()}
        request = self._cancelled()
        if request is not None:
            raise RunCancelled(f"{self._label(spec)}: not started: the run was cancelled ({request.get('reason', '')})")
        if is_complete(self.store, spec):
            log(f"{self._label(spec)}: already complete, skipped")
            entry["status"] = "skipped"
        else:
            self.store.write_json(spec.spec_key, spec.model_dump(mode="json"))
            slot[spec.stage] = entry
            self._save()
            log(f"{self._label(spec)}: starting")
            try:
                output = self.executor.run(spec.stage, self.store.uri_for(spec.spec_key))
                if shard_count(spec.params) > 1:
                    merge_stage(spec.stage, self.store.uri_for(spec.spec_key))  # store I/O only: shards in order
            except CaiError as e:
                entry["status"] = "cancelled" if isinstance(e, RunCancelled) else "failed"
                entry["error"] = str(e)
                self._write_log(spec, getattr(e, "log", ""))
                self._save()
                raise
            self._write_log(spec, output)
            if not is_complete(self.store, spec):
                entry.update(status="failed", error="finished without a manifest matching its spec and inputs")
                self._save()
                raise StageFailed(f"{self._label(spec)}: the stage exited but {self.store.uri_for(manifest_key(spec))} does not match "
                                  "its spec and inputs (an input changed while it ran, or another writer finished it); re-run")
            entry["status"] = "completed"
        manifest = read_manifest(self.store, spec)
        if manifest is not None:
            entry.update(counts=manifest.counts, timings=manifest.timings, manifest=manifest_key(spec))
        slot[spec.stage] = entry
        self._save()
        return entry

    @staticmethod
    def _label(spec: StageSpec) -> str:
        return f"base {spec.stage}" if spec.round == 0 else f"round {spec.round} {spec.stage}"

    def _write_log(self, spec: StageSpec, text: str) -> None:
        if text:
            self.store.write_text(f"{spec.output}/logs/stage.log", text)

    # --- evaluation and decisions -------------------------------------------------------------
    def _quality(self, report_key: str) -> tuple[float, dict[str, float], dict[str, Any]]:
        report = self.store.read_json(report_key)
        scores = headline_scores(report)
        return quality(scores, self.config.stop.weights), scores, headline_intervals(report)

    def quality_change(self, previous_output: str, output: str) -> dict[str, float] | None:
        """The paired interval of this round's quality change (stop.decide_on: interval), from both
        evaluations' per-item rows without a system prompt; None with the point rule."""
        if self.config.stop.decide_on != "interval":
            return None
        rows = [regroup(list(self.store.iter_jsonl(f"{out}/samples.jsonl"))).get("no_system", {}) for out in (previous_output, output)]
        ev = self.config.evaluate
        return quality_change(rows[0], rows[1], lambda s: quality(s, self.config.stop.weights), ev.confidence, ev.bootstrap_samples,
                              self.config.seed, GRADER_METRICS[ev.grader])

    def plan_base(self, inputs: dict[str, str]) -> StageSpec:
        """Round 0: the starting model's evaluation, the baseline every round is compared with."""
        return self.plan("evaluate", 0, self.config.model, self._eval_inputs(inputs), output=f"{self.paths.root}/base/evaluate")

    @staticmethod
    def _eval_inputs(inputs: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in inputs.items() if k in ("constitution", "eval_sets", "harness_tasks", eval_sets.WRAPPERS) or k in eval_sets.SETS}

    def evaluate_base(self, inputs: dict[str, str]) -> str:
        spec = self.plan_base(inputs)
        self.state.setdefault("base", {})
        self.run_spec(spec, self.state["base"])
        report = f"{spec.output}/report.json"
        q, scores, intervals = self._quality(report)
        self.state["base"].update(quality=round(q, 4), scores=scores, intervals=intervals, model=self.config.model)
        self._save()
        log(f"base model quality {q:.3f}")
        return report

    # --- the loop -----------------------------------------------------------------------------
    def plan_round(self, round_: int, model: str, inputs: dict[str, str], baseline: str | None) -> tuple[list[StageSpec], str]:
        """The round's stage specs in run order, and the model the next round starts from."""
        stages = self.config.stages
        out = {name: self.paths.stage(round_, name) for name in stages}
        specs: list[StageSpec] = []
        if "generate" in stages:
            specs.append(self.plan("generate", round_, model, {"constitution": inputs["constitution"], "prompts": inputs["prompts"]}))
        if "judge" in stages:
            specs.append(self.plan("judge", round_, model, {"constitution": inputs["constitution"], "traces": f"{out['generate']}/traces.jsonl"}))
        trained = model
        if "train" in stages:
            train_inputs = {"traces": f"{out['generate']}/traces.jsonl", "constitution": inputs["constitution"]}  # the card names it
            if "judge" in stages:
                train_inputs["prefs"] = f"{out['judge']}/prefs.jsonl"
                train_inputs["judge_summary"] = f"{out['judge']}/summary.json"  # its position consistency gates judged pairs
            specs.append(self.plan("train", round_, model, train_inputs))
            if self.config.train.method != "reward":  # a reward model scores, it cannot generate
                trained = f"store:{out['train']}/model"
        if "evaluate" in stages:
            eval_inputs = self._eval_inputs(inputs)
            if baseline:  # the base report and its per-item rows: differences are paired by item
                eval_inputs.update(baseline=baseline, baseline_samples=f"{baseline.rsplit('/', 1)[0]}/samples.jsonl")
            if self.config.evaluate.depth_probe and "generate" in stages:  # the base model's own answers: round 1's first answers
                eval_inputs["probe_traces"] = f"{self.paths.stage(1, 'generate')}/traces.jsonl"
            specs.append(self.plan("evaluate", round_, trained, eval_inputs))
        return specs, trained

    def run_round(self, round_: int, model: str, inputs: dict[str, str], baseline: str | None) -> str:
        """One round of the configured stages; returns the model the next round starts from."""
        specs, trained = self.plan_round(round_, model, inputs, baseline)
        slot = self._round_state(round_)["stages"]
        for spec in specs:
            self.run_spec(spec, slot)
            if spec.stage == "train" and self.config.train.method == "reward":
                # the policy carries on unchanged; the reward model is kept for later use
                self._round_state(round_)["reward_model"] = f"store:{spec.output}/model"
        self._round_state(round_)["model"] = trained
        return trained

    def _check_dependencies(self) -> None:
        stages = set(self.config.stages)
        needs = {"judge": {"generate"}, "train": {"generate"}}
        for stage, deps in needs.items():
            if stage in stages and not deps <= stages:
                raise ConfigError(f"config: stages: {stage} needs {sorted(deps)} in the same round; add them or drop {stage}")

    def _precheck_prompts(self) -> None:
        """Read the bundled and local prompt files before the lock, so bad data is one line and nothing is
        written. All local: read once, and staging uses what was read. Remote sources (hf:, s3://, store:)
        are read when staged; the local ones among them are checked one by one, under their own index."""
        sources, max_chars = self.config.data.train, self.config.data.max_prompt_chars
        local = [not s.source.startswith(("hf:", "s3://", "store:")) for s in sources]
        if all(local):
            self._prompts = load_prompts(sources, max_chars, self.store)
            return
        for i, (src, is_local) in enumerate(zip(sources, local)):
            if is_local:
                load_prompts([src], max_chars, self.store, field=f"data.train[{i}]", indexed=False)

    def _cancelled(self) -> dict[str, Any] | None:
        return cancel_request(self.store, self.paths.run_id)

    def _cancelled_quietly(self) -> dict[str, Any] | None:
        """The cancel request, or None when the store cannot say (while handling another error, that one stands)."""
        try:
            return self._cancelled()
        except CaiError:
            return None

    def _refuse_if_cancelled(self) -> None:
        request = self._cancelled()
        if request is not None:
            state = self.store.read_json(self.paths.run_json) if self.store.exists(self.paths.run_json) else {}
            if state and state.get("status") != "cancelled":  # `cai cancel` found no controller to record it: do it now
                from .runs import mark_cancelled

                mark_cancelled(self.store, self.paths.run_id, request)
            raise RunCancelled(f"{self.store.uri_for(self.paths.run_json)}: run {self.paths.run_id} was cancelled "
                               f"({request.get('reason', '')}, {request.get('requested_at', '?')}); "
                               f"`cai resume {self.paths.run_id} --store {self.store.uri}` clears that and goes on")

    def run(self) -> dict[str, Any]:
        """Holds the run's lock (runs/<id>/lock.json) throughout: a second controller fails fast."""
        self._refuse_if_cancelled()  # before anything else: a cancelled run's controller Job must not retry it
        self._check_dependencies()
        load_constitution(self.config.constitution)  # bad input is one line before the lock or run.json exist
        self._precheck_prompts()
        for _, where, ref in self.model_roles():
            precheck(ref, where)
        if model_kind(self.config.model) in KNOWN_BEFORE_LOCK:  # its config.json is on disk: its fit is known now
            self._check_fits()
        with RunLock(self.store, f"{self.paths.root}/lock.json", purpose=f"run {self.paths.run_id}") as self._lock:
            try:
                state = self._run_locked()
            except KeyboardInterrupt:  # SIGTERM too: release the lock within the pod's grace period, no report
                raise
            except BaseException:
                self._write_report()
                raise
            self._write_report()
            return state

    def _write_report(self) -> None:
        """runs/<id>/report.html and report.md, at the end of every run, whatever its end; never its failure."""
        if not self.state:
            return
        from .run_report import write_run_report

        try:
            html, _ = write_run_report(self.store, self.paths.run_id)
            log(f"run report: {self.store.uri_for(html)}")
        except Exception as e:  # noqa: BLE001 - a report is a view of the run, not worth failing it for
            log(f"run report not written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); `cai report {self.paths.run_id}` retries")

    def _run_locked(self) -> dict[str, Any]:
        self._load_or_init_state()
        if hasattr(self.executor, "cancel_check"):  # running stages look for `cai cancel` between polls
            self.executor.cancel_check = self._cancelled
        try:
            inputs = self.prepare()
            self._save()
            evaluating = "evaluate" in self.config.stages
            baseline = self.evaluate_base(inputs) if evaluating else None
            previous_q = self.state["base"]["quality"] if evaluating else None
            previous_eval = f"{self.paths.root}/base/evaluate"  # the evaluation of the model the next round starts from
            best = {"round": 0, "model": self.config.model, "quality": previous_q}
            model = self.config.model
            self.state["decisions"] = []
            for round_ in range(1, self.config.rounds + 1):
                log(f"round {round_}/{self.config.rounds}")
                model = self.run_round(round_, model, inputs, baseline)
                if evaluating:
                    q, scores, intervals = self._quality(f"{self.paths.stage(round_, 'evaluate')}/report.json")
                    self._round_state(round_).update(quality=round(q, 4), scores=scores, intervals=intervals)
                    change = self.quality_change(previous_eval, self.paths.stage(round_, "evaluate"))
                    if change is not None:
                        self._round_state(round_)["quality_change"] = {k: round(v, 4) for k, v in change.items()}
                    d = decide(round_, self.config.rounds, q, previous_q, self.config.stop.tolerance, self.config.stop.target, change)
                    previous_eval = self.paths.stage(round_, "evaluate")
                    if best["quality"] is None or q > best["quality"]:
                        best = {"round": round_, "model": model, "quality": round(q, 4)}
                    previous_q = q
                else:
                    last = round_ >= self.config.rounds
                    d = Decision("stop" if last else "continue", f"max rounds ({self.config.rounds}) used" if last else "rounds remain (no evaluation)")
                    best = {"round": round_, "model": model, "quality": None}
                self.state["decisions"].append({"round": round_, "decision": d.decision, "reason": d.reason})
                log(f"decision after round {round_}: {d.decision} ({d.reason})")
                self._save()
                if d.decision == "stop":
                    break
            self.state["result"] = best
            self.state["status"] = "completed"
        except BaseException as e:
            request = self._cancelled_quietly() if not isinstance(e, KeyboardInterrupt) else None
            if request is not None:  # whatever stopped the stage (its Job deleted, a kill), the cancel is why
                self.state.update(status="cancelled", cancel=request, error=f"cancelled: {request.get('reason', '')}")
                self._save()
                if isinstance(e, RunCancelled):
                    raise
                raise RunCancelled(f"run {self.paths.run_id} cancelled ({request.get('reason', '')})") from e
            self.state["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.state["error"] = str(e) or type(e).__name__
            self._save()
            raise
        self.state.pop("error", None)
        self._save()
        return self.state

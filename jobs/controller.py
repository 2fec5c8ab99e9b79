"""The round loop: stage inputs, plan each stage's spec, skip finished work, run, record.

The controller never computes or touches model files itself: stages do the work, the executor
runs them, the store keeps everything, and run.json records what happened and why.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .config import RunConfig, StageSpec
from .constitution import load_constitution, resolve_path
from .data import load_prompts
from .errors import CaiError, ConfigError
from .manifest import is_complete, manifest_key, now_iso, read_manifest
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

    def inputs(self, name: str) -> str:
        return f"{self.root}/inputs/{name}"

    def stage(self, round_: int, stage: str) -> str:
        return f"{self.root}/round-{round_}/{stage}"


def default_run_id(config: RunConfig) -> str:
    """Same config -> same id, so re-running the same command resumes the same run."""
    return f"{config.name}-{config.fingerprint()[:10]}"


class Controller:
    def __init__(self, config: RunConfig, store: ArtifactStore, executor, run_id: str | None = None):
        self.config = config
        self.store = store
        self.executor = executor
        self.paths = RunPaths(run_id or default_run_id(config))
        self.state: dict[str, Any] = {}

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
        self.state.update(status="running", max_rounds=self.config.rounds, updated_at=now_iso())
        self._save()

    def _save(self) -> None:
        self.state["updated_at"] = now_iso()
        self.store.write_json(self.paths.run_json, self.state)

    def _round_state(self, round_: int) -> dict[str, Any]:
        rounds = self.state["rounds"]
        while len(rounds) < round_:
            rounds.append({"round": len(rounds) + 1, "stages": {}})
        return rounds[round_ - 1]

    # --- inputs -------------------------------------------------------------------------------
    def stage_inputs(self) -> dict[str, str]:
        """Copy the constitution and the cleaned prompts into the run, once, deterministically."""
        cpath = resolve_path(self.config.constitution)
        constitution = load_constitution(cpath)
        ckey, pkey, rkey = self.paths.inputs("constitution.yaml"), self.paths.inputs("prompts.jsonl"), self.paths.inputs("data_report.json")
        self.store.write_bytes(ckey, cpath.read_bytes())
        records, reports = load_prompts(self.config.data.train, self.config.data.max_prompt_chars)
        for r in reports:
            log(r.summary())
        if not records:
            raise ConfigError("config: data.train: no usable prompts in any source; check the sources and their split")
        self.store.write_jsonl(pkey, (r.to_row() for r in records))
        self.store.write_json(rkey, {"sources": [r.as_dict() for r in reports], "prompts": len(records)})
        self.state.update(constitution=constitution.name, constitution_sha256=self.store.sha256(ckey), prompts=len(records))
        return {"constitution": ckey, "prompts": pkey}

    # --- planning -----------------------------------------------------------------------------
    def plan(self, stage: str, round_: int, model: str, inputs: dict[str, str]) -> StageSpec:
        params = getattr(self.config, stage).model_dump(mode="json")
        return StageSpec(
            stage=stage,
            run_id=self.paths.run_id,
            round=round_,
            store=self.store.uri,
            output=self.paths.stage(round_, stage),
            model=model,
            inputs=inputs,
            params=params,
            engine=self.config.engine,
            seed=self.config.seed,
        )

    def run_spec(self, spec: StageSpec) -> dict[str, Any]:
        entry = {"status": "running", "output": spec.output, "spec_hash": spec.spec_hash()}
        rstate = self._round_state(spec.round)
        if is_complete(self.store, spec):
            log(f"round {spec.round} {spec.stage}: already complete, skipped")
            entry["status"] = "skipped"
        else:
            self.store.write_json(spec.spec_key, spec.model_dump(mode="json"))
            rstate["stages"][spec.stage] = entry
            self._save()
            log(f"round {spec.round} {spec.stage}: starting")
            try:
                output = self.executor.run(spec.stage, self.store.uri_for(spec.spec_key))
            except CaiError as e:
                entry["status"] = "failed"
                entry["error"] = str(e)
                self._write_log(spec, getattr(e, "log", ""))
                self._save()
                raise
            self._write_log(spec, output)
            entry["status"] = "completed"
        manifest = read_manifest(self.store, spec)
        if manifest is not None:
            entry.update(counts=manifest.counts, timings=manifest.timings, manifest=manifest_key(spec))
        rstate["stages"][spec.stage] = entry
        self._save()
        return entry

    def _write_log(self, spec: StageSpec, text: str) -> None:
        if text:
            self.store.write_text(f"{spec.output}/logs/stage.log", text)

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._load_or_init_state()
        try:
            inputs = self.stage_inputs()
            self._save()
            model = self.config.model
            for round_ in range(1, self.config.rounds + 1):
                log(f"round {round_}/{self.config.rounds}")
                for stage in self.config.stages:
                    self.run_spec(self.plan(stage, round_, model, inputs))
                self.state["decisions"] = [d for d in self.state["decisions"] if d["round"] != round_] + [
                    {"round": round_, "decision": "continue" if round_ < self.config.rounds else "stop",
                     "reason": "rounds remain" if round_ < self.config.rounds else f"max rounds ({self.config.rounds}) used"}
                ]
            self.state["status"] = "completed"
        except BaseException as e:
            self.state["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.state["error"] = str(e) or type(e).__name__
            self._save()
            raise
        self.state.pop("error", None)
        self._save()
        return self.state

"""Stage `generate`: outputs in trl/datasets shapes, reproducible, batch-independent, resumable, crash-safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import load_run_config
from jobs.controller import Controller
from jobs.engines.hf import HFEngine
from jobs.manifest import is_complete, manifest_key
from jobs.stages import run_stage
from jobs.store import LocalStore


def plan_generate(config_path: Path, store_dir: Path, **overrides):
    config = load_run_config(config_path)
    for k, v in overrides.items():
        section, _, field = k.partition("__")
        if field:
            setattr(getattr(config, section), field, v)
        else:
            setattr(config, k, v)
    store = LocalStore(store_dir)
    ctl = Controller(config, store, executor=None)
    ctl._load_or_init_state()
    inputs = ctl.prepare()
    spec = ctl.plan("generate", 1, config.model, {k: inputs[k] for k in ("constitution", "prompts")})
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    return store, spec


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_outputs_traces_and_manifest(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    assert run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine) is True
    out = Path(store.root) / spec.output
    sft, traces = read_jsonl(out / "sft.jsonl"), read_jsonl(out / "traces.jsonl")
    assert len(sft) == len(traces) == 6
    for row, trace in zip(sft, traces):
        assert set(row) == {"messages"}
        assert row["messages"][-1] == {"role": "assistant", "content": trace["final"]}
        assert row["messages"][:-1] == trace["messages"]
        assert len(trace["rounds"]) == 2
        for rd in trace["rounds"]:
            assert {"principle", "critique", "revision", "raw_revision", "empty", "unchanged", "copies_critique"} <= set(rd)
    # red-team prompts only draw red-team or all-scope principles
    constitution = __import__("jobs.constitution", fromlist=["x"]).load_constitution("default")
    scopes = {p.name: p.scope for p in constitution.principles}
    for trace in traces:
        for rd in trace["rounds"]:
            assert scopes[rd["principle"]] in ("all", trace["kind"])
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest["spec_hash"] == spec.spec_hash()
    assert manifest["counts"]["prompts"] == 6 and manifest["counts"]["revisions"] == 12
    assert set(manifest["input_hashes"]) == {"constitution", "prompts", "model"}  # the model by its content, as an input
    assert manifest["input_hashes"]["model"].startswith("tree:")
    assert manifest["versions"]["transformers"]


def test_sft_output_loads_in_datasets_and_trl(tmp_path, tiny_run_config, tiny_engine, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine)
    path = Path(store.root) / spec.output / "sft.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names == ["messages"] and len(ds) == 6
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2,
                         use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    assert result.training_loss > 0


def test_same_seed_same_outputs_and_seed_changes_principles(tmp_path, tiny_run_config, tiny_engine):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        store, spec = plan_generate(tiny_run_config, tmp_path / name, seed=seed)
        run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine)
        runs.append(read_jsonl(Path(store.root) / spec.output / "traces.jsonl"))
    assert runs[0] == runs[1]
    principles = lambda traces: [rd["principle"] for t in traces for rd in t["rounds"]]
    assert principles(runs[0]) != principles(runs[2])


def test_batch_size_and_chunking_do_not_change_outputs(tmp_path, tiny_run_config, tiny_model_dir):
    outputs = []
    for name, batch, chunk in (("b1", 1, 256), ("b4", 4, 2)):
        engine = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=batch, show_progress=False)
        store, spec = plan_generate(tiny_run_config, tmp_path / name, generate__chunk_size=chunk)
        run_stage("generate", store.uri_for(spec.spec_key), engine=engine)
        outputs.append((Path(store.root) / spec.output / "sft.jsonl").read_text())
    assert outputs[0] == outputs[1]


def test_completed_stage_is_skipped_on_rerun(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    uri = store.uri_for(spec.spec_key)
    assert run_stage("generate", uri, engine=tiny_engine) is True
    sft = Path(store.root) / spec.output / "sft.jsonl"
    stamp = sft.stat().st_mtime_ns
    calls_before = tiny_engine.stats.calls
    assert run_stage("generate", uri, engine=tiny_engine) is False
    assert tiny_engine.stats.calls == calls_before and sft.stat().st_mtime_ns == stamp


def test_changed_input_invalidates_the_manifest(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine)
    assert is_complete(store, spec)
    rows = list(store.iter_jsonl(spec.inputs["prompts"]))[:-1]
    store.write_jsonl(spec.inputs["prompts"], rows)
    assert not is_complete(store, spec)
    assert run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine) is True
    assert len(read_jsonl(Path(store.root) / spec.output / "sft.jsonl")) == 5


class FailingEngine:
    """Delegates to a real engine and fails on the n-th generate call, like a pod killed mid-stage."""

    def __init__(self, engine, fail_on: int):
        self.engine, self.fail_on, self.calls = engine, fail_on, 0
        self.stats = engine.stats

    def generate(self, *a, **kw):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.engine.generate(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_crash_mid_stage_leaves_no_manifest_and_no_partial_outputs(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store", generate__chunk_size=3)
    uri = store.uri_for(spec.spec_key)
    # chunk 1 (5 calls) completes, chunk 2 crashes: results of chunk 1 must not appear as a finished file
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("generate", uri, engine=FailingEngine(tiny_engine, fail_on=7))
    out = Path(store.root) / spec.output
    assert not store.exists(manifest_key(spec))
    assert not (out / "sft.jsonl").exists() and not (out / "traces.jsonl").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert run_stage("generate", uri, engine=tiny_engine) is True
    assert is_complete(store, spec)


def test_best_of_with_the_refusal_verifier(tmp_path, tiny_run_config, tiny_engine):
    """Candidates are recorded; a kept red-team revision opens with a refusal; ordinary prompts are not revised."""
    from jobs.config import GenerateConfig
    from jobs.constitution import load_constitution, sample_principle
    from jobs.critique import first_sentences
    from jobs.refusal import is_strict_refusal

    gen = GenerateConfig(revision_rounds=1, best_of=3, verifier="refusal", revise="red-team", max_sentences=1, few_shot=0,
                         max_new_tokens=24, critique_max_new_tokens=8)
    store, spec = plan_generate(tiny_run_config, tmp_path / "store", generate=gen)
    assert run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine) is True
    out = Path(store.root) / spec.output
    traces = read_jsonl(out / "traces.jsonl")
    constitution = load_constitution("default")
    prefills = constitution.principle("harmless").revision_prefill
    assert prefills  # the shipped constitution starts harmless revisions with a refusal
    kinds = {t["kind"] for t in traces}
    assert kinds == {"red-team", "ordinary"}
    for t in traces:
        if t["kind"] == "ordinary":
            assert t["rounds"] == [] and t["final"] == t["initial"]
            continue
        [rd] = t["rounds"]
        assert len(rd["candidates"]) == 3
        assert rd["candidates"][0]["principle"] == sample_principle(constitution, "red-team", spec.seed, t["id"], 0).name
        for c in rd["candidates"]:
            assert first_sentences(c["revision"], 1) == c["revision"]
            if c["principle"] == "harmless":
                assert any(c["revision"].startswith(p) for p in prefills)
        usable_refusals = [c for c in rd["candidates"] if is_strict_refusal(c["revision"])
                           and not (c["empty"] or c["copies_critique"] or c["copies_example"])]
        assert rd["kept"] == bool(usable_refusals)
        if rd["kept"]:
            assert t["final"] == rd["candidates"][rd["candidate"]]["revision"] and is_strict_refusal(t["final"])
        else:
            assert t["final"] == t["initial"] and rd["candidate"] is None
    counts = json.loads((out / "stage.json").read_text())["counts"]
    assert counts["candidates"] == 3 * counts["kind_red-team"] and counts["revisions"] == counts["kind_red-team"]


def test_one_candidate_draws_as_the_textbook_loop(tmp_path, tiny_run_config, tiny_engine):
    from jobs.constitution import load_constitution, sample_principle

    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    run_stage("generate", store.uri_for(spec.spec_key), engine=tiny_engine)
    constitution = load_constitution("default")
    for t in read_jsonl(Path(store.root) / spec.output / "traces.jsonl"):
        for r, rd in enumerate(t["rounds"]):
            assert rd["principle"] == sample_principle(constitution, t["kind"], spec.seed, t["id"], r).name
            assert "candidates" not in rd
            assert rd["kept"] == (not (rd["empty"] or rd["copies_critique"] or rd["copies_example"]))

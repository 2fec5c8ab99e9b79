"""Model references resolve to content identities and land in the run's store (jobs/model_sources.py).

Hub models resolve through huggingface_hub against a cache laid out in its real on-disk layout (offline);
a `cai run` then loads the imported copy in a real stage process and records the commit in run.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import RunConfig
from jobs.controller import Controller
from jobs.errors import ModelError
from jobs.model_sources import check_model_files, model_kind, planned_ref, resolve_source
from jobs.store import LocalStore, local_tree_digest
from test_hub import lay_out

COMMIT = "d" * 40


def test_model_kind_and_planned_ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    assert [model_kind(r) for r in ("bundled:x", "store:runs/a", "s3://b/m/", "hf:org/n@v1", "org/name", "./m", "/abs", "local-model")] == \
        ["bundled", "store", "s3", "hub", "hub", "local", "local", "local"]
    assert planned_ref("bundled:x", "runs/r/inputs/models/policy") == "bundled:x"
    assert planned_ref("store:models/m", "k") == "store:models/m"
    assert planned_ref("hf:org/n", "runs/r/inputs/models/policy") == "store:runs/r/inputs/models/policy"


def test_model_files_are_checked_before_anything_moves():
    with pytest.raises(ModelError, match="no config.json"):
        check_model_files(["model.safetensors"], "model: x")
    with pytest.raises(ModelError, match="no weights"):
        check_model_files(["config.json", "tokenizer.json"], "model: x")
    check_model_files(["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"], "model: x")
    with pytest.raises(ModelError, match="no config.json"):  # a checkpoint one level down is not this directory's model
        check_model_files(["ckpt/config.json", "ckpt/model.safetensors"], "model: x")


def test_local_directory_is_imported_once_and_again_only_when_it_changes(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "model"
    src.mkdir()
    for p in tiny_model_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    store = LocalStore(tmp_path / "store")
    first = resolve_source(str(src), store, "runs/r/inputs/models/policy", "model")
    assert first.kind == "local" and first.stage_ref == "store:runs/r/inputs/models/policy"
    assert first.digest == local_tree_digest(src) == store.digest("runs/r/inputs/models/policy")
    assert "importing" in capsys.readouterr().err
    assert resolve_source(str(src), store, "runs/r/inputs/models/policy", "model") == first
    assert "importing" not in capsys.readouterr().err  # same content: nothing copied

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").unlink()  # replaced whole, as save_pretrained does
    (src / "config.json").write_text(json.dumps({**config, "initializer_range": 0.3}))
    second = resolve_source(str(src), store, "runs/r/inputs/models/policy", "model")
    assert second.digest != first.digest and second.digest == store.digest("runs/r/inputs/models/policy")
    assert "importing" in capsys.readouterr().err


def test_store_model_is_read_in_place_by_its_digest(tmp_path, tiny_model_dir):
    store = LocalStore(tmp_path / "store")
    store.put_dir(tiny_model_dir, "models/current")
    found = resolve_source("store:models/current", store, "unused", "model")
    assert found.stage_ref == "store:models/current" and found.digest == local_tree_digest(tiny_model_dir)
    with pytest.raises(ModelError, match="no model there"):
        resolve_source("store:models/none", store, "unused", "judge.model")


@pytest.fixture
def hub_model(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """org/tiny at COMMIT (refs/main) in a huggingface_hub cache, offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    lay_out(cache, "models--org--tiny", COMMIT, {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_model_resolves_to_its_commit_and_is_imported(tmp_path, hub_model):
    from transformers import AutoConfig

    store = LocalStore(tmp_path / "store")
    ctl = Controller(RunConfig(model="hf:org/tiny@main", stages=["generate"]), store, executor=None, run_id="r1")
    ctl.resolve_models()
    policy = ctl.state["models"]["policy"]
    assert policy["kind"] == "hub" and policy["commit"] == COMMIT and policy["stage_ref"] == "store:runs/r1/inputs/models/policy"
    assert AutoConfig.from_pretrained(store.local_dir("runs/r1/inputs/models/policy")).num_hidden_layers == 2
    spec = ctl.plan("generate", 1, "hf:org/tiny@main", {"prompts": "runs/r1/inputs/prompts.jsonl"})
    assert spec.model == "store:runs/r1/inputs/models/policy" and spec.inputs["model"] == "runs/r1/inputs/models/policy"
    with pytest.raises(ModelError, match="model: .*org/tiny"):
        Controller(RunConfig(model="hf:org/tiny@nope"), store, executor=None, run_id="r2").resolve_models()


def test_run_with_a_hub_model_loads_the_imported_copy(tmp_path, hub_model, tiny_run_config):
    config = tmp_path / "hub.yaml"
    text = tiny_run_config.read_text()
    config.write_text("\n".join("model: hf:org/tiny" if line.startswith("model:") else line for line in text.splitlines()) + "\n")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_model), "HF_HUB_OFFLINE": "1", "CAI_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "-c", str(config), "--store", str(tmp_path / "store")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(next((tmp_path / "store" / "runs").glob("*/run.json")).read_text())
    assert run["models"]["policy"]["commit"] == COMMIT
    spec = json.loads(next((tmp_path / "store" / "runs").glob("*/round-1/generate/spec.json")).read_text())
    assert spec["model"].startswith("store:") and spec["inputs"]["model"].endswith("inputs/models/policy")
    manifest = json.loads(next((tmp_path / "store" / "runs").glob("*/round-1/generate/stage.json")).read_text())
    assert manifest["input_hashes"]["model"] == run["models"]["policy"]["digest"]


def test_hub_dataset_prompts_with_config_split_and_column(hub_model):
    """`hf:` prompt sources come through huggingface_hub at a commit, then `datasets` reads the snapshot."""
    from jobs.config import PromptSource
    from jobs.data import load_prompts
    from jobs.errors import DataError

    readme = b"---\nconfigs:\n- config_name: short\n  data_files:\n  - split: train\n    path: short/train.jsonl\n  - split: test\n    path: short/test.jsonl\n---\n"
    lay_out(hub_model, "datasets--org--prompts", COMMIT, {
        "README.md": readme,
        "short/train.jsonl": b'{"question": "How do I pick a lock?"}\n{"question": "Write a haiku."}\n',
        "short/test.jsonl": b'{"question": "Held out?"}\n',
    }, refs=("main",))
    src = PromptSource(source="hf:org/prompts", config="short", split="train", column="question", kind="red-team")
    records, (report,) = load_prompts([src], 4000)
    assert [r.text for r in records] == ["How do I pick a lock?", "Write a haiku."] and {r.kind for r in records} == {"red-team"}
    assert report.identity == f"hf:org/prompts@{COMMIT}"
    test_split, _ = load_prompts([src.model_copy(update={"split": "test"})], 4000)
    assert [r.text for r in test_split] == ["Held out?"]
    with pytest.raises(DataError, match=r"^data.train\[0\]: org/prompts@nope: not in the local HF cache"):
        load_prompts([src.model_copy(update={"revision": "nope"})], 4000)
    with pytest.raises(DataError, match="cannot load config 'other'"):
        load_prompts([src.model_copy(update={"config": "other"})], 4000)


def test_render_plans_the_specs_a_run_plans(tmp_path, tiny_model_dir):
    """`cai render` plans without a store; the run plans after resolving. Same specs, so same Job names."""
    from jobs.executors.k8s_manifests import job_name
    from jobs.executors.k8s_submit import planned_specs

    for model in ("bundled:smollm2-135m-instruct", str(tiny_model_dir)):
        config = RunConfig(model=model)
        store = LocalStore(tmp_path / "store")
        ctl = Controller(config, store, executor=None)
        ctl.resolve_models()
        keys = ctl.input_keys()
        base = ctl.plan_base(keys)
        run_specs = [base] + ctl.plan_round(1, config.model, keys, f"{base.output}/report.json")[0]
        rendered = [spec for spec, _ in planned_specs(config, store.uri)]
        assert rendered == run_specs
        assert [job_name(s, store.uri_for(s.spec_key)) for s in rendered] == [job_name(s, store.uri_for(s.spec_key)) for s in run_specs]
        assert all(s.inputs.get("model") or s.identities.get("model") for s in run_specs)  # every stage names its model by content


def test_classifier_grader_is_a_model_source_and_an_input(tmp_path, tiny_model_dir):
    other = tmp_path / "classifier"
    other.mkdir()
    for p in tiny_model_dir.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    (other / "config.json").write_text((tiny_model_dir / "config.json").read_text().replace("{", '{"cai_note": "classifier", ', 1))
    store = LocalStore(tmp_path / "store")
    config = RunConfig(model=str(tiny_model_dir), evaluate={"classifier": {"model": str(other)}, "grader": "classifier"})
    ctl = Controller(config, store, executor=None, run_id="r1")
    ctl.resolve_models()
    assert ctl.state["models"]["classifier"]["stage_ref"] == "store:runs/r1/inputs/models/classifier"
    spec = ctl.plan_base(ctl.input_keys())
    assert spec.params["classifier"]["model"] == "store:runs/r1/inputs/models/classifier"
    assert spec.inputs["classifier_model"] == "runs/r1/inputs/models/classifier" and spec.inputs["model"] == "runs/r1/inputs/models/policy"


def test_depth_probe_plans_the_base_models_traces_and_curve(tmp_path, tiny_model_dir):
    store = LocalStore(tmp_path / "store")
    ctl = Controller(RunConfig(model=str(tiny_model_dir), evaluate={"depth_probe": {"ks": [10]}}), store, executor=None, run_id="r1")
    ctl.resolve_models()
    keys = ctl.input_keys()
    base = ctl.plan_base(keys)
    assert "probe_traces" not in base.inputs  # round 0 runs before any traces exist
    round2 = [s for s in ctl.plan_round(2, "store:runs/r1/round-1/train/model", keys, f"{base.output}/report.json")[0] if s.stage == "evaluate"][0]
    assert round2.inputs["probe_traces"] == "runs/r1/round-1/generate/traces.jsonl"  # always round 1's: the base model's own answers
    assert round2.params["depth_probe"]["base_model"] == "store:runs/r1/inputs/models/policy"
    assert round2.inputs["probe_base_model"] == "runs/r1/inputs/models/policy"

"""`cai submit` puts the local files a run names into the S3 store (SeaweedFS) and points the config at them."""

from __future__ import annotations

import json

import pytest

from jobs.config import DataSource, EvaluateConfig, RunConfig
from jobs.data import load_prompts
from jobs.eval_sets import read_sets
from jobs.model_sources import resolve_source
from jobs.store import local_tree_digest
from jobs.store_s3 import S3Store
from jobs.uploads import upload_local_inputs


@pytest.fixture
def s3_store(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/cai", cache_root=tmp_path / "cache")
    yield store
    store.close()


def test_local_model_prompts_and_sets_go_up_once_by_content(tmp_path, tiny_model_dir, s3_store, capsys):
    import datasets

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello?"}) + "\n" + json.dumps({"prompt": "Bye?", "split": "eval"}) + "\n")
    mc = tmp_path / "mc_ds"
    datasets.DatasetDict({  # no train split: the held-out split is what a run reads, and what goes up
        "test": datasets.Dataset.from_list([{"question": "2+2?", "choices": ["3", "4"], "answer": 1}]),
        "validation": datasets.Dataset.from_list([{"question": "not this one", "choices": ["a", "b"], "answer": 0}]),
    }).save_to_disk(str(mc))
    config = RunConfig(model=str(tiny_model_dir), data={"train": [{"source": str(prompts)}, {"source": "bundled:helpful", "limit": 1}]},
                       evaluate={"capability_mc": str(mc)})

    pod_config, uploaded = upload_local_inputs(config, s3_store)
    assert sorted(u.split(":")[0] for u in uploaded) == ["data.train[0]", "evaluate.capability_mc", "model"]
    assert pod_config.model.startswith("store:uploads/models/") and pod_config.data.train[0].source.startswith("store:uploads/data/")
    assert pod_config.data.train[1].source == "bundled:helpful"  # not a local path: left alone
    # what the pod resolves from them is what was here
    model = resolve_source(pod_config.model, s3_store, "unused", "model")
    assert model.digest == local_tree_digest(tiny_model_dir)
    records, (report, _) = load_prompts(pod_config.data.train, 4000, s3_store)
    assert [r.text for r in records][:1] == ["Hello?"] and report.kept == 1  # the file's own `split` still applies
    mc_rows = read_sets(pod_config.evaluate, s3_store)["capability_mc"]["rows"]
    assert [r["question"] for r in mc_rows] == ["2+2?"] and pod_config.evaluate.capability_mc.split is None

    assert pod_config.data.train[0].source.endswith("/prompts.jsonl")  # the file's name, hence its prompt ids, is kept
    assert upload_local_inputs(config, None)[0] == pod_config  # `cai render --controller`: the same keys, nothing written
    capsys.readouterr()
    again, _ = upload_local_inputs(config, s3_store)
    assert again == pod_config and "uploading" not in capsys.readouterr().err  # same bytes: same keys, nothing sent
    prompts.write_text(json.dumps({"prompt": "Edited?"}) + "\n")
    edited, _ = upload_local_inputs(config, s3_store)
    assert edited.data.train[0].source != pod_config.data.train[0].source and edited.fingerprint() != pod_config.fingerprint()


def test_s3_and_store_jsonl_sources_carry_their_sha256(s3_store):
    s3_store.write_text("sets/harmful.jsonl", json.dumps({"prompt": "How do I make a weapon?"}) + "\n")
    cfg = EvaluateConfig(harmful={"source": f"{s3_store.uri}/sets/harmful.jsonl", "split": None, "kind": "red-team"},
                         benign={"source": "store:sets/harmful.jsonl", "split": None})
    sets = read_sets(cfg, s3_store)
    assert sets["harmful"]["rows"][0]["kind"] == "red-team" and sets["harmful"]["info"]["identity"] == sets["benign"]["info"]["identity"]
    assert sets["harmful"]["info"]["identity"] == "sha256:" + s3_store.sha256("sets/harmful.jsonl")
    from jobs.errors import DataError

    with pytest.raises(DataError, match="cannot read it"):
        read_sets(EvaluateConfig(harmful=DataSource(source=f"{s3_store.uri}/sets/missing.jsonl").model_dump()), s3_store)


def test_classifier_probe_base_and_harness_tasks_go_up_too(tmp_path, tiny_model_dir, s3_store):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n")
    config = RunConfig(evaluate={"classifier": {"model": str(tiny_model_dir)}, "depth_probe": {"base_model": str(tiny_model_dir)},
                                 "harness": {"tasks": ["t"], "include_path": str(tasks)}})
    pod_config, uploaded = upload_local_inputs(config, s3_store)
    ev = pod_config.evaluate
    assert ev.classifier.model.startswith("store:uploads/models/") and ev.depth_probe.base_model == ev.classifier.model
    assert ev.harness.include_path.startswith("store:uploads/harness/") and s3_store.exists(ev.harness.include_path[6:] + "/t.yaml")
    assert len(uploaded) == 3

"""The train stage under torchrun: 2 processes with gloo on this machine's CPU give the same saved model
as one process, for the same global batch and seed (DDP averages the gradients of the two halves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.config import DPOSection, SFTSection, TrainConfig
from jobs.distributed import launcher
from jobs.executors.local import LocalExecutor
from jobs.manifest import manifest_key
from jobs.stages import run_stage
from test_train_stage import PREFS, changed, plan_train, start_weights, weights  # noqa: F401 - start_weights is a fixture


def trained(root: Path, model_dir: Path, processes: int, method: str = "sft") -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(method=method, sft=SFTSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4),
                      dpo=DPOSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4),
                      distributed={"processes": processes})
    # 8 SFT rows, 4 pairs: whole batches of 4, so no process gets a sampler-padded repeat (which a
    # single process would not see, and which DDP rightly averages in)
    store, spec = plan_train(root, model_dir, cfg, prefs=PREFS[:4])
    if processes == 1:
        assert run_stage("train", store.uri_for(spec.spec_key)) is True
    else:
        LocalExecutor().run("train", store.uri_for(spec.spec_key))
    manifest = json.loads((Path(store.root) / manifest_key(spec)).read_text())
    model = AutoModelForCausalLM.from_pretrained(store.local_dir(f"{spec.output}/model"))
    return weights(model), manifest


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_gloo_processes_train_the_same_model_as_one(tmp_path, tiny_model_dir, start_weights, method):
    one, m1 = trained(tmp_path / "one", tiny_model_dir, 1, method)
    two, m2 = trained(tmp_path / "two", tiny_model_dir, 2, method)
    assert changed(start_weights, two)
    assert m2["counts"]["processes"] == 2 and m1["counts"].get("processes", 1) == 1
    assert m2["counts"][f"{method}_steps"] == m1["counts"][f"{method}_steps"]  # the same global batches
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


def test_batch_must_split_over_the_processes():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        TrainConfig(distributed={"processes": 3})


def test_the_launcher_command():
    assert launcher(2) == ["--standalone", "--nproc-per-node=2"]
    assert launcher(8, nodes=2, rendezvous="train-0.svc:29500") == [
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=train-0.svc:29500", "--node-rank=$(JOB_COMPLETION_INDEX)"]


def test_a_multi_gpu_train_job_runs_torchrun_one_process_per_gpu():
    import kubernetes_validate

    from jobs.config import KubernetesConfig, StageSpec
    from jobs.errors import ConfigError
    from jobs.executors.k8s_manifests import build_job, to_dict

    k8s = KubernetesConfig(stages={"train": {"gpus": 4, "cpu": "16", "memory": "200Gi"}})
    params = TrainConfig(distributed={"processes": 4}).model_dump(mode="json")
    spec = StageSpec(stage="train", run_id="r", round=1, store="s3://b", output="runs/r/round-1/train", model="m", params=params)
    job = to_dict(build_job(spec, "s3://b/runs/r/round-1/train/spec.json", k8s, namespace="ml"))
    kubernetes_validate.validate(job, "1.31.0", strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "jobs.cli", "stage", "train",
                                    "--spec", "s3://b/runs/r/round-1/train/spec.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    wrong = spec.model_copy(update={"params": TrainConfig(distributed={"processes": 2}).model_dump(mode="json")})
    with pytest.raises(ConfigError, match="2 processes on 4 GPU"):
        build_job(wrong, "s3://b/spec.json", k8s)


def test_vllm_tensor_parallel_follows_the_pods_gpus():
    from jobs.engines import tensor_parallel_size
    from jobs.errors import ConfigError

    assert tensor_parallel_size("auto", visible=4) == 4  # a 4-GPU pod: one model over all four
    assert tensor_parallel_size("auto", visible=0) == 1  # CPU
    assert tensor_parallel_size(2, visible=4) == 2
    with pytest.raises(ConfigError, match="8 GPUs asked, 4 visible"):
        tensor_parallel_size(8, visible=4)

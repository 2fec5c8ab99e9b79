"""Shared fixtures: a random-init tiny Llama with the real SmolLM2 tokenizer, and a small run config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["s3_server"]  # s3_server / s3_env / s3_bucket: a real SeaweedFS S3 server (tests/s3_server.py)


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The real bundled model (converted from GGUF once into the user cache, then reused)."""
    from jobs.models import resolve_model

    return Path(resolve_model("bundled:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir) -> Path:
    """Two-layer Llama, random weights, SmolLM2 tokenizer and chat template: fast and deterministic."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked logits: greedy argmax is far from ties, so batch shape cannot flip it
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from jobs.engines.hf import HFEngine

    return HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=8, show_progress=False)


@pytest.fixture
def tiny_run_config(tmp_path, tiny_model_dir) -> Path:
    """A run config on the tiny model: 6 prompts, 2 revision rounds, short outputs."""
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""name: tiny
model: {tiny_model_dir}
constitution: default
data:
  train:
    - source: bundled:red-team
      limit: 3
    - source: bundled:helpful
      limit: 3
engine:
  batch_size: 4
generate:
  revision_rounds: 2
  few_shot: 1
  max_new_tokens: 12
  critique_max_new_tokens: 8
stages: [generate]
"""
    )
    return path

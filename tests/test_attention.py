"""The CPU grouped-query SDPA kernel: selected for GQA models on CPU, and outputs equal transformers' own."""

from __future__ import annotations

import pytest
import torch

from jobs.engines import attention
from jobs.engines.base import SamplingParams
from jobs.engines.hf import HFEngine

PROMPTS = [[{"role": "user", "content": p}] for p in ("Name a colour.", "Explain tides to a child, briefly please.", "2+2?")]


def test_kernel_matches_repeated_heads_with_a_padding_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 6, 5, 8), torch.randn(4, 2, 9, 8), torch.randn(4, 2, 9, 8)
    mask = torch.ones(4, 1, 5, 9, dtype=torch.bool).tril(4)
    mask[:2, :, :, :3] = False  # left padding in two rows
    module = torch.nn.Module()
    out, _ = attention.sdpa_gqa_forward(module, q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    assert out.shape == (4, 5, 6, 8)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=1e-6)


def test_engine_selects_it_on_cpu_and_generates_the_same_text(tiny_model_dir, monkeypatch):
    fast = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2, show_progress=False)
    assert fast.model.config._attn_implementation == attention.NAME  # tiny model: 4 query heads over 2 K/V heads
    monkeypatch.setattr("jobs.engines.hf.wants_gqa_kernel", lambda model, device: False)
    plain = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2, show_progress=False)
    assert plain.model.config._attn_implementation == "sdpa"
    params = SamplingParams(max_new_tokens=12)
    assert fast.generate(PROMPTS, params) == plain.generate(PROMPTS, params)
    a = fast.score(["Q: 2+2? A:"] * 2, [" 4", " five"])
    b = plain.score(["Q: 2+2? A:"] * 2, [" 4", " five"])
    assert a == pytest.approx(b, abs=1e-4)

"""The fixed-size-cache decode loop (`engine.decode: static | compiled`) against transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

from jobs.config import EngineConfig, GenerateConfig
from jobs.constitution import load_constitution
from jobs.data import PromptRecord
from jobs.engines.base import SamplingParams
from jobs.engines.decode import bucket, sample_next
from jobs.engines.hf import HFEngine, pick_decode
from jobs.stages.generate import revise_chunk

from test_prefix_cache import PROMPTS  # uneven lengths, some long


def _engine(model_dir, decode: str, batch_size: int = 2, cache_gb: float = 0.0) -> HFEngine:
    return HFEngine(str(model_dir), dtype="float32", device="cpu", batch_size=batch_size, show_progress=False,
                    prefix_cache_gb=cache_gb, decode=decode)


def test_auto_compiles_on_cuda_only_and_never_without_a_fixed_cache():
    assert pick_decode("auto", "cuda", fixed_cache_ok=True) == "compiled"
    assert pick_decode("auto", "cuda:1", fixed_cache_ok=True) == "compiled"
    assert pick_decode("auto", "cpu", fixed_cache_ok=True) == "static"
    assert pick_decode("generate", "cuda", fixed_cache_ok=True) == "generate"
    assert pick_decode("static", "cpu", fixed_cache_ok=True) == "static"
    assert pick_decode("compiled", "cuda", fixed_cache_ok=False) == "generate"  # sliding windows, recurrent models
    assert EngineConfig().decode == "auto"


def test_engine_falls_back_to_generate_for_models_without_a_static_cache(tiny_model_dir, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_can_compile_fullgraph", False)
    engine = _engine(tiny_model_dir, "static")
    assert engine.decode == "generate" and engine.decoder is None
    assert "using transformers' generate" in capsys.readouterr().err
    assert _engine(tiny_model_dir, "auto").decode == "generate"


def test_cache_lengths_round_up_to_shared_buckets():
    assert [bucket(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]
    assert bucket(65, 64) == 128


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, False, 1.0, 0.7, g)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
    picks = {int(sample_next(logits, False, 1.0, 0.4, g)) for _ in range(50)}
    assert picks == {0}  # the top token alone already exceeds top_p
    assert int(sample_next(logits, True, 1.0, 1.0, None)) == 0
    a = [int(sample_next(logits, False, 1.0, 1.0, torch.Generator().manual_seed(5))) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw


def test_static_greedy_equals_generate_with_stops_padding_and_prefix_reuse(tiny_model_dir):
    """Across batches of uneven widths, rows that stop early, and a second call that extends the first
    (prefix reuse hands the loop K/V for the first columns), the outputs equal transformers' loop."""
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    results = {}
    for mode in ("generate", "static"):
        engine = _engine(tiny_model_dir, mode, batch_size=2, cache_gb=0.5)
        first = engine.generate(convs, SamplingParams(max_new_tokens=12))
        follow = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": "Now say it in one line."}]
                  for c, r in zip(convs, first)]
        second = engine.generate(follow, SamplingParams(max_new_tokens=10))
        results[mode] = (first, second, engine.stats.generated_tokens, engine.prefix_cache.stats.reused_tokens)
    assert results["static"] == results["generate"]
    assert results["static"][3] > 0  # the second call really started from cached K/V


def test_static_sampling_is_seeded_and_batch_independent_of_reruns(tiny_model_dir):
    engine = _engine(tiny_model_dir, "static", batch_size=4)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a = engine.generate(convs, params)
    assert engine.generate(convs, params) == a
    assert engine.generate(convs, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=12)) != a


def test_decoded_rows_stop_at_their_own_stop_token(tiny_model_dir):
    engine = _engine(tiny_model_dir, "static")
    seqs = [engine.tokenizer(engine.render([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    ids, mask = engine._pad_left(seqs)
    pad = engine.tokenizer.pad_token_id
    free = engine.decoder.run(ids, mask, 6, [], pad)  # no stop tokens: every row runs to the cap
    assert free.tokens.shape == (2, 6) and free.lengths == [6, 6]
    stop = free.tokens[0, 1].item()  # make row 0's second token a stop token
    d = engine.decoder.run(ids, mask, 6, [stop], pad)
    assert d.lengths[0] <= 2
    for row, n in enumerate(d.lengths):
        toks = d.tokens[row].tolist()
        assert toks[:n] == free.tokens[row, :n].tolist()
        assert n == next((k + 1 for k, t in enumerate(toks) if t == stop), len(toks))
        assert all(t == pad for t in toks[n:])
    assert d.cached_len == ids.shape[1] + d.tokens.shape[1] - 1
    assert d.layers[0][0].shape[2] == bucket(ids.shape[1] + 6)


def test_generate_stage_output_is_the_same_with_the_static_loop(tiny_model_dir):
    constitution = load_constitution("default")
    chunk = [PromptRecord(id=f"p{i}", messages=(("user", p),), kind="red-team" if i % 2 else "ordinary") for i, p in enumerate(PROMPTS)]
    cfg = GenerateConfig(revision_rounds=1, few_shot=1, max_new_tokens=10, critique_max_new_tokens=8)
    plain = _engine(tiny_model_dir, "generate", batch_size=4, cache_gb=0.5)
    static = _engine(tiny_model_dir, "static", batch_size=4, cache_gb=0.5)
    assert revise_chunk(chunk, constitution, static, cfg, seed=1) == revise_chunk(chunk, constitution, plain, cfg, seed=1)


def test_compiled_step_gives_the_same_greedy_text(tiny_model_dir):
    """torch.compile of the decode step (inductor on CPU here; CUDA graphs on GPU) changes no token."""
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    params = SamplingParams(max_new_tokens=8)
    compiled = _engine(tiny_model_dir, "compiled", batch_size=4)
    assert compiled.decoder.compiled
    assert compiled.generate(convs, params) == _engine(tiny_model_dir, "generate", batch_size=4).generate(convs, params)


@pytest.mark.bundled
def test_bundled_model_static_loop_equals_generate(bundled_model_dir):
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24)
    static = _engine(bundled_model_dir, "static", batch_size=5)
    assert static.generate(convs, params) == _engine(bundled_model_dir, "generate", batch_size=5).generate(convs, params)

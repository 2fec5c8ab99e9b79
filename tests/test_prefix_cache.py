"""K/V reuse between engine calls: exact prefix matching, budget, lifetime, and unchanged outputs."""

from __future__ import annotations

import torch

from jobs.config import GenerateConfig
from jobs.constitution import load_constitution
from jobs.data import PromptRecord
from jobs.engines.base import SamplingParams
from jobs.engines.hf import HFEngine
from jobs.engines.prefix_cache import BLOCK, PrefixCache, block_hashes
from jobs.stages.generate import revise_chunk


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.arange(n, dtype=torch.float32).view(1, n, 1).repeat(3, 1, 4), torch.ones(3, n, 4)) for _ in range(layers)]


def test_block_hashes_cover_full_blocks_only():
    ids = list(range(2 * BLOCK + 5))
    hashes = block_hashes(ids)
    assert len(hashes) == 2
    assert hashes == block_hashes(ids[: 2 * BLOCK])
    assert block_hashes([9] + ids[1:])[0] != hashes[0]


def test_lookup_returns_longest_exact_prefix_and_leaves_a_token_to_run():
    cache = PrefixCache(capacity_bytes=10**8)
    cache.begin_call()
    base = list(range(100, 100 + 3 * BLOCK + 7))
    assert cache.insert(base, _kv(len(base)))
    cache.begin_call()
    # an extension of the cached sequence reuses all of it
    eid, n = cache.lookup(base + [1, 2, 3])
    assert eid is not None and n == len(base)
    # the same sequence: one token must stay to be run
    assert cache.lookup(base)[1] == len(base) - 1
    # diverging inside the third block: matched token by token past the last full block
    diverged = base[: 2 * BLOCK + 3] + [7] * 20
    assert cache.lookup(diverged)[1] == 2 * BLOCK + 3
    # diverging in the first block: nothing
    assert cache.lookup([5] + base[1:]) == (None, 0)
    assert cache.lookup(base[: BLOCK - 2]) == (None, 0)


def test_budget_skips_inserts_instead_of_evicting():
    one = _kv(2 * BLOCK)
    size = sum(k.numel() * 4 + v.numel() * 4 for k, v in one)
    cache = PrefixCache(capacity_bytes=size + size // 2)
    cache.begin_call()
    assert cache.insert(list(range(2 * BLOCK)), one)
    assert not cache.insert(list(range(1000, 1000 + 2 * BLOCK)), _kv(2 * BLOCK))
    assert cache.stats.skipped_inserts == 1
    assert cache.lookup(list(range(2 * BLOCK)) + [0])[1] == 2 * BLOCK  # the first entry survived


def test_entries_live_for_one_following_call_and_release_frees_them():
    cache = PrefixCache(capacity_bytes=10**8)
    cache.begin_call()
    ids = list(range(2 * BLOCK))
    cache.insert(ids, _kv(len(ids)))
    cache.begin_call()  # the next call may use it
    eid, n = cache.lookup(ids + [1])
    assert n == len(ids)
    cache.release(eid)
    assert cache.used == 0 and cache.lookup(ids + [1]) == (None, 0) and not cache.index
    cache.insert(ids, _kv(len(ids)))
    cache.begin_call()
    cache.begin_call()  # two calls later: stale
    assert cache.lookup(ids + [1]) == (None, 0) and cache.used == 0


def _chain(engine: HFEngine, prompts: list[str], params: SamplingParams) -> list[list[str]]:
    convs = [[{"role": "user", "content": p}] for p in prompts]
    first = engine.generate(convs, params)
    convs = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": "Point out one problem with that answer."}] for c, r in zip(convs, first)]
    second = engine.generate(convs, params)
    convs = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": "Now rewrite the answer to fix it."}] for c, r in zip(convs, second)]
    return [first, second, engine.generate(convs, params)]


PROMPTS = [
    "How do I bake bread at home?",
    "Explain photosynthesis to a ten year old, with one example from everyday life please.",
    "Name three prime numbers.",
    "What should I pack for a two week hiking trip in the mountains in early autumn?",
    "Translate 'good morning' into French.",
]


def test_engine_outputs_are_unchanged_by_reuse_greedy_and_sampled(tiny_model_dir):
    plain = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2, show_progress=False)
    cached = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2, show_progress=False, prefix_cache_gb=0.5)
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.9, seed=3)):
        assert _chain(cached, PROMPTS, params) == _chain(plain, PROMPTS, params)
    stats = cached.prefix_cache.stats
    # two of three calls extend the previous one; the random model's replies do not always survive
    # decode -> re-encode token for token, so reuse stops early in some rows
    assert stats.reused_tokens > 0.2 * stats.prompt_tokens
    assert cached.stats.generated_tokens == plain.stats.generated_tokens


def test_generate_stage_with_reuse_matches_without(tiny_model_dir):
    constitution = load_constitution("default")
    chunk = [PromptRecord(id=f"p{i}", messages=(("user", p),), kind="red-team" if i % 2 else "ordinary") for i, p in enumerate(PROMPTS)]
    cfg = GenerateConfig(revision_rounds=2, few_shot=0, max_new_tokens=10, critique_max_new_tokens=8)
    plain = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=4, show_progress=False)
    cached = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=4, show_progress=False, prefix_cache_gb=0.5)
    assert revise_chunk(chunk, constitution, cached, cfg, seed=1) == revise_chunk(chunk, constitution, plain, cfg, seed=1)
    assert cached.prefix_cache.stats.reuse_rate > 0.2


def test_rows_sharing_a_worked_example_read_it_once_with_the_same_outputs(tiny_model_dir):
    """With few-shot examples in front of the critique requests, rows of a batch that drew the same
    example share ~200 opening tokens: read once for all of them, the outputs must not change."""
    constitution = load_constitution("default")
    texts = PROMPTS + [p + " Keep it short." for p in PROMPTS[:3]]
    chunk = [PromptRecord(id=f"p{i}", messages=(("user", p),), kind="red-team" if i % 2 else "ordinary") for i, p in enumerate(texts)]
    cfg = GenerateConfig(revision_rounds=1, few_shot=1, max_new_tokens=8, critique_max_new_tokens=8)
    plain = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=8, show_progress=False)
    cached = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=8, show_progress=False, prefix_cache_gb=0.5)
    assert revise_chunk(chunk, constitution, cached, cfg, seed=1) == revise_chunk(chunk, constitution, plain, cfg, seed=1)
    stats = cached.prefix_cache.stats
    assert stats.shared_tokens > 0.1 * stats.prompt_tokens  # 8 rows over 4 examples: repeated openings read once
    assert stats.reused_tokens > 0  # the revision step still extends the critique step's K/V

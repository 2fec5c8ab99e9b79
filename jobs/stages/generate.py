"""Stage `generate`: respond, then (critique -> revise) x N with sampled principles; SFT data out.

All prompts of a chunk advance together: one batched engine call per step, never one prompt at a
time. Principles and few-shot examples are drawn per (seed, prompt, step), so results do not
depend on batch size, chunking or sharding.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import yaml

from ..config import GenerateConfig, StageSpec
from ..constitution import Constitution, sample_principle
from ..critique import clean_critique, clean_revision, critique_request, pick_few_shot, revision_flags, revision_request
from ..data import PromptRecord
from ..engines import Engine, SamplingParams, load_engine
from ..models import resolve_model
from ..manifest import StageManifest
from ..schema import parse_data
from ..sharding import chunks, concat_jsonl, count_rows, shard_bounds, sum_counts, take_slice
from ..store import ArtifactStore
from . import StageResult, log


def _params(cfg: GenerateConfig, seed: int, step: int, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed * 1000 + step)


def revise_chunk(
    chunk: list[PromptRecord], constitution: Constitution, engine: Engine, cfg: GenerateConfig, seed: int
) -> list[dict[str, Any]]:
    """One trace per prompt: the initial response and every critique/revision round."""
    responses = engine.generate([p.conversation for p in chunk], _params(cfg, seed, 0, cfg.max_new_tokens), desc="respond")
    current = list(responses)
    rounds: list[list[dict[str, Any]]] = [[] for _ in chunk]
    for r in range(cfg.revision_rounds):
        step = f"round {r + 1}/{cfg.revision_rounds}"
        principles = [sample_principle(constitution, p.kind, seed, p.id, r) for p in chunk]
        shots = [pick_few_shot(constitution, cfg.few_shot, seed, p.id, r) for p in chunk]
        crit_convs = [
            critique_request(p.conversation, current[i], principles[i], [constitution.few_shot[j] for j in shots[i]], constitution)
            for i, p in enumerate(chunk)
        ]
        critiques = [clean_critique(c) for c in engine.generate(crit_convs, _params(cfg, seed, 2 * r + 1, cfg.critique_max_new_tokens), desc=f"{step} critique")]
        rev_convs = [revision_request(crit_convs[i], critiques[i], principles[i]) for i in range(len(chunk))]
        raw = engine.generate(rev_convs, _params(cfg, seed, 2 * r + 2, cfg.max_new_tokens), desc=f"{step} revise")
        for i in range(len(chunk)):
            revised = clean_revision(raw[i])
            flags = revision_flags(current[i], revised, critiques[i])
            rounds[i].append({
                "principle": principles[i].name,
                "few_shot": shots[i],
                "critique": critiques[i],
                "raw_revision": raw[i],
                "revision": revised,
                **flags,
            })
            if not (flags["empty"] or flags["copies_critique"]):  # unusable: keep the previous response
                current[i] = revised
    return [
        {"id": p.id, "kind": p.kind, "messages": p.conversation, "initial": responses[i], "rounds": rounds[i], "final": current[i]}
        for i, p in enumerate(chunk)
    ]


def sft_row(trace: dict[str, Any]) -> dict[str, Any]:
    return {"messages": trace["messages"] + [{"role": "assistant", "content": trace["final"]}]}


def run(spec: StageSpec, store: ArtifactStore, engine: Engine | None = None, shard: tuple[int, int] = (0, 1)) -> StageResult:
    cfg = parse_data(GenerateConfig, spec.params, f"{spec.spec_key}:params")
    constitution = parse_data(Constitution, yaml.safe_load(store.read_text(spec.inputs["constitution"])), spec.inputs["constitution"])
    total = count_rows(store, spec.inputs["prompts"])
    lo, hi = shard_bounds(total, *shard)
    prompts = (PromptRecord.from_row(r) for r in take_slice(store.iter_jsonl(spec.inputs["prompts"]), lo, hi))
    timings: dict[str, float] = {}
    if engine is None:
        t = time.perf_counter()
        engine = load_engine(spec.engine, resolve_model(spec.model, store))
        timings["model_load_s"] = time.perf_counter() - t
    n = hi - lo
    where = f" (rows {lo}..{hi - 1} of {total})" if shard[1] > 1 else ""
    log("generate", f"{n} prompts{where} x {cfg.revision_rounds} revision rounds, constitution {constitution.name!r}, model {spec.model}")

    counts: Counter = Counter()
    principle_use: Counter = Counter()
    sft_key, traces_key = f"{spec.output}/sft.jsonl", f"{spec.output}/traces.jsonl"
    tokens0, seconds0 = engine.stats.generated_tokens, engine.stats.seconds
    done = 0
    with store.open_writer(sft_key) as sft, store.open_writer(traces_key) as traces:
        for c, chunk in enumerate(chunks(prompts, cfg.chunk_size)):
            for trace in revise_chunk(chunk, constitution, engine, cfg, spec.seed):
                traces.write(json.dumps(trace, ensure_ascii=False) + "\n")
                sft.write(json.dumps(sft_row(trace), ensure_ascii=False) + "\n")
                counts[f"kind_{trace['kind']}"] += 1
                counts["final_differs_from_initial"] += trace["final"] != trace["initial"]
                for rd in trace["rounds"]:
                    principle_use[rd["principle"]] += 1
                    counts["revisions_empty"] += rd["empty"]
                    counts["revisions_unchanged"] += rd["unchanged"]
                    counts["revisions_copy_critique"] += rd["copies_critique"]
            done += len(chunk)
            rate = (engine.stats.generated_tokens - tokens0) / max(engine.stats.seconds - seconds0, 1e-9)
            log("generate", f"chunk {c + 1}/{-(-n // cfg.chunk_size)}: {done}/{n} prompts, {rate:.0f} tok/s")
    generated = engine.stats.generated_tokens - tokens0
    gen_seconds = engine.stats.seconds - seconds0
    timings.update({f"{k}_s": v for k, v in engine.stats.per_step.items()})
    timings["engine_s"] = gen_seconds
    out_counts = {
        "prompts": n,
        "revisions": n * cfg.revision_rounds,
        **dict(counts),
        "principles": dict(sorted(principle_use.items())),
        "generated_tokens": generated,
    }
    out_counts = with_rates(out_counts, cfg, gen_seconds)
    log("generate", f"{generated} tokens in {gen_seconds:.1f}s ({out_counts['tokens_per_second']} tok/s); "
        f"revisions: {counts['revisions_empty']} empty, {counts['revisions_unchanged']} unchanged, "
        f"{counts['revisions_copy_critique']} copied the critique")
    return StageResult(outputs=[sft_key, traces_key], counts=out_counts, timings=timings)


def with_rates(counts: dict[str, Any], cfg: GenerateConfig, engine_seconds: float) -> dict[str, Any]:
    """The non-additive figures, recomputed after shards' counters are summed."""
    rate = round(counts["generated_tokens"] / engine_seconds, 1) if engine_seconds else 0.0
    return {**counts, "revision_rounds": cfg.revision_rounds, "tokens_per_second": rate}


def merge(spec: StageSpec, store: ArtifactStore, parts: list[StageSpec], manifests: list[StageManifest]) -> StageResult:
    """Shards hold contiguous prompt slices: concatenated in shard order they are the unsharded output."""
    cfg = parse_data(GenerateConfig, spec.params, f"{spec.spec_key}:params")
    outputs = []
    for name in ("sft.jsonl", "traces.jsonl"):
        outputs.append(f"{spec.output}/{name}")
        concat_jsonl(store, [f"{p.output}/{name}" for p in parts], outputs[-1])
    additive = sum_counts([{k: v for k, v in m.counts.items() if k not in ("revision_rounds", "tokens_per_second")} for m in manifests])
    engine_seconds = sum(m.timings.get("engine_s", 0.0) for m in manifests)
    return StageResult(outputs=outputs, counts=with_rates(additive, cfg, engine_seconds))

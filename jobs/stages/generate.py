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
from ..critique import (
    COPY_SIMILARITY,
    choose_revision,
    clean_critique,
    clean_revision,
    critique_request,
    first_sentences,
    join_prefill,
    pick_few_shot,
    pick_prefill,
    revision_flags,
    revision_request,
    similarity,
)
from ..data import PromptRecord
from ..engines import Engine, SamplingParams, load_engine
from ..models import resolve_model
from ..manifest import StageManifest
from ..schema import parse_data
from ..sharding import chunks, concat_jsonl, count_rows, shard_bounds, sum_counts, take_slice
from ..store import ArtifactStore
from ..training_data import taught_refusal
from . import StageResult, log


def _params(cfg: GenerateConfig, seed: int, step: int, max_new_tokens: int, temperature: float | None = None) -> SamplingParams:
    t = cfg.temperature if temperature is None else temperature
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=t, top_p=cfg.top_p, seed=seed * 1000 + step)


def _candidate_key(prompt_id: str, j: int) -> str:
    """Candidate 0 draws as the one-candidate loop does, so `best_of: 1` reproduces it exactly."""
    return prompt_id if j == 0 else f"{prompt_id}#candidate{j}"


def revise_chunk(
    chunk: list[PromptRecord], constitution: Constitution, engine: Engine, cfg: GenerateConfig, seed: int
) -> list[dict[str, Any]]:
    """One trace per prompt: the initial response and every critique/revision round.

    Each round builds `best_of` candidates per prompt (own principle draw, worked examples, critique
    and revision) in one batched call per step; `choose_revision` keeps one or none.
    """
    responses = engine.generate([p.conversation for p in chunk], _params(cfg, seed, 0, cfg.max_new_tokens), desc="respond")
    current = list(responses)
    rounds: list[list[dict[str, Any]]] = [[] for _ in chunk]
    revised_idx = [i for i, p in enumerate(chunk) if cfg.revise == "all" or p.kind == "red-team"]
    temp = cfg.candidate_temperature if cfg.best_of > 1 else None
    for r in range(cfg.revision_rounds):
        step = f"round {r + 1}/{cfg.revision_rounds}"
        slots = [(i, j) for i in revised_idx for j in range(cfg.best_of)]  # prompt-major: candidates of a prompt are adjacent
        principles, shots, crit_convs = [], [], []
        for i, j in slots:
            p = chunk[i]
            principle = sample_principle(constitution, p.kind, seed, _candidate_key(p.id, j), r)
            shot = pick_few_shot(constitution, cfg.few_shot, seed, _candidate_key(p.id, j), r, principle if cfg.few_shot_match else None)
            principles.append(principle)
            shots.append(shot)
            crit_convs.append(critique_request(p.conversation, current[i], principle, [constitution.few_shot[k] for k in shot], constitution))
        if not slots:
            break
        critiques = [clean_critique(c) for c in engine.generate(crit_convs, _params(cfg, seed, 2 * r + 1, cfg.critique_max_new_tokens, temp), desc=f"{step} critique")]
        prefills = [pick_prefill(principles[k], seed, _candidate_key(chunk[i].id, j), r) for k, (i, j) in enumerate(slots)]
        rev_convs = [revision_request(crit_convs[k], critiques[k], principles[k], prefills[k]) for k in range(len(slots))]
        raw = engine.generate(rev_convs, _params(cfg, seed, 2 * r + 2, cfg.revision_max_new_tokens or cfg.max_new_tokens, temp), desc=f"{step} revise")
        by_prompt: dict[int, list[dict[str, Any]]] = {}
        for k, (i, j) in enumerate(slots):
            raw[k] = join_prefill(prefills[k], raw[k])
            revised = first_sentences(clean_revision(raw[k]), cfg.max_sentences)
            examples = [constitution.few_shot[e].revision for e in shots[k]]
            by_prompt.setdefault(i, []).append({
                "principle": principles[k].name,
                "few_shot": shots[k],
                "critique": critiques[k],
                "raw_revision": raw[k],
                "revision": revised,
                **revision_flags(current[i], revised, critiques[k]),
                "copies_example": bool(revised.strip()) and any(similarity(revised, e) >= COPY_SIMILARITY for e in examples),
            })
        for i, cands in by_prompt.items():
            pick = choose_revision(chunk[i].kind, chunk[i].text, cands, cfg.verifier)
            record = dict(cands[0] if pick is None else cands[pick])
            record["kept"] = pick is not None
            if cfg.best_of > 1:
                record["candidate"] = pick
                record["candidates"] = [{k: c[k] for k in ("principle", "revision", "empty", "unchanged", "copies_critique", "copies_example")}
                                        for c in cands]
            rounds[i].append(record)
            if pick is not None:  # otherwise no candidate was usable (or none passed the verifier): keep the previous response
                current[i] = cands[pick]["revision"]
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
                    counts["revisions"] += 1
                    counts["revisions_empty"] += rd["empty"]
                    counts["revisions_unchanged"] += rd["unchanged"]
                    counts["revisions_copy_critique"] += rd["copies_critique"]
                    counts["revisions_copy_example"] += rd.get("copies_example", False)
                    counts["revisions_kept"] += rd.get("kept", True)
                    counts["candidates"] += len(rd.get("candidates", [rd]))
                if trace["kind"] == "red-team":
                    counts["red_team_final_refusals"] += taught_refusal(trace)
            done += len(chunk)
            rate = (engine.stats.generated_tokens - tokens0) / max(engine.stats.seconds - seconds0, 1e-9)
            log("generate", f"chunk {c + 1}/{-(-n // cfg.chunk_size)}: {done}/{n} prompts, {rate:.0f} tok/s")
    generated = engine.stats.generated_tokens - tokens0
    gen_seconds = engine.stats.seconds - seconds0
    timings.update({f"{k}_s": v for k, v in engine.stats.per_step.items()})
    timings["engine_s"] = gen_seconds
    out_counts = {
        "prompts": n,
        "revisions": 0,
        **dict(counts),
        "principles": dict(sorted(principle_use.items())),
        "generated_tokens": generated,
    }
    out_counts = with_rates(out_counts, cfg, gen_seconds)
    log("generate", f"{generated} tokens in {gen_seconds:.1f}s ({out_counts['tokens_per_second']} tok/s); "
        f"revisions: {counts['revisions_empty']} empty, {counts['revisions_unchanged']} unchanged, "
        f"{counts['revisions_copy_critique']} copied the critique, {counts['revisions_copy_example']} a worked example; "
        f"{counts['revisions_kept']} kept (verifier {cfg.verifier}, best of {cfg.best_of}); "
        f"{counts['red_team_final_refusals']} red-team finals are revised refusals")
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

"""Stage `judge` (RLAIF): compare response pairs against a principle, keep confident preferences.

Pairs are (final revision vs initial response) and optionally k sampled responses compared
pairwise. The judge reads each comparison in both orders, and its preference comes from the
log-probabilities of the option labels, never from sampled text. Ordinary prompts may also get a
synthetic pair (their helpful answer over a needless refusal) so DPO does not learn to refuse all.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from typing import Any

import yaml

from ..config import JudgeConfig, StageSpec
from ..constitution import Constitution, sample_principle
from ..critique import first_sentences, join_prefill
from ..engines import Engine, SamplingParams, load_engine
from ..judging import ANSWER_PREFIX, LABELS, comparison_messages, verdict
from ..models import resolve_model
from ..refusal import is_refusal
from ..manifest import StageManifest
from ..schema import parse_data
from ..sharding import chunks, concat_jsonl, count_rows, shard_bounds, sum_counts, take_slice
from ..store import ArtifactStore
from ..training_data import taught_refusal
from . import StageResult, log

# Written for cai-jobs: what a needlessly cautious assistant says to a harmless request.
NEEDLESS_REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that. Is there something else I can help you with?",
    "I'm not able to help with this, as it could be unsafe.",
    "Sorry, I won't be able to provide that information.",
    "I cannot help with that. Please consult a professional.",
)
JUDGE_STEP = 1000  # principle draws for judging use their own step, apart from revision rounds
CHUNK = 512  # traces judged per batch of engine calls: bounded memory for any number of prompts


def candidate_pairs(trace: dict[str, Any], cfg: JudgeConfig, samples: list[str], constitution: Constitution, seed: int) -> list[dict[str, Any]]:
    """The pairs to judge for one prompt, each a dict with x, y, principle and source."""
    pairs = []
    if cfg.pairs in ("revision", "both") and trace["final"].strip() and trace["final"] != trace["initial"]:
        last = trace["rounds"][-1]["principle"] if trace["rounds"] else None
        principle = constitution.principle(last) if last else sample_principle(constitution, trace["kind"], seed, trace["id"], JUDGE_STEP)
        pairs.append({"x": trace["final"], "y": trace["initial"], "principle": principle, "source": "revision"})
    if cfg.pairs in ("sampled", "both"):
        for n, (i, j) in enumerate(itertools.combinations(range(len(samples)), 2)):
            if samples[i].strip() and samples[j].strip() and samples[i] != samples[j]:
                principle = sample_principle(constitution, trace["kind"], seed, trace["id"], JUDGE_STEP + 1 + n)
                pairs.append({"x": samples[i], "y": samples[j], "principle": principle, "source": "sampled"})
    return pairs


def helpful_answer(trace: dict[str, Any]) -> str | None:
    """An ordinary prompt's answer that does not refuse (the first answer, else the revision)."""
    if trace["kind"] != "ordinary":
        return None
    return next((t for t in (trace["initial"], trace["final"]) if t.strip() and not is_refusal(t)), None)


def helpful_pair(trace: dict[str, Any], seed: int, refusal: str | None = None) -> dict[str, Any] | None:
    """Ordinary prompt with a non-refusing answer -> (that answer, a needless refusal: `refusal` when
    given and it is one, else a fixed sentence)."""
    answer = helpful_answer(trace)
    if answer is None:
        return None
    if not refusal or not is_refusal(refusal):
        refusal = random.Random(f"refusal:{seed}:{trace['id']}").choice(NEEDLESS_REFUSALS)
    return {"x": answer, "y": refusal, "source": "helpful"}


def refusal_openings_of(constitution: Constitution) -> list[str]:
    """The refusal openings the constitution's revisions start from (`revision_prefill`), in order."""
    return list(dict.fromkeys(o for p in constitution.principles for o in p.revision_prefill))


def policy_refusals(traces: list[dict], constitution: Constitution, policy: Engine, seed: int) -> list[str | None]:
    """For each ordinary trace with a helpful answer, the policy's own needless refusal: it continues one
    of the constitution's refusal openings for that harmless prompt (greedy, its first two sentences)."""
    openings = refusal_openings_of(constitution)
    want = [i for i, tr in enumerate(traces) if openings and helpful_answer(tr) is not None]
    out: list[str | None] = [None] * len(traces)
    if not want:
        return out
    starts = [random.Random(f"needless:{seed}:{traces[i]['id']}").choice(openings) for i in want]
    convs = [[*traces[i]["messages"], {"role": "assistant", "content": start}] for i, start in zip(want, starts)]
    texts = policy.generate(convs, SamplingParams(max_new_tokens=40, temperature=0.0, seed=seed), desc="needless refusals")
    for i, start, text in zip(want, starts, texts):
        out[i] = first_sentences(join_prefill(start, text), 2)
    return out


def verified_pair(trace: dict[str, Any]) -> dict[str, Any] | None:
    """Red-team prompt whose revision opens with a refusal and whose first answer does not ->
    (revision, first answer): a preference the refusal detector vouches for, whatever the judge says."""
    if not taught_refusal(trace) or is_refusal(trace["initial"]):  # the rule SFT's targets follow
        return None
    return {"x": trace["final"], "y": trace["initial"], "source": "verified"}


def pref_row(trace: dict[str, Any], chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": trace["id"],
        "prompt": trace["messages"],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **extra,
    }


def judge_pairs(engine: Engine, traces: list[dict], pairs: list[tuple[int, dict]]) -> list:
    """Both orders of every pair in one batched call: [x-first..., x-second...]."""
    first = [comparison_messages(traces[t]["messages"], p["x"], p["y"], p["principle"]) for t, p in pairs]
    second = [comparison_messages(traces[t]["messages"], p["y"], p["x"], p["principle"]) for t, p in pairs]
    scores = engine.option_logprobs(first + second, ANSWER_PREFIX, LABELS, desc="judge (both orders)")
    n = len(pairs)
    return [verdict(tuple(scores[i]), tuple(scores[n + i])) for i in range(n)]


def judge_chunk(traces: list[dict], cfg: JudgeConfig, constitution: Constitution, policy: Engine, judge: Engine,
                seed: int, counts: Counter) -> list[dict[str, Any]]:
    """Preference rows for a chunk, trace by trace (judged pairs, then the helpful pair), so the row
    order does not depend on how traces are chunked or sharded."""
    samples: list[list[str]] = [[] for _ in traces]
    if cfg.pairs in ("sampled", "both"):
        convs = [tr["messages"] for tr in traces for _ in range(cfg.samples)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature, seed=seed * 1000 + 999)
        flat = policy.generate(convs, params, desc=f"sample {cfg.samples} per prompt")
        samples = [flat[i * cfg.samples : (i + 1) * cfg.samples] for i in range(len(traces))]
    judged = [(i, p) for i, tr in enumerate(traces) for p in candidate_pairs(tr, cfg, samples[i], constitution, seed)]
    verdicts = judge_pairs(judge, traces, judged) if judged else []
    per_trace: list[list[dict[str, Any]]] = [[] for _ in traces]
    for (i, pair), v in zip(judged, verdicts):
        counts[f"pairs_{pair['source']}"] += 1
        counts["order_agreements"] += v.order_agreement
        if pair["source"] == "revision":
            counts["revision_wins"] += v.p_x > 0.5
        if v.margin < cfg.min_margin:
            counts["dropped_low_margin"] += 1
            continue
        chosen, rejected, p = (pair["x"], pair["y"], v.p_x) if v.p_x > 0.5 else (pair["y"], pair["x"], 1 - v.p_x)
        per_trace[i].append(pref_row(traces[i], chosen, rejected, principle=pair["principle"].name, p_chosen=round(p, 4),
                                     order_agreement=v.order_agreement, margin=round(v.margin, 4), source=pair["source"]))
    if cfg.helpful_pairs:
        own = policy_refusals(traces, constitution, policy, seed) if cfg.helpful_rejected == "policy" else [None] * len(traces)
        for i, tr in enumerate(traces):
            pair = helpful_pair(tr, seed, own[i])
            counts["helpful_rejected_by_policy"] += bool(pair and own[i] and pair["y"] == own[i])
            if pair:
                counts["pairs_helpful"] += 1
                per_trace[i].append(pref_row(tr, pair["x"], pair["y"], principle="helpful-by-construction", p_chosen=None,
                                             order_agreement=None, margin=None, source="helpful"))
    if cfg.verified_pairs:
        for i, tr in enumerate(traces):
            pair = verified_pair(tr)
            if pair:
                counts["pairs_verified"] += 1
                per_trace[i].append(pref_row(tr, pair["x"], pair["y"], principle="refusal-detector", p_chosen=None,
                                             order_agreement=None, margin=None, source="verified"))
    counts["pairs_judged"] += len(judged)
    return [row for rows in per_trace for row in rows]


def summarize(counts: dict[str, Any], prompts: int, kept: int, judge_ref: str, min_margin: float) -> dict[str, Any]:
    """summary.json from additive counters (so shards' counters can be summed first)."""
    n_judged = counts.get("pairs_judged", 0)
    return {
        "judge_model": judge_ref,
        "prompts": prompts,
        "pairs_judged": n_judged,
        "pairs_kept": kept,
        "pairs_dropped_low_margin": counts.get("dropped_low_margin", 0),
        "pairs_by_source": {k[len("pairs_"):]: v for k, v in sorted(counts.items()) if k.startswith("pairs_") and k != "pairs_judged"},
        "order_agreements": counts.get("order_agreements", 0),
        "revision_wins": counts.get("revision_wins", 0),
        "position_consistency_rate": round(counts.get("order_agreements", 0) / n_judged, 4) if n_judged else None,
        "revision_win_rate": round(counts.get("revision_wins", 0) / counts["pairs_revision"], 4) if counts.get("pairs_revision") else None,
        "min_margin": min_margin,
        "helpful_rejected_by_policy": counts.get("helpful_rejected_by_policy", 0),
    }


def run(spec: StageSpec, store: ArtifactStore, engine: Engine | None = None, shard: tuple[int, int] = (0, 1)) -> StageResult:
    cfg = parse_data(JudgeConfig, spec.params, f"{spec.spec_key}:params")
    constitution = parse_data(Constitution, yaml.safe_load(store.read_text(spec.inputs["constitution"])), spec.inputs["constitution"])
    lo, hi = shard_bounds(count_rows(store, spec.inputs["traces"]), *shard)
    traces = take_slice(store.iter_jsonl(spec.inputs["traces"]), lo, hi)
    timings: dict[str, float] = {}
    judge_ref = cfg.model or spec.model
    t = time.perf_counter()
    policy = engine or load_engine(spec.engine, resolve_model(spec.model, store))
    judge = engine or (policy if judge_ref == spec.model else load_engine(spec.engine, resolve_model(judge_ref, store)))
    timings["model_load_s"] = time.perf_counter() - t
    log("judge", f"{hi - lo} prompts, pairs={cfg.pairs}, judge {judge_ref}")

    counts: Counter = Counter()
    prefs_key, summary_key = f"{spec.output}/prefs.jsonl", f"{spec.output}/summary.json"
    kept = 0
    t = time.perf_counter()
    with store.open_writer(prefs_key) as out:
        for chunk in chunks(traces, CHUNK):
            for row in judge_chunk(chunk, cfg, constitution, policy, judge, spec.seed, counts):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                kept += 1
    timings["judge_s"] = time.perf_counter() - t
    summary = summarize(counts, hi - lo, kept, judge_ref, cfg.min_margin)
    store.write_json(summary_key, summary)
    log("judge", f"{summary['pairs_judged']} pairs judged, {kept} kept ({summary['pairs_dropped_low_margin']} below margin, "
        f"{counts['pairs_helpful']} helpful pairs); position consistency {summary['position_consistency_rate']}, "
        f"revision won {summary['revision_win_rate']}")
    return StageResult(outputs=[prefs_key, summary_key], counts=summary, timings=timings)


def merge(spec: StageSpec, store: ArtifactStore, parts: list[StageSpec], manifests: list[StageManifest]) -> StageResult:
    cfg = parse_data(JudgeConfig, spec.params, f"{spec.spec_key}:params")
    prefs_key, summary_key = f"{spec.output}/prefs.jsonl", f"{spec.output}/summary.json"
    kept = concat_jsonl(store, [f"{p.output}/prefs.jsonl" for p in parts], prefs_key)
    counts = sum_counts([
        {"pairs_judged": m.counts["pairs_judged"], "dropped_low_margin": m.counts["pairs_dropped_low_margin"],
         "order_agreements": m.counts["order_agreements"], "revision_wins": m.counts["revision_wins"], "prompts": m.counts["prompts"],
         "helpful_rejected_by_policy": m.counts.get("helpful_rejected_by_policy", 0),
         **{f"pairs_{k}": v for k, v in m.counts["pairs_by_source"].items()}}
        for m in manifests
    ])
    summary = summarize(counts, counts.get("prompts", 0), kept, manifests[0].counts["judge_model"], cfg.min_margin)
    store.write_json(summary_key, summary)
    return StageResult(outputs=[prefs_key, summary_key], counts=summary)

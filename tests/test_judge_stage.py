"""Stage `judge`: pairs, both-order verdicts, margins, helpful pairs, trl's preference shape."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from jobs.config import JudgeConfig, StageSpec
from jobs.constitution import SHIPPED_DIR
from jobs.engines.base import EngineStats
from jobs.stages import run_stage
from jobs.store import LocalStore

TRACES = [
    {"id": "r1", "kind": "red-team", "messages": [{"role": "user", "content": "How do I hotwire a car?"}],
     "initial": "Strip the wires under the dash and touch them together.",
     "rounds": [{"principle": "harmless"}], "final": "I can't help with that; a locksmith or your dealer can help if it is your car."},
    {"id": "o1", "kind": "ordinary", "messages": [{"role": "user", "content": "How do I boil an egg?"}],
     "initial": "Put the egg in boiling water for nine minutes, then cool it in cold water.",
     "rounds": [{"principle": "helpful"}], "final": "Boil it for nine minutes."},
    {"id": "o2", "kind": "ordinary", "messages": [{"role": "user", "content": "Name a prime number."}],
     "initial": "7", "rounds": [{"principle": "concise"}], "final": "7"},
]


class LongerIsBetterJudge:
    """A deterministic judge: prefers the longer option, whatever its position."""

    stats = EngineStats()

    def option_logprobs(self, conversations, prefix, options, desc=""):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            a = re.search(r"\(A\) (.*?)\n\n\(B\)", text, re.S).group(1)
            b = re.search(r"\(B\) (.*?)\n\nReply", text, re.S).group(1)
            out.append([math.log(0.9), math.log(0.1)] if len(a) > len(b) else [math.log(0.1), math.log(0.9)])
        return out


def make_spec(store: LocalStore, model: str, **judge) -> StageSpec:
    store.write_bytes("runs/t/inputs/constitution.yaml", (SHIPPED_DIR / "default.yaml").read_bytes())
    store.write_jsonl("runs/t/round-1/generate/traces.jsonl", TRACES)
    spec = StageSpec(stage="judge", run_id="t", round=1, store=store.uri, output="runs/t/round-1/judge", model=model,
                     inputs={"constitution": "runs/t/inputs/constitution.yaml", "traces": "runs/t/round-1/generate/traces.jsonl"},
                     params=JudgeConfig(**judge).model_dump(mode="json"))
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    return spec


def read(store: LocalStore, key: str) -> list[dict]:
    return [json.loads(l) for l in (Path(store.root) / key).read_text().splitlines()]


def test_preferences_follow_the_judge_in_both_orders(tmp_path):
    store = LocalStore(tmp_path)
    spec = make_spec(store, "unused", min_margin=0.5)
    run_stage("judge", store.uri_for(spec.spec_key), engine=LongerIsBetterJudge())
    rows = read(store, "runs/t/round-1/judge/prefs.jsonl")
    judged = [r for r in rows if r["source"] == "revision"]
    # r1: final (longer) wins; o1: initial (longer) wins; o2: final == initial, not a pair
    assert {r["id"]: r["chosen"][0]["content"] for r in judged} == {"r1": TRACES[0]["final"], "o1": TRACES[1]["initial"]}
    for r in judged:
        assert r["p_chosen"] == pytest.approx(0.9) and r["order_agreement"] is True and r["margin"] == pytest.approx(0.8)
        assert r["prompt"] == next(t["messages"] for t in TRACES if t["id"] == r["id"])
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
    helpful = [r for r in rows if r["source"] == "helpful"]
    assert {r["id"] for r in helpful} == {"o1", "o2"}  # ordinary prompts only
    for r in helpful:
        assert r["rejected"][0]["content"].startswith(("I'm sorry", "I can't", "I'm not able", "Sorry", "I cannot"))
    summary = json.loads((Path(store.root) / "runs/t/round-1/judge/summary.json").read_text())
    assert summary["pairs_judged"] == 2 and summary["position_consistency_rate"] == 1.0
    assert summary["revision_win_rate"] == 0.5 and summary["pairs_kept"] == 4


def test_a_torchrun_worker_computes_the_stage_but_writes_nothing(tmp_path, monkeypatch):
    """Over several pods every process runs the stage (vLLM's external launcher); rank 0 alone writes."""
    store = LocalStore(tmp_path)
    spec = make_spec(store, "unused", min_margin=0.5)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_stage("judge", store.uri_for(spec.spec_key), engine=LongerIsBetterJudge()) is True
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    monkeypatch.setenv("RANK", "0")
    assert run_stage("judge", store.uri_for(spec.spec_key), engine=LongerIsBetterJudge()) is True
    assert len(read(store, "runs/t/round-1/judge/prefs.jsonl")) == 4 and (tmp_path / "runs/t/round-1/judge/stage.json").exists()


def test_low_margin_pairs_are_dropped_and_counted(tmp_path, tiny_engine, tiny_model_dir):
    store = LocalStore(tmp_path)
    spec = make_spec(store, str(tiny_model_dir), min_margin=0.999, helpful_pairs=False)
    run_stage("judge", store.uri_for(spec.spec_key), engine=tiny_engine)
    summary = json.loads((Path(store.root) / "runs/t/round-1/judge/summary.json").read_text())
    assert summary["pairs_judged"] == 2
    assert summary["pairs_dropped_low_margin"] + summary["pairs_kept"] == 2
    assert 0.0 <= summary["position_consistency_rate"] <= 1.0


def test_sampled_pairs_with_the_real_tiny_model_load_in_datasets(tmp_path, tiny_engine, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    store = LocalStore(tmp_path)
    spec = make_spec(store, str(tiny_model_dir), pairs="both", samples=3, max_new_tokens=6, min_margin=0.0)
    run_stage("judge", store.uri_for(spec.spec_key), engine=tiny_engine)
    summary = json.loads((Path(store.root) / "runs/t/round-1/judge/summary.json").read_text())
    assert summary["pairs_by_source"]["sampled"] >= 1 and summary["pairs_by_source"]["revision"] == 2
    path = Path(store.root) / "runs/t/round-1/judge/prefs.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert {"prompt", "chosen", "rejected", "principle", "p_chosen", "order_agreement"} <= set(ds.column_names)
    assert len(ds) == summary["pairs_kept"]


def test_verified_pairs_need_a_revised_refusal_over_a_compliant_answer():
    from jobs.stages.judge import verified_pair

    def tr(kind: str, initial: str, final: str) -> dict:
        return {"id": "x", "kind": kind, "messages": [{"role": "user", "content": "q"}], "initial": initial, "final": final, "rounds": []}

    good = tr("red-team", "Step one: pick the lock.", "I can't help you pick a lock you don't own; a locksmith can.")
    assert verified_pair(good) == {"x": good["final"], "y": good["initial"], "source": "verified"}
    assert verified_pair(tr("red-team", "Step one.", "Step one.")) is None  # unrevised
    assert verified_pair(tr("red-team", "Step one.", "Step one, carefully.")) is None  # revised, still complies
    assert verified_pair(tr("red-team", "I won't help with that.", "I can't help with that.")) is None  # both refuse
    assert verified_pair(tr("ordinary", "Rice: rinse it.", "I can't help with that.")) is None


class PrefillEchoPolicy(LongerIsBetterJudge):
    """A policy that continues a prefilled refusal with the prompt's own words (and records what it got)."""

    def __init__(self, reply: str = "with {prompt} today. Maybe ask someone else."):
        self.reply, self.seen = reply, []

    def generate(self, conversations, params, desc=""):
        self.seen.extend(conversations)
        return [self.reply.format(prompt=c[0]["content"].rstrip("?").lower()) for c in conversations]


def test_policy_written_needless_refusals_start_from_the_constitutions_openings(tmp_path):
    """helpful_rejected: policy: the rejected answer of a helpful pair is the policy's own refusal of the
    harmless prompt, continued from a refusal opening of the constitution, cut to two sentences."""
    from jobs.constitution import load_constitution

    openings = load_constitution("default").principles[0].revision_prefill
    store = LocalStore(tmp_path)
    spec = make_spec(store, "unused", min_margin=0.5, helpful_rejected="policy")
    policy = PrefillEchoPolicy()
    run_stage("judge", store.uri_for(spec.spec_key), engine=policy)
    helpful = {r["id"]: r for r in read(store, "runs/t/round-1/judge/prefs.jsonl") if r["source"] == "helpful"}
    assert set(helpful) == {"o1", "o2"} and len(policy.seen) == 2
    for conv in policy.seen:  # the harmless prompt, then the opening as a prefilled assistant turn
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"] in openings
    rejected = helpful["o1"]["rejected"][0]["content"]
    assert rejected.startswith(tuple(openings)) and "with how do i boil an egg today." in rejected
    assert rejected.endswith("Maybe ask someone else.")
    summary = json.loads((Path(store.root) / "runs/t/round-1/judge/summary.json").read_text())
    assert summary["helpful_rejected_by_policy"] == 2

    # a "refusal" that is not one after all falls back to the fixed sentences
    from jobs.stages.judge import NEEDLESS_REFUSALS, helpful_pair

    assert helpful_pair(TRACES[1], 0, "Sure, boil it for nine minutes.")["y"] in NEEDLESS_REFUSALS
    assert helpful_pair(TRACES[1], 0, "I can't help you with eggs.")["y"] == "I can't help you with eggs."
    assert helpful_pair(TRACES[0], 0, "I can't help you.") is None  # red-team prompts get no helpful pair


class ShorterIsBetterJudge(LongerIsBetterJudge):
    def __init__(self, during=None):
        self.during = during

    def option_logprobs(self, conversations, prefix, options, desc=""):
        if self.during:
            self.during, during = None, self.during
            during()  # another attempt of the same stage runs to the end meanwhile
        return [[b, a] for a, b in super().option_logprobs(conversations, prefix, options, desc)]


def test_a_losing_attempt_never_overwrites_the_winners_outputs(tmp_path):
    """Attempt B starts, attempt A (a retry that was faster) finishes meanwhile; B's writes are refused,
    it steps back, and A's published prefs, summary and manifest stand."""
    from jobs.manifest import is_complete, manifest_key

    store = LocalStore(tmp_path)
    spec = make_spec(store, "unused", min_margin=0.5)
    uri = store.uri_for(spec.spec_key)
    published = {}

    def winner_finishes():
        assert run_stage("judge", uri, engine=LongerIsBetterJudge()) is True
        published.update({k: store.read_bytes(k) for k in store.list(spec.output)})

    assert run_stage("judge", uri, engine=ShorterIsBetterJudge(during=winner_finishes)) is False  # B: superseded
    assert {k: store.read_bytes(k) for k in store.list(spec.output)} == published
    assert manifest_key(spec) in published and is_complete(store, spec)


def test_outputs_changed_after_the_manifest_make_the_stage_incomplete(tmp_path, monkeypatch):
    import jobs.store
    from jobs.manifest import is_complete

    store = LocalStore(tmp_path)
    spec = make_spec(store, "unused", min_margin=0.5)
    run_stage("judge", store.uri_for(spec.spec_key), engine=LongerIsBetterJudge())
    assert is_complete(store, spec)
    prefs = f"{spec.output}/prefs.jsonl"
    original = store.read_bytes(prefs)
    store.write_bytes(prefs, original.replace(b"nine", b"NINE"))  # same size, other bytes: the hash tells
    assert not is_complete(store, spec)
    store.write_bytes(prefs, original)
    assert is_complete(store, spec)
    monkeypatch.setattr(jobs.store, "CHEAP_HASH_BYTES", 10)  # as for a model's weights: checked by size
    store.write_bytes(prefs, original + b"\n")
    assert not is_complete(store, spec)

"""Stage `train`: which rows SFT and DPO get, and real training runs on the tiny model (SFT, DPO, LoRA, reward)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.config import DPOSection, LoraSection, RewardSection, SFTSection, StageSpec, TrainConfig
from jobs.manifest import manifest_key
from jobs.stages import run_stage
from jobs.store import LocalStore
from jobs.training_data import dpo_rows, judge_trusted, plan_phases, prompt_completion, red_team_verdict, sft_rows, summary


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def trace(i: int, kind: str, initial: str, final: str) -> dict:
    return {"id": f"{kind}-{i}", "kind": kind, "messages": user(f"{kind} question {i}?"), "initial": initial,
            "rounds": [{"principle": "harm", "critique": "c", "revision": final}], "final": final}


TRACES = [
    *(trace(i, "red-team", f"Here is how to do harm {i}.", f"I won't help with harm {i}, but here is a safe option.") for i in range(4)),
    *(trace(i, "ordinary", f"The capital answer is {i}.", f"Cautiously, the answer may be {i}.") for i in range(4)),
    trace(9, "red-team", "Harmful text.", "   "),  # empty revision: no SFT target
]


def pref(i: int, chosen: str, rejected: str, source: str = "revision") -> dict:
    return {"prompt": user(f"question {i}?"), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "principle": "harm", "p_chosen": 0.8,
            "order_agreement": True, "source": source}


PREFS = [
    *(pref(i, f"A careful, safe answer number {i}.", f"A harmful answer number {i}.") for i in range(4)),
    pref(5, "Sure: the answer is 5.", "I'm sorry, I can't help with that.", source="helpful"),
    pref(6, "same", "same"),  # identical answers teach nothing: dropped
]

FAST = dict(epochs=1, batch_size=2, max_length=128)


def fast_config(**kw) -> TrainConfig:
    return TrainConfig(sft=SFTSection(**FAST), dpo=DPOSection(**FAST, learning_rate=1e-4),
                       reward=RewardSection(**FAST), **kw)


def plan_train(root: Path, model_dir: Path, cfg: TrainConfig, traces=TRACES, prefs=PREFS, judge_summary=None) -> tuple[LocalStore, StageSpec]:
    store = LocalStore(root)
    inputs = {"traces": "runs/t/round-1/generate/traces.jsonl"}
    store.write_jsonl(inputs["traces"], traces)
    if prefs is not None:
        inputs["prefs"] = "runs/t/round-1/judge/prefs.jsonl"
        store.write_jsonl(inputs["prefs"], prefs)
    if judge_summary is not None:
        inputs["judge_summary"] = "runs/t/round-1/judge/summary.json"
        store.write_json(inputs["judge_summary"], judge_summary)
    spec = StageSpec(stage="train", run_id="t", round=1, store=str(store.root), output="runs/t/round-1/train",
                     model=str(model_dir), inputs=inputs, params=cfg.model_dump(mode="json"), seed=3)
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    return store, spec


def run_train(root: Path, model_dir: Path, cfg: TrainConfig, **kw) -> tuple[LocalStore, StageSpec, dict]:
    store, spec = plan_train(root, model_dir, cfg, **kw)
    assert run_stage("train", store.uri_for(spec.spec_key)) is True
    return store, spec, store.read_json(manifest_key(spec))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def start_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


# --- pure row logic ----------------------------------------------------------------------------------

def test_sft_rows_use_final_for_red_team_and_initial_for_ordinary():
    rows = sft_rows(TRACES, "initial", seed=0)
    by_prompt = {r["messages"][0]["content"]: r["messages"] for r in rows}
    assert len(rows) == 8  # the empty red-team revision is skipped
    for t in TRACES[:8]:
        msgs = by_prompt[t["messages"][0]["content"]]
        assert msgs[:-1] == t["messages"]
        expected = t["final"] if t["kind"] == "red-team" else t["initial"]
        assert msgs[-1] == {"role": "assistant", "content": expected}
    finals = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in sft_rows(TRACES, "final", seed=0)}
    assert all(finals[t["messages"][0]["content"]] == t["final"] for t in TRACES[:8])
    assert set(rows[0]) == {"messages"}
    assert prompt_completion(rows[0]) == {"prompt": rows[0]["messages"][:-1], "completion": rows[0]["messages"][-1:]}


def test_dpo_rows_keep_only_trl_columns_and_drop_unusable_pairs():
    rows = dpo_rows(PREFS, seed=0)
    assert len(rows) == 5
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(r["chosen"][0]["role"] == "assistant" and r["prompt"][0]["role"] == "user" for r in rows)
    s = summary(TRACES, PREFS)
    assert s["sft_red-team"] == 4 and s["sft_ordinary"] == 4 and s["sft_skipped_empty_red-team"] == 1
    assert s["dpo_by_source"] == {"helpful": 1, "revision": 4} and s["dpo_skipped_unusable"] == 1


def test_rows_are_shuffled_deterministically_and_mix_kinds():
    assert sft_rows(TRACES, seed=1) == sft_rows(TRACES, seed=1)
    assert dpo_rows(PREFS, seed=1) == dpo_rows(PREFS, seed=1)
    assert sft_rows(TRACES, seed=1) != sft_rows(TRACES, seed=2)
    kinds = ["red-team" in r["messages"][0]["content"] for r in sft_rows(TRACES, seed=1)]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # not in input blocks


def test_plan_phases_skips_with_reasons():
    assert plan_phases("sft+dpo", True, True, 5, 3) == (["sft", "dpo"], {})
    run, skipped = plan_phases("sft+dpo", True, True, 5, 0)
    assert run == ["sft"] and "no preference rows" in skipped["dpo"]
    run, skipped = plan_phases("sft+dpo", False, True, 5, 3)
    assert run == ["dpo"] and "disabled" in skipped["sft"]
    assert plan_phases("reward", True, True, 0, 2) == (["reward"], {})
    assert plan_phases("sft", True, True, 0, 2)[0] == []


# --- real training on the tiny model ---------------------------------------------------------------

def test_sft_then_dpo_saves_a_loadable_changed_model_with_metrics(tmp_path, tiny_model_dir, start_weights):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, fast_config())
    model_dir = store.local_dir(f"{spec.output}/model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert changed(start_weights, weights(model))
    assert (model_dir / "model.safetensors").exists() and (model_dir / "generation_config.json").exists()
    assert not (model_dir / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert "<|im_start|>assistant" in tok.apply_chat_template(user("hi"), tokenize=False, add_generation_prompt=True)

    metrics = [json.loads(line) for line in (Path(store.root) / spec.output / "metrics.jsonl").read_text().splitlines()]
    sft = [m for m in metrics if m["phase"] == "sft"]
    dpo = [m for m in metrics if m["phase"] == "dpo"]
    assert len(sft) == 4 and len(dpo) == 3  # 8 rows / batch 2; 5 pairs / batch 2, one step per log
    assert [m["step"] for m in sft] == [1, 2, 3, 4] and all(m["loss"] > 0 for m in sft)
    for m in dpo:
        assert {"loss", "epoch", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(m)
    assert dpo[-1]["rewards/margins"] != 0

    counts = manifest["counts"]
    assert counts["phases_run"] == ["sft", "dpo"] and counts["method"] == "sft+dpo" and counts["lora"] is False
    assert counts["sft_rows"] == 8 and counts["dpo_rows"] == 5 and counts["dpo_reference"] == "sft model"
    assert counts["sft_final_loss"] == sft[-1]["loss"] and counts["dpo_final_loss"] == dpo[-1]["loss"]
    assert counts["sft_tokens_per_s"] > 0
    assert {"sft_s", "dpo_s", "total_s"} <= set(manifest["timings"])
    outputs = set(manifest["outputs"])
    assert f"{spec.output}/metrics.jsonl" in outputs and f"{spec.output}/model/model.safetensors" in outputs
    assert set(store.list(f"{spec.output}/model")) <= outputs

    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert run_stage("train", store.uri_for(spec.spec_key)) is False  # complete: skipped
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_lora_adapters_are_merged_into_a_plain_checkpoint(tmp_path, tiny_model_dir, start_weights):
    from transformers import AutoModelForCausalLM

    cfg = fast_config(lora=LoraSection(enabled=True, r=4, alpha=8))
    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, cfg)
    model_dir = store.local_dir(f"{spec.output}/model")
    assert not (model_dir / "adapter_config.json").exists() and not (model_dir / "adapter_model.safetensors").exists()
    saved = weights(AutoModelForCausalLM.from_pretrained(model_dir))
    assert not any("lora" in k for k in saved)
    assert set(saved) == set(start_weights)
    assert any("proj" in k for k in changed(start_weights, saved))  # the merged adapters moved the linear layers
    assert manifest["counts"]["lora"] is True and manifest["counts"]["phases_run"] == ["sft", "dpo"]


def test_reward_method_saves_a_sequence_classifier(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, fast_config(method="reward"))
    model_dir = store.local_dir(f"{spec.output}/model")
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert rm.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(user("hi") + [{"role": "assistant", "content": "hello"}], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert rm(**ids).logits.shape == (1, 1)
    counts = manifest["counts"]
    assert counts["phases_run"] == ["reward"] and "reward model" in counts["model_kind"]
    metrics = (Path(store.root) / spec.output / "metrics.jsonl").read_text().splitlines()
    assert metrics and all(json.loads(m)["phase"] == "reward" for m in metrics)


def test_no_preference_rows_skips_dpo_with_a_reason_and_still_trains_sft(tmp_path, tiny_model_dir, start_weights):
    from transformers import AutoModelForCausalLM

    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, fast_config(), prefs=[pref(1, "x", "x")])
    counts = manifest["counts"]
    assert counts["phases_run"] == ["sft"] and counts["dpo_rows"] == 0
    assert "no preference rows" in counts["phases_skipped"]["dpo"]
    assert "dpo_s" not in manifest["timings"] and "sft_s" in manifest["timings"]
    model = AutoModelForCausalLM.from_pretrained(store.local_dir(f"{spec.output}/model"))
    assert changed(start_weights, weights(model))
    metrics = (Path(store.root) / spec.output / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(m)["phase"] for m in metrics} == {"sft"}


def test_red_team_targets_are_revised_refusals_only():
    unrevised = trace(20, "red-team", "Step one: buy the parts.", "Step one: buy the parts.")
    revised_comply = trace(21, "red-team", "Step one: buy the parts.", "Step one: buy the parts carefully.")
    refusal = trace(22, "red-team", "Step one: buy the parts.", "I can't help you build that, but a local club can teach safe shooting.")
    traces = [unrevised, revised_comply, refusal]
    assert [red_team_verdict(t) for t in traces] == ["unrevised", "not_a_refusal", None]
    assert [r["messages"][-1]["content"] for r in sft_rows(traces)] == [refusal["final"]]
    assert len(sft_rows(traces, red_team_target="revised")) == 2
    assert len(sft_rows(traces, red_team_target="final")) == 3  # the old behaviour, compliance included
    s = summary(traces, [])
    assert s["sft_red-team"] == 1 and s["sft_skipped_unrevised_red-team"] == 1 and s["sft_skipped_not_a_refusal_red-team"] == 1


def test_a_guessing_judge_trains_nothing():
    guessing = {"pairs_judged": 57, "order_agreements": 4}
    trusted = {"pairs_judged": 57, "order_agreements": 50}
    ok, why = judge_trusted(guessing, 0.6)
    assert not ok and "4/57" in why and "guessing" in why
    assert judge_trusted(trusted, 0.6)[0]
    assert judge_trusted({"pairs_judged": 5, "order_agreements": 5}, 0.6)[0] is False  # 5/5: too few to tell
    assert judge_trusted(guessing, 0.0)[0] and judge_trusted(None, 0.6)[0]
    prefs = [*PREFS, pref(7, "I can't help with that harm.", "Here is the harm.", source="verified")]
    kept = dpo_rows(prefs, seed=0, judged=False)
    assert len(kept) == 2  # helpful + verified: built by construction, not by the judge
    s = summary(TRACES, prefs, judged=False)
    assert s["dpo_by_source"] == {"helpful": 1, "verified": 1} and s["dpo_skipped_untrusted_judge"] == 4


def test_the_stage_drops_a_guessing_judges_pairs(tmp_path, tiny_model_dir):
    prefs = [*PREFS, pref(7, "I can't help with that harm.", "Here is the harm.", source="verified")]
    _, _, manifest = run_train(tmp_path / "store", tiny_model_dir, fast_config(method="dpo"), prefs=prefs,
                               judge_summary={"pairs_judged": 57, "order_agreements": 4})
    c = manifest["counts"]
    assert c["judge_trusted"] is False and "guessing" in c["judge_trust"]
    assert c["dpo_rows"] == 2 and c["dpo_by_source"] == {"helpful": 1, "verified": 1} and c["dpo_skipped_untrusted_judge"] == 4


def test_precomputed_reference_trains_the_same_model_without_a_second_copy(tmp_path, tiny_model_dir, start_weights):
    """precompute_ref_log_probs scores every pair with the start model once, before step 1, and frees it:
    the same DPO update as a loaded reference model, with one model in memory."""
    from transformers import AutoModelForCausalLM

    def dpo(root: Path, **dpo_kw) -> tuple[dict, dict]:
        cfg = TrainConfig(method="dpo", dpo=DPOSection(**FAST, learning_rate=1e-4, **dpo_kw))
        store, spec, manifest = run_train(root, tiny_model_dir, cfg)
        return weights(AutoModelForCausalLM.from_pretrained(store.local_dir(f"{spec.output}/model"))), manifest["counts"]

    loaded, loaded_counts = dpo(tmp_path / "loaded")
    pre, pre_counts = dpo(tmp_path / "pre", precompute_ref_log_probs=True)
    assert loaded_counts["dpo_reference"] == "start model"
    assert pre_counts["dpo_reference"] == "start model, log-probs precomputed"
    assert changed(start_weights, pre)
    for k in loaded:
        torch.testing.assert_close(pre[k], loaded[k], atol=1e-4, rtol=1e-3)


def test_dpo_loss_mix_with_the_chosen_answers_nll(tmp_path, tiny_model_dir):
    """loss_type [sigmoid, sft] (RPO): trl sums the pair loss and the chosen answer's NLL, weighted."""
    cfg = TrainConfig(method="dpo", dpo=DPOSection(**FAST, learning_rate=1e-4, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))
    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, cfg)
    assert manifest["counts"]["phases_run"] == ["dpo"] and manifest["counts"]["dpo_final_loss"] > 0
    with pytest.raises(ValueError, match="one per loss type"):
        DPOSection(loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def read_scalars(path: Path) -> dict[str, list[float]]:
    """TensorBoard's event file format (TFRecord of Event protos), read with tensorboardX's own proto."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    data = path.read_bytes()
    at = 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append(v.simple_value)
    return out


def test_report_to_tensorboard_puts_event_files_in_the_store_and_progress_has_eta(tmp_path, tiny_model_dir, capfd):
    cfg = TrainConfig(method="dpo", dpo=DPOSection(**FAST, learning_rate=1e-4), report_to=["tensorboard"])
    store, spec, manifest = run_train(tmp_path / "store", tiny_model_dir, cfg)
    events = sorted((tmp_path / "store" / spec.output / "tensorboard" / "dpo").rglob("events.out.tfevents.*"))
    assert events, "no event files"
    scalars = read_scalars(events[0])
    assert len(scalars["train/loss"]) == manifest["counts"]["dpo_steps"] and "train/rewards/margins" in scalars
    assert {f"{spec.output}/tensorboard/dpo/{p.relative_to(tmp_path / 'store' / spec.output / 'tensorboard' / 'dpo')}"
            for p in events} <= set(manifest["outputs"])  # part of the stage's outputs: checked like every artifact
    err = capfd.readouterr().err
    assert "it/s, ETA" in err and "{'loss'" not in err  # our progress lines, not the trainer's raw dicts

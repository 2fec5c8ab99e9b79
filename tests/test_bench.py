"""bench/: the pure parts of each benchmark, and the judge and train scripts end to end on the tiny model.

No timing assertions: figures from a shared CI machine mean nothing. What is checked is that each
script measures the right things, writes its JSON and refuses bad sizes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import common, decode, generate, gpu, judge, overhead, prefix_reuse, train  # noqa: E402
from jobs.constitution import load_constitution  # noqa: E402
from jobs.data import PromptRecord  # noqa: E402
from jobs.judging import verdict  # noqa: E402


# --------------------------------------------------------------------------- common


def test_format_table_aligns_numbers_right_and_text_left():
    out = common.format_table(["side", "n", "vs"], [["seed", 1, "1.00x"], ["ours, batched", 32, "4.08x"], ["gone", None, None]])
    lines = out.splitlines()
    assert lines[0] == "| side          |  n |    vs |"
    assert lines[1] == "|---------------|---:|------:|"
    assert lines[3] == "| ours, batched | 32 | 4.08x |"
    assert lines[4] == "| gone          |  - |     - |"


def test_load_warnings_name_each_disturbance_and_stay_quiet_on_a_quiet_run():
    quiet = {"cpu_busy_before_run": 0.02, "cpu_busy_after_run": 0.05}
    assert common.load_warnings(quiet, {"seed_loop": 0.01, "hf": None}) == []
    busy = {"cpu_busy_before_run": 0.5, "cpu_busy_after_run": None}
    warnings = common.load_warnings(busy, {"seed_loop": 0.42, "hf": 0.05})
    assert warnings == ["the CPUs were 50% busy before the run (other processes)",
                        "other processes used 42% of the CPUs while seed loop ran"]


def test_finish_machine_records_end_load_and_flags_disturbed_runs():
    machine = {"cpu_busy_before_run": 0.9}
    warnings = common.finish_machine(machine, {"logprob": 0.3})
    assert "load_avg_1m_at_end" in machine and "cpu_busy_after_run" in machine
    assert machine["other_cpu_share_during_logprob"] == 0.3
    assert machine["disturbed"] is True and len(warnings) >= 2


def test_other_load_counts_helper_processes_as_own_time():
    with common.OtherLoad([os.getpid()]) as load:
        sum(i * i for i in range(200_000))
    assert load.share is None or 0.0 <= load.share <= 1.0
    assert load._pid_s(os.getpid()) > 0  # this process's own CPU time, read from /proc
    assert load._pid_s(2**22 + 12345) == 0.0  # a pid that does not exist


def test_write_json_atomic_replaces_whole_file_with_normal_mode(tmp_path):
    path = tmp_path / "results" / "x.json"
    common.write_json_atomic(path, {"a": 1})
    common.write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_command_line_is_repo_relative():
    cmd = common.command_line(["--pairs", "8"], "bench/judge.py")
    assert cmd.endswith("--pairs 8")
    assert str(REPO) + os.sep not in cmd.split()[0] or not sys.executable.startswith(str(REPO))


def test_bench_prompts_split_kinds_and_reject_too_many():
    records = common.bench_prompts(5)
    assert [r.kind for r in records].count("red-team") == 2 and len(records) == 5
    with pytest.raises(SystemExit, match="use --prompts <= 300"):  # 2 * min(150 red-team, 228 helpful train prompts)
        common.bench_prompts(1000)


# --------------------------------------------------------------------------- judge


@pytest.mark.parametrize("text, label", [
    ("(A)", "A"), ("B", "B"), ("A.", "A"), ("  (B) because it refuses", "B"), ("**A**", "A"),
    ("(A)\n\nThe best response to this request is:\n\n(B)", "A"),  # the first label wins, as a reader would take it
    ("The better response is (B).", "B"), ("I prefer Response A here.", "A"), ("Option B is safer", "B"), ("B is better.", "B"),
    ("A good answer explains the risk.", None),  # the article "A", not a label
    ("Both are fine.", None), ("", None), ("Absolutely, response AB", None), ("The answer a bit later", None),
])
def test_parse_verdict(text, label):
    assert judge.parse_verdict(text) == label


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", (("user", f"question {i}?"),), "red-team" if i % 2 else "ordinary") for i in range(n)]


def test_build_pairs_alternates_which_side_the_answer_is_on():
    constitution = load_constitution("default")
    traces, pairs = judge.build_pairs(_records(4), [f"answer {i}" for i in range(4)], constitution, seed=0)
    assert [t for t, _ in pairs] == [0, 1, 2, 3]
    assert [p["x"] for _, p in pairs][0::2] == ["answer 0", "answer 2"]
    assert [p["y"] for _, p in pairs][1::2] == ["answer 1", "answer 3"]
    assert all(p["principle"] in constitution.for_kind(traces[t]["kind"]) for t, p in pairs)
    again = judge.build_pairs(_records(4), [f"answer {i}" for i in range(4)], constitution, seed=0)[1]
    assert [p["principle"].name for _, p in again] == [p["principle"].name for _, p in pairs]  # seeded draw


def test_agreement_counts_unparsed_apart_and_measures_position_bias():
    x_wins = verdict((-0.1, -3.0), (-3.0, -0.1))    # x better in both orders
    y_wins = verdict((-3.0, -0.1), (-0.1, -3.0))    # y better in both orders
    first_bias = verdict((-0.1, -3.0), (-0.2, -2.0))  # mostly picks whatever is shown first: orders disagree, p_x 0.55
    res = judge.agreement(["A", "A", None, "A"], [x_wins, y_wins, x_wins, first_bias])
    assert res["text_parsed"] == 3 and res["text_unparsed"] == 1
    assert res["agreement"] == pytest.approx(2 / 3, abs=1e-4)  # x_wins and first_bias pick x as the text did; y_wins does not
    assert res["text_picks_first_shown"] == 1.0
    assert res["logprob_order_agreement"] == 0.75
    assert res["agreement_with_logprob_same_order"] == pytest.approx(2 / 3, abs=1e-4)


def test_judge_args_reject_bad_sizes():
    with pytest.raises(SystemExit):
        judge.parse_args(["--pairs", "1"])
    args = judge.parse_args(["--pairs", "4"])
    assert (args.pairs, args.batch_size, args.verdict_tokens) == (4, judge.QUICK["batch_size"], judge.QUICK["verdict_tokens"])


def test_judge_bench_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "judge.json"
    assert judge.main(["--model", str(tiny_model_dir), "--pairs", "4", "--batch-size", "4", "--answer-tokens", "6",
                       "--verdict-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["pairs"] == 4 and res["model"] == str(tiny_model_dir)
    assert set(res["sides"]) == {"text_sequential", "text_batched", "logprob"}
    assert res["sides"]["logprob"]["forward_passes"] == 8 and res["sides"]["text_sequential"]["forward_passes"] == 4
    assert res["sides"]["logprob"]["generated_tokens"] == 0 and 0 < res["sides"]["text_sequential"]["generated_tokens"] <= 12
    for key in ("text_pairs_s", "text_batched_pairs_s", "logprob_pairs_s"):
        assert res[key] > 0
    assert res["ratio"] == res["ratio_logprob_vs_text"] == pytest.approx(res["logprob_pairs_s"] / res["text_pairs_s"], rel=1e-2)
    agree = res["agreement"]
    assert agree["text_parsed"] + agree["text_unparsed"] == 4
    for key in ("cpu", "cores", "torch", "transformers", "load_avg_1m_at_start", "load_avg_1m_at_end"):
        assert key in res["machine"]
    printed = capsys.readouterr().out
    assert "logprob both orders (judge stage)" in printed and "machine:" in printed and "load:" in printed


# --------------------------------------------------------------------------- generate


def test_generate_args_reject_bad_sizes():
    for bad in (["--prompts", "0"], ["--prompts", "97"], ["--rounds", "0"], ["--baseline-prompts", "40"],
                ["--prompts", "8", "--extrapolate"]):
        with pytest.raises(SystemExit):
            generate.parse_args(bad)
    args = generate.parse_args(["--prompts", "8"])
    assert (args.prompts, args.rounds, args.max_new_tokens, args.baseline_prompts) == (8, 1, 64, 8)


def test_vllm_side_is_skipped_with_a_reason_when_no_vllm_interpreter(monkeypatch, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here: this interpreter is the vLLM side")
    monkeypatch.setenv("CAI_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    python, why = generate.vllm_python()
    assert python is None and "make install-vllm" in why
    assert generate.run_vllm_stage(generate.parse_args([]), []) == (None, why)


def test_generate_bench_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "generate.json"
    assert generate.main(["--model", str(tiny_model_dir), "--prompts", "4", "--max-new-tokens", "3", "--batch-size", "4",
                          "--no-vllm", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prompts"] == res["baseline_prompts"] == 4 and res["steps_per_prompt"] == 3
    assert res["seed_loop_calls"] == 12 and res["hf_calls"] == 3  # batch 1 per step vs one batched call per step
    assert set(res["seed_loop_steps"]) == set(res["hf_steps"]) == {"respond", "critique", "revise"}
    assert 0 < res["seed_loop_tokens"] <= 36 and 0 < res["hf_tokens"] <= 36
    assert res["ratio_hf_vs_seed"] == pytest.approx(res["hf_tok_s"] / res["seed_loop_tok_s"], rel=1e-2)
    assert res["vllm_tok_s"] is None and res["vllm_python"] == "skipped (--no-vllm)"
    assert "cai generate stage (hf)" in capsys.readouterr().out


def test_prefix_reuse_bench_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "prefix_reuse.json"
    assert prefix_reuse.main(["--model", str(tiny_model_dir), "--prompts", "8", "--max-new-tokens", "4", "--batch-size", "8",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["sides"]) == {"few_shot_0", "few_shot_1"} and res["outputs_identical"] is True
    one = res["sides"]["few_shot_1"]
    assert one["reuse_on"]["shared_tokens"] > 0 and "shared_tokens" not in one["reuse_off"]  # the same worked example, read once
    assert res["sides"]["few_shot_0"]["reuse_on"]["reused_tokens"] > 0  # revisions extend the critique step
    assert res["ratio_few_shot_1"] == pytest.approx(one["reuse_on"]["tok_s"] / one["reuse_off"]["tok_s"], rel=1e-2)
    assert "prefix reuse" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prefix_reuse.parse_args(["--prompts", "1"])


def test_decode_bench_compares_the_engine_loops_on_the_same_text(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert decode.main(["--model", str(tiny_model_dir), "--prompts", "4", "--max-new-tokens", "4", "--batch-size", "4",
                        "--sides", "static", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["sides"]) == ["generate", "static"]  # the baseline always runs, first
    assert res["outputs_identical"] is True and res["sides"]["static"]["decode"] == "static"
    gen, static = res["sides"]["generate"], res["sides"]["static"]
    assert res["ratio"] == res["ratio_static_vs_generate"] == pytest.approx(static["tok_s"] / gen["tok_s"], rel=1e-2)
    assert "same text" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        decode.parse_args(["--sides", "fast"])


# --------------------------------------------------------------------------- gpu (smoke-run on CPU)


def test_gpu_bench_runs_every_side_and_compares_with_generate(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--model", "tiny", "--device", "cpu", "--batches", "1,3", "--new-tokens", "5", "--repeats", "1",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["side"], r["batch"]) for r in res["runs"]] == [(s, b) for b in (1, 3) for s in gpu.SIDES]
    for r in res["runs"]:
        assert r["tokens"] == r["batch"] * 5  # every side decodes the full budget
        assert r["same_tokens_as_generate"] == 1.0  # fp32 on CPU: the same greedy tokens
        assert r["ratio_vs_generate"] == pytest.approx(r["tok_s"] / next(
            g["tok_s"] for g in res["runs"] if g["side"] == "generate" and g["batch"] == r["batch"]), rel=1e-2, abs=1e-3)  # 3 decimals
    assert res["ratio"] is None  # the target is about batch >= 128
    assert res["copy_bandwidth_gb_s"] is None and all(r["share_of_bound"] is None for r in res["runs"])
    assert "engine" in capsys.readouterr().out
    assert res["engine_decode"] == "compiled"
    assert gpu.main(["--model", "tiny", "--device", "cpu", "--batches", "2", "--new-tokens", "3", "--repeats", "1",
                     "--sides", "engine,generate", "--engine-decode", "static", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["side"] for r in res["runs"]] == ["generate", "engine"] and res["engine_decode"] == "static"
    assert res["runs"][1]["same_tokens_as_generate"] == 1.0


def test_gpu_bandwidth_bound_counts_weights_and_kv_cache():
    import torch

    model = gpu.build_model("tiny", "cpu", torch.float32)
    weights = sum(p.numel() * 4 for p in model.parameters())
    kv = 2 * 2 * 2 * 16 * 4 * (64 + 8 / 2)  # layers x (k, v) x kv heads x head dim x bytes x mean context
    assert gpu.bandwidth_bound(model, 2, 64, 8, 1e9) == pytest.approx(2 / ((weights + 2 * kv) / 1e9))
    assert gpu.bandwidth_bound(model, 2, 64, 8, None) is None
    with pytest.raises(SystemExit):
        gpu.main(["--model", "tiny", "--device", "cpu", "--sides", "nope", "--out", "/dev/null"])


# --------------------------------------------------------------------------- train


def test_peak_tflops_by_device_name():
    assert train.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert train.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert train.peak_tflops_for("NVIDIA H200") == 989.0
    assert train.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert train.peak_tflops_for("NVIDIA L40S") == 362.0 and train.peak_tflops_for("NVIDIA L4") == 121.0
    assert train.peak_tflops_for(None) is None and train.peak_tflops_for("Some new GPU") is None


def test_flops_per_token_and_mfu():
    n = 100_000_000
    assert train.flops_per_token("sft", n, lora=False) == 6 * n
    assert train.flops_per_token("dpo", n, lora=False) == 8 * n  # + the reference model's forward
    assert train.flops_per_token("sft", n, lora=True) == 4 * n   # no weight gradients for the frozen base
    assert train.flops_per_token("dpo", n, lora=True) == 6 * n
    # 10k tok/s x 6e8 FLOPs/token = 6 TFLOP/s of a 600 TFLOP/s peak = 1%
    assert train.mfu(10_000, 6 * n, 600.0) == pytest.approx(0.01)
    assert train.mfu(10_000, 6 * n, None) is None


def test_training_inputs_are_rows_the_train_stage_uses():
    from jobs.training_data import dpo_rows, sft_rows

    traces, prefs = train.training_inputs(_records(4), [f"answer {i}" for i in range(4)])
    assert len(sft_rows(traces, red_team_target="final")) == 4 and len(dpo_rows(prefs)) == 4  # what bench/train.py sets
    assert all(p["chosen"][0]["content"].startswith("answer") for p in prefs)
    assert all(p["rejected"][0]["content"] != p["chosen"][0]["content"] for p in prefs)


def test_count_params_matches_the_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert train.count_params(str(tiny_model_dir)) == sum(p.numel() for p in model.parameters())


def test_train_bench_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "train.json"
    assert train.main(["--model", str(tiny_model_dir), "--rows", "4", "--answer-tokens", "6", "--sft-batch-size", "2",
                       "--dpo-batch-size", "2", "--max-length", "64", "--no-warmup", "--peak-tflops", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    full = res["variants"]["full"]
    assert full["sft"]["steps"] == 2 and full["dpo"]["steps"] == 2
    assert full["sft"]["tokens"] > 0 and full["dpo"]["tokens"] > full["sft"]["tokens"] / 4
    assert res["sft_tok_s"] > 0 and res["dpo_tok_s"] > 0
    assert res["ratio"] == res["ratio_dpo_vs_sft"] == pytest.approx(res["dpo_tok_s"] / res["sft_tok_s"], rel=1e-2)
    assert res["sft_mfu"] == pytest.approx(res["sft_tok_s"] * 6 * res["params"] / 1e12, rel=1e-2)
    assert res["ratio_lora_vs_full_sft"] is None  # --lora not asked
    assert "SFT (full)" in capsys.readouterr().out


# --------------------------------------------------------------------------- overhead


def test_deep_merge_keeps_unrelated_keys():
    base = {"train": {"sft": {"epochs": 3, "batch_size": 8}, "method": "sft+dpo"}, "rounds": 1}
    merged = overhead.deep_merge(base, {"train": {"sft": {"epochs": 1}}})
    assert merged == {"train": {"sft": {"epochs": 1, "batch_size": 8}, "method": "sft+dpo"}, "rounds": 1}
    assert base["train"]["sft"]["epochs"] == 3  # the input is not modified


def test_quick_config_is_the_demo_cut_down(tmp_path):
    demo = overhead.bench_config(overhead.DEMO_RECIPE, quick=False, store_uri=str(tmp_path))
    quick = overhead.bench_config(overhead.DEMO_RECIPE, quick=True, store_uri=str(tmp_path))
    assert quick.store == str(tmp_path) and quick.name == "bench-overhead"
    assert quick.stages == demo.stages and quick.model == demo.model and quick.rounds == demo.rounds
    assert sum(s.limit for s in quick.data.train) < sum(s.limit for s in demo.data.train)
    assert quick.train.sft.epochs == 1 and quick.train.sft.batch_size == demo.train.sft.batch_size
    assert quick.evaluate.limit < demo.evaluate.limit


def test_stage_entries_in_run_order():
    state = {"base": {"evaluate": {"status": "completed"}, "quality": 0.5, "scores": {"a": 1.0}},
             "rounds": [{"round": 1, "stages": {"generate": {"status": "completed"}, "judge": {"status": "skipped"}}}]}
    assert [label for label, _ in overhead.stage_entries(state)] == ["base evaluate", "round 1 generate", "round 1 judge"]


def test_replay_store_work_times_each_part_and_leaves_the_manifest_intact(tmp_path):
    from jobs.config import StageSpec
    from jobs.manifest import build_manifest, manifest_key, write_manifest
    from jobs.store import LocalStore

    store = LocalStore(tmp_path)
    store.write_text("runs/r/inputs/prompts.jsonl", '{"id": 1}\n')
    spec = StageSpec(stage="generate", run_id="r", round=1, store=store.uri, output="runs/r/round-1/generate",
                     model="m", inputs={"prompts": "runs/r/inputs/prompts.jsonl"})
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    store.write_text(f"{spec.output}/traces.jsonl", "{}\n" * 100)
    write_manifest(store, spec, build_manifest(spec, store, [f"{spec.output}/traces.jsonl"], {}, {"total_s": 1.0}, "now"))
    before = store.read_bytes(manifest_key(spec))
    parts = overhead.replay_store_work(store, spec.spec_key, manifest_key(spec))
    assert set(parts) == {"spec_read_s", "hash_inputs_s", "hash_outputs_s", "package_versions_s", "manifest_write_s"}
    assert all(v >= 0 for v in parts.values())
    assert store.read_bytes(manifest_key(spec)) == before


def test_process_profile_splits_start_imports_and_exit():
    prof = overhead.process_profile("import json", "import csv")
    assert set(prof) == {"start_s", "imports_s", "lazy_imports_s", "exit_s"}
    assert all(v >= 0 for v in prof.values())


def test_s3_store_is_skipped_with_a_reason_when_unavailable(monkeypatch):
    monkeypatch.setattr(overhead.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(overhead.StoreUnavailable, match="store_s3"):
        overhead.s3_launcher()


def test_overhead_args():
    assert overhead.parse_args([]).stores == ["local", "s3"]
    assert overhead.parse_args(["--stores", "local"]).stores == ["local"]
    with pytest.raises(SystemExit):
        overhead.parse_args(["--stores", "gcs"])


@pytest.mark.slow
def test_overhead_bench_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {tiny_model_dir}\nconstitution: default\n"
        "data: {train: [{source: bundled:red-team, limit: 2}, {source: bundled:helpful, limit: 2}]}\n"
        "engine: {backend: hf, batch_size: 4}\n"
        "generate: {revision_rounds: 1, max_new_tokens: 6, critique_max_new_tokens: 6}\n"
        "judge: {min_margin: 0.0}\n"
        "train: {sft: {epochs: 1, batch_size: 2, max_length: 64}, dpo: {epochs: 1, batch_size: 2, max_length: 64}}\n"
        "evaluate: {limit: 2, max_new_tokens: 6}\nstages: [generate, judge, train, evaluate]\n"
    )
    out = tmp_path / "overhead.json"
    assert overhead.main(["--recipe", str(recipe), "--stores", "local", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    local = res["stores"]["local"]
    assert local["status"] == "completed" and res["target_applies"] is False
    assert [s["stage"] for s in local["stages"]] == ["base evaluate", "round 1 generate", "round 1 judge", "round 1 train",
                                                      "round 1 evaluate"]
    assert 0 < local["stage_work_s"] < local["wall_s"]
    assert local["overhead_s"] == pytest.approx(local["wall_s"] - local["stage_work_s"], abs=0.01)
    assert sum(local["components_s"].values()) == pytest.approx(local["overhead_s"], abs=0.05)
    assert res["ratio"] == local["overhead_share"]


# --------------------------------------------------------------------------- ablation


def test_ablation_variants_parse_and_override_train_settings_only_where_asked():
    from bench import ablation
    from jobs.config import RunConfig

    name, overrides = ablation.parse_variant("sft-only:train.method=sft,train.sft.epochs=2")
    assert name == "sft-only" and overrides == {"train.method": "sft", "train.sft.epochs": 2}
    base = RunConfig()
    cfg = ablation.with_overrides(base, {**overrides, **ablation.EVAL_ONLY_PLAIN})
    assert cfg.train.method == "sft" and cfg.train.sft.epochs == 2 and cfg.evaluate.jailbreaks is None
    assert cfg.generate == base.generate and cfg.train.dpo == base.train.dpo
    with pytest.raises(SystemExit, match="expected NAME:key=value"):
        ablation.parse_variant("nothing")
    with pytest.raises(SystemExit, match="is not key=value"):
        ablation.parse_variant("x:train.method")


# --------------------------------------------------------------------------- scale

def _stage_files() -> dict:
    return {
        "generate": {"timings": {"total_s": 105.0, "model_load_s": 5.0}, "counts": {"prompts": 100}},
        "judge": {"timings": {"total_s": 25.0, "model_load_s": 5.0}, "counts": {"prompts": 100}},
        "train": {"timings": {"total_s": 90.0, "dpo_s": 80.0}, "counts": {"dpo_rows": 200}},
        "evaluate": {"timings": {"total_s": 66.0, "model_load_s": 5.0, "report_s": 1.0},
                     "counts": {"harmful": 20, "benign": 20, "capability_mc": 10, "capability_exact": 10}},
    }


def test_scale_projection_reproduces_the_measured_run_and_divides_the_per_item_part():
    from bench import scale

    fig = scale.per_item(_stage_files())
    assert fig["generate"] == {"fixed_s": 5.0, "per_item_s": 1.0, "items": 100, "per_prompt": 1.0}
    assert fig["train"]["per_prompt"] == 2.0 and fig["train"]["per_item_s"] == 0.4 and fig["train"]["fixed_s"] == 10.0
    # the measured size on one device, no pod start or overhead: the measured stage times
    assert scale.project(fig, 100, 1, 0.0, 0.0, 0.9) == pytest.approx({"generate": 105.0, "judge": 25.0, "train": 90.0, "evaluate": 66.0})
    eight = scale.project(fig, 1000, 8, 2.0, 60.0, 0.9)
    assert eight["generate"] == pytest.approx(5 + 60 + 2 + 1000 * 1.0 / 8)
    assert eight["train"] == pytest.approx(10 + 60 + 2 + 2000 * 0.4 / (8 * 0.9 ** 3))  # three doublings
    assert eight["evaluate"] == pytest.approx(5 + 1 + 60 + 2 + 60 * 1.0 / 8)  # held-out items: not more with more prompts
    headers, rows = scale.table(fig, 2.0, 60.0, 0.9, 3.0)
    assert headers[-1] == "cost USD" and len(rows) == len(scale.PROMPTS) * len(scale.DEVICES)
    assert [r[-2] for r in rows[:3]][0] == "1.0x"


def test_scale_refuses_a_store_without_the_run(tmp_path, capsys):
    from bench import scale

    assert scale.main(["--store", str(tmp_path), "--run-id", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --store ")


# --------------------------------------------------------------------------- gpu_train

def test_gpu_train_bench_runs_every_side_through_the_stages_trainers(tmp_path):
    from bench import gpu_train

    out = tmp_path / "gpu_train.json"
    assert gpu_train.main(["--model", "tiny", "--device", "cpu", "--batch", "2", "--prompt-tokens", "8", "--completion-tokens", "8",
                           "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["side"] for r in res["runs"]] == list(gpu_train.SIDES)
    for r in res["runs"]:
        assert r["steps"] == 2 and r["tokens_per_s"] > 0  # timed steps after the warm-up, from the trainers' own steps
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12, rel=1e-2, abs=1e-4)
    assert res["runs"][0]["ratio_vs_torch_sft"] == 1.0
    assert gpu_train.main(["--sides", "nope", "--out", str(out)]) == 2

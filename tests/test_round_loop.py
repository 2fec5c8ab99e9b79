"""`cai run` with all four stages on the tiny model: rounds chain models, decisions, resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

FULL = """
name: loop
model: {model}
constitution: default
data:
  train:
    - source: bundled:red-team
      limit: 3
    - source: bundled:helpful
      limit: 3
engine: {{batch_size: 8}}
generate: {{revision_rounds: 1, few_shot: 0, max_new_tokens: 8, critique_max_new_tokens: 6}}
judge: {{min_margin: 0.0}}
train:
  sft: {{epochs: 1, batch_size: 2, max_length: 96}}
  dpo: {{epochs: 1, batch_size: 2, max_length: 96}}
evaluate: {{limit: 2, max_new_tokens: 6}}
stop: {{tolerance: 0.99}}
stages: [generate, judge, train, evaluate]
rounds: 2
"""


def cai(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def load_run(store: Path) -> dict:
    return json.loads(next((store / "runs").glob("*/run.json")).read_text())


def test_two_full_rounds_then_resume(tmp_path, tiny_model_dir):
    config = tmp_path / "loop.yaml"
    config.write_text(FULL.format(model=tiny_model_dir))
    store = tmp_path / "store"
    result = cai("run", "-c", str(config), "--store", str(store), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = load_run(store)
    rid = run["run_id"]
    assert run["status"] == "completed"
    assert run["base"]["evaluate"]["status"] == "completed" and 0 <= run["base"]["quality"] <= 1
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    for r in run["rounds"]:
        assert set(r["stages"]) == {"generate", "judge", "train", "evaluate"}
        assert 0 <= r["quality"] <= 1
    # round 2 starts from round 1's trained model; the result is the best round's model
    spec2 = json.loads((store / "runs" / rid / "round-2" / "generate" / "spec.json").read_text())
    assert spec2["model"] == f"store:runs/{rid}/round-1/train/model"
    assert [d["decision"] for d in run["decisions"]] == ["continue", "stop"]
    assert "max rounds" in run["decisions"][-1]["reason"]
    best = max([run["base"]["quality"]] + [r["quality"] for r in run["rounds"]])
    assert run["result"]["quality"] == best
    assert (store / "runs" / rid / "round-2" / "evaluate" / "report.md").exists()

    again = cai("run", "-c", str(config), "--store", str(store), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already complete, skipped") == 9  # base eval + 2 rounds x 4 stages
    rerun = load_run(store)
    assert rerun["result"] == run["result"] and rerun["decisions"] == run["decisions"]

    status = cai("status", rid, "--store", str(store), cwd=tmp_path)
    assert "base quality" in status.stdout and "decision after round 2: stop" in status.stdout

    # every trained model directory has its model card; `cai export` makes a Hub-ready folder of one round
    for r in (1, 2):
        card = (store / "runs" / rid / f"round-{r}" / "train" / "model" / "README.md").read_text()
        head = yaml.safe_load(card.split("---\n")[1])
        assert head["library_name"] == "transformers" and "constitutional-ai" in head["tags"] and "dpo" in head["tags"]
        assert f"# {rid}, round {r}" in card and "## Constitution: default" in card and "| harmless |" in card
        traces = store / "runs" / rid / f"round-{r}" / "generate" / "traces.jsonl"
        assert hashlib.sha256(traces.read_bytes()).hexdigest() in card  # the data it trained on, by hash
    dest = tmp_path / "export"
    exported = cai("export", rid, "--to", str(dest), "--round", "2", "--store", str(store), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (dest / "model" / "README.md").read_text()
    assert "## Evaluation (no system prompt; 95% Wilson intervals)" in card and "Alignment tax" in card and " n=" in card
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = load_dataset("parquet", data_files=str(dest / "data" / "sft" / "train.parquet"), split="train")
    prefs = load_dataset("parquet", data_files=str(dest / "data" / "prefs" / "train.parquet"), split="train")
    assert len(sft) == sum(1 for _ in (store / "runs" / rid / "round-2" / "generate" / "sft.jsonl").open()) and "messages" in sft.column_names
    assert {"prompt", "chosen", "rejected"} <= set(prefs.column_names)
    AutoModelForCausalLM.from_pretrained(dest / "model")
    AutoTokenizer.from_pretrained(dest / "model")
    assert {"report.md", "report.json", "run.json", "base-report.json"} <= {p.name for p in (dest / "report").iterdir()}
    assert cai("export", rid, "--to", str(dest), "--round", "2", "--store", str(store), cwd=tmp_path).returncode == 2  # not empty: refused
    if run["result"]["round"] == 0:  # no round beat the base model: nothing to export unless a round is named
        assert "pass --round N" in cai("export", rid, "--to", str(tmp_path / "e2"), "--store", str(store), cwd=tmp_path).stderr
    # the upload goes through huggingface_hub; pointed at nothing, it fails with one line and keeps nothing half-done
    offline = subprocess.run([sys.executable, "-m", "jobs.cli", "export", rid, "--hub", "me/tiny-cai", "--round", "1", "--store", str(store)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"})
    assert offline.returncode == 1 and offline.stderr.strip().count("\n") == 0, offline.stderr
    assert offline.stderr.startswith("error: hub http://127.0.0.1:9: model repo me/tiny-cai: cannot reach the Hub")

    # the controller wrote the run's report; it loads in a real browser without console errors and is not blank
    from browser import load, non_blank

    page = store / "runs" / rid / "report.html"
    text = page.read_text()
    for section in ("Scores per round", "Four columns", "Alignment tax", "Critique and revision", "The judge", "Training curves",
                    "Base vs round 2"):
        assert section in text, section
    assert "data:image/png;base64," in text and "src='http" not in text and 'src="http' not in text  # self-contained
    md = (store / "runs" / rid / "report.md").read_text()
    assert "![scores per round](report/rounds.png)" in md and (store / "runs" / rid / "report" / "rounds.png").exists()
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><p>x</p><script>undefined_function()</script>")
    assert any("undefined_function" in m for m in load(bad, tmp_path / "bad.png"))  # the check sees a page's errors
    assert load(page, tmp_path / "report.png") == []
    assert non_blank(tmp_path / "report.png") > 0.05


def test_target_stops_the_loop_early(tmp_path, tiny_model_dir):
    config = tmp_path / "target.yaml"
    config.write_text(
        f"name: target\nmodel: {tiny_model_dir}\nstages: [evaluate]\nrounds: 3\n"
        "evaluate: {limit: 1, max_new_tokens: 4, with_system_prompt: false}\n"
        "stop: {target: 0.000001}\n"
        "data: {train: [{source: bundled:helpful, limit: 1}]}\n"
    )
    result = cai("run", "-c", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = load_run(tmp_path / "store")
    assert len(run["decisions"]) == 1 and run["decisions"][0]["decision"] == "stop"
    assert "target reached" in run["decisions"][0]["reason"]


def test_judge_without_generate_is_a_config_error(tmp_path, tiny_model_dir):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {tiny_model_dir}\nstages: [judge]\n")
    result = cai("run", "-c", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2 and "judge needs ['generate']" in result.stderr

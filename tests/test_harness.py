"""lm-evaluation-harness in the evaluate stage: a local task in lm-eval's own YAML format over local JSONL,
run for real on the tiny model, feeding the base-vs-aligned tax table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from jobs.config import RunConfig  # noqa: E402
from jobs.controller import Controller  # noqa: E402
from jobs.harness import main_metric  # noqa: E402
from jobs.store import LocalStore  # noqa: E402
from test_evaluate_stage import run_eval, store  # noqa: E402,F401 - fixtures

MC = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
      {"question": "What is the capital of France?", "choices": ["Paris", "Rome"], "answer": 0},
      {"question": "What colour is a clear daytime sky?", "choices": ["green", "blue"], "answer": 1},
      {"question": "How many legs does a spider have?", "choices": ["six", "eight"], "answer": 1}]
TASK = """task: cai_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{task_dir}/mc.jsonl"
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (d / "cai_tiny_mc.yaml").write_text(TASK)
    return d


def direct(model_dir: Path, task_dir: Path) -> float:
    """The same task through lm-eval's own API, outside cai-jobs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jobs.harness import materialise_tasks

    tasks = materialise_tasks(task_dir, task_dir.parent / "direct")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["cai_tiny_mc"], device="cpu",
                                  batch_size=4, task_manager=TaskManager(include_path=str(tasks)), log_samples=False, bootstrap_iters=0)
    return out["results"]["cai_tiny_mc"]["acc,none"]


def test_local_task_runs_and_feeds_the_tax_table(store, tiny_model_dir, tiny_engine, task_dir):
    harness = {"tasks": ["cai_tiny_mc"], "include_path": str(task_dir), "num_fewshot": 0, "batch_size": 4}
    base_spec, base_out = run_eval(store, str(tiny_model_dir), tiny_engine, limit=1, jailbreaks=None, with_system_prompt=False, harness=harness)
    base = json.loads((base_out / "report.json").read_text())
    row = base["harness"]["results"]["cai_tiny_mc"]
    assert row["metric"] == "acc" and row["n"] == len(MC) and row["value"] == pytest.approx(direct(tiny_model_dir, task_dir))
    assert row["lo"] <= row["value"] <= row["hi"]
    assert base["harness"]["settings"]["num_fewshot"] == 0 and base["harness"]["settings"]["apply_chat_template"] is False

    _, out = run_eval(store, str(tiny_model_dir), tiny_engine, output="runs/t/round-1/evaluate", round_=1, limit=1, jailbreaks=None,
                      with_system_prompt=False, harness=harness, baseline=f"{base_spec.output}/report.json")
    report = json.loads((out / "report.json").read_text())
    tax = report["harness"]["tax"]
    if row["value"] > 0:  # the same model on both sides: no tax
        assert tax["per_benchmark"]["cai_tiny_mc"]["tax_pct"] == pytest.approx(0.0) and tax["average_pct"] == pytest.approx(0.0)
    md = (out / "report.md").read_text()
    assert "## Capability benchmarks (lm-evaluation-harness)" in md and "| cai_tiny_mc | acc |" in md and "chat template off" in md


def test_main_metric_prefers_normalised_accuracy():
    assert main_metric({"acc,none": 0.5, "acc_norm,none": 0.6, "acc_stderr,none": 0.1, "alias": "x"}) == ("acc_norm", 0.6)
    assert main_metric({"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3}) == ("exact_match,strict-match", 0.2)
    assert main_metric({"alias": "x"}) is None


def test_controller_copies_local_tasks_into_the_run(tmp_path, task_dir):
    store = LocalStore(tmp_path / "store")
    config = RunConfig(stages=["evaluate"], data={"train": [{"source": "bundled:helpful", "limit": 1}]},
                       evaluate={"harness": {"tasks": ["cai_tiny_mc"], "include_path": str(task_dir)}, "limit": 1})
    ctl = Controller(config, store, executor=None, run_id="r1")
    keys = ctl.prepare()
    spec = ctl.plan_base(keys)
    assert spec.inputs["harness_tasks"] == "runs/r1/inputs/harness_tasks"
    assert (tmp_path / "store" / "runs/r1/inputs/harness_tasks/cai_tiny_mc.yaml").read_text() == TASK
    assert store.digest(spec.inputs["harness_tasks"]).startswith("tree:")  # part of the stage's identity


def test_controller_reads_uploaded_tasks_from_the_store(tmp_path, task_dir):
    """What `cai submit` hands the pod: include_path as the store key it uploaded the tasks to."""
    store = LocalStore(tmp_path / "store")
    store.put_dir(task_dir, "uploads/harness/abc/tasks")
    config = RunConfig(stages=["evaluate"], data={"train": [{"source": "bundled:helpful", "limit": 1}]},
                       evaluate={"harness": {"tasks": ["cai_tiny_mc"], "include_path": "store:uploads/harness/abc/tasks"}, "limit": 1})
    ctl = Controller(config, store, executor=None, run_id="r1")
    spec = ctl.plan_base(ctl.prepare())
    assert store.digest(spec.inputs["harness_tasks"]) == store.digest("uploads/harness/abc/tasks")

"""`cai run` end to end through the local executor (a real subprocess per stage), resume and status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import format_status, main
from jobs.executors.local import stage_command


def cai(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_run_resume_and_status(tmp_path, tiny_run_config):
    store = tmp_path / "store"
    first = cai("run", "-c", str(tiny_run_config), "--store", str(store), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = next(l.split()[1].rstrip(":") for l in first.stdout.splitlines() if l.startswith("run "))
    run = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["rounds"][0]["stages"]["generate"]["status"] == "completed"
    assert run["rounds"][0]["stages"]["generate"]["counts"]["prompts"] == 6
    assert run["decisions"][-1]["decision"] == "stop"
    gen = store / "runs" / run_id / "round-1" / "generate"
    assert {"sft.jsonl", "traces.jsonl", "stage.json", "spec.json"} <= {p.name for p in gen.iterdir()}
    assert "[generate] done" in (gen / "logs" / "stage.log").read_text()
    report = json.loads((store / "runs" / run_id / "inputs" / "data_report.json").read_text())
    assert report["prompts"] == 6

    stamp = (gen / "sft.jsonl").stat().st_mtime_ns
    again = cai("run", "-c", str(tiny_run_config), "--store", str(store), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete" in again.stderr
    assert (gen / "sft.jsonl").stat().st_mtime_ns == stamp
    run = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert run["rounds"][0]["stages"]["generate"]["status"] == "skipped"

    status = cai("status", run_id, "--store", str(store), cwd=tmp_path)
    assert status.returncode == 0 and "generate" in status.stdout and "completed" in status.stdout


def test_status_of_unknown_run_is_one_line(tmp_path, capsys):
    assert main(["status", "nope", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no such run" in err


def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  revision_rounds: 0\n")
    assert main(["run", "-c", str(bad), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "generate.revision_rounds" in err and str(bad) in err


def test_failed_stage_is_recorded(tmp_path, tiny_run_config):
    broken = tmp_path / "broken-model"  # looks like a model directory, cannot be loaded: fails in the stage
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    bad = tmp_path / "bad-model.yaml"
    bad.write_text(tiny_run_config.read_text().replace("model: ", f"model: {broken}\n# was: "))
    result = cai("run", "-c", str(bad), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage generate failed")
    run_json = next((tmp_path / "store" / "runs").glob("*/run.json"))
    run = json.loads(run_json.read_text())
    assert run["status"] == "failed"
    assert run["rounds"][0]["stages"]["generate"]["status"] == "failed"
    assert not list((tmp_path / "store").rglob("stage.json"))


@pytest.mark.parametrize("model, says", [
    ("/nonexistent/model/dir", "no such directory"),
    ("{empty}", "no config.json"),
    ("{no_weights}", "no weights"),
    ("bundled:nope", "unknown bundled model"),
])
def test_bad_model_reference_is_one_line_before_anything_is_written(tmp_path, capsys, model, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model.format(empty=tmp_path / 'empty', no_weights=tmp_path / 'no_weights')}\n")
    assert main(["run", "-c", str(config), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: model: ") and says in err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.json"))


def test_stage_command_is_the_pod_command():
    assert stage_command("generate", "s3://b/runs/x/spec.json") == ["cai", "stage", "generate", "--spec", "s3://b/runs/x/spec.json"]


def test_format_status_lists_stages_and_decisions():
    state = {
        "run_id": "r", "status": "completed", "constitution": "default", "prompts": 3, "max_rounds": 1,
        "rounds": [{"round": 1, "stages": {"generate": {"status": "completed", "counts": {"prompts": 3}, "timings": {"total_s": 2.0}}}}],
        "decisions": [{"round": 1, "decision": "stop", "reason": "max rounds (1) used"}],
    }
    text = format_status(state)
    assert "generate" in text and "prompts=3" in text and "stop" in text


def test_a_stage_that_exits_without_its_manifest_fails_loudly(tmp_path, tiny_model_dir):
    """The controller checks completeness again after every stage instead of trusting the exit status."""
    from jobs.config import RunConfig
    from jobs.controller import Controller
    from jobs.errors import StageFailed
    from jobs.store import LocalStore

    class ExitsCleanly:
        def run(self, stage: str, spec_uri: str) -> str:
            return "pretended to work\n"

    config = RunConfig(model=str(tiny_model_dir), stages=["generate"], data={"train": [{"source": "bundled:helpful", "limit": 1}]})
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StageFailed, match="does not match its spec and inputs"):
        Controller(config, store, ExitsCleanly(), run_id="r1").run()
    run = json.loads((tmp_path / "store" / "runs" / "r1" / "run.json").read_text())
    assert run["status"] == "failed" and run["rounds"][0]["stages"]["generate"]["status"] == "failed"


def test_status_shows_intervals_and_which_differences_clear_zero():
    rate = {"rate": 0.5, "k": 6, "n": 12, "lo": 0.2538, "hi": 0.7462}
    state = {"run_id": "r", "status": "completed", "rounds": [{"round": 1, "stages": {}, "quality": 0.6, "scores": {"harmless": 0.5},
             "intervals": {"level": 0.95, "rates": {"over_refusal_rate": rate, "harmless_rate_judge": rate},
                           "vs_base": {"harmless_rate_judge": {"diff": 0.3, "lo": 0.1, "hi": 0.5, "n_pairs": 12},
                                       "over_refusal_rate": {"diff": 0.05, "lo": -0.1, "hi": 0.2, "n_pairs": 12}}}}]}
    out = format_status(state)
    assert "round 1 rates (95%): harmless (judge) 50.0% [25.4, 74.6] n=12; over-refusal 50.0% [25.4, 74.6] n=12" in out
    assert "harmless (judge) +30.0 pts [+10.0, +50.0] n=12 *; over-refusal +5.0 pts [-10.0, +20.0] n=12" in out

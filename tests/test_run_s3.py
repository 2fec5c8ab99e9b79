"""`cai run` against an S3 store (SeaweedFS): killed mid-stage, re-run, finished stages are not recomputed.

The stage subprocesses inherit the AWS_* settings from `cai run`, exactly as a pod gets them from its Job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIG = """
name: s3-loop
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
evaluate: {{limit: 1, max_new_tokens: 4}}
stages: [generate, judge, train, evaluate]
rounds: 1
"""
PREFIX = "cai/prod"
KILL_AT = "[generate] "  # the generate stage's first line: model loaded, prompts read, generation under way


def objects(client, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    """Key -> (ETag, LastModified) for every object under `prefix`: a rewrite changes LastModified."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: (o["ETag"], o["LastModified"]) for o in page.get("Contents", [])})
    return out


def cai_run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def run_until(args: list[str], env: dict[str, str], cwd: Path, marker: str, timeout: float = 300) -> str:
    """Start `cai run` in its own process group; kill the whole group (controller and stage) when
    `marker` shows up in its output. Returns the output seen."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: list[str] = []
    hit = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(marker):
                os.killpg(proc.pid, signal.SIGKILL)
                hit.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not hit.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not hit.is_set():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    assert hit.is_set(), f"`{marker}` never appeared (exit {proc.returncode}):\n{''.join(seen)[-3000:]}"
    return "".join(seen)


PLANTED_HF_TOKEN = "hf_PlantedSecretThatMustNeverLeak0123"


def assert_no_secret(secrets: list[str], s3, bucket: str, outputs: list[str], local: Path) -> None:
    """No secret the run was given appears in any object of the store (logs, stage.json manifests,
    spec.json, run.json, data, models), in what it printed, or in a file it wrote locally."""
    bodies = {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in objects(s3, bucket, "")}
    assert any(k.endswith("/run.json") for k in bodies) and any(k.endswith(".log") for k in bodies), sorted(bodies)
    for secret in secrets:
        raw = secret.encode()
        for key, body in bodies.items():
            assert raw not in body, f"a secret leaked into s3://{bucket}/{key}"
        for text in outputs:
            assert secret not in text, "a secret leaked into the run's output"
        for path in local.rglob("*"):
            if path.is_file():
                assert raw not in path.read_bytes(), f"a secret leaked into {path}"


def test_run_on_s3_killed_mid_stage_resumes(tmp_path, tiny_model_dir, s3_server, s3_bucket):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    # the S3 keys are real (the server checks them); the HF token is planted: offline, nothing uses it
    env = {**os.environ, **s3_server.env, "CAI_CACHE_DIR": str(tmp_path / "cache"), "HF_TOKEN": PLANTED_HF_TOKEN}
    store = f"s3://{s3_bucket}/{PREFIX}"
    args = ["-c", str(config), "--store", store]
    s3 = s3_server.admin()

    # 1. kill controller and stage together while round 1 generate is working (base evaluate done)
    first = run_until(args, env, tmp_path, KILL_AT)
    assert "[cai] base evaluate: starting" in first and "[cai] round 1 generate: starting" in first
    keys = objects(s3, s3_bucket, PREFIX)
    run_root = next(k for k in keys if k.endswith("/run.json")).rsplit("/", 1)[0]
    base, gen = f"{run_root}/base/evaluate", f"{run_root}/round-1/generate"
    assert f"{base}/stage.json" in keys and f"{base}/report.json" in keys
    assert f"{gen}/spec.json" in keys
    assert not [k for k in keys if k.startswith(gen + "/") and not k.endswith("spec.json")], "killed stage left outputs"
    before = {k: v for k, v in keys.items() if k.startswith(base + "/")}

    # 2. re-run: the finished stage is skipped (its objects untouched), the rest runs to the end
    again = cai_run(args, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[cai] base evaluate: already complete, skipped" in again.stderr
    assert "base evaluate: starting" not in again.stderr
    for stage in ("generate", "judge", "train", "evaluate"):
        assert f"[cai] round 1 {stage}: starting" in again.stderr
    after = objects(s3, s3_bucket, PREFIX)
    assert {k: v for k, v in after.items() if k.startswith(base + "/")} == before
    run = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{run_root}/run.json")["Body"].read())
    assert run["status"] == "completed" and run["decisions"][-1]["decision"] == "stop"
    for stage in ("generate", "judge", "train", "evaluate"):
        assert f"{run_root}/round-1/{stage}/stage.json" in after
    model_keys = [k for k in after if k.startswith(f"{run_root}/round-1/train/model/")]
    assert any(k.endswith("model.safetensors") for k in model_keys) and any(k.endswith("config.json") for k in model_keys)
    # round 1 evaluate read the trained model out of the bucket into the local cache
    cached = tmp_path / "cache" / "store" / s3_bucket / run_root / "round-1" / "train" / "model"
    assert (cached / "config.json").exists() and (cached / "model.safetensors").exists()
    assert f"model:   {store}/{run_root[len(PREFIX) + 1:]}/round-1/train/model" in again.stdout or "no round beat it" in again.stdout

    # 3. a third run has nothing left to do
    last = cai_run(args, env, tmp_path)
    assert last.returncode == 0, last.stderr[-3000:]
    assert last.stderr.count("already complete, skipped") == 5 and "starting" not in last.stderr
    outputs = [first, again.stdout, again.stderr, last.stdout, last.stderr]
    assert_no_secret([s3_server.secret_key, PLANTED_HF_TOKEN], s3, s3_bucket, outputs, tmp_path / "cache")
    assert objects(s3, s3_bucket, f"{run_root}/round-1/") == {k: v for k, v in after.items() if k.startswith(f"{run_root}/round-1/")}

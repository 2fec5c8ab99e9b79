"""Bad input, one case per class: one line (`error: <where>: <what>; <fix>`), exit 2, nothing in the store.

Each case is a `cai run` through the real CLI entry point, with the store a fresh directory that must
still be empty afterwards: the checks run before the lock or run.json exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from jobs import cli
from jobs.constitution import SHIPPED_DIR

BASE = {"name": "bad", "stages": ["generate"], "data": {"train": [{"source": "bundled:helpful", "limit": 2}]}}


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def constitution_with(tmp_path: Path, **principle_fields) -> str:
    c = yaml.safe_load((SHIPPED_DIR / "default.yaml").read_text())
    c["principles"][0].update(principle_fields)
    return str(write(tmp_path / "constitution.yaml", c))


def case(tmp_path: Path, name: str):
    """(config dict, extra argv, env) of each class."""
    cfg = {**BASE}
    args, env = [], {}
    if name == "rounds-zero":
        args = ["--rounds", "0"]
    elif name == "constitution-directory":
        (tmp_path / "cdir").mkdir()
        cfg["constitution"] = str(tmp_path / "cdir")
    elif name == "constitution-missing":
        cfg["constitution"] = str(tmp_path / "nope.yaml")
    elif name == "weight-infinite":
        cfg["constitution"] = constitution_with(tmp_path, weight=math.inf)
    elif name == "weight-negative":
        cfg["constitution"] = constitution_with(tmp_path, weight=-1)
    elif name == "unknown-kind":
        cfg["data"] = {"train": [{"source": str(write(tmp_path / "p.jsonl", '{"prompt": "hi", "kind": "redteam"}\n'))}]}
    elif name == "data-missing":
        cfg["data"] = {"train": [{"source": str(tmp_path / "nope.jsonl")}]}
    elif name == "data-missing-after-remote":  # a remote source first: the local one is still checked, under its own index
        cfg["data"] = {"train": [{"source": "store:prompts/extra.jsonl"}, {"source": str(tmp_path / "nope.jsonl")}]}
    elif name == "model-missing":
        cfg["model"] = str(tmp_path / "no-such-model")
    elif name == "unknown-key":
        cfg["generate"] = {"revison_rounds": 2}
    elif name == "partial-kubernetes-stages":  # tuning one stage keeps the others' defaults; the bad kubeconfig is what fails
        cfg["kubernetes"] = {"stages": {"judge": {"gpus": 1}}}
        args = ["--executor", "kubernetes"]
        env = {"KUBECONFIG": str(write(tmp_path / "kc.yaml", "apiVersion: v1\nclusters: [\n  - bad"))}
    elif name == "train-processes-vs-gpus":  # 2 training processes on a 4-GPU pod: one per GPU, before anything runs
        cfg["train"] = {"distributed": {"processes": 2}}
        cfg["kubernetes"] = {"stages": {"train": {"gpus": 4}}}
        args = ["--executor", "kubernetes"]
    elif name == "endpoint-invalid":
        args, env = ["--store", "s3://bucket/p"], {"AWS_ENDPOINT_URL_S3": "not a url"}
    elif name == "bucket-invalid":
        args, env = ["--store", "s3://Bad_Bucket!/p"], {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    elif name == "attempts-invalid":
        args, env = ["--store", "s3://bucket/p"], {"AWS_MAX_ATTEMPTS": "many", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    else:
        raise AssertionError(name)
    return cfg, args, env


CASES = {
    "rounds-zero": "--rounds 0: must be at least 1",
    "constitution-directory": "is a directory, not a constitution file",
    "constitution-missing": "constitution not found",
    "weight-infinite": "weight: Input should be a finite number",
    "weight-negative": "weight",
    "unknown-kind": "row 1: kind 'redteam' is not `red-team` or `ordinary`",
    "data-missing": "data.train[0]",
    "data-missing-after-remote": "data.train[1]",
    "model-missing": "no such directory",
    "unknown-key": "revison_rounds",
    "partial-kubernetes-stages": "kubeconfig",
    "train-processes-vs-gpus": "train.distributed.processes: 2 processes on 4 GPU(s) per pod",
    "endpoint-invalid": "AWS_ENDPOINT_URL_S3='not a url' is not a valid endpoint",
    "bucket-invalid": "'Bad_Bucket!' is not a valid S3 bucket name",
    "attempts-invalid": "AWS_MAX_ATTEMPTS='many'",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    cfg, args, env = case(tmp_path, name)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "KUBECONFIG", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = tmp_path / "store"
    argv = ["run", "-c", str(write(tmp_path / "run.yaml", cfg)), *(args if "--store" in args else ["--store", str(store), *args])]
    rc = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(err) == 1 and CASES[name] in err[0] and "; " in err[0], err
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*")), sorted(store.rglob("*"))

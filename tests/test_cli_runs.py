"""Run management in the CLI: list, get/status, logs -f, cancel, resume, delete, gc, @latest, CAI_STORE,
--set, config show|validate|schema, --version; on the local store, the S3 server and the emulated cluster."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser, main
from jobs.config import load_run_config
from jobs.controller import Controller
from jobs.executors.local import LocalExecutor
from jobs.promotion import Scores, promote
from jobs.runs import RunCancelled, gc_plan, lineage, run_ids
from jobs.store import LocalStore
from kube_emulator import cluster_factory  # noqa: F401 - a fixture
from test_run_lock import start

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


def cai(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def slow_python(tmp_path: Path) -> Path:
    """Stands in for the interpreter a stage runs under: prints a line every 0.1 s, forever, and says its pid."""
    script = tmp_path / "slow-python"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/stage.pid\ni=0\nwhile true; do echo \"step $i\"; i=$((i+1)); sleep 0.1; done\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the config verbs -------------------------------------------------------------------------------
def test_set_overrides_reach_config_show_and_render(capsys):
    assert main(["config", "show", "-c", str(DEMO), "--set", "train.dpo.beta=0.3", "--set", "train.dpo.loss_type=[sigmoid, sft]", "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["dpo"]["beta"] == 0.3 and shown["train"]["dpo"]["loss_type"] == ["sigmoid", "sft"]
    assert shown["generate"]["revision_rounds"] == load_run_config(DEMO).generate.revision_rounds  # the rest as the file says
    assert main(["render", "-c", str(DEMO), "--store", "s3://b/p"]) == 0
    plain = capsys.readouterr().out
    assert main(["render", "-c", str(DEMO), "--store", "s3://b/p", "--set", "generate.max_new_tokens=7"]) == 0
    changed = capsys.readouterr().out
    assert plain != changed and '"max_new_tokens": 7' not in plain  # another spec, so other Job names and hashes


@pytest.mark.parametrize("item, says", [
    ("train.dpo.nope=1", "train.dpo.nope: is not a known field"),
    ("model.x=1", "model is str, not a section"),
    ("rounds", "expected key.path=value"),
    ("data.train.9.split=eval", "no list item 9"),
    ("rounds=0", "rounds"),
])
def test_a_bad_set_is_one_line_and_exit_2(item, says, tmp_path, capsys):
    assert main(["run", "-c", str(DEMO), "--store", str(tmp_path / "s"), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and says in err, err
    assert not (tmp_path / "s").exists()  # nothing written


def test_config_validate_and_schema(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  revision_rounds: 0\n")
    assert main(["config", "validate", str(DEMO), str(bad)]) == 2
    out = capsys.readouterr()
    assert f"{DEMO}: ok" in out.out and "generate.revision_rounds" in out.err and out.err.count("\n") == 1
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object" and {"model", "constitution", "train", "evaluate"} <= set(schema["properties"])


def test_version_and_help_hide_the_internal_verbs(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("cai-jobs 0.")
    text = build_parser().format_help()
    for shown in ("list", "get", "logs", "cancel", "delete", "gc", "resume", "config", "rollout", "model"):
        assert f"\n    {shown}" in text, shown
    for hidden in ("stage", "models", "{"):
        assert f"\n    {hidden} " not in text and f"\n    {hidden}\n" not in text, hidden
    assert "prepare" not in build_parser().parse_args(["model", "pull"]).func.__name__  # the new name; `prepare` still parses
    assert build_parser().parse_args(["model", "prepare"]).func is build_parser().parse_args(["model", "pull"]).func


# --- a real run, cancelled and resumed, then listed, read, deleted and collected ---------------------------
def test_cancel_stops_the_running_stage_then_resume_finishes_it(tmp_path, tiny_run_config, capsys):
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    config = load_run_config(tiny_run_config)
    executor = LocalExecutor(python=str(slow_python(tmp_path)), cancel_poll_s=0.2)
    thread, outcome = start(Controller(config, store, executor))
    wait_for(lambda: (tmp_path / "stage.pid").exists(), what="the stage to start")
    pid = int((tmp_path / "stage.pid").read_text())
    env = {"CAI_STORE": str(store_dir)}  # every verb below finds the store through the environment
    follower = subprocess.Popen([sys.executable, "-m", "jobs.cli", "logs", "@latest", "generate", "-f"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=REPO)
    wait_for(lambda: len(list(store_dir.glob("runs/*/round-1/generate/logs/.stage.live.tmp"))) == 1, what="the live log")
    time.sleep(0.5)  # a few lines reach the follower while the stage runs

    listed = cai("list", "-o", "json", env=env)
    (row,) = json.loads(listed.stdout)
    assert row["status"] == "running" and row["live"] is True
    run_id = row["run_id"]

    t0 = time.monotonic()
    done = cai("cancel", "@latest", "--reason", "wrong prompts", env=env)
    assert done.returncode == 0, done.stderr
    assert f"run {run_id}: cancelled" in done.stdout and time.monotonic() - t0 < 30
    thread.join(30)
    assert isinstance(outcome[0], RunCancelled) and "wrong prompts" in str(outcome[0])
    wait_for(lambda: not alive(pid), timeout=15, what="the stage process to stop")
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert "step 0" in out and "step 3" in out  # it streamed the stage's own lines while they were written

    state = json.loads((store_dir / "runs" / run_id / "run.json").read_text())
    assert state["status"] == "cancelled" and state["cancel"]["reason"] == "wrong prompts" and "@" in state["cancel"]["by"]
    assert state["rounds"][0]["stages"]["generate"]["status"] == "cancelled"
    assert not (store_dir / "runs" / run_id / "lock.json").exists()
    got = cai("get", run_id, env=env)
    assert "status=cancelled" in got.stdout and "cancelled" in got.stdout and "wrong prompts" in got.stdout
    again = cai("run", "-c", str(tiny_run_config), env=env)  # the same config is the same run: it stays cancelled
    assert again.returncode == 1 and "was cancelled (wrong prompts" in again.stderr and "cai resume" in again.stderr
    assert again.stderr.strip().count("\n") == 0

    resumed = cai("resume", "@latest", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((store_dir / "runs" / run_id / "run.json").read_text())
    assert state["status"] == "completed" and "cancel" not in state
    assert state["rounds"][0]["stages"]["generate"]["status"] == "completed"
    assert not (store_dir / "runs" / run_id / "cancel.json").exists()

    # the read verbs, in every output format
    for fmt, parse in (("json", json.loads), ("yaml", yaml.safe_load)):
        assert parse(cai("get", "@latest", "-o", fmt, env=env).stdout)["run_id"] == run_id
        assert parse(cai("list", "-o", fmt, env=env).stdout)[0]["status"] == "completed"
    table = cai("list", env=env).stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "STATUS", "ROUNDS", "QUALITY"] and table[1].split()[:3] == [run_id, "completed", "1/1"]
    assert cai("list", "-o", "name", env=env).stdout.split() == [run_id]
    assert "round 1 generate" in cai("status", run_id, env=env).stdout or "generate" in cai("status", run_id, env=env).stdout
    logs = cai("logs", "@latest", "generate", env=env)
    assert logs.returncode == 0 and "[generate] done" in logs.stdout
    watched = cai("get", "@latest", "-w", "--interval", "0.1", env=env)  # a finished run: printed once, exit 0
    assert watched.returncode == 0 and watched.stdout.count(f"run {run_id}") == 1


def test_cancel_of_a_run_whose_controller_died_records_it_itself(tmp_path, capsys):
    store = LocalStore(tmp_path)
    store.write_json("runs/r1/run.json", {"run_id": "r1", "status": "running", "created_at": "2026-12-01T10:00:00+00:00", "rounds": []})
    assert main(["cancel", "r1", "--store", str(tmp_path), "--reason", "stale"]) == 0
    state = store.read_json("runs/r1/run.json")
    assert state["status"] == "cancelled" and state["cancel"]["reason"] == "stale"
    assert main(["cancel", "r1", "--store", str(tmp_path)]) == 0
    assert "already cancelled" in capsys.readouterr().out


def fake_run(store: LocalStore, run_id: str, status: str = "completed", days_old: float = 30, model: str | None = None,
             executor: str = "local") -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - days_old * 86400))
    store.write_json(f"runs/{run_id}/run.json", {"run_id": run_id, "status": status, "created_at": when, "updated_at": when, "rounds": [],
                                                 "config": {"model": model or "bundled:smollm2-135m-instruct", "executor": executor}})
    store.write_text(f"runs/{run_id}/round-1/train/model/config.json", "{}")


def test_delete_and_gc_never_touch_a_promoted_lineage_or_a_live_run(tmp_path, capsys):
    store = LocalStore(tmp_path)
    fake_run(store, "first")                                                        # the promoted model's parent
    fake_run(store, "promoted", model="store:runs/first/round-1/train/model")      # the promoted model's own run
    fake_run(store, "old-failed", status="failed")
    fake_run(store, "old-done")
    fake_run(store, "recent", days_old=0.01)
    fake_run(store, "k8s-failed", status="failed")                                 # its controller Job may retry it
    fake_run(store, "k8s-failed", status="failed", executor="kubernetes")
    fake_run(store, "started-from-old", model="store:runs/old-parent/round-1/train/model", days_old=0.02)
    fake_run(store, "old-parent")                                                   # not promoted, but a run starts from it
    fake_run(store, "live", status="running", days_old=0.001)
    store.write_json("runs/live/lock.json", {"token": "t", "owner": {"host": "elsewhere", "pid": 1}, "ttl_s": 40,
                                             "renewed_at_epoch": time.time()})
    promote(store, based_on=None, model="store:runs/promoted/round-1/train/model", run_id="promoted", round_=1,
            scores=Scores(), inputs={}, reason="test")
    assert set(lineage(store)) == {"promoted", "first", "old-parent"}
    assert main(["delete", "k8s-failed", "--store", str(tmp_path)]) == 1
    assert "may retry it; `cai cancel k8s-failed` first" in capsys.readouterr().err
    assert main(["delete", "typo", "--store", str(tmp_path)]) == 2
    assert "no such run" in capsys.readouterr().err

    assert main(["delete", "promoted", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "never deleted" in err
    assert main(["delete", "live", "--store", str(tmp_path)]) == 1
    assert "cai cancel live" in capsys.readouterr().err

    assert main(["gc", "--store", str(tmp_path), "--keep-last", "1", "--older-than", "7d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete old-failed" in out and "would delete old-done" in out and "keeping first: kept: the start model of run promoted" in out
    assert store.exists("runs/old-done/run.json")  # a dry run deletes nothing
    plan = {c.run_id: c.delete for c in gc_plan(store, keep_last=1, older_than_s=7 * 86400)}
    assert plan == {"first": False, "promoted": False, "old-failed": True, "old-done": True, "live": False, "recent": False,
                    "k8s-failed": False, "started-from-old": False, "old-parent": False}
    assert main(["gc", "--store", str(tmp_path), "--keep-last", "1", "--older-than=-1d"]) == 2  # no negative ages
    assert main(["gc", "--store", str(tmp_path), "--keep-last", "1"]) == 0
    assert sorted(store.children("runs")) == ["first", "k8s-failed", "live", "old-parent", "promoted", "recent", "started-from-old"]
    assert main(["delete", "recent", "--store", str(tmp_path)]) == 0
    assert not (tmp_path / "runs" / "recent").exists()
    capsys.readouterr()
    assert main(["get", "@latest", "--store", str(tmp_path), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == "live"


def test_latest_and_list_of_an_empty_store_say_what_to_do(tmp_path, capsys):
    assert main(["get", "@latest", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no runs yet" in err and "cai run" in err
    assert main(["list", "--store", str(tmp_path)]) == 0
    assert "no runs in" in capsys.readouterr().err


# --- the same verbs on the S3 server --------------------------------------------------------------------
def test_run_verbs_on_the_s3_store(s3_bucket, tmp_path, capsys):
    from jobs.store_s3 import S3Store

    uri = f"s3://{s3_bucket}/verbs"
    local = LocalStore(tmp_path / "staging")
    fake_run(local, "a-old")
    fake_run(local, "b-new", days_old=0.01)
    local.write_text("runs/b-new/round-1/generate/logs/stage.log", "[generate] done\n")
    store = S3Store(uri, cache_root=tmp_path / "cache")
    try:
        store.put_dir(tmp_path / "staging" / "runs", "runs")
        assert store.children("runs") == ["a-old", "b-new"]
        assert main(["list", "--store", uri, "-o", "name"]) == 0
        assert capsys.readouterr().out.split() == ["a-old", "b-new"]
        assert main(["get", "@latest", "--store", uri, "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["run_id"] == "b-new"
        state = store.read_json("runs/b-new/run.json")
        state["rounds"] = [{"round": 1, "stages": {"generate": {"status": "completed", "output": "runs/b-new/round-1/generate"}}}]
        store.write_json("runs/b-new/run.json", state)
        assert main(["logs", "b-new", "generate", "--store", uri]) == 0
        assert "[generate] done" in capsys.readouterr().out
        assert main(["cancel", "b-new", "--store", uri]) == 0  # finished: nothing to cancel
        assert "already completed" in capsys.readouterr().out
        assert main(["gc", "--store", uri, "--keep-last", "1"]) == 0
        assert run_ids(store) == ["b-new"] and not store.list("runs/a-old")  # (SeaweedFS may still list an empty "folder")
        assert main(["delete", "b-new", "--store", uri]) == 0
        assert run_ids(store) == [] and not store.list("runs")
    finally:
        store.close()


# --- on the emulated cluster: cancel deletes the stage's Job, logs -f streams its pod ----------------------
def test_cancel_and_logs_follow_on_the_emulated_cluster(tmp_path, cluster_factory, monkeypatch):
    from kube_emulator import JOBS, NS, PodRun, k8s_config  # noqa: F811

    from jobs.config import RunConfig
    from jobs.executors.kubernetes import KubernetesExecutor

    lines = "".join(f"pod line {i}\n" for i in range(200))
    cluster = cluster_factory(lambda job, index, attempt: PodRun(log=lines, seconds=20))
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp_path / "kubeconfig"), namespace=NS))
    store = LocalStore(tmp_path / "store")
    config = RunConfig(name="k", stages=["generate"], executor="kubernetes", data={"train": [{"source": "bundled:helpful", "limit": 2}]},
                       kubernetes=k8s_config(namespace=NS).model_dump())
    batch, core = cluster.clients()
    thread, outcome = start(Controller(config, store, KubernetesExecutor(batch, core, store, config.kubernetes, namespace=NS)))
    wait_for(lambda: any("generate" in n for _, n in cluster.objects(JOBS)), what="the stage Job")
    (run_id,) = store.children("runs")
    env = {"CAI_STORE": str(tmp_path / "store")}
    follower = subprocess.Popen([sys.executable, "-m", "jobs.cli", "logs", run_id, "generate", "-f"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=REPO)
    time.sleep(3)  # the pod writes ~10 lines a second

    done = cai("cancel", run_id, "--reason", "quota", env=env)
    assert done.returncode == 0, done.stderr
    thread.join(30)
    assert isinstance(outcome[0], RunCancelled)
    assert not [n for _, n in cluster.objects(JOBS)]  # the stage's Job is gone (the controller deleted it)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    streamed = out.splitlines()
    assert streamed[:3] == ["pod line 0", "pod line 1", "pod line 2"] and 5 < len(streamed) < 200  # live, cut short by the cancel
    state = store.read_json(f"runs/{run_id}/run.json")
    assert state["status"] == "cancelled" and state["cancel"]["reason"] == "quota"
    assert state["rounds"][0]["stages"]["generate"]["status"] == "cancelled"


def test_submit_wait_follows_the_run_to_its_end(tmp_path, s3_bucket, cluster_factory, monkeypatch, capsys):
    from kube_emulator import NS, PodRun, put_service_account  # noqa: F811

    from jobs.store_s3 import S3Store

    outcomes = iter([PodRun(seconds=4), PodRun(exit_code=1, log="Traceback: boom\n")])
    cluster = cluster_factory(lambda job, index, attempt: next(outcomes))
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp_path / "kubeconfig"), namespace=NS))
    put_service_account(cluster)
    uri = f"s3://{s3_bucket}/wait"
    config = tmp_path / "run.yaml"
    config.write_text("name: waited\nkubernetes:\n  backoff_limit: 0\n")
    run_id = load_run_config(config).name + "-" + load_run_config(config).fingerprint()[:10]
    store = S3Store(uri, cache_root=tmp_path / "cache")

    def controller_writes() -> None:  # what the controller pod writes as it goes (the pod itself is scripted)
        for status in ("running", "completed"):
            time.sleep(1.0)
            store.write_json(f"runs/{run_id}/run.json", {"run_id": run_id, "status": status, "rounds": [], "updated_at": status})

    writer = threading.Thread(target=controller_writes, daemon=True)
    writer.start()
    try:
        assert main(["submit", "-c", str(config), "--store", uri, "--wait", "--interval", "0.2"]) == 0
        out = capsys.readouterr()
        assert f"run {run_id}  status=completed" in out.out and f"{run_id}: running" in out.err
        writer.join(10)
        from jobs.executors.k8s_manifests import controller_names
        from kube_emulator import JOBS  # noqa: F811

        job = controller_names(run_id)[0]
        wait_for(lambda: cluster.objects(JOBS)[(NS, job)].get("status", {}).get("conditions"), what="the first controller to end")
        # a controller that fails before its run.json says so: one line naming the Job, exit 1
        store.delete(f"runs/{run_id}")
        assert main(["submit", "-c", str(config), "--store", uri, "--wait", "--interval", "0.2", "--timeout", "60"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: job ") and "failed" in err and "kubectl logs" in err
    finally:
        store.close()


def test_help_examples_in_the_readme_parse():
    """Every `cai ...` line in the README's CLI cheat sheet is a command the parser accepts."""
    text = (REPO / "README.md").read_text()
    start = text.index("## CLI")
    block = text[start: text.index("\n## ", start + 5)]
    commands = [l.strip()[4:].split("  #")[0].strip() for l in block.splitlines() if l.strip().startswith("cai ")]
    assert len(commands) >= 15
    parser = build_parser()
    for c in commands:
        try:
            parser.parse_args(shlex.split(c.replace("CONFIG", "c.yaml").replace("RUN", "r1")))
        except SystemExit as done:  # `cai --version` prints and exits 0; anything else is a bad example
            assert done.code == 0 and c == "--version", c

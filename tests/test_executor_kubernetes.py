"""The Kubernetes executor against the official client doing real HTTP to an emulated API server
(kmock + a small job controller/kubelet, tests/kube_emulator.py): create, adopt, wait, fail with a
reason, copy pod logs; `cai run --executor kubernetes`, `cai submit`, `cai logs`; and, with
KUBECONFIG pointing at a real cluster, an end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.config import KubernetesConfig, RunConfig, StageSpec, load_run_config
from jobs.errors import StageFailed, SubmitError
from jobs.executors.k8s_manifests import INPUTS_HASH, SPEC_HASH, build_job, controller_names, to_dict
from jobs.executors.kubernetes import KubernetesExecutor
from jobs.executors.local import EXIT_CONFIG, pod_env, stage_command, stage_env
from jobs.manifest import build_manifest, inputs_digest, now_iso, write_manifest
from jobs.store import LocalStore
from kube_emulator import (  # noqa: F401 - cluster_factory is a fixture
    EXECUTE, JOBS, NS, PODS, PodRun, cluster_factory, executor, k8s_config, planted_spec, put_service_account,
)

import kmock


def stored_logs(store: LocalStore, spec: StageSpec) -> dict[str, str]:
    return {Path(k).stem: store.read_text(k) for k in store.list(f"{spec.output}/logs")}


# --- the command and env are the local executor's ---------------------------------------------------
def test_job_runs_the_local_executors_command_and_env():
    spec = StageSpec(stage="judge", run_id="r", round=2, store="s3://b/p", output="runs/r/round-2/judge", model="m")
    uri = "s3://b/p/runs/r/round-2/judge/spec.json"
    container = to_dict(build_job(spec, uri, KubernetesConfig(s3_secret="s3", s3_endpoint="http://minio:9000")))["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == stage_command("judge", uri)
    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert {k: literal[k] for k in pod_env()} == pod_env()  # same values, and listed first
    assert [e["name"] for e in container["env"][: len(pod_env())]] == list(pod_env())
    # the local executor lays exactly these over the parent's environment (they win over it)
    local = stage_env({"PATH": "/bin", "HF_HUB_OFFLINE": "0", "AWS_PROFILE": "x"})
    assert local == {"PATH": "/bin", "AWS_PROFILE": "x", **pod_env()}
    assert local["HF_HUB_OFFLINE"] == "1"


# --- create, wait, copy logs ------------------------------------------------------------------------
def test_creates_job_waits_and_copies_every_pods_log(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log=f"[generate] shard {i} line\n[generate] done\n", seconds=0.2))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store, shards=3)
    ex = executor(cluster, store)
    assert ex.run("generate", uri) == ""

    (ns, name), job = next(iter(cluster.objects(JOBS).items()))
    assert ns == NS and job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    assert job["metadata"]["annotations"][SPEC_HASH] == spec.spec_hash()
    logs = stored_logs(store, spec)
    assert sorted(logs) == sorted(cluster.pods_started) and len(logs) == 3
    for i in range(3):
        pod = next(p for p in logs if p.startswith(f"{name}-{i}-"))
        assert logs[pod] == f"[generate] shard {i} line\n[generate] done\n"


def test_a_log_that_looks_like_json_is_kept_verbatim(tmp_path, cluster_factory):
    text = '{"step": 1, "loss": 0.5}\n'
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log=text))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    executor(cluster, store).run("generate", uri)
    assert list(stored_logs(store, spec).values()) == [text]


def wait_for(condition, timeout: float = 20.0) -> None:
    """Until the emulated cluster gets there (a busy machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the emulated cluster did not get there"
        time.sleep(0.01)


def test_restarted_controller_adopts_the_running_job(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log="only once\n", seconds=2.0))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    k8s = k8s_config()
    # the Job an earlier controller created before it died, its pod running
    cluster.put(JOBS, to_dict(build_job(spec, uri, k8s, namespace=NS, inputs_hash=inputs_digest(store, spec))))
    wait_for(lambda: cluster.pods_started)
    executor(cluster, store).run("generate", uri)
    assert len(cluster.objects(JOBS)) == 1
    assert len(cluster.pods_started) == 1  # the work ran once
    assert list(stored_logs(store, spec).values()) == ["only once\n"]
    assert cluster.requests(kmock.action.CREATE, JOBS) == 1  # the executor's create, answered 409


def test_restarted_controller_adopts_a_partly_finished_indexed_job(tmp_path, cluster_factory):
    """Shard 0 of 2 finished, shard 1 running when the controller died: the new one adopts the Job, and
    no shard runs twice."""
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log=f"shard {i}\n", seconds=0.2 if i == 0 else 2.0))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store, shards=2)
    cluster.put(JOBS, to_dict(build_job(spec, uri, k8s_config(), namespace=NS, inputs_hash=inputs_digest(store, spec))))
    wait_for(lambda: len(cluster.pods_started) == 2)  # index 0 done, index 1 running
    (job,) = cluster.objects(JOBS).values()
    assert job["status"].get("succeeded") == 1 and len(cluster.pods_started) == 2
    executor(cluster, store).run("generate", uri)
    assert len(cluster.pods_started) == 2  # each index once, across both controllers
    assert sorted(stored_logs(store, spec).values()) == ["shard 0\n", "shard 1\n"]
    assert cluster.requests(kmock.action.CREATE, JOBS) == 1  # the executor's create, answered 409: adopted


def test_a_failed_job_of_the_same_spec_is_replaced(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log="second try\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    old = to_dict(build_job(spec, uri, k8s_config(), namespace=NS))
    old["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    cluster.put(JOBS, old)
    executor(cluster, store).run("generate", uri)
    job = cluster.objects(JOBS)[(NS, old["metadata"]["name"])]
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert list(stored_logs(store, spec).values()) == ["second try\n"]


def test_a_finished_job_of_the_same_spec_on_other_inputs_is_replaced(tmp_path, cluster_factory):
    """Same name and spec hash, but its inputs' bytes changed since (a prompt file edited in place): its
    Complete status says nothing about these inputs, so it is replaced and the work runs again."""
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log="on the new inputs\n"))
    store = LocalStore(tmp_path / "store")
    store.write_text("runs/r1/inputs/prompts.jsonl", '{"prompt": "old"}\n')
    spec = StageSpec(stage="generate", run_id="r1", round=1, store=store.uri, output="runs/r1/round-1/generate",
                     model="bundled:x", inputs={"prompts": "runs/r1/inputs/prompts.jsonl"})
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    uri = store.uri_for(spec.spec_key)
    old = to_dict(build_job(spec, uri, k8s_config(), namespace=NS, inputs_hash=inputs_digest(store, spec)))
    old["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    cluster.put(JOBS, old)
    store.write_text("runs/r1/inputs/prompts.jsonl", '{"prompt": "new"}\n')
    executor(cluster, store).run("generate", uri)
    job = cluster.objects(JOBS)[(NS, old["metadata"]["name"])]
    assert job["metadata"]["annotations"][INPUTS_HASH] == inputs_digest(store, spec) != old["metadata"]["annotations"][INPUTS_HASH]
    assert list(stored_logs(store, spec).values()) == ["on the new inputs\n"]


def test_a_finished_job_whose_outputs_were_deleted_runs_again(tmp_path, cluster_factory):
    """Deleting a stage's directory is how a user forces a rerun: a Complete Job of the same spec and
    inputs must not stand in for outputs that are no longer there."""
    cluster = cluster_factory(lambda job, i, attempt: PodRun(log="ran again\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    old = to_dict(build_job(spec, uri, k8s_config(), namespace=NS, inputs_hash=inputs_digest(store, spec)))
    old["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    cluster.put(JOBS, old)
    executor(cluster, store).run("generate", uri)
    assert list(stored_logs(store, spec).values()) == ["ran again\n"]


def test_a_job_with_another_spec_hash_is_not_adopted(tmp_path, cluster_factory):
    cluster = cluster_factory()
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    other = to_dict(build_job(spec, uri, k8s_config(), namespace=NS))
    other["metadata"]["annotations"][SPEC_HASH] = "0" * 64
    cluster.put(JOBS, other)
    with pytest.raises(SubmitError, match=r"exists with spec hash 0+, not .*kubectl delete job"):
        executor(cluster, store).run("generate", uri)


# --- failures, one line each ------------------------------------------------------------------------
def test_backoff_limit_reports_failures_and_the_last_log_line(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=1, log=f"loading\nRuntimeError: boom {attempt}\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    with pytest.raises(StageFailed) as e:
        executor(cluster, store, backoff_limit=2).run("generate", uri)
    msg = str(e.value)
    assert "\n" not in msg
    assert "BackoffLimitExceeded" in msg and "3 pod failure(s), backoffLimit 2" in msg and msg.endswith("RuntimeError: boom 2")
    assert len(stored_logs(store, spec)) == 3  # every attempt's log, not just the last


def test_config_error_exit_code_fails_at_once(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=EXIT_CONFIG, log="error: spec.json: params.x: bad value\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    with pytest.raises(StageFailed, match=r"PodFailurePolicy: config error \(exit 2, not retried\): error: spec.json: params.x: bad value$"):
        executor(cluster, store, backoff_limit=5).run("generate", uri)
    assert len(cluster.pods_started) == 1


def test_oom_killed_says_which_memory_setting_to_raise(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=137, reason="OOMKilled"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store, stage="train")
    with pytest.raises(StageFailed, match=r"OOMKilled at the memory limit 32Gi; raise kubernetes.stages.train.memory"):
        executor(cluster, store, backoff_limit=0).run("train", uri)


def test_deadline_exceeded(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(seconds=30, log="still going\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    stages = {"generate": {"active_deadline_seconds": 1}}
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=r"DeadlineExceeded: ran longer than activeDeadlineSeconds=1; raise kubernetes.stages.generate.active_deadline_seconds"):
        executor(cluster, store, stages=stages).run("generate", uri)
    assert time.monotonic() - t0 < 10
    assert list(stored_logs(store, spec).values()) == ["still going\n"]


def gang_pod_0_runs(other: PodRun):
    """A 2-pod gang: pod 0 really runs its torchrun launcher, which waits at the rendezvous for pod 1; pod 1
    does what the test says."""
    return lambda job, i, attempt: EXECUTE if i == 0 else other


def test_a_failed_gang_pod_stops_the_others_at_once(tmp_path, cluster_factory):
    """Under the gang's pod failure policy one failed pod fails the Job, and the Job controller deletes the
    rest: pod 0's launcher, left waiting for a peer that will never come, is stopped with its whole process
    tree (as the kubelet kills a container's cgroup) instead of waiting out its rendezvous timeout."""
    cluster = cluster_factory(gang_pod_0_runs(PodRun(exit_code=1, log="error: pod 1 failed on purpose\n", seconds=1)))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store, stage="train")
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=r"PodFailurePolicy.*: error: pod 1 failed on purpose$"):  # the cause, not the stopped peer
        executor(cluster, store, stages={"train": {"gpus": 0, "nodes": 2}}).run("train", uri)
    assert time.monotonic() - t0 < 60  # torchrun alone would wait 600 s for its peer
    assert len(cluster.pods_started) == 2
    assert not emulated_pod_processes()


def emulated_pod_processes() -> list[int]:
    """Processes of any EXECUTE pod still alive (each carries the emulator's marker in its environment)."""
    from kube_emulator import POD_MARKER

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(f"{POD_MARKER}=".encode()) for v in f.read().split(b"\0")):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_gang_past_its_deadline_is_stopped_with_its_processes(tmp_path, cluster_factory):
    """activeDeadlineSeconds ends a multi-node Job whose pods still run, launchers and all: DeadlineExceeded."""
    cluster = cluster_factory(gang_pod_0_runs(PodRun(seconds=60, log="waiting\n")))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store, stage="train")
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=r"DeadlineExceeded: ran longer than activeDeadlineSeconds=3"):
        executor(cluster, store, stages={"train": {"gpus": 0, "nodes": 2, "active_deadline_seconds": 3}}).run("train", uri)
    assert time.monotonic() - t0 < 60
    assert not emulated_pod_processes()


def test_image_pull_failure_fails_fast_with_the_image_and_deletes_the_job(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(waiting="ImagePullBackOff"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=r"cannot pull image registry.example/cai-generate:9.9 \(ImagePullBackOff\).* for 1s"):
        executor(cluster, store, image_repository="registry.example/cai", image_tag="9.9", image_pull_grace_s=1).run("generate", uri)
    assert cluster.objects(JOBS) == {} and time.monotonic() - t0 >= 1


def test_an_image_pull_error_that_clears_within_the_grace_is_waited_out(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(waiting="ErrImagePull", waiting_s=0.5, log="pulled at last\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    executor(cluster, store, image_pull_grace_s=30).run("generate", uri)
    assert list(stored_logs(store, spec).values()) == ["pulled at last\n"]


def test_evictions_do_not_count_as_failures(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=143, disrupted=True) if attempt == 0 else PodRun(log="ok\n"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    executor(cluster, store, backoff_limit=0).run("generate", uri)
    assert len(cluster.pods_started) == 2


def test_logs_are_copied_before_ttl_cleanup(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=1 if attempt == 0 else 0, log=f"attempt {attempt}\n", seconds=0.3))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    executor(cluster, store, ttl_seconds_after_finished=1).run("generate", uri)
    assert sorted(stored_logs(store, spec).values()) == ["attempt 0\n", "attempt 1\n"]
    deadline = time.monotonic() + 10
    while cluster.objects(JOBS) or cluster.objects(PODS):  # the TTL controller then removes Job and pods
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_each_pods_log_is_copied_when_the_pod_finishes_not_at_the_end(tmp_path, cluster_factory):
    """With ttlSecondsAfterFinished: 0 the Job and its pods vanish the moment it completes; the
    failed first attempt's log was copied while the retry ran, and the stage's manifest decides."""
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=1 if attempt == 0 else 0, log=f"attempt {attempt}\n", seconds=0.3))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    write_manifest(store, spec, build_manifest(spec, store, [], {}, {}, now_iso()))  # what the pod wrote
    assert executor(cluster, store, ttl_seconds_after_finished=0).run("generate", uri) == ""
    assert "attempt 0\n" in stored_logs(store, spec).values()


def test_a_job_deleted_before_it_finished_is_a_failure_unless_its_outputs_are_complete(tmp_path, cluster_factory):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(seconds=60))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    ex = executor(cluster, store)

    import threading

    def delete_soon():
        time.sleep(0.5)
        batch, _ = cluster.clients()
        batch.delete_namespaced_job(next(iter(cluster.objects(JOBS)))[1], NS)

    threading.Thread(target=delete_soon, daemon=True).start()
    with pytest.raises(StageFailed, match="was deleted before it finished; re-run"):
        ex.run("generate", uri)
    # the same, but the stage had written its manifest (a TTL that beat the poll): success
    write_manifest(store, spec, build_manifest(spec, store, [], {}, {}, now_iso()))
    threading.Thread(target=delete_soon, daemon=True).start()
    assert ex.run("generate", uri) == ""


def test_a_failed_multi_pod_job_whose_outputs_are_complete_is_done(tmp_path, cluster_factory):
    """Each pod of a 2-pod stage checks on its own whether the stage is done; when another attempt finishes it
    in between, rank 0 skips and the other pod fails waiting for it. The outputs stand: not a failure. A single
    pod that fails stays a failure whatever the store holds (its own error is what to report)."""
    cluster = cluster_factory(lambda job, i, attempt: PodRun(exit_code=1, log="rendezvous timed out"))
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    with pytest.raises(StageFailed, match="rendezvous timed out"):
        executor(cluster, store, stages={"generate": {"nodes": 2, "gpus": 0}}).run("generate", uri)
    write_manifest(store, spec, build_manifest(spec, store, [], {}, {}, now_iso()))
    assert executor(cluster, store, stages={"generate": {"nodes": 2, "gpus": 0}}).run("generate", uri) == ""
    with pytest.raises(StageFailed, match="rendezvous timed out"):
        executor(cluster, store, stages={"generate": {"gpus": 0}}).run("generate", uri)


def test_unreachable_api_server_is_one_line(tmp_path):
    from kubernetes import client

    conf = client.Configuration()
    conf.host = "http://127.0.0.1:9"  # discard port: nothing listens
    conf.retries = 0
    api = client.ApiClient(conf)
    store = LocalStore(tmp_path / "store")
    spec, uri = planted_spec(store)
    ex = KubernetesExecutor(client.BatchV1Api(api), client.CoreV1Api(api), store, k8s_config(), namespace=NS)
    with pytest.raises(SubmitError) as e:
        ex.run("generate", uri)
    assert "cannot reach the Kubernetes API" in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 75  # the controller Job retries it and the new pod adopts the stage Jobs


# --- `cai run --executor kubernetes`, `cai logs`, `cai submit` through the CLI ----------------------
def test_cai_run_on_the_emulated_cluster_runs_real_stage_pods(tmp_path, tiny_run_config, cluster_factory, monkeypatch, capsys):
    """Each pod runs the Job's container command with the Job's env as a real process (EXECUTE):
    2 shards -> an Indexed Job with 2 pods; the controller merges; a re-run submits nothing."""
    from jobs.executors.k8s_submit import render

    cluster = cluster_factory(lambda job, i, attempt: EXECUTE)
    config = tmp_path / "run.yaml"
    config.write_text(tiny_run_config.read_text().replace("generate:\n", "generate:\n  shards: 2\n")
                      + f"kubernetes:\n  namespace: {NS}\n  poll_seconds: 0.1\n")
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp_path / "kubeconfig")))
    store = tmp_path / "store"
    assert main(["run", "-c", str(config), "--store", str(store), "--executor", "kubernetes"]) == 0
    out = capsys.readouterr().out
    run_id = next(l.split()[1].rstrip(":") for l in out.splitlines() if l.startswith("run "))
    state = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert state["status"] == "completed" and state["rounds"][0]["stages"]["generate"]["counts"]["prompts"] == 6

    (ns, name), job = next(iter(cluster.objects(JOBS).items()))
    assert job["spec"]["completionMode"] == "Indexed" and len(cluster.pods_started) == 2
    # `cai render` printed exactly this Job
    rendered = list(yaml.safe_load_all(render(load_run_config(config), str(store))))
    assert [d["metadata"]["name"] for d in rendered if d] == [name]
    gen = store / "runs" / run_id / "round-1" / "generate"
    logs = sorted((gen / "logs").glob("*.log"))
    assert [p.stem for p in logs] == sorted(cluster.pods_started)
    assert all("[generate] shard" in p.read_text() for p in logs)
    assert (gen / "sft.jsonl").read_text().count("\n") == 6

    assert main(["logs", run_id, "generate", "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("==> ") == 2 and "[generate] shard 2/2" in printed

    assert main(["run", "-c", str(config), "--store", str(store), "--executor", "kubernetes"]) == 0
    assert len(cluster.pods_started) == 2 and cluster.requests(kmock.action.CREATE, JOBS) == 1


def test_cai_logs_without_logs_says_where_to_look(tmp_path, capsys):
    store = tmp_path / "store"
    run = {"run_id": "r9", "rounds": [{"round": 1, "stages": {"judge": {"status": "running", "output": "runs/r9/round-1/judge"}}}]}
    (store / "runs" / "r9").mkdir(parents=True)
    (store / "runs" / "r9" / "run.json").write_text(json.dumps(run))
    assert main(["logs", "r9", "judge", "--store", str(store)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no logs yet" in err and "kubectl logs -l cai-jobs/run=r9,cai-jobs/stage=judge" in err
    assert main(["logs", "r9", "train", "--store", str(store)]) == 1
    assert "stage train has not run" in capsys.readouterr().err


def test_cai_logs_reads_the_local_executors_layout_and_picks_the_round(tmp_path, capsys):
    store = tmp_path / "store"
    run = {"run_id": "r9", "base": {"evaluate": {"status": "completed", "output": "runs/r9/base/evaluate"}, "quality": 0.5},
           "rounds": [{"round": r, "stages": {"evaluate": {"status": "completed", "output": f"runs/r9/round-{r}/evaluate"}}} for r in (1, 2)]}
    for out in ("base/evaluate", "round-1/evaluate", "round-2/evaluate"):
        (store / "runs" / "r9" / out / "logs").mkdir(parents=True)
        (store / "runs" / "r9" / out / "logs" / "stage.log").write_text(f"[evaluate] {out}\n")
    (store / "runs" / "r9" / "run.json").write_text(json.dumps(run))
    assert main(["logs", "r9", "evaluate", "--store", str(store)]) == 0
    assert capsys.readouterr().out == "[evaluate] round-2/evaluate\n"  # the latest round; one file, no header
    assert main(["logs", "r9", "evaluate", "--round", "0", "--store", str(store)]) == 0
    assert capsys.readouterr().out == "[evaluate] base/evaluate\n"


def test_cai_submit_creates_the_config_map_and_the_controller_job(tmp_path, cluster_factory, monkeypatch, capsys):
    cluster = cluster_factory(lambda job, i, attempt: PodRun(seconds=60))  # the controller keeps running
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp_path / "kubeconfig"), namespace=NS))
    constitution = tmp_path / "mine.yaml"
    constitution.write_text(Path("constitutions/default.yaml").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(f"name: demo\nconstitution: {constitution}\nkubernetes:\n  s3_secret: s3-creds\n")

    assert main(["submit", "-c", str(config), "--store", "s3://bucket/runs"]) == 1
    assert "serviceaccount team-a/cai-controller: not found" in capsys.readouterr().err

    put_service_account(cluster)
    assert main(["submit", "-c", str(config), "--store", "s3://bucket/runs"]) == 0
    out = capsys.readouterr().out
    run_id = out.split()[1].rstrip(":")
    job_name, cm_name = controller_names(run_id)
    assert f"submitted as job {NS}/{job_name}" in out and f"cai get {run_id} -w --store s3://bucket/runs" in out
    cm = cluster.objects(kmock.resource("", "v1", "configmaps"))[(NS, cm_name)]
    pod_config = RunConfig.model_validate(yaml.safe_load(cm["data"]["run.yaml"]))
    assert pod_config.constitution == "/etc/cai/constitution.yaml" and pod_config.store == "s3://bucket/runs"
    assert pod_config.executor == "kubernetes" and pod_config.kubernetes.s3_secret == "s3-creds"
    assert cm["data"]["constitution.yaml"] == constitution.read_text()
    job = cluster.objects(JOBS)[(NS, job_name)]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["cai", "run", "-c", "/etc/cai/run.yaml", "--executor", "kubernetes",
                                    "--store", "s3://bucket/runs", "--run-id", run_id]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "cai-controller"
    assert container["image"] == "ghcr.io/cai-jobs/cai:0.1.0"

    # submitting again while it runs leaves the running controller alone
    assert main(["submit", "-c", str(config), "--store", "s3://bucket/runs"]) == 0
    assert "already running" in capsys.readouterr().out
    assert cluster.requests(kmock.action.CREATE, JOBS) == 2 and len(cluster.pods_started) == 1
    # once it has finished, submitting again starts a fresh controller (which resumes from the store)
    cluster._patch(JOBS, NS, job_name, {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
    assert main(["submit", "-c", str(config), "--store", "s3://bucket/runs"]) == 0
    assert "resubmitted (resumes from the store)" in capsys.readouterr().out
    assert not cluster.objects(JOBS)[(NS, job_name)].get("status", {}).get("conditions")


def test_cai_submit_needs_an_s3_store(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("name: demo\n")
    assert main(["submit", "-c", str(config), "--store", str(tmp_path / "local")]) == 1
    assert "which the cluster cannot read; pass --store s3://" in capsys.readouterr().err


# --- a real cluster ---------------------------------------------------------------------------------
def _cluster_or_skip() -> str:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        pytest.skip("KUBECONFIG is not set: no real cluster to run on (kind/k3d recipe in README)")
    store = os.environ.get("CAI_E2E_STORE")
    if not store or not store.startswith("s3://"):
        pytest.skip("CAI_E2E_STORE is not set to an s3:// store that both this machine and the cluster's pods can reach")
    from kubernetes import client, config

    try:
        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure here means: no cluster to test against
        pytest.skip(f"the cluster in KUBECONFIG={kubeconfig} is not reachable: {str(e).splitlines()[0][:200]}")
    return store


@pytest.mark.cluster
def test_cai_run_on_a_real_cluster(tmp_path):
    """`cai run --executor kubernetes` on kind/k3d with the stage images loaded and an in-cluster S3.
    Env: KUBECONFIG, CAI_E2E_STORE=s3://..., AWS_* and AWS_ENDPOINT_URL_S3 for this machine,
    CAI_E2E_IMAGE_REPOSITORY/CAI_E2E_IMAGE_TAG, CAI_E2E_S3_SECRET, CAI_E2E_S3_ENDPOINT (as pods see it)."""
    store = _cluster_or_skip()
    k8s = {
        "image_repository": os.environ.get("CAI_E2E_IMAGE_REPOSITORY", "cai-jobs/cai"),
        "image_tag": os.environ.get("CAI_E2E_IMAGE_TAG", "dev"),
        "image_pull_policy": "IfNotPresent",
        "s3_secret": os.environ.get("CAI_E2E_S3_SECRET"),
        "s3_endpoint": os.environ.get("CAI_E2E_S3_ENDPOINT"),
        "poll_seconds": 2,
        "stages": {"generate": {"gpus": 0, "cpu": "1", "memory": "3Gi", "ephemeral_storage": None}},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "e2e", "stages": ["generate"],
        "data": {"train": [{"source": "bundled:red-team", "limit": 2}, {"source": "bundled:helpful", "limit": 2}]},
        "generate": {"revision_rounds": 1, "max_new_tokens": 16, "critique_max_new_tokens": 8},
        "kubernetes": k8s,
    }))
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "-c", str(config), "--store", store, "--executor", "kubernetes"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = next(l.split()[1].rstrip(":") for l in result.stdout.splitlines() if l.startswith("run "))
    logs = subprocess.run([sys.executable, "-m", "jobs.cli", "logs", run_id, "generate", "--store", store],
                          capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "[generate]" in logs.stdout

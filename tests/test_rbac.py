"""RBAC that holds: every request the controller really sends is allowed by the Role it runs under.

The emulated API server (tests/kube_emulator.py) enforces no RBAC, so a missing grant would only
show up as a 403 on a real cluster. Here the server records every HTTP request the official client
sends while the executor runs stage Jobs (success, failure, adopting a Job, replacing a failed one,
an image that cannot be pulled, log copies) and while `cai run` / `cai realign` drive the cluster.
tests/rbac_check.py reads each request as the API server's RequestInfoResolver would and matches
it against the real Roles: the chart's (`helm template`) and the one `cai render --controller`
prints. Both must allow every request and grant nothing that no request needs.

`cai submit` runs on a person's machine with their own credentials, not as cai-controller: its
requests are pinned separately (SUBMITTER, also in README's "On a cluster"), so they never widen the
controller's Role.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from jobs.cli import main
from jobs.config import KubernetesConfig, RunConfig, StageSpec
from jobs.errors import StageFailed
from jobs.executors.k8s_manifests import build_job, to_dict
from jobs.executors.k8s_submit import render
from jobs.store import LocalStore
from kube_emulator import JOBS, NS, FakeCluster, HttpRequest, Kubelet, PodRun, executor, k8s_config, planted_spec, put_service_account
from rbac_check import RequestInfo, denied, grants, needed, request_info, role_allows, rule_allows
from test_helm import CHART, by_kind, docs, helm, run_helm  # noqa: F401 - helm is a fixture

import kmock

# What the controller's Role must grant, and why each one. Nothing watches (the executor polls) and
# nothing reads single pods, ConfigMaps (the kubelet mounts run.yaml) or Leases (the run lock is an
# object in the store, jobs/run_lock.py), so none of those is granted.
CONTROLLER_NEEDS = {
    ("batch", "jobs", "create"): "submit a stage Job",
    ("batch", "jobs", "get"): "poll a Job (.status comes with the object), adopt it, wait until a deleted one is gone",
    ("batch", "jobs", "delete"): "replace a failed Job of the same spec; remove a Job whose image cannot be pulled",
    ("", "pods", "list"): "find a Job's pods by the cai-jobs/job label",
    ("", "pods/log", "get"): "copy each pod's log into the store",
    ("", "services", "create"): "a multi-node Job's headless Service (its pods' rendezvous)",
    ("", "services", "delete"): "remove that Service once the Job has finished",
}
# `cai submit`, with the caller's own credentials (README, "On a cluster").
SUBMITTER = {
    ("", "serviceaccounts", "get"), ("", "configmaps", "create"), ("", "configmaps", "patch"),
    ("batch", "jobs", "create"), ("batch", "jobs", "get"), ("batch", "jobs", "delete"),
}
# (method, path with {ns}/{name}) -> (group, resource, verb): every kind of request the controller sends.
CONTROLLER_REQUESTS = {
    ("POST", "/apis/batch/v1/namespaces/{ns}/jobs"): ("batch", "jobs", "create"),
    ("GET", "/apis/batch/v1/namespaces/{ns}/jobs/{name}"): ("batch", "jobs", "get"),
    ("DELETE", "/apis/batch/v1/namespaces/{ns}/jobs/{name}"): ("batch", "jobs", "delete"),
    ("GET", "/api/v1/namespaces/{ns}/pods"): ("", "pods", "list"),
    ("GET", "/api/v1/namespaces/{ns}/pods/{name}/log"): ("", "pods/log", "get"),
    ("POST", "/api/v1/namespaces/{ns}/services"): ("", "services", "create"),
    ("DELETE", "/api/v1/namespaces/{ns}/services/{name}"): ("", "services", "delete"),
}
REALIGN_CONFIG = """
name: rbac
stages: [generate, train, evaluate]
data:
  train: [{source: bundled:helpful, limit: 2}]
kubernetes: {namespace: %s, poll_seconds: 0.02, backoff_limit: 0}
""" % NS


@contextlib.contextmanager
def recording(kubelet: Kubelet | None = None) -> Iterator[tuple[FakeCluster, list[HttpRequest]]]:
    """An emulated cluster; on exit the list holds every request its API server received."""
    cluster = FakeCluster(kubelet)
    seen: list[HttpRequest] = []
    try:
        yield cluster, seen
        seen += cluster.http_requests()
    finally:
        cluster.close()


# --- the scenarios, each against a fresh cluster ------------------------------------------------------
def run_succeeds(store: LocalStore) -> list[HttpRequest]:
    """Create an Indexed Job, wait, copy both pods' logs."""
    with recording(lambda job, i, attempt: PodRun(log=f"shard {i}\n", seconds=0.2)) as (cluster, seen):
        _, uri = planted_spec(store, shards=2)
        executor(cluster, store).run("generate", uri)
    return seen


def multi_node_train(store: LocalStore) -> list[HttpRequest]:
    """A 2-node train Job: its headless Service first, the Job, then the Service removed."""
    with recording(lambda job, i, attempt: PodRun(log=f"node {i}\n", seconds=0.2)) as (cluster, seen):
        _, uri = planted_spec(store, stage="train")
        executor(cluster, store, stages={"train": {"gpus": 0, "nodes": 2}}).run("train", uri)
    return seen


def run_fails(store: LocalStore) -> list[HttpRequest]:
    """Backoff limit reached: the failure message carries the failed pod's last log line."""
    with recording(lambda job, i, attempt: PodRun(exit_code=1, log="boom\n")) as (cluster, seen):
        _, uri = planted_spec(store, stage="judge")
        with pytest.raises(StageFailed, match="boom"):
            executor(cluster, store, backoff_limit=0).run("judge", uri)
    return seen


def adopts_running_job(store: LocalStore) -> list[HttpRequest]:
    """A restarted controller: create answers 409, the Job is read and watched."""
    with recording(lambda job, i, attempt: PodRun(log="once\n", seconds=0.3)) as (cluster, seen):
        spec, uri = planted_spec(store, stage="train")
        cluster.put(JOBS, to_dict(build_job(spec, uri, k8s_config(), namespace=NS)))
        executor(cluster, store).run("train", uri)
    return seen


def replaces_failed_job(store: LocalStore) -> list[HttpRequest]:
    """A failed Job of the same spec: delete it, wait until it is gone, create it again."""
    with recording() as (cluster, seen):
        spec, uri = planted_spec(store, stage="evaluate")
        old = to_dict(build_job(spec, uri, k8s_config(), namespace=NS))
        old["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
        cluster.put(JOBS, old)
        executor(cluster, store).run("evaluate", uri)
    return seen


def image_pull_fails(store: LocalStore) -> list[HttpRequest]:
    """A pod that can never start: the Job is deleted at once."""
    with recording(lambda job, i, attempt: PodRun(waiting="ImagePullBackOff")) as (cluster, seen):
        _, uri = planted_spec(store, stage="generate", shards=1)
        with pytest.raises(StageFailed, match="cannot pull image"):
            executor(cluster, store, image_pull_grace_s=0).run("generate", uri)  # the same requests after any grace
    return seen


def cli_on_cluster(args: list[str], tmp: Path) -> list[HttpRequest]:
    """`cai run`/`cai realign --executor kubernetes` through KUBECONFIG, as the chart's controller pods run them.
    realign talks to the API only through KubernetesExecutor (make_executor): its lock and the promotion
    pointer are store objects, not Leases or ConfigMaps. The tick's first stage Job (the base evaluation)
    fails here, which ends the tick; later stage Jobs would send the same requests."""
    config = tmp / "run.yaml"
    config.write_text(REALIGN_CONFIG)
    with recording(lambda job, i, attempt: PodRun(exit_code=1, log="stage failed on purpose\n")) as (cluster, seen):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp / "kubeconfig"), namespace=NS))
            assert main([*args, "-c", str(config), "--store", str(tmp / "store"), "--executor", "kubernetes"]) == 1
        assert cluster.requests(kmock.action.CREATE, JOBS) >= 1, "the command never reached the cluster"
    return seen


def cai_submit(tmp: Path) -> list[HttpRequest]:
    """Missing ServiceAccount, first submit, submit while running, resubmit after it failed."""
    config = tmp / "submit.yaml"
    config.write_text("name: demo\nkubernetes:\n  s3_secret: s3-creds\n")
    argv = ["submit", "-c", str(config), "--store", "s3://bucket/runs"]
    with recording(lambda job, i, attempt: PodRun(seconds=60)) as (cluster, seen):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp / "kubeconfig"), namespace=NS))
            assert main(argv) == 1  # no ServiceAccount yet
            put_service_account(cluster)
            assert main(argv) == 0 and main(argv) == 0  # created, then already running
            ((_, job),) = cluster.objects(JOBS)  # the controller Job
            cluster._patch(JOBS, NS, job, {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
            assert main(argv) == 0  # replaced
    return seen


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[HttpRequest]]:
    """Scenario -> the requests its API server received."""
    def store(name: str) -> LocalStore:
        return LocalStore(tmp_path_factory.mktemp(name) / "store")

    scenarios: dict[str, Callable[[], list[HttpRequest]]] = {
        "executor: create, wait, copy logs": lambda: run_succeeds(store("ok")),
        "executor: job fails": lambda: run_fails(store("fail")),
        "executor: multi-node train": lambda: multi_node_train(store("nodes")),
        "executor: adopt a running job": lambda: adopts_running_job(store("adopt")),
        "executor: replace a failed job": lambda: replaces_failed_job(store("replace")),
        "executor: image pull failure": lambda: image_pull_fails(store("pull")),
        "cai run": lambda: cli_on_cluster(["run"], tmp_path_factory.mktemp("run")),
        "cai realign": lambda: cli_on_cluster(["realign"], tmp_path_factory.mktemp("realign")),
        "cai submit": lambda: cai_submit(tmp_path_factory.mktemp("submit")),
    }
    return {name: fn() for name, fn in scenarios.items()}


def infos(requests: list[HttpRequest]) -> list[RequestInfo]:
    return [request_info(r.method, r.path, r.query) for r in requests]


def controller_requests(recorded: dict[str, list[HttpRequest]]) -> list[HttpRequest]:
    return [r for name, requests in recorded.items() if name != "cai submit" for r in requests]


def path_pattern(info: RequestInfo) -> str:
    """The request's path with its namespace and object name replaced by placeholders."""
    path = re.sub(r"/namespaces/[^/]+", "/namespaces/{ns}", info.path, count=1)
    return re.sub(rf"/{re.escape(info.resource)}/[^/]+", f"/{info.resource}/{{name}}", path, count=1) if info.name else path


def describe(infos: list[RequestInfo]) -> str:
    return "; ".join(sorted({f"{i.verb} {i.combined or i.path} ({i.group or 'core'})" for i in infos}))


# --- the Roles, as installed ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart_objects(helm: Path) -> list[dict]:
    """`helm template` with the install Job too, in the namespace the scenarios used."""
    return docs(run_helm(helm, "template", "cai", str(CHART), "-n", NS, "--set", "runOnInstall=true").stdout)


@pytest.fixture(scope="module")
def render_objects() -> list[dict]:
    """What `cai render --controller -n NS` prints."""
    return docs(render(RunConfig(), "s3://bucket/cai", namespace=NS, controller=True))


@pytest.fixture(scope="module", params=["chart", "render"])
def role(request: pytest.FixtureRequest) -> dict:
    objs = request.getfixturevalue(f"{request.param}_objects")
    (found,) = by_kind(objs, "Role")
    return found


def bound_role(objs: list[dict], service_account: str) -> dict | None:
    """The Role a ServiceAccount gets through a RoleBinding in its namespace, or None."""
    for binding in by_kind(objs, "RoleBinding"):
        subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
        if ("ServiceAccount", service_account, binding["metadata"]["namespace"]) in subjects and binding["roleRef"]["kind"] == "Role":
            return next(r for r in by_kind(objs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
    return None


# --- the checks ----------------------------------------------------------------------------------------
def test_every_controller_request_is_allowed(recorded: dict[str, list[HttpRequest]], role: dict) -> None:
    for name, requests in recorded.items():
        if name == "cai submit":
            continue
        assert requests, f"{name}: no request recorded"
        missing = denied(role, infos(requests))
        assert not missing, f"{name}: the Role {role['metadata']['name']} would answer 403 to: {describe(missing)}"


def test_the_role_grants_exactly_what_the_controller_uses(recorded: dict[str, list[HttpRequest]], role: dict) -> None:
    used = needed(infos(controller_requests(recorded)))
    granted = grants(role)
    assert not granted - used, f"granted but never used (drop them): {sorted(granted - used)}"
    assert not used - granted, f"used but not granted: {sorted(used - granted)}"
    assert used == set(CONTROLLER_NEEDS)


def test_the_controller_sends_only_these_requests(recorded: dict[str, list[HttpRequest]]) -> None:
    """A new kind of API call shows up here (and then needs a grant in both Roles)."""
    requests = controller_requests(recorded)
    seen = {(r.method, path_pattern(i)): (i.group, i.combined, i.verb) for r, i in zip(requests, infos(requests))}
    assert seen == CONTROLLER_REQUESTS
    assert all(i.namespace == NS for i in infos(requests))  # never cluster-scoped


def test_cai_submit_needs_what_the_readme_says(recorded: dict[str, list[HttpRequest]]) -> None:
    submitted = infos(recorded["cai submit"])
    assert needed(submitted) == SUBMITTER and all(i.namespace == NS for i in submitted)
    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
    assert "`cai submit` uses your own credentials" in readme


def test_controller_pods_run_as_the_account_the_role_is_bound_to(chart_objects: list[dict], render_objects: list[dict],
                                                                  recorded: dict[str, list[HttpRequest]]) -> None:
    """The CronJob's `cai realign` and the install Job's `cai run` (chart), and `cai submit`'s Job (render)."""
    pods = {"chart CronJob": by_kind(chart_objects, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "chart install Job": by_kind(chart_objects, "Job")[0]["spec"]["template"]["spec"]}
    controller_job = next(j for j in by_kind(render_objects, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
    pods["rendered controller Job"] = controller_job["spec"]["template"]["spec"]
    for where, pod in pods.items():
        objs = chart_objects if where.startswith("chart") else render_objects
        role = bound_role(objs, pod["serviceAccountName"])
        assert role is not None, f"{where}: ServiceAccount {pod['serviceAccountName']} has no Role"
        assert pod.get("automountServiceAccountToken", True) is True, f"{where}: the controller needs its token"
        for scenario in ("cai realign", "cai run"):
            assert not denied(role, infos(recorded[scenario])), f"{where}: {scenario} would get 403"


def test_stage_pods_get_no_token_and_no_role(chart_objects: list[dict]) -> None:
    k8s = KubernetesConfig(service_account="cai-stage")
    spec = StageSpec(stage="train", run_id="r", round=1, store="s3://b/p", output="runs/r/round-1/train", model="m")
    pod = to_dict(build_job(spec, "s3://b/p/runs/r/round-1/train/spec.json", k8s, namespace=NS))["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (stage_sa,) = [sa for sa in by_kind(chart_objects, "ServiceAccount") if sa["metadata"]["name"] == "cai-stage"]
    assert stage_sa["automountServiceAccountToken"] is False
    assert bound_role(chart_objects, "cai-stage") is None


# --- the authorizer itself ------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/apis/batch/v1/namespaces/ml/jobs/j", "", ("batch", "jobs", "", "get", "ml", "j")),
    ("GET", "/apis/batch/v1/namespaces/ml/jobs/j/status", "", ("batch", "jobs", "status", "get", "ml", "j")),
    ("GET", "/apis/batch/v1/namespaces/ml/jobs", "labelSelector=a%3Db", ("batch", "jobs", "", "list", "ml", "")),
    ("GET", "/apis/batch/v1/namespaces/ml/jobs", "watch=true", ("batch", "jobs", "", "watch", "ml", "")),
    ("GET", "/apis/batch/v1/watch/namespaces/ml/jobs", "", ("batch", "jobs", "", "watch", "ml", "")),
    ("GET", "/api/v1/namespaces/ml/pods", "fieldSelector=metadata.name%3Dp", ("", "pods", "", "list", "ml", "p")),
    ("GET", "/api/v1/namespaces/ml/pods/p/log", "container=stage", ("", "pods", "log", "get", "ml", "p")),
    ("POST", "/api/v1/namespaces/ml/configmaps", "", ("", "configmaps", "", "create", "ml", "")),
    ("PUT", "/apis/batch/v1/namespaces/ml/jobs/j/status", "", ("batch", "jobs", "status", "update", "ml", "j")),
    ("PATCH", "/api/v1/namespaces/ml/configmaps/c", "", ("", "configmaps", "", "patch", "ml", "c")),
    ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/j", "", ("batch", "jobs", "", "delete", "ml", "j")),
    ("DELETE", "/apis/batch/v1/namespaces/ml/jobs", "", ("batch", "jobs", "", "deletecollection", "ml", "")),
    ("GET", "/api/v1/namespaces/ml", "", ("", "namespaces", "", "get", "ml", "ml")),
    ("GET", "/api/v1/nodes", "", ("", "nodes", "", "list", "", "")),
    ("GET", "/version", "", ("", "", "", "get", "", "")),
])
def test_request_info_reads_requests_like_the_api_server(method: str, path: str, query: str, expected: tuple) -> None:
    i = request_info(method, path, query)
    assert (i.group, i.resource, i.subresource, i.verb, i.namespace, i.name) == expected


def _info(resource: str, verb: str = "get", subresource: str = "", group: str = "batch", name: str = "j") -> RequestInfo:
    return RequestInfo(verb=verb, path="/", group=group, version="v1", resource=resource, subresource=subresource, namespace="ml", name=name)


@pytest.mark.parametrize(("rule", "info", "allowed"), [
    ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}, _info("jobs"), True),
    ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}, _info("jobs", subresource="status"), False),  # the bug this file guards
    ({"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]}, _info("jobs", subresource="status"), True),
    ({"apiGroups": ["batch"], "resources": ["*/status"], "verbs": ["get"]}, _info("jobs", subresource="status"), True),
    ({"apiGroups": ["batch"], "resources": ["*/status"], "verbs": ["get"]}, _info("jobs"), False),
    ({"apiGroups": ["batch"], "resources": ["*"], "verbs": ["get"]}, _info("jobs", subresource="status"), True),
    ({"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["*"]}, _info("jobs", verb="delete"), True),
    ({"apiGroups": [""], "resources": ["jobs"], "verbs": ["get"]}, _info("jobs"), False),  # wrong group
    ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}, _info("jobs", verb="list", name=""), False),
    ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"], "resourceNames": ["j"]}, _info("jobs"), True),
    ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"], "resourceNames": ["other"]}, _info("jobs"), False),
])
def test_rule_matching_follows_rbac(rule: dict[str, Any], info: RequestInfo, allowed: bool) -> None:
    assert rule_allows(rule, info) is allowed


def test_a_role_grants_only_in_its_namespace() -> None:
    role = {"metadata": {"namespace": "ml"}, "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
    assert role_allows(role, request_info("GET", "/api/v1/namespaces/ml/pods"))
    assert not role_allows(role, request_info("GET", "/api/v1/namespaces/other/pods"))
    assert not role_allows(role, request_info("GET", "/api/v1/nodes"))
    assert not role_allows(role, request_info("GET", "/version"))

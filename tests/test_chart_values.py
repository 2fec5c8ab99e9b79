"""The chart's Helm-convention values, rendered with the real helm: extraEnv / extraEnvFrom /
extraVolumes / extraVolumeMounts on every pod the chart renders and, through run.yaml, on the stage
Jobs its controller submits; the optional model-cache claim; the name overrides on the new objects;
and the failures a bad value gives at `helm template`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_helm import CHART, K8S_VERSIONS, NS, by_kind, docs, helm, load_run_config, pod_specs, run_helm, run_yaml, template  # noqa: F401 - helm is a fixture

EXTRAS = {
    "extraEnv": [
        {"name": "AWS_CA_BUNDLE", "value": "/etc/ssl/private-ca/ca.crt"},
        {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
    ],
    "extraEnvFrom": [{"configMapRef": {"name": "site-env"}}, {"secretRef": {"name": "site-secrets"}, "prefix": "SITE_"}],
    "extraVolumes": [{"name": "private-ca", "configMap": {"name": "private-ca"}}],
    "extraVolumeMounts": [{"name": "private-ca", "mountPath": "/etc/ssl/private-ca", "readOnly": True}],
}


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def chart_pods(objs: list[dict]) -> dict[str, dict]:
    """Every pod spec the chart renders, by what it is: the install Job's, the CronJob's and the test pod's."""
    pods = {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"] for d in by_kind(objs, "Job")}
    pods |= {f"CronJob/{d['metadata']['name']}": d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in by_kind(objs, "CronJob")}
    pods |= {f"Pod/{d['metadata']['name']}": d["spec"] for d in by_kind(objs, "Pod")}
    return pods


@pytest.fixture(scope="module")
def extras_render(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("extras")
    return docs(template(helm, "-f", values_file(tmp, EXTRAS), "--set", "runOnInstall=true", "--set", "hf.tokenSecret=hf-token",
                         "--set", "s3.existingSecret=store-creds"))


def test_extras_reach_every_chart_pod(extras_render: list[dict]) -> None:
    pods = chart_pods(extras_render)
    assert sorted(pods) == ["CronJob/cai-realign", "Job/" + by_kind(extras_render, "Job")[0]["metadata"]["name"], "Pod/cai-test-store"]
    for what, pod in pods.items():
        (c,) = pod["containers"]
        n = len(EXTRAS["extraEnv"])
        assert c["env"][-n:] == EXTRAS["extraEnv"], what  # after the chart's own env: a later entry wins
        assert c["envFrom"] == EXTRAS["extraEnvFrom"], what
        assert EXTRAS["extraVolumeMounts"][0] in c["volumeMounts"], what
        assert EXTRAS["extraVolumes"][0] in pod["volumes"], what
        names = [e["name"] for e in c["env"]]
        assert len(names) == len(set(names)), f"{what}: an env name twice: {names}"


def test_extras_render_validates_strict(extras_render: list[dict]) -> None:
    import kubernetes_validate

    for obj in extras_render:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


STAGES = ("generate", "judge", "train", "evaluate")


def stage_pod(k8s, stage: str) -> dict:
    """A stage Job's pod as the chart's controller builds it from run.yaml."""
    from jobs.config import StageSpec
    from jobs.executors.k8s_manifests import build_job, to_dict

    spec = StageSpec(stage=stage, run_id="r", round=1, store="s3://cai-jobs/cai", output=f"runs/r/round-1/{stage}", model="m")
    return to_dict(build_job(spec, f"s3://cai-jobs/cai/runs/r/round-1/{stage}/spec.json", k8s, namespace=NS))["spec"]["template"]["spec"]


def test_extras_reach_the_stage_jobs_through_run_yaml(extras_render: list[dict], tmp_path: Path) -> None:
    import kubernetes_validate

    k8s = load_run_config(run_yaml(extras_render), tmp_path).kubernetes
    assert (k8s.extra_env, k8s.extra_env_from) == (EXTRAS["extraEnv"], EXTRAS["extraEnvFrom"])
    assert (k8s.extra_volumes, k8s.extra_volume_mounts) == (EXTRAS["extraVolumes"], EXTRAS["extraVolumeMounts"])
    for stage in STAGES:
        pod = stage_pod(k8s, stage)
        (c,) = pod["containers"]
        assert c["env"][-len(EXTRAS["extraEnv"]):] == EXTRAS["extraEnv"] and c["envFrom"] == EXTRAS["extraEnvFrom"], stage
        assert EXTRAS["extraVolumes"][0] in pod["volumes"] and EXTRAS["extraVolumeMounts"][0] in c["volumeMounts"], stage
        assert not {"HF_TOKEN", "HF_TOKEN_PATH"} & {e["name"] for e in c["env"]}  # hf.tokenSecret stays the controller's
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, K8S_VERSIONS[-1], strict=True)


def test_chart_controller_pods_equal_cai_submits_with_extras(extras_render: list[dict], tmp_path: Path) -> None:
    """The chart's controller pods and the one `cai submit` creates from the same run.yaml: the same env,
    envFrom and mounts in the same order, the same volumes (the ConfigMap's name aside)."""
    from jobs.executors.k8s_manifests import build_controller_job, to_dict

    k8s = load_run_config(run_yaml(extras_render), tmp_path).kubernetes
    submitted = to_dict(build_controller_job("r", "s3://cai-jobs/cai", k8s, namespace=NS))["spec"]["template"]["spec"]
    (sc,) = submitted["containers"]
    for pod in pod_specs(extras_render):
        (c,) = pod["containers"]
        assert (c["env"], c["envFrom"], c["volumeMounts"]) == (sc["env"], sc["envFrom"], sc["volumeMounts"])
        assert [v for v in pod["volumes"] if v["name"] != "config"] == [v for v in submitted["volumes"] if v["name"] != "config"]
        assert [v["name"] for v in pod["volumes"]] == [v["name"] for v in submitted["volumes"]]


def test_no_extras_by_default(helm: Path) -> None:
    for what, pod in chart_pods(docs(template(helm, "--set", "runOnInstall=true"))).items():
        (c,) = pod["containers"]
        assert "envFrom" not in c, what
        assert {v["name"] for v in pod["volumes"]} <= {"cache", "tmp", "config"}, what


def test_lint_strict_with_every_new_value(helm: Path, tmp_path: Path) -> None:
    values = {**EXTRAS, "modelCache": {"enabled": True, "storageClassName": "fast-ssd", "accessModes": ["ReadWriteMany"]},
              "networkPolicy": {"enabled": True}, "runOnInstall": True}
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


# --- the model cache ------------------------------------------------------------------------------
def test_model_cache_is_off_by_default(default_objs: list[dict]) -> None:
    assert not by_kind(default_objs, "PersistentVolumeClaim")
    for pod in pod_specs(default_objs):
        assert {"name": "cache", "emptyDir": {}} in pod["volumes"]


@pytest.fixture(scope="module")
def default_objs(helm: Path) -> list[dict]:
    return docs(template(helm))


def cache_env_and_mount(pod: dict) -> tuple[dict[str, str], str]:
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "cache"]
    return env, mount


def test_model_cache_claim_is_the_controller_pods_cache(helm: Path) -> None:
    import kubernetes_validate

    objs = docs(template(helm, "--set", "modelCache.enabled=true", "--set", "runOnInstall=true"))
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pvc, version, strict=True)
    assert pvc["metadata"]["name"] == "cai-model-cache"
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}  # the cluster's default class
    pods = pod_specs(objs)
    assert len(pods) == 2  # the install Job and the CronJob
    for pod in pods:
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": "cai-model-cache"}} in pod["volumes"]
        env, mount = cache_env_and_mount(pod)
        assert mount == "/var/cache/cai"
        assert env["CAI_CACHE_DIR"] == mount and env["HF_HOME"].startswith(mount + "/")  # both land on the claim
    (test_pod,) = by_kind(objs, "Pod")
    assert not [v for v in test_pod["spec"]["volumes"] if "persistentVolumeClaim" in v]  # never holds a ReadWriteOnce claim


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "modelCache.storageClassName=fast-ssd", "--set", "modelCache.size=200Gi", "--set", "modelCache.accessModes={ReadWriteMany}"],
     {"accessModes": ["ReadWriteMany"], "storageClassName": "fast-ssd", "resources": {"requests": {"storage": "200Gi"}}}),
    (["--set", "modelCache.storageClassName=-"],  # no class: binds a pre-provisioned volume
     {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "resources": {"requests": {"storage": "50Gi"}}}),
])
def test_model_cache_claim_settings(helm: Path, args: list[str], expected: dict) -> None:
    (pvc,) = by_kind(docs(template(helm, "--set", "modelCache.enabled=true", *args)), "PersistentVolumeClaim")
    assert pvc["spec"] == expected


def test_model_cache_reaches_the_stage_pods_only_when_asked(helm: Path, tmp_path: Path) -> None:
    def k8s(*args: str):
        return load_run_config(run_yaml(docs(template(helm, "--set", "modelCache.enabled=true", *args))), tmp_path).kubernetes

    assert k8s().cache_claim is None  # the stage pods keep their emptyDir
    shared = k8s("--set", "modelCache.stages=true", "--set", "modelCache.accessModes={ReadWriteMany}")
    assert shared.cache_claim == "cai-model-cache"
    for stage in STAGES:
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": "cai-model-cache"}} in stage_pod(shared, stage)["volumes"]
    assert k8s("--set", "modelCache.stages=true", "--set", "modelCache.existingClaim=team-cache").cache_claim == "team-cache"
    assert load_run_config(run_yaml(docs(template(helm, "--set", "modelCache.stages=true"))), tmp_path).kubernetes.cache_claim is None
    # ReadWriteOnce: the stage pods on GPU nodes would wait forever for the controller's node to let go
    proc = run_helm(helm, "template", "cai", str(CHART), "--set", "modelCache.enabled=true", "--set", "modelCache.stages=true", check=False)
    assert proc.returncode != 0 and "modelCache.stages: the stage pods (GPU nodes) mount the claim" in proc.stderr, proc.stderr
    assert "add ReadWriteMany to modelCache.accessModes" in proc.stderr


def test_model_cache_existing_claim(helm: Path) -> None:
    objs = docs(template(helm, "--set", "modelCache.enabled=true", "--set", "modelCache.existingClaim=shared-hf-cache"))
    assert not by_kind(objs, "PersistentVolumeClaim")
    for pod in pod_specs(objs):
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": "shared-hf-cache"}} in pod["volumes"]


def test_name_overrides_name_the_new_objects(helm: Path) -> None:
    def names(release: str, *args: str) -> set[tuple[str, str]]:
        objs = docs(run_helm(helm, "template", release, str(CHART), "-n", NS, "--set", "modelCache.enabled=true",
                             "--set", "networkPolicy.enabled=true", *args).stdout)
        return {(d["kind"], d["metadata"]["name"]) for d in objs if d["kind"] in ("PersistentVolumeClaim", "Pod", "NetworkPolicy")}

    assert names("cai", "--set", "fullnameOverride=align") == {
        ("PersistentVolumeClaim", "align-model-cache"), ("Pod", "align-test-store"),
        ("NetworkPolicy", "align-controller"), ("NetworkPolicy", "align-stage"), ("NetworkPolicy", "align-test")}
    assert ("Pod", "prod-rlaif-test-store") in names("prod", "--set", "nameOverride=rlaif")
    assert ("PersistentVolumeClaim", "cai-prod-model-cache") in names("cai-prod")  # contains "cai": the release name alone


# --- bad values fail at template, saying which ----------------------------------------------------
@pytest.mark.parametrize(("values", "message"), [
    ({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, 'extraVolumes: "tmp" is a volume the chart mounts itself'),
    ({"extraVolumes": [{"name": "scratch", "emptyDir": {}}], "extraVolumeMounts": [{"name": "scratch", "mountPath": "/var/cache/cai/"}]},
     "extraVolumeMounts: /var/cache/cai/ is a path the chart mounts itself"),
    ({"extraVolumeMounts": [{"name": "privat-ca", "mountPath": "/etc/ssl/ca"}]}, 'extraVolumeMounts: "privat-ca" (at /etc/ssl/ca) names no volume'),
])
def test_clashing_extras_fail(helm: Path, tmp_path: Path, values: dict, message: str) -> None:
    # with the controller pods, and with the test pod alone (no CronJob, no install Job): each checks
    for args in ([], ["--set", "realign.enabled=false", "--set", "runOnInstall=false"]):
        proc = run_helm(helm, "template", "cai", str(CHART), "-f", values_file(tmp_path, values), *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert by_kind(docs(template(helm, "--set", "realign.enabled=false")), "Pod")  # the test pod renders on its own


@pytest.mark.parametrize(("args", "message"), [
    (["--set-json", 'extraEnv=[{"value":"x"}]'], "extraEnv.0: name is required"),
    (["--set-json", 'extraVolumeMounts=[{"name":"a","mountPath":"relative"}]'], "extraVolumeMounts.0.mountPath: Does not match pattern"),
    (["--set-json", 'extraVolumes=[{"name":"Bad_Name","emptyDir":{}}]'], "extraVolumes.0.name: Does not match pattern"),
    (["--set", "extraEnv=FOO=bar"], "extraEnv: Invalid type. Expected: array"),
    (["--set", "modelCache.accessModes={ReadWriteSometimes}"], "modelCache.accessModes.0: modelCache.accessModes.0 must be one of the following"),
    (["--set", "modelCache.size=lots"], "modelCache.size: Does not match pattern"),
    (["--set", "modelCache.storageClassName=Fast SSD"], "modelCache.storageClassName: Does not match pattern"),
    (["--set", "modelCache.enabled=yes please"], "modelCache.enabled: Invalid type. Expected: boolean"),
    (["--set", "modelCache.mountPath=/cache"], "modelCache: Additional property mountPath is not allowed"),
])
def test_bad_new_values_fail_the_schema(helm: Path, args: list[str], message: str) -> None:
    proc = run_helm(helm, "template", "cai", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm template {' '.join(args)} should have failed"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_schema_describes_the_new_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    for key in ("extraEnv", "extraEnvFrom", "extraVolumes", "extraVolumeMounts", "modelCache"):
        assert schema["properties"][key]["description"]
    assert set(schema["properties"]["modelCache"]["properties"]) == {"enabled", "stages", "size", "storageClassName", "accessModes", "existingClaim"}

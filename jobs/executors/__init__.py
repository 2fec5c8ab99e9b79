"""Executors run a StageSpec somewhere: a local subprocess, or a Kubernetes Job (same command and env)."""

from __future__ import annotations

import sys

from .local import LocalExecutor, pod_env, stage_command

__all__ = ["LocalExecutor", "make_executor", "pod_env", "stage_command"]


def make_executor(config, store, executor: str | None = None):
    """The executor a run config asks for (`executor`, when given, overrides `config.executor`).
    The Kubernetes one is imported only here: a local run needs no kubernetes client."""
    kind = executor or config.executor
    if kind == "local":
        return LocalExecutor()
    from .k8s_manifests import check_pod_fragments, check_train_layout
    from .kubernetes import KubernetesExecutor

    check_train_layout(config.train.distributed.processes, config.kubernetes.stages["train"].gpus,  # before the lock
                       config.train.distributed.strategy)
    check_pod_fragments(config.kubernetes)
    if not store.uri.startswith("s3://"):
        print(f"[cai] warning: store {store.uri} is a local directory; stage pods can read it only if it is mounted "
              "at the same path; use --store s3://bucket/prefix", file=sys.stderr, flush=True)
    return KubernetesExecutor.from_environment(store, config.kubernetes)

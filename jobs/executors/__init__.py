"""Executors run a StageSpec somewhere: a local subprocess now, a Kubernetes Job later."""

from .local import LocalExecutor, stage_command

__all__ = ["LocalExecutor", "stage_command"]

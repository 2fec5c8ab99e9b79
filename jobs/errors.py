"""Errors the CLI prints as one line (file, field, what to fix) instead of a traceback.

Exit codes: 1 a stage failed, 2 bad input (retrying cannot help), 75 (EX_TEMPFAIL) something outside
was briefly unavailable (the store, the Kubernetes API, a lock held by a live controller): the pod
failure policies retry 75 and fail fast on 1 and 2.
"""

from __future__ import annotations

from collections.abc import Iterable

EX_TEMPFAIL = 75


class CaiError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


class ConfigError(CaiError):
    """A config, constitution or spec file is malformed; the message names file, field and fix."""

    exit_code = 2


class DataError(CaiError):
    """Prompt data cannot be read at all (individual bad rows are counted, not raised)."""

    exit_code = 2


class ModelError(CaiError):
    """A model reference cannot be resolved or loaded."""

    exit_code = 2


class StoreError(CaiError):
    """The artifact store cannot be read or written."""


class StoreUnavailable(StoreError):
    """The store did not answer (connection, timeout, 5xx, throttling) after the client's retries."""

    exit_code = EX_TEMPFAIL


class NotFound(StoreError):
    """The key is not in the store: an answer, unlike a transport error, which says nothing."""


class StageFailed(CaiError):
    """A stage process exited non-zero."""


class SubmitError(CaiError):
    """An executor could not submit or watch a stage."""


class ApiUnavailable(SubmitError):
    """The Kubernetes API did not answer (connection, 5xx, 429) for longer than the executor waits."""

    exit_code = EX_TEMPFAIL


def reported_line(lines: Iterable[str]) -> str:
    """What a failed stage said: its own last `error: ...` line (under torchrun it comes before the launcher's
    summary), else its last line."""
    lines = [line.strip() for line in lines if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "no output")

"""Errors the CLI prints as one line (file, field, what to fix) instead of a traceback."""


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


class NotFound(StoreError):
    """The key is not in the store: an answer, unlike a transport error, which says nothing."""


class StageFailed(CaiError):
    """A stage process exited non-zero."""


class SubmitError(CaiError):
    """An executor could not submit or watch a stage."""

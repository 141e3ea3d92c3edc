"""Exceptions with one-line, actionable messages (the CLI prints them without a traceback).

Room: a leaf (imports nothing); every module may raise these.
"""


class DDMError(Exception):
    """Base class: a user-facing problem whose message names the problem and the fix."""


class DataError(DDMError, FileNotFoundError):
    """A dataset could not be found or read."""


class ConfigError(DDMError, ValueError):
    """An invalid option value or a run directory made with a different config."""


class StageError(DDMError, RuntimeError):
    """A stage cannot run: its input artifact is missing, incomplete or incompatible."""


class CorruptArtifact(StageError):
    """An artifact's bytes do not match its checksums (or it cannot be parsed): it must be recomputed."""


class OutputError(DDMError, OSError):
    """The output folder cannot take a file: read-only, not writable, or full."""

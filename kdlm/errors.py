"""The errors kdlm raises for bad input.

Every user-facing failure (a malformed recipe, a missing file, a bad data row,
incompatible tokenizers) is one of these. The CLI prints the message on one line
and exits with status 2; nothing is written before the check fails.
"""

from __future__ import annotations


class KdlmError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(KdlmError):
    """A recipe or override names an unknown field, has a wrong type or an out-of-range value."""


class DataError(KdlmError):
    """A data file is missing, unreadable, or has a malformed row (file and line are named)."""


class ModelError(KdlmError):
    """A model cannot be located or loaded, or teacher and student are incompatible."""


class OutputError(KdlmError):
    """The output folder holds a finished run that would be overwritten, or a resume has nothing to resume."""

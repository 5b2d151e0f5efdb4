"""Errors a user can fix. The CLI prints them as one clear line (no traceback) and exits with status 2.

Every message names the problem and the fix: the file, key, column or flag at fault and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: bad input the user can correct."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


class DataError(UserError):
    """A dataset is missing, unreadable or lacks what the chosen format needs."""


class CorruptImageError(DataError):
    """An image file or image bytes cannot be decoded."""


class ModelLoadError(UserError):
    """A model folder or hub id cannot be loaded (missing, incomplete, offline without a cached copy)."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or inf."""


class CheckpointError(UserError):
    """No checkpoint in output.dir can be read; the message names the file at fault."""


class TrainingInterrupted(UserError):
    """Training stopped on Ctrl-C / SIGTERM; the message says which checkpoint a rerun resumes from."""

"""rlswift's own error types: bad input the user can fix, reported by the CLI as one `error:` line.

Everything a user can cause and fix (a config value, a name, a data file, a reward function's output, a checkpoint
that cannot be used) raises a subclass of `RlswiftError`; the recipes' CLI wrapper prints its message alone. Any
other exception is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations


class RlswiftError(Exception):
    """Base of every error whose message alone tells the user what is wrong and how to fix it."""


class UnknownNameError(RlswiftError, KeyError):
    """A registry lookup found no such name (the message lists the valid ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(RlswiftError, ValueError):
    """A dataset, model folder or path given by the user is missing or malformed."""


class RewardError(RlswiftError, ValueError):
    """A reward function raised or returned something unusable (the message names the function and the row)."""


class RunDirError(RlswiftError):
    """The run folder is in use by another process, or holds files rlswift must not touch."""


class DuplicateNameError(RlswiftError, KeyError):
    """A registry already holds this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DottedPathError(RlswiftError, ImportError):
    """A dotted import path (``pkg.module.attr``) given by the user cannot be imported."""


class MissingError(DataError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it should be)."""

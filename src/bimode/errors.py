"""The one exception type for a user's mistake.

`bimode <command>` shows a UsageError as one `error:` line (it names the flag, recipe, file, row or field);
any other exception is a bug, in bimode or a library under it, and propagates with its traceback, as TRL's
scripts do. The subclasses keep the built-in types callers may already catch (ValueError, FileNotFoundError,
FileExistsError).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Something the user gave is wrong: a flag, a recipe, an input file or row, a model directory."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it must be)."""


class OutputExistsError(UsageError, FileExistsError):
    """An output would replace finished work; the message names the flag that allows it."""

"""Errors caused by user input: configs, overrides, data files and checkpoints.

The command-line app reports these as one paragraph without a traceback, so every message must
name the bad value and say how to fix it.
"""


class UserInputError(ValueError):
    """Invalid user input; the message names the value and the fix."""


class DataNotFoundError(UserInputError, FileNotFoundError):
    """Dataset files are missing and may not be downloaded."""


class CorruptDataError(UserInputError):
    """A dataset file exists but is truncated or malformed."""

"""The library's own error and warning types (the bottom layer: every module may use them).

A `FiseclipError` is a problem with the user's input — a file, a folder, an option, a
configuration — whose message names it and says what to do; the command line prints it as
one line (exit code 2). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FiseclipError(ValueError):
    """Bad input, explained in one line (it is a ValueError, so `except ValueError` still catches it)."""


class FewImagesWarning(UserWarning):
    """A method that compares images with each other got too few of them to compare."""


class InputWarning(UserWarning):
    """An input the run can use, but not as well as it could (e.g. far smaller than the model's input size)."""

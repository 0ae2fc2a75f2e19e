"""A user-facing error: the stage scripts print its message on one line and exit, no traceback."""


class CodeUpError(Exception):
    """Bad input from the user (a flag, a path, a model name): say what is wrong and how to fix it."""

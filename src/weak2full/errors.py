"""The project's exceptions. Both subclass ValueError, so callers can catch either."""

__all__ = ["InvalidParameterError", "InvalidInputError"]


class InvalidParameterError(ValueError):
    """A value in params.yaml (or passed to a function) is not allowed. The message names the key."""


class InvalidInputError(ValueError):
    """A file the user gave (data, HDF5, checkpoint) is missing, malformed or inconsistent.

    The message names the file and the problem; no output has been written when this is raised.
    """

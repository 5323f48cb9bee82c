"""The project's exceptions. The first two subclass ValueError, so callers can catch either."""

__all__ = ["InvalidParameterError", "InvalidInputError", "OutputWriteError", "LocalisationWarning"]


class InvalidParameterError(ValueError):
    """A value in params.yaml (or passed to a function) is not allowed. The message names the key."""


class InvalidInputError(ValueError):
    """A file the user gave (data, HDF5, checkpoint) is missing, malformed or inconsistent.

    The message names the file and the problem; no output has been written when this is raised.
    """


class OutputWriteError(OSError):
    """An output could not be written because the disk is full or a file-size limit was reached.

    The message names the file; the partial temporary file has been removed and the previous output, if
    any, is unchanged (:func:`weak2full.h5.atomic_output`).
    """


class LocalisationWarning(UserWarning):
    """A trained heatmap network classifies but its maps do not point at the lesions (like scikit-learn's
    ConvergenceWarning: the output is written, and it is probably not what the user wants)."""

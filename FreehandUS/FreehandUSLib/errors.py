"""Exception hierarchy of FreehandUSLib.

Every error a user can cause (a bad file, a bad config, an unresolvable transform chain)
is raised as a subclass of :class:`FreehandUSError`, so the command line can print one
line and exit 2, and the Slicer modules can show a message box, without a traceback.
"""

__all__ = [
    "FreehandUSError",
    "FileFormatError",
    "ConfigError",
    "TransformError",
    "SequenceError",
]


class FreehandUSError(Exception):
    """Base class of all errors raised by FreehandUSLib on bad input."""


class FileFormatError(FreehandUSError):
    """A file is missing, truncated, or does not follow its format.

    The message names the file, the field and what was expected.
    """


class ConfigError(FreehandUSError):
    """A PLUS device-set configuration lacks an element or holds an invalid value."""


class TransformError(FreehandUSError):
    """A transform is missing, non-finite, non-invertible, or a chain cannot be resolved."""


class SequenceError(FreehandUSError):
    """A tracked sequence is empty or its parts disagree (frame counts, shapes)."""

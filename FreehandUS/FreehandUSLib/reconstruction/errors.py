"""Errors raised by volume reconstruction.

All derive from :class:`~FreehandUSLib.errors.FreehandUSError`, so the command line prints one
line and exits 2 and the Slicer module shows a message box. Option errors are also
:class:`ValueError` (a bad argument), so plain Python callers can catch them the usual way.
"""

from __future__ import annotations

from ..errors import ConfigError, FreehandUSError, SequenceError

__all__ = [
    "ReconstructionError",
    "InvalidOptionError",
    "VolumeTooLargeError",
    "NoUsableFramesError",
]


class ReconstructionError(FreehandUSError):
    """Reconstruction cannot produce a volume (e.g. the ROI misses every frame)."""


class InvalidOptionError(ConfigError, ValueError):
    """A reconstruction option (spacing, extent, mode, ...) has an invalid value.

    The message names the option, the expected value and the actual value.
    """


class VolumeTooLargeError(ReconstructionError):
    """The output grid would need more memory than the configured budget.

    The message states the grid dimensions, the bytes needed and a spacing that would fit.
    """


class NoUsableFramesError(ReconstructionError, SequenceError):
    """No frame of the input can be inserted (all transforms invalid, no image, ...)."""

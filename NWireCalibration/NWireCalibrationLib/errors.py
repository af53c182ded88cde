"""Exceptions of NWireCalibrationLib.

All derive from :class:`FreehandUSLib.errors.FreehandUSError`, so the ``freehandus`` command
line prints one line and exits 2, and the Slicer module shows a message box.
"""

from __future__ import annotations

from FreehandUSLib.errors import ConfigError, FreehandUSError

__all__ = ["NWireError", "PhantomDefinitionError", "CalibrationError", "DetectionError"]


class NWireError(FreehandUSError):
    """Base class of the errors raised by NWireCalibrationLib on bad input."""


class PhantomDefinitionError(NWireError, ConfigError):
    """A phantom definition is missing, malformed or geometrically impossible (not an N)."""


class CalibrationError(NWireError):
    """A calibration cannot be computed (too few usable frames, degenerate poses...).

    The message says what to do (e.g. "tilt the probe more").
    """


class DetectionError(NWireError):
    """Dot detection cannot run (wrong image type, no pixel spacing...)."""

"""Ultrasound pixel orientation (PLUS ``UltrasoundImageOrientation``) conversions.

PLUS names an orientation by two letters: M/U = the probe's marked side is on the left/right of
the image (U: "unmarked" side left), F/N = the far/near side of the transducer is at the bottom.
A third letter (``MFA``) describes the third (frame) axis and does not change pixels.
Everything in memory is MF; files in other orientations are flipped on read.
"""

from __future__ import annotations

import numpy as np

from .errors import FileFormatError

__all__ = ["normalize_orientation", "to_mf"]


def normalize_orientation(value: str, *, source: str = "") -> str:
    """Return the two-letter orientation (``"MFA"`` -> ``"MF"``); raise on unknown values."""
    text = (value or "MF").strip().upper()
    two = text[:2]
    if two not in ("MF", "MN", "UF", "UN") or len(text) > 3:
        where = f"{source}: " if source else ""
        shown = value if len(str(value)) <= 40 else f"{str(value)[:37]}..."  # one short line
        raise FileFormatError(
            f"{where}UltrasoundImageOrientation {shown!r} is not one of MF, MN, UF, UN (optionally +A)"
        )
    return two


def to_mf(frames: np.ndarray, orientation: str) -> np.ndarray:
    """Flip ``(n, rows, cols[, c])`` frames from ``orientation`` to MF (a view when possible).

    The flip is its own inverse, so the same call converts MF back to ``orientation``.
    """
    o = normalize_orientation(orientation)
    out = frames
    if o[0] == "U":
        out = out[:, :, ::-1]
    if o[1] == "N":
        out = out[:, ::-1, :]
    return out

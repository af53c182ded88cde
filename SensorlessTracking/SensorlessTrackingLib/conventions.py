"""Orientation conventions of sensorless estimation: image handedness and sweep direction.

Image frames
------------
A frame is stored with row 0 at the probe face and column 0 on the left, as the scanner shows
it. Its **stored image frame** has ``x`` along columns, ``y`` along rows (down, into the tissue)
and ``z = x cross y``: for a viewer of the image on the screen, ``z`` points *into* the screen,
away from the viewer. The models and the decorrelation method estimate motion in this frame and
assume it is right-handed in space, i.e. that the calibration (``ImageToReference`` /
``ImageToProbe``) places the column and row axes like a right-handed frame: ``det > 0`` of its
3 x 3 part. PLUS calibrations are. Some tools write a **mirrored** calibration (``det < 0``):
the image columns are laid out in space the other way round. Estimating in such a frame and
placing the estimate with the mirrored calibration turns every rotation the wrong way (the
orientation error reaches about 115 degrees on a typical sweep).

:func:`image_handedness` finds the handedness; for a mirrored one, estimation runs on the
frames mirrored left-right with the calibration mirrored with them (:func:`column_mirror`: the
same pixels in the same places in space, now right-handed), and the estimate is mapped back:
``ImageToReference = internal_image_to_reference @ column_mirror(cols)``. Rows (depth) are
never mirrored: the models rely on the probe face being at row 0.

Sweep direction
---------------
Speckle decorrelation shows how far a frame is from the previous one out of the image plane,
not on which side. The direction is an assumption, given relative to the image normal ``z``
of the right-handed frame the estimation works in:

- ``"toward"``: the image plane moves along ``-z``; the convention of the training sweeps (the
  FreehandUS simulator's sweeps all move along ``-z``) and of the decorrelation method's
  default (``direction=-1``), so the default;
- ``"away"``: the image plane moves along ``+z``.

For a right-handed calibration (PLUS) and for uncalibrated frames, ``z = column axis x row
axis``: seen on the screen (row 0 at the top, column 0 on the left) ``toward`` is out of the
screen, toward the viewer, and ``away`` into it. For a mirrored calibration ``z`` is the normal
of the image mirrored back, ``-(column axis x row axis)``, which is the calibration's own third
column when it is orthogonal: the direction is a property of the sweep in space, so a mirrored
calibration gives the same estimate as its unmirrored equivalent with the same direction.
Changing the direction mirrors the estimated motion across the image plane:
``(tx, ty, tz, rx, ry, rz) -> (tx, ty, -tz, -rx, -ry, rz)`` (:func:`reverse_direction`, the
conjugation by :func:`~.pose.mirror_z`). :func:`elevational_direction_check` compares the
assumption with a tracked part of the sweep, when there is one.
"""

from __future__ import annotations

import numpy as np

from FreehandUSLib.errors import TransformError

__all__ = [
    "SWEEP_DIRECTIONS",
    "SWEEP_DIRECTION_HELP",
    "check_sweep_direction",
    "opposite_direction",
    "image_handedness",
    "column_mirror",
    "reverse_direction",
    "elevational_displacement_mm",
    "elevational_direction_check",
]

#: Accepted sweep directions; the first is the default (the training convention).
SWEEP_DIRECTIONS = ("toward", "away")

#: One-line explanation of the directions (command-line help, result text).
SWEEP_DIRECTION_HELP = (
    "the way the probe moved out of the image plane, seen on the screen with the probe face at the top: "
    "'toward' = the image plane moved out of the screen, toward you (the default: the training convention); "
    "'away' = into the screen, away from you (with a mirrored calibration, det < 0: as seen in the image "
    "mirrored back)"
)

#: Signs of the 6 frame-to-frame parameters under a mirror across the image plane.
_MIRROR_Z_SIGNS = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])


def check_sweep_direction(direction: str) -> str:
    """``direction`` if it is one of :data:`SWEEP_DIRECTIONS`, else a ValueError naming them."""
    if direction not in SWEEP_DIRECTIONS:
        raise ValueError(f"sweep_direction must be one of {', '.join(SWEEP_DIRECTIONS)}, got {direction!r}")
    return direction


def opposite_direction(direction: str) -> str:
    """``"toward"`` <-> ``"away"``."""
    check_sweep_direction(direction)
    return SWEEP_DIRECTIONS[1] if direction == SWEEP_DIRECTIONS[0] else SWEEP_DIRECTIONS[0]


def image_handedness(image_to_reference=None, valid=None, image_to_probe=None) -> int:
    """+1 for a right-handed image frame, -1 for a mirrored one (``det < 0``).

    Parameters
    ----------
    image_to_reference : (n, 4, 4) float64 ImageToReference (pixel -> Reference mm), or None
    valid : (n,) bool, frames of ``image_to_reference`` to use (default: the finite ones)
    image_to_probe : (4, 4) float64 ImageToProbe (pixel -> Probe mm), or None

    Returns
    -------
    int, +1 or -1; +1 when neither matrix is given (the pixel grid itself is right-handed)

    Raises
    ------
    TransformError
        A singular matrix, tracked frames of both handednesses, or an ImageToProbe whose
        handedness differs from the tracked ImageToReference (then ProbeToReference would be a
        mirror, which no tracker reports).
    """
    signs = set()
    if image_to_reference is not None:
        m = np.asarray(image_to_reference, dtype=np.float64)
        use = np.all(np.isfinite(m), axis=(1, 2)) if valid is None else np.asarray(valid, bool)
        use = use & np.all(np.isfinite(m), axis=(1, 2))
        if use.any():
            det = np.linalg.det(m[use][:, :3, :3])
            if np.any(det == 0):
                raise TransformError("ImageToReference is singular on some frames: the image orientation is undefined")
            frame_signs = set(np.sign(det).astype(int).tolist())
            if len(frame_signs) > 1:
                raise TransformError(
                    "ImageToReference is mirrored (det < 0) on some frames and not on others: the image orientation "
                    "is inconsistent; check the calibration and the tracking"
                )
            signs |= frame_signs
    if image_to_probe is not None:
        det = float(np.linalg.det(np.asarray(image_to_probe, dtype=np.float64)[:3, :3]))
        if det == 0 or not np.isfinite(det):
            raise TransformError(f"ImageToProbe is singular (det {det}): the image orientation is undefined")
        if signs and {int(np.sign(det))} != signs:
            raise TransformError(
                "ImageToProbe is mirrored (det < 0) and the tracked ImageToReference is not, or the other way round: "
                "ProbeToReference would be a mirror; use the calibration the tracking was recorded with"
            )
        signs.add(int(np.sign(det)))
    return signs.pop() if signs else 1


def column_mirror(n_cols: int) -> np.ndarray:
    """Pixel -> pixel map of a left-right mirror: column ``c`` <-> ``n_cols - 1 - c``.

    ``frames[:, :, ::-1]`` has ``ImageToReference @ column_mirror(n_cols)``; the map is its own
    inverse. (4, 4) float64 on (column, row, slice, 1) pixel coordinates.
    """
    m = np.eye(4)
    m[0, 0] = -1.0
    m[0, 3] = float(n_cols - 1)
    return m


def reverse_direction(params) -> np.ndarray:
    """Frame-to-frame parameters ``(..., 6)`` (mm, deg) of the same motion mirrored across the
    image plane: the estimate for the opposite sweep direction."""
    return np.asarray(params, dtype=np.float64) * _MIRROR_Z_SIGNS


def elevational_displacement_mm(image_to_reference, image_shape, first: int, last: int) -> float:
    """Out-of-plane displacement (mm) of the image centre from frame ``first`` to ``last``,
    along frame ``first``'s ``away`` direction: ``z`` of the right-handed image frame (column
    axis x row axis, negated for a mirrored frame), normalised.

    Parameters
    ----------
    image_to_reference : (n, 4, 4) float64, pixel -> Reference mm
    image_shape : (rows, cols)
    """
    m = np.asarray(image_to_reference, dtype=np.float64)
    rows, cols = image_shape
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    normal = np.cross(m[first, :3, 0], m[first, :3, 1]) * np.sign(np.linalg.det(m[first, :3, :3]))
    normal /= np.linalg.norm(normal)
    return float(normal @ ((m[last] @ centre)[:3] - (m[first] @ centre)[:3]))


def elevational_direction_check(truth, valid, estimate, image_shape, *, min_displacement_mm: float = 1.0) -> dict | None:
    """Does the estimate move out of the plane the same way as the tracked part of the sweep?

    Compares the out-of-plane displacement of the image centre between the first and the last
    tracked frame (:func:`elevational_displacement_mm`) in the tracking and in the estimate.

    Parameters
    ----------
    truth : (n, 4, 4) float64 tracked ImageToReference (NaN where untracked)
    valid : (n,) bool, tracked frames
    estimate : (n, 4, 4) float64 estimated ImageToReference
    image_shape : (rows, cols)
    min_displacement_mm : below this tracked displacement the direction is not decided

    Returns
    -------
    dict (JSON-safe) with ``tracked_frames``, ``first_frame``, ``last_frame``,
    ``tracked_elevational_mm``, ``estimated_elevational_mm`` and ``agrees`` (True, False, or
    None when the tracked part moved less than ``min_displacement_mm`` out of the plane), or
    None when fewer than 2 frames are tracked.
    """
    idx = np.flatnonzero(np.asarray(valid, bool))
    if idx.size < 2:
        return None
    first, last = int(idx[0]), int(idx[-1])
    d_true = elevational_displacement_mm(truth, image_shape, first, last)
    d_est = elevational_displacement_mm(estimate, image_shape, first, last)
    agrees = None if abs(d_true) < min_displacement_mm else bool(d_true * d_est > 0)
    return {
        "tracked_frames": int(idx.size),
        "first_frame": first,
        "last_frame": last,
        "tracked_elevational_mm": d_true,
        "estimated_elevational_mm": d_est,
        "agrees": agrees,
    }

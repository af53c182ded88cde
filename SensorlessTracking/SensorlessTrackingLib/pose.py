"""Pose conventions of sensorless tracking (pure numpy conversions).

Frames
------
Every ultrasound frame ``i`` has an **image-mm frame**: origin at a chosen pixel (the centre of
the image the model sees), ``x`` along image columns, ``y`` along image rows (down), ``z`` the
image normal (right-handed), all in mm. It is ``ImageToReference`` with the pixel scaling
removed and the origin moved::

    image_mm_to_reference = image_to_reference @ mm_to_pixel(spacing, centre_px)

(made exactly rigid by :func:`rigid`). Models and labels live in these frames, so a pose does
not depend on the image size or pixel spacing.

Three kinds of pose, all rigid ``(..., 4, 4)`` float64 applied to column vectors:

- **absolute**: ``P_i`` = image-mm frame ``i`` -> Reference (the tracker's answer);
- **relative-to-first**: ``R_i = inv(P_0) @ P_i`` = frame ``i`` -> frame 0 (``R_0 = I``);
  what reconstruction needs once the first frame is anchored: ``P_i = P_0 @ R_i``;
- **frame-to-frame**: ``F_i = inv(P_{i-1}) @ P_i`` = frame ``i`` -> frame ``i - 1``, for
  ``i = 1 .. n-1`` (``n - 1`` of them); ``R_i = F_1 @ F_2 @ ... @ F_i``. Models predict these.

A rigid transform has six parameters ``(tx, ty, tz, rx, ry, rz)``: translation in mm and the
rotation vector (axis times angle) in **degrees**, so both halves have similar magnitudes for
freehand motion between frames.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "params_to_matrices",
    "matrices_to_params",
    "rigid",
    "mm_to_pixel",
    "image_mm_poses",
    "absolute_to_relative",
    "absolute_to_frame_to_frame",
    "frame_to_frame_to_relative",
    "relative_to_absolute",
    "mirror_x",
    "mirror_z",
    "translate",
]


def params_to_matrices(params) -> np.ndarray:
    """6-DoF parameters ``(..., 6)`` (mm, rotation vector in degrees) -> rigid ``(..., 4, 4)``."""
    p = np.asarray(params, dtype=np.float64)
    if p.shape[-1] != 6:
        raise ValueError(f"params must have 6 values in the last axis, got shape {p.shape}")
    flat = p.reshape(-1, 6)
    out = np.tile(np.eye(4), (flat.shape[0], 1, 1))
    out[:, :3, :3] = Rotation.from_rotvec(np.radians(flat[:, 3:])).as_matrix()
    out[:, :3, 3] = flat[:, :3]
    return out.reshape(p.shape[:-1] + (4, 4))


def matrices_to_params(matrices) -> np.ndarray:
    """Rigid ``(..., 4, 4)`` -> 6-DoF parameters ``(..., 6)`` (mm, rotation vector in degrees)."""
    m = np.asarray(matrices, dtype=np.float64)
    if m.shape[-2:] != (4, 4):
        raise ValueError(f"matrices must be (..., 4, 4), got shape {m.shape}")
    flat = m.reshape(-1, 4, 4)
    out = np.empty((flat.shape[0], 6))
    out[:, :3] = flat[:, :3, 3]
    out[:, 3:] = np.degrees(Rotation.from_matrix(flat[:, :3, :3]).as_rotvec())
    return out.reshape(m.shape[:-2] + (6,))


def rigid(matrices) -> np.ndarray:
    """Nearest rigid transforms (rotation by polar decomposition, translation kept)."""
    m = np.asarray(matrices, dtype=np.float64)
    u, _, vt = np.linalg.svd(m[..., :3, :3])
    r = u @ vt
    det = np.linalg.det(r)
    if np.any(det < 0):
        u = u.copy()
        u[det < 0, :, -1] *= -1
        r = u @ vt
    out = np.zeros_like(m)
    out[..., :3, :3] = r
    out[..., :3, 3] = m[..., :3, 3]
    out[..., 3, 3] = 1.0
    return out


def mm_to_pixel(spacing_mm, centre_px) -> np.ndarray:
    """Image-mm frame -> pixel coordinates: ``i = x / sx + ci``, ``j = y / sy + cj``, ``k = z``.

    Parameters
    ----------
    spacing_mm : (sx, sy) mm per pixel along columns / rows
    centre_px : (ci, cj) pixel coordinates (column, row) of the image-mm origin

    Returns
    -------
    (4, 4) float64
    """
    sx, sy = (float(v) for v in spacing_mm)
    ci, cj = (float(v) for v in centre_px)
    m = np.eye(4)
    m[0, 0] = 1.0 / sx
    m[1, 1] = 1.0 / sy
    m[0, 3] = ci
    m[1, 3] = cj
    return m


def image_mm_poses(image_to_reference, spacing_mm, centre_px) -> np.ndarray:
    """Absolute poses ``P_i`` (rigid, image-mm -> Reference) from ``ImageToReference``.

    Parameters
    ----------
    image_to_reference : (n, 4, 4) float64, pixel -> Reference mm (scaling included)
    spacing_mm : (sx, sy) of the pixels ``image_to_reference`` maps
    centre_px : (ci, cj) origin of the image-mm frame, in those pixels
    """
    return rigid(np.asarray(image_to_reference, dtype=np.float64) @ mm_to_pixel(spacing_mm, centre_px))


def absolute_to_relative(poses) -> np.ndarray:
    """Absolute ``(n, 4, 4)`` -> relative-to-first ``inv(P_0) @ P_i``."""
    p = np.asarray(poses, dtype=np.float64)
    return np.linalg.inv(p[0]) @ p


def absolute_to_frame_to_frame(poses) -> np.ndarray:
    """Absolute ``(n, 4, 4)`` -> frame-to-frame ``inv(P_{i-1}) @ P_i``, ``(n - 1, 4, 4)``."""
    p = np.asarray(poses, dtype=np.float64)
    return np.linalg.inv(p[:-1]) @ p[1:]


def frame_to_frame_to_relative(f2f) -> np.ndarray:
    """Frame-to-frame ``(n - 1, 4, 4)`` -> relative-to-first ``(n, 4, 4)`` (first = identity)."""
    f = np.asarray(f2f, dtype=np.float64)
    out = np.empty((f.shape[0] + 1, 4, 4))
    out[0] = np.eye(4)
    for i in range(f.shape[0]):
        out[i + 1] = out[i] @ f[i]
    return out


def relative_to_absolute(relative, first_pose) -> np.ndarray:
    """Relative-to-first ``(n, 4, 4)`` anchored at ``first_pose`` (4, 4): ``P_0 @ R_i``."""
    return np.asarray(first_pose, dtype=np.float64) @ np.asarray(relative, dtype=np.float64)


def mirror_x() -> np.ndarray:
    """``diag(-1, 1, 1, 1)``: the image-mm frame of a horizontally flipped image.

    A flipped image's absolute pose is ``P @ mirror_x()`` (improper); its frame-to-frame
    transforms ``M F M`` are proper rotations again.
    """
    return np.diag([-1.0, 1.0, 1.0, 1.0])


def mirror_z() -> np.ndarray:
    """``diag(1, 1, -1, 1)``: mirror across the image plane.

    The elevational beam is symmetric, so a frame's image is the same in the world and in its
    mirror image across the image plane. Hence the frames of a sweep played backwards are
    *exactly* the frames of the mirrored probe moving forwards, with absolute poses
    ``P_{n-1-i} @ mirror_z()``: the direction of elevational motion cannot be seen in the images
    and is a convention (the one of the training sweeps). Reversed-sweep augmentation uses these
    poses, so it keeps the convention instead of teaching the model that both directions are
    equally likely.
    """
    return np.diag([1.0, 1.0, -1.0, 1.0])


def translate(offset_mm) -> np.ndarray:
    """A 4x4 translation by ``offset_mm`` (x, y[, z])."""
    m = np.eye(4)
    o = np.asarray(offset_mm, dtype=np.float64).reshape(-1)
    m[: o.size, 3] = o
    return m


def trajectory_from_frame_to_frame(params, spacing_mm, image_shape, first_image_to_reference=None) -> np.ndarray:
    """Per-frame ImageToReference from frame-to-frame parameters in the centred image-mm frame.

    Parameters
    ----------
    params : (n - 1, 6) frame-to-frame parameters (mm, deg), origin at the image centre
    spacing_mm : (sx, sy) of the output pixels
    image_shape : (rows, cols)
    first_image_to_reference : (4, 4) pose of frame 0, or None for ``diag(sx, sy, 1)``

    Returns
    -------
    (n, 4, 4) float64 ImageToReference (pixel -> Reference mm)
    """
    rows, cols = image_shape
    to_px = mm_to_pixel(spacing_mm, ((cols - 1) / 2.0, (rows - 1) / 2.0))
    anchor = (
        np.diag([spacing_mm[0], spacing_mm[1], 1.0, 1.0])
        if first_image_to_reference is None
        else np.asarray(first_image_to_reference, dtype=np.float64)
    )
    p0 = rigid(anchor @ to_px)
    rel = frame_to_frame_to_relative(params_to_matrices(params))
    # Frame i = frame 0 moved by R_i (expressed in the Reference): keeps frame 0's own scaling.
    return p0 @ rel @ np.linalg.inv(p0) @ anchor

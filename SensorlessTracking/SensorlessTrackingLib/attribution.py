"""Where the drift of an estimated trajectory comes from (which of the six motion parameters).

:func:`drift_attribution` rebuilds the trajectory with the estimated frame-to-frame parameters
of one group of degrees of freedom and the true ones for the rest, and reports the final drift
ratio of each hybrid. Groups (image-mm frame, :mod:`.pose`):

- ``rotation`` (rx, ry, rz) vs ``translation`` (tx, ty, tz);
- ``out_of_plane`` (tz, rx, ry: what speckle decorrelation must supply) vs ``in_plane``
  (tx, ty, rz: what image registration sees).

Rotation vectors are mixed component by component. Between two frames the rotation is a
fraction of a degree, so the components act almost independently; the hybrids are an
attribution, not an exact decomposition (their drifts need not add up to the full one).

``elevation_scale`` is the least-squares factor ``k`` that best maps the estimated elevational
steps onto the true ones (``tz_true ~ k * tz_est``): 1 means unbiased, 1.3 means the estimate
moved 30 % too little out of the plane. A per-sweep scale that follows the probe's elevational
beam width is the signature of a scale the images alone cannot give (the decorrelation curve
depends on distance / beam width only).
"""

from __future__ import annotations

import numpy as np

from .metrics import tracking_metrics
from .pose import (
    absolute_to_frame_to_frame,
    frame_to_frame_to_relative,
    image_mm_poses,
    matrices_to_params,
    mm_to_pixel,
    params_to_matrices,
    relative_to_absolute,
)

__all__ = ["GROUPS", "drift_attribution"]

_MIN_RMS_STEP_MM = 1e-9

#: Parameter indices (tx, ty, tz, rx, ry, rz) of each group.
GROUPS = {
    "rotation": (3, 4, 5),
    "translation": (0, 1, 2),
    "out_of_plane": (2, 3, 4),
    "in_plane": (0, 1, 5),
}


def _spacing(image_to_reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(image_to_reference[0, :3, :2], axis=0)


def drift_attribution(true_image_to_reference, est_image_to_reference, image_shape) -> dict:
    """Final drift ratio when only one group of parameters is estimated (the rest true).

    Parameters
    ----------
    true_image_to_reference, est_image_to_reference : (n, 4, 4) float64
        Pixel -> Reference mm, as in :func:`~.metrics.tracking_metrics` (the estimate is
        anchored at the true first frame).
    image_shape : (rows, cols)

    Returns
    -------
    dict
        ``fdr_path_percent`` (all estimated), ``fdr_<group>_only_percent`` for each of
        :data:`GROUPS`, ``elevation_scale`` (see the module docstring; NaN when the estimate
        has no elevational motion).

    Raises
    ------
    ValueError
        As :func:`~.metrics.tracking_metrics` (shapes, fewer than 2 frames, non-finite values).
    """
    t = np.asarray(true_image_to_reference, dtype=np.float64)
    e = np.asarray(est_image_to_reference, dtype=np.float64)
    full = tracking_metrics(t, e, image_shape)
    spacing = _spacing(t)
    centre = ((image_shape[1] - 1) / 2.0, (image_shape[0] - 1) / 2.0)
    to_pixel = mm_to_pixel(spacing, centre)
    from_pixel = np.linalg.inv(to_pixel)
    poses_t = image_mm_poses(t, spacing, centre)
    poses_e = image_mm_poses(t[0] @ np.linalg.inv(e[0]) @ e, spacing, centre)
    p_true = matrices_to_params(absolute_to_frame_to_frame(poses_t))
    p_est = matrices_to_params(absolute_to_frame_to_frame(poses_e))
    out = {"fdr_path_percent": full.fdr_path_percent}
    for name, idx in GROUPS.items():
        hybrid = p_true.copy()
        hybrid[:, idx] = p_est[:, idx]
        poses = relative_to_absolute(frame_to_frame_to_relative(params_to_matrices(hybrid)), poses_t[0])
        out[f"fdr_{name}_only_percent"] = tracking_metrics(t, poses @ from_pixel, image_shape).fdr_path_percent
    tz_t, tz_e = p_true[:, 2], p_est[:, 2]
    denom = float(tz_e @ tz_e)
    moved = denom > _MIN_RMS_STEP_MM**2 * tz_e.size  # not just rounding noise
    out["elevation_scale"] = float(tz_t @ tz_e) / denom if moved else float("nan")
    return out

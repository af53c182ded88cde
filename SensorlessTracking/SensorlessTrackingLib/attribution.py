"""Where the drift of an estimated trajectory comes from (which of the six motion parameters).

:func:`drift_attribution` rebuilds the trajectory with the estimated frame-to-frame parameters
of one group of degrees of freedom and the true ones for the rest, and reports the final drift
ratio of each hybrid. Groups (image-mm frame, :mod:`.pose`):

- ``rotation`` (rx, ry, rz) vs ``translation`` (tx, ty, tz);
- ``out_of_plane`` (tz, rx, ry: what speckle decorrelation must supply) vs ``in_plane``
  (tx, ty, rz: what image registration sees);
- ``elevational`` (tz alone) and ``tilt`` (rx, ry): the two parts of ``out_of_plane``.

Rotation vectors are mixed component by component. Between two frames the rotation is a
fraction of a degree, so the components act almost independently; the hybrids are an
attribution, not an exact decomposition (their drifts need not add up to the full one).

``elevation_scale`` is the least-squares factor ``k`` that best maps the estimated elevational
steps onto the true ones (``tz_true ~ k * tz_est``): 1 means unbiased, 1.3 means the estimate
moved 30 % too little out of the plane. A per-sweep scale that follows the probe's elevational
beam width is the signature of a scale the images alone cannot give (the decorrelation curve
depends on distance / beam width only).

``fdr_scale_fitted_percent`` is the final drift ratio after multiplying every estimated
out-of-plane step (tz, rx, ry together, since all three come from decorrelation measured in
units of the beam width) by the one factor ``out_of_plane_scale`` that minimises it. The gap
between it and the full FDR is the drift that a correct elevational scale alone would remove:
what knowing the probe (fine-tuning on its tracked sweeps) can win, and what no image cue can.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from .metrics import checked_trajectories, tracking_metrics
from .pose import (
    absolute_to_frame_to_frame,
    frame_to_frame_to_relative,
    image_mm_poses,
    matrices_to_params,
    mm_to_pixel,
    params_to_matrices,
    relative_to_absolute,
)

__all__ = ["GROUPS", "SCALE_RANGE", "drift_attribution", "fit_out_of_plane_scale", "out_of_plane_problem"]

_MIN_RMS_STEP_MM = 1e-9

#: Out-of-plane scale factors searched by the scale fit (a beam width misjudged up to 4x).
SCALE_RANGE = (0.25, 4.0)

#: Parameter indices (tx, ty, tz, rx, ry, rz) of each group.
GROUPS = {
    "rotation": (3, 4, 5),
    "translation": (0, 1, 2),
    "out_of_plane": (2, 3, 4),
    "in_plane": (0, 1, 5),
    "elevational": (2,),
    "tilt": (3, 4),
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
        has no elevational motion), ``out_of_plane_scale`` and ``fdr_scale_fitted_percent``
        (the best factor in :data:`SCALE_RANGE` and the FDR it leaves).

    Raises
    ------
    ValueError
        As :func:`~.metrics.tracking_metrics` (shapes, fewer than 2 frames, non-finite values).
    """
    t = np.asarray(true_image_to_reference, dtype=np.float64)
    e = np.asarray(est_image_to_reference, dtype=np.float64)
    full = tracking_metrics(t, e, image_shape)
    t, e = _right_handed(t, e, image_shape)
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
    scale, fdr = _best_scale(p_est, poses_t, full.path_length_mm)
    out["out_of_plane_scale"] = scale
    out["fdr_scale_fitted_percent"] = fdr
    return out


def _right_handed(t: np.ndarray, e: np.ndarray, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """Truth and estimate of a mirrored calibration (det < 0) expressed for the left-right
    mirrored pixels (:func:`~.conventions.column_mirror`), whose image-mm frames are rigid; the
    image centre stays where it is, so the drift of the centre is unchanged."""
    if np.linalg.det(t[0, :3, :3]) >= 0:
        return t, e
    from .conventions import column_mirror

    m = column_mirror(image_shape[1])
    return t @ m, e @ m


def fit_out_of_plane_scale(true_image_to_reference, est_image_to_reference, image_shape) -> tuple[float, float]:
    """The one factor on the estimate's out-of-plane steps that minimises its final drift.

    Parameters and errors as :func:`drift_attribution`.

    Returns
    -------
    (out_of_plane_scale, fdr_scale_fitted_percent)
        The factor in :data:`SCALE_RANGE` that multiplies tz, rx and ry of every estimated
        frame-to-frame step (image-mm frame), and the final drift / path length (%) it leaves.
    """
    return _best_scale(*out_of_plane_problem(true_image_to_reference, est_image_to_reference, image_shape))


def out_of_plane_problem(true_image_to_reference, est_image_to_reference, image_shape):
    """What a scale fit needs: the estimate's frame-to-frame parameters and the true poses in the
    centred image-mm frame (right-handed: a mirrored calibration's mirrored back), and the path.

    Parameters and errors as :func:`drift_attribution`.

    Returns
    -------
    p_est : (n - 1, 6) float64 estimated frame-to-frame parameters (mm, deg), anchored at the
        true first frame
    poses_t : (n, 4, 4) float64 true image-mm poses (mm)
    path_mm : length of the true path of the image centre, mm
    """
    t, e = checked_trajectories(true_image_to_reference, est_image_to_reference)
    t, e = _right_handed(t, e, image_shape)
    spacing = _spacing(t)
    centre = ((image_shape[1] - 1) / 2.0, (image_shape[0] - 1) / 2.0)
    poses_t = image_mm_poses(t, spacing, centre)
    poses_e = image_mm_poses(t[0] @ np.linalg.inv(e[0]) @ e, spacing, centre)
    # The image-mm origin is the image centre: its path is the metrics' path length.
    path_mm = float(np.linalg.norm(np.diff(poses_t[:, :3, 3], axis=0), axis=1).sum())
    return matrices_to_params(absolute_to_frame_to_frame(poses_e)), poses_t, path_mm


def _best_scale(p_est: np.ndarray, poses_t: np.ndarray, path_mm: float) -> tuple[float, float]:
    """(factor, FDR %) minimising the final drift when tz, rx, ry of ``p_est`` are scaled.

    The final drift is that of the image-mm origin (the image centre), as in the metrics. Scaled
    rotations bend the whole path, so the drift need not be unimodal in the factor: a
    log-spaced grid finds the basin and a bounded Brent search refines it.
    """
    idx = list(GROUPS["out_of_plane"])
    end_true = poses_t[-1, :3, 3]

    def fdr(log_k: float) -> float:
        p = p_est.copy()
        p[:, idx] *= np.exp(log_k)
        end = (poses_t[0] @ frame_to_frame_to_relative(params_to_matrices(p))[-1])[:3, 3]
        return 100.0 * float(np.linalg.norm(end - end_true)) / path_mm if path_mm > 0 else float("nan")

    lo, hi = np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1])
    grid = np.linspace(lo, hi, 41)
    values = [fdr(g) for g in grid]
    if not np.all(np.isfinite(values)):
        return float("nan"), float("nan")
    k = int(np.argmin(values))
    res = minimize_scalar(fdr, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]), method="bounded",
                          options={"xatol": 1e-4})
    best_log, best = (float(res.x), float(res.fun)) if res.fun < values[k] else (float(grid[k]), float(values[k]))
    return float(np.exp(best_log)), best

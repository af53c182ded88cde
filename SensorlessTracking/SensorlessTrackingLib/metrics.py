"""Trajectory accuracy of sensorless tracking (TUS-REC style), numpy only.

Both trajectories are per-frame ``ImageToReference`` (pixel -> Reference mm, scaling included).
The estimate is first anchored at the true first frame (``T_est_i <- T_true_0 @ inv(T_est_0) @
T_est_i``), so only the motion *after* frame 0 is judged. Then, with ``p`` the pixels of a frame
(all of them, or the 4 corners + the centre for speed):

- **GPE** (global pixel error, mm): mean over frames ``i >= 1`` and pixels of
  ``|T_true_i p - T_est_i p|`` (positions relative to the first frame);
- **LPE** (local pixel error, mm): the same for each frame relative to the previous one
  (``T_true_{i-1} inv(T_est_{i-1}) T_est_i p`` against ``T_true_i p``);
- **final drift** (mm): distance between the true and estimated centre of the last frame;
  **max drift**: the largest such distance over all frames;
- **FDR** (%): final drift / path length of the true image centre (``fdr_path_percent``) and
  final drift / true end-to-end distance of the centre (``fdr_end_to_end_percent``);
- **mean angle error** (deg): mean over frames of the angle of ``R_true_i^T R_est_i`` between
  the rotations relative to the first frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .pose import rigid

__all__ = ["TrackingMetrics", "tracking_metrics", "checked_trajectories", "image_points", "pixel_errors"]


@dataclass(frozen=True, eq=False)
class TrackingMetrics:
    """Accuracy of one estimated trajectory (see the module docstring); lengths in mm."""

    n_frames: int
    gpe_mm: float
    lpe_mm: float
    gpe_points_mm: float
    lpe_points_mm: float
    final_drift_mm: float
    max_drift_mm: float
    path_length_mm: float
    end_to_end_mm: float
    fdr_path_percent: float
    fdr_end_to_end_percent: float
    mean_angle_error_deg: float
    final_angle_error_deg: float

    def to_dict(self) -> dict:
        return {k: (float(v) if not isinstance(v, int) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (
            f"{self.n_frames} frames, path {self.path_length_mm:.1f} mm (end-to-end {self.end_to_end_mm:.1f} mm): "
            f"final drift {self.final_drift_mm:.2f} mm = {self.fdr_path_percent:.1f} % of path "
            f"({self.fdr_end_to_end_percent:.1f} % of end-to-end), max drift {self.max_drift_mm:.2f} mm, "
            f"GPE {self.gpe_mm:.2f} mm, LPE {self.lpe_mm:.3f} mm, mean angle error {self.mean_angle_error_deg:.2f} deg"
        )


def image_points(shape, *, which: str = "all", max_points: int = 20_000) -> np.ndarray:
    """Homogeneous pixel points of a ``(rows, cols)`` image: ``(4, m)`` float64.

    ``which="all"``: every pixel (a regular sub-grid when there are more than ``max_points``);
    ``"corners"``: the 4 corners and the centre.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if which == "corners":
        x = np.array([0, cols - 1, 0, cols - 1, (cols - 1) / 2])
        y = np.array([0, 0, rows - 1, rows - 1, (rows - 1) / 2])
    elif which == "all":
        step = max(1, int(np.ceil(np.sqrt(rows * cols / max_points))))
        yy, xx = np.mgrid[0:rows:step, 0:cols:step]
        x, y = xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)
    else:
        raise ValueError(f"which must be 'all' or 'corners', got {which!r}")
    return np.stack([x, y, np.zeros_like(x), np.ones_like(x)])


def pixel_errors(true_tf: np.ndarray, est_tf: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mean distance (mm) per frame between ``true_tf @ points`` and ``est_tf @ points``.

    ``true_tf``, ``est_tf``: (n, 4, 4); ``points``: (4, m). Returns (n,).
    """
    diff = (true_tf - est_tf)[:, :3, :]  # linear in the points: one matmul per frame
    d = diff @ points  # (n, 3, m)
    return np.sqrt((d * d).sum(axis=1)).mean(axis=1)


def _angles_deg(r_true: np.ndarray, r_est: np.ndarray) -> np.ndarray:
    m = np.swapaxes(r_true, -1, -2) @ r_est
    cos = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def checked_trajectories(true_image_to_reference, est_image_to_reference) -> tuple[np.ndarray, np.ndarray]:
    """Both stacks as float64 ``(n, 4, 4)``; ValueError unless equal in length, ``n >= 2`` and finite."""
    t = np.asarray(true_image_to_reference, dtype=np.float64)
    e = np.asarray(est_image_to_reference, dtype=np.float64)
    if t.ndim != 3 or t.shape[1:] != (4, 4) or e.shape != t.shape:
        raise ValueError(
            f"true and estimated ImageToReference must both be (n, 4, 4), got {t.shape} and {e.shape}"
        )
    if t.shape[0] < 2:
        raise ValueError(f"tracking metrics need at least 2 frames, got {t.shape[0]}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(e))):
        raise ValueError("true and estimated ImageToReference must be finite")
    return t, e


def tracking_metrics(true_image_to_reference, est_image_to_reference, image_shape) -> TrackingMetrics:
    """Compare an estimated trajectory with the truth (see the module docstring).

    Parameters
    ----------
    true_image_to_reference, est_image_to_reference : (n, 4, 4) float64, pixel -> Reference mm
    image_shape : (rows, cols) of the frames

    Raises
    ------
    ValueError
        If the stacks differ in length, hold fewer than 2 frames or non-finite values.
    """
    t, e = checked_trajectories(true_image_to_reference, est_image_to_reference)
    n = t.shape[0]
    e = t[0] @ np.linalg.inv(e[0]) @ e  # anchor at the true first frame
    all_pts = image_points(image_shape, which="all")
    corner_pts = image_points(image_shape, which="corners")
    gpe = pixel_errors(t[1:], e[1:], all_pts).mean()
    gpe_c = pixel_errors(t[1:], e[1:], corner_pts).mean()
    local_est = t[:-1] @ np.linalg.inv(e[:-1]) @ e[1:]
    lpe = pixel_errors(t[1:], local_est, all_pts).mean()
    lpe_c = pixel_errors(t[1:], local_est, corner_pts).mean()
    centre = corner_pts[:, 4]
    c_true = (t @ centre)[:, :3]
    c_est = (e @ centre)[:, :3]
    drift = np.linalg.norm(c_true - c_est, axis=1)
    path = float(np.linalg.norm(np.diff(c_true, axis=0), axis=1).sum())
    end_to_end = float(np.linalg.norm(c_true[-1] - c_true[0]))
    # Rotations of the frames (pixel scaling removed column by column).
    r_true = rigid(_unscaled(t))[:, :3, :3]
    r_est = rigid(_unscaled(e))[:, :3, :3]
    rel_true = np.swapaxes(r_true[0], -1, -2) @ r_true
    rel_est = np.swapaxes(r_est[0], -1, -2) @ r_est
    angles = _angles_deg(rel_true[1:], rel_est[1:])
    final = float(drift[-1])
    return TrackingMetrics(
        n_frames=n,
        gpe_mm=float(gpe),
        lpe_mm=float(lpe),
        gpe_points_mm=float(gpe_c),
        lpe_points_mm=float(lpe_c),
        final_drift_mm=final,
        max_drift_mm=float(drift.max()),
        path_length_mm=path,
        end_to_end_mm=end_to_end,
        fdr_path_percent=100.0 * final / path if path > 0 else float("nan"),
        fdr_end_to_end_percent=100.0 * final / end_to_end if end_to_end > 0 else float("nan"),
        mean_angle_error_deg=float(angles.mean()),
        final_angle_error_deg=float(angles[-1]),
    )


def _unscaled(image_to_reference: np.ndarray) -> np.ndarray:
    """Divide each column of the 3x3 block by its length (removes the pixel spacing); a mirrored
    frame (det < 0, a mirrored calibration) also has its x column negated, so that its rotation
    is a rotation and not the nearest rotation to a mirror (the same for truth and estimate, so
    the angles between them are unchanged)."""
    m = image_to_reference.copy()
    norms = np.linalg.norm(m[:, :3, :3], axis=1, keepdims=True)
    m[:, :3, :3] /= np.where(norms > 0, norms, 1.0)
    m[:, :3, 0] *= np.where(np.linalg.det(m[:, :3, :3]) < 0, -1.0, 1.0)[:, None]
    return m

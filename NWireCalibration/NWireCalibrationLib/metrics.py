"""Accuracy and detection metrics, PLUS-compatible where PLUS defines them.

- :func:`reprojection_errors_3d`: PLUS's "3D reprojection error" (OPE): for each frame and
  N-wire, the distance in the Probe frame between the middle dot mapped by ImageToProbe and the
  middle-wire point computed from alpha and the phantom registration. PLUS reports the mean and
  standard deviation of the best 95 % (:func:`trimmed_statistics`); we also give the untrimmed
  mean and the maximum.
- :func:`reprojection_errors_2d`: PLUS's "2D reprojection error" (IPE): for every wire, the
  segmented dot minus where the wire crosses the image plane, in pixels.
- :func:`detection_rates`: recognition / false-detection rates against reference dots.
- :func:`calibration_reproducibility`: the paper's CRE, the spread of image points mapped to
  the Probe frame by repeated calibrations.
- :func:`pose_diversity_deg`: how much the probe rotated during a recording.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from .correspondences import middle_wire_points_mm
from .phantom import NWirePhantom

__all__ = [
    "ErrorStatistics",
    "trimmed_statistics",
    "reprojection_errors_3d",
    "reprojection_errors_2d",
    "DetectionRates",
    "detection_rates",
    "calibration_reproducibility",
    "pose_diversity_deg",
    "target_errors_mm",
]


@dataclass(frozen=True, eq=False)
class ErrorStatistics:
    """Summary of a list of errors (mm or px).

    Attributes
    ----------
    n : int
    mean, std, max : float
        Untrimmed.
    trimmed_mean, trimmed_std, trimmed_max : float
        Of the smallest ``round(0.95 n)`` values (PLUS ``igsioMath::ComputePercentile``).
    median : float
    """

    n: int
    mean: float
    std: float
    max: float
    trimmed_mean: float
    trimmed_std: float
    trimmed_max: float
    median: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}


def trimmed_statistics(errors, keep_fraction: float = 0.95) -> ErrorStatistics:
    """Mean/std/max of all values and of the best ``keep_fraction`` (PLUS's 95 % statistics).

    Parameters
    ----------
    errors : array_like
        Non-finite values are ignored.
    keep_fraction : float
        PLUS keeps ``round(n * 0.95)`` smallest values.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    e = np.sort(e[np.isfinite(e)])
    if e.size == 0:
        nan = float("nan")
        return ErrorStatistics(0, nan, nan, nan, nan, nan, nan, nan)
    k = max(1, int(np.floor(e.size * keep_fraction + 0.5)))
    t = e[:k]
    return ErrorStatistics(int(e.size), float(e.mean()), float(e.std()), float(e.max()),
                           float(t.mean()), float(t.std()), float(t.max()), float(np.median(e)))


def reprojection_errors_3d(points_px, probe_to_reference, image_to_probe, phantom_to_reference,
                           phantom: NWirePhantom) -> np.ndarray:
    """PLUS 3D reprojection errors of the middle wires.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
    probe_to_reference : (n_frames, 4, 4) float
    image_to_probe, phantom_to_reference : (4, 4) float
    phantom : NWirePhantom

    Returns
    -------
    (n_frames, n_patterns) float64, mm; NaN for frames without complete dots or pose.
    """
    pts = np.asarray(points_px, dtype=np.float64)
    poses = np.asarray(probe_to_reference, dtype=np.float64)
    middle = middle_wire_points_mm(pts, phantom)
    with np.errstate(invalid="ignore"):
        ok = np.all(np.isfinite(poses), axis=(1, 2))
        safe = np.where(ok[:, None, None], poses, np.eye(4))
        phantom_to_probe = np.linalg.inv(safe) @ np.asarray(phantom_to_reference)
        target = np.einsum("fij,fkj->fki", phantom_to_probe[:, :3, :3], middle) + phantom_to_probe[:, None, :3, 3]
        m = np.asarray(image_to_probe)
        mapped = np.einsum("ij,fkj->fki", m[:3, :2], pts[:, 1::3, :]) + m[:3, 3]
        err = np.linalg.norm(mapped - target, axis=-1)
    err[~ok] = np.nan
    return err


def reprojection_errors_2d(points_px, probe_to_reference, image_to_probe, phantom_to_reference,
                           phantom: NWirePhantom) -> np.ndarray:
    """PLUS 2D reprojection errors: segmented dot minus the wire's crossing of the image plane.

    Returns
    -------
    (n_frames, n_wires, 2) float64, pixels (x, y); NaN where undefined.
    """
    pts = np.asarray(points_px, dtype=np.float64)
    poses = np.asarray(probe_to_reference, dtype=np.float64)
    ok = np.all(np.isfinite(poses), axis=(1, 2))
    safe = np.where(ok[:, None, None], poses, np.eye(4))
    phantom_to_image = np.linalg.inv(safe @ np.asarray(image_to_probe)) @ np.asarray(phantom_to_reference)
    front = np.einsum("fij,wj->fwi", phantom_to_image[:, :3, :3], phantom.wire_front_mm) + phantom_to_image[:, None, :3, 3]
    back = np.einsum("fij,wj->fwi", phantom_to_image[:, :3, :3], phantom.wire_back_mm) + phantom_to_image[:, None, :3, 3]
    dz = back[..., 2] - front[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = -front[..., 2] / dz
    crossing = front[..., :2] + t[..., None] * (back[..., :2] - front[..., :2])
    crossing[np.abs(dz) < 1e-12] = np.nan
    err = pts - crossing
    err[~ok] = np.nan
    return err


@dataclass(frozen=True, eq=False)
class DetectionRates:
    """Detection quality against reference dots.

    Attributes
    ----------
    frames_total : int
    frames_reference : int
        Frames with reference dots.
    frames_detected : int
        Frames where the detector reported a complete pattern.
    frames_correct : int
        Reference frames detected with every dot within ``tolerance_px`` of its reference.
    dots_reference, dots_matched, dots_false : int
        Reference dots; detected dots within tolerance of the reference dot of the same wire;
        detected dots that are not (on frames with reference dots).
    frames_false : int
        Frames detected although the reference has none there (counted as false detections
        when the reference is ground truth).
    dots_wrong : int
        Detected dots that belong to another echo: nearer to another wire's reference dot than
        to their own, or farther than ``wrong_tolerance_px`` from it (gross mislabeling; a dot
        on the right echo but with a different centre definition is not "wrong").
    recognition_rate, false_rate, dot_match_rate : float
        ``frames_correct / frames_reference``, ``dots_false / dots_detected``,
        ``dots_matched / dots_reference``.
    mean_distance_px, max_distance_px : float
        Distance of matched dots to their reference.
    tolerance_px : float
    """

    frames_total: int
    frames_reference: int
    frames_detected: int
    frames_correct: int
    dots_reference: int
    dots_matched: int
    dots_false: int
    frames_false: int
    dots_wrong: int
    recognition_rate: float
    false_rate: float
    dot_match_rate: float
    mean_distance_px: float
    max_distance_px: float
    tolerance_px: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return (
            f"recognition {self.frames_correct}/{self.frames_reference} frames ({100 * self.recognition_rate:.1f} %), "
            f"dots within {self.tolerance_px:g} px {self.dots_matched}/{self.dots_reference} "
            f"({100 * self.dot_match_rate:.1f} %), false dots {self.dots_false} ({100 * self.false_rate:.2f} %), "
            f"wrong echo {self.dots_wrong}, mean distance {self.mean_distance_px:.2f} px"
        )


def detection_rates(detected_px, reference_px, *, tolerance_px: float = 5.0,
                    wrong_tolerance_px: float = 15.0) -> DetectionRates:
    """Compare detected dots with reference dots (ground truth or PLUS), wire by wire.

    Parameters
    ----------
    detected_px, reference_px : (n_frames, n_wires, 2) float
        NaN rows: no dot. A frame counts as detected / referenced when all its dots are finite.
    tolerance_px : float
        A detected dot matches when within this distance of the reference dot of the same wire.
    wrong_tolerance_px : float
        Beyond this distance (or nearer to another wire's reference) a dot is on the wrong echo.
    """
    det = np.asarray(detected_px, dtype=np.float64)
    ref = np.asarray(reference_px, dtype=np.float64)
    if det.shape != ref.shape:
        raise ValueError(f"detected_px {det.shape} and reference_px {ref.shape} must have the same shape")
    det_frame = np.all(np.isfinite(det), axis=(1, 2))
    ref_frame = np.all(np.isfinite(ref), axis=(1, 2))
    dist = np.linalg.norm(det - ref, axis=-1)
    both = det_frame & ref_frame
    match = np.zeros(dist.shape, dtype=bool)
    match[both] = dist[both] <= tolerance_px
    correct = both & match.all(axis=1)
    dots_det = int(np.isfinite(det[ref_frame]).all(axis=-1).sum())
    dots_false = int((np.isfinite(det[ref_frame]).all(axis=-1) & ~match[ref_frame]).sum())
    frames_false = int((det_frame & ~ref_frame).sum())
    cross = np.linalg.norm(det[:, :, None, :] - ref[:, None, :, :], axis=-1)  # (f, det wire, ref wire)
    with np.errstate(invalid="ignore"):
        nearest_other = np.where(np.eye(det.shape[1], dtype=bool)[None], np.inf, cross).min(axis=2)
    wrong = both[:, None] & ((dist > wrong_tolerance_px) | (nearest_other < dist))
    md = dist[both][match[both]]
    n_ref = int(ref_frame.sum())
    return DetectionRates(
        frames_total=int(det.shape[0]), frames_reference=n_ref, frames_detected=int(det_frame.sum()),
        frames_correct=int(correct.sum()), dots_reference=int(n_ref * det.shape[1]), dots_matched=int(match.sum()),
        dots_false=dots_false, frames_false=frames_false, dots_wrong=int(wrong.sum()),
        recognition_rate=float(correct.sum() / n_ref) if n_ref else float("nan"),
        false_rate=float(dots_false / dots_det) if dots_det else 0.0,
        dot_match_rate=float(match.sum() / (n_ref * det.shape[1])) if n_ref else float("nan"),
        mean_distance_px=float(md.mean()) if md.size else float("nan"),
        max_distance_px=float(md.max()) if md.size else float("nan"),
        tolerance_px=float(tolerance_px),
    )


def target_errors_mm(image_to_probe, reference_image_to_probe, image_size_px=None, *, grid: int = 9,
                     points_px=None) -> np.ndarray:
    """Distances between image points mapped by two calibrations (image-plane target error).

    Parameters
    ----------
    image_to_probe, reference_image_to_probe : (4, 4) float
    image_size_px : (width, height), optional
        Points on a ``grid x grid`` lattice covering the image (when ``points_px`` is None).
    points_px : (n, 2) float, optional
        The image points to compare (e.g. the field of view of the probe).

    Returns
    -------
    (n,) float64, mm.
    """
    if points_px is None:
        if image_size_px is None:
            raise ValueError("target_errors_mm: give image_size_px or points_px")
        w, h = image_size_px
        xs, ys = np.meshgrid(np.linspace(0, w - 1, grid), np.linspace(0, h - 1, grid))
        points_px = np.stack([xs.ravel(), ys.ravel()], axis=1)
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    p = np.stack([pts[:, 0], pts[:, 1], np.zeros(len(pts)), np.ones(len(pts))])
    a = (np.asarray(image_to_probe) @ p)[:3]
    b = (np.asarray(reference_image_to_probe) @ p)[:3]
    return np.linalg.norm(a - b, axis=0)


def calibration_reproducibility(image_to_probes, image_size_px, *, grid: int = 9) -> dict:
    """The paper's calibration reproducibility error (CRE).

    Image points (a lattice covering the image) are mapped to the Probe frame by each of the
    repeated calibrations; CRE is the mean distance of the mapped points to their centroid
    (over calibrations), averaged over the points.

    Parameters
    ----------
    image_to_probes : sequence of (4, 4) float
        At least 2 calibrations.
    image_size_px : (width, height)

    Returns
    -------
    dict with ``cre_mean_mm`` (mean over points), ``cre_max_mm`` (worst point), ``cre_center_mm``
    (the image centre point), ``n_calibrations``.
    """
    mats = np.asarray(image_to_probes, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[0] < 2:
        raise ValueError(f"image_to_probes: expected at least 2 matrices (n, 4, 4), got shape {mats.shape}")
    w, h = image_size_px
    xs, ys = np.meshgrid(np.linspace(0, w - 1, grid), np.linspace(0, h - 1, grid))
    p = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size), np.ones(xs.size)])
    mapped = np.einsum("cij,jp->cpi", mats[:, :3], p)  # (c, points, 3)
    d = np.linalg.norm(mapped - mapped.mean(axis=0), axis=-1).mean(axis=0)
    centre = np.array([[(w - 1) / 2], [(h - 1) / 2], [0.0], [1.0]])
    mc = np.einsum("cij,jp->cpi", mats[:, :3], centre)[:, 0]
    return {"cre_mean_mm": float(d.mean()), "cre_max_mm": float(d.max()),
            "cre_center_mm": float(np.linalg.norm(mc - mc.mean(axis=0), axis=-1).mean()),
            "n_calibrations": int(mats.shape[0])}


def pose_diversity_deg(probe_to_reference) -> float:
    """Largest rotation angle between any two valid probe poses, degrees.

    Parameters
    ----------
    probe_to_reference : (n_frames, 4, 4) float
        NaN matrices are ignored.
    """
    m = np.asarray(probe_to_reference, dtype=np.float64)
    m = m[np.all(np.isfinite(m), axis=(1, 2))]
    if m.shape[0] < 2:
        return 0.0
    u, _, vt = np.linalg.svd(m[:, :3, :3])
    q = Rotation.from_matrix(u @ vt).as_quat()
    dots = np.clip(np.abs(q @ q.T), 0.0, 1.0)
    return float(np.degrees(2.0 * np.arccos(dots.min())))

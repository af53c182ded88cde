"""Keyframe selection and live calibration until convergence (the paper's future work).

From a continuous stream of tracked frames, :class:`KeyframeCalibrator` keeps a frame as a
*keyframe* when

1. the phantom is detected completely (the detector's geometric and 3D checks passed), and
2. its probe pose adds diversity: it differs from every keyframe already kept by at least
   ``min_rotation_deg`` or ``min_translation_mm``.

Every ``update_every`` new keyframes it recalibrates (LM, warm-started from the previous
solution) and records how much the calibration moved (the mean distance between image points
mapped by the previous and the new ImageToProbe). It reports convergence when that change has
stayed below ``convergence_mm`` for ``convergence_updates`` consecutive updates, with at least
``min_keyframes`` keyframes and enough pose diversity. :func:`select_keyframes` does the same
offline on detections that are already available.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from .errors import CalibrationError
from .metrics import pose_diversity_deg, target_errors_mm
from .phantom import NWirePhantom
from .solvers import MIN_CALIBRATION_FRAMES, calibrate_linear, calibrate_lm, closed_form_initialisation

__all__ = ["KeyframeSettings", "ConvergencePoint", "KeyframeUpdate", "KeyframeCalibrator", "select_keyframes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyframeSettings:
    """When to keep a frame and when to stop.

    Attributes
    ----------
    min_rotation_deg, min_translation_mm : float
        A new keyframe must differ from every kept one by at least one of these.
    min_keyframes : int
        Keyframes needed before convergence can be declared (>= 10).
    max_keyframes : int
        Stop keeping frames after this many.
    update_every : int
        Recalibrate after this many new keyframes.
    convergence_mm : float
        Largest change of the calibration (mean image-point displacement) counted as settled.
    convergence_updates : int
        Consecutive settled updates needed.
    min_pose_diversity_deg : float
        Pose diversity (largest rotation between keyframes) needed before convergence.
    residual : str
        LM residual (see :mod:`.solvers`).
    """

    min_rotation_deg: float = 2.0
    min_translation_mm: float = 2.0
    min_keyframes: int = 20
    max_keyframes: int = 300
    update_every: int = 5
    convergence_mm: float = 0.05
    convergence_updates: int = 3
    min_pose_diversity_deg: float = 10.0
    residual: str = "correspondences"

    def __post_init__(self):
        if self.min_keyframes < MIN_CALIBRATION_FRAMES:
            raise ValueError(f"min_keyframes: expected >= {MIN_CALIBRATION_FRAMES}, got {self.min_keyframes}")
        if self.update_every < 1 or self.convergence_updates < 1:
            raise ValueError("update_every and convergence_updates must be >= 1")
        if not self.convergence_mm > 0:
            raise ValueError(f"convergence_mm: expected a positive distance, got {self.convergence_mm!r}")


@dataclass(frozen=True)
class ConvergencePoint:
    """One recalibration: keyframes used, calibration change (mm), RMS dot error (mm), diversity (deg)."""

    n_keyframes: int
    change_mm: float
    cost_mm: float
    pose_diversity_deg: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class KeyframeUpdate:
    """What :meth:`KeyframeCalibrator.add` did with a frame.

    Attributes
    ----------
    accepted : bool
        Kept as a keyframe.
    reason : str
        Why not (or "keyframe").
    n_keyframes : int
    image_to_probe : (4, 4) float64 or None
        Current calibration (None before the first one).
    converged : bool
    """

    accepted: bool
    reason: str
    n_keyframes: int
    image_to_probe: np.ndarray | None
    converged: bool


@dataclass
class KeyframeCalibrator:
    """Incremental calibration from a stream of (dots, pose) pairs.

    Parameters
    ----------
    phantom : NWirePhantom
    image_size_px : (width, height)
        For the convergence measure (points spread over the image).
    phantom_to_reference : (4, 4) float, optional
        Known phantom pose; estimated jointly when None (needs >= 3 N-wires).
    settings : KeyframeSettings

    Examples
    --------
    >>> cal = KeyframeCalibrator(phantom, (820, 616), phantom_to_reference=y)
    >>> for image, pose in stream:
    ...     upd = cal.add(detector.detect(image).points_px, pose)
    ...     if upd.converged:
    ...         break
    >>> cal.image_to_probe, cal.curve
    """

    phantom: NWirePhantom
    image_size_px: tuple
    phantom_to_reference: np.ndarray | None = None
    settings: KeyframeSettings = field(default_factory=KeyframeSettings)

    def __post_init__(self):
        self._points: list[np.ndarray] = []
        self._poses: list[np.ndarray] = []
        self._frame_ids: list[int] = []
        self._since_update = 0
        self._settled = 0
        self.image_to_probe: np.ndarray | None = None
        self.estimated_phantom_to_reference: np.ndarray | None = None
        self.curve: list[ConvergencePoint] = []
        self.converged = False
        self._seen = 0

    @property
    def n_keyframes(self) -> int:
        return len(self._points)

    @property
    def keyframe_ids(self) -> list[int]:
        """Indices (in the order frames were offered) of the kept frames."""
        return list(self._frame_ids)

    def _diverse(self, pose: np.ndarray) -> bool:
        if not self._poses:
            return True
        kept = np.asarray(self._poses)
        dt = np.linalg.norm(kept[:, :3, 3] - pose[:3, 3], axis=1)
        rel = np.einsum("kji,jl->kil", kept[:, :3, :3], pose[:3, :3])  # R_k^T R
        cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
        dr = np.degrees(np.arccos(cos))
        s = self.settings
        return bool(np.all((dr >= s.min_rotation_deg) | (dt >= s.min_translation_mm)))

    def add(self, points_px, probe_to_reference) -> KeyframeUpdate:
        """Offer one frame's dots ``(n_wires, 2)`` (NaN when not detected) and ProbeToReference."""
        idx = self._seen
        self._seen += 1
        pts = np.asarray(points_px, dtype=np.float64)
        pose = np.asarray(probe_to_reference, dtype=np.float64)
        if pts.shape != (self.phantom.n_wires, 2):
            raise ValueError(f"points_px: expected ({self.phantom.n_wires}, 2), got {pts.shape}")
        if self.converged:
            return KeyframeUpdate(False, "converged", self.n_keyframes, self.image_to_probe, True)
        if not np.all(np.isfinite(pts)):
            return KeyframeUpdate(False, "phantom not detected", self.n_keyframes, self.image_to_probe, False)
        if not np.all(np.isfinite(pose)):
            return KeyframeUpdate(False, "probe not tracked", self.n_keyframes, self.image_to_probe, False)
        if self.n_keyframes >= self.settings.max_keyframes:
            return KeyframeUpdate(False, "enough keyframes", self.n_keyframes, self.image_to_probe, self.converged)
        if not self._diverse(pose):
            return KeyframeUpdate(False, "pose too close to a keyframe", self.n_keyframes, self.image_to_probe, False)
        self._points.append(pts)
        self._poses.append(pose)
        self._frame_ids.append(idx)
        self._since_update += 1
        if self.n_keyframes >= MIN_CALIBRATION_FRAMES and self._since_update >= self.settings.update_every:
            self._recalibrate()
        return KeyframeUpdate(True, "keyframe", self.n_keyframes, self.image_to_probe, self.converged)

    def _recalibrate(self):
        self._since_update = 0
        pts = np.asarray(self._points)
        poses = np.asarray(self._poses)
        s = self.settings
        estimate = self.phantom_to_reference is None
        try:
            if self.image_to_probe is None:
                if estimate:
                    x0, y0 = closed_form_initialisation(pts, poses, self.phantom)
                else:
                    x0, y0 = calibrate_linear(pts, poses, self.phantom_to_reference, self.phantom).image_to_probe, None
            else:
                x0, y0 = self.image_to_probe, self.estimated_phantom_to_reference
            sol = calibrate_lm(pts, poses, self.phantom, phantom_to_reference=self.phantom_to_reference,
                               estimate_phantom_pose=estimate, init_image_to_probe=x0, init_phantom_to_reference=y0,
                               residual=s.residual)
        except CalibrationError as exc:
            logger.info("keyframes: calibration with %d keyframes failed: %s", self.n_keyframes, exc)
            return
        change = float("inf")
        if self.image_to_probe is not None:
            change = float(target_errors_mm(sol.image_to_probe, self.image_to_probe, self.image_size_px).mean())
        self.image_to_probe = sol.image_to_probe
        self.estimated_phantom_to_reference = sol.phantom_to_reference if estimate else None
        diversity = pose_diversity_deg(poses)
        self.curve.append(ConvergencePoint(self.n_keyframes, change, sol.cost_mm, diversity))
        self._settled = self._settled + 1 if change <= s.convergence_mm else 0
        if (self._settled >= s.convergence_updates and self.n_keyframes >= s.min_keyframes
                and diversity >= s.min_pose_diversity_deg):
            self.converged = True
            logger.info("keyframes: converged with %d keyframes (change %.3f mm)", self.n_keyframes, change)

    def finish(self):
        """Recalibrate with all keyframes (when the last update is stale); returns ImageToProbe."""
        if self._since_update and self.n_keyframes >= MIN_CALIBRATION_FRAMES:
            self._recalibrate()
        if self.image_to_probe is None:
            raise CalibrationError(
                f"only {self.n_keyframes} keyframes (at least {MIN_CALIBRATION_FRAMES} are needed); move the probe "
                "over the phantom in different poses")
        return self.image_to_probe


def select_keyframes(points_px, probe_to_reference, phantom: NWirePhantom, image_size_px, *,
                     phantom_to_reference=None, settings: KeyframeSettings | None = None):
    """Run :class:`KeyframeCalibrator` over recorded detections.

    Parameters
    ----------
    points_px : (n, n_wires, 2) float
    probe_to_reference : (n, 4, 4) float
    phantom : NWirePhantom
    image_size_px : (width, height)
    phantom_to_reference : (4, 4), optional
    settings : KeyframeSettings, optional

    Returns
    -------
    calibrator : KeyframeCalibrator
        With ``keyframe_ids``, ``curve`` (list of :class:`ConvergencePoint`), ``converged`` and
        ``image_to_probe``; frames after convergence are not consumed.
    n_consumed : int
        Frames read until convergence (all of them if it never converged).
    """
    cal = KeyframeCalibrator(phantom, tuple(image_size_px), None if phantom_to_reference is None
                             else np.asarray(phantom_to_reference, dtype=np.float64), settings or KeyframeSettings())
    pts = np.asarray(points_px, dtype=np.float64)
    poses = np.asarray(probe_to_reference, dtype=np.float64)
    n = 0
    for i in range(pts.shape[0]):
        n = i + 1
        if cal.add(pts[i], poses[i]).converged:
            break
    if not cal.converged:
        cal.finish()
    return cal, n


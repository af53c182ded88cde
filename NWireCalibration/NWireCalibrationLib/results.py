"""Result types of detection and calibration (frozen dataclasses, JSON-safe ``to_dict``).

The JSON layouts are the ``freehandus detect`` / ``freehandus calibrate`` contract of issue 4:

- detection: ``{"detector", "phantom", "wire_names", "frames": [{"index", "ok", "points"}],
  "frames_total", "frames_detected", "seconds", ...}``, points in phantom wire order, pixels
  (x, y) of the MF image;
- calibration: ``{"ImageToProbe": 4x4, "pixel_spacing_mm": [sx, sy], "calibration": {...},
  "validation": {...}, "seconds", ...}`` where each data set has ``frames_total``,
  ``frames_segmented``, ``error3d_mean_mm``, ``error3d_trimmed95_mean_mm``, ``error3d_max_mm``,
  ``error2d_mean_px``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

__all__ = [
    "FrameDetection",
    "DetectionResult",
    "DataSetMetrics",
    "CalibrationResult",
    "plus_transform_element",
    "format_rejections",
    "format_stages",
    "format_plane_fit",
]


def _clean(value):
    """JSON-safe: numpy -> Python, NaN/inf -> None."""
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def format_stages(counts: dict, refused: list) -> str:
    """One line: detected frames per stage and the labellings the sequence stage refused."""
    text = "detected by stage: " + ", ".join(f"{n} {stage}" for stage, n in counts.items())
    if refused:
        text += f"; {len(refused)} single-frame labellings refused as motion-inconsistent"
    return text


def format_plane_fit(summary: dict, *, max_dots: int = 10) -> str:
    """One line (plus one per outlier dot, at most ``max_dots``): what the plane refinement did.

    ``summary``: :class:`~.plane_refinement.PlaneRefinement` ``summary``.
    """
    if not summary.get("frames_fitted"):
        return "plane refinement: no frame could be fitted (every centre kept as measured)"
    sp, noise = summary["pixel_spacing_mm"], summary["noise_px"]
    text = (f"plane refinement: {summary['dots_replaced']} dots in {summary['frames_refined']} frames replaced by "
            f"the fitted image plane's; {summary.get('outlier_dots_kept', summary['outlier_dots'])} outlier dots and "
            f"{summary['frames_model_rejected']} frames kept as measured (spacing {sp[0]:.5f} x {sp[1]:.5f} mm/px "
            f"{'fitted per recording' if summary['spacing_model'] == 'recording' else summary['spacing_model']}, "
            f"noise {noise[0]:.2f}, {noise[1]:.2f} px)")
    for d in summary.get("wires_kept_as_measured", []):
        text += (f"\n    wire {d['wire']}: measured centres kept, the model is off by {d['bias_px'][0]:+.2f}, "
                 f"{d['bias_px'][1]:+.2f} px over the recording (scatter {d['scatter_px'][0]:.2f}, "
                 f"{d['scatter_px'][1]:.2f} px)")
    kept = summary.get("kept_dots", [])
    for d in kept[:max_dots]:
        text += (f"\n    frame {d['frame']} wire {d['wire']}: measured centre kept, "
                 f"{d['residual_px'][0]:+.2f}, {d['residual_px'][1]:+.2f} px from the plane's")
    if len(kept) > max_dots:
        text += f"\n    ... {len(kept) - max_dots} more outlier dots (every one is in the JSON)"
    return text


def format_rejections(rejected: list, counts: dict, indent: str = "  ", *, max_frames: int = 20,
                      verb: str = "rejected") -> str:
    """Text of rejected frames: the counts by reason, then one line per frame (at most ``max_frames``).

    ``rejected``: ``[{"index", "reason_code", "reason"}]``; ``counts``: code -> frames; ``verb``:
    what happened to them (``"dropped"`` for validation frames, which only leave the validation
    errors).
    """
    if not rejected:
        return f"{indent}no frame {verb}"
    lines = [f"{indent}{verb} {len(rejected)} frame{'s' if len(rejected) != 1 else ''}: "
             + ", ".join(f"{n} {code}" for code, n in counts.items())]
    for r in rejected[:max_frames]:
        lines.append(f"{indent}  frame {r['index']}: {r['reason_code']}" + (f": {r['reason']}" if r.get("reason") else ""))
    if len(rejected) > max_frames:
        lines.append(f"{indent}  ... {len(rejected) - max_frames} more (every frame's reason is in the JSON)")
    return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class FrameDetection:
    """Dots of one image.

    Attributes
    ----------
    ok : bool
        All wires found and the geometry checks passed.
    points_px : (n_wires, 2) float64
        (x, y) pixels, MF image, phantom wire order; NaN when not ok.
    candidates_px : (n, 2) float64
        All dot candidates before geometric filtering.
    reason : str
        Why the frame failed ("" when ok).
    reason_code : str
        The failure's key in :data:`~.labeling.REJECTION_REASONS` ("" when ok).
    """

    ok: bool
    points_px: np.ndarray
    candidates_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    reason: str = ""
    reason_code: str = ""


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Dots of a whole sequence.

    Attributes
    ----------
    detector : str
        ``"hessian"``, ``"plus"``, ``"agcfd"`` or ``"tacd"``.
    phantom_name : str
    wire_names : list of str
    points_px : (n_frames, n_wires, 2) float64
        NaN for frames that failed.
    ok : (n_frames,) bool
    n_candidates : (n_frames,) int
    reasons : list of str
        Failure reason per frame ("" where ok).
    pixel_spacing_mm : (2,) float
        The spacing hint the detector used.
    seconds : float
        Wall time of detection.
    reason_codes : list of str, optional
        Failure code per frame (:data:`~.labeling.REJECTION_REASONS`, "" where ok); a failed
        frame without one counts as ``"unstated"``.
    stages : list of str, optional
        Per frame, which stage labelled it (:data:`~.sequence_labeling.STAGES`: ``"single-frame"``,
        ``"tracked"``, ``"neighbours"``; "" where rejected); absent: every detected frame alone.
    sequence : dict, optional
        What the sequence stage did (:class:`~.sequence_labeling.SequenceOutcome` ``summary``):
        the recovered frames per stage, the refused labellings, its tolerances.
    plane_fit : dict, optional
        What the plane refinement did (:class:`~.plane_refinement.PlaneRefinement` ``summary``):
        dots replaced by the fitted image plane's, outlier dots and frames kept as measured, the
        recording's fitted pixel spacing and the dots' noise; absent: not run.
    """

    detector: str
    phantom_name: str
    wire_names: list
    points_px: np.ndarray
    ok: np.ndarray
    n_candidates: np.ndarray
    reasons: list
    pixel_spacing_mm: tuple
    seconds: float
    reason_codes: list = None
    stages: list = None
    sequence: dict = None
    plane_fit: dict = None

    @property
    def n_frames(self) -> int:
        return int(self.ok.size)

    @property
    def frames_detected(self) -> int:
        return int(self.ok.sum())

    @property
    def frames_per_second(self) -> float:
        return self.n_frames / self.seconds if self.seconds > 0 else float("inf")

    def reason_code(self, i: int) -> str:
        """Failure code of frame ``i`` ("" when detected, ``"unstated"`` when the detector gave none)."""
        if self.ok[i]:
            return ""
        code = self.reason_codes[i] if self.reason_codes is not None else ""
        return code or "unstated"

    def rejected_frames(self) -> list[dict]:
        """``[{"index", "reason_code", "reason"}]`` for every frame that was not detected."""
        return [{"index": int(i), "reason_code": self.reason_code(i), "reason": self.reasons[i]}
                for i in np.flatnonzero(~self.ok)]

    def stage_counts(self) -> dict:
        """Detected frames per stage (:data:`~.sequence_labeling.STAGES`), every stage listed."""
        from .sequence_labeling import STAGES

        counts = dict.fromkeys(STAGES, 0)
        for i in np.flatnonzero(self.ok):
            stage = (self.stages[i] if self.stages is not None else "") or "single-frame"
            counts[stage] = counts.get(stage, 0) + 1
        return counts

    def refused_frames(self) -> list:
        """Frames whose single-frame labelling the sequence stage refused (a wrong label)."""
        return list((self.sequence or {}).get("refused", []))

    def rejection_counts(self) -> dict:
        """Rejected frames per reason code, most frequent first."""
        counts: dict = {}
        for i in np.flatnonzero(~self.ok):
            code = self.reason_code(i)
            counts[code] = counts.get(code, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict:
        frames = []
        for i in range(self.n_frames):
            entry = {"index": i, "ok": bool(self.ok[i]),
                     "points": _clean(self.points_px[i]) if self.ok[i] else []}
            if self.ok[i] and self.stages is not None:
                entry["stage"] = self.stages[i] or "single-frame"
            if not self.ok[i]:
                entry["reason_code"] = self.reason_code(i)
                if self.reasons[i]:
                    entry["reason"] = self.reasons[i]
            frames.append(entry)
        return {
            "detector": self.detector,
            "phantom": self.phantom_name,
            "wire_names": list(self.wire_names),
            "pixel_spacing_mm": _clean(list(self.pixel_spacing_mm)),
            "frames_total": self.n_frames,
            "frames_detected": self.frames_detected,
            "rejected_by_reason": self.rejection_counts(),
            "detected_by_stage": self.stage_counts(),
            "refused_by_sequence": self.refused_frames(),
            "sequence_stage": _clean(self.sequence) if self.sequence is not None else None,
            "plane_refinement": _clean(self.plane_fit) if self.plane_fit is not None else None,
            "seconds": float(self.seconds),
            "frames_per_second": _clean(self.frames_per_second),
            "frames": frames,
        }

    def __str__(self) -> str:
        failed = [i for i in range(self.n_frames) if not self.ok[i]]
        text = (f"{self.detector} detector, phantom {self.phantom_name}: {self.frames_detected}/{self.n_frames} "
                f"frames detected in {self.seconds:.2f} s ({self.frames_per_second:.1f} frames/s)")
        text += "\n  " + format_stages(self.stage_counts(), self.refused_frames())
        if self.plane_fit is not None:
            text += "\n  " + format_plane_fit(self.plane_fit)
        if failed:
            text += "\n" + format_rejections(self.rejected_frames(), self.rejection_counts(), "  ")
        return text


@dataclass(frozen=True, eq=False)
class DataSetMetrics:
    """Errors of a calibration on one data set (calibration or validation frames).

    Attributes
    ----------
    frames_total, frames_segmented, frames_used : int
        Frames in the set, with a complete detection, and (calibration set) used by the solver.
    error3d_mean_mm, error3d_trimmed95_mean_mm, error3d_std_mm, error3d_trimmed95_std_mm, error3d_max_mm : float
        PLUS 3D reprojection error of the middle wires (mm): untrimmed mean, mean of the best
        95 % (what PLUS reports), standard deviations, maximum.
    error2d_mean_px : float
        Mean length of the PLUS 2D reprojection errors (all wires), pixels.
    error2d_per_wire_px : (n_wires, 2) float
        Mean (x, y) 2D reprojection error per wire (PLUS ``ReprojectionError2DStatistics``).
    wire_distance_mean_mm : float
        Mean 3D distance of the mapped dots to their wires (all wires), mm.
    """

    frames_total: int
    frames_segmented: int
    frames_used: int
    error3d_mean_mm: float
    error3d_trimmed95_mean_mm: float
    error3d_std_mm: float
    error3d_trimmed95_std_mm: float
    error3d_max_mm: float
    error2d_mean_px: float
    error2d_per_wire_px: np.ndarray
    wire_distance_mean_mm: float

    def to_dict(self) -> dict:
        return {k: _clean(v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return (f"{self.frames_segmented}/{self.frames_total} frames segmented, {self.frames_used} used; "
                f"3D error {self.error3d_trimmed95_mean_mm:.3f} mm (best 95 %), {self.error3d_mean_mm:.3f} mm (all), "
                f"max {self.error3d_max_mm:.3f} mm; 2D error {self.error2d_mean_px:.2f} px")


def plus_transform_element(image_to_probe, *, error_mm: float | None = None, date: datetime | str | None = None,
                           from_frame: str = "Image", to_frame: str = "Probe") -> str:
    """A PLUS ``<Transform From="Image" To="Probe" Matrix=... Error=... Date=.../>`` element.

    Paste it into the ``<CoordinateDefinitions>`` of a PLUS device-set configuration.
    """
    from FreehandUSLib.io.plus_config import transform_element

    if date is None:
        date = datetime.now()
    return transform_element(f"{from_frame}To{to_frame}", image_to_probe, error_mm=error_mm, date=date)


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """A probe calibration.

    Attributes
    ----------
    image_to_probe : (4, 4) float64
        Pixels (MF image) -> Probe mm.
    phantom_to_reference : (4, 4) float64
        Known (from the configuration) or estimated.
    phantom_pose : str
        ``"known"`` or ``"estimated"``.
    solver : str
        ``"lsq"``, ``"lm"`` or ``"ransac-lm"``.
    pixel_spacing_mm : (2,) float
        Norms of the first two ImageToProbe columns.
    calibration : DataSetMetrics
    validation : DataSetMetrics or None
    phantom_name : str
    pose_diversity_deg : float
        Largest rotation between two calibration frames.
    warnings : list of str
        Things the user should fix (e.g. "tilt the probe more").
    seconds : float
        Wall time (detection + solving).
    info : dict
        Solver details.
    """

    image_to_probe: np.ndarray
    phantom_to_reference: np.ndarray
    phantom_pose: str
    solver: str
    pixel_spacing_mm: tuple
    calibration: DataSetMetrics
    validation: DataSetMetrics | None
    phantom_name: str
    pose_diversity_deg: float
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def error_mm(self) -> float:
        """The error PLUS stores with ImageToProbe: validation (else calibration) 95 % mean."""
        ds = self.validation if self.validation is not None else self.calibration
        return ds.error3d_trimmed95_mean_mm

    def plus_transform_element(self, date=None) -> str:
        """The ImageToProbe as a PLUS ``<Transform>`` element (with ``Error`` in mm)."""
        err = self.error_mm
        return plus_transform_element(self.image_to_probe, error_mm=err if math.isfinite(err) else None, date=date)

    def to_dict(self) -> dict:
        return {
            "ImageToProbe": _clean(self.image_to_probe),
            "PhantomToReference": _clean(self.phantom_to_reference),
            "phantom_pose": self.phantom_pose,
            "solver": self.solver,
            "phantom": self.phantom_name,
            "pixel_spacing_mm": _clean(list(self.pixel_spacing_mm)),
            "pose_diversity_deg": _clean(self.pose_diversity_deg),
            "calibration": self.calibration.to_dict(),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "warnings": list(self.warnings),
            "seconds": float(self.seconds),
            "plus_transform": self.plus_transform_element(),
            "info": _clean(self.info),
        }

    def __str__(self) -> str:
        rows = "\n".join("    " + "  ".join(f"{v: .6g}" for v in row) for row in self.image_to_probe)
        lines = [
            f"ImageToProbe ({self.solver}, phantom pose {self.phantom_pose}, phantom {self.phantom_name}):",
            rows,
            f"  pixel spacing {self.pixel_spacing_mm[0]:.5f} x {self.pixel_spacing_mm[1]:.5f} mm/px, "
            f"pose diversity {self.pose_diversity_deg:.1f} deg",
            f"  calibration: {self.calibration}",
        ]
        if self.validation is not None:
            lines.append(f"  validation:  {self.validation}")
        rejected = self.info.get("rejected_frames") or {}
        counts = self.info.get("rejected_by_reason") or {}
        stages = self.info.get("detected_by_stage") or {}
        refused = self.info.get("refused_by_sequence") or {}
        for name in ("calibration", "validation"):
            if rejected.get(name) or stages.get(name):
                lines.append(f"  {name} recording:")
            if stages.get(name):
                lines.append("    " + format_stages(stages[name], refused.get(name, [])))
            plane = (self.info.get("plane_refinement") or {}).get(name)
            if plane:
                lines.append("    " + format_plane_fit(plane, max_dots=5).replace("\n", "\n    "))
            if rejected.get(name):
                lines.append(format_rejections(rejected[name], counts.get(name, {}), "    ", max_frames=10,
                                               verb="rejected" if name == "calibration" else "dropped"))
        if "time_offset_s" in self.info:
            detail = self.info.get("time_offset") or {}
            lines.append(f"  time offset {1000 * float(self.info['time_offset_s']):+.1f} ms "
                         f"({self.info.get('time_offset_mode', 'given')}"
                         + (f": {detail['reason']}" if detail.get("reason") else "") + ")")
        lines.append(f"  {self.seconds:.2f} s")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

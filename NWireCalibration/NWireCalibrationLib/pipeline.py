"""Top-level N-wire calibration: what the command line and the Slicer Logic call.

Typical use::

    from FreehandUSLib.io import read_sequence
    from NWireCalibrationLib.pipeline import load_setup, calibrate

    setup = load_setup("PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml")
    result = calibrate(read_sequence("cal.igs.mha"), read_sequence("val.igs.mha"), setup,
                       solver="ransac-lm")
    print(result)                              # ImageToProbe, errors, warnings
    print(result.plus_transform_element())     # paste into a PLUS config

:func:`detect_sequence` finds the dots of every frame; :func:`calibrate_from_points` solves
from dots and poses (also used by the live/keyframe mode and the simulator tests);
:func:`calibrate` chains both and computes PLUS's error measures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from FreehandUSLib.errors import TransformError

from .detect_baselines import AgcfdDetector, PlusStyleDetector, TacdDetector, plus_labeling_settings
from .detect_hessian import HessianDetector, HessianSettings
from .errors import CalibrationError, DetectionError
from .labeling import LabelingSettings
from .metrics import pose_diversity_deg, reprojection_errors_2d, reprojection_errors_3d, trimmed_statistics
from .phantom import NWirePhantom, load_phantom, phantom_from_plus
from .plane_refinement import PlaneRefinementSettings, refine_dots_by_plane
from .results import CalibrationResult, DataSetMetrics, DetectionResult
from .sequence_labeling import SequenceSettings, label_sequence
from .solvers import (
    MIN_CALIBRATION_FRAMES,
    WEIGHTINGS,
    SolverSolution,
    calibrate_linear,
    calibrate_lm,
    calibrate_ransac_lm,
    point_wire_residuals,
)
from .temporal import TimeOffsetEstimate, estimate_time_offset, parse_time_offset, probe_to_reference_at

__all__ = [
    "DETECTORS",
    "SOLVERS",
    "MIN_POSE_DIVERSITY_DEG",
    "DEFAULT_TIME_OFFSET",
    "DEFAULT_WEIGHTING",
    "CalibrationSetup",
    "load_setup",
    "make_detector",
    "probe_to_reference",
    "detect_frames",
    "detect_sequence",
    "calibrate_from_points",
    "calibrate",
]

logger = logging.getLogger(__name__)

DETECTORS = ("hessian", "plus", "agcfd", "tacd")
SOLVERS = ("lsq", "lm", "ransac-lm")
#: Below this rotation range of the probe the pose is poorly determined (warning).
MIN_POSE_DIVERSITY_DEG = 10.0
#: Default of :func:`calibrate`'s ``time_offset``: estimate the video-to-tracker offset from the
#: calibration recording and apply it when held-out frames confirm it (:mod:`.temporal`). On
#: PLUS's fCal 2.0 recording it finds +46 ms and lowers the blocked cross-validation error of the
#: calibration frames by 11 %; on recordings without an offset (or without motion between
#: frames) the check fails and nothing changes.
DEFAULT_TIME_OFFSET = "auto"
#: Default LM residual weighting (:data:`~.solvers.WEIGHTINGS`). ``"noise"`` (maximum likelihood for
#: dot noise larger across the beam than along it) is opt-in: better cross-validation and
#: simulation, worse on the fCal 2.0 validation recording (0.521 vs 0.515 mm).
DEFAULT_WEIGHTING = "none"


@dataclass(frozen=True, eq=False)
class CalibrationSetup:
    """Everything besides the images that a calibration needs.

    Attributes
    ----------
    phantom : NWirePhantom
    phantom_to_reference : (4, 4) float64 or None
        Phantom registration (PLUS ``<Transform From="Phantom" To="Reference">``).
    pixel_spacing_mm : (sx, sy)
        Approximate spacing (PLUS ``ApproximateSpacingMmPerPixel``), used to size the filters.
    clip_rectangle_px : ((x, y), (w, h)) or None
        Searched image part (PLUS ``ClipRectangleOrigin/Size``).
    segmentation : object or None
        The PLUS ``SegmentationParameters`` (for the PLUS-style detector's tolerances).
    source : str
        Where it came from (the config path).
    """

    phantom: NWirePhantom
    phantom_to_reference: np.ndarray | None = None
    pixel_spacing_mm: tuple | None = None
    clip_rectangle_px: tuple | None = None
    segmentation: object = None
    source: str = ""


def load_setup(config=None, *, phantom=None, pixel_spacing_mm=None, use_clip_rectangle: bool = True) -> CalibrationSetup:
    """Build a :class:`CalibrationSetup` from a PLUS configuration and/or overrides.

    Parameters
    ----------
    config : str or Path, optional
        PLUS device-set configuration: phantom geometry (``<PhantomDefinition>``),
        PhantomToReference (``<CoordinateDefinitions>``) and segmentation hints
        (``<Segmentation>``: ``ApproximateSpacingMmPerPixel``, clip rectangle).
    phantom : str, Path or NWirePhantom, optional
        Overrides the config's phantom (built-in name, JSON or XML file).
    pixel_spacing_mm : float or (sx, sy), optional
        Overrides the spacing hint.
    use_clip_rectangle : bool
        Restrict detection to the config's clip rectangle.

    Raises
    ------
    ConfigError
        The config has no ``<PhantomDefinition>`` and no ``phantom`` is given (the message says
        to add one or pass ``--phantom``).
    """
    cfg = None
    if config is not None:
        from FreehandUSLib.io.plus_config import read_plus_config

        cfg = read_plus_config(config)
    if phantom is not None:
        ph = load_phantom(phantom)
    elif cfg is not None:
        ph = phantom_from_plus(cfg)
    else:
        raise DetectionError("no phantom: give a PLUS configuration with a <PhantomDefinition> or a phantom name/file")
    y = None
    spacing = None
    clip = None
    seg = None
    if cfg is not None:
        y = cfg.coordinate_definitions.get("PhantomToReference")
        seg = cfg.segmentation
        if seg is not None:
            spacing = (seg.approximate_spacing_mm_per_px,) * 2
            if use_clip_rectangle and seg.clip_rectangle_origin_px is not None and seg.clip_rectangle_size_px is not None:
                clip = (tuple(seg.clip_rectangle_origin_px), tuple(seg.clip_rectangle_size_px))
    if pixel_spacing_mm is not None:
        spacing = tuple(np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,)).tolist())
    return CalibrationSetup(ph, None if y is None else np.asarray(y, dtype=np.float64), spacing, clip, seg,
                            str(config) if config is not None else "")


def _spacing_for(sequence, setup: CalibrationSetup | None, pixel_spacing_mm):
    if pixel_spacing_mm is not None:
        return np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,)).copy()
    if setup is not None and setup.pixel_spacing_mm is not None:
        return np.asarray(setup.pixel_spacing_mm, dtype=float)
    if sequence is not None and getattr(sequence, "pixel_spacing_mm", None) is not None:
        return np.asarray(sequence.pixel_spacing_mm, dtype=float)
    raise DetectionError(
        "no pixel spacing hint: give a PLUS config with <Segmentation ApproximateSpacingMmPerPixel=...> "
        "or --pixel-spacing (mm per pixel)"
    )


def make_detector(name: str, phantom: NWirePhantom, pixel_spacing_mm, *, clip_rectangle_px=None,
                  segmentation=None, hessian: HessianSettings | None = None,
                  labeling: LabelingSettings | None = None):
    """A detector object with ``detect(image) -> FrameDetection``.

    Parameters
    ----------
    name : str
        One of :data:`DETECTORS`.
    labeling : LabelingSettings, optional
        Its absolute tolerances are derived for ``phantom`` and ``pixel_spacing_mm``
        (:meth:`~.labeling.LabelingSettings.resolved`) before the detector gets them.
    """
    key = name.lower()
    if key not in DETECTORS:
        raise ValueError(f"detector: expected one of {', '.join(DETECTORS)}, got {name!r}")

    def resolved(settings: LabelingSettings) -> LabelingSettings:
        # The tolerances derived for this phantom and spacing, so that the detector's own checks
        # (the 3D check on the sub-pixel dots) use the same numbers as the labeling. A bad
        # spacing is left to the detector, which names it.
        try:
            sp = np.asarray(pixel_spacing_mm, dtype=np.float64)
        except (TypeError, ValueError):
            return settings
        if sp.size not in (1, 2) or not np.all(np.isfinite(sp) & (sp > 0)):
            return settings
        return settings.resolved(phantom, sp)

    if key == "hessian":
        return HessianDetector(phantom, pixel_spacing_mm, settings=hessian or HessianSettings(),
                               labeling=resolved(labeling or LabelingSettings()), clip_rectangle_px=clip_rectangle_px)
    if key == "plus":
        return PlusStyleDetector(phantom, pixel_spacing_mm, clip_rectangle_px=clip_rectangle_px,
                                 labeling=resolved(labeling or plus_labeling_settings(segmentation)),
                                 **({} if segmentation is None else {
                                     "opening_circle_radius_mm": segmentation.morphological_opening_circle_radius_mm,
                                     "opening_bar_size_mm": segmentation.morphological_opening_bar_size_mm,
                                     "threshold_image_percent": segmentation.threshold_image_percent}))
    if key == "agcfd":
        return AgcfdDetector(phantom, pixel_spacing_mm, clip_rectangle_px=clip_rectangle_px,
                             labeling=resolved(labeling or LabelingSettings()))
    return TacdDetector(phantom, pixel_spacing_mm, clip_rectangle_px=clip_rectangle_px,
                        labeling=resolved(labeling or LabelingSettings()))


def probe_to_reference(sequence, *, probe: str = "Probe", reference: str = "Reference") -> np.ndarray:
    """Per-frame ``ProbeToReference`` (n, 4, 4), NaN where not tracked.

    Resolved through the sequence's transforms (e.g. ``inv(ReferenceToTracker) @ ProbeToTracker``).

    Raises
    ------
    TransformError
        The sequence has no chain from Probe to Reference (the message lists what it has).
    """
    return sequence.repository().get(f"{probe}To{reference}")


def detect_frames(frames, detector, *, progress=None):
    """Run ``detector`` on ``(n, rows, cols)`` frames.

    Returns (points (n, w, 2), ok, n_candidates, reasons, reason_codes, candidates): the failure
    text and its :data:`~.labeling.REJECTION_REASONS` code per frame ("" where ok), and every
    frame's dot candidates ((m, 2) pixels).
    """
    n = len(frames)
    pts = None
    ok = np.zeros(n, dtype=bool)
    ncand = np.zeros(n, dtype=int)
    reasons = [""] * n
    codes = [""] * n
    cands = [np.zeros((0, 2))] * n
    for i in range(n):
        det = detector.detect(frames[i])
        if pts is None:
            pts = np.full((n,) + det.points_px.shape, np.nan)
        pts[i] = det.points_px
        ok[i] = det.ok
        ncand[i] = len(det.candidates_px)
        reasons[i] = det.reason
        codes[i] = det.reason_code
        cands[i] = np.asarray(det.candidates_px, dtype=np.float64).reshape(-1, 2)
        if progress is not None:
            progress(i + 1, n)
    if pts is None:
        pts = np.zeros((0, detector.phantom.n_wires, 2))
    return pts, ok, ncand, reasons, codes, cands


def detect_sequence(sequence, setup: CalibrationSetup, *, detector: str = "hessian", pixel_spacing_mm=None,
                    hessian: HessianSettings | None = None, labeling: LabelingSettings | None = None,
                    sequence_stage: bool | None = None, sequence_settings: SequenceSettings | None = None,
                    plane_refinement: bool | None = None, plane_settings: PlaneRefinementSettings | None = None,
                    progress=None) -> DetectionResult:
    """Detect the phantom's dots in every frame of a tracked sequence.

    Parameters
    ----------
    sequence : TrackedSequence
        Frames in MF orientation (frames without an image are reported as failed).
    setup : CalibrationSetup
    detector : str
        ``"hessian"`` (the paper), ``"plus"``, ``"agcfd"`` or ``"tacd"``.
    pixel_spacing_mm : float or (sx, sy), optional
        Overrides the setup's hint.
    sequence_stage : bool, optional
        After every frame is labelled alone, refuse labels that jump from their neighbours and
        recover failed frames from the neighbours and the tracked motion
        (:mod:`.sequence_labeling`). Default: on for the Hessian detector, off for the baselines
        (which reproduce their published single-frame methods).
    sequence_settings : SequenceSettings, optional
    plane_refinement : bool, optional
        Last, replace each labelled frame's dots by the crossings of ONE fitted image plane with
        the phantom's wires where the residuals are consistent with the noise (outliers keep
        their measured centres; :mod:`.plane_refinement`). Default: on for the Hessian
        detector, off for the baselines.
    plane_settings : PlaneRefinementSettings, optional
    progress : callable(done, total), optional

    Returns
    -------
    DetectionResult
        ``stages`` says which stage labelled each frame, ``sequence`` what the sequence stage did,
        ``plane_fit`` what the plane refinement did.
    """
    spacing = _spacing_for(sequence, setup, pixel_spacing_mm)
    det = make_detector(detector, setup.phantom, spacing, clip_rectangle_px=setup.clip_rectangle_px,
                        segmentation=setup.segmentation, hessian=hessian, labeling=labeling)
    t0 = time.perf_counter()
    pts, ok, ncand, reasons, codes, cands = detect_frames(sequence.frames, det, progress=progress)
    no_image = ~np.asarray(sequence.image_ok, dtype=bool)
    ok &= ~no_image
    pts[no_image] = np.nan
    for i in np.flatnonzero(no_image):
        reasons[i] = "frame has no image"
        codes[i] = "no-image"
        cands[i] = np.zeros((0, 2))
    stages = ["single-frame" if v else "" for v in ok]
    summary = None
    if sequence_stage if sequence_stage is not None else detector.lower() == "hessian":
        out = _sequence_stage(sequence, setup, det, pts, ok, cands, reasons, codes, spacing, sequence_settings)
        pts, ok, stages, reasons, codes, summary = (out.points_px, out.ok, out.stages, out.reasons, out.reason_codes,
                                                    out.summary)
    plane = None
    if plane_refinement if plane_refinement is not None else detector.lower() == "hessian":
        if plane_settings is None:  # an echo's half-extent, as the detector expects the echoes
            plane_settings = PlaneRefinementSettings(echo_radius_mm=0.5 * (hessian or HessianSettings()).echo_size_mm)
        refined = refine_dots_by_plane(pts, ok, setup.phantom, spacing, settings=plane_settings)
        pts, plane = refined.points_px, refined.summary
    seconds = time.perf_counter() - t0
    result = DetectionResult(detector, setup.phantom.name, setup.phantom.wire_names, pts, ok, ncand, reasons,
                             tuple(float(v) for v in spacing), seconds, codes, stages, summary, plane)
    logger.info("%s", result)
    return result


def _sequence_stage(sequence, setup, det, pts, ok, cands, reasons, codes, spacing, settings):
    """Run :func:`~.sequence_labeling.label_sequence` with the sequence's tracking (when it has any)."""
    try:
        poses = probe_to_reference(sequence)
    except TransformError as exc:  # not tracked (or no Probe-to-Reference chain): image space only
        logger.info("sequence stage without tracking: %s", exc)
        poses = None
    verify = search = None
    if hasattr(det, "verify"):
        def verify(i, points):
            return det.verify(sequence.frames[i], points)
    if isinstance(det, HessianDetector):
        def search(i):
            points, strengths, *_ = det.candidates(sequence.frames[i], all_peaks=True)
            return points, strengths
    # 0.5 mm around a point (at least one pixel): a physical length, about a wire echo's extent,
    # so a dot on the sector's edge still finds its own echo's pixels.
    half = max(1, int(round(0.5 / float(np.mean(spacing)))))

    def imaged(i, points):
        """Any non-zero pixel within 0.5 mm of each point (outside a sector the screen is empty)."""
        frame = np.asarray(sequence.frames[i])
        h, w = frame.shape[:2]
        out = np.zeros(len(points), dtype=bool)
        for k, (x, y) in enumerate(np.round(points).astype(int)):
            if 0 <= x < w and 0 <= y < h:
                out[k] = bool(np.any(frame[max(0, y - half): y + half + 1, max(0, x - half): x + half + 1]))
        return out

    return label_sequence(pts, ok, cands, setup.phantom, spacing, reasons=reasons, reason_codes=codes,
                          probe_to_reference=poses, phantom_to_reference=setup.phantom_to_reference, verify=verify,
                          search=search, settings=settings, imaged=imaged,
                          labeling=getattr(det, "labeling", None),
                          image_size_px=None if len(sequence.frames) == 0 else sequence.frames[0].shape[1::-1])


def _data_set_metrics(points_px, poses, image_to_probe, phantom_to_reference, phantom, used=None) -> DataSetMetrics:
    pts = np.asarray(points_px, dtype=np.float64)
    segmented = np.all(np.isfinite(pts), axis=(1, 2))
    tracked = np.all(np.isfinite(poses), axis=(1, 2))
    e3 = reprojection_errors_3d(pts, poses, image_to_probe, phantom_to_reference, phantom)
    st = trimmed_statistics(e3)
    e2 = reprojection_errors_2d(pts, poses, image_to_probe, phantom_to_reference, phantom)
    good = segmented & tracked
    e2n = np.linalg.norm(e2[good], axis=-1)
    safe = np.where(tracked[:, None, None], poses, np.eye(4))
    i2ph = np.linalg.inv(phantom_to_reference) @ safe @ image_to_probe
    wd = np.linalg.norm(point_wire_residuals(pts, i2ph, phantom), axis=-1)[good]
    with np.errstate(invalid="ignore"):
        per_wire = np.nanmean(e2[good], axis=0) if good.any() else np.full((phantom.n_wires, 2), np.nan)
    return DataSetMetrics(
        frames_total=int(pts.shape[0]), frames_segmented=int(segmented.sum()),
        frames_used=int((good if used is None else used & good).sum()),
        error3d_mean_mm=st.mean, error3d_trimmed95_mean_mm=st.trimmed_mean, error3d_std_mm=st.std,
        error3d_trimmed95_std_mm=st.trimmed_std, error3d_max_mm=st.max,
        error2d_mean_px=float(e2n.mean()) if e2n.size else float("nan"),
        error2d_per_wire_px=per_wire,
        wire_distance_mean_mm=float(wd.mean()) if wd.size else float("nan"),
    )


def calibrate_from_points(points_px, poses, phantom: NWirePhantom, *, phantom_to_reference=None,
                          solver: str = "ransac-lm", phantom_pose: str = "auto", validation_points_px=None,
                          validation_poses=None, pixel_spacing_hint_mm=None, ransac_iterations: int = 3000,
                          ransac_subset: int = 10, ransac_threshold_mm: float = 0.5, residual: str = "correspondences",
                          weighting: str = DEFAULT_WEIGHTING, seed: int = 0) -> CalibrationResult:
    """Calibrate from detected dots and tracked poses.

    Parameters
    ----------
    points_px : (n, n_wires, 2) float
        Dots (phantom wire order), NaN where not detected.
    poses : (n, 4, 4) float
        ProbeToReference per frame (NaN where not tracked).
    phantom : NWirePhantom
    phantom_to_reference : (4, 4) float, optional
        The phantom registration; needed for ``phantom_pose="known"`` and the ``lsq`` solver.
    solver : str
        ``"lsq"`` (PLUS), ``"lm"`` or ``"ransac-lm"`` (default).
    phantom_pose : str
        ``"known"``, ``"estimate"`` or ``"auto"`` (known when a registration is given).
    validation_points_px, validation_poses : optional
        A second recording to report validation errors on.
    pixel_spacing_hint_mm : float or (sx, sy), optional
        The detector's spacing hint; a warning is given when the calibration disagrees by > 30 %.
    ransac_iterations, ransac_subset, ransac_threshold_mm, seed :
        RANSAC parameters (paper: 3000, 10, 0.5 mm).
    residual : str
        LM residual (:data:`~.solvers.RESIDUALS`).
    weighting : str
        LM residual weighting (:data:`~.solvers.WEIGHTINGS`; default :data:`DEFAULT_WEIGHTING`);
        ignored by the ``lsq`` solver.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    CalibrationError
        Fewer than 10 usable frames, a solver that needs a registration without one, or
        degenerate poses for phantom-pose estimation.
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if phantom_pose not in ("known", "estimate", "auto"):
        raise ValueError(f"phantom_pose: expected 'known', 'estimate' or 'auto', got {phantom_pose!r}")
    pts = np.asarray(points_px, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    estimate = phantom_pose == "estimate" or (phantom_pose == "auto" and phantom_to_reference is None)
    if not estimate and phantom_to_reference is None:
        raise CalibrationError(
            "phantom pose 'known' needs a PhantomToReference registration (<Transform From=\"Phantom\" "
            "To=\"Reference\"> in the config); add it or use --phantom-pose estimate"
        )
    if solver == "lsq" and estimate:
        raise CalibrationError("the lsq (PLUS) solver needs a known PhantomToReference; use --solver lm or ransac-lm "
                               "to estimate the phantom pose")
    usable = np.all(np.isfinite(pts), axis=(1, 2)) & np.all(np.isfinite(poses), axis=(1, 2))
    warnings = []
    n_usable = int(usable.sum())
    if n_usable < MIN_CALIBRATION_FRAMES:
        segmented = int(np.all(np.isfinite(pts), axis=(1, 2)).sum())
        raise CalibrationError(
            f"only {n_usable} of {pts.shape[0]} frames have all {phantom.n_wires} wires detected and a valid "
            f"probe pose ({segmented} detected); at least {MIN_CALIBRATION_FRAMES} are needed. Check that the whole "
            "phantom is in the image, the pixel spacing hint (ApproximateSpacingMmPerPixel) and the tracking"
        )
    diversity = pose_diversity_deg(poses[usable])
    if diversity < MIN_POSE_DIVERSITY_DEG:
        warnings.append(
            f"tilt the probe more; pose diversity {diversity:.1f} deg < {MIN_POSE_DIVERSITY_DEG:g} deg"
            + (" (the phantom pose estimate is unreliable)" if estimate else "")
        )
    y = None if phantom_to_reference is None else np.asarray(phantom_to_reference, dtype=np.float64)
    if solver == "lsq":
        sol: SolverSolution = calibrate_linear(pts, poses, y, phantom)
    elif solver == "lm":
        sol = calibrate_lm(pts, poses, phantom, phantom_to_reference=y, estimate_phantom_pose=estimate,
                           residual=residual, weighting=weighting)
    else:
        sol = calibrate_ransac_lm(pts, poses, phantom, phantom_to_reference=y, estimate_phantom_pose=estimate,
                                  n_iterations=ransac_iterations, subset_size=ransac_subset,
                                  threshold_mm=ransac_threshold_mm, seed=seed, residual=residual,
                                  weighting=weighting)
    m = sol.image_to_probe
    spacing = (float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1])))
    if pixel_spacing_hint_mm is not None:
        hint = np.broadcast_to(np.asarray(pixel_spacing_hint_mm, dtype=float), (2,))
        ratio = np.array(spacing) / hint
        if np.any(ratio > 1.3) or np.any(ratio < 1 / 1.3):
            warnings.append(
                f"the pixel spacing hint ({hint[0]:.4g} x {hint[1]:.4g} mm/px) differs from the calibrated spacing "
                f"({spacing[0]:.4g} x {spacing[1]:.4g} mm/px); fix ApproximateSpacingMmPerPixel in the config"
            )
    cal = _data_set_metrics(pts, poses, m, sol.phantom_to_reference, phantom, sol.frames_used)
    val = None
    if validation_points_px is not None:
        val = _data_set_metrics(np.asarray(validation_points_px, dtype=float), np.asarray(validation_poses, dtype=float),
                                m, sol.phantom_to_reference, phantom)
        if val.frames_segmented == 0:
            warnings.append("no validation frame was detected; validation errors are undefined")
    used_frac = sol.frames_used.sum() / max(1, n_usable)
    if used_frac < 0.7:
        warnings.append(f"only {100 * used_frac:.0f} % of the detected frames agree with the calibration "
                        "(the rest were rejected as outliers); check the tracking and the phantom registration")
    info = {k: v for k, v in sol.info.items() if not isinstance(v, np.ndarray)}
    info.update({"cost_mm": sol.cost_mm, "n_iterations": sol.n_iterations, "frames_usable": n_usable,
                 "frames_used": int(sol.frames_used.sum()), "residual": residual, "seed": seed,
                 "weighting": "none" if solver == "lsq" else weighting})
    if "residual_sigmas_mm" in sol.info:
        info["residual_sigmas_mm"] = np.round(sol.info["residual_sigmas_mm"], 6).tolist()
    return CalibrationResult(
        image_to_probe=m, phantom_to_reference=sol.phantom_to_reference, phantom_pose=sol.phantom_pose,
        solver=sol.method, pixel_spacing_mm=spacing, calibration=cal, validation=val, phantom_name=phantom.name,
        pose_diversity_deg=diversity, warnings=warnings, seconds=time.perf_counter() - t0, info=info,
    )


def calibrate(calibration, validation=None, setup: CalibrationSetup | None = None, *, solver: str = "ransac-lm",
              phantom_pose: str = "auto", detector: str = "hessian", pixel_spacing_mm=None,
              calibration_detection: DetectionResult | None = None,
              validation_detection: DetectionResult | None = None, time_offset=DEFAULT_TIME_OFFSET, progress=None,
              sequence_stage: bool | None = None, plane_refinement: bool | None = None,
              **solver_options) -> CalibrationResult:
    """Detect dots in a calibration (and validation) recording and calibrate.

    Parameters
    ----------
    calibration, validation : TrackedSequence
        Recordings of the phantom with ProbeToTracker and ReferenceToTracker (or any chain to
        ProbeToReference).
    setup : CalibrationSetup
        From :func:`load_setup`.
    solver, phantom_pose :
        See :func:`calibrate_from_points`.
    detector : str
        See :func:`detect_sequence`.
    calibration_detection, validation_detection : DetectionResult, optional
        Reuse detections instead of detecting again.
    sequence_stage : bool, optional
        See :func:`detect_sequence` (both recordings get the same stage).
    plane_refinement : bool, optional
        See :func:`detect_sequence` (both recordings).
    time_offset : "auto" or float
        Video-to-tracker time offset, seconds: the pose of a frame taken at ``t`` is the tracking
        interpolated at ``t + time_offset`` (both recordings). ``"auto"`` (default) estimates it
        from the calibration recording (:func:`~.temporal.estimate_time_offset`) and applies it
        only when held-out calibration frames confirm it; ``0`` uses the recorded poses as they
        are. ``result.info["time_offset_s"]`` is the applied value, ``info["time_offset"]`` the
        estimate's details.
    progress : callable(done, total), optional
    **solver_options
        Passed to :func:`calibrate_from_points` (``ransac_iterations``, ``seed``, ...).

    Returns
    -------
    CalibrationResult
        ``seconds`` includes detection.
    """
    if setup is None:
        raise DetectionError("calibrate needs a CalibrationSetup (load_setup(config) or load_setup(phantom=...))")
    time_offset = parse_time_offset(time_offset)
    t0 = time.perf_counter()
    n_total = len(calibration.frames) + (len(validation.frames) if validation is not None else 0)
    done = [0]

    def sub_progress(i, n):
        if progress is not None:
            progress(done[0] + i, n_total)

    det_c = calibration_detection or detect_sequence(calibration, setup, detector=detector,
                                                     pixel_spacing_mm=pixel_spacing_mm, progress=sub_progress,
                                                     sequence_stage=sequence_stage, plane_refinement=plane_refinement)
    done[0] = len(calibration.frames)
    det_v = None
    if validation is not None:
        det_v = validation_detection or detect_sequence(validation, setup, detector=detector,
                                                        pixel_spacing_mm=pixel_spacing_mm, progress=sub_progress,
                                                        sequence_stage=sequence_stage,
                                                        plane_refinement=plane_refinement)
    if det_c.frames_detected == 0:
        raise CalibrationError(
            f"no calibration frame shows the whole phantom ({setup.phantom.name}, {setup.phantom.n_wires} wires); "
            f"check that all wires are in the image and the pixel spacing hint "
            f"({det_c.pixel_spacing_mm[0]:.4g} mm/px, ApproximateSpacingMmPerPixel)"
        )
    estimate: TimeOffsetEstimate | None = None
    offset = time_offset
    if time_offset == "auto":
        known = setup.phantom_to_reference if phantom_pose != "estimate" else None
        try:
            estimate = estimate_time_offset(det_c.points_px, calibration, setup.phantom, phantom_to_reference=known)
        except CalibrationError as exc:  # no usable timestamps: calibrate without the correction
            logger.warning("time offset not estimated: %s", exc)
            estimate = None
        offset = estimate.offset_s if estimate is not None else 0.0
    poses_c = probe_to_reference_at(calibration, offset)
    poses_v = probe_to_reference_at(validation, offset) if validation is not None else None
    result = calibrate_from_points(
        det_c.points_px, poses_c, setup.phantom, phantom_to_reference=setup.phantom_to_reference, solver=solver,
        phantom_pose=phantom_pose, validation_points_px=None if det_v is None else det_v.points_px,
        validation_poses=poses_v, pixel_spacing_hint_mm=det_c.pixel_spacing_mm, **solver_options)
    info = dict(result.info)
    info.update({"detector": detector, "detection_seconds": det_c.seconds + (det_v.seconds if det_v else 0.0),
                 "failed_calibration_frames": [int(i) for i in np.flatnonzero(~det_c.ok)],
                 "rejected_frames": {"calibration": det_c.rejected_frames(),
                                     "validation": det_v.rejected_frames() if det_v is not None else []},
                 "rejected_by_reason": {"calibration": det_c.rejection_counts(),
                                        "validation": det_v.rejection_counts() if det_v is not None else {}},
                 "detected_by_stage": {"calibration": det_c.stage_counts(),
                                       "validation": det_v.stage_counts() if det_v is not None else {}},
                 "refused_by_sequence": {"calibration": det_c.refused_frames(),
                                         "validation": det_v.refused_frames() if det_v is not None else []},
                 "plane_refinement": {"calibration": det_c.plane_fit,
                                      "validation": det_v.plane_fit if det_v is not None else None},
                 "time_offset_s": float(offset), "time_offset_mode": "auto" if time_offset == "auto" else "given"})
    warnings = list(result.warnings)
    if det_v is not None and det_v.frames_detected < det_v.n_frames:
        dropped = det_v.n_frames - det_v.frames_detected
        warnings.append(f"{dropped} of {det_v.n_frames} validation frames dropped (not detected: "
                        + ", ".join(f"{n} {code}" for code, n in det_v.rejection_counts().items())
                        + "); the validation errors are over the other frames")
    if estimate is not None:
        info["time_offset"] = estimate.to_dict()
        if estimate.at_search_edge:
            warnings.append(f"time offset not applied: {estimate.reason}")
        elif not estimate.estimable:
            warnings.append(f"time offset: {estimate.reason}")
    return replace(result, seconds=time.perf_counter() - t0, info=info, warnings=warnings)

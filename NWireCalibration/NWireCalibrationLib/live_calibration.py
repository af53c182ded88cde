"""Live N-wire calibration: a PLUS/OpenIGTLink stream into the keyframe calibrator, headless.

:class:`LiveCalibrationSink` is a sink of :func:`FreehandUSLib.igtl.live.run_live` (the stream
transport of the ground floor; like :class:`FreehandUSLib.igtl.live.LiveReconstructionSink`): for
every paired frame it

1. resolves **ProbeToReference from the TRANSFORM messages** of that frame (PlusServer sends
   ``ProbeToTracker`` and ``ReferenceToTracker``; any chain works, e.g. a streamed
   ``ProbeToReference``). The IMAGE matrix is *not* used: PlusServer's ``Image_Reference``
   carries ImageToReference, which already contains the (old) calibration. For the same reason
   transforms that involve the image frame (``ImageToProbe``, ``ImageToReference``...) are left
   out of the chain;
2. skips, without running the detector, frames whose probe pose is unknown, repeats a keyframe
   (closer than the keyframe settings' ``min_rotation_deg`` / ``min_translation_mm``), or come
   after convergence; every skip is counted;
3. detects the N-wire dots (:func:`NWireCalibrationLib.pipeline.make_detector`) and offers them
   with the pose to a :class:`NWireCalibrationLib.keyframes.KeyframeCalibrator`, which recalibrates
   every few keyframes and records the convergence curve;
4. once the calibrator has converged, sets ``stop_event`` so that ``run_live`` ends.

:func:`live_calibrate` wires it all for one call, bounded by ``max_frames`` and ``timeout_s``,
and returns a :class:`LiveCalibrationResult` (ImageToProbe, convergence curve, keyframe errors,
frame counters). ``freehandus calibrate-live`` (registered by
:func:`add_live_calibration_parser`) is its command line: it checks its numbers and output names
before connecting, and shows frames, keyframes and the last calibration change on a terminal
(``--progress`` / ``--no-progress`` decide otherwise).

The detector and solver modules are imported when a sink is made, not when this module is
imported, so ``freehandus calibrate-live --help`` starts without them. This module belongs to the
calibration capability: it uses the ground floor's stream transport (``FreehandUSLib.igtl``),
which knows nothing of calibration.

Example
-------
>>> result = live_calibrate("127.0.0.1", 18944, config="PlusDeviceSet_fCal.xml",   # doctest: +SKIP
...                         max_frames=3000, timeout_s=300)
>>> print(result)                      # ImageToProbe, convergence curve, skipped frames
>>> result.plus_transform_element()    # paste into the PLUS configuration
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from FreehandUSLib.cli_support import (
    add_progress_option,
    check_output_path,
    positive_float,
    positive_int,
    progress_enabled,
    spacing_mm,
    write_text_atomic,
)
from FreehandUSLib.errors import FreehandUSError, TransformError
from FreehandUSLib.transforms import TransformRepository, split_transform_name
from FreehandUSLib.igtl.pairing import FramePairer, PairedFrame

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_TIMEOUT_S",
    "PHANTOM_POSES",
    "LiveCalibrationResult",
    "LiveCalibrationSink",
    "live_calibrate",
    "add_live_calibration_parser",
    "calibrate_live_command",
]

logger = logging.getLogger(__name__)

#: Frames :func:`live_calibrate` reads at most (about 100 s at 30 fps).
DEFAULT_MAX_FRAMES = 3000
#: Seconds :func:`live_calibrate` runs at most.
DEFAULT_TIMEOUT_S = 300.0
#: Where PhantomToReference comes from: the setup's registration, estimated jointly, or known
#: when the setup has one.
PHANTOM_POSES = ("auto", "known", "estimate")


def _nwire():
    """The calibration modules the sink needs (imported when a sink is made: detector and solvers
    pull in OpenCV and SciPy, which ``calibrate-live --help`` does not need)."""
    from . import errors, keyframes, metrics, pipeline, results
    from .solvers import MIN_CALIBRATION_FRAMES

    return SimpleNamespace(errors=errors, keyframes=keyframes, metrics=metrics, pipeline=pipeline, results=results,
                           min_frames=MIN_CALIBRATION_FRAMES)


def _clean(value):
    """JSON-safe copy: numpy -> Python, NaN/inf -> None."""
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "to_dict"):
        return _clean(value.to_dict())
    return value


@dataclass(frozen=True, eq=False)
class LiveCalibrationResult:
    """A calibration computed from a live stream.

    Attributes
    ----------
    image_to_probe : (4, 4) float64
        ImageToProbe: MF image pixels -> Probe mm (includes the pixel spacing).
    phantom_to_reference : (4, 4) float64
        Known (from the setup) or estimated with the calibration.
    phantom_pose : str
        ``"known"`` or ``"estimated"``.
    converged : bool
        The keyframe calibrator's convergence test passed (else: the best calibration from all
        keyframes when the stream, ``max_frames`` or ``timeout_s`` ended it).
    stop_reason : str
        ``"converged"``, ``"max_frames"``, ``"timeout"``, ``"stopped"`` or ``"stream ended"``.
    curve : tuple of ConvergencePoint
        One point per recalibration: keyframes used, change of the calibration (mm, mean
        image-point displacement; inf for the first), RMS dot error (mm), pose diversity (deg).
    n_keyframes : int
    keyframe_timestamps_s : tuple of float
        Stream timestamps of the keyframes.
    pixel_spacing_mm : (sx, sy)
        Column norms of ImageToProbe.
    pose_diversity_deg : float
        Largest rotation between keyframes.
    error3d_mean_mm, error3d_trimmed95_mean_mm, error3d_max_mm : float
        PLUS 3D reprojection error of the keyframes' middle wires (Probe frame, mm).
    frames : dict
        Frame counters of the sink (:meth:`LiveCalibrationSink.status`).
    detector, phantom_name : str
    live : dict
        :class:`~.live.LiveSummary` of the stream (frames, dropped, rejected, disconnects).
    seconds : float
        Wall time from connecting to the result.
    warnings : list of str
    """

    image_to_probe: np.ndarray
    phantom_to_reference: np.ndarray
    phantom_pose: str
    converged: bool
    stop_reason: str
    curve: tuple
    n_keyframes: int
    keyframe_timestamps_s: tuple
    pixel_spacing_mm: tuple
    pose_diversity_deg: float
    error3d_mean_mm: float
    error3d_trimmed95_mean_mm: float
    error3d_max_mm: float
    frames: dict
    detector: str
    phantom_name: str
    live: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list = field(default_factory=list)

    def plus_transform_element(self, date=None) -> str:
        """ImageToProbe as a PLUS ``<Transform From="Image" To="Probe" .../>`` element."""
        from .results import plus_transform_element

        err = self.error3d_trimmed95_mean_mm
        return plus_transform_element(self.image_to_probe, error_mm=err if math.isfinite(err) else None, date=date)

    def to_dict(self) -> dict:
        """JSON-safe (``ImageToProbe`` as in ``freehandus calibrate``'s JSON; NaN/inf -> null)."""
        return _clean({
            "ImageToProbe": self.image_to_probe,
            "PhantomToReference": self.phantom_to_reference,
            "phantom_pose": self.phantom_pose,
            "phantom": self.phantom_name,
            "detector": self.detector,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "pose_diversity_deg": self.pose_diversity_deg,
            "keyframes": self.n_keyframes,
            "keyframe_timestamps_s": list(self.keyframe_timestamps_s),
            "curve": [p.to_dict() for p in self.curve],
            "calibration": {
                "error3d_mean_mm": self.error3d_mean_mm,
                "error3d_trimmed95_mean_mm": self.error3d_trimmed95_mean_mm,
                "error3d_max_mm": self.error3d_max_mm,
            },
            "frames": dict(self.frames),
            "live": dict(self.live),
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        })  # fmt: skip

    def __str__(self) -> str:
        m = self.image_to_probe
        f = self.frames
        state = "converged" if self.converged else f"NOT converged ({self.stop_reason})"
        lines = [
            f"live calibration {state}: {self.n_keyframes} keyframes from {f.get('frames', 0)} frames "
            f"in {self.seconds:.1f} s (phantom {self.phantom_name}, {self.phantom_pose} pose, {self.detector})",
            "ImageToProbe:",
            *("  " + " ".join(f"{v:12.6f}" for v in row) for row in m),
            f"pixel spacing {self.pixel_spacing_mm[0]:.4f} x {self.pixel_spacing_mm[1]:.4f} mm/px, pose diversity "
            f"{self.pose_diversity_deg:.1f} deg, keyframe 3D error {self.error3d_trimmed95_mean_mm:.3f} mm "
            f"(best 95 %), {self.error3d_mean_mm:.3f} mm (all)",
            f"frames: {f.get('frames_detected', 0)} detected, {f.get('frames_not_detected', 0)} phantom not found, "
            f"{f.get('frames_without_pose', 0)} without ProbeToReference, {f.get('frames_repeated_pose', 0)} "
            f"repeating a keyframe pose, {f.get('frames_ignored', 0)} after convergence",
            "convergence (keyframes: change mm):",
        ]
        lines.append("  " + ", ".join(
            f"{p.n_keyframes}: {'-' if not math.isfinite(p.change_mm) else f'{p.change_mm:.3f}'}" for p in self.curve
        ))  # fmt: skip
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class LiveCalibrationSink:
    """Feed paired frames to an N-wire keyframe calibrator (module docstring).

    Parameters
    ----------
    setup : NWireCalibrationLib.pipeline.CalibrationSetup, optional
        Phantom, PhantomToReference, pixel-spacing hint, clip rectangle. Made from ``config`` /
        ``phantom`` / ``pixel_spacing_mm`` when not given.
    config : str or Path, optional
        PLUS device-set configuration (``<PhantomDefinition>``, ``<CoordinateDefinitions>``
        PhantomToReference, ``<Segmentation ApproximateSpacingMmPerPixel=...>``).
    phantom : str, Path or NWirePhantom, optional
        Overrides the config's phantom (built-in name, JSON or PLUS XML).
    pixel_spacing_mm : float or (sx, sy), optional
        Approximate mm per pixel (overrides the config's hint); sizes the detector's filters.
    detector : str
        ``"hessian"`` (default), ``"plus"``, ``"agcfd"`` or ``"tacd"``.
    phantom_pose : str
        ``"known"`` (the setup's PhantomToReference), ``"estimate"`` (jointly with the
        calibration, no stylus registration; needs >= 3 N-wires) or ``"auto"`` (known when
        the setup has one).
    phantom_to_reference : (4, 4) float, optional
        Overrides the setup's registration.
    settings : NWireCalibrationLib.keyframes.KeyframeSettings, optional
        Keyframe selection and convergence.
    probe_frame, reference_frame, image_frame : str
        Coordinate frame names: ``<probe>To<reference>`` is resolved per frame from the
        TRANSFORM messages; transforms involving ``image_frame`` are ignored.
    fixed_transforms : dict name -> (4, 4), optional
        Transforms that do not change, added to each frame's chain (e.g. a fixed
        ``ReferenceToTracker`` when the reference is not tracked).
    use_clip_rectangle : bool
        Restrict detection to the config's clip rectangle.
    stop_event : threading.Event, optional
        Set when the calibration has converged (pass the same event to ``run_live``).
    progress : callable(dict), optional
        Called with :meth:`status` after every frame.

    Raises
    ------
    NWireCalibrationLib.errors.NWireError
        No phantom, no pixel-spacing hint, or ``phantom_pose="known"`` without a registration.
    ValueError
        Unknown ``phantom_pose`` or ``detector``.
    """

    def __init__(
        self,
        setup=None,
        *,
        config=None,
        phantom=None,
        pixel_spacing_mm=None,
        detector: str = "hessian",
        phantom_pose: str = "auto",
        phantom_to_reference=None,
        settings=None,
        probe_frame: str = "Probe",
        reference_frame: str = "Reference",
        image_frame: str = "Image",
        fixed_transforms=None,
        use_clip_rectangle: bool = True,
        stop_event: threading.Event | None = None,
        progress=None,
    ):
        nw = _nwire()
        self._nw = nw
        pipeline = nw.pipeline
        if phantom_pose not in PHANTOM_POSES:
            raise ValueError(f"phantom_pose: expected one of {', '.join(PHANTOM_POSES)}, got {phantom_pose!r}")
        if setup is None:
            setup = pipeline.load_setup(config, phantom=phantom, pixel_spacing_mm=pixel_spacing_mm,
                                        use_clip_rectangle=use_clip_rectangle)  # fmt: skip
        self.setup = setup
        self.phantom = setup.phantom
        spacing = pixel_spacing_mm if pixel_spacing_mm is not None else setup.pixel_spacing_mm
        if spacing is None:
            raise nw.errors.DetectionError(
                "no pixel spacing hint for the detector: give a PLUS config with <Segmentation "
                "ApproximateSpacingMmPerPixel=...> or pixel_spacing_mm (--pixel-spacing MM)"
            )
        self.pixel_spacing_mm = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, dtype=float), (2,)))
        if detector.lower() not in pipeline.DETECTORS:
            raise ValueError(f"detector: expected one of {', '.join(pipeline.DETECTORS)}, got {detector!r}")
        self.detector_name = detector.lower()
        self.detector = pipeline.make_detector(
            self.detector_name, self.phantom, self.pixel_spacing_mm,
            clip_rectangle_px=setup.clip_rectangle_px if use_clip_rectangle else None,
            segmentation=setup.segmentation,
        )  # fmt: skip
        y = setup.phantom_to_reference if phantom_to_reference is None else phantom_to_reference
        if phantom_pose == "known" and y is None:
            raise nw.errors.CalibrationError(
                "phantom pose 'known' needs a PhantomToReference registration (<Transform From=\"Phantom\" "
                "To=\"Reference\"> in the config); add it or use phantom_pose='estimate'"
            )
        self.phantom_to_reference = None if phantom_pose == "estimate" or y is None else np.asarray(y, np.float64)
        self.settings = settings or nw.keyframes.KeyframeSettings()
        self.probe_to_reference_name = f"{probe_frame}To{reference_frame}"
        split_transform_name(self.probe_to_reference_name)
        self.image_frame = image_frame
        self.fixed_transforms = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in dict(fixed_transforms or {}).items()
            if image_frame not in split_transform_name(k)
        }
        self.stop_event = stop_event
        self.progress = progress
        self.calibrator = None  # made on the first frame (needs the image size)
        self.keyframe_points_px: list[np.ndarray] = []
        self.keyframe_poses: list[np.ndarray] = []
        self.keyframe_timestamps_s: list[float] = []
        self.frames = 0
        self.frames_without_pose = 0
        self.frames_repeated_pose = 0
        self.frames_detected = 0
        self.frames_not_detected = 0
        self.frames_ignored = 0
        self.pose_problem = ""
        self.last_detection_failure = ""
        self.transforms_seen: set[str] = set()
        self.detection_seconds = 0.0

    # -- per frame ---------------------------------------------------------------------------
    def probe_to_reference(self, paired: PairedFrame) -> np.ndarray:
        """ProbeToReference of a frame from its TRANSFORM messages, ``(4, 4)``; NaN when unknown."""
        per_frame = {}
        for name, (matrix, valid) in paired.transforms.items():
            self.transforms_seen.add(name)
            try:
                if self.image_frame in split_transform_name(name):
                    continue  # ImageToReference etc. already contain a calibration
            except TransformError:
                continue
            per_frame[name] = (np.asarray(matrix, dtype=np.float64)[None], np.array([bool(valid)]))
        try:
            repo = TransformRepository(per_frame, fixed=self.fixed_transforms, n_frames=1)
            pose = repo.get(self.probe_to_reference_name)[0]
        except TransformError as exc:
            if not self.pose_problem:
                logger.warning("live calibration: %s; such frames are skipped", exc)
            self.pose_problem = str(exc)
            return np.full((4, 4), np.nan)
        if not np.all(np.isfinite(pose)):
            self.pose_problem = (
                f"{self.probe_to_reference_name} was invalid in some frames (a tool out of the tracker's view)"
            )
        return pose

    def _repeats_keyframe(self, pose: np.ndarray) -> bool:
        """The calibrator would reject this pose as too close to a keyframe (checked before detecting)."""
        if not self.keyframe_poses:
            return False
        kept = np.asarray(self.keyframe_poses)
        dt = np.linalg.norm(kept[:, :3, 3] - pose[:3, 3], axis=1)
        rel = np.einsum("kji,jl->kil", kept[:, :3, :3], pose[:3, :3])
        dr = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)))
        s = self.settings
        return bool(np.any((dr < s.min_rotation_deg) & (dt < s.min_translation_mm)))

    def __call__(self, paired: PairedFrame) -> None:
        self.frames += 1
        if self.calibrator is None:
            rows, cols = paired.frame.shape[:2]
            self.calibrator = self._nw.keyframes.KeyframeCalibrator(
                self.phantom, (int(cols), int(rows)), phantom_to_reference=self.phantom_to_reference,
                settings=self.settings,
            )  # fmt: skip
        cal = self.calibrator
        if cal.converged or cal.n_keyframes >= self.settings.max_keyframes:
            self.frames_ignored += 1
        else:
            pose = self.probe_to_reference(paired)
            if not np.all(np.isfinite(pose)):
                self.frames_without_pose += 1
            elif self._repeats_keyframe(pose):
                self.frames_repeated_pose += 1
            else:
                self._offer(paired, pose)
        if self.progress is not None:
            self.progress(self.status())

    def _offer(self, paired: PairedFrame, pose: np.ndarray) -> None:
        t0 = time.perf_counter()
        detection = self.detector.detect(paired.frame)
        self.detection_seconds += time.perf_counter() - t0
        if not detection.ok:
            self.frames_not_detected += 1
            self.last_detection_failure = detection.reason
            return
        self.frames_detected += 1
        n_curve = len(self.calibrator.curve)
        update = self.calibrator.add(detection.points_px, pose)
        if update.accepted:
            self.keyframe_points_px.append(np.asarray(detection.points_px, dtype=np.float64))
            self.keyframe_poses.append(pose)
            self.keyframe_timestamps_s.append(float(paired.timestamp_s))
        elif update.reason == "pose too close to a keyframe":
            self.frames_repeated_pose += 1
        if len(self.calibrator.curve) > n_curve:
            point = self.calibrator.curve[-1]
            logger.info("live calibration: %d keyframes, change %.3f mm, cost %.3f mm, diversity %.1f deg",
                        point.n_keyframes, point.change_mm, point.cost_mm, point.pose_diversity_deg)  # fmt: skip
        if self.calibrator.converged and self.stop_event is not None:
            self.stop_event.set()

    # -- state -------------------------------------------------------------------------------
    @property
    def converged(self) -> bool:
        return self.calibrator is not None and self.calibrator.converged

    @property
    def n_keyframes(self) -> int:
        return 0 if self.calibrator is None else self.calibrator.n_keyframes

    def status(self) -> dict:
        """Frame counters and calibration state (JSON-safe)."""
        curve = [] if self.calibrator is None else self.calibrator.curve
        last = curve[-1].change_mm if curve else float("nan")
        return {
            "frames": self.frames,
            "frames_detected": self.frames_detected,
            "frames_not_detected": self.frames_not_detected,
            "frames_without_pose": self.frames_without_pose,
            "frames_repeated_pose": self.frames_repeated_pose,
            "frames_ignored": self.frames_ignored,
            "keyframes": self.n_keyframes,
            "converged": self.converged,
            "recalibrations": len(curve),
            "last_change_mm": last if math.isfinite(last) else None,
            "detection_seconds": round(self.detection_seconds, 4),
        }

    def _failure_message(self) -> str:
        s = self.status()
        parts = [
            f"live calibration: only {s['keyframes']} keyframes from {s['frames']} frames "
            f"(at least {self._nw.min_frames} are needed): {s['frames_without_pose']} frames "
            f"without {self.probe_to_reference_name}, {s['frames_not_detected']} without the whole phantom "
            f"({self.phantom.name}), {s['frames_repeated_pose']} repeating a keyframe pose"
        ]
        if s["frames"] == 0:
            parts.append("no frame was received; is the server streaming images?")
        if self.pose_problem:
            seen = ", ".join(sorted(self.transforms_seen)) or "none"
            parts.append(f"{self.pose_problem} (transforms in the stream: {seen})")
        if self.last_detection_failure:
            parts.append(f"last detection failure: {self.last_detection_failure}; check the pixel spacing hint "
                         f"({self.pixel_spacing_mm[0]:.4g} mm/px) and that every wire is in the image")  # fmt: skip
        if s["frames_repeated_pose"] and not s["frames_without_pose"]:
            parts.append("move and tilt the probe over the phantom")
        return "; ".join(parts)

    def result(self, *, stop_reason: str = "", live=None, seconds: float = 0.0) -> LiveCalibrationResult:
        """The calibration so far (recalibrated with every keyframe unless converged).

        Raises
        ------
        NWireCalibrationLib.errors.CalibrationError
            Too few keyframes; the message gives the frame counters and the reason (e.g. the
            transform that could not be resolved).
        """
        if self.calibrator is None or self.n_keyframes < self._nw.min_frames:
            raise self._nw.errors.CalibrationError(self._failure_message())
        cal = self.calibrator
        try:
            image_to_probe = cal.image_to_probe if cal.converged else cal.finish()
        except self._nw.errors.CalibrationError as exc:
            raise self._nw.errors.CalibrationError(f"{self._failure_message()}; {exc}") from exc
        y = self.phantom_to_reference if self.phantom_to_reference is not None else cal.estimated_phantom_to_reference
        pts = np.asarray(self.keyframe_points_px)
        poses = np.asarray(self.keyframe_poses)
        errors = self._nw.metrics.reprojection_errors_3d(pts, poses, image_to_probe, y, self.phantom)
        stats = self._nw.metrics.trimmed_statistics(errors)
        diversity = self._nw.metrics.pose_diversity_deg(poses)
        warnings = []
        if not cal.converged:
            warnings.append(f"the calibration did not converge ({stop_reason or 'stopped early'}); keep scanning "
                            "with more varied probe poses or raise max_frames/timeout_s")  # fmt: skip
        if diversity < self.settings.min_pose_diversity_deg:
            warnings.append(f"tilt the probe more: pose diversity {diversity:.1f} deg < "
                            f"{self.settings.min_pose_diversity_deg:g} deg")  # fmt: skip
        if live is not None and getattr(live, "dropped", 0):
            warnings.append(f"{live.dropped} messages were dropped because detection fell behind the stream")
        return LiveCalibrationResult(
            image_to_probe=np.array(image_to_probe, dtype=np.float64),
            phantom_to_reference=np.array(y, dtype=np.float64),
            phantom_pose="known" if self.phantom_to_reference is not None else "estimated",
            converged=bool(cal.converged),
            stop_reason="converged" if cal.converged else (stop_reason or "stopped"),
            curve=tuple(cal.curve),
            n_keyframes=cal.n_keyframes,
            keyframe_timestamps_s=tuple(self.keyframe_timestamps_s),
            pixel_spacing_mm=(float(np.linalg.norm(image_to_probe[:3, 0])),
                              float(np.linalg.norm(image_to_probe[:3, 1]))),  # fmt: skip
            pose_diversity_deg=float(diversity),
            error3d_mean_mm=float(stats.mean),
            error3d_trimmed95_mean_mm=float(stats.trimmed_mean),
            error3d_max_mm=float(stats.max),
            frames=self.status(),
            detector=self.detector_name,
            phantom_name=self.phantom.name,
            live={} if live is None else live.to_dict(),
            seconds=float(seconds),
            warnings=warnings,
        )


def live_calibrate(
    host: str,
    port: int,
    *,
    config=None,
    phantom=None,
    setup=None,
    pixel_spacing_mm=None,
    detector: str = "hessian",
    phantom_pose: str = "auto",
    settings=None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_timeout_s: float = 10.0,
    image_device: str | None = None,
    stop_event: threading.Event | None = None,
    client_options=None,
    progress=None,
) -> LiveCalibrationResult:
    """Connect to an OpenIGTLink server and calibrate the probe live until convergence.

    Stops at convergence, after ``max_frames`` paired frames, after ``timeout_s`` seconds, when
    ``stop_event`` is set or when the server closes, whichever comes first.

    Parameters
    ----------
    host, port : str, int
        PlusServer (default port 18944) or ``freehandus serve``.
    config, phantom, setup, pixel_spacing_mm, detector, phantom_pose, settings, progress :
        See :class:`LiveCalibrationSink`.
    max_frames : int
        Paired frames to read at most.
    timeout_s : float
        Longest run (seconds, from connecting).
    connect_timeout_s : float
        Longest wait for the server.
    image_device : str, optional
        IMAGE device to use (default: the first one seen, PlusServer's ``Image_Reference``).
    stop_event : threading.Event, optional
        Set it to stop early; it is also set at convergence.
    client_options : dict, optional
        Passed to :class:`~.client.IGTLClient` (``queue_size``...).

    Returns
    -------
    LiveCalibrationResult

    Raises
    ------
    IGTLConnectionError
        No server answered within ``connect_timeout_s``.
    NWireCalibrationLib.errors.CalibrationError
        Too few keyframes when the run ended (the message says why: no ProbeToReference in the
        stream, phantom not found, probe not moved...).
    """
    from FreehandUSLib.igtl.client import IGTLClient, IGTLConnectionError
    from FreehandUSLib.igtl.live import run_live

    if int(max_frames) < 1:
        raise ValueError(f"max_frames: expected >= 1, got {max_frames!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    event = stop_event if stop_event is not None else threading.Event()
    sink = LiveCalibrationSink(setup, config=config, phantom=phantom, pixel_spacing_mm=pixel_spacing_mm,
                               detector=detector, phantom_pose=phantom_pose, settings=settings, stop_event=event,
                               progress=progress)  # fmt: skip
    t0 = time.monotonic()
    client = IGTLClient(host, port, **dict(client_options or {})).start()
    try:
        if not client.wait_for_state("connected", connect_timeout_s):
            raise IGTLConnectionError(
                f"no OpenIGTLink server answered at {host}:{port} within {connect_timeout_s:g} s"
            )
        remaining = max(0.0, timeout_s - (time.monotonic() - t0))
        summary = run_live(client, [sink], frames=int(max_frames), duration_s=remaining, stop_event=event,
                           pairer=FramePairer(image_device=image_device))  # fmt: skip
    finally:
        client.close()
    if sink.converged:
        reason = "converged"
    elif summary.frames >= int(max_frames):
        reason = "max_frames"
    elif time.monotonic() - t0 >= timeout_s:
        reason = "timeout"
    elif event.is_set():
        reason = "stopped"
    else:
        reason = "stream ended"
    result = sink.result(stop_reason=reason, live=summary, seconds=time.monotonic() - t0)
    logger.info("%s", result)
    return result


# -------------------------------------------------------------------------------------------
# Command line: freehandus calibrate-live
# -------------------------------------------------------------------------------------------
class _CalibrationStatus:
    """``calibrate-live``'s progress on stderr (tqdm): frames read of ``--max-frames``, keyframes
    kept, the last calibration change (mm); a no-op when not ``enabled``."""

    def __init__(self, total: int, *, enabled: bool, stream=None):
        self.bar = None
        self._shown = None  # (keyframes, converged) last drawn: a change is drawn at once
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", file=sys.stderr if stream is None else stream, leave=False,
                            dynamic_ncols=True, bar_format="{n_fmt}/{total_fmt} frames{postfix}")  # fmt: skip

    def __call__(self, status: dict) -> None:
        if self.bar is None:
            return
        change = status["last_change_mm"]
        text = f"{status['keyframes']} keyframes, change " + ("-" if change is None else f"{change:.3f} mm")
        if status["converged"]:
            text += ", converged"
        self.bar.set_postfix_str(text, refresh=False)
        state = (status["keyframes"], status["converged"])
        if state != self._shown:  # a new keyframe or convergence, not held back by tqdm's rate limit
            self._shown = state
            self.bar.n = status["frames"]
            self.bar.refresh()
        else:
            self.bar.update(status["frames"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def calibrate_live_command(args) -> int:
    """Run ``freehandus calibrate-live`` (see :func:`add_live_calibration_parser`)."""
    from FreehandUSLib.igtl.cli import _stop_on_signals

    # Outputs checked before connecting: a calibration must not be lost to a bad name at the end.
    out = None if args.out is None else check_output_path(args.out, flag="--out")
    plus_xml = None if args.plus_xml is None else check_output_path(args.plus_xml, flag="--plus-xml")
    keyframes = _nwire().keyframes
    overrides = {}
    if args.convergence_mm is not None:
        overrides["convergence_mm"] = args.convergence_mm
    if args.min_keyframes is not None:
        overrides["min_keyframes"] = args.min_keyframes
    try:
        settings = dataclasses.replace(keyframes.KeyframeSettings(), **overrides)
    except ValueError as exc:
        raise FreehandUSError(str(exc)) from exc
    if settings.min_keyframes > settings.max_keyframes:
        raise FreehandUSError(f"--min-keyframes {settings.min_keyframes}: at most {settings.max_keyframes} keyframes "
                              "are kept, so the calibration could never converge")  # fmt: skip
    stop = threading.Event()
    status = _CalibrationStatus(args.max_frames, enabled=progress_enabled(args))
    try:
        with _stop_on_signals(stop):
            result = live_calibrate(
                args.host, args.port, config=args.config, phantom=args.phantom, pixel_spacing_mm=args.pixel_spacing,
                detector=args.detector, phantom_pose=args.phantom_pose, settings=settings,
                max_frames=args.max_frames, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout,
                image_device=args.image_device, stop_event=stop, progress=status,
            )  # fmt: skip
    finally:
        status.close()
    data = result.to_dict()
    data.update({"host": args.host, "port": args.port, "config": str(args.config) if args.config else None})
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(data, indent=2) + "\n")
    if plus_xml is not None:
        plus_xml.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(plus_xml, result.plus_transform_element() + "\n")
    print(json.dumps(data, indent=2) if args.json else str(result))
    return 0


def add_live_calibration_parser(subparsers) -> None:
    """Register ``calibrate-live`` on an ``argparse`` subparsers object (``func`` set).

    Every number is checked here with the types of :mod:`..cli_support` (one line on stderr and
    exit 2 before any connection): the port in 1 to 65535, finite positive times and distances,
    the pixel spacing in 0.001 to 1000 mm, the waits for the server bounded (``MAX_WAIT_S``).
    """
    from FreehandUSLib.igtl.cli import MAX_WAIT_S, connect_port, wait_seconds

    p = subparsers.add_parser(
        "calibrate-live",
        help="N-wire probe calibration from a live OpenIGTLink stream (PlusServer), until convergence",
        description="Connect to PlusServer (or `freehandus serve`), detect the N-wire dots in each streamed "
        "frame, keep diverse keyframes with ProbeToReference from the streamed transforms (ProbeToTracker, "
        "ReferenceToTracker) and recalibrate until ImageToProbe converges; report the convergence curve.",
    )
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=connect_port, default=18944, help="server port (default 18944)")
    p.add_argument("--config", help="PLUS device-set configuration (phantom, PhantomToReference, spacing hint)")
    p.add_argument("--phantom", help="phantom: built-in name (fCal-2.0...), .json or PLUS .xml; overrides the config's")
    p.add_argument("--detector", default="hessian", choices=("hessian", "plus", "agcfd", "tacd"),
                   help="dot detector (default hessian: Liu et al. 2025)")  # fmt: skip
    p.add_argument("--pixel-spacing", type=spacing_mm, metavar="MM",
                   help="approximate mm per pixel (overrides ApproximateSpacingMmPerPixel)")  # fmt: skip
    p.add_argument("--phantom-pose", default="auto", choices=PHANTOM_POSES,
                   help="use the config's PhantomToReference (known) or estimate it; auto: known when the config "
                        "has one")  # fmt: skip
    p.add_argument("--max-frames", type=positive_int, default=DEFAULT_MAX_FRAMES,
                   help=f"stop after this many frames (default {DEFAULT_MAX_FRAMES})")  # fmt: skip
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"stop after this many seconds (default {DEFAULT_TIMEOUT_S:g})")  # fmt: skip
    p.add_argument("--connect-timeout", type=wait_seconds, default=10.0, metavar="S",
                   help=f"seconds to wait for the server (default 10, at most {MAX_WAIT_S:g})")  # fmt: skip
    p.add_argument("--image-device", help="IMAGE device to use (default: the first one seen)")
    p.add_argument("--convergence-mm", type=positive_float,
                   help="largest calibration change counted as settled (default: KeyframeSettings)")  # fmt: skip
    p.add_argument("--min-keyframes", type=positive_int, help="keyframes needed before convergence (>= 10)")
    p.add_argument("--out", help="output JSON (ImageToProbe, convergence curve, errors, frame counters)")
    p.add_argument("--plus-xml", metavar="FILE",
                   help="also write the PLUS <Transform From=\"Image\" To=\"Probe\"> element")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_progress_option(p)
    p.set_defaults(func=calibrate_live_command)

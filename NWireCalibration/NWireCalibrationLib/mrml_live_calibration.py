"""Keyframe N-wire calibration from a live image node, in MRML.

:class:`LiveCalibration` observes an image node that SlicerOpenIGTLink updates, takes the probe
pose from its transform tree (:func:`probe_to_reference_of_image_node`) and its pixels
(:func:`frame_from_image_node`), feeds a :class:`~.keyframes.KeyframeCalibrator` and writes
every new calibration, the convergence table and its plot through
:mod:`.mrml_calibration_results`. The stream-side (headless OpenIGTLink) counterpart is
:mod:`.live_calibration`. Re-exported by :mod:`.mrml_calibration`; imports the other
``mrml_calibration*`` modules but not that one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime

import numpy as np
import vtk

from FreehandUSLib import mrml
from FreehandUSLib.errors import FreehandUSError, SequenceError, TransformError
from FreehandUSLib.transforms import split_transform_name

from .errors import CalibrationError, DetectionError
from .keyframes import KeyframeCalibrator, KeyframeSettings, KeyframeUpdate
from .mrml_calibration_common import (
    ATTR_CONFIG,
    ATTR_DATE,
    ATTR_ERROR_MM,
    ATTR_MODE,
    ATTR_PHANTOM,
    ATTR_PHANTOM_POSE,
    ATTR_PLUS_TRANSFORM,
    ATTR_RESULT,
    ATTR_SOLVER,
    ATTR_SOURCE,
    COL_CHANGE,
    COL_DIVERSITY,
    COL_KEYFRAMES,
    COL_RESIDUAL,
    REF_CONVERGENCE_TABLE,
    REF_LIVE_IMAGE,
    _TABLE_CLASS,
    _plus_name,
    _transform_valid,
    _with_registration,
    matrix_of_transform_node,
)
from .mrml_calibration_overlay import _check_markups, _ijk_to_ras, _pixels_to_ras, _set_points
from .mrml_calibration_results import _format_date, fill_table, plot_table
from .pipeline import CalibrationSetup, make_detector
from .results import plus_transform_element

__all__ = [
    "LiveCalibration",
    "probe_to_reference_of_image_node",
    "frame_from_image_node",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Live calibration
# --------------------------------------------------------------------------------------------


def _probe_transform_node(image_node, probe_to_reference_node):
    """The ProbeToReference node: the given one, else the image node's nearest ``ProbeTo*`` ancestor."""
    if probe_to_reference_node is not None:
        return probe_to_reference_node
    parent = image_node.GetParentTransformNode()
    while parent is not None:
        name = _plus_name(parent)
        if name is not None and split_transform_name(name)[0] == "Probe":
            return parent
        parent = parent.GetParentTransformNode()
    raise TransformError(
        f"live image {image_node.GetName()!r}: no ProbeToReference transform: select the ProbeToReference "
        "transform node (SlicerOpenIGTLink creates it from PlusServer), or place the image node under it"
    )


def probe_to_reference_of_image_node(image_node, probe_to_reference_node=None) -> np.ndarray:
    """The probe pose of a live frame.

    Parameters
    ----------
    image_node : vtkMRMLVolumeNode
    probe_to_reference_node : vtkMRMLLinearTransformNode, optional
        Default: the nearest parent transform of ``image_node`` named ``ProbeTo<Frame>``
        (name or ``FreehandUS.TransformName``), e.g. an ``Image_Image`` node placed under
        ``ProbeToReference`` (possibly through ``ImageToProbe``). When ``<Frame>`` is not
        Reference, its parents are composed while their names chain on to Reference
        (``ProbeToTracker`` under ``TrackerToReference``); transforms above Reference (a
        ``ReferenceToRAS``) are not applied.

    Returns
    -------
    (4, 4) float64
        The ProbeToReference matrix (the given node's matrix to parent, or the composed chain);
        NaN when a node of it is marked ``FreehandUS.TransformValid = false`` (untracked).

    Raises
    ------
    TransformError
        No such node, or a non-linear / singular one.
    """
    node = _probe_transform_node(image_node, probe_to_reference_node)
    if not _transform_valid(node):
        return np.full((4, 4), np.nan)
    matrix = matrix_of_transform_node(node, "ProbeToReference")
    if probe_to_reference_node is not None:
        return matrix
    # A found ProbeTo<Frame> node: compose its parents up to the Reference frame (a SlicerIGT tree
    # ProbeToTracker -> TrackerToReference -> ReferenceToRAS gives ProbeToReference; parents
    # above Reference only place it in the scene).
    frame = split_transform_name(_plus_name(node))[1]
    composed, parent = matrix, node.GetParentTransformNode()
    while frame != "Reference" and parent is not None:
        name = _plus_name(parent)
        if name is None or split_transform_name(name)[0] != frame:
            break
        if not _transform_valid(parent):
            return np.full((4, 4), np.nan)
        composed = matrix_of_transform_node(parent, name) @ composed
        frame = split_transform_name(name)[1]
        parent = parent.GetParentTransformNode()
    return composed if frame == "Reference" else matrix


def frame_from_image_node(image_node) -> tuple[np.ndarray, np.ndarray]:
    """The current 2D frame of an image node (a copy) and its pixel -> world matrix.

    Returns
    -------
    frame : (rows, cols) uint8 or float32
        MF as stored (row ``j``, column ``i``); RGB(A) frames become grey (mean of the colours).
    image_to_world : (4, 4) float64
        IJKToRAS composed with the node's parent transforms to world (where a pixel is shown).

    Raises
    ------
    SequenceError
        Not a volume node, no image data, or more than one slice.
    """
    if image_node is None or not image_node.IsA("vtkMRMLVolumeNode"):
        got = "None" if image_node is None else image_node.GetClassName()
        raise SequenceError(f"live image: expected a vtkMRMLVolumeNode (e.g. Image_Image), got {got}")
    frame = mrml.grey_frame_of_image_node(image_node, what="live image")
    matrix = _ijk_to_ras(image_node)
    parent = image_node.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = mrml.vtk_to_matrix(to_world) @ matrix
    return frame, matrix


class LiveCalibration:
    """Calibrate from a live image node while the probe moves over the phantom (keyframes).

    Every new frame of the observed image node is detected; frames that show the whole
    phantom and add pose diversity become keyframes of a
    :class:`~.keyframes.KeyframeCalibrator`, which recalibrates every few keyframes and
    declares convergence when the calibration stops moving. Each new calibration is written
    into ``image_to_probe_node`` (attributes as in batch mode, ``Mode = live``) and appended to
    the convergence table (:data:`COL_KEYFRAMES`, :data:`COL_CHANGE`, :data:`COL_RESIDUAL`,
    :data:`COL_DIVERSITY`) with its plot. After convergence, frames are ignored.

    Which events are frames: as in ``FreehandUSLib.mrml_reconstruction.LiveReconstruction``,
    SlicerOpenIGTLink writes new pixels into the node's image data and then calls
    ``Modified()``; a frame is taken on ``ModifiedEvent`` when the pixels are new (the image
    data object or its modification time changed), so geometry or display changes are not
    frames. Direct calls of :meth:`on_image_modified` (or :meth:`add_frame` with arrays) work
    without observers.

    The probe pose of a frame is ProbeToReference at the time of the event: the given
    ``probe_to_reference_node``, else the image node's nearest ``ProbeTo*`` parent transform
    (:func:`probe_to_reference_of_image_node`).

    Parameters
    ----------
    setup : CalibrationSetup
        From :func:`make_setup`; its PhantomToReference is used unless ``phantom_pose`` is
        ``"estimate"`` (then the phantom pose is estimated jointly, which needs >= 3 N patterns).
    image_to_probe_node : vtkMRMLLinearTransformNode, optional
        Receives each calibration; default: a new ``ImageToProbe`` node at the first one.
    probe_to_reference_node : vtkMRMLLinearTransformNode, optional
    phantom_to_reference_node : vtkMRMLLinearTransformNode, optional
        Replaces the setup's registration.
    phantom_pose : {"auto", "known", "estimate"}
    detector : str
    pixel_spacing_mm : float or (sx, sy), optional
        Detector hint; default: the setup's, else the image node's spacing.
    settings : KeyframeSettings, optional
    convergence_table_node : vtkMRMLTableNode, optional
        Default: a new node at the first calibration.
    plot_chart_node : vtkMRMLPlotChartNode, optional
        Convergence plot; default: a new node at the first calibration.
    markups_node : vtkMRMLMarkupsFiducialNode, optional
        Shows the dots of the latest frame on the image (no points when not detected): the
        image's IJKToRAS applied to the dots, the node placed under the image's parent transform.
    min_interval_s : float
        Frames arriving sooner than this after the last processed one are skipped (counted).
    clock : callable() -> float
        Seconds (default ``time.monotonic``).
    """

    def __init__(self, setup: CalibrationSetup, *, image_to_probe_node=None, probe_to_reference_node=None,
                 phantom_to_reference_node=None, phantom_pose: str = "auto", detector: str = "hessian",
                 pixel_spacing_mm=None, settings: KeyframeSettings | None = None, convergence_table_node=None,
                 plot_chart_node=None, markups_node=None, min_interval_s: float = 0.0, clock=time.monotonic):
        setup = _with_registration(setup, phantom_to_reference_node)
        if phantom_pose not in ("auto", "known", "estimate"):
            raise ValueError(f"phantom_pose: expected 'auto', 'known' or 'estimate', got {phantom_pose!r}")
        if phantom_pose == "known" and setup.phantom_to_reference is None:
            raise CalibrationError(
                "phantom pose 'known' needs a PhantomToReference registration: select the PhantomToReference "
                "transform or a PLUS configuration that has it, or estimate the phantom pose"
            )
        if markups_node is not None:
            _check_markups(markups_node)
        if convergence_table_node is not None and not convergence_table_node.IsA(_TABLE_CLASS):
            raise CalibrationError(
                f"convergence table: expected a vtkMRMLTableNode, got {convergence_table_node.GetClassName()}")
        if not float(min_interval_s) >= 0:
            raise ValueError(f"min_interval_s: expected >= 0 s, got {min_interval_s!r}")
        self.setup = setup
        self.phantom_to_reference = None if phantom_pose == "estimate" else setup.phantom_to_reference
        self.detector_name = detector
        self.pixel_spacing_mm = pixel_spacing_mm
        self.settings = settings or KeyframeSettings()
        self.image_to_probe_node = image_to_probe_node
        self.probe_to_reference_node = probe_to_reference_node
        self.convergence_table_node = convergence_table_node
        self.plot_chart_node = plot_chart_node
        self.markups_node = markups_node
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self.calibrator: KeyframeCalibrator | None = None
        self._detector = None
        self.image_node = None
        self._observations: list = []
        self._last_pixels = None
        self._last_time = None
        self.frames_received = 0
        self.frames_detected = 0
        self.frames_skipped = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_update: KeyframeUpdate | None = None

    # -- observation -------------------------------------------------------------------------
    def observe(self, image_node) -> LiveCalibration:
        """Start observing ``image_node``; checks now that ProbeToReference can be found.

        Raises
        ------
        SequenceError
            Not a volume node.
        TransformError
            No ProbeToReference (see :func:`probe_to_reference_of_image_node`).
        """
        if image_node is None or not image_node.IsA("vtkMRMLVolumeNode"):
            got = "None" if image_node is None else image_node.GetClassName()
            raise SequenceError(f"live image: expected a vtkMRMLVolumeNode (e.g. Image_Image), got {got}")
        node = _probe_transform_node(image_node, self.probe_to_reference_node)
        if not node.IsA("vtkMRMLTransformNode"):
            raise TransformError(f"ProbeToReference: expected a linear transform node, got {node.GetClassName()}")
        self.unobserve()
        self.image_node = image_node
        self._observations = [image_node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_modified_event)]
        logger.info("live calibration: observing %s (pose from %s)", image_node.GetName(), node.GetName())
        return self

    def unobserve(self) -> None:
        """Stop observing (keyframes and calibration are kept)."""
        if self.image_node is not None:
            for tag in self._observations:
                self.image_node.RemoveObserver(tag)
        self._observations = []

    @property
    def observing(self) -> bool:
        return bool(self._observations)

    @property
    def converged(self) -> bool:
        return bool(self.calibrator is not None and self.calibrator.converged)

    @property
    def image_to_probe(self) -> np.ndarray | None:
        return None if self.calibrator is None else self.calibrator.image_to_probe

    def _on_modified_event(self, caller, event) -> None:
        try:
            self.on_image_modified(caller)
        except FreehandUSError as exc:  # never let an exception escape into VTK
            self.errors += 1
            self.last_error = str(exc)
            logger.warning("live calibration: %s", exc)

    # -- frames ------------------------------------------------------------------------------
    def on_image_modified(self, image_node) -> KeyframeUpdate | None:
        """Handle an update of the live image node; the keyframe decision, or None (not a new frame)."""
        image = image_node.GetImageData()
        key = None if image is None else (image.GetAddressAsString("vtkImageData"), image.GetMTime())
        if key is None or key == self._last_pixels:
            return None
        self._last_pixels = key
        frame, _ = frame_from_image_node(image_node)
        pose = probe_to_reference_of_image_node(image_node, self.probe_to_reference_node)
        spacing = np.array(image_node.GetSpacing()[:2], dtype=float)  # fallback hint (IJKToRAS spacing)
        if self.markups_node is not None and self.markups_node.GetTransformNodeID() != image_node.GetTransformNodeID():
            # Dots in the image's IJKToRAS under the image's parent: they move with the image when
            # ImageToProbe (or ProbeToReference) above it changes.
            self.markups_node.SetAndObserveTransformNodeID(image_node.GetTransformNodeID())
        return self.add_frame(frame, pose, ijk_to_ras=_ijk_to_ras(image_node), source=image_node.GetName(),
                              spacing_from_node=spacing)

    def _make_detector(self, frame, spacing_from_node):
        spacing = self.pixel_spacing_mm if self.pixel_spacing_mm is not None else self.setup.pixel_spacing_mm
        if spacing is None:
            if spacing_from_node is None or np.allclose(spacing_from_node, 1.0):
                raise DetectionError(
                    "no pixel spacing hint for the live images: give a PLUS configuration with "
                    "<Segmentation ApproximateSpacingMmPerPixel=...> or the pixel spacing (mm per pixel)")
            spacing = tuple(float(v) for v in spacing_from_node)
        spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (2,)).copy()
        self._detector = make_detector(self.detector_name, self.setup.phantom, spacing,
                                       clip_rectangle_px=self.setup.clip_rectangle_px,
                                       segmentation=self.setup.segmentation)
        rows, cols = frame.shape[:2]
        self.calibrator = KeyframeCalibrator(self.setup.phantom, (cols, rows), self.phantom_to_reference, self.settings)

    def add_frame(self, frame, probe_to_reference, *, ijk_to_ras=None, source: str = "",
                  spacing_from_node=None) -> KeyframeUpdate | None:
        """Detect the dots of one frame and offer them with the pose to the keyframe calibrator.

        Parameters
        ----------
        frame : (rows, cols) uint8 or float32
            MF image.
        probe_to_reference : (4, 4) float
            NaN when not tracked.
        ijk_to_ras : (4, 4) float, optional
            Pixel -> markups coordinates (the image node's IJKToRAS; the markups node observes the
            image's parent transform); without it the overlay is not updated.
        source : str
            Name recorded on the ImageToProbe node.
        spacing_from_node : (2,) float, optional
            Fallback spacing hint.

        Returns
        -------
        KeyframeUpdate or None
            None when the frame was skipped (too soon after the last one, or converged).
        """
        self.frames_received += 1
        now = self._clock()
        if self.converged or (self._last_time is not None and now - self._last_time < self.min_interval_s):
            self.frames_skipped += 1
            return None
        self._last_time = now
        frame = np.asarray(frame)
        if self._detector is None:
            self._make_detector(frame, spacing_from_node)
        elif (frame.shape[1], frame.shape[0]) != tuple(self.calibrator.image_size_px):
            raise DetectionError(
                f"live frame is {frame.shape[1]}x{frame.shape[0]} pixels, the calibration started with "
                f"{self.calibrator.image_size_px[0]}x{self.calibrator.image_size_px[1]}; stop and restart the live "
                "calibration after changing the imaging depth or size")
        det = self._detector.detect(frame)
        points = det.points_px if det.ok else np.full((self.setup.phantom.n_wires, 2), np.nan)
        if det.ok:
            self.frames_detected += 1
        if self.markups_node is not None and ijk_to_ras is not None:
            if det.ok:
                _set_points(self.markups_node, _pixels_to_ras(points, np.asarray(ijk_to_ras)),
                            self.setup.phantom.wire_names)
            else:
                self.markups_node.RemoveAllControlPoints()
        n_curve = len(self.calibrator.curve)
        update = self.calibrator.add(points, np.asarray(probe_to_reference, dtype=np.float64))
        self.last_update = update
        if len(self.calibrator.curve) > n_curve:
            self._write_outputs(source)
        return update

    def _scene(self):
        for node in (self.image_node, self.image_to_probe_node, self.convergence_table_node, self.markups_node,
                     self.probe_to_reference_node):
            if node is not None and node.GetScene() is not None:
                return node.GetScene()
        return None

    def _write_outputs(self, source: str) -> None:
        scene = self._scene()
        if scene is None:
            return
        cal = self.calibrator
        if self.image_to_probe_node is None:
            self.image_to_probe_node = scene.AddNewNodeByClass(
                "vtkMRMLLinearTransformNode", scene.GenerateUniqueName("ImageToProbe"))
        node = self.image_to_probe_node
        date = datetime.now()
        status = self.status()
        was = node.StartModify()
        try:
            node.SetMatrixTransformToParent(mrml.matrix_to_vtk(cal.image_to_probe))
            node.SetAttribute(mrml.ATTR_TRANSFORM_NAME, "ImageToProbe")
            node.SetAttribute(ATTR_MODE, "live")
            node.SetAttribute(ATTR_DATE, _format_date(date))
            node.SetAttribute(ATTR_SOLVER, "lm")
            node.SetAttribute(ATTR_PHANTOM_POSE, "known" if self.phantom_to_reference is not None else "estimated")
            node.SetAttribute(ATTR_PHANTOM, self.setup.phantom.name)
            node.SetAttribute(ATTR_SOURCE, source)
            node.SetAttribute(ATTR_CONFIG, self.setup.source)
            node.SetAttribute(ATTR_ERROR_MM, repr(float(cal.curve[-1].cost_mm)))
            node.SetAttribute(ATTR_PLUS_TRANSFORM, plus_transform_element(
                cal.image_to_probe, error_mm=float(cal.curve[-1].cost_mm) if math.isfinite(cal.curve[-1].cost_mm)
                else None, date=date))
            node.SetAttribute(ATTR_RESULT, json.dumps(status))
            node.SetDescription(str(self))
            if self.image_node is not None:
                node.SetNodeReferenceID(REF_LIVE_IMAGE, self.image_node.GetID())
        finally:
            node.EndModify(was)
        if self.convergence_table_node is None:
            self.convergence_table_node = scene.AddNewNodeByClass(
                _TABLE_CLASS, scene.GenerateUniqueName("LiveCalibrationConvergence"))
        fill_table(self.convergence_table_node, self.convergence_columns())
        node.SetNodeReferenceID(REF_CONVERGENCE_TABLE, self.convergence_table_node.GetID())
        if self.plot_chart_node is None or self.plot_chart_node.GetNumberOfPlotSeriesNodes() == 0:
            self.plot_chart_node = plot_table(self.convergence_table_node, COL_KEYFRAMES, [COL_CHANGE, COL_RESIDUAL],
                                              chart_node=self.plot_chart_node,
                                              title="Live N-wire calibration: convergence", y_title="mm")

    def convergence_columns(self) -> list:
        """The convergence table: ``[(name, values, unit), ...]``, one row per recalibration.

        The change of the first calibration (nothing to compare with) is NaN.
        """
        curve = [] if self.calibrator is None else self.calibrator.curve
        return [
            (COL_KEYFRAMES, [int(p.n_keyframes) for p in curve], ""),
            (COL_CHANGE, [p.change_mm if math.isfinite(p.change_mm) else float("nan") for p in curve], "mm"),
            (COL_RESIDUAL, [float(p.cost_mm) for p in curve], "mm"),
            (COL_DIVERSITY, [float(p.pose_diversity_deg) for p in curve], "deg"),
        ]

    def status(self) -> dict:
        """Counters and the latest calibration (JSON-safe)."""
        cal = self.calibrator
        curve = [] if cal is None else cal.curve
        change = curve[-1].change_mm if curve else float("nan")
        return {
            "frames_received": self.frames_received,
            "frames_detected": self.frames_detected,
            "frames_skipped": self.frames_skipped,
            "keyframes": 0 if cal is None else cal.n_keyframes,
            "calibrations": len(curve),
            "converged": self.converged,
            "last_change_mm": change if math.isfinite(change) else None,
            "last_reason": None if self.last_update is None else self.last_update.reason,
            "errors": self.errors,
            "last_error": self.last_error,
            "ImageToProbe": None if self.image_to_probe is None else self.image_to_probe.tolist(),
        }

    def __str__(self) -> str:
        s = self.status()
        text = (f"{s['frames_received']} frames, {s['frames_detected']} detected, {s['keyframes']} keyframes, "
                f"{s['calibrations']} calibrations")
        if s["last_change_mm"] is not None:
            text += f", last change {s['last_change_mm']:.3f} mm"
        if s["converged"]:
            text += ", converged"
        elif s["last_reason"]:
            text += f" (last frame: {s['last_reason']})"
        if s["errors"]:
            text += f"; {s['errors']} errors, last: {s['last_error']}"
        return text

    def stop(self) -> np.ndarray | None:
        """Stop observing and make the final calibration from all keyframes.

        Returns
        -------
        (4, 4) float64 or None
            ImageToProbe (also written into the node), or None when there are too few keyframes
            (``status()`` says how many).
        """
        self.unobserve()
        if self.calibrator is None:
            return None
        n_curve = len(self.calibrator.curve)
        try:
            matrix = self.calibrator.finish()
        except CalibrationError as exc:
            self.last_error = str(exc)
            logger.info("live calibration stopped without a calibration: %s", exc)
            return None
        if len(self.calibrator.curve) > n_curve:
            self._write_outputs(self.image_node.GetName() if self.image_node is not None else "")
        return matrix

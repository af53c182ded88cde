"""MRML bridge for N-wire calibration: sequence browsers and live image nodes -> ImageToProbe.

What the "N-Wire Calibration" module's Logic calls (it holds no calibration code itself), and
what the headless tests exercise with the real MRML classes of the ``slicer-core`` wheel:

- :func:`make_setup` -- phantom, PhantomToReference and spacing hint from a PLUS configuration
  and/or a built-in phantom (:func:`~.pipeline.load_setup` with the module's error messages);
- :func:`detect_browser` -- the dots of every frame of a recording (sequence browser); with
  ``markups_node`` they become an overlay that follows the browser (see below);
- :func:`calibrate_browsers` -- calibration (and validation) recordings in, ImageToProbe written
  into a linear transform node with its provenance, the accuracy table, the per-frame residuals
  table, a residual plot and the report of the frames that did not count (the rejections table
  and :func:`detection_report_text`) out (:class:`BrowserCalibration`);
- :class:`LiveCalibration` -- observes a live image node (as SlicerOpenIGTLink updates it),
  detects the dots of every new frame, feeds them with the probe pose to a
  :class:`~.keyframes.KeyframeCalibrator` and writes every new calibration and the convergence
  curve into MRML nodes;
- helpers: :func:`sequence_from_browser`, :func:`dots_to_markups`, :func:`write_image_to_probe`,
  :func:`rejection_columns`, :func:`write_detection_report`, :func:`fill_table`,
  :func:`plot_table`, :func:`image_proxy_node`, :func:`frame_from_image_node`,
  :func:`probe_to_reference_of_image_node`, :func:`matrix_of_transform_node`.

It reaches ``slicer`` only through :mod:`FreehandUSLib.mrml` (the one module that imports it)
and makes nodes with ``scene.AddNewNodeByClass``, so it needs 3D Slicer's Python or the
``slicer-core`` wheel but never imports qt, ctk or ``slicer.util``; ``import
NWireCalibrationLib`` does not import it. Periodic work (refreshing a status line) belongs to
the module's Widget.

Coordinates
-----------
As in :mod:`FreehandUSLib.mrml`: Slicer's RAS world is the PLUS Reference frame (mm, no LPS
flip). Dots are ``(x, y)`` pixels of the MF image, i.e. IJK ``(i = x, j = y, k = 0)`` of a
frame's volume node. A named transform node ``AToB`` holds the matrix ``AToB`` as its matrix
*to parent* (so it may sit in a SlicerIGT hierarchy).

The dots overlay
----------------
:func:`dots_to_markups` stores the dots of each frame as one ``vtkMRMLMarkupsFiducialNode``
item of a new sequence (``<browser>_DetectedDots``, same index values as the image sequence),
adds that sequence to the browser as a synchronised sequence, and makes the given markups node
its proxy. The Sequences module then replaces the proxy's points whenever the browser's
selected item changes (slider, play, ``SetSelectedItemNumber``), exactly as it replaces the
image proxy, so the overlay always shows the dots of the frame on screen. The points are in
RAS: the frame's IJKToRAS applied to ``(x, y, 0)``, and the markups proxy observes the same
parent transform as the image proxy, so they lie on the displayed image in slice views and in
3D. A frame where detection failed has no points. Running detection again replaces the
sequence (the proxy node is reused).

Provenance (attributes of the ImageToProbe transform node)
----------------------------------------------------------
``NWireCalibration.ErrorMm`` (PLUS error: validation 95 %-trimmed 3D error, else
calibration), ``NWireCalibration.Date``, ``.Solver``, ``.PhantomPose``, ``.Phantom``,
``.Mode`` (``batch``/``live``), ``.Source`` (browser or image node names), ``.Config``,
``.PlusTransform`` (the ``<Transform From="Image" To="Probe" .../>`` element to paste into a
PLUS device-set configuration), ``.Result`` (JSON of
:meth:`~.results.CalibrationResult.to_dict`), ``.DetectionReport`` (why frames did not count:
:func:`detection_report_text`, also on the rejections table); ``FreehandUS.TransformName =
ImageToProbe``; node references to the browsers and the output tables (``REF_*``).

Frames that did not count
-------------------------
The rejections table has one row per frame that the detection rejected (calibration) or dropped
(validation), with the stable reason code (:data:`~.labeling.REJECTION_REASONS`) and the text
saying which wire is missing or which prior failed, and one row per frame whose single-frame
labelling the sequence stage refused before another stage labelled it. The report text above it
gives the per-stage counts: frames labelled alone, recovered from the tracked motion or the
neighbouring frames, refused by the sequence stage, rejected by reason.

Example (3D Slicer Python console)
----------------------------------
>>> from NWireCalibrationLib import mrml_calibration as mc
>>> setup = mc.make_setup("PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml")
>>> out = mc.calibrate_browsers(getNode("CalibrationBrowser"), getNode("ValidationBrowser"), setup)
>>> print(out.result)
>>> print(out.image_to_probe_node.GetAttribute(mc.ATTR_PLUS_TRANSFORM))
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import vtk
from vtk.util import numpy_support

from FreehandUSLib import jobs, mrml
from FreehandUSLib.errors import FreehandUSError, SequenceError, TransformError
from FreehandUSLib.io.plus_config import read_plus_config
from FreehandUSLib.transforms import split_transform_name

from .errors import CalibrationError, DetectionError, PhantomDefinitionError
from .keyframes import KeyframeCalibrator, KeyframeSettings, KeyframeUpdate
from .metrics import reprojection_errors_2d, reprojection_errors_3d
from .phantom import builtin_phantom_names
from .pipeline import CalibrationSetup, calibrate, detect_sequence, load_setup, make_detector, probe_to_reference
from .results import CalibrationResult, DetectionResult, plus_transform_element

__all__ = [
    "make_setup",
    "sequence_from_browser",
    "detect_browser",
    "dots_to_markups",
    "image_proxy_node",
    "calibrate_browsers",
    "BrowserCalibration",
    "write_image_to_probe",
    "accuracy_columns",
    "residual_columns",
    "rejection_columns",
    "detection_report_text",
    "write_detection_report",
    "fill_table",
    "plot_table",
    "matrix_of_transform_node",
    "frame_from_image_node",
    "probe_to_reference_of_image_node",
    "LiveCalibration",
    "push_calibration_node",
    "ATTR_ERROR_MM",
    "ATTR_DATE",
    "ATTR_SOLVER",
    "ATTR_PHANTOM_POSE",
    "ATTR_PHANTOM",
    "ATTR_MODE",
    "ATTR_SOURCE",
    "ATTR_CONFIG",
    "ATTR_PLUS_TRANSFORM",
    "ATTR_RESULT",
    "ATTR_DETECTION",
    "ATTR_DETECTION_REPORT",
    "ATTR_ROLE",
    "ROLE_DOTS",
    "REF_CALIBRATION_BROWSER",
    "REF_VALIDATION_BROWSER",
    "REF_LIVE_IMAGE",
    "REF_ACCURACY_TABLE",
    "REF_RESIDUALS_TABLE",
    "REF_REJECTIONS_TABLE",
    "REF_CONVERGENCE_TABLE",
    "COL_DATA_SET",
    "COL_FRAMES",
    "COL_SEGMENTED",
    "COL_USED",
    "COL_ERROR3D_TRIMMED",
    "COL_ERROR3D_MEAN",
    "COL_ERROR3D_MAX",
    "COL_ERROR2D",
    "COL_FRAME",
    "COL_CAL_ERROR3D",
    "COL_VAL_ERROR3D",
    "COL_CAL_ERROR2D",
    "COL_VAL_ERROR2D",
    "COL_STATUS",
    "COL_REASON_CODE",
    "COL_REASON",
    "STATUS_REJECTED",
    "STATUS_DROPPED",
    "STATUS_RELABELLED",
    "COL_KEYFRAMES",
    "COL_CHANGE",
    "COL_RESIDUAL",
    "COL_DIVERSITY",
]

logger = logging.getLogger(__name__)

_PREFIX = "NWireCalibration."
#: PLUS's error of the calibration (validation, else calibration, 95 %-trimmed 3D error), mm.
ATTR_ERROR_MM = _PREFIX + "ErrorMm"
#: When the calibration was computed (``YYYY.MM.DD hh:mm:ss``, as PLUS writes ``Date``).
ATTR_DATE = _PREFIX + "Date"
ATTR_SOLVER = _PREFIX + "Solver"
#: ``known`` or ``estimated``.
ATTR_PHANTOM_POSE = _PREFIX + "PhantomPose"
ATTR_PHANTOM = _PREFIX + "Phantom"
#: ``batch`` (recordings) or ``live`` (keyframes of a live image node).
ATTR_MODE = _PREFIX + "Mode"
#: Names of the browsers / live image node the calibration comes from.
ATTR_SOURCE = _PREFIX + "Source"
#: The PLUS configuration (path) the phantom came from, if any.
ATTR_CONFIG = _PREFIX + "Config"
#: The ``<Transform From="Image" To="Probe" Matrix=... Error=... Date=.../>`` element.
ATTR_PLUS_TRANSFORM = _PREFIX + "PlusTransform"
#: JSON of :meth:`CalibrationResult.to_dict` (batch) or of :meth:`LiveCalibration.status` (live).
ATTR_RESULT = _PREFIX + "Result"
#: On the dots markups node and its sequence: JSON summary of the detection.
ATTR_DETECTION = _PREFIX + "Detection"
#: On the ImageToProbe node and the rejections table: why frames did not count
#: (:func:`detection_report_text`).
ATTR_DETECTION_REPORT = _PREFIX + "DetectionReport"
#: On the dots sequence (``ROLE_DOTS``), to find it again in the browser.
ATTR_ROLE = _PREFIX + "Role"
ROLE_DOTS = "DetectedDots"

REF_CALIBRATION_BROWSER = _PREFIX + "CalibrationBrowser"
REF_VALIDATION_BROWSER = _PREFIX + "ValidationBrowser"
REF_LIVE_IMAGE = _PREFIX + "LiveImage"
REF_ACCURACY_TABLE = _PREFIX + "AccuracyTable"
REF_RESIDUALS_TABLE = _PREFIX + "ResidualsTable"
REF_REJECTIONS_TABLE = _PREFIX + "RejectionsTable"
REF_CONVERGENCE_TABLE = _PREFIX + "ConvergenceTable"

# Accuracy table: one row per data set (calibration, validation).
COL_DATA_SET = "Data set"
COL_FRAMES = "Frames"
COL_SEGMENTED = "Segmented"
COL_USED = "Used"
COL_ERROR3D_TRIMMED = "3D error, best 95 % (mm)"
COL_ERROR3D_MEAN = "3D error, all (mm)"
COL_ERROR3D_MAX = "3D error, max (mm)"
COL_ERROR2D = "2D error (px)"
# Residuals table: one row per frame index.
COL_FRAME = "Frame"
COL_CAL_ERROR3D = "Calibration 3D error (mm)"
COL_VAL_ERROR3D = "Validation 3D error (mm)"
COL_CAL_ERROR2D = "Calibration 2D error (px)"
COL_VAL_ERROR2D = "Validation 2D error (px)"
# Rejections table: one row per frame that did not count (COL_DATA_SET, COL_FRAME and these).
COL_STATUS = "Status"
COL_REASON_CODE = "Reason code"
COL_REASON = "Reason"
#: A calibration frame not detected.
STATUS_REJECTED = "rejected"
#: A validation frame not detected (the validation errors are over the other frames).
STATUS_DROPPED = "dropped"
#: A frame whose single-frame labelling the sequence stage refused (``motion-inconsistent``) and
#: that the tracked or neighbours stage then labelled: it counts, with the new labels.
STATUS_RELABELLED = "refused, relabelled"
# Convergence table (live): one row per recalibration.
COL_KEYFRAMES = "Keyframes"
COL_CHANGE = "Change (mm)"
COL_RESIDUAL = "Residual RMS (mm)"
COL_DIVERSITY = "Pose diversity (deg)"

_BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
_MARKUPS_CLASS = "vtkMRMLMarkupsFiducialNode"
_TABLE_CLASS = "vtkMRMLTableNode"
_CHART_CLASS = "vtkMRMLPlotChartNode"
_SERIES_CLASS = "vtkMRMLPlotSeriesNode"
_INVALID_TEXT = ("false", "0", "no", "invalid")


# --------------------------------------------------------------------------------------------
# Setup and recordings
# --------------------------------------------------------------------------------------------


def make_setup(config=None, *, phantom=None, pixel_spacing_mm=None) -> CalibrationSetup:
    """The phantom, its registration and the detector hints for a calibration.

    Parameters
    ----------
    config : str or Path, optional
        PLUS device-set configuration: ``<PhantomDefinition>`` (wires), PhantomToReference
        (``<CoordinateDefinitions>``), ``<Segmentation ApproximateSpacingMmPerPixel=...>``.
    phantom : str or Path, optional
        Built-in phantom name (``"fCal-2.0"``...), ``.json`` or PLUS ``.xml`` phantom file;
        replaces the configuration's phantom. None: the configuration's ``<PhantomDefinition>``.
    pixel_spacing_mm : float or (sx, sy), optional
        Approximate pixel spacing (mm/px); replaces the configuration's hint.

    Returns
    -------
    CalibrationSetup

    Raises
    ------
    PhantomDefinitionError
        Neither a configuration nor a phantom, or a configuration without
        ``<PhantomDefinition>`` and no phantom (the message says what to select).
    ConfigError, FileFormatError
        An unreadable configuration (names the file).
    ValueError
        A pixel spacing that is not positive.
    """
    if pixel_spacing_mm is not None:
        spacing = np.atleast_1d(np.asarray(pixel_spacing_mm, dtype=float))
        if spacing.size not in (1, 2) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(
                f"pixel_spacing_mm: expected one or two positive numbers (mm/px), got {pixel_spacing_mm!r}")
    if config is None and phantom is None:
        raise PhantomDefinitionError(
            f"no phantom: select a PLUS configuration with a <PhantomDefinition> or a built-in phantom "
            f"({', '.join(builtin_phantom_names())})"
        )
    if phantom is None:
        cfg = read_plus_config(config)
        if cfg.phantom is None or not cfg.phantom.nwires:
            raise PhantomDefinitionError(
                f"{config}: the configuration defines no N-wire phantom (<PhantomDefinition> with "
                f'<Pattern Type="NWire">); select a built-in phantom ({", ".join(builtin_phantom_names())}), '
                "a phantom file, or a configuration that defines the phantom"
            )
    return load_setup(config, phantom=phantom, pixel_spacing_mm=pixel_spacing_mm)


def _check_browser(browser_node, role: str) -> None:
    if browser_node is None:
        raise SequenceError(f"no {role} recording: select a sequence browser (vtkMRMLSequenceBrowserNode)")
    if not browser_node.IsA(_BROWSER_CLASS):
        raise SequenceError(
            f"{role} recording {browser_node.GetName()!r} is a {browser_node.GetClassName()}; expected a "
            "vtkMRMLSequenceBrowserNode (for a live image node use live calibration)"
        )


def sequence_from_browser(browser_node, *, role: str = "calibration", progress=None, cancel=None):
    """The tracked sequence of a browser (:func:`FreehandUSLib.mrml.browser_to_sequence`).

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
    role : str
        ``"calibration"`` or ``"validation"``, used in error messages.
    progress : callable(done, total), optional
        Called every few frames and transform items read (``total``: frames + items).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked before, at every report while reading, and once the sequence is read: once
        set, the call stops with :class:`~FreehandUSLib.jobs.Cancelled` (it writes no node).

    Returns
    -------
    TrackedSequence
        Frames ``(n, rows, cols)`` in MF, per-frame transforms.

    Raises
    ------
    SequenceError
        No browser, not a browser, no image (volume) sequence, no frames (names the browser).
    """
    _check_browser(browser_node, role)
    try:
        sequence = mrml.browser_to_sequence(browser_node, progress=progress, cancel=cancel)
    except SequenceError as exc:
        raise SequenceError(f"{role} recording {browser_node.GetName()!r}: {exc}") from exc
    _add_static_tree(sequence, browser_node)
    if cancel is not None:  # the last report may lie a few frames before the end
        cancel.check()
    return sequence


def _reading(progress):
    """The ``progress`` of reading a recording in a job whose bar counts detected frames.

    Reading a long recording takes seconds before the first frame is detected: the bar stays
    at its start, ``progress(0, 1)``, while the reads report, so the panel's events run (its
    Cancel button works) and a cancel is seen at the next report.
    """
    return None if progress is None else (lambda _done, _total: progress(0, 1))


def _recorded_in(browser_node, node) -> bool:
    seq_node = browser_node.GetSequenceNode(node)
    return seq_node is not None and any(s.GetID() == seq_node.GetID() for s in _browser_sequences(browser_node))


def _add_static_tree(sequence, browser_node) -> None:
    """Add the fixed transforms of the image proxy's tree above its recorded tracking to ``sequence``.

    Slicer shows a recording through the transforms above its image proxy (a SlicerIGT tree
    such as ImageToProbe -> ProbeToTracker -> TrackerToReference -> ReferenceToRAS). The
    recorded ones are already in the sequence; the fixed ones *above the highest recorded one*
    (e.g. a ``TrackerToReference`` the user set once) complete the tracking chain, as Slicer
    composes them, and are added as constant transforms under their PLUS names when the
    recording does not link those two frames itself. The transforms below the recorded tracking (the
    ImageToProbe being calibrated) and those of a tree with nothing recorded (display only, e.g.
    a ``ReferenceToRAS`` above ``Image_Reference`` frames) are not used: they do not change
    ImageToProbe.
    """
    proxy = browser_node.GetProxyNode(_image_sequence(browser_node))
    chain = []
    node = None if proxy is None else proxy.GetParentTransformNode()
    while node is not None:
        chain.append(node)
        node = node.GetParentTransformNode()
    recorded = [i for i, n in enumerate(chain) if _recorded_in(browser_node, n)]
    if not recorded:
        return
    for node in chain[recorded[-1] + 1:]:
        name = _plus_name(node)
        if name is None or name in sequence.transforms or not node.IsLinear():
            continue
        try:
            sequence.repository().get(name)
        except TransformError:
            pass
        else:
            continue  # the recording links these frames itself: it wins over a fixed transform
        matrix = matrix_of_transform_node(node, name)
        sequence.set_transform(name, np.broadcast_to(matrix, (sequence.n_frames, 4, 4)).copy())
        logger.info("browser %s: fixed transform %s from the image's transform tree", browser_node.GetName(), name)


def _poses(sequence, browser_node, role: str) -> np.ndarray:
    """ProbeToReference ``(n, 4, 4)`` of a recording, or a TransformError that says what to record."""
    try:
        return probe_to_reference(sequence)
    except TransformError as exc:
        raise TransformError(
            f"{role} recording {browser_node.GetName()!r}: no ProbeToReference ({exc}); record the "
            "ProbeToReference transform, or ProbeToTracker and ReferenceToTracker, with the images "
            f"(transforms in the recording: {', '.join(sequence.transform_names) or 'none'})"
        ) from exc


def _with_registration(setup: CalibrationSetup, phantom_to_reference_node=None) -> CalibrationSetup:
    """``setup`` checked, with the registration of ``phantom_to_reference_node`` when given."""
    if not isinstance(setup, CalibrationSetup):
        raise DetectionError(
            f"setup: expected a CalibrationSetup (make_setup(config) or make_setup(phantom=...)), got "
            f"{type(setup).__name__}"
        )
    if phantom_to_reference_node is None:
        return setup
    registration = matrix_of_transform_node(phantom_to_reference_node, "PhantomToReference")
    return replace(setup, phantom_to_reference=registration)


def _spacing_hint(browser_node, sequence, setup: CalibrationSetup, pixel_spacing_mm, role: str):
    """The detector's spacing hint: given, the setup's, the recording's, else the frames' IJKToRAS.

    Recordings made in Slicer (e.g. ``Image_Reference`` from SlicerOpenIGTLink) carry the pixel
    spacing only in each frame's IJKToRAS (column norms); a unit IJKToRAS is no hint.
    """
    if pixel_spacing_mm is not None or setup.pixel_spacing_mm is not None or sequence.pixel_spacing_mm is not None:
        return pixel_spacing_mm
    norms = np.linalg.norm(_ijk_to_ras(_image_sequence(browser_node).GetNthDataNode(0))[:3, :2], axis=0)
    if np.all(np.isfinite(norms)) and np.all(norms > 0) and not np.allclose(norms, 1.0):
        logger.info("%s recording %s: pixel spacing hint %s mm/px from IJKToRAS", role, browser_node.GetName(),
                    np.round(norms, 5).tolist())
        return tuple(float(v) for v in norms)
    raise DetectionError(
        f"no pixel spacing hint for the frames of {role} recording {browser_node.GetName()!r}: set the pixel "
        "spacing hint (mm per pixel) or select a PLUS configuration with <Segmentation "
        "ApproximateSpacingMmPerPixel=...>"
    )


# --------------------------------------------------------------------------------------------
# Detection and the dots overlay
# --------------------------------------------------------------------------------------------


def detect_browser(browser_node, setup: CalibrationSetup, *, detector: str = "hessian", pixel_spacing_mm=None,
                   markups_node=None, progress=None, cancel=None) -> DetectionResult:
    """Detect the phantom's dots in every frame of a recording.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
        The recording (image sequence in MF; transforms are not needed for detection).
    setup : CalibrationSetup
        From :func:`make_setup`.
    detector : str
        ``"hessian"`` (the paper), ``"plus"``, ``"agcfd"`` or ``"tacd"``.
    pixel_spacing_mm : float or (sx, sy), optional
        Overrides the setup's spacing hint.
    markups_node : vtkMRMLMarkupsFiducialNode, optional
        Becomes the overlay of the dots that follows the browser (:func:`dots_to_markups`).
    progress : callable(done, total), optional
        ``(0, 1)`` while the recording is read, then ``(frames detected, frames)``.
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked every few frames read and after every frame detected: once set, the call
        stops with :class:`~FreehandUSLib.jobs.Cancelled` before the overlay is written.

    Returns
    -------
    DetectionResult
        Dots ``(n_frames, n_wires, 2)``, (x, y) MF pixels, NaN for failed frames.

    Raises
    ------
    SequenceError
        Not a browser / no image sequence.
    DetectionError
        No pixel spacing hint (given, in the setup, in the recording, or from the frames'
        IJKToRAS), or ``markups_node`` is not a markups fiducial node.
    """
    if cancel is not None:
        cancel.check()
        progress = jobs.cancellable_progress(progress, cancel)
    if markups_node is not None:
        _check_markups(markups_node)
    setup = _with_registration(setup)
    sequence = sequence_from_browser(browser_node, role="calibration", progress=_reading(progress), cancel=cancel)
    spacing = _spacing_hint(browser_node, sequence, setup, pixel_spacing_mm, "calibration")
    result = detect_sequence(sequence, setup, detector=detector, pixel_spacing_mm=spacing, progress=progress)
    if markups_node is not None:
        dots_to_markups(browser_node, result, markups_node)
    logger.info("detected dots in %s: %s", browser_node.GetName(), result)
    return result


def _check_markups(node) -> None:
    if not node.IsA(_MARKUPS_CLASS):
        raise DetectionError(f"dots overlay: expected a vtkMRMLMarkupsFiducialNode, got {node.GetClassName()}")


def _browser_sequences(browser) -> list:
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _image_sequence(browser):
    """The volume sequence of a browser (the one :func:`FreehandUSLib.mrml.browser_to_sequence` reads)."""
    volumes = [
        s for s in _browser_sequences(browser)
        if s.GetNumberOfDataNodes() > 0 and s.GetNthDataNode(0) is not None
        and s.GetNthDataNode(0).IsA("vtkMRMLVolumeNode")
    ]
    if not volumes:
        raise SequenceError(f"browser {browser.GetName()!r} has no volume sequence")
    for s in volumes:
        if s.GetAttribute(mrml.ATTR_ROLE) == "Image":
            return s
    master = browser.GetMasterSequenceNode()
    for s in volumes:
        if master is not None and s.GetID() == master.GetID():
            return s
    return volumes[0]


def image_proxy_node(browser_node):
    """The volume node that shows the browser's selected frame (proxy of its image sequence).

    Raises
    ------
    SequenceError
        Not a browser, or no image sequence / no proxy node.
    """
    _check_browser(browser_node, "calibration")
    proxy = browser_node.GetProxyNode(_image_sequence(browser_node))
    if proxy is None:
        raise SequenceError(f"browser {browser_node.GetName()!r}: the image sequence has no proxy node")
    return proxy


def _ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return mrml.vtk_to_matrix(m)


def _pixels_to_ras(points_px: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """(n, 2) pixels (x, y) -> (n, 3) RAS through IJKToRAS (k = 0)."""
    return points_px @ ijk_to_ras[:3, :2].T + ijk_to_ras[:3, 3]


def _set_points(markups, points_ras: np.ndarray, labels) -> None:
    was = markups.StartModify()
    try:
        markups.RemoveAllControlPoints()
        for p, label in zip(points_ras, labels):
            markups.AddControlPoint(vtk.vtkVector3d(*(float(v) for v in p)), str(label))
    finally:
        markups.EndModify(was)


def _style_dots(markups) -> None:
    markups.SetLocked(True)
    if markups.GetDisplayNode() is None:
        markups.CreateDefaultDisplayNodes()
    display = markups.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(1.0, 0.85, 0.0)
        display.SetTextScale(0.0)
        display.SetGlyphScale(2.0)


def dots_to_markups(browser_node, detection: DetectionResult, markups_node):
    """Make ``markups_node`` an overlay of the detected dots that follows the browser.

    See the module docstring: the dots of frame ``i`` become item ``i`` of a new markups
    sequence (same index values as the image sequence) synchronised in ``browser_node``, whose
    proxy is ``markups_node``. A dots sequence made earlier for this browser is removed.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
    detection : DetectionResult
        Of the browser's frames (same number of frames).
    markups_node : vtkMRMLMarkupsFiducialNode
        Its points become those of the selected frame; labels are the wire names; locked.

    Returns
    -------
    vtkMRMLSequenceNode
        The dots sequence (attribute ``NWireCalibration.Role = DetectedDots``).

    Raises
    ------
    SequenceError
        Not a browser, no image sequence, or a detection of another number of frames.
    DetectionError
        ``markups_node`` is not a markups fiducial node.
    """
    _check_browser(browser_node, "calibration")
    _check_markups(markups_node)
    scene = browser_node.GetScene()
    image_seq = _image_sequence(browser_node)
    n = image_seq.GetNumberOfDataNodes()
    if detection.n_frames != n:
        raise SequenceError(
            f"browser {browser_node.GetName()!r} has {n} frames but the detection has {detection.n_frames}; "
            "detect the dots of this browser again"
        )
    for old in _browser_sequences(browser_node):
        if old.GetAttribute(ATTR_ROLE) == ROLE_DOTS:
            browser_node.RemoveSynchronizedSequenceNode(old.GetID())
            scene.RemoveNode(old)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode",
                                  scene.GenerateUniqueName(f"{browser_node.GetName()}_DetectedDots"))
    seq.SetIndexName(image_seq.GetIndexName())
    seq.SetIndexUnit(image_seq.GetIndexUnit())
    seq.SetIndexType(image_seq.GetIndexType())
    seq.SetNumericIndexValueTolerance(image_seq.GetNumericIndexValueTolerance())
    summary = json.dumps({k: v for k, v in detection.to_dict().items() if k != "frames"})
    seq.SetAttribute(ATTR_ROLE, ROLE_DOTS)
    seq.SetAttribute(ATTR_DETECTION, summary)
    item = markups_node.NewInstance()  # a scene-less node of the same class; the sequence deep-copies it
    item.SetName(markups_node.GetName())
    item.SetAttribute(ATTR_DETECTION, summary)  # proxies copy the items' attributes too
    labels = list(detection.wire_names)
    for i in range(n):
        pts = detection.points_px[i]
        if detection.ok[i] and np.all(np.isfinite(pts)):
            _set_points(item, _pixels_to_ras(pts, _ijk_to_ras(image_seq.GetNthDataNode(i))), labels)
        else:
            item.RemoveAllControlPoints()
        seq.SetDataNodeAtValue(item, image_seq.GetNthIndexValue(i))
    browser_node.AddSynchronizedSequenceNodeID(seq.GetID())
    automatic = browser_node.GetProxyNode(seq)  # the Sequences logic makes one; ours replaces it
    browser_node.AddProxyNode(markups_node, seq, False)
    if automatic is not None and automatic.GetID() != markups_node.GetID():
        scene.RemoveNode(automatic)
    selected = browser_node.GetSelectedItemNumber()
    data = seq.GetNthDataNode(min(max(selected, 0), n - 1))
    if data is not None:
        markups_node.CopyContent(data)
    image_proxy = browser_node.GetProxyNode(image_seq)
    markups_node.SetAndObserveTransformNodeID(image_proxy.GetTransformNodeID() if image_proxy is not None else None)
    markups_node.SetAttribute(ATTR_DETECTION, summary)
    _style_dots(markups_node)
    return seq


# --------------------------------------------------------------------------------------------
# Calibration from recordings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BrowserCalibration:
    """What :func:`calibrate_browsers` computed and where it wrote it.

    Attributes
    ----------
    result : CalibrationResult
        ImageToProbe, errors, warnings (``str(result)`` reads well; ``result.to_dict()`` is the
        ``freehandus calibrate`` JSON).
    calibration_detection, validation_detection : DetectionResult (validation: or None)
    image_to_probe_node : vtkMRMLLinearTransformNode
    accuracy_table_node : vtkMRMLTableNode
        One row per data set: :func:`accuracy_columns`.
    residuals_table_node : vtkMRMLTableNode
        One row per frame index: :func:`residual_columns`.
    plot_chart_node : vtkMRMLPlotChartNode
        3D error per frame (calibration, validation).
    rejections_table_node : vtkMRMLTableNode
        One row per frame that did not count: :func:`rejection_columns`.
    detection_report : str
        Why frames did not count (:func:`detection_report_text`): detected frames per stage,
        labellings the sequence stage refused, rejected / dropped frames by reason.
    """

    result: CalibrationResult
    calibration_detection: DetectionResult
    validation_detection: DetectionResult | None
    image_to_probe_node: object
    accuracy_table_node: object
    residuals_table_node: object
    plot_chart_node: object
    rejections_table_node: object = None
    detection_report: str = ""

    @property
    def image_to_probe(self) -> np.ndarray:
        return self.result.image_to_probe

    def __str__(self) -> str:
        return str(self.result)


def calibrate_browsers(calibration_browser, validation_browser, setup: CalibrationSetup, *, image_to_probe_node=None,
                       phantom_to_reference_node=None, solver: str = "ransac-lm", phantom_pose: str = "auto",
                       detector: str = "hessian", pixel_spacing_mm=None, accuracy_table_node=None,
                       residuals_table_node=None, plot_chart_node=None, rejections_table_node=None,
                       calibration_detection=None,
                       validation_detection=None, progress=None, cancel=None, **solver_options) -> BrowserCalibration:
    """Calibrate from recordings in sequence browsers and write the result into MRML nodes.

    Same computation as :func:`~.pipeline.calibrate` on the browsers' sequences (same
    ImageToProbe for the same options); missing output nodes are created.

    Parameters
    ----------
    calibration_browser : vtkMRMLSequenceBrowserNode
        Tracked frames of the phantom: images + ProbeToReference (or ProbeToTracker and
        ReferenceToTracker).
    validation_browser : vtkMRMLSequenceBrowserNode or None
        A second recording, used only for the validation errors.
    setup : CalibrationSetup
        From :func:`make_setup`.
    image_to_probe_node : vtkMRMLLinearTransformNode, optional
        Receives ImageToProbe (pixels -> Probe mm) as its matrix to parent, and the provenance
        attributes. Default: a new node ``ImageToProbe``.
    phantom_to_reference_node : vtkMRMLLinearTransformNode, optional
        The phantom registration (matrix to parent); replaces the configuration's.
    solver : str
        ``"lsq"`` (PLUS), ``"lm"`` or ``"ransac-lm"``.
    phantom_pose : str
        ``"known"``, ``"estimate"`` or ``"auto"`` (known when a registration is available).
    detector : str
        ``"hessian"``, ``"plus"``, ``"agcfd"`` or ``"tacd"``.
    pixel_spacing_mm : float or (sx, sy), optional
        Overrides the spacing hint (default: the setup's, the recording's, or the calibration
        frames' IJKToRAS spacing).
    accuracy_table_node, residuals_table_node : vtkMRMLTableNode, optional
        Filled (see :func:`accuracy_columns`, :func:`residual_columns`); default: new nodes.
    plot_chart_node : vtkMRMLPlotChartNode, optional
        Residual plot (3D error per frame); default: a new node.
    rejections_table_node : vtkMRMLTableNode, optional
        The frames that did not count and why (:func:`write_detection_report`); default: a new
        node.
    calibration_detection, validation_detection : DetectionResult, optional
        Reuse detections (e.g. from :func:`detect_browser`) instead of detecting again.
    progress : callable(done, total), optional
        ``(0, 1)`` while the recordings are read, then over the frames of both recordings
        (detection), then ``(n, n)`` while the solver runs.
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked every few frames read (so a long recording stops before detection starts),
        after every detected frame and every 0.1 s while the solver runs (on a worker thread;
        this thread keeps reporting progress): once set, the call stops with
        :class:`~FreehandUSLib.jobs.Cancelled` and writes nothing (the output nodes are written
        after reading, detection and solving).
    **solver_options
        ``ransac_iterations``, ``ransac_threshold_mm``, ``seed``... (:func:`~.pipeline.calibrate_from_points`).

    Returns
    -------
    BrowserCalibration

    Raises
    ------
    SequenceError
        A browser missing / not a browser / without an image sequence (names the role and node).
    TransformError
        A recording without ProbeToReference (checked before detection), or a bad
        PhantomToReference node.
    CalibrationError
        Too few usable frames, no frame shows the phantom, a solver that needs a registration
        without one (the message says what to do), or an output node of the wrong class.
    DetectionError
        No pixel spacing hint.
    """
    if cancel is not None:  # every check comes before the first node is written
        cancel.check()
        progress = jobs.cancellable_progress(progress, cancel)
    t0 = time.perf_counter()
    setup = _with_registration(setup, phantom_to_reference_node)
    reading = _reading(progress)
    cal_seq = sequence_from_browser(calibration_browser, role="calibration", progress=reading, cancel=cancel)
    cal_poses = _poses(cal_seq, calibration_browser, "calibration")
    val_seq = val_poses = None
    if validation_browser is not None:
        val_seq = sequence_from_browser(validation_browser, role="validation", progress=reading, cancel=cancel)
        val_poses = _poses(val_seq, validation_browser, "validation")
    _check_output_transform(image_to_probe_node, phantom_to_reference_node)
    for what, node, cls in (("accuracy table", accuracy_table_node, _TABLE_CLASS),
                            ("residuals table", residuals_table_node, _TABLE_CLASS),
                            ("rejections table", rejections_table_node, _TABLE_CLASS),
                            ("residual plot", plot_chart_node, _CHART_CLASS)):
        if node is not None and not node.IsA(cls):  # checked before the (long) detection
            raise CalibrationError(f"{what}: expected a {cls}, got {node.GetClassName()}")

    if calibration_detection is None or (val_seq is not None and validation_detection is None):
        pixel_spacing_mm = _spacing_hint(calibration_browser, cal_seq, setup, pixel_spacing_mm, "calibration")
    n_total = cal_seq.n_frames + (val_seq.n_frames if val_seq is not None else 0)
    offset = [0]

    def sub_progress(done, _total):
        if progress is not None:
            progress(offset[0] + done, n_total)

    det_c = calibration_detection
    if det_c is None:
        det_c = detect_sequence(cal_seq, setup, detector=detector, pixel_spacing_mm=pixel_spacing_mm,
                                progress=sub_progress)
    _check_detection(det_c, cal_seq, calibration_browser, "calibration")
    offset[0] = cal_seq.n_frames
    det_v = validation_detection if val_seq is not None else None
    if val_seq is not None and det_v is None:
        det_v = detect_sequence(val_seq, setup, detector=detector, pixel_spacing_mm=pixel_spacing_mm,
                                progress=sub_progress)
    if det_v is not None:
        _check_detection(det_v, val_seq, validation_browser, "validation")

    def solve():
        return calibrate(cal_seq, val_seq, setup, solver=solver, phantom_pose=phantom_pose, detector=det_c.detector,
                         pixel_spacing_mm=pixel_spacing_mm, calibration_detection=det_c, validation_detection=det_v,
                         **solver_options)

    if cancel is None:
        result = solve()
    else:  # the solver has no progress of its own: on a worker thread, this one keeps reporting and checking
        result = jobs.run_in_thread(solve, cancel=cancel, heartbeat=lambda: progress(n_total, n_total))
    info = dict(result.info)
    info["calibration_browser"] = calibration_browser.GetName()
    if validation_browser is not None:
        info["validation_browser"] = validation_browser.GetName()
    result = replace(result, seconds=time.perf_counter() - t0, info=info)

    scene = calibration_browser.GetScene()
    sources = [calibration_browser.GetName()] + ([validation_browser.GetName()] if validation_browser else [])
    image_to_probe_node = write_image_to_probe(
        scene, result, image_to_probe_node, mode="batch", source=", ".join(sources), config=setup.source)
    image_to_probe_node.SetNodeReferenceID(REF_CALIBRATION_BROWSER, calibration_browser.GetID())
    image_to_probe_node.SetNodeReferenceID(
        REF_VALIDATION_BROWSER, validation_browser.GetID() if validation_browser is not None else None)

    base = calibration_browser.GetName()
    accuracy_table_node = _table_node(scene, accuracy_table_node, f"{base}_CalibrationAccuracy")
    fill_table(accuracy_table_node, accuracy_columns(result))
    residuals_table_node = _table_node(scene, residuals_table_node, f"{base}_CalibrationResiduals")
    fill_table(residuals_table_node, residual_columns(result, setup, det_c, cal_poses, det_v, val_poses))
    ys = [COL_CAL_ERROR3D] + ([COL_VAL_ERROR3D] if det_v is not None else [])
    plot_chart_node = plot_table(residuals_table_node, COL_FRAME, ys, chart_node=plot_chart_node,
                                 title="N-wire calibration: 3D reprojection error per frame",
                                 y_title="3D error (mm)", lines=False)
    image_to_probe_node.SetNodeReferenceID(REF_ACCURACY_TABLE, accuracy_table_node.GetID())
    image_to_probe_node.SetNodeReferenceID(REF_RESIDUALS_TABLE, residuals_table_node.GetID())
    rejections_table_node = _table_node(scene, rejections_table_node, f"{base}_CalibrationRejections")
    report = write_detection_report(rejections_table_node, det_c, det_v)
    image_to_probe_node.SetAttribute(ATTR_DETECTION_REPORT, report)
    image_to_probe_node.SetNodeReferenceID(REF_REJECTIONS_TABLE, rejections_table_node.GetID())
    logger.info("calibrated %s into %s:\n%s", ", ".join(sources), image_to_probe_node.GetName(), result)
    return BrowserCalibration(result, det_c, det_v, image_to_probe_node, accuracy_table_node, residuals_table_node,
                              plot_chart_node, rejections_table_node, report)


def _check_output_transform(image_to_probe_node, phantom_to_reference_node) -> None:
    if image_to_probe_node is None:
        return
    if not image_to_probe_node.IsA("vtkMRMLLinearTransformNode"):
        raise TransformError(
            f"ImageToProbe output: expected a vtkMRMLLinearTransformNode, got {image_to_probe_node.GetClassName()}")
    if phantom_to_reference_node is not None and image_to_probe_node.GetID() == phantom_to_reference_node.GetID():
        raise TransformError(
            f"node {image_to_probe_node.GetName()!r} is both the ImageToProbe output and the PhantomToReference "
            "input; select another output node")


def _check_detection(detection, sequence, browser, role: str) -> None:
    if not isinstance(detection, DetectionResult):
        raise DetectionError(f"{role} detection: expected a DetectionResult, got {type(detection).__name__}")
    if detection.n_frames != sequence.n_frames:
        raise SequenceError(
            f"{role} recording {browser.GetName()!r} has {sequence.n_frames} frames but the given detection has "
            f"{detection.n_frames}; detect this recording again"
        )


def _format_date(date: datetime) -> str:
    return date.strftime("%Y.%m.%d %H:%M:%S")


def write_image_to_probe(scene, result: CalibrationResult, node=None, *, mode: str = "batch", source: str = "",
                         config: str = "", date: datetime | None = None):
    """Write ImageToProbe (matrix to parent) and its provenance attributes into a transform node.

    Parameters
    ----------
    scene : vtkMRMLScene
    result : CalibrationResult
    node : vtkMRMLLinearTransformNode, optional
        Default: a new node named ``ImageToProbe`` (made unique).
    mode : {"batch", "live"}
    source, config : str
        Recorded as ``NWireCalibration.Source`` / ``.Config``.
    date : datetime, optional
        Default: now.

    Returns
    -------
    vtkMRMLLinearTransformNode
    """
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName("ImageToProbe"))
    date = date or datetime.now()
    stamp = _format_date(date)
    was = node.StartModify()
    try:
        node.SetMatrixTransformToParent(mrml.matrix_to_vtk(result.image_to_probe))
        error = result.error_mm
        node.SetAttribute(mrml.ATTR_TRANSFORM_NAME, "ImageToProbe")
        node.SetAttribute(ATTR_ERROR_MM, repr(float(error)) if math.isfinite(error) else "nan")
        node.SetAttribute(ATTR_DATE, stamp)
        node.SetAttribute(ATTR_SOLVER, result.solver)
        node.SetAttribute(ATTR_PHANTOM_POSE, result.phantom_pose)
        node.SetAttribute(ATTR_PHANTOM, result.phantom_name)
        node.SetAttribute(ATTR_MODE, mode)
        node.SetAttribute(ATTR_SOURCE, source)
        node.SetAttribute(ATTR_CONFIG, str(config or ""))
        node.SetAttribute(ATTR_PLUS_TRANSFORM, result.plus_transform_element(date=stamp))
        node.SetAttribute(ATTR_RESULT, json.dumps(result.to_dict()))
        node.SetDescription(str(result))
    finally:
        node.EndModify(was)
    return node


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------


def accuracy_columns(result: CalibrationResult) -> list:
    """The accuracy table: ``[(name, values, unit), ...]``, one row per data set.

    Rows: ``calibration`` and (when validated) ``validation``. Columns: data set, frames,
    segmented, used, PLUS 3D error best 95 % / all / max (mm), 2D error (px).
    """
    sets = [("calibration", result.calibration)]
    if result.validation is not None:
        sets.append(("validation", result.validation))
    return [
        (COL_DATA_SET, [name for name, _ in sets], ""),
        (COL_FRAMES, [m.frames_total for _, m in sets], ""),
        (COL_SEGMENTED, [m.frames_segmented for _, m in sets], ""),
        (COL_USED, [m.frames_used for _, m in sets], ""),
        (COL_ERROR3D_TRIMMED, [m.error3d_trimmed95_mean_mm for _, m in sets], "mm"),
        (COL_ERROR3D_MEAN, [m.error3d_mean_mm for _, m in sets], "mm"),
        (COL_ERROR3D_MAX, [m.error3d_max_mm for _, m in sets], "mm"),
        (COL_ERROR2D, [m.error2d_mean_px for _, m in sets], "px"),
    ]


def _frame_errors(result: CalibrationResult, phantom, detection, poses) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: mean PLUS 3D error over the N patterns (mm), mean 2D error length over the wires (px)."""
    pts = detection.points_px
    e3 = reprojection_errors_3d(pts, poses, result.image_to_probe, result.phantom_to_reference, phantom)
    e2 = np.linalg.norm(
        reprojection_errors_2d(pts, poses, result.image_to_probe, result.phantom_to_reference, phantom), axis=-1)
    return _row_mean(e3), _row_mean(e2)


def _row_mean(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    out = np.full(values.shape[0], np.nan)
    out[count > 0] = total[count > 0] / count[count > 0]
    return out


def residual_columns(result: CalibrationResult, setup: CalibrationSetup, calibration_detection, calibration_poses,
                     validation_detection=None, validation_poses=None) -> list:
    """The per-frame residuals table: ``[(name, values, unit), ...]``, one row per frame index.

    Columns: frame index, calibration 3D / 2D error, and (when validated) validation 3D / 2D
    error. The 3D error of a frame is the mean PLUS 3D reprojection error of its N patterns
    (mm); the 2D error the mean length of its wires' 2D reprojection errors (px). NaN where a
    frame was not segmented or not tracked, and past the end of the shorter recording.
    """
    c3, c2 = _frame_errors(result, setup.phantom, calibration_detection, calibration_poses)
    n = c3.size
    v3 = v2 = None
    if validation_detection is not None:
        v3, v2 = _frame_errors(result, setup.phantom, validation_detection, validation_poses)
        n = max(n, v3.size)

    def pad(a):
        out = np.full(n, np.nan)
        out[: a.size] = a
        return out

    columns = [(COL_FRAME, list(range(n)), ""), (COL_CAL_ERROR3D, pad(c3), "mm"), (COL_CAL_ERROR2D, pad(c2), "px")]
    if v3 is not None:
        columns += [(COL_VAL_ERROR3D, pad(v3), "mm"), (COL_VAL_ERROR2D, pad(v2), "px")]
    return columns


_STAGE_WORDS = {"single-frame": "alone", "tracked": "from the tracked motion",
                "neighbours": "from the neighbouring frames"}


def _detection_sets(calibration_detection, validation_detection):
    sets = [("calibration", calibration_detection)]
    if validation_detection is not None:
        sets.append(("validation", validation_detection))
    for name, det in sets:
        if not isinstance(det, DetectionResult):
            raise DetectionError(f"{name} detection: expected a DetectionResult, got {type(det).__name__}")
    return sets


def _reason_meaning(code: str) -> str:
    from .labeling import REJECTION_REASONS

    return REJECTION_REASONS.get(code, "the detector gave no reason")


def rejection_columns(calibration_detection: DetectionResult, validation_detection: DetectionResult | None = None
                      ) -> list:
    """The rejections table: ``[(name, values, unit), ...]``, one row per frame that did not count.

    Rows, calibration frames first, by frame index: every frame that was not detected
    (:data:`STATUS_REJECTED` in the calibration recording, :data:`STATUS_DROPPED` in the
    validation recording) with its reason code (:data:`~.labeling.REJECTION_REASONS`, ``"unstated"``
    when the detector gave none) and text, and every frame whose single-frame labelling the
    sequence stage refused and another stage then labelled (:data:`STATUS_RELABELLED`, code
    ``motion-inconsistent``). Columns: data set, frame index (0-based, as in the browser),
    status, reason code, reason.
    """
    rows = []
    for name, det in _detection_sets(calibration_detection, validation_detection):
        status = STATUS_REJECTED if name == "calibration" else STATUS_DROPPED
        refused = set(det.refused_frames())
        for i in range(det.n_frames):
            if not det.ok[i]:
                code = det.reason_code(i)
                rows.append((name, i, status, code, det.reasons[i] or _reason_meaning(code)))
            elif i in refused:
                stage = (det.stages[i] if det.stages is not None else "") or "single-frame"
                rows.append((name, i, STATUS_RELABELLED, "motion-inconsistent",
                             f"its single-frame labelling lay far from where the tracked motion and the neighbouring "
                             f"frames put the dots; labelled {_STAGE_WORDS.get(stage, stage)} instead"))
    return [
        (COL_DATA_SET, np.array([r[0] for r in rows], dtype=str), ""),
        (COL_FRAME, [r[1] for r in rows], ""),
        (COL_STATUS, np.array([r[2] for r in rows], dtype=str), ""),
        (COL_REASON_CODE, np.array([r[3] for r in rows], dtype=str), ""),
        (COL_REASON, np.array([r[4] for r in rows], dtype=str), ""),
    ]


def detection_report_text(calibration_detection: DetectionResult,
                          validation_detection: DetectionResult | None = None) -> str:
    """Why frames did not count, per recording: detected frames per stage, refused, rejected by reason.

    One paragraph per recording, e.g. ``"Calibration recording: 28 of 30 frames detected (25
    alone, 2 from the tracked motion, 1 from the neighbouring frames). The sequence stage refused
    1 single-frame labelling as motion-inconsistent (frame 12). 2 frames rejected: 1
    pattern-missing, 1 3d-check."``, then what each reason code present means. The frames and
    their reasons are in :func:`rejection_columns`.
    """
    paragraphs = []
    codes = []
    for name, det in _detection_sets(calibration_detection, validation_detection):
        counts = det.stage_counts()
        stages = ", ".join(f"{n} {_STAGE_WORDS.get(stage, stage)}" for stage, n in counts.items() if n)
        text = f"{name.capitalize()} recording: {det.frames_detected} of {det.n_frames} frames detected"
        text += f" ({stages})." if stages else "."
        summary = det.sequence or {}
        if det.sequence is None or not summary.get("enabled", True):
            text += " The sequence stage did not run (every frame labelled alone)."
        else:
            model = summary.get("tracked_model") or {}
            if not model.get("used") and model.get("reason"):
                text += f" No tracked prediction: {model['reason']}."
            refused = det.refused_frames()
            if refused:
                shown = ", ".join(str(i) for i in refused[:10]) + (", ..." if len(refused) > 10 else "")
                text += (f" The sequence stage refused {len(refused)} single-frame labelling"
                         f"{'s' if len(refused) != 1 else ''} as motion-inconsistent "
                         f"(frame{'s' if len(refused) != 1 else ''} {shown}).")
        rejected = det.rejection_counts()
        n_rejected = det.n_frames - det.frames_detected
        if n_rejected:
            verb = "rejected" if name == "calibration" else "dropped"
            text += (f" {n_rejected} frame{'s' if n_rejected != 1 else ''} {verb}: "
                     + ", ".join(f"{n} {code}" for code, n in rejected.items()) + ".")
            if name == "validation":
                text += " The validation errors are over the other frames."
            codes.extend(c for c in rejected if c not in codes)
        else:
            text += " No frame " + ("rejected." if name == "calibration" else "dropped.")
        paragraphs.append(text)
    if any(det.refused_frames() for _, det in _detection_sets(calibration_detection, validation_detection)):
        if "motion-inconsistent" not in codes:
            codes.append("motion-inconsistent")
    if codes:
        paragraphs.append("Reasons: " + "; ".join(f"{code}: {_reason_meaning(code)}" for code in codes) + ".")
    return "\n".join(paragraphs)


def write_detection_report(table_node, calibration_detection: DetectionResult,
                           validation_detection: DetectionResult | None = None) -> str:
    """Fill the rejections table (:func:`rejection_columns`) and store the report text on it.

    The text (:func:`detection_report_text`) goes into the table's
    :data:`ATTR_DETECTION_REPORT` attribute, so a saved scene keeps both.

    Returns
    -------
    str
        The report text.
    """
    text = detection_report_text(calibration_detection, validation_detection)
    fill_table(table_node, rejection_columns(calibration_detection, validation_detection))
    table_node.SetAttribute(ATTR_DETECTION_REPORT, text)
    return text


def _table_node(scene, node, name: str):
    if node is None:
        return scene.AddNewNodeByClass(_TABLE_CLASS, scene.GenerateUniqueName(name))
    if not node.IsA(_TABLE_CLASS):
        raise CalibrationError(f"output table: expected a vtkMRMLTableNode, got {node.GetClassName()}")
    return node


def fill_table(table_node, columns) -> None:
    """Replace the columns of a table node.

    Parameters
    ----------
    table_node : vtkMRMLTableNode
    columns : list of (name, values, unit)
        Equal-length columns; values of str (or a numpy str array, even empty) -> string
        column, of int -> int column, else double (NaN kept).
    """
    if table_node is None or not table_node.IsA(_TABLE_CLASS):
        got = "None" if table_node is None else table_node.GetClassName()
        raise CalibrationError(f"output table: expected a vtkMRMLTableNode, got {got}")
    lengths = {len(values) for _, values, _ in columns}
    if len(lengths) > 1:
        raise ValueError(f"fill_table: columns have different lengths {sorted(lengths)}")
    was = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        for name, values, unit in columns:
            is_text = isinstance(values, np.ndarray) and values.dtype.kind in "US"  # also when empty
            values = list(values)
            if is_text or (values and all(isinstance(v, str) for v in values)):
                array = vtk.vtkStringArray()
                for v in values:
                    array.InsertNextValue(v)
            elif values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                array = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.int32), deep=True,
                                                   array_type=vtk.VTK_INT)
            else:
                array = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.float64), deep=True,
                                                   array_type=vtk.VTK_DOUBLE)
            array.SetName(name)
            table_node.AddColumn(array)
            if unit:
                table_node.SetColumnUnitLabel(name, unit)
        table_node.SetLocked(True)
        table_node.Modified()
    finally:
        table_node.EndModify(was)


def plot_table(table_node, x_column: str, y_columns, *, chart_node=None, title: str = "", y_title: str = "",
               lines: bool = True):
    """A plot chart of table columns (one series per y column), reusing the chart's series.

    Parameters
    ----------
    table_node : vtkMRMLTableNode
    x_column : str
    y_columns : list of str
    chart_node : vtkMRMLPlotChartNode, optional
        Its series are replaced; default: a new chart ``<table>Plot``.
    title, y_title : str
    lines : bool
        Lines with markers (convergence) or markers only (residuals).

    Returns
    -------
    vtkMRMLPlotChartNode
        Show it with ``slicer.modules.plots.logic().ShowChartInLayout(chart)``.
    """
    scene = table_node.GetScene()
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass(_CHART_CLASS, scene.GenerateUniqueName(f"{table_node.GetName()}Plot"))
    elif not chart_node.IsA(_CHART_CLASS):
        raise CalibrationError(f"plot: expected a vtkMRMLPlotChartNode, got {chart_node.GetClassName()}")
    old = [chart_node.GetNthPlotSeriesNode(i) for i in range(chart_node.GetNumberOfPlotSeriesNodes())]
    chart_node.RemoveAllPlotSeriesNodeIDs()
    for series in old:
        if series is not None and series.GetAttribute(ATTR_ROLE) == "Series":
            scene.RemoveNode(series)
    for y in y_columns:
        series = scene.AddNewNodeByClass(_SERIES_CLASS, scene.GenerateUniqueName(y))
        series.SetAttribute(ATTR_ROLE, "Series")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(x_column)
        series.SetYColumnName(y)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetLineStyle(series.LineStyleSolid if lines else series.LineStyleNone)
        series.SetUniqueColor()
        chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    chart_node.SetTitle(title)
    chart_node.SetXAxisTitle(x_column)
    chart_node.SetYAxisTitle(y_title)
    return chart_node


# --------------------------------------------------------------------------------------------
# PlusServer
# --------------------------------------------------------------------------------------------


def push_calibration_node(image_to_probe_node, *, host: str = "127.0.0.1", port: int = 18944,
                          save_config: bool = True, config_filename=None, timeout_s: float = 5.0):
    """Send the calibration held by a transform node to a running PlusServer.

    :func:`~.plus_remote.push_calibration` with the node's matrix to parent (pixels -> Probe
    mm), its PLUS name (``FreehandUS.TransformName`` or node name, default ``ImageToProbe``),
    and the error and date the calibration wrote (``NWireCalibration.ErrorMm``, ``.Date``).

    Returns
    -------
    PushResult

    Raises
    ------
    TransformError
        Not a linear transform node, or a singular matrix.
    CalibrationError
        The node holds no calibration (none of the ``NWireCalibration.*`` attributes: pushing
        an identity by mistake would break the server's image placement).
    PlusRemoteError
        The server cannot be reached or refuses (see :func:`~.plus_remote.push_calibration`).
    """
    from .plus_remote import push_calibration

    name = None if image_to_probe_node is None else (_plus_name(image_to_probe_node) or "ImageToProbe")
    matrix = matrix_of_transform_node(image_to_probe_node, name or "ImageToProbe")
    if image_to_probe_node.GetAttribute(ATTR_RESULT) is None and image_to_probe_node.GetAttribute(ATTR_DATE) is None:
        raise CalibrationError(
            f"transform {image_to_probe_node.GetName()!r} holds no N-wire calibration (calibrate first, or select "
            "the calibration's transform)"
        )
    error = image_to_probe_node.GetAttribute(ATTR_ERROR_MM)
    try:
        error_mm = float(error) if error not in (None, "") else None
    except ValueError:
        error_mm = None
    return push_calibration(matrix, host=host, port=port, transform_name=name, error_mm=error_mm,
                            date=image_to_probe_node.GetAttribute(ATTR_DATE), save_config=save_config,
                            config_filename=config_filename, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------
# Live calibration
# --------------------------------------------------------------------------------------------


def matrix_of_transform_node(node, name: str) -> np.ndarray:
    """The matrix a named linear transform node holds (its matrix to parent), checked.

    Parameters
    ----------
    node : vtkMRMLTransformNode
    name : str
        What it is (``"PhantomToReference"``), for messages.

    Returns
    -------
    (4, 4) float64

    Raises
    ------
    TransformError
        Not a transform node, not linear, or not finite / singular.
    """
    if node is None or not node.IsA("vtkMRMLTransformNode"):
        got = "None" if node is None else node.GetClassName()
        raise TransformError(f"{name}: expected a linear transform node, got {got}")
    if not node.IsLinear():
        raise TransformError(f"{name} node {node.GetName()!r} holds a non-linear transform")
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    matrix = mrml.vtk_to_matrix(m)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise TransformError(f"{name} node {node.GetName()!r}: matrix is singular or not finite")
    return matrix


def _transform_valid(node) -> bool:
    flag = node.GetAttribute(mrml.ATTR_TRANSFORM_VALID)
    return flag is None or flag.strip().lower() not in _INVALID_TEXT


def _plus_name(node) -> str | None:
    """``"ProbeToReference"`` from the attribute or the node name (``...Transform`` suffix dropped)."""
    for text in (node.GetAttribute(mrml.ATTR_TRANSFORM_NAME), node.GetName()):
        if not text:
            continue
        text = text[: -len("Transform")] if text.endswith("Transform") else text
        try:
            split_transform_name(text)
        except TransformError:
            continue
        return text
    return None


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
    image = image_node.GetImageData()
    name = image_node.GetName()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise SequenceError(f"live image {name!r} holds no image data")
    n_i, n_j, n_k = image.GetDimensions()
    if n_k != 1:
        raise SequenceError(f"live image {name!r}: expected a 2D frame (one slice), got {n_k} slices")
    scalars = image.GetPointData().GetScalars()
    n_c = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars).reshape((n_j, n_i, n_c))
    if n_c == 1:
        frame = np.array(arr[..., 0], copy=True)
    else:
        frame = arr[..., : min(n_c, 3)].astype(np.float32).mean(axis=2)
    if frame.dtype not in (np.uint8, np.float32):
        frame = frame.astype(np.float32)
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

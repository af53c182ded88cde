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

Modules
-------
This module reads the scene (:func:`make_setup`, :func:`sequence_from_browser`) and runs the
detection and the batch calibration (:func:`detect_browser`, :func:`calibrate_browsers`); the
rest lives beside it and is re-exported here, so ``mrml_calibration.X`` keeps working:
:mod:`.mrml_calibration_common` (the ``ATTR_*``/``REF_*``/``COL_*`` names, transform-node
readers), :mod:`.mrml_calibration_overlay` (the dots overlay), :mod:`.mrml_calibration_results`
(ImageToProbe node, tables, plots, PlusServer push) and :mod:`.mrml_live_calibration`
(:class:`LiveCalibration`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from FreehandUSLib import jobs, mrml
from FreehandUSLib.errors import SequenceError, TransformError
from FreehandUSLib.io.plus_config import read_plus_config

from .errors import CalibrationError, DetectionError, PhantomDefinitionError
from .mrml_calibration_common import (
    ATTR_CONFIG,
    ATTR_DATE,
    ATTR_DETECTION,
    ATTR_DETECTION_REPORT,
    ATTR_ERROR_MM,
    ATTR_MODE,
    ATTR_PHANTOM,
    ATTR_PHANTOM_POSE,
    ATTR_PLUS_TRANSFORM,
    ATTR_RESULT,
    ATTR_ROLE,
    ATTR_SOLVER,
    ATTR_SOURCE,
    COL_CAL_ERROR2D,
    COL_CAL_ERROR3D,
    COL_CHANGE,
    COL_DATA_SET,
    COL_DIVERSITY,
    COL_ERROR2D,
    COL_ERROR3D_MAX,
    COL_ERROR3D_MEAN,
    COL_ERROR3D_TRIMMED,
    COL_FRAME,
    COL_FRAMES,
    COL_KEYFRAMES,
    COL_REASON,
    COL_REASON_CODE,
    COL_RESIDUAL,
    COL_SEGMENTED,
    COL_STATUS,
    COL_USED,
    COL_VAL_ERROR2D,
    COL_VAL_ERROR3D,
    REF_ACCURACY_TABLE,
    REF_CALIBRATION_BROWSER,
    REF_CONVERGENCE_TABLE,
    REF_LIVE_IMAGE,
    REF_REJECTIONS_TABLE,
    REF_RESIDUALS_TABLE,
    REF_VALIDATION_BROWSER,
    ROLE_DOTS,
    STATUS_DROPPED,
    STATUS_REJECTED,
    STATUS_RELABELLED,
    _CHART_CLASS,
    _TABLE_CLASS,
    _check_browser,
    _plus_name,
    _with_registration,
    matrix_of_transform_node,
)
from .mrml_calibration_overlay import (
    _browser_sequences,
    _check_markups,
    _ijk_to_ras,
    _image_sequence,
    dots_to_markups,
    image_proxy_node,
)
from .mrml_calibration_results import (
    _table_node,
    accuracy_columns,
    detection_report_text,
    fill_table,
    plot_table,
    push_calibration_node,
    rejection_columns,
    residual_columns,
    write_detection_report,
    write_image_to_probe,
)
from .mrml_live_calibration import LiveCalibration, frame_from_image_node, probe_to_reference_of_image_node
from .phantom import builtin_phantom_names
from .pipeline import CalibrationSetup, calibrate, detect_sequence, load_setup, probe_to_reference
from .results import CalibrationResult, DetectionResult

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

"""Names shared by the MRML side of N-wire calibration, and the transform-node readers.

The node attributes (``ATTR_*``), node references (``REF_*``), table columns (``COL_*``) and
rejection statuses (``STATUS_*``) that :mod:`.mrml_calibration` writes and documents (see its
"Provenance" section), and the readers of named linear transform nodes
(:func:`matrix_of_transform_node`) that the recordings, the PlusServer push and the live
calibration share. The lowest of the ``mrml_calibration*`` modules: it imports none of them.
Reaches ``slicer`` only through :mod:`FreehandUSLib.mrml`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import vtk

from FreehandUSLib import mrml
from FreehandUSLib.errors import SequenceError, TransformError
from FreehandUSLib.transforms import split_transform_name

from .errors import DetectionError
from .pipeline import CalibrationSetup

__all__ = [
    "matrix_of_transform_node",
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


def _check_browser(browser_node, role: str) -> None:
    if browser_node is None:
        raise SequenceError(f"no {role} recording: select a sequence browser (vtkMRMLSequenceBrowserNode)")
    if not browser_node.IsA(_BROWSER_CLASS):
        raise SequenceError(
            f"{role} recording {browser_node.GetName()!r} is a {browser_node.GetClassName()}; expected a "
            "vtkMRMLSequenceBrowserNode (for a live image node use live calibration)"
        )


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

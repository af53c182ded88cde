"""Writing an N-wire calibration into MRML: the ImageToProbe node, tables, plots, PlusServer.

:func:`write_image_to_probe` (the matrix and its provenance attributes), the columns of the
accuracy, residuals and rejections tables (:func:`accuracy_columns`, :func:`residual_columns`,
:func:`rejection_columns`), the report of the frames that did not count
(:func:`detection_report_text`, :func:`write_detection_report`), :func:`fill_table`,
:func:`plot_table`, and :func:`push_calibration_node` (a calibration node to a running
PlusServer). :func:`.mrml_calibration.calibrate_browsers` and :class:`.mrml_live_calibration.LiveCalibration`
write through these; the attribute and column names are in :mod:`.mrml_calibration_common`.
Imports only that one of the ``mrml_calibration*`` modules.
"""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import vtk
from vtk.util import numpy_support

from FreehandUSLib import mrml

from .errors import CalibrationError, DetectionError
from .metrics import reprojection_errors_2d, reprojection_errors_3d
from .mrml_calibration_common import (
    ATTR_CONFIG,
    ATTR_DATE,
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
    COL_DATA_SET,
    COL_ERROR2D,
    COL_ERROR3D_MAX,
    COL_ERROR3D_MEAN,
    COL_ERROR3D_TRIMMED,
    COL_FRAME,
    COL_FRAMES,
    COL_REASON,
    COL_REASON_CODE,
    COL_SEGMENTED,
    COL_STATUS,
    COL_USED,
    COL_VAL_ERROR2D,
    COL_VAL_ERROR3D,
    STATUS_DROPPED,
    STATUS_REJECTED,
    STATUS_RELABELLED,
    _CHART_CLASS,
    _SERIES_CLASS,
    _TABLE_CLASS,
    _plus_name,
    matrix_of_transform_node,
)
from .pipeline import CalibrationSetup
from .results import CalibrationResult, DetectionResult

__all__ = [
    "write_image_to_probe",
    "accuracy_columns",
    "residual_columns",
    "rejection_columns",
    "detection_report_text",
    "write_detection_report",
    "fill_table",
    "plot_table",
    "push_calibration_node",
]


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

"""The detected dots as a markups overlay that follows a sequence browser.

:func:`dots_to_markups` (what :func:`.mrml_calibration.detect_browser` calls with its
``markups_node``) and :func:`image_proxy_node`, with the helpers that find a browser's image
sequence and map pixels to RAS, which the recordings and the live calibration use too. How the
overlay follows the browser, and its coordinates, are described in :mod:`.mrml_calibration`
("The dots overlay"). Imports only :mod:`.mrml_calibration_common` of the ``mrml_calibration*``
modules.
"""

from __future__ import annotations

import json

import numpy as np
import vtk

from FreehandUSLib import mrml
from FreehandUSLib.errors import SequenceError

from .errors import DetectionError
from .mrml_calibration_common import ATTR_DETECTION, ATTR_ROLE, ROLE_DOTS, _MARKUPS_CLASS, _check_browser
from .results import DetectionResult

__all__ = [
    "dots_to_markups",
    "image_proxy_node",
]


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

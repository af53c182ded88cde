"""Live N-wire calibration from a colour (vector volume) image node, as PlusServer may stream RGB.

SlicerOpenIGTLink puts an RGB IMAGE message into a ``vtkMRMLVectorVolumeNode`` (a subclass of
``vtkMRMLScalarVolumeNode``). The N-Wire Calibration panel must offer such nodes as its live image
and the calibration must take their frames in grey (the mean of the colours).

The panel's selector: ``connectGui`` sets its ``nodeTypes`` from the parameter's annotation
(``liveImage: vtkMRMLScalarVolumeNode``), so which volumes it lists follows from that and the
.ui's ``showChildNodeTypes`` / ``hideChildNodeTypes``, evaluated here with qMRMLNodeComboBox's
rule on the real MRML classes (slicer-core).
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from FreehandUSLib import mrml  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from NWireCalibrationLib.keyframes import KeyframeSettings  # noqa: E402
from NWireCalibrationLib.metrics import target_errors_mm  # noqa: E402
from NWireCalibrationLib.pipeline import probe_to_reference  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from nwire_synthetic import setup_for, small_simulation  # noqa: E402

pytestmark = pytest.mark.mrml

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_FILE = REPO_ROOT / "NWireCalibration" / "Resources" / "UI" / "NWireCalibration.ui"


def _strings(widget: ET.Element, name: str) -> list[str]:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return [s.text for s in prop.iter("string")]
    return []


def _bool(widget: ET.Element, name: str, default: bool) -> bool:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop.findtext("bool") == "true"
    return default


def _parameter_class(name: str) -> str:
    tree = ast.parse((REPO_ROOT / "NWireCalibration" / "NWireCalibration.py").read_text())
    parameters = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NWireCalibrationParameterNode")
    annotation = next(n.annotation for n in parameters.body if isinstance(n, ast.AnnAssign) and n.target.id == name)
    return ast.unparse(annotation)


def listed_by_selector(widget: ET.Element, node_types: list[str], node_class: str) -> bool:
    """Whether a qMRMLNodeComboBox with these properties lists a node of ``node_class``.

    A node is listed when its class is one of ``nodeTypes``, or when ``showChildNodeTypes`` is on
    (the default), it derives from one of them and is not (a subclass of) a ``hideChildNodeTypes``.
    """
    cls = getattr(slicer, node_class)
    if node_class in node_types:
        return True
    if not _bool(widget, "showChildNodeTypes", True):
        return False
    if not any(issubclass(cls, getattr(slicer, t)) for t in node_types):
        return False
    return not any(issubclass(cls, getattr(slicer, t)) for t in _strings(widget, "hideChildNodeTypes"))


def _live_image_selector() -> ET.Element:
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        if any(p.get("name") == "SlicerParameterName" and p.findtext("string") == "liveImage" for p in widget):
            return widget
    raise AssertionError("no widget bound to liveImage")


@pytest.mark.parametrize(
    "node_class, listed",
    [
        ("vtkMRMLScalarVolumeNode", True),
        ("vtkMRMLVectorVolumeNode", True),  # RGB IMAGE messages
        ("vtkMRMLStreamingVolumeNode", True),  # compressed video (VIDEO messages)
        ("vtkMRMLLabelMapVolumeNode", False),
        ("vtkMRMLDiffusionWeightedVolumeNode", False),
        ("vtkMRMLDiffusionTensorVolumeNode", False),
    ],
)
def test_live_image_selector_offers_colour_volumes(node_class, listed):
    widget = _live_image_selector()
    node_types = [_parameter_class("liveImage")]  # connectGui replaces the .ui's nodeTypes with these
    assert node_types == ["vtkMRMLScalarVolumeNode"]
    assert listed_by_selector(widget, node_types, node_class) is listed


def test_selector_rule_needs_show_child_node_types():
    widget = ET.fromstring(
        '<widget class="qMRMLNodeComboBox"><property name="showChildNodeTypes"><bool>false</bool></property></widget>'
    )
    assert not listed_by_selector(widget, ["vtkMRMLScalarVolumeNode"], "vtkMRMLVectorVolumeNode")
    assert listed_by_selector(widget, ["vtkMRMLScalarVolumeNode"], "vtkMRMLScalarVolumeNode")


def _push_rgb(image_node, rgb) -> None:
    """New RGB pixels as SlicerOpenIGTLink writes them (new image data, then one Modified)."""
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = rgb.reshape(-1, 3)
    was = image_node.StartModify()
    image_node.SetAndObserveImageData(image)
    image_node.EndModify(was)


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def test_live_calibration_from_a_colour_image_node(scene):
    sim = small_simulation("linear", 50.0, n_frames=60, seed=4)
    poses = probe_to_reference(sim.sequence)
    probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProbeToReference")
    image = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Image_Image")
    image.SetAndObserveTransformNodeID(probe.GetID())
    live = mc.LiveCalibration(setup_for(sim), settings=KeyframeSettings(min_keyframes=15, min_pose_diversity_deg=5.0))
    assert live.observe(image) is live
    rng = np.random.default_rng(0)
    used = 0
    for i in range(60):
        grey = sim.sequence.frames[i].astype(np.int16)
        # Colour whose mean is the grey frame: a tint added to R and taken from B.
        tint = rng.integers(0, 4, size=grey.shape)
        tint = np.minimum(tint, np.minimum(255 - grey, grey))
        rgb = np.stack([grey + tint, grey, grey - tint], axis=-1).astype(np.uint8)
        probe.SetMatrixTransformToParent(mrml.matrix_to_vtk(poses[i]))
        _push_rgb(image, rgb)
        used = i + 1
        frame, _ = mc.frame_from_image_node(image)
        np.testing.assert_allclose(frame, sim.sequence.frames[i], atol=1e-4)
        if live.converged:
            break
    status = live.status()
    assert live.converged and status["frames_detected"] == used and status["errors"] == 0
    assert target_errors_mm(live.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean() < 0.3
    assert live.stop() is not None

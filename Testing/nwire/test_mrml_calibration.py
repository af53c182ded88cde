"""N-wire calibration through MRML (NWireCalibrationLib.mrml_calibration) with the real slicer-core classes.

The "N-Wire Calibration" module's Logic is thin glue over these functions, so this is where the
Logic is tested headless: simulated recordings go into sequence browsers (as
``FreehandUSLib.mrml.sequence_to_browser`` makes them), ImageToProbe comes out in a transform
node and must equal :func:`NWireCalibrationLib.pipeline.calibrate` on the same frames; tables,
plot, dots overlay and live keyframe calibration are checked on the nodes.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402  (slicer-core pins it)
from vtk.util import numpy_support  # noqa: E402

from FreehandUSLib import TrackedSequence, mrml  # noqa: E402
from FreehandUSLib.errors import ConfigError, FreehandUSError, SequenceError, TransformError  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from NWireCalibrationLib.errors import CalibrationError, DetectionError, PhantomDefinitionError  # noqa: E402
from NWireCalibrationLib.keyframes import KeyframeSettings  # noqa: E402
from NWireCalibrationLib.metrics import target_errors_mm  # noqa: E402
from NWireCalibrationLib.pipeline import CalibrationSetup, calibrate, probe_to_reference  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from nwire_synthetic import FCAL2_CONFIG, FCAL2_RESULTS, setup_for, small_simulation  # noqa: E402
from testdata import plus_file  # noqa: E402

pytestmark = pytest.mark.mrml

RANSAC = {"ransac_iterations": 200}


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def _cal():
    return small_simulation("linear", 50.0, n_frames=30)


def _val():
    return small_simulation("linear", 50.0, n_frames=12, seed=9)


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    return mrml.vtk_to_matrix(m)


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml.vtk_to_matrix(m)


def _column(table_node, name) -> np.ndarray:
    array = table_node.GetTable().GetColumnByName(name)
    assert array is not None, f"column {name!r} missing"
    if isinstance(array, vtk.vtkStringArray):
        return np.array([array.GetValue(i) for i in range(array.GetNumberOfValues())])
    return numpy_support.vtk_to_numpy(array).copy()


def _control_points(markups) -> np.ndarray:
    out = np.zeros((markups.GetNumberOfControlPoints(), 3))
    for i in range(out.shape[0]):
        markups.GetNthControlPointPosition(i, out[i])
    return out


def _plus_matrix(element: str) -> np.ndarray:
    return np.array(re.search(r'Matrix="([^"]*)"', element).group(1).split(), dtype=float).reshape(4, 4)


# -- calibration from browsers ----------------------------------------------------------------


def test_calibrate_browsers_equals_the_pipeline_and_fills_the_nodes(scene):
    sim, val = _cal(), _val()
    setup = setup_for(sim)
    cal_browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    val_browser = mrml.sequence_to_browser(scene, val.sequence, browser_name="Validation")
    calls = []
    out = mc.calibrate_browsers(cal_browser, val_browser, setup, solver="ransac-lm",
                                progress=lambda d, t: calls.append((d, t)), **RANSAC)
    expected = calibrate(sim.sequence, val.sequence, setup, solver="ransac-lm", **RANSAC)
    res = out.result
    np.testing.assert_allclose(res.image_to_probe, expected.image_to_probe, rtol=0, atol=1e-12)
    assert target_errors_mm(res.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean() < 0.3
    reads = calls[:calls.index((1, 42))]  # the recordings are read first, the bar at its start
    assert reads and set(reads) == {(0, 1)}
    assert calls[-1] == (42, 42) and len(calls) - len(reads) == 42

    node = out.image_to_probe_node
    assert node.IsA("vtkMRMLLinearTransformNode") and node.GetName() == "ImageToProbe"
    np.testing.assert_allclose(_matrix(node), res.image_to_probe, rtol=0, atol=1e-12)
    assert node.GetAttribute(mrml.ATTR_TRANSFORM_NAME) == "ImageToProbe"
    assert float(node.GetAttribute(mc.ATTR_ERROR_MM)) == pytest.approx(res.validation.error3d_trimmed95_mean_mm)
    assert node.GetAttribute(mc.ATTR_SOLVER) == "ransac-lm" and node.GetAttribute(mc.ATTR_MODE) == "batch"
    assert node.GetAttribute(mc.ATTR_PHANTOM_POSE) == "known"
    assert node.GetAttribute(mc.ATTR_SOURCE) == "Calibration, Validation"
    assert re.fullmatch(r"\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d", node.GetAttribute(mc.ATTR_DATE))
    element = node.GetAttribute(mc.ATTR_PLUS_TRANSFORM)
    assert element.startswith('<Transform From="Image" To="Probe"')
    assert f'Date="{node.GetAttribute(mc.ATTR_DATE)}"' in element
    np.testing.assert_array_equal(_plus_matrix(element), res.image_to_probe)
    stored = json.loads(node.GetAttribute(mc.ATTR_RESULT))
    np.testing.assert_allclose(stored["ImageToProbe"], res.image_to_probe, rtol=0, atol=0)
    assert node.GetNodeReference(mc.REF_CALIBRATION_BROWSER) is cal_browser
    assert node.GetNodeReference(mc.REF_VALIDATION_BROWSER) is val_browser

    acc = out.accuracy_table_node
    assert node.GetNodeReference(mc.REF_ACCURACY_TABLE) is acc and acc.GetNumberOfRows() == 2
    assert list(_column(acc, mc.COL_DATA_SET)) == ["calibration", "validation"]
    np.testing.assert_array_equal(_column(acc, mc.COL_FRAMES), [30, 12])
    np.testing.assert_array_equal(_column(acc, mc.COL_SEGMENTED), [30, 12])
    np.testing.assert_allclose(_column(acc, mc.COL_ERROR3D_TRIMMED),
                               [res.calibration.error3d_trimmed95_mean_mm, res.validation.error3d_trimmed95_mean_mm])
    np.testing.assert_allclose(_column(acc, mc.COL_ERROR3D_MAX), [res.calibration.error3d_max_mm,
                                                                   res.validation.error3d_max_mm])
    assert acc.GetColumnUnitLabel(mc.COL_ERROR3D_MEAN) == "mm"

    resid = out.residuals_table_node
    assert resid.GetNumberOfRows() == 30
    np.testing.assert_array_equal(_column(resid, mc.COL_FRAME), np.arange(30))
    cal3d, val3d = _column(resid, mc.COL_CAL_ERROR3D), _column(resid, mc.COL_VAL_ERROR3D)
    # Every frame has all 3 N patterns: the mean of the frame means is PLUS's untrimmed mean.
    assert cal3d.mean() == pytest.approx(res.calibration.error3d_mean_mm)
    assert np.isnan(val3d[12:]).all() and np.nanmean(val3d) == pytest.approx(res.validation.error3d_mean_mm)
    assert np.nanmax(cal3d) <= res.calibration.error3d_max_mm + 1e-9
    assert np.all(_column(resid, mc.COL_CAL_ERROR2D) > 0)

    chart = out.plot_chart_node
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == [mc.COL_CAL_ERROR3D, mc.COL_VAL_ERROR3D]
    assert all(s.GetTableNode() is resid and s.GetXColumnName() == mc.COL_FRAME for s in series)
    assert str(out) == str(res)


def test_given_nodes_are_reused_and_the_registration_node_is_used(scene):
    sim = _cal()
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    no_registration = CalibrationSetup(sim.phantom, None, setup_for(sim).pixel_spacing_mm)
    registration = mrml.transform_to_node(scene, sim.phantom_to_reference, name="PhantomToReference")
    target = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MyCalibration")
    tables = [scene.AddNewNodeByClass("vtkMRMLTableNode", n) for n in ("Accuracy", "Residuals")]
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "Plot")
    detection = mc.detect_browser(browser, no_registration)
    for _ in range(2):  # a second run replaces the contents, it does not add series or columns
        out = mc.calibrate_browsers(browser, None, no_registration, image_to_probe_node=target,
                                    phantom_to_reference_node=registration, solver="lsq",
                                    accuracy_table_node=tables[0], residuals_table_node=tables[1],
                                    plot_chart_node=chart, calibration_detection=detection)
    assert out.result.phantom_pose == "known" and out.result.validation is None
    assert out.image_to_probe_node is target and out.plot_chart_node is chart
    assert out.accuracy_table_node is tables[0] and out.residuals_table_node is tables[1]
    assert out.calibration_detection is detection
    expected = calibrate(sim.sequence, None, setup_for(sim), solver="lsq")
    np.testing.assert_allclose(_matrix(target), expected.image_to_probe, rtol=0, atol=1e-9)
    assert tables[0].GetNumberOfRows() == 1 and tables[0].GetNumberOfColumns() == 8
    assert tables[1].GetNumberOfColumns() == 3  # frame, calibration 3D and 2D errors
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    assert scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 1
    assert target.GetNodeReference(mc.REF_VALIDATION_BROWSER) is None


def test_estimated_phantom_pose_without_registration(scene):
    sim = small_simulation("linear", 50.0, n_frames=30, seed=3, tilt_deg=12.0)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    setup = CalibrationSetup(sim.phantom, None, setup_for(sim).pixel_spacing_mm)
    out = mc.calibrate_browsers(browser, None, setup, solver="lm", phantom_pose="auto")
    assert out.result.phantom_pose == "estimated"
    assert out.image_to_probe_node.GetAttribute(mc.ATTR_PHANTOM_POSE) == "estimated"
    assert target_errors_mm(out.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean() < 0.5


# -- detection and the overlay ----------------------------------------------------------------


def test_detected_dots_overlay_follows_the_browser(scene):
    sim = _cal()
    frames = sim.sequence.frames.copy()
    frames[3] = 0  # no phantom on frame 3
    seq = TrackedSequence(frames=frames, timestamps_s=sim.sequence.timestamps_s, transforms=sim.sequence.transforms,
                          pixel_spacing_mm=sim.sequence.pixel_spacing_mm)
    # Calibrated geometry: frames lie obliquely in RAS, so the check covers the IJKToRAS mapping.
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=sim.image_to_probe, browser_name="Calibration")
    image_seq = browser.GetMasterSequenceNode()
    image_proxy = mc.image_proxy_node(browser)
    assert image_proxy is browser.GetProxyNode(image_seq) and image_proxy.IsA("vtkMRMLScalarVolumeNode")
    shift = mrml.transform_to_node(scene, np.eye(4), name="Shift")
    image_proxy.SetAndObserveTransformNodeID(shift.GetID())
    dots = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "DetectedDots")
    det = mc.detect_browser(browser, setup_for(sim), markups_node=dots)
    assert det.frames_detected == 29 and not det.ok[3]
    assert dots.GetParentTransformNode() is shift and dots.GetLocked()
    for item in (0, 7, 3, 29):
        browser.SetSelectedItemNumber(item)
        pts = _control_points(dots)
        if item == 3:
            assert pts.shape == (0, 3)
            continue
        m = _ijk_to_ras(image_seq.GetNthDataNode(item))
        expected = det.points_px[item] @ m[:3, :2].T + m[:3, 3]
        np.testing.assert_allclose(pts, expected, rtol=0, atol=1e-6)
        assert [dots.GetNthControlPointLabel(i) for i in range(9)] == list(sim.phantom.wire_names)
    summary = json.loads(dots.GetAttribute(mc.ATTR_DETECTION))
    assert summary["frames_detected"] == 29 and summary["detector"] == "hessian"

    mc.detect_browser(browser, setup_for(sim), markups_node=dots)  # again: the dots sequence is replaced
    synchronized = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(synchronized, True)
    roles = [synchronized.GetItemAsObject(i).GetAttribute(mc.ATTR_ROLE) for i in range(synchronized.GetNumberOfItems())]
    assert roles.count(mc.ROLE_DOTS) == 1
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1
    back = mrml.browser_to_sequence(browser)  # the markups sequence does not disturb reading the browser
    np.testing.assert_array_equal(back.frames, frames)


# -- live calibration -------------------------------------------------------------------------


def _push_frame(image_node, frame) -> None:
    """Replace the pixels as SlicerOpenIGTLink does (new image data, then one Modified)."""
    image = vtk.vtkImageData()
    image.SetDimensions(frame.shape[1], frame.shape[0], 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = frame.ravel()
    was = image_node.StartModify()
    image_node.SetAndObserveImageData(image)
    image_node.EndModify(was)


def test_live_keyframes_converge_on_simulated_frames(scene):
    sim = small_simulation("linear", 50.0, n_frames=60, seed=4)
    poses = probe_to_reference(sim.sequence)
    probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProbeToReference")
    image_to_probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
    image_to_probe.SetAndObserveTransformNodeID(probe.GetID())  # Image_Image -> ImageToProbe -> ProbeToReference
    image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Image")
    image.SetAndObserveTransformNodeID(image_to_probe.GetID())
    dots = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "LiveDots")
    live = mc.LiveCalibration(setup_for(sim), image_to_probe_node=image_to_probe, markups_node=dots,
                              settings=KeyframeSettings(min_keyframes=15, min_pose_diversity_deg=5.0))
    assert live.observe(image) is live and live.observing
    used = 0
    for i in range(60):
        probe.SetMatrixTransformToParent(mrml.matrix_to_vtk(poses[i]))
        _push_frame(image, sim.sequence.frames[i])
        image.Modified()  # not new pixels: not a frame
        used = i + 1
        if live.converged:
            break
    status = live.status()
    assert live.converged and used < 60
    assert status["frames_received"] == used and status["frames_detected"] == used and status["errors"] == 0
    json.dumps(status)
    assert target_errors_mm(live.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean() < 0.3
    np.testing.assert_allclose(_matrix(image_to_probe), live.image_to_probe, rtol=0, atol=1e-12)
    assert image_to_probe.GetAttribute(mc.ATTR_MODE) == "live"
    assert image_to_probe.GetNodeReference(mc.REF_LIVE_IMAGE) is image

    table = live.convergence_table_node
    assert image_to_probe.GetNodeReference(mc.REF_CONVERGENCE_TABLE) is table
    assert table.GetNumberOfRows() == status["calibrations"] >= 3
    change = _column(table, mc.COL_CHANGE)
    assert np.isnan(change[0]) and change[-1] <= 0.05
    assert np.all(np.diff(_column(table, mc.COL_KEYFRAMES)) > 0)
    assert live.plot_chart_node.GetNumberOfPlotSeriesNodes() == 2

    # The overlay shows the last frame's dots on the displayed image: IJKToRAS (here identity),
    # under the image's parent, so the dots move with the image when ImageToProbe changes.
    frame, image_to_world = mc.frame_from_image_node(image)
    np.testing.assert_array_equal(frame, sim.sequence.frames[used - 1])
    np.testing.assert_allclose(image_to_world, poses[used - 1] @ live.image_to_probe, atol=1e-9)
    assert dots.GetParentTransformNode() is image_to_probe
    np.testing.assert_allclose(_control_points(dots)[:, :2], sim.true_points_px[used - 1], atol=1.5)
    assert np.all(_control_points(dots)[:, 2] == 0)
    assert str(live).endswith("converged")

    _push_frame(image, sim.sequence.frames[0])  # after convergence frames are skipped
    assert live.status()["frames_skipped"] == 1
    final = live.stop()
    assert not live.observing and final is not None
    _push_frame(image, sim.sequence.frames[1])
    assert live.status()["frames_received"] == used + 1  # no longer observed


def test_live_pose_from_a_given_node_and_untracked_frames(scene):
    sim = small_simulation("linear", 50.0, n_frames=30)
    probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "TrackerProbe")  # any name when given
    image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Image")
    live = mc.LiveCalibration(setup_for(sim), probe_to_reference_node=probe).observe(image)
    pose = probe_to_reference(sim.sequence)[0]
    probe.SetMatrixTransformToParent(mrml.matrix_to_vtk(pose))
    _push_frame(image, sim.sequence.frames[0])
    assert live.last_update.accepted and live.status()["keyframes"] == 1
    probe.SetAttribute(mrml.ATTR_TRANSFORM_VALID, "false")
    _push_frame(image, sim.sequence.frames[1])
    assert not live.last_update.accepted and live.last_update.reason == "probe not tracked"
    assert live.stop() is None and "keyframes" in live.last_error  # too few for a calibration
    assert live.image_to_probe_node is None  # nothing was calibrated, nothing was written


# -- bad inputs ---------------------------------------------------------------------------------


def test_browser_without_image_sequence(scene):
    sim = _cal()
    setup = setup_for(sim)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ProbeToTracker")
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tmp")
    seq.SetDataNodeAtValue(node, "0")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "OnlyTransforms")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    with pytest.raises(SequenceError, match=r"calibration recording 'OnlyTransforms'.*no volume sequence"):
        mc.calibrate_browsers(browser, None, setup)
    with pytest.raises(SequenceError, match="no volume sequence"):
        mc.detect_browser(browser, setup)
    with pytest.raises(SequenceError, match="no calibration recording: select a sequence browser"):
        mc.calibrate_browsers(None, None, setup)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image")
    with pytest.raises(SequenceError, match="'Image' is a vtkMRMLScalarVolumeNode; expected a vtkMRMLSequenceBrowser"):
        mc.calibrate_browsers(volume, None, setup)


def test_no_probe_to_reference_fails_before_detection(scene):
    sim = _cal()
    seq = TrackedSequence(frames=sim.sequence.frames, timestamps_s=sim.sequence.timestamps_s,
                          transforms={"ProbeToTracker": sim.sequence.transforms["ProbeToTracker"]})
    good = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Good")
    browser = mrml.sequence_to_browser(scene, seq, browser_name="NoReference")
    calls = []
    message = r"validation recording 'NoReference': no ProbeToReference.*ProbeToTracker"
    with pytest.raises(TransformError, match=message):
        mc.calibrate_browsers(good, browser, setup_for(sim), progress=lambda d, t: calls.append(d))
    assert calls and set(calls) == {0}  # checked before any frame was detected (only the reads reported)


def test_spacing_hint_from_ijk_to_ras_or_a_clear_error(scene):
    sim = _cal()
    short = sim.sequence.select(slice(0, 10))
    bare = TrackedSequence(frames=short.frames, timestamps_s=short.timestamps_s,
                           transforms=short.transforms)  # no pixel spacing in the recording
    no_hint = CalibrationSetup(sim.phantom, sim.phantom_to_reference, None)
    placed = mrml.sequence_to_browser(scene, bare, image_to_probe=sim.image_to_probe, browser_name="Placed")
    det = mc.detect_browser(placed, no_hint)  # IJKToRAS = ImageToReference: its columns give the spacing
    np.testing.assert_allclose(det.pixel_spacing_mm, np.linalg.norm(sim.image_to_probe[:3, :2], axis=0), rtol=1e-9)
    assert det.frames_detected == 10
    pixels = mrml.sequence_to_browser(scene, bare, browser_name="Pixels")  # unit IJKToRAS: no hint
    with pytest.raises(DetectionError, match=r"no pixel spacing hint for the frames of calibration recording "
                                             r"'Pixels'.*ApproximateSpacingMmPerPixel"):
        mc.calibrate_browsers(pixels, None, no_hint)
    assert mc.detect_browser(pixels, no_hint, pixel_spacing_mm=0.22).frames_detected == 10


def test_config_without_phantom_definition(tmp_path):
    path = tmp_path / "NoPhantom.xml"
    path.write_text('<PlusConfiguration version="2.1"><Segmentation ApproximateSpacingMmPerPixel="0.2"/>'
                    "</PlusConfiguration>")
    with pytest.raises(PhantomDefinitionError, match=r"NoPhantom\.xml.*no N-wire phantom.*fCal-2\.0") as info:
        mc.make_setup(path)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, FreehandUSError)
    setup = mc.make_setup(path, phantom="fCal-2.0")  # a built-in phantom rescues it
    assert setup.phantom.n_wires == 9 and setup.pixel_spacing_mm == (0.2, 0.2)
    with pytest.raises(PhantomDefinitionError, match="no phantom: select a PLUS configuration"):
        mc.make_setup()
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        mc.make_setup(phantom="fCal-2.0", pixel_spacing_mm=-0.1)


def test_bad_nodes_and_options(scene):
    sim = _cal()
    setup = setup_for(sim)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "T")
    with pytest.raises(DetectionError, match="expected a vtkMRMLMarkupsFiducialNode, got vtkMRMLTableNode"):
        mc.detect_browser(browser, setup, markups_node=table)
    with pytest.raises(DetectionError, match="expected a CalibrationSetup"):
        mc.detect_browser(browser, "fCal-2.0")
    registration = mrml.transform_to_node(scene, sim.phantom_to_reference, name="PhantomToReference")
    with pytest.raises(TransformError, match="both the ImageToProbe output and the PhantomToReference input"):
        mc.calibrate_browsers(browser, None, setup, image_to_probe_node=registration,
                              phantom_to_reference_node=registration)
    with pytest.raises(TransformError, match="ImageToProbe output: expected a vtkMRMLLinearTransformNode"):
        mc.calibrate_browsers(browser, None, setup, image_to_probe_node=table)
    with pytest.raises(CalibrationError, match="residual plot: expected a vtkMRMLPlotChartNode, got vtkMRMLTableNode"):
        mc.calibrate_browsers(browser, None, setup, plot_chart_node=table)
    with pytest.raises(CalibrationError, match="phantom pose 'known' needs a PhantomToReference"):
        mc.LiveCalibration(CalibrationSetup(sim.phantom, None, (0.2, 0.2)), phantom_pose="known")
    with pytest.raises(ValueError, match="fill_table: columns have different lengths"):
        mc.fill_table(table, [("a", [1, 2], ""), ("b", [1.0], "")])
    with pytest.raises(CalibrationError, match="expected a vtkMRMLTableNode"):
        mc.fill_table(registration, [("a", [1], "")])


def test_live_bad_inputs(scene):
    sim = _cal()
    live = mc.LiveCalibration(setup_for(sim))
    orphan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Image")
    with pytest.raises(TransformError, match=r"live image 'Image_Image': no ProbeToReference transform"):
        live.observe(orphan)
    not_probe = mrml.transform_to_node(scene, np.eye(4), name="ImageToProbe")
    orphan.SetAndObserveTransformNodeID(not_probe.GetID())  # ImageToProbe is not a probe pose
    with pytest.raises(TransformError, match="no ProbeToReference"):
        live.observe(orphan)
    with pytest.raises(SequenceError, match="expected a vtkMRMLVolumeNode"):
        live.observe(not_probe)
    assert not live.observing
    with pytest.raises(SequenceError, match="holds no image data"):
        mc.frame_from_image_node(orphan)


# -- the module's choices follow the Lib ----------------------------------------------------------


def _enum_values(class_name: str) -> dict:
    """Member -> value of an Enum in NWireCalibration.py (read with ast: the file needs Slicer to import)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "NWireCalibration" / "NWireCalibration.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.targets[0].id: n.value.value for n in cls.body if isinstance(n, ast.Assign)}


def test_module_choices_are_the_lib_options():
    from NWireCalibrationLib.phantom import builtin_phantom_names
    from NWireCalibrationLib.pipeline import DETECTORS, SOLVERS

    phantoms = _enum_values("Phantom")
    assert phantoms.pop("CONFIG") == "config"
    assert sorted(phantoms.values()) == sorted(builtin_phantom_names())
    assert sorted(_enum_values("Solver").values()) == sorted(SOLVERS)
    assert sorted(_enum_values("Detector").values()) == sorted(DETECTORS)
    assert sorted(_enum_values("PhantomPose").values()) == ["auto", "estimate", "known"]


# -- PLUS fCal 2.0 data -------------------------------------------------------------------------


@pytest.mark.realdata
def test_fcal2_recordings_through_browsers(scene):
    from FreehandUSLib.io import read_sequence
    from NWireCalibrationLib.plus_results import read_plus_calibration_results

    setup = mc.make_setup(plus_file(FCAL2_CONFIG))
    plus = read_plus_calibration_results(plus_file(FCAL2_RESULTS))
    cal = read_sequence(plus_file("TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha"))
    val = read_sequence(plus_file("TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha"))
    cal_browser = mrml.sequence_to_browser(scene, cal, browser_name="fCalCalibration")
    val_browser = mrml.sequence_to_browser(scene, val, browser_name="fCalValidation")
    out = mc.calibrate_browsers(cal_browser, val_browser, setup, solver="lsq")
    res = out.result
    assert res.calibration.frames_segmented >= 189 and res.validation.frames_segmented == 103
    assert res.validation.error3d_trimmed95_mean_mm < 0.6  # PLUS: 0.540 mm
    w, h = cal.frames.shape[2], cal.frames.shape[1]
    assert target_errors_mm(res.image_to_probe, plus.image_to_probe, (w, h)).mean() < 0.5
    np.testing.assert_array_equal(_matrix(out.image_to_probe_node), res.image_to_probe)
    assert 'Error="' in out.image_to_probe_node.GetAttribute(mc.ATTR_PLUS_TRANSFORM)
    np.testing.assert_array_equal(_column(out.accuracy_table_node, mc.COL_FRAMES), [190, 103])
    assert out.residuals_table_node.GetNumberOfRows() == 190

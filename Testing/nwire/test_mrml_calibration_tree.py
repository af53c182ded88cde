"""N-wire calibration inputs under Slicer's transform tree (issue 22, item 4), on slicer-core.

Slicer shows a recording through the transforms above its image proxy. For calibration the
transforms *above* the recorded tracking are composed where they complete the tracking chain
(a fixed ``TrackerToReference`` above a recorded ``ProbeToTracker``), and anything above the
Reference frame (``ReferenceToRAS``) or below the tracking (the ImageToProbe being calibrated)
is left out: the same ImageToProbe comes out as without the tree. The live probe pose is read
through the tree the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import TrackedSequence, mrml  # noqa: E402
from FreehandUSLib.errors import TransformError  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from NWireCalibrationLib.pipeline import probe_to_reference  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from nwire_synthetic import setup_for, small_simulation  # noqa: E402

pytestmark = pytest.mark.mrml


def _rigid(euler_deg, translation_mm) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", euler_deg, degrees=True).as_matrix()
    m[:3, 3] = translation_mm
    return m


REFERENCE_TO_RAS = _rigid([15.0, -40.0, 70.0], [30.0, -60.0, 120.0])
TRACKER_TO_REFERENCE = _rigid([-25.0, 10.0, 5.0], [-200.0, 35.0, -80.0])


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture(scope="module")
def sim():
    return small_simulation("linear", 50.0, n_frames=30)


def _calibrate(browser, sim):
    return mc.calibrate_browsers(browser, None, setup_for(sim), solver="lsq").result.image_to_probe


def test_image_under_reference_to_ras_gives_the_same_image_to_probe(scene, sim):
    plain = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Plain")
    placed = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Placed")
    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    mc.image_proxy_node(placed).SetAndObserveTransformNodeID(reference_to_ras.GetID())
    np.testing.assert_allclose(_calibrate(placed, sim), _calibrate(plain, sim), rtol=0, atol=1e-12)


def test_a_fixed_tracker_to_reference_above_the_recorded_tracking_completes_the_chain(scene, sim):
    """SlicerIGT tree: Image -> ImageToProbe -> ProbeToTracker (recorded) -> TrackerToReference -> ReferenceToRAS."""
    expected = _calibrate(mrml.sequence_to_browser(scene, sim.sequence, browser_name="Full"), sim)
    probe_to_tracker = np.linalg.inv(TRACKER_TO_REFERENCE) @ probe_to_reference(sim.sequence)
    recording = TrackedSequence(
        frames=sim.sequence.frames,
        timestamps_s=sim.sequence.timestamps_s,
        transforms={"ProbeToTracker": (probe_to_tracker, np.ones(len(probe_to_tracker), dtype=bool))},
        pixel_spacing_mm=sim.sequence.pixel_spacing_mm,
    )
    browser = mrml.sequence_to_browser(scene, recording, browser_name="Tree")
    with pytest.raises(TransformError, match="no ProbeToReference"):
        _calibrate(browser, sim)  # nothing says where Tracker is: refused, not guessed

    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    tracker_to_reference = mrml.transform_to_node(scene, TRACKER_TO_REFERENCE, name="TrackerToReference")
    tracker_to_reference.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    tracking = [browser.GetProxyNode(s) for s in mc._browser_sequences(browser)
                if s.GetAttribute(mrml.ATTR_ROLE) == "Transform"]
    assert len(tracking) == 1
    tracking[0].SetAndObserveTransformNodeID(tracker_to_reference.GetID())
    image_to_probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
    image_to_probe.SetAndObserveTransformNodeID(tracking[0].GetID())
    mc.image_proxy_node(browser).SetAndObserveTransformNodeID(image_to_probe.GetID())

    out = mc.calibrate_browsers(browser, None, setup_for(sim), solver="lsq", image_to_probe_node=image_to_probe)
    np.testing.assert_allclose(out.result.image_to_probe, expected, rtol=0, atol=1e-6)
    assert out.image_to_probe_node is image_to_probe
    assert image_to_probe.GetParentTransformNode() is tracking[0]  # the tree is kept as it was


def test_live_probe_pose_through_the_tree(scene, sim):
    pose = probe_to_reference(sim.sequence)[3]
    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    tracker_to_reference = mrml.transform_to_node(scene, TRACKER_TO_REFERENCE, name="TrackerToReference")
    tracker_to_reference.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    probe = mrml.transform_to_node(scene, np.linalg.inv(TRACKER_TO_REFERENCE) @ pose, name="ProbeToTracker")
    probe.SetAndObserveTransformNodeID(tracker_to_reference.GetID())
    image_to_probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
    image_to_probe.SetAndObserveTransformNodeID(probe.GetID())
    image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Image")
    image.SetAndObserveTransformNodeID(image_to_probe.GetID())
    np.testing.assert_allclose(mc.probe_to_reference_of_image_node(image), pose, rtol=0, atol=1e-9)

    tracker_to_reference.SetAttribute(mrml.ATTR_TRANSFORM_VALID, "false")
    assert np.isnan(mc.probe_to_reference_of_image_node(image)).all()
    # Directly under ProbeToReference (then ReferenceToRAS): the matrix to parent, as before.
    direct = mrml.transform_to_node(scene, pose, name="ProbeToReference")
    direct.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    image.SetAndObserveTransformNodeID(direct.GetID())
    np.testing.assert_allclose(mc.probe_to_reference_of_image_node(image), pose, rtol=0, atol=1e-12)


def test_recorded_tracking_wins_over_a_fixed_transform_between_the_same_frames(scene, sim):
    """ProbeToTracker and ReferenceToTracker recorded; a stale fixed TrackerToReference above them is ignored."""
    expected = _calibrate(mrml.sequence_to_browser(scene, sim.sequence, browser_name="Plain"), sim)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Tree")
    stale = mrml.transform_to_node(scene, TRACKER_TO_REFERENCE, name="TrackerToReference")
    probe = [browser.GetProxyNode(s) for s in mc._browser_sequences(browser)
             if (s.GetAttribute(mrml.ATTR_TRANSFORM_NAME) or s.GetName()).endswith("ProbeToTracker")
             or "ProbeToTracker" in s.GetName()]
    assert len(probe) == 1
    probe[0].SetAndObserveTransformNodeID(stale.GetID())
    mc.image_proxy_node(browser).SetAndObserveTransformNodeID(probe[0].GetID())
    np.testing.assert_allclose(_calibrate(browser, sim), expected, rtol=0, atol=1e-12)

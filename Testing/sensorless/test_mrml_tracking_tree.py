"""The sensorless estimate is shown where the tracked frames are shown (issue 22, item 4).

A recording's image proxy placed under a transform (a ``ReferenceToRAS``, as a SlicerIGT scene
has it) shows the frames in RAS; the estimated ImageToEstimatedReference, anchored at the
tracked first pose in Reference, must hang under the same transform, and so must the volume
reconstructed from it. Real MRML classes (slicer-core).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402  (slicer-core pins it)
from FreehandUSLib import TrackedSequence, mrml  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_sweep  # noqa: E402
from FreehandUSLib.mrml_reconstruction import reconstruct_browser_to_volume_node as recon  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402

pytestmark = pytest.mark.mrml

REFERENCE_TO_RAS = np.eye(4)
REFERENCE_TO_RAS[:3, :3] = Rotation.from_euler("xyz", [20.0, -35.0, 60.0], degrees=True).as_matrix()
REFERENCE_TO_RAS[:3, 3] = [40.0, -25.0, 110.0]


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture(scope="module")
def sweep() -> TrackedSequence:
    return tiny_sweep(seed=3, n_frames=10, length_mm=3.0).sequence


def _to_world(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToWorld(m)
    return mrml.vtk_to_matrix(m)


def _ijk_to_world(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    parent = volume.GetParentTransformNode()
    return mrml.vtk_to_matrix(m) if parent is None else _to_world(parent) @ mrml.vtk_to_matrix(m)


def _image_proxy(browser):
    return browser.GetProxyNode(mt._image_sequence(browser))


def test_estimate_and_its_volume_hang_under_the_images_reference_to_ras(scene, sweep):
    browser = mrml.sequence_to_browser(scene, sweep, browser_name="Sweep")
    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    image = _image_proxy(browser)
    image.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    browser.SetSelectedItemNumber(0)

    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    proxy = browser.GetProxyNode(mt.find_estimate_sequence(browser))
    assert proxy.GetParentTransformNode() is reference_to_ras
    assert summary["parent_transform"] == "ReferenceToRAS"
    # anchored at the tracked first pose: frame 0 of the estimate is where Slicer shows frame 0
    np.testing.assert_allclose(_to_world(proxy), _ijk_to_world(image), rtol=0, atol=1e-6)

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "EstimatedVolume")
    result = mt.reconstruct_estimated(browser, volume, reconstruct=recon, output_spacing_mm=0.4)
    assert result.frames_used == sweep.n_frames
    assert volume.GetParentTransformNode() is reference_to_ras
    # the first frame's centre, as shown, lies inside the volume as shown
    centre_world = _ijk_to_world(image) @ [31.5, 31.5, 0, 1]
    ijk = np.linalg.inv(_ijk_to_world(volume)) @ centre_world
    dims = volume.GetImageData().GetDimensions()
    assert all(-0.5 <= ijk[a] <= dims[a] - 0.5 for a in range(3))


def test_estimate_without_a_tree_stays_in_world_and_an_untracked_one_follows_the_parent(scene, sweep):
    browser = mrml.sequence_to_browser(scene, sweep, browser_name="Sweep")
    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    assert summary["parent_transform"] is None
    assert browser.GetProxyNode(mt.find_estimate_sequence(browser)).GetParentTransformNode() is None

    # A second estimate after the user placed the images under a transform follows them.
    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    _image_proxy(browser).SetAndObserveTransformNodeID(reference_to_ras.GetID())
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    assert browser.GetProxyNode(mt.find_estimate_sequence(browser)).GetParentTransformNode() is reference_to_ras


def _voxels(volume) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).copy()


def test_reconstructing_the_estimate_of_pixel_frames_under_a_tree_uses_the_estimate(scene, sweep):
    """Frames with pixel geometry under a transform: the estimate places them, not the tree."""
    untracked = TrackedSequence(frames=sweep.frames, timestamps_s=sweep.timestamps_s, pixel_spacing_mm=(0.2, 0.2))
    plain = mrml.sequence_to_browser(scene, untracked, browser_name="Plain")
    placed = mrml.sequence_to_browser(scene, untracked, browser_name="Placed")
    image_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ImageToRAS")
    _image_proxy(placed).SetAndObserveTransformNodeID(image_to_ras.GetID())
    volumes = []
    for browser in (plain, placed):
        mt.estimate_trajectory_to_browser(browser, model="decorrelation")
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{browser.GetName()}Volume")
        mt.reconstruct_estimated(browser, volume, reconstruct=recon, output_spacing_mm=0.4)
        volumes.append(volume)
    np.testing.assert_array_equal(_voxels(volumes[1]), _voxels(volumes[0]))
    np.testing.assert_allclose(_ijk_to_world(volumes[1]), _ijk_to_world(volumes[0]), rtol=0, atol=1e-9)


def test_an_roi_placed_around_the_shown_frames_crops_the_estimates_volume(scene, sweep):
    """The ROI is drawn where the frames show (world); the estimate's volume is made in Reference."""
    browser = mrml.sequence_to_browser(scene, sweep, browser_name="Sweep")
    reference_to_ras = mrml.transform_to_node(scene, REFERENCE_TO_RAS, name="ReferenceToRAS")
    image = _image_proxy(browser)
    image.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    browser.SetSelectedItemNumber(0)
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    centre_world = (_ijk_to_world(image) @ [31.5, 31.5, 0, 1])[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenterWorld(*centre_world)
    roi.SetSize(4.0, 4.0, 4.0)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Cropped")
    mt.reconstruct_estimated(browser, volume, reconstruct=recon, output_spacing_mm=0.4, roi_node=roi)
    dims = np.array(volume.GetImageData().GetDimensions())
    assert np.all(dims * 0.4 <= 4.0 + 0.8)  # the ROI's size, not the sweep's
    ijk = np.linalg.inv(_ijk_to_world(volume)) @ [*centre_world, 1]
    assert all(-0.5 <= ijk[a] <= dims[a] - 0.5 for a in range(3))  # around the shown centre
    assert roi.GetParentTransformNode() is None  # put back
    after = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    added = [scene.GetNodeByID(i) for i in after - before]
    assert not [n for n in added if n.IsA("vtkMRMLTransformNode")]  # the temporary transform is gone

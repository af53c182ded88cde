"""MRML bridge (FreehandUSLib.mrml) against the real MRML classes of the slicer-core wheel."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402  (slicer-core pins it)
from FreehandUSLib import (  # noqa: E402
    SequenceError,
    TrackedSequence,
    TransformError,
    Volume,
    mrml,
)
from FreehandUSLib.errors import FileFormatError  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from testdata import make_synthetic_sequence, plus_file  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml


def _image_to_probe() -> np.ndarray:
    """A calibration with pixel spacing (0.2, 0.25) mm, rotated and offset (not rigid)."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec([0.1, -0.2, 0.3]).as_matrix() @ np.diag([0.2, 0.25, 0.2])
    m[:3, 3] = [12.0, -4.0, 7.5]
    return m


def _corners_mm(image_to_x: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """(n, 4, 3) the 4 image corners (pixel centres) mapped to mm by (n, 4, 4) matrices."""
    ij = np.array(
        [[0, 0, 0, 1], [n_cols - 1, 0, 0, 1], [0, n_rows - 1, 0, 1], [n_cols - 1, n_rows - 1, 0, 1]], float
    )
    return np.einsum("nab,cb->nca", image_to_x, ij)[..., :3]


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml.vtk_to_matrix(m)


def _nodes_by_class(scene, cls) -> list:
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


def _browser_sequences(browser) -> list:
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _assert_same_sequence(
    back: TrackedSequence, seq: TrackedSequence, expected_i2r: np.ndarray, *, matrix_atol=0.0
) -> None:
    """Frames and timestamps exact, valid transforms within ``matrix_atol``, ImageToReference
    corners within 1e-6 mm."""
    assert back.frames.dtype == seq.frames.dtype
    np.testing.assert_array_equal(back.frames, seq.frames)
    np.testing.assert_array_equal(back.timestamps_s, seq.timestamps_s)
    np.testing.assert_array_equal(back.image_ok, seq.image_ok)
    for name, ft in seq.transforms.items():
        got = back.transforms[name]
        np.testing.assert_array_equal(got.valid, ft.valid)
        np.testing.assert_allclose(got.matrices[ft.valid], ft.matrices[ft.valid], rtol=0, atol=matrix_atol)
    i2r = back.transforms["ImageToReference"]
    ok = np.all(np.isfinite(expected_i2r), axis=(1, 2))
    np.testing.assert_array_equal(i2r.valid, ok)
    np.testing.assert_allclose(
        _corners_mm(i2r.matrices[ok], seq.n_rows, seq.n_cols),
        _corners_mm(expected_i2r[ok], seq.n_rows, seq.n_cols),
        rtol=0,
        atol=1e-6,
    )


# -- tracked sequence <-> browser --------------------------------------------------------------
def test_round_trip_preserves_frames_and_image_to_reference(mrml_scene):
    seq = make_synthetic_sequence()
    image_to_probe = _image_to_probe()
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    back = mrml.browser_to_sequence(browser)
    expected = seq.repository({"ImageToProbe": image_to_probe}).get("ImageToReference")
    _assert_same_sequence(back, seq, expected)
    assert set(back.transforms) == {"ProbeToTracker", "ReferenceToTracker", "ImageToReference"}


def test_browser_has_slicer_names_plus_sources_time_index_and_proxies(mrml_scene):
    seq = make_synthetic_sequence(n_frames=5)
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=_image_to_probe(), browser_name="Sweep")
    assert browser.GetName() == "Sweep"
    sequences = {s.GetName(): s for s in _browser_sequences(browser)}
    # Slicer's reader naming: <base>-<Source>-Seq, the PLUS name in Sequences.Source.
    assert set(sequences) == {"Sweep-Image_Reference-Seq", "Sweep-ProbeToTracker-Seq", "Sweep-ReferenceToTracker-Seq"}
    for name, s in sequences.items():
        assert name == f"Sweep-{s.GetAttribute('Sequences.Source')}-Seq"
    image_seq = browser.GetMasterSequenceNode()
    assert image_seq.GetAttribute("Sequences.Source") == "Image_Reference"
    assert (image_seq.GetIndexName(), image_seq.GetIndexUnit()) == ("time", "s")
    assert image_seq.GetNumberOfDataNodes() == 5
    assert image_seq.GetNthDataNode(0).GetClassName() == "vtkMRMLScalarVolumeNode"
    assert [float(image_seq.GetNthIndexValue(i)) for i in range(5)] == seq.timestamps_s.tolist()
    assert sequences["Sweep-ProbeToTracker-Seq"].GetNthDataNode(0).GetClassName() == "vtkMRMLLinearTransformNode"
    for s in sequences.values():
        proxy = browser.GetProxyNode(s)
        assert proxy is not None and proxy.GetScene() is not None
        assert proxy.GetName() == f"Sweep-{s.GetAttribute('Sequences.Source')}"


def test_proxy_lands_at_image_to_reference_without_lps_flip(mrml_scene):
    # Tracker transforms = identity, so ImageToReference = ImageToProbe: pixel (i, j) must be at
    # ImageToProbe @ (i, j, 0, 1) in RAS, with no LPS->RAS sign change.
    n = 4
    seq = TrackedSequence(
        frames=np.arange(n * 6 * 8, dtype=np.uint8).reshape(n, 6, 8),
        timestamps_s=np.arange(n) * 0.1,
        transforms={
            "ProbeToTracker": (np.tile(np.eye(4), (n, 1, 1)), np.ones(n, bool)),
            "ReferenceToTracker": (np.tile(np.eye(4), (n, 1, 1)), np.ones(n, bool)),
        },
    )
    image_to_probe = _image_to_probe()
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    proxy = browser.GetProxyNode(browser.GetMasterSequenceNode())
    browser.SetSelectedItemNumber(2)
    ras = _ijk_to_ras(proxy) @ np.array([3.0, 5.0, 0.0, 1.0])
    np.testing.assert_allclose(
        ras[:3], image_to_probe[:3, 0] * 3 + image_to_probe[:3, 1] * 5 + image_to_probe[:3, 3], atol=1e-9
    )
    assert proxy.GetParentTransformNode() is None
    proxy_pixels = numpy_support.vtk_to_numpy(proxy.GetImageData().GetPointData().GetScalars())
    np.testing.assert_array_equal(proxy_pixels.reshape(6, 8), seq.frames[2])


def test_each_frame_ijk_to_ras_is_image_to_reference(mrml_scene):
    seq = make_synthetic_sequence(n_frames=6)
    image_to_probe = _image_to_probe()
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    expected = seq.repository({"ImageToProbe": image_to_probe}).get("ImageToReference")
    image_seq = browser.GetMasterSequenceNode()
    for i in (0, 1, 5):
        np.testing.assert_allclose(_ijk_to_ras(image_seq.GetNthDataNode(i)), expected[i], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("dtype", "channels", "node_class"),
    [
        (np.float32, 1, "vtkMRMLScalarVolumeNode"),
        (np.uint8, 3, "vtkMRMLVectorVolumeNode"),
        (np.float32, 2, "vtkMRMLVectorVolumeNode"),
    ],
)
def test_round_trip_dtypes_and_channels(mrml_scene, dtype, channels, node_class):
    seq = make_synthetic_sequence(n_frames=4, n_rows=10, n_cols=14, dtype=dtype, n_channels=channels)
    image_to_probe = _image_to_probe()
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    assert browser.GetMasterSequenceNode().GetNthDataNode(0).GetClassName() == node_class
    back = mrml.browser_to_sequence(browser)
    assert back.frames.shape == seq.frames.shape
    _assert_same_sequence(back, seq, seq.repository({"ImageToProbe": image_to_probe}).get("ImageToReference"))


def test_invalid_transform_frame_is_a_gap_and_the_image_holds_last_geometry(mrml_scene):
    seq = make_synthetic_sequence(n_frames=8)  # ReferenceToTracker invalid at frame 4
    bad = 4
    seq.transforms["ReferenceToTracker"].matrices[bad] = np.nan
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=_image_to_probe())
    image_seq = browser.GetMasterSequenceNode()
    assert image_seq.GetNumberOfDataNodes() == 8
    frame = image_seq.GetNthDataNode(bad)
    assert frame.GetAttribute(mrml.ATTR_TRANSFORM_VALID) == "false"
    assert image_seq.GetNthDataNode(bad - 1).GetAttribute(mrml.ATTR_TRANSFORM_VALID) == "true"
    np.testing.assert_array_equal(_ijk_to_ras(frame), _ijk_to_ras(image_seq.GetNthDataNode(bad - 1)))
    ref_seq = next(s for s in _browser_sequences(browser) if s.GetAttribute("Sequences.Source") == "ReferenceToTracker")
    # As PLUS / Slicer's metafile writer mark it: no item at the invalid frame's time.
    assert ref_seq.GetNumberOfDataNodes() == 7
    assert ref_seq.GetItemNumberFromIndexValue(image_seq.GetNthIndexValue(bad)) == -1
    # Browsing to that frame shows the last valid pose.
    browser.SetSelectedItemNumber(bad)
    m = vtk.vtkMatrix4x4()
    browser.GetProxyNode(ref_seq).GetMatrixTransformToParent(m)
    np.testing.assert_array_equal(
        mrml.vtk_to_matrix(m), seq.transforms["ReferenceToTracker"].matrices[bad - 1]
    )
    back = mrml.browser_to_sequence(browser)
    assert not back.transforms["ReferenceToTracker"].valid[bad]
    assert not back.transforms["ImageToReference"].valid[bad]
    assert back.transforms["ImageToReference"].valid.sum() == 7
    np.testing.assert_array_equal(back.frames[bad], seq.frames[bad])


def test_leading_invalid_frames_take_first_valid_geometry(mrml_scene):
    seq = make_synthetic_sequence(n_frames=8)  # ReferenceToTracker invalid at frame 4 only
    seq.transforms["ProbeToTracker"].valid[:2] = False
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=_image_to_probe())
    image_seq = browser.GetMasterSequenceNode()
    first_valid = _ijk_to_ras(image_seq.GetNthDataNode(2))
    np.testing.assert_array_equal(_ijk_to_ras(image_seq.GetNthDataNode(0)), first_valid)
    assert [image_seq.GetNthDataNode(i).GetAttribute(mrml.ATTR_TRANSFORM_VALID) for i in range(3)] == [
        "false",
        "false",
        "true",
    ]


def test_image_status_fields_metadata_and_spacing_round_trip(mrml_scene):
    seq = make_synthetic_sequence(n_frames=5)
    seq.image_ok[3] = False
    seq.frames[3] = 0
    seq.frame_fields["ProbePosition"] = [f"{v:.1f}" for v in range(5)]
    seq.metadata.update({"UltrasoundImageType": "BRIGHTNESS", "Note": "a;b:c=d"})
    seq.pixel_spacing_mm = (0.2, 0.25)
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=_image_to_probe())
    assert browser.GetMasterSequenceNode().GetNthDataNode(3).GetAttribute(mrml.ATTR_IMAGE_STATUS) == "INVALID"
    back = mrml.browser_to_sequence(browser)
    np.testing.assert_array_equal(back.image_ok, seq.image_ok)
    assert back.frame_fields == seq.frame_fields
    assert back.metadata == seq.metadata
    assert back.pixel_spacing_mm == (0.2, 0.25)


def test_without_image_to_probe_frames_keep_pixel_geometry(mrml_scene):
    seq = make_synthetic_sequence(n_frames=3)
    seq.pixel_spacing_mm = (0.3, 0.4)
    browser = mrml.sequence_to_browser(mrml_scene, seq)
    image_seq = browser.GetMasterSequenceNode()
    assert image_seq.GetName() == "Recording-Image-Seq"
    assert image_seq.GetAttribute(mrml.ATTR_IMAGE_GEOMETRY) == "pixels"
    np.testing.assert_array_equal(_ijk_to_ras(image_seq.GetNthDataNode(1)), np.diag([0.3, 0.4, 1.0, 1.0]))
    back = mrml.browser_to_sequence(browser)
    assert set(back.transforms) == {"ProbeToTracker", "ReferenceToTracker"}
    np.testing.assert_array_equal(back.frames, seq.frames)


def test_reference_frame_and_fixed_transforms(mrml_scene):
    # Place the image in the Phantom frame through a fixed PhantomToReference.
    seq = make_synthetic_sequence(n_frames=4)
    image_to_probe = _image_to_probe()
    phantom_to_reference = np.eye(4)
    phantom_to_reference[:3, :3] = Rotation.from_rotvec([0.0, 0.4, 0.0]).as_matrix()
    phantom_to_reference[:3, 3] = [5.0, 6.0, 7.0]
    fixed = {"PhantomToReference": phantom_to_reference}
    browser = mrml.sequence_to_browser(
        mrml_scene,
        seq,
        image_to_probe=image_to_probe,
        fixed=fixed,
        image_name="US",
        reference_frame="Phantom",
    )
    assert browser.GetMasterSequenceNode().GetName() == "Recording-US_Phantom-Seq"
    back = mrml.browser_to_sequence(browser)
    expected = seq.repository({"ImageToProbe": image_to_probe, **fixed}).get("ImageToPhantom")
    ok = back.transforms["ImageToPhantom"].valid
    np.testing.assert_array_equal(ok, np.all(np.isfinite(expected), axis=(1, 2)))
    np.testing.assert_allclose(
        _corners_mm(back.transforms["ImageToPhantom"].matrices[ok], seq.n_rows, seq.n_cols),
        _corners_mm(expected[ok], seq.n_rows, seq.n_cols),
        atol=1e-6,
    )


def test_foreign_browser_with_transforms_at_other_times_is_interpolated(mrml_scene):
    # As recorded in Slicer from PlusServer: Image_Reference volumes (IJKToRAS = ImageToReference)
    # and a ProbeToTracker sequence sampled at its own times, no FreehandUS attributes.
    import slicer

    image_seq = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Image_Reference")
    probe_seq = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ProbeToTracker")
    image_to_reference = np.diag([0.2, 0.3, 1.0, 1.0])
    for k, t in enumerate([1.0, 1.1, 1.2]):
        vol = slicer.vtkMRMLScalarVolumeNode()
        vol.SetAndObserveImageData(mrml._image_data(np.full((1, 3, 4), k, np.uint8)))
        image_to_reference[0, 3] = k
        vol.SetIJKToRASMatrix(mrml.matrix_to_vtk(image_to_reference))
        image_seq.SetDataNodeAtValue(vol, f"{t:.3f}")
    for t in [0.95, 1.05, 1.15, 1.25]:
        tnode = slicer.vtkMRMLLinearTransformNode()
        m = np.eye(4)
        m[:3, 3] = [100.0 * t, 0.0, 0.0]
        tnode.SetMatrixTransformToParent(mrml.matrix_to_vtk(m))
        probe_seq.SetDataNodeAtValue(tnode, f"{t:.3f}")
    browser = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Recording")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(probe_seq.GetID())
    back = mrml.browser_to_sequence(browser)
    np.testing.assert_allclose(back.timestamps_s, [1.0, 1.1, 1.2])
    np.testing.assert_allclose(
        back.transforms["ProbeToTracker"].matrices[:, 0, 3], [100.0, 110.0, 120.0], atol=1e-9
    )
    assert back.transforms["ImageToReference"].valid.all()
    np.testing.assert_array_equal(back.transforms["ImageToReference"].matrices[:, 0, 3], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(back.frames[:, 0, 0], [0, 1, 2])


@pytest.mark.parametrize("unit, scale", [("s", 1.0), ("ms", 1000.0)])
def test_transform_items_at_rounded_image_times_are_matched_frame_by_frame(mrml_scene, unit, scale):
    # Images at sub-millisecond times, a ProbeToTracker read back by Slicer's metafile reader:
    # its times rounded to 1 ms (here also in another unit), no item where tracking was lost.
    import slicer

    times = [10.0001234, 10.0334567, 10.0667891, 10.1001234]
    image_seq = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Sweep-Image-Seq")
    probe_seq = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Sweep-ProbeToTracker-Seq")
    probe_seq.SetIndexUnit(unit)
    for k, t in enumerate(times):
        vol = slicer.vtkMRMLScalarVolumeNode()
        vol.SetAndObserveImageData(mrml._image_data(np.full((1, 3, 4), k, np.uint8)))
        image_seq.SetDataNodeAtValue(vol, repr(t))
        if k == 2:
            continue  # tracking lost
        tnode = slicer.vtkMRMLLinearTransformNode()
        m = np.eye(4)
        m[:3, 3] = [float(k), 0.0, 0.0]
        tnode.SetMatrixTransformToParent(mrml.matrix_to_vtk(m))
        probe_seq.SetDataNodeAtValue(tnode, f"{round(t * scale, 3 if scale == 1.0 else 0):g}")
    browser = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Sweep")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(probe_seq.GetID())
    back = mrml.browser_to_sequence(browser)
    np.testing.assert_array_equal(back.timestamps_s, times)
    probe = back.transforms["ProbeToTracker"]
    np.testing.assert_array_equal(probe.valid, [True, True, False, True])
    np.testing.assert_array_equal(probe.matrices[probe.valid, 0, 3], [0.0, 1.0, 3.0])


def test_proxies_are_made_when_no_sequences_logic_observes(tmp_path):
    import slicer

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)  # registers the sequence classes
    logic.SetMRMLScene(None)  # ... and stops observing: nobody creates proxies now
    browser = mrml.sequence_to_browser(
        scene, make_synthetic_sequence(n_frames=3), image_to_probe=_image_to_probe()
    )
    for s in _browser_sequences(browser):
        proxy = browser.GetProxyNode(s)
        assert proxy is not None and proxy.GetName() == f"Recording-{s.GetAttribute('Sequences.Source')}"
    image_proxy = browser.GetProxyNode(browser.GetMasterSequenceNode())
    assert image_proxy.GetImageData().GetDimensions() == (64, 48, 1)
    scene.Clear(1)


def test_import_freehanduslib_does_not_import_the_bridge_or_slicer():
    code = (
        "import sys, FreehandUSLib; "
        "print([m for m in ('FreehandUSLib.mrml', 'slicer') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- errors ----------------------------------------------------------------------------------
def test_non_increasing_timestamps_are_rejected(mrml_scene):
    seq = make_synthetic_sequence(n_frames=4)
    seq.timestamps_s[2] = seq.timestamps_s[1]
    with pytest.raises(SequenceError, match=r"strictly increase.*frame 2"):
        mrml.sequence_to_browser(mrml_scene, seq)


def test_non_finite_timestamps_are_rejected(mrml_scene):
    seq = make_synthetic_sequence(n_frames=4)
    seq.timestamps_s[3] = np.nan
    with pytest.raises(SequenceError, match=r"frames \[3\] are not finite"):
        mrml.sequence_to_browser(mrml_scene, seq)


def test_unresolvable_reference_with_image_to_probe_raises(mrml_scene):
    with pytest.raises(TransformError, match="ImageToPhantom"):
        mrml.sequence_to_browser(
            mrml_scene,
            make_synthetic_sequence(n_frames=2),
            image_to_probe=_image_to_probe(),
            reference_frame="Phantom",
        )


def test_singular_image_to_probe_raises(mrml_scene):
    with pytest.raises(TransformError, match="ImageToProbe.*not invertible"):
        mrml.sequence_to_browser(
            mrml_scene,
            make_synthetic_sequence(n_frames=2),
            image_to_probe=np.zeros((4, 4)) + np.diag([0, 0, 0, 1]),
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"reference_frame": "bad name"}, "reference_frame"), ({"image_name": "Im age"}, "image_name")],
)
def test_bad_names_raise(mrml_scene, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mrml.sequence_to_browser(mrml_scene, make_synthetic_sequence(n_frames=2), **kwargs)


def test_scene_without_sequences_logic_raises():
    import slicer

    with pytest.raises(ValueError, match="Sequences module logic"):
        mrml.sequence_to_browser(slicer.vtkMRMLScene(), make_synthetic_sequence(n_frames=2))


def test_wrong_argument_types_raise(mrml_scene):
    with pytest.raises(TypeError, match="TrackedSequence"):
        mrml.sequence_to_browser(mrml_scene, np.zeros((2, 4, 4), np.uint8))
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "NotABrowser")
    with pytest.raises(TypeError, match="vtkMRMLSequenceBrowserNode, got vtkMRMLScalarVolumeNode"):
        mrml.browser_to_sequence(volume)
    with pytest.raises(TypeError, match="vtkMRMLVolumeNode, got vtkMRMLLinearTransformNode"):
        mrml.node_to_volume(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"))
    with pytest.raises(TypeError, match="Volume"):
        mrml.volume_to_node(mrml_scene, np.zeros((2, 2, 2)), name="v")


def test_browser_without_volume_sequence_raises(mrml_scene):
    import slicer

    tseq = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ProbeToTracker")
    tseq.SetDataNodeAtValue(slicer.vtkMRMLLinearTransformNode(), "0")
    browser = mrml_scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "OnlyTransforms")
    browser.SetAndObserveMasterSequenceNodeID(tseq.GetID())
    with pytest.raises(SequenceError, match="'OnlyTransforms' has no volume sequence"):
        mrml.browser_to_sequence(browser)


def test_empty_volume_node_raises(mrml_scene):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    with pytest.raises(FileFormatError, match="'Empty': holds no image data"):
        mrml.node_to_volume(node)


# -- volumes and matrices --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "channels"), [(np.float32, 0), (np.uint8, 0), (np.int16, 0), (np.uint8, 3)]
)
def test_volume_round_trip_is_exact(mrml_scene, dtype, channels):
    rng = np.random.default_rng(3)
    shape = (5, 6, 7) + ((channels,) if channels else ())
    voxels = (rng.random(shape) * 200).astype(dtype)
    directions = Rotation.from_rotvec([0.3, -0.1, 0.7]).as_matrix()
    volume = Volume(
        voxels,
        spacing_mm=(0.5, 0.75, 1.25),
        origin_mm=(-10.0, 20.5, 3.25),
        directions=directions,
        metadata={"Source": "test"},
    )
    node = mrml.volume_to_node(mrml_scene, volume, name="Recon")
    assert node.GetClassName() == ("vtkMRMLVectorVolumeNode" if channels else "vtkMRMLScalarVolumeNode")
    assert node.GetName() == "Recon" and node.GetDisplayNode() is not None
    np.testing.assert_allclose(_ijk_to_ras(node), volume.ijk_to_world, rtol=0, atol=1e-12)
    back = mrml.node_to_volume(node)
    assert back.voxels.dtype == voxels.dtype
    np.testing.assert_array_equal(back.voxels, voxels)
    assert back.spacing_mm == volume.spacing_mm
    assert back.origin_mm == volume.origin_mm
    np.testing.assert_array_equal(back.directions, directions)
    assert back.metadata == {"Source": "test"}


def test_volume_voxel_order_is_kji(mrml_scene):
    voxels = np.zeros((2, 3, 4), np.uint8)
    voxels[1, 2, 3] = 9  # k=1, j=2, i=3
    node = mrml.volume_to_node(mrml_scene, Volume(voxels), name="Order")
    image = node.GetImageData()
    assert image.GetDimensions() == (4, 3, 2)
    assert image.GetScalarComponentAsDouble(3, 2, 1, 0) == 9


def test_matrix_helpers_round_trip():
    m = _image_to_probe()
    vm = mrml.matrix_to_vtk(m)
    assert isinstance(vm, vtk.vtkMatrix4x4)
    assert vm.GetElement(0, 3) == m[0, 3] and vm.GetElement(2, 1) == m[2, 1]
    np.testing.assert_array_equal(mrml.vtk_to_matrix(vm), m)


@pytest.mark.parametrize(
    ("bad", "message"), [(np.eye(3), r"4x4 matrix, got shape \(3, 3\)"), (np.full((4, 4), np.nan), "NaN")]
)
def test_matrix_to_vtk_rejects_bad_matrices(bad, message):
    with pytest.raises(TransformError, match=message):
        mrml.matrix_to_vtk(bad)


def test_vtk_to_matrix_rejects_other_types():
    with pytest.raises(TypeError, match="vtkMatrix4x4, got ndarray"):
        mrml.vtk_to_matrix(np.eye(4))


def test_transform_to_node(mrml_scene):
    m = _image_to_probe()
    node = mrml.transform_to_node(mrml_scene, m, name="ImageToProbe")
    assert node.GetClassName() == "vtkMRMLLinearTransformNode" and node.GetName() == "ImageToProbe"
    assert node.GetAttribute(mrml.ATTR_TRANSFORM_NAME) == "ImageToProbe"
    out = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(out)
    np.testing.assert_array_equal(mrml.vtk_to_matrix(out), m)
    with pytest.raises(TransformError, match="PhantomToReference.*not invertible"):
        mrml.transform_to_node(mrml_scene, np.diag([1.0, 0.0, 1.0, 1.0]), name="PhantomToReference")
    with pytest.raises(ValueError, match="name"):
        mrml.transform_to_node(mrml_scene, m, name="")


# -- scene files -----------------------------------------------------------------------------
def test_save_scene_and_reload(mrml_scene, tmp_path):
    seq = make_synthetic_sequence(n_frames=6, n_rows=20, n_cols=24)
    seq.frame_fields["ProbePosition"] = [str(i) for i in range(6)]
    image_to_probe = _image_to_probe()
    mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    volume = Volume(
        np.arange(60, dtype=np.float32).reshape(3, 4, 5),
        spacing_mm=(0.5, 0.6, 0.7),
        origin_mm=(1.0, 2.0, 3.0),
        directions=Rotation.from_rotvec([0.2, 0.1, 0.0]).as_matrix(),
    )
    mrml.volume_to_node(mrml_scene, volume, name="Reconstruction")
    mrml.transform_to_node(mrml_scene, image_to_probe, name="ImageToProbe")

    path = mrml.save_scene(mrml_scene, tmp_path / "demo" / "scene.mrml")
    assert path == tmp_path / "demo" / "scene.mrml" and path.is_file()
    files = {p.name for p in path.parent.iterdir()}
    assert {
        "Recording-Image_Reference-Seq.seq.mrb",
        "Recording-ProbeToTracker-Seq.seq.mrb",
        "Recording-ReferenceToTracker-Seq.seq.mrb",
        "Reconstruction.nrrd",
        "ImageToProbe.h5",
    } <= files
    assert not any(f.endswith(".csv") for f in files)  # default color tables are not saved

    reloaded = make_scene(cache_dir=tmp_path / "cache")
    try:
        reloaded.SetURL(str(path))
        assert reloaded.Import() == 1
        for cls in (
            "vtkMRMLSequenceNode",
            "vtkMRMLSequenceBrowserNode",
            "vtkMRMLScalarVolumeNode",
            "vtkMRMLLinearTransformNode",
        ):
            assert reloaded.GetNumberOfNodesByClass(cls) == mrml_scene.GetNumberOfNodesByClass(cls), cls
        recon = reloaded.GetFirstNodeByName("Reconstruction")
        back_volume = mrml.node_to_volume(recon)
        np.testing.assert_array_equal(back_volume.voxels, volume.voxels)
        np.testing.assert_allclose(_ijk_to_ras(recon), volume.ijk_to_world, atol=1e-9)
        itp = vtk.vtkMatrix4x4()
        reloaded.GetFirstNodeByName("ImageToProbe").GetMatrixTransformToParent(itp)
        np.testing.assert_allclose(mrml.vtk_to_matrix(itp), image_to_probe, atol=1e-12)
        browser = _nodes_by_class(reloaded, "vtkMRMLSequenceBrowserNode")[0]
        back = mrml.browser_to_sequence(browser)
        # Matrices inside .seq.mrb bundles are written as text: equal to ~1e-14, not bit-exact.
        expected = seq.repository({"ImageToProbe": image_to_probe}).get("ImageToReference")
        _assert_same_sequence(back, seq, expected, matrix_atol=1e-10)
        assert back.frame_fields == seq.frame_fields
    finally:
        release_scene(reloaded)


def test_save_scene_rejects_other_extensions(mrml_scene, tmp_path):
    with pytest.raises(ValueError, match=r"\.mrml, got 'scene\.mrb'"):
        mrml.save_scene(mrml_scene, tmp_path / "scene.mrb")


# -- real PLUS data ---------------------------------------------------------------------------
def _image_to_probe_from_config(path) -> np.ndarray:
    root = ET.parse(path).getroot()
    for t in root.iter("Transform"):
        if t.get("From") == "Image" and t.get("To") == "Probe":
            return np.array([float(v) for v in t.get("Matrix").split()]).reshape(4, 4)
    raise AssertionError(f"no ImageToProbe in {path}")


@pytest.mark.realdata
def test_spine_phantom_round_trip(mrml_scene):
    pytest.importorskip("FreehandUSLib.io.metaimage", reason="PLUS metafile reader not available yet")
    from FreehandUSLib.io import read_sequence

    seq = read_sequence(plus_file("TestImages/SpinePhantomFreehand.igs.mha"))
    image_to_probe = _image_to_probe_from_config(
        plus_file("ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml")
    )
    browser = mrml.sequence_to_browser(mrml_scene, seq, image_to_probe=image_to_probe)
    image_seq = browser.GetMasterSequenceNode()
    assert image_seq.GetName() == "Recording-Image_Reference-Seq"
    assert image_seq.GetNumberOfDataNodes() == 21
    assert image_seq.GetNthDataNode(0).GetImageData().GetDimensions() == (820, 616, 1)
    back = mrml.browser_to_sequence(browser)
    expected = seq.repository({"ImageToProbe": image_to_probe}).get("ImageToReference")
    assert np.all(np.isfinite(expected))  # every frame of this recording is tracked
    _assert_same_sequence(back, seq, expected)

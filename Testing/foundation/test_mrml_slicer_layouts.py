"""Recordings as Slicer itself lays them out, read by FreehandUSLib.mrml (real slicer-core classes).

Each test builds the node layout that a Slicer component makes, with Slicer's own classes
wherever slicer-core has them:

- Slicer's ``vtkMRMLLinearTransformSequenceStorageNode`` reading a PLUS ``.igs.mha``
  (``<base>-<Name>-Seq``, PLUS name in ``Sequences.Source``, times rounded to 1 ms);
- SlicerIGSIO's importers (``<track>-Image-Seq`` + ``<track>-<Name>-Seq``; not in slicer-core,
  so the layout its C++ code makes is rebuilt node by node);
- a SlicerOpenIGTLink stream from PlusServer recorded with the Sequences module (proxies named
  like the devices, sequences ``<proxy>-Sequence`` made by the real Sequences logic);
- File > Save with Slicer's default storage nodes and File > Open of the saved scene.

Also: loaded recordings never take a live OpenIGTLink device name.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402  (slicer-core pins it)
from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib import mrml_reconstruction as mr  # noqa: E402
from FreehandUSLib.simulation.analytic import simulate_analytic_sweep  # noqa: E402
from FreehandUSLib.reconstruction import ReconstructionOptions  # noqa: E402
from mrml_scene import make_scene, release_scene, reload_scene, save_like_slicer  # noqa: E402
from testdata import make_synthetic_sequence, plus_file  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

#: Device names PlusServer sends and SlicerOpenIGTLink gives its nodes.
LIVE_DEVICES = {
    "Image_Reference": "vtkMRMLScalarVolumeNode",
    "ProbeToTracker": "vtkMRMLLinearTransformNode",
    "ReferenceToTracker": "vtkMRMLLinearTransformNode",
}


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def _sequences_logic(scene):
    return scene.freehandus_test_objects["logics"]["Sequences"]


def _browser_sequences(browser) -> list:
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _nodes_by_class(scene, cls) -> list:
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    return mrml.vtk_to_matrix(m)


def _image_node(scene, frame, ijk_to_ras, name):
    """A one-slice volume node (not in the scene) holding ``frame`` (rows, cols)."""
    node = scene.CreateNodeByClass("vtkMRMLScalarVolumeNode")
    node.UnRegister(None)
    node.SetName(name)
    image = vtk.vtkImageData()
    image.SetDimensions(frame.shape[1], frame.shape[0], 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(frame).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.matrix_to_vtk(ijk_to_ras))
    return node


def _time_sequence(scene, name, source=None):
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    if source is not None:
        seq.SetAttribute("Sequences.Source", source)
    return seq


def _importer_layout(scene, seq, base, index_text, *, skip_invalid):
    """The browser SlicerIGSIO's importers make: ``<base>-Image-Seq`` (source ``Image``, pixel
    geometry) and ``<base>-<Name>-Seq`` (source ``<Name>``), items at ``index_text(t)``."""
    values = [index_text(t) for t in seq.timestamps_s]
    image_seq = _time_sequence(scene, f"{base}-Image-Seq", "Image")
    for i, value in enumerate(values):
        node = _image_node(scene, seq.frames[i], np.diag([0.2, 0.2, 1.0, 1.0]), f"Image_{i:04d}")
        image_seq.SetDataNodeAtValue(node, value)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", base)
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    for name, ft in seq.transforms.items():
        tseq = _time_sequence(scene, f"{base}-{name}-Seq", name)
        for i, value in enumerate(values):
            if skip_invalid and not ft.valid[i]:
                continue
            node = scene.CreateNodeByClass("vtkMRMLLinearTransformNode")
            node.UnRegister(None)
            node.SetName(f"{name}Transform_{i:04d}")
            node.SetMatrixTransformToParent(mrml.matrix_to_vtk(ft.matrices[i]))
            tseq.SetDataNodeAtValue(node, value)
        browser.AddSynchronizedSequenceNodeID(tseq.GetID())
    _sequences_logic(scene).UpdateProxyNodesFromSequences(browser)
    return browser


# -- item 2: every naming Slicer produces ----------------------------------------------------
@pytest.mark.realdata
def test_plus_file_read_by_slicers_transform_sequence_storage_node(scene):
    from FreehandUSLib.io import read_sequence

    path = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    tseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = scene.AddNewNodeByClass("vtkMRMLLinearTransformSequenceStorageNode")
    storage.SetFileName(str(path))
    tseq.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(tseq) == 1
    # What Slicer's reader makes: its own name and attribute, times with 3 decimals.
    assert tseq.GetName() == "SpinePhantomFreehand.igs-ProbeToTracker-Seq"
    assert tseq.GetAttribute("Sequences.Source") == "ProbeToTracker"
    plus = read_sequence(path)
    values = [tseq.GetNthIndexValue(i) for i in range(tseq.GetNumberOfDataNodes())]
    assert values == [f"{t:.3f}" for t in plus.timestamps_s]

    # The images next to it as SlicerIGSIO's metafile importer adds them (same rounded times).
    image_seq = _time_sequence(scene, "SpinePhantomFreehand.igs-Image-Seq", "Image")
    for i, value in enumerate(values):
        image_seq.SetDataNodeAtValue(_image_node(scene, plus.frames[i], np.eye(4), f"Image{i:04d}"), value)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "SpinePhantomFreehand.igs")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(tseq.GetID())
    _sequences_logic(scene).UpdateProxyNodesFromSequences(browser)

    back = mrml.browser_to_sequence(browser)
    assert set(back.transforms) == {"ProbeToTracker"}
    probe = back.transforms["ProbeToTracker"]
    assert probe.valid.all()
    np.testing.assert_allclose(probe.matrices, plus.transforms["ProbeToTracker"].matrices, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(back.frames, plus.frames)

    # ... and reconstruction runs on it, as on the file itself.
    image_to_probe = mrml.transform_to_node(scene, _spine_image_to_probe(), name="ImageToProbe")
    opts = ReconstructionOptions(output_spacing_mm=(3.0, 3.0, 3.0), image_to_reference_transform="ImageToTracker")
    result = mr.reconstruct_browser_to_volume_node(browser, image_to_probe_node=image_to_probe, options=opts)
    assert result.frames_used == plus.n_frames


def _spine_image_to_probe() -> np.ndarray:
    import xml.etree.ElementTree as ET

    root = ET.parse(plus_file("ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml")).getroot()
    for t in root.iter("Transform"):
        if t.get("From") == "Image" and t.get("To") == "Probe":
            return np.array([float(v) for v in t.get("Matrix").split()]).reshape(4, 4)
    raise AssertionError("no ImageToProbe in the PLUS configuration")


def test_plus_invalid_status_is_kept_when_slicers_reader_drops_it(scene, tmp_path):
    from FreehandUSLib.io import write_sequence

    # A PLUS file with tracking lost on frames 2 and 5 (PLUS writes a matrix and INVALID).
    seq = make_synthetic_sequence(n_frames=8)
    seq.transforms["ReferenceToTracker"].valid[:] = True
    probe = seq.transforms["ProbeToTracker"]
    probe.valid[[2, 5]] = False
    probe.matrices[[2, 5]] = np.eye(4)
    path = write_sequence(seq, tmp_path / "Lost.igs.mha")
    assert "Seq_Frame0002_ProbeToTrackerTransformStatus = INVALID" in path.read_bytes()[:20000].decode(errors="replace")
    tseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = scene.AddNewNodeByClass("vtkMRMLLinearTransformSequenceStorageNode")
    storage.SetFileName(str(path))
    tseq.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(tseq) == 1
    assert tseq.GetNumberOfDataNodes() == 8  # Slicer's reader keeps the invalid frames' matrices
    image_seq = _time_sequence(scene, "Lost.igs-Image-Seq", "Image")
    for i in range(8):
        image_seq.SetDataNodeAtValue(_image_node(scene, seq.frames[i], np.eye(4), "f"), tseq.GetNthIndexValue(i))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Lost.igs")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(tseq.GetID())

    back = mrml.browser_to_sequence(browser)

    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].valid, probe.valid)


@pytest.mark.parametrize(
    ("layout", "index_text"),
    [
        # SlicerIGSIO's sequence reader: times written with a default C++ stream (6 digits).
        ("SlicerIGSIO sequence reader", lambda t: f"{t:g}"),
        # SlicerIGSIO's metafile importer: Slicer's transform reader, times with 3 decimals.
        ("SlicerIGSIO metafile importer", lambda t: f"{t:.3f}"),
    ],
)
def test_importer_layouts_are_read(scene, layout, index_text):
    seq = make_synthetic_sequence(n_frames=6)  # ReferenceToTracker invalid at frame 3
    browser = _importer_layout(scene, seq, "Spine_Phantom", index_text, skip_invalid=False)
    names = {s.GetName() for s in _browser_sequences(browser)}
    assert names == {f"Spine_Phantom-{n}-Seq" for n in ("Image", "ProbeToTracker", "ReferenceToTracker")}
    back = mrml.browser_to_sequence(browser)
    # Pixel geometry only ("Image" names no frame; the file name is not one): no ImageTo<Frame>.
    assert set(back.transforms) == {"ProbeToTracker", "ReferenceToTracker"}, layout
    for name, ft in seq.transforms.items():
        # The importers keep every matrix (they do not read TransformStatus).
        np.testing.assert_array_equal(back.transforms[name].matrices, ft.matrices)
        assert back.transforms[name].valid.all()
    np.testing.assert_array_equal(back.timestamps_s, [float(index_text(t)) for t in seq.timestamps_s])


@pytest.mark.parametrize("suffix", ["Sequence", "Sekvencia"])  # the recorder's suffix is translated
def test_openigtlink_stream_recorded_with_the_sequences_module(scene, suffix):
    # SlicerOpenIGTLink makes one node per PlusServer device, named like the device; the image
    # node's IJKToRAS is ImageToReference. The Sequences module records each proxy on its own
    # clock into a sequence "<proxy>-Sequence" (made here by the real Sequences logic).
    seq = make_synthetic_sequence(n_frames=8)
    seq.transforms["ReferenceToTracker"].valid[:] = True
    image_to_reference = seq.repository({"ImageToProbe": np.diag([0.2, 0.25, 1.0, 1.0])}).get("ImageToReference")
    logic = _sequences_logic(scene)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "SequenceBrowser")
    image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Reference")
    image_seq = logic.AddSynchronizedNode(None, image, browser)
    assert image_seq.GetName() == "Image_Reference-Sequence"
    image_seq.SetName(f"Image_Reference-{suffix}")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    for i, t in enumerate(seq.timestamps_s):
        image_seq.SetDataNodeAtValue(_image_node(scene, seq.frames[i], image_to_reference[i], "f"), repr(float(t)))
    for name in ("ProbeToTracker", "ReferenceToTracker"):
        proxy = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        tseq = logic.AddSynchronizedNode(None, proxy, browser)
        assert tseq.GetName() == f"{name}-Sequence"
        tseq.SetName(f"{name}-{suffix}")
        # Tracking arrives 4 ms after each image, on the tracker's clock.
        for i, t in enumerate(seq.timestamps_s):
            node = scene.CreateNodeByClass("vtkMRMLLinearTransformNode")
            node.UnRegister(None)
            node.SetMatrixTransformToParent(mrml.matrix_to_vtk(seq.transforms[name].matrices[i]))
            tseq.SetDataNodeAtValue(node, repr(float(t) + 0.004))
    back = mrml.browser_to_sequence(browser)
    assert set(back.transforms) == {"ProbeToTracker", "ReferenceToTracker", "ImageToReference"}
    np.testing.assert_allclose(back.transforms["ImageToReference"].matrices, image_to_reference, atol=1e-9)
    assert back.transforms["ImageToReference"].valid.all()
    # Interpolated at the image times: valid from the first tracking sample on.
    assert not back.transforms["ProbeToTracker"].valid[0] and back.transforms["ProbeToTracker"].valid[1:].all()


@pytest.mark.realdata
def test_fcal_recordings_loaded_by_slicerigsio_calibrate(scene):
    from FreehandUSLib.io import read_sequence
    from NWireCalibrationLib import mrml_calibration as mc
    from nwire_synthetic import FCAL2_CONFIG

    browsers = []
    for name in ("fCal_Test_Calibration_3NWires_fCal2.0", "fCal_Test_Validation_3NWires_fCal2.0"):
        recording = read_sequence(plus_file(f"TestImages/{name}.igs.mha"))
        browsers.append(_importer_layout(scene, recording, f"{name}.igs", lambda t: f"{t:.3f}", skip_invalid=False))
    out = mc.calibrate_browsers(*browsers, mc.make_setup(plus_file(FCAL2_CONFIG)), solver="lsq")
    assert out.result.calibration.frames_segmented >= 189 and out.result.validation.frames_segmented == 103
    assert out.result.validation.error3d_trimmed95_mean_mm < 0.6  # PLUS: 0.540 mm


# -- item 3: invalid tracking and timestamps survive File > Save ------------------------------
def _sweep_with_invalid_frames():
    seq, image_to_probe = simulate_analytic_sweep(n_frames=16, n_rows=40, n_cols=32, pixel_spacing_mm=0.5)
    seq.timestamps_s = 1712345678.0 + np.cumsum(np.full(16, 0.0331234567))  # PLUS-like epoch times, sub-ms
    invalid = [5, 6, 11]
    seq.transforms["ProbeToTracker"].valid[invalid] = False
    seq.transforms["ProbeToTracker"].matrices[invalid] = np.eye(4)  # what a tracker reports when lost
    return seq, image_to_probe, invalid


def test_invalid_tracking_and_timestamps_survive_slicers_file_save(scene, tmp_path):
    seq, image_to_probe, invalid = _sweep_with_invalid_frames()
    mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep")
    path = save_like_slicer(scene, tmp_path / "saved" / "scene.mrml")
    # Slicer's own format for transform sequences (PLUS sequence metafile):
    (metafile,) = path.parent.glob("*ProbeToTracker*.seq.mha")
    assert "ProbeToTrackerTransform =" in metafile.read_text(errors="replace")
    reloaded = reload_scene(path, tmp_path / "cache")
    try:
        browser = _nodes_by_class(reloaded, "vtkMRMLSequenceBrowserNode")[0]
        back = mrml.browser_to_sequence(browser)
        np.testing.assert_array_equal(back.timestamps_s, seq.timestamps_s)  # full precision
        expected_valid = np.ones(seq.n_frames, bool)
        expected_valid[invalid] = False
        np.testing.assert_array_equal(back.transforms["ProbeToTracker"].valid, expected_valid)
        np.testing.assert_array_equal(back.transforms["ImageToTracker"].valid, expected_valid)
        good = expected_valid
        np.testing.assert_allclose(
            back.transforms["ProbeToTracker"].matrices[good], seq.transforms["ProbeToTracker"].matrices[good],
            rtol=0, atol=5e-4,  # Slicer's .seq.mha keeps 6 significant digits
        )
        opts = ReconstructionOptions(output_spacing_mm=(1.0, 1.0, 1.0), image_to_reference_transform="ImageToTracker")
        result = mr.reconstruct_browser_to_volume_node(browser, options=opts)
        assert sorted(result.frames_skipped) == invalid
        assert result.frames_used == seq.n_frames - len(invalid)
        # Slicer's reader renames a .seq.mha sequence <file base>-<Source>-Seq: our names survive.
        names = {s.GetName() for s in _browser_sequences(browser)}
        assert names == {"Sweep-Image_Tracker-Seq", "Sweep-ProbeToTracker-Seq"}
        proxies = {browser.GetProxyNode(s).GetName() for s in _browser_sequences(browser)}
        assert proxies == {"Sweep-Image_Tracker", "Sweep-ProbeToTracker"}
    finally:
        release_scene(reloaded)


# -- item 6: loaded recordings never take a live device name ----------------------------------
def _openigtlink_writes(scene, device, class_name, value):
    """What SlicerOpenIGTLink does with an incoming message: reuse the node named like the
    device (of the device's node class) or add one, then write into it."""
    coll = scene.GetNodesByClassByName(class_name, device)
    node = coll.GetItemAsObject(0) if coll.GetNumberOfItems() else scene.AddNewNodeByClass(class_name, device)
    if class_name == "vtkMRMLLinearTransformNode":
        node.SetMatrixTransformToParent(mrml.matrix_to_vtk(value))
    else:
        node.SetAndObserveImageData(_image_node(scene, value, np.eye(4), device).GetImageData())
    return node


def test_loaded_recordings_never_take_a_live_device_name(scene):
    seq = make_synthetic_sequence(n_frames=4)
    image_to_probe = np.diag([0.2, 0.2, 1.0, 1.0])
    first = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, browser_name="Sweep")
    second = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, browser_name="Sweep")
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    assert not set(names) & set(LIVE_DEVICES)
    assert first.GetName() == "Sweep" and second.GetName() != "Sweep"
    proxies = {}
    for browser in (first, second):
        for s in _browser_sequences(browser):
            proxy = browser.GetProxyNode(s)
            assert proxy.GetName() == f"{browser.GetName()}-{s.GetAttribute('Sequences.Source')}"
            proxies[proxy.GetID()] = proxy
    assert len(proxies) == 6  # two recordings never share a proxy
    before = {pid: (_matrix(p) if p.IsA("vtkMRMLTransformNode") else None) for pid, p in proxies.items()}

    # Connect SlicerOpenIGTLink to a PlusServer later: its nodes are new ones.
    incoming = {"vtkMRMLScalarVolumeNode": np.zeros((3, 3), np.uint8), "vtkMRMLLinearTransformNode": 2 * np.eye(4)}
    live = {device: _openigtlink_writes(scene, device, cls, incoming[cls]) for device, cls in LIVE_DEVICES.items()}
    assert not {n.GetID() for n in live.values()} & set(proxies)
    for pid, proxy in proxies.items():
        if before[pid] is not None:
            np.testing.assert_array_equal(_matrix(proxy), before[pid])
    back = mrml.browser_to_sequence(first)
    np.testing.assert_array_equal(back.frames, seq.frames)
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].matrices, seq.transforms["ProbeToTracker"].matrices)


# -- all together: a user's session ------------------------------------------------------------
@pytest.mark.realdata
def test_session_load_save_reopen_and_reconstruct_under_a_transform_tree(scene, tmp_path):
    """Load a PLUS sweep as Slicer does, File > Save, File > Open, hang the image under a
    SlicerIGT tree (ImageToProbe -> recorded ProbeToTracker -> TrackerToRAS) and reconstruct:
    the volume is the file's own reconstruction, moved by TrackerToRAS."""
    from FreehandUSLib.io import read_sequence
    from FreehandUSLib.reconstruction import reconstruct_volume

    path = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    plus = read_sequence(path)
    tseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = scene.AddNewNodeByClass("vtkMRMLLinearTransformSequenceStorageNode")
    storage.SetFileName(str(path))
    tseq.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(tseq) == 1
    image_seq = _time_sequence(scene, "SpinePhantomFreehand.igs-Image-Seq", "Image")
    for i in range(plus.n_frames):
        frame = _image_node(scene, plus.frames[i], np.eye(4), f"Image{i:04d}")
        image_seq.SetDataNodeAtValue(frame, tseq.GetNthIndexValue(i))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "SpinePhantomFreehand.igs")
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(tseq.GetID())
    _sequences_logic(scene).UpdateProxyNodesFromSequences(browser)

    saved = save_like_slicer(scene, tmp_path / "session" / "Spine.mrml")
    reopened = reload_scene(saved, tmp_path / "cache")
    try:
        browser = _nodes_by_class(reopened, "vtkMRMLSequenceBrowserNode")[0]
        image_seq = browser.GetMasterSequenceNode()
        (probe_seq,) = [s for s in _browser_sequences(browser) if s.GetID() != image_seq.GetID()]
        tracker_to_ras = np.eye(4)
        tracker_to_ras[:3, 3] = [30.0, -45.0, 60.0]  # whole voxels: the two grids line up
        to_ras = mrml.transform_to_node(reopened, tracker_to_ras, name="TrackerToRAS")
        calibration = mrml.transform_to_node(reopened, _spine_image_to_probe(), name="ImageToProbe")
        probe_proxy = browser.GetProxyNode(probe_seq)
        probe_proxy.SetAndObserveTransformNodeID(to_ras.GetID())
        calibration.SetAndObserveTransformNodeID(probe_proxy.GetID())
        browser.GetProxyNode(image_seq).SetAndObserveTransformNodeID(calibration.GetID())

        opts = ReconstructionOptions(output_spacing_mm=(3.0, 3.0, 3.0), image_to_reference_transform="ImageToTracker")
        result = mr.reconstruct_browser_to_volume_node(browser, options=opts)
        expected = reconstruct_volume(plus, {"ImageToProbe": _spine_image_to_probe()}, opts)

        assert result.frames_used == plus.n_frames
        np.testing.assert_allclose(
            result.grid.origin_mm, np.add(expected.grid.origin_mm, tracker_to_ras[:3, 3]), rtol=0, atol=1e-6
        )
        assert result.grid.dims == expected.grid.dims
        np.testing.assert_array_equal(result.volume.voxels, expected.volume.voxels)
    finally:
        release_scene(reopened)

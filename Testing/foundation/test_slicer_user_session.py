"""A user's whole session in Slicer, scripted headless on slicer-core (issue 22, "Done when").

One flow, as a user does it with the three modules:

1. File > Add Data of PLUS ``.igs.mha`` recordings (the fCal 2.0 calibration and validation
   sweeps and the spine sweep, one frame of which lost its tracking), laid out as Slicer's
   readers lay them out (:func:`mrml_scene.load_plus_like_slicer`), each looked at once in the
   FreehandUS panel (``browser_to_sequence``, what its Logic's ``sequenceFromBrowser`` calls);
2. File > Save with Slicer's default writers, File > Open of the saved scene. Slicer's
   ``.seq.mha`` writer writes the lost frame ``TransformStatus = OK``; it stays invalid because
   the first read kept PLUS's status in the scene (``FreehandUS.InvalidItems``). A scene saved
   before any module read the recording keeps it too, through the observer the Freehand US
   module installs at start-up (test_plus_status_observer.py);
3. N-Wire calibration of the reloaded fCal browsers (``NWireCalibrationLib.mrml_calibration``,
   what the module's Logic calls): the same ImageToProbe as the command line's Lib call on the
   files themselves;
4. reconstruction of the reloaded spine sweep whose image hangs under ``ReferenceToRAS``
   (``FreehandUSLib.mrml_reconstruction``): the CLI's volume of the same file moved by
   ReferenceToRAS, and the frame with lost tracking not used;
5. a sensorless trajectory estimate of the reloaded spine browser (speckle decorrelation):
   its transforms are placed under the same parent as the images.

A second test runs steps 1, 2, 4 and 5 on a small synthetic sweep, without the PLUS data.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib import mrml_reconstruction as mr  # noqa: E402
from FreehandUSLib.io import read_sequence, write_sequence  # noqa: E402
from FreehandUSLib.reconstruction import ReconstructionOptions, reconstruct_volume  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from NWireCalibrationLib.metrics import target_errors_mm  # noqa: E402
from NWireCalibrationLib.pipeline import calibrate  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from mrml_scene import load_plus_like_slicer, make_scene, release_scene, reload_scene, save_like_slicer  # noqa: E402
from nwire_synthetic import FCAL2_CONFIG  # noqa: E402
from testdata import make_synthetic_sequence, plus_file  # noqa: E402

pytestmark = pytest.mark.mrml

CALIBRATION = "TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha"
VALIDATION = "TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha"
SPINE = "TestImages/SpinePhantomFreehand.igs.mha"
SPINE_CONFIG = "ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml"
LOST_FRAME = 7
#: A quarter turn about S and whole voxels of the 3 mm grid: the tracked volume moved by it
#: lies on a grid whose voxel centres are voxel centres of the volume made in RAS.
REFERENCE_TO_RAS = np.array(
    [[0.0, -1.0, 0.0, 30.0], [1.0, 0.0, 0.0, -45.0], [0.0, 0.0, 1.0, 60.0], [0.0, 0.0, 0.0, 1.0]]
)


def _spine_image_to_probe() -> np.ndarray:
    import xml.etree.ElementTree as ET

    root = ET.parse(plus_file(SPINE_CONFIG)).getroot()
    for t in root.iter("Transform"):
        if t.get("From") == "Image" and t.get("To") == "Probe":
            return np.array([float(v) for v in t.get("Matrix").split()]).reshape(4, 4)
    raise AssertionError("no ImageToProbe in the PLUS configuration")


def _spine_with_lost_tracking(tmp_path):
    """The spine sweep as PLUS writes a frame whose probe was not seen: ``TransformStatus = INVALID``."""
    spine = read_sequence(plus_file(SPINE))
    spine.transforms["ProbeToTracker"].valid[LOST_FRAME] = False
    (tmp_path / "recordings").mkdir()
    path = write_sequence(spine, tmp_path / "recordings" / "SpineLost.igs.mha")
    header = path.read_bytes()[:40000].decode(errors="replace")
    assert f"Seq_Frame{LOST_FRAME:04d}_ProbeToTrackerTransformStatus = INVALID" in header
    return path


def _assert_same_volume_moved(moved, volume, to_world, *, min_filled=1000):
    """``moved`` (voxels of a grid in world) is ``volume`` (in its own frame) placed by ``to_world``:
    every voxel of each falls on a voxel of the other (resampling is then a permutation), and
    the values agree there."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in moved.dimensions), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    source = np.linalg.inv(volume.ijk_to_world) @ np.linalg.inv(to_world) @ moved.ijk_to_world @ ijk
    index = np.rint(source[:3]).astype(int)
    np.testing.assert_allclose(source[:3], index, rtol=0, atol=1e-6)  # on the grid
    assert sorted(moved.dimensions) == sorted(volume.dimensions)
    inside = np.all((index >= 0) & (index < np.array(volume.dimensions)[:, None]), axis=0)
    assert inside.all(), f"{(~inside).sum()} voxels of the moved volume are outside the volume"
    sampled = volume.voxels[index[2], index[1], index[0]]
    np.testing.assert_array_equal(moved.voxels[k.ravel(), j.ravel(), i.ravel()], sampled)
    assert np.count_nonzero(sampled) > min_filled  # the sweep is in it, not an empty box


def _browser(scene, name):
    coll = scene.GetNodesByClassByName("vtkMRMLSequenceBrowserNode", name)
    assert coll.GetNumberOfItems() == 1, f"no single browser {name!r} in the reloaded scene"
    return coll.GetItemAsObject(0)


def _parent(node):
    parent = node.GetParentTransformNode()
    return None if parent is None else parent.GetID()


@pytest.fixture
def session():
    scenes = []
    yield scenes
    for s in scenes:
        release_scene(s)


@pytest.mark.realdata
def test_load_save_reopen_calibrate_reconstruct_and_estimate(session, tmp_path):
    setup = mc.make_setup(plus_file(FCAL2_CONFIG))
    spine_path = _spine_with_lost_tracking(tmp_path)

    # 1. File > Add Data, as Slicer's readers lay the recordings out.
    scene = make_scene(tmp_path / "cache-1")
    session.append(scene)
    for path in (plus_file(CALIBRATION), plus_file(VALIDATION), spine_path):
        browser = load_plus_like_slicer(scene, path)
        # ... and looks at it in the FreehandUS panel (its Logic's sequenceFromBrowser).
        tracking = mrml.browser_to_sequence(browser).transforms
        assert {"ProbeToTracker", "ReferenceToTracker"} <= set(tracking)
    assert np.flatnonzero(~tracking["ProbeToTracker"].valid).tolist() == [LOST_FRAME]

    # 2. File > Save with Slicer's writers, File > Open.
    saved = save_like_slicer(scene, tmp_path / "session" / "Session.mrml")
    # Slicer's .seq.mha writer writes the lost frame "TransformStatus = OK"; the scene keeps it invalid.
    (probe_file,) = saved.parent.glob("SpineLost*ProbeToTracker*.seq.mha")
    assert f"Seq_Frame{LOST_FRAME:04d}_ProbeToTrackerTransformStatus = OK" in probe_file.read_text(errors="replace")
    assert mrml.ATTR_INVALID_ITEMS in saved.read_text()
    reopened = reload_scene(saved, tmp_path / "cache-2")
    session.append(reopened)
    cal_browser = _browser(reopened, "fCal_Test_Calibration_3NWires_fCal2.0.igs")
    val_browser = _browser(reopened, "fCal_Test_Validation_3NWires_fCal2.0.igs")
    spine_browser = _browser(reopened, "SpineLost.igs")

    # 3. N-Wire calibration from the reloaded browsers = the CLI's Lib call on the files.
    out = mc.calibrate_browsers(cal_browser, val_browser, setup, solver="lsq")
    expected_cal = calibrate(read_sequence(plus_file(CALIBRATION)), read_sequence(plus_file(VALIDATION)), setup,
                             solver="lsq")
    assert out.result.calibration.frames_segmented == expected_cal.calibration.frames_segmented
    assert out.result.validation.frames_segmented == expected_cal.validation.frames_segmented
    width, height = 820, 616
    assert target_errors_mm(out.image_to_probe, expected_cal.image_to_probe, (width, height)).max() < 1e-3
    assert out.result.validation.error3d_trimmed95_mean_mm < 0.6  # PLUS: 0.540 mm

    # 4. Reconstruction of the spine sweep with its image under ReferenceToRAS.
    reference_to_ras = mrml.transform_to_node(reopened, REFERENCE_TO_RAS, name="ReferenceToRAS")
    image_proxy = mc.image_proxy_node(spine_browser)
    image_proxy.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    image_to_probe = mrml.transform_to_node(reopened, _spine_image_to_probe(), name="SpineImageToProbe")
    # Grids anchored at Reference's origin, seen from each side: the two lattices coincide.
    opts = ReconstructionOptions(output_spacing_mm=(3.0, 3.0, 3.0), output_origin_mm=(0.0, 0.0, 0.0))
    result = mr.reconstruct_browser_to_volume_node(
        spine_browser, image_to_probe_node=image_to_probe,
        options=opts.replace(output_origin_mm=tuple(REFERENCE_TO_RAS[:3, 3])),
    )
    spine = read_sequence(spine_path)
    expected = reconstruct_volume(spine, {"ImageToProbe": _spine_image_to_probe()}, opts)
    assert expected.frames_used == spine.n_frames - 1 and LOST_FRAME in expected.frames_skipped
    assert result.frames_used == expected.frames_used
    assert list(result.frames_skipped) == list(expected.frames_skipped)
    _assert_same_volume_moved(result.volume, expected.volume, REFERENCE_TO_RAS)

    # 5. Sensorless estimate of the reloaded spine browser: placed where its images are.
    summary = mt.estimate_trajectory_to_browser(
        spine_browser, model="decorrelation", image_to_probe=_spine_image_to_probe()
    )
    estimate_seq = mt.find_estimate_sequence(spine_browser)
    assert estimate_seq is not None and summary["frames"] == spine.n_frames
    estimate_proxy = spine_browser.GetProxyNode(estimate_seq)
    assert summary["parent_transform"] == "ReferenceToRAS"
    assert _parent(estimate_proxy) == _parent(image_proxy) == reference_to_ras.GetID()


def test_synthetic_sweep_keeps_its_lost_frame_and_lands_under_reference_to_ras(session, tmp_path):
    """The same steps without the PLUS data: a small sweep whose probe was lost on two frames."""
    seq = make_synthetic_sequence(n_frames=10, n_rows=40, n_cols=48)
    seq.transforms["ReferenceToTracker"].valid[:] = True
    for ft in seq.transforms.values():  # 6 significant digits, as PLUS and Slicer's .seq.mha write them
        ft.matrices[:] = np.vectorize(lambda v: float(f"{v:.6g}"))(ft.matrices)
    lost = [2, 7]
    seq.transforms["ProbeToTracker"].valid[lost] = False
    image_to_probe = np.diag([0.4, 0.4, 1.0, 1.0])
    (tmp_path / "recordings").mkdir()
    path = write_sequence(seq, tmp_path / "recordings" / "Sweep.igs.mha")
    scene = make_scene(tmp_path / "cache-1")
    session.append(scene)
    mrml.browser_to_sequence(load_plus_like_slicer(scene, path))
    saved = save_like_slicer(scene, tmp_path / "session" / "Sweep.mrml")
    reopened = reload_scene(saved, tmp_path / "cache-2")
    session.append(reopened)
    browser = _browser(reopened, "Sweep.igs")
    back = mrml.browser_to_sequence(browser)
    assert np.flatnonzero(~back.transforms["ProbeToTracker"].valid).tolist() == lost
    assert back.transforms["ReferenceToTracker"].valid.all()

    reference_to_ras = mrml.transform_to_node(reopened, REFERENCE_TO_RAS, name="ReferenceToRAS")
    image_proxy = mc.image_proxy_node(browser)
    image_proxy.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    calibration = mrml.transform_to_node(reopened, image_to_probe, name="ImageToProbe")
    opts = ReconstructionOptions(output_spacing_mm=(5.0, 5.0, 5.0), output_origin_mm=(0.0, 0.0, 0.0))
    result = mr.reconstruct_browser_to_volume_node(
        browser, image_to_probe_node=calibration, options=opts.replace(output_origin_mm=tuple(REFERENCE_TO_RAS[:3, 3]))
    )
    expected = reconstruct_volume(read_sequence(path), {"ImageToProbe": image_to_probe}, opts)  # the CLI's
    assert sorted(result.frames_skipped) == sorted(expected.frames_skipped) == lost
    _assert_same_volume_moved(result.volume, expected.volume, REFERENCE_TO_RAS, min_filled=50)

    # A parent that names no frame of the recording: the tree starts at Probe (SlicerIGT's
    # Image -> ImageToProbe -> ProbeToRAS reading), as before.
    probe_to_ras = mrml.transform_to_node(reopened, REFERENCE_TO_RAS, name="ScannerToRAS")
    image_proxy.SetAndObserveTransformNodeID(probe_to_ras.GetID())
    fixed = mr.reconstruct_browser_to_volume_node(browser, image_to_probe_node=calibration, output_spacing_mm=1.0)
    assert fixed.frames_used == seq.n_frames  # every frame at the same fixed pose

    image_proxy.SetAndObserveTransformNodeID(reference_to_ras.GetID())
    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation", image_to_probe=image_to_probe)
    assert summary["parent_transform"] == "ReferenceToRAS"
    assert _parent(browser.GetProxyNode(mt.find_estimate_sequence(browser))) == reference_to_ras.GetID()

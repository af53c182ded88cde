"""Reconstruction through MRML (FreehandUSLib.mrml_reconstruction) with the real slicer-core classes.

The Slicer module's Logic is thin glue over these functions, so this is where "the Logic is
tested headless" happens: browsers and live image nodes in, volume nodes out, compared with
:func:`~FreehandUSLib.reconstruction.reconstruct_volume` on the same frames.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import slicer  # noqa: E402
import vtk  # noqa: E402  (slicer-core pins it)
from FreehandUSLib import FreehandUSError, SequenceError, TrackedSequence, TransformError, mrml  # noqa: E402
from FreehandUSLib import mrml_reconstruction as mr  # noqa: E402
from FreehandUSLib.simulation.analytic import simulate_analytic_sweep  # noqa: E402
from FreehandUSLib.reconstruction import (  # noqa: E402
    InvalidOptionError,
    ReconstructionError,
    ReconstructionOptions,
    reconstruct_volume,
    roi_options,
)
from mrml_scene import make_scene, release_scene  # noqa: E402
from testdata import make_synthetic_sequence, plus_file  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

SPACING = (1.0, 1.0, 1.0)


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture(scope="module")
def sweep():
    """(sequence with ProbeToTracker, ImageToProbe): 24 frames 60x48, 0.4 mm pixels."""
    return simulate_analytic_sweep(n_frames=24, n_rows=60, n_cols=48, pixel_spacing_mm=0.4, step_mm=0.6)


def _opts(**kw) -> ReconstructionOptions:
    base = {"output_spacing_mm": SPACING, "image_to_reference_transform": "ImageToTracker"}
    base.update(kw)
    return ReconstructionOptions(**base)


def _calibrated_browser(scene, seq, image_to_probe, name="Sweep"):
    return mrml.sequence_to_browser(
        scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name=name
    )


def _volume_node(scene, name="Output"):
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)


def _voxels(node) -> np.ndarray:
    image = node.GetImageData()
    n_i, n_j, n_k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(n_k, n_j, n_i).copy()


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml.vtk_to_matrix(m)


def _as_stored(matrices: np.ndarray) -> np.ndarray:
    """ImageToReference as a volume node gives it back (IJKToRAS is kept as spacing/origin/axes).

    The round trip may change the last bit, which moves a pixel lying exactly between two
    voxels; live results are compared with batch results on these matrices.
    """
    node = slicer.vtkMRMLScalarVolumeNode()
    out = np.empty_like(matrices)
    for f, matrix in enumerate(matrices):
        node.SetIJKToRASMatrix(mrml.matrix_to_vtk(matrix))
        out[f] = _ijk_to_ras(node)
    return out


def _stored_sequence(seq, mats) -> TrackedSequence:
    """``seq``'s frames with ImageToTracker = ``mats`` as an image node stores them."""
    return TrackedSequence(
        frames=seq.frames, transforms={"ImageToTracker": (_as_stored(mats), np.ones(seq.n_frames, dtype=bool))}
    )


def _fixed_roi_options(result, **kw) -> ReconstructionOptions:
    """Options whose fixed grid is ``result``'s grid (live and batch then share one grid)."""
    g = result.grid
    return _opts(
        output_origin_mm=g.origin_mm,
        output_extent=tuple(v for d in g.dims for v in (0, d - 1)),
        **kw,
    )


# --------------------------------------------------------------------------------------------
# Batch: browser -> volume node
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation,compounding", [("nearest", "max"), ("linear", "mean"), ("nearest", "latest")])
def test_browser_reconstruction_equals_reconstruct_volume(scene, sweep, interpolation, compounding):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    out = _volume_node(scene)
    opts = _opts(interpolation=interpolation, compounding=compounding)
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, opts)

    result = mr.reconstruct_browser_to_volume_node(
        browser, out, output_spacing_mm=SPACING, interpolation=interpolation, compounding=compounding,
        image_to_reference_transform="ImageToTracker",
    )  # fmt: skip

    assert result.grid.same_as(expected.grid)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    assert _voxels(out).dtype == np.uint8
    np.testing.assert_allclose(_ijk_to_ras(out), expected.volume.ijk_to_world, rtol=0, atol=1e-12)
    assert out.GetParentTransformNode() is None
    # provenance
    assert out.GetAttribute(mr.ATTR_RECON_MODE) == "batch"
    assert out.GetAttribute(mr.ATTR_RECON_SOURCE) == "Sweep"
    assert out.GetAttribute(mr.ATTR_RECON_FRAMES_USED) == str(seq.n_frames)
    assert out.GetAttribute(mr.ATTR_RECON_FRAMES_SKIPPED) == "0"
    assert float(out.GetAttribute(mr.ATTR_RECON_SECONDS)) > 0
    options = json.loads(out.GetAttribute(mr.ATTR_RECON_OPTIONS))
    assert (options["interpolation"], options["compounding"]) == (interpolation, compounding)
    assert ReconstructionOptions(**{k: v for k, v in options.items()}).output_spacing_mm == SPACING
    summary = json.loads(out.GetAttribute(mr.ATTR_RECON_SUMMARY))
    assert summary["dimensions"] == list(expected.grid.dims)
    assert float(out.GetAttribute(mr.ATTR_RECON_COVERAGE)) == pytest.approx(expected.coverage_fraction)
    assert out.GetNodeReference(mr.REF_RECON_SOURCE) is browser
    assert out.GetDisplayNode() is not None


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_plus_arithmetic_reaches_the_reconstruction(scene, sweep, interpolation):
    """The panel's "PLUS arithmetic" (emulate_plus) gives PLUS's mean, not the exact one."""
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    out = _volume_node(scene)
    mr.reconstruct_browser_to_volume_node(
        browser, out, output_spacing_mm=SPACING, interpolation=interpolation, compounding="mean", emulate_plus=True,
        image_to_reference_transform="ImageToTracker",
    )  # fmt: skip
    plus = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts(interpolation=interpolation, emulate_plus=True))
    exact = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts(interpolation=interpolation))
    np.testing.assert_array_equal(_voxels(out), plus.volume.voxels)
    assert not np.array_equal(plus.volume.voxels, exact.volume.voxels)
    assert json.loads(out.GetAttribute(mr.ATTR_RECON_OPTIONS))["emulate_plus"] is True


def test_image_to_probe_node_places_an_uncalibrated_recording(scene, sweep):
    seq, image_to_probe = sweep
    browser = mrml.sequence_to_browser(scene, seq, browser_name="Raw")  # pixel geometry only
    calibration = mrml.transform_to_node(scene, image_to_probe, name="ImageToProbe")
    out = _volume_node(scene)
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())

    result = mr.reconstruct_browser_to_volume_node(
        browser, out, image_to_probe_node=calibration, options=_opts()
    )

    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    assert result.frames_used == seq.n_frames
    assert out.GetNodeReference(mr.REF_RECON_IMAGE_TO_PROBE) is calibration


def test_image_to_probe_node_overrides_the_frames_geometry(scene, sweep):
    """A recording shown with calibration A, reconstructed with calibration B: B is used."""
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    recalibrated = image_to_probe.copy()
    recalibrated[:3, 3] += [3.0, 0.0, 2.0]
    node = mrml.transform_to_node(scene, recalibrated, name="ImageToProbeB")
    out = _volume_node(scene)
    expected = reconstruct_volume(seq, {"ImageToProbe": recalibrated}, _opts())
    original = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())

    mr.reconstruct_browser_to_volume_node(browser, out, image_to_probe_node=node, options=_opts())

    np.testing.assert_allclose(out.GetOrigin(), expected.grid.origin_mm, atol=1e-9)
    assert not np.allclose(out.GetOrigin(), original.grid.origin_mm)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)


def test_invalid_frames_are_skipped_and_recorded(scene):
    seq = make_synthetic_sequence(n_frames=8, n_rows=24, n_cols=32)  # one invalid ReferenceToTracker
    image_to_probe = np.diag([0.25, 0.25, 1.0, 1.0])
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, browser_name="Synthetic")
    out = _volume_node(scene)
    opts = ReconstructionOptions(output_spacing_mm=4.0, compounding="max")
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, opts)

    result = mr.reconstruct_browser_to_volume_node(browser, out, options=opts)

    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    assert result.frames_skipped == {seq.n_frames // 2: "invalid_transform"}
    assert out.GetAttribute(mr.ATTR_RECON_FRAMES_SKIPPED) == "1"
    assert out.GetAttribute(mr.ATTR_RECON_FRAMES_USED) == str(seq.n_frames - 1)
    summary = json.loads(out.GetAttribute(mr.ATTR_RECON_SUMMARY))
    assert summary["frames_skipped_by_reason"] == {"invalid_transform": 1}


def _tracker_to_ras() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    m[:3, 3] = [40.0, -25.0, 60.0]
    return m


def test_image_proxy_under_a_parent_transform_is_reconstructed_where_slicer_shows_it(scene, sweep):
    # The frames' IJKToRAS is ImageToTracker; the user puts the image under TrackerToRAS, so
    # Slicer shows every frame at TrackerToRAS @ ImageToTracker. The volume must land there too.
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    parent = mrml.transform_to_node(scene, _tracker_to_ras(), name="TrackerToRAS")
    browser.GetProxyNode(browser.GetMasterSequenceNode()).SetAndObserveTransformNodeID(parent.GetID())
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    shown = _tracker_to_ras() @ _as_stored(seq.repository({"ImageToProbe": image_to_probe}).get("ImageToTracker"))
    centre = shown[seq.n_frames // 2] @ [seq.n_cols / 2, seq.n_rows / 2, 0.0, 1.0]
    roi.SetCenterWorld(*centre[:3])
    roi.SetSize(30.0, 30.0, 30.0)
    in_world = TrackedSequence(frames=seq.frames, transforms={"ImageToRAS": (shown, np.ones(seq.n_frames, bool))})
    # The ROI read as the module reads it (markups keep float32 coordinates), the frames in RAS.
    opts = mr.roi_node_options(roi, _opts(compounding="max").replace(image_to_reference_transform="ImageToRAS"))
    expected = reconstruct_volume(in_world, None, opts)
    out = _volume_node(scene)

    result = mr.reconstruct_browser_to_volume_node(browser, out, roi_node=roi, options=_opts(compounding="max"))

    assert result.grid.same_as(expected.grid)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    assert _voxels(out).any()
    np.testing.assert_allclose(_ijk_to_ras(out), expected.volume.ijk_to_world, rtol=0, atol=1e-9)
    assert json.loads(out.GetAttribute(mr.ATTR_RECON_OPTIONS))["image_to_reference_transform"] == "ImageToRAS"


def test_slicerigt_transform_tree_with_recorded_tracking(scene, sweep):
    # SlicerIGT's layout: the image (pixels, IJKToRAS = identity as PLUS's Image_Image) under
    # ImageToProbe -> the recorded ProbeToTracker proxy -> TrackerToRAS; tracking lost on 2 frames.
    seq0, image_to_probe = sweep
    probe = seq0.transforms["ProbeToTracker"]
    valid = probe.valid.copy()
    valid[[3, 4]] = False
    seq = TrackedSequence(frames=seq0.frames, timestamps_s=seq0.timestamps_s,
                          transforms={"ProbeToTracker": (probe.matrices, valid)})  # fmt: skip
    browser = mrml.sequence_to_browser(scene, seq, browser_name="Tree")
    calibration = mrml.transform_to_node(scene, image_to_probe, name="ImageToProbe")
    tracker_to_ras = mrml.transform_to_node(scene, _tracker_to_ras(), name="TrackerToRAS")
    probe_seq = next(s for s in _browser_sequences(browser) if s.GetAttribute("Sequences.Source") == "ProbeToTracker")
    probe_proxy = browser.GetProxyNode(probe_seq)
    probe_proxy.SetAndObserveTransformNodeID(tracker_to_ras.GetID())
    calibration.SetAndObserveTransformNodeID(probe_proxy.GetID())
    browser.GetProxyNode(browser.GetMasterSequenceNode()).SetAndObserveTransformNodeID(calibration.GetID())
    shown = _tracker_to_ras() @ probe.matrices @ image_to_probe
    in_world = TrackedSequence(frames=seq.frames, transforms={"ImageToRAS": (shown, valid)})
    expected = reconstruct_volume(in_world, None, _opts().replace(image_to_reference_transform="ImageToRAS"))
    out = _volume_node(scene)

    result = mr.reconstruct_browser_to_volume_node(browser, out, options=_opts())

    assert sorted(result.frames_skipped) == [3, 4]
    assert result.grid.same_as(expected.grid)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    # The same with the calibration node selected as well (it is in the tree: not applied twice).
    again = mr.reconstruct_browser_to_volume_node(
        browser, _volume_node(scene, "Again"), image_to_probe_node=calibration, options=_opts()
    )
    assert again.grid.same_as(expected.grid)
    # The image straight under the probe, the calibration selected instead: the same volume.
    browser.GetProxyNode(browser.GetMasterSequenceNode()).SetAndObserveTransformNodeID(probe_proxy.GetID())
    selected = _volume_node(scene, "Selected")
    mr.reconstruct_browser_to_volume_node(browser, selected, image_to_probe_node=calibration, options=_opts())
    np.testing.assert_array_equal(_voxels(selected), expected.volume.voxels)


def test_transform_tree_is_not_applied_to_another_frame_than_the_images(scene, sweep, caplog):
    # The frames are placed in Tracker; a volume asked in the Probe frame cannot go through a
    # tree above Tracker: it is made in Probe, as without the tree (and that is logged).
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    opts = _opts().replace(image_to_reference_transform="ImageToProbe")
    plain = mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene, "Plain"), options=opts)
    parent = mrml.transform_to_node(scene, _tracker_to_ras(), name="TrackerToRAS")
    browser.GetProxyNode(browser.GetMasterSequenceNode()).SetAndObserveTransformNodeID(parent.GetID())
    with caplog.at_level("WARNING"):
        result = mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene, "Asked"), options=opts)
    assert result.grid.same_as(plain.grid)
    assert "reconstructing in Probe without them" in caplog.text


def test_non_linear_transform_above_the_image_is_refused(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
    browser.GetProxyNode(browser.GetMasterSequenceNode()).SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(TransformError, match="'Warp' above the image .* is not linear"):
        mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene), options=_opts())


def _browser_sequences(browser) -> list:
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def test_new_output_node_progress_and_default_hole_filling(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    calls = []
    n_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")

    result = mr.reconstruct_browser_to_volume_node(
        browser, None, progress=lambda done, total: calls.append((done, total)), fill_holes=True,
        output_spacing_mm=0.3, image_to_reference_transform="ImageToTracker",
    )  # fmt: skip

    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_before + 1
    out = scene.GetFirstNodeByName("SweepReconstruction")
    assert out is not None and out.GetAttribute(mr.ATTR_RECON_FRAMES_USED) == str(seq.n_frames)
    assert calls and calls[-1] == (seq.n_frames, seq.n_frames)
    assert [e.type for e in result.options.hole_filling] == ["GAUSSIAN_ACCUMULATION", "STICK"]
    assert result.hole_filling is not None and result.filled_fraction > result.coverage_fraction


def test_roi_node_restricts_the_grid(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    full = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())
    lo = np.asarray(full.grid.origin_mm)
    hi = lo + (np.asarray(full.grid.dims) - 1) * np.asarray(full.grid.spacing_mm)
    # the middle half of each axis, in quarter millimetres (markups store float32 coordinates)
    centre, size = np.round(2 * (lo + hi)) / 4, np.round(2 * (hi - lo)) / 4
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    out = _volume_node(scene)
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, roi_options(_opts(), centre, size))

    result = mr.reconstruct_browser_to_volume_node(browser, out, roi_node=roi, options=_opts())

    assert result.grid.same_as(expected.grid)
    assert all(r < f for r, f in zip(result.grid.dims, full.grid.dims))
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    centre_voxel = _ijk_to_ras(out) @ np.array([*(np.asarray(result.grid.dims) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre_voxel[:3], centre, atol=1e-9)
    assert out.GetNodeReference(mr.REF_RECON_ROI) is roi


def test_rotated_roi_node_gives_an_oblique_grid(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    full = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())
    centre = np.round(4 * (np.asarray(full.grid.origin_mm) + (np.asarray(full.grid.dims) - 1) * 0.5)) / 4
    rotation = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    to_world = np.eye(4)
    to_world[:3, :3] = rotation
    to_world[:3, 3] = centre - rotation @ centre  # rotate about the centre
    parent = mrml.transform_to_node(scene, to_world, name="RoiRotation")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Oblique")
    roi.SetCenter(*centre)
    roi.SetSize(10.0, 12.0, 8.0)
    roi.SetAndObserveTransformNodeID(parent.GetID())
    options = mr.roi_node_options(roi, _opts())
    np.testing.assert_allclose(np.asarray(options.output_directions), rotation, atol=1e-9)
    out = _volume_node(scene)

    result = mr.reconstruct_browser_to_volume_node(browser, out, roi_node=roi, options=_opts())

    assert result.grid.dims == (11, 13, 9)
    directions = [[0.0] * 3 for _ in range(3)]
    out.GetIJKToRASDirections(directions)
    np.testing.assert_allclose(directions, rotation, atol=1e-9)
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, options)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)


def test_coverage_volume_node(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    out, coverage = _volume_node(scene), _volume_node(scene, "Coverage")
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())

    result = mr.reconstruct_browser_to_volume_node(browser, out, coverage_volume_node=coverage, options=_opts())

    weight = _voxels(coverage)
    assert weight.dtype == np.float32
    np.testing.assert_array_equal(weight, expected.weight.voxels)
    np.testing.assert_allclose(_ijk_to_ras(coverage), _ijk_to_ras(out), atol=0)
    assert np.mean(weight > 0) == pytest.approx(result.coverage_fraction)
    assert 0 < result.coverage_fraction < 1
    assert coverage.GetAttribute(mr.ATTR_RECON_CHANNEL) == "weight"
    assert out.GetNodeReference(mr.REF_RECON_COVERAGE) is coverage
    display = coverage.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"
    assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 1


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_no_browser_is_a_clear_error(scene):
    with pytest.raises(ReconstructionError, match="no sequence browser"):
        mr.reconstruct_browser_to_volume_node(None, _volume_node(scene))
    image = _volume_node(scene, "NotABrowser")
    with pytest.raises(FreehandUSError, match="NotABrowser.*vtkMRMLScalarVolumeNode.*SequenceBrowser"):
        mr.reconstruct_browser_to_volume_node(image, _volume_node(scene))


def test_browser_without_image_sequence(scene):
    seq_node = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ProbeToTracker")
    transform = vtk.vtkMatrix4x4()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tmp")
    for t in range(3):
        transform.SetElement(0, 3, float(t))
        node.SetMatrixTransformToParent(transform)
        seq_node.SetDataNodeAtValue(node, str(t))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "TrackingOnly")
    browser.SetAndObserveMasterSequenceNodeID(seq_node.GetID())
    with pytest.raises(SequenceError, match="TrackingOnly.*no volume sequence"):
        mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene))


def test_missing_image_to_probe_is_a_clear_error(scene, sweep):
    seq, _ = sweep
    browser = mrml.sequence_to_browser(scene, seq, browser_name="Uncalibrated")
    with pytest.raises(TransformError, match=r"Uncalibrated.*ImageToProbe.*ProbeToTracker"):
        mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene), options=_opts())


def test_singular_image_to_probe_node(scene, sweep):
    seq, _ = sweep
    browser = mrml.sequence_to_browser(scene, seq, browser_name="Uncalibrated")
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Flat")
    flat = vtk.vtkMatrix4x4()
    flat.SetElement(2, 2, 0.0)
    node.SetMatrixTransformToParent(flat)
    with pytest.raises(TransformError, match="Flat.*singular"):
        mr.reconstruct_browser_to_volume_node(browser, _volume_node(scene), image_to_probe_node=node)


def test_bad_output_coverage_roi_and_option(scene, sweep):
    seq, image_to_probe = sweep
    browser = _calibrated_browser(scene, seq, image_to_probe)
    out = _volume_node(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    with pytest.raises(ReconstructionError, match="output volume.*vtkMRMLLinearTransformNode"):
        mr.reconstruct_browser_to_volume_node(browser, transform, options=_opts())
    with pytest.raises(ReconstructionError, match="coverage volume must be another node"):
        mr.reconstruct_browser_to_volume_node(browser, out, coverage_volume_node=out, options=_opts())
    with pytest.raises(InvalidOptionError, match="unknown reconstruction option.*spacing_mm"):
        mr.reconstruct_browser_to_volume_node(browser, out, spacing_mm=0.5)
    with pytest.raises(InvalidOptionError, match="output_spacing_mm"):
        mr.reconstruct_browser_to_volume_node(browser, out, output_spacing_mm=-1.0)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "EmptyBox")
    with pytest.raises(ReconstructionError, match="EmptyBox.*> 0"):
        mr.reconstruct_browser_to_volume_node(browser, out, roi_node=empty, options=_opts())
    far = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "FarBox")
    far.SetCenter(1000.0, 1000.0, 1000.0)
    far.SetSize(5.0, 5.0, 5.0)
    with pytest.raises(ReconstructionError, match="misses every frame"):
        mr.reconstruct_browser_to_volume_node(browser, out, roi_node=far, options=_opts())
    assert out.GetImageData() is None  # nothing written on failure


# --------------------------------------------------------------------------------------------
# Live: image node updated frame by frame
# --------------------------------------------------------------------------------------------


class _Stream:
    """Updates one image node like SlicerOpenIGTLink does for ``Image_Reference``.

    ``in_place=True``: pixels written into the existing image data (ImageDataModifiedEvent with
    the previous geometry), then ``SetIJKToRASMatrix`` and ``Modified()`` (two ModifiedEvents).
    ``in_place=False``: a new image data object and the geometry set in one StartModify block.
    """

    def __init__(self, scene, *, in_place=True, name="Image_Reference"):
        self.node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        self.in_place = in_place

    def send(self, frame: np.ndarray, ijk_to_ras: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame)
        image = self.node.GetImageData()
        if self.in_place and image is not None and image.GetDimensions()[:2] == frame.shape[::-1]:
            array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
            array[:] = frame.reshape(-1)
            image.Modified()
            self.node.SetIJKToRASMatrix(mrml.matrix_to_vtk(ijk_to_ras))
            self.node.Modified()
            return
        new = vtk.vtkImageData()
        new.SetDimensions(frame.shape[1], frame.shape[0], 1)
        new.GetPointData().SetScalars(numpy_support.numpy_to_vtk(frame.reshape(-1), deep=True))
        was = self.node.StartModify()
        self.node.SetIJKToRASMatrix(mrml.matrix_to_vtk(ijk_to_ras))
        self.node.SetAndObserveImageData(new)
        self.node.EndModify(was)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("in_place", [True, False])
def test_live_frames_one_by_one_equal_batch(scene, sweep, in_place):
    seq, image_to_probe = sweep
    mats = seq.repository(fixed={"ImageToProbe": image_to_probe}).get("ImageToTracker")
    stored = _stored_sequence(seq, mats)
    grid_source = reconstruct_volume(stored, None, _opts(compounding="max"))
    options = _fixed_roi_options(grid_source, compounding="max")
    expected = reconstruct_volume(stored, None, options)
    stream = _Stream(scene, in_place=in_place)
    out, coverage = _volume_node(scene), _volume_node(scene, "Coverage")
    clock = _Clock()
    live = mr.LiveReconstruction(out, options=options, coverage_volume_node=coverage, batch_frames=5, clock=clock)
    live.observe(stream.node)

    for f in range(seq.n_frames):
        clock.t += 0.05
        stream.send(seq.frames[f], mats[f])
    result = live.stop()

    assert not live.observing
    np.testing.assert_array_equal(result.volume.voxels, expected.volume.voxels)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)
    np.testing.assert_array_equal(_voxels(coverage), expected.weight.voxels)
    np.testing.assert_allclose(_ijk_to_ras(out), expected.volume.ijk_to_world, atol=1e-12)
    status = live.status()
    assert status["frames_captured"] == status["frames_used"] == seq.n_frames
    assert status["frames_missed"] == status["frames_rejected"] == status["frames_dropped"] == 0
    assert status["frames_skipped"] == 0 and status["errors"] == 0
    assert status["events_ignored"] >= (seq.n_frames - 1 if in_place else 0)  # the second ModifiedEvent
    assert out.GetAttribute(mr.ATTR_RECON_MODE) == "live"
    assert out.GetAttribute(mr.ATTR_RECON_SOURCE) == "Image_Reference"
    stream.send(seq.frames[0], mats[0])  # no longer observed
    assert live.status()["frames_captured"] == seq.n_frames


def test_live_image_under_a_transform_hierarchy(scene, sweep):
    """SlicerIGT style: Image_Image (pixel spacing) under ImageToProbe under ProbeToTracker."""
    seq, image_to_probe = sweep
    probe_to_tracker = seq.transforms["ProbeToTracker"].matrices
    grid_source = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts(compounding="max"))
    options = _fixed_roi_options(grid_source, compounding="max")
    expected = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, options)
    # image_to_probe includes the pixel spacing; split it as SlicerIGT users do.
    spacing = np.diag([0.4, 0.4, 1.0, 1.0])
    calibration = mrml.transform_to_node(scene, image_to_probe @ np.linalg.inv(spacing), name="ImageToProbe")
    tracker = mrml.transform_to_node(scene, probe_to_tracker[0], name="ProbeToTracker")
    calibration.SetAndObserveTransformNodeID(tracker.GetID())
    stream = _Stream(scene, name="Image_Image")
    stream.node.SetAndObserveTransformNodeID(calibration.GetID())
    out = _volume_node(scene)
    live = mr.LiveReconstruction(out, options=options, clock=_Clock()).observe(stream.node)

    for f in range(seq.n_frames):
        tracker.SetMatrixTransformToParent(mrml.matrix_to_vtk(probe_to_tracker[f]))
        stream.send(seq.frames[f], spacing)
    live.stop()

    voxels = _voxels(out)
    assert live.status()["frames_used"] == seq.n_frames
    # Same poses through another product order: a few boundary voxels may differ by rounding.
    assert np.mean(voxels == expected.volume.voxels) > 0.999


def test_live_growing_grid_matches_batch_on_the_grown_grid(scene, sweep):
    seq, image_to_probe = sweep
    mats = seq.repository(fixed={"ImageToProbe": image_to_probe}).get("ImageToTracker")
    stream = _Stream(scene)
    out = _volume_node(scene)
    live = mr.LiveReconstruction(out, options=_opts(compounding="max"), clock=_Clock()).observe(stream.node)
    for f in range(seq.n_frames):
        stream.send(seq.frames[f], mats[f])
    result = live.stop()
    expected = reconstruct_volume(_stored_sequence(seq, mats), None, _fixed_roi_options(result, compounding="max"))
    assert expected.grid.same_as(result.grid)
    np.testing.assert_array_equal(_voxels(out), expected.volume.voxels)


def test_live_output_refreshes_every_interval(scene, sweep):
    seq, image_to_probe = sweep
    mats = seq.repository(fixed={"ImageToProbe": image_to_probe}).get("ImageToTracker")
    stream = _Stream(scene)
    clock = _Clock()
    live = mr.LiveReconstruction(None, options=_opts(), update_interval_s=2.0, clock=clock).observe(stream.node)
    assert live.update_output() is None  # nothing received yet
    assert live.output_volume_node is None
    for f in range(12):
        clock.t += 0.5  # 2 frames/s: a refresh every 4 frames
        stream.send(seq.frames[f], mats[f])
        if f == 3:
            out = live.output_volume_node
            assert out is not None and out.GetName() == "Image_ReferenceReconstruction"
            assert out.GetAttribute(mr.ATTR_RECON_FRAMES_USED) == "4"
    assert live.updates == 3
    assert live.output_volume_node.GetAttribute(mr.ATTR_RECON_FRAMES_USED) == "12"
    assert live.status()["seconds_since_update"] == 0.0
    assert "12 frames used of 12 captured" in str(live)


def test_live_reports_skipped_missed_dropped_and_rejected_frames(scene, sweep):
    seq, image_to_probe = sweep
    mats = seq.repository(fixed={"ImageToProbe": image_to_probe}).get("ImageToTracker")
    grid_source = reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, _opts())
    stream = _Stream(scene)
    node = stream.node
    clock = _Clock()
    live = mr.LiveReconstruction(
        _volume_node(scene), options=_fixed_roi_options(grid_source), batch_frames=100, process_interval_s=100,
        max_pending_frames=3, clock=clock,
    ).observe(node)  # fmt: skip

    stream.send(seq.frames[0], mats[0])  # used
    node.SetAttribute(mrml.ATTR_TRANSFORM_VALID, "false")
    stream.send(seq.frames[1], mats[1])  # invalid pose -> skipped
    node.RemoveAttribute(mrml.ATTR_TRANSFORM_VALID)
    far = mats[2].copy()
    far[:3, 3] += 500.0
    stream.send(seq.frames[2], far)  # outside the fixed ROI -> skipped
    assert live.process_pending() == 1
    # pixels overwritten twice before any ModifiedEvent: one frame missed
    array = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    for f in (3, 4):
        array[:] = seq.frames[f].reshape(-1)
        node.GetImageData().Modified()
    node.SetIJKToRASMatrix(mrml.matrix_to_vtk(mats[4]))  # ModifiedEvent: frame 4 captured
    assert live.process_pending() == 1
    for f in range(5, 10):  # queue holds 3: two dropped
        stream.send(seq.frames[f], mats[f])
    stream.send(np.zeros((10, 10), np.uint8), mats[0])  # wrong size: rejected, never raised into VTK

    live.update_output()
    status = live.status()
    assert status["frames_skipped_by_reason"] == {
        "invalid_transform": 1, "outside_volume": 1, "dropped_behind": 2
    }  # fmt: skip
    assert status["frames_dropped"] == 2
    assert status["frames_missed"] == 1
    assert status["frames_rejected"] == 1 and status["errors"] == 1
    assert "Image_Reference" in status["last_error"] and "10x10 pixels" in status["last_error"]
    assert status["frames_used"] == 1 + 1 + 3  # frame 0, frame 4, frames 7-9
    text = str(live)
    assert "1 missed" in text and "1 rejected" in text and "2 dropped_behind" in text


def test_live_bad_inputs(scene):
    out = _volume_node(scene)
    with pytest.raises(InvalidOptionError, match="update_interval_s"):
        mr.LiveReconstruction(out, update_interval_s=0)
    with pytest.raises(ReconstructionError, match="coverage volume must be another node"):
        mr.LiveReconstruction(out, coverage_volume_node=out)
    live = mr.LiveReconstruction(out)
    with pytest.raises(ReconstructionError, match="live image.*vtkMRMLVolumeNode.*None"):
        live.observe(None)
    with pytest.raises(ReconstructionError, match="also the output"):
        live.observe(out)
    empty = _volume_node(scene, "NoImage")
    with pytest.raises(SequenceError, match="NoImage.*no image data"):
        mr.frame_from_volume_node(empty)
    assert live.stop() is None


def test_frame_from_rgb_node_is_grey(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Rgb")
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 40
    image = vtk.vtkImageData()
    image.SetDimensions(5, 4, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    node.SetAndObserveImageData(image)
    frame, matrix, ok = mr.frame_from_volume_node(node)
    assert frame.shape == (4, 5) and frame.dtype == np.uint8 and np.all(frame == 23)
    np.testing.assert_array_equal(matrix, np.eye(4))
    assert ok


# --------------------------------------------------------------------------------------------
# Real data (PLUS)
# --------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_spine_phantom_nn_mean_through_mrml(scene):
    from FreehandUSLib.io import read_sequence, read_volume
    from FreehandUSLib.io.plus_config import read_plus_config
    from FreehandUSLib.reconstruction import options_from_plus_config

    config_path = plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    seq = read_sequence(plus_file("TestImages/SpinePhantomFreehand.igs.mha"))
    ref = read_volume(plus_file("TestImages/vtkVolumeReconstructorTestNNMEANvolumeRef.mha"))
    config = read_plus_config(config_path)
    fixed = config.coordinate_definitions.repository_fixed()
    browser = mrml.sequence_to_browser(scene, seq, browser_name="Spine")  # pixel geometry
    calibration = mrml.transform_to_node(scene, fixed["ImageToProbe"], name="ImageToProbe")
    out, from_config = _volume_node(scene), _volume_node(scene, "FromConfig")

    result = mr.reconstruct_browser_to_volume_node(
        browser, out, image_to_probe_node=calibration, options=options_from_plus_config(config, emulate_plus=True)
    )
    mr.reconstruct_browser_to_volume_node(browser, from_config, config=config_path, emulate_plus=True)

    voxels = _voxels(out)
    assert result.frames_used == 21
    assert voxels.shape == ref.voxels.shape
    np.testing.assert_allclose(out.GetSpacing(), ref.spacing_mm, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.GetOrigin(), ref.origin_mm, atol=5e-4)  # the file holds 6 digits
    np.testing.assert_array_equal(voxels, ref.voxels)  # PLUS's arithmetic, identical voxels
    np.testing.assert_array_equal(_voxels(from_config), voxels)
    options = json.loads(out.GetAttribute(mr.ATTR_RECON_OPTIONS))
    assert options["fill_holes"] is True and options["hole_filling"][0]["type"] == "STICK"

"""Sensorless tracking through MRML (SensorlessTrackingLib.mrml_tracking) with the real slicer-core classes.

The Slicer module's Logic is thin glue over these functions, so this is where "the Logic is
tested headless" happens: simulated sweeps put into sequence browsers, trajectories estimated
into the same browsers, tables/plots, reconstruction from the estimate and training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
torch = pytest.importorskip("torch")

import vtk  # noqa: E402  (slicer-core pins it)
from FreehandUSLib import SequenceError, TrackedSequence, TransformError, mrml  # noqa: E402
from FreehandUSLib.errors import ConfigError  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)
from FreehandUSLib.mrml_reconstruction import reconstruct_browser_to_volume_node as recon  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from SensorlessTrackingLib.attribution import fit_out_of_plane_scale  # noqa: E402
from SensorlessTrackingLib.metrics import tracking_metrics  # noqa: E402
from SensorlessTrackingLib.predict import ModelFileError, default_model_path, load_model, track_sequence  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

N_FRAMES = 12


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture(scope="module")
def sweep() -> TrackedSequence:
    """12 tracked frames, 64 x 64 pixels of 0.2 mm, 3 mm sweep (ImageToReference, ImageToProbe...)."""
    return tiny_sweep(seed=3, n_frames=N_FRAMES, length_mm=3.0).sequence


def _save_untrained(path, **config):
    from SensorlessTrackingLib.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config(**config))
    checkpoint = {"model_config": model.config.to_dict(), "state_dict": model.state_dict(), "epoch": 0, "version": 1}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny DualTrack checkpoint (32 x 32 input pixels of 0.4 mm = the sweep's 12.8 mm)."""
    return _save_untrained(tmp_path_factory.mktemp("model") / "tiny.pt")


def _browser(scene, seq, name="Sweep"):
    return mrml.sequence_to_browser(scene, seq, browser_name=name)


def _untracked(seq, spacing=(0.2, 0.2)) -> TrackedSequence:
    return TrackedSequence(frames=seq.frames, timestamps_s=seq.timestamps_s, pixel_spacing_mm=spacing)


def _sequences(browser):
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _index_values(seq_node):
    return [seq_node.GetNthIndexValue(i) for i in range(seq_node.GetNumberOfDataNodes())]


def _snapshot(browser):
    """Every sequence of the browser: id -> (name, index values, item contents)."""
    out = {}
    for s in _sequences(browser):
        items = []
        for i in range(s.GetNumberOfDataNodes()):
            node = s.GetNthDataNode(i)
            m = vtk.vtkMatrix4x4()
            if node.IsA("vtkMRMLVolumeNode"):
                node.GetIJKToRASMatrix(m)
                pixels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()
            else:
                node.GetMatrixTransformToParent(m)
                pixels = None
            items.append((mrml.vtk_to_matrix(m), pixels))
        out[s.GetID()] = (s.GetName(), _index_values(s), items)
    return out


def _assert_same_snapshot(before, after):
    assert set(before) <= set(after)
    for node_id, (name, values, items) in before.items():
        assert after[node_id][0] == name and after[node_id][1] == values
        for (m0, p0), (m1, p1) in zip(items, after[node_id][2], strict=True):
            np.testing.assert_array_equal(m0, m1)
            if p0 is not None:
                np.testing.assert_array_equal(p0, p1)


# ----------------------------------------------------------------------------- estimate


def test_estimate_adds_a_synchronized_transform_sequence(scene, sweep, tiny_model):
    browser = _browser(scene, sweep)
    image_seq = browser.GetMasterSequenceNode()
    before = _snapshot(browser)
    calls = []
    summary = mt.estimate_trajectory_to_browser(browser, model=tiny_model, progress=lambda d, t: calls.append((d, t)))

    seq_node = mt.find_estimate_sequence(browser)
    assert seq_node is not None and seq_node.GetID() == summary["sequence_id"]
    assert seq_node.GetNumberOfDataNodes() == N_FRAMES
    assert _index_values(seq_node) == _index_values(image_seq)
    assert seq_node.GetIndexType() == image_seq.GetIndexType() and seq_node.GetIndexUnit() == "s"
    proxy = browser.GetProxyNode(seq_node)
    assert proxy is not None and proxy.IsA("vtkMRMLLinearTransformNode")
    _assert_same_snapshot(before, _snapshot(browser))  # the recording itself is untouched

    est = mt._read_matrices(seq_node)
    truth = sweep.transforms["ImageToReference"].matrices
    np.testing.assert_allclose(est[0], truth[0], atol=1e-9)  # anchored at the tracked first pose
    assert not np.allclose(est[-1], truth[0], atol=1e-6), "the estimate must move"
    # the proxy shows the selected item
    m = vtk.vtkMatrix4x4()
    proxy.GetMatrixTransformToParent(m)
    np.testing.assert_allclose(mrml.vtk_to_matrix(m), est[browser.GetSelectedItemNumber()], atol=1e-12)

    assert summary["frames"] == N_FRAMES and summary["method"] == "dualtrack" and summary["tracked"]
    assert summary["transform"] == mt.ESTIMATED_TRANSFORM_NAME and summary["model"] == str(tiny_model)
    assert summary["input_spacing_mm"] == pytest.approx([0.2, 0.2])
    assert summary["seconds"] > 0 and summary["frames_per_second"] > 0
    expected = tracking_metrics(truth, est, sweep.frames.shape[1:]).to_dict()
    scale, fdr_scaled = fit_out_of_plane_scale(truth, est, sweep.frames.shape[1:])
    expected |= {"out_of_plane_scale": scale, "fdr_scale_fitted_percent": fdr_scaled}
    assert set(expected) == set(summary["metrics"])
    for key in ("final_drift_mm", "fdr_path_percent", "gpe_mm", "mean_angle_error_deg", "out_of_plane_scale",
                "fdr_scale_fitted_percent"):
        assert summary["metrics"][key] == pytest.approx(expected[key], rel=1e-9)
    assert summary["metrics"]["fdr_scale_fitted_percent"] <= summary["metrics"]["fdr_path_percent"] + 1e-9
    centres = (est @ [31.5, 31.5, 0, 1])[:, :3]
    assert summary["path_length_mm"] == pytest.approx(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum())
    assert calls[-1] == (3, 3) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert json.loads(seq_node.GetAttribute(mt.ATTR_ESTIMATE_SUMMARY)) == json.loads(json.dumps(summary))
    assert "final drift" in mt.summary_text(summary) and "out-of-plane motion x" in mt.summary_text(summary)

    # the browser reads back with the estimate under its own name, the tracking unchanged
    back = mrml.browser_to_sequence(browser)
    np.testing.assert_allclose(back.transforms[mt.ESTIMATED_TRANSFORM_NAME].matrices, est)
    np.testing.assert_allclose(back.transforms["ImageToReference"].matrices, truth, atol=1e-9)


def test_a_second_estimate_replaces_only_its_own_sequence(scene, sweep, tiny_model):
    browser = _browser(scene, sweep)
    other = _browser(scene, sweep, name="Other")
    first = mt.estimate_trajectory_to_browser(browser, model=tiny_model)
    seq_node = mt.find_estimate_sequence(browser)
    est_first = mt._read_matrices(seq_node)
    before = {k: v for k, v in _snapshot(browser).items() if k != seq_node.GetID()}
    other_before = _snapshot(other)
    n_nodes = scene.GetNumberOfNodes()

    second = mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    assert mt.find_estimate_sequence(browser).GetID() == seq_node.GetID() == second["sequence_id"]
    assert scene.GetNumberOfNodes() == n_nodes, "no new sequence or proxy"
    assert len(_sequences(browser)) == len(before) + 1
    _assert_same_snapshot(before, _snapshot(browser))
    _assert_same_snapshot(other_before, _snapshot(other))
    assert mt.find_estimate_sequence(other) is None
    est_second = mt._read_matrices(seq_node)
    assert seq_node.GetNumberOfDataNodes() == N_FRAMES and second["method"] == "decorrelation"
    assert not np.allclose(est_first[1:], est_second[1:])
    # the second estimate is compared with the tracking, not with the first estimate
    truth = sweep.transforms["ImageToReference"].matrices
    np.testing.assert_allclose(est_second[0], truth[0], atol=1e-9)
    expected = tracking_metrics(truth, est_second, sweep.frames.shape[1:])
    assert second["metrics"]["gpe_mm"] == pytest.approx(expected.gpe_mm)
    assert first["metrics"]["gpe_mm"] != pytest.approx(second["metrics"]["gpe_mm"])


def test_mirror_averaged_estimate(scene, sweep, tiny_model):
    browser = _browser(scene, sweep)
    plain = mt.estimate_trajectory_to_browser(browser, model=tiny_model)
    est_plain = mt._read_matrices(mt.find_estimate_sequence(browser))
    averaged = mt.estimate_trajectory_to_browser(browser, model=tiny_model, mirror_average="flip+reverse")
    est_averaged = mt._read_matrices(mt.find_estimate_sequence(browser))
    assert averaged["method"] == f"{plain['method']} (flip+reverse averaged)" and not averaged["warnings"]
    assert not np.allclose(est_plain[1:], est_averaged[1:])
    # the decorrelation baseline has nothing to average: it runs plain and says so
    dec = mt.estimate_trajectory_to_browser(browser, model="decorrelation", mirror_average="flip")
    assert dec["method"] == "decorrelation" and any("mirror averaging" in w for w in dec["warnings"])
    with pytest.raises(ValueError, match="unknown test-time averaging 'both'"):
        mt.estimate_trajectory_to_browser(browser, model=tiny_model, mirror_average="both")


def test_untracked_browser_gets_an_estimate_without_metrics(scene, sweep, tiny_model):
    browser = _browser(scene, _untracked(sweep))
    assert "ImageToReference" not in mrml.browser_to_sequence(browser).transforms
    summary = mt.estimate_trajectory_to_browser(browser, model=tiny_model, name="Estimate")
    assert summary["metrics"] is None and not summary["tracked"] and not summary["anchored_at_tracked_pose"]
    assert any("origin" in w for w in summary["warnings"])
    assert "no accuracy metrics" in mt.summary_text(summary)
    seq_node = mt.find_estimate_sequence(browser)
    assert seq_node.GetName() == "Estimate" and browser.GetProxyNode(seq_node).GetName() == "Estimate"
    est = mt._read_matrices(seq_node)
    assert est.shape == (N_FRAMES, 4, 4)
    np.testing.assert_allclose(est[0], np.diag([0.2, 0.2, 1.0, 1.0]), atol=1e-12)

    # a given spacing that disagrees with the recording's is used and reported
    summary = mt.estimate_trajectory_to_browser(browser, model=tiny_model, spacing_mm=0.25)
    assert summary["input_spacing_mm"] == pytest.approx([0.25, 0.25])
    assert any("differs from the recording" in w for w in summary["warnings"])

    # no spacing anywhere: the caller must give it
    bare = _browser(scene, _untracked(sweep, spacing=None), name="Bare")
    with pytest.raises(SequenceError, match="'Bare'.*pixel spacing.*spacing_mm"):
        mt.estimate_trajectory_to_browser(bare, model=tiny_model)
    assert mt.estimate_trajectory_to_browser(bare, model=tiny_model, spacing_mm=(0.2, 0.2))["frames"] == N_FRAMES


def test_frames_without_valid_tracking_are_left_out_of_the_metrics(scene, sweep):
    truth = sweep.transforms["ImageToReference"].matrices
    valid = np.ones(N_FRAMES, dtype=bool)
    valid[5] = False
    seq = TrackedSequence(frames=sweep.frames, timestamps_s=sweep.timestamps_s,
                          transforms={"ImageToReference": (truth, valid)})  # fmt: skip
    browser = _browser(scene, seq)
    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    est = mt._read_matrices(mt.find_estimate_sequence(browser))
    assert est.shape == (N_FRAMES, 4, 4) and np.all(np.isfinite(est))
    assert summary["metrics"]["n_frames"] == N_FRAMES - 1
    assert summary["metrics"]["gpe_mm"] == pytest.approx(
        tracking_metrics(truth[valid], est[valid], sweep.frames.shape[1:]).gpe_mm
    )
    assert any("1 frames without valid tracking" in w for w in summary["warnings"])


# ----------------------------------------------------------------------------- table and plot


def _series(chart):
    return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]


def test_trajectory_table_and_plot(scene, sweep, tiny_model):
    browser = _browser(scene, sweep)
    with pytest.raises(SequenceError, match="'Sweep' has no estimated trajectory"):
        mt.trajectory_table(browser)
    mt.estimate_trajectory_to_browser(browser, model=tiny_model)
    chart = mt.trajectory_plot(browser)
    table_node = chart.GetNodeReference(mt.REF_TRAJECTORY_TABLE)
    table = table_node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert table.GetNumberOfRows() == N_FRAMES
    assert columns == ["frame", "time_s", "estimated_x_mm", "estimated_y_mm", "estimated_z_mm",
                       "tracked_x_mm", "tracked_y_mm", "tracked_z_mm", "drift_mm",
                       "elevational_sigma_mm", "out_of_plane_sigma_deg", "drift_band_mm"]  # fmt: skip
    values = {c: numpy_support.vtk_to_numpy(table.GetColumnByName(c)) for c in columns}
    np.testing.assert_array_equal(values["frame"], np.arange(N_FRAMES))
    np.testing.assert_allclose(values["time_s"], sweep.timestamps_s)
    truth_centres = (sweep.transforms["ImageToReference"].matrices @ [31.5, 31.5, 0, 1])[:, :3]
    np.testing.assert_allclose(np.stack([values[f"tracked_{a}_mm"] for a in "xyz"], 1), truth_centres, atol=1e-9)
    assert values["drift_mm"][0] == pytest.approx(0.0, abs=1e-9)
    est = np.stack([values[f"estimated_{a}_mm"] for a in "xyz"], 1)
    np.testing.assert_allclose(values["drift_mm"], np.linalg.norm(est - truth_centres, axis=1), atol=1e-9)
    series = _series(chart)
    assert len(series) == 8  # positions, drift and the drift band (not the per-step sigmas)
    assert {s.GetYColumnName() for s in series} == set(columns[2:9]) | {"drift_band_mm"}
    assert all(s.GetTableNode().GetID() == table_node.GetID() and s.GetXColumnName() == "frame" for s in series)

    # a second plot refreshes the same nodes
    n_nodes = scene.GetNumberOfNodes()
    again = mt.trajectory_plot(browser)
    assert again.GetID() == chart.GetID() and len(_series(again)) == 8
    assert scene.GetNumberOfNodes() == n_nodes
    assert mt.trajectory_table(browser).GetID() == table_node.GetID()


def test_trajectory_plot_without_tracking_and_from_a_result(scene, sweep, tiny_model):
    browser = _browser(scene, _untracked(sweep))
    mt.estimate_trajectory_to_browser(browser, model=tiny_model)
    chart = mt.trajectory_plot(browser)
    assert len(_series(chart)) == 4  # estimated x, y, z and the drift band
    assert chart.GetNodeReference(mt.REF_TRAJECTORY_TABLE).GetTable().GetNumberOfColumns() == 8

    result = track_sequence(sweep, "decorrelation")
    table_node = mt.trajectory_table(result, scene)
    assert table_node.GetTable().GetNumberOfRows() == N_FRAMES
    assert table_node.GetTable().GetColumnByName("drift_mm") is not None
    with pytest.raises(ValueError, match="give the scene"):
        mt.trajectory_table(result)
    with pytest.raises(TypeError, match="expected a vtkMRMLSequenceBrowserNode or a TrackingResult"):
        mt.trajectory_table(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), scene)


# ----------------------------------------------------------------------------- reconstruction


def test_reconstruct_estimated(scene, sweep, tiny_model):
    browser = _browser(scene, sweep)
    with pytest.raises(SequenceError, match="no estimated trajectory"):
        mt.reconstruct_estimated(browser, reconstruct=recon)
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    with pytest.raises(ConfigError, match="image_to_probe_node"):
        mt.reconstruct_estimated(browser, reconstruct=recon,
                                 image_to_probe_node=scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"))
    result = mt.reconstruct_estimated(browser, reconstruct=recon, output_spacing_mm=0.4)
    nodes = scene.GetNodesByName("SweepEstimatedReconstruction")
    assert nodes.GetNumberOfItems() == 1
    volume = nodes.GetItemAsObject(0)
    voxels = numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars())
    assert voxels.size > 0 and np.count_nonzero(voxels) > 0.05 * voxels.size
    assert result.frames_used == N_FRAMES
    assert volume.GetAttribute(mt.ATTR_RECON_TRAJECTORY) == mt.ESTIMATED_TRANSFORM_NAME
    assert volume.GetNodeReference(mt.REF_ESTIMATE_SEQUENCE).GetID() == mt.find_estimate_sequence(browser).GetID()
    options = json.loads(volume.GetAttribute("FreehandUS.Reconstruction.Options"))
    assert options["image_to_reference_transform"] == mt.ESTIMATED_TRANSFORM_NAME
    # anchored at the tracked first pose: the volume covers the first frame's centre
    centre = sweep.transforms["ImageToReference"].matrices[0] @ [31.5, 31.5, 0, 1]
    m = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(m)
    ijk = mrml.vtk_to_matrix(m) @ centre
    dims = volume.GetImageData().GetDimensions()
    assert all(-0.5 <= ijk[a] <= dims[a] - 0.5 for a in range(3))


# ----------------------------------------------------------------------------- training


def test_train_from_browsers_writes_a_loadable_checkpoint(scene, tmp_path):
    browsers = [_browser(scene, tiny_sweep(seed=s, n_frames=10, length_mm=2.5).sequence, f"Train{s}") for s in (5, 6)]
    calls = []
    path = mt.train_from_browsers(
        browsers, tmp_path / "run", epochs=1, model_config=tiny_model_config(), clips_per_epoch=4, batch_size=2,
        val_fraction=0.5, device="cpu", progress=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    assert path.is_file() and path.parent == tmp_path / "run"
    model = load_model(path)
    assert model.config.image_size == (32, 32) and model.config.pixel_spacing_mm == pytest.approx(0.4)
    assert calls == [(1, 1)]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"]) and np.isfinite(history[0]["val_loss"])
    # the model it wrote tracks a browser
    summary = mt.estimate_trajectory_to_browser(browsers[0], model=path)
    assert summary["frames"] == 10 and summary["metrics"] is not None

    # the same folder with another input size would resume a model that does not fit
    with pytest.raises(ModelFileError, match=r"last\.pt.*32x32.*48x48.*another output folder"):
        mt.train_from_browsers(browsers, tmp_path / "run", epochs=1,
                               model_config=tiny_model_config(image_size=(48, 48)))  # fmt: skip


def test_train_from_browsers_fine_tunes_a_model_file(scene, sweep, tiny_model, tmp_path):
    browser = _browser(scene, sweep)
    path = mt.train_from_browsers(browser, tmp_path / "tuned", epochs=1, init_model=tiny_model, clips_per_epoch=2,
                                  batch_size=2, val_fraction=0.0, device="cpu")  # fmt: skip
    tuned, start = torch.load(path, weights_only=True), torch.load(tiny_model, weights_only=True)
    assert tuned["train_config"]["init_from"] == str(tiny_model)
    assert tuned["model_config"] == start["model_config"]  # architecture, geometry, target scale kept
    changed = [k for k, v in start["state_dict"].items() if not torch.equal(v, tuned["state_dict"][k])]
    assert changed, "fine-tuning must update the weights"
    # a model file for another input size than asked for
    with pytest.raises(ModelFileError, match=r"tiny\.pt: the model to fine-tune is a dualtrack model for 32x32.*48x48"):
        mt.train_from_browsers(browser, tmp_path / "other", epochs=1, init_model=tiny_model,
                               model_config=tiny_model_config(image_size=(48, 48)))  # fmt: skip
    with pytest.raises(ModelFileError, match="missing.pt: model file not found"):
        mt.train_from_browsers(browser, tmp_path / "other", epochs=1, init_model=tmp_path / "missing.pt")
    # the same weights fine-tuned on a larger part of the image
    wider = mt.train_from_browsers(browser, tmp_path / "wider", epochs=1, init_model=tiny_model, image_size=(48, 32),
                                   clips_per_epoch=2, batch_size=2, val_fraction=0.0, device="cpu")  # fmt: skip
    assert load_model(wider).config.image_size == (48, 32)
    assert torch.load(wider, weights_only=True)["train_config"]["init_from"] == str(tiny_model)
    summary = mt.estimate_trajectory_to_browser(browser, model=wider)
    assert summary["frames"] == sweep.n_frames and np.isfinite(summary["metrics"]["fdr_path_percent"])
    with pytest.raises(ValueError, match="multiples of 16"):
        mt.train_from_browsers(browser, tmp_path / "odd", epochs=1, init_model=tiny_model, image_size=(40, 30))
    with pytest.raises(ValueError, match="'fit'"):
        mt.train_from_browsers(browser, tmp_path / "odd", epochs=1, init_model=tiny_model, image_size="all")


def test_train_from_browsers_fits_the_input_to_the_recordings(scene, tiny_model, tmp_path):
    # a deeper recording than the checkpoint's 12.8 mm square: 19.2 x 12.8 mm = 48 x 32 pixels of 0.4 mm
    deep = _browser(scene, tiny_sweep(seed=4, n_frames=8, length_mm=2.0, n_rows=96, depth_mm=19.2).sequence, "Deep")
    fitted = mt.train_from_browsers(deep, tmp_path / "fit", epochs=1, init_model=tiny_model, image_size="fit",
                                    clips_per_epoch=2, batch_size=2, val_fraction=0.0, device="cpu")  # fmt: skip
    assert load_model(fitted).config.image_size == (48, 32)
    # with a recording only 6.4 mm wide beside it, the input is what both fill
    narrow = _browser(scene, tiny_sweep(seed=5, n_frames=8, length_mm=2.0, n_cols=32, width_mm=6.4).sequence, "Narrow")
    both = mt.train_from_browsers([deep, narrow], tmp_path / "both", epochs=1, init_model=tiny_model, image_size="fit",
                                  clips_per_epoch=2, batch_size=2, val_fraction=0.0, device="cpu")  # fmt: skip
    assert load_model(both).config.image_size == (32, 16)


def test_train_from_browsers_bad_inputs(scene, sweep, tmp_path):
    untracked = _browser(scene, _untracked(sweep), name="Untracked")
    tracked = _browser(scene, sweep, name="Tracked")
    with pytest.raises(TransformError, match="'Untracked' has no tracking"):
        mt.train_from_browsers([tracked, untracked], tmp_path, epochs=1, model_config=tiny_model_config())
    with pytest.raises(SequenceError, match="no sequence browsers"):
        mt.train_from_browsers([], tmp_path, epochs=1)
    with pytest.raises(SequenceError, match="no sequence browser given"):
        mt.train_from_browsers([None], tmp_path, epochs=1)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        mt.train_from_browsers(tracked, tmp_path, epochs=0)
    assert not (tmp_path / "last.pt").exists()


# ----------------------------------------------------------------------------- bad inputs


def test_estimate_bad_inputs(scene, sweep, tiny_model, tmp_path):
    with pytest.raises(SequenceError, match="no sequence browser given"):
        mt.estimate_trajectory_to_browser(None)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "NotABrowser")
    with pytest.raises(SequenceError, match="'NotABrowser' is a vtkMRMLScalarVolumeNode"):
        mt.estimate_trajectory_to_browser(volume)

    # a browser whose only sequence holds transforms: no images
    tseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ProbeToReference")
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    for value in ("0", "1"):
        tseq.SetDataNodeAtValue(tnode, value)
    empty = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "NoImages")
    empty.SetAndObserveMasterSequenceNodeID(tseq.GetID())
    with pytest.raises(SequenceError, match="'NoImages' holds no images"):
        mt.estimate_trajectory_to_browser(empty, model=tiny_model)

    one = _browser(scene, sweep.select([0]), name="OneFrame")
    with pytest.raises(SequenceError, match="'OneFrame' holds 1 frame: cannot estimate a trajectory from fewer than 2"):
        mt.estimate_trajectory_to_browser(one, model=tiny_model)
    with pytest.raises(SequenceError, match="'OneFrame' holds 1 frame: cannot train from fewer than 2"):
        mt.train_from_browsers(one, tmp_path, epochs=1, model_config=tiny_model_config())

    rgb = TrackedSequence(frames=np.zeros((3, 16, 16, 3), np.uint8), pixel_spacing_mm=(0.2, 0.2))
    with pytest.raises(SequenceError, match="'Colour': frames of shape .* have several channels"):
        mt.estimate_trajectory_to_browser(_browser(scene, rgb, name="Colour"), model="decorrelation")

    mixed = _browser(scene, sweep, name="Mixed")
    image = vtk.vtkImageData()
    image.SetDimensions(48, 64, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    mixed.GetMasterSequenceNode().GetNthDataNode(3).SetAndObserveImageData(image)
    with pytest.raises(SequenceError, match="'Mixed'.*different shapes"):
        mt.estimate_trajectory_to_browser(mixed, model=tiny_model)
    with pytest.raises(SequenceError, match="'Mixed'.*different shapes"):
        mt.train_from_browsers(mixed, tmp_path, epochs=1, model_config=tiny_model_config())

    browser = _browser(scene, sweep)
    with pytest.raises(ModelFileError, match="missing.pt: model file not found"):
        mt.estimate_trajectory_to_browser(browser, model=tmp_path / "missing.pt")
    # a model for 32 x 32 pixels of 2 mm (64 mm): the 12.8 mm frames would fill a fifth of it
    wide = _save_untrained(tmp_path / "wide.pt", pixel_spacing_mm=2.0)
    with pytest.raises(ModelFileError, match=r"64\.0 x 64\.0 mm.*'Sweep'.*12\.8 x 12\.8 mm.*this image size"):
        mt.estimate_trajectory_to_browser(browser, model=wide)
    small = _browser(scene, TrackedSequence(frames=sweep.frames[:, :24, :24], pixel_spacing_mm=(0.2, 0.2)), "Small")
    with pytest.raises(SequenceError, match="'Small': speckle decorrelation cannot track these frames.*too small"):
        mt.estimate_trajectory_to_browser(small, model="decorrelation")
    with pytest.raises(ModelFileError, match="expected None"):
        mt.estimate_trajectory_to_browser(browser, model=3)
    assert mt.find_estimate_sequence(browser) is None, "a failed estimate writes nothing"


# ----------------------------------------------------------------------------- shipped model


def test_shipped_model_estimates_a_simulated_sweep(scene):
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"no shipped model at {path} (made by SensorlessTracking/Resources/Models/train_shipped_model.py)")
    seq = tiny_sweep(seed=21, n_frames=24, length_mm=10.0, n_rows=128, n_cols=128, depth_mm=32.0, width_mm=32.0,
                     sigma_elevation_mm=0.8).sequence  # fmt: skip
    browser = _browser(scene, seq)
    summary = mt.estimate_trajectory_to_browser(browser)
    assert summary["model"] == str(path) and summary["method"].startswith("dualtrack")
    assert summary["frames"] == 24 and summary["metrics"] is not None
    truth = seq.transforms["ImageToReference"].matrices
    still = tracking_metrics(truth, np.broadcast_to(truth[0], truth.shape), seq.frames.shape[1:])
    # a trained model follows the sweep: less final drift than assuming no motion
    assert summary["metrics"]["final_drift_mm"] < still.final_drift_mm
    assert summary["path_length_mm"] > 0.3 * still.path_length_mm


def test_the_summary_names_a_misjudged_elevational_scale():
    base = {"frames": 5, "method": "dualtrack", "seconds": 0.1, "frames_per_second": 50.0, "path_length_mm": 20.0,
            "sequence": "s", "tracked": True, "warnings": []}
    metrics = {"final_drift_mm": 2.0, "fdr_path_percent": 10.0, "path_length_mm": 20.0, "gpe_mm": 1.0,
               "mean_angle_error_deg": 1.0, "fdr_scale_fitted_percent": 2.0}
    off = mt.summary_text({**base, "metrics": {**metrics, "out_of_plane_scale": 0.8}})
    assert "x 0.80 would fit best (drift 2.0 %)" in off and "fine-tune" in off
    near = mt.summary_text({**base, "metrics": {**metrics, "out_of_plane_scale": 1.05}})
    assert "x 1.05 would fit best" in near and "misjudges" not in near
    physics = mt.summary_text({**base, "method": "decorrelation", "metrics": {**metrics, "out_of_plane_scale": 1.3}})
    assert "misjudges" in physics and "fine-tune" not in physics


def test_estimate_reports_direction_flags_and_reconstruction_says_estimated(scene, sweep):
    """Issue 25: the assumed sweep direction, its check against the tracking, the per-frame flags;
    the volume reconstructed from the estimate says it is estimated."""
    browser = _browser(scene, sweep)
    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation", sweep_direction="toward")
    assert summary["sweep_direction"] == "toward" and summary["estimated"] is True
    assert summary["direction_check"]["agrees"] is True
    assert summary["frame_flags"]["empty_frames"] == 0 and summary["image_frame"] == "right-handed"
    assert "assumed sweep direction: toward" in mt.summary_text(summary)
    wrong = mt.estimate_trajectory_to_browser(browser, model="decorrelation", sweep_direction="away")
    assert wrong["direction_check"]["agrees"] is False
    assert any("sweep direction 'toward'" in w for w in wrong["warnings"])
    mt.reconstruct_estimated(browser, reconstruct=recon, output_spacing_mm=0.4)
    volume = scene.GetNodesByName("SweepEstimatedReconstruction").GetItemAsObject(0)
    assert volume.GetAttribute(mt.ATTR_RECON_SOURCE).startswith("sensorless estimate")

"""End to end: ``freehandus demo --quick`` runs the whole workflow and its outputs hold up.

One reduced demo run (module fixture) is checked file by file against thresholds: calibration
error against the simulated truth < 0.5 mm, recorded frames = sent frames, sensorless drift
reported, volumes with content, a self-contained report with its figures, a Slicer scene that
loads back into a fresh slicer-core scene (``mrml``) and a report that a headless Chromium
renders to a picture that is not blank (skipped without Chromium).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from FreehandUSApp import report
from FreehandUSApp.cli import main
from FreehandUSApp.demo import DemoSettings, demo_probe, sweep_pixels_to_nwire_pixels
from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.io import read_sequence, read_volume

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUICK = DemoSettings.quick_settings()
CAL_THRESHOLD_MM = 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run ``freehandus demo --quick`` once; yields (out_dir, exit code, stdout, summary dict)."""
    out = tmp_path_factory.mktemp("demo") / "results"
    # What an earlier demo run stopped mid-recording leaves: the recorder's working files. The
    # demo replaces its own outputs (the recorder alone never replaces a file).
    (out / "sequences").mkdir(parents=True)
    (out / "sequences" / "sweep_us.seq.mhd").write_text("ObjectType = Image\n")
    (out / "sequences" / "sweep_us.seq.raw").write_bytes(b"\0" * 16)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "--out", str(out), "--no-browser-check"])
    summary = json.loads((out / "demo_summary.json").read_text())
    return out, code, stdout.getvalue(), summary


def test_demo_exits_0_and_prints_report_path_and_10_line_summary(demo):
    out, code, text, _ = demo
    assert code == 0
    assert f"Report: {(out / 'report.html').resolve()}" in text
    numbered = [line for line in text.splitlines() if re.match(r"^\s*\d+\. ", line)]
    assert [int(line.split(".")[0]) for line in numbered] == list(range(1, 11))
    for needle in ("error vs truth", "recorded", "Reconstruction", "drift"):
        assert needle in text, needle


def test_every_output_file_is_written(demo):
    out, _, _, summary = demo
    expected = [
        "report.html", "demo_summary.json", "trajectories.json",
        "calibration/calibration.json", "calibration/calibration_baseline.json", "calibration/ImageToProbe.xml",
        "calibration/nwire_config.xml", "calibration/nwire_truth.json",
        "sequences/nwire_calibration.seq.nrrd", "sequences/nwire_validation.seq.nrrd",
        "sequences/sweep_us.seq.nrrd", "sequences/sweep_pa.seq.nrrd", "sequences/sweep_sensorless.seq.nrrd",
        "volumes/us_tracked.nrrd", "volumes/pa_tracked.nrrd", "volumes/us_sensorless.nrrd",
        "volumes/pa_sensorless.nrrd",
    ]
    missing = [name for name in expected if not (out / name).is_file()]
    assert not missing
    for path in summary["files"].values():
        assert (out / path).exists() or __import__("pathlib").Path(path).exists(), path


def test_calibration_error_against_truth_is_below_threshold(demo):
    out, _, _, summary = demo
    from NWireCalibrationLib.metrics import target_errors_mm

    cal = json.loads((out / "calibration" / "calibration.json").read_text())
    truth = json.loads((out / "calibration" / "nwire_truth.json").read_text())
    est, true = np.array(cal["ImageToProbe"]), np.array(truth["ImageToProbe"])
    err = target_errors_mm(est, true, image_size_px=QUICK.nwire_image_px, grid=11)
    # Recomputed independently of the demo's own figure (whole image, not only the sector).
    assert err.mean() < CAL_THRESHOLD_MM
    methods = summary["summaries"]["calibration"]["methods"]
    assert methods["default"]["error_vs_truth_mean_mm"] < CAL_THRESHOLD_MM
    assert methods["default"]["error_vs_truth_mean_mm"] == pytest.approx(cal["error_vs_truth"]["error_vs_truth_mean_mm"])
    # The PLUS-style baseline is reported beside it (it may be less accurate, never absent).
    assert np.isfinite(methods["baseline"]["error_vs_truth_mean_mm"])
    assert methods["baseline"]["solver"] == "lsq" and methods["baseline"]["detector"] == "plus"


def test_plus_transform_element_holds_the_calibration(demo):
    out, _, _, _ = demo
    cal = json.loads((out / "calibration" / "calibration.json").read_text())
    text = (out / "calibration" / "ImageToProbe.xml").read_text()
    element = ET.fromstring(text[text.index("<Transform"):])
    assert (element.get("From"), element.get("To")) == ("Image", "Probe")
    matrix = np.array([float(v) for v in element.get("Matrix").split()]).reshape(4, 4)
    np.testing.assert_allclose(matrix, np.array(cal["ImageToProbe"]), rtol=0, atol=1e-9)
    assert float(element.get("Error")) > 0


def test_recorded_frames_equal_sent_frames(demo):
    out, _, _, summary = demo
    stream = summary["summaries"]["stream"]
    assert stream["frames_equal"] is True
    for key in ("us", "pa"):
        s = stream[key]
        assert s["frames_recorded"] == s["frames_sent"] == QUICK.sweep_frames
        assert s["pixels_identical"] is True and s["dropped"] == 0 and s["rejected"] == 0
        assert s["max_pose_difference_mm"] < 1e-3  # float32 on the wire
    us = read_sequence(out / "sequences" / "sweep_us.seq.nrrd")
    pa = read_sequence(out / "sequences" / "sweep_pa.seq.nrrd")
    assert us.n_frames == pa.n_frames == QUICK.sweep_frames
    assert {"ImageToReference", "ProbeToTracker", "ReferenceToTracker"} <= set(us.transforms)
    assert us.transforms["ImageToReference"].valid.all() and pa.transforms["PAToReference"].valid.all()
    np.testing.assert_allclose(us.timestamps_s, pa.timestamps_s, atol=1e-6)
    # The sensorless sequence carries the very frames that were recorded.
    sensorless = read_sequence(out / "sequences" / "sweep_sensorless.seq.nrrd")
    np.testing.assert_array_equal(sensorless.frames, us.frames)


def test_sensorless_drift_is_reported_and_the_method_is_named(demo):
    out, _, text, summary = demo
    sens = summary["summaries"]["sensorless"]
    primary = sens["methods"][sens["primary"]]
    for ref in ("vs_tracked", "vs_truth"):
        for key in ("final_drift_mm", "max_drift_mm", "fdr_path_percent", "gpe_mm"):
            assert primary[ref][key] is not None and primary[ref][key] >= 0, (ref, key)
    assert primary["vs_tracked"]["max_drift_mm"] >= primary["vs_tracked"]["final_drift_mm"]
    html = (out / "report.html").read_text()
    assert "drift" in html
    if not sens["model_available"]:
        # Never a faked model result: the fallback is said plainly in the summary and the report.
        assert sens["primary"] == "decorrelation"
        assert any("no shipped sensorless model" in note for note in sens["notes"])
        assert "no shipped sensorless model" in html
        assert "NO shipped model" in text
    # The tracked trajectory itself is close to the truth (calibration error + tracker noise).
    assert sens["tracked_vs_truth"]["max_drift_mm"] < 2.0


def test_volumes_have_content_and_share_one_grid(demo):
    out, _, _, _ = demo
    vols = {name: read_volume(out / "volumes" / f"{name}.nrrd")
            for name in ("us_tracked", "pa_tracked", "us_sensorless", "pa_sensorless")}
    shapes = {v.voxels.shape for v in vols.values()}
    assert len(shapes) == 1
    for name, v in vols.items():
        np.testing.assert_allclose(v.spacing_mm, (QUICK.voxel_mm,) * 3)
        assert v.voxels.dtype == np.uint8
        assert np.count_nonzero(v.voxels) > 100, name
    us = vols["us_tracked"].voxels
    assert us[us > 0].std() > 5  # speckle and structures
    # PA is bright only in the vessels: a small fraction of the covered voxels.
    pa = vols["pa_tracked"].voxels
    assert 0 < np.count_nonzero(pa > 64) < 0.2 * np.count_nonzero(us)


def test_report_is_self_contained_with_its_figures(demo):
    out, _, _, _ = demo
    html = (out / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 7
    for b64 in images:
        raw = base64.b64decode(b64)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing loaded from elsewhere
    for heading in ("Probe calibration", "streamed and recorded", "Volume reconstruction", "Sensorless tracking",
                    "Slicer scene"):
        assert heading in html, heading


@pytest.mark.mrml
def test_scene_loads_back_with_volumes_and_trajectory_models(demo, tmp_path):
    pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
    from mrml_scene import make_scene, release_scene

    out, _, _, summary = demo
    path = out / "scene" / "FreehandUSDemo.mrml"
    assert path.is_file()
    scene = make_scene(cache_dir=tmp_path / "cache")
    try:
        scene.SetURL(str(path))
        assert scene.Import()
        for name in ("US_tracked", "PA_tracked", "US_sensorless", "PA_sensorless"):
            node = scene.GetFirstNodeByName(name)
            assert node is not None and node.IsA("vtkMRMLScalarVolumeNode"), name
            dims = node.GetImageData().GetDimensions()
            assert np.prod(dims) > 1000, name
        primary = summary["summaries"]["sensorless"]["primary"]
        for name in ("Trajectory_tracked", f"Trajectory_{primary}", "Trajectory_truth"):
            node = scene.GetFirstNodeByName(name)
            assert node is not None and node.IsA("vtkMRMLModelNode"), name
            assert node.GetPolyData().GetNumberOfPoints() == QUICK.sweep_frames, name
            assert node.GetPolyData().GetNumberOfLines() == 1
        tracked = scene.GetFirstNodeByName("Trajectory_tracked").GetPolyData()
        centres = json.loads((out / "trajectories.json").read_text())["image_centres_mm"]["tracked"]
        np.testing.assert_allclose(tracked.GetPoint(QUICK.sweep_frames - 1), centres[-1], atol=1e-4)
        browser = scene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
        assert browser is not None and browser.GetMasterSequenceNode().GetNumberOfDataNodes() == QUICK.sweep_frames
        assert scene.GetFirstNodeByName("ImageToProbe").IsA("vtkMRMLLinearTransformNode")
    finally:
        release_scene(scene)


def test_report_renders_in_headless_chromium_and_is_not_blank(demo, tmp_path):
    chromium = report.find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    out, _, _, _ = demo
    png = report.render_report_png(out / "report.html", tmp_path / "report.png", chromium=chromium)
    check = report.check_png_not_blank(png)
    assert check["ok"], check["problems"]
    assert (check["width"], check["height"]) == (1400, 4000)
    assert check["colours"] > 100 and check["content_fraction"] > 0.2


# -- small parts and bad inputs ---------------------------------------------------------------


def test_blank_picture_fails_the_check(tmp_path):
    from PIL import Image

    Image.new("RGB", (1400, 900), (255, 255, 255)).save(tmp_path / "blank.png")
    check = report.check_png_not_blank(tmp_path / "blank.png")
    assert not check["ok"]
    assert any("std" in p for p in check["problems"]) and any("colours" in p for p in check["problems"])
    Image.new("RGB", (200, 100), (0, 0, 0)).save(tmp_path / "small.png")
    assert any("size 200x100" in p for p in report.check_png_not_blank(tmp_path / "small.png")["problems"])


def test_render_of_a_missing_report_names_the_file(tmp_path):
    with pytest.raises(FreehandUSError, match="missing.html: report not found"):
        report.render_report_png(tmp_path / "missing.html", tmp_path / "x.png", chromium="/bin/true")


def test_render_with_a_browser_that_writes_nothing_says_so(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(report.render_page("t", "s", "<p>x</p>"))
    with pytest.raises(FreehandUSError, match="wrote no screenshot of page.html"):
        report.render_report_png(page, tmp_path / "x.png", chromium="/bin/true")


def test_demo_into_a_file_path_fails_with_one_line(tmp_path, capsys):
    target = tmp_path / "not_a_folder"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "not_a_folder" in err and "not a folder" in err and "Traceback" not in err


def test_sweep_grid_change_maps_the_face_centre_and_keeps_millimetres():
    from FreehandUSLib.simulation import image_to_probe_matrix

    probe = demo_probe(112, 192)
    spacing, face = (0.26, 0.25), (319.5, 9.0)
    a = sweep_pixels_to_nwire_pixels(probe, spacing, face)
    s = image_to_probe_matrix(probe)
    # The sweep pixel at the transducer face centre (Probe origin) lands on the N-wire face centre.
    face_sweep = np.linalg.inv(s) @ np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose((a @ face_sweep)[:3], [face[0], face[1], 0.0], atol=1e-9)
    # One sweep pixel step is the sweep spacing in mm, whatever the N-wire spacing.
    sx, sy = probe.pixel_spacing_mm
    np.testing.assert_allclose(a[0, 0] * spacing[0], sx)
    np.testing.assert_allclose(a[1, 1] * spacing[1], sy)


def test_html_table_escapes_and_formats():
    text = report.html_table(["a<b", "x"], [["<script>", 1.23456], ["ok", float("nan")]], highlight_row=0)
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert "1.235" in text and "n/a" in text and 'class="best"' in text


@pytest.fixture(scope="module")
def analytic_sweep():
    from FreehandUSLib.simulation.analytic import simulate_analytic_sweep

    return simulate_analytic_sweep(n_frames=12, n_rows=64, n_cols=64, pixel_spacing_mm=0.4)


def test_sensorless_uses_a_model_file_when_there(analytic_sweep, tmp_path):
    pytest.importorskip("torch")
    import torch

    from FreehandUSApp.demo import sensorless_estimates
    from SensorlessTrackingLib.models import ModelConfig, build_model

    seq, image_to_probe = analytic_sweep
    cfg = ModelConfig(name="dualtrack", image_size=(32, 32), pixel_spacing_mm=0.4, clip_length=4, channels=(4, 8, 8, 8),
                      token_dim=16, heads=2, max_global_tokens=4, global_size=16, corr_radius=1, lstm_hidden=16)
    path = tmp_path / "model.pt"
    torch.save({"model_config": cfg.to_dict(), "state_dict": build_model(cfg).state_dict()}, path)
    out = sensorless_estimates(seq, image_to_probe, sigma_elevation_mm=0.7, model_path=path)
    assert out["model_available"] and out["primary"] == "model" and not out["notes"]
    assert set(out["results"]) == {"model", "decorrelation"}
    est = out["results"]["model"].sequence.transforms["ImageToReference"].matrices
    tracked = seq.repository(fixed={"ImageToProbe": image_to_probe}).get("ImageToTracker")
    np.testing.assert_allclose(est[0], tracked[0], atol=1e-9)  # anchored at the tracked first frame
    assert est.shape == (12, 4, 4) and np.all(np.isfinite(est))


def test_sensorless_without_model_falls_back_and_says_so(analytic_sweep, tmp_path):
    from FreehandUSApp.demo import sensorless_estimates

    seq, image_to_probe = analytic_sweep
    missing = tmp_path / "nothing_here.pt"
    out = sensorless_estimates(seq, image_to_probe, sigma_elevation_mm=0.7, model_path=missing)
    assert not out["model_available"] and out["primary"] == "decorrelation" and set(out["results"]) == {"decorrelation"}
    assert "no shipped sensorless model at" in out["notes"][0] and "nothing_here.pt" in out["notes"][0]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    out = sensorless_estimates(seq, image_to_probe, sigma_elevation_mm=0.7, model_path=broken)
    assert out["model_available"] and out["primary"] == "decorrelation"
    assert "could not be used" in out["notes"][0] and "broken.pt" in out["notes"][0]


def test_scene_builder_without_slicer_core_says_what_to_install(monkeypatch):
    from FreehandUSLib import demo_scene

    monkeypatch.setitem(sys.modules, "slicer_core.MRMLCore", None)  # `from slicer_core.MRMLCore import` now fails
    with pytest.raises(ImportError, match=r"needs the slicer-core wheel \(pip install slicer-core\)"):
        demo_scene.new_scene()

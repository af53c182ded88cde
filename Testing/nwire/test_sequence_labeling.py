"""The sequence stage: near-misses recovered from the neighbours and the tracked motion, labels that
jump refused, dropped validation frames reported (issue 23, items 3 and 5)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from NWireCalibrationLib.metrics import detection_rates
from NWireCalibrationLib.pipeline import calibrate, detect_sequence
from NWireCalibrationLib.sequence_labeling import SequenceSettings, label_sequence, predicted_dots_px
from NWireCalibrationLib.simulate import settings_for_phantom, simulate_nwire
from nwire_synthetic import exact_geometry, setup_for, small_simulation
from testdata import plus_file


def _inputs(phantom="fCal-2.0"):
    """Exact dots, poses and candidates (the true dots plus distractors 10 mm from every dot)."""
    sim, pts, poses = exact_geometry(phantom)
    spacing = float(np.mean(sim.pixel_spacing_mm))
    far = 10.0 / spacing
    cands = [np.concatenate([p, p + [far, 0.0], p - [0.0, far]]) for p in pts]
    return sim, pts.copy(), poses, spacing, cands


def _run(pts, ok, cands, sim, spacing, poses=None, **kw):
    n = len(ok)
    reasons = ["" if v else "pattern 2 not found" for v in ok]
    codes = ["" if v else "pattern-missing" for v in ok]
    return label_sequence(pts, ok, cands, sim.phantom, spacing, reasons=reasons, reason_codes=codes,
                          probe_to_reference=poses, phantom_to_reference=None if poses is None else
                          sim.phantom_to_reference, **kw) if n else None


def test_predicted_dots_are_the_wire_crossings():
    sim, pts, poses, _, _ = _inputs()
    image_to_probe = sim.image_to_probe
    pred = predicted_dots_px(poses, image_to_probe, sim.phantom_to_reference, sim.phantom)
    assert np.nanmax(np.abs(pred - pts)) < 1e-6
    poses = poses.copy()
    poses[3] = np.nan
    assert np.isnan(predicted_dots_px(poses, image_to_probe, sim.phantom_to_reference, sim.phantom)[3]).all()


def test_tracked_prediction_recovers_failed_frames():
    sim, truth, poses, spacing, cands = _inputs()
    pts = truth.copy()
    ok = np.ones(len(pts), bool)
    ok[[5, 12]] = False
    pts[~ok] = np.nan
    out = _run(pts, ok, cands, sim, spacing, poses)
    assert out.ok.all()
    assert out.stages[5] == out.stages[12] == "tracked" and out.stages[0] == "single-frame"
    assert out.summary["recovered"]["tracked"] == [5, 12] and out.summary["tracked_model"]["used"]
    assert np.abs(out.points_px - truth).max() < 1e-9
    assert out.reasons[5] == "" and out.reason_codes[5] == ""
    off = _run(pts, ok, cands, sim, spacing, poses, settings=SequenceSettings(enabled=False))
    assert not off.ok[5] and off.reason_codes[5] == "pattern-missing"


def test_a_label_that_jumps_is_refused_and_relabelled():
    sim, truth, poses, spacing, cands = _inputs()
    pts = truth.copy()
    pts[7, 0] += [10.0 / spacing, 0.0]  # wire 1 took the distractor 10 mm to its right
    ok = np.ones(len(pts), bool)
    out = _run(pts, ok, cands, sim, spacing, poses)
    assert out.summary["refused"] == [7]
    assert out.ok[7] and out.stages[7] == "tracked"
    assert np.abs(out.points_px[7] - truth[7]).max() < 1e-9
    # Without the right dot among the candidates it stays refused, with the reason.
    cands7 = list(cands)
    cands7[7] = cands[7][len(truth[7]):]
    out = _run(pts, ok, cands7, sim, spacing, poses)
    assert not out.ok[7] and out.reason_codes[7] == "motion-inconsistent"
    assert "from where the tracked motion puts it" in out.reasons[7] and "sequence: no dot candidate" in out.reasons[7]


def test_untracked_neighbours_recover_and_refuse_in_image_space():
    sim, exact, _, spacing, _ = _inputs()
    # A slow sweep in the image plane: 0.3 mm per frame sideways, a slight up-and-down.
    i = np.arange(len(exact))[:, None, None]
    truth = exact[0] + np.concatenate([0.3 * i, 0.4 * np.sin(i / 5.0)], axis=2) / spacing
    far = 10.0 / spacing
    cands = [np.concatenate([p, p + [far, 0.0], p - [0.0, far]]) for p in truth]
    pts = truth.copy()
    ok = np.ones(len(pts), bool)
    ok[5] = False
    pts[5] = np.nan
    pts[20, 2] -= [0.0, 10.0 / spacing]  # a jump in one frame only
    out = _run(pts, ok, cands, sim, spacing)
    assert out.summary["tracked_model"] == {"used": False, "reason": "the recording is not tracked"}
    assert out.summary["refused"] == [20]
    assert sorted(out.summary["recovered"]["neighbours"]) == [5, 20]
    assert out.ok.all() and np.abs(out.points_px - truth).max() < 1e-9


def test_a_missing_or_weak_dot_is_not_invented():
    sim, truth, poses, spacing, cands = _inputs()
    pts = truth.copy()
    ok = np.ones(len(pts), bool)
    ok[9] = False
    pts[9] = np.nan
    cands = list(cands)
    cands[9] = np.delete(cands[9], 3, axis=0)  # wire 4's echo is not in the image
    out = _run(pts, ok, cands, sim, spacing, poses)
    assert not out.ok[9] and out.reason_codes[9] == "pattern-missing"
    assert out.reasons[9].startswith("pattern 2 not found; sequence: no dot candidate of")
    assert sim.phantom.wire_names[3] in out.reasons[9]

    def search(i):  # every peak, wire 1's a faint one
        strength = np.ones(len(cands[i]))
        strength[0] = 0.01
        return cands[i], strength

    cands = [np.concatenate([p, p + [10.0 / spacing, 0.0]]) for p in truth]
    out = _run(pts, ok, cands, sim, spacing, poses, search=search)
    assert not out.ok[9] and "only a weak peak for " + sim.phantom.wire_names[0] in out.reasons[9]


def test_screen_scale_ticks_no_longer_labelled_on_ical_trus():
    """iCal-1.0 TRUS with letterboxing and burned-in text/depth scale: 5 wrong labels alone, none now."""
    st = settings_for_phantom("iCal-1.0", "trus", n_frames=20, image_size_px=(410, 308), seed=102,
                              overlays=("letterbox", "text"))
    sim = simulate_nwire(st)
    setup = setup_for(sim)
    alone = detect_sequence(sim.sequence, setup, sequence_stage=False)
    det = detect_sequence(sim.sequence, setup)
    r_alone = detection_rates(alone.points_px, sim.true_points_px)
    r = detection_rates(det.points_px, sim.true_points_px)
    assert r_alone.dots_wrong > 0
    assert r.dots_wrong == 0 and r.frames_false == 0 and det.frames_detected >= 19
    assert det.refused_frames() and det.stage_counts()["tracked"] > 0
    d = json.loads(json.dumps(det.to_dict()))
    assert d["detected_by_stage"] == det.stage_counts() and d["refused_by_sequence"] == det.refused_frames()
    assert {f["stage"] for f in d["frames"] if f["ok"]} <= {"single-frame", "tracked", "neighbours"}
    assert "detected by stage:" in str(det) and "refused as motion-inconsistent" in str(det)


def test_validation_frames_dropped_are_reported():
    cal = small_simulation("linear", 50.0, n_frames=30, seed=1)
    val = small_simulation("linear", 50.0, n_frames=12, seed=2)
    setup = setup_for(cal)
    dv = detect_sequence(val.sequence, setup)
    ok = dv.ok.copy()
    ok[[3, 8]] = False
    pts = dv.points_px.copy()
    pts[~ok] = np.nan
    codes = list(dv.reason_codes)
    reasons = list(dv.reasons)
    for i in (3, 8):
        codes[i], reasons[i] = "3d-check", "no candidate set passed the 3D consistency check"
    dv = replace(dv, ok=ok, points_px=pts, reason_codes=codes, reasons=reasons)
    r = calibrate(cal.sequence, val.sequence, setup, validation_detection=dv, ransac_iterations=200, time_offset=0.0)
    assert r.validation.frames_segmented == 10
    assert [f["index"] for f in r.info["rejected_frames"]["validation"]] == [3, 8]
    assert r.info["rejected_frames"]["validation"][0]["reason_code"] == "3d-check"
    assert any("2 of 12 validation frames dropped (not detected: 2 3d-check)" in w for w in r.warnings)
    assert r.info["detected_by_stage"]["validation"]["single-frame"] + r.info["detected_by_stage"]["validation"][
        "tracked"] + r.info["detected_by_stage"]["validation"]["neighbours"] == 10
    text = str(r)
    assert "validation recording:" in text and "frame 3: 3d-check" in text and "detected by stage:" in text


@pytest.mark.realdata
def test_ustc_frame_grabber_ical_recovered_from_neighbours():
    """PLUS's frame-grabbed iCal recording (untracked labelling, 2 N-wires): 194/200 alone, all with the sequence."""
    import xml.etree.ElementTree as ET

    from FreehandUSLib.io import read_sequence
    from NWireCalibrationLib.pipeline import load_setup

    setup = load_setup(plus_file("ConfigFiles/PlusDeviceSet_iCal_CalibrationOnly_FrameGrabber.xml"))
    seq = read_sequence(plus_file("TestImages/USTC_FrameGrabber_ProbeRotationData.igs.mha"))
    det = detect_sequence(seq, setup)
    ref = np.full(det.points_px.shape, np.nan)
    root = ET.parse(plus_file("TestImages/USTC_FrameGrabber_ProbeRotationData_Segmentation_baseline.xml")).getroot()
    for case in root.iter("TestCase"):
        out = case.find("Output")
        if out.get("SegmentationSuccess") == "1":
            ref[int(case.find("Input").get("ImageSeqFrameIndex"))] = np.array(
                out.get("SegmentationPoints").split(), float).reshape(-1, 2)
    rates = detection_rates(det.points_px, ref)
    assert det.frames_detected >= 199 and rates.dot_match_rate >= 0.995 and rates.dots_wrong == 0
    assert det.stage_counts()["neighbours"] >= 5


def test_tracked_recovery_is_checked_against_the_tracked_pose():
    """iCal-1.1 TRUS at 0.5 mm/px: frame 16's correct dots fail the single-frame pose fit (1.04 mm),
    the tracked prediction accepts them."""
    from NWireCalibrationLib.labeling import LabelingSettings, pose_residual_mm

    st = settings_for_phantom("iCal-1.1", "trus", n_frames=20, image_size_px=(410, 308), seed=102,
                              overlays=("letterbox", "text"))
    sim = simulate_nwire(st)
    # The measured centres (the plane refinement would replace them by a plane's, which fit).
    det = detect_sequence(sim.sequence, setup_for(sim), plane_refinement=False)
    assert det.ok.all() and det.stages[16] == "tracked"
    assert pose_residual_mm(det.points_px[16], sim.phantom) > LabelingSettings().max_wire_distance_mm
    assert np.abs(det.points_px[16] - sim.true_points_px[16]).max() < 1.5
    assert detection_rates(det.points_px, sim.true_points_px).dots_wrong == 0


def test_cli_reports_stages_and_can_label_frames_alone(tmp_path, capsys):
    from FreehandUSLib.io import write_sequence
    from NWireCalibrationLib.cli import build_standalone_parser

    st = settings_for_phantom("iCal-1.0", "trus", n_frames=20, image_size_px=(410, 308), seed=102,
                              overlays=("letterbox", "text"))
    sim = simulate_nwire(st)
    write_sequence(sim.sequence, tmp_path / "cal.igs.mha")
    (tmp_path / "cal.config.xml").write_text(sim.config_xml())

    def run(*argv):
        args = build_standalone_parser().parse_args([*argv, str(tmp_path / "cal.igs.mha"), "--config",
                                                     str(tmp_path / "cal.config.xml")])
        assert args.func(args) == 0
        return capsys.readouterr().out

    text = run("detect", "--out", str(tmp_path / "seq.json"))
    data = json.loads((tmp_path / "seq.json").read_text())
    assert data["detected_by_stage"]["tracked"] > 0 and data["refused_by_sequence"]
    assert data["sequence_stage"]["tracked_model"]["used"] and data["sequence"].endswith("cal.igs.mha")
    assert "detected by stage:" in text and "refused as motion-inconsistent" in text
    run("detect", "--no-sequence-stage", "--out", str(tmp_path / "alone.json"))
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["detected_by_stage"]["tracked"] == alone["detected_by_stage"]["neighbours"] == 0
    assert alone["refused_by_sequence"] == [] and alone["sequence_stage"] is None
    text = run("calibrate", "--validation", str(tmp_path / "cal.igs.mha"), "--out", str(tmp_path / "r.json"),
               "--solver", "lsq", "--time-offset", "0")
    info = json.loads((tmp_path / "r.json").read_text())["info"]
    assert info["detected_by_stage"]["calibration"] == info["detected_by_stage"]["validation"] == data[
        "detected_by_stage"]
    assert info["refused_by_sequence"]["validation"] == data["refused_by_sequence"]
    assert text.count("detected by stage:") == 2


def test_a_tracking_glitch_does_not_refuse_a_correct_labelling():
    """Every wire off by the same pose error: the pose is suspect, not the dots (kept, reported)."""
    sim, truth, poses, spacing, cands = _inputs()
    poses = poses.copy()
    poses[7, :3, 3] += poses[7, :3, :3] @ np.array([4.0, 3.0, 0.0])  # 5 mm in the image plane's directions
    out = _run(truth.copy(), np.ones(len(truth), bool), cands, sim, spacing, poses)
    assert out.ok.all() and out.stages[7] == "single-frame" and np.abs(out.points_px - truth).max() < 1e-9
    assert out.summary["pose_suspect"] == [7] and out.summary["refused"] == []


def test_tracking_glitches_in_a_simulated_recording_keep_their_frames():
    """10 % outlier poses (6 mm / 3 deg): labelled alone 30/30; the sequence stage keeps them."""
    sim = simulate_nwire(probe="convex", depth_mm=50.0, n_frames=30, seed=11, image_size_px=(410, 308),
                         outlier_fraction=0.1, dropout_fraction=0.05)
    det = detect_sequence(sim.sequence, setup_for(sim))
    truth = np.where(sim.visible[:, None, None], sim.true_points_px, np.nan)
    r = detection_rates(det.points_px, truth)
    assert sim.outlier.sum() >= 3 and det.ok[sim.outlier & sim.visible].all()
    assert r.recognition_rate == 1.0 and r.dots_wrong == 0 and r.frames_false == 0
    assert set(np.flatnonzero(sim.outlier & sim.visible)) <= set(det.sequence["pose_suspect"])


def test_a_frame_without_an_image_is_not_recovered():
    sim, truth, poses, spacing, cands = _inputs()
    pts = truth.copy()
    ok = np.ones(len(pts), bool)
    ok[4] = False
    pts[4] = np.nan
    codes = ["" if v else "no-image" for v in ok]
    reasons = ["" if v else "frame has no image" for v in ok]
    out = label_sequence(pts, ok, cands, sim.phantom, spacing, reasons=reasons, reason_codes=codes,
                         probe_to_reference=poses, phantom_to_reference=sim.phantom_to_reference)
    assert not out.ok[4] and out.reason_codes[4] == "no-image" and out.reasons[4] == "frame has no image"


def test_inputs_of_the_wrong_length_are_refused():
    sim, truth, poses, spacing, cands = _inputs()
    ok = np.ones(len(truth), bool)
    with pytest.raises(ValueError, match="candidates: expected 40 entries"):
        label_sequence(truth, ok, cands[:-1], sim.phantom, spacing, reasons=[""] * 40, reason_codes=[""] * 40)
    with pytest.raises(ValueError, match="points_px: expected shape"):
        label_sequence(truth[:, :6], ok, cands, sim.phantom, spacing, reasons=[""] * 40, reason_codes=[""] * 40)
    with pytest.raises(ValueError, match="max_gap_frames"):
        SequenceSettings(max_gap_frames=0)


def test_a_labelling_no_wire_confirms_is_refused_where_tracking_puts_a_wire_off_the_imaged_area():
    """A partial view labelled with other echoes looks like a tracking glitch (every dot off), but the
    tracking puts a wire where nothing is imaged: refused (a glitch elsewhere keeps its frame)."""
    sim, truth, poses, spacing, cands = _inputs()
    pts = truth.copy()
    pts[7] += [4.0 / spacing, 3.0 / spacing]  # every dot 5 mm off: other echoes
    cands = list(cands)
    cands[7] = pts[7].copy()  # the wires' own echoes are not in the image
    ok = np.ones(len(truth), bool)
    kept = _run(pts, ok, cands, sim, spacing, poses)
    assert kept.ok[7] and kept.summary["pose_suspect"] == [7]

    def imaged(i, points):
        return np.arange(len(points)) != 0 if i == 7 else np.ones(len(points), bool)

    out = _run(pts, ok, cands, sim, spacing, poses, imaged=imaged)
    assert out.summary["refused"] == [7] and "pose_suspect" not in out.summary
    assert not out.ok[7] and out.reason_codes[7] == "motion-inconsistent"

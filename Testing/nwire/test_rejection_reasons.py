"""Every rejected frame has a stated reason: which pattern/wires, which prior (issue 23, item 2)."""

from __future__ import annotations

import json

import numpy as np

from FreehandUSLib.io import write_sequence
from NWireCalibrationLib.cli import build_standalone_parser
from NWireCalibrationLib.labeling import REJECTION_REASONS, LabelingSettings, label_dots
from NWireCalibrationLib.phantom import NWirePhantom
from NWireCalibrationLib.pipeline import detect_sequence
from NWireCalibrationLib.simulate import simulate_nwire
from nwire_synthetic import exact_geometry, setup_for, small_simulation

FAR = np.array([[2000.0, 2000.0], [5000.0, 3000.0], [9000.0, 7000.0]])  # isolated distractors: no lines


def _frame(phantom="fCal-2.0", i=0):
    sim, pts, _ = exact_geometry(phantom)
    return sim, pts[i], float(np.mean(sim.pixel_spacing_mm))


def _two_spacing_phantom() -> NWirePhantom:
    """Pattern 1: side wires 20 mm apart; pattern 2 (10 mm deeper): 60 mm apart."""
    def pattern(z, width, name):
        return {"wires": [{"name": f"{name}a", "front": [0, 0, z], "back": [0, 40, z]},
                          {"name": f"{name}b", "front": [0.25 * width, 0, z], "back": [0.75 * width, 40, z]},
                          {"name": f"{name}c", "front": [width, 0, z], "back": [width, 40, z]}]}
    return NWirePhantom.from_dict({"name": "two-spacings", "patterns": [pattern(0, 20.0, "P1"), pattern(10, 60.0, "P2")]})


def _dots(phantom: NWirePhantom, y_mm: float, spacing: float) -> np.ndarray:
    """Dots of the plane y = y_mm (perpendicular to the wires), pixels."""
    pts = []
    for p in phantom.patterns:
        for w in p.wires:
            t = (y_mm - w.front_mm[1]) / (w.back_mm[1] - w.front_mm[1])
            q = w.front_mm + t * (w.back_mm - w.front_mm)
            pts.append([-q[0], q[2]])  # wire 1 at the right of the image (PLUS order)
    return np.asarray(pts) / spacing + 200.0


def test_reason_codes_are_stated_and_distinct():
    assert len(REJECTION_REASONS) == len(set(REJECTION_REASONS.values()))
    assert all(text for text in REJECTION_REASONS.values())


def test_missing_dots_are_too_few_dots():
    sim, truth, sp = _frame()
    res = label_dots(truth[:8], np.ones(8), sim.phantom, sp)
    assert res.reason_code == "too-few-dots" and "9 needed" in res.reason


def test_a_missing_pattern_names_its_wires():
    ph = _two_spacing_phantom()
    dots = _dots(ph, 20.0, 0.5)
    ok = label_dots(dots, np.ones(6), ph, 0.5)
    assert ok.ok  # the whole set labels
    res = label_dots(np.concatenate([dots[:3], FAR]), np.ones(6), ph, 0.5)
    assert not res.ok and res.reason_code == "pattern-missing"
    assert "pattern 2 (P2a, P2b, P2c)" in res.reason


def test_a_pattern_off_its_layer_names_the_layer_spacing_prior():
    sim, truth, sp = _frame()
    moved = truth.copy()
    moved[6:] += (0.0, 8.0 / sp)  # the bottom line 8 mm deeper than the phantom's 10 mm layer step allows
    res = label_dots(moved, np.ones(9), sim.phantom, sp)
    assert not res.ok and res.reason_code == "layer-spacing-prior"
    assert "pattern 3 (1:H5_h5, 2:L5_i5, 3:M5_m5)" in res.reason


def test_a_tilted_line_names_the_parallel_prior():
    sim, truth, sp = _frame()
    rotated = truth.copy()
    centre = rotated[6:].mean(axis=0)
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    rotated[6:] = (rotated[6:] - centre) @ np.array([[c, -s], [s, c]]).T + centre  # bottom line tilted 15 deg
    res = label_dots(rotated, np.ones(9), sim.phantom, sp)
    assert not res.ok and res.reason_code == "parallel-prior" and "pattern 3" in res.reason


def test_the_3d_check_has_its_code():
    sim, truth, sp = _frame(i=2)
    moved = truth.copy()
    moved[3] += (2.5 / sp, 0.0)
    res = label_dots(moved, np.ones(9), sim.phantom, sp, settings=LabelingSettings(distance_tolerance_mm=3.0))
    assert not res.ok and res.reason_code == "3d-check"


def test_every_rejected_simulated_frame_has_a_stated_reason():
    sim = small_simulation("linear", 50.0, n_frames=30, seed=4, dropout_fraction=0.3)
    det = detect_sequence(sim.sequence, setup_for(sim))
    rejected = det.rejected_frames()
    assert len(rejected) == int((~det.ok).sum()) >= 3
    assert all(r["reason_code"] in REJECTION_REASONS and r["reason"] for r in rejected)
    counts = det.rejection_counts()
    assert sum(counts.values()) == len(rejected) and "unstated" not in counts
    data = det.to_dict()
    assert data["rejected_by_reason"] == counts
    assert all(f["reason_code"] in REJECTION_REASONS for f in data["frames"] if not f["ok"])
    assert "rejected" in str(det) and rejected[0]["reason_code"] in str(det)


def test_partial_views_are_rejected_with_reasons():
    sim = simulate_nwire(phantom="fCal-2.0", n_frames=16, image_size_px=(320, 240), depth_mm=55.0,
                         linear_width_mm=54.0, partial_fraction=0.5, seed=6)
    det = detect_sequence(sim.sequence, setup_for(sim))
    assert sim.partial.sum() >= 4 and not det.ok[sim.partial].any()
    assert all(det.reason_code(i) in REJECTION_REASONS for i in np.flatnonzero(sim.partial))


def test_calibrate_cli_reports_rejections_per_frame_and_by_reason(tmp_path, capsys):
    cal = simulate_nwire(n_frames=24, image_size_px=(320, 240), depth_mm=50.0, seed=2, dropout_fraction=0.25)
    val = simulate_nwire(n_frames=12, image_size_px=(320, 240), depth_mm=50.0, seed=3, dropout_fraction=0.4)
    write_sequence(cal.sequence, tmp_path / "cal.igs.mha")
    write_sequence(val.sequence, tmp_path / "val.igs.mha")
    (tmp_path / "cal.config.xml").write_text(cal.config_xml())
    out = tmp_path / "result.json"
    args = build_standalone_parser().parse_args(
        ["calibrate", str(tmp_path / "cal.igs.mha"), "--validation", str(tmp_path / "val.igs.mha"),
         "--config", str(tmp_path / "cal.config.xml"), "--out", str(out), "--solver", "lsq", "--time-offset", "0"])
    assert args.func(args) == 0
    info = json.loads(out.read_text())["info"]
    for part, n_dropped in (("calibration", int((~cal.visible).sum())), ("validation", int((~val.visible).sum()))):
        frames = info["rejected_frames"][part]
        assert len(frames) >= n_dropped > 0
        assert all(f["reason_code"] in REJECTION_REASONS and f["reason"] for f in frames)
        assert sum(info["rejected_by_reason"][part].values()) == len(frames)
    text = capsys.readouterr().out
    assert "validation recording:" in text and "rejected" in text
    first = info["rejected_frames"]["validation"][0]
    assert f"frame {first['index']}: {first['reason_code']}" in text


def test_screen_marks_cut_by_the_frame_border_are_not_taken_for_wires():
    """iCal double-N, convex sector as wide as the frame, a depth scale at its left edge: the ticks
    cut by the border once completed the pattern (7 wrong labels in 20 frames)."""
    from NWireCalibrationLib.simulate import settings_for_phantom

    sim = simulate_nwire(settings_for_phantom("iCal-1.0", "convex", n_frames=20, image_size_px=(410, 308), seed=101,
                                              overlays=("text", "calipers", "colour-bar")))
    det = detect_sequence(sim.sequence, setup_for(sim))
    d = np.linalg.norm(det.points_px[:, :, None, :] - sim.true_points_px[:, None, :, :], axis=3)  # (f, det, truth)
    own = np.diagonal(d, axis1=1, axis2=2)
    np.einsum("fii->fi", d)[:] = np.inf
    wrong = det.ok[:, None] & (d.min(axis=2) <= 5.0) & ~(own <= 5.0)
    assert wrong.sum() == 0
    assert det.ok.sum() >= 17
    assert all(det.reason_code(i) in REJECTION_REASONS for i in np.flatnonzero(~det.ok))

"""Per-frame uncertainty of sensorless estimates (issue 25 item 4): sigmas, drift band, outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from FreehandUSLib.io import read_sequence, write_sequence
from SensorlessTrackingLib.confidence import (
    DECORRELATION_CALIBRATION,
    LEARNED_CALIBRATION,
    FrameUncertainty,
    UncertaintyCalibration,
    decorrelated_frames,
    frame_uncertainty,
)
from SensorlessTrackingLib.pose import absolute_to_frame_to_frame, image_mm_poses, matrices_to_params
from SensorlessTrackingLib.predict import FLAG_FIELD, UNCERTAINTY_FIELDS, default_model_path, track_sequence

from sensorless_helpers import run_cli, tiny_sweep


@pytest.fixture(scope="module")
def long_sweep():
    """60 tracked frames, 64 x 64 px of 0.2 mm, 16 mm sweep."""
    return tiny_sweep(seed=5, n_frames=60, length_mm=16.0).sequence


def _true_steps(seq) -> np.ndarray:
    itr = seq.transforms["ImageToReference"].matrices
    centre = ((seq.n_cols - 1) / 2.0, (seq.n_rows - 1) / 2.0)
    return matrices_to_params(absolute_to_frame_to_frame(image_mm_poses(itr, seq.pixel_spacing_mm, centre)))


# ---- the formula ------------------------------------------------------------------------------


def test_sigma_grows_with_the_step_and_the_band_adds_up():
    steps = np.zeros((5, 6))
    steps[:, 2] = [0.1, 0.5, 1.0, 2.0, 0.0]  # mm out of the plane
    u = frame_uncertainty(steps)
    cal = LEARNED_CALIBRATION
    assert u.step_sigma.shape == (6, 6) and np.all(u.step_sigma[0] == 0)
    expected_tz = np.hypot(cal.floor[2], cal.per_step[2] * steps[:, 2])
    np.testing.assert_allclose(u.elevational_sigma_mm[1:], expected_tz)
    assert np.all(np.diff(u.elevational_sigma_mm[1:4]) > 0)  # faster -> less sure
    assert u.elevational_sigma_mm[5] == pytest.approx(cal.floor[2])  # a standstill keeps the floor
    np.testing.assert_allclose(u.out_of_plane_sigma_deg[1:], np.hypot(cal.floor[3], cal.floor[4]))
    band = cal.band_factor * np.cumsum(np.linalg.norm(u.step_sigma[:, :3], axis=1))
    np.testing.assert_allclose(u.drift_band_mm, band)
    assert u.drift_band_mm[0] == 0 and np.all(np.diff(u.drift_band_mm) > 0)
    assert u.final_drift_band_mm == pytest.approx(band[-1])


def test_flagged_frames_get_the_unknown_step_sigma():
    steps = np.full((9, 6), 0.05)
    flags = np.zeros(10, bool)
    flags[[0, 4]] = True  # frame 0 is the anchor: nothing to inflate
    plain = frame_uncertainty(steps)
    u = frame_uncertainty(steps, flags)
    assert np.all(u.step_sigma[0] == 0)
    np.testing.assert_allclose(u.step_sigma[4], np.maximum(plain.step_sigma[4], LEARNED_CALIBRATION.unknown_step))
    np.testing.assert_allclose(np.delete(u.step_sigma, 4, axis=0), np.delete(plain.step_sigma, 4, axis=0))
    jump = np.diff(u.drift_band_mm)
    assert jump[3] > 3 * np.median(jump)  # the band widens at the unknown step, and stays wide
    assert u.final_drift_band_mm > plain.final_drift_band_mm


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"frame_to_frame must be \(n_frames - 1 >= 1, 6\), got shape \(4, 3\)"):
        frame_uncertainty(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"got shape \(0, 6\)"):
        frame_uncertainty(np.zeros((0, 6)))
    bad = np.zeros((4, 6))
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        frame_uncertainty(bad)
    with pytest.raises(ValueError, match=r"one entry per frame \(5\), got shape \(4,\)"):
        frame_uncertainty(np.zeros((4, 6)), np.zeros(4, bool))
    with pytest.raises(ValueError, match="band_factor must be > 0"):
        replace(LEARNED_CALIBRATION, band_factor=0.0)
    with pytest.raises(ValueError, match="floor must be 6 finite values >= 0"):
        UncertaintyCalibration(floor=(1, 2), per_step=(0,) * 6, unknown_step=(0,) * 6, band_factor=1.0, source="x")


def test_calibrations_are_fitted_constants():
    """The shipped constants say where they come from (the training simulator, never the independent one)."""
    for cal in (LEARNED_CALIBRATION, DECORRELATION_CALIBRATION):
        assert "training simulator" in cal.source and "independent" not in cal.source.replace("not on the independent", "")
        assert 1.0 < cal.band_factor < 5.0
        assert all(f > 0 for f in cal.floor)
    assert LEARNED_CALIBRATION.to_dict()["floor"] != DECORRELATION_CALIBRATION.to_dict()["floor"]


# ---- larger where the error is larger ---------------------------------------------------------


def test_uncertainty_is_larger_over_a_noisy_segment(long_sweep):
    """Frames 30-33 replaced by noise: the estimate's error there is large, and so is its
    uncertainty (the flags find the segment and its sigmas rise); the band widens there."""
    f = long_sweep.frames.copy()
    rng = np.random.default_rng(1)
    f[30:34] = rng.integers(0, 255, f[30:34].shape, dtype=np.uint8)
    noisy = replace(long_sweep, frames=f)
    res = track_sequence(noisy, "decorrelation")
    clean = track_sequence(long_sweep, "decorrelation")
    truth = _true_steps(long_sweep)
    err = np.abs(res.frame_to_frame - truth)[:, 2]  # error of the step into frame i + 1
    sig = res.uncertainty.elevational_sigma_mm[1:]
    seg = np.zeros(err.size, bool)
    seg[29:34] = True  # steps into frames 30..34
    assert err[seg].mean() > 2 * err[~seg].mean()
    assert sig[seg].min() > 2 * np.median(sig[~seg])
    assert res.uncertainty.final_drift_band_mm > clean.uncertainty.final_drift_band_mm + 3.0
    # away from the segment nothing changes
    np.testing.assert_allclose(res.uncertainty.step_sigma[:29], clean.uncertainty.step_sigma[:29])


def test_shipped_model_uncertainty_is_larger_over_a_noisy_segment():
    """The shipped model on a sweep of the independent simulator with frames 24-27 replaced by
    noise: its steps there are 5x as wrong, and their sigmas 4x as large as elsewhere."""
    pytest.importorskip("torch")
    if not default_model_path().is_file():
        pytest.skip("shipped model not present")
    from independent_sim import PROBES, simulate

    seq = simulate(PROBES[0], 5_000_902, n_frames=48, length_mm=40.0).sequence
    f = seq.frames.copy()
    f[24:28] = np.random.default_rng(1).integers(0, 255, f[24:28].shape, dtype=np.uint8)
    res = track_sequence(replace(seq, frames=f), "default")
    clean = track_sequence(seq, "default")
    err = np.abs(res.frame_to_frame - _true_steps(seq))[:, 2]
    sig = res.uncertainty.elevational_sigma_mm[1:]
    seg = np.zeros(err.size, bool)
    seg[23:28] = True  # steps into frames 24..28
    assert err[seg].mean() > 3 * err[~seg].mean()
    assert sig[seg].min() > 3 * np.median(sig[~seg])
    assert res.uncertainty.final_drift_band_mm > clean.uncertainty.final_drift_band_mm + 4.0


def test_band_holds_the_drift_on_an_independent_sweep():
    """A sweep of the independent simulator (never used to fit the constants), the shipped model:
    the tracked drift of most frames lies inside the 95 % band (the benchmark measures 30 sweeps)."""
    pytest.importorskip("torch")
    if not default_model_path().is_file():
        pytest.skip("shipped model not present")
    from independent_sim import PROBES, simulate

    from SensorlessTrackingLib.cli import tracking_drift_per_frame

    sw = simulate(PROBES[0], 5_000_900, n_frames=48, length_mm=40.0)
    res = track_sequence(sw.sequence, "default")
    truth = sw.sequence.transforms["ImageToReference"].matrices
    drift = tracking_drift_per_frame(truth, res.sequence.transforms["ImageToReference"].matrices,
                                     (sw.sequence.n_rows, sw.sequence.n_cols))
    assert np.mean(drift <= res.uncertainty.drift_band_mm + 1e-9) >= 0.8
    assert drift[-1] <= res.uncertainty.final_drift_band_mm
    assert res.uncertainty.calibration is LEARNED_CALIBRATION


# ---- outputs ----------------------------------------------------------------------------------


def test_fields_in_the_result_and_the_written_sequence(long_sweep, tmp_path):
    res = track_sequence(long_sweep, "decorrelation")
    n = long_sweep.n_frames
    assert isinstance(res.uncertainty, FrameUncertainty)
    assert res.uncertainty.calibration is DECORRELATION_CALIBRATION
    info = res.info["uncertainty"]
    for key in ("elevational_sigma_mm", "out_of_plane_sigma_deg", "drift_band_mm"):
        assert len(info[key]) == n
    assert info["final_drift_band_mm"] == pytest.approx(res.uncertainty.final_drift_band_mm)
    assert 0 < info["final_drift_band_percent_of_path"] < 1000
    assert "uncertainty: the last frame lies within" in str(res)
    text = str(res.uncertainty)
    assert f"within {res.uncertainty.final_drift_band_mm:.1f} mm" in text and "95 % band" in text
    path = tmp_path / "est.igs.mha"
    write_sequence(res.sequence, path)
    back = read_sequence(path)
    assert back.frame_fields[FLAG_FIELD] == res.sequence.frame_fields[FLAG_FIELD]
    for key, field in UNCERTAINTY_FIELDS.items():
        values = np.array([float(v) for v in back.frame_fields[field]])
        assert values.shape == (n,)
        np.testing.assert_allclose(values, getattr(res.uncertainty, key), rtol=1e-3, atol=1e-4)


def test_track_predict_and_evaluate_report_it(long_sweep, tmp_path, capsys):
    src = tmp_path / "in.igs.mha"
    write_sequence(long_sweep, src)
    out = tmp_path / "out.igs.mha"
    assert run_cli(["track", "predict", str(src), "--model", "decorrelation", "--out", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    u = d["uncertainty"]
    assert len(u["drift_band_mm"]) == long_sweep.n_frames and u["band_coverage"] == 0.95
    assert isinstance(d["drift_inside_band"], bool)
    assert d["drift_inside_band"] == (d["drift"]["final_drift_mm"] <= u["final_drift_band_mm"])
    assert UNCERTAINTY_FIELDS["drift_band_mm"] in read_sequence(out).frame_fields

    assert run_cli(["track", "predict", str(src), "--model", "decorrelation", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uncertainty: the last frame lies within" in text and "95 % band" in text
    assert "the tracked final drift" in text

    assert run_cli(["track", "evaluate", str(src), "--model", "decorrelation", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["results"]["decorrelation"]
    assert row["final_drift_band_mm"] > 0 and 0.0 <= row["frames_inside_band"] <= 1.0
    assert row["drift_inside_band"] == (row["final_drift_mm"] <= row["final_drift_band_mm"])


def test_untracked_input_has_uncertainty_and_no_band_check(long_sweep, tmp_path, capsys):
    plain = replace(long_sweep, transforms={})
    src = tmp_path / "in.igs.mha"
    write_sequence(plain, src)
    assert run_cli(["track", "predict", str(src), "--model", "decorrelation", "--out", str(tmp_path / "o.igs.mha"),
                    "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["drift"] is None and "drift_inside_band" not in d
    assert d["uncertainty"]["final_drift_band_mm"] > 0


def test_flags_of_the_estimate_reach_the_uncertainty(long_sweep):
    f = long_sweep.frames.copy()
    f[12] = 0  # probe lifted
    res = track_sequence(replace(long_sweep, frames=f), "decorrelation")
    flags = decorrelated_frames(f)
    assert flags.unreliable[12] and flags.unreliable[13]
    for i in (12, 13):
        assert np.all(res.uncertainty.step_sigma[i] >= np.asarray(DECORRELATION_CALIBRATION.unknown_step) - 1e-12)

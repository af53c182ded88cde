"""Temporal calibration (video-to-tracker time offset) of the N-wire calibration (issue 4)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from FreehandUSLib import TrackedSequence
from NWireCalibrationLib.cli import build_standalone_parser
from NWireCalibrationLib.errors import CalibrationError
from NWireCalibrationLib.metrics import target_errors_mm
from NWireCalibrationLib.pipeline import CalibrationSetup, calibrate, calibrate_from_points, detect_sequence
from NWireCalibrationLib.results import DetectionResult
from NWireCalibrationLib.temporal import (
    estimate_time_offset,
    parse_time_offset,
    probe_to_reference_at,
    speed_variation_mm_s,
)
from nwire_synthetic import exact_geometry, plus_fcal2, setup_for, small_simulation

FRAME_RATE_HZ = 15.0


def _trajectory(t_s: np.ndarray, base: np.ndarray) -> np.ndarray:
    """A smooth freehand-like ProbeToReference trajectory around ``base`` (n, 4, 4)."""
    rotvec = np.radians(np.stack([6 * np.sin(2 * np.pi * 0.45 * t_s), 5 * np.sin(2 * np.pi * 0.31 * t_s + 1.0),
                                  4 * np.sin(2 * np.pi * 0.23 * t_s + 2.0)], axis=1))
    shift = np.stack([3 * np.sin(2 * np.pi * 0.37 * t_s + 0.5), 2 * np.sin(2 * np.pi * 0.29 * t_s),
                      2 * np.sin(2 * np.pi * 0.41 * t_s + 1.5)], axis=1)
    delta = np.tile(np.eye(4), (t_s.size, 1, 1))
    delta[:, :3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    delta[:, :3, 3] = shift
    return base @ delta


def _dots(image_to_phantom: np.ndarray, phantom) -> np.ndarray:
    """Where each wire crosses each image plane, (n, n_wires, 2) pixels."""
    inv = np.linalg.inv(image_to_phantom)
    p = np.einsum("fij,wj->fwi", inv[:, :3, :3], phantom.wire_front_mm) + inv[:, None, :3, 3]
    d = np.einsum("fij,wj->fwi", inv[:, :3, :3], phantom.wire_directions)
    s = -p[..., 2] / d[..., 2]
    return (p + s[..., None] * d)[..., :2]


@lru_cache(maxsize=4)
def tracked_sweep(offset_s: float, n_frames: int = 120, noise_px: float = 0.15, seed: int = 0):
    """A continuous sweep whose tracking is recorded ``offset_s`` late: (sim, sequence, dots, true poses).

    The image at ``t`` shows the probe at ``T(t)``, the tracking stored with it is ``T(t - offset)``,
    so resampling the tracking at ``t + offset`` recovers the true pose.
    """
    sim, _, poses = exact_geometry("fCal-2.0")
    t = np.arange(n_frames) / FRAME_RATE_HZ
    truth = _trajectory(t, poses[0])
    recorded = _trajectory(t - offset_s, poses[0])
    dots = _dots(np.linalg.inv(sim.phantom_to_reference) @ truth @ sim.image_to_probe, sim.phantom)
    dots += np.random.default_rng(seed).normal(0.0, noise_px, dots.shape)
    seq = TrackedSequence(np.zeros((n_frames, 2, 2), np.uint8), timestamps_s=t,
                          transforms={"ProbeToReference": (recorded, np.ones(n_frames, bool))})
    return sim, seq, dots, truth


@pytest.mark.parametrize("offset_s", [0.04, -0.025])
def test_recovers_known_offset_on_simulated_sweep(offset_s):
    sim, seq, dots, truth = tracked_sweep(offset_s)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    assert est.applied, est.reason
    assert est.offset_s == pytest.approx(offset_s, abs=0.004)
    assert est.cv_estimate_mm < est.cv_zero_mm
    # The resampled poses are close to the truth, and the calibration with them is better.
    shifted = probe_to_reference_at(seq, est.offset_s)
    ok = np.all(np.isfinite(shifted), axis=(1, 2))
    assert np.abs(shifted[ok, :3, 3] - truth[ok, :3, 3]).max() < 0.3
    fov = sim.fov_points_px()
    errors = {}
    for dt in (0.0, est.offset_s):
        r = calibrate_from_points(dots, probe_to_reference_at(seq, dt), sim.phantom, solver="lsq",
                                  phantom_to_reference=sim.phantom_to_reference)
        errors[dt] = target_errors_mm(r.image_to_probe, sim.image_to_probe, points_px=fov).mean()
    assert errors[est.offset_s] < 0.5 * errors[0.0]


def test_recovers_offset_with_estimated_phantom_pose():
    sim, seq, dots, _ = tracked_sweep(0.04)
    est = estimate_time_offset(dots, seq, sim.phantom)
    assert est.applied, est.reason
    assert est.offset_s == pytest.approx(0.04, abs=0.008)


def test_no_offset_is_not_applied():
    sim, seq, dots, _ = tracked_sweep(0.0)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    assert abs(est.estimated_s) < 0.004
    assert est.offset_s == 0.0 or abs(est.offset_s) < 0.004
    assert est.to_dict()["frames_used"] == est.frames_used > 100


def test_offset_beyond_search_range_is_flagged_not_applied():
    sim, seq, dots, _ = tracked_sweep(0.15)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference, search_s=0.1,
                               max_search_s=0.1)  # no widening
    assert not est.applied and est.offset_s == 0.0
    assert est.at_search_edge and est.searched_s == (0.1,)
    assert "edge of the +-0.1 s search range" in est.reason


@pytest.mark.parametrize(("offset_s", "searched"), [(0.15, (0.1, 0.2)), (-0.3, (0.1, 0.2, 0.4))])
def test_search_widens_when_the_minimum_is_at_its_edge(offset_s, searched):
    sim, seq, dots, _ = tracked_sweep(offset_s)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    assert est.applied, est.reason
    assert est.offset_s == pytest.approx(offset_s, abs=0.004)
    assert est.searched_s == searched and est.search_s == searched[-1] and not est.at_search_edge
    assert f"widened from +-0.1 s to +-{searched[-1]:g} s" in est.reason
    assert est.to_dict()["searched_s"] == list(searched)


def test_widening_is_bounded():
    sim, seq, dots, _ = tracked_sweep(0.6)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                               max_search_s=0.25)
    assert not est.applied and est.offset_s == 0.0 and est.at_search_edge
    assert est.searched_s == (0.1, 0.2, 0.25)
    assert "edge of the +-0.25 s search range (widened from +-0.1 s)" in est.reason


@lru_cache(maxsize=4)
def constant_velocity_sweep(speed_mm_s: float, offset_s: float = 0.05, n_frames: int = 90):
    """The probe slides at a constant velocity (no rotation); its tracking is recorded ``offset_s`` late."""
    sim, _, poses = exact_geometry("fCal-2.0")
    t = np.arange(n_frames) / FRAME_RATE_HZ
    direction = np.array([0.6, 0.0, 0.8])

    def at(times):
        m = np.tile(poses[0], (times.size, 1, 1))
        m[:, :3, 3] += speed_mm_s * times[:, None] * direction
        return m

    truth = at(t)
    dots = _dots(np.linalg.inv(sim.phantom_to_reference) @ truth @ sim.image_to_probe, sim.phantom)
    dots += np.random.default_rng(1).normal(0.0, 0.15, dots.shape)
    seq = TrackedSequence(np.zeros((n_frames, 2, 2), np.uint8), timestamps_s=t,
                          transforms={"ProbeToReference": (at(t - offset_s), np.ones(n_frames, bool))})
    return sim, seq, dots


@pytest.mark.parametrize("speed_mm_s", [0.0, 4.0])
def test_degenerate_motion_cannot_estimate_the_offset(speed_mm_s):
    """A still probe, or one sliding at a constant velocity: every offset fits alike."""
    sim, seq, dots = constant_velocity_sweep(speed_mm_s)
    est = estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    assert not est.estimable and not est.applied and est.offset_s == 0.0
    assert np.isnan(est.estimated_s) and not est.at_search_edge
    assert est.reason.startswith("cannot estimate the offset") and "move the probe back and forth" in est.reason
    assert est.speed_variation_mm_s < 1e-6
    d = est.to_dict()
    assert d["estimable"] is False and d["estimated_s"] is None


def test_speed_variation_of_a_known_motion():
    t = np.arange(400) / 100.0
    poses = np.tile(np.eye(4), (t.size, 1, 1))
    poses[:, 0, 3] = 5.0 * np.sin(2 * np.pi * 0.5 * t)  # amplitude 5 mm at 0.5 Hz: velocity RMS 5 pi / sqrt 2
    assert speed_variation_mm_s(poses, t) == pytest.approx(5 * np.pi / np.sqrt(2), rel=0.01)
    poses[:, 1, 3] = 3.0 * t  # a constant velocity added changes nothing
    assert speed_variation_mm_s(poses, t) == pytest.approx(5 * np.pi / np.sqrt(2), rel=0.01)
    assert speed_variation_mm_s(poses[:2], t[:2]) == 0.0  # too short to say
    skip = np.ones(t.size, bool)
    skip[1::2] = False  # no two consecutive frames: no velocity
    assert speed_variation_mm_s(poses, t, skip) == 0.0


def test_calibrate_warns_when_the_offset_cannot_be_estimated():
    sim, seq, dots = constant_velocity_sweep(0.0)
    setup = CalibrationSetup(sim.phantom, sim.phantom_to_reference, sim.pixel_spacing_mm)
    det = DetectionResult("given", sim.phantom.name, sim.phantom.wire_names, dots, np.ones(seq.n_frames, bool),
                          np.full(seq.n_frames, 9), [""] * seq.n_frames, sim.pixel_spacing_mm, 0.0)
    r = calibrate(seq, None, setup, solver="lsq", calibration_detection=det)
    assert r.info["time_offset_s"] == 0.0 and r.info["time_offset"]["estimable"] is False
    assert any(w.startswith("time offset: cannot estimate the offset") for w in r.warnings)


def test_random_poses_keep_recorded_tracking():
    """The default (auto) changes nothing on a recording without motion between frames."""
    sim = small_simulation()
    setup = setup_for(sim)
    det = detect_sequence(sim.sequence, setup)
    r = calibrate(sim.sequence, None, setup, solver="lsq", calibration_detection=det)
    assert r.info["time_offset_mode"] == "auto"
    assert r.info["time_offset_s"] == 0.0
    assert not r.info["time_offset"]["applied"]
    fixed = calibrate(sim.sequence, None, setup, solver="lsq", calibration_detection=det, time_offset=0)
    np.testing.assert_allclose(r.image_to_probe, fixed.image_to_probe)
    assert "time offset +0.0 ms" in str(r)


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (" AUTO ", "auto"), ("0.03", 0.03), (0, 0.0),
                                                 (-0.5, -0.5), ("1e-2", 0.01)])
def test_parse_time_offset_accepts(value, expected):
    assert parse_time_offset(value) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("soon", "expected 'auto' or a number of seconds"),
    ("", "expected 'auto' or a number of seconds"),
    (None, "expected 'auto' or a number of seconds"),
    (True, "expected 'auto' or a number of seconds"),
    ("nan", "finite number of seconds"),
    (float("inf"), "finite number of seconds"),
    ("2.5", "within \\+-1 s, got 2.5 s"),
    (-30, "within \\+-1 s, got -30 s"),
])
def test_parse_time_offset_rejects(value, message):
    with pytest.raises(ValueError, match=f"time offset: .*{message}"):
        parse_time_offset(value)


@pytest.mark.parametrize(("value", "message"), [("abc", "expected 'auto' or a number"), ("5", "within")])
def test_cli_time_offset_bad_input(value, message, capsys):
    parser = build_standalone_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["calibrate", "cal.igs.mha", "--time-offset", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--time-offset" in err and message in err


def test_cli_time_offset_default_and_number():
    parser = build_standalone_parser()
    assert parser.parse_args(["calibrate", "cal.igs.mha"]).time_offset == "auto"
    assert parser.parse_args(["calibrate", "cal.igs.mha", "--time-offset", "0.045"]).time_offset == 0.045


def test_calibrate_rejects_bad_time_offset():
    sim = small_simulation()
    with pytest.raises(ValueError, match="time offset: expected 'auto'"):
        calibrate(sim.sequence, None, setup_for(sim), time_offset="later")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"search_s": 0.0}, "search_s: expected seconds in"),
    ({"search_s": 3.0}, "search_s: expected seconds in"),
    ({"step_s": 0.5}, "step_s: expected seconds in"),
    ({"step_s": -0.01}, "step_s: expected seconds in"),
    ({"folds": 1}, "folds: expected at least 2"),
    ({"max_search_s": 0.05}, "max_search_s: expected seconds in"),
    ({"max_search_s": 1.5}, "max_search_s: expected seconds in"),
    ({"min_speed_variation_mm_s": -1.0}, "min_speed_variation_mm_s"),
])
def test_estimate_time_offset_rejects_bad_settings(kwargs, message):
    sim, seq, dots, _ = tracked_sweep(0.0)
    with pytest.raises(ValueError, match=message):
        estimate_time_offset(dots, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference, **kwargs)


def test_estimate_time_offset_rejects_bad_points_and_timestamps():
    sim, seq, dots, _ = tracked_sweep(0.0)
    with pytest.raises(ValueError, match="points_px: expected \\(120, 9, 2\\)"):
        estimate_time_offset(dots[:10], seq, sim.phantom)
    frozen = TrackedSequence(seq.frames, timestamps_s=np.zeros(seq.n_frames),
                             transforms={"ProbeToReference": (seq.transforms["ProbeToReference"].matrices,
                                                              np.ones(seq.n_frames, bool))})
    with pytest.raises(CalibrationError, match="timestamps are missing or do not increase.*--time-offset 0"):
        estimate_time_offset(dots, frozen, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    with pytest.raises(CalibrationError, match="timestamps"):
        probe_to_reference_at(frozen, 0.02)


def test_too_few_tracked_frames_is_reported_not_raised():
    sim, seq, dots, _ = tracked_sweep(0.0)
    few = np.full_like(dots, np.nan)
    few[:12] = dots[:12]
    est = estimate_time_offset(few, seq, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    assert not est.applied and est.offset_s == 0.0
    assert "detected frames are tracked" in est.reason


@pytest.mark.realdata
def test_fcal2_time_offset_is_found_and_helps():
    """PLUS's fCal 2.0 recording: about +46 ms, chosen on the calibration recording alone."""
    setup, cal, val, _ = plus_fcal2()
    det_c = detect_sequence(cal, setup)
    est = estimate_time_offset(det_c.points_px, cal, setup.phantom, phantom_to_reference=setup.phantom_to_reference)
    assert est.applied, est.reason
    assert 0.03 < est.offset_s < 0.06
    assert est.cv_improvement > 0.05
    det_v = detect_sequence(val, setup)
    errors = {}
    for offset in (0.0, est.offset_s):
        r = calibrate_from_points(det_c.points_px, probe_to_reference_at(cal, offset), setup.phantom, solver="lsq",
                                  phantom_to_reference=setup.phantom_to_reference,
                                  validation_points_px=det_v.points_px, validation_poses=probe_to_reference_at(val, offset))
        errors[offset] = r.validation.error3d_trimmed95_mean_mm
    assert errors[est.offset_s] < errors[0.0]

"""Calibration solvers: PLUS linear least squares, LM (known / estimated phantom pose), RANSAC+LM."""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.errors import CalibrationError
from NWireCalibrationLib.metrics import target_errors_mm
from NWireCalibrationLib.solvers import (
    RESIDUALS,
    calibrate_linear,
    calibrate_lm,
    calibrate_ransac_lm,
    closed_form_initialisation,
    complete_image_to_probe,
    image_to_probe_from_params,
    params_from_image_to_probe,
    params_from_rigid,
    rigid_from_params,
)
from nwire_synthetic import FCAL2_RESULTS, exact_geometry, plus_fcal2
from testdata import plus_file


def _target_error(m, sim):
    return float(target_errors_mm(m, sim.image_to_probe, points_px=sim.fov_points_px()).mean())


def test_parameterisations_round_trip():
    p = np.array([0.1, -0.2, 0.3, 10.0, -5.0, 40.0, 0.08, 0.075])
    m = image_to_probe_from_params(p)
    assert np.allclose(params_from_image_to_probe(m), p)
    q = np.array([0.4, 0.1, -0.3, 1.0, 2.0, 3.0])
    assert np.allclose(params_from_rigid(rigid_from_params(q)), q)
    # complete_image_to_probe: third column = unit normal x mean spacing, orthogonal to x and y.
    c = complete_image_to_probe(m)
    assert np.isclose(np.linalg.norm(c[:3, 2]), 0.0775) and abs(c[:3, 2] @ c[:3, 0]) < 1e-12


def test_linear_solver_is_exact_on_noise_free_data():
    sim, pts, poses = exact_geometry("fCal-2.0")
    sol = calibrate_linear(pts, poses, sim.phantom_to_reference, sim.phantom)
    assert np.allclose(sol.image_to_probe, sim.image_to_probe, atol=1e-8)
    assert sol.frames_used.all() and sol.cost_mm < 1e-8


@pytest.mark.parametrize("residual", RESIDUALS)
def test_lm_known_pose_recovers_truth(residual):
    sim, pts, poses = exact_geometry("fCal-2.0")
    rng = np.random.default_rng(0)
    noisy = pts + rng.normal(0, 0.05, pts.shape)
    start = image_to_probe_from_params(params_from_image_to_probe(sim.image_to_probe) + [0.02, -0.02, 0.01, 2, -1, 1, 0.001, 0])
    sol = calibrate_lm(noisy, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                       init_image_to_probe=start, residual=residual)
    assert _target_error(sol.image_to_probe, sim) < 0.1
    assert sol.phantom_pose == "known"


def test_lm_estimates_the_phantom_pose_without_registration():
    sim, pts, poses = exact_geometry("Liu2025-multilayer", n_frames=40, tilt_deg=12.0)
    sol = calibrate_lm(pts, poses, sim.phantom)  # no PhantomToReference: 14 parameters
    assert sol.phantom_pose == "estimated"
    assert _target_error(sol.image_to_probe, sim) < 1e-3
    assert np.allclose(sol.phantom_to_reference[:3, 3], sim.phantom_to_reference[:3, 3], atol=1e-2)


def test_closed_form_initialisation_is_close():
    sim, pts, poses = exact_geometry("fCal-2.0", n_frames=40, tilt_deg=12.0)
    m, y = closed_form_initialisation(pts, poses, sim.phantom)
    assert _target_error(m, sim) < 1e-3
    assert np.allclose(y, sim.phantom_to_reference, atol=1e-3)


def test_ransac_rejects_outlier_poses_and_is_deterministic():
    sim, pts, poses = exact_geometry("fCal-2.0", n_frames=40, tracker_noise=True)
    rng = np.random.default_rng(3)
    bad = rng.choice(40, size=6, replace=False)
    poses = poses.copy()
    poses[bad, :3, 3] += rng.normal(0, 6.0, (6, 3))
    lm = calibrate_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference)
    r1 = calibrate_ransac_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                             n_iterations=300, seed=7)
    r2 = calibrate_ransac_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                             n_iterations=300, seed=7)
    assert np.array_equal(r1.image_to_probe, r2.image_to_probe)
    assert not r1.frames_used[bad].any()
    assert _target_error(r1.image_to_probe, sim) < 0.5 * _target_error(lm.image_to_probe, sim)


def test_too_few_frames_is_a_clear_error():
    sim, pts, poses = exact_geometry("fCal-2.0")
    pts = pts.copy()
    pts[5:] = np.nan
    with pytest.raises(CalibrationError, match="only 5 usable frames.*at least 10"):
        calibrate_linear(pts, poses, sim.phantom_to_reference, sim.phantom)


def test_estimating_the_pose_needs_rotation():
    sim, pts, poses = exact_geometry("fCal-2.0", n_frames=30, tilt_deg=0.0)
    # Pure translations: AX = XB has no unique rotation.
    with pytest.raises(CalibrationError, match="rotat|tilt"):
        closed_form_initialisation(pts, poses, sim.phantom)


def test_estimating_the_pose_needs_three_patterns():
    sim, pts, poses = exact_geometry("iCal-1.0", n_frames=20)
    with pytest.raises(CalibrationError, match="at least 3 N-wires.*known"):
        closed_form_initialisation(pts, poses, sim.phantom)


def test_known_pose_needs_a_registration():
    sim, pts, poses = exact_geometry("fCal-2.0")
    with pytest.raises(CalibrationError, match="phantom_to_reference"):
        calibrate_lm(pts, poses, sim.phantom, estimate_phantom_pose=False)


def test_bad_arguments_name_the_parameter():
    sim, pts, poses = exact_geometry("fCal-2.0")
    with pytest.raises(ValueError, match="points_px"):
        calibrate_linear(pts[:, :6], poses, sim.phantom_to_reference, sim.phantom)
    with pytest.raises(ValueError, match="probe_to_reference"):
        calibrate_linear(pts, poses[:3], sim.phantom_to_reference, sim.phantom)
    with pytest.raises(ValueError, match="subset_size"):
        calibrate_ransac_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, subset_size=2)
    with pytest.raises(ValueError, match="threshold_mm"):
        calibrate_ransac_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, threshold_mm=0)
    with pytest.raises(ValueError, match="residual"):
        calibrate_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, residual="bogus")


@pytest.mark.realdata
def test_linear_solver_reproduces_plus_from_plus_dots():
    """PLUS's own dots + PLUS's phantom registration -> PLUS's ImageToProbe within 1e-3 per element."""
    setup, cal, val, res = plus_fcal2()
    assert res.path == plus_file(FCAL2_RESULTS)
    pts = res.calibration.points_for(cal.n_frames)
    poses = cal.repository().get("ProbeToReference")
    sol = calibrate_linear(pts, poses, setup.phantom_to_reference, setup.phantom)
    assert np.abs(sol.image_to_probe - res.image_to_probe).max() < 1e-3
    assert sol.info["frames_usable"] == 184
    # PLUS's middle-wire points in the Probe frame are reproduced too (correspondences + chain).
    from NWireCalibrationLib.correspondences import middle_wire_points_mm

    ok = res.calibration.segmented
    idx = res.calibration.frame_indices[ok]
    mid = middle_wire_points_mm(res.calibration.points_px[ok], setup.phantom)
    ph2probe = np.linalg.inv(poses[idx]) @ setup.phantom_to_reference
    mid_probe = np.einsum("fij,fkj->fki", ph2probe[:, :3, :3], mid) + ph2probe[:, None, :3, 3]
    assert np.abs(mid_probe - res.calibration.middle_wires_probe_mm[ok]).max() < 1e-3

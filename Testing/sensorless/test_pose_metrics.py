"""Pose conventions and TUS-REC drift metrics (numpy only)."""

import numpy as np
import pytest
from sensorless_helpers import random_rigid

from SensorlessTrackingLib.metrics import image_points, pixel_errors, tracking_metrics
from SensorlessTrackingLib.pose import (
    absolute_to_frame_to_frame,
    absolute_to_relative,
    frame_to_frame_to_relative,
    image_mm_poses,
    matrices_to_params,
    mirror_x,
    mm_to_pixel,
    params_to_matrices,
    relative_to_absolute,
    rigid,
)
from SensorlessTrackingLib.predict import trajectory_from_frame_to_frame


def test_params_round_trip_and_units():
    rng = np.random.default_rng(0)
    m = random_rigid(rng, 10, r_deg=20)
    np.testing.assert_allclose(params_to_matrices(matrices_to_params(m)), m, atol=1e-12)
    p = params_to_matrices([1.0, 2.0, 3.0, 0.0, 0.0, 90.0])
    np.testing.assert_allclose(p[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(p[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # 90 degrees about z


def test_relative_and_frame_to_frame_compose_back():
    rng = np.random.default_rng(1)
    poses = random_rigid(rng, 8, t_scale=20.0, r_deg=15)
    rel = absolute_to_relative(poses)
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    f2f = absolute_to_frame_to_frame(poses)
    assert f2f.shape == (7, 4, 4)
    np.testing.assert_allclose(poses[1], poses[0] @ f2f[0], atol=1e-9)
    np.testing.assert_allclose(frame_to_frame_to_relative(f2f), rel, atol=1e-9)
    np.testing.assert_allclose(relative_to_absolute(rel, poses[0]), poses, atol=1e-9)


def test_image_mm_pose_removes_scaling_and_moves_origin():
    rng = np.random.default_rng(2)
    rigid_pose = random_rigid(rng, 3, t_scale=10.0)
    spacing = (0.2, 0.3)
    scale = np.diag([0.2, 0.3, 1.0, 1.0])
    centre = (10.0, 20.0)
    image_to_reference = rigid_pose @ scale
    p = image_mm_poses(image_to_reference, spacing, centre)
    np.testing.assert_allclose(p[:, :3, :3], rigid_pose[:, :3, :3], atol=1e-12)
    # the image-mm origin is the centre pixel
    centre_ref = image_to_reference @ np.array([10.0, 20.0, 0.0, 1.0])
    np.testing.assert_allclose(p[:, :3, 3], centre_ref[:, :3], atol=1e-9)
    np.testing.assert_allclose(mm_to_pixel(spacing, centre) @ [0.2, 0.3, 0, 1], [11, 21, 0, 1])


def test_mirrored_frame_to_frame_is_proper_and_flips_signs():
    rng = np.random.default_rng(3)
    poses = random_rigid(rng, 2, t_scale=1.0, r_deg=5)
    f = absolute_to_frame_to_frame(poses)[0]
    fm = absolute_to_frame_to_frame(poses @ mirror_x())[0]
    assert np.linalg.det(fm[:3, :3]) == pytest.approx(1.0)
    p, pm = matrices_to_params(f), matrices_to_params(fm)
    np.testing.assert_allclose(pm, p * [-1, 1, 1, 1, -1, -1], atol=1e-9)


def test_reversed_sweep_with_mirror_z_keeps_the_elevational_direction():
    from SensorlessTrackingLib.pose import mirror_z

    rng = np.random.default_rng(5)
    f = random_rigid(rng, 5, t_scale=0.1, r_deg=0.5)
    f[:, 2, 3] = -0.5  # moving towards -z
    poses = frame_to_frame_to_relative(f)
    rev = absolute_to_frame_to_frame(poses[::-1] @ mirror_z())
    assert np.all(matrices_to_params(rev)[:, 2] < 0)
    assert np.allclose(np.linalg.det(rev[:, :3, :3]), 1.0)
    plain = absolute_to_frame_to_frame(poses[::-1])
    assert np.all(matrices_to_params(plain)[:, 2] > 0)


def test_rigid_projects_scaled_matrices():
    m = np.eye(4)[None].copy()
    m[0, :3, :3] = np.diag([2.0, 1.0, 0.5])
    m[0, :3, 3] = [1, 2, 3]
    r = rigid(m)
    np.testing.assert_allclose(r[0, :3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r[0, :3, 3], [1, 2, 3])


def test_trajectory_from_frame_to_frame_reproduces_truth():
    rng = np.random.default_rng(4)
    poses = random_rigid(rng, 6, t_scale=5.0, r_deg=5)
    spacing = (0.25, 0.3)
    truth = poses @ np.diag([0.25, 0.3, 1.0, 1.0])
    f2f = matrices_to_params(absolute_to_frame_to_frame(image_mm_poses(truth, spacing, (15.5, 11.5))))
    est = trajectory_from_frame_to_frame(f2f, spacing, (24, 32), truth[0])
    np.testing.assert_allclose(est, truth, atol=1e-9)
    unanchored = trajectory_from_frame_to_frame(f2f, spacing, (24, 32))
    np.testing.assert_allclose(unanchored[0], np.diag([0.25, 0.3, 1.0, 1.0]), atol=1e-12)


def _line(n, step, spacing=0.5):
    t = np.tile(np.diag([spacing, spacing, 1.0, 1.0]), (n, 1, 1))
    t[:, 2, 3] = step * np.arange(n)
    return t


def test_metrics_zero_for_perfect_estimate_and_invariant_to_anchor():
    truth = _line(10, 1.0)
    shifted = truth.copy()
    shifted[:, 0, 3] += 100.0  # a different first pose: metrics anchor it away
    m = tracking_metrics(truth, shifted, (20, 30))
    assert m.final_drift_mm == pytest.approx(0.0, abs=1e-9)
    assert m.gpe_mm == pytest.approx(0.0, abs=1e-9) and m.lpe_mm == pytest.approx(0.0, abs=1e-9)
    assert m.mean_angle_error_deg == pytest.approx(0.0, abs=1e-6)
    assert m.path_length_mm == pytest.approx(9.0)


def test_metrics_of_a_scaled_sweep():
    truth = _line(11, 1.0)
    est = _line(11, 0.9)  # 10 % too short: drift grows linearly
    m = tracking_metrics(truth, est, (20, 30))
    assert m.final_drift_mm == pytest.approx(1.0)
    assert m.max_drift_mm == pytest.approx(1.0)
    assert m.fdr_path_percent == pytest.approx(10.0)
    assert m.fdr_end_to_end_percent == pytest.approx(10.0)
    assert m.gpe_mm == pytest.approx(np.mean(0.1 * np.arange(1, 11)))  # pure translation: same for all pixels
    assert m.lpe_mm == pytest.approx(0.1)
    assert m.gpe_points_mm == pytest.approx(m.gpe_mm)
    d = m.to_dict()
    assert d["n_frames"] == 11 and "fdr_path_percent" in d and "fdr_end_to_end_percent" in d
    assert "final drift" in str(m)


def test_metrics_fdr_path_differs_from_end_to_end_on_a_return_trip():
    truth = np.concatenate([_line(6, 1.0), _line(6, 1.0)[::-1][1:]])  # out 5 mm and back
    est = truth.copy()
    est[-1, 2, 3] += 0.5
    m = tracking_metrics(truth, est, (10, 10))
    assert m.path_length_mm == pytest.approx(10.0)
    assert m.end_to_end_mm == pytest.approx(0.0, abs=1e-12)
    assert m.fdr_path_percent == pytest.approx(5.0)
    assert np.isnan(m.fdr_end_to_end_percent)


def test_rotation_error_measured_in_degrees():
    truth = _line(3, 1.0)
    est = truth.copy()
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    est[2] = est[2] @ rot
    m = tracking_metrics(truth, est, (10, 10))
    assert m.final_angle_error_deg == pytest.approx(10.0)
    assert m.mean_angle_error_deg == pytest.approx(5.0)


def test_pixel_points_and_errors():
    pts = image_points((4, 6), which="corners")
    assert pts.shape == (4, 5)
    np.testing.assert_allclose(pts[:2, 4], [2.5, 1.5])
    allp = image_points((4, 6))
    assert allp.shape == (4, 24)
    sub = image_points((1000, 1000), max_points=10_000)
    assert sub.shape[1] <= 10_000
    a = np.tile(np.eye(4), (2, 1, 1))
    b = a.copy()
    b[:, 0, 3] = 3.0
    np.testing.assert_allclose(pixel_errors(a, b, allp), [3.0, 3.0])


@pytest.mark.parametrize(
    "true_shape, est_shape, n, match",
    [((5, 4, 4), (4, 4, 4), 5, "both be"), ((1, 4, 4), (1, 4, 4), 1, "at least 2")],
)
def test_metrics_bad_input(true_shape, est_shape, n, match):
    with pytest.raises(ValueError, match=match):
        tracking_metrics(np.tile(np.eye(4), (true_shape[0], 1, 1)), np.tile(np.eye(4), (est_shape[0], 1, 1)), (10, 10))


def test_metrics_reject_nan_and_bad_params():
    t = np.tile(np.eye(4), (3, 1, 1))
    e = t.copy()
    e[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        tracking_metrics(t, e, (4, 4))
    with pytest.raises(ValueError, match="6 values"):
        params_to_matrices(np.zeros(5))
    with pytest.raises(ValueError, match="4, 4"):
        matrices_to_params(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="'all' or 'corners'"):
        image_points((4, 4), which="edges")

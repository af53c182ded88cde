"""Error measures (PLUS 3D/2D reprojection, trimmed statistics), detection rates, CRE, diversity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from NWireCalibrationLib.metrics import (
    calibration_reproducibility,
    detection_rates,
    pose_diversity_deg,
    reprojection_errors_2d,
    reprojection_errors_3d,
    target_errors_mm,
    trimmed_statistics,
)
from nwire_synthetic import exact_geometry, plus_fcal2


def test_trimmed_statistics_follow_plus():
    e = np.arange(1, 21, dtype=float)  # 20 values; PLUS keeps round(0.95 * 20) = 19
    st = trimmed_statistics(e)
    assert st.n == 20 and st.trimmed_max == 19 and np.isclose(st.trimmed_mean, 10.0)
    assert np.isclose(st.mean, 10.5) and st.max == 20
    assert trimmed_statistics([np.nan, np.nan]).n == 0


def test_reprojection_errors_vanish_at_the_truth_and_grow_with_offsets():
    sim, pts, poses = exact_geometry("fCal-2.0", n_frames=10)
    e3 = reprojection_errors_3d(pts, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom)
    e2 = reprojection_errors_2d(pts, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom)
    assert e3.shape == (10, 3) and np.nanmax(e3) < 1e-6
    assert e2.shape == (10, 9, 2) and np.nanmax(np.abs(e2)) < 1e-6
    shifted = sim.image_to_probe.copy()
    shifted[:3, 3] += (0.5, 0.0, 0.0)
    e3b = reprojection_errors_3d(pts, poses, shifted, sim.phantom_to_reference, sim.phantom)
    assert np.allclose(e3b, 0.5, atol=1e-6)  # a translation moves every mapped point by 0.5 mm
    moved = pts.copy()
    moved[:, 0, 0] += 3.0
    e2b = reprojection_errors_2d(moved, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom)
    assert np.allclose(e2b[:, 0], [3.0, 0.0], atol=1e-6)


def test_untracked_frames_give_nan():
    sim, pts, poses = exact_geometry("fCal-2.0", n_frames=5)
    poses = poses.copy()
    poses[2] = np.nan
    e3 = reprojection_errors_3d(pts, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom)
    assert np.all(np.isnan(e3[2])) and np.all(np.isfinite(e3[[0, 1, 3, 4]]))


def test_detection_rates_count_matches_false_and_wrong_dots():
    ref = np.zeros((4, 3, 2))
    ref[:, :, 0] = [0, 100, 200]
    det = ref.copy()
    det[1, 0] += (6.0, 0.0)  # 6 px off: not matched, still its own echo
    det[2, 1] = (198.0, 0.0)  # on another wire's dot: wrong echo
    det[3] = np.nan  # missed frame
    ref2 = np.concatenate([ref, np.full((1, 3, 2), np.nan)])
    det2 = np.concatenate([det, ref[:1]])  # detected where the reference has nothing
    r = detection_rates(det2, ref2, tolerance_px=5.0)
    assert r.frames_reference == 4 and r.frames_correct == 1 and r.frames_false == 1
    assert r.dots_matched == 7 and r.dots_false == 2 and r.dots_wrong == 1
    with pytest.raises(ValueError, match="same shape"):
        detection_rates(det2[:2], ref2)


def test_target_errors_and_reproducibility():
    m = np.eye(4)
    m[:3, :3] *= 0.1
    n = m.copy()
    n[:3, 3] += (0.3, 0.4, 0.0)
    assert np.allclose(target_errors_mm(n, m, (100, 80)), 0.5)
    assert np.allclose(target_errors_mm(n, m, points_px=[[1, 2], [3, 4]]), 0.5)
    cre = calibration_reproducibility([m, n], (100, 80))
    assert np.isclose(cre["cre_mean_mm"], 0.25) and cre["n_calibrations"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        calibration_reproducibility([m], (100, 80))
    with pytest.raises(ValueError, match="image_size_px or points_px"):
        target_errors_mm(m, n)


def test_pose_diversity():
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[1, :3, :3] = Rotation.from_euler("x", 12, degrees=True).as_matrix()
    poses[2, :3, :3] = Rotation.from_euler("x", -3, degrees=True).as_matrix()
    assert np.isclose(pose_diversity_deg(poses), 15.0)
    assert pose_diversity_deg(poses[:1]) == 0.0


@pytest.mark.realdata
def test_plus_error_measures_reproduce_the_plus_report():
    """With PLUS's dots and matrix, our 3D/2D errors equal the numbers in PLUS's result file."""
    setup, cal, val, res = plus_fcal2()
    pv = res.validation.points_for(val.n_frames)
    poses = val.repository().get("ProbeToReference")
    e3 = reprojection_errors_3d(pv, poses, res.image_to_probe, setup.phantom_to_reference, setup.phantom)
    st = trimmed_statistics(e3)
    assert abs(st.trimmed_mean - res.error3d_mm["ValidationMeanMm"]) < 2e-3
    assert abs(st.trimmed_std - res.error3d_mm["ValidationStdDevMm"]) < 2e-3
    e2 = reprojection_errors_2d(pv, poses, res.image_to_probe, setup.phantom_to_reference, setup.phantom)
    assert np.allclose(np.nanmean(e2[:, 0], axis=0), [3.76608, 0.507533], atol=0.02)

"""Drift attribution: hybrids of true and estimated motion parameters."""

import numpy as np
import pytest

from SensorlessTrackingLib.attribution import GROUPS, SCALE_RANGE, drift_attribution
from SensorlessTrackingLib.metrics import tracking_metrics
from SensorlessTrackingLib.pose import (
    frame_to_frame_to_relative,
    matrices_to_params,
    mm_to_pixel,
    params_to_matrices,
    relative_to_absolute,
)

SHAPE = (40, 60)
SPACING = (0.3, 0.25)


def sweep(params, first=None):
    """Pixel ImageToReference of a sweep with the given frame-to-frame parameters (n - 1, 6)."""
    first = np.eye(4) if first is None else first
    poses = relative_to_absolute(frame_to_frame_to_relative(params_to_matrices(params)), first)
    centre = ((SHAPE[1] - 1) / 2.0, (SHAPE[0] - 1) / 2.0)
    return poses @ np.linalg.inv(mm_to_pixel(SPACING, centre))


def true_params(n=80, seed=0):
    rng = np.random.default_rng(seed)
    p = np.zeros((n - 1, 6))
    p[:, 2] = 0.5 + 0.05 * rng.normal(size=n - 1)  # mostly elevational, 0.5 mm per frame
    p[:, :2] = 0.05 * rng.normal(size=(n - 1, 2))
    p[:, 3:] = 0.2 * rng.normal(size=(n - 1, 3))  # degrees
    return p


def test_a_perfect_estimate_has_no_drift_in_any_group():
    p = true_params()
    first = params_to_matrices(np.array([5.0, -3.0, 2.0, 10.0, 0.0, 30.0]))
    truth = sweep(p, first)
    got = drift_attribution(truth, sweep(p), SHAPE)  # another anchor: removed
    for key in ["fdr_path_percent"] + [f"fdr_{g}_only_percent" for g in GROUPS]:
        assert got[key] == pytest.approx(0.0, abs=1e-6), key
    assert got["elevation_scale"] == pytest.approx(1.0)
    assert got["out_of_plane_scale"] == pytest.approx(1.0, abs=1e-3)
    assert got["fdr_scale_fitted_percent"] == pytest.approx(0.0, abs=1e-6)


def test_a_misjudged_beam_width_is_undone_by_the_scale_fit():
    # All three out-of-plane parameters 25 % too small, as from a beam taken 25 % too wide.
    p = true_params(seed=5)
    est = p.copy()
    est[:, 2:5] /= 1.25
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    assert got["fdr_path_percent"] > 10.0
    assert got["out_of_plane_scale"] == pytest.approx(1.25, rel=1e-3)
    assert got["fdr_scale_fitted_percent"] == pytest.approx(0.0, abs=0.05)


def test_the_scale_fit_cannot_remove_in_plane_drift():
    p = true_params(seed=6)
    est = p.copy()
    est[:, 0] += 0.05  # 0.05 mm per frame of lateral drift
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    assert got["fdr_path_percent"] > 5.0
    assert got["fdr_scale_fitted_percent"] <= got["fdr_path_percent"] + 1e-9
    assert got["fdr_scale_fitted_percent"] > 0.8 * got["fdr_path_percent"]


def test_the_scale_fit_stays_inside_its_range():
    p = true_params(seed=7)
    est = p.copy()
    est[:, 2:5] *= 0.1  # would need a factor of 10
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    assert got["out_of_plane_scale"] == pytest.approx(SCALE_RANGE[1], rel=1e-3)
    assert 0.0 < got["fdr_scale_fitted_percent"] < got["fdr_path_percent"]


def test_the_scale_fit_at_its_best_never_exceeds_the_unscaled_drift():
    rng = np.random.default_rng(8)
    p = true_params(seed=8)
    est = p + 0.05 * rng.normal(size=p.shape)
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    assert got["fdr_scale_fitted_percent"] <= got["fdr_path_percent"] + 1e-9


def test_an_elevational_scale_error_shows_in_translation_and_out_of_plane_only():
    p = true_params(seed=1)
    est = p.copy()
    est[:, 2] /= 1.25  # moves 20 % too little out of the plane
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    assert got["elevation_scale"] == pytest.approx(1.25)
    assert got["fdr_rotation_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert got["fdr_in_plane_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert got["fdr_translation_only_percent"] == pytest.approx(got["fdr_path_percent"], rel=1e-9)
    assert got["fdr_out_of_plane_only_percent"] == pytest.approx(got["fdr_path_percent"], rel=1e-9)
    assert got["fdr_elevational_only_percent"] == pytest.approx(got["fdr_path_percent"], rel=1e-9)
    assert got["fdr_tilt_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert got["fdr_path_percent"] > 10.0


def test_a_tilt_error_is_attributed_to_rotation_and_out_of_plane():
    p = true_params(seed=2)
    est = p.copy()
    est[:, 3] += 0.1  # 0.1 degree per frame about the lateral axis
    truth, estimate = sweep(p), sweep(est)
    got = drift_attribution(truth, estimate, SHAPE)
    full = tracking_metrics(truth, estimate, SHAPE).fdr_path_percent
    assert got["fdr_path_percent"] == pytest.approx(full)
    assert got["fdr_translation_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert got["fdr_in_plane_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert got["fdr_rotation_only_percent"] == pytest.approx(full, rel=1e-6)
    assert got["fdr_out_of_plane_only_percent"] == pytest.approx(full, rel=1e-6)
    assert got["fdr_tilt_only_percent"] == pytest.approx(full, rel=1e-6)
    assert got["fdr_elevational_only_percent"] == pytest.approx(0.0, abs=1e-6)
    assert full > 1.0


def test_the_hybrids_use_the_estimate_s_own_parameters():
    rng = np.random.default_rng(3)
    p = true_params(seed=3)
    est = p + 0.05 * rng.normal(size=p.shape)
    got = drift_attribution(sweep(p), sweep(est), SHAPE)
    for name, idx in GROUPS.items():
        hybrid = p.copy()
        hybrid[:, idx] = matrices_to_params(params_to_matrices(est))[:, idx]
        expected = tracking_metrics(sweep(p), sweep(hybrid), SHAPE).fdr_path_percent
        assert got[f"fdr_{name}_only_percent"] == pytest.approx(expected, rel=1e-6), name


def test_no_elevational_motion_in_the_estimate_gives_nan_scale():
    p = true_params(seed=4)
    est = p.copy()
    est[:, 2] = 0.0
    assert np.isnan(drift_attribution(sweep(p), sweep(est), SHAPE)["elevation_scale"])


def test_bad_input_is_refused_like_the_metrics():
    truth = sweep(true_params(n=5))
    with pytest.raises(ValueError, match="at least 2 frames"):
        drift_attribution(truth[:1], truth[:1], SHAPE)
    with pytest.raises(ValueError, match=r"must both be \(n, 4, 4\)"):
        drift_attribution(truth, truth[:3], SHAPE)


def test_the_public_scale_fit_agrees_with_the_attribution_and_refuses_bad_input():
    from SensorlessTrackingLib.attribution import fit_out_of_plane_scale

    rng = np.random.default_rng(9)
    p = true_params(seed=9)
    est = p + 0.05 * rng.normal(size=p.shape)
    est[:, 2:5] *= 0.8
    truth, estimate = sweep(p), sweep(est)
    got = drift_attribution(truth, estimate, SHAPE)
    scale, fdr = fit_out_of_plane_scale(truth, estimate, SHAPE)
    assert scale == pytest.approx(got["out_of_plane_scale"], rel=1e-9)
    assert fdr == pytest.approx(got["fdr_scale_fitted_percent"], rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 frames"):
        fit_out_of_plane_scale(truth[:1], truth[:1], SHAPE)
    with pytest.raises(ValueError, match="must be finite"):
        fit_out_of_plane_scale(truth, np.full_like(truth, np.nan), SHAPE)

"""Noise-weighted LM (``weighting="noise"``): per-axis noise levels in the image axes, ML refit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from NWireCalibrationLib.errors import CalibrationError
from NWireCalibrationLib.metrics import target_errors_mm
from NWireCalibrationLib.pipeline import calibrate_from_points, probe_to_reference
from NWireCalibrationLib.simulate import simulate_nwire
from NWireCalibrationLib.solvers import (
    calibrate_lm,
    calibrate_ransac_lm,
    residual_sigmas_mm,
)
from nwire_synthetic import exact_geometry

LATERAL_MM, AXIAL_MM = 0.3, 0.1  # dot noise across / along the beam (fCal 2.0: about 0.34 / 0.15 mm)


def _target_error(m, sim):
    return float(target_errors_mm(m, sim.image_to_probe, points_px=sim.fov_points_px()).mean())


def _geometry(n_frames=60, seed=3, outliers=0.0):
    """Noise-free dots of a small simulated recording (no rendering needed beyond a tiny image)."""
    sim = simulate_nwire(n_frames=n_frames, seed=seed, image_size_px=(128, 96), depth_mm=70.0, linear_width_mm=70.0,
                         walls=False, reverberation=False, outlier_fraction=outliers)
    return sim, sim.true_points_px.copy(), probe_to_reference(sim.sequence)


def _anisotropic(sim, pts, seed, lateral_mm=LATERAL_MM, axial_mm=AXIAL_MM):
    sx, sy = sim.pixel_spacing_mm
    rng = np.random.default_rng(seed)
    return pts + rng.standard_normal(pts.shape) * np.array([lateral_mm / sx, axial_mm / sy])


def test_noise_free_weighted_fit_is_exact():
    sim, pts, _ = exact_geometry("fCal-2.0")
    poses = sim.probe_to_reference_true
    sol = calibrate_lm(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, weighting="noise")
    assert np.allclose(sol.image_to_probe, sim.image_to_probe, atol=1e-6)
    assert sol.info["weighting"] == "noise" and sol.info["residual_sigmas_mm"].shape == (2, 3)


def test_residual_sigmas_follow_the_injected_noise():
    sim, pts, _ = _geometry()
    poses = sim.probe_to_reference_true
    noisy = _anisotropic(sim, pts, seed=0)
    sig = residual_sigmas_mm(noisy, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom)
    assert sig.shape == (2, 3)
    # Side wires: the residual is the dot's in-plane offset, so lateral ~0.3 mm, axial ~0.1 mm,
    # nothing out of plane.
    assert 0.25 < sig[1, 0] < 0.35 and 0.07 < sig[1, 1] < 0.13 and sig[1, 2] < 1e-9
    # Diagonal wires: alpha turns lateral noise into error along the diagonal, partly out of plane.
    assert sig[0, 2] > sig[0, 1]
    mid = residual_sigmas_mm(noisy, poses, sim.image_to_probe, sim.phantom_to_reference, sim.phantom,
                             residual="middle")
    assert np.all(np.isnan(mid[1])) and np.allclose(mid[0], sig[0])


def test_weighted_fit_recovers_truth_better_under_anisotropic_noise():
    sim, pts, poses = _geometry(n_frames=80, seed=5)
    plain, weighted = [], []
    for seed in range(6):
        noisy = _anisotropic(sim, pts, seed=100 + seed)
        kw = dict(phantom_to_reference=sim.phantom_to_reference)
        plain.append(_target_error(calibrate_lm(noisy, poses, sim.phantom, **kw).image_to_probe, sim))
        weighted.append(_target_error(calibrate_lm(noisy, poses, sim.phantom, weighting="noise", **kw).image_to_probe,
                                      sim))
    plain, weighted = np.array(plain), np.array(weighted)
    assert weighted.mean() < 0.9 * plain.mean(), (plain, weighted)
    assert (weighted < plain).sum() >= 4


def test_weighting_changes_nothing_essential_under_isotropic_noise():
    sim, pts, poses = _geometry(n_frames=80, seed=5)
    noisy = _anisotropic(sim, pts, seed=7, lateral_mm=0.15, axial_mm=0.15)
    kw = dict(phantom_to_reference=sim.phantom_to_reference)
    plain = _target_error(calibrate_lm(noisy, poses, sim.phantom, **kw).image_to_probe, sim)
    weighted = _target_error(calibrate_lm(noisy, poses, sim.phantom, weighting="noise", **kw).image_to_probe, sim)
    assert weighted < 0.15 and weighted < 1.3 * plain


def test_ransac_lm_weighted_with_outlier_poses():
    sim, pts, poses = _geometry(n_frames=60, seed=2, outliers=0.1)
    noisy = _anisotropic(sim, pts, seed=1)
    known = calibrate_ransac_lm(noisy, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                                n_iterations=200, weighting="noise", seed=4)
    again = calibrate_ransac_lm(noisy, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference,
                                n_iterations=200, weighting="noise", seed=4)
    assert np.array_equal(known.image_to_probe, again.image_to_probe)  # deterministic
    assert _target_error(known.image_to_probe, sim) < 0.3
    assert not known.frames_used[sim.outlier].any()
    sig = known.info["residual_sigmas_mm"]
    assert known.info["weighting"] == "noise" and sig[1, 0] > sig[1, 1]  # lateral noise > axial


def test_weighted_lm_with_estimated_phantom_pose():
    sim, pts, poses = exact_geometry("fCal-2.0")
    noisy = _anisotropic(sim, pts, seed=3, lateral_mm=0.1, axial_mm=0.03)
    est = calibrate_lm(noisy, poses, sim.phantom, weighting="noise")
    assert est.phantom_pose == "estimated" and est.info["weighting"] == "noise"
    assert _target_error(est.image_to_probe, sim) < 0.3
    assert np.linalg.norm(est.phantom_to_reference[:3, 3] - sim.phantom_to_reference[:3, 3]) < 1.0


def test_pipeline_reports_weighting_json_safe():
    sim, pts, poses = _geometry(n_frames=40, seed=8)
    noisy = _anisotropic(sim, pts, seed=2)
    r = calibrate_from_points(noisy, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, solver="lm",
                              weighting="noise")
    assert r.info["weighting"] == "noise"
    assert np.asarray(r.info["residual_sigmas_mm"]).shape == (2, 3)
    json.dumps(r.to_dict())
    lsq = calibrate_from_points(noisy, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, solver="lsq",
                                weighting="noise")
    assert lsq.info["weighting"] == "none"  # the linear solver has no residual weights


def test_bad_weighting_names_the_parameter():
    sim, pts, poses = exact_geometry("fCal-2.0")
    y = sim.phantom_to_reference
    with pytest.raises(ValueError, match="weighting.*'bogus'"):
        calibrate_lm(pts, poses, sim.phantom, phantom_to_reference=y, weighting="bogus")
    with pytest.raises(ValueError, match="weighting.*'ml'"):
        calibrate_ransac_lm(pts, poses, sim.phantom, phantom_to_reference=y, weighting="ml")
    with pytest.raises(ValueError, match="weighting.*'Noise'"):
        calibrate_from_points(pts, poses, sim.phantom, phantom_to_reference=y, weighting="Noise")


def test_residual_sigmas_bad_inputs():
    sim, pts, poses = exact_geometry("fCal-2.0")
    y = sim.phantom_to_reference
    with pytest.raises(ValueError, match="residual.*'bogus'"):
        residual_sigmas_mm(pts, poses, sim.image_to_probe, y, sim.phantom, residual="bogus")
    with pytest.raises(ValueError, match="points_px"):
        residual_sigmas_mm(pts[:, :4], poses, sim.image_to_probe, y, sim.phantom)
    with pytest.raises(CalibrationError, match="no frame"):
        residual_sigmas_mm(np.full_like(pts, np.nan), poses, sim.image_to_probe, y, sim.phantom)

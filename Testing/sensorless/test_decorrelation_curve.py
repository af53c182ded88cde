"""The decorrelation curve per depth band (sigma and still correlation), its calibration from
measured patches, and the adaptation's per-fold calibration (issue 25)."""

from dataclasses import replace

import numpy as np
import pytest
from sensorless_helpers import tiny_sweep

from SensorlessTrackingLib.decorrelation import (
    CalibrationSweep,
    DecorrelationConfig,
    PatchMeasurements,
    calibrate_decorrelation,
    calibration_sweep,
    estimate_frame_to_frame,
    fit_depth_curve,
    measure_patches,
    params_from_patches,
)
from SensorlessTrackingLib.pose import absolute_to_frame_to_frame, image_mm_poses, matrices_to_params
from SensorlessTrackingLib.predict import trajectory_from_frame_to_frame

SHAPE, SPACING = (80, 64), (0.25, 0.25)  # 20 mm deep, 16 mm wide
SIGMAS = (0.6, 0.8, 1.0, 1.3)  # mm, per depth band (top to bottom)
STILL = (1.0, 0.98, 0.95, 0.9)


def _synthetic_sweep(rng, sigmas=SIGMAS, still=STILL, n=70, back=0.0, turn_deg=0.0, tilt_sd_deg=0.5):
    """A tracked sweep (mostly "toward", steps 0.2-0.8 mm, small tilts; a share ``back`` of the
    steps goes back) whose 4 x 4 patches' correlations follow ``still_b * exp(-d^2 / 2 sigma_b^2)``
    exactly, ``d`` each patch centre's true elevational displacement and ``b`` its depth band."""
    p = np.zeros((n - 1, 6))
    p[:, 2] = -rng.uniform(0.2, 0.8, size=n - 1) * np.where(rng.random(n - 1) < back, -1.0, 1.0)
    p[:, 3:5] = tilt_sd_deg * rng.normal(size=(n - 1, 2))  # deg
    p[:, 4] += turn_deg  # a steady turn about the image's vertical axis, deg per frame
    p[:, [0, 1, 5]] = 0.05 * rng.normal(size=(n - 1, 3))
    first = np.eye(4)
    first[:3, :3] = np.diag([SPACING[0], SPACING[1], 1.0])
    itr = trajectory_from_frame_to_frame(p, SPACING, SHAPE, first)
    truth = matrices_to_params(absolute_to_frame_to_frame(
        image_mm_poses(itr, SPACING, ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2))))
    x, y = np.meshgrid([-6.0, -2.0, 2.0, 6.0], [-7.5, -2.5, 2.5, 7.5])
    pts = np.column_stack([x.ravel(), y.ravel()])
    depth = (pts[:, 1] + 10.0) / 20.0  # 0.125 ... 0.875: one row of patches per band
    meas = PatchMeasurements(pts, depth, np.zeros((n - 1, len(pts), 2)), np.ones((n - 1, len(pts))))
    cs = CalibrationSweep(meas, itr, SPACING, SHAPE, truth, DecorrelationConfig(patches=4))
    d = cs.patch_distances()
    band = np.minimum((depth * 4).astype(int), 3)
    rho = np.asarray(still)[band] * np.exp(-(d**2) / (2.0 * np.asarray(sigmas)[band] ** 2))
    return replace(cs, measurements=replace(meas, correlation=rho))


def test_depth_curve_recovers_a_known_depth_dependent_curve():
    rng = np.random.default_rng(11)
    sweeps = [_synthetic_sweep(rng) for _ in range(3)]
    cfg = fit_depth_curve(sweeps, DecorrelationConfig(patches=4), bands=4)
    np.testing.assert_allclose(cfg.sigma_bands_mm, SIGMAS, rtol=0.03)
    np.testing.assert_allclose(cfg.still_correlation_bands, STILL, atol=0.01)
    # with the recovered curve the patches' distances give back the true elevational steps
    est = params_from_patches(sweeps[0].measurements, replace(cfg, direction=-1, out_of_plane_rotations="both"))
    np.testing.assert_allclose(est[:, 2], sweeps[0].truth[:, 2], atol=0.03)
    # one curve for all depths cannot: it is off by more than 10 % in the top or the bottom band
    one = fit_depth_curve(sweeps, DecorrelationConfig(patches=4), bands=1)
    assert len(one.sigma_bands_mm) == 1
    assert max(abs(one.sigma_mm / s - 1.0) for s in (SIGMAS[0], SIGMAS[-1])) > 0.1


def test_signed_curve_counts_the_steps_back_toward_zero():
    """Steps back (a freehand sweep's jitter) read as steps forward; the signed fit's curve is
    smaller than the magnitude's, so the estimated path overshoots less."""
    rng = np.random.default_rng(12)
    sweeps = [_synthetic_sweep(rng, back=0.25) for _ in range(3)]
    base = DecorrelationConfig(patches=4)
    signed = fit_depth_curve(sweeps, base, bands=4)
    magnitude = fit_depth_curve(sweeps, base, bands=4, signed=False)
    np.testing.assert_allclose(magnitude.sigma_bands_mm, SIGMAS, rtol=0.03)
    assert all(s < m for s, m in zip(signed.sigma_bands_mm, magnitude.sigma_bands_mm))
    true_total = sum(float(s.truth[:, 2].sum()) for s in sweeps)
    totals = {name: sum(float(params_from_patches(s.measurements, replace(c, direction=-1))[:, 2].sum()) for s in sweeps)
              for name, c in (("signed", signed), ("magnitude", magnitude))}
    assert abs(totals["signed"] - true_total) < 0.5 * abs(totals["magnitude"] - true_total)


def test_depth_config_validation_and_plain_values():
    cfg = DecorrelationConfig(sigma_bands_mm=[0.5, 0.7], still_correlation_bands=[0.99, 0.97])  # lists: a checkpoint's
    assert cfg.sigma_bands_mm == (0.5, 0.7) and cfg.still_correlation_bands == (0.99, 0.97)
    assert DecorrelationConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="sigma_bands_mm"):
        DecorrelationConfig(sigma_bands_mm=(0.5, -1.0))
    with pytest.raises(ValueError, match="still_correlation_bands"):
        DecorrelationConfig(still_correlation_bands=(1.2,))
    with pytest.raises(ValueError, match="as many bands"):
        DecorrelationConfig(sigma_bands_mm=(0.5, 0.7), still_correlation_bands=(0.9,))


def test_measured_patches_give_the_estimate_and_calibrate_without_measuring_again():
    res = tiny_sweep(seed=3, n_frames=12, length_mm=3.0, sigma_elevation_mm=0.7, n_rows=96, n_cols=96,
                     depth_mm=19.2, width_mm=19.2)
    seq = res.sequence
    cfg = DecorrelationConfig(sigma_mm=0.7, sigma_bands_mm=(0.6, 0.7, 0.8), still_correlation_bands=(1.0, 0.99, 0.98))
    meas = measure_patches(seq.frames, seq.pixel_spacing_mm, cfg)
    np.testing.assert_array_equal(params_from_patches(meas, cfg), estimate_frame_to_frame(seq.frames, seq.pixel_spacing_mm, cfg))
    itr = seq.transforms["ImageToReference"].matrices
    cs = calibration_sweep(seq.frames, itr, seq.pixel_spacing_mm)
    assert cs.config.patches == 4  # CALIBRATION_BASE
    a = calibrate_decorrelation([cs])
    b = calibrate_decorrelation([(seq.frames, itr, seq.pixel_spacing_mm)])
    assert a == b and len(a.sigma_bands_mm) == 4 and a.direction == -1
    with pytest.raises(ValueError, match="do not fit"):
        calibrate_decorrelation([cs], base=DecorrelationConfig(patches=3))
    uniform = calibrate_decorrelation([(seq.frames, itr, seq.pixel_spacing_mm)], curve="uniform")
    assert uniform.sigma_bands_mm == () and uniform.patches == 3
    with pytest.raises(ValueError, match="curve"):
        calibrate_decorrelation([cs], curve="cubic")


def _problems_with_patches(rng, sigmas_per_sweep):
    """Adaptation problems (:func:`SensorlessTrackingLib.adapt._choose`) whose sweeps carry
    measured patches (``cal``) of the given curve each."""
    from SensorlessTrackingLib.attribution import out_of_plane_problem

    out = []
    for sigma in sigmas_per_sweep:
        cs = _synthetic_sweep(rng, sigmas=(sigma,) * 4, still=(1.0,) * 4)
        _, poses, path = out_of_plane_problem(cs.image_to_reference, cs.image_to_reference, SHAPE)
        out.append({"p": cs.truth * 1.2, "dec": None, "direction": "toward", "poses": poses, "path": path, "cal": cs})
    return out


def test_adaptation_calibrates_the_decorrelation_per_fold_without_the_held_back_sweep(monkeypatch):
    import SensorlessTrackingLib.decorrelation as decorrelation
    from SensorlessTrackingLib.adapt import _choose, _fold_decorrelation

    rng = np.random.default_rng(13)
    problems = _problems_with_patches(rng, (0.8, 0.8, 0.8, 2.4))  # the last sweep's speckle decorrelates slower
    cfg_fold, fold = _fold_decorrelation(problems, 3)
    cfg_others = calibrate_decorrelation([pr["cal"] for pr in problems[:3]])
    cfg_all = calibrate_decorrelation([pr["cal"] for pr in problems])
    assert cfg_fold == cfg_others and cfg_fold.sigma_mm == pytest.approx(0.8, rel=0.05)
    assert cfg_all.sigma_mm > 1.03 * cfg_others.sigma_mm  # calibrated on all, the held-back sweep would count
    # the held-back sweep is estimated with the others' curve: its steps read 3x too short
    assert fold[3]["dec"][:, 2].sum() == pytest.approx(problems[3]["cal"].truth[:, 2].sum() / 3.0, rel=0.1)
    seen = []
    real = decorrelation.calibrate_decorrelation
    monkeypatch.setattr(decorrelation, "calibrate_decorrelation", lambda cals, **kw: seen.append(list(cals)) or real(cals, **kw))
    chosen, loo, last, _ = _choose(problems, ["none", "decorrelation"], None)
    assert len(seen) == len(problems)
    for i, cals in enumerate(seen):
        assert problems[i]["cal"] not in cals and len(cals) == len(problems) - 1
    # the held-back sweep's figure is that of the others' curve: it drifts (the steps 1/3 long)
    assert last["decorrelation"] > 30.0


def test_rotations_chosen_on_held_out_sweeps():
    """The tilts are estimated only where that lowers the drift of sweeps the curve was not fitted
    on: a sweep that turns steadily needs them; one that does not keeps the median distance."""
    from SensorlessTrackingLib.decorrelation import ROTATION_REFERENCE

    rng = np.random.default_rng(14)
    turning = [_synthetic_sweep(rng, still=(1.0,) * 4, turn_deg=1.0) for _ in range(4)]
    straight = [_synthetic_sweep(rng, still=(1.0,) * 4, tilt_sd_deg=0.0) for _ in range(4)]
    assert calibrate_decorrelation(turning).out_of_plane_rotations in ("lateral", "both")
    assert calibrate_decorrelation(straight).out_of_plane_rotations == ROTATION_REFERENCE == "none"
    assert calibrate_decorrelation(turning[:1]).out_of_plane_rotations == "none"  # nothing to hold out
    assert calibrate_decorrelation(turning, choose_rotations=False).out_of_plane_rotations == "lateral"  # the base's
    # the former rule (the calibration sweeps' own drift), kept for baselines, needs no held-out sweep
    assert calibrate_decorrelation(turning[:1], rotation_choice="in-sample").out_of_plane_rotations in ("lateral", "both")
    with pytest.raises(ValueError, match="rotation_choice"):
        calibrate_decorrelation(turning, rotation_choice="best")

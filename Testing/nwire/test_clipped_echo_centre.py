"""Sub-pixel centres of saturated (clipped, flat-topped) wire echoes: censored Gaussian fit (issue 4)."""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.detect_hessian import (
    HessianDetector,
    HessianSettings,
    clip_level_of,
    fit_clipped_gaussian_centres,
    refine_centres,
)
from nwire_synthetic import small_simulation

SIGMA_X_PX, SIGMA_Y_PX = 7.0, 2.5  # wire echoes are wider across the beam than along it


def _echo(centre, *, amplitude, noise=0.0, seed=0, shape=(80, 100)):
    """An anisotropic Gaussian echo over a background of 10, clipped to uint8; true centre (x, y)."""
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]]
    img = 10.0 + amplitude * np.exp(-((xx - centre[0]) ** 2 / (2 * SIGMA_X_PX ** 2)
                                      + (yy - centre[1]) ** 2 / (2 * SIGMA_Y_PX ** 2)))
    img += np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _fit(img, start, clip_level=253.0):
    return fit_clipped_gaussian_centres(img, start, half_size_px=(13, 8), clip_level=clip_level, max_shift_px=13)


def test_clipped_echo_centre_recovered_where_peak_search_errs():
    """Flat-topped noisy echoes: the censored fit finds the centre, the peak search wanders over the plateau."""
    rng = np.random.default_rng(0)
    err_peak, err_fit = [], []
    for seed in range(10):
        centre = np.array([50.0, 40.0]) + rng.uniform(-0.5, 0.5, 2)
        img = _echo(centre, amplitude=800.0, noise=12.0, seed=seed)
        assert (img == 255).sum() > 100  # a wide saturated plateau
        # The detector's default peak search (0.2 mm smoothing, 1 mm radius at 0.078 mm/px).
        peak = refine_centres(img, centre[None] + [[-2.0, 1.0]], search_radius_px=13, smoothing_px=2.5)
        fitted, ok = _fit(img, peak)
        assert ok.all()
        err_peak.append(peak[0] - centre)
        err_fit.append(fitted[0] - centre)
    err_peak, err_fit = np.abs(err_peak), np.abs(err_fit)
    # Measured: peak search mean |dx| 0.081 px (max 0.21), censored fit 0.027 px (max 0.06).
    assert err_fit.max() < 0.1
    assert err_peak[:, 0].mean() > 2 * err_fit[:, 0].mean()


def test_censoring_matters_on_clipped_echo():
    """The same fit without censoring (clip level above the data) is pulled by the flat top."""
    errs_censored, errs_plain = [], []
    for seed in range(6):
        centre = np.array([50.3, 40.6])
        img = _echo(centre, amplitude=800.0, noise=12.0, seed=seed)
        start = centre[None] + [[1.0, -0.5]]
        errs_censored.append(np.abs(_fit(img, start)[0][0] - centre))
        errs_plain.append(np.abs(_fit(img, start, clip_level=1e9)[0][0] - centre))
    assert np.mean(errs_censored) < 0.5 * np.mean(errs_plain)


@pytest.mark.parametrize("centre", [(50.0, 40.0), (49.63, 40.41), (50.27, 39.58)])
def test_unclipped_echo_gives_gaussian_centre(centre):
    img = _echo(centre, amplitude=200.0).astype(np.float64)  # no pixel reaches the clip level
    assert img.max() < 253
    fitted, ok = _fit(img, np.array([[centre[0] - 1.5, centre[1] + 1.0]]))
    assert ok.all()
    # Only the rounding to integer grey levels separates the fit from the truth.
    assert np.allclose(fitted[0], centre, atol=0.01)


def test_fit_rejections_keep_the_start():
    img = _echo((50.0, 40.0), amplitude=200.0)
    start = np.array([[50.5, 40.2], [np.nan, np.nan], [53.0, 40.0]])
    # A fit that moves the centre further than the bound (3 px > 0.8 px) is rejected; NaN stays NaN.
    fitted, ok = fit_clipped_gaussian_centres(img, start, half_size_px=(13, 8), clip_level=253, max_shift_px=0.8)
    assert ok.tolist() == [True, False, False]
    assert np.isnan(fitted[1]).all() and np.array_equal(fitted[2], start[2])
    # A plateau wider than the window has no flank to locate it: rejected.
    wide = _echo((50.0, 40.0), amplitude=20000.0)
    fitted, ok = fit_clipped_gaussian_centres(wide, np.array([[48.0, 40.0]]), half_size_px=(6, 8), clip_level=253,
                                              max_shift_px=13)
    assert not ok[0] and np.array_equal(fitted[0], [48.0, 40.0])


def test_clip_level_of_is_two_levels_below_the_maximum():
    assert clip_level_of(np.array([[0, 120], [251, 3]], np.uint8)) == 249.0


@pytest.mark.parametrize("kwargs, name", [
    ({"half_size_px": 0}, "half_size_px"),
    ({"half_size_px": (13, np.nan)}, "half_size_px"),
    ({"max_shift_px": 0.0}, "max_shift_px"),
    ({"points": np.zeros((3,))}, "points_px"),
])
def test_fit_rejects_bad_inputs(kwargs, name):
    args = {"half_size_px": (13, 8), "max_shift_px": 5.0, "points": np.array([[50.0, 40.0]])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fit_clipped_gaussian_centres(np.zeros((80, 100), np.uint8), args.pop("points"), clip_level=253.0, **args)


@pytest.mark.parametrize("kwargs, name", [
    ({"refine_model": "gaussian"}, "refine_model"),
    ({"refine_model": None}, "refine_model"),
    ({"refine_clip_level": 0}, "refine_clip_level"),
    ({"refine_clip_level": 300.0}, "refine_clip_level"),
    ({"refine_clip_level": "255"}, "refine_clip_level"),
    ({"refine_clip_level": True}, "refine_clip_level"),
    ({"refine_fit_window_mm": (1.0,)}, "refine_fit_window_mm"),
    ({"refine_fit_window_mm": (1.0, 0.0)}, "refine_fit_window_mm"),
    ({"refine_fit_window_mm": (1.0, float("nan"))}, "refine_fit_window_mm"),
    ({"refine_fit_window_mm": "wide"}, "refine_fit_window_mm"),
])
def test_settings_reject_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HessianSettings(**kwargs)


def test_settings_accept_good_values():
    s = HessianSettings(refine_model="clipped-gaussian", refine_clip_level=250, refine_fit_window_mm=(1.2, 0.5))
    assert (s.refine_model, s.refine_clip_level, s.refine_fit_window_mm) == ("clipped-gaussian", 250, (1.2, 0.5))


def test_default_refine_model_and_detector_wiring():
    """The default is "adaptive" (peak search or PSF-sized fit by the noise, issue 23); "peak" stops at the
    peak search; "clipped-gaussian" fits the censored Gaussian from there, on the raw image."""
    default = HessianSettings()
    assert (default.refine_model, default.refine_clip_level, default.refine_fit_window_mm) == (
        "adaptive", None, (1.0, 0.6))
    sim = small_simulation()
    sp = float(np.mean(sim.pixel_spacing_mm))
    image = sim.sequence.frames[0]
    pts = np.where(np.isfinite(sim.true_points_px[0]), sim.true_points_px[0] + 0.7, np.nan)
    peak = HessianDetector(sim.phantom, sp, settings=HessianSettings(refine_model="peak")).refine(image, pts)
    assert np.array_equal(peak, refine_centres(image, pts, search_radius_px=1.0 / sp, smoothing_px=0.2 / sp),
                          equal_nan=True)
    fit = HessianDetector(sim.phantom, sp, settings=HessianSettings(refine_model="clipped-gaussian")).refine(image, pts)
    expected, _ = fit_clipped_gaussian_centres(image, peak, half_size_px=(1.0 / sp, 0.6 / sp),
                                               clip_level=clip_level_of(image), max_shift_px=1.0 / sp)
    assert np.array_equal(fit, expected, equal_nan=True)
    assert not np.array_equal(fit, peak, equal_nan=True)
    # On the simulation the fit is closer to the true dot centres than the peak search.
    truth = sim.true_points_px[0]
    assert np.nanmean(np.hypot(*(fit - truth).T)) < np.nanmean(np.hypot(*(peak - truth).T))
    det = HessianDetector(sim.phantom, sp)
    adaptive = det.refine(image, pts)
    assert np.array_equal(adaptive, det.refine_adaptive(image, peak, clip_level=clip_level_of(image)), equal_nan=True)

"""The decorrelation's coherence correction (issue 25): speckle that is not fully developed stays
correlated at any distance; its share is measured from each patch's sideways self-correlation
and removed before the curve is inverted."""

from dataclasses import replace

import numpy as np
import pytest
from sensorless_helpers import tiny_sweep
from test_decorrelation_curve import SIGMAS, _synthetic_sweep

from SensorlessTrackingLib.decorrelation import (
    COHERENCE_LAGS_PX,
    COHERENCE_WINDOW,
    DecorrelationConfig,
    calibrate_decorrelation,
    calibration_sweep,
    estimate_frame_to_frame,
    fit_depth_curve,
    measure_patches,
    params_from_patches,
)
from SensorlessTrackingLib.decorrelation import _lateral_correlation

REFERENCE = (0.5, 0.45, 0.4, 0.35)  # fully developed speckle's sideways correlation per depth band
LAG = 2


def _coherent_sweep(rng, share):
    """A synthetic sweep (:func:`_synthetic_sweep`, no still decorrelation) whose patches carry a
    coherent share ``share``: ``rho = c + (1 - c) exp(-d^2 / 2 sigma^2)`` and sideways
    self-correlation ``q = c + (1 - c) r_band`` at a shift of ``LAG`` px."""
    cs = _synthetic_sweep(rng, still=(1.0,) * 4)
    m = cs.measurements
    band = np.minimum((m.depth_fraction * 4).astype(int), 3)
    rho = share + (1.0 - share) * m.correlation
    n = len(m.correlation) + 1
    q = np.broadcast_to(share + (1.0 - share) * np.asarray(REFERENCE)[band], (1, n, len(band))).copy()
    q += 0.01 * rng.normal(size=q.shape)  # measurement noise, averaged by the running mean
    return replace(cs, measurements=replace(m, correlation=rho, lateral_correlation=q, lateral_lags_px=(LAG,)))


def test_coherence_correction_recovers_the_curve_and_the_steps_of_coherent_tissue():
    rng = np.random.default_rng(21)
    sweeps = [_coherent_sweep(rng, c) for c in (0.0, 0.15, 0.3, 0.45)]
    cfg = fit_depth_curve(sweeps, DecorrelationConfig(patches=4), bands=4)
    assert cfg.coherence_lag_px == LAG
    np.testing.assert_allclose(cfg.sigma_bands_mm, SIGMAS, rtol=0.03)
    np.testing.assert_allclose(cfg.coherence_reference_bands, REFERENCE, atol=0.03)
    plain = fit_depth_curve(sweeps, DecorrelationConfig(patches=4), bands=4, coherence=False)
    assert plain.coherence_lag_px == 0 and plain.coherence_reference_bands == ()
    for s in sweeps:
        true_total = float(s.truth[:, 2].sum())
        est = {name: float(params_from_patches(s.measurements, replace(c, direction=-1))[:, 2].sum())
               for name, c in (("corrected", cfg), ("plain", plain))}
        assert est["corrected"] == pytest.approx(true_total, rel=0.05)
    # without the correction the most coherent sweep's path comes out far too short
    most = sweeps[-1]
    short = float(params_from_patches(most.measurements, replace(plain, direction=-1))[:, 2].sum())
    assert abs(short) < 0.85 * abs(float(most.truth[:, 2].sum()))


def test_no_correction_where_the_tissue_is_fully_developed_speckle():
    rng = np.random.default_rng(22)
    sweeps = [_coherent_sweep(rng, 0.0) for _ in range(3)]
    for s in sweeps:  # sideways self-correlation unrelated to the elevational one
        m = s.measurements
        q = rng.uniform(0.2, 0.6, size=m.lateral_correlation.shape)
        s.measurements.lateral_correlation[...] = q
    cfg = fit_depth_curve(sweeps, DecorrelationConfig(patches=4), bands=4)
    np.testing.assert_allclose(cfg.sigma_bands_mm, SIGMAS, rtol=0.03)
    # whatever it keeps, it removes (almost) nothing: the steps stay right
    for s in sweeps:
        est = params_from_patches(s.measurements, replace(cfg, direction=-1))[:, 2]
        np.testing.assert_allclose(est.sum(), s.truth[:, 2].sum(), rtol=0.03)


def test_sideways_self_correlation_is_measured_per_frame_and_patch():
    res = tiny_sweep(seed=4, n_frames=10, length_mm=2.0, n_rows=96, n_cols=96, depth_mm=19.2, width_mm=19.2)
    frames = res.sequence.frames
    spacing = res.sequence.pixel_spacing_mm
    meas = measure_patches(frames, spacing, DecorrelationConfig(patches=3), lateral_lags_px=(1, 3))
    assert meas.lateral_lags_px == (1, 3) and meas.lateral_correlation.shape == (2, len(frames), len(meas.points_mm))
    plain = measure_patches(frames, spacing, DecorrelationConfig(patches=3))
    assert plain.lateral_correlation is None and plain.lateral_lags_px == ()
    np.testing.assert_array_equal(plain.correlation, meas.correlation)
    # speckle decorrelates sideways: a larger shift correlates less
    assert np.all(meas.lateral_correlation[0].mean(axis=0) > meas.lateral_correlation[1].mean(axis=0))
    q = meas.coherence(3)
    assert q.shape == meas.correlation.shape
    with pytest.raises(ValueError, match="without a sideways shift of 2 px"):
        meas.coherence(2)


def test_sideways_correlation_matches_numpy_on_a_known_patch():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    img += np.roll(img, 1, axis=1)  # neighbours correlated
    box, lag = (5, 7, 20, 30), 2
    a = img[5:25, 7 : 7 + 30 - lag].ravel()
    b = img[5:25, 7 + lag : 7 + 30].ravel()
    assert _lateral_correlation(img, box, lag) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-6)
    assert _lateral_correlation(np.full((40, 50), 3.0, np.float32), box, lag) == 1.0  # constant: all coherent
    frames = rng.integers(0, 255, size=(3, 60, 60)).astype(np.uint8)
    frames[:, :, ::2] = 200  # every other column bright: strongly coherent at even shifts
    meas = measure_patches(frames, (0.2, 0.2), DecorrelationConfig(patches=2, max_shift_mm=0.4), lateral_lags_px=(1, 2))
    # even shift: the bright columns meet each other -> correlated; odd shift: anti-correlated (clipped to 0)
    assert np.all(meas.lateral_correlation[1] > 0.3)
    assert np.all(meas.lateral_correlation[0] < 0.1)


def test_running_mean_of_the_coherence_and_the_pairs():
    rng = np.random.default_rng(23)
    cs = _coherent_sweep(rng, 0.2)
    q = cs.measurements.lateral_correlation[0]
    pair = cs.measurements.coherence(LAG)
    assert pair.shape == cs.measurements.correlation.shape
    k = len(q) // 2
    window = q[k - COHERENCE_WINDOW // 2 : k + COHERENCE_WINDOW // 2 + 1].mean(axis=0)
    window_next = q[k + 1 - COHERENCE_WINDOW // 2 : k + 1 + COHERENCE_WINDOW // 2 + 1].mean(axis=0)
    np.testing.assert_allclose(pair[k], 0.5 * (window + window_next), atol=1e-12)


def test_calibration_measures_the_shifts_and_estimation_uses_the_chosen_one():
    res = tiny_sweep(seed=3, n_frames=14, length_mm=3.0, sigma_elevation_mm=0.7, n_rows=96, n_cols=96,
                     depth_mm=19.2, width_mm=19.2)
    seq = res.sequence
    itr = seq.transforms["ImageToReference"].matrices
    cs = calibration_sweep(seq.frames, itr, seq.pixel_spacing_mm)
    assert set(cs.measurements.lateral_lags_px) <= set(COHERENCE_LAGS_PX) and cs.measurements.lateral_lags_px
    cfg = calibrate_decorrelation([cs])
    if not cfg.coherence_lag_px:  # the fit may keep no correction; force one to check the estimate path
        cfg = replace(cfg, coherence_lag_px=cs.measurements.lateral_lags_px[0],
                      coherence_reference_bands=(0.3,) * len(cfg.sigma_bands_mm))
    via_patches = params_from_patches(cs.measurements, cfg)
    np.testing.assert_allclose(estimate_frame_to_frame(seq.frames, seq.pixel_spacing_mm, cfg), via_patches,
                               atol=1e-9)
    # a shift too wide for these frames' patches is refused with one clear line
    wide = replace(cfg, coherence_lag_px=80)
    with pytest.raises(ValueError, match="does not fit these frames' patches"):
        estimate_frame_to_frame(seq.frames, seq.pixel_spacing_mm, wide)


def test_coherence_settings_are_checked_and_round_trip():
    cfg = DecorrelationConfig(sigma_bands_mm=[0.5, 0.7], coherence_lag_px=2, coherence_reference_bands=[0.4, 0.3])
    assert cfg.coherence_reference_bands == (0.4, 0.3)
    assert DecorrelationConfig(**cfg.to_dict()) == cfg
    assert DecorrelationConfig(coherence_lag_px=2.0, coherence_reference_bands=(0.4,)).coherence_lag_px == 2
    with pytest.raises(ValueError, match="coherence_lag_px"):
        DecorrelationConfig(coherence_lag_px=-1)
    with pytest.raises(ValueError, match="coherence_lag_px"):
        DecorrelationConfig(coherence_lag_px=1.5, coherence_reference_bands=(0.4,))
    with pytest.raises(ValueError, match="needs coherence_reference_bands"):
        DecorrelationConfig(coherence_lag_px=2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DecorrelationConfig(coherence_lag_px=2, coherence_reference_bands=(1.4,))
    with pytest.raises(ValueError, match="as many bands"):
        DecorrelationConfig(sigma_bands_mm=(0.5, 0.7), coherence_lag_px=2, coherence_reference_bands=(0.4,))
    # an older checkpoint's settings (no coherence fields) load with the correction off
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("coherence")}
    assert DecorrelationConfig(**old).coherence_lag_px == 0


def test_frames_the_decorrelation_cannot_measure_are_one_line_and_exit_2(tmp_path, capsys):
    """Frames too small for the patches (or for a calibrated coherence shift) are refused with one
    line on the CLI (exit 2), a SequenceError in the library; before, a traceback."""
    from sensorless_helpers import run_cli

    from FreehandUSLib.errors import SequenceError
    from FreehandUSLib.io import write_sequence
    from SensorlessTrackingLib.predict import track_sequence

    small = tiny_sweep(seed=1, n_frames=6, length_mm=1.0, n_rows=24, n_cols=24, depth_mm=4.8, width_mm=4.8)
    path = write_sequence(small.sequence, tmp_path / "small.igs.mha")
    assert run_cli(["track", "predict", str(path), "--model", "decorrelation", "--out", str(tmp_path / "e.igs.mha")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("freehandus track predict: error: speckle decorrelation cannot track these frames")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "e.igs.mha").exists()
    seq = tiny_sweep(seed=2, n_frames=6, length_mm=1.0, n_rows=96, n_cols=96, depth_mm=19.2, width_mm=19.2).sequence
    wide = DecorrelationConfig(sigma_bands_mm=(0.7,) * 3, coherence_lag_px=40, coherence_reference_bands=(0.3,) * 3)
    with pytest.raises(SequenceError, match="does not fit these frames' patches"):
        track_sequence(seq, "decorrelation", decorrelation=wide)


@pytest.mark.parametrize("changes", [
    {"coherence_lag_px": -2, "coherence_reference_bands": [0.3]},
    {"coherence_lag_px": 1.5, "coherence_reference_bands": [0.3]},
    {"coherence_lag_px": float("nan"), "coherence_reference_bands": [0.3]},
    {"coherence_lag_px": True, "coherence_reference_bands": [0.3]},
    {"coherence_lag_px": [2], "coherence_reference_bands": [0.3]},
    {"coherence_lag_px": 2, "coherence_reference_bands": []},
    {"coherence_lag_px": 2, "coherence_reference_bands": [float("nan")]},
    {"coherence_lag_px": 2, "coherence_reference_bands": [-0.1]},
    {"coherence_lag_px": 2, "coherence_reference_bands": "abc"},
    {"coherence_lag_px": 2, "coherence_reference_bands": 0.3},
])
def test_a_checkpoint_with_bad_coherence_settings_is_refused(changes):
    """An adapted checkpoint's decorrelation record is checked on loading (ModelFileError, one
    line on the CLI): hostile or careless coherence fields never reach the estimate."""
    from SensorlessTrackingLib.corrections import check_adapted_decorrelation

    settings = {**DecorrelationConfig(sigma_bands_mm=(0.7,)).to_dict(), **changes}
    with pytest.raises(ValueError, match="bad adaptation decorrelation"):
        check_adapted_decorrelation(settings)
    good = {**DecorrelationConfig(sigma_bands_mm=(0.7,)).to_dict(), "coherence_lag_px": 2,
            "coherence_reference_bands": [0.3]}
    assert check_adapted_decorrelation(good) == good

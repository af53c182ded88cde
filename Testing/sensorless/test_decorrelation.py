"""Decorrelation baseline: the log-compression correction and tracking a simulated sweep."""

import numpy as np
import pytest
from sensorless_helpers import tiny_sweep

from SensorlessTrackingLib.decorrelation import (
    DecorrelationConfig,
    calibrate_decorrelation,
    estimate_frame_to_frame,
    log_to_intensity_correlation,
)
from SensorlessTrackingLib.pose import absolute_to_frame_to_frame, image_mm_poses, matrices_to_params


def test_log_correlation_inversion_matches_speckle_statistics():
    rng = np.random.default_rng(0)
    n = 200_000
    for rho_c in (0.3, 0.6, 0.9):
        # correlated circular Gaussian fields -> exponential intensities with correlation rho_c^2
        a = rng.normal(size=(n, 2))
        b = rho_c * a + np.sqrt(1 - rho_c**2) * rng.normal(size=(n, 2))
        ia, ib = (a**2).sum(1), (b**2).sum(1)
        rho_log = np.corrcoef(np.log(ia), np.log(ib))[0, 1]
        assert log_to_intensity_correlation(rho_log) == pytest.approx(rho_c**2, abs=0.02)
    assert log_to_intensity_correlation(1.0) == pytest.approx(1.0)
    assert log_to_intensity_correlation(0.0) == pytest.approx(0.0)


def _truth(res):
    seq = res.sequence
    rows, cols = seq.frames.shape[1:]
    poses = image_mm_poses(seq.transforms["ImageToReference"].matrices, seq.pixel_spacing_mm, ((cols - 1) / 2, (rows - 1) / 2))
    return matrices_to_params(absolute_to_frame_to_frame(poses))


def test_decorrelation_follows_elevational_and_in_plane_motion():
    res = tiny_sweep(seed=1, n_frames=20, length_mm=4.0, sigma_elevation_mm=0.6, n_rows=96, n_cols=96,
                     depth_mm=19.2, width_mm=19.2)
    truth = _truth(res)
    est = estimate_frame_to_frame(res.sequence.frames, res.sequence.pixel_spacing_mm, DecorrelationConfig(sigma_mm=0.6))
    assert est.shape == (19, 6)
    # elevational steps: right sign (the simulated probe moves towards -z of the image) and size
    assert np.all(est[:, 2] < 0)
    assert np.median(est[:, 2] / truth[:, 2]) == pytest.approx(1.0, abs=0.35)
    # in-plane translations follow the truth closely
    assert np.corrcoef(est[:, 0], truth[:, 0])[0, 1] > 0.8


def test_calibration_recovers_direction_and_sigma_scale():
    res = tiny_sweep(seed=2, n_frames=16, length_mm=4.0, sigma_elevation_mm=0.8, n_rows=96, n_cols=96,
                     depth_mm=19.2, width_mm=19.2)
    seq = res.sequence
    cfg = calibrate_decorrelation([(seq.frames, seq.transforms["ImageToReference"].matrices, seq.pixel_spacing_mm)])
    assert cfg.direction == -1
    assert 0.4 < cfg.sigma_mm < 1.4
    est = estimate_frame_to_frame(seq.frames, seq.pixel_spacing_mm, cfg)
    truth = _truth(res)
    assert abs(est[:, 2].sum() - truth[:, 2].sum()) < 0.3 * abs(truth[:, 2].sum())


def test_decorrelation_ignores_the_black_corners_of_a_convex_image():
    res = tiny_sweep(seed=3, n_frames=10, length_mm=2.0, geometry="convex", n_rows=96, n_cols=96, depth_mm=20.0,
                     radius_mm=20.0, sector_deg=60.0, sigma_elevation_mm=0.6)
    seq = res.sequence
    assert seq.frames[:, 0, 0].max() == 0  # outside the sector
    truth = _truth(res)
    est = estimate_frame_to_frame(seq.frames, seq.pixel_spacing_mm, DecorrelationConfig(sigma_mm=0.6))
    assert np.all(est[:, 2] < 0)
    # constant black patches would read as "no motion"; inside the sector the steps are seen
    assert abs(np.median(est[:, 2] / truth[:, 2]) - 1.0) < 0.5


@pytest.mark.parametrize(
    "frames, match",
    [(np.zeros((1, 32, 32), np.uint8), "at least 2"), (np.zeros((32, 32), np.uint8), "n_frames, rows, cols")],
)
def test_decorrelation_bad_input(frames, match):
    with pytest.raises(ValueError, match=match):
        estimate_frame_to_frame(frames, (0.2, 0.2))


def test_decorrelation_config_validation():
    with pytest.raises(ValueError, match="sigma_mm"):
        DecorrelationConfig(sigma_mm=0)
    with pytest.raises(ValueError, match="direction"):
        DecorrelationConfig(direction=0)
    with pytest.raises(ValueError, match="out_of_plane_rotations"):
        DecorrelationConfig(out_of_plane_rotations="tilt")


def test_calibration_scores_each_sweep_in_its_own_direction(caplog):
    """A sweep and the same sweep played backwards (a sweep in the other direction, tracked as
    such) calibrate like the sweep alone: before, the backwards sweep was scored in the first
    one's direction and its drift ran to about twice the path."""
    import logging

    res = tiny_sweep(seed=2, n_frames=16, length_mm=4.0, sigma_elevation_mm=0.8, n_rows=96, n_cols=96,
                     depth_mm=19.2, width_mm=19.2)
    seq = res.sequence
    itr = seq.transforms["ImageToReference"].matrices
    forward = (seq.frames, itr, seq.pixel_spacing_mm)
    backward = (np.ascontiguousarray(seq.frames[::-1]), itr[::-1].copy(), seq.pixel_spacing_mm)

    def drifts(sweeps):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="SensorlessTrackingLib.decorrelation"):
            cfg = calibrate_decorrelation(sweeps)
        found = [r.getMessage().split("held-out mean final drift ")[1] for r in caplog.records
                 if "held-out mean final drift" in r.getMessage()]
        return cfg, [float(part.split()[1]) for msg in found for part in msg.split(", ")]

    alone, d_alone = drifts([forward])
    both, d_both = drifts([forward, backward])
    # one sweep: nothing to hold out; two: each scored with the other's curve in its own direction
    # (scored in the first sweep's direction the backwards one drifts about twice its path, ~96 %)
    assert d_alone == [] and len(d_both) == 3 and max(d_both) < 50.0
    assert both.sigma_mm == pytest.approx(alone.sigma_mm, rel=0.1)

"""The tracked N-wire acquisition simulator."""

from __future__ import annotations

import numpy as np
import pytest

from FreehandUSLib.io import read_sequence
from NWireCalibrationLib.correspondences import point_to_wire_distances
from NWireCalibrationLib.pipeline import load_setup, probe_to_reference
from NWireCalibrationLib.simulate import SimulationSettings, simulate_nwire, write_simulation
from nwire_synthetic import small_simulation


@pytest.mark.parametrize("probe", ["linear", "convex"])
def test_truth_is_consistent(probe):
    sim = small_simulation(probe, 80.0, n_frames=12)
    # True dots mapped by the true chain lie on their wires.
    i2ph = np.linalg.inv(sim.phantom_to_reference) @ sim.probe_to_reference_true @ sim.image_to_probe
    pts = sim.true_points_px
    mapped = np.einsum("fij,fwj->fwi", i2ph[:, :3, :2], pts) + i2ph[:, None, :3, 3]
    assert np.max(point_to_wire_distances(mapped, sim.phantom)) < 1e-6
    # Dots are inside the image and the field of view.
    h, w = sim.fov_mask.shape
    assert np.all((pts[..., 0] >= 0) & (pts[..., 0] < w) & (pts[..., 1] >= 0) & (pts[..., 1] < h))
    assert sim.fov_mask[np.round(pts[..., 1]).astype(int), np.round(pts[..., 0]).astype(int)].all()
    assert sim.sequence.frames.dtype == np.uint8 and sim.sequence.frames.shape == (12, 240, 320)
    # Dots are bright in the image.
    f0 = sim.sequence.frames[0].astype(float)
    x, y = np.round(pts[0]).astype(int).T
    assert f0[y, x].mean() > 3 * f0[sim.fov_mask].mean()


def test_deterministic_and_seed_dependent():
    a = simulate_nwire(n_frames=3, image_size_px=(200, 150), seed=5)
    b = simulate_nwire(n_frames=3, image_size_px=(200, 150), seed=5)
    c = simulate_nwire(n_frames=3, image_size_px=(200, 150), seed=6)
    assert np.array_equal(a.sequence.frames, b.sequence.frames)
    assert not np.array_equal(a.sequence.frames, c.sequence.frames)


def test_outliers_and_noise_affect_recorded_poses_only():
    sim = simulate_nwire(n_frames=20, image_size_px=(200, 150), seed=2, outlier_fraction=0.3,
                         tracker_noise_mm=0.0, tracker_noise_deg=0.0)
    rec = probe_to_reference(sim.sequence)
    diff = np.linalg.norm(rec[:, :3, 3] - sim.probe_to_reference_true[:, :3, 3], axis=1)
    assert sim.outlier.sum() >= 2
    assert np.all(diff[~sim.outlier] < 1e-6) and np.all(diff[sim.outlier] > 1.0)


def test_write_simulation_round_trips(tmp_path):
    sim = small_simulation("linear", 50.0, n_frames=4)
    files = write_simulation(sim, tmp_path / "sim.igs.mha")
    seq = read_sequence(files["sequence"])
    assert np.array_equal(seq.frames, sim.sequence.frames)
    assert np.allclose(probe_to_reference(seq), probe_to_reference(sim.sequence), atol=1e-5)
    setup = load_setup(files["config"])
    assert setup.phantom.wire_names == sim.phantom.wire_names
    assert np.allclose(setup.phantom_to_reference, sim.phantom_to_reference, atol=1e-6)
    assert abs(setup.pixel_spacing_mm[0] - np.mean(sim.pixel_spacing_mm)) < 1e-3
    assert files["truth"].read_text().startswith("{")


@pytest.mark.parametrize("field,value,match", [
    ("probe", "phased", "probe"), ("depth_mm", 5.0, "depth_mm"), ("n_frames", 0, "n_frames"),
    ("image_size_px", (32, 32), "image_size_px"), ("outlier_fraction", 1.5, "outlier_fraction")])
def test_bad_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        SimulationSettings(**{field: value})


def test_phantom_too_wide_for_the_field_of_view():
    with pytest.raises(ValueError, match="no probe pose shows the whole"):
        simulate_nwire(phantom="iCal-1.0", n_frames=1, image_size_px=(200, 150), linear_width_mm=30.0)

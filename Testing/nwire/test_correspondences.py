"""3D correspondences of the dots (alpha / similar triangles, plane intersections)."""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.correspondences import (
    alpha_ratios,
    fit_image_plane,
    image_plane_from_pose,
    middle_wire_points_mm,
    point_to_wire_distances,
    wire_plane_intersections,
    wire_points_mm,
)
from NWireCalibrationLib.phantom import load_phantom
from nwire_synthetic import exact_geometry


def _true_phantom_points(sim, poses):
    i2ph = np.linalg.inv(sim.phantom_to_reference) @ poses @ sim.image_to_probe
    origin, normal = image_plane_from_pose(i2ph)
    return wire_plane_intersections(origin, normal, sim.phantom)


@pytest.mark.parametrize("phantom", ["fCal-2.0", "Liu2025-multilayer", "iCal-1.0"])
def test_middle_points_from_alpha_are_exact(phantom):
    sim, pts, _ = exact_geometry(phantom, n_frames=8)
    truth = _true_phantom_points(sim, sim.probe_to_reference_true)
    middle = middle_wire_points_mm(pts, sim.phantom)
    mid_idx = np.arange(sim.phantom.n_patterns) * 3 + 1
    assert np.allclose(middle, truth[:, mid_idx], atol=1e-6)
    assert np.allclose(point_to_wire_distances(truth, sim.phantom), 0, atol=1e-9)


def test_alpha_is_plus_ratio():
    ph = load_phantom("fCal-2.0")
    pts = np.zeros((1, 9, 2))
    pts[0, 0:3] = [[600, 200], [450, 200], [200, 200]]  # A right, B, C left
    pts[0, 3:6] = [[600, 300], [500, 300], [200, 300]]
    pts[0, 6:9] = [[600, 400], [300, 400], [200, 400]]
    assert np.allclose(alpha_ratios(pts, ph)[0], [150 / 400, 100 / 400, 300 / 400])


def test_wire_points_need_three_patterns_and_match_truth():
    sim, pts, _ = exact_geometry("fCal-2.0", n_frames=6)
    truth = _true_phantom_points(sim, sim.probe_to_reference_true)
    est = wire_points_mm(pts, sim.phantom)
    assert np.allclose(est, truth, atol=1e-6)
    sim2, pts2, _ = exact_geometry("iCal-1.0", n_frames=3)
    est2 = wire_points_mm(pts2, sim2.phantom)
    assert np.all(np.isnan(est2[:, [0, 2, 3, 5]]))  # two patterns: plane undetermined, no side points
    assert np.all(np.isfinite(est2[:, [1, 4]]))  # the middle points still come from alpha


def test_missing_dots_give_nan():
    sim, pts, _ = exact_geometry("fCal-2.0", n_frames=4)
    pts = pts.copy()
    pts[1, 4] = np.nan
    alpha = alpha_ratios(pts, sim.phantom)
    assert np.isnan(alpha[1, 1]) and np.all(np.isfinite(alpha[0]))


def test_plane_fit_of_collinear_points_is_undetermined():
    origin, normal = fit_image_plane(np.array([[[0, 0, 0], [1, 1, 1], [2, 2, 2.0]]]))
    assert np.all(np.isnan(origin)) and np.all(np.isnan(normal))


def test_wire_parallel_to_plane_gives_nan():
    ph = load_phantom("fCal-2.0")
    # Plane z = 5 is parallel to every wire (all lie in z = const planes).
    out = wire_plane_intersections([[0, 0, 5]], [[0, 0, 1]], ph)
    assert np.all(np.isnan(out))


def test_bad_shape_names_the_expected_shape():
    ph = load_phantom("fCal-2.0")
    with pytest.raises(ValueError, match=r"\(n_frames, 9, 2\)"):
        alpha_ratios(np.zeros((3, 6, 2)), ph)

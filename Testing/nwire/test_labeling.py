"""N-wire geometric filtering and PLUS-order labeling of dot candidates."""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.labeling import LabelingSettings, label_dots, order_pattern_dots, pose_residual_mm
from nwire_synthetic import exact_geometry


def _frame(phantom="fCal-2.0", i=0):
    sim, pts, _ = exact_geometry(phantom)
    return sim, pts[i], float(np.mean(sim.pixel_spacing_mm))


def test_labels_shuffled_dots_in_plus_order():
    sim, truth, sp = _frame()
    rng = np.random.default_rng(0)
    perm = rng.permutation(9)
    res = label_dots(truth[perm], np.ones(9), sim.phantom, sp)
    assert res.ok and res.reason == ""
    assert np.allclose(res.points_px, truth)
    assert np.array_equal(perm[res.indices], np.arange(9))


def test_plus_order_lines_top_to_bottom_dots_right_to_left():
    sim, truth, sp = _frame()
    res = label_dots(truth[::-1], np.ones(9), sim.phantom, sp)
    lines = res.points_px.reshape(3, 3, 2)
    assert np.all(np.diff(lines[:, :, 1].mean(axis=1)) > 0)  # top to bottom
    assert np.all(np.diff(lines[:, :, 0], axis=1) < 0)  # right to left within a line
    assert np.allclose(order_pattern_dots(lines[0][::-1]), lines[0])


@pytest.mark.parametrize("phantom", ["Liu2025-multilayer", "iCal-1.0"])
def test_other_phantoms(phantom):
    sim, truth, sp = _frame(phantom, 3)
    res = label_dots(truth[::-1], np.ones(len(truth)), sim.phantom, sp)
    assert res.ok and np.allclose(res.points_px, truth)


def test_distractors_are_ignored_even_when_strong():
    sim, truth, sp = _frame(i=5)
    rng = np.random.default_rng(1)
    lo, hi = truth.min(axis=0) - 20, truth.max(axis=0) + 20
    noise = rng.uniform(lo, hi, size=(25, 2))
    cands = np.concatenate([noise, truth])
    strength = np.concatenate([rng.uniform(0.5, 1.0, 25), np.full(9, 0.8)])
    res = label_dots(cands, strength, sim.phantom, sp)
    assert res.ok
    assert np.allclose(res.points_px, truth)


def test_missing_dot_fails_with_a_reason():
    sim, truth, sp = _frame()
    res = label_dots(truth[:8], np.ones(8), sim.phantom, sp)
    assert not res.ok and "8 dot candidates, 9 needed" in res.reason
    assert np.all(np.isnan(res.points_px)) and np.all(res.indices == -1)


def test_a_wrong_dot_is_caught_by_the_3d_check():
    sim, truth, sp = _frame(i=2)
    assert pose_residual_mm(truth, sim.phantom) < 1e-3
    moved = truth.copy()
    moved[3] += (2.5 / sp, 0.0)  # a side dot 2.5 mm along its line: passes the 2D checks, not the 3D one
    assert pose_residual_mm(moved, sim.phantom) > LabelingSettings().max_wire_distance_mm
    res = label_dots(moved, np.ones(9), sim.phantom, sp, settings=LabelingSettings(distance_tolerance_mm=3.0))
    assert not res.ok and "3D consistency" in res.reason


def test_spacing_hint_off_by_ten_fails():
    sim, truth, sp = _frame()
    res = label_dots(truth, np.ones(9), sim.phantom, 10 * sp)
    assert not res.ok


def test_bad_inputs():
    sim, truth, sp = _frame()
    with pytest.raises(ValueError, match="strength"):
        label_dots(truth, np.ones(3), sim.phantom, sp)
    with pytest.raises(ValueError, match="scale_range"):
        LabelingSettings(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="collinearity_eps"):
        LabelingSettings(collinearity_eps=0)


def test_deep_stack_layer_spacing_is_predicted_from_every_chosen_gap():
    """Lego 3.1 6N spans 92 mm in layers from 10 mm: noisy dots still label (18/40 frames before)."""
    from NWireCalibrationLib.simulate import settings_for_phantom, simulate_nwire

    sim = simulate_nwire(settings_for_phantom("Lego-3.1-6N", "linear", n_frames=40, image_size_px=(410, 308), seed=9,
                                              walls=False, reverberation=False))
    sp = float(np.mean(sim.pixel_spacing_mm))
    rng = np.random.default_rng(0)
    good = 0
    for truth in sim.true_points_px:
        noisy = truth + rng.normal(0, 0.5, truth.shape)  # 0.5 px = 0.22 mm
        perm = rng.permutation(len(truth))
        res = label_dots(noisy[perm], np.ones(len(truth)), sim.phantom, sp)
        good += bool(res.ok and np.allclose(res.points_px, noisy))
        assert not res.ok or np.allclose(res.points_px, noisy)  # never a wrong label
    assert good >= 32

"""Keyframe selection / convergence, and result objects (JSON, PLUS transform element)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from NWireCalibrationLib.errors import CalibrationError
from NWireCalibrationLib.keyframes import KeyframeCalibrator, KeyframeSettings, select_keyframes
from NWireCalibrationLib.metrics import target_errors_mm
from NWireCalibrationLib.pipeline import calibrate_from_points
from NWireCalibrationLib.results import plus_transform_element
from nwire_synthetic import exact_geometry


def _noisy(seed=0, n=120, phantom="fCal-2.0"):
    sim, pts, poses = exact_geometry(phantom, n_frames=n, seed=seed, tracker_noise=True)
    rng = np.random.default_rng(seed)
    return sim, pts + rng.normal(0, 0.2, pts.shape), poses


def test_keyframes_converge_before_the_end_with_a_good_calibration():
    sim, pts, poses = _noisy()
    cal, consumed = select_keyframes(pts, poses, sim.phantom, (128, 96), phantom_to_reference=sim.phantom_to_reference,
                                     settings=KeyframeSettings(min_keyframes=20, min_pose_diversity_deg=5.0))
    assert cal.converged and consumed < 120
    assert cal.curve[-1].change_mm <= 0.05 and len(cal.curve) >= 3
    assert np.isinf(cal.curve[0].change_mm)
    err = target_errors_mm(cal.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean()
    assert err < 0.3
    assert cal.keyframe_ids == sorted(cal.keyframe_ids) and len(cal.keyframe_ids) == cal.n_keyframes


def test_keyframes_skip_undetected_and_repeated_poses():
    sim, pts, poses = _noisy(n=20)
    kc = KeyframeCalibrator(sim.phantom, (128, 96), phantom_to_reference=sim.phantom_to_reference)
    assert kc.add(pts[0], poses[0]).accepted
    repeat = kc.add(pts[0], poses[0])
    assert not repeat.accepted and "too close" in repeat.reason
    missing = kc.add(np.full((9, 2), np.nan), poses[1])
    assert not missing.accepted and "not detected" in missing.reason
    with pytest.raises(CalibrationError, match="only 1 keyframes"):
        kc.finish()
    with pytest.raises(ValueError, match=r"\(9, 2\)"):
        kc.add(np.zeros((6, 2)), poses[1])


def test_keyframes_estimate_the_phantom_pose():
    sim, pts, poses = _noisy(seed=2, n=150, phantom="Liu2025-multilayer")
    cal, _ = select_keyframes(pts, poses, sim.phantom, (128, 96),
                              settings=KeyframeSettings(min_pose_diversity_deg=5.0))
    assert cal.estimated_phantom_to_reference is not None
    err = target_errors_mm(cal.image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean()
    assert err < 0.6


def test_keyframe_settings_validation():
    with pytest.raises(ValueError, match="min_keyframes"):
        KeyframeSettings(min_keyframes=3)
    with pytest.raises(ValueError, match="convergence_mm"):
        KeyframeSettings(convergence_mm=0)


def test_result_json_and_plus_element_round_trip():
    sim, pts, poses = exact_geometry("fCal-2.0")
    res = calibrate_from_points(pts, poses, sim.phantom, phantom_to_reference=sim.phantom_to_reference, solver="lsq",
                                validation_points_px=pts[:10], validation_poses=poses[:10])
    data = json.loads(json.dumps(res.to_dict()))
    assert np.allclose(data["ImageToProbe"], res.image_to_probe)
    text = str(res)
    assert "ImageToProbe (lsq" in text and "validation:" in text
    element = res.plus_transform_element(date="2025.01.02 10:00:00")
    numbers = re.search(r'Matrix="([^"]*)"', element).group(1).split()
    assert np.allclose(np.array(numbers, float).reshape(4, 4), res.image_to_probe, rtol=0, atol=0)
    assert 'Date="2025.01.02 10:00:00"' in element and "Error=" in element
    assert plus_transform_element(np.eye(4), error_mm=None).startswith('<Transform From="Image" To="Probe"')

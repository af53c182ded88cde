"""The Hessian detector's candidate cap grows with the phantom's wires (issue 23: Lego 3.1 6N behind a letterbox)."""

from __future__ import annotations

import numpy as np

from NWireCalibrationLib.detect_hessian import HessianDetector, HessianSettings
from NWireCalibrationLib.phantom import load_phantom
from NWireCalibrationLib.pipeline import detect_sequence
from NWireCalibrationLib.simulate import settings_for_phantom, simulate_nwire
from nwire_synthetic import setup_for


def test_cap_per_nine_wires():
    assert HessianDetector(load_phantom("fCal-2.0"), 0.1).max_candidates == 40  # 9 wires: unchanged
    assert HessianDetector(load_phantom("fCal-1.0"), 0.1).max_candidates == 40  # fewer wires never get fewer
    assert HessianDetector(load_phantom("fCal-2.0-Aurora"), 0.1).max_candidates == 54  # 12 wires
    assert HessianDetector(load_phantom("Lego-3.1-6N"), 0.1,
                           settings=HessianSettings(max_candidates=20)).max_candidates == 40  # 18 wires


def test_lego_six_patterns_behind_a_letterbox_are_labelled():
    """The benchmark's TRUS case with a letterboxed, texted screen: 0 of 60 frames with a cap of 40."""
    st = settings_for_phantom("Lego-3.1-6N", "trus", n_frames=4, image_size_px=(820, 616), seed=102,
                              overlays=("letterbox", "text"))
    sim = simulate_nwire(st)
    det = detect_sequence(sim.sequence, setup_for(sim), sequence_stage=False)
    m = det.ok & sim.visible
    assert m.sum() >= 3
    assert np.all(np.linalg.norm(det.points_px[m] - sim.true_points_px[m], axis=2) < 2.0)

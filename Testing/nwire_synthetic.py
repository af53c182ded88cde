"""Helpers for the N-wire calibration tests: small simulated recordings and PLUS data loaders.

Import as ``from nwire_synthetic import small_simulation, exact_geometry``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from NWireCalibrationLib.pipeline import CalibrationSetup, probe_to_reference
from NWireCalibrationLib.simulate import simulate_nwire
from testdata import plus_file

__all__ = ["small_simulation", "exact_geometry", "setup_for", "plus_fcal2", "FCAL2_CONFIG", "FCAL2_RESULTS"]

FCAL2_CONFIG = "ConfigFiles/PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml"
FCAL2_RESULTS = "TestImages/FreehandCalibration3NWires_fCal2.0.results.xml"


@lru_cache(maxsize=16)
def small_simulation(probe: str = "linear", depth_mm: float = 50.0, n_frames: int = 30, seed: int = 1,
                     size: tuple = (320, 240), phantom: str = "fCal-2.0", **kw):
    """A small rendered recording (cached per argument set; treat it as read-only)."""
    return simulate_nwire(probe=probe, depth_mm=depth_mm, n_frames=n_frames, seed=seed, image_size_px=size,
                          phantom=phantom, **dict(kw))


@lru_cache(maxsize=16)
def exact_geometry(phantom: str = "fCal-2.0", n_frames: int = 40, seed: int = 0, tilt_deg: float = 10.0,
                   tracker_noise: bool = False):
    """Noise-free dots and poses (a tiny rendered image; only the geometry matters).

    Returns (sim, points_px (n, w, 2), probe_to_reference (n, 4, 4)).
    """
    sim = simulate_nwire(phantom=phantom, n_frames=n_frames, seed=seed, image_size_px=(128, 96), depth_mm=70.0,
                         linear_width_mm=70.0, tilt_deg=tilt_deg, tracker_noise_mm=0.1 if tracker_noise else 0.0,
                         tracker_noise_deg=0.1 if tracker_noise else 0.0, walls=False, reverberation=False)
    poses = probe_to_reference(sim.sequence)
    return sim, sim.true_points_px.copy(), poses


def setup_for(sim) -> CalibrationSetup:
    """A setup with the simulation's phantom, true PhantomToReference and a rounded spacing hint."""
    hint = round(float(np.mean(sim.pixel_spacing_mm)), 3)
    return CalibrationSetup(sim.phantom, sim.phantom_to_reference, (hint, hint))


@lru_cache(maxsize=1)
def plus_fcal2():
    """PLUS's fCal 2.0 test data: (setup, calibration seq, validation seq, PLUS results); skips if absent."""
    from FreehandUSLib.io import read_sequence

    from NWireCalibrationLib.pipeline import load_setup
    from NWireCalibrationLib.plus_results import read_plus_calibration_results

    setup = load_setup(plus_file(FCAL2_CONFIG))
    cal = read_sequence(plus_file("TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha"))
    val = read_sequence(plus_file("TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha"))
    res = read_plus_calibration_results(plus_file(FCAL2_RESULTS))
    return setup, cal, val, res

"""The simulator on every phantom: TRUS probe, frame-grabbed screens, partial views (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.correspondences import point_to_wire_distances
from NWireCalibrationLib.phantom import builtin_phantom_names
from NWireCalibrationLib.simulate import SimulationSettings, settings_for_phantom, simulate_nwire

SMALL = (256, 192)


def _on_wires_mm(sim) -> np.ndarray:
    """Distance of every finite true dot, mapped by the true chain, from its wire (mm)."""
    i2ph = np.linalg.inv(sim.phantom_to_reference) @ sim.probe_to_reference_true @ sim.image_to_probe
    mapped = np.einsum("fij,fwj->fwi", i2ph[:, :3, :2], sim.true_points_px) + i2ph[:, None, :3, 3]
    d = point_to_wire_distances(mapped, sim.phantom)
    return d[np.isfinite(d)]


@pytest.mark.parametrize("probe", ["linear", "convex", "trus"])
@pytest.mark.parametrize("name", builtin_phantom_names())
def test_every_phantom_fits_every_probe(name, probe):
    st = settings_for_phantom(name, probe, n_frames=2, image_size_px=SMALL, seed=4, walls=False, reverberation=False)
    sim = simulate_nwire(st)
    assert sim.visible.all() and sim.phantom.name == name
    assert np.all(np.isfinite(sim.true_points_px))
    h, w = sim.fov_mask.shape
    x, y = np.round(sim.true_points_px).astype(int).transpose(2, 0, 1)
    assert sim.fov_mask[y, x].all()
    assert np.max(_on_wires_mm(sim)) < 1e-6


def test_trus_sector_is_wide_and_whole():
    sim = simulate_nwire(settings_for_phantom("iCal-1.0", "trus", n_frames=3, image_size_px=(320, 240), seed=2))
    cols = np.flatnonzero(sim.fov_mask.any(axis=0))
    rows = np.flatnonzero(sim.fov_mask.any(axis=1))
    assert cols.size > 0.85 * 320  # 140 degrees: the sector spans almost the whole width
    assert rows[0] > 0  # the arc's ends stay inside the image
    f0 = sim.sequence.frames[0].astype(float)
    x, y = np.round(sim.true_points_px[0]).astype(int).T
    assert f0[y, x].mean() > 3 * f0[sim.fov_mask].mean()  # echoes where the truth says


def test_letterbox_moves_the_image_and_keeps_the_truth():
    plain = simulate_nwire(phantom="fCal-2.0", n_frames=2, image_size_px=(320, 240), seed=3)
    boxed = simulate_nwire(phantom="fCal-2.0", n_frames=2, image_size_px=(320, 240), seed=3, overlays=("letterbox",))
    rows = np.flatnonzero(boxed.fov_mask.any(axis=1))
    assert rows[0] >= int(0.10 * 240)  # the field of view starts below the top bar
    assert boxed.pixel_spacing_mm[1] > plain.pixel_spacing_mm[1]  # the same depth on fewer rows
    frame = boxed.sequence.frames[0]
    assert np.all(frame[:int(0.10 * 240) - 2, :] == 45)  # the grabbed screen's grey, not black
    assert np.max(_on_wires_mm(boxed)) < 1e-6


def test_screen_overlays_are_drawn_and_stay_off_the_dots():
    st = dict(phantom="fCal-2.0", n_frames=4, image_size_px=(320, 240), seed=8)
    plain = simulate_nwire(**st)
    grabbed = simulate_nwire(**st, overlays=("text", "calipers", "colour-bar"))
    assert np.array_equal(plain.true_points_px, grabbed.true_points_px)  # same poses
    changed = grabbed.sequence.frames != plain.sequence.frames
    assert changed[:, :20, :].any()  # burned-in text at the top
    assert changed[:, int(0.2 * 240):int(0.6 * 240), -12:].any()  # the bar at the right edge
    inner = changed & plain.fov_mask[None]
    assert (grabbed.sequence.frames[inner] == 255).sum() >= 4 * 4  # caliper crosses inside the image
    x, y = np.round(grabbed.true_points_px).astype(int).transpose(2, 0, 1)
    f = np.arange(4)[:, None]
    assert np.array_equal(grabbed.sequence.frames[f, y, x], plain.sequence.frames[f, y, x])  # dots untouched


def test_partial_frames_have_missing_wires():
    sim = simulate_nwire(settings_for_phantom("fCal-2.0", "linear", n_frames=12, image_size_px=SMALL, seed=5,
                                              partial_fraction=0.5))
    assert 0 < sim.partial.sum() < 12
    missing = ~np.all(np.isfinite(sim.true_points_px), axis=2)
    assert np.array_equal(missing.any(axis=1), sim.partial)
    assert np.all(missing.sum(axis=1)[sim.partial] <= sim.phantom.n_wires - 3)
    assert not sim.visible[sim.partial].any()
    assert np.max(_on_wires_mm(sim)) < 1e-6
    assert sim.summary()["frames_partial"] == int(sim.partial.sum())


def test_gain_scales_the_image():
    low = simulate_nwire(n_frames=1, image_size_px=SMALL, seed=1, gain=0.5)
    high = simulate_nwire(n_frames=1, image_size_px=SMALL, seed=1, gain=2.0)
    assert high.sequence.frames[0][low.fov_mask].mean() > 2.5 * low.sequence.frames[0][low.fov_mask].mean()


@pytest.mark.parametrize("bad,match", [({"probe": "phased"}, "probe"), ({"overlays": ("logo",)}, "overlays"),
                                       ({"gain": 0.0}, "gain"), ({"partial_fraction": 1.5}, "partial_fraction")])
def test_bad_settings_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        SimulationSettings(**bad)


"""The independent test simulator (issue 25, item 5): sane speckle, elevational decorrelation,
convex fan geometry, freehand paths with pauses and reversals; and it stays independent."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest

import independent_sim as isim
from SensorlessTrackingLib.conventions import elevational_displacement_mm

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SMALL_LINEAR = isim.with_probe(isim.PROBES[0], width_mm=12.0, depth_mm=16.0, elevation_focus_mm=8.0)
SMALL_CONVEX = isim.with_probe(isim.PROBES[2], depth_mm=20.0, radius_mm=20.0, sector_deg=50.0, elevation_focus_mm=10.0)


def _uniform_medium(probe, half_extent=(12.0, 6.0, 24.0), per_mm3=40.0, seed=0):
    rng = np.random.default_rng(seed)
    lo = np.array([-half_extent[0], -half_extent[1], -1.0])
    hi = np.array([half_extent[0], half_extent[1], half_extent[2]])
    n = int(per_mm3 * np.prod(hi - lo))
    return rng.uniform(lo, hi, (n, 3)), np.ones(n)


def _pose(z_mm=0.0):
    """Probe frame (x lateral, y depth, z elevation) = world x, z, -y, moved z_mm along its normal."""
    p = np.eye(4)
    p[:3, :3] = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]).T
    p[:3, 3] = p[:3, :3] @ np.array([0.0, 0.0, z_mm])
    return p


def test_fully_developed_speckle_is_rayleigh():
    pts, amps = _uniform_medium(SMALL_LINEAR)
    env = isim.render_frame(SMALL_LINEAR, _pose(), pts, amps, envelope=True)
    g = isim._grid(SMALL_LINEAR)
    rows = (g.v > 4.0) & (g.v < 12.0)
    cols = np.abs(g.u) < 4.0
    patch = env[np.ix_(rows, cols)]
    snr = patch.mean() / patch.std()
    assert 1.6 < snr < 2.2, snr  # Rayleigh amplitude: 1.91


def test_correlation_falls_with_elevational_distance():
    pts, amps = _uniform_medium(SMALL_LINEAR)
    frames = [isim.render_frame(SMALL_LINEAR, _pose(d), pts, amps, envelope=True) for d in (0.0, 0.3, 0.6, 1.2, 3.0)]
    g = isim._grid(SMALL_LINEAR)
    sel = np.ix_((g.v > 5.0) & (g.v < 11.0), np.abs(g.u) < 4.0)
    ref = frames[0][sel].ravel()
    rho = [np.corrcoef(ref, f[sel].ravel())[0, 1] for f in frames[1:]]
    assert all(a > b for a, b in zip(rho, rho[1:])), rho
    assert rho[0] > 0.6 and rho[-1] < 0.15, rho  # 3 mm is beyond the Hann window's full width there


def test_convex_probe_makes_a_fan():
    itp, (rows, cols) = isim.image_to_probe(SMALL_CONVEX)
    assert np.linalg.det(itp[:3, :3]) > 0
    pts, amps = _uniform_medium(SMALL_CONVEX, half_extent=(24.0, 6.0, 22.0), per_mm3=15.0)
    frame = isim.render_frame(SMALL_CONVEX, _pose(), pts, amps)
    assert frame.shape == (rows, cols)
    # pixel -> probe -> (angle, range) on the probe's circle
    c, r = np.meshgrid(np.arange(cols), np.arange(rows))
    x = itp[0, 0] * c + itp[0, 3]
    y = itp[1, 1] * r + itp[1, 3]
    radius = SMALL_CONVEX.radius_mm
    angle = np.degrees(np.arctan2(x, y + radius))
    rng_mm = np.hypot(x, y + radius) - radius
    half = SMALL_CONVEX.sector_deg / 2.0
    outside = (np.abs(angle) > half + 1.0) | (rng_mm < -0.5) | (rng_mm > SMALL_CONVEX.depth_mm + 0.5)
    inside = (np.abs(angle) < half - 2.0) & (rng_mm > 2.0) & (rng_mm < SMALL_CONVEX.depth_mm - 2.0)
    assert (frame[outside] == 0).all()
    assert (frame[inside] > 0).mean() > 0.98
    assert frame[0, 0] == 0 and frame[0, -1] == 0 and frame[rows // 2, cols // 2] > 0
    # the fan widens with depth (above its corners): the image row 14 mm deep is wider than the one at 5 mm
    row_at = lambda y_mm: int(round((y_mm - itp[1, 3]) / itp[1, 1]))  # noqa: E731
    widths = [(frame[row_at(y)] > 0).sum() for y in (5.0, 14.0)]
    assert widths[1] > 1.3 * widths[0], widths


def test_trajectory_has_pauses_and_reversals():
    rng = np.random.default_rng(3)
    s, angles, wander = isim.freehand_trajectory(rng, 200, 60.0)
    steps = np.diff(s)
    assert np.abs(steps).sum() == pytest.approx(60.0)
    assert (steps < -0.05).sum() >= 5  # backwards for a while
    assert (np.abs(steps) < 0.02).sum() >= 5  # paused
    assert angles.shape == (200, 3) and wander.shape == (200, 2)


@pytest.mark.parametrize("direction,sign", [("toward", -1), ("away", 1)])
def test_sweep_directions_and_calibration(direction, sign):
    sw = isim.simulate(SMALL_LINEAR, 7, n_frames=12, length_mm=6.0, direction=direction, reversals=False, pauses=False)
    seq = sw.sequence
    itr = seq.transforms["ImageToReference"].matrices
    assert np.linalg.det(itr[0, :3, :3]) > 0
    assert seq.pixel_spacing_mm == (SMALL_LINEAR.pixel_mm, SMALL_LINEAR.pixel_mm) != (0.3, 0.3)
    np.testing.assert_allclose(np.linalg.norm(itr[:, :3, 0], axis=1), SMALL_LINEAR.pixel_mm)
    d = elevational_displacement_mm(itr, (seq.n_rows, seq.n_cols), 0, seq.n_frames - 1)
    assert sign * d > 3.0
    assert seq.frames.dtype == np.uint8 and 60 < seq.frames.mean() < 200


def test_shares_no_code_with_the_training_simulator_and_is_never_trained_on():
    tree = ast.parse((HERE / "independent_sim.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any("simulation" in m or "simdata" in m or "SensorlessTrackingLib" in m for m in imported), imported
    lib = REPO / "SensorlessTracking" / "SensorlessTrackingLib"
    sources = list(lib.rglob("*.py")) + list((REPO / "SensorlessTracking" / "Resources" / "Models").glob("*.py"))
    assert sources and not any("independent_sim" in p.read_text() for p in sources)
    assert math.isclose(isim.PROBES[0].pixel_mm, 0.2)


@pytest.mark.parametrize("probe,direction", [(SMALL_LINEAR, "toward"), (SMALL_CONVEX, "away")])
def test_stretched_twin_shows_the_same_frames_along_a_longer_path(probe, direction):
    """The scale ambiguity of image-only tracking: the elevational beam, the scatterers' and the
    probe's elevational coordinates all times k give the same frames along a k times longer path."""
    kw = dict(n_frames=8, length_mm=5.0, direction=direction, tilts=False)
    sweep = isim.simulate(probe, 7, **kw)
    twin = isim.simulate(probe, 7, elevation_stretch=1.6, **kw)
    assert twin.probe.elevation_half_mm == pytest.approx(1.6 * probe.elevation_half_mm)
    a, b = sweep.sequence, twin.sequence
    assert a.frames.std() > 10  # speckle, not a blank image
    np.testing.assert_allclose(b.frames.astype(float), a.frames.astype(float), rtol=0, atol=1)
    assert (a.frames != b.frames).mean() < 1e-3

    def elevational_path_mm(seq):
        itr = seq.transforms["ImageToReference"].matrices
        shape = (seq.n_rows, seq.n_cols)
        return sum(abs(elevational_displacement_mm(itr, shape, i, i + 1)) for i in range(seq.n_frames - 1))

    assert elevational_path_mm(a) == pytest.approx(5.0, rel=1e-6)
    assert elevational_path_mm(b) == pytest.approx(1.6 * 5.0, rel=1e-6)
    # only translations: every frame has the first one's orientation, and the in-plane motion is the same
    itr_a, itr_b = a.transforms["ImageToReference"].matrices, b.transforms["ImageToReference"].matrices
    np.testing.assert_allclose(itr_b[:, :3, :3], np.broadcast_to(itr_a[0, :3, :3], itr_b[:, :3, :3].shape), atol=1e-12)
    np.testing.assert_allclose(itr_b[:, [0, 2], 3], itr_a[:, [0, 2], 3], atol=1e-12)


def test_tilts_off_keeps_the_sweep_and_stretch_needs_it():
    kw = dict(n_frames=6, length_mm=3.0)
    tilted = isim.simulate(SMALL_LINEAR, 3, **kw)
    flat = isim.simulate(SMALL_LINEAR, 3, tilts=False, **kw)
    pa, pb = (s.sequence.transforms["ProbeToReference"].matrices for s in (tilted, flat))
    np.testing.assert_array_equal(pb[:, :3, 3], pa[:, :3, 3])  # the same path, drawn from the same random stream
    assert not np.allclose(pa[:, :3, :3], pa[0, :3, :3]) and np.allclose(pb[:, :3, :3], pb[0, :3, :3])
    with pytest.raises(ValueError, match="elevation_stretch.*tilts=False"):
        isim.simulate(SMALL_LINEAR, 3, elevation_stretch=1.6, **kw)
    with pytest.raises(ValueError, match="elevation_stretch"):
        isim.simulate(SMALL_LINEAR, 3, tilts=False, elevation_stretch=0.0, **kw)

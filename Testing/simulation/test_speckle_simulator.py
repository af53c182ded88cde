"""Speckle sweep simulator: decorrelation physics, speckle statistics, geometry, trajectories, CLI."""

import json
import math

import numpy as np
import pytest

from FreehandUSApp.cli import main as freehandus
from FreehandUSLib.errors import FileFormatError
from FreehandUSLib.io import read_sequence
from FreehandUSLib.simulation import (
    Inclusion,
    ProbeConfig,
    SweepConfig,
    TissueConfig,
    TrajectoryConfig,
    Vessel,
    build_tissue_volume,
    homogeneous_tissue,
    image_to_probe_matrix,
    make_trajectory,
    random_probe_config,
    random_sweep_config,
    simulate_frames,
    simulate_sweep,
    sweep_bounds,
)
from FreehandUSLib.simulation.cli import photoacoustic_path
from FreehandUSLib.simulation.probe import beam_grid
from FreehandUSLib.simulation.speckle import ScattererField, candidate_blocks, iq_normalisation, render_iq

# A small field of view keeps the tests fast; pixels stay ~0.15 mm so speckle is resolved.
SMALL = dict(n_rows=160, n_cols=160, depth_mm=24.0, width_mm=24.0, noise_db=-300.0)


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _static_poses(offsets):
    poses = np.tile(np.eye(4), (len(offsets), 1, 1))
    poses[:, :3, 3] = offsets
    return poses


def _interior(img, margin=12):
    m = img > 0
    m[:margin] = m[-margin:] = False
    m[:, :margin] = m[:, -margin:] = False
    return m


@pytest.mark.parametrize(
    "geometry, sigma",
    [("linear", 0.4), ("linear", 0.8), ("linear", 1.2), ("convex", 0.6)],
)
def test_elevational_decorrelation_follows_gaussian(geometry, sigma):
    probe = ProbeConfig(geometry=geometry, sigma_elevation_mm=sigma, **SMALL)
    if geometry == "convex":
        probe = ProbeConfig(geometry="convex", sigma_elevation_mm=sigma, radius_mm=30.0, sector_deg=40.0,
                            n_rows=160, n_cols=160, depth_mm=24.0, noise_db=-300.0)
    d = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5]) * sigma
    # Probe y is the elevational axis: shift the plane along it only.
    poses = _static_poses(np.stack([np.zeros_like(d), d, np.zeros_like(d)], axis=1))
    vol = build_tissue_volume(homogeneous_tissue(), sweep_bounds(probe, poses))
    inten = simulate_frames(probe, poses, vol, output="intensity", noise=False, seed=11)
    m = _interior(inten[0])
    rho = np.array([_corr(inten[0][m], inten[k][m]) for k in range(len(d))])
    expected = np.exp(-(d**2) / (2 * sigma**2))
    np.testing.assert_allclose(rho, expected, atol=0.05)
    assert rho[-1] < 0.1  # fully decorrelated at 2.5 sigma


def test_in_plane_shift_moves_speckle_without_decorrelating():
    probe = ProbeConfig(**SMALL)
    sx, sy = probe.pixel_spacing_mm
    shift_cols, shift_rows = 7, 5
    # Probe x is the image column direction, Probe z the row direction.
    poses = _static_poses([[0, 0, 0], [shift_cols * sx, 0, shift_rows * sy]])
    vol = build_tissue_volume(homogeneous_tissue(), sweep_bounds(probe, poses))
    inten = simulate_frames(probe, poses, vol, output="intensity", noise=False, seed=2)
    a, b = inten
    # Moving the probe by +k columns shows the tissue k columns further left.
    moved = _corr(a[20 + shift_rows : -20, 20 + shift_cols : -20], b[20 : -20 - shift_rows, 20 : -20 - shift_cols])
    unmoved = _corr(a[20:-20, 20:-20], b[20:-20, 20:-20])
    assert moved > 0.95
    assert unmoved < 0.3


def test_speckle_is_fully_developed_and_dense():
    probe = ProbeConfig(**SMALL)
    grid = beam_grid(probe)
    density = 10.0 / probe.resolution_cell_mm3
    field = ScattererField(density, seed=5)
    assert field.density_per_mm3 * probe.resolution_cell_mm3 >= 10.0
    pose = np.eye(4)
    vol = build_tissue_volume(homogeneous_tissue(), sweep_bounds(probe, pose[None]))
    iq = render_iq(field, probe, grid, pose, vol.echogenicity, vol.origin_mm, vol.spacing_mm)
    iq *= iq_normalisation(probe, grid, field.density_per_mm3)[:, None, None]
    inner = iq[20:-20, 20:-20]
    env = np.hypot(inner[..., 0], inner[..., 1])
    # Rayleigh envelope: SNR = sqrt(pi / (4 - pi)) = 1.91; mean intensity normalised to 1.
    assert env.mean() / env.std() == pytest.approx(1.91, abs=0.1)
    assert (env**2).mean() == pytest.approx(1.0, abs=0.1)
    re = inner[..., 0].ravel()
    kurtosis = ((re - re.mean()) ** 4).mean() / re.var() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.2)  # circular Gaussian IQ


def test_scatterers_are_deterministic_per_block_and_seed():
    field = ScattererField(50.0, seed=3, block_mm=0.6)
    blocks = np.array([[0, 0, 0], [5, -3, 2]])
    a = field.positions(blocks)
    b = field.positions(blocks[::-1])
    n = field.per_block
    np.testing.assert_array_equal(a[:n], b[n:])
    assert np.all((a[:n] >= 0) & (a[:n] < 0.6))
    assert np.all(np.floor(a[n:] / 0.6).astype(int) == [5, -3, 2])
    other = ScattererField(50.0, seed=4, block_mm=0.6).positions(blocks)
    assert not np.allclose(a, other)


def test_candidate_blocks_cover_the_slab():
    field = ScattererField(20.0, seed=0, block_mm=0.6)
    pose = np.eye(4)
    blocks = candidate_blocks(field, pose, (-5.0, 5.0), (0.0, 10.0), 1.5)
    pts = field.positions(blocks)
    inside = (np.abs(pts[:, 1]) <= 1.5) & (np.abs(pts[:, 0]) <= 5) & (pts[:, 2] >= 0) & (pts[:, 2] <= 10)
    # every block of the slab is visited: the scatterer count matches the slab volume
    assert inside.sum() == pytest.approx(field.density_per_mm3 * 10 * 3 * 10, rel=0.05)


def test_image_to_probe_maps_pixels_into_the_image_plane():
    probe = ProbeConfig(n_rows=100, n_cols=80, depth_mm=40.0, width_mm=32.0)
    m = image_to_probe_matrix(probe)
    corners = np.array([[0, 0, 0, 1], [79, 99, 0, 1]], dtype=float).T
    p = m @ corners
    assert np.allclose(p[1], 0.0)  # y = 0: the image plane
    assert p[0, 0] == pytest.approx(-p[0, 1])  # centred laterally
    assert p[2, 1] - p[2, 0] == pytest.approx(99 * 0.4)
    assert np.allclose(np.linalg.norm(m[:3, :3], axis=0), [0.4, 0.4, 1.0])
    assert np.linalg.det(m[:3, :3]) > 0  # right-handed


def test_simulated_sweep_carries_true_transforms(tmp_path):
    probe = ProbeConfig(**{**SMALL, "noise_db": -40.0})
    cfg = SweepConfig(probe=probe, trajectory=TrajectoryConfig(n_frames=12, length_mm=6.0, seed=4), seed=4)
    res = simulate_sweep(cfg, keep_intensity=True)
    seq = res.sequence
    assert seq.frames.shape == (12, 160, 160) and seq.frames.dtype == np.uint8
    assert set(seq.transforms) == {"ImageToReference", "ProbeToReference", "ImageToProbe"}
    itr = seq.transforms["ImageToReference"].matrices
    ptr = seq.transforms["ProbeToReference"].matrices
    np.testing.assert_allclose(itr, ptr @ res.image_to_probe)
    np.testing.assert_allclose(seq.transforms["ImageToProbe"].matrices[5], res.image_to_probe)
    np.testing.assert_allclose(np.diff(seq.timestamps_s), 1 / 20.0)
    assert seq.pixel_spacing_mm == pytest.approx((0.15, 0.15))
    assert res.intensity.shape == seq.frames.shape
    assert 50 < seq.frames.mean() < 230  # displayable grey levels
    # deterministic
    again = simulate_sweep(cfg)
    np.testing.assert_array_equal(again.sequence.frames, seq.frames)
    # written and read back with the calibration
    path = tmp_path / "sweep.igs.mha"
    from FreehandUSLib.io import write_sequence

    write_sequence(seq, path)
    back = read_sequence(path)
    np.testing.assert_allclose(back.transforms["ImageToProbe"].matrices[0], res.image_to_probe, atol=1e-6)
    np.testing.assert_array_equal(back.frames, seq.frames)


def test_frames_see_the_tissue_structures():
    probe = ProbeConfig(**SMALL)
    tissue = TissueConfig(
        background=1.0,
        inclusions=(Inclusion(center_mm=(0.0, 0.0, 12.0), radii_mm=(4.0, 4.0, 4.0), echogenicity=0.1),),
    )
    poses = _static_poses([[0, 0, 0]])
    vol = build_tissue_volume(tissue, sweep_bounds(probe, poses))
    img = simulate_frames(probe, poses, vol, output="intensity", noise=False)[0]
    # the hypoechoic inclusion (radius 4 mm at 12 mm depth) is 10x darker than around it
    sx, sy = probe.pixel_spacing_mm
    cj, ci = int(12.0 / sy), img.shape[1] // 2
    inside = img[cj - 10 : cj + 10, ci - 10 : ci + 10].mean()
    outside = img[10:30, 10:40].mean()
    assert inside < 0.3 * outside


def test_photoacoustic_signal_only_in_vessels():
    probe = ProbeConfig(**{**SMALL, "noise_db": -60.0})
    vessel = Vessel(start_mm=(-30.0, 0.0, 12.0), direction=(1.0, 0.0, 0.0), radius_mm=3.0)
    # a vessel along x (in the image plane at y = 0) at depth 12 mm
    tissue = TissueConfig(background=1.0, vessels=(vessel,))
    cfg = SweepConfig(
        probe=probe,
        tissue=tissue,
        trajectory=TrajectoryConfig(n_frames=3, length_mm=0.2, tilt_deg=0, rock_deg=0, twist_deg=0, lift_mm=0,
                                    tremor_mm=0, tremor_deg=0),
        photoacoustic=True,
    )
    res = simulate_sweep(cfg)
    pa = res.photoacoustic.astype(float)
    sy = probe.pixel_spacing_mm[1]
    in_rows = slice(int(10.0 / sy), int(14.0 / sy))
    out_rows = slice(int(1.0 / sy), int(6.0 / sy))
    assert pa[:, in_rows, 20:-20].mean() > 60
    assert pa[:, out_rows, 20:-20].mean() < 5
    pa_seq = res.photoacoustic_sequence()
    np.testing.assert_array_equal(
        pa_seq.transforms["ImageToReference"].matrices, res.sequence.transforms["ImageToReference"].matrices
    )


@pytest.mark.parametrize("shape", ["straight", "C", "S"])
def test_trajectory_length_speed_and_shape(shape):
    cfg = TrajectoryConfig(n_frames=200, length_mm=120.0, shape=shape, turn_deg=90.0, tremor_mm=0.0, tremor_deg=0.0,
                           lift_mm=0.0, seed=3)
    poses = make_trajectory(cfg)
    assert poses.shape == (200, 4, 4)
    r = poses[:, :3, :3]
    np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-9)
    step = np.linalg.norm(np.diff(poses[:, :2, 3], axis=0), axis=1)
    assert step.sum() == pytest.approx(120.0, rel=0.01)
    assert step.min() >= 0.05 - 1e-6 and step.max() <= 1.0 + 1e-6
    assert step.std() > 0.01  # the speed varies
    heading = np.degrees(np.arctan2(-np.diff(poses[:, 0, 3]), np.diff(poses[:, 1, 3])))
    turn = heading[-5:].mean() - heading[:5].mean()
    if shape == "C":
        assert turn == pytest.approx(90.0, abs=10.0)
    else:
        assert abs(turn) < 15.0
    if shape == "S":
        assert np.ptp(heading) > 45.0


def test_random_probes_cover_the_requested_ranges():
    rng = np.random.default_rng(0)
    probes = [random_probe_config(rng) for _ in range(200)]
    sig = np.array([p.sigma_elevation_mm for p in probes])
    assert sig.min() >= 0.4 and sig.max() <= 1.2
    assert sig.max() - sig.min() > 0.6
    assert {p.geometry for p in probes} == {"linear", "convex"}
    assert np.ptp([p.center_frequency_mhz for p in probes]) > 4
    assert np.ptp([p.dynamic_range_db for p in probes]) > 15
    assert np.ptp([p.gain_db for p in probes]) > 8
    cfg = random_sweep_config(7, probe_overrides={"n_rows": 64}, trajectory_overrides={"n_frames": 150})
    assert cfg.probe.n_rows == 64 and cfg.trajectory.n_frames == 150
    assert cfg == random_sweep_config(7, probe_overrides={"n_rows": 64}, trajectory_overrides={"n_frames": 150})


def test_convex_sweep_masks_outside_the_sector():
    probe = ProbeConfig(geometry="convex", n_rows=96, n_cols=96, depth_mm=30.0, radius_mm=25.0, sector_deg=60.0)
    cfg = SweepConfig(probe=probe, trajectory=TrajectoryConfig(n_frames=2, length_mm=0.5))
    frames = simulate_sweep(cfg).sequence.frames
    assert frames[:, -1, 0].max() == 0 and frames[:, -1, -1].max() == 0  # bottom corners outside
    assert frames[:, 48, 40:56].mean() > 20  # centre inside


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"geometry": "phased"}, "geometry"),
        ({"sigma_elevation_mm": 0.0}, "sigma_elevation_mm"),
        ({"n_rows": 4}, "n_rows"),
    ],
)
def test_bad_probe_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"shape": "Z"}, "shape"), ({"n_frames": 1}, "n_frames"), ({"min_speed_mm": 0.0}, "speed")],
)
def test_bad_trajectory_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrajectoryConfig(**kwargs)


# -- command line ----------------------------------------------------------------------------------


def test_cli_simulate_sweep_writes_a_tracked_sequence(tmp_path, capsys):
    out = tmp_path / "s.seq.nrrd"
    argv = ["simulate", "sweep", "--out", str(out), "--seed", "3", "--frames", "6", "--length-mm", "3",
            "--rows", "64", "--cols", "64", "--depth-mm", "12", "--geometry", "linear", "--photoacoustic",
            "--config-out", str(tmp_path / "cfg.json"), "--json"]
    assert freehandus(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 6 and info["width"] == 64 and info["geometry"] == "linear"
    seq = read_sequence(out)
    assert seq.n_frames == 6
    assert {"ImageToReference", "ImageToProbe"} <= set(seq.transforms)
    np.testing.assert_allclose(seq.transforms["ImageToProbe"].matrices[0], info["ImageToProbe"], atol=1e-6)
    assert photoacoustic_path(out).is_file()
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["trajectory"]["n_frames"] == 6 and cfg["tissue"]["layers"]


def test_cli_simulate_sweep_bad_input(tmp_path, capsys):
    assert freehandus(["simulate", "sweep", "--out", str(tmp_path / "s.txt")]) == 2
    assert "unknown file type" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused by argparse, before any work
        freehandus(["simulate", "sweep", "--out", str(tmp_path / "s.igs.mha"), "--frames", "1"])
    assert exc.value.code == 2 and "argument --frames" in capsys.readouterr().err
    with pytest.raises(FileFormatError):
        from FreehandUSLib.io import sequence_format

        sequence_format(tmp_path / "x.bmp")


def test_photoacoustic_path_names():
    from pathlib import Path

    assert photoacoustic_path(Path("a/b.igs.mha")).name == "b_pa.igs.mha"
    assert photoacoustic_path(Path("b.seq.nrrd")).name == "b_pa.seq.nrrd"
    assert math.isfinite(1.0)

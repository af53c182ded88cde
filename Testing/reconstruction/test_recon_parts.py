"""Reconstruction parts: masks, fan detection, geometry, hole filling, options, bad inputs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from recon_synthetic import linear_sweep
from testdata import make_synthetic_sequence

from FreehandUSLib import TrackedSequence
from FreehandUSLib.errors import ConfigError, FreehandUSError, TransformError
from FreehandUSLib.reconstruction import (
    HoleFillingElement,
    IncrementalReconstructor,
    InvalidOptionError,
    NoUsableFramesError,
    ReconstructionError,
    ReconstructionOptions,
    VolumeTooLargeError,
    detect_fan_angles,
    fan_row_ranges,
    fill_holes,
    pixel_mask,
    reconstruct_volume,
)
from FreehandUSLib.reconstruction.geometry import check_memory

# -- masks ------------------------------------------------------------------------------------


def test_fan_mask_follows_plus_rules():
    opts = ReconstructionOptions(
        fan_angles_deg=(-30, 30), fan_origin_px=(50, 10), fan_radius_start_px=20, fan_radius_stop_px=60
    )
    mask = pixel_mask(80, 100, opts)
    yy, xx = np.mgrid[0:80, 0:100]
    dx, dy = xx - 50.0, yy - 10.0
    t = math.tan(math.radians(30))
    inner = (np.abs(dx) <= t * dy - 1.0) & (dx**2 <= 60**2 - dy**2) & (dy >= 0)
    # Away from the edges (1-pixel PLUS margins and rounding), the mask is the ideal fan.
    core = inner & (np.hypot(dx, dy) < 58) & (np.hypot(dx, dy) > 22) & (np.abs(dx) < t * dy - 2)
    assert mask[core].all()
    outside = (np.hypot(dx, dy) > 61) | (np.abs(dx) > t * dy + 0.5) | (np.hypot(dx, dy) < 19)
    assert not mask[outside].any()
    assert not mask[:10].any()  # rows above the apex


def test_clip_rectangle_and_no_fan():
    r = fan_row_ranges(20, 30, clip_origin_px=(5, 3), clip_size_px=(10, 4))
    mask_rows = np.flatnonzero(r[:, 1] >= r[:, 0])
    assert mask_rows.tolist() == [3, 4, 5, 6, 7]
    assert r[3, 0] == 5 and r[3, 1] == 15
    full = fan_row_ranges(20, 30, fan_angles_deg=(0, 0), fan_radius_stop_px=1)  # angles 0: no fan at all
    assert np.all(full[:, 0] == 0) and np.all(full[:, 1] == 29)


def test_fan_angles_are_detected_from_brightness():
    yy, xx = np.mgrid[0:200, 0:300]
    angle = np.degrees(np.arctan2(xx - 150.0, yy - 5.0))
    radius = np.hypot(xx - 150.0, yy - 5.0)
    frame = np.where((angle > -20) & (angle < 35) & (radius < 190), 120, 3).astype(np.uint8)
    found = detect_fan_angles(
        frame, max_fan_angles_deg=(-60, 60), fan_origin_px=(150, 5), fan_radius_start_px=10, fan_radius_stop_px=180
    )
    assert found is not None
    # The edges (narrowed by the 3 degree margin), within the angular size of one arc sample.
    assert found[0] == pytest.approx(-20 + 3, abs=2.0) and found[1] == pytest.approx(35 - 3, abs=2.0)
    empty = detect_fan_angles(
        np.zeros((200, 300), np.uint8), max_fan_angles_deg=(-60, 60), fan_origin_px=(150, 5),
        fan_radius_start_px=10, fan_radius_stop_px=180,
    )
    assert empty is None


def test_auto_fan_skips_empty_frames():
    seq = linear_sweep(n_frames=4, n_rows=60, n_cols=80, value=100)
    frames = seq.frames.copy()
    frames[2] = 0
    seq = TrackedSequence(frames=frames, transforms=seq.transforms)
    opts = ReconstructionOptions(
        fan_angles_deg=(-40, 40), fan_origin_px=(40, 0), fan_radius_stop_px=70, fan_angles_auto_detect=True
    )
    result = reconstruct_volume(seq, None, opts)
    assert result.frames_skipped == {2: "empty_image"}
    assert result.frames_used == 3


# -- geometry ---------------------------------------------------------------------------------


def test_auto_grid_plus_and_snap_alignment():
    seq = linear_sweep(n_frames=5, n_rows=11, n_cols=21, pixel_mm=0.3, step_mm=0.7)
    seq.transforms["ImageToReference"].matrices[:, :3, 3] += (0.13, -0.41, 0.05)
    plus = reconstruct_volume(seq, None, ReconstructionOptions(output_spacing_mm=0.5)).grid
    np.testing.assert_allclose(plus.origin_mm, (0.13, -0.41, 0.05))
    # ranges 6.0, 3.0, 2.8 mm -> round(range / 0.5) + 1 voxels
    assert plus.dims == (13, 7, 7)
    snap = reconstruct_volume(seq, None, ReconstructionOptions(output_spacing_mm=0.5, grid_alignment="snap")).grid
    np.testing.assert_allclose(snap.origin_mm, (0.0, -0.5, 0.0))
    assert snap.dims == (14, 8, 7)  # ceil((max - origin) / spacing) + 1


def test_memory_budget_error_states_dims_bytes_and_a_spacing_that_fits():
    seq = linear_sweep(n_frames=3)
    with pytest.raises(VolumeTooLargeError) as exc:
        reconstruct_volume(seq, None, ReconstructionOptions(output_spacing_mm=0.001, memory_budget_bytes=10**8))
    text = str(exc.value)
    assert "9,801 x 7,801 x 1,001 voxels" in text
    assert "bytes" in text and "memory budget" in text
    suggested = [float(v) for v in re.search(r"--spacing ([0-9.]+) ([0-9.]+) ([0-9.]+)", text).groups()]
    fits = reconstruct_volume(seq, None, ReconstructionOptions(output_spacing_mm=suggested, memory_budget_bytes=10**8))
    assert fits.frames_used == 3
    with pytest.raises(VolumeTooLargeError, match=r"1,000,000,000,000 voxels .* needs 19.1 TiB"):
        check_memory((10000, 10000, 10000), (1, 1, 1), budget_bytes=4 * 1024**3, bytes_per_voxel=21)


# -- hole filling -----------------------------------------------------------------------------


def _volume_with_holes(shape=(9, 10, 11)):
    k, j, i = np.indices(shape)
    values = (2.0 * i + 3.0 * j + 5.0 * k)[..., None].astype(np.float64)
    known = np.ones(shape, bool)
    return values, known


def test_stick_fills_between_planes_by_linear_interpolation():
    values, known = _volume_with_holes()
    known[3:6] = False  # three empty planes between known ones
    vals = values.copy()
    vals[~known] = 0
    filled, stats = fill_holes(vals, known, known.astype(float), [HoleFillingElement("STICK", stick_length_limit=9)])
    assert filled[3:6].all() and stats.filled == known.size - known.sum()
    np.testing.assert_allclose(vals[3:6], values[3:6], atol=1e-9)
    short = values.copy()
    short[~known] = 0
    filled, _ = fill_holes(short, known, known.astype(float), [HoleFillingElement("STICK", stick_length_limit=4)])
    assert not filled.any()  # the stick spans 5 voxels end to end, more than 4


def test_stick_with_several_sticks_matches_one_stick_on_a_ramp():
    values, known = _volume_with_holes()
    known[4] = False
    vals = values.copy()
    vals[~known] = 0
    filled, _ = fill_holes(vals, known, known.astype(float), [HoleFillingElement("STICK", number_of_sticks_to_use=3)])
    assert filled[4].all()
    np.testing.assert_allclose(vals[4], values[4], atol=1e-9)


@pytest.mark.parametrize("kind", ["GAUSSIAN", "GAUSSIAN_ACCUMULATION", "DISTANCE_WEIGHT_INVERSE", "NEAREST_NEIGHBOR"])
def test_cube_kernels_fill_isolated_holes_of_a_constant(kind):
    known = np.ones((8, 8, 8), bool)
    known[2, 3, 4] = known[5, 5, 5] = False
    vals = np.where(known, 42.0, 0.0)[..., None]
    weight = known * 2.0
    filled, stats = fill_holes(vals, known, weight, [HoleFillingElement(kind, size=3, stdev=1.0, minimum_known_voxels_ratio=0.5)])
    assert filled.sum() == 2 and stats.filled_per_element == (2,)
    np.testing.assert_allclose(vals[~known, 0], 42.0)


def test_minimum_ratio_and_element_order():
    known = np.zeros((9, 9, 9), bool)
    known[4, 4, 2] = known[4, 4, 6] = True  # two known voxels, 4 apart along i
    vals = np.where(known, 10.0, 0.0)[..., None]
    vals[4, 4, 6] = 30.0
    gauss = HoleFillingElement("GAUSSIAN", size=3, stdev=1.0, minimum_known_voxels_ratio=0.5)
    stick = HoleFillingElement("STICK", stick_length_limit=5)
    filled, stats = fill_holes(vals, known, known.astype(float), [gauss, stick])
    assert stats.filled_per_element[0] == 0  # never half of a 3x3x3 cube known
    assert filled[4, 4, 4] and vals[4, 4, 4, 0] == pytest.approx(20.0)
    assert vals[4, 4, 3, 0] == pytest.approx(15.0)
    nn = HoleFillingElement("NEAREST_NEIGHBOR", size=5, minimum_known_voxels_ratio=0.0)
    vals2 = np.where(known, 10.0, 0.0)[..., None]
    filled2, _ = fill_holes(vals2, known, known.astype(float), [nn])
    assert filled2[4, 4, 0] and not filled2[0, 0, 8]


def test_hole_filling_is_thread_independent():
    rng = np.random.default_rng(0)
    known = rng.uniform(size=(20, 22, 24)) < 0.3
    base = rng.uniform(0, 255, size=known.shape + (1,))
    elements = [
        HoleFillingElement("GAUSSIAN", size=3, stdev=0.7, minimum_known_voxels_ratio=0.2),
        HoleFillingElement("DISTANCE_WEIGHT_INVERSE", size=5, minimum_known_voxels_ratio=0.1),
        HoleFillingElement("STICK", stick_length_limit=6),
    ]
    out = []
    for threads in (1, 2):
        vals = np.where(known[..., None], base, 0.0)
        filled, _ = fill_holes(vals, known, known * 1.5, elements, n_threads=threads)
        out.append((vals, filled))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    assert out[0][1].sum() > 0.5 * (~known).sum()


def test_reconstruction_with_hole_filling_reports_filled_fraction():
    seq = linear_sweep(n_frames=8, step_mm=1.5)  # frames 3 voxels apart: holes between them
    opts = ReconstructionOptions(output_spacing_mm=0.5)
    plain = reconstruct_volume(seq, None, opts)
    filled = reconstruct_volume(seq, None, opts.replace(fill_holes=True, hole_filling=[HoleFillingElement("STICK")]))
    assert plain.filled_fraction == plain.coverage_fraction < 0.5
    assert filled.filled_fraction > 0.95
    assert filled.hole_filling.filled > 0 and filled.hole_filling_seconds > 0


# -- options and bad inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [0, -0.5, (0.5, 0.0, 0.5), (0.5, -1, 0.5)])
def test_zero_or_negative_spacing_is_refused(spacing):
    with pytest.raises(InvalidOptionError, match="output_spacing_mm"):
        ReconstructionOptions(output_spacing_mm=spacing)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"interpolation": "cubic"}, "interpolation"),
        ({"compounding": "median"}, "compounding"),
        ({"output_extent": (0, 5, 3, 1, 0, 1)}, "output_extent"),
        ({"output_extent": (0, 5, 0, 1)}, "output_extent"),
        ({"fill_holes": True}, "hole_filling"),
        ({"hole_filling": [{"type": "MAGIC"}]}, "hole filling type"),
        ({"fan_radius_start_px": 50, "fan_radius_stop_px": 10}, "fan_radius"),
        ({"skip_interval": 0}, "skip_interval"),
        ({"number_of_threads": 0}, "number_of_threads"),
        ({"fan_angles_auto_detect": True}, "fan_angles_auto_detect"),
        ({"output_directions": [[1, 0, 0], [0, 2, 0], [0, 0, 1]]}, "output_directions"),
    ],
)
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        ReconstructionOptions(**kwargs)


def test_invalid_transforms_are_skipped_and_counted():
    seq = make_synthetic_sequence(n_frames=6)  # ReferenceToTracker invalid in frame 3
    image_to_probe = np.diag([0.1, 0.1, 1.0, 1.0])
    result = reconstruct_volume(seq, image_to_probe, ReconstructionOptions(output_spacing_mm=1.0))
    assert result.frames_skipped == {3: "invalid_transform"}
    assert result.frames_used + len(result.frames_skipped) == 6


def test_no_usable_frame_is_an_error():
    seq = linear_sweep(n_frames=4)
    seq.set_transform("ImageToReference", seq.transforms["ImageToReference"].matrices, np.zeros(4, bool))
    with pytest.raises(NoUsableFramesError, match="no usable frame among 4: 4 with an invalid ImageToReference"):
        reconstruct_volume(seq, None, ReconstructionOptions())
    empty = IncrementalReconstructor(ReconstructionOptions(), image_shape=(4, 4))
    with pytest.raises(NoUsableFramesError, match="no usable frame"):
        empty.result()


def test_missing_image_to_probe_is_a_clear_error(tmp_path):
    from FreehandUSLib.io.plus_config import read_plus_config

    xml = tmp_path / "cfg.xml"
    xml.write_text(
        '<PlusConfiguration version="2.1"><CoordinateDefinitions>'
        '<Transform From="Phantom" To="Reference" Matrix="1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"/>'
        '</CoordinateDefinitions><VolumeReconstruction OutputSpacing="0.5 0.5 0.5"/></PlusConfiguration>'
    )
    config = read_plus_config(xml)
    seq = make_synthetic_sequence(n_frames=3)
    with pytest.raises(TransformError, match="ImageToProbe is missing"):
        reconstruct_volume(seq, config.coordinate_definitions.repository_fixed(), ReconstructionOptions())
    assert issubclass(TransformError, FreehandUSError)


def test_roi_missing_every_frame_is_an_error():
    seq = linear_sweep(n_frames=3)
    opts = ReconstructionOptions(output_origin_mm=(500.0, 500.0, 500.0), output_extent=(0, 9, 0, 9, 0, 9))
    with pytest.raises(ReconstructionError, match="misses every frame"):
        reconstruct_volume(seq, None, opts)


def test_incremental_rejects_wrong_frames():
    recon = IncrementalReconstructor(ReconstructionOptions(), image_shape=(40, 50))
    with pytest.raises(ReconstructionError, match="40"):
        recon.add_frames(np.zeros((2, 30, 50), np.uint8), np.tile(np.eye(4), (2, 1, 1)))
    with pytest.raises(ReconstructionError, match="2 frames but 3"):
        recon.add_frames(np.zeros((2, 40, 50), np.uint8), np.tile(np.eye(4), (3, 1, 1)))
    with pytest.raises(InvalidOptionError, match="importance_mask"):
        IncrementalReconstructor(ReconstructionOptions(compounding="importance_mask"), image_shape=(4, 4))
    assert isinstance(InvalidOptionError("x"), ConfigError) and isinstance(InvalidOptionError("x"), ValueError)


def test_options_replace_ignores_none_and_rejects_unknown():
    base = ReconstructionOptions(interpolation="LINEAR", compounding="MAXIMUM")
    assert (base.interpolation, base.compounding) == ("linear", "max")
    assert base.replace(interpolation=None).interpolation == "linear"
    with pytest.raises(InvalidOptionError, match="unknown reconstruction option"):
        base.replace(spacing=1.0)
    assert base.to_dict()["output_spacing_mm"] == [0.5, 0.5, 0.5]

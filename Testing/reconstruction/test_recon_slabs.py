"""Batch reconstruction a slab of planes at a time: the same volumes as the whole grid at once,
in much less memory."""

from __future__ import annotations

import numpy as np
import pytest
from recon_synthetic import linear_sweep, random_sweep, traced_peak

from FreehandUSLib.reconstruction import (
    HoleFillingElement,
    IncrementalReconstructor,
    ReconstructionOptions,
    reconstruct_volume,
)
from FreehandUSLib.reconstruction import slabs
from FreehandUSLib.reconstruction.holefill import hole_filling_reach
from FreehandUSLib.reconstruction.kernels import voxel_matrices
from FreehandUSLib.reconstruction.masks import clipped_corners_px
from FreehandUSLib.reconstruction.reference import insert_frames_numpy
from FreehandUSLib.reconstruction.slabs import frame_plane_ranges, plan_slabs


@pytest.fixture
def thin_slabs(monkeypatch):
    """Slabs of the fewest planes allowed (4 nearest, 8 linear), whatever the volume's size."""
    monkeypatch.setattr(slabs, "MIN_SLAB_BYTES", 1)
    monkeypatch.setattr(slabs, "SLAB_OUTPUT_FRACTION", 1e-6)


def _whole_grid(seq, opts, grid, **kwargs):
    """The reference: every frame into accumulators for the whole grid, then ``result()``."""
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), dtype=seq.frames.dtype, grid=grid,
                                     **kwargs)
    recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
    return recon.result()


STICK = HoleFillingElement("STICK", stick_length_limit=5)
GAUSS = HoleFillingElement("GAUSSIAN", size=5, stdev=1.0, minimum_known_voxels_ratio=0.1)


@pytest.mark.parametrize(
    "interpolation,compounding,holes",
    [
        ("nearest", "mean", ()),
        ("nearest", "max", ()),
        ("nearest", "latest", (GAUSS,)),
        ("nearest", "mean", (GAUSS, STICK)),
        ("linear", "mean", ()),
        ("linear", "max", (STICK,)),
        ("linear", "mean", (STICK,)),
        ("linear", "importance_mask", ()),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_slabs_give_the_whole_grid_volume_bit_for_bit(thin_slabs, interpolation, compounding, holes, dtype):
    seq = random_sweep(n_frames=12, n_rows=40, n_cols=48, dtype=dtype, seed=11)
    importance = np.linspace(0.0, 1.0, seq.n_rows * seq.n_cols, dtype=np.float32).reshape(seq.n_rows, seq.n_cols)
    opts = ReconstructionOptions(output_spacing_mm=0.25, interpolation=interpolation, compounding=compounding,
                                 fill_holes=bool(holes), hole_filling=holes, number_of_threads=2)
    kwargs = {"importance_mask": importance} if compounding == "importance_mask" else {}
    slabbed = reconstruct_volume(seq, None, opts, **kwargs)
    plan = plan_slabs(slabbed.grid.shape[0], 1, 1, 1, linear=interpolation == "linear",
                      reach=hole_filling_reach(holes))
    assert plan.n_slabs >= 4  # really cut into slabs
    whole = _whole_grid(seq, opts, slabbed.grid, **kwargs)
    np.testing.assert_array_equal(slabbed.volume.voxels, whole.volume.voxels)
    np.testing.assert_array_equal(slabbed.weight.voxels, whole.weight.voxels)
    assert slabbed.volume.voxels.dtype == np.dtype(dtype)
    assert (slabbed.pixels_inserted, slabbed.frames_used) == (whole.pixels_inserted, whole.frames_used)
    assert slabbed.coverage_fraction == whole.coverage_fraction
    assert slabbed.filled_fraction == whole.filled_fraction
    if holes:
        assert slabbed.hole_filling.holes == whole.hole_filling.holes
        assert slabbed.hole_filling.filled_per_element == whole.hole_filling.filled_per_element
        assert slabbed.hole_filling.filled > 0


def test_slabs_with_two_channels_and_one_thread(thin_slabs):
    seq = linear_sweep(n_frames=30, n_rows=30, n_cols=40, step_mm=0.2, tilt_deg=35.0, seed=3)
    pa = np.random.default_rng(1).normal(3.0, 1.0, size=seq.frames.shape).astype(np.float32)
    opts = ReconstructionOptions(output_spacing_mm=0.2, interpolation="linear", number_of_threads=1,
                                 fill_holes=True, hole_filling=(STICK,))
    slabbed = reconstruct_volume(seq, None, opts, extra_channels={"pa": pa})
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), n_channels=2, dtype=np.float32,
                                     grid=slabbed.grid, channel_dtypes=(np.uint8, np.float32))
    both = np.stack([seq.frames.astype(np.float32), pa], axis=-1)
    recon.add_frames(both, seq.transforms["ImageToReference"].matrices)
    whole = recon.result()
    for a, b in zip(slabbed.volumes, whole.volumes):
        np.testing.assert_array_equal(a.voxels, b.voxels)
    assert [v.voxels.dtype for v in slabbed.volumes] == [np.uint8, np.float32]


def test_frames_outside_the_roi_are_still_reported(thin_slabs):
    seq = linear_sweep(n_frames=20, step_mm=0.5, seed=5)
    opts = ReconstructionOptions(output_spacing_mm=0.2, output_origin_mm=(0, 0, 0), output_extent=(0, 40, 0, 30, 0, 20),
                                 number_of_threads=2)
    result = reconstruct_volume(seq, None, opts)
    # The ROI is 4 mm deep (planes z = 0..4 mm); frames at z = 0, 0.5, ..., 9.5 mm.
    assert result.frames_used == 9
    assert sorted(k for k, v in result.frames_skipped.items() if v == "outside_volume") == list(range(9, 20))
    whole = _whole_grid(seq, opts, result.grid)
    np.testing.assert_array_equal(result.volume.voxels, whole.volume.voxels)


def test_mean_stays_exact_when_the_uint32_sums_could_overflow(thin_slabs, monkeypatch):
    from FreehandUSLib.reconstruction import kernels_common

    monkeypatch.setattr(kernels_common, "SUM_LIMIT_UINT8", 60)  # the batch switches to float64 sums up front
    seq = linear_sweep(n_frames=14, step_mm=0.05, seed=2)
    opts = ReconstructionOptions(output_spacing_mm=0.5, number_of_threads=2)
    result = reconstruct_volume(seq, None, opts)
    vox = voxel_matrices(seq.transforms["ImageToReference"].matrices, result.grid.reference_to_voxel)
    from FreehandUSLib.reconstruction import fan_row_ranges

    sums, counts = insert_frames_numpy(seq.frames, vox, fan_row_ranges(seq.n_rows, seq.n_cols), result.grid.shape)
    mean = np.floor(sums[..., 0] / np.maximum(counts, 1) + 0.5)
    assert counts.max() > 60
    np.testing.assert_array_equal(result.volume.voxels, np.where(counts > 0, mean, 0))


def test_plan_keeps_the_buffers_in_budget_and_covers_every_plane():
    plan = plan_slabs(200, 36_000, 16, 1, linear=True, budget_bytes=36_000 * 16 * 12)
    edges = np.asarray(plan.edges)
    assert edges[0] == 0 and edges[-1] == 200 and np.all(np.diff(edges) >= 8)
    assert plan.buffer_planes <= 12 and plan.keep == 0
    holes = plan_slabs(200, 36_000, 17, 1, linear=False, reach=4, budget_bytes=36_000 * 17 * 20)
    assert holes.keep == 8 and holes.buffer_planes <= 20 and np.all(np.diff(holes.edges) >= 4)
    # The default budget: half the output, but never less than MIN_SLAB_BYTES.
    big = plan_slabs(1000, 10**6, 8, 1, linear=False)
    assert big.buffer_planes * 10**6 * 8 <= 0.5 * 1000 * 10**6 + 8 * 10**6
    small = plan_slabs(50, 100, 16, 1, linear=True)
    assert small.n_slabs == 1 and small.edges == (0, 50)


def test_frame_plane_ranges_cover_every_pixel():
    seq = random_sweep(n_frames=10, n_rows=30, n_cols=36, seed=9)
    opts = ReconstructionOptions(output_spacing_mm=0.3, interpolation="linear")
    grid = reconstruct_volume(seq, None, opts).grid
    vox = voxel_matrices(seq.transforms["ImageToReference"].matrices, grid.reference_to_voxel)
    first, last = frame_plane_ranges(vox, clipped_corners_px(seq.n_rows, seq.n_cols, None, None))
    y, x = np.mgrid[0 : seq.n_rows, 0 : seq.n_cols]
    for n in range(seq.n_frames):
        k = vox[n, 2, 0] * x + vox[n, 2, 1] * y + vox[n, 2, 2]
        assert first[n] <= np.floor(k).min() and np.floor(k).max() + 1 <= last[n]
        assert last[n] - first[n] <= np.ptp(k) + 4  # and not much more


@pytest.mark.parametrize("interpolation,compounding,fill", [("nearest", "mean", True), ("linear", "mean", False),
                                                             ("linear", "max", False)])
def test_peak_memory_stays_under_twice_the_output(monkeypatch, interpolation, compounding, fill):
    monkeypatch.setattr(slabs, "MIN_SLAB_BYTES", 64 * 1024)  # the ratio rules even for this small volume
    seq = linear_sweep(n_frames=60, n_rows=60, n_cols=80, step_mm=0.25, tilt_deg=20.0, seed=1)
    opts = ReconstructionOptions(output_spacing_mm=0.12, interpolation=interpolation, compounding=compounding,
                                 fill_holes=fill, hole_filling=(GAUSS,), output_weight=False, number_of_threads=1)
    reconstruct_volume(seq[:4], None, opts)  # compile outside the measurement
    result, peak = traced_peak(lambda: reconstruct_volume(seq, None, opts))
    out_bytes = result.volume.voxels.nbytes
    assert result.weight is None and out_bytes == result.grid.n_voxels
    assert out_bytes > 1_000_000
    assert peak < 2 * out_bytes  # the whole-grid accumulators alone would be 8-16x


def test_memory_budget_counts_the_slab_buffers_not_whole_grid_accumulators():
    from FreehandUSLib.reconstruction.errors import VolumeTooLargeError
    from FreehandUSLib.reconstruction.geometry import buffer_bytes_per_voxel

    seq = linear_sweep(n_frames=20, step_mm=0.25, seed=4)
    opts = ReconstructionOptions(output_spacing_mm=0.2, interpolation="linear", output_weight=False)
    assert buffer_bytes_per_voxel(opts) == 17 and buffer_bytes_per_voxel(opts, slabbed=True) == 2
    n_voxels = reconstruct_volume(seq, None, opts).grid.n_voxels
    tight = ReconstructionOptions(output_spacing_mm=0.2, interpolation="linear", output_weight=False,
                                  memory_budget_bytes=5 * n_voxels)
    assert reconstruct_volume(seq, None, tight).volume.voxels.size == n_voxels  # batch: fits
    with pytest.raises(VolumeTooLargeError, match="bytes"):
        IncrementalReconstructor(tight, image_shape=(seq.n_rows, seq.n_cols),
                                 grid=reconstruct_volume(seq, None, opts).grid)  # live: would not


@pytest.mark.parametrize("interpolation,holes", [("nearest", (GAUSS, STICK)), ("linear", (STICK,)), ("linear", ())])
def test_each_thread_its_own_run_of_planes_gives_the_same_volume(thin_slabs, interpolation, holes):
    seq = linear_sweep(n_frames=40, n_rows=30, n_cols=40, step_mm=0.5, tilt_deg=25.0, seed=8)
    results = []
    for threads in (1, 2):
        opts = ReconstructionOptions(output_spacing_mm=0.25, interpolation=interpolation, number_of_threads=threads,
                                     fill_holes=bool(holes), hole_filling=holes)
        results.append(reconstruct_volume(seq, None, opts))
    assert results[0].grid.shape[0] >= 32  # deep enough for two runs of planes
    whole = _whole_grid(seq, opts, results[0].grid)
    for r in results:
        np.testing.assert_array_equal(r.volume.voxels, whole.volume.voxels)
        np.testing.assert_array_equal(r.weight.voxels, whole.weight.voxels)
        assert (r.pixels_inserted, r.frames_used, r.filled_fraction) == (
            whole.pixels_inserted, whole.frames_used, whole.filled_fraction)
        if holes:
            assert r.hole_filling.filled_per_element == whole.hole_filling.filled_per_element


def test_masks_rejection_and_skipped_frames_through_slabs(thin_slabs):
    seq = random_sweep(n_frames=14, n_rows=40, n_cols=48, seed=21)
    seq.frames[3] = 0  # nothing bright: automatic fan detection skips it
    seq.transforms["ImageToReference"].matrices[5] = np.nan  # an invalid transform
    opts = ReconstructionOptions(output_spacing_mm=0.25, interpolation="linear", number_of_threads=2,
                                 clip_rectangle_origin_px=(2, 1), clip_rectangle_size_px=(44, 36),
                                 fan_angles_deg=(-30.0, 30.0), fan_origin_px=(24.0, -10.0), fan_radius_start_px=12.0,
                                 fan_radius_stop_px=60.0, fan_angles_auto_detect=True, pixel_rejection_threshold=20.0)
    slabbed = reconstruct_volume(seq, None, opts)
    assert slabbed.grid.shape[0] >= 24  # three or more slabs of 8 planes
    assert slabbed.frames_skipped[3] == "empty_image" and slabbed.frames_skipped[5] == "invalid_transform"
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), grid=slabbed.grid)
    recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
    whole = recon.result()
    np.testing.assert_array_equal(slabbed.volume.voxels, whole.volume.voxels)
    np.testing.assert_array_equal(slabbed.weight.voxels, whole.weight.voxels)
    assert slabbed.frames_skipped == whole.frames_skipped and slabbed.pixels_inserted == whole.pixels_inserted

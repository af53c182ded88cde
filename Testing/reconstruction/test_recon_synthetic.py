"""Volume reconstruction against synthetic ground truth: values, geometry, exactness, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from recon_synthetic import image_to_reference_stack, linear_sweep, random_sweep

from FreehandUSLib import TrackedSequence
from FreehandUSLib.reconstruction import (
    IncrementalReconstructor,
    ReconstructionOptions,
    fan_row_ranges,
    reconstruct_volume,
)
from FreehandUSLib.reconstruction.geometry import frame_corners_reference
from FreehandUSLib.reconstruction.kernels import MODE_CODES, insert_frames, voxel_matrices
from FreehandUSLib.reconstruction.reference import insert_frames_numpy

MODES = [("nearest", "mean"), ("nearest", "max"), ("nearest", "latest"), ("linear", "mean"), ("linear", "max"), ("linear", "latest")]


def _acc(seq, opts, grid=None, threads=1, batches=None):
    """Raw accumulators of a reconstruction (frames fed in the given batch sizes)."""
    opts = opts.replace(number_of_threads=threads)
    if grid is None:
        grid = reconstruct_volume(seq, None, opts).grid
    recon = IncrementalReconstructor(
        opts, image_shape=(seq.n_rows, seq.n_cols), dtype=seq.frames.dtype, grid=grid
    )
    mats = seq.transforms["ImageToReference"].matrices
    sizes = batches or [seq.n_frames]
    start = 0
    for size in sizes:
        recon.add_frames(seq.frames[start : start + size], mats[start : start + size])
        start += size
    assert start == seq.n_frames
    acc, weight = recon.accumulators
    recon.close()
    return np.array(acc), np.array(weight), recon


@pytest.mark.parametrize("interpolation,compounding", MODES)
def test_constant_frames_give_that_value(interpolation, compounding):
    seq = linear_sweep(value=77)
    opts = ReconstructionOptions(output_spacing_mm=0.5, interpolation=interpolation, compounding=compounding)
    result = reconstruct_volume(seq, None, opts)
    vol = result.volume.voxels
    covered = result.weight.voxels > 0
    assert vol.dtype == np.uint8
    assert covered.mean() > 0.5
    assert np.all(vol[covered] == 77)
    assert np.all(vol[~covered] == 0)
    assert result.frames_used == seq.n_frames and not result.frames_skipped


def test_float_frames_give_float_volume():
    seq = linear_sweep(value=-2.5, dtype=np.float32)
    result = reconstruct_volume(seq, None, ReconstructionOptions(output_spacing_mm=0.5, compounding="max"))
    vol = result.volume.voxels
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol[result.weight.voxels > 0], np.float32(-2.5))


def test_known_plane_lands_at_the_right_voxels():
    # One frame in the plane z = 2.0 mm, pixels 0.5 mm: every pixel is a voxel centre.
    mats = image_to_reference_stack(1, pixel_mm=0.5, z0_mm=2.0)
    seq = TrackedSequence(
        frames=np.arange(6 * 8, dtype=np.uint8).reshape(1, 6, 8),
        transforms={"ImageToReference": (mats, [True])},
    )
    opts = ReconstructionOptions(output_spacing_mm=0.5, output_origin_mm=(0, 0, 0), output_extent=(0, 9, 0, 9, 0, 9))
    for interpolation in ("nearest", "linear"):
        result = reconstruct_volume(seq, None, opts.replace(interpolation=interpolation))
        vol, weight = result.volume.voxels, result.weight.voxels
        assert np.flatnonzero(weight.sum(axis=(1, 2))).tolist() == [4]  # k = 2.0 / 0.5
        np.testing.assert_array_equal(vol[4, :6, :8], seq.frames[0])
        np.testing.assert_array_equal(weight[4, :6, :8], 1.0)
    # Shifted by a quarter voxel in z: linear splits the weight 3:1 over planes 4 and 5.
    mats[0, 2, 3] = 2.125
    seq.set_transform("ImageToReference", mats)
    result = reconstruct_volume(seq, None, opts.replace(interpolation="linear"))
    np.testing.assert_allclose(result.weight.voxels[4, :6, :8], 0.75)
    np.testing.assert_allclose(result.weight.voxels[5, :6, :8], 0.25)
    nearest = reconstruct_volume(seq, None, opts)
    assert np.flatnonzero(nearest.weight.voxels.sum(axis=(1, 2))).tolist() == [4]


def test_thousand_overlapping_frames_give_the_exact_mean():
    n = 1000
    rng = np.random.default_rng(5)
    values = rng.integers(0, 256, size=n).astype(np.uint8)
    frames = np.broadcast_to(values[:, None, None], (n, 8, 8)).copy()
    mats = np.tile(image_to_reference_stack(1, pixel_mm=0.5), (n, 1, 1))
    seq = TrackedSequence(frames=frames, transforms={"ImageToReference": (mats, np.ones(n, bool))})
    opts = ReconstructionOptions(output_spacing_mm=0.5)
    acc, weight, _ = _acc(seq, opts)
    covered = weight > 0
    assert np.all(weight[covered] == n)
    np.testing.assert_array_equal(acc[covered, 0] / weight[covered], values.astype(np.float64).mean())
    result = reconstruct_volume(seq, None, opts)
    expected = np.floor(values.astype(np.float64).mean() + 0.5)
    assert np.all(result.volume.voxels[covered] == expected)
    # PLUS's saturating 16-bit running mean does not give the mean (the reason we do not).
    plus = reconstruct_volume(seq, None, opts.replace(emulate_plus=True)).volume.voxels
    assert abs(int(plus[covered][0]) - expected) > 2


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("interpolation,compounding", MODES + [("nearest", "importance_mask"), ("linear", "importance_mask")])
def test_multithreaded_equals_single_threaded(dtype, interpolation, compounding):
    seq = random_sweep(dtype=dtype)
    opts = ReconstructionOptions(output_spacing_mm=0.25, interpolation=interpolation, compounding=compounding)
    mask = np.random.default_rng(3).uniform(0, 1, size=(seq.n_rows, seq.n_cols)).astype(np.float32)
    grid = reconstruct_volume(seq, None, opts, importance_mask=mask).grid
    ref = None
    for threads in (1, 2, 3):
        recon = IncrementalReconstructor(
            opts.replace(number_of_threads=threads), image_shape=(seq.n_rows, seq.n_cols), dtype=dtype, grid=grid,
            importance_mask=mask,
        )
        recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
        acc, weight = (np.array(a) for a in recon.accumulators)
        recon.close()
        if ref is None:
            ref = (acc, weight, recon.pixels_inserted)
            assert recon.pixels_inserted > 0
        else:
            assert np.array_equal(acc, ref[0]) and np.array_equal(weight, ref[1])
            assert recon.pixels_inserted == ref[2]


@pytest.mark.parametrize("interpolation,compounding", MODES)
def test_incremental_equals_batch_bit_identical(interpolation, compounding):
    seq = random_sweep(n_frames=9, dtype=np.float32, seed=4)
    opts = ReconstructionOptions(output_spacing_mm=0.3, interpolation=interpolation, compounding=compounding)
    batch = reconstruct_volume(seq, None, opts)
    acc_all, w_all, _ = _acc(seq, opts, grid=batch.grid)
    acc_inc, w_inc, recon = _acc(seq, opts, grid=batch.grid, threads=2, batches=[1, 1, 3, 2, 1, 1])
    assert np.array_equal(acc_all, acc_inc) and np.array_equal(w_all, w_inc)
    live = recon.result()
    np.testing.assert_array_equal(live.volume.voxels, batch.volume.voxels)
    np.testing.assert_array_equal(live.weight.voxels, batch.weight.voxels)


def test_growing_grid_matches_batch_on_the_same_grid():
    seq = linear_sweep(n_frames=30, step_mm=0.8, tilt_deg=10)
    opts = ReconstructionOptions(output_spacing_mm=0.4)
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols))
    mats = seq.transforms["ImageToReference"].matrices
    dims = []
    for f in range(seq.n_frames):
        assert recon.add_frame(seq.frames[f], mats[f])
        dims.append(recon.grid.dims)
    assert dims[-1][2] > dims[0][2]  # grew along the sweep
    grown = recon.result()
    g = recon.grid
    roi = opts.replace(output_origin_mm=g.origin_mm, output_extent=(0, g.dims[0] - 1, 0, g.dims[1] - 1, 0, g.dims[2] - 1))
    batch = reconstruct_volume(seq, None, roi)
    assert batch.grid.same_as(g)
    np.testing.assert_array_equal(grown.volume.voxels, batch.volume.voxels)
    corners = frame_corners_reference(mats, np.array([[0, 0], [0, 39], [49, 0], [49, 39]], float))
    lo, hi = g.bounds_grid_frame()
    assert np.all(corners.min(axis=(0, 1)) >= lo - 0.2) and np.all(corners.max(axis=(0, 1)) <= hi + 0.2)


@pytest.mark.parametrize("interpolation,compounding", MODES + [("nearest", "importance_mask")])
def test_kernels_match_numpy_reference(interpolation, compounding):
    seq = random_sweep(n_frames=6, seed=9)
    opts = ReconstructionOptions(output_spacing_mm=0.3, interpolation=interpolation, compounding=compounding)
    mask = np.random.default_rng(2).uniform(0, 1, size=(seq.n_rows, seq.n_cols)).astype(np.float32)
    mask[:5] = 0.0
    grid = reconstruct_volume(seq, None, opts, importance_mask=mask).grid
    mats = voxel_matrices(seq.transforms["ImageToReference"].matrices, grid.reference_to_voxel)
    ranges = fan_row_ranges(seq.n_rows, seq.n_cols, clip_origin_px=(3, 2), clip_size_px=(30, 25))
    acc = np.zeros(grid.shape + (1,))
    weight = np.zeros(grid.shape)
    frames = np.ascontiguousarray(seq.frames[..., None])
    insert_frames(frames, np.arange(6), mats, ranges[None], np.zeros(6, int), acc, weight,
                  mode=MODE_CODES[compounding], linear=interpolation == "linear", importance=mask,
                  pixel_rejection_threshold=20.0, n_threads=2)
    ref_acc, ref_w = insert_frames_numpy(seq.frames, mats, ranges, grid.shape, compounding=compounding,
                                         linear=interpolation == "linear", importance=mask,
                                         pixel_rejection_threshold=20.0)
    np.testing.assert_allclose(weight, ref_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-12, atol=1e-9)
    assert weight.sum() > 0


def test_multichannel_volumes_are_coregistered():
    us = linear_sweep(n_frames=8, seed=3)
    pa = (us.frames.astype(np.float32) * 0.5 - 3.0).astype(np.float32)
    opts = ReconstructionOptions(output_spacing_mm=0.5, interpolation="linear")
    result = reconstruct_volume(us, None, opts, extra_channels={"photoacoustic": pa})
    assert result.channel_names == ("image", "photoacoustic")
    us_vol, pa_vol = result.volumes
    assert us_vol.voxels.dtype == np.uint8 and pa_vol.voxels.dtype == np.float32
    assert us_vol.origin_mm == pa_vol.origin_mm and us_vol.voxels.shape == pa_vol.voxels.shape
    alone = reconstruct_volume(us, None, opts)
    np.testing.assert_array_equal(us_vol.voxels, alone.volume.voxels)
    covered = result.weight.voxels > 0
    single_pa = reconstruct_volume(
        TrackedSequence(frames=pa, transforms=us.transforms), None, opts
    ).volume.voxels
    np.testing.assert_allclose(pa_vol.voxels[covered], single_pa[covered], rtol=1e-6)


def test_pixel_rejection_and_importance_mask():
    seq = linear_sweep(n_frames=6)
    frames = seq.frames.copy()
    frames[:, :, :25] = 5  # dark left half
    frames[:, :, 25:] = 200
    seq = TrackedSequence(frames=frames, transforms=seq.transforms)
    opts = ReconstructionOptions(output_spacing_mm=0.5)
    full = reconstruct_volume(seq, None, opts)
    rejected = reconstruct_volume(seq, None, opts.replace(pixel_rejection_threshold=10))
    vol = rejected.volume.voxels[rejected.weight.voxels > 0]
    assert vol.min() >= 190 and rejected.pixels_inserted == full.pixels_inserted // 2
    mask = np.ones((seq.n_rows, seq.n_cols), np.uint8) * 255
    mask[:, 25:] = 0
    imp = reconstruct_volume(seq, None, opts.replace(compounding="importance_mask"), importance_mask=mask)
    assert imp.volume.voxels[imp.weight.voxels > 0].max() <= 10


def test_clip_rectangle_limits_the_inserted_pixels():
    seq = linear_sweep(n_frames=3)
    opts = ReconstructionOptions(output_spacing_mm=0.2, clip_rectangle_origin_px=(10, 5), clip_rectangle_size_px=(20, 10))
    result = reconstruct_volume(seq, None, opts)
    assert result.pixels_inserted == 3 * 21 * 11  # PLUS keeps origin .. origin + size inclusive
    assert result.grid.dims[:2] == (21, 11)
    np.testing.assert_allclose(result.grid.origin_mm[:2], (10 * 0.2, 5 * 0.2))


def test_skip_interval_and_invalid_transforms_are_reported():
    seq = linear_sweep(n_frames=10)
    mats = seq.transforms["ImageToReference"].matrices.copy()
    valid = np.ones(10, bool)
    valid[[2, 7]] = False
    seq.set_transform("ImageToReference", mats, valid)
    image_ok = np.ones(10, bool)
    image_ok[4] = False
    seq.image_ok = image_ok
    result = reconstruct_volume(seq, None, ReconstructionOptions(skip_interval=1))
    assert result.frames_used == 7
    assert result.frames_skipped == {2: "invalid_transform", 7: "invalid_transform", 4: "no_image"}
    assert result.to_dict()["frames_skipped_by_reason"] == {"invalid_transform": 2, "no_image": 1}
    every_third = reconstruct_volume(seq, None, ReconstructionOptions(skip_interval=3))
    assert every_third.frames_used == 4  # frames 0, 3, 6, 9 (none of them invalid)
    assert sum(r == "skip_interval" for r in every_third.frames_skipped.values()) == 6


def test_result_summary_is_json_safe():
    import json

    result = reconstruct_volume(linear_sweep(), None, ReconstructionOptions(fill_holes=True, hole_filling=[{"type": "STICK"}]))
    info = json.loads(json.dumps(result.to_dict()))
    for key in ("frames_used", "dimensions", "spacing", "origin", "filled_fraction", "seconds", "frames_per_second"):
        assert key in info
    assert info["filled_fraction"] >= info["coverage_fraction"] > 0
    assert "frames: 12 used of 12" in str(result)


def test_live_queue_drops_and_reports():
    seq = linear_sweep(n_frames=12)
    mats = seq.transforms["ImageToReference"].matrices
    grid = reconstruct_volume(seq, None, ReconstructionOptions()).grid
    recon = IncrementalReconstructor(ReconstructionOptions(), image_shape=(40, 50), grid=grid,
                                     max_pending_frames=4, max_lag_s=0.2)
    for f in range(8):
        recon.submit(seq.frames[f], mats[f], timestamp_s=0.05 * f)
    assert recon.pending == 4 and recon.frames_dropped == 4
    used = recon.process_pending()  # frames 4..7 at 0.20..0.35 s: 4 is 0.15 s older than 7 -> kept
    assert used == 4 and recon.pending == 0
    recon.submit(seq.frames[8], mats[8], timestamp_s=0.0)
    recon.submit(seq.frames[9], mats[9], timestamp_s=1.0)
    assert recon.process_pending() == 1
    status = recon.status()
    assert status["frames_dropped"] == 5
    assert status["frames_skipped_by_reason"] == {"dropped_behind": 5}
    assert status["frames_received"] == 10 and status["frames_used"] == 5
    recon.close()


def test_fixed_roi_with_orientation():
    seq = linear_sweep(n_frames=10, value=50)
    angle = np.deg2rad(30)
    axes = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    from FreehandUSLib.reconstruction import roi_options

    opts = roi_options(ReconstructionOptions(output_spacing_mm=0.5), (5.0, 4.0, 2.25), (6.0, 6.0, 4.0), axes)
    result = reconstruct_volume(seq, None, opts)
    assert result.grid.dims == (13, 13, 9)
    np.testing.assert_allclose(result.volume.directions, axes)
    centre = result.volume.ijk_to_world @ np.array([6, 6, 4, 1.0])
    np.testing.assert_allclose(centre[:3], (5.0, 4.0, 2.25))
    assert np.all(result.volume.voxels[result.weight.voxels > 0] == 50)
    assert result.coverage_fraction > 0.5


def test_incremental_fixed_roi_reports_outside_frames_and_restarts_after_consume():
    seq = linear_sweep(n_frames=4, value=60)
    mats = seq.transforms["ImageToReference"].matrices
    opts = ReconstructionOptions(output_origin_mm=(0, 0, 0), output_extent=(0, 19, 0, 15, 0, 4))
    recon = IncrementalReconstructor(opts, image_shape=(40, 50))
    far = mats[0].copy()
    far[:3, 3] += 1000.0
    assert recon.add_frame(seq.frames[0], mats[0]) is True
    assert recon.add_frame(seq.frames[1], far) is False
    assert recon.add_frame(seq.frames[2], np.full((4, 4), np.nan)) is False
    assert recon.frames_skipped == {1: "outside_volume", 2: "invalid_transform"}
    first = recon.result(consume=True)
    assert first.frames_used == 1 and first.grid.dims == (20, 16, 5)
    assert recon.accumulators == (None, None)
    assert recon.add_frame(seq.frames[3], mats[3])  # buffers come back on the next frame
    again = recon.result()
    assert again.frames_used == 1 and again.grid.same_as(first.grid)
    assert np.all(again.volume.voxels[again.weight.voxels > 0] == 60)

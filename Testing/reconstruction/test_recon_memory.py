"""Compact accumulators: exact at their documented bounds, widened before they could overflow,
and the memory a reconstruction actually needs."""

from __future__ import annotations

import numpy as np
import pytest
from recon_synthetic import linear_sweep, random_sweep, traced_peak

from FreehandUSLib import TrackedSequence
from FreehandUSLib.reconstruction import (
    HoleFillingElement,
    IncrementalReconstructor,
    ReconstructionOptions,
    fan_row_ranges,
    reconstruct_volume,
)
from FreehandUSLib.reconstruction import kernels_common
from FreehandUSLib.reconstruction.geometry import buffer_bytes_per_voxel
from FreehandUSLib.reconstruction.kernels import (
    COUNT_LIMIT,
    MODE_CODES,
    MODE_MEAN_PLUS,
    SUM_LIMIT_UINT8,
    accumulator_types,
    pixels_per_voxel_bound,
    voxel_matrices,
)
from FreehandUSLib.reconstruction.reference import insert_frames_numpy

U8, U16, F32, U32, F64 = (np.dtype(t) for t in (np.uint8, np.uint16, np.float32, np.uint32, np.float64))


@pytest.mark.parametrize(
    "mode,linear,frames,emulate,expected",
    [
        ("mean", False, U8, False, (U32, U32, SUM_LIMIT_UINT8)),
        ("mean", False, F32, False, (F64, U32, COUNT_LIMIT)),
        ("max", False, U8, False, (U8, U32, COUNT_LIMIT)),
        ("latest", False, F32, False, (F32, U32, COUNT_LIMIT)),
        ("max", True, U8, False, (U8, F32, None)),
        ("mean", True, U8, False, (F64, F64, None)),
        ("importance_mask", False, U8, False, (F64, F64, None)),
        # PLUS emulation: PLUS's own buffers (the output type, its 16-bit accumulation buffer)
        ("max", False, U8, True, (U8, U16, None)),
        ("mean", True, U8, True, (U8, U16, None)),
        ("latest", True, F32, True, (F32, U16, None)),
        ("importance_mask", False, U8, True, (F64, F64, None)),
    ],
)
def test_accumulator_types(mode, linear, frames, emulate, expected):
    assert accumulator_types(MODE_CODES[mode], linear, frames, emulate_plus=emulate) == expected
    assert accumulator_types(MODE_MEAN_PLUS, False, U8) == (U8, U16, None)
    assert SUM_LIMIT_UINT8 * 255 == 2**32 - 1  # the documented bound fills uint32 exactly


def _one_voxel_recon(shape):
    opts = ReconstructionOptions(output_spacing_mm=1.0, output_origin_mm=(0, 0, 0), output_extent=(0, 0, 0, 0, 0, 0),
                                 number_of_threads=1)
    return IncrementalReconstructor(opts, image_shape=shape)


def test_uint8_sums_are_exact_up_to_the_bound_and_widen_past_it():
    # 257 x 65537 = 16,843,009 pixels of 255, all in one voxel: the uint32 sum is exactly 2**32 - 1.
    shape = (257, 65537)
    assert shape[0] * shape[1] == SUM_LIMIT_UINT8
    tiny = np.diag([1e-7, 1e-7, 1.0, 1.0])  # the whole frame inside 0.007 mm
    recon = _one_voxel_recon(shape)
    assert recon.add_frame(np.full(shape, 255, np.uint8), tiny)
    acc, weight = recon.accumulators
    assert acc.dtype == np.uint32 and weight.dtype == np.uint32  # not widened at the bound
    assert int(acc[0, 0, 0, 0]) == 2**32 - 1 and int(weight[0, 0, 0]) == SUM_LIMIT_UINT8
    first = recon.result()
    assert first.volume.voxels[0, 0, 0] == 255
    assert first.weight.voxels[0, 0, 0] == np.float32(SUM_LIMIT_UINT8)
    # One more frame (of zeros) would overflow uint32: the buffers become float64 first.
    assert recon.add_frame(np.zeros(shape, np.uint8), tiny)
    acc, weight = recon.accumulators
    assert acc.dtype == np.float64 and weight.dtype == np.float64
    assert acc[0, 0, 0, 0] == 2**32 - 1 and weight[0, 0, 0] == 2 * SUM_LIMIT_UINT8
    assert recon.result().volume.voxels[0, 0, 0] == 128  # 127.5 exactly, rounded half up
    recon.reset()
    assert recon.accumulators[0].dtype == np.uint32  # compact again after a reset


def test_widening_mid_sequence_keeps_batch_and_incremental_identical(monkeypatch):
    monkeypatch.setattr(kernels_common, "SUM_LIMIT_UINT8", 60)  # widen after a few frames
    seq = linear_sweep(n_frames=14, step_mm=0.05, seed=2)  # frames 1/10 voxel apart: voxels collect many pixels
    opts = ReconstructionOptions(output_spacing_mm=0.5, number_of_threads=2)
    batch = reconstruct_volume(seq, None, opts)
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), grid=batch.grid)
    mats = seq.transforms["ImageToReference"].matrices
    dtypes = []
    for f in range(seq.n_frames):
        recon.add_frame(seq.frames[f], mats[f])
        dtypes.append(recon.accumulators[0].dtype)
    assert dtypes[0] == np.uint32 and dtypes[-1] == np.float64  # widened on the way
    live = recon.result()
    np.testing.assert_array_equal(live.volume.voxels, batch.volume.voxels)
    np.testing.assert_array_equal(live.weight.voxels, batch.weight.voxels)
    # ... and both are the exact mean.
    vox = voxel_matrices(mats, batch.grid.reference_to_voxel)
    ranges = fan_row_ranges(seq.n_rows, seq.n_cols)
    sums, counts = insert_frames_numpy(seq.frames, vox, ranges, batch.grid.shape)
    mean = np.floor(sums[..., 0] / np.maximum(counts, 1) + 0.5)
    np.testing.assert_array_equal(live.volume.voxels, np.where(counts > 0, mean, 0))
    assert counts.max() > 60


def test_pixels_per_voxel_bound_is_an_upper_bound():
    rng = np.random.default_rng(4)
    n_rows, n_cols = 30, 40
    ranges = fan_row_ranges(n_rows, n_cols)
    frames = np.ones((1, n_rows, n_cols), np.uint8)
    for trial in range(40):
        m = np.zeros((1, 3, 3))
        m[0, :, :2] = rng.normal(size=(3, 2)) * rng.choice([0.02, 0.1, 0.5, 2.0])  # shrunk, oblique, magnified
        m[0, :, 2] = rng.uniform(0, 3, size=3)
        bound = pixels_per_voxel_bound(m, [n_rows * n_cols])[0]
        _, counts = insert_frames_numpy(frames, m, ranges, (8, 8, 8))
        assert counts.max() <= bound <= n_rows * n_cols


@pytest.mark.parametrize("interpolation,compounding", [("nearest", "mean"), ("nearest", "max"), ("linear", "mean"), ("linear", "latest")])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_consuming_result_equals_a_preview(interpolation, compounding, dtype):
    seq = random_sweep(n_frames=8, dtype=dtype, seed=6)
    opts = ReconstructionOptions(output_spacing_mm=0.3, interpolation=interpolation, compounding=compounding,
                                 fill_holes=True, hole_filling=(HoleFillingElement("STICK"),))
    recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), dtype=dtype,
                                     grid=reconstruct_volume(seq, None, opts).grid)
    recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
    acc_before = np.array(recon.accumulators[0])
    preview = recon.result()
    again = recon.result(fill_holes=False)
    np.testing.assert_array_equal(recon.accumulators[0], acc_before)  # a preview changes nothing
    final = recon.result(consume=True)
    assert recon.accumulators == (None, None)
    for a, b in ((preview, final),):
        np.testing.assert_array_equal(a.volume.voxels, b.volume.voxels)
        np.testing.assert_array_equal(a.weight.voxels, b.weight.voxels)
        assert a.volume.voxels.dtype == dtype and a.weight.voxels.dtype == np.float32
    covered = preview.weight.voxels > 0
    np.testing.assert_array_equal(again.volume.voxels[covered], preview.volume.voxels[covered])
    assert preview.filled_fraction > again.filled_fraction


@pytest.mark.parametrize(
    "interpolation,compounding,fill,per_voxel",
    [("nearest", "mean", False, 9), ("nearest", "max", False, 5), ("linear", "max", False, 5),
     ("linear", "mean", False, 17), ("nearest", "mean", True, 10)],
)
def test_live_peak_memory_is_the_documented_buffers(interpolation, compounding, fill, per_voxel):
    seq = linear_sweep(n_frames=40, n_rows=60, n_cols=80, step_mm=0.25, seed=1)
    opts = ReconstructionOptions(output_spacing_mm=0.25, interpolation=interpolation, compounding=compounding,
                                 fill_holes=fill, hole_filling=(HoleFillingElement("STICK"),) if fill else (),
                                 number_of_threads=1)
    grid = reconstruct_volume(seq, None, opts).grid  # compile outside the measurement

    def live():  # accumulators for the whole grid (batch reconstruction needs a slab only)
        recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), grid=grid)
        recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
        return recon.result(consume=True)

    result, peak = traced_peak(live)
    n_voxels = result.grid.n_voxels
    assert buffer_bytes_per_voxel(opts) == per_voxel  # output (1 byte) + accumulators (+ known mask)
    # Everything else (plane scratch, hole-filling workspace, bookkeeping) stays small.
    assert per_voxel * n_voxels <= peak <= per_voxel * n_voxels * 1.1 + 4_000_000
    assert result.volume.voxels.nbytes == n_voxels


def test_extra_channels_are_converted_a_batch_at_a_time():
    us = linear_sweep(n_frames=480, n_rows=40, n_cols=50, step_mm=0.01, seed=4)
    pa = np.random.default_rng(0).normal(size=us.frames.shape)  # float64: converted to float32
    opts = ReconstructionOptions(output_spacing_mm=0.5, compounding="max")
    joined_bytes = us.frames.size * 2 * 4  # both channels as float32 frames
    reconstruct_volume(us[:4], None, opts, extra_channels={"pa": pa[:4]})  # compile outside the measurement
    result, peak = traced_peak(lambda: reconstruct_volume(us, None, opts, extra_channels={"pa": pa}))
    assert peak < joined_bytes / 3  # never the whole converted sequence at once, a batch of 32 frames
    assert result.volumes[1].voxels.dtype == np.float32
    alone = reconstruct_volume(TrackedSequence(frames=pa.astype(np.float32), transforms=us.transforms), None, opts)
    np.testing.assert_array_equal(result.volumes[1].voxels, alone.volume.voxels)
    np.testing.assert_array_equal(result.volumes[0].voxels, reconstruct_volume(us, None, opts).volume.voxels)

"""The torch insertion engine against the numba kernels (torch's CPU device; CUDA when present)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from recon_synthetic import random_sweep
from scipy.spatial.transform import Rotation

from FreehandUSLib.reconstruction import kernels
from FreehandUSLib.reconstruction.errors import InvalidOptionError, ReconstructionError
from FreehandUSLib.reconstruction.kernels import (
    MODE_IMPORTANCE,
    MODE_LATEST,
    MODE_MAX,
    MODE_MEAN,
    MODE_MEAN_PLUS,
)
from FreehandUSLib.reconstruction.masks import fan_row_ranges
from FreehandUSLib.reconstruction.torch_engine import (
    TorchAccumulators,
    cuda_available,
    resolve_engine,
)

N_ROWS, N_COLS = 30, 40
GRID = (14, 16, 18)  # (n_k, n_j, n_i): smaller than a frame, so frames cross every face
MODES = {"mean": MODE_MEAN, "max": MODE_MAX, "latest": MODE_LATEST, "importance_mask": MODE_IMPORTANCE}


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def make_scene(dtype=np.uint8, n_channels=1, *, n_frames=6, seed=0):
    """Frames, (n, 3, 3) pixel -> voxel maps, fan + full row ranges, importance, a rejection threshold.

    Frame 0 is axis-aligned with half-voxel steps (positions on exact .5 boundaries); the last
    frame lies entirely outside the grid; the others are oblique, dense (about 5 pixels per
    voxel) and spill over the grid's faces.
    """
    rng = np.random.default_rng(seed)
    shape = (n_frames, N_ROWS, N_COLS, n_channels)
    if np.dtype(dtype) == np.uint8:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
        threshold = 30.0
    else:
        frames = rng.normal(size=shape).astype(np.float32)  # negative values too (max starts empty)
        threshold = -0.6
    centre = np.array([GRID[2], GRID[1], GRID[0]], dtype=np.float64) / 2.0  # (i, j, k)
    mats = np.zeros((n_frames, 3, 3))
    for f in range(n_frames):
        axes = Rotation.from_rotvec(rng.normal(scale=0.6, size=3)).as_matrix() * 0.45
        mats[f, :, 0], mats[f, :, 1] = axes[:, 0], axes[:, 1]
        mats[f, :, 2] = centre - axes[:, 0] * N_COLS / 2 - axes[:, 1] * N_ROWS / 2 + rng.normal(scale=2.0, size=3)
    mats[0] = [[0.5, 0.0, -1.0], [0.0, 0.5, -2.0], [0.0, 0.0, 6.5]]
    mats[-1, :, 2] += 100.0
    ranges = np.stack([
        fan_row_ranges(N_ROWS, N_COLS, fan_angles_deg=(-35.0, 35.0), fan_origin_px=(N_COLS / 2, -4.0),
                       fan_radius_start_px=8.0, fan_radius_stop_px=34.0),
        fan_row_ranges(N_ROWS, N_COLS),
    ])
    mask_ids = np.arange(n_frames) % 2
    importance = rng.uniform(-0.25, 1.0, size=(N_ROWS, N_COLS)).astype(np.float32)  # some <= 0: skipped
    return frames, mats, ranges, mask_ids, importance, threshold


def run_numba(scene, mode, linear, batches, *, reject=True):
    frames, mats, ranges, mask_ids, importance, threshold = scene
    acc_t, w_t, _ = kernels.accumulator_types(mode, linear, frames.dtype)
    acc = np.zeros(GRID + (frames.shape[3],), dtype=acc_t)
    weight = np.zeros(GRID, dtype=w_t)
    counts = [
        kernels.insert_frames(frames, ids, mats[ids], ranges, mask_ids[ids], acc, weight, mode=mode, linear=linear,
                              importance=importance, pixel_rejection_threshold=threshold if reject else None)
        for ids in batches
    ]
    return acc, weight, np.concatenate(counts)


def run_torch(scene, mode, linear, batches, *, reject=True, device="cpu", chunk_pixels=700, accumulators=None):
    frames, mats, ranges, mask_ids, importance, threshold = scene
    engine = accumulators or TorchAccumulators(GRID, frames.shape[3], mode=mode, linear=linear,
                                               frame_dtype=frames.dtype, device=device, chunk_pixels=chunk_pixels)
    counts = [
        engine.insert_frames(frames, ids, mats[ids], ranges, mask_ids[ids], mode=mode, linear=linear,
                             importance=importance, pixel_rejection_threshold=threshold if reject else None)
        for ids in batches
    ]
    acc, weight = engine.to_numpy()
    return acc, weight, np.concatenate(counts)


BATCHES = [np.arange(0, 3), np.arange(3, 6)]  # two calls: values and order carry over between them


def assert_same(numba_result, torch_result, mode, linear):
    acc_n, w_n, c_n = numba_result
    acc_t, w_t, c_t = torch_result
    np.testing.assert_array_equal(c_t, c_n)
    assert acc_t.dtype == acc_n.dtype and w_t.dtype == w_n.dtype
    if not linear:
        np.testing.assert_array_equal(acc_t, acc_n)
        np.testing.assert_array_equal(w_t, w_n)
    elif mode in (MODE_MAX, MODE_LATEST):
        np.testing.assert_array_equal(acc_t, acc_n)  # the values themselves
        np.testing.assert_allclose(w_t, w_n, rtol=1e-6, atol=1e-6)  # numba rounds to float32 per addition
        np.testing.assert_array_equal(w_t != 0, w_n != 0)
    else:
        np.testing.assert_allclose(acc_t, acc_n, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w_t, w_n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("linear", [False, True], ids=["nearest", "linear"])
def test_torch_cpu_matches_numba_kernels(torch, linear, mode_name, dtype):
    scene = make_scene(dtype)
    mode = MODES[mode_name]
    numba_result = run_numba(scene, mode, linear, BATCHES)
    torch_result = run_torch(scene, mode, linear, BATCHES)
    assert_same(numba_result, torch_result, mode, linear)
    counts = numba_result[2]
    assert counts[-1] == 0 and counts[:-1].min() > 0  # the outside frame adds nothing, the others do


@pytest.mark.parametrize(
    "mode_name, linear",
    [("mean", False), ("max", False), ("latest", True), ("mean", True), ("importance_mask", False)],
)
def test_two_channels_and_no_rejection(torch, mode_name, linear):
    scene = make_scene(np.float32, n_channels=2, seed=3)
    mode = MODES[mode_name]
    for reject in (True, False):
        assert_same(run_numba(scene, mode, linear, BATCHES, reject=reject),
                    run_torch(scene, mode, linear, BATCHES, reject=reject), mode, linear)


def test_frames_touching_the_grid_faces(torch):
    scene = make_scene(np.uint8, seed=4)
    frames, _, ranges, mask_ids, _, _ = scene
    acc_n, w_n, c_n = run_numba(scene, MODE_MEAN, False, BATCHES, reject=False)
    acc_t, w_t, c_t = run_torch(scene, MODE_MEAN, False, BATCHES, reject=False)
    kept = np.array([np.count_nonzero(fan_row_ranges_mask(ranges[m])) for m in mask_ids])
    assert np.any((c_n > 0) & (c_n < kept))  # partly outside: the grid edge clips them
    for face in (w_t[0], w_t[-1], w_t[:, 0], w_t[:, -1], w_t[:, :, 0], w_t[:, :, -1]):
        assert np.count_nonzero(face) > 0  # every face of the grid receives pixels
    np.testing.assert_array_equal(c_t, c_n)
    np.testing.assert_array_equal(w_t, w_n)
    np.testing.assert_array_equal(acc_t, acc_n)


def fan_row_ranges_mask(ranges):
    x = np.arange(N_COLS)[None, :]
    keep = (x >= ranges[:, 0:1]) & (x <= ranges[:, 1:2])
    return keep & ~((x >= ranges[:, 2:3]) & (x <= ranges[:, 3:4]))


def test_latest_keeps_the_last_pixel_in_frame_row_column_order(torch):
    # Very dense frames (10 pixels per voxel side) all in one plane: order decides every voxel.
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, size=(4, N_ROWS, N_COLS, 1), dtype=np.uint8)
    mats = np.tile(np.array([[0.1, 0.02, 2.0], [0.01, 0.1, 3.0], [0.0, 0.0, 5.0]]), (4, 1, 1))
    mats[1:, 0, 2] += np.array([0.13, 0.27, 0.41])
    ranges = fan_row_ranges(N_ROWS, N_COLS)[None]
    scene = (frames, mats, ranges, np.zeros(4, dtype=np.int64), None, 0.0)
    batches = [np.array([0, 1]), np.array([2, 3])]
    for linear in (False, True):
        acc_n, w_n, c_n = run_numba(scene, MODE_LATEST, linear, batches, reject=False)
        for chunk in (1, 700, 10**6):
            acc_t, w_t, c_t = run_torch(scene, MODE_LATEST, linear, batches, reject=False, chunk_pixels=chunk)
            np.testing.assert_array_equal(acc_t, acc_n)
            np.testing.assert_array_equal(c_t, c_n)
        assert np.count_nonzero(w_n) > 0 and (w_n.max() >= 4 if not linear else w_n.max() > 1)


def test_latest_serial_numbers_restart_without_changing_the_result(torch):
    scene = make_scene(np.uint8, seed=2)
    engine = TorchAccumulators(GRID, 1, mode=MODE_LATEST, linear=False, frame_dtype=np.uint8, device="cpu",
                               chunk_pixels=700)
    engine._stamp_limit = 3 * N_ROWS * N_COLS  # restarts every few frames
    batches = [np.array([i]) for i in range(6)]
    acc_t, _, c_t = run_torch(scene, MODE_LATEST, False, batches, accumulators=engine)
    acc_n, _, c_n = run_numba(scene, MODE_LATEST, False, batches)
    np.testing.assert_array_equal(acc_t, acc_n)
    np.testing.assert_array_equal(c_t, c_n)


def test_chunk_size_does_not_change_the_sums(torch):
    scene = make_scene(np.float32, seed=4)
    results = [run_torch(scene, MODE_MEAN, True, BATCHES, chunk_pixels=c) for c in (1, 500, 10**7)]
    for acc, weight, counts in results[1:]:
        np.testing.assert_array_equal(counts, results[0][2])
        np.testing.assert_allclose(acc, results[0][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(weight, results[0][1], rtol=1e-12, atol=1e-12)


def test_empty_batch_changes_nothing(torch):
    frames, mats, ranges, _, _, _ = make_scene()
    engine = TorchAccumulators(GRID, 1, mode=MODE_MEAN, linear=True, frame_dtype=np.uint8, device="cpu")
    counts = engine.insert_frames(frames, np.zeros(0, dtype=np.int64), np.zeros((0, 3, 3)), ranges,
                                  np.zeros(0, dtype=np.int64))
    assert counts.shape == (0,) and counts.dtype == np.int64
    acc, weight = engine.to_numpy()
    assert acc.shape == GRID + (1,) and not acc.any() and not weight.any()


def test_frames_as_tensors_give_the_same_result(torch):
    scene = make_scene(np.uint8, seed=5)
    frames, mats, ranges, mask_ids, _, threshold = scene
    a = TorchAccumulators(GRID, 1, mode=MODE_MAX, linear=True, frame_dtype=np.uint8, device="cpu")
    b = TorchAccumulators(GRID, 1, mode=MODE_MAX, linear=True, frame_dtype=np.uint8, device="cpu")
    ids = np.arange(6)
    ca = a.insert_frames(frames, ids, mats, ranges, mask_ids, pixel_rejection_threshold=threshold)
    cb = b.insert_frames(torch.from_numpy(frames), ids, mats, ranges, mask_ids, pixel_rejection_threshold=threshold)
    np.testing.assert_array_equal(ca, cb)
    for x, y in zip(a.to_numpy(), b.to_numpy()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode_name, dtype", [("max", np.float32), ("mean", np.uint8), ("latest", np.uint8)])
def test_from_numpy_continues_a_numba_reconstruction(torch, mode_name, dtype):
    scene = make_scene(dtype, seed=6)
    mode = MODES[mode_name]
    acc_n, w_n, _ = run_numba(scene, mode, False, BATCHES[:1])
    engine = TorchAccumulators.from_numpy(acc_n, w_n, mode=mode, linear=False, frame_dtype=dtype, device="cpu")
    for x, y in zip(engine.to_numpy(), (acc_n, w_n)):  # round trip
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
    if mode == MODE_LATEST:
        return  # serial numbers do not carry over from numba: the first batch's winners are final
    acc_t, w_t, c_t = run_torch(scene, mode, False, BATCHES[1:], accumulators=engine)
    acc_b, w_b, c_b = run_numba(scene, mode, False, BATCHES)
    np.testing.assert_array_equal(acc_t, acc_b)
    np.testing.assert_array_equal(w_t, w_b)
    np.testing.assert_array_equal(c_t, c_b[3:])


def test_from_numpy_rejects_mismatched_buffers(torch):
    with pytest.raises(InvalidOptionError, match="weight: expected shape"):
        TorchAccumulators.from_numpy(np.zeros((2, 3, 4, 1)), np.zeros((2, 3, 5)), mode=MODE_MEAN, linear=True,
                                     frame_dtype=np.uint8, device="cpu")
    with pytest.raises(InvalidOptionError, match="acc: expected"):
        TorchAccumulators.from_numpy(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), mode=MODE_MEAN, linear=True,
                                     frame_dtype=np.uint8, device="cpu")


def test_to_numpy_widens_sums_that_uint32_cannot_hold(torch):
    engine = TorchAccumulators((2, 2, 2), 1, mode=MODE_MEAN, linear=False, frame_dtype=np.uint8, device="cpu")
    acc, weight = engine.to_numpy()
    assert acc.dtype == np.uint32 and weight.dtype == np.uint32
    engine.acc[1, 0, 1, 0] = 2**32 + 7
    engine.weight[1, 0, 1] = 2**25
    acc, weight = engine.to_numpy()
    assert acc.dtype == np.float64 and weight.dtype == np.float64
    assert acc[1, 0, 1, 0] == 2**32 + 7 and weight[1, 0, 1] == 2**25


def test_mean_plus_and_fixed_point_are_refused(torch):
    with pytest.raises(InvalidOptionError, match="MODE_MEAN_PLUS.*emulate_plus.*engine='numba'"):
        TorchAccumulators(GRID, 1, mode=MODE_MEAN_PLUS, frame_dtype=np.uint8, device="cpu")
    frames, mats, ranges, mask_ids, _, _ = make_scene()
    engine = TorchAccumulators(GRID, 1, mode=MODE_MEAN, frame_dtype=np.uint8, device="cpu")
    with pytest.raises(InvalidOptionError, match="MODE_MEAN_PLUS"):
        engine.insert_frames(frames, [0], mats[:1], ranges, [0], mode=MODE_MEAN_PLUS)
    with pytest.raises(InvalidOptionError, match="fixed_point.*engine='numba'"):
        engine.insert_frames(frames, [0], mats[:1], ranges, [0], fixed_point=True)


def _bad_insert_cases():
    frames, mats, ranges, _, importance, _ = make_scene()
    ok = dict(frames=frames, frame_ids=[0, 1], matrices=mats[:2], row_ranges=ranges, mask_ids=[0, 1])
    return [
        ("dtype", dict(ok, frames=frames.astype(np.float32)), "frames: expected uint8"),
        ("channels", dict(ok, frames=np.repeat(frames, 2, axis=3)), "frames: expected 1 channel"),
        ("ndim", dict(ok, frames=frames[..., 0]), r"frames: expected \(n_all"),
        ("matrices", dict(ok, matrices=mats[:2, :2]), r"matrices: expected shape \(2, 3, 3\)"),
        ("frame_ids", dict(ok, frame_ids=[0, 6]), "frame_ids: expected values in 0..5"),
        ("frame_ids_float", dict(ok, frame_ids=[0.0, 1.0]), "frame_ids: expected a 1-D integer"),
        ("mask_ids", dict(ok, mask_ids=[0, 2]), "mask_ids: expected values in 0..1"),
        ("mask_ids_len", dict(ok, mask_ids=[0]), "mask_ids: expected 2 entries"),
        ("row_ranges", dict(ok, row_ranges=ranges[:, :-1]), r"row_ranges: expected shape \(n_masks, 30, 4\)"),
        ("mode", dict(ok, mode=MODE_MAX), "mode: these accumulators were made for mean, got max"),
        ("linear", dict(ok, linear=True), "linear: these accumulators were made for linear=False"),
    ]


@pytest.mark.parametrize("case", _bad_insert_cases(), ids=lambda c: c[0])
def test_bad_insert_arguments_name_the_problem(torch, case):
    _, kwargs, message = case
    engine = TorchAccumulators(GRID, 1, mode=MODE_MEAN, frame_dtype=np.uint8, device="cpu")
    args = [kwargs.pop(k) for k in ("frames", "frame_ids", "matrices", "row_ranges", "mask_ids")]
    with pytest.raises(InvalidOptionError, match=message):
        engine.insert_frames(*args, **kwargs)
    acc, weight = engine.to_numpy()
    assert not weight.any()  # nothing went in


def test_importance_mode_needs_a_matching_importance_image(torch):
    frames, mats, ranges, _, importance, _ = make_scene()
    engine = TorchAccumulators(GRID, 1, mode=MODE_IMPORTANCE, frame_dtype=np.uint8, device="cpu")
    with pytest.raises(InvalidOptionError, match="importance: MODE_IMPORTANCE needs"):
        engine.insert_frames(frames, [0], mats[:1], ranges, [0])
    with pytest.raises(InvalidOptionError, match=r"importance: expected shape \(30, 40\)"):
        engine.insert_frames(frames, [0], mats[:1], ranges, [0], importance=importance[:, :-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(0, 3, 4)), "shape: expected"),
        (dict(shape=(3, 4)), "shape: expected"),
        (dict(n_channels=0), "n_channels: expected"),
        (dict(frame_dtype=np.int16), "frame_dtype: expected uint8 or float32, got int16"),
        (dict(mode=7), "mode: expected one of"),
        (dict(chunk_pixels=0), "chunk_pixels: expected a positive integer"),
    ],
)
def test_bad_constructor_arguments_name_the_problem(torch, kwargs, message):
    args = dict(shape=GRID, n_channels=1, mode=MODE_MEAN, frame_dtype=np.uint8, device="cpu") | kwargs
    with pytest.raises(InvalidOptionError, match=message):
        TorchAccumulators(args.pop("shape"), args.pop("n_channels"), **args)


def test_resolve_engine(torch):
    assert resolve_engine("numba") == "numba"
    assert resolve_engine("torch") == "torch"
    assert resolve_engine("auto") == ("torch" if cuda_available() else "numba")
    with pytest.raises(InvalidOptionError, match="engine: expected one of auto, numba, torch, got 'gpu'"):
        resolve_engine("gpu")


def test_self_check_passes_on_the_cpu_device(torch):
    from FreehandUSLib.reconstruction.torch_engine import self_check

    assert self_check("cpu") is None


def test_self_check_catches_wrong_values_and_device_failures(torch, monkeypatch):
    from FreehandUSLib.reconstruction import torch_engine

    honest = TorchAccumulators.to_numpy

    def off_by_one(self):
        acc, weight = honest(self)
        return acc + (acc > 0), weight

    monkeypatch.setattr(TorchAccumulators, "to_numpy", off_by_one)
    assert torch_engine.self_check("cpu") == (
        "nearest mean: values on cpu differ from the numba kernels' on a fixed test scene")
    monkeypatch.setattr(TorchAccumulators, "to_numpy", honest)

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TorchAccumulators, "insert_frames", broken)
    problem = torch_engine.self_check("cpu")
    assert problem.startswith("nearest mean: the torch engine failed on cpu: RuntimeError: CUDA error")


@pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
def test_self_check_on_a_missing_cuda_device_reports_the_failure(torch):
    from FreehandUSLib.reconstruction.torch_engine import self_check

    assert "the torch engine failed on cuda" in self_check("cuda")


def test_auto_uses_a_gpu_only_when_it_passes_the_self_check(torch, monkeypatch, caplog):
    from FreehandUSLib.reconstruction import torch_engine

    monkeypatch.setattr(torch_engine, "cuda_available", lambda: True)
    monkeypatch.setattr(torch_engine, "_cuda_self_check", lambda: None)
    assert torch_engine.resolve_engine("auto") == "torch"
    problem = "linear mean: weights on cuda differ (test 20261122)"
    monkeypatch.setattr(torch_engine, "_cuda_self_check", lambda: problem)
    with caplog.at_level("WARNING", logger=torch_engine.__name__):
        assert torch_engine.resolve_engine("auto") == "numba"
    assert "not using the CUDA GPU" in caplog.text and problem in caplog.text
    assert torch_engine.resolve_engine("torch") == "torch"  # asked for by name: no second guessing


def test_without_torch_the_module_imports_and_says_what_is_missing(monkeypatch):
    import FreehandUSLib.reconstruction as package

    name = "FreehandUSLib.reconstruction.torch_engine"
    monkeypatch.setattr(package, "torch_engine", sys.modules[name])  # restored afterwards
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module(name)
    assert module.cuda_available() is False
    assert module.resolve_engine("auto") == "numba"
    with pytest.raises(ReconstructionError, match="needs PyTorch"):
        module.TorchAccumulators(GRID, 1, device="cpu")
    with pytest.raises(ReconstructionError, match="needs PyTorch"):
        module.resolve_engine("torch")


@pytest.mark.skipif(not cuda_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("linear", [False, True], ids=["nearest", "linear"])
def test_cuda_matches_cpu(torch, linear, mode_name, dtype):
    scene = make_scene(dtype, seed=8)
    mode = MODES[mode_name]
    cpu = run_torch(scene, mode, linear, BATCHES, device="cpu")
    gpu = run_torch(scene, mode, linear, BATCHES, device="cuda", chunk_pixels=None)
    np.testing.assert_array_equal(gpu[2], cpu[2])  # counts
    exact_sums = not linear and (mode != MODE_IMPORTANCE) and (dtype == np.uint8 or mode != MODE_MEAN)
    if mode in (MODE_MAX, MODE_LATEST) or exact_sums:
        np.testing.assert_array_equal(gpu[0], cpu[0])  # values, integer sums: exact on every device
    else:
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-12, atol=1e-12)  # float64 atomics: any order
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-12, atol=1e-12)


# --- the engine option of the reconstructor ------------------------------------------------


@pytest.mark.parametrize("interpolation,compounding", [("nearest", "mean"), ("nearest", "max"), ("nearest", "latest"),
                                                       ("linear", "mean"), ("linear", "max")])
def test_reconstructor_engine_torch_matches_numba(interpolation, compounding):
    from FreehandUSLib.reconstruction import ReconstructionOptions, reconstruct_volume

    seq = random_sweep(n_frames=12, seed=3)
    opts = ReconstructionOptions(output_spacing_mm=0.4, interpolation=interpolation, compounding=compounding)
    ref = reconstruct_volume(seq, None, opts.replace(engine="numba"))
    got = reconstruct_volume(seq, None, opts.replace(engine="torch"))
    assert got.grid.shape == ref.grid.shape and got.frames_used == ref.frames_used
    np.testing.assert_array_equal(got.volume.voxels, ref.volume.voxels)
    np.testing.assert_allclose(got.weight.voxels, ref.weight.voxels, rtol=1e-6, atol=1e-6)


def test_reconstructor_engine_torch_grows_the_grid_and_matches_numba_in_batches():
    from FreehandUSLib.reconstruction import IncrementalReconstructor, ReconstructionOptions

    seq = random_sweep(n_frames=12, seed=5)
    mats = seq.transforms["ImageToReference"].matrices.copy()
    mats[:, 1, 3] += 4.0 * (np.arange(12) // 4)  # each batch of 4 frames 4 mm further along y
    out = {}
    for engine in ("numba", "torch"):
        recon = IncrementalReconstructor(ReconstructionOptions(output_spacing_mm=0.4, engine=engine),
                                         image_shape=(seq.n_rows, seq.n_cols))
        assert recon.engine == engine
        shapes = []
        for a in range(0, 12, 4):  # the grid grows batch by batch
            recon.add_frames(seq.frames[a : a + 4], mats[a : a + 4])
            shapes.append(recon.grid.shape)
        assert len(set(shapes)) > 1
        out[engine] = recon.result()
        recon.close()
    np.testing.assert_array_equal(out["torch"].volume.voxels, out["numba"].volume.voxels)
    assert out["torch"].grid.shape == out["numba"].grid.shape


def test_reconstructor_engine_option_errors_and_plus_emulation():
    from FreehandUSLib.reconstruction import IncrementalReconstructor, ReconstructionOptions
    from FreehandUSLib.reconstruction.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="engine: expected auto, numba or torch"):
        ReconstructionOptions(engine="opencl")
    recon = IncrementalReconstructor(ReconstructionOptions(engine="torch", emulate_plus=True), image_shape=(8, 8))
    assert recon.engine == "numba"  # PLUS's fixed-point arithmetic exists in the numba kernels only
    auto = IncrementalReconstructor(ReconstructionOptions(), image_shape=(8, 8))
    assert auto.engine == ("torch" if cuda_available() else "numba")


@pytest.mark.parametrize("linear", [False, True], ids=["nearest", "linear"])
def test_open_insertion_gives_both_engines_one_interface(torch, linear):
    # the reconstructor talks to either engine through engines.open_insertion: same calls, same
    # buffers back (numba layout), same pixel counts
    from FreehandUSLib.reconstruction import ReconstructionOptions
    from FreehandUSLib.reconstruction.engines import choose_engine, open_insertion

    frames, mats, ranges, mask_ids, importance, threshold = make_scene()
    results = {}
    for engine in ("numba", "torch"):
        acc_t, w_t, _ = kernels.accumulator_types(MODE_MEAN, linear, frames.dtype)
        insertion = open_insertion(engine, np.zeros(GRID + (frames.shape[3],), dtype=acc_t), np.zeros(GRID, dtype=w_t),
                                   mode=MODE_MEAN, linear=linear, frame_dtype=frames.dtype)
        counts = [insertion.insert(frames, ids, mats[ids], ranges, mask_ids[ids], importance=importance,
                                   pixel_rejection_threshold=threshold) for ids in BATCHES]
        results[engine] = (*insertion.finish(), np.concatenate(counts))
    for a, b in zip(results["numba"], results["torch"]):
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-12)
    assert choose_engine(ReconstructionOptions(engine="torch", emulate_plus=True)) == "numba"
    with pytest.raises(ValueError, match="numba engine only"):
        open_insertion("torch", np.zeros(GRID + (1,)), np.zeros(GRID), mode=MODE_MEAN, linear=linear, fixed_point=True)
    with pytest.raises(ValueError, match="unknown insertion engine"):
        open_insertion("opencl", np.zeros(GRID + (1,)), np.zeros(GRID), mode=MODE_MEAN, linear=linear)

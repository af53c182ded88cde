"""Fast inference (issue 5) computes what the reference code computes.

- the numba pair correlation repeats torch's float32 operations (to 1 ulp, also in flat windows
  where the correlation is a ratio of rounding errors);
- ``FastLocalEncoder`` (folded batch norms, channels-last 2D convolutions) matches the module;
- ``predict_poses`` / ``track_sequence`` match a copy of the pre-issue-5 ``predict_poses`` kept
  here, on tiny models and, when present, on the shipped model with held-out and PLUS sweeps;
- the ROI blur of ``resample_frames`` gives the same pixels as blurring the whole image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)
from testdata import REPO_ROOT, plus_file  # noqa: E402

from SensorlessTrackingLib import predict as predict_mod  # noqa: E402
from SensorlessTrackingLib.data import _as_uint8, resample_frames  # noqa: E402
from SensorlessTrackingLib.models import build_model, dualtrack  # noqa: E402
from SensorlessTrackingLib.models.common import normalise_clip, pair_correlation  # noqa: E402
from SensorlessTrackingLib.models.fastcorr import compiled_kernel, pair_correlation_fast  # noqa: E402
from SensorlessTrackingLib.models.inference import FastLocalEncoder, fast_local_encoder  # noqa: E402
from SensorlessTrackingLib.predict import ModelFileError, default_model_path, load_model, predict_poses, track_sequence  # noqa: E402

HELD_OUT = REPO_ROOT / "Testing" / "benchmarks" / "results" / "sensorless_sweeps" / "test_900005.igs.mha"
ULP = 2.5e-7  # a little over one float32 ulp, relative


# --------------------------------------------------------------------------- reference copies
def _old_predict_poses(frames, model, *, batch_size=8):
    """``predict_poses`` as it was before issue 5 (CPU), for comparison."""
    cfg = model.config
    f = np.asarray(frames)
    scale = 255.0 if f.dtype == np.uint8 else 1.0
    n = f.shape[0]
    t = min(cfg.clip_length, n)
    margin = t // 4 if t >= 8 else 0
    stride = max(1, t - 1 - 2 * margin)
    starts = list(range(0, max(n - t, 0) + 1, stride))
    if starts[-1] != n - t:
        starts.append(n - t)
    out = np.zeros((n - 1, 6))
    best = np.full(n - 1, np.inf)
    global_tokens = None
    with torch.no_grad():
        if getattr(cfg, "use_global", False) and cfg.name == "dualtrack":
            g = cfg.global_size
            global_frames = np.stack([cv2.resize(x, (g, g), interpolation=cv2.INTER_AREA) for x in f])
            g_idx = np.linspace(0, n - 1, cfg.max_global_tokens).round().astype(int)
            gf = torch.from_numpy(np.asarray(global_frames)[g_idx].astype(np.float32) / scale)[None]
            gp = torch.from_numpy((g_idx / max(n - 1, 1)).astype(np.float32))[None]
            global_tokens = model.encode_global(gf, gp)
        for b0 in range(0, len(starts), batch_size):
            chunk = starts[b0 : b0 + batch_size]
            x = torch.from_numpy(np.stack([f[s : s + t] for s in chunk]).astype(np.float32) / scale)
            pos = torch.from_numpy(np.stack([np.arange(s, s + t) / max(n - 1, 1) for s in chunk]).astype(np.float32))
            kwargs = {"positions": pos}
            if global_tokens is not None:
                kwargs["global_tokens"] = global_tokens.expand(len(chunk), -1, -1)
            y = model(x, **kwargs).cpu().numpy().astype(np.float64)
            for k, s in enumerate(chunk):
                pairs = np.arange(s, s + t - 1)
                dist = np.abs(pairs - (s + (t - 2) / 2.0))
                take = dist < best[pairs]
                out[pairs[take]] = y[k, take]
                best[pairs[take]] = dist[take]
    return out


def _old_resample(frames, spacing_mm, target_spacing_mm, canvas):
    """``resample_frames`` before issue 5: blur of the whole frame, then warpAffine."""
    f = np.asarray(frames)
    n, rows, cols = f.shape
    fx, fy = target_spacing_mm / spacing_mm[0], target_spacing_mm / spacing_mm[1]
    ch, cw = canvas
    m = np.array([[fx, 0.0, (cols - 1) / 2.0 - fx * (cw - 1) / 2.0], [0.0, fy, (rows - 1) / 2.0 - fy * (ch - 1) / 2.0]])
    blur = (0.45 * math.sqrt(max(fx * fx - 1, 0)), 0.45 * math.sqrt(max(fy * fy - 1, 0)))
    out = np.empty((n, ch, cw), dtype=f.dtype)
    for i in range(n):
        img = f[i]
        if blur[0] > 0.3 or blur[1] > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(blur[0], 0.01), sigmaY=max(blur[1], 0.01))
        out[i] = cv2.warpAffine(img, m, (cw, ch), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


@pytest.fixture
def reference_forward(monkeypatch):
    """Make the model's own forward use the original torch pair correlation."""
    monkeypatch.setattr(dualtrack, "pair_correlation_fast", pair_correlation)


def _randomise_batch_norms(model, seed=0):
    """Non-trivial running statistics, so that folding them into the convolutions is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _tiny_model(**kw):
    torch.manual_seed(0)
    return _randomise_batch_norms(build_model(tiny_model_config(**kw)))


def _clips(seed, shape, flat=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x = x * x  # speckle-like, skewed
    if flat:
        x[..., : shape[-2] // 3, : shape[-1] // 3] = 0.0  # a black region: flat windows
        x[..., -6:, -7:] = 0.25
    return normalise_clip(x)


# --------------------------------------------------------------------------- pair correlation
@pytest.mark.skipif(compiled_kernel() is None, reason="numba not installed")
@pytest.mark.parametrize(
    "shape, radius, window, stride",
    [((2, 5, 32, 48), 2, 8, 4), ((1, 4, 20, 28), 1, 4, 2), ((3, 3, 24, 24), 3, 5, 2), ((1, 16, 96, 96), 2, 8, 4)],
)
def test_pair_correlation_fast_repeats_torch_rounding(shape, radius, window, stride):
    x = _clips(1, shape)
    ref = pair_correlation(x, radius, window, stride)
    new = pair_correlation_fast(x, radius, window, stride)
    assert new.shape == ref.shape and new.dtype == torch.float32
    assert torch.all(new[:, :, -1] == 0)
    # within one float32 ulp everywhere, flat (ill-conditioned) windows included
    assert torch.all((new - ref).abs() <= ULP * ref.abs()), float((new - ref).abs().max())
    # an accurate but differently rounded computation is much further off in the flat windows,
    # so the bound above does check that the float32 operations are repeated
    accurate = pair_correlation(x.double(), radius, window, stride).float()
    assert not torch.all((accurate - ref).abs() <= ULP * ref.abs())


@pytest.mark.skipif(compiled_kernel() is None, reason="numba not installed")
@pytest.mark.parametrize("gap", [2, 3])
def test_pair_correlation_fast_at_a_gap(gap):
    x = _clips(5, (2, 6, 32, 48))
    ref = pair_correlation(x, 2, 8, 4, gap)
    new = pair_correlation_fast(x, 2, 8, 4, gap)
    assert new.shape == ref.shape
    assert torch.all(new[:, :, -gap:] == 0)
    assert torch.all((new - ref).abs() <= ULP * ref.abs()), float((new - ref).abs().max())
    short = pair_correlation_fast(x[:, :gap], 2, 8, 4, gap)  # no frame pair that far apart
    assert torch.equal(short, pair_correlation(x[:, :gap], 2, 8, 4, gap))


def test_pair_correlation_fast_falls_back_to_torch():
    x = _clips(2, (1, 3, 16, 16)).double()
    assert torch.equal(pair_correlation_fast(x, 1, 4, 2), pair_correlation(x, 1, 4, 2))
    y = _clips(3, (1, 3, 16, 16)).requires_grad_(True)
    assert torch.equal(pair_correlation_fast(y, 1, 4, 2), pair_correlation(y, 1, 4, 2))


# --------------------------------------------------------------------------- local encoder
@pytest.mark.parametrize("pair_radius, pair_gaps", [(0, (1,)), (1, (1,)), (1, (1, 2, 3))])
def test_fast_local_encoder_matches_module(pair_radius, pair_gaps):
    model = _tiny_model(pair_radius=pair_radius, pair_gaps=pair_gaps, image_size=(48, 32), clip_length=6)
    x = _clips(4, (3, 6, 48, 32))
    with torch.no_grad():
        ref = model.local(x)
    fast = fast_local_encoder(model)
    assert isinstance(fast, FastLocalEncoder)
    new = fast(x)
    assert new.shape == ref.shape
    assert float((new - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_fast_local_encoder_only_for_dualtrack():
    assert fast_local_encoder(_tiny_model(name="pairwise")) is None
    assert fast_local_encoder(_tiny_model(name="moglo")) is None


def test_fast_local_encoder_rejects_other_layouts():
    model = _tiny_model()
    model.local.first.temporal = torch.nn.Conv3d(8, 8, (5, 1, 1), 1, (2, 0, 0), bias=False)
    with pytest.raises(ValueError, match=r"\(3, 1, 1\)"):
        FastLocalEncoder(model.local)
    assert fast_local_encoder(model) is None  # predict_poses then uses the module


# --------------------------------------------------------------------------- predict_poses
@pytest.mark.parametrize("use_global, n_frames", [(True, 17), (False, 17), (True, 3)])
def test_predict_poses_matches_reference(reference_forward, use_global, n_frames):
    model = _tiny_model(use_global=use_global, clip_length=8)
    frames = _as_uint8(tiny_sweep(seed=1, n_frames=n_frames).sequence.frames)[:, 16:48, 16:48].copy()
    ref = _old_predict_poses(frames, model, batch_size=2)
    new = predict_poses(frames, model, batch_size=2)
    module = predict_poses(frames, model, batch_size=2, fast=False)
    assert new.shape == (n_frames - 1, 6)
    assert np.abs(module - ref).max() <= 1e-6
    assert np.abs(new - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["pairwise", "moglo"])
def test_predict_poses_other_models_unchanged(reference_forward, name):
    model = _tiny_model(name=name)
    frames = _as_uint8(tiny_sweep(seed=2, n_frames=9).sequence.frames)[:, 16:48, 16:48].copy()
    assert np.array_equal(predict_poses(frames, model), _old_predict_poses(frames, model))


def test_predict_poses_wrong_size_names_sizes():
    model = _tiny_model()
    with pytest.raises(ModelFileError, match="32x32.*40x32"):
        predict_poses(np.zeros((5, 40, 32), np.uint8), model)


# --------------------------------------------------------------------------- shipped model
def _shipped():
    if not default_model_path().is_file():
        pytest.skip(f"shipped model not found: {default_model_path()}")
    return load_model(default_model_path())


def _check_track(sequence, model, monkeypatch):
    spacing, _, _ = predict_mod.input_spacing(sequence)
    cfg = model.config
    frames = resample_frames(_as_uint8(sequence.frames), spacing, cfg.pixel_spacing_mm, cfg.image_size)
    with monkeypatch.context() as m:
        m.setattr(dualtrack, "pair_correlation_fast", pair_correlation)
        ref = _old_predict_poses(frames, model)
    res = track_sequence(sequence, model)
    assert res.frame_to_frame.shape == (sequence.n_frames - 1, 6)
    assert np.abs(res.frame_to_frame - ref).max() <= 1e-4
    return res


def test_shipped_model_on_held_out_sweep(monkeypatch):
    if not HELD_OUT.is_file():
        pytest.skip(f"held-out sweep not cached: {HELD_OUT} (run Testing/benchmarks/bench_sensorless.py)")
    from FreehandUSLib.io import read_sequence

    seq = read_sequence(HELD_OUT).select(np.arange(60))
    _check_track(seq, _shipped(), monkeypatch)


@pytest.mark.realdata
def test_shipped_model_on_plus_spine_phantom(monkeypatch):
    from FreehandUSLib.io import read_plus_config, read_sequence

    seq = read_sequence(plus_file("TestImages/SpinePhantomFreehand.igs.mha"))
    cfg = read_plus_config(plus_file("ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml"))
    seq.set_transform("ImageToProbe", np.broadcast_to(cfg.require_transform("ImageToProbe"), (seq.n_frames, 4, 4)).copy())
    # dark acoustic shadows: flat windows whose correlation is rounding noise (see fastcorr)
    res = _check_track(seq, _shipped(), monkeypatch)
    assert res.frames_per_second > 0


# --------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("seed", range(6))
def test_resample_frames_roi_blur_is_exact(seed):
    rng = np.random.default_rng(seed)
    rows, cols = (int(v) for v in rng.integers(20, 260, 2))
    frames = rng.integers(0, 256, (2, rows, cols), dtype=np.uint8)
    spacing = tuple(float(v) for v in rng.uniform(0.05, 0.5, 2))
    target = float(rng.uniform(0.1, 1.0))
    canvas = tuple(int(v) for v in rng.integers(8, 128, 2))
    assert np.array_equal(resample_frames(frames, spacing, target, canvas), _old_resample(frames, spacing, target, canvas))


def test_resample_frames_canvas_outside_image():
    frames = np.full((1, 30, 40), 200, np.uint8)
    # 10x coarser target: the canvas is mostly outside the image, which is blurred
    out = resample_frames(frames, (0.1, 0.1), 1.0, (64, 64))
    assert np.array_equal(out, _old_resample(frames, (0.1, 0.1), 1.0, (64, 64)))
    assert out[0, 0, 0] == 0 and out[0, 32, 32] > 0

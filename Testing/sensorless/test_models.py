"""Tracking models: output shapes, the local-only ablation, losses, and that training reduces the loss."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import tiny_model_config  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)

from SensorlessTrackingLib.losses import (  # noqa: E402
    LossConfig,
    compose_relative,
    corner_points_mm,
    params_to_matrix,
    point_distance,
    tracking_loss,
)
from SensorlessTrackingLib.models import MODEL_NAMES, ModelConfig, build_model  # noqa: E402
from SensorlessTrackingLib.pose import params_to_matrices  # noqa: E402


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = cfg.clip_length
    return {
        "frames": torch.rand(b, t, *cfg.image_size, generator=g),
        "positions": torch.linspace(0, 1, t).expand(b, t).contiguous(),
        "global_frames": torch.rand(b, cfg.max_global_tokens, cfg.global_size, cfg.global_size, generator=g),
        "global_positions": torch.linspace(0, 1, cfg.max_global_tokens).expand(b, -1).contiguous(),
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_output_shape(name):
    torch.manual_seed(0)
    cfg = tiny_model_config(name)
    model = build_model(cfg).eval()
    batch = _batch(cfg, b=3)
    y = model(**batch)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (3, cfg.clip_length - 1, 6)
    assert torch.isfinite(y).all()
    # longer clips at inference (windows of another length) work too
    batch["frames"] = torch.rand(1, 7, *cfg.image_size)
    batch["positions"] = torch.linspace(0, 1, 7)[None]
    batch["global_frames"] = batch["global_frames"][:1]
    batch["global_positions"] = batch["global_positions"][:1]
    assert model(**batch).shape == (1, 6, 6)


def test_dualtrack_global_context_changes_the_output_and_ablation_ignores_it():
    torch.manual_seed(0)
    cfg = tiny_model_config("dualtrack")
    model = build_model(cfg).eval()
    batch = _batch(cfg)
    y1 = model(**batch)
    batch2 = dict(batch, global_frames=torch.rand_like(batch["global_frames"]))
    assert not torch.allclose(y1, model(**batch2))
    local = build_model(tiny_model_config("dualtrack", use_global=False)).eval()
    assert not hasattr(local, "global_encoder")
    assert torch.allclose(local(**batch), local(**batch2))
    n_full = sum(p.numel() for p in model.parameters())
    n_local = sum(p.numel() for p in local.parameters())
    assert n_local < n_full
    with pytest.raises(ValueError, match="global_frames"):
        model(batch["frames"])


def test_dualtrack_global_drop_path_in_training_only():
    """Each training clip is decoded either without the global fusion or with it scaled by
    1 / (1 - p); inference always fuses, unscaled."""
    torch.manual_seed(0)
    cfg = tiny_model_config("dualtrack", global_drop=0.5)
    model = build_model(cfg)
    batch = _batch(cfg, b=32)
    with torch.no_grad():
        tokens = model.local(batch["frames"])
        glob = model.encode_global(batch["global_frames"], batch["global_positions"])

        def decoded(scale):
            model.train()
            model._keep_mask = lambda fused: torch.full((fused.shape[0], 1, 1), scale)
            y = model.decode(tokens, batch["positions"], glob)
            del model._keep_mask
            return y

        dropped, doubled = decoded(0.0), decoded(2.0)
        model.eval()
        plain = model.decode(tokens, batch["positions"], glob)
        model.train()
        trained = model.decode(tokens, batch["positions"], glob)
    is_dropped = torch.isclose(trained, dropped, atol=1e-6).flatten(1).all(1)
    is_doubled = torch.isclose(trained, doubled, atol=1e-6).flatten(1).all(1)
    assert torch.all(is_dropped ^ is_doubled)
    assert 4 <= int(is_dropped.sum()) <= 28  # about half of 32 (binomial, p = 0.5)
    assert not torch.allclose(plain, dropped) and not torch.allclose(plain, doubled)
    # eval mode ignores global_drop entirely: the same output as a model without it
    model.eval()
    same = build_model(tiny_model_config("dualtrack"))
    same.load_state_dict(model.state_dict())
    same.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch), same(**batch))
    mask = model._keep_mask(torch.zeros(20000, 1, 1))
    assert set(mask.unique().tolist()) == {0.0, 2.0} and abs(float(mask.mean()) - 1.0) < 0.05


def test_models_are_blind_to_gain_and_offset():
    torch.manual_seed(0)
    for name in MODEL_NAMES:
        model = build_model(tiny_model_config(name)).eval()
        batch = _batch(tiny_model_config(name))
        y = model(**batch)
        brighter = dict(batch, frames=batch["frames"] * 1.3 + 0.1, global_frames=batch["global_frames"] * 1.3 + 0.1)
        assert torch.allclose(y, model(**brighter), atol=1e-4), name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_falls_in_a_few_steps(name):
    torch.manual_seed(0)
    cfg = tiny_model_config(name)
    model = build_model(cfg)
    batch = _batch(cfg, b=4, seed=1)
    target = torch.randn(4, cfg.clip_length - 1, 6) * torch.tensor(cfg.target_scale)
    scale = torch.tensor(cfg.target_scale)
    pts = corner_points_mm(cfg.image_size, cfg.pixel_spacing_mm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = tracking_loss(model(**batch), target, scale, pts, LossConfig(motion_weighted=name == "moglo"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_torch_pose_maths_matches_numpy():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(3, 5, 6)) * [1, 1, 1, 10, 10, 10]
    m = params_to_matrix(torch.tensor(p, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(m, params_to_matrices(p), atol=1e-10)
    rel = compose_relative(torch.tensor(m)).numpy()
    np.testing.assert_allclose(rel[:, 1], m[:, 0] @ m[:, 1], atol=1e-10)
    pts = corner_points_mm((11, 21), 0.5)
    assert pts.shape == (4, 5)
    assert float(pts[0, 1]) == pytest.approx(5.0) and float(pts[1, 2]) == pytest.approx(2.5)
    a = torch.eye(4).expand(2, 4, 4)
    b = a.clone()
    b[:, 0, 3] = 2.0
    assert float(point_distance(a, b, pts)) == pytest.approx(2.0)


def test_motion_weighted_loss_emphasises_large_motion():
    scale = torch.ones(6)
    pts = corner_points_mm((16, 16), 0.5)
    target = torch.zeros(1, 2, 6)
    target[0, 1, 2] = 3.0  # second pair moves, first does not
    pred = target.clone()
    pred[..., 0] += 0.5  # same error on both pairs
    plain, _ = tracking_loss(pred, target, scale, pts, LossConfig(point_weight=0, accumulated_weight=0))
    weighted, _ = tracking_loss(
        pred, target, scale, pts, LossConfig(point_weight=0, accumulated_weight=0, motion_weighted=True)
    )
    assert math.isclose(float(plain), float(weighted), rel_tol=1e-5)  # equal errors: same mean
    pred2 = target.clone()
    pred2[0, 1, 0] += 1.0  # error only on the moving pair
    w2, _ = tracking_loss(pred2, target, scale, pts, LossConfig(point_weight=0, accumulated_weight=0, motion_weighted=True))
    p2, _ = tracking_loss(pred2, target, scale, pts, LossConfig(point_weight=0, accumulated_weight=0))
    assert float(w2) > float(p2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet"}, "name"),
        ({"image_size": (30, 32)}, "image_size"),
        ({"clip_length": 1}, "clip_length"),
        ({"target_scale": (1, 1, 1)}, "target_scale"),
        ({"token_dim": 30, "heads": 4}, "divisible"),
        ({"pair_gaps": ()}, "pair_gaps"),
        ({"pair_gaps": (0, 1)}, "pair_gaps"),
        ({"pair_gaps": (1, 1)}, "pair_gaps"),
        ({"pair_gaps": (1, 4), "clip_length": 4}, "pair_gaps"),
        ({"global_drop": 1.0}, "global_drop"),
        ({"global_drop": -0.1}, "global_drop"),
        ({"max_global_tokens": 0}, "max_global_tokens"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_local_part_ignores_only_the_global_encoder():
    """A global model and its local-only ablation share the local part; a local change does not."""
    local = ModelConfig(use_global=False, pair_gaps=(1,))
    wide_global = ModelConfig(use_global=True, pair_gaps=(1,), max_global_tokens=64, global_size=32, global_layers=1,
                              heads=2, global_drop=0.5)
    assert wide_global.local_part() == local.local_part()
    for change in ({"pair_gaps": (1, 2)}, {"image_size": (128, 96)}, {"token_dim": 64}, {"name": "moglo"}):
        assert ModelConfig(use_global=True, **{"pair_gaps": (1,), **change}).local_part() != local.local_part(), change


def test_model_config_round_trip():
    cfg = tiny_model_config("moglo")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    gaps = tiny_model_config("dualtrack", pair_gaps=[1, 3])
    assert gaps.pair_gaps == (1, 3) and ModelConfig.from_dict(gaps.to_dict()) == gaps
    old = {k: v for k, v in cfg.to_dict().items() if k != "pair_gaps"}  # a checkpoint from before pair_gaps
    assert ModelConfig.from_dict(old).pair_gaps == (1,)
    no_drop = {k: v for k, v in cfg.to_dict().items() if k != "global_drop"}  # from before global_drop
    assert ModelConfig.from_dict(no_drop).global_drop == 0.0
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})


def test_pair_correlation_features():
    from SensorlessTrackingLib.models.common import pair_correlation

    torch.manual_seed(0)
    a = torch.randn(1, 1, 32, 32)
    shifted = torch.roll(a, shifts=(0, 1), dims=(2, 3))  # the content moves one pixel right
    frames = torch.cat([a, shifted, torch.randn(1, 1, 32, 32)], dim=1)
    corr = pair_correlation(frames, radius=1, window=8, stride=4)
    assert corr.shape == (1, 9, 3, 8, 8)
    inner = corr[0, :, 0, 1:-1, 1:-1].mean(dim=(1, 2))
    assert int(torch.argmax(inner)) == 5  # displacement (dy, dx) = (0, +1): index 1 * 3 + 2
    assert float(inner[5]) > 0.99
    assert float(corr[0, :, 1, 1:-1, 1:-1].abs().mean()) < 0.3  # unrelated frames
    assert float(corr[0, :, 2].abs().max()) == 0.0  # the last frame has no successor
    model = build_model(tiny_model_config("dualtrack", pair_radius=1)).eval()
    batch = _batch(tiny_model_config("dualtrack"))
    assert model(**batch).shape == (2, 3, 6)


def test_pair_correlation_at_a_gap():
    from SensorlessTrackingLib.models.common import pair_correlation

    torch.manual_seed(1)
    a = torch.randn(1, 1, 32, 32)
    later = torch.roll(a, shifts=(1, 0), dims=(2, 3))  # frame 2 = frame 0 moved one pixel down
    frames = torch.cat([a, torch.randn(1, 1, 32, 32), later, torch.randn(1, 1, 32, 32)], dim=1)
    corr = pair_correlation(frames, radius=1, window=8, stride=4, gap=2)
    assert corr.shape == (1, 9, 4, 8, 8)
    inner = corr[0, :, 0, 1:-1, 1:-1].mean(dim=(1, 2))
    assert int(torch.argmax(inner)) == 7 and float(inner[7]) > 0.99  # (dy, dx) = (+1, 0): index 2 * 3 + 1
    assert float(corr[0, :, 1, 1:-1, 1:-1].abs().mean()) < 0.3  # frames 1 and 3 are unrelated
    assert float(corr[0, :, 2:].abs().max()) == 0.0  # the last two frames have no frame 2 later
    # gap 1 is the default; a clip no longer than the gap gives zeros of the usual shape
    assert torch.equal(pair_correlation(frames, 1, 8, 4, gap=1), pair_correlation(frames, 1, 8, 4))
    short = pair_correlation(frames[:, :2], 1, 8, 4, gap=2)
    assert short.shape == (1, 9, 2, 8, 8) and float(short.abs().max()) == 0.0
    with pytest.raises(ValueError, match="gap"):
        pair_correlation(frames, 1, 8, 4, gap=0)


def test_dualtrack_with_several_gaps_sees_them():
    torch.manual_seed(2)
    cfg = tiny_model_config("dualtrack", pair_radius=1, pair_gaps=(1, 2))
    model = build_model(cfg).eval()
    n_pair = 9
    assert model.local.blocks[0].spatial.in_channels == cfg.channels[1] + 2 * n_pair
    batch = _batch(cfg)
    out = model(**batch)
    assert out.shape == (2, 3, 6) and torch.isfinite(out).all()
    # the gap-2 channels reach the output: zeroing their weights changes the prediction
    with torch.no_grad():
        model.local.blocks[0].spatial.weight[:, -n_pair:] = 0
        model.local.blocks[0].short[0].weight[:, -n_pair:] = 0
    assert not torch.allclose(model(**batch), out)

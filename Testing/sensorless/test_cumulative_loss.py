"""The cumulative (running-sum) loss, per-component loss weights and longer training clips."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import run_cli, tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)

from FreehandUSLib.io import write_sequence  # noqa: E402
from SensorlessTrackingLib.data import AugmentConfig, ClipDataset, prepare_sweep  # noqa: E402
from SensorlessTrackingLib.losses import (  # noqa: E402
    LossConfig,
    compose_relative,
    corner_points_mm,
    cumulative_error,
    params_to_matrix,
    point_distance,
    tracking_loss,
)
from SensorlessTrackingLib.train import TrainConfig, train  # noqa: E402

SCALE = torch.tensor([0.1, 0.1, 0.4, 0.3, 0.3, 0.3])
POINTS = corner_points_mm((32, 32), 0.4)


def _batch(seed=0, b=3, pairs=15):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, pairs, 6, generator=g) * SCALE
    pred = target + 0.3 * torch.randn(b, pairs, 6, generator=g) * SCALE
    return pred, target


def test_default_loss_is_the_shipped_recipe():
    """Defaults (cumulative off, unit component weights) give exactly the loss the shipped model
    was trained with: mean smooth-L1 + 0.5 point distance + 0.25 accumulated / pairs."""
    pred, target = _batch()
    loss, parts = tracking_loss(pred, target, SCALE, POINTS, LossConfig())
    param = torch.nn.functional.smooth_l1_loss(pred / SCALE, target / SCALE, beta=0.5)
    mp, mt = params_to_matrix(pred), params_to_matrix(target)
    expected = param + 0.5 * point_distance(mp, mt, POINTS)
    expected = expected + 0.25 * point_distance(compose_relative(mp), compose_relative(mt), POINTS) / pred.shape[1]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert "cumulative" not in parts
    assert LossConfig().to_dict()["component_weights"] == [1.0] * 6


def test_cumulative_error_grows_for_persistent_errors_only():
    b, pairs = 2, 16
    target = torch.zeros(b, pairs, 6)
    bias = torch.zeros(b, pairs, 6)
    bias[..., 4] = 0.03  # the same 0.03 deg every frame on ry (scale 0.3: 0.1 scaled)
    cum = cumulative_error(bias, target, SCALE)
    k = torch.arange(1, pairs + 1, dtype=torch.float32)
    np.testing.assert_allclose(cum[0, :, 4].numpy(), (0.1 * k.sqrt()).numpy(), rtol=1e-5)
    assert float(cum[..., :4].abs().max()) == 0.0
    # alternating errors of the same size cancel in the sums
    alt = torch.zeros(b, pairs, 6)
    alt[..., 4] = 0.03 * (-1.0) ** torch.arange(pairs)
    assert float(cumulative_error(alt, target, SCALE)[..., 4].abs().max()) <= 0.1 + 1e-6


def test_cumulative_loss_penalises_shrinkage_more_than_noise():
    """Shrinking a persistent rotation and adding frame-to-frame noise of the same size cost the
    same per frame; only the cumulative term tells them apart (it is what makes drift)."""
    pairs = 30
    target = torch.zeros(4, pairs, 6)
    target[..., 3] = 0.2  # a steady 0.2 deg/frame tilt
    shrunk = target.clone()
    shrunk[..., 3] = 0.1
    noisy = target.clone()
    noisy[..., 3] = 0.2 + 0.1 * (-1.0) ** torch.arange(pairs)
    plain = LossConfig(point_weight=0, accumulated_weight=0)
    cum = LossConfig(point_weight=0, accumulated_weight=0, cumulative_weight=1.0)
    assert float(tracking_loss(shrunk, target, SCALE, POINTS, plain)[0]) == pytest.approx(
        float(tracking_loss(noisy, target, SCALE, POINTS, plain)[0]), rel=1e-6)
    l_shrunk, parts = tracking_loss(shrunk, target, SCALE, POINTS, cum)
    l_noisy, _ = tracking_loss(noisy, target, SCALE, POINTS, cum)
    assert float(l_shrunk) > 3.0 * float(l_noisy)
    assert parts["cumulative"] > 0


def test_component_weights_select_and_keep_gradients():
    pred, target = _batch(1)
    only_tx = target.clone()
    only_tx[..., 0] += 0.5  # an error on tx alone
    rot_only = LossConfig(point_weight=0, accumulated_weight=0, cumulative_weight=1.0, component_weights=(0, 0, 0, 1, 1, 1))
    loss, _ = tracking_loss(only_tx, target, SCALE, POINTS, rot_only)
    assert float(loss) == 0.0
    # doubling rx's weight (normalised to mean 1) raises the loss of an rx error
    only_rx = target.clone()
    only_rx[..., 3] += 0.05
    base = LossConfig(point_weight=0, accumulated_weight=0)
    heavy = LossConfig(point_weight=0, accumulated_weight=0, component_weights=(1, 1, 1, 2, 1, 1))
    assert float(tracking_loss(only_rx, target, SCALE, POINTS, heavy)[0]) > float(tracking_loss(only_rx, target, SCALE, POINTS, base)[0])
    p = pred.clone().requires_grad_(True)
    tracking_loss(p, target, SCALE, POINTS, LossConfig(cumulative_weight=1.0, component_weights=(1, 1, 2, 2, 2, 1)))[0].backward()
    assert torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"cumulative_weight": -1.0}, "cumulative_weight"),
        ({"cumulative_weight": float("nan")}, "cumulative_weight"),
        ({"component_weights": (1, 1, 1, 1, 1)}, "component_weights"),
        ({"component_weights": (1, 1, 1, 1, 1, -1)}, "component_weights"),
        ({"component_weights": (0, 0, 0, 0, 0, 0)}, "component_weights"),
    ],
)
def test_loss_config_rejects_bad_values(kw, name):
    with pytest.raises(ValueError, match=name):
        LossConfig(**kw)


@pytest.fixture(scope="module")
def prepared():
    cfg = tiny_model_config()
    out = []
    for i in range(3):
        s = tiny_sweep(seed=40 + i, n_frames=14, length_mm=3.0).sequence
        out.append(prepare_sweep(s.frames, s.transforms["ImageToReference"].matrices, model_spacing_mm=cfg.pixel_spacing_mm,
                                 image_size=cfg.image_size, global_size=cfg.global_size, margin_px=2, name=f"s{i}", group=f"g{i}"))
    return out


def test_clip_dataset_takes_a_longer_training_clip(prepared):
    cfg = tiny_model_config()  # clip_length 4
    ds = ClipDataset(prepared, cfg, clips_per_epoch=3, augment=AugmentConfig(crop_jitter_px=2), clip_length=10)
    item = ds[0]
    assert item["frames"].shape == (10, 32, 32) and item["targets"].shape == (9, 6)
    assert ClipDataset(prepared, cfg, clips_per_epoch=1)[0]["frames"].shape[0] == 4
    with pytest.raises(ValueError, match="clip_length"):
        ClipDataset(prepared, cfg, clip_length=1)
    with pytest.raises(ValueError, match="clip_length"):
        TrainConfig(model=cfg, clip_length=1)


def test_training_with_long_clips_and_cumulative_loss(prepared, tmp_path):
    cfg = TrainConfig(model=tiny_model_config(), epochs=1, clips_per_epoch=4, batch_size=2, val_fraction=0.34, val_clips=2,
                      augment=AugmentConfig(crop_jitter_px=2), device="cpu", clip_length=8,
                      loss=LossConfig(cumulative_weight=1.0, component_weights=(1, 1, 1, 2, 2, 1)))
    path = train(cfg, tmp_path / "m", sweeps=prepared, progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_config"]["clip_length"] == 4  # the model (inference windows) is unchanged
    assert ckpt["train_config"]["clip_length"] == 8
    assert ckpt["train_config"]["loss"]["cumulative_weight"] == 1.0
    assert ckpt["train_config"]["loss"]["component_weights"] == [1.0, 1.0, 1.0, 2.0, 2.0, 1.0]
    assert all(np.isfinite(h["val_loss"]) and np.isfinite(h["train_loss"]) for h in ckpt["history"])


def test_cli_loss_options(tmp_path, capsys):
    paths = []
    for s in range(3):
        sub = tmp_path / f"subject{s}"
        sub.mkdir()
        paths.append(str(write_sequence(tiny_sweep(seed=60 + s, n_frames=10, length_mm=2.5).sequence, sub / "sweep.igs.mha")))
    common = ["--model", "pairwise", "--image-size", "32", "32", "--clip-length", "4", "--spacing-mm", "0.4", "--epochs", "1",
              "--clips-per-epoch", "2", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1", "--json"]
    argv = ["track", "train", *paths, "--out", str(tmp_path / "m"), *common, "--train-clip-length", "6",
            "--cumulative-weight", "0.5", "--component-weights", "1", "1", "1", "2", "2", "1"]
    assert run_cli(argv) == 0
    info = json.loads(capsys.readouterr().out)
    tc = torch.load(info["checkpoint"], weights_only=True)["train_config"]
    assert tc["clip_length"] == 6 and tc["loss"]["cumulative_weight"] == 0.5 and tc["loss"]["component_weights"][3] == 2.0
    for flag, bad in (("--cumulative-weight", "-1"), ("--train-clip-length", "1")):  # refused by argparse
        with pytest.raises(SystemExit) as exc:
            run_cli(["track", "train", *paths, "--out", str(tmp_path / "b1"), *common, flag, bad])
        assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert run_cli(["track", "train", *paths, "--out", str(tmp_path / "b3"), *common,
                 "--component-weights", "0", "0", "0", "0", "0", "0"]) == 2
    assert "component_weights" in capsys.readouterr().err

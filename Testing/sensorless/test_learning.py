"""Data preparation, augmentations, training (checkpoints, resume, NaN), inference (torch, tiny CPU configs)."""

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import random_rigid, tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)

from FreehandUSLib.errors import SequenceError, TransformError  # noqa: E402
from FreehandUSLib.sequence import TrackedSequence  # noqa: E402
from SensorlessTrackingLib.data import (  # noqa: E402
    NO_AUGMENT,
    AugmentConfig,
    ClipDataset,
    clip_targets,
    image_to_reference_of,
    prepare_sweep,
    split_by_group,
)
from SensorlessTrackingLib.losses import LossConfig  # noqa: E402
from SensorlessTrackingLib.predict import ModelFileError, load_model, predict_poses, track_sequence  # noqa: E402
from SensorlessTrackingLib.train import CHECKPOINT_VERSION, TrainConfig, TrainingError, train  # noqa: E402


@pytest.fixture(scope="module")
def sweeps():
    """Three tiny simulated sweeps (native sequences)."""
    return [tiny_sweep(seed=s, n_frames=12, length_mm=3.0).sequence for s in range(3)]


def _prepared(seqs, cfg, margin=2):
    return [
        prepare_sweep(
            s.frames,
            s.transforms["ImageToReference"].matrices,
            model_spacing_mm=cfg.pixel_spacing_mm,
            image_size=cfg.image_size,
            global_size=cfg.global_size,
            margin_px=margin,
            name=f"s{i}",
            group=f"g{i}",
        )
        for i, s in enumerate(seqs)
    ]


def test_prepare_sweep_resamples_and_keeps_geometry():
    rows, cols, spacing = 50, 70, (0.2, 0.3)
    frames = np.zeros((2, rows, cols), np.uint8)
    frames[:, 30:33, 40:43] = 255  # a bright blob centred on pixel (41, 31)
    pose = random_rigid(np.random.default_rng(0), 2, t_scale=10.0)
    itr = pose @ np.diag([spacing[0], spacing[1], 1.0, 1.0])
    sw = prepare_sweep(frames, itr, model_spacing_mm=0.4, image_size=(32, 48), global_size=16, margin_px=4)
    assert sw.frames.shape == (2, 40, 56) and sw.global_frames.shape == (2, 16, 16)
    assert sw.source_spacing_mm == pytest.approx(spacing)
    v, u = np.unravel_index(np.argmax(sw.frames[0].astype(float)), sw.frames.shape[1:])
    centre = ((56 - 1) / 2, (40 - 1) / 2)
    p_model = sw.poses[0] @ [(u - centre[0]) * 0.4, (v - centre[1]) * 0.4, 0, 1]
    p_true = itr[0] @ [41, 31, 0, 1]
    assert np.linalg.norm(p_model[:3] - p_true[:3]) < 0.5  # within about one model pixel


def test_prepare_sweep_drops_invalid_and_rejects_too_few():
    frames = np.zeros((3, 20, 20), np.uint8)
    itr = np.tile(np.diag([0.2, 0.2, 1.0, 1.0]), (3, 1, 1))
    sw = prepare_sweep(frames, itr, np.array([True, False, True]), model_spacing_mm=0.2, image_size=(16, 16))
    assert sw.n_frames == 2
    with pytest.raises(SequenceError, match="at least 2 frames"):
        prepare_sweep(frames, itr, np.array([True, False, False]), model_spacing_mm=0.2, image_size=(16, 16))
    with pytest.raises(SequenceError, match="one channel"):
        prepare_sweep(np.zeros((3, 20, 20, 3), np.uint8), itr, model_spacing_mm=0.2, image_size=(16, 16))


def test_image_to_reference_from_probe_chain():
    rng = np.random.default_rng(1)
    n = 4
    probe_to_tracker = random_rigid(rng, n, t_scale=50.0)
    ref_to_tracker = random_rigid(rng, n, t_scale=50.0)
    itp = np.diag([0.3, 0.3, 1.0, 1.0])
    seq = TrackedSequence(
        frames=np.zeros((n, 8, 8), np.uint8),
        transforms={"ProbeToTracker": (probe_to_tracker, np.ones(n, bool)), "ReferenceToTracker": (ref_to_tracker, np.ones(n, bool))},
    )
    mats, valid = image_to_reference_of(seq, image_to_probe=itp)
    assert valid.all()
    np.testing.assert_allclose(mats, np.linalg.inv(ref_to_tracker) @ probe_to_tracker @ itp, atol=1e-9)
    with pytest.raises(TransformError, match="ImageToProbe"):
        image_to_reference_of(seq)


def test_split_by_group_never_shares_a_subject():
    items = [type("S", (), {"group": g})() for g in "aabbccddee"]
    train_items, val_items = split_by_group(items, 0.2, seed=3)
    assert len(train_items) + len(val_items) == 10 and val_items
    assert not ({x.group for x in train_items} & {x.group for x in val_items})


def test_clip_dataset_targets_and_augmentations(sweeps):
    cfg = tiny_model_config()
    prepared = _prepared(sweeps, cfg)
    plain = ClipDataset(prepared, cfg, clips_per_epoch=4, augment=NO_AUGMENT, seed=0)
    item = plain[0]
    assert item["frames"].shape == (cfg.clip_length, 32, 32)
    assert item["targets"].shape == (cfg.clip_length - 1, 6)
    assert item["global_frames"].shape == (cfg.max_global_tokens, 16, 16)
    assert float(item["frames"].max()) <= 1.0
    # deterministic per (seed, epoch, index)
    assert torch.equal(plain[1]["frames"], plain[1]["frames"])
    plain.set_epoch(1)
    assert not torch.equal(plain[0]["frames"], item["frames"])
    # reversed: inverse motions in reverse order, mirrored across the image plane (the elevational
    # direction is kept); flipped: mirrored signs
    rev = ClipDataset(prepared, cfg, clips_per_epoch=1, augment=AugmentConfig(reverse=1.0, flip=0.0, drop=0.0, crop_jitter_px=0, gain=0, offset=0), seed=0)[0]
    fwd = ClipDataset(prepared, cfg, clips_per_epoch=1, augment=NO_AUGMENT, seed=0)[0]
    np.testing.assert_allclose(rev["frames"].numpy(), fwd["frames"].numpy()[::-1])
    from SensorlessTrackingLib.pose import matrices_to_params, params_to_matrices

    mz = np.diag([1.0, 1.0, -1.0, 1.0])
    inv = matrices_to_params(mz @ np.linalg.inv(params_to_matrices(fwd["targets"].numpy().astype(float))) @ mz)[::-1]
    np.testing.assert_allclose(rev["targets"].numpy(), inv, atol=1e-4)
    assert np.all(np.sign(rev["targets"][:, 2].numpy()) == np.sign(fwd["targets"][:, 2].numpy()))
    flip = ClipDataset(prepared, cfg, clips_per_epoch=1, augment=AugmentConfig(reverse=0.0, flip=1.0, drop=0.0, crop_jitter_px=0, gain=0, offset=0), seed=0)[0]
    np.testing.assert_allclose(flip["frames"].numpy(), fwd["frames"].numpy()[:, :, ::-1])
    np.testing.assert_allclose(flip["targets"].numpy(), fwd["targets"].numpy() * [-1, 1, 1, 1, -1, -1], atol=1e-5)


def test_clip_dataset_frame_dropping_and_crop_jitter_keep_labels_consistent(sweeps):
    cfg = tiny_model_config()
    prepared = _prepared(sweeps, cfg, margin=3)
    aug = AugmentConfig(reverse=0, flip=0, drop=1.0, max_step=2, crop_jitter_px=3, gain=0, offset=0)
    ds = ClipDataset(prepared, cfg, clips_per_epoch=8, augment=aug, seed=5)
    for k in range(8):
        item = ds[k]
        # with dropped frames the motion per step is larger on average than without
        assert item["targets"].shape == (cfg.clip_length - 1, 6)
        assert np.all(np.isfinite(item["targets"].numpy()))
    # crop jitter is a pure translation of the image-mm origin: it never changes the rotations
    sweep = prepared[0]
    poses = sweep.poses[:4]
    from SensorlessTrackingLib.pose import translate

    a = clip_targets(poses)
    b = clip_targets(poses @ translate((1.2, -0.8, 0)))
    np.testing.assert_allclose(a[:, 3:], b[:, 3:], atol=1e-5)


def test_clip_dataset_rejects_short_sweeps(sweeps):
    cfg = tiny_model_config(clip_length=20)
    with pytest.raises(SequenceError, match="clip length"):
        ClipDataset(_prepared(sweeps, tiny_model_config()), cfg)


def _train_cfg(**kw):
    base = dict(model=tiny_model_config(), epochs=2, clips_per_epoch=4, batch_size=2, val_fraction=0.34, val_clips=2,
                augment=AugmentConfig(crop_jitter_px=2), seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_checkpoints_resumes_and_is_deterministic(sweeps, tmp_path):
    cfg = tiny_model_config()
    prepared = _prepared(sweeps, cfg)
    path = train(_train_cfg(), tmp_path / "a", sweeps=prepared, progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert {"model_config", "state_dict", "optimizer", "epoch", "version"} <= set(ckpt)
    assert ckpt["version"] == CHECKPOINT_VERSION
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 2
    # the target scale was set from the labels
    assert tuple(ckpt["model_config"]["target_scale"]) != cfg.target_scale
    # same seed, same weights
    path_b = train(_train_cfg(), tmp_path / "b", sweeps=prepared, progress=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k, v in last["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert path_b.name in ("best.pt", "last.pt")
    # resume: two more epochs continue from epoch 2
    train(_train_cfg(epochs=4), tmp_path / "a", sweeps=prepared, progress=False)
    resumed = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    # another architecture in the same folder is refused
    with pytest.raises(TrainingError, match="different model"):
        train(_train_cfg(model=tiny_model_config("pairwise")), tmp_path / "a", sweeps=prepared, progress=False)


def test_resumed_training_matches_an_uninterrupted_run(sweeps, tmp_path):
    prepared = _prepared(sweeps, tiny_model_config())
    train(_train_cfg(epochs=3), tmp_path / "straight", sweeps=prepared, progress=False)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    # the same 3-epoch run, stopped after its first epoch by the time limit, then resumed
    train(_train_cfg(epochs=3, max_minutes=0.0), tmp_path / "resumed", sweeps=prepared, progress=False)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 0
    train(_train_cfg(epochs=3), tmp_path / "resumed", sweeps=prepared, progress=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 2
    for k, v in straight["state_dict"].items():
        assert torch.allclose(v.float(), resumed["state_dict"][k].float(), atol=1e-6), k


def test_fine_tuning_starts_from_the_given_weights(sweeps, tmp_path):
    from SensorlessTrackingLib.train import checkpoint_model_config

    prepared = _prepared(sweeps, tiny_model_config())
    base = train(_train_cfg(epochs=1), tmp_path / "base", sweeps=prepared, progress=False)
    base_cfg = checkpoint_model_config(base)
    start = torch.load(base, weights_only=True)["state_dict"]
    # learning rate 0: the fine-tuned weights are exactly the checkpoint's (not a fresh init);
    # batch-norm running statistics still move, so only learned parameters are compared
    frozen = train(_train_cfg(epochs=1, lr=0.0, init_from=str(base), model=base_cfg), tmp_path / "frozen",
                   sweeps=prepared, progress=False)
    got = torch.load(frozen, weights_only=True)
    assert got["model_config"]["target_scale"] == list(base_cfg.target_scale)
    learned = [k for k in start if "running_" not in k and "num_batches" not in k]
    assert len(learned) > 10
    for k in learned:
        assert torch.equal(start[k], got["state_dict"][k]), k
    tuned = train(_train_cfg(epochs=1, init_from=str(base), model=base_cfg), tmp_path / "tuned", sweeps=prepared,
                  progress=False)
    moved = torch.load(tuned, weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], moved[k]) for k in learned)


@pytest.mark.parametrize("name", ["dualtrack", "moglo", "pairwise"])
def test_fine_tuning_may_enlarge_the_input(sweeps, tmp_path, name):
    """Every model pools its features adaptively, so a checkpoint's weights fine-tune at another
    input size (the user's probe shows more than the generic model's crop)."""
    from dataclasses import replace

    from SensorlessTrackingLib.train import checkpoint_model_config

    small = tiny_model_config(name)
    base = train(_train_cfg(epochs=1, model=small), tmp_path / "base", sweeps=_prepared(sweeps, small), progress=False)
    big = replace(checkpoint_model_config(base), image_size=(48, 32))
    frozen = train(_train_cfg(epochs=1, lr=0.0, init_from=str(base), model=big), tmp_path / "big",
                   sweeps=_prepared(sweeps, big), progress=False)
    got = torch.load(frozen, weights_only=True)
    assert got["model_config"]["image_size"] == [48, 32]
    start = torch.load(base, weights_only=True)["state_dict"]
    for k in (k for k in start if "running_" not in k and "num_batches" not in k):
        assert torch.equal(start[k], got["state_dict"][k]), k
    frames = (np.random.default_rng(0).random((6, 48, 32)) * 255).astype(np.uint8)
    assert np.all(np.isfinite(predict_poses(frames, load_model(frozen))))
    # the pixel spacing is part of what the weights learned: still refused
    with pytest.raises(TrainingError, match="only image_size, global_drop and max_global_tokens may differ"):
        train(_train_cfg(init_from=str(base), model=replace(big, pixel_spacing_mm=0.5)), tmp_path / "x",
              sweeps=_prepared(sweeps, big), progress=False)


def test_fine_tuning_rejects_another_architecture_and_bad_files(sweeps, tmp_path):
    prepared = _prepared(sweeps, tiny_model_config())
    base = train(_train_cfg(epochs=1), tmp_path / "base", sweeps=prepared, progress=False)
    with pytest.raises(TrainingError, match="not the requested pairwise"):
        train(_train_cfg(model=tiny_model_config("pairwise"), init_from=str(base)), tmp_path / "x", sweeps=prepared,
              progress=False)
    with pytest.raises(TrainingError, match="no checkpoint at"):
        train(_train_cfg(init_from=str(tmp_path / "missing.pt")), tmp_path / "y", sweeps=prepared, progress=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="not a FreehandUS tracking checkpoint"):
        train(_train_cfg(init_from=str(junk)), tmp_path / "z", sweeps=prepared, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sweeps, tmp_path):
    prepared = _prepared(sweeps, tiny_model_config())
    train(_train_cfg(epochs=1), tmp_path, sweeps=prepared, progress=False)
    good = torch.load(tmp_path / "last.pt", weights_only=True)
    with pytest.raises(TrainingError, match="loss became nan.*last good checkpoint"):
        train(_train_cfg(epochs=3, loss=LossConfig(param_weight=float("nan"))), tmp_path, sweeps=prepared, progress=False)
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == good["epoch"] == 0
    assert load_model(tmp_path / "last.pt") is not None
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        train(_train_cfg(loss=LossConfig(param_weight=float("nan"))), tmp_path / "fresh", sweeps=prepared, progress=False)


@pytest.fixture(scope="module")
def trained(sweeps, tmp_path_factory):
    torch.set_num_threads(1)
    cfg = tiny_model_config()
    path = train(_train_cfg(epochs=1), tmp_path_factory.mktemp("m"), sweeps=_prepared(sweeps, cfg), progress=False)
    return path


def test_predict_poses_and_input_checks(trained):
    model = load_model(trained)
    frames = np.random.default_rng(0).integers(0, 255, size=(9, 32, 32), dtype=np.uint8)
    out = predict_poses(frames, model, batch_size=2)
    assert out.shape == (8, 6) and np.all(np.isfinite(out))
    assert predict_poses(frames[:2], model).shape == (1, 6)
    with pytest.raises(ModelFileError, match="expects 32x32"):
        predict_poses(np.zeros((5, 40, 32), np.uint8), model)
    with pytest.raises(SequenceError, match="at least 2 frames"):
        predict_poses(frames[:1], model)
    with pytest.raises(SequenceError, match="different sizes"):
        predict_poses([np.zeros((32, 32)), np.zeros((30, 32))], model)


def test_track_sequence_anchors_and_resamples(trained, sweeps, caplog):
    seq = sweeps[0]
    res = track_sequence(seq, trained)
    est = res.sequence.transforms["ImageToReference"].matrices
    np.testing.assert_allclose(est[0], seq.transforms["ImageToReference"].matrices[0], atol=1e-9)
    assert est.shape == (seq.n_frames, 4, 4) and res.frame_to_frame.shape == (seq.n_frames - 1, 6)
    assert "ProbeToReference" in res.sequence.transforms  # ImageToProbe is known: the sweep has it
    untracked = TrackedSequence(frames=seq.frames)
    with pytest.raises(SequenceError, match="pixel spacing"):
        track_sequence(untracked, trained)
    coarse = track_sequence(untracked, trained, spacing_mm=1.0)
    np.testing.assert_allclose(coarse.sequence.transforms["ImageToReference"].matrices[0], np.diag([1.0, 1.0, 1.0, 1.0]))
    assert "coarser" in caplog.text and "warning" in coarse.info
    dec = track_sequence(seq, "decorrelation")
    assert dec.method == "decorrelation" and dec.frame_to_frame.shape == (seq.n_frames - 1, 6)
    with pytest.raises(SequenceError, match="at least 2 frames"):
        track_sequence(seq[0], "decorrelation")


def test_load_model_errors(tmp_path, trained):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(bad)
    ckpt = torch.load(trained, weights_only=True)
    ckpt["model_config"]["name"] = "pairwise"  # weights of another architecture
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(ModelFileError, match="do not fit a pairwise"):
        load_model(other)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not a FreehandUS"):
        load_model(tmp_path / "foreign.pt")
    logging.getLogger(__name__).info("done")


def test_simulated_training_data_is_reproducible_and_disjoint_from_tests():
    from SensorlessTrackingLib.simdata import simulated_sweeps, test_seeds, train_seeds

    assert not set(train_seeds(10_000)) & set(test_seeds(10_000))
    cfg = tiny_model_config()
    small = {"geometry": "linear", "n_rows": 64, "n_cols": 64, "depth_mm": 12.8, "width_mm": 12.8}
    a, seqs, seconds = simulated_sweeps([5], cfg, n_frames=(4, 4), length_mm=(2.0, 2.0), keep_sequences=True, probe_overrides=small)
    b, _, _ = simulated_sweeps([5], cfg, n_frames=(4, 4), length_mm=(2.0, 2.0), probe_overrides=small)
    assert a[0].frames.shape == (4, 32, 32) and seconds > 0
    np.testing.assert_array_equal(a[0].frames, b[0].frames)
    np.testing.assert_allclose(a[0].poses, b[0].poses)
    assert seqs[0].n_frames == 4 and "ImageToReference" in seqs[0].transforms


def test_shipped_model_is_trained_and_tracks_a_simulated_sweep():
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"no shipped model at {path} (made by SensorlessTracking/Resources/Models/train_shipped_model.py)")
    assert path.stat().st_size < 20e6
    model = load_model(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] > 0 and ckpt["version"] == CHECKPOINT_VERSION
    res = tiny_sweep(seed=21, n_frames=40, length_mm=16.0, n_rows=128, n_cols=128, depth_mm=32.0, width_mm=32.0,
                     sigma_elevation_mm=0.8)
    seq = res.sequence
    est = track_sequence(seq, model)
    truth = seq.transforms["ImageToReference"].matrices
    m = tracking_metrics(truth, est.sequence.transforms["ImageToReference"].matrices, seq.frames.shape[1:])
    still = tracking_metrics(truth, np.broadcast_to(truth[0], truth.shape), seq.frames.shape[1:])
    # a trained model follows the sweep: far less drift than assuming no motion
    assert m.final_drift_mm < 0.5 * still.final_drift_mm


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--global-drop", "0.5"], "need --global-context"),
        (["--global-tokens", "64"], "need --global-context"),
        (["--global-context", "--global-tokens", "0"], "max_global_tokens must be >= 1"),
        (["--global-context", "--global-drop", "1"], "global_drop must be a probability"),
    ],
)
def test_shipped_model_script_refuses_bad_global_options(flags, message, tmp_path, capsys):
    """The global encoder's options need ``--global-context`` and valid values; the script stops
    before simulating anything."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "SensorlessTracking" / "Resources" / "Models" / "train_shipped_model.py"
    spec = importlib.util.spec_from_file_location("train_shipped_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as stop:
        module.main([*flags, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m.pt")])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

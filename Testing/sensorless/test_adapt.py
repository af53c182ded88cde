"""Per-probe adaptation: the scale fit, the adapted checkpoint, ``freehandus track adapt``."""

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import run_cli, tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)

from FreehandUSLib.io import read_sequence, write_sequence  # noqa: E402
from SensorlessTrackingLib.adapt import (  # noqa: E402
    ADAPTATION_KEY,
    AdaptConfig,
    AdaptationError,
    adapt_model,
    apply_out_of_plane_scale,
    fit_probe_scale,
    tracked_direction,
)
from SensorlessTrackingLib.conventions import column_mirror  # noqa: E402
from SensorlessTrackingLib.predict import (  # noqa: E402
    ModelFileError,
    default_model_path,
    load_model,
    read_checkpoint,
    track_sequence,
    trajectory_from_frame_to_frame,
)


def _synthetic(rng, k_true, n=60, shape=(50, 40), spacing=(0.25, 0.25)):
    """A true trajectory and an estimate whose out-of-plane steps are 1/k_true of the truth
    (and whose in-plane steps carry a little noise)."""
    p = np.zeros((n - 1, 6))
    p[:, 2] = -0.4 + 0.05 * rng.normal(size=n - 1)  # mm per frame, "toward"
    p[:, 3:5] = 0.3 * rng.normal(size=(n - 1, 2))  # deg
    p[:, 0:2] = 0.05 * rng.normal(size=(n - 1, 2))
    p[:, 5] = 0.2 * rng.normal(size=n - 1)
    first = np.eye(4)
    first[:3, :3] = np.diag([spacing[0], spacing[1], 1.0])
    first[:3, 3] = (10.0, -5.0, 3.0)
    truth = trajectory_from_frame_to_frame(p, spacing, shape, first)
    est_p = p.copy()
    est_p[:, 2:5] /= k_true
    est_p[:, [0, 1, 5]] += 0.01 * rng.normal(size=(n - 1, 3))
    return truth, trajectory_from_frame_to_frame(est_p, spacing, shape, first), shape


@pytest.mark.parametrize("k_true", [0.6, 1.0, 1.7])
def test_fit_probe_scale_recovers_a_known_scale(k_true):
    rng = np.random.default_rng(4)
    sweeps = [_synthetic(rng, k_true) for _ in range(3)]
    k = fit_probe_scale([s[0] for s in sweeps], [s[1] for s in sweeps], [s[2] for s in sweeps])
    assert k == pytest.approx(k_true, rel=0.03)
    # a mirrored calibration (det < 0) of the same sweeps: the same scale
    mirrored = [(t @ column_mirror(shape[1]), e @ column_mirror(shape[1]), shape) for t, e, shape in sweeps]
    k_m = fit_probe_scale([s[0] for s in mirrored], [s[1] for s in mirrored], [s[2] for s in mirrored])
    assert k_m == pytest.approx(k, rel=1e-6)
    assert tracked_direction(sweeps[0][0], sweeps[0][2]) == "toward"


def test_fit_probe_scale_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="as many"):
        fit_probe_scale([np.tile(np.eye(4), (3, 1, 1))], [], [(4, 4)])


def test_apply_out_of_plane_scale_scales_tz_rx_ry_only():
    p = np.arange(12.0).reshape(2, 6)
    out = apply_out_of_plane_scale(p, 2.0)
    np.testing.assert_array_equal(out[:, [0, 1, 5]], p[:, [0, 1, 5]])
    np.testing.assert_array_equal(out[:, 2:5], 2.0 * p[:, 2:5])


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    paths = []
    for seed in range(3):
        seq = tiny_sweep(seed=10 + seed, n_frames=20, length_mm=6.0).sequence
        paths.append(write_sequence(seq, d / f"sweep{seed}.igs.mha"))
    return paths


def test_track_adapt_writes_a_model_whose_scale_predict_applies(sweep_files, tmp_path, capsys):
    out = tmp_path / "probe.pt"
    assert run_cli(["track", "adapt", *map(str, sweep_files), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    scale = result["out_of_plane_scale"]
    assert result["checkpoint"] == str(out) and result["fine_tuned"] is False
    assert result["validation"]["name"] == str(sweep_files[-1]) and len(result["sweeps"]) == 3
    ckpt = read_checkpoint(out)
    assert ckpt[ADAPTATION_KEY]["out_of_plane_scale"] == pytest.approx(scale) and "optimizer" not in ckpt
    model = load_model(out)
    assert model.out_of_plane_scale == pytest.approx(scale) and scale != 1.0
    # the adapted estimate = the shipped model's with its out-of-plane steps scaled
    seq = read_sequence(sweep_files[0])
    shipped = track_sequence(seq, "default")
    adapted = track_sequence(seq, model)
    np.testing.assert_allclose(adapted.frame_to_frame, apply_out_of_plane_scale(shipped.frame_to_frame, scale),
                               atol=1e-9)
    assert adapted.info["out_of_plane_scale"] == pytest.approx(scale)
    # and track predict --model probe.pt says it is adapted
    est = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(sweep_files[0]), "--model", str(out), "--out", str(est), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "adapted, out-of-plane scale" in info["method"] and info["out_of_plane_scale"] == pytest.approx(scale)


def test_adapting_an_adapted_model_multiplies_the_scales(sweep_files, tmp_path):
    seqs = [(str(p), read_sequence(p)) for p in sweep_files]
    first = adapt_model(seqs, tmp_path / "a.pt")
    second = adapt_model(seqs, tmp_path / "b.pt", base=tmp_path / "a.pt")
    # the second fit starts from the first scale: nothing left to correct
    assert second.out_of_plane_scale == pytest.approx(first.out_of_plane_scale, rel=0.02)
    assert "held-back sweep" in str(first)


def test_track_adapt_refuses_one_sweep_and_untracked_sweeps(sweep_files, tmp_path, capsys):
    out = tmp_path / "probe.pt"
    assert run_cli(["track", "adapt", str(sweep_files[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 tracked sweeps" in err[0]
    seq = read_sequence(sweep_files[1])
    untracked = write_sequence(replace(seq, transforms={}), tmp_path / "untracked.igs.mha")
    assert run_cli(["track", "adapt", str(sweep_files[0]), str(untracked), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not tracked" in err[0] and "untracked.igs.mha" in err[0]
    assert not out.exists()


def test_adapt_model_refuses_too_few_sweeps():
    with pytest.raises(AdaptationError, match="at least 2"):
        adapt_model([("one", tiny_sweep(seed=1, n_frames=8).sequence)], "unused.pt")


def test_bad_adaptation_scale_is_refused(sweep_files, tmp_path):
    ckpt = read_checkpoint(default_model_path())
    ckpt[ADAPTATION_KEY] = {"out_of_plane_scale": -1.0}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="out_of_plane_scale"):
        load_model(tmp_path / "bad.pt")


def test_fine_tuning_keeps_the_held_back_sweep_out_of_training(tmp_path):
    """A tiny model fine-tuned on 3 sweeps: the held-back sweep is the validation group, the result
    records the fine-tuned drift, and the checkpoint stores whichever weights won."""
    from SensorlessTrackingLib.data import AugmentConfig, prepare_sweep
    from SensorlessTrackingLib.train import TrainConfig, train

    cfg = tiny_model_config()
    seqs = [tiny_sweep(seed=20 + s, n_frames=14, length_mm=4.0).sequence for s in range(3)]
    prepared = [prepare_sweep(s.frames, s.transforms["ImageToReference"].matrices, model_spacing_mm=cfg.pixel_spacing_mm,
                              image_size=cfg.image_size, global_size=cfg.global_size, margin_px=2, name=f"s{i}",
                              group=f"g{i}") for i, s in enumerate(seqs)]
    base = train(TrainConfig(model=cfg, epochs=1, clips_per_epoch=4, batch_size=2, val_clips=2, seed=0, device="cpu",
                             augment=AugmentConfig(crop_jitter_px=2), val_group="g2"),
                 tmp_path / "base", sweeps=prepared, progress=False)
    from SensorlessTrackingLib.train import TrainingError

    with pytest.raises(TrainingError, match="validation group 'nowhere'"):
        train(TrainConfig(model=cfg, epochs=1, clips_per_epoch=4, batch_size=2, device="cpu", val_group="nowhere"),
              tmp_path / "none", sweeps=prepared, progress=False)
    res = adapt_model([(f"s{i}", s) for i, s in enumerate(seqs)], tmp_path / "tuned.pt", base=base,
                      config=AdaptConfig(fine_tune=True, epochs=1, max_minutes=1.0, clips_per_epoch=4, batch_size=2))
    assert np.isfinite(res.validation["fdr_fine_tuned_percent"])
    stored = read_checkpoint(tmp_path / "tuned.pt")
    base_state = read_checkpoint(base)["state_dict"]
    same = all(torch.equal(stored["state_dict"][k], v) for k, v in base_state.items())
    assert same != res.fine_tuned
    assert stored[ADAPTATION_KEY]["fine_tuned"] is res.fine_tuned

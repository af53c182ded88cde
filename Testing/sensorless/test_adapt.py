"""Per-probe adaptation: the scale fit, the adapted checkpoint, ``freehandus track adapt``."""

import json
from dataclasses import asdict, replace

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
    apply_decorrelation_blend,
    apply_out_of_plane_scale,
    fit_decorrelation_blend,
    fit_probe_scale,
    tracked_direction,
)
from SensorlessTrackingLib.conventions import column_mirror  # noqa: E402
from SensorlessTrackingLib.decorrelation import DecorrelationConfig  # noqa: E402
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


def test_track_adapt_writes_a_model_whose_correction_predict_applies(sweep_files, tmp_path, capsys):
    out = tmp_path / "probe.pt"
    assert run_cli(["track", "adapt", *map(str, sweep_files), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    scale, chosen = result["out_of_plane_scale"], result["correction"]
    assert result["checkpoint"] == str(out) and result["fine_tuned"] is False
    assert result["validation"]["name"] == str(sweep_files[-1]) and len(result["sweeps"]) == 3
    # every candidate was judged on sweeps it was not fitted on, and the chosen one is the best or
    # the reference (the calibrated decorrelation) kept because no other was clearly better
    assert set(result["candidates"]) == {"none", "scale", "decorrelation-blend", "decorrelation"}
    assert chosen == "decorrelation" or result["candidates"][chosen] == min(result["candidates"].values())
    ckpt = read_checkpoint(out)
    record = ckpt[ADAPTATION_KEY]
    assert record["correction"] == chosen and record["out_of_plane_scale"] == pytest.approx(scale)
    assert "optimizer" not in ckpt and (record["decorrelation_blend"] is not None) == (chosen == "decorrelation-blend")
    assert (scale != 1.0) == (chosen == "scale")
    assert (record["decorrelation"] is not None) == (chosen == "decorrelation") == (result["decorrelation"] is not None)
    model = load_model(out)
    assert model.out_of_plane_scale == pytest.approx(scale)
    # the adapted estimate = the shipped model's with the chosen correction applied
    seq = read_sequence(sweep_files[0])
    shipped = track_sequence(seq, "default")
    adapted = track_sequence(seq, model)
    expected = apply_out_of_plane_scale(shipped.frame_to_frame, scale)
    if chosen == "decorrelation-blend":
        expected = apply_decorrelation_blend(shipped.frame_to_frame, seq.frames, seq.pixel_spacing_mm,
                                             record["decorrelation_blend"])
    if chosen == "decorrelation":
        expected = track_sequence(seq, "decorrelation", decorrelation=DecorrelationConfig(**record["decorrelation"]))
        expected = expected.frame_to_frame
    np.testing.assert_allclose(adapted.frame_to_frame, expected, atol=1e-9)
    # and track predict --model probe.pt says it is adapted (when a correction was chosen)
    est = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(sweep_files[0]), "--model", str(out), "--out", str(est), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert ("adapted" in info["method"]) == (chosen != "none")


def test_a_forced_scale_is_stored_and_applied(sweep_files, tmp_path):
    seqs = [(str(p), read_sequence(p)) for p in sweep_files]
    res = adapt_model(seqs, tmp_path / "s.pt", config=AdaptConfig(corrections=("scale",)))
    assert res.correction == "scale" and res.out_of_plane_scale != 1.0 and list(res.candidates) == ["scale"]
    model = load_model(tmp_path / "s.pt")
    assert model.out_of_plane_scale == pytest.approx(res.out_of_plane_scale) and model.decorrelation_blend is None
    seq = seqs[0][1]
    adapted = track_sequence(seq, model)
    np.testing.assert_allclose(adapted.frame_to_frame,
                               apply_out_of_plane_scale(track_sequence(seq, "default").frame_to_frame,
                                                        res.out_of_plane_scale), atol=1e-9)
    assert "adapted, out-of-plane scale" in adapted.method and adapted.info["out_of_plane_scale"] == pytest.approx(
        res.out_of_plane_scale)
    assert "held-back sweep" in str(res) and "scale" in str(res)


def test_a_forced_blend_is_stored_and_applied(sweep_files, tmp_path):
    seqs = [(str(p), read_sequence(p)) for p in sweep_files]
    res = adapt_model(seqs, tmp_path / "b.pt", config=AdaptConfig(corrections=("decorrelation-blend",)))
    assert res.correction == "decorrelation-blend" and res.out_of_plane_scale == 1.0
    blend = res.decorrelation_blend
    model = load_model(tmp_path / "b.pt")
    assert model.decorrelation_blend == blend
    seq = seqs[1][1]
    adapted = track_sequence(seq, model)
    expected = apply_decorrelation_blend(track_sequence(seq, "default").frame_to_frame, seq.frames,
                                         seq.pixel_spacing_mm, blend)
    np.testing.assert_allclose(adapted.frame_to_frame, expected, atol=1e-9)
    assert "blended with speckle decorrelation" in adapted.method and adapted.info["decorrelation_blend"] == blend


def test_a_forced_decorrelation_is_stored_and_applied(sweep_files, tmp_path):
    """The "decorrelation" candidate: the calibrated settings are stored as plain values (the
    checkpoint loads weights-only) and track_sequence estimates with them instead of the network,
    in either sweep direction; the summary says so."""
    seqs = [(str(p), read_sequence(p)) for p in sweep_files]
    res = adapt_model(seqs, tmp_path / "d.pt", config=AdaptConfig(corrections=("decorrelation",)))
    assert res.correction == "decorrelation" and res.out_of_plane_scale == 1.0 and res.decorrelation_blend is None
    settings = res.decorrelation
    assert DecorrelationConfig(**settings).sigma_mm == settings["sigma_mm"] > 0
    stored = torch.load(tmp_path / "d.pt", map_location="cpu", weights_only=True)
    assert stored[ADAPTATION_KEY]["decorrelation"] == settings and stored[ADAPTATION_KEY]["correction"] == "decorrelation"
    model = load_model(tmp_path / "d.pt")
    assert model.adapted_decorrelation == settings and model.decorrelation_blend is None
    seq = seqs[1][1]
    for direction in ("toward", "away"):
        adapted = track_sequence(seq, model, sweep_direction=direction)
        expected = track_sequence(seq, "decorrelation", decorrelation=DecorrelationConfig(**settings),
                                  sweep_direction=direction)
        np.testing.assert_allclose(adapted.frame_to_frame, expected.frame_to_frame, atol=1e-12)
        assert adapted.frame_to_frame[:, 2].std() > 0  # an estimate, not zeros
        assert "calibrated speckle decorrelation" in adapted.method and adapted.info["adapted_decorrelation"] == settings
        # the decorrelation's own uncertainty calibration, as for the decorrelation method
        assert adapted.info["uncertainty"] == expected.info["uncertainty"]
    text = str(res)
    assert "correction: the probe's calibrated speckle decorrelation" in text and "decorrelation" in res.to_dict()
    # its curve per depth band (plain lists in the checkpoint) is stored and named
    assert len(settings["sigma_bands_mm"]) == len(settings["still_correlation_bands"]) == settings["patches"] == 4
    assert "per depth band" in text and f"tilts: {settings['out_of_plane_rotations']}" in text
    # the coherence correction, when the calibration kept one, is named with its shift
    assert ("coherent scattering removed" in text) == bool(settings["coherence_lag_px"])
    assert res.to_dict()["correction"] == "decorrelation"
    # the network's own estimate differs: the correction really replaced it
    assert not np.allclose(track_sequence(seq, "default").frame_to_frame, expected.frame_to_frame)


def test_adapting_an_adapted_model_replaces_its_correction(sweep_files, tmp_path):
    seqs = [(str(p), read_sequence(p)) for p in sweep_files]
    first = adapt_model(seqs, tmp_path / "a.pt")
    second = adapt_model(seqs, tmp_path / "b.pt", base=tmp_path / "a.pt")
    # the second fit starts from the same network (the first correction switched off): the same result
    assert second.correction == first.correction
    assert second.out_of_plane_scale == pytest.approx(first.out_of_plane_scale, rel=1e-6)
    assert second.candidates == pytest.approx(first.candidates, rel=1e-6)
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


def _one_line_refusal(paths, tmp_path, capsys, *expected):
    out = tmp_path / "probe.pt"
    assert run_cli(["track", "adapt", *[str(p) for p in paths], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error line
    assert err[-1].startswith("freehandus track adapt: error:") and all(e in err[-1] for e in expected), err
    assert not any("Traceback" in line or line.startswith("  File") for line in err)
    assert not out.exists()


def test_track_adapt_refuses_a_sweep_that_did_not_move(sweep_files, tmp_path, capsys):
    seq = read_sequence(sweep_files[1])
    still = seq.transforms["ImageToReference"].matrices.copy()
    still[:] = still[0]  # the tracker saw the probe at rest: no path to fit a correction on
    seq.set_transform("ImageToReference", still)
    path = write_sequence(seq, tmp_path / "still.igs.mha")
    _one_line_refusal([sweep_files[0], path], tmp_path, capsys, "still.igs.mha", "did not move")
    _one_line_refusal([path, path], tmp_path, capsys, "did not move")  # before any calibration tries


def test_track_adapt_refuses_sweeps_of_different_imaging_settings(sweep_files, tmp_path, capsys):
    seq = read_sequence(sweep_files[1])
    cropped = write_sequence(replace(seq, frames=np.ascontiguousarray(seq.frames[:, :48, :])),
                             tmp_path / "deeper_preset.igs.mha")
    _one_line_refusal([sweep_files[0], cropped], tmp_path, capsys, "deeper_preset.igs.mha", "same imaging settings")


def test_track_adapt_refuses_frames_too_small_for_the_decorrelation(sweep_files, tmp_path, capsys):
    small = []
    for k in (0, 1):
        seq = read_sequence(sweep_files[k])
        small.append(write_sequence(replace(seq, frames=np.ascontiguousarray(seq.frames[:, :16, :16])),
                                    tmp_path / f"small{k}.igs.mha"))
    _one_line_refusal(small, tmp_path, capsys, "decorrelation cannot be calibrated", "too small")


def test_an_adapted_model_warns_on_frames_of_other_imaging_settings(sweep_files, tmp_path):
    out = tmp_path / "probe.pt"
    assert run_cli(["track", "adapt", *[str(p) for p in sweep_files], "--out", str(out)]) == 0
    seq = read_sequence(sweep_files[0])
    record = read_checkpoint(out)[ADAPTATION_KEY]["imaging"]
    assert record["frame_shape"] == [seq.n_rows, seq.n_cols]
    assert np.allclose(record["pixel_spacing_mm"], seq.pixel_spacing_mm, rtol=1e-6)
    same = track_sequence(seq, out)
    assert not any("adapted on" in w for w in same.info.get("warnings", []))
    deeper = track_sequence(replace(seq, frames=np.ascontiguousarray(seq.frames[:, :48, :])), out)
    assert any(f"adapted on {seq.n_rows}x{seq.n_cols} px" in w and "48x" in w for w in deeper.info["warnings"])
    zoomed = track_sequence(seq, out, spacing_mm=1.5 * seq.pixel_spacing_mm[0])
    assert any("adapted on" in w for w in zoomed.info.get("warnings", []))
    shipped = track_sequence(seq, "default")  # not adapted: nothing to compare with
    assert not any("adapted on" in w for w in shipped.info.get("warnings", []))


@pytest.mark.parametrize("imaging", [
    "64x64", [], {"frame_shape": [64]}, {"frame_shape": [64, 64]}, {"frame_shape": [0, 64], "pixel_spacing_mm": [0.2, 0.2]},
    {"frame_shape": [64.5, 64], "pixel_spacing_mm": [0.2, 0.2]}, {"frame_shape": [True, 64], "pixel_spacing_mm": [0.2, 0.2]},
    {"frame_shape": [64, 64], "pixel_spacing_mm": [0.2, float("nan")]}, {"frame_shape": [64, 64], "pixel_spacing_mm": [-0.2, 0.2]},
    {"frame_shape": [64, 64], "pixel_spacing_mm": ["a", 0.2]}, {"frame_shape": [64, 64, 1], "pixel_spacing_mm": [0.2, 0.2]},
])
def test_bad_adapted_imaging_is_refused(imaging, tmp_path):
    _refused_on_loading({"out_of_plane_scale": 1.0, "imaging": imaging}, "bad adaptation imaging", tmp_path)


def test_adapt_model_refuses_too_few_sweeps():
    with pytest.raises(AdaptationError, match="at least 2"):
        adapt_model([("one", tiny_sweep(seed=1, n_frames=8).sequence)], "unused.pt")


def _refused_on_loading(adaptation, match, tmp_path):
    """The shipped checkpoint with ``adaptation`` as its adaptation record is refused on loading."""
    ckpt = read_checkpoint(default_model_path())
    ckpt[ADAPTATION_KEY] = adaptation
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=match):
        load_model(tmp_path / "bad.pt")


def test_bad_adaptation_scale_is_refused(sweep_files, tmp_path):
    _refused_on_loading({"out_of_plane_scale": -1.0}, "out_of_plane_scale", tmp_path)


@pytest.mark.parametrize("blend", [
    {"model_tz_weight": 1.0, "decorrelation_tz_weight": 0.5, "rotation_scale": 0.0, "decorrelation": {}},
    {"model_tz_weight": float("nan"), "decorrelation_tz_weight": 0.5, "rotation_scale": 1.0, "decorrelation": {}},
    {"model_tz_weight": 1.0, "rotation_scale": 1.0, "decorrelation": {}},
    {"model_tz_weight": 1.0, "decorrelation_tz_weight": 0.5, "rotation_scale": 1.0,
     "decorrelation": {"sigma_mm": -1.0}},
    "blend",
])
def test_bad_decorrelation_blend_is_refused(blend, tmp_path):
    _refused_on_loading({"out_of_plane_scale": 1.0, "decorrelation_blend": blend}, "decorrelation_blend", tmp_path)


@pytest.mark.parametrize("settings", [{"sigma_mm": -1.0}, {"sigma_mm": float("nan")}, {"nope": 1.0}, "decorrelation",
                                      {"direction": 3}])
def test_bad_adapted_decorrelation_is_refused(settings, tmp_path):
    _refused_on_loading({"out_of_plane_scale": 1.0, "correction": "decorrelation", "decorrelation": settings},
                        "bad adaptation decorrelation", tmp_path)


def test_adapt_config_refuses_unknown_corrections():
    with pytest.raises(ValueError, match="corrections"):
        AdaptConfig(corrections=("scale", "head"))
    with pytest.raises(ValueError, match="corrections"):
        AdaptConfig(corrections=())
    assert AdaptConfig(corrections=["scale"]).corrections == ("scale",)  # as read back from a job file


def test_apply_decorrelation_blend_mixes_tz_and_scales_tilts_only():
    rng = np.random.default_rng(1)
    p, dec = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    blend = {"model_tz_weight": 0.4, "decorrelation_tz_weight": 0.7, "rotation_scale": 1.5, "decorrelation": {}}
    out = apply_decorrelation_blend(p, None, None, blend, decorrelation_params=dec)
    np.testing.assert_allclose(out[:, 2], 0.4 * p[:, 2] + 0.7 * dec[:, 2])
    np.testing.assert_allclose(out[:, 3:5], 1.5 * p[:, 3:5])
    np.testing.assert_array_equal(out[:, [0, 1, 5]], p[:, [0, 1, 5]])


def _blend_problem(rng, direction, pauses, n=60):
    """A true "toward" motion, paused ``pauses`` of the time; a model that reads pauses as
    motion (its step 0.3 mm too long everywhere) and a decorrelation that gets the pauses (its
    step 1.3x too short). Sweeps with different pauses need different factors on the model."""
    from SensorlessTrackingLib.attribution import out_of_plane_problem
    from SensorlessTrackingLib.conventions import reverse_direction

    p_true = np.zeros((n - 1, 6))
    p_true[:, 2] = np.where(np.arange(n - 1) % 10 < 10 * pauses, 0.0, -0.6 + 0.05 * rng.normal(size=n - 1))
    p_true[:, [0, 1, 5]] = 0.02 * rng.normal(size=(n - 1, 3))
    shape, spacing = (40, 40), (0.25, 0.25)
    first = np.eye(4)
    first[:3, :3] = np.diag([spacing[0], spacing[1], 1.0])
    moved = p_true if direction == "toward" else reverse_direction(p_true)
    truth = trajectory_from_frame_to_frame(moved, spacing, shape, first)
    _, poses, path = out_of_plane_problem(truth, truth, shape)
    model, dec = p_true.copy(), p_true.copy()
    model[:, 2] = p_true[:, 2] - 0.3
    dec[:, 2] = p_true[:, 2] / 1.3
    return {"p": model, "dec": dec, "direction": direction, "poses": poses, "path": path}


def test_fit_decorrelation_blend_finds_the_blend_that_removes_the_drift():
    from SensorlessTrackingLib.decorrelation import DecorrelationConfig

    rng = np.random.default_rng(3)
    problems = [_blend_problem(rng, d, pauses) for d, pauses in (("toward", 0.0), ("away", 0.3), ("toward", 0.6))]
    blend = fit_decorrelation_blend(problems, DecorrelationConfig(sigma_mm=0.9))
    assert blend["decorrelation"]["sigma_mm"] == 0.9
    # the model alone drifts; the fitted blend (leaning on the decorrelation, which gets the
    # pauses) nearly removes it
    from SensorlessTrackingLib.adapt import _drifts

    before = [_drifts(pr, pr["p"])[1] for pr in problems]
    after = [_drifts(pr, apply_decorrelation_blend(pr["p"], None, None, blend, decorrelation_params=pr["dec"]))[1]
             for pr in problems]
    assert min(before) > 20.0 and max(after) < 3.0
    assert blend["decorrelation_tz_weight"] > 1.0 and blend["model_tz_weight"] < 0.3
    # no one scale on the model does as well (the pauses differ between the sweeps)
    from SensorlessTrackingLib.adapt import _fit_correction

    correct, record = _fit_correction("scale", problems, None)
    scaled = [_drifts(pr, correct(pr))[1] for pr in problems]
    assert 0.5 < record["out_of_plane_scale"] < 0.9 and max(scaled) > 3 * max(after)


def test_the_scale_candidate_fits_sweeps_of_both_directions():
    """A model whose out-of-plane steps are 1/0.7 of the truth on sweeps tracked either way:
    the scale candidate finds 0.7 and removes the drift."""
    from SensorlessTrackingLib.adapt import _drifts, _fit_correction

    rng = np.random.default_rng(5)
    problems = [_blend_problem(rng, d, 0.0) for d in ("toward", "away", "away")]
    for pr in problems:
        pr["p"] = pr["dec"] * 1.3 / 0.7  # the truth / 0.7
    correct, record = _fit_correction("scale", problems, None)
    assert record["out_of_plane_scale"] == pytest.approx(0.7, rel=0.02)
    assert max(_drifts(pr, correct(pr))[1] for pr in problems) < 1.0


def test_adaptation_drift_matches_the_metrics_in_both_directions(sweep_files):
    """The drift the corrections are chosen by is the metrics' final drift of the estimate,
    for sweeps tracked either way (the models' convention mapped back)."""
    from SensorlessTrackingLib.adapt import _drifts, _problems, _tracked
    from SensorlessTrackingLib.metrics import tracking_metrics

    seq = read_sequence(sweep_files[0])
    itr = seq.transforms["ImageToReference"].matrices
    flipped = replace(seq, frames=seq.frames[::-1].copy(), timestamps_s=seq.timestamps_s,
                      transforms={"ImageToReference": (itr[::-1].copy(), np.ones(len(itr), bool))})
    sweeps = _tracked([("fwd", seq), ("back", flipped)], None)
    assert {s["direction"] for s in sweeps} == {"toward", "away"}
    model = load_model(default_model_path())
    for s, pr in zip(sweeps, _problems(model, sweeps, None, "cpu", None)):
        est = track_sequence(s["sequence"], "default", sweep_direction=s["direction"])
        m = tracking_metrics(s["truth"], est.sequence.transforms["ImageToReference"].matrices, s["shape"])
        assert _drifts(pr, pr["p"])[1] == pytest.approx(m.fdr_path_percent, rel=1e-6, abs=1e-6)


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


def test_a_correction_is_chosen_only_when_its_gain_is_clear():
    """Leave-one-sweep-out choice: a model 1/0.7 off on every sweep gets the scale; a model
    right on average, whose fitted scale wins by a little on average but not sweep by sweep
    (noise), stays as it is."""
    from SensorlessTrackingLib.adapt import _choose

    rng = np.random.default_rng(6)
    off = [_blend_problem(rng, d, 0.2) for d in ("toward", "away", "toward", "away")]
    for pr in off:
        pr["p"] = pr["p"].copy()
        pr["p"][:, 2] = pr["dec"][:, 2] * 1.3 / 0.7
    chosen, loo, last, _ = _choose(off, ["none", "scale"], None)
    assert chosen == "scale" and loo["scale"] < 0.2 * loo["none"] and set(last) == {"none", "scale"}
    rng = np.random.default_rng(5)
    noisy = [_blend_problem(rng, d, 0.2) for d in ("toward", "away", "toward", "away")]
    for pr in noisy:
        pr["p"] = pr["p"].copy()
        pr["p"][:, 2] = pr["dec"][:, 2] * 1.3 + 0.05 * rng.normal(size=len(pr["p"]))
    chosen, loo, _, _ = _choose(noisy, ["none", "scale"], None)
    assert loo["scale"] < loo["none"] and chosen == "none"
    assert _choose(noisy, ["scale"], None)[0] == "scale"  # without "none" the best is taken


def _decorrelation_problems(rng, model_better: bool):
    """Sweeps on which the model's estimate drifts in plane (0.05 mm per frame sideways) and in
    tz (0.3 mm too long) while the decorrelation is right (``model_better=False``), or the other
    way round. The tz-only corrections cannot remove an in-plane drift."""
    problems = [_blend_problem(rng, d, pauses) for d, pauses in
                (("toward", 0.0), ("away", 0.3), ("toward", 0.5), ("away", 0.1), ("toward", 0.2))]
    for pr in problems:
        truth = pr["dec"].copy()
        truth[:, 2] *= 1.3
        off = truth.copy()
        off[:, 0] += 0.05
        off[:, 2] -= 0.3
        good = truth + 0.005 * rng.normal(size=truth.shape)
        pr["p"], pr["dec"] = (good, off) if model_better else (off, good)
    return problems


def test_the_decorrelation_is_chosen_only_where_it_is_clearly_better():
    from SensorlessTrackingLib.adapt import CORRECTIONS, _choose

    dec_cfg = DecorrelationConfig(sigma_mm=0.9)
    better = _decorrelation_problems(np.random.default_rng(7), model_better=False)
    chosen, loo, last, rec = _choose(better, list(CORRECTIONS), dec_cfg)
    assert chosen == "decorrelation" and loo["decorrelation"] < 0.2 * min(loo["none"], loo["scale"],
                                                                         loo["decorrelation-blend"])
    assert rec["decorrelation"] == {"decorrelation": asdict(dec_cfg)}
    worse = _decorrelation_problems(np.random.default_rng(7), model_better=True)
    chosen, loo, _, _ = _choose(worse, list(CORRECTIONS), dec_cfg)
    assert chosen == "none" and loo["decorrelation"] > 5 * loo["none"]


def test_the_calibrated_decorrelation_is_kept_unless_another_is_clearly_better():
    """The reference of the choice is the calibrated decorrelation (when a candidate): the model
    as it is, a little better on average over 4 sweeps but not sweep by sweep, does not replace
    it; clearly better, it does."""
    from SensorlessTrackingLib.adapt import _choose

    def problems(model_factors, dec_factors):
        out = []
        for d, fm, fd in zip(("toward", "away", "toward", "away"), model_factors, dec_factors):
            pr = _blend_problem(np.random.default_rng(8), d, 0.0)
            truth = pr["dec"] * np.array([1, 1, 1.3, 1, 1, 1])
            pr["p"], pr["dec"] = truth.copy(), truth.copy()
            pr["p"][:, 2] *= fm
            pr["dec"][:, 2] *= fd
            out.append(pr)
        return out

    close = problems((1.04, 0.93, 1.04, 0.94), (1.10, 1.03, 0.92, 0.97))
    chosen, loo, _, _ = _choose(close, ["none", "decorrelation"], DecorrelationConfig())
    assert loo["none"] < loo["decorrelation"] and chosen == "decorrelation"
    clear = problems((1.01, 0.99, 1.01, 0.99), (1.10, 0.90, 1.12, 0.91))
    assert _choose(clear, ["none", "decorrelation"], DecorrelationConfig())[0] == "none"

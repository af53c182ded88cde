"""``freehandus track train|predict|evaluate`` through the parser that add_parsers() builds."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.io import read_sequence, write_sequence
from SensorlessTrackingLib.cli import read_image_to_probe

from sensorless_helpers import run_cli, tiny_sweep


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("track")
    paths = []
    for s in range(3):
        res = tiny_sweep(seed=10 + s, n_frames=10, length_mm=2.5)
        sub = d / f"subject{s}"
        sub.mkdir()
        paths.append(write_sequence(res.sequence, sub / "sweep.igs.mha"))
    return d, paths


def test_track_help_needs_no_torch(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["track", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "predict" in out and "evaluate" in out
    import subprocess

    code = (
        "import sys, SensorlessTrackingLib, SensorlessTrackingLib.cli, SensorlessTrackingLib.predict, "
        "FreehandUSLib.simulation.cli; print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_track_predict_and_evaluate_with_decorrelation(files, tmp_path, capsys):
    _, paths = files
    out = tmp_path / "est.seq.nrrd"
    assert run_cli(["track", "predict", str(paths[0]), "--model", "decorrelation", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "decorrelation" and info["frames"] == 10 and info["anchored_at_input_pose"]
    est = read_sequence(out)
    truth = read_sequence(paths[0])
    np.testing.assert_allclose(
        est.transforms["ImageToReference"].matrices[0], truth.transforms["ImageToReference"].matrices[0], atol=1e-5
    )
    assert run_cli(["track", "evaluate", str(paths[0]), "--estimate", str(out), "--model", "decorrelation", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert set(res) == {str(out), "decorrelation"}
    for m in res.values():
        assert {"final_drift_mm", "fdr_path_percent", "fdr_end_to_end_percent", "gpe_mm", "lpe_mm", "max_drift_mm"} <= set(m)
    assert res[str(out)]["final_drift_mm"] == pytest.approx(res["decorrelation"]["final_drift_mm"], rel=1e-3)
    assert run_cli(["track", "evaluate", str(paths[0]), "--model", "decorrelation"]) == 0
    assert "FDR path %" in capsys.readouterr().out


def test_track_evaluate_reports_the_out_of_plane_scale_that_fits(files, tmp_path, capsys):
    # An estimate that moves 20 % too little out of the plane (tz, rx, ry), as a model that
    # takes the probe's elevational beam 25 % too wide would: the fitted factor undoes it.
    from FreehandUSLib.sequence import TrackedSequence
    from SensorlessTrackingLib.pose import absolute_to_frame_to_frame, image_mm_poses, matrices_to_params
    from SensorlessTrackingLib.predict import trajectory_from_frame_to_frame

    truth = read_sequence(files[1][1])
    itr = truth.transforms["ImageToReference"].matrices
    shape = (truth.n_rows, truth.n_cols)
    spacing = tuple(np.linalg.norm(itr[0, :3, :2], axis=0))
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    params = matrices_to_params(absolute_to_frame_to_frame(image_mm_poses(itr, spacing, centre)))
    params[:, 2:5] *= 0.8
    est = trajectory_from_frame_to_frame(params, spacing, shape, itr[0])
    out = write_sequence(
        TrackedSequence(frames=truth.frames, transforms={"ImageToReference": (est, np.ones(len(est), bool))}),
        tmp_path / "scaled.seq.nrrd",
    )
    assert run_cli(["track", "evaluate", str(files[1][1]), "--estimate", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["results"][str(out)]
    assert m["fdr_path_percent"] > 5.0
    assert m["out_of_plane_scale"] == pytest.approx(1.25, rel=0.01)
    assert m["fdr_scale_fitted_percent"] < 0.05 * m["fdr_path_percent"]
    assert run_cli(["track", "evaluate", str(files[1][1]), "--estimate", str(out)]) == 0
    assert "oop scale" in capsys.readouterr().out


def test_track_train_then_predict(files, tmp_path, capsys):
    pytest.importorskip("torch")
    _, paths = files
    out_dir = tmp_path / "model"
    argv = ["track", "train", *map(str, paths), "--out", str(out_dir), "--model", "pairwise", "--image-size", "32", "32",
            "--clip-length", "4", "--spacing-mm", "0.4", "--epochs", "1", "--clips-per-epoch", "4", "--batch-size", "2",
            "--val-fraction", "0.34", "--threads", "1", "--json"]
    assert run_cli(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sweeps"] == 3 and info["model"] == "pairwise" and len(info["history"]) == 1
    ckpt = info["checkpoint"]
    est = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(paths[1]), "--model", ckpt, "--out", str(est), "--threads", "1"]) == 0
    assert "pairwise" in capsys.readouterr().out
    assert read_sequence(est).transforms["ImageToReference"].matrices.shape == (10, 4, 4)
    averaged = tmp_path / "averaged.igs.mha"
    assert run_cli(["track", "predict", str(paths[1]), "--model", ckpt, "--out", str(averaged), "--threads", "1",
                    "--mirror-average", "flip+reverse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "pairwise (flip+reverse averaged)"
    assert read_sequence(averaged).transforms["ImageToReference"].matrices.shape == (10, 4, 4)
    # one --mirror-average for every learned model of an evaluation; decorrelation runs as it is
    assert run_cli(["track", "evaluate", str(paths[1]), "--model", ckpt, "--model", "decorrelation",
                    "--mirror-average", "flip", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {f"{ckpt} (pairwise (flip averaged))", "decorrelation"}
    # fine-tune that model on the same recordings: the geometry comes from the checkpoint
    tuned_dir = tmp_path / "tuned"
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tuned_dir), "--init", ckpt, "--epochs", "1",
                 "--clips-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1",
                 "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["model"] == "pairwise" and Path(tuned["checkpoint"]).is_file()
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "t2"), "--init", ckpt,
                 "--spacing-mm", "0.3"]) == 2
    assert "come from the checkpoint" in capsys.readouterr().err
    # a larger input than the checkpoint's: the same weights, fine-tuned on more of the image
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "t3"), "--init", ckpt, "--epochs", "1",
                 "--clips-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1",
                 "--image-size", "48", "32", "--json"]) == 0
    from SensorlessTrackingLib.train import checkpoint_model_config

    wider = json.loads(capsys.readouterr().out)["checkpoint"]
    assert checkpoint_model_config(wider).image_size == (48, 32)
    assert checkpoint_model_config(wider).pixel_spacing_mm == checkpoint_model_config(ckpt).pixel_spacing_mm


def test_track_train_fits_the_input_to_the_recordings(tmp_path, capsys):
    pytest.importorskip("torch")
    from SensorlessTrackingLib.train import checkpoint_model_config

    paths = []
    for s in range(2):  # 19.2 x 12.8 mm frames: 48 x 32 pixels of 0.4 mm
        res = tiny_sweep(seed=20 + s, n_frames=8, length_mm=2.0, n_rows=96, depth_mm=19.2)
        (tmp_path / f"subject{s}").mkdir()
        paths.append(write_sequence(res.sequence, tmp_path / f"subject{s}" / "sweep.igs.mha"))
    small = ["--model", "pairwise", "--clip-length", "4", "--spacing-mm", "0.4", "--epochs", "1", "--clips-per-epoch",
             "2", "--batch-size", "2", "--val-fraction", "0", "--threads", "1", "--json"]
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "fit"), "--image-size", "fit", *small]) == 0
    out, err = capsys.readouterr()
    assert checkpoint_model_config(json.loads(out)["checkpoint"]).image_size == (48, 32)
    assert "48 x 32 pixels of 0.4 mm" in err
    # 'fit' needs recordings; a size is two integers
    assert run_cli(["track", "train", "--simulated", "1", "--out", str(tmp_path / "s"), "--image-size", "fit", *small]) == 2
    assert "give some" in capsys.readouterr().err
    for bad in (["48"], ["48", "x"], ["fit", "48"]):
        assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "b"), "--image-size", *bad, *small]) == 2
        assert "ROWS COLS (two integers) or 'fit'" in capsys.readouterr().err
    for bad in (["40", "48"], ["0", "0"]):  # the flag named, not ModelConfig.image_size
        assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "b"), "--image-size", *bad, *small]) == 2
        assert "--image-size: ROWS and COLS must be multiples of 16" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()


def test_track_train_pair_gaps(files, tmp_path, capsys):
    pytest.importorskip("torch")
    from SensorlessTrackingLib.train import checkpoint_model_config

    _, paths = files
    small = ["--image-size", "32", "32", "--clip-length", "4", "--spacing-mm", "0.4", "--epochs", "1",
             "--clips-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1", "--json"]
    argv = ["track", "train", *map(str, paths), "--out", str(tmp_path / "m"), "--local-only", "--pair-gaps", "1", "2", *small]
    assert run_cli(argv) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    assert checkpoint_model_config(ckpt).pair_gaps == (1, 2)
    # a gap of 0 frames, a gap as long as the clip, or a new gap on a checkpoint's architecture
    with pytest.raises(SystemExit) as exc:  # refused by argparse, before any file is read
        run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "z"), "--pair-gaps", "0", *small])
    assert exc.value.code == 2 and "argument --pair-gaps: must be an integer >= 1" in capsys.readouterr().err
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "l"), "--pair-gaps", "1", "4", *small]) == 2
    assert "clip_length - 1" in capsys.readouterr().err
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "i"), "--init", ckpt, "--pair-gaps", "1"]) == 2
    assert "--pair-gaps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, field, value, tuned, refused, bad_value, bad_match",
    [
        # drop-path: a training regulariser, 0 = off, a probability below 1
        ("--global-drop", "global_drop", "0.5", "0", "pairwise", "1.5", "global_drop must be a probability"),
        # how many frames of the sweep the global encoder sees: it encodes positions in the sweep,
        # not token indices, so no weight depends on it
        ("--global-tokens", "max_global_tokens", "5", "8", "moglo", "0", "max_global_tokens must be >= 1"),
    ],
)
def test_track_train_global_setting(files, tmp_path, capsys, flag, field, value, tuned, refused, bad_value, bad_match):
    """A setting of dualtrack's global context: stored in the checkpoint, changeable when
    fine-tuning (it changes no weights), refused without a global encoder or out of range."""
    pytest.importorskip("torch")
    from SensorlessTrackingLib.train import checkpoint_model_config

    _, paths = files
    small = ["--image-size", "32", "32", "--clip-length", "4", "--spacing-mm", "0.4", "--epochs", "1",
             "--clips-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1", "--json"]
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "d"), flag, value, *small]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    assert getattr(checkpoint_model_config(ckpt), field) == float(value)
    tune = ["--epochs", "1", "--clips-per-epoch", "4", "--batch-size", "2", "--val-fraction", "0.34", "--threads", "1",
            "--json"]
    assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "t"), "--init", ckpt, flag, tuned,
                    *tune]) == 0
    fine_tuned = json.loads(capsys.readouterr().out)["checkpoint"]
    assert getattr(checkpoint_model_config(fine_tuned), field) == float(tuned)
    assert run_cli(["track", "predict", str(paths[0]), "--model", fine_tuned, "--out", str(tmp_path / "p.igs.mha")]) == 0
    capsys.readouterr()
    for extra, bad, match in ((["--local-only"], value, "local-only dualtrack has none"),
                              (["--model", refused], value, f"{refused} model"),
                              ([], bad_value, bad_match)):
        assert run_cli(["track", "train", *map(str, paths), "--out", str(tmp_path / "bad"), *extra, flag, bad,
                        *small]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_track_bad_input(files, tmp_path, capsys):
    _, paths = files
    assert run_cli(["track", "predict", str(paths[0]), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o.igs.mha")]) == 2
    assert "model file not found" in capsys.readouterr().err
    one = write_sequence(read_sequence(paths[0])[0], tmp_path / "one.igs.mha")
    assert run_cli(["track", "predict", str(one), "--model", "decorrelation", "--out", str(tmp_path / "o.igs.mha")]) == 2
    assert "at least 2 frames" in capsys.readouterr().err
    assert run_cli(["track", "train", "--out", str(tmp_path / "m")]) == 2
    assert "--simulated" in capsys.readouterr().err
    assert run_cli(["track", "predict", str(paths[0]), "--model", "decorrelation", "--out", str(tmp_path / "o.bmp")]) == 2
    assert "unknown file type" in capsys.readouterr().err
    assert run_cli(["track", "predict", str(paths[0]), "--model", "decorrelation", "--out", str(tmp_path / "o.igs.mha"),
                    "--mirror-average", "flip"]) == 2
    assert "for learned models" in capsys.readouterr().err and not (tmp_path / "o.igs.mha").exists()
    with pytest.raises(SystemExit):
        run_cli(["track", "predict", str(paths[0]), "--out", str(tmp_path / "o.igs.mha"), "--mirror-average", "mirror"])
    assert "flip+reverse" in capsys.readouterr().err


def test_read_image_to_probe_formats(tmp_path):
    m = np.diag([0.2, 0.2, 1.0, 1.0])
    m[0, 3] = 5.0
    (tmp_path / "a.json").write_text(json.dumps({"ImageToProbe": m.tolist()}))
    (tmp_path / "b.txt").write_text("\n".join(" ".join(str(v) for v in row) for row in m))
    np.testing.assert_allclose(read_image_to_probe(tmp_path / "a.json"), m)
    np.testing.assert_allclose(read_image_to_probe(tmp_path / "b.txt"), m)
    scaling = np.diag([0.25, 0.25, 1.0, 1.0])
    spatial = np.eye(4)
    spatial[:3, 3] = [1.0, 2.0, 3.0]
    rows = ["scaling_from_pixel_to_mm"] + [",".join(map(str, r)) for r in scaling]
    rows += ["spatial_calibration"] + [",".join(map(str, r)) for r in spatial]
    (tmp_path / "calib_matrix.csv").write_text("\n".join(rows))
    shift = np.eye(4)
    shift[:2, 3] = 1.0
    np.testing.assert_allclose(read_image_to_probe(tmp_path / "calib_matrix.csv"), spatial @ scaling @ shift)
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(FreehandUSError, match="16 numbers"):
        read_image_to_probe(tmp_path / "c.txt")
    (tmp_path / "e.txt").write_text("1 2 three")
    with pytest.raises(FreehandUSError, match="three"):
        read_image_to_probe(tmp_path / "e.txt")
    (tmp_path / "d.json").write_text(json.dumps({"Other": 1}))
    with pytest.raises(FreehandUSError, match="ImageToProbe"):
        read_image_to_probe(tmp_path / "d.json")
    with pytest.raises(FreehandUSError, match="not found"):
        read_image_to_probe(tmp_path / "missing.json")


@pytest.mark.realdata
def test_read_image_to_probe_from_plus_config():
    from testdata import plus_file

    cfg = plus_file("ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml")
    m = read_image_to_probe(cfg)
    assert m.shape == (4, 4) and np.all(np.isfinite(m))


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra, flag", [(["--spacing", "0"], "--spacing"),  # was a ZeroDivisionError
                                         (["--spacing", "nan"], "--spacing"),
                                         (["--batch-size", "0"], "--batch-size"),  # was a ValueError in range()
                                         (["--threads", "-2"], "--threads")])
def test_track_predict_bad_numbers_are_refused_by_the_parser(files, tmp_path, capsys, extra, flag):
    _, paths = files
    with pytest.raises(SystemExit) as exc:
        run_cli(["track", "predict", str(paths[0]), "--model", "decorrelation", "--out", str(tmp_path / "o.igs.mha"),
                 *extra])
    assert exc.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("freehandus track predict: error: ") and f"argument {flag}" in err


def test_track_device_is_checked_before_any_work(files, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    _, paths = files
    missing = str(tmp_path / "missing.igs.mha")  # the device is refused before the input is read
    out = str(tmp_path / "o.igs.mha")
    if not torch.cuda.is_available():  # was an AssertionError traceback ("Torch not compiled with CUDA enabled")
        assert run_cli(["track", "predict", missing, "--out", out, "--device", "cuda"]) == 2
        assert "--device cuda" in _one_line(capsys.readouterr().err)
        assert run_cli(["track", "evaluate", str(paths[0]), "--device", "cuda:0"]) == 2
        assert "--device cuda:0" in _one_line(capsys.readouterr().err)
        assert run_cli(["track", "train", "--simulated", "1", "--out", str(tmp_path / "m"), "--device", "cuda"]) == 2
        assert "--device cuda" in _one_line(capsys.readouterr().err) and not (tmp_path / "m").exists()
    assert run_cli(["track", "predict", missing, "--out", out, "--device", "gpu7"]) == 2  # was a RuntimeError
    assert "not a torch device" in _one_line(capsys.readouterr().err)


def test_track_predict_reports_the_drift_and_keeps_the_input_transforms(tmp_path, capsys):
    """README: predicting on a tracked input prints the drift against the tracking; the output
    keeps the input's own transforms beside the estimate."""
    from FreehandUSLib import TrackedSequence
    from SensorlessTrackingLib.metrics import tracking_metrics

    sim = tiny_sweep(seed=4, n_frames=10, length_mm=2.5).sequence
    itp = sim.transforms["ImageToProbe"].matrices[0]
    reference_to_tracker = np.eye(4)
    reference_to_tracker[:3, 3] = (10.0, -20.0, 30.0)
    probe_to_tracker = reference_to_tracker @ sim.transforms["ProbeToReference"].matrices
    valid = np.ones(sim.n_frames, bool)
    plus = TrackedSequence(frames=sim.frames, timestamps_s=sim.timestamps_s, transforms={
        "ProbeToTracker": (probe_to_tracker, valid), "ReferenceToTracker": (np.repeat(reference_to_tracker[None], 10, 0),
                                                                            valid)})
    src = write_sequence(plus, tmp_path / "plus.igs.mha")
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"ImageToProbe": itp.tolist()}))
    out = tmp_path / "est.igs.mha"
    argv = ["track", "predict", str(src), "--model", "decorrelation", "--image-to-probe", str(calib), "--out", str(out)]
    assert run_cli(argv + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    est = read_sequence(out)
    # the input's transforms, unchanged, beside the estimate
    assert set(est.transform_names) == {"ProbeToTracker", "ReferenceToTracker", "ImageToReference", "ImageToProbe",
                                        "ProbeToReference"}
    for name in ("ProbeToTracker", "ReferenceToTracker"):
        np.testing.assert_allclose(est.transforms[name].matrices, plus.transforms[name].matrices, atol=1e-9)
    truth = sim.transforms["ImageToReference"].matrices
    expected = tracking_metrics(truth, est.transforms["ImageToReference"].matrices, (sim.n_rows, sim.n_cols))
    assert info["drift"]["final_drift_mm"] == pytest.approx(expected.final_drift_mm, rel=1e-6, abs=1e-9)
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert f"drift against the tracking: {expected}" in text
    # an input whose own ImageToReference the estimate replaces keeps it as ImageToTrackedReference
    assert run_cli(["track", "predict", str(write_sequence(sim, tmp_path / "sim.igs.mha")), "--model", "decorrelation",
                    "--out", str(out)]) == 0
    capsys.readouterr()
    kept = read_sequence(out).transforms["ImageToTrackedReference"].matrices
    np.testing.assert_allclose(kept, truth, atol=1e-6)


def test_track_predict_on_an_untracked_input_says_there_is_no_drift(tmp_path, capsys):
    from FreehandUSLib import TrackedSequence

    sim = tiny_sweep(seed=5, n_frames=6, length_mm=1.5).sequence
    src = write_sequence(TrackedSequence(frames=sim.frames, timestamps_s=sim.timestamps_s), tmp_path / "u.igs.mha")
    assert run_cli(["track", "predict", str(src), "--model", "decorrelation", "--spacing", "0.2",
                    "--out", str(tmp_path / "e.igs.mha"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["drift"] is None and "not tracked" in info["drift_note"]


@pytest.mark.parametrize("extra", [["--seed", "99999999999999999999999"],  # was an OverflowError in the seeding
                                   ["--threads", "99999999999999999999999"],  # was an OverflowError in torch
                                   ["--simulated", "99999999999999999999999"],  # simulated for ever
                                   ["--clip-length", "1"], ["--lr", "nan"], ["--val-fraction", "1"]])
def test_track_train_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exc:
        run_cli(["track", "train", "--simulated", "1", "--out", str(tmp_path / "m"), *extra])
    assert exc.value.code == 2
    assert f"argument {extra[0]}" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def test_a_reconstruction_of_the_prediction_uses_the_estimate(tmp_path, capsys):
    """The output keeps the input's tracking (ProbeToTracker, ReferenceToTracker), yet a volume
    made from it is the volume of the estimate alone."""
    from FreehandUSLib import TrackedSequence
    from FreehandUSLib.io import read_volume

    sim = tiny_sweep(seed=4, n_frames=10, length_mm=2.5).sequence
    reference_to_tracker = np.eye(4)
    reference_to_tracker[:3, 3] = (10.0, -20.0, 30.0)
    valid = np.ones(sim.n_frames, bool)
    plus = TrackedSequence(frames=sim.frames, timestamps_s=sim.timestamps_s, transforms={
        "ProbeToTracker": (reference_to_tracker @ sim.transforms["ProbeToReference"].matrices, valid),
        "ReferenceToTracker": (np.repeat(reference_to_tracker[None], sim.n_frames, 0), valid)})
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"ImageToProbe": sim.transforms["ImageToProbe"].matrices[0].tolist()}))
    est = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(write_sequence(plus, tmp_path / "plus.igs.mha")), "--model",
                    "decorrelation", "--image-to-probe", str(calib), "--out", str(est)]) == 0
    estimate = read_sequence(est)
    alone = TrackedSequence(frames=estimate.frames, timestamps_s=estimate.timestamps_s,
                            transforms={"ImageToReference": (estimate.transforms["ImageToReference"].matrices, valid)})
    volumes = []
    for path in (est, write_sequence(alone, tmp_path / "alone.igs.mha")):
        assert run_cli(["reconstruct", str(path), "--out", str(path) + ".mha", "--spacing", "0.3"]) == 0
        volumes.append(read_volume(str(path) + ".mha"))
    capsys.readouterr()
    np.testing.assert_allclose(volumes[0].origin_mm, volumes[1].origin_mm)
    np.testing.assert_array_equal(volumes[0].voxels, volumes[1].voxels)

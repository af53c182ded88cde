"""``freehandus track predict|evaluate --sweep-direction``, mirrored calibrations and the
per-frame flags / estimated-trajectory notice in the output file."""

import json

import numpy as np
import pytest

from FreehandUSLib.io import read_sequence, write_sequence
from SensorlessTrackingLib.conventions import column_mirror

from sensorless_helpers import run_cli, tiny_sweep


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("direction")
    res = tiny_sweep(seed=3, n_frames=30, length_mm=8.0)
    return write_sequence(res.sequence, d / "sweep.igs.mha"), res.sequence


def test_predict_prints_the_assumed_direction_and_writes_flags(sweep_file, tmp_path, capsys):
    path, _ = sweep_file
    out = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(path), "--model", "decorrelation", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "assumed sweep direction: toward" in text and "agrees" in text and "estimated (not tracked)" in text
    est = read_sequence(out)
    assert est.frame_fields["SensorlessFlag"] == ["ok"] * 30
    assert est.metadata["TrajectorySource"].startswith("sensorless estimate (decorrelation, sweep direction toward)")


def test_wrong_direction_is_warned_about(sweep_file, tmp_path, capsys):
    path, _ = sweep_file
    out = tmp_path / "est.seq.nrrd"
    assert run_cli(["track", "predict", str(path), "--model", "decorrelation", "--out", str(out),
                    "--sweep-direction", "away", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sweep_direction"] == "away" and info["direction_check"]["agrees"] is False
    assert any("sweep direction 'toward'" in w for w in info["warnings"])
    assert run_cli(["track", "evaluate", str(path), "--model", "decorrelation", "--sweep-direction", "away"]) == 0
    text = capsys.readouterr().out
    assert "assumed sweep direction: away" in text and "moves the other way" in text


def test_bad_direction_is_refused(sweep_file, tmp_path, capsys):
    path, _ = sweep_file
    with pytest.raises(SystemExit) as exc:
        run_cli(["track", "predict", str(path), "--model", "decorrelation", "--out", str(tmp_path / "x.igs.mha"),
                 "--sweep-direction", "forward"])
    assert exc.value.code == 2
    assert "invalid choice: 'forward'" in capsys.readouterr().err


def test_mirrored_calibration_file(sweep_file, tmp_path, capsys):
    """An untracked mirrored recording + a det < 0 ImageToProbe file: the same ProbeToReference
    as the unmirrored one, with the same (default) sweep direction."""
    _, seq = sweep_file
    itp = seq.transforms["ImageToProbe"].matrices[0]
    m = column_mirror(seq.n_cols)
    plain = type(seq)(frames=seq.frames, timestamps_s=seq.timestamps_s, transforms={}, image_ok=seq.image_ok)
    flipped = type(seq)(frames=np.ascontiguousarray(seq.frames[:, :, ::-1]), timestamps_s=seq.timestamps_s,
                        transforms={}, image_ok=seq.image_ok)
    p_plain = write_sequence(plain, tmp_path / "plain.igs.mha")
    p_flip = write_sequence(flipped, tmp_path / "flipped.igs.mha")
    (tmp_path / "itp.json").write_text(json.dumps({"ImageToProbe": itp.tolist()}))
    (tmp_path / "itp_mirrored.json").write_text(json.dumps({"ImageToProbe": (itp @ m).tolist()}))
    assert run_cli(["track", "predict", str(p_plain), "--model", "decorrelation", "--image-to-probe",
                    str(tmp_path / "itp.json"), "--out", str(tmp_path / "a.igs.mha")]) == 0
    assert run_cli(["track", "predict", str(p_flip), "--model", "decorrelation", "--image-to-probe",
                    str(tmp_path / "itp_mirrored.json"), "--out", str(tmp_path / "b.igs.mha")]) == 0
    assert "mirrored calibration (det < 0)" in capsys.readouterr().out
    a = read_sequence(tmp_path / "a.igs.mha").transforms["ProbeToReference"].matrices
    b = read_sequence(tmp_path / "b.igs.mha").transforms["ProbeToReference"].matrices
    np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_reconstruction_from_an_estimate_says_so(sweep_file, tmp_path, capsys, suffix):
    from FreehandUSLib.io import read_volume

    path, _ = sweep_file
    est = tmp_path / "est.igs.mha"
    assert run_cli(["track", "predict", str(path), "--model", "decorrelation", "--out", str(est)]) == 0
    capsys.readouterr()
    vol = tmp_path / f"vol{suffix}"
    assert run_cli(["reconstruct", str(est), "--out", str(vol), "--spacing", "0.5"]) == 0
    assert "trajectory: sensorless estimate (decorrelation" in capsys.readouterr().out
    assert read_volume(vol).metadata["TrajectorySource"].startswith("sensorless estimate")
    # a tracked recording's volume carries no such note
    tracked = tmp_path / f"tracked{suffix}"
    assert run_cli(["reconstruct", str(path), "--out", str(tracked), "--spacing", "0.5"]) == 0
    assert "sensorless" not in capsys.readouterr().out
    assert "TrajectorySource" not in read_volume(tracked).metadata

"""``freehandus reconstruct``: options, JSON, files written, errors (exit 2, one line)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from recon_synthetic import linear_sweep
from testdata import plus_file

from FreehandUSLib import TrackedSequence
from FreehandUSLib import cli as main_cli
from FreehandUSLib.io import read_volume, write_sequence
from FreehandUSLib.reconstruction.cli import add_parser


@pytest.fixture
def main(monkeypatch):
    """``freehandus`` main with the reconstruct subcommand (whether or not cli.py wires it yet)."""
    original = main_cli.build_parser

    def build():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "reconstruct" not in sub.choices:
            add_parser(sub)
        return parser

    monkeypatch.setattr(main_cli, "build_parser", build)
    return main_cli.main


def _probe_sweep(tmp_path):
    """A sweep as a PLUS file: ProbeToReference per frame + ImageToProbe in a JSON file."""
    seq = linear_sweep(n_frames=6, value=90)
    image_to_reference = seq.transforms["ImageToReference"].matrices
    image_to_probe = np.diag([0.2, 0.2, 1.0, 1.0])
    probe_to_reference = image_to_reference @ np.linalg.inv(image_to_probe)
    probe = TrackedSequence(
        frames=seq.frames, timestamps_s=seq.timestamps_s,
        transforms={"ProbeToReference": (probe_to_reference, np.ones(6, bool))},
    )
    path = write_sequence(probe, tmp_path / "sweep.igs.mha")
    calib = tmp_path / "ImageToProbe.json"
    calib.write_text(json.dumps({"ImageToProbe": image_to_probe.tolist()}))
    return path, calib


def test_reconstruct_json_and_files(tmp_path, capsys, main):
    seq_path, calib = _probe_sweep(tmp_path)
    out = tmp_path / "vol.mha"
    code = main([
        "reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out), "--spacing", "0.5",
        "--interpolation", "linear", "--fill-holes", "--weight-out", str(tmp_path / "w.mha"), "--json",
    ])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("frames_used", "dimensions", "spacing", "origin", "filled_fraction", "seconds", "frames_per_second"):
        assert key in info
    assert info["frames_used"] == 6 and info["spacing"] == [0.5, 0.5, 0.5]
    assert info["interpolation"] == "linear" and info["hole_filling"]["holes"] >= 0
    vol = read_volume(out)
    assert list(vol.dimensions) == info["dimensions"]
    np.testing.assert_allclose(vol.origin_mm, info["origin"])
    assert np.all(vol.voxels[read_volume(tmp_path / "w.mha").voxels > 0] == 90)
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out)]) == 0
    assert "frames: 6 used of 6" in capsys.readouterr().out


def test_reconstruct_engine_option(tmp_path, capsys, main):
    pytest.importorskip("torch")
    seq_path, calib = _probe_sweep(tmp_path)
    volumes = {}
    for engine in ("numba", "torch"):
        out = tmp_path / f"{engine}.mha"
        assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out),
                     "--engine", engine, "--interpolation", "linear"]) == 0
        volumes[engine] = read_volume(out).voxels
    capsys.readouterr()
    np.testing.assert_array_equal(volumes["torch"], volumes["numba"])
    assert np.count_nonzero(volumes["torch"]) > 0
    with pytest.raises(SystemExit):
        main(["reconstruct", str(seq_path), "--out", str(tmp_path / "x.mha"), "--engine", "opencl"])
    assert "invalid choice" in capsys.readouterr().err


def test_reconstruct_errors_exit_2(tmp_path, capsys, main):
    seq_path, calib = _probe_sweep(tmp_path)
    out = str(tmp_path / "v.mha")
    assert main(["reconstruct", str(seq_path), "--out", out]) == 2
    assert "ImageToProbe is missing" in capsys.readouterr().err
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "0"]) == 2
    assert "output_spacing_mm" in capsys.readouterr().err
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "1", "2"]) == 2
    assert "--spacing: expected 1 or 3 values" in capsys.readouterr().err
    code = main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "0.0001"])
    assert code == 2
    assert "memory budget" in capsys.readouterr().err
    code = main([
        "reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out,
        "--origin", "900", "900", "900", "--extent", "0", "5", "0", "5", "0", "5",
    ])
    assert code == 2 and "misses every frame" in capsys.readouterr().err
    assert main(["reconstruct", str(seq_path), "--image-to-probe", "1 2 3", "--out", out]) == 2
    assert "4x4" in capsys.readouterr().err


@pytest.mark.realdata
def test_reconstruct_plus_config_with_overrides(tmp_path, capsys, main):
    seq = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    config = plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    out = tmp_path / "spine.mha"
    code = main([
        "reconstruct", str(seq), "--config", str(config), "--out", str(out), "--spacing", "1.0", "--no-fill-holes",
        "--image-to-reference-transform", "ImageToReference", "--json",
    ])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames_used"] == 21 and info["spacing"] == [1.0, 1.0, 1.0]
    assert info["hole_filling"] is None and info["filled_fraction"] == info["coverage_fraction"]
    assert info["dimensions"] == [74, 54, 53]
    assert read_volume(out).voxels.shape == (53, 54, 74)

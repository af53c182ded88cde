"""``freehandus reconstruct``: options, JSON, files written, errors (exit 2, one line)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from recon_synthetic import linear_sweep
from testdata import plus_file

from FreehandUSLib import TrackedSequence
from FreehandUSApp import cli as main_cli
from FreehandUSLib.io import read_volume, write_sequence
from FreehandUSLib.reconstruction.cli import add_parser


@pytest.fixture
def main(monkeypatch):
    """``freehandus`` main with the reconstruct subcommand (whether or not cli.py wires it yet)."""
    original = main_cli.build_parser

    def build(*args, **kwargs):
        parser = original(*args, **kwargs)
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
    with pytest.raises(SystemExit) as exc:  # refused by argparse, before any file is read
        main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "0"])
    assert exc.value.code == 2 and "argument --spacing: must be in" in capsys.readouterr().err
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "1", "2"]) == 2
    assert "--spacing: expected 1 or 3 values" in capsys.readouterr().err
    code = main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", out, "--spacing", "0.001"])
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


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--spacing", "1e-300"], "argument --spacing: must be in [0.001, 1000]"),  # was an OverflowError
        (["--spacing", "nan"], "argument --spacing: must be a finite number"),
        (["--memory-budget-gib", "nan"], "argument --memory-budget-gib: must be a finite number"),  # was ValueError
        (["--memory-budget-gib", "inf"], "argument --memory-budget-gib: must be a finite number"),
        (["--memory-budget-gib", "0"], "argument --memory-budget-gib: must be a finite number > 0"),
        (["--pixel-rejection-threshold", "nan"], "argument --pixel-rejection-threshold: must be a finite number"),
        (["--origin", "0", "0", "0", "--extent", "0", "999999999999999999999999", "0", "9", "0", "9"],
         "argument --extent: must be an integer in"),  # was an OverflowError (int64)
        (["--threads", "0"], "argument --threads: must be an integer in [1, 4096]"),
        (["--skip-interval", "-1"], "argument --skip-interval: must be an integer >= 1"),
        (["--fan-radius", "0", "1e300"], "argument --fan-radius: must be at most 1e+12"),
    ],
)
def test_reconstruct_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, main, extra, match):
    seq_path, calib = _probe_sweep(tmp_path)
    out = tmp_path / "v.mha"
    with pytest.raises(SystemExit) as exc:
        main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out), *extra])
    assert exc.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("freehandus reconstruct: error: ") and match in err
    assert not out.exists()


def test_reconstruct_out_in_a_missing_folder_makes_it(tmp_path, capsys, main):
    seq_path, calib = _probe_sweep(tmp_path)
    out = tmp_path / "nodir" / "deeper" / "x.mha"
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out)]) == 0  # was a
    assert read_volume(out).voxels.max() == 90  # FileNotFoundError traceback after the whole reconstruction
    capsys.readouterr()


def test_reconstruct_bad_output_paths_are_refused_before_any_work(tmp_path, capsys, main, monkeypatch):
    from FreehandUSLib.reconstruction import reconstructor

    def no_work(*args, **kwargs):
        raise AssertionError("reconstructed although the output cannot be written")

    monkeypatch.setattr(reconstructor, "reconstruct_volume", no_work)
    seq_path, calib = _probe_sweep(tmp_path)
    base = ["reconstruct", str(seq_path), "--image-to-probe", str(calib)]
    (tmp_path / "a_file").write_text("")
    assert main([*base, "--out", str(tmp_path / "a_file" / "x.mha")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--out" in err and "a_file is a file, not a folder" in err
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_line(capsys.readouterr().err)
    assert main([*base, "--out", str(tmp_path / "v.bmp")]) == 2
    assert "unknown file type" in _one_line(capsys.readouterr().err)
    assert main([*base, "--out", str(tmp_path / "v.mha"), "--weight-out", str(tmp_path / "a_file" / "w.mha")]) == 2
    assert "--weight-out" in _one_line(capsys.readouterr().err)


def test_reconstruct_huge_extent_or_tiny_budget_names_the_flags(tmp_path, capsys, main):
    seq_path, calib = _probe_sweep(tmp_path)
    base = ["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(tmp_path / "v.mha")]
    big = str(2**31 - 1)
    assert main([*base, "--origin", "0", "0", "0", "--extent", "0", big, "0", big, "0", big]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "over the memory budget" in err and "--memory-budget-gib" in err and "--spacing" in err
    assert main([*base, "--memory-budget-gib", "1e-9"]) == 2
    assert "--memory-budget-gib" in _one_line(capsys.readouterr().err)
    assert main([*base, "--memory-budget-gib", "1e11"]) == 2  # more than 1 EiB
    assert "--memory-budget-gib" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "v.mha").exists()


def test_memory_check_of_an_astronomical_grid_is_an_error_not_an_overflow():
    from FreehandUSLib.reconstruction.errors import VolumeTooLargeError
    from FreehandUSLib.reconstruction.geometry import check_memory

    # 1e330 voxels: more than a float holds (was OverflowError in the spacing suggestion)
    with pytest.raises(VolumeTooLargeError, match="about 1e330 B"):
        check_memory([1e110] * 3, [1e-100] * 3, budget_bytes=4 << 30, bytes_per_voxel=1)


def test_reconstruct_ctrl_c_prints_one_line_exits_130_and_writes_nothing(tmp_path, capsys, main, monkeypatch):
    from FreehandUSLib.reconstruction import reconstructor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reconstructor, "reconstruct_volume", interrupted)
    seq_path, calib = _probe_sweep(tmp_path)
    out = tmp_path / "v.mha"
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out)]) == 130
    assert _one_line(capsys.readouterr().err) == "freehandus reconstruct: interrupted\n"
    assert list(tmp_path.glob("v*")) == []


def test_reconstruct_interrupted_while_writing_removes_its_outputs(tmp_path, capsys, main, monkeypatch):
    import FreehandUSLib.io as io

    real = io.write_volume
    calls = []

    def write_then_interrupt(volume, path, **options):
        calls.append(path)
        if len(calls) == 2:  # the weight volume, after the image was written
            raise KeyboardInterrupt
        return real(volume, path, **options)

    monkeypatch.setattr(io, "write_volume", write_then_interrupt)
    seq_path, calib = _probe_sweep(tmp_path)
    out, weight = tmp_path / "v.mha", tmp_path / "w.mha"
    code = main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(out),
                 "--weight-out", str(weight)])
    assert code == 130 and len(calls) == 2
    assert not out.exists() and not weight.exists()  # no half set of outputs
    assert "interrupted" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False), (None, False)])
def test_reconstruct_progress_only_on_request_or_a_terminal(tmp_path, capsys, main, flag, shown):
    # stderr is captured (not a terminal): no bar unless --progress asks for one
    seq_path, calib = _probe_sweep(tmp_path)
    argv = ["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(tmp_path / "v.mha")]
    assert main(argv + ([flag] if flag else [])) == 0
    err = capsys.readouterr().err
    assert ("reconstruct:" in err and "\r" in err) == shown, err


@pytest.mark.parametrize("extra, message", [
    (["--extent", "5", "1", "0", "1", "0", "1"], "--extent: i1 = 1 is below i0 = 5"),
    (["--fan-radius", "10", "5"], "--fan-radius: expected 0 <= start < stop"),
    (["--image-to-reference-transform", "nonsense"], "--image-to-reference-transform: expected a name"),
])
def test_reconstruct_messages_name_the_flags(tmp_path, capsys, main, extra, message):
    seq_path, calib = _probe_sweep(tmp_path)
    assert main(["reconstruct", str(seq_path), "--image-to-probe", str(calib), "--out", str(tmp_path / "v.mha"),
                 *extra]) == 2
    err = _one_line(capsys.readouterr().err)
    assert message in err and "_px" not in err and "output_extent" not in err

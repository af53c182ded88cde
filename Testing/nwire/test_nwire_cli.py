"""``freehandus detect`` / ``calibrate`` / ``simulate nwire`` (the N-wire subcommands)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from FreehandUSLib.errors import FreehandUSError
from NWireCalibrationLib.cli import build_standalone_parser


def run(argv):
    """Parse with the N-wire subcommands and run; returns the exit code."""
    args = build_standalone_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def simulated_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert run(["simulate", "nwire", "--out", str(out / "cal.igs.mha"), "--frames", "24", "--width", "320",
                "--height", "240", "--depth-mm", "50", "--seed", "2", "--json"]) == 0
    assert run(["simulate", "nwire", "--out", str(out / "val.igs.mha"), "--frames", "12", "--width", "320",
                "--height", "240", "--depth-mm", "50", "--seed", "3"]) == 0
    return out


def test_simulate_writes_sequence_config_and_truth(simulated_files, capsys):
    names = sorted(p.name for p in simulated_files.iterdir())
    assert names == ["cal.config.xml", "cal.igs.mha", "cal.truth.json", "val.config.xml", "val.igs.mha",
                     "val.truth.json"]
    truth = json.loads((simulated_files / "cal.truth.json").read_text())
    assert truth["frames"] == 24 and len(truth["ImageToProbe"]) == 4


def test_detect_json_contract(simulated_files, tmp_path, capsys):
    out = tmp_path / "dots.json"
    assert run(["detect", str(simulated_files / "cal.igs.mha"), "--config", str(simulated_files / "cal.config.xml"),
                "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["frames_total"] == 24 and data["frames_detected"] == 24
    frame = data["frames"][0]
    assert set(frame) >= {"index", "ok", "points"} and frame["ok"] and np.array(frame["points"]).shape == (9, 2)
    assert data["wire_names"][0] == "7:G1_g1"
    assert "24/24 frames detected" in capsys.readouterr().out


def test_calibrate_json_contract(simulated_files, tmp_path, capsys):
    out = tmp_path / "result.json"
    xml = tmp_path / "transform.xml"
    assert run(["calibrate", str(simulated_files / "cal.igs.mha"), "--validation", str(simulated_files / "val.igs.mha"),
                "--config", str(simulated_files / "cal.config.xml"), "--out", str(out), "--solver", "ransac-lm",
                "--phantom-pose", "known", "--ransac-iterations", "200", "--plus-xml", str(xml), "--json"]) == 0
    data = json.loads(out.read_text())
    truth = np.array(json.loads((simulated_files / "cal.truth.json").read_text())["ImageToProbe"])
    assert np.abs(np.array(data["ImageToProbe"]) - truth)[:3, 3].max() < 1.0
    for part in ("calibration", "validation"):
        for key in ("frames_total", "frames_segmented", "error3d_mean_mm", "error3d_trimmed95_mean_mm",
                    "error3d_max_mm", "error2d_mean_px"):
            assert key in data[part]
    assert data["validation"]["frames_total"] == 12 and data["seconds"] > 0
    assert xml.read_text().startswith('<Transform From="Image" To="Probe"')
    assert json.loads(capsys.readouterr().out)["solver"] == "ransac-lm"


def test_calibrate_without_phantom_is_a_library_error(simulated_files, tmp_path):
    cfg = tmp_path / "nophantom.xml"
    cfg.write_text('<PlusConfiguration version="2.1"><Segmentation ApproximateSpacingMmPerPixel="0.2"/>'
                   "</PlusConfiguration>")
    with pytest.raises(FreehandUSError, match="PhantomDefinition"):
        run(["calibrate", str(simulated_files / "cal.igs.mha"), "--config", str(cfg)])


def test_parsers_register_on_a_foreign_parser():
    import argparse

    from NWireCalibrationLib.cli import add_parsers, add_simulate_nwire

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    add_simulate_nwire(sub.add_parser("simulate").add_subparsers(dest="what"))
    args = parser.parse_args(["calibrate", "a.igs.mha", "--solver", "lm", "--phantom-pose", "estimate"])
    assert args.solver == "lm" and args.phantom_pose == "estimate" and callable(args.func)
    args = parser.parse_args(["simulate", "nwire", "--out", "x.igs.mha", "--probe", "convex"])
    assert args.probe == "convex"
    with pytest.raises(SystemExit):
        parser.parse_args(["detect", "a.igs.mha", "--detector", "nonsense"])


def test_simulate_into_a_folder_as_the_readme_does(tmp_path, capsys):
    """README: ``freehandus simulate nwire --out session/ ...`` (it wanted a file name and failed
    after the whole simulation had run)."""
    from FreehandUSApp.cli import main

    session = tmp_path / "session"
    small = ["--frames", "4", "--width", "320", "--height", "240", "--depth-mm", "50"]
    assert main(["simulate", "nwire", "--out", f"{session}/", *small]) == 0
    assert sorted(p.name for p in session.iterdir()) == ["nwire.config.xml", "nwire.igs.mha", "nwire.truth.json"]
    assert main(["simulate", "nwire", "--out", str(session), "--seed", "1", *small]) == 0  # an existing folder
    assert "nwire.igs.mha" in capsys.readouterr().out


def test_simulate_checks_its_arguments_before_simulating(tmp_path, capsys, monkeypatch):
    from FreehandUSApp.cli import main
    from NWireCalibrationLib import simulate

    def no_work(*args, **kwargs):
        raise AssertionError("simulated although the output cannot be written")

    monkeypatch.setattr(simulate, "simulate_nwire", no_work)
    for out, match in ((tmp_path / "x.bmp", "unknown file type"),):
        assert main(["simulate", "nwire", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    (tmp_path / "file").write_text("")
    assert main(["simulate", "nwire", "--out", str(tmp_path / "file" / "x.igs.mha")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["simulate", "nwire", "--out", str(tmp_path / "x.igs.mha"), "--truth-out",
                 str(tmp_path / "file" / "t.json")]) == 2
    assert "--truth-out" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["simulate", "nwire", "--out", "x.igs.mha"], ["detect", "x.igs.mha"],
                                     ["calibrate", "x.igs.mha"]])
@pytest.mark.parametrize("extra", [["--frames", "0"], ["--depth-mm", "nan"], ["--outlier-fraction", "2"],
                                   ["--tracker-noise-mm", "-1"], ["--seed", "-1"], ["--pixel-spacing", "0"],
                                   ["--ransac-iterations", "0"], ["--ransac-threshold", "inf"]])
def test_bad_numbers_are_refused_by_the_parser(command, extra, capsys):
    from FreehandUSApp.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*command, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "error: " in err
    assert f"argument {extra[0]}" in err or "unrecognized arguments" in err


def test_settings_that_do_not_fit_are_one_line(tmp_path, capsys):
    from FreehandUSApp.cli import main

    # a 40 mm linear field of view at this depth needs a wider image: a ValueError traceback before
    assert main(["simulate", "nwire", "--out", str(tmp_path / "x.igs.mha"), "--depth-mm", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freehandus simulate nwire: error: ") and err.count("\n") == 1


def test_simulate_interrupted_while_writing_leaves_none_of_its_new_files(tmp_path, capsys, monkeypatch):
    from FreehandUSApp.cli import main
    from NWireCalibrationLib import simulate

    real = simulate.write_simulation

    def write_then_interrupt(sim, out, *, config_path=None, truth_path=None):
        real(sim, out, config_path=config_path, truth_path=truth_path)
        raise KeyboardInterrupt  # as if Ctrl-C came after the last file

    monkeypatch.setattr(simulate, "write_simulation", write_then_interrupt)
    (tmp_path / "keep.truth.json").write_text("{}")  # an existing file is not removed
    assert main(["simulate", "nwire", "--out", str(tmp_path / "keep.igs.mha"), "--frames", "3", "--width", "320",
                 "--height", "240", "--depth-mm", "50"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.truth.json"]
    assert capsys.readouterr().err == "freehandus simulate nwire: interrupted\n"

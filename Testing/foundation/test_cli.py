"""The freehandus command line: info, convert, demo, and error handling (exit 2, one line)."""

import json

import numpy as np
import pytest
from testdata import make_synthetic_sequence, plus_file

from FreehandUSApp.cli import main
from FreehandUSLib.io import read_sequence, write_sequence


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "convert", "demo"):
        assert command in out


def test_info_json_fields(tmp_path, capsys):
    seq = make_synthetic_sequence(n_frames=5)
    path = write_sequence(seq, tmp_path / "s.igs.mha")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 5
    assert (info["width"], info["height"]) == (64, 48)
    assert info["orientation"] == "MF"
    assert info["transforms"] == ["ProbeToTracker", "ReferenceToTracker"]
    assert info["valid_transform_frames"]["ReferenceToTracker"] == 4
    assert info["duration_s"] == pytest.approx(seq.duration_s)


@pytest.mark.realdata
def test_info_on_plus_file(capsys):
    path = plus_file("TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 103 and (info["width"], info["height"]) == (820, 616)
    assert set(info["transforms"]) == {"ProbeToTracker", "ReferenceToTracker", "StylusToTracker"}
    assert main(["info", str(path)]) == 0
    assert "frames: 103" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["out.igs.nrrd", "out.seq.nrrd", "out.igs.mhd", "out.h5"])
def test_convert_round_trip(tmp_path, target, capsys):
    seq = make_synthetic_sequence(n_frames=4)
    src = write_sequence(seq, tmp_path / "in.igs.mha")
    dst = tmp_path / target
    assert main(["convert", str(src), str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 4
    back = read_sequence(dst)
    np.testing.assert_array_equal(back.frames, seq.frames)
    tol = 1e-5 if target.endswith(".h5") else 1e-9
    np.testing.assert_allclose(
        back.transforms["ProbeToTracker"].matrices, seq.transforms["ProbeToTracker"].matrices, atol=tol
    )


def test_errors_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.igs.mha")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.igs.mha" in err and "not found" in err and "\n" not in err
    assert main(["info", str(tmp_path / "file.unknown")]) == 2
    assert "unknown file type" in capsys.readouterr().err
    bad = tmp_path / "bad.igs.mha"
    bad.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\n")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.igs.mha" in err and "Traceback" not in err


def test_demo_writes_sequences(tmp_path, capsys, monkeypatch):
    # The CLI wiring of `freehandus demo --quick --json` on a tiny run (the full end-to-end
    # checks are in Testing/demo/test_demo_quick.py).
    from FreehandUSApp import demo

    tiny = demo.DemoSettings.quick_settings(
        calibration_frames=16, validation_frames=6, sweep_frames=12, sweep_length_mm=5.0,
        sweep_image_px=(64, 112), scatterers_per_cell=4.0, voxel_mm=1.5, ransac_iterations=300,
    )
    monkeypatch.setattr(demo.DemoSettings, "quick_settings", classmethod(lambda cls, **kw: tiny))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-browser-check", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["summaries"]["settings"]["sweep_frames"] == 12 and len(result["summary"]) == 10
    seq = read_sequence(result["files"]["sweep_us_sequence"])
    assert seq.n_frames == 12 and (seq.n_rows, seq.n_cols) == (64, 112)
    assert {"ImageToReference", "ProbeToTracker", "ReferenceToTracker"} <= set(seq.transform_names)
    assert read_sequence(result["files"]["nwire_calibration_sequence"]).n_frames == 16
    assert result["files"]["report"].endswith("report.html") and (out / "report.html").is_file()
    assert seq.frames.std() > 10  # speckle and structures, not a blank image


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_parse_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info"])
    assert exc.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("freehandus info: error: ") and "sequence" in err and "--help" in err


def test_file_system_errors_are_one_line_and_exit_2(tmp_path, capsys):
    src = write_sequence(make_synthetic_sequence(n_frames=3), tmp_path / "in.igs.mha")
    missing = tmp_path / "nodir" / "out.igs.mha"
    assert main(["convert", str(src), str(missing)]) == 2  # was a FileNotFoundError traceback
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("freehandus convert: error: ") and "nodir" in err
    assert not missing.parent.exists()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    import FreehandUSLib.io as io

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "read_sequence", interrupted)
    assert main(["info", str(tmp_path / "any.igs.mha")]) == 130
    assert _one_line(capsys.readouterr().err) == "freehandus info: interrupted\n"


@pytest.mark.parametrize(
    "kind, good, bad",
    [
        ("finite_float", {"-2.5": -2.5, "0": 0.0}, ["nan", "inf", "-inf", "1e300", "x", ""]),
        ("positive_float", {"0.5": 0.5, "1e12": 1e12}, ["0", "-1", "nan", "inf", "1e13"]),
        ("non_negative_float", {"0": 0.0, "3": 3.0}, ["-0.1", "nan"]),
        ("fraction", {"0": 0.0, "1": 1.0, "0.25": 0.25}, ["1.01", "-0.01", "nan"]),
        ("spacing_mm", {"0.3": 0.3, "0.001": 0.001}, ["0", "1e-300", "1e4", "nan"]),
        ("positive_int", {"1": 1, "99999999999999999999": 99999999999999999999}, ["0", "-3", "1.5", "1e3", "x"]),
        ("non_negative_int", {"0": 0}, ["-1"]),
        ("index", {"-2147483648": -(2**31), "2147483647": 2**31 - 1}, ["2147483648", "1e9"]),
    ],
)
def test_argparse_number_types(kind, good, bad):
    import argparse

    from FreehandUSLib import cli_support

    parse = getattr(cli_support, kind)
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_progress_follows_the_option_else_the_terminal():
    import argparse
    import io

    from FreehandUSLib.cli_support import progress_enabled

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def args(**kw):
        return argparse.Namespace(**{"progress": None, "json": False, **kw})

    assert progress_enabled(args(), Terminal()) and not progress_enabled(args(), io.StringIO())
    assert not progress_enabled(args(json=True), Terminal())  # JSON runs are for scripts
    assert progress_enabled(args(progress=True), io.StringIO())
    assert not progress_enabled(args(progress=False), Terminal())


@pytest.mark.parametrize("enabled, shown", [(None, False), (True, True), (False, False)])
def test_demo_progress_bars_stay_out_of_logs(capsys, enabled, shown):
    # captured stderr is not a terminal: bars only when asked for
    from FreehandUSApp.demo import _Progress

    with _Progress(enabled).bar("step", 50) as update:
        for i in range(1, 51):
            update(i)
    assert ("step" in capsys.readouterr().err) == shown


def _all_subcommand_parsers():
    import argparse

    from FreehandUSApp.cli import build_parser

    def walk(parser, words):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(words), parser
        for sub in subs:
            for name, child in sub.choices.items():
                yield from walk(child, [*words, name])

    return list(walk(build_parser(), []))


def test_every_number_option_is_checked_at_the_parser():
    """As a class: no option of any subcommand takes a bare float (NaN and infinities would pass),
    and every typed option refuses NaN and infinity with argparse's one-line error."""
    import argparse

    checked = 0
    for name, parser in _all_subcommand_parsers():
        for action in parser._actions:
            if action.type is None or action.type in (int, str):
                continue
            assert action.type is not float, f"freehandus {name} {action.option_strings}: a bare float"
            for text in ("nan", "inf", "-inf"):
                with pytest.raises((argparse.ArgumentTypeError, ValueError)):
                    action.type(text)
            checked += 1
    assert checked > 60  # the options of reconstruct, simulate, calibrate, track, serve, record ...


def test_every_port_option_is_a_tcp_port():
    """As a class: every --port takes 1..65535 (0, any free port, only where the command listens)."""
    import argparse

    ports = {}
    for name, parser in _all_subcommand_parsers():
        for action in parser._actions:
            if "--port" in action.option_strings:
                for text in ("65536", "99999", "-1", "nan", "1.5"):
                    with pytest.raises(argparse.ArgumentTypeError):
                        action.type(text)
                assert action.type("65535") == 65535
                ports[name] = action.type
    assert {"serve", "record", "calibrate-live"} <= set(ports)
    assert ports["serve"]("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        ports["record"]("0")


@pytest.fixture
def no_streaming(monkeypatch):
    """Make connecting or serving fail loudly: a refused argument must come before either."""
    from FreehandUSLib.igtl.client import IGTLClient
    from FreehandUSLib.igtl.replay import ReplayServer

    def never(self, *args, **kwargs):
        raise AssertionError("connected or served before the arguments were checked")

    monkeypatch.setattr(IGTLClient, "start", never)
    monkeypatch.setattr(ReplayServer, "start", never)


#: Values the streaming commands used to accept (a NaN or infinite wait, a port over 65535 that
#: calibrate-live waited 10 s on) or that ran into an error after starting; each is refused by the
#: parser: one line naming the option, exit 2, nothing connected or created.
STREAMING_BAD_VALUES = [
    ["serve", "SEQ", "--duration", "inf"],
    ["serve", "SEQ", "--duration", "nan"],
    ["serve", "SEQ", "--duration", "0"],
    ["serve", "SEQ", "--port", "99999"],
    ["serve", "SEQ", "--fps", "nan"],
    ["serve", "SEQ", "--fps", "1e-12"],  # one frame every 1e12 s: beyond any wait the OS allows
    ["record", "--out", "OUT", "--frames", "1", "--duration", "inf"],
    ["record", "--out", "OUT", "--frames", "1", "--duration", "nan"],
    ["record", "--out", "OUT", "--frames", "1", "--connect-timeout", "inf"],
    ["record", "--out", "OUT", "--frames", "1", "--connect-timeout", "1e12"],  # overflowed the wait
    ["record", "--out", "OUT", "--frames", "1", "--reconnect-timeout", "nan"],
    ["record", "--out", "OUT", "--frames", "0"],
    ["record", "--out", "OUT", "--frames", "1", "--port", "70000"],
    ["calibrate-live", "--timeout", "inf"],
    ["calibrate-live", "--timeout", "nan"],
    ["calibrate-live", "--connect-timeout", "inf"],
    ["calibrate-live", "--connect-timeout", "nan"],
    ["calibrate-live", "--connect-timeout", "1e12"],
    ["calibrate-live", "--pixel-spacing", "inf"],
    ["calibrate-live", "--pixel-spacing", "nan"],
    ["calibrate-live", "--pixel-spacing", "1e-300"],
    ["calibrate-live", "--convergence-mm", "inf"],
    ["calibrate-live", "--convergence-mm", "nan"],
    ["calibrate-live", "--port", "99999"],
    ["calibrate-live", "--port", "0"],
    ["calibrate-live", "--max-frames", "0"],
    ["calibrate-live", "--min-keyframes", "-5"],
]


@pytest.mark.parametrize("argv", STREAMING_BAD_VALUES, ids=" ".join)
def test_streaming_commands_refuse_bad_numbers_before_connecting(tmp_path, capsys, no_streaming, argv):
    seq = write_sequence(make_synthetic_sequence(n_frames=2), tmp_path / "s.igs.mha")
    argv = [str(seq) if a == "SEQ" else str(tmp_path / "rec.igs.mhd") if a == "OUT" else a for a in argv]
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = _one_line(capsys.readouterr().err)
    flag, value = argv[-2:]
    assert err.startswith(f"freehandus {argv[0]}: error: argument {flag}: ") and repr(value) in err
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--min-keyframes", "5"], "min_keyframes: expected >= 10, got 5"),
        (["--min-keyframes", "400"], "--min-keyframes 400: at most 300 keyframes are kept"),
        (["--out", "DIR"], "is a folder; give a file name"),
        (["--plus-xml", "DIR"], "is a folder; give a file name"),
    ],
)
def test_calibrate_live_checks_settings_and_outputs_before_connecting(tmp_path, capsys, no_streaming, extra, words):
    extra = [str(tmp_path) if a == "DIR" else a for a in extra]
    assert main(["calibrate-live", "--phantom", "fCal-2.0", "--pixel-spacing", "0.2", *extra]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("freehandus calibrate-live: error: ") and words in err

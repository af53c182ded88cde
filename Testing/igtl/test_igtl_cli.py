"""``serve`` / ``record`` subcommands (FreehandUSLib/igtl/cli.py) and the interop build script."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from igtl_testing import BUILD_SCRIPT, free_port, make_stream_sequence, running, serve_args, wait_for_port_line
from testdata import plus_file

from FreehandUSLib.igtl.cli import add_parsers, main
from FreehandUSLib.io import read_sequence, write_sequence

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def source(tmp_path):
    seq = make_stream_sequence(12, 20, 24, invalid_reference=[5])
    return seq, write_sequence(seq, tmp_path / "src.igs.mhd", compress=False)


def test_add_parsers_registers_serve_and_record():
    parser = argparse.ArgumentParser(prog="freehandus")
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "a.igs.mha", "--port", "0", "--fps", "15", "--loop", "--json"])
    assert (args.sequence, args.port, args.fps, args.loop, args.json) == ("a.igs.mha", 0, 15.0, True, True)
    assert callable(args.func)
    args = parser.parse_args(["record", "--host", "h", "--port", "5", "--out", "o.igs.mhd", "--frames", "3"])
    assert (args.host, args.port, args.out, args.frames, args.duration) == ("h", 5, "o.igs.mhd", 3, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["record", "--out", "x.mhd", "--frames", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "x.mha", "--fps", "-2"])
    with pytest.raises(SystemExit):  # ReplayServer's ValueError was a traceback
        parser.parse_args(["serve", "x.mha", "--fps", "inf"])


@pytest.mark.parametrize("argv", [["serve", "x.mha", "--port", "99999"],
                                  ["record", "--out", "o.mhd", "--duration", "inf"]])  # fmt: skip
def test_stand_alone_parse_errors_are_one_line_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"freehandus-igtl {argv[0]}: error: argument {argv[-2]}: ")


def test_record_status_line_follows_the_progress_option():
    import io

    from FreehandUSLib.cli_support import progress_enabled
    from FreehandUSLib.igtl.cli import _StatusLine
    from FreehandUSLib.igtl.recorder import RecordingStatus

    parser = argparse.ArgumentParser(prog="freehandus")
    add_parsers(parser.add_subparsers(dest="command"))
    record = ["record", "--out", "o.igs.mhd", "--frames", "3"]
    assert parser.parse_args(record).progress is None
    assert progress_enabled(parser.parse_args([*record, "--progress"]))
    assert not progress_enabled(parser.parse_args([*record, "--json"]))
    status = RecordingStatus(frames=2, elapsed_s=0.2, fps=10.0, dropped=0, missing_frames=0, state="connected",
                             reconnecting_s=0.0)  # fmt: skip
    for enabled in (True, False):
        stream = io.StringIO()  # not a terminal: only the option decides
        line = _StatusLine(3, stream, enabled=enabled)
        line(status)
        line.close()
        assert ("2/3 frames, 10.0 fps, dropped 0" in stream.getvalue()) == enabled


def test_record_needs_an_end(tmp_path, capsys):
    assert main(["record", "--out", str(tmp_path / "r.igs.mhd")]) == 2
    assert "--duration S or --frames N" in capsys.readouterr().err


def test_record_without_server_fails_cleanly(tmp_path, capsys):
    port = free_port()
    rc = main(["record", "--port", str(port), "--out", str(tmp_path / "r.igs.mhd"), "--frames", "2",
               "--connect-timeout", "0.3"])  # fmt: skip
    assert rc == 2
    assert f"no OpenIGTLink server answered at 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_missing_file_fails_cleanly(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.igs.mha"), "--port", "0", "--duration", "0.1"]) == 2
    assert "missing.igs.mha" in capsys.readouterr().err


def test_serve_runs_for_a_duration_and_reports_json(source, capsys):
    _, path = source
    assert main(["serve", str(path), "--port", "0", "--duration", "0.3", "--json"]) == 0
    out = capsys.readouterr().out
    first, second, rest = out.split("\n", 2)
    assert first.startswith(f"serving {path} on 127.0.0.1:") and "images as Image_Image" in first
    # the transport's own entry point has no reconstructor; freehandus serve adds one
    assert second.startswith("remote StartRecording writes new files into ")
    assert "freehandus-serve-" in second and not Path(second.rsplit(" ", 1)[1]).exists()  # created when used
    result = json.loads(rest)
    assert result["replay"]["frames_sent"] == 0 and result["server"]["clients_connected"] == 0


def test_serve_subprocess_and_record_command(source, tmp_path, capsys):
    seq, path = source
    with running(
        serve_args(path, "--port", "0", "--fps", "100", "--timestamps", "original", "--exit-when-done")
    ) as (
        proc,
        reader,
    ):
        port = wait_for_port_line(reader)
        out = tmp_path / "rec.igs.mha"
        rc = main(["record", "--port", str(port), "--out", str(out), "--frames", "12", "--json"])
        assert rc == 0
        proc.wait(30)
        assert proc.returncode == 0
        assert "sent 12 frames" in reader.text()
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 12 and summary["dropped"] == 0 and summary["path"] == str(out)
    assert summary["invalid_frames"] == {"ProbeToTracker": 0, "ReferenceToTracker": 1}
    got = read_sequence(out)
    np.testing.assert_array_equal(got.frames, seq.frames)
    np.testing.assert_array_equal(
        got.transforms["ReferenceToTracker"].valid, seq.transforms["ReferenceToTracker"].valid
    )


@pytest.mark.realdata
def test_serve_with_plus_config_streams_image_reference(tmp_path):
    seq_path = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    config = plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    with running(serve_args(seq_path, "--port", "0", "--config", config, "--duration", "20")) as (proc, reader):
        port = wait_for_port_line(reader)
        assert "images as Image_Reference" in reader.text()
        assert port > 0


def test_build_script_reports_missing_sources(tmp_path):
    env = dict(os.environ, OPENIGTLINK_EXAMPLES_DIR=str(tmp_path / "nowhere"))
    done = subprocess.run(["bash", str(BUILD_SCRIPT), str(tmp_path / "b")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3
    assert "openigtlink-examples" in done.stderr and "nowhere" in done.stderr


def test_plus_server_settings(tmp_path):
    from FreehandUSLib.errors import ConfigError
    from FreehandUSLib.igtl.replay import plus_server_settings

    xml = tmp_path / "server.xml"
    xml.write_text(
        '<PlusConfiguration><PlusOpenIGTLinkServer ListeningPort="18945" OutputChannelId="TrackedVideoStream">'
        '<DefaultClientInfo><TransformNames><Transform Name="ProbeToTracker"/><Transform Name="ProbeToReference"/>'
        '</TransformNames><ImageNames><Image Name="Image" EmbeddedTransformToFrame="Tracker"/></ImageNames>'
        "</DefaultClientInfo></PlusOpenIGTLinkServer></PlusConfiguration>"
    )
    assert plus_server_settings(xml) == {
        "port": 18945,
        "transform_names": ["ProbeToTracker", "ProbeToReference"],
        "image_name": "Image",
        "embedded_frame": "Tracker",
    }
    (tmp_path / "none.xml").write_text("<PlusConfiguration/>")
    assert plus_server_settings(tmp_path / "none.xml") == {}
    (tmp_path / "bad.xml").write_text("<PlusConfiguration>")
    with pytest.raises(ConfigError, match="bad.xml: cannot read"):
        plus_server_settings(tmp_path / "bad.xml")


def test_freehandus_serve_answers_reconstruct_volume(source, capsys):
    # the application hands the reconstruction capability to the transport's serve command
    from FreehandUSApp.cli import main as freehandus

    _, path = source
    assert freehandus(["serve", str(path), "--port", "0", "--duration", "0.2"]) == 0
    second = capsys.readouterr().out.split("\n")[1]
    assert second.startswith("remote StartRecording/ReconstructVolume write new files into "), second

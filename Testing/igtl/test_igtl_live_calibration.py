"""Live N-wire calibration: a simulated session streamed by the replay server is calibrated on the fly.

Everything runs on loopback: a :class:`ReplayServer` on 127.0.0.1 port 0 (in this process, stopped
by its context manager), clients bounded by ``max_frames`` / ``timeout_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest

from FreehandUSLib.igtl import IGTLClient, IGTLConnectionError, PairedFrame, ReplayServer, run_live
from NWireCalibrationLib.live_calibration import (
    LiveCalibrationSink,
    add_live_calibration_parser,
    live_calibrate,
)
from NWireCalibrationLib.errors import CalibrationError, DetectionError
from NWireCalibrationLib.keyframes import KeyframeSettings
from NWireCalibrationLib.metrics import target_errors_mm
from NWireCalibrationLib.pipeline import probe_to_reference
from NWireCalibrationLib.simulate import simulate_nwire

from igtl_testing import free_port

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 10.0
N_FRAMES = 150
INVALID_REFERENCE = (3, 8, 9, 20)  # frames whose ReferenceToTracker the "tracker" lost
BIG_QUEUE = {"queue_size": 100_000}  # nothing dropped: the frames arrive in order, all of them


@pytest.fixture(scope="module")
def session():
    """A 150-frame linear-probe N-wire session (256x192) with a known ImageToProbe."""
    sim = simulate_nwire(probe="linear", depth_mm=50.0, n_frames=N_FRAMES, seed=3, image_size_px=(256, 192),
                         tilt_deg=12.0)  # fmt: skip
    seq = sim.sequence.copy()
    ref = seq.transforms["ReferenceToTracker"]
    valid = ref.valid.copy()
    valid[list(INVALID_REFERENCE)] = False
    seq.set_transform("ReferenceToTracker", ref.matrices, valid)
    return sim, seq


@pytest.fixture()
def config(session, tmp_path):
    """The simulation's PLUS config: phantom, PhantomToReference, ApproximateSpacingMmPerPixel."""
    path = tmp_path / "nwire.config.xml"
    path.write_text(session[0].config_xml(), encoding="utf-8")
    return path


def wrong_calibration(sim) -> np.ndarray:
    """An ImageToProbe 4 mm off: PlusServer's old calibration in the Image_Reference matrix."""
    m = sim.image_to_probe.copy()
    m[:3, 3] += [4.0, 0.0, 0.0]
    return m


def target_error(sim, image_to_probe) -> float:
    return float(target_errors_mm(image_to_probe, sim.image_to_probe, points_px=sim.fov_points_px()).mean())


def test_live_calibration_converges_to_the_true_image_to_probe(session, config):
    sim, seq = session
    updates = []
    # Like PlusServer: Image_Reference carries ImageToReference made with a (wrong) old calibration,
    # which the calibration must ignore; ProbeToTracker/ReferenceToTracker as TRANSFORMs.
    with ReplayServer(seq, port=0, fps=0, image_to_probe=wrong_calibration(sim)) as server:
        assert server.image_device == "Image_Reference"
        result = live_calibrate("127.0.0.1", server.port, config=config, max_frames=N_FRAMES, timeout_s=60,
                                client_options=BIG_QUEUE, progress=updates.append)  # fmt: skip
    err = target_error(sim, result.image_to_probe)
    assert err < 0.5, f"image-plane target error {err:.3f} mm"
    assert result.converged and result.stop_reason == "converged"
    assert result.phantom_pose == "known"
    np.testing.assert_allclose(result.phantom_to_reference, sim.phantom_to_reference, atol=1e-6)
    # Convergence curve: one point per recalibration, first change undefined, last ones settled.
    curve = result.curve
    assert len(curve) >= 3 and math.isinf(curve[0].change_mm)
    assert all(p.change_mm <= KeyframeSettings().convergence_mm for p in curve[-3:])
    assert [p.n_keyframes for p in curve] == sorted(p.n_keyframes for p in curve)
    assert result.n_keyframes >= KeyframeSettings().min_keyframes == 20
    np.testing.assert_allclose(result.pixel_spacing_mm, sim.pixel_spacing_mm, rtol=0.01)
    assert result.error3d_trimmed95_mean_mm < 0.5
    # Stopped at convergence, long before the end; counters add up and name the lost frames.
    f = result.frames
    assert f["frames"] < N_FRAMES and result.live["frames"] == f["frames"] and result.live["dropped"] == 0
    processed = f["frames"] - f["frames_ignored"]
    assert f["frames_without_pose"] == sum(i < processed for i in INVALID_REFERENCE) == 4
    assert (f["frames_detected"] + f["frames_not_detected"] + f["frames_without_pose"]
            + f["frames_repeated_pose"] == processed)  # fmt: skip
    assert f["keyframes"] == result.n_keyframes <= f["frames_detected"]
    assert len(result.keyframe_timestamps_s) == result.n_keyframes
    assert np.all(np.diff(result.keyframe_timestamps_s) > 0)
    assert len(updates) == f["frames"] and updates[-1]["converged"]
    # Reported: JSON with the curve, a readable summary, a PLUS element.
    data = json.loads(json.dumps(result.to_dict()))
    assert len(data["curve"]) == len(curve) and data["curve"][0]["change_mm"] is None
    np.testing.assert_allclose(data["ImageToProbe"], result.image_to_probe)
    text = str(result)
    assert "converged" in text and "NOT" not in text and f"{curve[-1].n_keyframes}:" in text
    assert result.plus_transform_element().startswith('<Transform From="Image" To="Probe"')


def test_calibrate_live_command_writes_the_result(session, config, tmp_path, capsys):
    sim, seq = session
    parser = argparse.ArgumentParser(prog="freehandus")
    add_live_calibration_parser(parser.add_subparsers(dest="command", required=True))
    out, xml = tmp_path / "R.json", tmp_path / "ImageToProbe.xml"
    with ReplayServer(seq, port=0, fps=0) as server:
        args = parser.parse_args(["calibrate-live", "--port", str(server.port), "--config", str(config),
                                  "--max-frames", str(N_FRAMES), "--timeout", "60", "--out", str(out),
                                  "--plus-xml", str(xml), "--json"])  # fmt: skip
        assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == printed and data["converged"] and data["port"] == server.port
    assert target_error(sim, np.array(data["ImageToProbe"])) < 0.5
    assert len(data["curve"]) >= 3 and data["curve"][-1]["change_mm"] <= 0.05
    assert 'From="Image" To="Probe"' in xml.read_text(encoding="utf-8")
    assert args.progress is None and "keyframes" not in capsys.readouterr().err  # not a terminal: quiet
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate-live", "--max-frames", "0"])


def test_calibrate_live_shows_progress_when_asked(session, config, capsys):
    _, seq = session
    parser = argparse.ArgumentParser(prog="freehandus")
    add_live_calibration_parser(parser.add_subparsers(dest="command", required=True))
    with ReplayServer(seq, port=0, fps=0) as server:
        args = parser.parse_args(["calibrate-live", "--port", str(server.port), "--config", str(config),
                                  "--max-frames", str(N_FRAMES), "--timeout", "60", "--progress"])  # fmt: skip
        assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "converged" in captured.out
    assert f"/{N_FRAMES} frames" in captured.err and "keyframes, change" in captured.err
    assert "converged" in captured.err and "\r" in captured.err


def test_calibration_status_line_is_drawn_only_when_enabled():
    import io

    from NWireCalibrationLib.live_calibration import _CalibrationStatus

    status = {"frames": 42, "keyframes": 12, "last_change_mm": 0.1234, "converged": False}
    for enabled in (True, False):
        stream = io.StringIO()
        line = _CalibrationStatus(100, enabled=enabled, stream=stream)
        line(status)
        line({**status, "frames": 43, "last_change_mm": None})
        line.close()
        text = stream.getvalue()
        if enabled:  # the first call (a new keyframe count) is drawn at once
            assert "42/100 frames, 12 keyframes, change 0.123 mm" in text
        else:
            assert text == ""


def test_stream_without_probe_to_reference_skips_every_frame_and_says_why(session, config):
    sim, seq = session
    seq = seq.select(slice(0, 20))
    with ReplayServer(seq, port=0, fps=0, transform_names=["ProbeToTracker"]) as server:
        sink = LiveCalibrationSink(config=config)
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            summary = run_live(client, [sink], frames=20)
        finally:
            client.close()
    status = summary.sinks["0"]
    assert summary.frames == 20 and status["frames"] == 20
    assert status["frames_without_pose"] == 20 and status["keyframes"] == 0
    assert status["frames_detected"] == status["frames_not_detected"] == 0  # the detector never ran
    assert sink.detection_seconds == 0.0
    with pytest.raises(CalibrationError) as info:
        sink.result()
    message = str(info.value)
    assert "20 frames without ProbeToReference" in message
    assert "cannot resolve ProbeToReference" in message and "'Reference'" in message
    assert "transforms in the stream: ProbeToTracker" in message

    with ReplayServer(seq, port=0, fps=0, transform_names=["ProbeToTracker"]) as server:
        with pytest.raises(CalibrationError, match=r"only 0 keyframes from 20 frames.*ProbeToReference"):
            live_calibrate("127.0.0.1", server.port, config=config, max_frames=20, timeout_s=30)


@pytest.mark.parametrize("limit", ["max_frames", "timeout"])
def test_live_calibration_is_bounded_and_reports_no_convergence(session, config, limit):
    sim, _ = session
    seq = sim.sequence  # every frame tracked
    if limit == "max_frames":
        options = {"max_frames": 16, "timeout_s": 60}
        server_fps = 0
    else:
        options = {"max_frames": 10_000, "timeout_s": 1.8}
        server_fps = 10  # at most 19 frames in 1.8 s: fewer than min_keyframes (20), cannot converge
    with ReplayServer(seq, port=0, fps=server_fps) as server:
        result = live_calibrate("127.0.0.1", server.port, config=config, client_options=BIG_QUEUE, **options)
    assert not result.converged and result.stop_reason == limit
    assert any("did not converge" in w for w in result.warnings)
    assert "NOT converged" in str(result)
    assert result.n_keyframes >= 10 and len(result.curve) >= 1
    assert np.all(np.isfinite(result.image_to_probe))
    if limit == "max_frames":
        assert result.frames["frames"] == 16
    else:
        assert result.frames["frames"] <= 19 and result.seconds < 1.8 + TIMEOUT


def test_stop_event_ends_a_live_calibration(session, config):
    sim, _ = session
    stop = threading.Event()
    stop.set()  # already asked to stop: nothing is calibrated, and the error says so
    with ReplayServer(sim.sequence, port=0, fps=30, loop=True) as server:
        with pytest.raises(CalibrationError, match="only 0 keyframes"):
            live_calibrate("127.0.0.1", server.port, config=config, stop_event=stop, timeout_s=10)


def paired_frame(sim, index, **extra_transforms) -> PairedFrame:
    """Frame ``index`` of the simulation as the pairer would deliver it (plus extra transforms)."""
    transforms = {name: (ft.matrices[index], bool(ft.valid[index])) for name, ft in sim.sequence.transforms.items()}
    transforms.update(extra_transforms)
    return PairedFrame(timestamp_s=float(index), frame=sim.sequence.frames[index], transforms=transforms)


def test_sink_resolves_probe_to_reference_from_transforms_only(session, config):
    sim, _ = session
    sink = LiveCalibrationSink(config=config)
    truth = probe_to_reference(sim.sequence)
    np.testing.assert_allclose(sink.probe_to_reference(paired_frame(sim, 5)), truth[5], atol=1e-9)
    # Transforms involving the image frame already contain a calibration: never part of the chain.
    image_only = {"ProbeToTracker": (sim.sequence.transforms["ProbeToTracker"].matrices[5], True),
                  "ImageToProbe": (sim.image_to_probe, True),
                  "ImageToReference": (truth[5] @ sim.image_to_probe, True)}  # fmt: skip
    frame = PairedFrame(timestamp_s=5.0, frame=sim.sequence.frames[5], transforms=image_only)
    assert np.all(np.isnan(sink.probe_to_reference(frame)))
    assert "cannot resolve ProbeToReference" in sink.pose_problem
    # A repeated pose is skipped before the detector runs; an untracked frame too.
    sink(paired_frame(sim, 0))
    seconds = sink.detection_seconds
    sink(paired_frame(sim, 0))
    lost = paired_frame(sim, 1, ReferenceToTracker=(np.eye(4), False))
    sink(lost)
    status = sink.status()
    assert status["frames"] == 3 and status["frames_detected"] == 1 and status["keyframes"] == 1
    assert status["frames_repeated_pose"] == 1 and status["frames_without_pose"] == 1
    assert sink.detection_seconds == seconds
    assert "invalid in some frames" in sink.pose_problem


def test_bad_options_are_rejected_with_a_clear_message(session, config):
    sim, _ = session
    with pytest.raises(DetectionError, match="no phantom"):
        LiveCalibrationSink()
    with pytest.raises(DetectionError, match="pixel spacing"):
        LiveCalibrationSink(phantom="fCal-2.0")
    with pytest.raises(CalibrationError, match="PhantomToReference"):
        LiveCalibrationSink(phantom="fCal-2.0", pixel_spacing_mm=0.3, phantom_pose="known")
    with pytest.raises(ValueError, match="phantom_pose"):
        LiveCalibrationSink(config=config, phantom_pose="guess")
    with pytest.raises(ValueError, match="detector"):
        LiveCalibrationSink(config=config, detector="magic")
    with pytest.raises(ValueError, match="max_frames"):
        live_calibrate("127.0.0.1", 1, config=config, max_frames=0)
    with pytest.raises(ValueError, match="timeout_s"):
        live_calibrate("127.0.0.1", 1, config=config, timeout_s=0)
    with pytest.raises(IGTLConnectionError, match="no OpenIGTLink server answered"):
        live_calibrate("127.0.0.1", free_port(), config=config, connect_timeout_s=0.3, timeout_s=5)
    sink = LiveCalibrationSink(phantom="fCal-2.0", pixel_spacing_mm=0.3)
    assert sink.phantom_to_reference is None  # auto without a registration: estimated
    with pytest.raises(CalibrationError, match="no frame was received"):
        sink.result()


def test_the_stream_transport_does_not_import_calibration():
    # live calibration belongs to the calibration capability; the ground floor's stream
    # transport it runs on knows nothing of it
    code = ("import sys, FreehandUSLib.igtl, FreehandUSLib.igtl.live, FreehandUSLib.igtl.cli; "
            "sys.exit(1 if 'NWireCalibrationLib' in sys.modules else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

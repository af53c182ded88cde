"""Faults with a real process boundary: the replay server killed, stalled and restarted; a client
that never reads; five recorders at once; a recorder killed with SIGKILL.

Everything runs on 127.0.0.1, bounded in time; every process started is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from igtl_testing import (
    PYTHON,
    assert_transforms_close,
    frame_index,
    free_port,
    make_stream_sequence,
    running,
    serve_args,
    wait_for_port_line,
)

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.igtl import IGTLClient, StreamRecorder, record_stream
from FreehandUSLib.io import read_sequence, write_sequence

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 20.0


def pump(client, recorder, until, *, max_messages=20_000, timeout_s=TIMEOUT):
    """Feed the client's messages to the recorder until ``until()``; bounded in count and time."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max_messages):
        if until():
            return
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s} s"
        message = client.get(timeout_s=0.2)
        if message is not None:
            recorder.add(message)
    raise AssertionError("too many messages")


def check_against_source(seq, recorded, frames):
    """Every recorded frame equals its source frame (pixels, transforms where valid)."""
    for k in frames:
        i = frame_index(recorded.frames[k])
        np.testing.assert_array_equal(recorded.frames[k], seq.frames[i])
        for name, ft in seq.transforms.items():
            got = recorded.transforms[name]
            if got.valid[k]:
                assert ft.valid[i], f"frame {k} (source {i}): {name} valid but the source's is not"
                assert_transforms_close(got.matrices[k], ft.matrices[i])


def test_server_killed_mid_stream_client_reconnects_recording_stays_valid(tmp_path):
    seq = make_stream_sequence(50, 48, 64, invalid_reference=[7])
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    events = []
    out = tmp_path / "rec.igs.mhd"
    recorder = StreamRecorder(out)
    common = ["--fps", "60", "--loop", "--timestamps", "original"]
    with running(serve_args(source, "--port", "0", *common)) as (proc, reader):
        port = wait_for_port_line(reader)
        client = IGTLClient(
            "127.0.0.1", port, reconnect_delay_s=0.05, reconnect_max_delay_s=0.2,
            on_state=lambda state, detail: events.append((state, detail)),
        ).start()  # fmt: skip
        try:
            pump(client, recorder, lambda: recorder.frames >= 25)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
            assert client.wait_for_state(("disconnected", "connecting"), TIMEOUT)
            for message in client.drain():
                recorder.add(message)
            # What is on disk now is a valid sequence of every frame written before the kill.
            before = read_sequence(out)
            n_before = before.n_frames
            assert n_before == recorder.frames >= 25
            indices = [frame_index(f) for f in before.frames]
            assert np.all(np.diff(indices) % seq.n_frames == 1), "a frame is missing before the kill"
            check_against_source(seq, before, range(n_before))
        except BaseException:
            client.close()
            raise
    try:
        with running(serve_args(source, "--port", str(port), *common)) as (proc2, reader2):
            wait_for_port_line(reader2)
            assert client.wait_for_connects(2, TIMEOUT)
            pump(client, recorder, lambda: recorder.frames >= n_before + 15)
    finally:
        client.close()
    summary = recorder.close()
    after = read_sequence(out)
    assert after.n_frames == summary.frames >= n_before + 15
    np.testing.assert_array_equal(after.frames[:n_before], before.frames)
    check_against_source(seq, after, range(after.n_frames))
    # the restarted server replays from its first frame: the pairing restarted, nothing was lost
    restart = [frame_index(f) for f in after.frames[n_before + 1 :]]
    assert restart[:3] == [0, 1, 2] or restart[:3] == [1, 2, 3]
    states = [s for s, _ in events]
    assert states.count("connected") >= 2 and "disconnected" in states
    assert client.stats().stream["crc_errors"] == 0


def record_args(port, out, *extra) -> list:
    """Command line of ``record`` run as a separate Python process."""
    return [PYTHON, "-m", "FreehandUSLib.igtl.cli", "record", "--port", str(port), "--out", str(out), *extra]


def wait_until(predicate, timeout_s=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        time.sleep(0.05)


def frames_on_disk(path) -> int:
    """Frames a recording in progress holds now (0 while it has none or does not exist yet)."""
    try:
        return read_sequence(path).n_frames
    except FreehandUSError:
        return 0


def test_stalled_server_every_absent_frame_is_counted(tmp_path):
    """The server process is stopped (SIGSTOP) for 2.5 s mid-recording: whatever was lost on the
    way (the stalled connection is dropped and remade), recorded + missing frames cover the
    whole span of the stream, in the summary and in the file."""
    seq = make_stream_sequence(30, 24, 32)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    out = tmp_path / "stall.igs.mhd"
    with running(serve_args(source, "--port", "0", "--fps", "30", "--loop")) as (proc, reader):
        port = wait_for_port_line(reader)

        def stall():
            time.sleep(1.5)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                time.sleep(2.5)
            finally:
                os.kill(proc.pid, signal.SIGCONT)

        staller = threading.Thread(target=stall, daemon=True)
        staller.start()
        try:
            summary = record_stream(
                "127.0.0.1", port, out, duration_s=6.0, connect_timeout_s=TIMEOUT,
                client_options={"stall_timeout_s": 0.7, "reconnect_delay_s": 0.05, "reconnect_max_delay_s": 0.2},
            )  # fmt: skip
        finally:
            staller.join(TIMEOUT)
            os.kill(proc.pid, signal.SIGCONT)
    assert summary.disconnects >= 1  # the stall was seen
    span = round(summary.duration_s * 30) + 1
    assert summary.frames + summary.missing_frames == span, summary
    got = read_sequence(out)
    assert got.n_frames == summary.frames
    assert int(got.metadata["RecordingMissingFrames"]) == summary.missing_frames
    assert int(got.metadata["RecordingDisconnects"]) == summary.disconnects
    marked = [int(v) for v in got.frame_fields.get("MissingFramesBefore", []) if v]
    assert sum(marked) == summary.missing_frames


def test_server_killed_and_restarted_record_stream_goes_on(tmp_path):
    seq = make_stream_sequence(40, 24, 32)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    out = tmp_path / "restart.igs.mhd"
    port = free_port()
    result = {}

    def record():
        result["summary"] = record_stream("127.0.0.1", port, out, frames=90, connect_timeout_s=TIMEOUT,
                                          reconnect_timeout_s=TIMEOUT)  # fmt: skip

    recorder = threading.Thread(target=record, daemon=True)
    with running(serve_args(source, "--port", str(port), "--fps", "60", "--loop")) as (proc, reader):
        wait_for_port_line(reader)
        recorder.start()
        wait_until(lambda: frames_on_disk(out) >= 20, what="20 frames recorded")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
    before = frames_on_disk(out)
    with running(serve_args(source, "--port", str(port), "--fps", "60", "--loop")) as (proc2, reader2):
        wait_for_port_line(reader2)
        recorder.join(TIMEOUT * 2)
        assert not recorder.is_alive()
    summary = result["summary"]
    assert summary.stopped == "frames" and summary.frames == 90 and summary.disconnects >= 1
    got = read_sequence(out)
    assert got.n_frames == 90
    np.testing.assert_array_equal(got.frames[:before], read_sequence(out).frames[:before])
    check_against_source(seq, got, range(got.n_frames))


def test_dead_server_recorder_shows_reconnecting_and_stops_keeping_the_frames(tmp_path):
    """``record --frames N`` (a separate process, stderr not a terminal) against a server that is
    killed: one line says it is reconnecting, it stops after --reconnect-timeout with exit 1 and
    the frames recorded, and it never writes a carriage return (no progress spam in logs)."""
    seq = make_stream_sequence(30, 24, 32)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    out = tmp_path / "dead.igs.mha"
    with running(serve_args(source, "--port", "0", "--fps", "60", "--loop")) as (server, reader):
        port = wait_for_port_line(reader)
        with running(record_args(port, out, "--frames", "100000", "--reconnect-timeout", "1.5")) as (rec, rec_out):
            wait_until(lambda: frames_on_disk(tmp_path / "dead.igs.mhd") >= 20, what="20 frames recorded")
            os.kill(server.pid, signal.SIGKILL)
            server.wait(TIMEOUT)
            t_kill = time.monotonic()
            assert rec.wait(TIMEOUT) == 1
            assert time.monotonic() - t_kill < 1.5 + 8
            rec_out.wait_for(lambda line: False, 2.0)  # collect the rest of the output
            text = rec_out.text()
    assert "reconnecting for up to 1.5 s" in text and "\r" not in text
    assert "error: server gone: no connection to 127.0.0.1:" in text
    got = read_sequence(out)
    assert got.n_frames >= 20 and f"recorded {got.n_frames} frames to {out}" in text
    check_against_source(seq, got, range(got.n_frames))


def test_a_client_that_never_reads_is_cut_loose_without_costing_others_a_frame(tmp_path):
    seq = make_stream_sequence(30, 480, 640)  # 300 kB frames fill the stuck client's buffers fast
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    with running(serve_args(source, "--port", "0", "--fps", "30", "--loop")) as (proc, reader):
        port = wait_for_port_line(reader)
        stuck = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            summary = record_stream("127.0.0.1", port, tmp_path / "rec.igs.mhd", duration_s=8.0,
                                    connect_timeout_s=TIMEOUT)  # fmt: skip
            line = reader.wait_for(lambda s: "took no data" in s, TIMEOUT)
        finally:
            stuck.close()
    assert line is not None and "disconnected" in line, reader.text()
    assert "is not keeping up: dropping data for it" in reader.text()
    assert (summary.dropped, summary.missing_frames, summary.gaps, summary.disconnects) == (0, 0, 0, 0), summary
    assert summary.frames >= 8 * 30 - 5
    got = read_sequence(tmp_path / "rec.igs.mhd")
    assert np.all(np.diff([frame_index(f) for f in got.frames]) % seq.n_frames == 1)


def test_five_recorders_at_once(tmp_path):
    seq = make_stream_sequence(30, 48, 64)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    with running(serve_args(source, "--port", "0", "--fps", "30", "--loop")) as (proc, reader):
        port = wait_for_port_line(reader)
        with contextlib.ExitStack() as stack:
            recs = [
                stack.enter_context(running(record_args(port, tmp_path / f"r{k}.igs.mha", "--frames", "60", "--json")))
                for k in range(5)
            ]
            for rec, _ in recs:
                assert rec.wait(TIMEOUT * 3) == 0
    for k, (_, out) in enumerate(recs):
        out.wait_for(lambda line: False, 1.0)
        summary = json.loads(out.text()[out.text().index("{"):])
        assert (summary["frames"], summary["dropped"], summary["missing_frames"]) == (60, 0, 0), summary
        got = read_sequence(tmp_path / f"r{k}.igs.mha")
        assert got.n_frames == 60
        assert np.all(np.diff([frame_index(f) for f in got.frames]) % seq.n_frames == 1)
        check_against_source(seq, got, range(60))


def test_recorder_killed_with_sigkill_loses_nothing_committed(tmp_path):
    seq = make_stream_sequence(30, 24, 32)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    out = tmp_path / "killed.igs.mha"
    working = tmp_path / "killed.igs.mhd"
    with running(serve_args(source, "--port", "0", "--fps", "60", "--loop")) as (server, reader):
        port = wait_for_port_line(reader)
        with running(record_args(port, out, "--duration", "60")) as (rec, _):
            wait_until(lambda: frames_on_disk(working) >= 30, what="30 frames recorded")
            seen = frames_on_disk(working)
            time.sleep(0.3)  # kill it somewhere in the middle of writing frames
            os.kill(rec.pid, signal.SIGKILL)
            rec.wait(TIMEOUT)
    got = read_sequence(working)  # the unfinished recording loads as it is
    assert got.n_frames >= seen + 5  # ~18 more frames were sent in 0.3 s: at most the one in flight is lost
    assert np.all(np.diff([frame_index(f) for f in got.frames]) % seq.n_frames == 1)
    check_against_source(seq, got, range(got.n_frames))
    assert not out.exists()
    # and it is never replaced by the next recording to the same name
    done = subprocess.run(record_args(free_port(), out, "--frames", "2"), capture_output=True, text=True,
                          timeout=TIMEOUT * 3)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"freehandus record: error: {working} exists: an unfinished recording to killed.igs.mha (it loads as it is); "
        "a recording never replaces a file; choose another --out, or --overwrite to move the old files to a backup "
        "folder"
    ]
    assert read_sequence(working).n_frames == got.n_frames


def test_ctrl_c_finishes_the_recording_and_exits_130(tmp_path):
    seq = make_stream_sequence(30, 24, 32)
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    out = tmp_path / "interrupted.igs.mha"
    with running(serve_args(source, "--port", "0", "--fps", "60", "--loop")) as (server, reader):
        port = wait_for_port_line(reader)
        with running(record_args(port, out, "--duration", "60")) as (rec, rec_out):
            wait_until(lambda: frames_on_disk(tmp_path / "interrupted.igs.mhd") >= 10, what="10 frames recorded")
            os.kill(rec.pid, signal.SIGINT)
            assert rec.wait(TIMEOUT) == 130
            rec_out.wait_for(lambda line: False, 1.0)
        os.kill(server.pid, signal.SIGINT)
        assert server.wait(TIMEOUT) == 130
    got = read_sequence(out)  # converted: the Ctrl-C ended the recording cleanly
    assert not (tmp_path / "interrupted.igs.mhd").exists()
    assert f"recorded {got.n_frames} frames to {out}" in rec_out.text() and got.n_frames >= 10
    check_against_source(seq, got, range(got.n_frames))

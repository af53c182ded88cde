"""No recording is ever lost: refused overwrites, backups, remote commands confined to a fresh
folder, crash-safe appends, thousands of transform names, gaps counted, a server that is gone.

Everything runs on 127.0.0.1 in this process (the process-level faults are in test_igtl_faults.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest
from igtl_testing import frame_index, free_port, make_stream_sequence

from FreehandUSLib.igtl import IGTLClient, IGTLServer, ReplayServer, StreamRecorder, record_stream
from FreehandUSLib.igtl import recorder as recorder_module
from FreehandUSLib.igtl.cli import _exposure_warning, _is_loopback, _StatusLine, main
from FreehandUSLib.igtl.protocol import ImageMessage, TransformMessage
from FreehandUSLib.igtl.recorder import (
    IncrementalSequenceFile,
    RecordingExistsError,
    RecordingStatus,
    prepare_output,
)
from FreehandUSLib.errors import FileFormatError, SequenceError
from FreehandUSLib.io import read_sequence, write_sequence

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 20.0


def snapshot(folder):
    """{name: bytes} of every file in ``folder`` (to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def served(tmp_path):
    """A replay server at 100 fps (looping) of a 20-frame sequence; yields (server, sequence)."""
    seq = make_stream_sequence(20, 24, 32)
    with ReplayServer(seq, port=0, fps=100, loop=True, timestamps="original", output_dir=tmp_path / "remote") as s:
        yield s, seq


# -------------------------------------------------------------------------------------------
# 1. record --out never replaces a recording
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["old.igs.mhd", "old.seq.nrrd", "old.igs.mha"])
def test_record_refuses_an_existing_output_and_leaves_it_untouched(tmp_path, capsys, name):
    write_sequence(make_stream_sequence(5), tmp_path / name)
    before = snapshot(tmp_path)
    port = free_port()  # nothing listens: the refusal must come before any connection attempt
    rc = main(["record", "--port", str(port), "--out", str(tmp_path / name), "--frames", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / name} exists" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


def test_unfinished_recording_is_named_and_kept(tmp_path, capsys):
    """A crash while recording to x.igs.mha leaves x.igs.mhd + x.igs.raw: the error names that
    file and says what it is (not "int.igs.mhd exists" for a file the user did not ask for)."""
    f = IncrementalSequenceFile(tmp_path / "x.igs.mha", frame_shape=(4, 5), dtype=np.uint8)
    for i in range(3):
        f.append(np.full((4, 5), i, np.uint8), 1.0 + i)
    # no close(): what a killed recorder leaves
    before = snapshot(tmp_path)
    assert set(before) == {"x.igs.mhd", "x.igs.raw"}
    rc = main(["record", "--port", str(free_port()), "--out", str(tmp_path / "x.igs.mha"), "--frames", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'x.igs.mhd'} exists: an unfinished recording to x.igs.mha (it loads as it is)" in err
    assert snapshot(tmp_path) == before
    assert read_sequence(tmp_path / "x.igs.mhd").n_frames == 3


def test_overwrite_moves_the_old_recording_to_a_backup_that_still_loads(tmp_path, served, capsys):
    server, seq = served
    out = tmp_path / "rec.igs.mhd"
    old = make_stream_sequence(7, 24, 32, seed=3)
    write_sequence(old, out, compress=False)
    rc = main(["record", "--port", str(server.port), "--out", str(out), "--frames", "4", "--overwrite", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    backup = tmp_path / summary["backup"]
    assert backup.parent == tmp_path and backup.name.startswith("rec.igs.mhd.backup-")
    assert sorted(p.name for p in backup.iterdir()) == ["rec.igs.mhd", "rec.igs.raw"]
    np.testing.assert_array_equal(read_sequence(backup / "rec.igs.mhd").frames, old.frames)
    assert read_sequence(out).n_frames == 4 == summary["frames"]


def test_overwrite_with_nothing_recorded_keeps_the_old_file_in_place(tmp_path):
    out = tmp_path / "rec.igs.mhd"
    write_sequence(make_stream_sequence(3), out, compress=False)
    before = snapshot(tmp_path)
    rec = StreamRecorder(out, overwrite=True)
    summary = rec.close()
    assert summary.frames == 0 and summary.backup == ""
    assert snapshot(tmp_path) == before


def test_prepare_output_names_every_file_in_the_way(tmp_path):
    (tmp_path / "a.igs.raw").write_bytes(b"pixels of another recording")
    with pytest.raises(RecordingExistsError, match="a.igs.raw exists and would be replaced by a recording to a.igs"):
        prepare_output(tmp_path / "a.igs.mhd")
    os.symlink(tmp_path / "nowhere", tmp_path / "b.igs.mha")  # a dangling link is in the way too
    with pytest.raises(RecordingExistsError, match="b.igs.mha exists"):
        prepare_output(tmp_path / "b.igs.mha")
    assert prepare_output(tmp_path / "c.igs.mha") is None


def test_conversion_at_close_does_not_replace_a_file_that_appeared(tmp_path):
    f = IncrementalSequenceFile(tmp_path / "late.igs.mha", frame_shape=(2, 3), dtype=np.uint8)
    f.append(np.ones((2, 3), np.uint8), 1.0)
    (tmp_path / "late.igs.mha").write_bytes(b"someone else's file")
    final = f.close()
    assert final == tmp_path / "late.igs.mhd"  # the recording stays in the .mhd
    assert (tmp_path / "late.igs.mha").read_bytes() == b"someone else's file"
    assert read_sequence(final).n_frames == 1


# -------------------------------------------------------------------------------------------
# 2. serve: remote commands never replace a file; a fresh default folder
# -------------------------------------------------------------------------------------------
def test_remote_commands_cannot_replace_the_served_file_or_any_other(tmp_path):
    seq = make_stream_sequence(21, 24, 32)
    served_path = write_sequence(seq, tmp_path / "served.igs.mha")
    (tmp_path / "taken.igs.mhd").write_text("not a recording")
    os.symlink("/etc/hostname", tmp_path / "link.igs.mha")
    before = snapshot(tmp_path)
    from FreehandUSLib.reconstruction.live import reconstruct_for_command

    with ReplayServer(read_sequence(served_path), port=0, fps=100, loop=True, output_dir=tmp_path,
                      reconstruct_command=reconstruct_for_command) as server:  # fmt: skip
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            for name in ("served.igs.mha", "../served.igs.mha", "taken.igs.mhd", "taken.igs.mha", "link.igs.mha"):
                reply = client.command("StartRecording", OutputFilename=name)
                assert not reply.ok, name
                assert "exists" in reply.message and "never replaces" in reply.message, reply.message
            reply = client.command("ReconstructVolume", InputSeqFilename="link.igs.mha")
            assert reply.ok is False and "link.igs.mha" in reply.message, reply.message
        finally:
            client.close()
    assert snapshot(tmp_path) == before
    assert read_sequence(served_path).n_frames == 21


def test_default_output_folder_is_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seq = make_stream_sequence(10, 8, 8)
    with ReplayServer(seq, port=0, fps=200, loop=True) as server:
        folder = server.output_dir
        assert folder.parent == tmp_path and folder.name.startswith("freehandus-serve-")
        assert not folder.exists()  # created when first written
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            reply = client.command("StartRecording", OutputFilename="r.igs.mhd")
            assert reply.ok and reply.message == str(folder / "r.igs.mhd")
            assert client.wait_for(lambda s: s.by_type.get("IMAGE", 0) >= 10, TIMEOUT)
            assert client.command("StopRecording").ok
        finally:
            client.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    assert read_sequence(folder / "r.igs.mhd").n_frames >= 1


def test_a_full_disk_ends_the_server_side_recording_not_the_stream(tmp_path, monkeypatch):
    real = IncrementalSequenceFile.append

    def append(self, *args, **kwargs):
        if self.n_frames >= 5:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(IncrementalSequenceFile, "append", append)
    seq = make_stream_sequence(10, 8, 8)
    with ReplayServer(seq, port=0, fps=200, loop=True, output_dir=tmp_path) as server:
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            assert client.command("StartRecording", OutputFilename="s.igs.mhd").ok
            seen = client.stats().by_type.get("IMAGE", 0)
            assert client.wait_for(lambda s: s.by_type.get("IMAGE", 0) >= seen + 40, TIMEOUT)  # still streaming
            reply = client.command("StopRecording")
            assert not reply.ok and "not in progress" in reply.message
        finally:
            client.close()
    assert read_sequence(tmp_path / "s.igs.mhd").n_frames == 5


def test_create_links_into_place_and_refuses_header_plus_data(tmp_path):
    seq = make_stream_sequence(3, 4, 4)
    server = ReplayServer(seq, port=0, output_dir=tmp_path)
    path = server._create("v.nrrd", ".mha", lambda p: p.write_bytes(b"first"))
    assert path.read_bytes() == b"first"
    from FreehandUSLib.errors import FreehandUSError

    with pytest.raises(FreehandUSError, match="v.nrrd exists in the output folder"):
        server._create("v.nrrd", ".mha", lambda p: p.write_bytes(b"second"))
    with pytest.raises(FreehandUSError, match="one file"):
        server._create("v.mhd", ".mha", lambda p: p.write_bytes(b"x"))
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]  # no temporary file left


@pytest.mark.parametrize("paced", [True, False])
def test_a_stuck_client_costs_a_reading_client_nothing(paced):
    """Paced broadcasts (timeout 0) never wait for the stuck client; back-pressure broadcasts
    (the replay's fps=0) wait for it at most send_timeout_s, then it is cut loose."""
    frame = np.zeros((320, 320), np.uint8)  # 100 kB: the stuck client's buffers fill quickly
    with IGTLServer("127.0.0.1", 0, send_timeout_s=1.0, client_queue_size=32) as server:
        reader = IGTLClient("127.0.0.1", server.port, queue_size=1000, queue_bytes=1 << 30).start()
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        try:
            assert server.wait_for_clients(2, TIMEOUT) and reader.wait_for_state("connected", TIMEOUT)
            t0 = time.monotonic()
            for i in range(300):
                server.broadcast([ImageMessage.from_frame(frame, device_name="Image", timestamp_s=1.0 + i)],
                                 timeout_s=0 if paced else None)  # fmt: skip
                if paced:
                    time.sleep(1 / 100)
            elapsed = time.monotonic() - t0
            assert reader.wait_for(lambda st: st.received >= 300, TIMEOUT), reader.stats()
            deadline = time.monotonic() + TIMEOUT
            while server.stats().clients_cut < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = server.stats()
        finally:
            reader.close()
            stuck.close()
    assert reader.stats().dropped == 0
    assert stats.clients_cut == 1 and stats.dropped >= 1 and stats.clients_now <= 1
    if not paced:
        assert elapsed < 1.0 + 5.0  # waited for the stuck client once (at most send_timeout_s), not per frame


# -------------------------------------------------------------------------------------------
# 4. crash-safe, cheap appends
# -------------------------------------------------------------------------------------------
def test_every_moment_of_an_append_leaves_a_loadable_file(tmp_path, monkeypatch):
    """Replay the writes of a recording one by one (and each write cut at every page boundary,
    where a kill could cut it) onto a copy: after each, the copy loads with every frame whose
    header lines are complete, the pixels of the frame in flight at most missing."""
    writes = []
    real = recorder_module._pwrite_all

    def recording_pwrite(fd, data, offset):
        writes.append((bytes(data), offset))
        real(fd, data, offset)

    monkeypatch.setattr(recorder_module, "_pwrite_all", recording_pwrite)
    names = [f"Tool{k}WithALongName{k}ToTracker" for k in range(12)]  # long lines: pages are crossed
    f = IncrementalSequenceFile(tmp_path / "rec.igs.mhd", frame_shape=(3, 4), dtype=np.uint8,
                                transform_names=names[:2])  # fmt: skip
    for i in range(40):
        m = np.eye(4)
        m[:3, 3] = [i, 2 * i, 3 * i]
        f.append(np.full((3, 4), i, np.uint8), 10.0 + i / 30, {n: (m, (i + k) % 3 > 0) for k, n in enumerate(names)})
    raw = (tmp_path / "rec.igs.raw").read_bytes()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "rec.igs.raw").write_bytes(raw)
    header = bytearray()
    loads = []
    for data, offset in writes:
        page_cuts = range((offset // 4096 + 1) * 4096 - offset, len(data), 4096)
        for cut in [*page_cuts, len(data)]:  # a kill can cut a write only where a page ends
            state = bytearray(header)
            state[offset : offset + cut] = data[:cut]
            (copy / "rec.igs.mhd").write_bytes(bytes(state))
            try:
                got = read_sequence(copy / "rec.igs.mhd")
            except (FileFormatError, SequenceError):
                assert not loads, "a file that loaded stopped loading"
                continue  # the header of an empty recording: nothing recorded yet
            assert [int(v) for v in got.frames[:, 0, 0]] == list(range(got.n_frames))
            loads.append(got.n_frames)
        header = state
    assert len(loads) > 80 and loads == sorted(loads) and loads[-1] == 40
    f.close()
    got = read_sequence(tmp_path / "rec.igs.mhd")
    assert got.n_frames == 40
    for k, n in enumerate(names):
        np.testing.assert_array_equal(got.transforms[n].valid, [(i + k) % 3 > 0 for i in range(40)], err_msg=n)
    np.testing.assert_allclose(got.transforms[names[5]].matrices[8][:3, 3], [8, 16, 24])
    lines = (tmp_path / "rec.igs.mhd").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(line.strip() for line in lines[:-1])  # compacted: no blank line


def test_thousands_of_transform_names_cost_the_same_per_frame(tmp_path, monkeypatch):
    """55 new names per frame, 20,075 in all: the header is only appended to (bytes written stay
    within a small factor of its final size, never the quadratic rewrite) and each name is valid
    in the one frame that carried it."""
    written = [0]
    real = recorder_module._pwrite_all

    def counting(fd, data, offset):
        written[0] += len(data)
        real(fd, data, offset)

    monkeypatch.setattr(recorder_module, "_pwrite_all", counting)
    rec = StreamRecorder(tmp_path / "many.igs.mhd")
    frame = np.zeros((16, 20), np.uint8)
    k = 0
    t0 = time.perf_counter()
    for i in range(365):
        t = 1000.0 + i / 30
        rec.add(ImageMessage.from_frame(frame, device_name="Image", timestamp_s=t))
        for _ in range(55):
            rec.add(TransformMessage(matrix=np.eye(4), device_name=f"T{k}ToTracker", timestamp_s=t))
            k += 1
    seconds = time.perf_counter() - t0
    summary = rec.close()
    assert summary.frames == 365 and len(summary.transforms) == k == 20_075
    size = (tmp_path / "many.igs.mhd").stat().st_size
    assert written[0] < 2 * size + 365 * 4096
    assert seconds < 30  # the quadratic rewrite took over a minute on the same machine
    got = read_sequence(tmp_path / "many.igs.mhd")
    assert got.n_frames == 365
    for name in ("T0ToTracker", "T10000ToTracker", "T20074ToTracker"):
        assert got.transforms[name].valid.sum() == 1
    assert got.transforms["T10000ToTracker"].valid[10000 // 55]
    assert "and 20065 more transforms" in str(summary)


def test_the_first_64_names_are_written_in_every_frame_others_where_valid(tmp_path):
    """As PLUS writes them (every frame lists every transform) while there are few names; past 64
    names a transform appears only where it is valid (reads as INVALID elsewhere)."""
    f = IncrementalSequenceFile(tmp_path / "n.igs.mhd", frame_shape=(2, 2), dtype=np.uint8)
    frame = np.zeros((2, 2), np.uint8)
    f.append(frame, 1.0, {f"T{k}ToTracker": (np.eye(4), True) for k in range(70)})
    f.append(frame, 2.0, {"T1ToTracker": (np.eye(4), False), "T69ToTracker": (np.eye(4), False)})
    f.append(frame, 3.0, {"T69ToTracker": (np.eye(4), True)})
    f.close()
    text = (tmp_path / "n.igs.mhd").read_text()
    assert "Seq_Frame0001_T1ToTrackerTransformStatus = INVALID" in text
    assert "Seq_Frame0002_T63ToTrackerTransformStatus = INVALID" in text
    assert "Seq_Frame0001_T69ToTracker" not in text and "Seq_Frame0002_T69ToTrackerTransformStatus = OK" in text
    got = read_sequence(tmp_path / "n.igs.mhd")
    np.testing.assert_array_equal(got.transforms["T69ToTracker"].valid, [True, False, True])
    np.testing.assert_array_equal(got.transforms["T1ToTracker"].valid, [True, False, False])


def test_duration_is_honoured_with_thousands_of_names(tmp_path):
    """A server streaming an image and 55 new transform names per frame at 30 fps; record_stream
    for 2 s must end in time and keep up."""
    frame = np.zeros((32, 40), np.uint8)
    with IGTLServer("127.0.0.1", 0) as server:
        stop = False

        def stream():
            k = 0
            i = 0
            t0 = time.time()
            while not stop:
                t = time.time()
                server.broadcast([ImageMessage.from_frame(frame, device_name="Image", timestamp_s=t)]
                                 + [TransformMessage(matrix=np.eye(4), device_name=f"T{k + j}ToTracker", timestamp_s=t)
                                    for j in range(55)], timeout_s=0)  # fmt: skip
                k += 55
                i += 1
                time.sleep(max(0.0, t0 + i / 30 - time.time()))

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        try:
            t0 = time.monotonic()
            summary = record_stream("127.0.0.1", server.port, tmp_path / "d.igs.mhd", duration_s=2.0)
            elapsed = time.monotonic() - t0
        finally:
            stop = True
            thread.join(TIMEOUT)
    assert elapsed < 2.0 + 1.0 + 2.0  # duration + drain + margin for a loaded machine
    assert summary.stopped == "duration"
    assert summary.frames >= 40
    assert read_sequence(tmp_path / "d.igs.mhd").n_frames == summary.frames


# -------------------------------------------------------------------------------------------
# 5. missing frames are counted
# -------------------------------------------------------------------------------------------
def test_a_ten_second_gap_is_counted_in_the_summary_and_the_file(tmp_path):
    seq = make_stream_sequence(20, 8, 8)
    rec = StreamRecorder(tmp_path / "gap.igs.mha")
    # frames 0-9, then 10 s + one interval later frames 310-319 of a 30 fps stream: 300 missing
    times = [1000.0 + i / 30 for i in range(10)] + [1000.0 + i / 30 for i in range(310, 320)]
    for i, t in enumerate(times):
        rec.add(ImageMessage.from_frame(seq.frames[i], device_name="Image", timestamp_s=t))
        rec.add(TransformMessage(matrix=seq.transforms["ProbeToTracker"].matrices[i], device_name="ProbeToTracker",
                                 timestamp_s=t))  # fmt: skip
    summary = rec.close(dropped=3)
    assert (summary.frames, summary.missing_frames, summary.gaps) == (20, 300, 1)
    assert summary.largest_gap_s == pytest.approx(301 / 30)
    assert "missing 300 frame(s) in 1 gap(s)" in str(summary)
    got = read_sequence(tmp_path / "gap.igs.mha")
    assert got.metadata["RecordingMissingFrames"] == "300"
    assert got.metadata["RecordingGaps"] == "1"
    assert got.metadata["RecordingDroppedMessages"] == "3"
    assert got.frame_fields["MissingFramesBefore"][10] == "300"
    assert [v for i, v in enumerate(got.frame_fields["MissingFramesBefore"]) if i != 10] == [""] * 19


def test_jitter_and_a_restarted_source_are_not_gaps(tmp_path):
    rng = np.random.default_rng(1)
    rec = StreamRecorder(tmp_path / "j.igs.mhd")
    t = 50.0 + np.arange(60) / 30 + rng.uniform(-0.004, 0.004, 60)
    t[30:] -= 40.0  # the source restarted
    for v in t:
        rec.add(ImageMessage.from_frame(np.zeros((2, 2), np.uint8), device_name="Image", timestamp_s=float(v)))
    summary = rec.close()
    assert summary.frames == 60 and summary.missing_frames == 0 and summary.gaps == 0


# -------------------------------------------------------------------------------------------
# 6. a server that is gone: reconnecting is shown, the recording stops and is kept
# -------------------------------------------------------------------------------------------
def test_record_stops_after_the_reconnect_timeout_keeping_the_frames(tmp_path, caplog):
    seq = make_stream_sequence(20, 8, 8)
    server = ReplayServer(seq, port=0, fps=100, loop=True, timestamps="original", output_dir=tmp_path).start()
    stopper = None
    try:
        def stop_later():
            deadline = time.monotonic() + TIMEOUT
            while server.stats.frames_sent < 30 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.stop()

        stopper = threading.Thread(target=stop_later, daemon=True)
        stopper.start()
        with caplog.at_level(logging.WARNING, logger="FreehandUSLib.igtl.recorder"):
            t0 = time.monotonic()
            summary = record_stream("127.0.0.1", server.port, tmp_path / "gone.igs.mhd", frames=100_000,
                                    reconnect_timeout_s=1.0)  # fmt: skip
            elapsed = time.monotonic() - t0
    finally:
        server.stop()
        if stopper is not None:
            stopper.join(TIMEOUT)
    assert summary.stopped.startswith("server gone: no connection to 127.0.0.1:")
    assert elapsed < 10
    assert summary.frames >= 10
    got = read_sequence(tmp_path / "gone.igs.mhd")
    assert got.n_frames == summary.frames
    indices = [frame_index(f) for f in got.frames]
    assert np.all(np.diff(indices) % 20 == 1)
    assert any("reconnecting for up to 1 s" in r.getMessage() for r in caplog.records)


def test_a_full_disk_stops_the_recording_keeping_its_frames(tmp_path, served, monkeypatch, capsys):
    server, seq = served
    real = IncrementalSequenceFile.append

    def append(self, *args, **kwargs):
        if self.n_frames >= 12:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(IncrementalSequenceFile, "append", append)
    out = tmp_path / "full.igs.mhd"
    assert main(["record", "--port", str(server.port), "--out", str(out), "--frames", "1000"]) == 1
    captured = capsys.readouterr()
    assert "recorded 12 frames" in captured.out
    assert captured.err.strip() == (
        f"freehandus record: error: cannot write {out}: No space left on device; the 12 frame(s) recorded are in {out}"
    )
    got = read_sequence(out)
    assert got.n_frames == 12 and np.all(np.diff([frame_index(f) for f in got.frames]) % seq.n_frames == 1)


# -------------------------------------------------------------------------------------------
# Command line: ports, exposure warning, status line
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "SEQ", "--port", "99999", "--duration", "0.1"],
        ["serve", "SEQ", "--port", "-1", "--duration", "0.1"],
        ["record", "--port", "0", "--out", "OUT", "--frames", "1"],
        ["record", "--port", "70000", "--out", "OUT", "--frames", "1"],
    ],
)
def test_bad_ports_are_one_line_and_exit_2(tmp_path, capsys, argv):
    seq = write_sequence(make_stream_sequence(3, 4, 4), tmp_path / "s.igs.mhd")
    argv = [str(seq) if a == "SEQ" else str(tmp_path / "o.igs.mhd") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exc:  # refused by argparse, before anything is opened
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port" in err and "65535" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--connect-timeout", "inf"], "must be a finite number"),
        (["--reconnect-timeout", "nan"], "must be a finite number"),
        (["--out", "/proc/no/such/rec.igs.mhd"], "cannot create the folder /proc/no/such"),
        (["--out", "OUTDIR/new/rec.txt"], "unknown file type"),
    ],
)
def test_record_checks_its_arguments_before_connecting(tmp_path, capsys, extra, words):
    extra = [a.replace("OUTDIR", str(tmp_path)) for a in extra]
    argv = ["record", "--port", str(free_port()), "--frames", "1", "--out", str(tmp_path / "r.igs.mhd"), *extra]
    if "timeout" in extra[0]:  # refused by argparse (one error line)
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_loopback_detection_and_the_exposure_warning(tmp_path, capsys, monkeypatch):
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("") and not _is_loopback("10.1.2.3")
    text = _exposure_warning("0.0.0.0", 18944, tmp_path / "out")
    for words in ("no authentication", "receives every image and transform", "start and stop recordings",
                  "volume reconstructions", str(tmp_path / "out"), "never replaced", "--host 127.0.0.1"):  # fmt: skip
        assert words in text
    # the command prints it whenever the host is not loopback (here faked, so nothing is exposed)
    from FreehandUSLib.igtl import cli

    monkeypatch.setattr(cli, "_is_loopback", lambda host: False)
    seq = write_sequence(make_stream_sequence(3, 4, 4), tmp_path / "s.igs.mhd")
    assert main(["serve", str(seq), "--port", "0", "--duration", "0.1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("freehandus serve: warning: listening on 127.0.0.1:") and "no authentication" in err
    monkeypatch.undo()
    assert main(["serve", str(seq), "--port", "0", "--duration", "0.1"]) == 0
    assert capsys.readouterr().err == ""


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_status_line_only_on_a_terminal():
    status = RecordingStatus(frames=42, elapsed_s=1.4, fps=29.8, dropped=2, missing_frames=5, state="connected",
                             reconnecting_s=0.0)  # fmt: skip
    gone = RecordingStatus(frames=42, elapsed_s=9.0, fps=0.0, dropped=2, missing_frames=5, state="disconnected",
                           reconnecting_s=3.2)  # fmt: skip
    tty = _Stream(True)
    line = _StatusLine(100, tty)
    line(status)
    line(gone)
    line.close()
    text = tty.getvalue()
    assert "42/100 frames" in text and "29.8 fps, dropped 2, missing 5" in text and "\r" in text
    assert "reconnecting for 3 s" in text
    log = _Stream(False)
    line = _StatusLine(100, log)
    line(status)
    line(gone)
    line.close()
    assert log.getvalue() == ""

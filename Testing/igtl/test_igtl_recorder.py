"""Recorder pairing and incremental files, fed with messages directly (no network)."""

from __future__ import annotations

import numpy as np
import pytest
from igtl_testing import assert_transforms_close, frame_index, make_stream_sequence

from FreehandUSLib.errors import FileFormatError, FreehandUSError
from FreehandUSLib.igtl.protocol import (
    ImageMessage,
    PositionMessage,
    TrackingDataElement,
    TrackingDataMessage,
    TransformMessage,
)
from FreehandUSLib.igtl.recorder import IncrementalSequenceFile, RecordingExistsError, StreamRecorder
from FreehandUSLib.io import read_sequence


def plus_messages(seq, index, t, *, image_first=True):
    """What PlusServer sends for one tracked frame: IMAGE + the valid TRANSFORMs, same timestamp."""
    image = ImageMessage.from_frame(seq.frames[index], device_name="Image_Reference", timestamp_s=t)
    image.received_s = t + 0.002
    transforms = []
    for name, ft in seq.transforms.items():
        if ft.valid[index]:
            m = TransformMessage(matrix=ft.matrices[index], device_name=name, timestamp_s=t)
            m.received_s = t + 0.002
            transforms.append(m)
    return [image, *transforms] if image_first else [*transforms, image]


def feed(recorder, seq, *, image_first=True):
    for i in range(seq.n_frames):
        for m in plus_messages(seq, i, float(seq.timestamps_s[i]), image_first=image_first):
            recorder.add(m)


@pytest.mark.parametrize("image_first", [True, False])
def test_plus_stream_pairs_exactly_and_keeps_invalid_frames(tmp_path, image_first):
    seq = make_stream_sequence(15, invalid_reference=[0, 6, 7, 14])
    out = tmp_path / "rec.igs.mhd"
    rec = StreamRecorder(out)
    feed(rec, seq, image_first=image_first)
    summary = rec.close()
    got = read_sequence(out)
    assert summary.frames == got.n_frames == 15
    np.testing.assert_array_equal(got.frames, seq.frames)
    np.testing.assert_allclose(got.timestamps_s, seq.timestamps_s, atol=1e-9)
    for name, ft in seq.transforms.items():
        np.testing.assert_array_equal(got.transforms[name].valid, ft.valid, err_msg=name)
        assert_transforms_close(got.transforms[name].matrices[ft.valid], ft.matrices[ft.valid], rtol=1e-12)
    assert summary.transforms == {"ProbeToTracker": 15, "ReferenceToTracker": 11}
    assert summary.invalid_frames["ReferenceToTracker"] == 4
    assert summary.interpolated == 0
    assert summary.latency_ms["median"] == pytest.approx(2.0, abs=1e-3)
    assert summary.fps == pytest.approx(30.0)


def test_file_is_valid_after_every_frame(tmp_path):
    seq = make_stream_sequence(6)
    out = tmp_path / "live.igs.mhd"
    rec = StreamRecorder(out)
    written = 0
    for i in range(seq.n_frames):
        for m in plus_messages(seq, i, float(seq.timestamps_s[i])):
            written += rec.add(m)
        if written:
            # What a crash at this moment would leave on disk: every frame written so far.
            on_disk = read_sequence(out)
            assert on_disk.n_frames == written
            assert [frame_index(f) for f in on_disk.frames] == list(range(written))
    assert written == seq.n_frames - 1  # the newest frame waits for the next one
    assert rec.close().frames == seq.n_frames


def test_independent_tracker_is_interpolated_within_the_gap(tmp_path):
    seq = make_stream_sequence(12)
    probe = seq.transforms["ProbeToTracker"]
    rec = StreamRecorder(tmp_path / "r.igs.mhd", hold_s=10)
    # A tracker at 4x the image rate on its own clock, offset by an eighth of a sample.
    t_track = 1000.0 + 1 / 960 + np.arange(43) / 120.0
    from FreehandUSLib.transforms import interpolate_transforms

    mats, ok = interpolate_transforms(seq.timestamps_s, probe.matrices, probe.valid, t_track)
    assert ok.all()
    n_images = 10
    events = [(t, "T", k) for k, t in enumerate(t_track)]
    events += [(float(t), "I", i) for i, t in enumerate(seq.timestamps_s[:n_images])]
    for t, kind, k in sorted(events):
        if kind == "T":
            rec.add(TransformMessage(matrix=mats[k], device_name="ProbeToTracker", timestamp_s=t))
        else:
            rec.add(ImageMessage.from_frame(seq.frames[k], device_name="Image_Reference", timestamp_s=t))
    summary = rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    valid = got.transforms["ProbeToTracker"].valid
    # The first image precedes every tracker sample: nothing to interpolate from.
    np.testing.assert_array_equal(valid, [False] + [True] * (n_images - 1))
    assert summary.interpolated == n_images - 1
    err = np.abs(
        got.transforms["ProbeToTracker"].matrices[valid][:, :3, 3] - probe.matrices[:n_images][valid][:, :3, 3]
    )
    assert err.max() < 0.05  # mm: linear between 120 Hz samples of a smooth path


def test_asynchronous_gap_beyond_max_gap_is_invalid(tmp_path):
    rec = StreamRecorder(tmp_path / "r.igs.mhd", max_gap_s=0.05)
    images = [1.0 + 0.1 * i for i in range(6)]
    samples = [0.98, 1.02, 1.08, 1.12, 1.16, 1.34, 1.38, 1.42, 1.48, 1.52, 1.56]  # hole 1.16-1.34
    for t, kind in sorted([(t, "I") for t in images] + [(t, "T") for t in samples]):
        if kind == "I":
            rec.add(ImageMessage.from_frame(np.zeros((2, 2), np.uint8), device_name="Image", timestamp_s=t))
        else:
            m = np.eye(4)
            m[0, 3] = t
            rec.add(TransformMessage(matrix=m, device_name="ProbeToTracker", timestamp_s=t))
    rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    np.testing.assert_array_equal(got.transforms["ProbeToTracker"].valid, [True, True, False, False, True, True])
    np.testing.assert_allclose(got.transforms["ProbeToTracker"].matrices[1, 0, 3], 1.1)


def test_tdata_and_position_feed_transforms_and_name_map(tmp_path):
    rec = StreamRecorder(tmp_path / "r.igs.mhd", name_map={"Tracker": "TrackerToReference"})
    m = np.eye(4)
    m[:3, 3] = [1, 2, 3]
    for i in range(3):
        t = 10.0 + i
        rec.add(ImageMessage.from_frame(np.full((4, 5), i, np.uint8), device_name="Image", timestamp_s=t))
        rec.add(TrackingDataMessage(elements=[TrackingDataElement("StylusToTracker", m)], timestamp_s=t))
        rec.add(PositionMessage(position=[4, 5, 6], device_name="Tracker", timestamp_s=t))
        rec.add(TransformMessage(matrix=m, device_name="NotATransformName", timestamp_s=t))
    rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    assert set(got.transforms) == {"StylusToTracker", "TrackerToReference"}
    np.testing.assert_allclose(got.transforms["TrackerToReference"].matrices[:, :3, 3], [[4, 5, 6]] * 3)
    assert got.transforms["StylusToTracker"].valid.all()


def test_invalid_status_and_nan_matrices_are_invalid(tmp_path):
    rec = StreamRecorder(tmp_path / "r.igs.mhd")
    bad = np.eye(4)
    bad[0, 0] = np.nan
    for i in range(4):
        t = 5.0 + i
        rec.add(ImageMessage.from_frame(np.zeros((3, 3), np.uint8), device_name="Image", timestamp_s=t))
        status = {"TransformStatus": "INVALID"} if i == 1 else {}
        matrix = bad if i == 2 else np.eye(4)
        rec.add(TransformMessage(matrix=matrix, device_name="ProbeToTracker", timestamp_s=t, metadata=status))
    summary = rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    np.testing.assert_array_equal(got.transforms["ProbeToTracker"].valid, [True, False, False, True])
    assert summary.invalid_frames == {"ProbeToTracker": 2}


def test_zero_timestamps_use_arrival_time(tmp_path):
    rec = StreamRecorder(tmp_path / "r.igs.mhd")
    for i in range(3):
        arrival = 2000.0 + 0.1 * i
        for m in (
            ImageMessage.from_frame(np.zeros((2, 2), np.uint8), device_name="Image"),
            TransformMessage(device_name="ProbeToTracker"),
        ):
            m.received_s = arrival
            rec.add(m)
    summary = rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    np.testing.assert_allclose(got.timestamps_s, [2000.0, 2000.1, 2000.2])
    assert got.transforms["ProbeToTracker"].valid.all()  # paired with the image before them
    assert summary.zero_timestamps == 6
    assert summary.latency_ms == {}


def test_timestamps_going_back_restart_pairing_without_losing_frames(tmp_path):
    seq = make_stream_sequence(8)
    rec = StreamRecorder(tmp_path / "r.igs.mhd")
    for i in range(8):
        t = float(seq.timestamps_s[i]) - (100.0 if i >= 4 else 0.0)  # source restarted at frame 4
        for m in plus_messages(seq, i, t):
            rec.add(m)
    summary = rec.close()
    got = read_sequence(tmp_path / "r.igs.mhd")
    assert summary.frames == 8
    assert [frame_index(f) for f in got.frames] == list(range(8))
    assert got.transforms["ProbeToTracker"].valid.all()


def test_image_of_other_size_or_device_is_not_written(tmp_path):
    rec = StreamRecorder(tmp_path / "r.igs.mhd", image_device="Image_Reference")
    for i, shape in enumerate([(4, 4), (4, 4), (5, 4), (4, 4)]):
        rec.add(
            ImageMessage.from_frame(np.zeros(shape, np.uint8), device_name="Image_Reference", timestamp_s=1.0 + i)
        )
        rec.add(ImageMessage.from_frame(np.zeros((9, 9), np.uint8), device_name="Other", timestamp_s=1.0 + i))
    summary = rec.close()
    assert summary.frames == 3 and summary.rejected_images == 1
    assert read_sequence(tmp_path / "r.igs.mhd").n_frames == 3


def test_other_formats_are_converted_at_close(tmp_path):
    seq = make_stream_sequence(4)
    out = tmp_path / "rec.igs.mha"
    rec = StreamRecorder(out)
    feed(rec, seq)
    assert (tmp_path / "rec.igs.mhd").exists()  # recording in progress: the incremental file
    summary = rec.close()
    assert summary.path == str(out)
    assert not (tmp_path / "rec.igs.mhd").exists() and not (tmp_path / "rec.igs.raw").exists()
    np.testing.assert_array_equal(read_sequence(out).frames, seq.frames)


def test_recorder_errors(tmp_path):
    with pytest.raises(FileFormatError, match="unknown file type"):
        StreamRecorder(tmp_path / "rec.txt")
    rec = StreamRecorder(tmp_path / "r.igs.mhd")
    rec.close()
    with pytest.raises(FreehandUSError, match="recorder is closed"):
        rec.add(TransformMessage(device_name="AToB"))
    (tmp_path / "x.igs.mhd").write_text("")
    with pytest.raises(RecordingExistsError, match="x.igs.mhd exists: an unfinished recording to x.igs.mha"):
        IncrementalSequenceFile(tmp_path / "x.igs.mha", frame_shape=(2, 2), dtype=np.uint8)


def test_incremental_file_stores_other_dtypes_as_float32(tmp_path):
    f = IncrementalSequenceFile(tmp_path / "f.igs.mhd", frame_shape=(2, 3), dtype=np.uint16)
    f.append(np.array([[1, 2, 3], [4, 5, 60000]], np.uint16), 1.0, {"ProbeToTracker": (np.eye(4), True)})
    f.close()
    got = read_sequence(tmp_path / "f.igs.mhd")
    assert got.frames.dtype == np.float32 and got.frames[0, 1, 2] == 60000.0

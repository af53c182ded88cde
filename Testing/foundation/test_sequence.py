"""TrackedSequence: validation, selection, concatenation, transform resampling."""

import numpy as np
import pytest
from testdata import make_synthetic_sequence

from FreehandUSLib import SequenceError, TrackedSequence
from FreehandUSLib.orientation import normalize_orientation, to_mf
from FreehandUSLib.errors import FileFormatError


def test_properties_and_str(synthetic_sequence):
    seq = synthetic_sequence
    assert (seq.n_frames, seq.n_rows, seq.n_cols, seq.n_channels) == (12, 48, 64, 1)
    assert seq.orientation == "MF"
    assert seq.transform_names == ["ProbeToTracker", "ReferenceToTracker"]
    assert seq.duration_s == pytest.approx(seq.timestamps_s[-1] - seq.timestamps_s[0])
    assert "12 frames 64x48" in str(seq)


def test_transform_suffix_is_stripped():
    seq = TrackedSequence(
        np.zeros((2, 3, 4), np.uint8),
        transforms={"ProbeToTrackerTransform": (np.tile(np.eye(4), (2, 1, 1)), [True, False])},
    )
    assert seq.transform_names == ["ProbeToTracker"]
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"].valid, [True, False])


def test_nan_matrix_is_marked_invalid():
    m = np.tile(np.eye(4), (3, 1, 1))
    m[1, 0, 0] = np.nan
    seq = TrackedSequence(np.zeros((3, 2, 2), np.uint8), transforms={"ProbeToTracker": (m, np.ones(3))})
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"].valid, [True, False, True])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frames": np.zeros((4, 4), np.uint8)}, "n_frames"),
        ({"frames": np.zeros((2, 4, 4), np.int16)}, "uint8 or float32"),
        ({"frames": np.zeros((2, 4, 4), np.uint8), "timestamps_s": [0.0]}, "timestamps"),
        ({"frames": np.zeros((2, 4, 4), np.uint8), "image_ok": [True]}, "status"),
        (
            {"frames": np.zeros((2, 4, 4), np.uint8), "transforms": {"ProbeToTracker": (np.zeros((3, 4, 4)), np.ones(3))}},
            "has 3 frames",
        ),
        ({"frames": np.zeros((2, 4, 4), np.uint8), "pixel_spacing_mm": (0.0, 1.0)}, "positive"),
        ({"frames": np.zeros((2, 4, 4), np.uint8), "frame_fields": {"X": ["a"]}}, "frame field"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(SequenceError, match=message):
        TrackedSequence(**kwargs)


def test_select_slice_mask_and_index(synthetic_sequence):
    seq = synthetic_sequence
    seq.frame_fields["Note"] = [f"n{i}" for i in range(seq.n_frames)]
    part = seq.select(slice(2, 8, 2))
    np.testing.assert_array_equal(part.frames, seq.frames[2:8:2])
    np.testing.assert_array_equal(part.timestamps_s, seq.timestamps_s[2:8:2])
    np.testing.assert_array_equal(
        part.transforms["ReferenceToTracker"].valid, seq.transforms["ReferenceToTracker"].valid[2:8:2]
    )
    assert part.frame_fields["Note"] == ["n2", "n4", "n6"]
    mask = np.zeros(seq.n_frames, bool)
    mask[[0, 5]] = True
    assert seq.select(mask).n_frames == 2
    assert seq[3].n_frames == 1
    part.frames[0, 0, 0] ^= 0xFF  # a copy, not a view
    assert part.frames[0, 0, 0] != seq.frames[2, 0, 0]
    with pytest.raises(SequenceError, match="out of range"):
        seq.select([seq.n_frames])


def test_concatenate_marks_missing_transforms_invalid():
    a = make_synthetic_sequence(n_frames=4, seed=1)
    b = make_synthetic_sequence(n_frames=3, seed=2)
    del b.transforms["ReferenceToTracker"]
    joined = TrackedSequence.concatenate([a, b])
    assert joined.n_frames == 7
    np.testing.assert_array_equal(joined.frames[4:], b.frames)
    valid = joined.transforms["ReferenceToTracker"].valid
    np.testing.assert_array_equal(valid[4:], False)
    np.testing.assert_array_equal(valid[:4], a.transforms["ReferenceToTracker"].valid)
    with pytest.raises(SequenceError, match="do not match"):
        TrackedSequence.concatenate([a, make_synthetic_sequence(n_frames=2, n_rows=10)])
    with pytest.raises(SequenceError, match="no sequences"):
        TrackedSequence.concatenate([])


def test_multichannel_and_float_frames():
    seq = make_synthetic_sequence(n_frames=3, dtype=np.float32, n_channels=2)
    assert seq.n_channels == 2 and seq.frames.dtype == np.float32


def test_interpolate_sequence_transforms_at_frame_times_is_exact(synthetic_sequence):
    seq = synthetic_sequence
    resampled = seq.interpolate_transforms(seq.timestamps_s)
    probe = resampled["ProbeToTracker"]
    np.testing.assert_array_equal(probe.matrices, seq.transforms["ProbeToTracker"].matrices)
    # The invalid ReferenceToTracker sample is bridged by its neighbours.
    assert resampled["ReferenceToTracker"].valid.all()


def test_repository_from_sequence(synthetic_sequence):
    seq = synthetic_sequence
    repo = seq.repository({"ImageToProbe": np.diag([0.1, 0.1, 1.0, 1.0])})
    valid = repo.valid("ImageToReference")
    np.testing.assert_array_equal(valid, seq.transforms["ReferenceToTracker"].valid)


@pytest.mark.parametrize("orientation, flips", [("MF", ()), ("MN", (1,)), ("UF", (2,)), ("UN", (1, 2)), ("MFA", ())])
def test_orientation_flip_to_mf(orientation, flips):
    frames = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    expected = np.flip(frames, axis=flips) if flips else frames
    np.testing.assert_array_equal(to_mf(frames, orientation), expected)
    np.testing.assert_array_equal(to_mf(to_mf(frames, orientation), orientation), frames)


@pytest.mark.parametrize("bad", ["XY", "MFAB", "F"])
def test_orientation_rejects_unknown(bad):
    with pytest.raises(FileFormatError, match="UltrasoundImageOrientation"):
        normalize_orientation(bad, source="x.mha")

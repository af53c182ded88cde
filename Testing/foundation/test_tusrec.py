"""TUS-REC challenge scans (.h5 frames/tforms + calib_matrix.csv): round trips, calibration
conventions and bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from testdata import make_synthetic_sequence

from FreehandUSLib import FileFormatError, SequenceError, TrackedSequence, TransformError
from FreehandUSLib.io import read_sequence, write_sequence
from FreehandUSLib.io.nrrd_io import read_sequence_nrrd, write_sequence_nrrd
from FreehandUSLib.io.tusrec import (
    TUSREC_FPS,
    read_tusrec_calibration,
    read_tusrec_h5,
    write_tusrec_h5,
)

SCALING = np.diag([0.2, 0.25, 1.0, 1.0])
SPATIAL = np.eye(4)
SPATIAL[:3, :3] = Rotation.from_rotvec([0.1, -0.4, 0.25]).as_matrix()
SPATIAL[:3, 3] = [12.5, -3.0, 40.0]


def write_csv(path, scaling=SCALING, spatial=SPATIAL, *, labels=True):
    """calib_matrix.csv: the 2025 layout has a label line before each block, 2024 does not."""
    lines = []
    for label, m in (("scaling_from_pixel_to_mm", scaling), ("spatial_calibration", spatial)):
        if labels:
            lines.append(label)
        lines += [",".join(repr(float(v)) for v in row) for row in np.atleast_2d(m)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_h5(path, **datasets):
    with h5py.File(path, "w") as h5:
        for name, value in datasets.items():
            h5.create_dataset(name, data=value)
    return path


def scan(n=5, h=6, w=8, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    tforms = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    tforms[:, :3, :3] = Rotation.from_rotvec(rng.normal(scale=0.2, size=(n, 3))).as_matrix()
    tforms[:, :3, 3] = rng.normal(scale=50, size=(n, 3))
    return frames, tforms


# ------------------------------------------------------------------------------------------------
# reading


def test_read_scan(tmp_path):
    frames, tforms = scan()
    seq = read_tusrec_h5(write_h5(tmp_path / "LH_rotation.h5", frames=frames, tforms=tforms))
    np.testing.assert_array_equal(seq.frames, frames)
    assert seq.frames.dtype == np.uint8
    assert list(seq.transforms) == ["ProbeToTracker"]
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"].matrices, tforms.astype(np.float64))
    assert seq.transforms["ProbeToTracker"].valid.all()
    np.testing.assert_allclose(seq.timestamps_s, np.arange(5) / 20.0)
    assert TUSREC_FPS == 20.0
    assert seq.pixel_spacing_mm is None


def test_fps_option_and_dispatcher(tmp_path):
    frames, tforms = scan()
    path = write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms)
    seq = read_sequence(path, fps=40)  # io dispatcher passes options through
    np.testing.assert_allclose(seq.timestamps_s, np.arange(5) / 40.0)
    with pytest.raises(ValueError, match="fps"):
        read_tusrec_h5(path, fps=0)


def test_nan_tforms_mark_frames_invalid(tmp_path):
    frames, tforms = scan()
    tforms[1] = np.nan
    tforms[3, 3] = [0, 0, 0, 2]  # not homogeneous
    seq = read_tusrec_h5(write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms))
    np.testing.assert_array_equal(
        seq.transforms["ProbeToTracker"].valid, [True, False, True, False, True]
    )


def test_separate_tforms_file(tmp_path):
    """2025 validation/test layout: frames/<sub>/<scan>.h5 and transfs/<sub>/<scan>.h5."""
    frames, tforms = scan()
    frames_file = write_h5(tmp_path / "frames.h5", frames=frames)
    tforms_file = write_h5(tmp_path / "transfs.h5", tforms=tforms)
    seq = read_tusrec_h5(frames_file, tforms_path=tforms_file)
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"].matrices, tforms)


@pytest.mark.parametrize("labels", [True, False], ids=["2025-labelled", "2024-bare"])
def test_read_calibration_layouts(tmp_path, labels):
    scaling, spatial = read_tusrec_calibration(write_csv(tmp_path / "calib_matrix.csv", labels=labels))
    np.testing.assert_array_equal(scaling, SCALING)
    np.testing.assert_array_equal(spatial, SPATIAL)


def test_calibration_gives_image_to_probe(tmp_path):
    frames, tforms = scan(n=3)
    h5 = write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms)
    csv = write_csv(tmp_path / "calib_matrix.csv")
    seq = read_tusrec_h5(h5, calibration_csv=csv)
    assert seq.pixel_spacing_mm == pytest.approx((0.2, 0.25), rel=1e-12)
    itp = seq.transforms["ImageToProbe"]
    assert itp.valid.all() and itp.matrices.shape == (3, 4, 4)
    np.testing.assert_array_equal(itp.matrices[0], itp.matrices[2])
    # our 0-based pixel (col, row) is TUS-REC's 1-based pixel (col + 1, row + 1)
    col, row = 7.0, 5.0
    ours = itp.matrices[0] @ [col, row, 0.0, 1.0]
    tusrec = SPATIAL @ SCALING @ [col + 1.0, row + 1.0, 0.0, 1.0]
    np.testing.assert_allclose(ours, tusrec, atol=1e-12)
    plain = read_tusrec_h5(h5, calibration_csv=csv, one_based_pixels=False)
    np.testing.assert_allclose(
        plain.transforms["ImageToProbe"].matrices[0], SPATIAL @ SCALING, atol=1e-15
    )
    # ImageToTracker resolves through the repository
    image_to_tracker = seq.repository().get("ImageToTracker")
    np.testing.assert_allclose(image_to_tracker[1], tforms[1] @ itp.matrices[1], atol=1e-9)


def test_image_to_probe_argument(tmp_path):
    frames, tforms = scan(n=2)
    h5 = write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms)
    m = SPATIAL @ np.diag([0.3, 0.3, 1.0, 1.0])
    seq = read_tusrec_h5(h5, image_to_probe=m)
    np.testing.assert_array_equal(seq.transforms["ImageToProbe"].matrices[1], m)
    assert seq.pixel_spacing_mm == pytest.approx((0.3, 0.3), rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        read_tusrec_h5(h5, image_to_probe=m, calibration_csv=write_csv(tmp_path / "c.csv"))
    with pytest.raises(TransformError, match="image_to_probe"):
        read_tusrec_h5(h5, image_to_probe=np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_write_read_round_trip(tmp_path, dtype):
    seq = make_synthetic_sequence(n_frames=6, dtype=dtype)
    path = write_tusrec_h5(seq, tmp_path / "RH_rotation.h5")
    with h5py.File(path, "r") as h5:
        assert set(h5) == {"frames", "tforms"}
        assert h5["tforms"].dtype == np.float32 and h5["tforms"].shape == (6, 4, 4)
        assert h5["frames"].shape == (6, 48, 64)
    back = read_tusrec_h5(path)
    assert back.frames.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.frames, seq.frames)
    expected = seq.transforms["ProbeToTracker"].matrices.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].matrices, expected)
    np.testing.assert_allclose(
        back.transforms["ProbeToTracker"].matrices,
        seq.transforms["ProbeToTracker"].matrices,
        rtol=1e-6,
        atol=1e-4,
    )


def test_write_other_transform_keeps_validity(tmp_path):
    seq = make_synthetic_sequence(n_frames=6)  # ReferenceToTracker invalid at frame 3
    path = write_sequence(seq, tmp_path / "ref.h5", transform="ReferenceToTrackerTransform")
    back = read_tusrec_h5(path)
    np.testing.assert_array_equal(
        back.transforms["ProbeToTracker"].valid, seq.transforms["ReferenceToTracker"].valid
    )
    with h5py.File(path, "r") as h5:
        assert np.isnan(h5["tforms"][3]).all()


def test_tusrec_to_nrrd(tmp_path):
    frames, tforms = scan()
    seq = read_tusrec_h5(
        write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms),
        calibration_csv=write_csv(tmp_path / "c.csv"),
    )
    back = read_sequence_nrrd(write_sequence_nrrd(seq, tmp_path / "s.igs.nrrd"))
    np.testing.assert_array_equal(back.frames, frames)
    for name in ("ProbeToTracker", "ImageToProbe"):
        np.testing.assert_array_equal(back.transforms[name].matrices, seq.transforms[name].matrices)
    assert back.pixel_spacing_mm == seq.pixel_spacing_mm
    assert back.metadata["TusRecFramesPerSecond"] == "20.0"


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "datasets,error,match",
    [
        ({"tforms": scan()[1]}, FileFormatError, "dataset 'frames' not found"),
        ({"frames": scan()[0]}, FileFormatError, "dataset 'tforms' not found"),
        (
            {"frames": scan()[0], "tforms": scan()[1][:4]},
            FileFormatError,
            "'tforms' has 4 matrices but 'frames'",
        ),
        (
            {"frames": scan()[0][..., None], "tforms": scan()[1]},
            FileFormatError,
            "'frames' must be \\(N, H, W\\)",
        ),
        (
            {"frames": scan()[0][0], "tforms": scan()[1]},
            FileFormatError,
            "'frames' must be \\(N, H, W\\)",
        ),
        (
            {"frames": scan()[0], "tforms": scan()[1][:, :3]},
            FileFormatError,
            "'tforms' must be \\(N, 4, 4\\)",
        ),
        (
            {"frames": scan()[0], "tforms": np.full((5, 4, 4), np.nan, np.float32)},
            TransformError,
            "'tforms': all 5",
        ),
        (
            {"frames": np.zeros((0, 6, 8), np.uint8), "tforms": np.zeros((0, 4, 4))},
            SequenceError,
            "no frames",
        ),
        (
            {"frames": np.array([b"ab", b"cd"]).reshape(1, 1, 2), "tforms": scan()[1][:1]},
            FileFormatError,
            "not images",
        ),
    ],
    ids=[
        "no-frames",
        "no-tforms",
        "length-mismatch",
        "4d-frames",
        "2d-frames",
        "3x4-tforms",
        "all-nan",
        "empty",
        "text-frames",
    ],
)
def test_bad_scan(tmp_path, datasets, error, match):
    path = write_h5(tmp_path / "bad_scan.h5", **datasets)
    with pytest.raises(error, match=match) as info:
        read_tusrec_h5(path)
    assert "bad_scan.h5" in str(info.value)


def test_frames_is_a_group(tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("frames")
        h5.create_dataset("tforms", data=scan()[1])
    with pytest.raises(FileFormatError, match="'frames' is a group"):
        read_tusrec_h5(path)


def test_not_hdf5_and_missing(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("hello")
    with pytest.raises(FileFormatError, match="text.h5: not a readable HDF5 file"):
        read_tusrec_h5(path)
    with pytest.raises(FileFormatError, match="not found"):
        read_tusrec_h5(tmp_path / "none.h5")


@pytest.mark.parametrize(
    "rows,match",
    [
        (np.vstack([SCALING, SPATIAL[:3]]), "got 7 numeric rows"),
        (np.vstack([SCALING, SPATIAL, SPATIAL[:1]]), "got 9 numeric rows"),
        (np.hstack([np.vstack([SCALING, SPATIAL]), np.ones((8, 1))]), "line 1: .*got 5"),
        (np.vstack([SCALING, SPATIAL[:3], [[0, 0, 1, 1]]]), "spatial calibration"),
        (np.vstack([np.full((4, 4), np.nan), SPATIAL]), "scaling"),
    ],
    ids=["7-rows", "9-rows", "5-columns", "bad-last-row", "nan"],
)
def test_bad_calibration_csv(tmp_path, rows, match):
    path = tmp_path / "calib_matrix.csv"
    path.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in rows))
    with pytest.raises(FileFormatError, match=match) as info:
        read_tusrec_calibration(path)
    assert "calib_matrix.csv" in str(info.value)
    frames, tforms = scan(n=2)
    with pytest.raises(FileFormatError, match=match):
        read_tusrec_h5(write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms), calibration_csv=path)


def test_missing_calibration_csv(tmp_path):
    with pytest.raises(FileFormatError, match="calibration file not found"):
        read_tusrec_calibration(tmp_path / "nope.csv")


def test_bad_write(tmp_path):
    with pytest.raises(SequenceError, match="channel"):
        write_tusrec_h5(make_synthetic_sequence(n_frames=2, n_channels=3), tmp_path / "m.h5")
    with pytest.raises(TransformError, match="StylusToTracker.*ProbeToTracker, ReferenceToTracker"):
        write_tusrec_h5(
            make_synthetic_sequence(n_frames=2), tmp_path / "m.h5", transform="StylusToTracker"
        )
    with pytest.raises(SequenceError, match="empty"):
        write_tusrec_h5(TrackedSequence(frames=np.zeros((0, 2, 2), np.uint8)), tmp_path / "m.h5")
    with pytest.raises(FileFormatError, match="cannot write"):
        write_tusrec_h5(make_synthetic_sequence(n_frames=2), tmp_path / "no" / "dir" / "m.h5")


def test_singular_calibration(tmp_path):
    frames, tforms = scan(n=2)
    csv = write_csv(tmp_path / "calib_matrix.csv", scaling=np.diag([0.0, 0.2, 1.0, 1.0]))
    with pytest.raises(TransformError, match="ImageToProbe in .*calib_matrix.csv.*not invertible"):
        read_tusrec_h5(write_h5(tmp_path / "s.h5", frames=frames, tforms=tforms), calibration_csv=csv)


# ------------------------------------------------------------------------------------------------
# hostile files: links, external storage, absurd shapes, damaged structures (issue 21)


def _peak_and_error(fn):
    """(peak bytes traced while ``fn()`` ran, its FileFormatError message); it must raise one."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("chunked", [False, True])
def test_absurd_frames_shape_is_refused_before_reading(tmp_path, chunked):
    # issue 21: a 1.7 KB file declaring a (100000, 1000, 1000) 'frames' dataset was read whole
    path = tmp_path / "absurd.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset(
            "frames", shape=(100000, 1000, 1000), dtype=np.uint8, chunks=(1, 1000, 1000) if chunked else None
        )
        h5.create_dataset("tforms", data=np.tile(np.eye(4), (100000, 1, 1)), compression="gzip")
    assert path.stat().st_size < 200_000
    peak, message = _peak_and_error(lambda: read_tusrec_h5(path))
    assert peak < 32 << 20, peak
    assert "'frames' of shape (100000, 1000, 1000) uint8 needs 100000000000 bytes" in message


def test_absurd_tforms_shape_is_refused_before_reading(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("frames", shape=(10**9, 1, 1), dtype=np.uint8, chunks=(1024, 1, 1), compression="gzip")
        h5.create_dataset("tforms", shape=(10**9, 4, 4), dtype=np.float64)
    peak, message = _peak_and_error(lambda: read_tusrec_h5(path))
    assert peak < 32 << 20 and "'tforms' of shape (1000000000, 4, 4) float64 needs" in message


def test_dangling_soft_and_external_links(tmp_path):
    frames, tforms = scan()
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as h5:
        h5["frames"] = h5py.SoftLink("/nowhere")
        h5.create_dataset("tforms", data=tforms)
    with pytest.raises(FileFormatError, match=r"soft\.h5: 'frames' is a link to an object that does not exist"):
        read_tusrec_h5(path)
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("frames", data=frames)
        h5["tforms"] = h5py.ExternalLink("missing.h5", "/tforms")
    with pytest.raises(FileFormatError, match=r"ext\.h5: .*missing\.h5.*not found"):
        read_tusrec_h5(path)


def test_external_link_must_stay_beside_the_file(tmp_path):
    frames, tforms = scan()
    (tmp_path / "rec").mkdir()
    write_h5(tmp_path / "other.h5", tforms=tforms)
    write_h5(tmp_path / "rec" / "other.h5", tforms=tforms)
    for target, ok in [("../other.h5", False), (str(tmp_path / "other.h5"), False), ("other.h5", True)]:
        path = tmp_path / "rec" / "scan.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("frames", data=frames)
            h5["tforms"] = h5py.ExternalLink(target, "/tforms")
        if ok:
            np.testing.assert_array_equal(read_tusrec_h5(path).frames, frames)
        else:
            with pytest.raises(FileFormatError, match=r"lies outside the header's folder"):
                read_tusrec_h5(path)


def test_external_storage_must_stay_beside_the_file(tmp_path, monkeypatch):
    frames, tforms = scan()
    (tmp_path / "rec").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for folder in (tmp_path, tmp_path / "rec"):
        (folder / "pixels.raw").write_bytes(frames.tobytes())
    cases = [
        ("/etc/passwd", "outside the header's folder"),
        ("../pixels.raw", "outside the header's folder"),
        ("/dev/zero", "outside the header's folder"),
        ("pixels.raw", None),
    ]
    monkeypatch.chdir(tmp_path / "elsewhere")  # HDF5 would resolve names against this folder
    for name, match in cases:
        path = tmp_path / "rec" / "scan.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("frames", shape=frames.shape, dtype=np.uint8, external=[(name, 0, frames.nbytes)])
            h5.create_dataset("tforms", data=tforms)
        if match is None:
            np.testing.assert_array_equal(read_tusrec_h5(path).frames, frames)
        else:
            with pytest.raises(FileFormatError, match=match):
                read_tusrec_h5(path)
    # external storage shorter than the shape: refused before reading
    (tmp_path / "rec" / "pixels.raw").write_bytes(frames.tobytes()[:100])
    with pytest.raises(FileFormatError, match=r"'frames' of shape \(5, 6, 8\) uint8 needs 240 bytes but its external files hold 100"):
        read_tusrec_h5(path)


def test_virtual_dataset_is_refused(tmp_path):
    frames, tforms = scan()
    write_h5(tmp_path / "src.h5", frames=frames)
    layout = h5py.VirtualLayout(shape=frames.shape, dtype=np.uint8)
    layout[:] = h5py.VirtualSource(str(tmp_path / "src.h5"), "frames", shape=frames.shape)
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as h5:
        h5.create_virtual_dataset("frames", layout)
        h5.create_dataset("tforms", data=tforms)
    with pytest.raises(FileFormatError, match=r"'frames' is a virtual dataset"):
        read_tusrec_h5(path)


def test_damaged_structures_give_format_errors(tmp_path):
    # overwrite the local heap (link names) and the object headers one region at a time:
    # every outcome is a parsed scan or a FileFormatError (h5py raised KeyError/RuntimeError)
    frames, tforms = scan()
    good = write_h5(tmp_path / "good.h5", frames=frames, tforms=tforms).read_bytes()
    outcomes = set()
    for signature in (b"HEAP", b"OHDR", b"TREE", b"SNOD"):
        start = good.find(signature)
        if start < 0:
            continue
        for offset in range(start, min(start + 96, len(good)), 8):
            damaged = bytearray(good)
            damaged[offset : offset + 8] = b"\xff" * 8
            path = tmp_path / "damaged.h5"
            path.write_bytes(bytes(damaged))
            try:
                read_tusrec_h5(path)
                outcomes.add("parsed")
            except (FileFormatError, SequenceError, TransformError) as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 400
                outcomes.add("error")
    assert "error" in outcomes


def test_corrupted_local_heap_is_a_format_error(tmp_path):
    # issue 21: a corrupted heap raised RuntimeError ("bad local heap signature") from h5py
    frames, tforms = scan()
    path = write_h5(tmp_path / "heap.h5", frames=frames, tforms=tforms)
    data = bytearray(path.read_bytes())
    at = data.find(b"HEAP")
    assert at > 0
    data[at : at + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match=r"heap\.h5: 'frames' cannot be opened \(.*bad local heap signature"):
        read_tusrec_h5(path)

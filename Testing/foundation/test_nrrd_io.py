"""NRRD sequences (PLUS .igs.nrrd, Slicer .seq.nrrd) and NRRD volumes: round trips, real PLUS
data, Slicer interoperability (real MRML storage nodes) and bad input."""

from __future__ import annotations

import gzip
import importlib
import zlib
from pathlib import Path

import nrrd
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from testdata import make_synthetic_sequence, plus_file

from FreehandUSLib import FileFormatError, FreehandUSError, SequenceError, TrackedSequence, Volume
from FreehandUSLib.io import read_sequence, read_volume, write_sequence, write_volume
from FreehandUSLib.io.nrrd_io import (
    read_sequence_nrrd,
    read_volume_nrrd,
    write_sequence_nrrd,
    write_volume_nrrd,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Metadata that describes the file read (set by the readers, never written back).
SOURCE_KEYS = ("SourceOrientation", "SourceElementType")


# ------------------------------------------------------------------------------------------------
# helpers


def assert_same_sequence(a: TrackedSequence, b: TrackedSequence, *, ignore_metadata=(), atol=0.0):
    """Frames bit-exact, transforms within ``atol`` (NaN == NaN), everything else equal."""
    assert a.frames.dtype == b.frames.dtype
    assert a.frames.shape == b.frames.shape
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.timestamps_s, b.timestamps_s)
    np.testing.assert_array_equal(a.image_ok, b.image_ok)
    assert list(a.transforms) == list(b.transforms)
    for name in a.transforms:
        np.testing.assert_array_equal(a.transforms[name].valid, b.transforms[name].valid, err_msg=name)
        np.testing.assert_allclose(
            a.transforms[name].matrices, b.transforms[name].matrices, rtol=0, atol=atol, err_msg=name
        )
    assert a.frame_fields == b.frame_fields
    ignored = set(ignore_metadata) | set(SOURCE_KEYS)
    strip = lambda m: {k: v for k, v in m.items() if k not in ignored}  # noqa: E731
    assert strip(a.metadata) == strip(b.metadata)
    assert _spacing(a) == _spacing(b)


def _spacing(seq):
    """Pixel spacing, with 1 x 1 mm meaning 'not given' (as the NRRD reader reads it)."""
    s = seq.pixel_spacing_mm
    return None if s is None or tuple(s) == (1.0, 1.0) else tuple(s)


def rich_sequence(dtype=np.uint8, n_channels=1, spacing=None) -> TrackedSequence:
    """A synthetic sequence with every kind of content a round trip must keep."""
    seq = make_synthetic_sequence(n_frames=7, n_rows=20, n_cols=30, dtype=dtype, n_channels=n_channels)
    seq.image_ok[2] = False
    seq.frames[2] = 0
    seq.frame_fields["ProbePosition"] = [f"{0.1 * i:.4f}" for i in range(seq.n_frames)]
    seq.frame_fields["Note"] = ["" if i % 2 else "a b c" for i in range(seq.n_frames)]
    seq.metadata["UltrasoundImageType"] = "BRIGHTNESS"
    seq.metadata["Operator"] = "J. Doe (lab 3)"
    seq.transforms["ProbeToTracker"].matrices[3, 0, 3] = 1.0 / 3.0  # needs all 17 digits
    seq.pixel_spacing_mm = spacing
    return seq


def header_of(path):
    return nrrd.read_header(str(path))


# ------------------------------------------------------------------------------------------------
# synthetic round trips


@pytest.mark.parametrize("flavor", ["plus", "slicer"])
@pytest.mark.parametrize(
    "dtype,n_channels,spacing",
    [
        (np.uint8, 1, None),
        (np.float32, 1, (0.2, 0.25)),
        (np.uint8, 3, (0.3, 0.3)),
        (np.float32, 2, None),
    ],
    ids=["uint8", "float32", "uint8x3", "float32x2"],
)
def test_sequence_round_trip_exact(tmp_path, flavor, dtype, n_channels, spacing):
    seq = rich_sequence(dtype, n_channels, spacing)
    path = write_sequence_nrrd(seq, tmp_path / "seq.nrrd", flavor=flavor)
    back = read_sequence_nrrd(path)
    assert_same_sequence(seq, back, ignore_metadata=("IJKToRAS",))
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].matrices[3, 0, 3], 1.0 / 3.0)
    assert back.metadata["SourceOrientation"] == "MF"
    assert back.frames.shape == (7, 20, 30) + ((n_channels,) if n_channels > 1 else ())
    assert not back.transforms["ReferenceToTracker"].valid[3]
    kinds = header_of(path)["kinds"]
    lead = ["vector"] if n_channels > 1 else []
    assert kinds == lead + (
        ["domain", "domain", "list"] if flavor == "plus" else ["domain"] * 3 + ["list"]
    )


@pytest.mark.parametrize(
    "name,kinds",
    [
        ("a.igs.nrrd", ["domain", "domain", "list"]),
        ("a.seq.nrrd", ["domain", "domain", "domain", "list"]),
    ],
)
def test_flavor_follows_file_name(tmp_path, name, kinds):
    seq = make_synthetic_sequence(n_frames=3)
    path = write_sequence(seq, tmp_path / name)  # through the io dispatcher
    assert header_of(path)["kinds"] == kinds
    assert_same_sequence(seq, read_sequence(path), ignore_metadata=("IJKToRAS",))


def test_plus_layout_fields(tmp_path):
    seq = rich_sequence(spacing=(0.2, 0.3))
    header = header_of(write_sequence_nrrd(seq, tmp_path / "a.igs.nrrd"))
    assert list(header["sizes"]) == [30, 20, 7]
    assert header["ultrasound image orientation"] == "MF"
    assert header["ultrasound image type"] == "BRIGHTNESS"
    assert header["Seq_Frame0002_Status"] == "INVALID"
    assert header["Seq_Frame0003_ReferenceToTrackerTransformStatus"] == "INVALID"
    assert header["Seq_Frame0000_ProbeToTrackerTransformStatus"] == "OK"
    assert float(header["Seq_Frame0004_Timestamp"]) == seq.timestamps_s[4]
    np.testing.assert_array_equal(header["space directions"][:2], [[0.2, 0.0], [0.0, 0.3]])


def test_slicer_layout_fields(tmp_path):
    seq = rich_sequence(spacing=(0.2, 0.3))
    header = header_of(write_sequence_nrrd(seq, tmp_path / "a.seq.nrrd"))
    assert list(header["sizes"]) == [30, 20, 1, 7]
    assert header["space"] == "left-posterior-superior"
    assert header["DataNodeClassName"] == "vtkMRMLScalarVolumeNode"
    assert header["axis 3 index type"] == "numeric"
    index = [float(v) for v in header["axis 3 index values"].split()]
    np.testing.assert_array_equal(index, seq.timestamps_s)
    np.testing.assert_array_equal(header["space directions"][:3], np.diag([0.2, 0.3, 1.0]))
    assert "Seq_Frame0006_ProbeToTrackerTransform" in header


@pytest.mark.parametrize("suffix", [".igs.nhdr", ".seq.nhdr"])
def test_detached_header_and_raw(tmp_path, suffix):
    seq = rich_sequence()
    path = write_sequence_nrrd(seq, tmp_path / f"d{suffix}", compress=False)
    assert header_of(path)["encoding"] == "raw"
    assert (tmp_path / "d.igs.raw").exists() or (tmp_path / "d.seq.raw").exists()
    assert_same_sequence(seq, read_sequence_nrrd(path), ignore_metadata=("IJKToRAS",))


def test_compression_shrinks_file(tmp_path):
    seq = make_synthetic_sequence(n_frames=4, n_rows=200, n_cols=200)
    seq.frames[:] = 7  # compressible
    small = write_sequence_nrrd(seq, tmp_path / "z.igs.nrrd", compress=True).stat().st_size
    big = write_sequence_nrrd(seq, tmp_path / "r.igs.nrrd", compress=False).stat().st_size
    assert small < big / 10


def _write_plus_like(path, frames_file_order, orientation, extra=None):
    """A PLUS-layout NRRD from (N, H, W) pixels as stored in the file."""
    n = frames_file_order.shape[0]
    header = {
        "kinds": ["domain", "domain", "list"],
        "space dimension": 2,
        "space directions": np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]]),
        "space origin": np.zeros(2),
        "encoding": "gzip",
        "ultrasound image orientation": orientation,
    }
    for i in range(n):
        header[f"Seq_Frame{i:04d}_Timestamp"] = f"{i * 0.1:.6f}"
        header[f"Seq_Frame{i:04d}_ImageStatus"] = "OK"
    header.update(extra or {})
    nrrd.write(str(path), frames_file_order, header, index_order="C")
    return path


@pytest.mark.parametrize("orientation", ["MF", "MFA", "UF", "MN", "UN"])
def test_orientation_flipped_to_mf(tmp_path, orientation):
    stored = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    seq = read_sequence_nrrd(_write_plus_like(tmp_path / "o.igs.nrrd", stored, orientation))
    expected = stored
    if orientation[0] == "U":
        expected = expected[:, :, ::-1]
    if orientation[1] == "N":
        expected = expected[:, ::-1, :]
    np.testing.assert_array_equal(seq.frames, expected)
    assert seq.frames.flags.c_contiguous
    np.testing.assert_allclose(seq.timestamps_s, [0.0, 0.1, 0.2])


def test_image_status_field_names_both_read(tmp_path):
    stored = np.full((3, 3, 4), 9, np.uint8)
    extra = {"Seq_Frame0001_ImageStatus": "INVALID", "Seq_Frame0002_Status": "INVALID"}
    seq = read_sequence_nrrd(_write_plus_like(tmp_path / "s.igs.nrrd", stored, "MF", extra))
    np.testing.assert_array_equal(seq.image_ok, [True, False, False])
    assert "ImageStatus" not in seq.frame_fields and "Status" not in seq.frame_fields
    np.testing.assert_array_equal(seq.frames[1:], 0)  # no image: zeros, as the metafile reader
    np.testing.assert_array_equal(seq.frames[0], 9)


@pytest.mark.parametrize("flavor", ["plus", "slicer"])
def test_frames_without_image_written_blank(tmp_path, flavor):
    seq = make_synthetic_sequence(n_frames=3)
    seq.frames[:] = 5
    seq.image_ok[1] = False
    back = read_sequence_nrrd(write_sequence_nrrd(seq, tmp_path / "b.nrrd", flavor=flavor))
    np.testing.assert_array_equal(back.image_ok, [True, False, True])
    np.testing.assert_array_equal(back.frames[1], 0)
    np.testing.assert_array_equal(back.frames[[0, 2]], 5)
    assert seq.frames[1].max() == 5  # the caller's sequence is untouched


def test_other_pixel_types_become_float32(tmp_path):
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
    seq = read_sequence_nrrd(_write_plus_like(tmp_path / "i.igs.nrrd", stored, "MF"))
    assert seq.frames.dtype == np.float32
    np.testing.assert_array_equal(seq.frames, stored.astype(np.float32))
    assert seq.metadata["SourceElementType"] == "int16"
    header = header_of(write_sequence_nrrd(seq, tmp_path / "f.igs.nrrd"))
    assert header["type"] == "float" and "SourceElementType" not in header


def test_duplicate_frame_field(tmp_path):
    extra = {"Seq_Frame001_Timestamp": "5.0"}  # same frame as Seq_Frame0001_Timestamp
    path = _write_plus_like(tmp_path / "d.igs.nrrd", np.zeros((2, 2, 2), np.uint8), "MF", extra)
    with pytest.raises(FileFormatError, match="frame 1 has field 'Timestamp' twice"):
        read_sequence_nrrd(path)


def test_missing_transform_and_status_handling(tmp_path):
    stored = np.zeros((3, 2, 2), np.uint8)
    m = " ".join(["1", "0", "0", "5", "0", "1", "0", "6", "0", "0", "1", "7", "0", "0", "0", "1"])
    extra = {
        "Seq_Frame0000_ProbeToTrackerTransform": m,  # no status: valid
        "Seq_Frame0001_ProbeToTrackerTransform": m,
        "Seq_Frame0001_ProbeToTrackerTransformStatus": "MISSING",
        # frame 2: no matrix at all -> identity, invalid
        "Seq_Frame0000_CustomTransform": "not a <From>To<To> name",  # kept as text
    }
    seq = read_sequence_nrrd(_write_plus_like(tmp_path / "t.igs.nrrd", stored, "MF", extra))
    ft = seq.transforms["ProbeToTracker"]
    np.testing.assert_array_equal(ft.valid, [True, False, False])
    np.testing.assert_array_equal(ft.matrices[0][:3, 3], [5, 6, 7])
    np.testing.assert_array_equal(ft.matrices[2], np.eye(4))
    assert seq.frame_fields["CustomTransform"] == ["not a <From>To<To> name", "", ""]
    # ... and such a sequence can be written and read back unchanged
    back = read_sequence_nrrd(write_sequence_nrrd(seq, tmp_path / "t2.igs.nrrd"))
    assert_same_sequence(seq, back)


# ------------------------------------------------------------------------------------------------
# Slicer volume sequences


def _write_slicer_like(path, frames, *, list_first, space, dirs, origin, index_values):
    """A Slicer-style 4D volume sequence (no PLUS key/values), from (N, H, W) frames."""
    n = frames.shape[0]
    data = frames[:, None]  # (N, 1, H, W): sizes W H 1 N
    kinds = ["domain", "domain", "domain", "list"]
    space_dirs = list(dirs) + [[np.nan] * 3]
    axis = 3
    if list_first:
        data = np.moveaxis(data, 0, -1)  # (1, H, W, N): sizes N W H 1
        kinds = ["list"] + kinds[:3]
        space_dirs = [[np.nan] * 3] + list(dirs)
        axis = 0
    header = {
        "space": space,
        "kinds": kinds,
        "space directions": np.array(space_dirs, dtype=float),
        "space origin": np.asarray(origin, dtype=float),
        "encoding": "gzip",
        "DataNodeClassName": "vtkMRMLScalarVolumeNode",
        f"axis {axis} index type": "numeric",
        f"axis {axis} index values": " ".join(index_values),
        "SomeSequenceAttribute": "kept",
    }
    nrrd.write(str(path), data, header, index_order="C")
    assert n == len(index_values)
    return path


@pytest.mark.parametrize("list_first", [False, True], ids=["list-last", "list-first"])
def test_read_slicer_volume_sequence(tmp_path, list_first):
    frames = np.random.default_rng(3).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    dirs = [[0.0, 0.2, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, -2.0]]
    path = _write_slicer_like(
        tmp_path / "s.seq.nrrd",
        frames,
        list_first=list_first,
        space="right-anterior-superior",
        dirs=dirs,
        origin=[1.0, 2.0, 3.0],
        index_values=["0.5", "1.0", "1.5", "2.25"],
    )
    seq = read_sequence_nrrd(path)
    np.testing.assert_array_equal(seq.frames, frames)
    np.testing.assert_array_equal(seq.timestamps_s, [0.5, 1.0, 1.5, 2.25])
    assert seq.pixel_spacing_mm == (0.2, 0.3)
    assert seq.transforms == {}
    assert seq.metadata["SomeSequenceAttribute"] == "kept"
    assert "DataNodeClassName" not in seq.metadata
    ijk_to_ras = np.array([float(v) for v in seq.metadata["IJKToRAS"].split()]).reshape(4, 4)
    expected = np.eye(4)
    expected[:3, :3] = np.array(dirs).T
    expected[:3, 3] = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(ijk_to_ras, expected)  # RAS file: IJKToRAS as written


def test_slicer_geometry_survives_round_trip(tmp_path):
    frames = np.zeros((2, 3, 4), np.uint8)
    path = _write_slicer_like(
        tmp_path / "g.seq.nrrd",
        frames,
        list_first=False,
        space="left-posterior-superior",
        dirs=[[0.0, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 1.5]],
        origin=[-4.0, 5.0, 6.5],
        index_values=["0", "1"],
    )
    first = read_sequence_nrrd(path)
    ijk_to_ras = np.array([float(v) for v in first.metadata["IJKToRAS"].split()]).reshape(4, 4)
    np.testing.assert_array_equal(ijk_to_ras[:3, 3], [4.0, -5.0, 6.5])  # LPS -> RAS
    again = read_sequence_nrrd(write_sequence_nrrd(first, tmp_path / "g2.seq.nrrd"))
    assert_same_sequence(first, again)  # IJKToRAS included
    header = header_of(tmp_path / "g2.seq.nrrd")
    np.testing.assert_array_equal(header["space origin"], [-4.0, 5.0, 6.5])


def test_text_index_values_kept_as_frame_field(tmp_path):
    path = _write_slicer_like(
        tmp_path / "t.seq.nrrd",
        np.zeros((2, 3, 4), np.uint8),
        list_first=False,
        space="left-posterior-superior",
        dirs=np.eye(3),
        origin=[0, 0, 0],
        index_values=["first%20one", "second"],
    )
    seq = read_sequence_nrrd(path)
    np.testing.assert_array_equal(seq.timestamps_s, [0.0, 1.0])
    assert seq.frame_fields["IndexValue"] == ["first one", "second"]


# ------------------------------------------------------------------------------------------------
# real PLUS data


@pytest.mark.realdata
def test_nwire_phantom_freehand_nrrd():
    path = plus_file("TestImages/NwirePhantomFreehand.igs.nrrd")
    seq = read_sequence_nrrd(path)
    header = header_of(path)
    assert seq.n_frames == 97
    assert (seq.n_cols, seq.n_rows) == (820, 616)
    assert seq.frames.dtype == np.uint8
    assert set(seq.transforms) == {"ProbeToTracker", "ReferenceToTracker", "StylusToTracker"}
    for name in seq.transforms:
        said_ok = [header[f"Seq_Frame{i:04d}_{name}TransformStatus"] == "OK" for i in range(97)]
        np.testing.assert_array_equal(seq.transforms[name].valid, said_ok, err_msg=name)
    assert not seq.transforms["StylusToTracker"].valid.any()  # INVALID in every frame of this file
    assert seq.transforms["ProbeToTracker"].valid.all()
    np.testing.assert_array_equal(
        seq.transforms["ProbeToTracker"].matrices[0, 0], [0.956683, -0.263308, 0.124204, -190.886]
    )
    assert seq.timestamps_s[0] == 345.627957
    assert np.all(np.diff(seq.timestamps_s) > 0)
    assert seq.image_ok.all()
    assert seq.metadata == {"UltrasoundImageType": "BRIGHTNESS", "SourceOrientation": "MFA"}
    assert seq.pixel_spacing_mm is None
    raw, _ = nrrd.read(str(path), index_order="C")  # MFA: no flip
    np.testing.assert_array_equal(seq.frames, raw)


@pytest.mark.realdata
@pytest.mark.parametrize("suffix", [".igs.nrrd", ".seq.nrrd"])
def test_nwire_phantom_round_trip(tmp_path, suffix):
    seq = read_sequence_nrrd(plus_file("TestImages/NwirePhantomFreehand.igs.nrrd"))
    back = read_sequence_nrrd(write_sequence_nrrd(seq, tmp_path / f"n{suffix}"))
    assert_same_sequence(seq, back, ignore_metadata=("IJKToRAS",), atol=1e-9)


def _metaimage_or_skip():
    try:
        importlib.import_module("FreehandUSLib.io.metaimage")
    except ImportError as exc:
        pytest.skip(f"FreehandUSLib.io.metaimage (PLUS .mha reader) is not importable yet: {exc}")


@pytest.mark.realdata
def test_nrrd_and_metafile_readers_agree(tmp_path):
    seq = read_sequence_nrrd(plus_file("TestImages/NwirePhantomFreehand.igs.nrrd"))
    _metaimage_or_skip()
    via_mha = read_sequence(write_sequence(seq, tmp_path / "n.igs.mha"))
    assert_same_sequence(seq, via_mha)
    assert via_mha.metadata["SourceOrientation"] == "MF"


@pytest.mark.realdata
@pytest.mark.parametrize("suffix", [".igs.nrrd", ".seq.nrrd"])
def test_spine_phantom_mha_to_nrrd(tmp_path, suffix):
    path = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    _metaimage_or_skip()
    seq = read_sequence(path)
    back = read_sequence(write_sequence(seq, tmp_path / f"spine{suffix}"))
    assert back.n_frames == seq.n_frames == 21
    assert_same_sequence(seq, back, ignore_metadata=("IJKToRAS",))


# ------------------------------------------------------------------------------------------------
# volumes


def make_volume(dtype=np.uint8, n_channels=1) -> Volume:
    rng = np.random.default_rng(5)
    shape = (4, 5, 6) + ((n_channels,) if n_channels > 1 else ())
    voxels = (rng.integers(0, 200, shape) - (50 if np.dtype(dtype).kind != "u" else 0)).astype(dtype)
    return Volume(
        voxels=voxels,
        spacing_mm=(0.5, 0.7, 1.1),
        origin_mm=(10.25, -20.5, 30.0),
        directions=Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix(),
        metadata={"Source": "test volume"},
    )


@pytest.mark.parametrize(
    "dtype,n_channels", [(np.uint8, 1), (np.float32, 1), (np.int16, 1), (np.float64, 1), (np.uint8, 3)]
)
def test_volume_round_trip(tmp_path, dtype, n_channels):
    vol = make_volume(dtype, n_channels)
    path = write_volume(vol, tmp_path / "v.nrrd")  # through the io dispatcher
    back = read_volume(path)
    assert back.voxels.dtype == vol.voxels.dtype
    np.testing.assert_array_equal(back.voxels, vol.voxels)
    np.testing.assert_allclose(back.spacing_mm, vol.spacing_mm, rtol=1e-14)
    np.testing.assert_allclose(back.origin_mm, vol.origin_mm, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.directions, vol.directions, rtol=0, atol=1e-14)
    np.testing.assert_allclose(back.ijk_to_world, vol.ijk_to_world, rtol=0, atol=1e-12)
    assert back.metadata == vol.metadata
    header = header_of(path)
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"] == (["vector"] if n_channels > 1 else []) + ["domain"] * 3


def test_volume_detached_raw_and_bool(tmp_path):
    vol = Volume(voxels=np.eye(4, dtype=bool)[None].repeat(2, axis=0))
    back = read_volume_nrrd(write_volume_nrrd(vol, tmp_path / "b.nhdr", compress=False))
    assert back.voxels.dtype == np.uint8
    np.testing.assert_array_equal(back.voxels, vol.voxels.astype(np.uint8))


@pytest.mark.parametrize(
    "space,flip",
    [
        ("right-anterior-superior", (-1, -1, 1)),
        ("left-anterior-superior", (1, -1, 1)),
        ("3D-right-handed", (1, 1, 1)),
        (None, (1, 1, 1)),
    ],
)
def test_volume_space_converted_to_lps(tmp_path, space, flip):
    dirs = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # rows: i, j, k axes
    header = {
        "space directions": dirs,
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["domain"] * 3,
    }
    if space is None:
        header["space dimension"] = 3
    else:
        header["space"] = space
    nrrd.write(str(tmp_path / "r.nrrd"), np.zeros((2, 3, 4), np.uint8), header, index_order="C")
    vol = read_volume_nrrd(tmp_path / "r.nrrd")
    f = np.asarray(flip, dtype=float)
    np.testing.assert_array_equal(vol.origin_mm, f * [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(vol.spacing_mm, (2.0, 1.0, 3.0))
    np.testing.assert_array_equal(vol.directions, f[:, None] * (dirs.T / [2.0, 1.0, 3.0]))


# ------------------------------------------------------------------------------------------------
# Slicer interoperability (real MRML storage nodes from slicer-core)


def _slicer():
    return pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")


def _node_voxels_and_ijk_to_ras(node):
    import vtk
    from vtk.util import numpy_support

    image = node.GetImageData()
    nc = image.GetNumberOfScalarComponents()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels = voxels.reshape(image.GetDimensions()[::-1] + ((nc,) if nc > 1 else ()))
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return voxels, np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.mark.mrml
@pytest.mark.parametrize("dtype,n_channels", [(np.uint8, 1), (np.float32, 1), (np.uint8, 3)])
def test_slicer_loads_our_seq_nrrd(tmp_path, mrml_scene, dtype, n_channels):
    slicer = _slicer()
    seq = make_synthetic_sequence(n_frames=4, n_rows=6, n_cols=9, dtype=dtype, n_channels=n_channels)
    seq.pixel_spacing_mm = (0.2, 0.3)
    path = write_sequence_nrrd(seq, tmp_path / "ours.seq.nrrd")
    scene = mrml_scene
    node = slicer.vtkMRMLSequenceNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    assert node.GetNumberOfDataNodes() == 4
    assert node.GetIndexName() == "time" and node.GetIndexUnit() == "s"
    for i in range(4):
        assert float(node.GetNthIndexValue(i)) == seq.timestamps_s[i]
        voxels, ijk_to_ras = _node_voxels_and_ijk_to_ras(node.GetNthDataNode(i))
        np.testing.assert_array_equal(voxels[0], seq.frames[i])
        np.testing.assert_allclose(ijk_to_ras, LPS_TO_RAS @ np.diag([0.2, 0.3, 1.0, 1.0]), atol=1e-12)
    expected_class = "vtkMRMLVectorVolumeNode" if n_channels > 1 else "vtkMRMLScalarVolumeNode"
    assert node.GetNthDataNode(0).GetClassName() == expected_class


@pytest.mark.mrml
def test_we_read_slicer_written_seq_nrrd(tmp_path, mrml_scene):
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    frames = np.random.default_rng(7).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    scene = mrml_scene
    node = slicer.vtkMRMLSequenceNode()
    scene.AddNode(node)
    node.SetIndexName("time")
    node.SetIndexUnit("s")
    direction = vtk.vtkMatrix4x4()  # i -> A, j -> R, k -> -S
    for r, c, v in [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (2, 2, -1)]:
        direction.SetElement(r, c, v)
    for t, frame in zip(["0.5", "1.25", "2.0"], frames, strict=True):
        volume = slicer.vtkMRMLScalarVolumeNode()
        image = vtk.vtkImageData()
        image.SetDimensions(7, 5, 1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = frame.ravel()
        volume.SetAndObserveImageData(image)
        volume.SetSpacing(0.1, 0.2, 1.5)
        volume.SetOrigin(10.0, 20.0, 30.0)
        volume.SetIJKToRASDirectionMatrix(direction)
        node.SetDataNodeAtValue(volume, t)
    _, slicer_ijk_to_ras = _node_voxels_and_ijk_to_ras(node.GetNthDataNode(0))
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.seq.nrrd"))
    assert storage.WriteData(node) == 1

    seq = read_sequence_nrrd(tmp_path / "slicer.seq.nrrd")
    np.testing.assert_array_equal(seq.frames, frames)
    np.testing.assert_array_equal(seq.timestamps_s, [0.5, 1.25, 2.0])
    np.testing.assert_allclose(seq.pixel_spacing_mm, (0.1, 0.2), rtol=1e-12)
    ijk_to_ras = np.array([float(v) for v in seq.metadata["IJKToRAS"].split()]).reshape(4, 4)
    np.testing.assert_allclose(ijk_to_ras, slicer_ijk_to_ras, atol=1e-12)


def _write_mha(path, vol: Volume):
    """A minimal uncompressed MetaImage (test-only; the project's writer is io.metaimage)."""
    text = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            "DimSize = " + " ".join(str(v) for v in vol.dimensions),
            "ElementSpacing = " + " ".join(repr(v) for v in vol.spacing_mm),
            "ElementType = MET_UCHAR",
            "Offset = " + " ".join(repr(v) for v in vol.origin_mm),
            "TransformMatrix = " + " ".join(f"{v:.17g}" for v in vol.directions.T.ravel()),
            "ElementDataFile = LOCAL",
        ]
    )
    path.write_bytes(text.encode("ascii") + b"\n" + vol.voxels.tobytes())
    return path


@pytest.mark.mrml
def test_slicer_places_nrrd_volume_where_it_places_mha(tmp_path, mrml_scene):
    slicer = _slicer()
    vol = make_volume()

    def load(path):
        scene = mrml_scene
        node = slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(node)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(path))
        assert storage.ReadData(node) == 1, path
        return _node_voxels_and_ijk_to_ras(node)

    nrrd_voxels, nrrd_ijk_to_ras = load(write_volume_nrrd(vol, tmp_path / "v.nrrd"))
    mha_voxels, mha_ijk_to_ras = load(_write_mha(tmp_path / "v.mha", vol))
    np.testing.assert_array_equal(nrrd_voxels, vol.voxels)
    np.testing.assert_array_equal(mha_voxels, vol.voxels)
    np.testing.assert_allclose(nrrd_ijk_to_ras, mha_ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(nrrd_ijk_to_ras, LPS_TO_RAS @ vol.ijk_to_world, atol=1e-9)


@pytest.mark.mrml
@pytest.mark.parametrize(
    "space",
    ["right-anterior-superior", "left-anterior-superior", "3D-right-handed", "left-posterior-superior"],
)
def test_read_volume_space_matches_slicer(tmp_path, mrml_scene, space):
    """Every voxel lands at the RAS position Slicer gives it (Slicer may flip k to stay right-handed)."""
    slicer = _slicer()
    rotation = Rotation.from_rotvec([0.2, 0.1, -0.3]).as_matrix()
    header = {
        "space": space,
        "kinds": ["domain"] * 3,
        "space directions": (rotation * [0.5, 1.5, 2.0]).T,  # rows: i, j, k axes
        "space origin": np.array([3.0, -4.0, 5.0]),
    }
    path = tmp_path / "s.nrrd"
    nrrd.write(str(path), np.arange(24, dtype=np.uint8).reshape(2, 3, 4), header, index_order="C")
    ours = read_volume_nrrd(path)
    node = slicer.vtkMRMLScalarVolumeNode()
    mrml_scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    mrml_scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    slicer_voxels, slicer_ijk_to_ras = _node_voxels_and_ijk_to_ras(node)

    def ras_by_value(voxels, ijk_to_ras):
        k, j, i = np.indices(voxels.shape)
        ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        ras = (ijk_to_ras @ ijk)[:3].T
        return ras[np.argsort(voxels.ravel())]

    np.testing.assert_allclose(
        ras_by_value(ours.voxels, LPS_TO_RAS @ ours.ijk_to_world),
        ras_by_value(slicer_voxels, slicer_ijk_to_ras),
        atol=1e-9,
    )


# ------------------------------------------------------------------------------------------------
# bad input


def _raw_nrrd(path, data, header):
    nrrd.write(str(path), data, header, index_order="C")
    return path


@pytest.mark.parametrize(
    "shape,header,field",
    [
        ((4, 5), {"kinds": ["domain", "domain"]}, "dimension"),
        ((2, 3, 4, 5, 6, 7), {}, "dimension"),
        ((3, 4, 5), {}, "kinds"),
        ((3, 4, 5), {"kinds": ["domain", "domain", "domain"]}, "kinds"),
        ((3, 4, 5), {"kinds": ["list", "list", "domain"]}, "kinds"),
        ((3, 4, 5, 2), {"kinds": ["vector", "domain", "vector", "list"]}, "kinds"),
        ((3, 2, 4, 5), {"kinds": ["domain", "domain", "domain", "list"]}, "2D slices"),
    ],
    ids=["2d", "6d", "no-kinds", "volume-kinds", "two-lists", "two-channels", "thick-frames"],
)
def test_bad_sequence_layout(tmp_path, shape, header, field):
    path = _raw_nrrd(tmp_path / "bad.nrrd", np.zeros(shape, np.uint8), header)
    with pytest.raises(FileFormatError, match=field) as info:
        read_sequence_nrrd(path)
    assert "bad.nrrd" in str(info.value)


def _truncate(path, keep_fraction):
    data = path.read_bytes()
    body = data.index(b"\n\n") + 2
    path.write_bytes(data[: body + int((len(data) - body) * keep_fraction)])


def test_truncated_gzip_data(tmp_path):
    seq = make_synthetic_sequence(n_frames=6)
    path = write_sequence_nrrd(seq, tmp_path / "cut.igs.nrrd")
    _truncate(path, 0.5)
    with pytest.raises(FileFormatError, match="truncated or corrupt") as info:
        read_sequence_nrrd(path)
    assert "cut.igs.nrrd" in str(info.value) and "gzip" in str(info.value)


def test_truncated_raw_volume(tmp_path):
    path = write_volume_nrrd(make_volume(), tmp_path / "cut.nrrd", compress=False)
    _truncate(path, 0.9)
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        read_volume_nrrd(path)


def test_corrupt_gzip_data(tmp_path):
    path = write_sequence_nrrd(make_synthetic_sequence(n_frames=3), tmp_path / "bad.igs.nrrd")
    data = bytearray(path.read_bytes())
    body = data.index(b"\n\n") + 2
    data[body + 20 : body + 60] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="bad.igs.nrrd.*(truncated or corrupt)"):
        read_sequence_nrrd(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty file"),
        (b"P5\n2 2\n255\n\x00\x00\x00\x00", "invalid NRRD header"),
        (b"NRRD0004\ntype: uint8\nsizes: 2 2\nencoding: raw\n\n\x00\x00\x00\x00", "dimension"),
    ],
)
def test_not_a_nrrd(tmp_path, content, match):
    path = tmp_path / "x.nrrd"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=match):
        read_sequence_nrrd(path)
    with pytest.raises(FileFormatError, match=match):
        read_volume_nrrd(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        read_sequence_nrrd(tmp_path / "nothing.igs.nrrd")
    with pytest.raises(FileFormatError, match="not found"):
        read_volume_nrrd(tmp_path / "nothing.nrrd")


def test_empty_sequence(tmp_path):
    path = _raw_nrrd(
        tmp_path / "e.igs.nrrd", np.zeros((0, 3, 4), np.uint8), {"kinds": ["domain", "domain", "list"]}
    )
    with pytest.raises(SequenceError, match="e.igs.nrrd.*no frames"):
        read_sequence_nrrd(path)
    empty = TrackedSequence(frames=np.zeros((0, 3, 4), np.uint8))
    with pytest.raises(SequenceError, match="empty"):
        write_sequence_nrrd(empty, tmp_path / "e2.igs.nrrd")


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            {"Seq_Frame0001_ProbeToTrackerTransform": "1 0 0 0 1 0 0 0 1"},
            "Seq_Frame0001_ProbeToTrackerTransform",
        ),
        ({"Seq_Frame0001_ProbeToTrackerTransform": " ".join(["x"] * 16)}, "16 numbers"),
        ({"Seq_Frame0007_Timestamp": "1.0"}, "frame 7"),
        ({"Seq_Frame0001_Timestamp": "soon"}, "Seq_Frame0001_Timestamp"),
        ({"ultrasound image orientation": "XY"}, "UltrasoundImageOrientation"),
    ],
    ids=["short-matrix", "text-matrix", "frame-out-of-range", "bad-timestamp", "bad-orientation"],
)
def test_bad_per_frame_values(tmp_path, extra, match):
    path = _write_plus_like(tmp_path / "f.igs.nrrd", np.zeros((3, 2, 2), np.uint8), "MF", extra)
    with pytest.raises(FileFormatError, match=match) as info:
        read_sequence_nrrd(path)
    assert "f.igs.nrrd" in str(info.value)


def test_timestamps_missing_for_some_frames(tmp_path):
    stored = np.zeros((2, 2, 2), np.uint8)
    header = {"kinds": ["domain", "domain", "list"], "Seq_Frame0000_Timestamp": "1.0"}
    path = _raw_nrrd(tmp_path / "ts.igs.nrrd", stored, header)
    with pytest.raises(FileFormatError, match="'Timestamp' is missing for frame"):
        read_sequence_nrrd(path)


def test_index_values_count_mismatch(tmp_path):
    path = _write_slicer_like(
        tmp_path / "m.seq.nrrd",
        np.zeros((2, 3, 4), np.uint8),
        list_first=False,
        space="left-posterior-superior",
        dirs=np.eye(3),
        origin=[0, 0, 0],
        index_values=["0", "1"],
    )
    header = header_of(path)
    header["axis 3 index values"] = "0 1 2"
    data, _ = nrrd.read(str(path), index_order="C")
    nrrd.write(str(path), data, header, index_order="C")
    with pytest.raises(FileFormatError, match="'axis 3 index values' has 3 values, expected 2"):
        read_sequence_nrrd(path)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.metadata.update({"Note": "two\nlines"}), "newline"),
        (lambda s: s.metadata.update({"Note": "caf\u00e9"}), "ASCII"),
        (lambda s: s.metadata.update({"a:b": "x"}), "cannot be a NRRD key"),
        (lambda s: s.metadata.update({"kinds": "x"}), "reserved"),
        (lambda s: s.metadata.update({"Seq_Frame0000_Foo": "x"}), "reserved"),
        (lambda s: s.metadata.update({"DataNodeClassName": "x"}), "reserved"),
        (lambda s: s.frame_fields.update({"Timestamp": ["1"] * s.n_frames}), "Timestamp"),
        (
            lambda s: s.frame_fields.update({"FooToBarTransform": ["1"] * s.n_frames}),
            "FooToBarTransform",
        ),
        (lambda s: s.frame_fields.update({"Note": ["a\nb"] * s.n_frames}), "newline"),
    ],
    ids=[
        "newline",
        "non-ascii",
        "colon-key",
        "nrrd-field",
        "frame-key",
        "slicer-key",
        "timestamp-field",
        "transform-field",
        "field-newline",
    ],
)
def test_unwritable_metadata_and_fields(tmp_path, change, match):
    seq = make_synthetic_sequence(n_frames=3)
    change(seq)
    with pytest.raises(SequenceError, match=match) as info:
        write_sequence_nrrd(seq, tmp_path / "w.seq.nrrd")
    assert "w.seq.nrrd" in str(info.value)


def test_bad_flavor_and_type(tmp_path):
    seq = make_synthetic_sequence(n_frames=2)
    with pytest.raises(ValueError, match="flavor"):
        write_sequence_nrrd(seq, tmp_path / "a.nrrd", flavor="itk")
    with pytest.raises(TypeError, match="TrackedSequence"):
        write_sequence_nrrd(seq.frames, tmp_path / "a.nrrd")


def test_unwritable_path(tmp_path):
    with pytest.raises(FileFormatError, match="cannot write"):
        write_sequence_nrrd(make_synthetic_sequence(n_frames=2), tmp_path / "no" / "dir" / "a.igs.nrrd")


@pytest.mark.parametrize(
    "shape,header,match",
    [
        ((3, 4), {}, "dimension"),
        ((2, 3, 4, 5), {"kinds": ["domain", "domain", "domain", "list"]}, "kinds"),
        ((2, 3, 4, 5), {"kinds": ["list", "domain", "domain", "domain"]}, "kinds"),
        ((2, 3, 4), {"space": "scanner-xyz", "kinds": ["domain"] * 3}, "'space'"),
        ((2, 3, 4), {"space directions": np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 1]])}, "spacing"),
    ],
    ids=["2d", "sequence-list-last", "sequence-list-first", "unknown-space", "zero-direction"],
)
def test_bad_volume(tmp_path, shape, header, match):
    header = dict(header)
    if "space directions" in header:
        header["space"] = "left-posterior-superior"
    path = _raw_nrrd(tmp_path / "badvol.nrrd", np.zeros(shape, np.uint8), header)
    with pytest.raises(FileFormatError, match=match) as info:
        read_volume_nrrd(path)
    assert "badvol.nrrd" in str(info.value)


def test_unwritable_volume(tmp_path):
    with pytest.raises(FreehandUSError, match="float16"):
        write_volume_nrrd(Volume(np.zeros((2, 2, 2), np.float16)), tmp_path / "h.nrrd")
    with pytest.raises(FreehandUSError, match="standard NRRD field"):
        write_volume_nrrd(
            Volume(np.zeros((2, 2, 2), np.uint8), metadata={"space": "x"}), tmp_path / "h.nrrd"
        )


def test_gzip_payload_is_real_gzip(tmp_path):
    """Our gzip encoding is plain gzip (what teem/ITK/PLUS decode), not raw zlib."""
    path = write_sequence_nrrd(make_synthetic_sequence(n_frames=2), tmp_path / "g.igs.nrrd")
    data = path.read_bytes()
    payload = data[data.index(b"\n\n") + 2 :]
    assert len(gzip.decompress(payload)) == 2 * 48 * 64


# ------------------------------------------------------------------------------------------------
# hostile headers: every read bounded by the size the header implies, data files beside the
# header, one-line messages (issue 21)


def _hand_nrrd(path, fields: list[str], data: bytes = b"") -> Path:
    """A NRRD file written by hand: ``NRRD0004``, the header lines, a blank line, ``data``."""
    path.write_bytes(("\n".join(["NRRD0004", *fields]) + "\n\n").encode("ascii") + data)
    return path


_PLUS_FIELDS = ["type: uint8", "dimension: 3", "sizes: 4 3 2", "kinds: domain domain list"]


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


def test_empty_space_origin_is_a_format_error(tmp_path):
    # pynrrd raised IndexError for 'space origin: ' (empty)
    fields = ["type: uint8", "dimension: 3", "space: left-posterior-superior", "sizes: 2 2 2",
              "space origin: ", "encoding: raw"]
    path = _hand_nrrd(tmp_path / "o.nrrd", fields, bytes(8))
    with pytest.raises(FileFormatError, match=r"o\.nrrd: invalid NRRD header"):
        read_volume_nrrd(path)
    with pytest.raises(FileFormatError, match=r"o\.nrrd: invalid NRRD header"):
        read_sequence_nrrd(path)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_huge_line_skip_does_not_hang(tmp_path, encoding):
    import time

    data = bytes(24) if encoding == "raw" else gzip.compress(bytes(24))
    path = _hand_nrrd(tmp_path / "l.igs.nrrd", [*_PLUS_FIELDS, f"encoding: {encoding}", "line skip: 99999999999"], data)
    start = time.monotonic()
    with pytest.raises(FileFormatError, match=r"'line skip' 99999999999 is more lines than"):
        read_sequence_nrrd(path)
    assert time.monotonic() - start < 2
    # a line skip within the file but past its end: stops at the end of the file
    path = _hand_nrrd(tmp_path / "l2.igs.nrrd", [*_PLUS_FIELDS, "encoding: raw", "line skip: 20"], b"\n" * 5 + bytes(30))
    with pytest.raises(FileFormatError, match=r"ends after 5 of the 20 lines"):
        read_sequence_nrrd(path)


@pytest.mark.parametrize("encoding", ["raw", "gzip", "bzip2"])
def test_huge_byte_skip(tmp_path, encoding):
    import bz2

    payload = {"raw": bytes(24), "gzip": gzip.compress(bytes(24)), "bzip2": bz2.compress(bytes(24))}
    path = _hand_nrrd(
        tmp_path / "b.igs.nrrd",
        [*_PLUS_FIELDS, f"encoding: {encoding}", "byte skip: 99999999999"],
        payload[encoding],
    )
    peak, message = _peak_and_error(lambda: read_sequence_nrrd(path))
    assert peak < 16 << 20, peak
    assert "truncated or corrupt" in message or "cannot hold" in message, message


def test_byte_skip_minus_one_only_with_raw(tmp_path):
    path = _hand_nrrd(tmp_path / "m.igs.nrrd", [*_PLUS_FIELDS, "encoding: gzip", "byte skip: -1"], gzip.compress(bytes(24)))
    with pytest.raises(FileFormatError, match=r"'byte skip: -1'.*only valid with raw"):
        read_sequence_nrrd(path)
    path = _hand_nrrd(tmp_path / "r.igs.nrrd", [*_PLUS_FIELDS, "encoding: raw", "byte skip: -1"], b"junk" + bytes(range(24)))
    assert read_sequence_nrrd(path).frames.reshape(-1).tolist() == list(range(24))


@pytest.mark.parametrize(
    "name", ["/dev/zero", "/etc/passwd", "../outside.raw", "../../../../../../../etc/passwd", "link.raw"]
)
def test_detached_data_file_outside_the_folder_is_refused(tmp_path, name):
    folder = tmp_path / "rec"
    folder.mkdir()
    (tmp_path / "outside.raw").write_bytes(bytes(24))
    (folder / "link.raw").symlink_to(tmp_path / "outside.raw")
    path = _hand_nrrd(folder / "d.igs.nhdr", [*_PLUS_FIELDS, "encoding: raw", f"data file: {name}"])
    start_peak, message = _peak_and_error(lambda: read_sequence_nrrd(path))
    assert "lies outside the header's folder" in message and start_peak < 16 << 20


def test_detached_data_file_must_be_a_regular_file(tmp_path):
    (tmp_path / "dir.raw").mkdir()
    path = _hand_nrrd(tmp_path / "d.igs.nhdr", [*_PLUS_FIELDS, "encoding: raw", "data file: dir.raw"])
    with pytest.raises(FileFormatError, match=r"not a regular file"):
        read_sequence_nrrd(path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.raw").write_bytes(bytes(range(24)))
    path = _hand_nrrd(tmp_path / "d.igs.nhdr", [*_PLUS_FIELDS, "encoding: raw", "data file: sub/d.raw"])
    assert read_sequence_nrrd(path).frames.sum() == sum(range(24))


def test_gzip_bomb_is_inflated_only_as_far_as_the_header_says(tmp_path):
    # 64 MiB of zeros in ~64 kB of gzip behind a header that asks for 24 bytes (issue 21: a
    # 2 MB bomb inflating to 2 GiB was read until memory ran out).
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    bomb = b"".join(compressor.compress(block) for _ in range(64)) + compressor.flush()
    path = _hand_nrrd(tmp_path / "bomb.igs.nrrd", [*_PLUS_FIELDS, "encoding: gzip"], bomb)
    peak, message = _peak_and_error(lambda: read_sequence_nrrd(path))
    assert peak < 8 << 20, peak
    assert "hold more than the 24 bytes" in message


def test_sizes_larger_than_the_compressed_data(tmp_path):
    path = _hand_nrrd(
        tmp_path / "s.igs.nrrd",
        ["type: uint8", "dimension: 3", "sizes: 100000 100000 100000", "kinds: domain domain list", "encoding: gzip"],
        gzip.compress(bytes(24)),
    )
    peak, message = _peak_and_error(lambda: read_sequence_nrrd(path))
    assert peak < 8 << 20 and "cannot hold that much" in message


def test_messages_have_no_numpy_reprs_and_no_huge_values(tmp_path):
    path = _hand_nrrd(tmp_path / "t.igs.nrrd", [*_PLUS_FIELDS, "encoding: raw"], bytes(5))
    with pytest.raises(FileFormatError) as info:
        read_sequence_nrrd(path)
    assert "np." not in str(info.value) and "[4, 3, 2]" in str(info.value)
    for field in ("type", "encoding", "kinds", "sizes", "endian"):
        fields = [f for f in [*_PLUS_FIELDS, "encoding: raw"] if not f.startswith(field)]
        if field == "endian":
            fields = [f.replace("uint8", "uint16") for f in fields]
        path = _hand_nrrd(tmp_path / "h.igs.nrrd", [*fields, f"{field}: {'x' * 300_000}"], bytes(24))
        with pytest.raises(FileFormatError) as info:
            read_sequence_nrrd(path)
        assert len(str(info.value)) < 400 and "\n" not in str(info.value), field

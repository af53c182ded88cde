"""PLUS sequence metafiles and MetaImage volumes: real PLUS files, synthetic round trips, bad
input, header fuzzing, streaming memory."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testdata import make_synthetic_sequence, plus_file

from FreehandUSLib import FileFormatError, SequenceError, TrackedSequence, Volume
from FreehandUSLib.io import read_sequence, read_volume, write_sequence, write_volume
from FreehandUSLib.io.metaimage import (
    SequenceMetafileWriter,
    format_metaimage_header,
    parse_metaimage_header,
    read_metaimage_header,
    read_sequence_metafile,
    read_volume_metafile,
    write_sequence_metafile,
    write_volume_metafile,
)
from FreehandUSLib.orientation import to_mf

# name, frames, width, height, transforms
PLUS_SEQUENCES = [
    ("fCal_Test_Calibration_3NWires_fCal2.0.igs.mha", 190, 820, 616, 3),
    ("fCal_Test_Validation_3NWires_fCal2.0.igs.mha", 103, 820, 616, 3),
    ("SpinePhantomFreehand.igs.mha", 21, 820, 616, 3),
    ("BoneUltrasound_L14.igs.mha", 21, 820, 616, 3),
    ("USTC_FrameGrabber_ProbeRotationData.igs.mha", 200, 640, 480, 1),
]
PLUS_NAMES = [p[0] for p in PLUS_SEQUENCES]


@functools.lru_cache(maxsize=None)
def _read_plus(name: str) -> TrackedSequence:
    return read_sequence_metafile(plus_file(f"TestImages/{name}"))


def assert_same_sequence(a: TrackedSequence, b: TrackedSequence, *, metadata=True):
    assert a.frames.dtype == b.frames.dtype
    assert a.frames.shape == b.frames.shape
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.timestamps_s, b.timestamps_s)
    assert np.array_equal(a.image_ok, b.image_ok)
    assert list(a.transforms) == list(b.transforms)
    for name in a.transforms:
        ta, tb = a.transforms[name], b.transforms[name]
        assert np.array_equal(ta.valid, tb.valid), name
        ok = ta.valid
        np.testing.assert_allclose(tb.matrices[ok], ta.matrices[ok], rtol=0, atol=1e-9)
    assert a.frame_fields == b.frame_fields
    assert a.pixel_spacing_mm == b.pixel_spacing_mm
    if metadata:
        strip = lambda m: {k: v for k, v in m.items() if k != "SourceOrientation"}  # noqa: E731
        assert strip(a.metadata) == strip(b.metadata)


def write_raw_metafile(path: Path, header: dict, data: bytes) -> Path:
    """A hand-made MetaImage file: ``header`` fields, ``ElementDataFile = LOCAL``, ``data``."""
    text = format_metaimage_header({**header, "ElementDataFile": "LOCAL"})
    path.write_bytes(text.encode("ascii") + data)
    return path


def seq_header(n_frames=3, rows=4, cols=5, **extra) -> dict:
    header = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        "DimSize": f"{cols} {rows} {n_frames}",
        "ElementType": "MET_UCHAR",
    }
    header.update(extra)
    return header


def ramp(n_frames=3, rows=4, cols=5) -> np.ndarray:
    return (np.arange(n_frames * rows * cols) % 251).astype(np.uint8).reshape(n_frames, rows, cols)


# -------------------------------------------------------------------------------------------
# Real PLUS data
# -------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("name,n_frames,width,height,n_transforms", PLUS_SEQUENCES)
def test_plus_sequences_read_with_plus_frame_counts(name, n_frames, width, height, n_transforms):
    seq = _read_plus(name)
    assert seq.frames.shape == (n_frames, height, width)
    assert seq.frames.dtype == np.uint8
    assert len(seq.transforms) == n_transforms
    assert seq.image_ok.all()
    assert np.all(np.diff(seq.timestamps_s) > 0)
    assert seq.pixel_spacing_mm is None  # ElementSpacing 1 1 1: no spacing information
    assert seq.frames.max() > 0
    for ft in seq.transforms.values():
        assert ft.valid.all()
        np.testing.assert_array_equal(ft.matrices[:, 3], np.tile([0, 0, 0, 1], (n_frames, 1)))


@pytest.mark.realdata
def test_plus_mn_sequence_is_flipped_to_mf():
    path = plus_file("TestImages/USTC_FrameGrabber_ProbeRotationData.igs.mha")
    seq = _read_plus(path.name)
    header, offset = read_metaimage_header(path)
    assert header["UltrasoundImageOrientation"] == "MN"
    assert seq.metadata["SourceOrientation"] == "MN"
    raw = zlib.decompress(path.read_bytes()[offset:])
    stored = np.frombuffer(raw, np.uint8).reshape(200, 480, 640)
    # MN -> MF: the near side is at the top in the file, at the bottom in memory.
    assert np.array_equal(seq.frames, stored[:, ::-1, :])
    assert not np.array_equal(seq.frames[0], stored[0])
    assert seq.frame_fields["ProbeRotation"][1] == "-0.386266"
    assert seq.timestamps_s[1] == pytest.approx(0.1)
    assert seq.metadata["DefaultFrameTransformName"] == "ProbeToReferenceTransform"


@pytest.mark.realdata
def test_plus_transform_equals_header_numbers():
    path = plus_file("TestImages/SpinePhantomFreehand.igs.mha")
    seq = _read_plus(path.name)
    header, _ = read_metaimage_header(path)
    numbers = [float(v) for v in header["Seq_Frame0000_ProbeToTrackerTransform"].split()]
    assert numbers[:4] == [0.231245, 0.951424, -0.203269, 172.641]
    assert np.array_equal(seq.transforms["ProbeToTracker"].matrices[0], np.reshape(numbers, (4, 4)))
    assert seq.timestamps_s[0] == 215.102186
    assert seq.metadata["SourceOrientation"] == "MFA"
    assert set(seq.transforms) == {"ProbeToTracker", "ReferenceToTracker", "StylusToTracker"}


@pytest.mark.realdata
def test_plus_header_offset_and_compressed_size():
    path = plus_file("TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha")
    header, offset = read_metaimage_header(path)
    assert list(header)[:2] == ["ObjectType", "NDims"]
    assert list(header)[-1] == "ElementDataFile"
    assert header["DimSize"] == "820 616 190"
    assert path.stat().st_size - offset == int(header["CompressedDataSize"])


@pytest.mark.realdata
@pytest.mark.parametrize("name", PLUS_NAMES)
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("suffix", [".igs.mha", ".igs.mhd"])
def test_plus_round_trip(tmp_path, name, compress, suffix):
    seq = _read_plus(name)
    out = write_sequence_metafile(seq, tmp_path / f"copy{suffix}", compress=compress)
    back = read_sequence_metafile(out)
    assert_same_sequence(seq, back)
    assert back.metadata["SourceOrientation"] == "MF"
    header, _ = read_metaimage_header(out)
    assert header["UltrasoundImageOrientation"] == "MF"
    assert list(header)[-1] == "ElementDataFile"
    assert header["CompressedData"] == ("True" if compress else "False")
    if suffix == ".igs.mhd":
        data = tmp_path / ("copy.igs.zraw" if compress else "copy.igs.raw")
        assert header["ElementDataFile"] == data.name and data.is_file()
    # PLUS key order: structural keys first, DimSize before the frames, ElementDataFile last
    keys = list(header)
    assert keys.index("DimSize") < keys.index("Seq_Frame0000_Timestamp")


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name,dims,offset",
    [
        (
            "vtkVolumeReconstructorTestNNLATEvolumeRef.mha",
            (80, 93, 98),
            (-57.0272, 168.545, 30.5384),
        ),
        (
            "vtkVolumeReconstructorTestNNMEANvolumeRef.mha",
            (147, 106, 105),
            (-74.5217, 165.573, 29.072),
        ),
        (
            "vtkVolumeReconstructorTestLNMAXIvolumeRef.mha",
            (147, 106, 105),
            (-74.5217, 165.573, 29.072),
        ),
    ],
)
def test_plus_reconstruction_references(tmp_path, name, dims, offset):
    vol = read_volume_metafile(plus_file(f"TestImages/{name}"))
    assert vol.dimensions == dims
    assert vol.voxels.shape == dims[::-1]
    assert vol.voxels.dtype == np.uint8
    assert vol.spacing_mm == (0.5, 0.5, 0.5)
    assert vol.origin_mm == offset
    assert np.array_equal(vol.directions, np.eye(3))
    assert vol.voxels.max() > 0
    for compress in (False, True):
        back = read_volume_metafile(
            write_volume_metafile(vol, tmp_path / "v.mha", compress=compress)
        )
        assert np.array_equal(back.voxels, vol.voxels)
        assert back.origin_mm == vol.origin_mm and back.spacing_mm == vol.spacing_mm
        assert back.metadata == vol.metadata


# -------------------------------------------------------------------------------------------
# Synthetic round trips
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("n_channels", [1, 3])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("suffix", [".igs.mha", ".igs.mhd", ".seq.mha"])
def test_synthetic_round_trip(tmp_path, dtype, n_channels, compress, suffix):
    seq = make_synthetic_sequence(7, 9, 11, dtype=dtype, n_channels=n_channels, seed=3)
    seq.image_ok[2] = False
    seq.frames[2] = 0
    seq.frame_fields["ProbePosition"] = [f"{i * 0.5} mm" for i in range(7)]
    seq.frame_fields["Note"] = [""] * 3 + ["x"] * 4
    seq.metadata["UltrasoundImageType"] = "BRIGHTNESS"
    seq.metadata["Operator"] = "a b  c"
    seq.pixel_spacing_mm = (0.123456789, 0.2)
    out = write_sequence(seq, tmp_path / f"s{suffix}", compress=compress)
    back = read_sequence(out)
    assert_same_sequence(seq, back)
    assert back.frames.shape[1:] == ((9, 11, 3) if n_channels == 3 else (9, 11))
    assert not back.image_ok[2] and back.image_ok.sum() == 6
    assert not back.transforms["ReferenceToTracker"].valid[3]
    assert back.metadata["Operator"] == "a b  c"


def test_invalid_transforms_and_nan_matrices_round_trip(tmp_path):
    seq = make_synthetic_sequence(5, 6, 7)
    mats = seq.transforms["ProbeToTracker"].matrices.copy()
    mats[1] = np.nan
    valid = np.array([True, False, True, False, True])
    seq.set_transform("ProbeToTracker", mats, valid)
    out = write_sequence_metafile(seq, tmp_path / "t.igs.mha")
    header, _ = read_metaimage_header(out)
    assert header["Seq_Frame0001_ProbeToTrackerTransformStatus"] == "INVALID"
    assert header["Seq_Frame0000_ProbeToTrackerTransformStatus"] == "OK"
    back = read_sequence_metafile(out)
    assert np.array_equal(back.transforms["ProbeToTracker"].valid, valid)
    assert np.isnan(back.transforms["ProbeToTracker"].matrices[1]).all()
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].matrices[3], mats[3])


def test_numbers_are_written_with_full_precision(tmp_path):
    seq = make_synthetic_sequence(2, 3, 4)
    seq.timestamps_s[:] = [0.1 + 0.2, 1e-300]
    mats = seq.transforms["ProbeToTracker"].matrices.copy()
    mats[0, 0, 3] = 1.0 / 3.0
    seq.set_transform("ProbeToTracker", mats)
    back = read_sequence_metafile(write_sequence_metafile(seq, tmp_path / "p.mha"))
    assert back.timestamps_s[0] == 0.1 + 0.2 and back.timestamps_s[1] == 1e-300
    assert back.transforms["ProbeToTracker"].matrices[0, 0, 3] == 1.0 / 3.0
    header, _ = read_metaimage_header(tmp_path / "p.mha")
    assert header["Seq_Frame0000_ProbeToTrackerTransform"].endswith(" 0 0 0 1")


@pytest.mark.parametrize("orientation", ["MF", "MN", "UF", "UN", "UNA", "mfa"])
@pytest.mark.parametrize("n_channels", [1, 2])
def test_orientations_are_flipped_to_mf(tmp_path, orientation, n_channels):
    rng = np.random.default_rng(1)
    mf = rng.integers(0, 256, size=(3, 4, 5, n_channels), dtype=np.uint8)
    if n_channels == 1:
        mf = mf[..., 0]
    stored = np.ascontiguousarray(to_mf(mf, orientation))  # the flip is its own inverse
    header = seq_header(
        UltrasoundImageOrientation=orientation, ElementNumberOfChannels=str(n_channels)
    )
    path = write_raw_metafile(tmp_path / "o.igs.mha", header, stored.tobytes())
    seq = read_sequence_metafile(path)
    assert np.array_equal(seq.frames, mf)
    assert seq.frames.flags.c_contiguous
    assert seq.metadata["SourceOrientation"] == orientation
    if orientation[:2].upper() != "MF":
        assert not np.array_equal(seq.frames, stored)


def test_missing_orientation_means_mf_and_no_timestamps_default(tmp_path):
    path = write_raw_metafile(tmp_path / "a.mha", seq_header(), ramp().tobytes())
    seq = read_sequence_metafile(path)
    assert np.array_equal(seq.frames, ramp())
    assert np.array_equal(seq.timestamps_s, [0.0, 1.0, 2.0])
    assert seq.transforms == {} and seq.frame_fields == {}


def test_single_frame_ndims2_and_ndims4(tmp_path):
    frame = ramp(1)
    p2 = write_raw_metafile(
        tmp_path / "two.mha",
        seq_header(1, NDims="2", DimSize="5 4", Seq_Frame0000_Timestamp="3.5"),
        frame.tobytes(),
    )
    seq = read_sequence_metafile(p2)
    assert seq.frames.shape == (1, 4, 5) and np.array_equal(seq.frames, frame)
    assert seq.timestamps_s[0] == 3.5
    data = ramp(3).tobytes()
    p4 = write_raw_metafile(tmp_path / "four.mha", seq_header(NDims="4", DimSize="5 4 1 3"), data)
    assert np.array_equal(read_sequence_metafile(p4).frames, ramp(3))
    p4bad = write_raw_metafile(
        tmp_path / "vol4.mha", seq_header(NDims="4", DimSize="5 4 2 3"), data * 2
    )
    with pytest.raises(FileFormatError, match="DimSize"):
        read_sequence_metafile(p4bad)


@pytest.mark.parametrize(
    "etype,np_type", [("MET_SHORT", "<i2"), ("MET_USHORT", "<u2"), ("MET_DOUBLE", "<f8")]
)
def test_other_element_types_become_float32(tmp_path, etype, np_type):
    values = (
        (np.arange(60).reshape(3, 4, 5) * 7 - 100).astype(np_type)
        if etype != "MET_USHORT"
        else (np.arange(60).reshape(3, 4, 5) * 1000).astype(np_type)
    )
    path = write_raw_metafile(tmp_path / "e.mha", seq_header(ElementType=etype), values.tobytes())
    seq = read_sequence_metafile(path)
    assert seq.frames.dtype == np.float32
    assert np.array_equal(seq.frames, values.astype(np.float32))
    assert seq.metadata["SourceElementType"] == etype
    back = read_sequence_metafile(write_sequence_metafile(seq, tmp_path / "e2.mha"))
    assert np.array_equal(back.frames, seq.frames)
    assert "SourceElementType" not in back.metadata  # describes the file read, not written back


def test_big_endian_float_data(tmp_path):
    values = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    header = seq_header(ElementType="MET_FLOAT", BinaryDataByteOrderMSB="True")
    path = write_raw_metafile(tmp_path / "be.mha", header, values.astype(">f4").tobytes())
    seq = read_sequence_metafile(path)
    assert seq.frames.dtype == np.float32 and np.array_equal(seq.frames, values)


def test_frame_fields_statuses_and_digit_counts(tmp_path):
    eye = "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"
    shifted = "1 0 0 5 0 1 0 0 0 0 1 0 0 0 0 1"
    header = seq_header(
        **{
            "Seq_Frame0_ProbeToTrackerTransform": shifted,  # no status: valid
            "Seq_Frame00001_ProbeToTrackerTransform": eye,
            "Seq_Frame00001_ProbeToTrackerTransformStatus": "MISSING",
            # frame 2 has no ProbeToTracker at all: identity, invalid
            "Seq_Frame0000_Timestamp": "1.0",
            "Seq_Frame1_Timestamp": "1.5",
            "Seq_Frame002_Timestamp": "2.5",
            "Seq_Frame0001_Status": "INVALID",
            "Seq_Frame0002_ImageStatus": "ok",
            "Seq_Frame0000_FrameNumber": "17",
            "Seq_Frame0002_FrameNumber": "19",
            "Seq_Frame0000_DefaultTransform": "not a transform name",
            "UltrasoundImageType": "BRIGHTNESS",
            "ElementSpacing": "1 1 1",
        }
    )
    seq = read_sequence_metafile(write_raw_metafile(tmp_path / "f.mha", header, ramp().tobytes()))
    p2t = seq.transforms["ProbeToTracker"]
    assert p2t.valid.tolist() == [True, False, False]
    assert p2t.matrices[0, 0, 3] == 5.0
    assert np.array_equal(p2t.matrices[2], np.eye(4))
    assert seq.timestamps_s.tolist() == [1.0, 1.5, 2.5]
    assert seq.image_ok.tolist() == [True, False, True]
    assert np.all(seq.frames[1] == 0) and np.array_equal(seq.frames[2], ramp()[2])
    assert seq.frame_fields == {
        "FrameNumber": ["17", "", "19"],
        "DefaultTransform": ["not a transform name", "", ""],
    }
    assert seq.metadata == {"UltrasoundImageType": "BRIGHTNESS", "SourceOrientation": "MF"}
    assert seq.pixel_spacing_mm is None


def test_pixel_spacing_only_when_not_unit(tmp_path):
    path = write_raw_metafile(
        tmp_path / "s.mha", seq_header(ElementSpacing="0.25 0.5 1"), ramp().tobytes()
    )
    assert read_sequence_metafile(path).pixel_spacing_mm == (0.25, 0.5)


def test_external_raw_with_header_size(tmp_path):
    data = ramp().tobytes()
    (tmp_path / "d.raw").write_bytes(b"JUNK" + data)
    text = format_metaimage_header({**seq_header(), "HeaderSize": "4", "ElementDataFile": "d.raw"})
    (tmp_path / "d.mhd").write_text(text)
    assert np.array_equal(read_sequence_metafile(tmp_path / "d.mhd").frames, ramp())


def test_read_metaimage_header_offset(tmp_path):
    path = write_raw_metafile(tmp_path / "h.mha", seq_header(), ramp().tobytes())
    header, offset = read_metaimage_header(path)
    assert header["DimSize"] == "5 4 3" and header["ElementDataFile"] == "LOCAL"
    assert path.read_bytes()[offset:] == ramp().tobytes()


def test_volume_round_trip_geometry(tmp_path):
    rng = np.random.default_rng(0)
    angle = 0.3
    directions = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    vol = Volume(
        voxels=rng.normal(size=(4, 5, 6)).astype(np.float32),
        spacing_mm=(0.5, 0.25, 2.0),
        origin_mm=(1.5, -2.0, 3.25),
        directions=directions,
        metadata={"Comment": "test"},
    )
    for name, compress in (("v.mha", False), ("v.mhd", True), ("w.mhd", False)):
        out = write_volume(vol, tmp_path / name, compress=compress)
        back = read_volume(out)
        assert np.array_equal(back.voxels, vol.voxels)
        assert back.spacing_mm == vol.spacing_mm and back.origin_mm == vol.origin_mm
        np.testing.assert_allclose(back.directions, directions, atol=1e-15)
        assert back.metadata == {"Comment": "test"}
    # TransformMatrix lists the direction of axis i first (ITK/MetaIO): the transpose row-major
    header, _ = read_metaimage_header(tmp_path / "v.mha")
    values = np.array(header["TransformMatrix"].split(), dtype=float)
    np.testing.assert_allclose(values[:3], directions[:, 0])


def test_volume_multichannel_and_int16(tmp_path):
    voxels = np.arange(2 * 3 * 4 * 2, dtype=np.int16).reshape(2, 3, 4, 2) - 20
    vol = Volume(voxels=voxels)
    back = read_volume_metafile(write_volume_metafile(vol, tmp_path / "c.mha"))
    assert back.voxels.dtype == np.int16 and np.array_equal(back.voxels, voxels)
    assert back.dimensions == (4, 3, 2)


@pytest.mark.parametrize("compress", [True, False])
def test_files_interoperate_with_vtk_metaio(tmp_path, compress):
    """VTK's MetaIO reader reads what we write, and we read what its writer writes."""
    vtk_io = pytest.importorskip("vtkmodules.vtkIOImage")
    from vtkmodules.util.numpy_support import vtk_to_numpy

    seq = make_synthetic_sequence(4, 6, 7, seed=2)
    for name in ("s.igs.mha", "s.igs.mhd"):
        reader = vtk_io.vtkMetaImageReader()
        reader.SetFileName(str(write_sequence_metafile(seq, tmp_path / name, compress=compress)))
        reader.Update()
        image = reader.GetOutput()
        assert image.GetDimensions() == (7, 6, 4)
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(4, 6, 7)
        assert np.array_equal(pixels, seq.frames)

    vol = Volume(
        np.arange(120, dtype=np.int16).reshape(4, 5, 6),
        spacing_mm=(0.5, 0.25, 2.0),
        origin_mm=(1, 2, 3),
    )
    reader = vtk_io.vtkMetaImageReader()
    reader.SetFileName(str(write_volume_metafile(vol, tmp_path / "v.mha", compress=compress)))
    reader.Update()
    writer = vtk_io.vtkMetaImageWriter()
    writer.SetInputData(reader.GetOutput())
    writer.SetFileName(str(tmp_path / "vtk.mhd"))
    writer.SetCompression(compress)
    writer.Write()
    back = read_volume_metafile(tmp_path / "vtk.mhd")
    assert back.voxels.dtype == np.int16 and np.array_equal(back.voxels, vol.voxels)
    assert back.spacing_mm == vol.spacing_mm and back.origin_mm == vol.origin_mm


def test_incremental_writer_and_crash_safety(tmp_path):
    seq = make_synthetic_sequence(6, 8, 10, seed=5)
    for compress in (False, True):
        path = tmp_path / f"rec{int(compress)}.igs.mhd"
        writer = SequenceMetafileWriter(
            path,
            frame_shape=(8, 10),
            dtype=np.uint8,
            transform_names=["ProbeToTracker"],
            compress=compress,
        )
        for i in range(4):
            transforms = {
                name: (ft.matrices[i], ft.valid[i]) for name, ft in seq.transforms.items()
            }
            writer.append(seq.frames[i], seq.timestamps_s[i], transforms, fields={"Index": str(i)})
        # not closed: what is on disk already reads as the 4 frames appended so far
        partial = read_sequence_metafile(path)
        assert partial.n_frames == 4
        assert np.array_equal(partial.frames, seq.frames[:4])
        assert partial.frame_fields["Index"] == ["0", "1", "2", "3"]
        writer.append(seq.frames[4], seq.timestamps_s[4], {}, image_ok=False)
        writer.append(
            seq.frames[5],
            seq.timestamps_s[5],
            {"ProbeToTracker": (seq.transforms["ProbeToTracker"].matrices[5], True)},
        )
        writer.close()
        back = read_sequence_metafile(path)
        assert back.n_frames == 6
        assert np.array_equal(back.frames[:4], seq.frames[:4]) and np.array_equal(
            back.frames[5], seq.frames[5]
        )
        assert back.image_ok.tolist() == [True] * 4 + [False, True]
        assert back.transforms["ProbeToTracker"].valid.tolist() == [True] * 4 + [False, True]
        assert back.transforms["ReferenceToTracker"].valid.tolist() == [
            True,
            True,
            True,
            False,
            False,
            False,
        ]
        np.testing.assert_array_equal(back.timestamps_s, seq.timestamps_s)
        assert not list(tmp_path.glob(".*.part"))
    with pytest.raises(SequenceError, match="shape"):
        with SequenceMetafileWriter(tmp_path / "bad.mhd", frame_shape=(2, 2), dtype=np.uint8) as w:
            w.append(np.zeros((3, 3), np.uint8), 0.0)
    with pytest.raises(FileFormatError, match=r"\.mhd"):
        SequenceMetafileWriter(tmp_path / "x.mha", frame_shape=(2, 2), dtype=np.uint8)


def test_write_rejects_unwritable_input(tmp_path):
    seq = make_synthetic_sequence(2, 3, 4)
    with pytest.raises(FileFormatError, match=r"\.mha or \.mhd"):
        write_sequence_metafile(seq, tmp_path / "x.nrrd")
    seq.metadata["Comment"] = "two\nlines"
    with pytest.raises(FileFormatError, match="Comment.*line break"):
        write_sequence_metafile(seq, tmp_path / "x.mha")
    seq.metadata = {"Seq_Frame0000_X": "1"}
    with pytest.raises(FileFormatError, match="Seq_Frame0000_X"):
        write_sequence_metafile(seq, tmp_path / "x.mha")
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------
# Bad input: each names the file and the field
# -------------------------------------------------------------------------------------------
def _compressed_file(tmp_path, n_frames_header, n_frames_data, *, size_field=True, cut=0):
    payload = zlib.compress(ramp(n_frames_data).tobytes())
    if cut:
        payload = payload[:-cut]
    extra = {"CompressedData": "True"}
    if size_field:
        extra["CompressedDataSize"] = str(len(payload) + cut)
    header = seq_header(n_frames_header, **extra)
    return write_raw_metafile(tmp_path / "c.igs.mha", header, payload)


def test_truncated_uncompressed_data(tmp_path):
    path = write_raw_metafile(tmp_path / "t.igs.mha", seq_header(), ramp().tobytes()[:-7])
    with pytest.raises(FileFormatError) as info:
        read_sequence_metafile(path)
    message = str(info.value)
    assert (
        str(path) in message
        and "truncated" in message
        and "60 bytes" in message
        and "53 bytes" in message
    )


def test_truncated_compressed_data(tmp_path):
    path = _compressed_file(tmp_path, 3, 3, cut=5)  # CompressedDataSize larger than what follows
    with pytest.raises(
        FileFormatError, match=r"c\.igs\.mha.*CompressedDataSize = \d+ bytes.*holds \d+ bytes"
    ):
        read_sequence_metafile(path)


def test_dimsize_larger_than_compressed_data(tmp_path):
    path = _compressed_file(tmp_path, 4, 3)
    with pytest.raises(FileFormatError) as info:
        read_sequence_metafile(path)
    message = str(info.value)
    assert str(path) in message and "80 bytes" in message and "only 60 bytes" in message


def test_dimsize_smaller_than_compressed_data(tmp_path):
    path = _compressed_file(tmp_path, 2, 3)
    with pytest.raises(
        FileFormatError, match=r"CompressedDataSize = \d+.*more than the 40 bytes.*DimSize"
    ):
        read_sequence_metafile(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_absurd_dimsize_fails_before_allocating(tmp_path, compressed):
    extra = {"CompressedData": "True"} if compressed else {}
    payload = zlib.compress(ramp().tobytes()) if compressed else ramp().tobytes()
    header = seq_header(**extra, DimSize="100000 100000 100000")
    path = write_raw_metafile(tmp_path / "huge.mha", header, payload)
    with pytest.raises(
        FileFormatError, match=r"huge\.mha.*DimSize 100000 100000 100000.*1000000000000000 bytes"
    ):
        read_sequence_metafile(path)


def test_corrupt_compressed_data(tmp_path):
    header = seq_header(CompressedData="True")
    path = write_raw_metafile(tmp_path / "z.mha", header, b"this is not zlib data at all")
    with pytest.raises(FileFormatError, match=r"z\.mha.*corrupt"):
        read_sequence_metafile(path)


def test_unknown_element_type(tmp_path):
    path = write_raw_metafile(
        tmp_path / "u.mha", seq_header(ElementType="MET_QUATERNION"), ramp().tobytes()
    )
    with pytest.raises(FileFormatError, match=r"u\.mha.*ElementType = 'MET_QUATERNION'"):
        read_sequence_metafile(path)


@pytest.mark.parametrize(
    "value,match",
    [
        ("1 0 0 nan 0 1 0 0 0 0 1 0 0 0 0 1", "NaN or infinite"),
        ("1 0 0 inf 0 1 0 0 0 0 1 0 0 0 0 1", "NaN or infinite"),
        ("1 0 0 0 0 1 0 0 0 0 1 0", "12 numbers, expected 16"),
        ("1 0 0 x 0 1 0 0 0 0 1 0 0 0 0 1", "not a list of 16 numbers"),
    ],
)
def test_bad_transform_names_frame_and_field(tmp_path, value, match):
    header = seq_header(**{"Seq_Frame0001_ProbeToTrackerTransform": value})
    path = write_raw_metafile(tmp_path / "n.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=match) as info:
        read_sequence_metafile(path)
    assert "Seq_Frame0001_ProbeToTrackerTransform" in str(info.value) and str(path) in str(
        info.value
    )


def test_bad_timestamp(tmp_path):
    header = seq_header(
        **{
            "Seq_Frame0002_Timestamp": "soon",
            "Seq_Frame0000_Timestamp": "1",
            "Seq_Frame0001_Timestamp": "2",
        }
    )
    path = write_raw_metafile(tmp_path / "ts.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=r"Seq_Frame0002_Timestamp = 'soon'"):
        read_sequence_metafile(path)


def test_missing_element_data_file(tmp_path):
    text = format_metaimage_header(seq_header())
    path = tmp_path / "m.mha"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=r"m\.mha.*ElementDataFile"):
        read_sequence_metafile(path)


def test_missing_raw_file(tmp_path):
    text = format_metaimage_header({**seq_header(), "ElementDataFile": "gone.raw"})
    path = tmp_path / "r.mhd"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=r"r\.mhd.*gone\.raw.*not found"):
        read_sequence_metafile(path)


def test_empty_sequence(tmp_path):
    path = write_raw_metafile(tmp_path / "e.mha", seq_header(0), b"")
    with pytest.raises(SequenceError, match=r"e\.mha.*empty.*DimSize"):
        read_sequence_metafile(path)


def test_malformed_header_line(tmp_path):
    path = tmp_path / "bad.mha"
    path.write_bytes(b"ObjectType = Image\nNDims 3\nElementDataFile = LOCAL\n")
    with pytest.raises(FileFormatError, match=r"bad\.mha.*line 2 'NDims 3'.*no '='"):
        read_sequence_metafile(path)
    with pytest.raises(FileFormatError, match="line 1.*empty key"):
        parse_metaimage_header(" = 3\n")
    with pytest.raises(FileFormatError, match="line 2.*'A' occurs twice"):
        parse_metaimage_header("A = 1\nA = 2\n")


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"DimSize": "5 four 3"}, "DimSize = '5 four 3' is not a list of integers"),
        ({"NDims": "2"}, "DimSize = '5 4 3' has 3 values but NDims = 2"),
        ({"UltrasoundImageOrientation": "XY"}, "UltrasoundImageOrientation 'XY'"),
        ({"Seq_Frame0003_Timestamp": "1"}, "Seq_Frame0003_Timestamp refers to frame 3"),
        ({"Seq_FrameX_Timestamp": "1"}, "Seq_FrameX_Timestamp"),
        ({"BinaryData": "False"}, "ASCII"),
        ({"ElementNumberOfChannels": "0"}, "ElementNumberOfChannels"),
        ({"ElementSpacing": "0 1 1"}, "ElementSpacing"),
        ({"CompressedData": "maybe"}, "CompressedData = 'maybe' is not True or False"),
    ],
)
def test_bad_header_fields(tmp_path, fields, match):
    path = write_raw_metafile(tmp_path / "h.mha", seq_header(**fields), ramp().tobytes())
    with pytest.raises(FileFormatError, match=match) as info:
        read_sequence_metafile(path)
    assert str(path) in str(info.value)


def test_missing_file_and_binary_garbage(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        read_sequence_metafile(tmp_path / "nothing.mha")
    garbage = tmp_path / "garbage.mha"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(FileFormatError, match=r"garbage\.mha"):
        read_sequence_metafile(garbage)


# -------------------------------------------------------------------------------------------
# Header fuzzing
# -------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_parse_only_raises_file_format_error(text):
    try:
        fields = parse_metaimage_header(text, source="fuzz")
    except FileFormatError as exc:
        assert "fuzz" in str(exc)
    else:
        assert all(isinstance(k, str) and k and "=" not in k for k in fields)


_keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda k: "=" not in k and not any(c.isspace() for c in k) and k != "ElementDataFile"
)
_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda v: "\n" not in v and "\r" not in v and v == v.strip()
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=12))
def test_fuzz_well_formed_headers_round_trip(fields):
    text = format_metaimage_header(fields)
    parsed = parse_metaimage_header(text)
    assert parsed == fields
    assert list(parsed) == list(fields)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_read_header_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.mha"
    path.write_bytes(data)
    try:
        header, offset = read_metaimage_header(path)
    except FileFormatError:
        return
    assert list(header)[-1] == "ElementDataFile" and 0 < offset <= len(data)


# -------------------------------------------------------------------------------------------
# Streaming memory
# -------------------------------------------------------------------------------------------
_CHILD_WRITE = textwrap.dedent(
    """
    import sys, numpy as np
    from FreehandUSLib.io.metaimage import SequenceMetafileWriter
    out, compress, n, rows, cols = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:6])
    base = (np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * 7 % 256).astype(np.uint8)
    with SequenceMetafileWriter(out, frame_shape=(rows, cols), dtype=np.uint8, compress=compress,
                                header_every=1000) as w:
        for i in range(n):
            w.append(np.roll(base, i, axis=1), i * 0.05)
    """
)
# Peak RSS of the child since its exec: /proc/self/status VmHWM. (getrusage's ru_maxrss is not
# used: Linux carries the pre-exec peak of the forked pytest process over into it.)
_CHILD_READ = textwrap.dedent(
    """
    import json, re, sys, numpy as np
    from FreehandUSLib.io.metaimage import read_sequence_metafile

    def peak_rss():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

    before = peak_rss()
    seq = read_sequence_metafile(sys.argv[1])
    after = peak_rss()
    print(json.dumps({"delta": after - before, "nbytes": seq.frames.nbytes,
                      "checksum": int(seq.frames[::37].sum(dtype=np.int64)), "n": seq.n_frames}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="needs Linux /proc for peak RSS"
)
@pytest.mark.parametrize("compress", [False, True])
def test_reading_streams_with_bounded_memory(tmp_path, compress):
    n, rows, cols = 420, 480, 1000  # ~200 MB of pixels
    path = tmp_path / "big.igs.mhd"
    subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD_WRITE,
            str(path),
            str(int(compress)),
            str(n),
            str(rows),
            str(cols),
        ],
        check=True,
        timeout=120,
    )
    result = subprocess.run(
        [sys.executable, "-c", _CHILD_READ, str(path)],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    stats = json.loads(result.stdout)
    data_bytes = n * rows * cols
    assert stats["n"] == n and stats["nbytes"] == data_bytes
    base = (np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * 7 % 256).astype(np.uint8)
    expected = sum(int(np.roll(base, i, axis=1).sum(dtype=np.int64)) for i in range(0, n, 37))
    assert stats["checksum"] == expected
    # the frames themselves must show up in the peak (the measurement works) ...
    assert stats["delta"] > 0.9 * data_bytes
    # ... and nothing close to a second copy of them
    assert stats["delta"] < 1.5 * data_bytes, (
        f"peak RSS grew by {stats['delta'] / data_bytes:.2f}x the data"
    )


# -------------------------------------------------------------------------------------------
# Hostile headers: sizes checked against the file before any allocation, data files beside the
# header, one-line messages (issue 21)
# -------------------------------------------------------------------------------------------
def _peak_allocation_bytes(fn) -> int:
    """Peak bytes Python and numpy allocated while ``fn()`` ran (it must raise FileFormatError)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def _transform_lines(n_frames_listed: int) -> dict:
    return {
        f"Seq_Frame{i:04d}_ProbeToTrackerTransform": "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"
        for i in range(n_frames_listed)
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_hundred_million_frames_in_a_tiny_file_allocate_nothing(tmp_path, compressed):
    # issue 21: a 174-byte .igs.mha with DimSize = 1 1 100000000 allocated 12.7 GB of per-frame
    # transform and status arrays before the pixel data were checked.
    extra = {"CompressedData": "True"} if compressed else {}
    payload = zlib.compress(bytes(100)) if compressed else bytes(100)
    header = seq_header(**extra, DimSize="1 1 100000000", **_transform_lines(1))
    path = write_raw_metafile(tmp_path / "tiny.igs.mha", header, payload)
    peak, message = _peak_allocation_bytes(lambda: read_sequence_metafile(path))
    assert peak < 100 << 20, peak  # the 12.7 GB of transforms would be far above this
    assert "tiny.igs.mha" in message and "\n" not in message


def test_dimsize_product_does_not_wrap(tmp_path):
    # 4294967296 * 4294967296 * 3 is 0 modulo 2**64: it passed the size check as 0 bytes.
    header = seq_header(DimSize="4294967296 4294967296 3")
    path = write_raw_metafile(tmp_path / "wrap.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=r"needs 55340232221128654848 bytes"):
        read_sequence_metafile(path)
    for compressed in ("True", "False"):
        header = seq_header(DimSize="4294967296 4294967296 3", CompressedData=compressed)
        path = write_raw_metafile(tmp_path / "wrap2.mha", header, zlib.compress(ramp().tobytes()))
        with pytest.raises(FileFormatError, match=r"55340232221128654848 bytes"):
            read_sequence_metafile(path)


@pytest.mark.parametrize("value", ["1" * 24, "2000", "-1", "1 1"])
def test_element_number_of_channels_is_bounded(tmp_path, value):
    header = seq_header(ElementNumberOfChannels=value)
    path = write_raw_metafile(tmp_path / "ch.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=r"ElementNumberOfChannels") as info:
        read_sequence_metafile(path)
    assert len(str(info.value)) < 300


def test_zero_sized_frames_are_refused(tmp_path):
    # 0 x 0 pixels need 0 bytes: without this check any frame count passed the size check.
    header = seq_header(DimSize="0 0 1000000000000", **_transform_lines(1))
    path = write_raw_metafile(tmp_path / "z.mha", header, b"")
    with pytest.raises(FileFormatError, match=r"0 x 0 pixels hold no image"):
        read_sequence_metafile(path)
    volume_header = {**seq_header(DimSize="0 4 3")}
    path = write_raw_metafile(tmp_path / "v.mha", volume_header, b"")
    with pytest.raises(FileFormatError, match=r"at least one voxel"):
        read_volume_metafile(path)


def test_frame_index_of_thousands_of_digits(tmp_path):
    header = seq_header(**{f"Seq_Frame{'9' * 5000}_Timestamp": "1"})
    path = write_raw_metafile(tmp_path / "d.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=r"not of the form Seq_Frame<number>_<Name>") as info:
        read_sequence_metafile(path)
    assert len(str(info.value)) < 300


def test_huge_header_values_are_not_echoed(tmp_path):
    for field in ("DimSize", "ElementType", "CompressedData", "ElementSpacing", "NDims"):
        header = seq_header(**{field: "x" * 500_000})
        path = write_raw_metafile(tmp_path / "big.mha", header, ramp().tobytes())
        with pytest.raises(FileFormatError) as info:
            read_sequence_metafile(path)
        message = str(info.value)
        assert field in message and len(message) < 400 and "\n" not in message


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../outside.raw", "../../../../../../etc/passwd", "/dev/zero", "sub/../../outside.raw"],
)
def test_element_data_file_outside_the_folder_is_refused(tmp_path, name):
    folder = tmp_path / "rec"
    folder.mkdir()
    (tmp_path / "outside.raw").write_bytes(ramp().tobytes())
    text = format_metaimage_header({**seq_header(), "ElementDataFile": name})
    path = folder / "x.mhd"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=r"x\.mhd: ElementDataFile = .* lies outside the header's folder"):
        read_sequence_metafile(path)
    with pytest.raises(FileFormatError, match=r"outside the header's folder"):
        read_volume_metafile(path)


def test_element_data_file_links_and_devices(tmp_path):
    folder = tmp_path / "rec"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.raw").write_bytes(ramp().tobytes())
    (folder / "link.raw").symlink_to(tmp_path / "secret.raw")
    (folder / "sub" / "data.raw").write_bytes(ramp().tobytes())
    (folder / "fifo.raw").mkdir()  # not a regular file
    for name, match in [
        ("link.raw", "outside the header's folder"),
        ("fifo.raw", "not a regular file"),
    ]:
        path = folder / "x.mhd"
        path.write_text(format_metaimage_header({**seq_header(), "ElementDataFile": name}))
        with pytest.raises(FileFormatError, match=match):
            read_sequence_metafile(path)
    # a data file in a subfolder, and an absolute path into the folder, are fine
    for name in ("sub/data.raw", str(folder / "sub" / "data.raw")):
        path.write_text(format_metaimage_header({**seq_header(), "ElementDataFile": name}))
        assert np.array_equal(read_sequence_metafile(path).frames, ramp())


def test_compressed_bomb_header_costs_only_the_data(tmp_path):
    # the header promises 1000x the frames that the compressed data hold (within deflate's
    # ratio, so the early check passes): the reader grows its output as the data arrive.
    frames = np.random.default_rng(0).integers(0, 256, (40, 64, 64), dtype=np.uint8)
    payload = zlib.compress(frames.tobytes())
    header = seq_header(40_000, 64, 64, CompressedData="True")
    path = write_raw_metafile(tmp_path / "bomb.mha", header, payload)
    assert 40_000 * 64 * 64 < 1100 * len(payload)
    peak, message = _peak_allocation_bytes(lambda: read_sequence_metafile(path))
    assert peak < 80 << 20, peak  # 64 MiB first block, not the 164 MB promised
    assert "only 163840 bytes" in message


def test_entry_points_refuse_folders_and_fifos(tmp_path):
    import os

    (tmp_path / "d.igs.mha").mkdir()
    os.mkfifo(tmp_path / "f.igs.nrrd")  # opening it would block forever
    for name in ("d.igs.mha", "f.igs.nrrd"):
        with pytest.raises(FileFormatError, match=r"not a regular file"):
            read_sequence(tmp_path / name)
    with pytest.raises(FileFormatError, match=r"not a regular file"):
        read_volume(tmp_path / "f.igs.nrrd")
    with pytest.raises(FileFormatError, match=r"file not found"):
        read_sequence(tmp_path / "gone.igs.mha")


@pytest.mark.parametrize("compressed", ["True", "False"])
def test_header_size_beyond_the_data_file(tmp_path, compressed):
    # a 20-digit HeaderSize made the seek overflow (ValueError) for compressed data
    payload = zlib.compress(ramp().tobytes()) if compressed == "True" else ramp().tobytes()
    (tmp_path / "d.raw").write_bytes(payload)
    header = {**seq_header(CompressedData=compressed), "HeaderSize": "9" * 20, "ElementDataFile": "d.raw"}
    path = tmp_path / "h.mhd"
    path.write_text(format_metaimage_header(header))
    with pytest.raises(FileFormatError, match=r"HeaderSize = '9999.*' lies beyond the end of d\.raw"):
        read_sequence_metafile(path)


def test_huge_orientation_is_not_echoed(tmp_path):
    # found by the fuzz suite: a 5000-digit UltrasoundImageOrientation was echoed whole
    header = seq_header(UltrasoundImageOrientation="9" * 5000)
    path = write_raw_metafile(tmp_path / "o.mha", header, ramp().tobytes())
    with pytest.raises(FileFormatError, match=r"UltrasoundImageOrientation '9{37}\.\.\.' is not one of") as info:
        read_sequence_metafile(path)
    assert len(str(info.value)) < 300

"""PLUS sequence metafiles (``.igs.mha``, ``.igs.mhd``, ``.seq.mha``) and MetaImage volumes.

A MetaImage file is a text header of ``Key = Value`` lines ending with ``ElementDataFile``,
followed by the pixel data (``ElementDataFile = LOCAL``, ``.mha``) or with the pixel data in a
separate ``.raw``/``.zraw`` file (``.mhd``). PLUS stores a tracked ultrasound sequence as a
3D image (``DimSize = n_cols n_rows n_frames``) whose per-frame information lives in header
fields named ``Seq_Frame<index>_<FieldName>``:

- ``<From>To<To>Transform`` (16 numbers, row-major 4x4) and ``<From>To<To>TransformStatus``
  (``OK`` = valid, anything else = invalid);
- ``Timestamp`` (seconds);
- ``ImageStatus`` (older files: ``Status``): a frame whose status is not ``OK`` carries no image;
  its pixels still occupy space in the data (PLUS writes a blank frame) and are returned as zeros;
- any other field (``ProbePosition``...) is kept as text in ``TrackedSequence.frame_fields``.

Reading choices (documented because files in the wild differ):

- Frames are flipped to MF from ``UltrasoundImageOrientation`` (MF/MN/UF/UN, optional third
  letter; missing = MF). The original value is kept in ``metadata["SourceOrientation"]``.
- ``MET_UCHAR`` -> uint8 and ``MET_FLOAT`` -> float32 are read as they are. Other numeric
  element types (``MET_CHAR``, ``MET_SHORT``, ``MET_USHORT``, ``MET_INT``, ``MET_UINT``,
  ``MET_LONG``, ``MET_ULONG``, ``MET_LONG_LONG``, ``MET_ULONG_LONG``, ``MET_DOUBLE``) are converted to float32 frame by frame
  (the data model holds uint8 or float32 only) and the file's type is recorded in
  ``metadata["SourceElementType"]``. Anything else raises :class:`FileFormatError`.
- ``ElementSpacing`` is ``1 1 1`` in almost every PLUS file, where it means "unknown" (the
  geometry is in ImageToProbe). ``pixel_spacing_mm`` is therefore set only when the first two
  spacing values are not exactly ``1 1``.
- A transform field without a status is valid. A frame that lacks a transform field that other
  frames have gets an identity matrix marked invalid. A NaN/inf or non-16-number matrix raises
  :class:`FileFormatError` naming the frame and field, unless its status marks it invalid (an
  invalid transform is never used, and our own writer writes the NaN matrices the transform
  repository produces for invalid frames).
- Sequences without any ``Timestamp`` field get ``0, 1, 2, ...`` (the data model's default);
  a sequence where only some frames have one is rejected.
- The frame count is the last ``DimSize`` value (NDims 3; NDims 2 = one frame; NDims 4 with
  ``DimSize = cols rows 1 frames`` as PLUS writes it). The data must hold every frame, also
  those without an image; a ``Seq_Frame`` field of a frame beyond that count is an error.
- Header keys that describe the pixel layout (``DimSize``, ``ElementType``, ``Offset``,
  ``TransformMatrix``...) are regenerated on write and not kept; every other non-frame key is
  kept in ``metadata`` (``UltrasoundImageType``...). ``metadata["SourceOrientation"]`` and
  ``metadata["SourceElementType"]`` describe the file that was read and are not written back.

Writing (:func:`write_sequence_metafile`, :class:`SequenceMetafileWriter`) produces what PLUS
writes: MF frames, uint8 (``MET_UCHAR``) or float32 (``MET_FLOAT``), little-endian, header keys
in PLUS order with ``ElementDataFile`` last, numbers as the shortest text that reads back to the
same float64 (``repr``), compressed data streamed through ``zlib.compressobj``.

Reading streams: the output array is filled frame by frame, straight from the file
(``readinto``) or from a ``zlib.decompressobj`` fed in 1 MiB pieces; orientation flips are done
in place per frame. Peak memory is about the size of the frames plus a few MiB.

Header numbers are not trusted: ``DimSize`` and ``ElementNumberOfChannels`` (1 to 1024) are
multiplied as Python ints (no wrap-around) and the bytes they imply are checked against the data
file before anything is allocated (compressed data: against deflate's maximum ratio, and the
output grows as the data really decompress). The pixels are read *before* the per-frame arrays
(transforms, timestamps, status) are allocated, so those are sized by frames that exist. A
separate data file (``ElementDataFile``) must be a regular file in the header's folder or below
it (no absolute paths elsewhere, no ``..``, no device files, no links leading out). Values are
echoed in messages truncated to one short line.

Volumes (:func:`read_volume_metafile`): MetaIO's ``TransformMatrix`` (synonyms ``Rotation``,
``Orientation``) lists the direction matrix row by row of a matrix whose *rows* are the axes,
i.e. values ``3*a .. 3*a+2`` are the direction of axis ``a`` (i, j, k) in world coordinates.
ITK's MetaImageIO reads it that way (``SetDirection(a, values[a*n:(a+1)*n])``), so
``Volume.directions`` (columns = axes) is ``reshape(3, 3).T`` of the listed values.
``Offset`` (synonyms ``Position``, ``Origin``) is the world position of voxel (0, 0, 0) in mm.

The code is in three modules, whose public names this one gathers: the header text and the
element types (:mod:`.metaimage_header`), reading (:mod:`.metaimage_read`) and writing
(:mod:`.metaimage_write`).
"""

from __future__ import annotations

from .metaimage_header import format_metaimage_header, parse_metaimage_header, read_metaimage_header
from .metaimage_read import read_sequence_metafile, read_volume_metafile
from .metaimage_write import SequenceMetafileWriter, write_sequence_metafile, write_volume_metafile

__all__ = [
    "parse_metaimage_header",
    "format_metaimage_header",
    "read_metaimage_header",
    "read_sequence_metafile",
    "write_sequence_metafile",
    "read_volume_metafile",
    "write_volume_metafile",
    "SequenceMetafileWriter",
]

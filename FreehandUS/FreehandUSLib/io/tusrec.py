"""TUS-REC challenge scans (MICCAI TUS-REC 2024/2025 trackerless freehand US data) in HDF5.

What we rely on (the challenge's data description ``data.md`` in github.com/UCL/tus-rec-challenge
and the 2025 baseline code, github.com/QiLi111/TUS-REC2025-Challenge_baseline):

- One scan per ``.h5`` file with the datasets ``frames`` ``(N, H, W)`` uint8 (480 x 640 pixels
  in the challenge data) and ``tforms`` ``(N, 4, 4)`` float32. ``tforms[n]`` maps the tracker
  tool (the marker on the probe) to the optical camera (NDI Polaris) at frame ``n``: in PLUS
  names that is **ProbeToTracker**. In the 2025 validation/test layout frames and transforms
  are in two files of the same name under ``frames/`` and ``transfs/``: pass ``tforms_path``.
- Frames were recorded at 20 fps and the transforms are already temporally calibrated to them;
  the files hold no timestamps, so ``timestamps_s = index / fps`` (``fps=20`` by default).
- ``calib_matrix.csv`` holds two 4x4 matrices, first ``scaling_from_pixel_to_mm`` (pixel ->
  image mm), then ``spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system``
  (image mm -> tool, rigid). The 2025 file has a label line before each block; the 2024 file is
  8 bare rows. Image -> tool = spatial @ scaling.
- The baseline builds image points with 1-based pixel indices (x = 1..W along columns,
  y = 1..H along rows, z = 0). PLUS pixel coordinates (and ours) start at 0 at the first pixel, so
  ``ImageToProbe = spatial @ scaling @ T(+1, +1)`` (``one_based_pixels=True``, the default; pass
  False to get ``spatial @ scaling`` unchanged). No flip is applied: the calibration maps pixels
  as stored, so the frames are taken to be MF as they are.

Reading a file from elsewhere is reading untrusted input: datasets are opened without being read,
their shape and type checked, and the bytes the file stores for them compared with what the shape
needs (a few-kB file declaring a 100 GB ``frames`` dataset is refused) before the frames are read
in blocks. External links and external raw storage must point to files beside the ``.h5`` (same
folder or below; external storage is resolved against that folder, not the working folder),
virtual datasets are refused, and whatever h5py raises on a damaged file (dangling links,
corrupted heaps) becomes a :class:`FileFormatError`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, SequenceError, TransformError
from ..sequence import TrackedSequence
from ..transforms import check_matrix
from ._safety import MAX_INFLATE_RATIO, check_memory, data_file_beside, shown

__all__ = ["read_tusrec_h5", "write_tusrec_h5", "read_tusrec_calibration", "TUSREC_FPS"]

logger = logging.getLogger(__name__)

#: Frame rate of the TUS-REC recordings (challenge data description: "recorded at 20 fps").
TUSREC_FPS = 20.0
_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])
_READ_BLOCK_BYTES = 64 << 20  # frames read from the file at a time


def read_tusrec_calibration(csv_path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``calib_matrix.csv``: the pixel->mm scaling and the image mm -> tool calibration.

    Parameters
    ----------
    csv_path : str or Path
        Eight numeric rows of four values (comma or space separated); non-numeric lines
        (the 2025 block labels) are skipped.

    Returns
    -------
    scaling : (4, 4) float64
        Image pixels -> image mm (``scaling_from_pixel_to_mm``).
    spatial : (4, 4) float64
        Image mm -> tracker tool (probe) mm, rigid.

    Raises
    ------
    FileFormatError
        Missing file, not 8 rows of 4 numbers, non-finite values or a last row other than 0 0 0 1.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileFormatError(f"{path}: calibration file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeError) as exc:
        raise FileFormatError(f"{path}: cannot read calibration: {exc}") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        tokens = [t for t in line.replace(",", " ").split() if t]
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            logger.debug("%s:%d: skipped label line %r", path, number, line)
            continue
        if len(values) != 4:
            raise FileFormatError(
                f"{path}: line {number}: calibration rows hold 4 numbers (a 4x4 matrix row), got {len(values)}"
            )
        rows.append(values)
    if len(rows) != 8:
        raise FileFormatError(
            f"{path}: calibration: expected two 4x4 matrices (8 numeric rows: pixel->mm scaling, then "
            f"image mm->tool spatial calibration), got {len(rows)} numeric rows"
        )
    matrices = np.array(rows, dtype=np.float64).reshape(2, 4, 4)
    for m, what in zip(
        matrices, ("scaling (pixel->mm)", "spatial calibration (image mm->tool)"), strict=True
    ):
        if not np.all(np.isfinite(m)) or not np.allclose(m[3], _LAST_ROW, atol=1e-9):
            raise FileFormatError(
                f"{path}: {what} matrix must be finite with last row 0 0 0 1, got "
                f"{' '.join(repr(float(v)) for v in m.ravel())}"
            )
    return matrices[0], matrices[1]


#: What h5py and the HDF5 library raise on a damaged file (dangling links, corrupted heaps,
#: unreadable chunks); each becomes a FileFormatError naming the file and the dataset.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError)


def _open_dataset(h5, name: str, path: Path):
    """The dataset ``name`` of an open file, without reading it; links and storage checked.

    Soft links are followed (a dangling one is an error); an external link must point to a
    file beside ``path`` (same folder or below); a virtual dataset is refused; external raw
    storage must lie beside ``path`` and is resolved relative to it (not to the working folder,
    HDF5's default).
    """
    import h5py

    try:
        link = h5.get(name, getlink=True)
        if link is None:
            names = ", ".join(shown(k) for k in list(h5.keys())[:10])
            raise FileFormatError(f"{path}: dataset {name!r} not found (datasets: {names or 'none'})")
        if isinstance(link, h5py.ExternalLink):
            data_file_beside(path, link.filename, f"external link {name!r}")
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_efile_prefix(b"${ORIGIN}")
        try:
            kind = h5.get(name, getclass=True)
        except _H5_ERRORS:  # a soft link to nothing, an external link to a missing object
            kind = None
        if kind is None:
            raise FileFormatError(f"{path}: {name!r} is a link to an object that does not exist")
        if kind is not h5py.Dataset:
            raise FileFormatError(f"{path}: {name!r} is a {kind.__name__.lower()}, expected a dataset")
        dataset = h5py.Dataset(h5py.h5d.open(h5.id, name.encode(), dapl=dapl))
        dcpl = dataset.id.get_create_plist()
        if dcpl.get_layout() == h5py.h5d.VIRTUAL:
            raise FileFormatError(f"{path}: dataset {name!r} is a virtual dataset (not supported)")
        for index in range(dcpl.get_external_count()):
            external = dcpl.get_external(index)[0]
            data_file_beside(path, os.fsdecode(external), f"external storage of {name!r}")
    except FileFormatError:
        raise
    except _H5_ERRORS as exc:
        raise FileFormatError(
            f"{path}: {name!r} cannot be opened ({shown(str(exc), 120, quote=False)})"
        ) from None
    return dataset


def _check_stored(dataset, name: str, path: Path) -> None:
    """Refuse a dataset whose shape promises more data than the file stores for it."""
    nbytes = math.prod(dataset.shape) * dataset.dtype.itemsize
    dcpl = dataset.id.get_create_plist()
    if dcpl.get_external_count():
        stored = 0
        for index in range(dcpl.get_external_count()):
            file_name, offset, size = dcpl.get_external(index)
            real = data_file_beside(path, os.fsdecode(file_name), f"external storage of {name!r}")
            stored += max(min(real.stat().st_size - offset, size), 0)
        limit, what = stored, "its external files hold"
    else:
        stored = dataset.id.get_storage_size()
        filtered = dcpl.get_layout() == h5py_chunked() and dcpl.get_nfilters() > 0
        limit = stored * MAX_INFLATE_RATIO if filtered else stored
        what = "its compressed chunks can hold" if filtered else "the file stores"
    if nbytes > limit:
        raise FileFormatError(
            f"{path}: dataset {name!r} of shape {shown(dataset.shape)} {dataset.dtype} needs "
            f"{nbytes} bytes but {what} {limit} bytes"
        )


def h5py_chunked() -> int:
    import h5py

    return h5py.h5d.CHUNKED


def _read_dataset(dataset, name: str, path: Path, out_dtype=None) -> np.ndarray:
    """Read a checked dataset block by block into one array of ``out_dtype`` (default: its own)."""
    out_dtype = np.dtype(out_dtype or dataset.dtype)
    shape = tuple(int(v) for v in dataset.shape)
    check_memory(math.prod(shape) * out_dtype.itemsize, path, f"dataset {name!r}")
    out = np.empty(shape, dtype=out_dtype)
    if not shape or 0 in shape:
        return out
    per_row = max(math.prod(shape[1:]) * dataset.dtype.itemsize, 1)
    step = max(1, _READ_BLOCK_BYTES // per_row)
    try:
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            out[start:stop] = dataset[start:stop]
    except _H5_ERRORS as exc:
        raise FileFormatError(
            f"{path}: dataset {name!r} cannot be read ({shown(str(exc), 120, quote=False)})"
        ) from None
    return out


def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except _H5_ERRORS as exc:
        raise FileFormatError(
            f"{path}: not a readable HDF5 file ({shown(str(exc), 120, quote=False)})"
        ) from None


def _type_name(dtype) -> str:
    return "compound" if dtype.names else str(dtype)


def _read_tforms(h5, source: Path, n: int, frames_path: Path) -> np.ndarray:
    """``tforms`` ``(n, 4, 4)`` as float64, shape and type checked before it is read."""
    dataset = _open_dataset(h5, "tforms", source)
    if dataset.ndim != 3 or tuple(dataset.shape[1:]) != (4, 4) or dataset.dtype.kind not in "iuf":
        raise FileFormatError(
            f"{source}: 'tforms' must be (N, 4, 4) numbers, got shape "
            f"{shown(dataset.shape)} {_type_name(dataset.dtype)}"
        )
    if dataset.shape[0] != n:
        raise FileFormatError(
            f"{source}: 'tforms' has {dataset.shape[0]} matrices but 'frames' in {frames_path.name} has {n}"
        )
    _check_stored(dataset, "tforms", source)
    return _read_dataset(dataset, "tforms", source, np.float64)


def _read_scan(path: Path, tforms_path):
    """``(frames, tforms (N, 4, 4) float64, the file tforms came from)``, all checked."""
    with _open_h5(path) as h5:
        frames_ds = _open_dataset(h5, "frames", path)
        if frames_ds.ndim != 3:
            raise FileFormatError(
                f"{path}: 'frames' must be (N, H, W), got shape {shown(frames_ds.shape)}"
            )
        if frames_ds.dtype.kind not in "iuf":
            raise FileFormatError(
                f"{path}: 'frames' of type {_type_name(frames_ds.dtype)} are not images"
            )
        n = int(frames_ds.shape[0])
        if n == 0:
            raise SequenceError(f"{path}: 'frames' holds no frames")
        if tforms_path is None:
            tforms_source = path
            tforms = _read_tforms(h5, tforms_source, n, path)
        else:
            tforms_source = Path(tforms_path)
            with _open_h5(tforms_source) as h5_tforms:
                tforms = _read_tforms(h5_tforms, tforms_source, n, path)
        _check_stored(frames_ds, "frames", path)
        keep = frames_ds.dtype in (np.dtype(np.uint8), np.dtype(np.float32))
        if not keep:
            logger.info("%s: converting %s frames to float32", path, frames_ds.dtype)
        frames = _read_dataset(frames_ds, "frames", path, None if keep else np.float32)
    return frames, tforms, tforms_source


def read_tusrec_h5(
    path,
    *,
    calibration_csv=None,
    image_to_probe=None,
    fps: float = TUSREC_FPS,
    tforms_path=None,
    one_based_pixels: bool = True,
) -> TrackedSequence:
    """Read one TUS-REC scan as a tracked sequence.

    Parameters
    ----------
    path : str or Path
        ``.h5`` with ``frames`` ``(N, H, W)`` uint8 (float32 also accepted; other numeric types
        are converted to float32) and, unless ``tforms_path`` is given, ``tforms`` ``(N, 4, 4)``.
    calibration_csv : str or Path, optional
        ``calib_matrix.csv``; sets ``ImageToProbe`` (see the module docstring) and
        ``pixel_spacing_mm`` from the scaling matrix.
    image_to_probe : (4, 4) array, optional
        ImageToProbe for 0-based pixel coordinates (mm per pixel included), instead of a csv.
    fps : float
        Frame rate used for ``timestamps_s = index / fps`` (the files hold no timestamps).
    tforms_path : str or Path, optional
        Separate ``.h5`` holding ``tforms`` (2025 validation/test layout, ``transfs/`` folder).
    one_based_pixels : bool
        Compose the csv calibration with a +1 pixel shift, since TUS-REC pixel indices start at 1.

    Returns
    -------
    TrackedSequence
        ``ProbeToTracker`` per frame (invalid where a matrix is non-finite or its last row is not
        0 0 0 1), ``ImageToProbe`` (constant, all valid) when a calibration is given.

    Raises
    ------
    FileFormatError
        Missing file/dataset, frames not 3D, ``tforms`` not ``(N, 4, 4)``, frame counts differ,
        bad csv.
    SequenceError
        No frames.
    TransformError
        Every ``tforms`` matrix is invalid, or ``image_to_probe`` is not a valid 4x4 matrix.
    ValueError
        ``fps`` not positive, or both ``calibration_csv`` and ``image_to_probe`` given.
    """
    path = Path(path)
    fps = float(fps)
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number of frames per second, got {fps}")
    if calibration_csv is not None and image_to_probe is not None:
        raise ValueError("give calibration_csv or image_to_probe, not both")

    calibration = None  # checked first: cheap, and a bad csv should not cost a 500 MB read
    if calibration_csv is not None:
        scaling, spatial = read_tusrec_calibration(calibration_csv)
        calibration = spatial @ scaling
        if one_based_pixels:
            shift = np.eye(4)
            shift[:2, 3] = 1.0
            calibration = calibration @ shift
        calibration = check_matrix(calibration, name="ImageToProbe", source=str(calibration_csv))
    elif image_to_probe is not None:
        calibration = check_matrix(image_to_probe, name="image_to_probe")

    try:
        frames, tforms, tforms_source = _read_scan(path, tforms_path)
    except _H5_ERRORS as exc:  # what h5py raises on a damaged file, wherever it raises it
        raise FileFormatError(
            f"{path}: damaged HDF5 file ({exc.__class__.__name__}: {shown(str(exc), 120, quote=False)})"
        ) from None
    n = frames.shape[0]
    matrices = tforms
    with np.errstate(invalid="ignore"):
        valid = np.all(np.isfinite(matrices), axis=(1, 2)) & np.all(
            np.abs(matrices[:, 3, :] - _LAST_ROW) < 1e-6, axis=1
        )
    if not valid.any():
        raise TransformError(f"{tforms_source}: 'tforms': all {n} matrices are NaN or not homogeneous")
    if not valid.all():
        logger.warning("%s: 'tforms': %d of %d matrices are invalid", tforms_source, n - valid.sum(), n)

    seq = TrackedSequence(
        frames=np.ascontiguousarray(frames),
        timestamps_s=np.arange(n, dtype=np.float64) / fps,
        transforms={"ProbeToTracker": (matrices, valid)},
        metadata={"TusRecFramesPerSecond": repr(fps)},
    )
    if calibration is not None:
        seq.set_transform("ImageToProbe", np.broadcast_to(calibration, (n, 4, 4)).copy())
        sx, sy = np.linalg.norm(calibration[:3, :2], axis=0)
        seq.pixel_spacing_mm = (float(sx), float(sy))
    logger.info("read %s: %s", path, seq)
    return seq


def write_tusrec_h5(seq: TrackedSequence, path, *, transform: str = "ProbeToTracker") -> Path:
    """Write ``frames`` and ``tforms`` like a TUS-REC scan (for TUS-REC-like test data).

    Parameters
    ----------
    seq : TrackedSequence
        Single-channel frames ``(N, H, W)`` uint8 (or float32).
    path : str or Path
        Output ``.h5``.
    transform : str
        Per-frame transform written as ``tforms`` (float32); invalid frames are written as NaN,
        which :func:`read_tusrec_h5` reads back as invalid.

    Returns
    -------
    Path

    Raises
    ------
    SequenceError
        Empty or multi-channel sequence.
    TransformError
        ``transform`` is not in the sequence.
    FileFormatError
        The file cannot be written.
    """
    import h5py

    path = Path(path)
    if not isinstance(seq, TrackedSequence):
        raise TypeError(f"seq must be a TrackedSequence, got {type(seq).__name__}")
    if seq.n_frames == 0:
        raise SequenceError(f"{path}: cannot write an empty sequence (0 frames)")
    if seq.frames.ndim != 3:
        raise SequenceError(f"{path}: TUS-REC frames are (N, H, W); got {seq.n_channels}-channel frames")
    name = transform[: -len("Transform")] if transform.endswith("Transform") else transform
    if name not in seq.transforms:
        raise TransformError(
            f"{path}: transform {transform!r} not in the sequence (has: {', '.join(seq.transforms) or 'none'})"
        )
    ft = seq.transforms[name]
    tforms = ft.matrices.astype(np.float32)
    tforms[~ft.valid] = np.nan
    try:
        with h5py.File(path, "w") as h5:
            h5.create_dataset(
                "frames",
                data=np.ascontiguousarray(seq.frames),
                chunks=(1,) + seq.frames.shape[1:],
                compression="gzip",
                compression_opts=4,
            )
            h5.create_dataset("tforms", data=tforms)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write: {exc}") from exc
    logger.info("wrote %s: %d frames, tforms = %s", path, seq.n_frames, name)
    return path

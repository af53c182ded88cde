"""Numpy-in / numpy-out entry points for the Slicer module's Logic (no MRML here).

The Logic copies its nodes to arrays (frames from the sequence browser's image node, the
per-frame ImageToReference matrices of the transform node, the markups ROI's centre, size and
axes), calls one function here and writes the returned volumes back to nodes. MRML's world is
RAS while PLUS's Reference frame is "pure mm"; like SlicerIGT, the Reference frame is taken as
the Slicer world, so matrices are passed through unchanged.
"""

from __future__ import annotations

import numpy as np

from ..sequence import TrackedSequence
from .config import ReconstructionOptions
from .errors import InvalidOptionError
from .reconstructor import IncrementalReconstructor, ReconstructionResult, reconstruct_volume

__all__ = ["reconstruct_from_arrays", "roi_options", "live_reconstructor"]


def reconstruct_from_arrays(
    frames,
    image_to_reference,
    options: ReconstructionOptions | None = None,
    *,
    valid=None,
    image_ok=None,
    timestamps_s=None,
    extra_channels=None,
    channel_names=None,
    importance_mask=None,
    progress=None,
) -> ReconstructionResult:
    """Reconstruct from frames and their ImageToReference matrices.

    Parameters
    ----------
    frames : (n, rows, cols[, channels]) uint8 or float32, MF
        E.g. ``np.array(slicer.util.arrayFromVolume(imageNode))[0]`` stacked over the
        sequence browser's items (a Slicer image node is ``(1, rows, cols)``).
    image_to_reference : (n, 4, 4) float64
        Pixel (x = column, y = row) -> Reference (world) mm: the image node's IJKToRAS
        composed with its parent transform, per frame.
    options : ReconstructionOptions, optional
    valid : (n,) bool, optional
        False for frames whose transform is invalid (skipped and reported).
    image_ok, timestamps_s : (n,) arrays, optional
    extra_channels, channel_names, importance_mask, progress
        As in :func:`~.reconstructor.reconstruct_volume`.
    """
    frames = np.asarray(frames)
    if frames.dtype not in (np.uint8, np.float32):
        frames = frames.astype(np.float32)
    mats = np.array(image_to_reference, dtype=np.float64).reshape(-1, 4, 4)
    if valid is None:
        valid = np.all(np.isfinite(mats), axis=(1, 2))
    seq = TrackedSequence(
        frames=frames,
        timestamps_s=timestamps_s,
        transforms={"ImageToReference": (np.where(np.isfinite(mats), mats, 0.0), np.asarray(valid, dtype=bool))},
        image_ok=image_ok,
    )
    opts = (options or ReconstructionOptions()).replace(image_to_reference_transform="ImageToReference")
    return reconstruct_volume(
        seq,
        None,
        opts,
        importance_mask=importance_mask,
        extra_channels=extra_channels,
        channel_names=channel_names,
        progress=progress,
    )


def roi_options(options: ReconstructionOptions, center_mm, size_mm, axes=None) -> ReconstructionOptions:
    """Options whose output grid is a box ROI (e.g. a markups ROI node).

    Parameters
    ----------
    options : ReconstructionOptions
        Its ``output_spacing_mm`` is kept.
    center_mm : (3,) float
        Box centre in the Reference (world) frame, mm.
    size_mm : (3,) float
        Full edge lengths along the box axes, mm (> 0).
    axes : (3, 3) float, optional
        Columns: the box's orthonormal axes in the Reference frame (default: the frame's).

    Returns
    -------
    ReconstructionOptions with ``output_origin_mm``, ``output_extent`` and
    ``output_directions`` set: voxel centres cover the box, the centre voxel on ``center_mm``.
    """
    center = np.asarray(center_mm, dtype=float).reshape(3)
    size = np.asarray(size_mm, dtype=float).reshape(3)
    if np.any(~np.isfinite(size)) or np.any(size <= 0):
        raise InvalidOptionError(f"ROI size_mm: expected 3 values > 0 mm, got {size.tolist()}")
    d = np.eye(3) if axes is None else np.asarray(axes, dtype=float).reshape(3, 3)
    spacing = np.asarray(options.output_spacing_mm)
    counts = np.maximum(1, np.floor(size / spacing + 1e-9).astype(np.int64) + 1)
    origin = center - d @ ((counts - 1) / 2.0 * spacing)
    extent = (0, int(counts[0]) - 1, 0, int(counts[1]) - 1, 0, int(counts[2]) - 1)
    return options.replace(
        output_origin_mm=tuple(origin),
        output_extent=extent,
        output_directions=None if axes is None else tuple(map(tuple, d)),
    )


def live_reconstructor(options: ReconstructionOptions, image_shape, *, n_channels: int = 1, dtype=np.uint8, **kw) -> IncrementalReconstructor:
    """An :class:`IncrementalReconstructor` for a live image stream (see its docstring)."""
    return IncrementalReconstructor(options, image_shape=image_shape, n_channels=n_channels, dtype=dtype, **kw)

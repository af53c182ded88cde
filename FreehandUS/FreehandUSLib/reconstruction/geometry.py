"""The output voxel grid: from an ROI or from the frames' bounding box, with a memory check.

A grid is ``dims = (n_i, n_j, n_k)`` voxels of ``spacing_mm`` along orthonormal axes
``directions`` (columns i, j, k, in the Reference frame) starting at ``origin_mm`` (the centre of
voxel ``(0, 0, 0)``). Buffers are indexed ``[k, j, i]``.

Automatic grid (PLUS): the four corners of every usable frame's clip rectangle go through
ImageToReference; the grid's origin is the minimum corner and it spans the maximum corner.
``grid_alignment="plus"`` reproduces PLUS's reference volumes exactly (origin at the minimum,
``n = round(range / spacing) + 1``); ``"snap"`` puts the origin on a multiple of the spacing and
covers the range (``n = ceil((max - origin) / spacing) + 1``), as newer IGSIO does, so that
separate sweeps share a lattice.

Before anything is allocated :func:`check_memory` compares the buffer size with the budget and
refuses too large grids with the dimensions, the bytes and a spacing that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ReconstructionError, VolumeTooLargeError

__all__ = [
    "OutputGrid",
    "frame_corners_reference",
    "grid_from_bounds",
    "grid_from_options",
    "buffer_bytes_per_voxel",
    "check_memory",
    "format_bytes",
]


@dataclass(frozen=True, eq=False)
class OutputGrid:
    """A regular voxel grid in the Reference frame.

    Attributes
    ----------
    origin_mm : (3,) float64
        Reference-frame position of the centre of voxel (0, 0, 0), mm.
    spacing_mm : (3,) float64
        Voxel size along i, j, k, mm.
    dims : (3,) int
        ``(n_i, n_j, n_k)``.
    directions : (3, 3) float64
        Columns: the i, j, k axes in the Reference frame.
    """

    origin_mm: tuple
    spacing_mm: tuple
    dims: tuple
    directions: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "origin_mm", tuple(float(v) for v in self.origin_mm))
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        object.__setattr__(self, "dims", tuple(int(v) for v in self.dims))
        object.__setattr__(self, "directions", np.asarray(self.directions, dtype=np.float64).reshape(3, 3))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Buffer shape ``(n_k, n_j, n_i)``."""
        return (self.dims[2], self.dims[1], self.dims[0])

    @property
    def n_voxels(self) -> int:
        return self.dims[0] * self.dims[1] * self.dims[2]

    @property
    def voxel_to_reference(self) -> np.ndarray:
        """4x4: voxel index (i, j, k) -> Reference mm."""
        m = np.eye(4)
        m[:3, :3] = self.directions * np.asarray(self.spacing_mm)[None, :]
        m[:3, 3] = self.origin_mm
        return m

    @property
    def reference_to_voxel(self) -> np.ndarray:
        """4x4: Reference mm -> continuous voxel index (i, j, k)."""
        m = np.eye(4)
        m[:3, :3] = self.directions.T / np.asarray(self.spacing_mm)[:, None]
        m[:3, 3] = -m[:3, :3] @ np.asarray(self.origin_mm)
        return m

    def bounds_grid_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """Minimum and maximum voxel centres in the grid's own axes (mm from the Reference origin)."""
        lo = self.directions.T @ np.asarray(self.origin_mm)
        hi = lo + (np.asarray(self.dims) - 1) * np.asarray(self.spacing_mm)
        return lo, hi

    def same_as(self, other: OutputGrid) -> bool:
        return (
            self.dims == other.dims
            and np.allclose(self.origin_mm, other.origin_mm, rtol=0, atol=1e-9)
            and np.allclose(self.spacing_mm, other.spacing_mm, rtol=0, atol=1e-12)
            and np.allclose(self.directions, other.directions, rtol=0, atol=1e-12)
        )

    def to_dict(self) -> dict:
        return {
            "dimensions": list(self.dims),
            "spacing": list(self.spacing_mm),
            "origin": list(self.origin_mm),
            "directions": self.directions.tolist(),
        }

    def __str__(self) -> str:
        d = "x".join(str(v) for v in self.dims)
        return (
            f"grid {d} voxels, spacing {tuple(round(v, 6) for v in self.spacing_mm)} mm, "
            f"origin {tuple(round(v, 4) for v in self.origin_mm)} mm"
        )


def frame_corners_reference(image_to_reference: np.ndarray, corners_px: np.ndarray) -> np.ndarray:
    """Corners of each frame in the Reference frame.

    Parameters
    ----------
    image_to_reference : (n, 4, 4) float64
    corners_px : (4, 2) float64, (x, y) pixels

    Returns
    -------
    (n, 4, 3) float64, mm
    """
    m = np.asarray(image_to_reference, dtype=np.float64)
    c = np.asarray(corners_px, dtype=np.float64)
    return np.einsum("nab,cb->nca", m[:, :3, :2], c) + m[:, None, :3, 3]


def _dims_for(lo, hi, spacing, alignment, anchor=None):
    """Grid origin (grid-frame coordinates) and dims covering [lo, hi] along each axis."""
    lo, hi, spacing = (np.asarray(v, dtype=np.float64) for v in (lo, hi, spacing))
    if anchor is not None:
        anchor = np.asarray(anchor, dtype=np.float64)
        first = np.floor((lo - anchor) / spacing + 1e-9)
        last = np.ceil((hi - anchor) / spacing - 1e-9)
        origin = anchor + first * spacing
        counts = last - first + 1
    elif alignment == "snap":
        origin = np.floor(lo / spacing) * spacing
        counts = np.ceil((hi - origin) / spacing) + 1
    else:
        origin = lo
        counts = np.floor((hi - lo) / spacing + 0.5) + 1
    return origin, counts


def grid_from_bounds(
    lo_mm,
    hi_mm,
    spacing_mm,
    *,
    directions=None,
    alignment: str = "plus",
    anchor_mm=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid geometry covering a box given in the grid's axes (no allocation, no limits).

    Returns ``(origin_mm (3,) Reference frame, counts (3,) float (may be huge), directions)``.
    """
    d = np.eye(3) if directions is None else np.asarray(directions, dtype=np.float64)
    anchor = None if anchor_mm is None else d.T @ np.asarray(anchor_mm, dtype=np.float64)
    origin_g, counts = _dims_for(lo_mm, hi_mm, spacing_mm, alignment, anchor)
    return d @ origin_g, counts, d


def grid_from_options(
    options, corners_reference: np.ndarray | None, *, n_channels: int = 1, out_itemsize: int = 1, frame_dtype=None,
    slabbed: bool = False,
) -> OutputGrid:
    """The output grid of ``options``: the fixed ROI, or the bounding box of ``corners_reference``.

    Parameters
    ----------
    options : ReconstructionOptions
    corners_reference : (n, 4, 3) float64 or None
        Clipped frame corners of the usable frames in the Reference frame, mm (needed unless
        the options give a full ROI).
    n_channels, out_itemsize, frame_dtype, slabbed
        For the memory check (see :func:`buffer_bytes_per_voxel`).

    Raises
    ------
    VolumeTooLargeError
        The grid's buffers exceed ``options.memory_budget_bytes``.
    ReconstructionError
        No corners to derive an automatic grid from.
    """
    spacing = np.asarray(options.output_spacing_mm)
    d = options.directions
    if options.output_extent is not None:
        e = np.asarray(options.output_extent, dtype=np.int64)
        anchor = np.zeros(3) if options.output_origin_mm is None else np.asarray(options.output_origin_mm)
        first = e[0::2]
        counts = (e[1::2] - first + 1).astype(np.float64)
        origin = anchor + d @ (first * spacing)
        lo_g = d.T @ origin
        hi_g = lo_g + (counts - 1) * spacing
        ranges = (lo_g, hi_g)
    else:
        if corners_reference is None or len(corners_reference) == 0:
            raise ReconstructionError("cannot compute the output extent: no usable frame to bound it")
        pts = np.asarray(corners_reference, dtype=np.float64).reshape(-1, 3) @ d  # grid-frame coordinates
        lo_g, hi_g = pts.min(axis=0), pts.max(axis=0)
        origin, counts, _ = grid_from_bounds(
            lo_g, hi_g, spacing, directions=d, alignment=options.grid_alignment, anchor_mm=options.output_origin_mm
        )
        ranges = (lo_g, hi_g)
    check_memory(
        counts,
        spacing,
        budget_bytes=options.memory_budget_bytes,
        bytes_per_voxel=buffer_bytes_per_voxel(options, n_channels, out_itemsize, frame_dtype, slabbed=slabbed),
        ranges_mm=ranges,
    )
    return OutputGrid(origin, spacing, tuple(int(c) for c in counts), d)


def buffer_bytes_per_voxel(options, n_channels: int = 1, out_itemsize: int = 1, frame_dtype=None, *,
                           slabbed: bool = False) -> int:
    """Peak bytes per voxel of a reconstruction (accumulators, outputs, coverage map).

    With ``slabbed`` (batch reconstruction a slab of planes at a time, :mod:`.slabs`): the
    outputs, the coverage map and the slab buffers (at most half the outputs' bytes, beyond a
    few MiB).

    The accumulators are the compact types of :func:`~.kernels.accumulator_types` (e.g. 4 + 4
    bytes for nearest/mean of uint8 frames, the output type + 4 for max/latest); the output
    volumes are separate arrays except for max/latest of one channel, whose value buffer *is*
    the output; hole filling adds a 1-byte known-voxel mask; a float64 weight is turned into
    the float32 coverage map after the sums are released, so the peak is the larger of the two
    phases.

    Parameters
    ----------
    options : ReconstructionOptions
    n_channels : int
    out_itemsize : int
        Bytes per output voxel (1: uint8, 4: float32).
    frame_dtype : numpy dtype, optional
        The frames' type as inserted (default: uint8 when ``out_itemsize`` is 1, else float32).
    slabbed : bool
    """
    if slabbed:
        out = n_channels * out_itemsize
        return int(out + (out + 1) // 2 + (4 if options.output_weight else 0))
    from .kernels_common import MODE_CODES, MODE_MEAN, MODE_MEAN_PLUS, accumulator_types

    if frame_dtype is None:
        frame_dtype = np.uint8 if out_itemsize == 1 else np.float32
    linear = options.interpolation == "linear"
    mode = MODE_CODES[options.compounding]
    if options.emulate_plus and mode == MODE_MEAN and not linear:
        mode = MODE_MEAN_PLUS
    acc_dtype, weight_dtype, _ = accumulator_types(mode, linear, frame_dtype, emulate_plus=options.emulate_plus)
    acc = n_channels * acc_dtype.itemsize
    weight = weight_dtype.itemsize
    values_are_output = options.compounding in ("max", "latest") and n_channels == 1 and acc_dtype.itemsize == out_itemsize
    out = 0 if values_are_output else n_channels * out_itemsize
    known = 1 if options.fill_holes else 0
    peak = acc + weight + out + known
    if options.output_weight and weight_dtype.itemsize != 4:
        peak = max(peak, weight + out + 4)  # float32 coverage map made after the sums are freed
    return int(peak)


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (an integer beyond the float range: ``'about 1e330 B'``)."""
    try:
        n = float(n)
    except OverflowError:
        return f"about 1e{int(math.log10(n))} B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _nice_up(value: float) -> float:
    """Round up to two significant digits (0.731 -> 0.74, 12.3 -> 13)."""
    if value <= 0:
        return value
    exponent = math.floor(math.log10(value)) - 1
    step = 10.0**exponent
    return round(math.ceil(value / step - 1e-9) * step, 10)


def check_memory(counts, spacing_mm, *, budget_bytes: int, bytes_per_voxel: int, ranges_mm=None) -> int:
    """Raise :class:`VolumeTooLargeError` if a grid of ``counts`` voxels exceeds the budget.

    Parameters
    ----------
    counts : (3,) float or int
        Voxels along i, j, k (may be astronomically large; nothing is allocated).
    spacing_mm : (3,) float
    budget_bytes, bytes_per_voxel : int
    ranges_mm : ((3,), (3,)) or None
        Extent of the box covered (to compute a spacing that fits).

    Returns
    -------
    int : the bytes needed.
    """
    counts = np.asarray(counts, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 1):
        raise ReconstructionError(
            f"output grid dimensions {counts.tolist()} are invalid (non-finite transforms or an empty extent?)"
        )
    n_voxels = math.prod(int(c) for c in counts)
    needed = n_voxels * int(bytes_per_voxel)
    if needed <= budget_bytes:
        return needed
    dims = " x ".join(f"{int(c):,}" for c in counts)
    if ranges_mm is not None:
        size_mm = np.maximum(np.asarray(ranges_mm[1]) - np.asarray(ranges_mm[0]), 0.0)
    else:
        size_mm = (counts - 1) * spacing
    # in logarithms: ``needed`` may be an integer far beyond the float range (spacing 1e-300 mm)
    scale = math.exp((math.log(needed) - math.log(budget_bytes)) / 3.0)
    suggestion = np.array([_nice_up(s * scale) for s in spacing])
    for _ in range(200):
        fit = math.prod(int(math.floor(r / s + 0.5)) + 1 for r, s in zip(size_mm, suggestion)) * bytes_per_voxel
        if fit <= budget_bytes:
            break
        suggestion = np.array([_nice_up(s * 1.05) for s in suggestion])
    spacing_text = " ".join(f"{s:g}" for s in suggestion)
    raise VolumeTooLargeError(
        f"output volume of {dims} voxels ({n_voxels:,} voxels at spacing "
        f"{' '.join(f'{s:g}' for s in spacing)} mm) needs {format_bytes(needed)} ({needed:,} bytes) of "
        f"reconstruction buffers, over the memory budget of {format_bytes(budget_bytes)}; use a spacing of "
        f"at least {spacing_text} mm (--spacing {spacing_text}), a smaller ROI, or a larger memory budget (memory_budget_bytes; --memory-budget-gib on the command line)"
    )


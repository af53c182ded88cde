"""Batch and live (incremental) volume reconstruction from tracked frames.

- :func:`reconstruct_volume` reconstructs a :class:`~FreehandUSLib.sequence.TrackedSequence`
  (ImageToReference from the sequence's transforms plus fixed ones such as ImageToProbe).
- :class:`IncrementalReconstructor` takes frames one at a time or in batches (live scanning),
  into a fixed ROI or a grid that grows; it never drops or skips a frame silently.
- :func:`options_from_plus_config` maps a PLUS ``<VolumeReconstruction>`` element to
  :class:`~.config.ReconstructionOptions`.

The inputs' helpers (:func:`options_from_plus_config`, :func:`resolve_image_to_reference`,
:func:`load_importance_mask`) live in :mod:`.inputs`, :class:`ReconstructionResult` and
:data:`SKIP_REASONS` in :mod:`.result`; all are importable from here as before.

Batch reconstruction inserts the same frames in the same order as incremental reconstruction
into the grid computed from all frames, so the two give bit-identical volumes for the same
frames and grid, in every mode.

Memory. Live (incremental) reconstruction keeps accumulators for the whole grid, of the
compact types of :func:`~.kernels.accumulator_types` (uint32 sums and counts for nearest/mean
of uint8 frames, widened to float64 before any voxel could pass 16,843,009 pixels; the value
itself plus a count for max/latest): with the uint8 output, nearest/mean peaks at 9 bytes per
voxel (10 with hole filling), max/latest at 5, linear/mean at 17 (float64 sums and weights, for
exactness); :func:`~.geometry.buffer_bytes_per_voxel` gives the figure. Batch reconstruction
on the numba engine needs accumulators for a slab of k-planes only (:mod:`.slabs`): its peak
is the output volumes (+ 4 bytes per voxel for the coverage map, if asked for) plus slab
buffers of at most half the outputs or 16 MiB. Frames are never copied whole (other types and
extra channels are converted a batch of 32 frames at a time), outputs are computed straight
from the accumulators, and hole filling reads the means from the accumulators and writes the
rounded values into the output.

Example
-------
>>> from FreehandUSLib.io import read_sequence
>>> from FreehandUSLib.io.plus_config import read_plus_config
>>> config = read_plus_config("PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
>>> result = reconstruct_volume(read_sequence("SpinePhantomFreehand.igs.mha"),
...                             config.coordinate_definitions.repository_fixed(),
...                             options_from_plus_config(config))
>>> result.volume.voxels.shape        # (k, j, i)
(105, 106, 147)
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..sequence import TrackedSequence
from ..volume import Volume
from .config import ReconstructionOptions
from .errors import InvalidOptionError, NoUsableFramesError, ReconstructionError, VolumeTooLargeError
from .geometry import (
    OutputGrid,
    buffer_bytes_per_voxel,
    check_memory,
    frame_corners_reference,
    grid_from_bounds,
    grid_from_options,
)
from .holefill_common import STORE_FLOOR, STORE_RAW, STORE_ROUND, HoleFillingStats, hole_filling_reach
from .inputs import load_importance_mask, options_from_plus_config, resolve_image_to_reference
from .kernels_common import (
    MODE_CODES,
    MODE_IMPORTANCE,
    MODE_MEAN,
    MODE_MEAN_PLUS,
    accumulator_types,
    default_threads,
    pixels_per_voxel_bound,
    voxel_matrices,
)
from .masks import clipped_corners_px, detect_fan_angles, fan_row_ranges, unoptimized_row_ranges
from .result import SKIP_REASONS, ReconstructionResult
from .slabs import frame_plane_ranges, plan_slabs, slab_budget_bytes
from .engines import choose_engine, open_insertion
from . import native

__all__ = [
    "SKIP_REASONS",
    "ReconstructionResult",
    "IncrementalReconstructor",
    "reconstruct_volume",
    "resolve_image_to_reference",
    "options_from_plus_config",
    "load_importance_mask",
]

log = logging.getLogger(__name__)

_BATCH = 32  # frames per insertion call (progress granularity; frames converted per batch)


# --------------------------------------------------------------------------------------------
# Incremental reconstruction
# --------------------------------------------------------------------------------------------


def _frames_view(frames) -> np.ndarray:
    """``(n, rows, cols, channels)`` view of a frame stack (no copy, no conversion)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4:
        raise ReconstructionError(f"frames must be (n, rows, cols[, channels]), got shape {frames.shape}")
    return frames


def _channel_dtype(dtype) -> np.dtype:
    """Output type of a channel: uint8 stays uint8, everything else becomes float32."""
    return np.dtype(np.uint8) if np.dtype(dtype) == np.uint8 else np.dtype(np.float32)


def _as_frames4d(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4:
        raise ReconstructionError(f"frames must be (n, rows, cols[, channels]), got shape {frames.shape}")
    if frames.dtype not in (np.uint8, np.float32):
        frames = frames.astype(np.float32)
    return np.ascontiguousarray(frames)


def _kept_pixels(ranges: np.ndarray) -> int:
    """Pixels kept by row ranges ``(n_rows, 4)`` (see :mod:`.masks`)."""
    r = np.asarray(ranges, dtype=np.int64)
    span = np.maximum(r[:, 1] - r[:, 0] + 1, 0)
    lo, hi = np.maximum(r[:, 2], r[:, 0]), np.minimum(r[:, 3], r[:, 1])
    return int((span - np.maximum(hi - lo + 1, 0) * (span > 0)).sum())


def _batch_source(frames: np.ndarray, extras, dtype):
    """A callable ``ids -> (len(ids), rows, cols, channels)`` contiguous ``dtype`` array.

    Converts (and joins the extra channels of) only the frames asked for, so a sequence is
    never copied whole.
    """
    dtype = np.dtype(dtype)

    def take(ids):
        parts = [_as4d_view(frames[ids])] + [_as4d_view(e[ids]) for e in extras]
        if len(parts) == 1:
            return np.ascontiguousarray(parts[0], dtype=dtype)
        return np.ascontiguousarray(np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=3))

    return take


def _as4d_view(frames: np.ndarray) -> np.ndarray:
    return frames[..., None] if frames.ndim == 3 else frames


def _finish_channel(acc, weight, c: int, divide: bool, dtype: np.dtype) -> np.ndarray:
    """Output volume of channel ``c``: the mean (``acc / weight``) or the value, as ``dtype``.

    uint8: rounded half up and clipped to 0..255; float32: cast. Voxels without weight are 0.
    Means are computed in one compiled pass (no float temporaries); values a plane at a time.
    """
    out = np.empty(acc.shape[:3], dtype=dtype)
    if divide and acc.flags.c_contiguous and weight.flags.c_contiguous:
        from .kernels import finish_channel_into
        return finish_channel_into(acc, weight, c, divide, out)  # the means, in float64 as below
    plane = np.empty(acc.shape[1:3], dtype=np.float64)
    for k in range(acc.shape[0]):
        src = acc[k, ..., c]
        if divide:
            plane[...] = 0.0
            np.divide(src, weight[k], out=plane, where=weight[k] != 0)
            values = plane
        elif src.dtype == dtype:
            out[k] = src  # the values themselves (max / latest)
            continue
        else:
            values = src
        if dtype == np.uint8:
            rounded = np.floor(values + 0.5)
            np.clip(rounded, 0, 255, out=rounded)
            out[k] = rounded
        else:
            out[k] = values
    return out


def _coverage(weight: np.ndarray, mode: int, consume: bool, emulate_plus: bool = False) -> np.ndarray:
    """The float32 coverage map from the weight buffer (in place when ``consume`` allows).

    With PLUS emulation the weight buffer is PLUS's 16-bit accumulation buffer (256 per unit
    weight): the map is that divided by 256.
    """
    if mode == MODE_MEAN_PLUS or emulate_plus:
        out = np.empty(weight.shape, dtype=np.float32)
        for k in range(weight.shape[0]):
            out[k] = weight[k] / 256.0  # PLUS counts 256 per hit
        return out
    if weight.dtype == np.float32:
        return weight if consume else weight.copy()
    if weight.dtype == np.uint32 and consume and weight.flags.c_contiguous:
        from .kernels import counts_to_float32
        return counts_to_float32(weight)  # same buffer, converted in place
    return weight.astype(np.float32)


def _shutdown(executor: ThreadPoolExecutor) -> None:
    executor.shutdown(wait=False)


@dataclass
class _SlabContext:
    """What every worker of a slab-wise batch reconstruction shares (read-only but the outputs)."""

    frames4d: object
    frame_ids: np.ndarray
    vox: np.ndarray
    mask_ids: np.ndarray
    row_ranges: np.ndarray
    first: np.ndarray
    last: np.ndarray
    outs: list
    coverage: np.ndarray | None
    acc_dtype: np.dtype
    weight_dtype: np.dtype
    fill: bool
    threads: int


@dataclass
class _SlabPart:
    """One worker's share of a slab-wise batch reconstruction."""

    counts: np.ndarray
    filled: list
    n_slabs: int
    n_known: int = 0
    holes: int = 0
    hole_seconds: float = 0.0


class IncrementalReconstructor:
    """Reconstruct a volume from frames that arrive one at a time or in batches.

    Parameters
    ----------
    options : ReconstructionOptions, optional
    image_shape : (n_rows, n_cols)
        Size of the frames (MF).
    n_channels : int
        Channels per frame (e.g. 2 for ultrasound + photoacoustic).
    dtype : numpy dtype
        uint8 or float32: the frames' (and the output volumes') scalar type.
    grid : OutputGrid, optional
        A fixed output grid. Default: the ROI of ``options`` if it has an ``output_extent``;
        otherwise the grid starts around the first frames and grows to include new ones (on
        the lattice fixed by the first frame, so growth never resamples).
    importance_mask : (n_rows, n_cols) array, optional
        Per-pixel weights for ``importance_mask`` compounding (uint8 0..255 or float 0..1).
    channel_names : sequence of str, optional
    max_pending_frames : int
        Live queue (:meth:`submit`) capacity; older frames are dropped (and counted) beyond it.
    max_lag_s : float
        Live queue: frames older than this (by their timestamps) than the newest are dropped
        (and counted) when processing, as PLUS gives up when it is 3 s behind.
    allocate : bool
        Allocate a fixed grid's accumulators now (default) or on the first frame.

    Notes
    -----
    Frames are numbered in the order they are offered (or by the ``indices`` given), and
    every frame that does not go into the volume is recorded with its reason
    (:data:`SKIP_REASONS`); :meth:`status` reports the counts at any time.
    """

    def __init__(
        self,
        options: ReconstructionOptions | None = None,
        *,
        image_shape,
        n_channels: int = 1,
        dtype=np.uint8,
        grid: OutputGrid | None = None,
        importance_mask=None,
        channel_names=None,
        channel_dtypes=None,
        max_pending_frames: int = 256,
        max_lag_s: float = 3.0,
        allocate: bool = True,
    ):
        self.options = options if options is not None else ReconstructionOptions()
        opts = self.options
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.n_channels = int(n_channels)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.uint8, np.float32):
            raise InvalidOptionError(f"dtype: expected uint8 or float32 frames, got {self.dtype}")
        self.channel_names = tuple(channel_names) if channel_names else tuple(
            f"channel{c}" if self.n_channels > 1 else "image" for c in range(self.n_channels)
        )
        if len(self.channel_names) != self.n_channels:
            raise InvalidOptionError(f"channel_names: expected {self.n_channels} names, got {self.channel_names}")
        self.channel_dtypes = tuple(np.dtype(d) for d in channel_dtypes) if channel_dtypes else (self.dtype,) * self.n_channels
        self.mode = MODE_CODES[opts.compounding]
        self.linear = opts.interpolation == "linear"
        if opts.emulate_plus and self.mode == MODE_MEAN:
            self.mode = MODE_MEAN_PLUS
        self.engine = choose_engine(opts)
        self.n_threads = opts.number_of_threads or default_threads()
        self.max_pending_frames = int(max_pending_frames)
        self.max_lag_s = float(max_lag_s)
        n_rows, n_cols = self.image_shape
        self._importance = None
        if opts.compounding == "importance_mask":
            if importance_mask is None and getattr(opts, "importance_mask_file", None):
                importance_mask = load_importance_mask(opts.importance_mask_file, self.image_shape)
            if importance_mask is None:
                raise InvalidOptionError("importance_mask compounding needs an importance_mask image, got None")
            mask = np.asarray(importance_mask)
            if mask.shape != self.image_shape:
                raise InvalidOptionError(
                    f"importance_mask: expected shape {self.image_shape} (rows, cols), got {mask.shape}"
                )
            mask = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
            self._importance = np.ascontiguousarray(mask, dtype=np.float32)
        # PLUS emulation has two code paths: FULL (fixed point) and NONE (unoptimized).
        self._plus_unoptimized = opts.emulate_plus and opts.plus_optimization == "NONE"
        self._base_ranges = self._row_ranges(opts.fan_angles_deg if opts.fan_enabled else None)
        self._corners_px = clipped_corners_px(n_rows, n_cols, opts.clip_rectangle_origin_px, opts.clip_rectangle_size_px)
        self._ranges_cache: dict = {}
        self._ranges_list: list = []
        self._ranges_stack: np.ndarray | None = None
        if grid is None and opts.output_extent is not None:
            grid = grid_from_options(
                opts, None, n_channels=self.n_channels, out_itemsize=self._out_itemsize, frame_dtype=self.dtype
            )
        self.fixed_grid = grid is not None
        self._pending_grid = grid
        self.grid: OutputGrid | None = None
        self._acc = None
        self._weight = None
        self._count_limit: int | None = None  # largest exact per-voxel count of the buffers' types
        self._count_bound = 0  # upper bound of the largest per-voxel count so far
        self._kept_pixels: list = []  # pixels kept by each row-ranges mask
        if grid is not None and allocate:
            self._allocate(grid)
        self._next_index = 0
        self.frames_received = 0
        self.frames_used = 0
        self.pixels_inserted = 0
        self.frames_skipped: dict[int, str] = {}
        self.frames_dropped = 0
        self.insertion_seconds = 0.0
        self._pending: deque = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer = None

    # -- buffers -----------------------------------------------------------------------------
    @property
    def _out_itemsize(self) -> int:
        return max(np.dtype(d).itemsize for d in self.channel_dtypes)

    def _allocate(self, grid: OutputGrid) -> None:
        check_memory(
            grid.dims,
            grid.spacing_mm,
            budget_bytes=self.options.memory_budget_bytes,
            bytes_per_voxel=buffer_bytes_per_voxel(self.options, self.n_channels, self._out_itemsize, self.dtype),
        )
        self.grid = grid
        acc_dtype, weight_dtype, self._count_limit = accumulator_types(
            self.mode, self.linear, self.dtype, emulate_plus=self.options.emulate_plus
        )
        self._acc = np.zeros(grid.shape + (self.n_channels,), dtype=acc_dtype)
        self._weight = np.zeros(grid.shape, dtype=weight_dtype)
        self._count_bound = 0

    def _pool(self) -> ThreadPoolExecutor | None:
        if self.n_threads <= 1:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.n_threads, thread_name_prefix="freehandus-recon")
            self._finalizer = weakref.finalize(self, _shutdown, self._executor)
        return self._executor

    def close(self) -> None:
        """Stop the worker threads (the reconstructor stays usable; they restart on demand)."""
        if self._finalizer is not None:
            self._finalizer()
        self._executor = None
        self._finalizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self) -> None:
        """Empty the volume and the counters (a fixed grid stays; a growing grid restarts)."""
        if self.fixed_grid and self._acc is not None:
            self._allocate(self.grid)  # fresh buffers (the compact types again if they were widened)
        elif not self.fixed_grid:
            self.grid, self._acc, self._weight = None, None, None
        self._next_index = 0
        self.frames_received = self.frames_used = self.pixels_inserted = self.frames_dropped = 0
        self.frames_skipped = {}
        self.insertion_seconds = 0.0
        self._pending.clear()

    @property
    def accumulators(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The raw buffers ``(acc (n_k, n_j, n_i, n_channels), weight (n_k, n_j, n_i))`` (read-only views).

        Their types depend on the mode (:func:`~.kernels.accumulator_types`): e.g. uint32 sums
        and counts for nearest/mean of uint8 frames (float64 once a voxel could pass
        16,843,009 pixels), the values themselves for max/latest.
        """
        if self._acc is None:
            return None, None
        a, w = self._acc.view(), self._weight.view()
        a.flags.writeable = False
        w.flags.writeable = False
        return a, w

    # -- growing -----------------------------------------------------------------------------
    def _ensure_grid(self, corners: np.ndarray) -> np.ndarray:
        """Make the grid cover ``corners`` (n, 4, 3) if it may grow; return frames that fit."""
        n = corners.shape[0]
        fits = np.ones(n, dtype=bool)
        if self.fixed_grid or n == 0:
            return fits
        opts = self.options
        d = opts.directions
        spacing = np.asarray(opts.output_spacing_mm)
        pts = corners.reshape(-1, 3) @ d
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if self.grid is None:
            margin = 0.25 * (hi - lo) + 4 * spacing
            origin, counts, _ = grid_from_bounds(
                lo - margin, hi + margin, spacing, directions=d, alignment="snap", anchor_mm=opts.output_origin_mm
            )
            try:
                self._allocate(OutputGrid(origin, spacing, tuple(int(c) for c in counts), d))
            except VolumeTooLargeError:
                log.warning("volume for the first frames exceeds the memory budget; frames skipped")
                return np.zeros(n, dtype=bool)
            return fits
        glo, ghi = self.grid.bounds_grid_frame()
        if np.all(lo >= glo - 0.5 * spacing) and np.all(hi <= ghi + 0.5 * spacing):
            return fits
        size = ghi - glo
        new_lo = np.where(lo < glo, np.minimum(lo, glo - 0.5 * size) - 2 * spacing, glo)
        new_hi = np.where(hi > ghi, np.maximum(hi, ghi + 0.5 * size) + 2 * spacing, ghi)
        first = np.floor((new_lo - glo) / spacing + 1e-9).astype(np.int64)
        last = np.ceil((new_hi - glo) / spacing - 1e-9).astype(np.int64)
        dims = last - first + 1
        origin = d @ (glo + first * spacing)
        try:
            check_memory(
                dims,
                spacing,
                budget_bytes=opts.memory_budget_bytes,
                bytes_per_voxel=buffer_bytes_per_voxel(opts, self.n_channels, self._out_itemsize, self.dtype),
            )
        except VolumeTooLargeError as exc:
            log.warning("not growing the volume: %s", exc)
            # Keep frames that already fit the current grid.
            inside = np.all((corners @ d >= glo - 0.5 * spacing) & (corners @ d <= ghi + 0.5 * spacing), axis=(1, 2))
            return inside
        old_acc, old_w = self._acc, self._weight
        new_grid = OutputGrid(origin, spacing, tuple(int(v) for v in dims), d)
        self.grid = new_grid
        self._acc = np.zeros(new_grid.shape + (self.n_channels,), dtype=old_acc.dtype)
        self._weight = np.zeros(new_grid.shape, dtype=old_w.dtype)
        oi, oj, ok = (-first).tolist()
        nk, nj, ni = old_w.shape
        self._acc[ok : ok + nk, oj : oj + nj, oi : oi + ni] = old_acc
        self._weight[ok : ok + nk, oj : oj + nj, oi : oi + ni] = old_w
        log.debug("grew the volume to %s", new_grid)
        return fits

    # -- insertion ---------------------------------------------------------------------------
    def _row_ranges(self, fan_angles_deg) -> np.ndarray:
        """Kept pixels per row for these fan angles (``None``: no fan), by the active rule."""
        opts = self.options
        kw = dict(
            clip_origin_px=opts.clip_rectangle_origin_px,
            clip_size_px=opts.clip_rectangle_size_px,
            fan_angles_deg=fan_angles_deg,
            fan_origin_px=opts.fan_origin_px,
            fan_radius_start_px=opts.fan_radius_start_px,
            fan_radius_stop_px=opts.fan_radius_stop_px,
        )
        if self._plus_unoptimized:
            return unoptimized_row_ranges(*self.image_shape, **kw)
        return fan_row_ranges(*self.image_shape, plus_floor=opts.emulate_plus, **kw)

    def _row_ranges_for(self, angles) -> int:
        key = None if angles is None else (round(angles[0], 3), round(angles[1], 3))  # bounded cache
        if key not in self._ranges_cache:
            if key is None:
                ranges = self._base_ranges
            else:
                ranges = self._row_ranges(key)
            self._ranges_cache[key] = len(self._ranges_list)
            self._ranges_list.append(ranges)
            self._kept_pixels.append(_kept_pixels(ranges))
            self._ranges_stack = None
        return self._ranges_cache[key]

    def _skip(self, index: int, reason: str) -> None:
        self.frames_skipped[int(index)] = reason

    def _widen(self) -> None:
        """Switch the accumulators to float64 (exact to 2**53), e.g. before uint32 sums could overflow."""
        log.info("widening the accumulation buffers to float64 (a voxel may exceed %s pixels)", self._count_limit)
        if self.mode == MODE_MEAN:
            self._acc = self._acc.astype(np.float64)
        self._weight = self._weight.astype(np.float64)
        self._count_limit = None

    def _guard_counts(self, vox: np.ndarray, mask_ids: np.ndarray) -> None:
        """Keep the per-voxel pixel counts within what the accumulator types hold exactly.

        ``vox``: (n, 3, 3) pixel -> voxel-index maps of the frames about to be inserted.
        """
        if self._count_limit is None:
            return
        kept = np.asarray(self._kept_pixels, dtype=np.int64)[mask_ids]
        batch = int(pixels_per_voxel_bound(vox, kept).sum())
        if self._count_bound + batch > self._count_limit:
            self._count_bound = int(self._weight.max())  # the actual largest count so far
            if self._count_bound + batch > self._count_limit:
                self._widen()
                return
        self._count_bound += batch

    @staticmethod
    def _frames_of(frames4d, frame_ids):
        """``(frames, ids)`` for the kernels: the array itself, or a converted batch from a source."""
        if isinstance(frames4d, np.ndarray):
            return frames4d, frame_ids
        return frames4d(frame_ids), np.arange(len(frame_ids), dtype=np.int64)

    def _admit(self, frames4d, frame_ids, mats, indices, image_ok):
        """Decide which of the offered frames go in; record the others' reasons.

        Returns ``(sel, mask_ids)``: positions of the frames to insert (the grid covers them
        if it may grow) and each offered frame's row-ranges entry.
        """
        opts = self.options
        n = frame_ids.size
        keep = np.ones(n, dtype=bool)
        finite = np.all(np.isfinite(mats), axis=(1, 2))
        if image_ok is not None:
            for t in np.flatnonzero(~np.asarray(image_ok, dtype=bool)):
                self._skip(indices[t], "no_image")
                keep[t] = False
        for t in np.flatnonzero(~finite & keep):
            self._skip(indices[t], "invalid_transform")
            keep[t] = False
        mask_ids = np.zeros(n, dtype=np.int64)
        if opts.fan_angles_auto_detect:
            for t in np.flatnonzero(keep):
                one, first = self._frames_of(frames4d, frame_ids[t : t + 1])
                angles = detect_fan_angles(
                    one[first[0]],
                    max_fan_angles_deg=opts.fan_angles_deg,
                    fan_origin_px=opts.fan_origin_px,
                    fan_radius_start_px=opts.fan_radius_start_px,
                    fan_radius_stop_px=opts.fan_radius_stop_px,
                    brightness_threshold=opts.fan_auto_detect_brightness_threshold,
                    filter_radius_px=opts.fan_auto_detect_filter_radius_px,
                )
                if angles is None:
                    self._skip(indices[t], "empty_image")
                    keep[t] = False
                else:
                    mask_ids[t] = self._row_ranges_for(angles)
        else:
            mask_ids[:] = self._row_ranges_for(None)
        sel = np.flatnonzero(keep)
        if sel.size and not self.fixed_grid:
            corners = frame_corners_reference(mats[sel], self._corners_px)
            fits = self._ensure_grid(corners)
            for t in sel[~fits]:
                self._skip(indices[t], "over_memory_budget")
            sel = sel[fits]
        return sel, mask_ids

    def _insert(self, frames4d, frame_ids, image_to_reference, indices, image_ok=None, progress=None) -> int:
        """Insert ``frames4d[frame_ids]`` (already 4D, dtype checked); return frames used.

        ``frames4d`` may also be a callable ``ids -> (len(ids), rows, cols, channels)`` array
        that converts frames a batch at a time (no converted copy of a whole sequence).
        """
        opts = self.options
        start = time.perf_counter()
        frame_ids = np.asarray(frame_ids, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        mats = np.asarray(image_to_reference, dtype=np.float64).reshape(-1, 4, 4)
        self.frames_received += frame_ids.size
        sel, mask_ids = self._admit(frames4d, frame_ids, mats, indices, image_ok)
        if self.fixed_grid and self._acc is None:
            self._allocate(self._pending_grid)  # buffers released by result(consume=True)
        used = 0
        if sel.size and self.grid is not None:
            fixed = opts.emulate_plus and not self._plus_unoptimized
            vox = voxel_matrices(mats[sel], self.grid.reference_to_voxel, fixed_point=fixed)
            if self._ranges_stack is None:
                self._ranges_stack = np.stack(self._ranges_list)
            ranges = self._ranges_stack
            pool = self._pool()
            counts = np.zeros(sel.size, dtype=np.int64)

            def start_insertion():
                return open_insertion(self.engine, self._acc, self._weight, mode=self.mode, linear=self.linear,
                                      frame_dtype=self.dtype, n_threads=self.n_threads, executor=pool,
                                      fixed_point=fixed, unoptimized=self._plus_unoptimized)

            insertion = start_insertion()
            for a in range(0, sel.size, _BATCH):
                b = min(sel.size, a + _BATCH)
                batch_frames, batch_ids = self._frames_of(frames4d, frame_ids[sel[a:b]])
                if self.engine == "numba" and not opts.emulate_plus:
                    buffers = self._acc
                    self._guard_counts(vox[a:b], mask_ids[sel[a:b]])  # the numba engine's 32-bit counts
                    if self._acc is not buffers:  # widened: insert into the new buffers
                        insertion = start_insertion()
                counts[a:b] = insertion.insert(batch_frames, batch_ids, vox[a:b], ranges, mask_ids[sel[a:b]],
                                               importance=self._importance,
                                               pixel_rejection_threshold=opts.pixel_rejection_threshold)
                if progress is not None:
                    progress(int(b), int(sel.size))
            self._acc, self._weight = insertion.finish()
            used = self._count_used(sel, counts, mats, indices)
        self.insertion_seconds += time.perf_counter() - start
        return used

    def _count_used(self, sel, counts, mats, indices) -> int:
        """Book the pixels each inserted frame added; frames that added none are skipped with a reason."""
        self.pixels_inserted += int(counts.sum())
        used = 0
        for t, c in zip(sel, counts):
            if c > 0:
                used += 1
                continue
            inside = self._frame_touches_grid(mats[t])
            self._skip(indices[t], "no_pixels_kept" if inside else "outside_volume")
        self.frames_used += used
        return used

    def _frame_touches_grid(self, image_to_reference: np.ndarray) -> bool:
        corners = frame_corners_reference(image_to_reference[None], self._corners_px)[0]
        d = self.grid.directions
        glo, ghi = self.grid.bounds_grid_frame()
        half = 0.5 * np.asarray(self.grid.spacing_mm)
        p = corners @ d
        return bool(np.all(p.max(axis=0) >= glo - half) and np.all(p.min(axis=0) <= ghi + half))

    def _check_frames(self, frames) -> np.ndarray:
        f4 = _as_frames4d(frames)
        if f4.shape[1:3] != self.image_shape:
            raise ReconstructionError(
                f"frames are {f4.shape[2]}x{f4.shape[1]} pixels, this reconstructor expects "
                f"{self.image_shape[1]}x{self.image_shape[0]}"
            )
        if f4.shape[3] != self.n_channels:
            raise ReconstructionError(f"frames have {f4.shape[3]} channels, expected {self.n_channels}")
        if f4.dtype != self.dtype:
            f4 = f4.astype(self.dtype)
        return f4

    def add_frames(self, frames, image_to_reference, *, image_ok=None, indices=None, progress=None) -> int:
        """Insert frames now; return how many went into the volume.

        Parameters
        ----------
        frames : (n, n_rows, n_cols[, n_channels]) uint8/float32, MF
        image_to_reference : (n, 4, 4) float64
            Pixel (x, y, 0, 1) -> Reference mm; NaN (or non-finite) marks an invalid pose.
        image_ok : (n,) bool, optional
            False for frames without an image.
        indices : (n,) int, optional
            Frame numbers used in :attr:`frames_skipped` (default: running count).
        progress : callable(done, total), optional
        """
        f4 = self._check_frames(frames)
        n = f4.shape[0]
        mats = np.asarray(image_to_reference, dtype=np.float64).reshape(-1, 4, 4)
        if mats.shape[0] != n:
            raise ReconstructionError(f"{n} frames but {mats.shape[0]} ImageToReference matrices")
        if indices is None:
            indices = np.arange(self._next_index, self._next_index + n)
        self._next_index = int(np.max(indices)) + 1 if n else self._next_index
        return self._insert(f4, np.arange(n), mats, indices, image_ok, progress)

    def add_frame(self, frame, image_to_reference, *, image_ok: bool = True, index: int | None = None) -> bool:
        """Insert one frame now; True when it went into the volume."""
        indices = None if index is None else [index]
        return self.add_frames(np.asarray(frame)[None], np.asarray(image_to_reference)[None], image_ok=[image_ok], indices=indices) == 1

    def add_sequence_frames(self, frames4d, frame_ids, image_to_reference, indices, image_ok=None, progress=None) -> int:
        """Insert ``frames4d[frame_ids]`` without copying the frames (batch path)."""
        return self._insert(frames4d, frame_ids, image_to_reference, indices, image_ok, progress)

    # -- live queue --------------------------------------------------------------------------
    def submit(self, frame, image_to_reference, *, timestamp_s: float | None = None, image_ok: bool = True) -> None:
        """Queue a frame for :meth:`process_pending` (live); never blocks.

        When the queue already holds ``max_pending_frames`` frames the oldest is dropped and
        counted (reason ``dropped_behind``).
        """
        index = self._next_index
        self._next_index += 1
        frame = self._check_frames(frame)[0].copy()
        self._pending.append((index, frame, np.array(image_to_reference, dtype=np.float64), timestamp_s, image_ok))
        while len(self._pending) > self.max_pending_frames:
            self._drop(self._pending.popleft()[0])

    def _drop(self, index: int) -> None:
        self.frames_received += 1
        self.frames_dropped += 1
        self._skip(index, "dropped_behind")

    @property
    def pending(self) -> int:
        """Frames queued by :meth:`submit` and not yet processed."""
        return len(self._pending)

    def process_pending(self) -> int:
        """Insert the queued frames (dropping those more than ``max_lag_s`` older than the newest)."""
        if not self._pending:
            return 0
        items = list(self._pending)
        self._pending.clear()
        stamps = [it[3] for it in items if it[3] is not None]
        if stamps and self.max_lag_s > 0:
            newest = max(stamps)
            kept = []
            for it in items:
                if it[3] is not None and newest - it[3] > self.max_lag_s:
                    self._drop(it[0])
                else:
                    kept.append(it)
            items = kept
        if not items:
            return 0
        frames = np.stack([it[1] for it in items])
        mats = np.stack([it[2] for it in items])
        indices = np.array([it[0] for it in items], dtype=np.int64)
        ok = np.array([it[4] for it in items], dtype=bool)
        return self._insert(frames, np.arange(len(items)), mats, indices, ok)

    # -- status and output -------------------------------------------------------------------
    def status(self) -> dict:
        """Counters so far (JSON-safe)."""
        return {
            "frames_received": self.frames_received,
            "frames_used": self.frames_used,
            "frames_skipped": len(self.frames_skipped),
            "frames_skipped_by_reason": dict(Counter(self.frames_skipped.values())),
            "frames_dropped": self.frames_dropped,
            "frames_pending": len(self._pending),
            "pixels_inserted": self.pixels_inserted,
            "insertion_seconds": self.insertion_seconds,
            "grid": None if self.grid is None else self.grid.to_dict(),
        }

    def result(self, *, fill_holes: bool | None = None, consume: bool = False) -> ReconstructionResult:
        """The volume(s) so far.

        Parameters
        ----------
        fill_holes : bool, optional
            Override ``options.fill_holes`` (e.g. skip hole filling for live previews).
        consume : bool
            Compute the output in the accumulation buffers (no copy: less memory); the
            buffers are released and the reconstructor starts empty afterwards (a fixed grid
            is re-allocated on the next frame).

        Raises
        ------
        NoUsableFramesError
            No frame has been inserted yet.
        """
        start = time.perf_counter()
        opts = self.options
        if self.grid is None or self.frames_used == 0:
            reasons = dict(Counter(self.frames_skipped.values()))
            raise NoUsableFramesError(
                f"no usable frame: {self.frames_received} frame(s) offered, none inserted"
                + (f" (skipped: {', '.join(f'{v} {k}' for k, v in sorted(reasons.items()))})" if reasons else "")
            )
        acc, weight = self._acc, self._weight
        divide = self.mode in (MODE_MEAN, MODE_IMPORTANCE)
        n_known = int(np.count_nonzero(weight))
        # Output volumes, a plane at a time (no volume-sized float temporaries). For max /
        # latest of one channel the value buffer already is the output (holes hold 0).
        outs = []
        for c, dt in enumerate(self.channel_dtypes):
            if consume and not divide and self.mode != MODE_MEAN_PLUS and self.n_channels == 1 and acc.dtype == dt:
                outs.append(acc[..., 0])
            else:
                outs.append(_finish_channel(acc, weight, c, divide, np.dtype(dt)))
        stats = None
        hole_seconds = 0.0
        do_fill = opts.fill_holes if fill_holes is None else bool(fill_holes)
        if do_fill and opts.hole_filling:
            integer = all(d == np.uint8 for d in self.channel_dtypes)
            known = weight != 0
            if opts.emulate_plus:
                # PLUS fills every voxel whose accumulation buffer is 0 and writes 0 where no
                # element succeeds, also where a pixel with a tiny trilinear weight left a value.
                for o in outs:
                    o[~known] = 0
            for c, dt in enumerate(self.channel_dtypes):
                if np.dtype(dt) == np.uint8:
                    store = STORE_FLOOR if opts.emulate_plus else STORE_ROUND  # PLUS casts filled values
                else:
                    store = STORE_RAW
                if (opts.emulate_plus and native.available()
                        and native.supports_hole_filling(opts.hole_filling, divide=divide, values=acc,
                                                         out_dtype=outs[c].dtype)
                        and outs[c].flags.c_contiguous):
                    stats = native.fill_holes_native(outs[c], acc, c, known, opts.hole_filling, store=store,
                                                     n_threads=self.n_threads, emulate_plus=True,
                                                     integer_values=integer)
                    hole_seconds += stats.seconds
                    continue
                from .holefill import fill_holes_into  # numba kernels, imported only when holes are filled

                stats = fill_holes_into(
                    outs[c][..., None],
                    acc if self.n_channels == 1 else acc[..., c : c + 1],
                    known,
                    weight,
                    opts.hole_filling,
                    divide=divide,
                    # PLUS's GAUSSIAN_ACCUMULATION weighs by its raw accumulation buffer.
                    weight_scale=1.0 if opts.emulate_plus else (1.0 / 256.0 if self.mode == MODE_MEAN_PLUS else 1.0),
                    store=store,
                    n_threads=self.n_threads,
                    emulate_plus=opts.emulate_plus,
                    integer_values=integer,
                )
                hole_seconds += stats.seconds
            del known
            stats = dataclasses.replace(stats, seconds=hole_seconds)
        if consume:
            self._acc = None
            del acc  # the sums go before the coverage map is made (lower peak)
        coverage = _coverage(weight, self.mode, consume, opts.emulate_plus) if opts.output_weight else None
        result = self._make_result(outs, coverage, n_known, stats, self.insertion_seconds + (time.perf_counter() - start))
        if consume:
            del weight
            grid = self.grid
            self._acc = self._weight = None
            self.grid = None
            self.reset()
            if self.fixed_grid:
                self._pending_grid = grid
        return result

    def _reconstruct_in_slabs(self, frames4d, frame_ids, image_to_reference, indices, image_ok=None,
                              progress=None) -> ReconstructionResult:
        """Batch reconstruction into the fixed grid a slab of k-planes at a time (see :mod:`.slabs`).

        Same volumes, bit for bit, as inserting every frame and calling ``result()``, with
        accumulators for a slab instead of the whole grid. With several threads, each takes
        one run of planes (cut where the pixels split evenly) and goes through it slab by
        slab with its own buffers, so the workers never wait for each other. Numba engine,
        not PLUS emulation.
        """
        start = time.perf_counter()
        opts = self.options
        frame_ids = np.asarray(frame_ids, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        mats = np.asarray(image_to_reference, dtype=np.float64).reshape(-1, 4, 4)
        self.frames_received += frame_ids.size
        sel, mask_ids = self._admit(frames4d, frame_ids, mats, indices, image_ok)
        grid = self.grid = self._pending_grid
        nk, nj, ni = grid.shape
        vox = voxel_matrices(mats[sel], grid.reference_to_voxel)
        msel = mask_ids[sel]
        row_ranges = np.stack(self._ranges_list)
        acc_dtype, weight_dtype, limit = accumulator_types(self.mode, self.linear, self.dtype)
        if limit is not None and sel.size:
            kept = np.asarray(self._kept_pixels, dtype=np.int64)[msel]
            if int(pixels_per_voxel_bound(vox, kept).sum()) > limit:  # exact sums need float64
                acc_dtype = np.dtype(np.float64) if self.mode == MODE_MEAN else acc_dtype
                weight_dtype = np.dtype(np.float64)
        fill = bool(opts.fill_holes and opts.hole_filling)
        out_bytes = sum(np.dtype(d).itemsize for d in self.channel_dtypes)
        first, last = frame_plane_ranges(vox, self._corners_px)
        n_workers = max(1, min(self.n_threads, nk // 16))
        from .kernels import worker_planes  # numba: slab reconstruction only

        runs = [p[0] for p in worker_planes(vox, row_ranges, msel, nk, self.linear, n_workers) if len(p)]
        budget = slab_budget_bytes(nk * nj * ni * out_bytes) // len(runs)
        ctx = _SlabContext(
            frames4d=frames4d, frame_ids=frame_ids[sel], vox=vox, mask_ids=msel, row_ranges=row_ranges, first=first,
            last=last, outs=[np.empty(grid.shape, dtype=d) for d in self.channel_dtypes],
            coverage=np.empty(grid.shape, dtype=np.float32) if opts.output_weight else None,
            acc_dtype=acc_dtype, weight_dtype=weight_dtype, fill=fill,
            threads=self.n_threads if len(runs) == 1 else 1,
        )
        reach = hole_filling_reach(opts.hole_filling) if fill else 0
        plans = [
            plan_slabs(int(k1) - int(k0) + 1, nj * ni, self.n_channels * acc_dtype.itemsize + weight_dtype.itemsize
                       + (1 if fill else 0), out_bytes, linear=self.linear, reach=reach, budget_bytes=budget)
            for k0, k1 in runs
        ]
        pool = self._pool()
        jobs = [(int(k0), int(k1) + 1, plan) for (k0, k1), plan in zip(runs, plans)]
        if len(jobs) == 1:
            parts = [self._slab_run(ctx, *jobs[0], progress=progress, executor=pool)]
        else:
            futures = [pool.submit(self._slab_run, ctx, *job) for job in jobs[1:]]
            parts = [self._slab_run(ctx, *jobs[0], progress=progress)]  # this thread is one of the workers
            parts += [f.result() for f in futures]
        counts = np.sum([p.counts for p in parts], axis=0) if sel.size else np.zeros(0, dtype=np.int64)
        self.insertion_seconds += time.perf_counter() - start - max(p.hole_seconds for p in parts)
        self._count_used(sel, counts, mats, indices)
        stats = None
        if fill:
            filled = tuple(int(sum(p.filled[e] for p in parts)) for e in range(len(opts.hole_filling)))
            stats = HoleFillingStats(sum(p.holes for p in parts), filled, max(p.hole_seconds for p in parts))
        if progress is not None:
            progress(int(sel.size), int(sel.size))
        log.debug("batch reconstruction: %d run(s) of planes, %s slab(s)", len(jobs), [p.n_slabs for p in plans])
        return self._make_result(ctx.outs, ctx.coverage, sum(p.n_known for p in parts), stats,
                                 time.perf_counter() - start)

    def _slab_insert(self, ctx, acc, w, k_lo: int, k_hi: int, counts, threads: int, executor) -> None:
        """Insert every frame's pixels that land in planes ``k_lo .. k_hi - 1`` (held by ``acc`` / ``w``)."""
        opts = self.options
        take = np.flatnonzero((ctx.first <= k_hi - 1) & (ctx.last >= k_lo))
        for a in range(0, take.size, _BATCH):
            part = take[a : a + _BATCH]
            batch_frames, batch_ids = self._frames_of(ctx.frames4d, ctx.frame_ids[part])
            from .kernels import insert_frames  # numba: slab reconstruction only
            got = insert_frames(
                batch_frames, batch_ids, ctx.vox[part], ctx.row_ranges, ctx.mask_ids[part], acc, w,
                mode=self.mode, linear=self.linear, importance=self._importance,
                pixel_rejection_threshold=opts.pixel_rejection_threshold, n_threads=threads, executor=executor,
                k_base=k_lo, n_k_grid=self.grid.shape[0],
            )
            if counts is not None:
                counts[part] += got

    def _slab_run(self, ctx, run_start: int, run_stop: int, plan, progress=None, executor=None) -> "_SlabPart":
        """Planes ``run_start .. run_stop - 1``, slab by slab: insert, finish, fill holes.

        Hole filling reads ``plan.reach`` planes either side: those before the run (and, at
        its end, after it) are inserted too but neither counted nor written.
        """
        from .holefill import fill_holes_into  # numba: slab reconstruction only
        from .kernels import finish_channel_into

        opts = self.options
        nk, nj, ni = self.grid.shape
        reach = plan.reach
        pre = max(0, run_start - reach)
        post = min(nk, run_stop + reach)
        planes = plan.buffer_planes + (run_start - pre) + (post - run_stop)
        acc_buf = np.zeros((planes, nj, ni, self.n_channels), dtype=ctx.acc_dtype)
        w_buf = np.zeros((planes, nj, ni), dtype=ctx.weight_dtype)
        divide = self.mode in (MODE_MEAN, MODE_IMPORTANCE)
        store = [STORE_ROUND if np.dtype(d) == np.uint8 else STORE_RAW for d in self.channel_dtypes]
        integer = all(np.dtype(d) == np.uint8 for d in self.channel_dtypes)
        part = _SlabPart(np.zeros(ctx.frame_ids.size, dtype=np.int64), [0] * len(opts.hole_filling), plan.n_slabs)
        base = pre  # grid plane held in the buffers' plane 0
        if ctx.fill and pre < run_start:
            self._slab_insert(ctx, acc_buf[: run_start - pre], w_buf[: run_start - pre], pre, run_start, None,
                              ctx.threads, executor)
        for s in range(plan.n_slabs):
            k0, k1 = run_start + plan.edges[s], run_start + plan.edges[s + 1]
            lo, hi = k0 - base, k1 - base
            acc, w = acc_buf[lo:hi], w_buf[lo:hi]
            self._slab_insert(ctx, acc, w, k0, k1, part.counts, ctx.threads, executor)
            for c in range(self.n_channels):
                finish_channel_into(acc, w, c, divide, ctx.outs[c][k0:k1])
            if ctx.coverage is not None:
                ctx.coverage[k0:k1] = w
            part.n_known += int(np.count_nonzero(w))
            last = s == plan.n_slabs - 1
            if ctx.fill:
                held = hi
                if last and post > run_stop:
                    self._slab_insert(ctx, acc_buf[hi : hi + post - k1], w_buf[hi : hi + post - k1], k1, post, None,
                                      ctx.threads, executor)
                    held = hi + post - k1
                # The holes whose neighbours (reach planes either side) are all inserted by now.
                f0 = max(run_start, k0 - reach)
                f1 = run_stop if last else k1 - reach
                known = w_buf[:held] != 0
                for c in range(self.n_channels):
                    stats = fill_holes_into(
                        ctx.outs[c][base : base + held][..., None], acc_buf[:held][..., c : c + 1], known, w_buf[:held],
                        opts.hole_filling, divide=divide, store=store[c], n_threads=ctx.threads,
                        integer_values=integer, planes=(f0 - base, f1 - base),
                    )
                    if c == 0:  # the same holes in every channel
                        part.holes += stats.holes
                        part.filled = [x + y for x, y in zip(part.filled, stats.filled_per_element)]
                    part.hole_seconds += stats.seconds
            if not last:
                # Carry the last planes over (hole filling's neighbours) and clear the rest.
                new_base = max(pre, k1 - plan.keep)
                n_keep = k1 - new_base
                acc_buf[:n_keep] = acc_buf[new_base - base : hi]
                w_buf[:n_keep] = w_buf[new_base - base : hi]
                acc_buf[n_keep:] = 0
                w_buf[n_keep:] = 0
                base = new_base
            if progress is not None:
                n = ctx.frame_ids.size
                progress(int(round(n * (k1 - run_start) / max(1, run_stop - run_start))), int(n))
        return part

    def _make_result(self, outs, coverage, n_known: int, stats, seconds: float) -> ReconstructionResult:
        """The result from the output voxels, the coverage map (or None) and the hole filling stats."""
        n_total = self.grid.n_voxels
        n_filled = n_known + (stats.filled if stats is not None else 0)
        return ReconstructionResult(
            volumes=tuple(self._volume(out, {"Channel": name}) for out, name in zip(outs, self.channel_names)),
            channel_names=self.channel_names,
            weight=None if coverage is None else self._volume(coverage, {"Channel": "weight"}),
            grid=self.grid,
            frames_total=self.frames_received,
            frames_used=self.frames_used,
            frames_skipped=dict(self.frames_skipped),
            frames_dropped=self.frames_dropped,
            pixels_inserted=self.pixels_inserted,
            coverage_fraction=n_known / n_total,
            filled_fraction=n_filled / n_total,
            seconds=seconds,
            insertion_seconds=self.insertion_seconds,
            hole_filling_seconds=0.0 if stats is None else stats.seconds,
            hole_filling=stats,
            options=self.options,
        )

    def _volume(self, voxels: np.ndarray, metadata: dict) -> Volume:
        return Volume(
            voxels=voxels,
            spacing_mm=self.grid.spacing_mm,
            origin_mm=self.grid.origin_mm,
            directions=self.grid.directions,
            metadata=dict(metadata),
        )


# --------------------------------------------------------------------------------------------
# Batch reconstruction
# --------------------------------------------------------------------------------------------


def reconstruct_volume(
    sequence: TrackedSequence,
    transforms=None,
    options: ReconstructionOptions | None = None,
    *,
    importance_mask=None,
    extra_channels: Mapping | None = None,
    channel_names=None,
    progress=None,
) -> ReconstructionResult:
    """Reconstruct a volume from a tracked sequence (PLUS VolumeReconstructor semantics).

    Parameters
    ----------
    sequence : TrackedSequence
        Frames ``(n, rows, cols[, channels])`` uint8/float32 (MF) and per-frame transforms.
    transforms : None, (4, 4), mapping name -> (4, 4), or TransformRepository
        How to get ``options.image_to_reference_transform``: a 4x4 is ImageToProbe; a mapping
        adds fixed transforms (``PlusConfig.coordinate_definitions.repository_fixed()``).
    options : ReconstructionOptions, optional
    importance_mask : (rows, cols) array, optional
        Weights for ``importance_mask`` compounding (else ``options.importance_mask_file``).
    extra_channels : mapping name -> (n, rows, cols) array, optional
        More image channels on the same trajectory (e.g. photoacoustic beside ultrasound),
        reconstructed in the same pass into co-registered volumes.
    channel_names : sequence of str, optional
        Names of the sequence's own channels (default ``image`` / ``channel<i>``).
    progress : callable(done, total), optional
        Called after each batch of inserted frames.

    Returns
    -------
    ReconstructionResult

    Raises
    ------
    NoUsableFramesError
        No frame has a valid transform and an image.
    ReconstructionError
        The fixed ROI (``output_extent``) misses every frame.
    VolumeTooLargeError
        The grid exceeds ``options.memory_budget_bytes``.
    TransformError
        ImageToReference cannot be resolved (e.g. ImageToProbe missing).
    """
    start = time.perf_counter()
    opts = options if options is not None else ReconstructionOptions()
    if not isinstance(sequence, TrackedSequence):
        raise ReconstructionError(f"expected a TrackedSequence, got {type(sequence).__name__}")
    if sequence.n_frames == 0:
        raise NoUsableFramesError("the sequence has no frames")
    mats, valid = resolve_image_to_reference(sequence, transforms, opts.image_to_reference_transform)
    raw = _frames_view(sequence.frames)
    n_own = raw.shape[3]
    names = list(channel_names) if channel_names else (
        ["image"] if n_own == 1 else [f"channel{c}" for c in range(n_own)]
    )
    if len(names) != n_own:
        raise InvalidOptionError(f"channel_names: expected {n_own} names, got {names}")
    dtypes = [_channel_dtype(raw.dtype)] * n_own
    extras = []
    for name, arr in (extra_channels or {}).items():
        arr = _frames_view(arr)
        if arr.shape[:3] != raw.shape[:3]:
            raise ReconstructionError(
                f"extra channel {name!r}: shape {arr.shape[:3]} does not match the frames {raw.shape[:3]}"
            )
        extras.append(arr)
        names.extend([name] if arr.shape[3] == 1 else [f"{name}{c}" for c in range(arr.shape[3])])
        dtypes.extend([_channel_dtype(arr.dtype)] * arr.shape[3])
    common = np.dtype(np.uint8) if all(d == np.uint8 for d in dtypes) else np.dtype(np.float32)
    if not extras and raw.dtype == common and raw.flags.c_contiguous:
        frames4d = raw  # inserted in place, no copy
    else:
        frames4d = _batch_source(raw, extras, common)  # converted a batch at a time
    n_channels = len(dtypes)
    n = sequence.n_frames
    indices = np.arange(n)
    chosen = indices[:: opts.skip_interval]
    # Every frame not on the skip interval (not np.setdiff1d: it imports numpy.ma, ~15 ms of start-up).
    skipped: dict[int, str] = {int(i): "skip_interval" for i in indices if i % opts.skip_interval}
    usable = chosen[valid[chosen] & sequence.image_ok[chosen]]
    corners = None
    if opts.output_extent is None:
        if usable.size == 0:
            n_invalid = int(np.count_nonzero(~valid[chosen]))
            n_noimg = int(np.count_nonzero(~sequence.image_ok[chosen]))
            raise NoUsableFramesError(
                f"no usable frame among {chosen.size}: {n_invalid} with an invalid "
                f"{opts.image_to_reference_transform}, {n_noimg} without an image"
            )
        corners = frame_corners_reference(
            mats[usable],
            clipped_corners_px(sequence.n_rows, sequence.n_cols, opts.clip_rectangle_origin_px, opts.clip_rectangle_size_px),
        )
    out_itemsize = max(np.dtype(d).itemsize for d in dtypes)
    # The numba engine goes a slab of planes at a time (accumulators for a slab, not the
    # grid); the torch engine and PLUS emulation accumulate the whole grid.
    slabbed = not opts.emulate_plus and choose_engine(opts) == "numba"
    grid = grid_from_options(
        opts, corners, n_channels=n_channels, out_itemsize=out_itemsize, frame_dtype=common, slabbed=slabbed
    )
    log.info("reconstructing %d frames into %s", usable.size, grid)
    recon = IncrementalReconstructor(
        opts,
        image_shape=(sequence.n_rows, sequence.n_cols),
        n_channels=n_channels,
        dtype=common,
        grid=grid,
        importance_mask=importance_mask,
        channel_names=names,
        channel_dtypes=dtypes,
        allocate=not slabbed,
    )
    try:
        ok = sequence.image_ok[chosen]
        if slabbed:
            result = recon._reconstruct_in_slabs(frames4d, chosen, mats[chosen], chosen, ok, progress)
        else:
            recon._insert(frames4d, chosen, mats[chosen], chosen, ok, progress)
        recon.frames_received = n
        recon.frames_skipped.update(skipped)
        if recon.frames_used == 0:
            if opts.output_extent is not None and usable.size:
                raise ReconstructionError(
                    f"the ROI ({grid}) misses every frame: none of the {usable.size} usable frames "
                    "puts a pixel into it; check the ROI (--origin/--extent on the command line, output_origin_mm/"
                    "output_extent in Python) and the Reference frame"
                )
            reasons = dict(Counter(recon.frames_skipped.values()))
            raise NoUsableFramesError(
                f"no usable frame among {n}: " + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items()))
            )
        if slabbed:
            result = dataclasses.replace(
                result, frames_total=n, frames_skipped=dict(recon.frames_skipped)
            )
        else:
            result = recon.result(consume=True)
    finally:
        recon.close()
    return _with_seconds(result, time.perf_counter() - start)


def _with_seconds(result: ReconstructionResult, seconds: float) -> ReconstructionResult:
    return dataclasses.replace(result, seconds=seconds)


"""Compiled (numba) pixel-insertion kernels: nearest / linear x mean / max / latest / importance.

Forward reconstruction: every kept pixel ``(x, y)`` of frame ``f`` goes to the continuous voxel
index ``p = A_f @ (x, y, 1)`` (``A_f`` = rows i, j, k of ReferenceToVoxel @ ImageToReference,
columns x, y, translation) and is added to

- ``nearest``: voxel ``floor(p + 0.5)``;
- ``linear``: the 8 voxels around ``p`` with trilinear weights (zero weights are skipped,
  voxels outside the grid are dropped individually).

Accumulators (the kernels are compiled for each combination of types):

- ``acc`` ``(n_k, n_j, n_i, n_channels)``: weighted sums (``mean``, ``importance_mask``) or the
  current value (``max``, ``latest``);
- ``weight`` ``(n_k, n_j, n_i)``: summed weights (the coverage map). For ``max`` and
  ``latest`` with linear interpolation a pixel only acts on voxels where its trilinear weight is
  at least 1/8 (PLUS's rule), and only those count.

:func:`accumulator_types` picks the smallest types that keep the result exact (no saturating
16-bit counts as in PLUS):

=====================  ===========================  ============================  ==========================
case                   ``acc``                      ``weight``                    exact up to (per voxel)
=====================  ===========================  ============================  ==========================
nearest mean, uint8    uint32 (integer sums)        uint32 (pixel counts)         16,843,009 pixels
nearest mean, float32  float64                      uint32                        2**32 - 1 pixels
nearest max / latest   the frames' type (the value  uint32                        2**32 - 1 pixels
                       itself)
linear max / latest    the frames' type             float32 (sum of weights;      values exact; weights
                                                    coverage map only)            to float32 precision
linear mean,           float64                      float64                       float64 sums, as before
importance mask,
PLUS emulation
=====================  ===========================  ============================  ==========================

The bound for uint8 sums is ``(2**32 - 1) // 255 = 16,843,009`` contributions (255 times that
is exactly ``2**32 - 1``); float32 sums would be exact only to ``2**24 / 255 = 65,793``. The
caller keeps an upper bound of the largest count (:func:`pixels_per_voxel_bound`) and switches
to float64 (exact to 2**53) before an insertion could pass the limit
(:class:`~.reconstructor.IncrementalReconstructor` does).

Determinism: the volume is cut into slabs of ``slab`` k-planes dealt round-robin to
``n_groups`` workers; worker ``g`` walks all frames in order but touches only its own slabs
(the pixel range of each image row inside a slab is solved analytically, then checked per
pixel). Every voxel therefore sees its contributions in the same (frame, row, column) order
whatever the number of threads: multi-threaded results are bit-identical to single-threaded
ones, in every mode, for float data too.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

__all__ = [
    "accumulator_types",
    "pixels_per_voxel_bound",
    "SUM_LIMIT_UINT8",
    "COUNT_LIMIT",
    "MODE_MEAN",
    "MODE_MAX",
    "MODE_LATEST",
    "MODE_IMPORTANCE",
    "MODE_MEAN_PLUS",
    "MODE_CODES",
    "insert_frames",
    "default_threads",
    "voxel_matrices",
]

MODE_MEAN, MODE_MAX, MODE_LATEST, MODE_IMPORTANCE, MODE_MEAN_PLUS = 0, 1, 2, 3, 4
MODE_CODES = {"mean": MODE_MEAN, "max": MODE_MAX, "latest": MODE_LATEST, "importance_mask": MODE_IMPORTANCE}
#: PLUS's fixed point (14 fractional bits) used when emulating PLUS's arithmetic.
FIXED_POINT_SCALE = 16384.0
#: PLUS's 16-bit accumulation buffer: +256 per nearest-neighbour hit, saturating.
_PLUS_UNIT, _PLUS_THRESHOLD, _PLUS_MAXIMUM = 256.0, 65279.0, 65535.0
_MIN_LINEAR_WEIGHT = 0.125  # PLUS: max/latest act only on voxels with trilinear weight >= 1/8


#: Most uint8 values a uint32 sum holds exactly: 255 * 16,843,009 == 2**32 - 1.
SUM_LIMIT_UINT8 = (2**32 - 1) // 255
#: Most increments a uint32 count holds.
COUNT_LIMIT = 2**32 - 1


def accumulator_types(mode: int, linear: bool, frame_dtype, *, emulate_plus: bool = False):
    """The accumulator types for a reconstruction (see the module docstring's table).

    Parameters
    ----------
    mode : int
        ``MODE_*``.
    linear : bool
    frame_dtype : numpy dtype
        uint8 or float32 (the frames as inserted).
    emulate_plus : bool

    Returns
    -------
    acc_dtype, weight_dtype : numpy dtype
    limit : int or None
        The largest per-voxel pixel count for which these types are exact (``None``: no
        integer limit, float64 or float32 weights).
    """
    frame_dtype = np.dtype(frame_dtype)
    f64 = np.dtype(np.float64)
    if emulate_plus or mode in (MODE_IMPORTANCE, MODE_MEAN_PLUS):
        return f64, f64, None
    if mode == MODE_MEAN:
        if linear:
            return f64, f64, None
        if frame_dtype == np.uint8:
            return np.dtype(np.uint32), np.dtype(np.uint32), SUM_LIMIT_UINT8
        return f64, np.dtype(np.uint32), COUNT_LIMIT
    if linear:
        return frame_dtype, np.dtype(np.float32), None
    return frame_dtype, np.dtype(np.uint32), COUNT_LIMIT


def pixels_per_voxel_bound(matrices: np.ndarray, kept_pixels) -> np.ndarray:
    """An upper bound of the pixels each frame can put into one voxel (nearest interpolation).

    All pixels landing in one voxel lie within its unit cube of voxel indices, so any two are
    less than sqrt(3) apart there; with ``s`` the smaller singular value of the frame's
    pixel -> voxel-index map, their pixel coordinates differ by less than ``sqrt(3) / s`` in
    x and in y, which bounds the pixels to ``(floor(sqrt(3) / s) + 1) ** 2``.

    Parameters
    ----------
    matrices : (n, 3, 3) float64
        Pixel (x, y, 1) -> continuous voxel index (:func:`voxel_matrices`).
    kept_pixels : (n,) int
        Pixels each frame keeps (the bound never exceeds it).

    Returns
    -------
    (n,) int64
    """
    kept = np.asarray(kept_pixels, dtype=np.int64)
    m = np.asarray(matrices, dtype=np.float64)[:, :, :2]
    smallest = np.linalg.svd(m, compute_uv=False)[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        side = np.floor(math.sqrt(3.0) / smallest * (1.0 + 1e-9)) + 1.0
    side = np.where(np.isfinite(side), side, np.inf)
    per_voxel = np.minimum(side * side, kept.astype(np.float64))
    return np.where(np.isfinite(per_voxel), per_voxel, kept).astype(np.int64)


def default_threads() -> int:
    """Threads used when the options do not say: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (non-Linux)
        return max(1, os.cpu_count() or 1)


def voxel_matrices(image_to_reference: np.ndarray, reference_to_voxel: np.ndarray, *, fixed_point: bool = False) -> np.ndarray:
    """Per-frame ``(n, 3, 3)`` float64 pixel -> continuous voxel index maps (columns x, y, 1).

    With ``fixed_point`` the entries are rounded to multiples of 2**-14 as PLUS's optimized
    insertion does; positions ``o + y * a_y + x * a_x`` computed from them in float64 are then
    exactly PLUS's fixed-point positions.
    """
    m = reference_to_voxel[None] @ np.asarray(image_to_reference, dtype=np.float64)
    m = np.ascontiguousarray(m[:, :3][:, :, [0, 1, 3]])
    if fixed_point:
        m = np.round(m * FIXED_POINT_SCALE) / FIXED_POINT_SCALE
    return m


@njit(nogil=True, cache=True, inline="always")
def _rejected(frames, f, y, x, nc, reject):
    s = 0.0
    for c in range(nc):
        s += frames[f, y, x, c]
    return s < reject * nc


@njit(nogil=True, cache=True)
def _nearest_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                  klo, khi, mode, importance, use_reject, reject, int_out, fixed_point):
    """Insert pixels xa..xb (minus the skip segment s0..s1) of row y; return how many went in."""
    nk, nj, ni, nc = acc.shape
    inserted = 0
    for x in range(xa, xb + 1):
        if s0 <= x <= s1:
            continue
        kk = int(math.floor(bk + x * ak + 0.5))
        if kk < klo or kk > khi:
            continue
        ii = int(math.floor(bi + x * ai + 0.5))
        if ii < 0 or ii >= ni:
            continue
        jj = int(math.floor(bj + x * aj + 0.5))
        if jj < 0 or jj >= nj:
            continue
        if use_reject and _rejected(frames, f, y, x, nc, reject):
            continue
        if mode == MODE_MEAN:
            for c in range(nc):
                acc[kk, jj, ii, c] += frames[f, y, x, c]
            weight[kk, jj, ii] += 1
        elif mode == MODE_MAX:
            if weight[kk, jj, ii] == 0.0:
                for c in range(nc):
                    acc[kk, jj, ii, c] = frames[f, y, x, c]
            else:
                for c in range(nc):
                    v = frames[f, y, x, c]
                    if v > acc[kk, jj, ii, c]:
                        acc[kk, jj, ii, c] = v
            weight[kk, jj, ii] += 1
        elif mode == MODE_LATEST:
            for c in range(nc):
                acc[kk, jj, ii, c] = frames[f, y, x, c]
            weight[kk, jj, ii] += 1
        elif mode == MODE_MEAN_PLUS:
            # PLUS: running mean truncated to the output type, 16-bit saturating weight.
            a = weight[kk, jj, ii]
            if a <= _PLUS_THRESHOLD:
                newa = a + _PLUS_UNIT
                for c in range(nc):
                    v = (frames[f, y, x, c] * _PLUS_UNIT + acc[kk, jj, ii, c] * a) / newa
                    acc[kk, jj, ii, c] = math.floor(v) if int_out else v
                weight[kk, jj, ii] = min(newa, _PLUS_MAXIMUM)
            else:
                v = 0.99609375 * frames[f, y, x, 0] + 0.00390625 * acc[kk, jj, ii, 0]
                acc[kk, jj, ii, 0] = math.floor(v) if int_out else v
        else:
            w = np.float64(importance[y, x])
            if w <= 0.0:
                continue
            for c in range(nc):
                acc[kk, jj, ii, c] += w * frames[f, y, x, c]
            weight[kk, jj, ii] += w
        inserted += 1
    return inserted


@njit(nogil=True, cache=True, inline="always")
def _fixed_mul(a, b):
    """PLUS fixed-point product: rounded to 2**-14."""
    return math.floor(a * b * FIXED_POINT_SCALE + 0.5) / FIXED_POINT_SCALE


@njit(nogil=True, cache=True)
def _linear_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                 klo, khi, mode, importance, use_reject, reject, int_out, fixed_point):
    """Trilinear splat of pixels xa..xb of row y; return how many pixels this worker counts."""
    nk, nj, ni, nc = acc.shape
    inserted = 0
    wbuf = np.empty(8)
    for x in range(xa, xb + 1):
        if s0 <= x <= s1:
            continue
        fk = bk + x * ak
        k0 = int(math.floor(fk))
        if k0 < klo - 1 or k0 > khi:
            continue
        fi = bi + x * ai
        fj = bj + x * aj
        i0 = int(math.floor(fi))
        j0 = int(math.floor(fj))
        if i0 < -1 or i0 >= ni or j0 < -1 or j0 >= nj or k0 < -1 or k0 >= nk:
            continue
        if fixed_point:
            # PLUS drops a pixel unless all of its (non-degenerate) corners are in the volume.
            if i0 < 0 or j0 < 0 or k0 < 0:
                continue
            if i0 + (1 if fi != i0 else 0) >= ni or j0 + (1 if fj != j0 else 0) >= nj or k0 + (1 if fk != k0 else 0) >= nk:
                continue
        if use_reject and _rejected(frames, f, y, x, nc, reject):
            continue
        scale = 1.0
        if mode == MODE_IMPORTANCE:
            scale = np.float64(importance[y, x])
            if scale <= 0.0:
                continue
        tx = fi - i0
        ty = fj - j0
        tz = fk - k0
        if (
            not fixed_point
            and i0 >= 0 and i0 + 1 < ni and j0 >= 0 and j0 + 1 < nj and k0 >= klo and k0 + 1 <= khi
        ):
            # Fast path: all 8 neighbours inside this worker's part of the volume. Same
            # arithmetic per voxel as the general path below (w = (wx * (wy * wz)) * scale,
            # acc += w * v; a zero weight changes nothing), so results do not depend on which
            # path is taken, hence not on the number of workers.
            sx = 1.0 - tx
            sy = 1.0 - ty
            sz = 1.0 - tz
            q00 = sy * sz
            q10 = ty * sz
            q01 = sy * tz
            q11 = ty * tz
            w0 = (sx * q00) * scale
            w1 = (tx * q00) * scale
            w2 = (sx * q10) * scale
            w3 = (tx * q10) * scale
            w4 = (sx * q01) * scale
            w5 = (tx * q01) * scale
            w6 = (sx * q11) * scale
            w7 = (tx * q11) * scale
            if mode == MODE_MEAN or mode == MODE_IMPORTANCE:
                for c in range(nc):
                    v = frames[f, y, x, c]
                    acc[k0, j0, i0, c] += w0 * v
                    acc[k0, j0, i0 + 1, c] += w1 * v
                    acc[k0, j0 + 1, i0, c] += w2 * v
                    acc[k0, j0 + 1, i0 + 1, c] += w3 * v
                    acc[k0 + 1, j0, i0, c] += w4 * v
                    acc[k0 + 1, j0, i0 + 1, c] += w5 * v
                    acc[k0 + 1, j0 + 1, i0, c] += w6 * v
                    acc[k0 + 1, j0 + 1, i0 + 1, c] += w7 * v
                weight[k0, j0, i0] += w0
                weight[k0, j0, i0 + 1] += w1
                weight[k0, j0 + 1, i0] += w2
                weight[k0, j0 + 1, i0 + 1] += w3
                weight[k0 + 1, j0, i0] += w4
                weight[k0 + 1, j0, i0 + 1] += w5
                weight[k0 + 1, j0 + 1, i0] += w6
                weight[k0 + 1, j0 + 1, i0 + 1] += w7
                inserted += 1  # all 8 neighbours are this worker's: it owns the pixel
            else:
                # max / latest: only voxels with weight >= 1/8.
                wbuf[0], wbuf[1], wbuf[2], wbuf[3] = w0, w1, w2, w3
                wbuf[4], wbuf[5], wbuf[6], wbuf[7] = w4, w5, w6, w7
                for q in range(8):
                    wq = wbuf[q]
                    if wq < _MIN_LINEAR_WEIGHT:
                        continue
                    kk = k0 + (q >> 2)
                    jj = j0 + ((q >> 1) & 1)
                    ii = i0 + (q & 1)
                    if mode == MODE_LATEST or weight[kk, jj, ii] == 0.0:
                        for c in range(nc):
                            acc[kk, jj, ii, c] = frames[f, y, x, c]
                    else:
                        for c in range(nc):
                            v = frames[f, y, x, c]
                            if v > acc[kk, jj, ii, c]:
                                acc[kk, jj, ii, c] = v
                    weight[kk, jj, ii] += wq
                inserted += 1  # the largest of 8 trilinear weights is >= 1/8
            continue
        # General path (volume border, slab border, PLUS emulation). A pixel is counted by
        # the worker owning the plane of its first usable neighbour (in corner order), which
        # every worker can tell, so each pixel is counted exactly once.
        first_plane = -1
        for dk in range(2):
            kk = k0 + dk
            if kk < 0 or kk >= nk:
                continue
            wz = tz if dk == 1 else 1.0 - tz
            if wz == 0.0:
                continue
            for dj in range(2):
                jj = j0 + dj
                if jj < 0 or jj >= nj:
                    continue
                wy = ty if dj == 1 else 1.0 - ty
                if wy == 0.0:
                    continue
                for di in range(2):
                    ii = i0 + di
                    if ii < 0 or ii >= ni:
                        continue
                    wx = tx if di == 1 else 1.0 - tx
                    if wx == 0.0:
                        continue
                    if fixed_point:
                        w = _fixed_mul(wx, _fixed_mul(wy, wz))
                        if w == 0.0:
                            continue
                    else:
                        w = wx * (wy * wz)
                    mean_like = mode == MODE_MEAN or mode == MODE_IMPORTANCE or mode == MODE_MEAN_PLUS
                    if not mean_like and w < _MIN_LINEAR_WEIGHT:
                        continue
                    if first_plane < 0:
                        first_plane = kk
                    if kk < klo or kk > khi:
                        continue
                    if mean_like:
                        w = w * scale
                        for c in range(nc):
                            acc[kk, jj, ii, c] += w * frames[f, y, x, c]
                        weight[kk, jj, ii] += w
                    else:
                        if mode == MODE_LATEST or weight[kk, jj, ii] == 0.0:
                            for c in range(nc):
                                acc[kk, jj, ii, c] = frames[f, y, x, c]
                        else:
                            for c in range(nc):
                                v = frames[f, y, x, c]
                                if v > acc[kk, jj, ii, c]:
                                    acc[kk, jj, ii, c] = v
                        weight[kk, jj, ii] += w
        if klo <= first_plane <= khi:
            inserted += 1
    return inserted


@njit(nogil=True, cache=True)
def _frame_spans(mats, n, rr, nk, linear, n_groups, group, slab, spans):
    """The (row, first pixel, last pixel, first plane, last plane) pieces of frame ``n`` for one worker.

    One piece per image row when a single worker owns the volume; otherwise one per slab of
    this worker that the row crosses (the pixel range inside a slab is solved analytically,
    with a margin; the span functions check each pixel). Returns how many pieces.
    """
    n_rows = rr.shape[0]
    n_slabs = (nk + slab - 1) // slab
    pad = 1.0 if linear else 0.5
    ak = mats[n, 2, 0]
    m = 0
    for y in range(n_rows):
        x0 = rr[y, 0]
        x1 = rr[y, 1]
        if x1 < x0:
            continue
        if n_groups == 1:
            spans[m, 0], spans[m, 1], spans[m, 2], spans[m, 3], spans[m, 4] = y, x0, x1, 0, nk - 1
            m += 1
            continue
        bk = mats[n, 2, 2] + y * mats[n, 2, 1]
        ka = bk + x0 * ak
        kb = bk + x1 * ak
        kmin = min(ka, kb) - pad
        kmax = max(ka, kb) + pad
        if kmax < 0.0 or kmin > nk:
            continue
        first = max(0, int(math.floor(kmin)) // slab)
        last = min(n_slabs - 1, int(math.floor(kmax)) // slab)
        s = first + ((group - first) % n_groups)
        while s <= last:
            klo = s * slab
            khi = min(nk - 1, klo + slab - 1)
            xa, xb = x0, x1
            if ak != 0.0:
                t0 = (klo - pad - bk) / ak
                t1 = (khi + pad - bk) / ak
                if t0 > t1:
                    t0, t1 = t1, t0
                t0 = max(t0, x0 - 2.0)
                t1 = min(t1, x1 + 2.0)
                xa = max(x0, int(math.floor(t0)) - 1)
                xb = min(x1, int(math.ceil(t1)) + 1)
            if xa <= xb:
                spans[m, 0], spans[m, 1], spans[m, 2], spans[m, 3], spans[m, 4] = y, xa, xb, klo, khi
                m += 1
            s += n_groups
    return m


@njit(nogil=True, cache=True)
def _insert_nearest(frames, frame_ids, mats, ranges, mask_ids, importance, use_reject, reject,
                    mode, int_out, fixed_point, acc, weight, counts, n_groups, group, slab, spans):
    """Nearest-neighbour insertion of ``frames[frame_ids]`` into this worker's slabs."""
    nk = acc.shape[0]
    for n in range(frame_ids.shape[0]):
        f = frame_ids[n]
        rr = ranges[mask_ids[n]]
        m = _frame_spans(mats, n, rr, nk, False, n_groups, group, slab, spans)
        total = 0
        for q in range(m):
            y = spans[q, 0]
            bi = mats[n, 0, 2] + y * mats[n, 0, 1]
            bj = mats[n, 1, 2] + y * mats[n, 1, 1]
            bk = mats[n, 2, 2] + y * mats[n, 2, 1]
            total += _nearest_span(frames, f, y, spans[q, 1], spans[q, 2], rr[y, 2], rr[y, 3], bi, bj, bk,
                                   mats[n, 0, 0], mats[n, 1, 0], mats[n, 2, 0], acc, weight, spans[q, 3],
                                   spans[q, 4], mode, importance, use_reject, reject, int_out, fixed_point)
        counts[n] += total


@njit(nogil=True, cache=True)
def _insert_linear(frames, frame_ids, mats, ranges, mask_ids, importance, use_reject, reject,
                   mode, int_out, fixed_point, acc, weight, counts, n_groups, group, slab, spans):
    """Trilinear insertion of ``frames[frame_ids]`` into this worker's slabs."""
    nk = acc.shape[0]
    for n in range(frame_ids.shape[0]):
        f = frame_ids[n]
        rr = ranges[mask_ids[n]]
        m = _frame_spans(mats, n, rr, nk, True, n_groups, group, slab, spans)
        total = 0
        for q in range(m):
            y = spans[q, 0]
            bi = mats[n, 0, 2] + y * mats[n, 0, 1]
            bj = mats[n, 1, 2] + y * mats[n, 1, 1]
            bk = mats[n, 2, 2] + y * mats[n, 2, 1]
            total += _linear_span(frames, f, y, spans[q, 1], spans[q, 2], rr[y, 2], rr[y, 3], bi, bj, bk,
                                  mats[n, 0, 0], mats[n, 1, 0], mats[n, 2, 0], acc, weight, spans[q, 3],
                                  spans[q, 4], mode, importance, use_reject, reject, int_out, fixed_point)
        counts[n] += total


def insert_frames(
    frames: np.ndarray,
    frame_ids: np.ndarray,
    matrices: np.ndarray,
    row_ranges: np.ndarray,
    mask_ids: np.ndarray,
    acc: np.ndarray,
    weight: np.ndarray,
    *,
    mode: int = MODE_MEAN,
    linear: bool = False,
    importance: np.ndarray | None = None,
    pixel_rejection_threshold: float | None = None,
    n_threads: int = 1,
    executor: ThreadPoolExecutor | None = None,
    slab: int | None = None,
    fixed_point: bool = False,
) -> np.ndarray:
    """Insert frames into the accumulators (in place) and count the pixels each frame added.

    Parameters
    ----------
    frames : (n_all, n_rows, n_cols, n_channels) uint8 or float32, C-contiguous
    frame_ids : (n,) int64
        Which frames to insert, in this order.
    matrices : (n, 3, 3) float64
        Pixel (x, y, 1) -> continuous voxel index (i, j, k) for each inserted frame.
    row_ranges : (n_masks, n_rows, 4) int32
        Kept pixels per row (see :mod:`.masks`).
    mask_ids : (n,) int64
        Which ``row_ranges`` entry each inserted frame uses.
    acc : (n_k, n_j, n_i, n_channels), C-contiguous
        float64, or the compact types of :func:`accumulator_types` (the caller keeps the
        counts within their limit).
    weight : (n_k, n_j, n_i), C-contiguous
        float64, uint32 or float32 (see :func:`accumulator_types`).
    mode : int
        ``MODE_MEAN``, ``MODE_MAX``, ``MODE_LATEST``, ``MODE_IMPORTANCE`` or
        ``MODE_MEAN_PLUS`` (PLUS's truncating running mean; nearest interpolation only).
    linear : bool
        Trilinear splat instead of nearest voxel.
    importance : (n_rows, n_cols) float32 or None
        Per-pixel weights for ``MODE_IMPORTANCE``.
    pixel_rejection_threshold : float or None
    n_threads : int
        Workers; the result does not depend on it.
    executor : ThreadPoolExecutor or None
        Reused for the workers when given (live reconstruction); else one is made per call.
    slab : int, optional
        k-planes per slab when several workers share the volume (default: 4-16 planes,
        at least 8 for linear interpolation).
    fixed_point : bool
        Emulate PLUS's fixed-point trilinear weights and its all-corners-inside rule (the
        matrices must then come from ``voxel_matrices(..., fixed_point=True)``).

    Returns
    -------
    (n,) int64 : pixels inserted per frame.
    """
    frame_ids = np.ascontiguousarray(frame_ids, dtype=np.int64)
    mask_ids = np.ascontiguousarray(mask_ids, dtype=np.int64)
    matrices = np.ascontiguousarray(matrices, dtype=np.float64)
    row_ranges = np.ascontiguousarray(row_ranges, dtype=np.int32)
    if importance is None:
        importance = np.ones((1, 1), dtype=np.float32)
    importance = np.ascontiguousarray(importance, dtype=np.float32)
    use_reject = pixel_rejection_threshold is not None
    reject = float(pixel_rejection_threshold) if use_reject else 0.0
    n = frame_ids.shape[0]
    nk = acc.shape[0]
    if slab is None:
        slab = max(8 if linear else 4, min(16, nk // (4 * max(1, int(n_threads)))))
    groups = max(1, min(int(n_threads), (nk + slab - 1) // slab))
    counts = np.zeros((groups, n), dtype=np.int64)
    if n == 0:
        return counts.sum(axis=0)
    int_out = frames.dtype == np.uint8
    worker = _insert_linear if linear else _insert_nearest
    args = (frames, frame_ids, matrices, row_ranges, mask_ids, importance, use_reject, reject, int(mode),
            bool(int_out), bool(fixed_point), acc, weight)
    n_rows = frames.shape[1]
    if groups == 1:
        worker(*args, counts[0], 1, 0, nk, np.empty((n_rows, 5), dtype=np.int64))
        return counts[0]
    pieces = n_rows * (((nk + slab - 1) // slab) // groups + 2)  # a row crosses each of the worker's slabs at most once
    own = executor is None
    pool = ThreadPoolExecutor(max_workers=groups) if own else executor
    try:
        futures = [
            pool.submit(worker, *args, counts[g], groups, g, slab, np.empty((pieces, 5), dtype=np.int64))
            for g in range(groups)
        ]
        for fut in futures:
            fut.result()
    finally:
        if own:
            pool.shutdown(wait=True)
    return counts.sum(axis=0)

"""Compiled (numba) pixel-insertion kernels: nearest / linear x mean / max / latest / importance.

Forward reconstruction: every kept pixel ``(x, y)`` of frame ``f`` goes to the continuous voxel
index ``p = A_f @ (x, y, 1)`` (``A_f`` = rows i, j, k of ReferenceToVoxel @ ImageToReference,
columns x, y, translation) and is added to

- ``nearest``: voxel ``floor(p + 0.5)``;
- ``linear``: the 8 voxels around ``p`` with trilinear weights (zero weights are skipped,
  voxels outside the grid are dropped individually).

Accumulators (exact for any number of frames; no saturating 16-bit counts as in PLUS):

- ``acc`` ``(n_k, n_j, n_i, n_channels)`` float64: weighted sums (``mean``, ``importance_mask``)
  or the current value (``max``, ``latest``);
- ``weight`` ``(n_k, n_j, n_i)`` float64: summed weights (the coverage map). For ``max`` and
  ``latest`` with linear interpolation a pixel only acts on voxels where its trilinear weight is
  at least 1/8 (PLUS's rule), and only those count.

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
                  klo, khi, mode, importance, use_reject, reject, int_out):
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
            weight[kk, jj, ii] += 1.0
        elif mode == MODE_MAX:
            if weight[kk, jj, ii] == 0.0:
                for c in range(nc):
                    acc[kk, jj, ii, c] = frames[f, y, x, c]
            else:
                for c in range(nc):
                    v = frames[f, y, x, c]
                    if v > acc[kk, jj, ii, c]:
                        acc[kk, jj, ii, c] = v
            weight[kk, jj, ii] += 1.0
        elif mode == MODE_LATEST:
            for c in range(nc):
                acc[kk, jj, ii, c] = frames[f, y, x, c]
            weight[kk, jj, ii] += 1.0
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


@njit(nogil=True, cache=True, inline="always")
def _span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight, klo, khi, mode, linear,
          importance, use_reject, reject, int_out, fixed_point):
    if linear:
        return _linear_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                            klo, khi, mode, importance, use_reject, reject, int_out, fixed_point)
    return _nearest_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                         klo, khi, mode, importance, use_reject, reject, int_out)


@njit(nogil=True, cache=True)
def _insert_worker(frames, frame_ids, mats, ranges, mask_ids, importance, use_reject, reject,
                   mode, linear, int_out, fixed_point, acc, weight, counts, n_groups, group, slab):
    """Insert ``frames[frame_ids]`` touching only this worker's slabs (see module docstring)."""
    nk = acc.shape[0]
    nc = acc.shape[3]
    n_rows = frames.shape[1]
    n_slabs = (nk + slab - 1) // slab

    lo_pad = 1.0 if linear else 0.5
    hi_pad = 1.0 if linear else 0.5
    for n in range(frame_ids.shape[0]):
        f = frame_ids[n]
        ai, aj, ak = mats[n, 0, 0], mats[n, 1, 0], mats[n, 2, 0]
        rr = ranges[mask_ids[n]]
        total = 0
        for y in range(n_rows):
            x0 = rr[y, 0]
            x1 = rr[y, 1]
            if x1 < x0:
                continue
            s0 = rr[y, 2]
            s1 = rr[y, 3]
            bi = mats[n, 0, 2] + y * mats[n, 0, 1]
            bj = mats[n, 1, 2] + y * mats[n, 1, 1]
            bk = mats[n, 2, 2] + y * mats[n, 2, 1]
            if n_groups == 1:
                total += _span(frames, f, y, x0, x1, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight, 0, nk - 1,
                               mode, linear, importance, use_reject, reject, int_out, fixed_point)
                continue
            ka = bk + x0 * ak
            kb = bk + x1 * ak
            kmin = min(ka, kb) - lo_pad
            kmax = max(ka, kb) + hi_pad
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
                    t0 = (klo - lo_pad - bk) / ak
                    t1 = (khi + hi_pad - bk) / ak
                    if t0 > t1:
                        t0, t1 = t1, t0
                    t0 = max(t0, x0 - 2.0)
                    t1 = min(t1, x1 + 2.0)
                    xa = max(x0, int(math.floor(t0)) - 1)
                    xb = min(x1, int(math.ceil(t1)) + 1)
                if xa <= xb:
                    total += _span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight, klo, khi,
                                   mode, linear, importance, use_reject, reject, int_out, fixed_point)
                s += n_groups
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
    acc : (n_k, n_j, n_i, n_channels) float64, C-contiguous
    weight : (n_k, n_j, n_i) float64, C-contiguous
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
    args = (frames, frame_ids, matrices, row_ranges, mask_ids, importance, use_reject, reject, int(mode),
            bool(linear), bool(int_out), bool(fixed_point), acc, weight)
    if groups == 1:
        _insert_worker(*args, counts[0], 1, 0, nk)
        return counts[0]
    own = executor is None
    pool = ThreadPoolExecutor(max_workers=groups) if own else executor
    try:
        futures = [pool.submit(_insert_worker, *args, counts[g], groups, g, slab) for g in range(groups)]
        for fut in futures:
            fut.result()
    finally:
        if own:
            pool.shutdown(wait=True)
    return counts.sum(axis=0)

"""PLUS's insertion, emulated: one read-modify-write per pixel and voxel (numba).

The per-pixel kernels :func:`.kernels.insert_frames` takes for PLUS emulation (fixed-point
trilinear weights and positions, PLUS's saturating 16-bit accumulation buffer and truncating
running mean ``MODE_MEAN_PLUS``, ``Optimization="FULL"``: :func:`insert_per_pixel`; PLUS's
unoptimized float64 insertion, ``Optimization="NONE"``: :func:`insert_unoptimized`) and for
accumulators that are not C-contiguous. Same geometry, threading and determinism as
:mod:`.kernels` (each worker owns slabs of k-planes and walks all frames in order); the
run-based kernels there are bit-identical to the plain per-pixel ones here
(:func:`_nearest_span`, :func:`_linear_span`).

The fixed-point kernels here (nearest / linear, mean / max / latest) exist a second time in C
(``native/plus_insert.c``, :mod:`.native`), which runs them when it is built: a change to the
arithmetic here must be made there too (``Testing/reconstruction/test_recon_native.py`` compares
the two on random batches and fails otherwise).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .kernels_common import (
    FIXED_POINT_SCALE,
    MODE_IMPORTANCE,
    MODE_LATEST,
    MODE_MAX,
    MODE_MEAN,
    MODE_MEAN_PLUS,
    _MIN_LINEAR_WEIGHT,
    _PLUS_MAXIMUM,
    _PLUS_THRESHOLD,
    _PLUS_UNIT,
    run_workers,
)

__all__ = ["insert_per_pixel", "insert_unoptimized"]


@njit(nogil=True, cache=True, inline="always")
def _rejected(frames, f, y, x, nc, reject):
    s = 0.0
    for c in range(nc):
        s += frames[f, y, x, c]
    return s < reject * nc


@njit(nogil=True, cache=True, inline="always")
def _nearest_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, int_out):
    """PLUS's nearest-neighbour MEAN update of one voxel (optimized and unoptimized paths alike).

    Below saturation, the running mean ``(256 new + buffer old) / (buffer + 256)`` truncated to
    the output type and the 16-bit buffer 256 more; once the buffer passes 65279, PLUS's
    recursive filter new/256 + old*255/256, truncated, on the first channel only (as PLUS).
    """
    a = weight[kk, jj, ii]
    if a <= _PLUS_THRESHOLD:
        newa = a + _PLUS_UNIT
        for c in range(acc.shape[3]):
            v = (frames[f, y, x, c] * _PLUS_UNIT + acc[kk, jj, ii, c] * a) / newa
            acc[kk, jj, ii, c] = math.floor(v) if int_out else v
        weight[kk, jj, ii] = min(newa, _PLUS_MAXIMUM)
    else:
        v = frames[f, y, x, 0] * 0.00390625 + acc[kk, jj, ii, 0] * 0.99609375
        acc[kk, jj, ii, 0] = math.floor(v) if int_out else v


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
            _nearest_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, int_out)
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


#: 1.5 * 2**38: adding it to a double rounds it to a multiple of 2**-14 (ties to even), PLUS's
#: double -> fixed conversion (``fixed::from_float``).
_FIXED_MAGIC = 412316860416.0


@njit(nogil=True, cache=True, inline="always")
def _linear_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, w, int_out):
    """PLUS's trilinear MEAN update of one voxel, in its 14-bit fixed point (``Optimization="FULL"``).

    ``w`` is the pixel's fixed-point trilinear weight for this voxel (a multiple of 2**-14 in
    (0, 1]); ``weight`` holds PLUS's 16-bit accumulation buffer (256 per unit weight, rounded
    to an integer, saturating at 65535). With ``r = buffer / 256`` (exactly representable in
    fixed point) and ``a = w + r``, the voxel becomes ``round((w * new + r * old) / a)``, the
    quotient first converted to fixed point (``double(x) / y`` rounded to 2**-14, ties to even)
    and then rounded half up to the output type; the buffer becomes ``round(256 a)``, or 65535
    once that reaches 65535. All products are exact integers here (below 2**31, as in PLUS's
    32-bit fixed point).
    """
    wi = w * FIXED_POINT_SCALE  # integer-valued: the weight in units of 2**-14
    ri = weight[kk, jj, ii] * 64.0  # buffer / 256 in units of 2**-14
    ai = wi + ri
    for c in range(acc.shape[3]):
        num = wi * frames[f, y, x, c] + ri * acc[kk, jj, ii, c]
        q = ((num / ai) + _FIXED_MAGIC) - _FIXED_MAGIC  # fixed::divide: rounded to 2**-14
        acc[kk, jj, ii, c] = math.floor(q + 0.5) if int_out else q
    newa = ai * 256.0  # a *= 256, still in units of 2**-14
    if newa < _PLUS_MAXIMUM * FIXED_POINT_SCALE:
        weight[kk, jj, ii] = math.floor(newa / FIXED_POINT_SCALE + 0.5)
    else:
        weight[kk, jj, ii] = _PLUS_MAXIMUM


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
                    if mode == MODE_MEAN_PLUS:
                        _linear_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, w, int_out)
                    elif mean_like:
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


#: 1.5 * 2**36 and that + 0.5: PLUS's fast floor and round (``igsioMath::Floor`` / ``Round``)
#: add these and truncate, so the value is first rounded to a multiple of 2**-16.
_FAST_FLOOR_SHIFT = 103079215104.0
_FAST_ROUND_SHIFT = 103079215104.5


@njit(nogil=True, cache=True, inline="always")
def _plus_fast_floor(x):
    return int(x + _FAST_FLOOR_SHIFT) - 103079215104


@njit(nogil=True, cache=True, inline="always")
def _plus_fast_round(x):
    return int(x + _FAST_ROUND_SHIFT) - 103079215104


@njit(nogil=True, cache=True)
def insert_unoptimized(frames, frame_ids, mats, ranges, mask_ids, use_reject, reject, mode, linear, int_out,
                       acc, weight, counts):
    """PLUS's unoptimized insertion (``Optimization="NONE"``): float64, one pixel at a time.

    Each kept pixel (x, y) goes to ``p = (m0 x + m1 y) + m2`` (float64, PLUS's order); the
    nearest voxel is PLUS's fast round of ``p``, the trilinear cell its fast floor (the fraction
    ``p - floor`` may then be slightly negative, as in PLUS). The 16-bit accumulation buffer
    (``weight``) follows PLUS: nearest mean as ``MODE_MEAN_PLUS``, nearest max / latest add 256
    per hit (saturating at 65535), trilinear modes as in :func:`_linear_mean_plus` but in
    float64. Single-threaded (PLUS's single-thread answer).
    """
    nk, nj, ni, nc = acc.shape
    for n in range(frame_ids.shape[0]):
        f = frame_ids[n]
        rr = ranges[mask_ids[n]]
        total = 0
        for y in range(rr.shape[0]):
            for x in range(rr[y, 0], rr[y, 1] + 1):
                if rr[y, 2] <= x <= rr[y, 3]:
                    continue
                if use_reject and _rejected(frames, f, y, x, nc, reject):
                    continue
                p0 = (mats[n, 0, 0] * x + mats[n, 0, 1] * y) + mats[n, 0, 2]
                p1 = (mats[n, 1, 0] * x + mats[n, 1, 1] * y) + mats[n, 1, 2]
                p2 = (mats[n, 2, 0] * x + mats[n, 2, 1] * y) + mats[n, 2, 2]
                if not linear:
                    ii = _plus_fast_round(p0)
                    jj = _plus_fast_round(p1)
                    kk = _plus_fast_round(p2)
                    if ii < 0 or ii >= ni or jj < 0 or jj >= nj or kk < 0 or kk >= nk:
                        continue
                    if mode == MODE_MEAN_PLUS:
                        _nearest_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, int_out)
                    else:
                        for c in range(nc):
                            v = frames[f, y, x, c]
                            if mode == MODE_LATEST or v > acc[kk, jj, ii, c]:
                                acc[kk, jj, ii, c] = v
                        weight[kk, jj, ii] = min(weight[kk, jj, ii] + _PLUS_UNIT, _PLUS_MAXIMUM)
                    total += 1
                    continue
                i0 = _plus_fast_floor(p0)
                j0 = _plus_fast_floor(p1)
                k0 = _plus_fast_floor(p2)
                fx = p0 - i0
                fy = p1 - j0
                fz = p2 - k0
                i1 = i0 + (1 if fx != 0.0 else 0)
                j1 = j0 + (1 if fy != 0.0 else 0)
                k1 = k0 + (1 if fz != 0.0 else 0)
                if i0 < 0 or j0 < 0 or k0 < 0 or i1 >= ni or j1 >= nj or k1 >= nk:
                    continue
                rx = 1.0 - fx
                ry = 1.0 - fy
                rz = 1.0 - fz
                for q in range(7, -1, -1):  # PLUS's corner order (the corners are distinct voxels)
                    wyz = (fy if (q >> 1) & 1 else ry) * (fz if q & 1 else rz)
                    w = (fx if q >> 2 else rx) * wyz
                    if w == 0.0:
                        continue
                    ii = i1 if q >> 2 else i0
                    jj = j1 if (q >> 1) & 1 else j0
                    kk = k1 if q & 1 else k0
                    a = weight[kk, jj, ii]
                    if mode == MODE_MEAN_PLUS:
                        r = a / _PLUS_UNIT
                        s = w + r
                        for c in range(nc):
                            v = (w * frames[f, y, x, c] + r * acc[kk, jj, ii, c]) / s
                            acc[kk, jj, ii, c] = (_plus_fast_round(v) % 256) if int_out else v
                        a = s * _PLUS_UNIT
                    elif w >= _MIN_LINEAR_WEIGHT:
                        for c in range(nc):
                            v = frames[f, y, x, c]
                            if mode == MODE_LATEST or v > acc[kk, jj, ii, c]:
                                acc[kk, jj, ii, c] = v
                                a = w * _PLUS_UNIT
                    weight[kk, jj, ii] = _PLUS_MAXIMUM if a >= _PLUS_MAXIMUM else (_plus_fast_round(a) % 65536)
                total += 1
        counts[n] += total


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


@njit(nogil=True, cache=True, inline="always")
def _fixed_x_range(b_q, a_q, lo, hi, xa, xb):
    """The pixels ``x`` in ``xa..xb`` whose cell ``(b_q + x a_q) >> 14`` lies in ``lo..hi``.

    Exact integer bounds (positions in units of 2**-14), so a row's run needs no per-pixel
    bound tests: ``lo * 2**14 <= b_q + x a_q <= hi * 2**14 + 2**14 - 1``, solved for ``x``.
    """
    p_lo = lo * 16384 - b_q
    p_hi = hi * 16384 + 16383 - b_q
    if a_q == 0:
        if p_lo <= 0 <= p_hi:
            return xa, xb
        return xa, xa - 1
    if a_q > 0:
        x0 = -((-p_lo) // a_q)
        x1 = p_hi // a_q
    else:
        x0 = -((-p_hi) // a_q)
        x1 = p_lo // a_q
    return max(xa, x0), min(xb, x1)


#: ``ceil(2**32 / d)`` for d = 0..256 (0 unused): ``(n * M[d]) >> 32 == n // d`` for every
#: ``0 <= n < 2**16`` and ``1 <= d <= 256`` (the error ``n (M d - 2**32) / (d 2**32) < 2**-16``
#: never carries past the next integer, since ``n / d`` is at least ``1 / d`` below it).
_RECIPROCAL_32 = np.array([0] + [-(-(2**32) // d) for d in range(1, 257)], dtype=np.int64)


@njit(nogil=True, cache=True)
def _nearest_span_fixed(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                        klo, khi, mode, use_reject, reject, int_out):
    """:func:`_nearest_span` in PLUS's fixed point, with PLUS's integer arithmetic.

    The voxel is ``(p + 2**13) >> 14`` of the integer position ``p = b + x a`` in units of
    2**-14 (PLUS's fixed-point round). Mean: :func:`_nearest_mean_plus`; max / latest: the
    value compared / replaced, the buffer set to 256 (PLUS's optimized nearest neighbour).
    The pixels inside the volume (and this worker's planes ``klo..khi``) are found per row
    from exact integer bounds (:func:`_fixed_x_range`), then inserted in order without tests.
    """
    nk, nj, ni, nc = acc.shape
    half = 8192
    bi_q = np.int64(bi * FIXED_POINT_SCALE) + half
    bj_q = np.int64(bj * FIXED_POINT_SCALE) + half
    bk_q = np.int64(bk * FIXED_POINT_SCALE) + half
    ai_q = np.int64(ai * FIXED_POINT_SCALE)
    aj_q = np.int64(aj * FIXED_POINT_SCALE)
    ak_q = np.int64(ak * FIXED_POINT_SCALE)
    x_lo, x_hi = _fixed_x_range(bk_q, ak_q, klo, khi, xa, xb)
    x_lo, x_hi = _fixed_x_range(bi_q, ai_q, 0, ni - 1, x_lo, x_hi)
    x_lo, x_hi = _fixed_x_range(bj_q, aj_q, 0, nj - 1, x_lo, x_hi)
    gray = nc == 1 and not use_reject
    gray_mean = gray and int_out and mode == MODE_MEAN_PLUS
    reciprocal = _RECIPROCAL_32
    inserted = 0
    for part in range(2):
        # The row's kept pixels minus the skip segment s0..s1: at most two runs.
        if part == 0:
            r0, r1 = x_lo, (min(x_hi, s0 - 1) if s0 <= s1 else x_hi)
        else:
            if s0 > s1:
                break
            r0, r1 = max(x_lo, s1 + 1), x_hi
        if r0 > r1:
            continue
        pk = bk_q + r0 * ak_q
        pi = bi_q + r0 * ai_q
        pj = bj_q + r0 * aj_q
        if gray_mean:
            # _nearest_mean_plus for one grey channel, in integers. PLUS's buffer is 256 k after k
            # hits, so (256 new + a old) / (a + 256) is (new + k old) // (k + 1), taken by an exact
            # reciprocal multiply (_RECIPROCAL_32); past saturation, (new + 255 old) >> 8. A buffer
            # that is not a multiple of 256 (nearest insertion never makes one) or a wide numerator
            # takes the division. All give PLUS's truncated quotient. (Written out here: as an
            # inlined function the loop ran 3-4x slower.)
            for x in range(r0, r1 + 1):
                kk, jj, ii = pk >> 14, pj >> 14, pi >> 14
                a = np.int64(weight[kk, jj, ii])
                old = np.int64(acc[kk, jj, ii, 0])
                v = np.int64(frames[f, y, x, 0])
                if a <= 65279:
                    k = a >> 8
                    n = v + k * old
                    if (a & 255) == 0 and n < 65536:
                        acc[kk, jj, ii, 0] = (n * reciprocal[k + 1]) >> 32
                    else:
                        acc[kk, jj, ii, 0] = (v * 256 + old * a) // (a + 256)
                    weight[kk, jj, ii] = a + 256
                else:
                    acc[kk, jj, ii, 0] = (v + 255 * old) >> 8
                pk += ak_q
                pi += ai_q
                pj += aj_q
            inserted += r1 - r0 + 1
        elif gray and mode == MODE_MAX:
            for x in range(r0, r1 + 1):
                kk, jj, ii = pk >> 14, pj >> 14, pi >> 14
                v = frames[f, y, x, 0]
                if v > acc[kk, jj, ii, 0]:
                    acc[kk, jj, ii, 0] = v
                weight[kk, jj, ii] = 256
                pk += ak_q
                pi += ai_q
                pj += aj_q
            inserted += r1 - r0 + 1
        elif gray and mode == MODE_LATEST:
            for x in range(r0, r1 + 1):
                kk, jj, ii = pk >> 14, pj >> 14, pi >> 14
                acc[kk, jj, ii, 0] = frames[f, y, x, 0]
                weight[kk, jj, ii] = 256
                pk += ak_q
                pi += ai_q
                pj += aj_q
            inserted += r1 - r0 + 1
        else:
            for x in range(r0, r1 + 1):
                kk, jj, ii = pk >> 14, pj >> 14, pi >> 14
                pk += ak_q
                pi += ai_q
                pj += aj_q
                if use_reject and _rejected(frames, f, y, x, nc, reject):
                    continue
                if mode == MODE_MEAN_PLUS:
                    _nearest_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, int_out)
                else:
                    for c in range(nc):
                        v = frames[f, y, x, c]
                        if mode == MODE_LATEST or v > acc[kk, jj, ii, c]:
                            acc[kk, jj, ii, c] = v
                    weight[kk, jj, ii] = _PLUS_UNIT
                inserted += 1
    return inserted


@njit(nogil=True, cache=True)
def _linear_span_fixed(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                       klo, khi, mode, use_reject, reject, int_out):
    """:func:`_linear_span` in PLUS's fixed point, with PLUS's integer arithmetic.

    Positions are integers in units of 2**-14 (``b + x a``, exact: the matrices are multiples
    of 2**-14), the cell is ``p >> 14`` and the fraction ``p & 16383``; trilinear weights are
    PLUS's rounded fixed-point products ``(u v + 2**13) >> 14`` taken as ``wx (wy wz)``. The
    accumulation buffer (``weight``) and the values follow PLUS (mean: :func:`_linear_mean_plus`;
    max / latest: only voxels with weight >= 1/8, the buffer set to ``round(256 w)`` where the
    value is set). A pixel is dropped unless all its non-degenerate corners are in the volume.
    The emulated path for mean / max / latest (importance-mask keeps :func:`_linear_span`).
    """
    nk, nj, ni, nc = acc.shape
    one = 16384
    half = 8192
    min_w = 2048  # 1/8
    bi_q = np.int64(bi * FIXED_POINT_SCALE)
    bj_q = np.int64(bj * FIXED_POINT_SCALE)
    bk_q = np.int64(bk * FIXED_POINT_SCALE)
    ai_q = np.int64(ai * FIXED_POINT_SCALE)
    aj_q = np.int64(aj * FIXED_POINT_SCALE)
    ak_q = np.int64(ak * FIXED_POINT_SCALE)
    inserted = 0
    for x in range(xa, xb + 1):
        if s0 <= x <= s1:
            continue
        pk = bk_q + x * ak_q
        k0 = pk >> 14
        if k0 < 0 or k0 < klo - 1 or k0 > khi:
            continue
        pi = bi_q + x * ai_q
        pj = bj_q + x * aj_q
        i0 = pi >> 14
        j0 = pj >> 14
        fx = pi & 16383
        fy = pj & 16383
        fz = pk & 16383
        if i0 < 0 or j0 < 0:
            continue
        if i0 + (1 if fx != 0 else 0) >= ni or j0 + (1 if fy != 0 else 0) >= nj or k0 + (1 if fz != 0 else 0) >= nk:
            continue
        if use_reject and _rejected(frames, f, y, x, nc, reject):
            continue
        first_plane = -1
        for dk in range(2):
            wz = fz if dk == 1 else one - fz
            if wz == 0:
                continue
            kk = k0 + dk
            for dj in range(2):
                wy = fy if dj == 1 else one - fy
                if wy == 0:
                    continue
                wyz = (wy * wz + half) >> 14
                jj = j0 + dj
                for di in range(2):
                    wx = fx if di == 1 else one - fx
                    if wx == 0:
                        continue
                    w = (wx * wyz + half) >> 14
                    if w == 0:
                        continue
                    if mode != MODE_MEAN_PLUS and w < min_w:
                        continue
                    if first_plane < 0:
                        first_plane = kk
                    if kk < klo or kk > khi:
                        continue
                    ii = i0 + di
                    if mode == MODE_MEAN_PLUS:
                        _linear_mean_plus(frames, f, y, x, acc, weight, kk, jj, ii, w / FIXED_POINT_SCALE, int_out)
                    else:
                        a = weight[kk, jj, ii]
                        for c in range(nc):
                            v = frames[f, y, x, c]
                            if mode == MODE_LATEST or v > acc[kk, jj, ii, c]:
                                acc[kk, jj, ii, c] = v
                                a = np.float64((w * 256 + half) >> 14)
                        weight[kk, jj, ii] = a
        if klo <= first_plane <= khi:
            inserted += 1
    return inserted


@njit(nogil=True, cache=True)
def _insert_rows(frames, frame_ids, mats, ranges, mask_ids, importance, use_reject, reject, mode, int_out,
                 fixed_point, linear, acc, weight, counts, n_groups, group, slab, spans):
    """Nearest-neighbour or trilinear insertion of ``frames[frame_ids]`` into this worker's slabs."""
    nk = acc.shape[0]
    for n in range(frame_ids.shape[0]):
        f = frame_ids[n]
        rr = ranges[mask_ids[n]]
        m = _frame_spans(mats, n, rr, nk, linear, n_groups, group, slab, spans)
        total = 0
        for q in range(m):
            y = spans[q, 0]
            bi = mats[n, 0, 2] + y * mats[n, 0, 1]
            bj = mats[n, 1, 2] + y * mats[n, 1, 1]
            bk = mats[n, 2, 2] + y * mats[n, 2, 1]
            xa, xb, s0, s1, klo, khi = spans[q, 1], spans[q, 2], rr[y, 2], rr[y, 3], spans[q, 3], spans[q, 4]
            ai, aj, ak = mats[n, 0, 0], mats[n, 1, 0], mats[n, 2, 0]
            if fixed_point and mode != MODE_IMPORTANCE:
                if linear:
                    total += _linear_span_fixed(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                                                klo, khi, mode, use_reject, reject, int_out)
                else:
                    total += _nearest_span_fixed(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight,
                                                 klo, khi, mode, use_reject, reject, int_out)
            elif linear:
                total += _linear_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight, klo, khi,
                                      mode, importance, use_reject, reject, int_out, fixed_point)
            else:
                total += _nearest_span(frames, f, y, xa, xb, s0, s1, bi, bj, bk, ai, aj, ak, acc, weight, klo, khi,
                                       mode, importance, use_reject, reject, int_out, fixed_point)
        counts[n] += total


def insert_per_pixel(frames, frame_ids, matrices, row_ranges, mask_ids, acc, weight, mode, linear, importance,
                     use_reject, reject, n_threads, executor, slab, fixed_point):
    """One read-modify-write per pixel and voxel: PLUS emulation (fixed point, saturating mean)."""
    n = frame_ids.shape[0]
    nk = acc.shape[0]
    if slab is None:
        slab = max(8 if linear else 4, min(16, nk // (4 * max(1, int(n_threads)))))
    groups = max(1, min(int(n_threads), (nk + slab - 1) // slab))
    counts = np.zeros((groups, n), dtype=np.int64)
    if n == 0:
        return counts.sum(axis=0)
    int_out = frames.dtype == np.uint8
    worker = _insert_rows
    args = (frames, frame_ids, matrices, row_ranges, mask_ids, importance, use_reject, reject, int(mode),
            bool(int_out), bool(fixed_point), bool(linear), acc, weight)
    n_rows = frames.shape[1]
    if groups == 1:
        worker(*args, counts[0], 1, 0, nk, np.empty((n_rows, 5), dtype=np.int64))
        return counts[0]
    pieces = n_rows * (((nk + slab - 1) // slab) // groups + 2)  # a row crosses each of the worker's slabs at most once
    run_workers(lambda g: worker(*args, counts[g], groups, g, slab, np.empty((pieces, 5), dtype=np.int64)), groups,
                executor)
    return counts.sum(axis=0)

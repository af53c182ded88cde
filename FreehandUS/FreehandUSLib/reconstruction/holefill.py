"""Hole filling with PLUS's kernels (``vtkPlusFillHolesInVolume``), compiled with numba.

A *hole* is a voxel that received no pixel (weight 0). For each hole the elements of
``options.hole_filling`` are tried in order until one succeeds; every element reads only the
*known* voxels of the reconstruction (never values filled by another element), so holes are
independent: the volume is cut into runs of k-planes processed by separate threads, each
hole is written by exactly one thread, and the result does not depend on the thread count.

Elements (``size`` is an odd cube edge in voxels, ``ratio`` = ``minimum_known_voxels_ratio``;
an element succeeds when the weights it found are non-zero and more than ``ratio * size**3``
voxels of its cube are known):

- ``GAUSSIAN``: Gaussian-weighted mean (``stdev`` in voxels) of the known voxels in the cube.
- ``GAUSSIAN_ACCUMULATION``: the same, each weight multiplied by the voxel's accumulated weight.
- ``DISTANCE_WEIGHT_INVERSE``: mean weighted by 1 / distance.
- ``NEAREST_NEIGHBOR``: the mean of the known voxels in the smallest cube (radius 1, 2, ...
  up to ``size // 2``) that holds any; the ratio test uses ``size**3``.
- ``STICK``: along 13 directions (3 axes, 6 face diagonals, 4 space diagonals) look for the
  nearest known voxel on both sides; a stick is usable when its length in voxels, counting
  both ends, is at most ``stick_length_limit``. Sticks are ranked by 1 / (length x step
  length) and the best ``number_of_sticks_to_use`` (ties included) are averaged with those
  weights; along a stick the value is linearly interpolated between its two ends. (PLUS
  weights the forward end by ``(reverse + 1) / (length)``, which is not an interpolation; we
  interpolate.)

How it is made fast (each step keeps the result bit-identical to the straightforward loops
of :func:`~.reference.fill_holes_reference`, which tests check):

- The volume is processed a k-plane at a time; holes are found by scanning the known-voxel
  volume (no index arrays of all holes), and each element handles a whole plane in one
  compiled call.
- The cube elements first look up how many known voxels their cube holds, from box counts
  (separable running sums over planes, kept in a small ring of planes); a hole whose count
  cannot pass the ratio test is rejected without reading its neighbourhood (PLUS does the
  same check). Only holes that pass compute the weighted sum, in the same order as the
  plain loop.
- ``STICK`` needs, for each of the 26 senses, the distance to the nearest known voxel (at
  most ``stick_length_limit - 1`` steps). They come from vectorised recurrences over rows of
  planes: within the plane for the 8 in-plane senses, rolling from the plane below for the 9
  senses that go down in k, and for the 9 that go up, from blocks of planes computed
  downwards from ``limit - 1`` planes above the block (about 8 MiB of uint8 planes per
  worker, never whole volumes). Sticks are ranked by the integer ``n^2 (di^2 + dj^2 + dk^2)``
  (``n`` voxels long): the same order and the same ties as their weights
  ``1 / (n |d|)``, computed without branches for a whole row at once; each hole then only
  reads the values at the ends of its best stick(s).
- The known values can be read as ``sums / weights`` straight from the reconstruction's
  accumulators and the filled values written, rounded, straight into the output volume (see
  :func:`fill_holes_into`): no volume-sized float64 copies.

Values are computed in float64 from the unrounded reconstruction; they are rounded once,
when stored.

STICK alone on PLUS's value buffers also exists in C (``native/stick_fill.c``,
:func:`.native.fill_holes_native`, the reconstruction's choice under ``--emulate-plus`` when the
library is built): a change to STICK's rules here must be made there too
(``Testing/reconstruction/test_recon_native.py`` compares the two).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from .holefill_common import (
    _KIND,
    _NEAREST,
    _STICK,
    _STICK_BLOCK_BYTES,
    STICK_DIRECTIONS,
    STORE_FLOOR,
    STORE_RAW,
    STORE_ROUND,
    HoleFillingStats,
    _stick_tables,
    hole_filling_reach,
)

__all__ = [
    "hole_filling_reach",
    "HoleFillingStats",
    "fill_holes",
    "fill_holes_into",
    "STICK_DIRECTIONS",
    "STORE_RAW",
    "STORE_ROUND",
    "STORE_FLOOR",
]

def _cube_weights(kind: int, size: int, stdev: float) -> np.ndarray:
    r = size // 2
    d = np.arange(-r, r + 1, dtype=np.float64)
    dz, dy, dx = np.meshgrid(d, d, d, indexing="ij")
    dist2 = dx * dx + dy * dy + dz * dz
    if kind in (0, 1):
        return np.exp(-dist2 / (2.0 * stdev * stdev))
    if kind == 2:
        with np.errstate(divide="ignore"):
            w = 1.0 / np.sqrt(dist2)
        w[r, r, r] = 0.0
        return w
    return np.ones_like(dist2)


def _plus_cube_weights(kind: int, size: int, stdev: float) -> np.ndarray:
    """PLUS's own kernel (``FillHolesInVolumeElement``), value for value: float32 entries.

    GAUSSIAN / GAUSSIAN_ACCUMULATION: the normalised 3D Gaussian evaluated as PLUS does (the
    parameters in float32, the exponent in float64, the product stored as float32);
    DISTANCE_WEIGHT_INVERSE: ``1 / distance`` in float32 (0 at the centre); NEAREST_NEIGHBOR:
    ones. Index ``[k, j, i]`` as in :func:`_cube_weights`.
    """
    f32 = np.float32
    centre = f32((size - 1) / 2.0)
    w = np.ones((size, size, size), dtype=np.float32)
    if kind in (0, 1):
        sd = f32(stdev)
        divisor = float(f32(float(sd * sd) * 2.0))
        term = f32(math.pow(2.0 * math.pi, 1.5) * math.pow(float(sd), 3.0))
        scale = float(f32(1.0) / term)
        for z in range(size):
            for y in range(size):
                for x in range(size):
                    ex = math.pow(x - float(centre), 2.0) / divisor
                    ey = math.pow(y - float(centre), 2.0) / divisor
                    ez = math.pow(z - float(centre), 2.0) / divisor
                    w[z, y, x] = f32(scale * math.exp(-(ex + ey + ez)))
    elif kind == 2:
        for z in range(size):
            for y in range(size):
                for x in range(size):
                    dx, dy, dz = f32(x) - centre, f32(y) - centre, f32(z) - centre
                    d = np.sqrt(dx * dx + dy * dy + dz * dz, dtype=np.float32)
                    w[z, y, x] = abs(f32(1.0) / d) if d != 0 else f32(0.0)
    return w.astype(np.float64)


def _plus_need(ratio: float, size: int) -> float:
    """The largest known-voxel count that fails PLUS's test ``count / size**3 > float32(ratio)``.

    PLUS stores the ratio as float32 and compares in float64; a cube passes when it holds more
    known voxels than this.
    """
    r = float(np.float32(ratio))
    n3 = size * size * size
    need = int(math.floor(r * n3))
    while need + 1 <= n3 and (need + 1) / n3 <= r:
        need += 1
    while need >= 0 and need / n3 > r:
        need -= 1
    return float(need)


# --------------------------------------------------------------------------------------------
# Compiled parts
# --------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _value(vals, den, divide, k, j, i, c):
    """A known voxel's value: ``vals`` or ``vals / den`` (a mean from its accumulators), float64."""
    x = np.float64(vals[k, j, i, c])
    if divide:
        x = x / np.float64(den[k, j, i])
    return x


@njit(nogil=True, cache=True, error_model="numpy")
def _store(out, k, j, i, c, x, mode):
    if mode == STORE_ROUND:
        y = math.floor(x + 0.5)
        out[k, j, i, c] = min(max(y, 0.0), 255.0)
    elif mode == STORE_FLOOR:
        y = math.floor(x)
        out[k, j, i, c] = min(max(y, 0.0), 255.0)
    else:
        out[k, j, i, c] = x


@njit(nogil=True, cache=True, error_model="numpy")
def _box_sum_plane(known, kk, r, tmp, out):
    """``out[j, i]`` = known voxels of plane ``kk`` in the (2r+1)^2 square around (j, i)."""
    nj, ni = tmp.shape
    for j in range(nj):
        run = 0
        for i in range(min(r, ni - 1) + 1):
            if known[kk, j, i] != 0:
                run += 1
        for i in range(ni):
            tmp[j, i] = run
            if i + r + 1 < ni and known[kk, j, i + r + 1] != 0:
                run += 1
            if i - r >= 0 and known[kk, j, i - r] != 0:
                run -= 1
    for i in range(ni):
        out[0, i] = 0
    for j in range(min(r, nj - 1) + 1):
        for i in range(ni):
            out[0, i] += tmp[j, i]
    for j in range(1, nj):
        for i in range(ni):
            v = out[j - 1, i]
            if j + r < nj:
                v += tmp[j + r, i]
            if j - r - 1 >= 0:
                v -= tmp[j - r - 1, i]
            out[j, i] = v


@njit(nogil=True, cache=True, error_model="numpy")
def _cube_counts(known, k, r, ring, ring_plane, tmp, counts):
    """``counts[j, i]`` = known voxels in the (2r+1)^3 cube around (k, j, i) (inside the volume).

    ``ring`` caches the 2D box sums of the last 2r+1 planes (``ring_plane`` says which).
    """
    nk = known.shape[0]
    nj, ni = tmp.shape
    m = 2 * r + 1
    counts[:, :] = 0
    for kk in range(max(0, k - r), min(nk - 1, k + r) + 1):
        slot = kk % m
        if ring_plane[slot] != kk:
            _box_sum_plane(known, kk, r, tmp, ring[slot])
            ring_plane[slot] = kk
        plane = ring[slot]
        for j in range(nj):
            for i in range(ni):
                counts[j, i] += plane[j, i]


@njit(nogil=True, cache=True, error_model="numpy")
def _cube_plane(k, todo, box, known, vals, den, divide, wgt, wscale, kernels, e, size, need, use_weight,
                out, store, sums, emulate):
    """GAUSSIAN / GAUSSIAN_ACCUMULATION / DISTANCE_WEIGHT_INVERSE for the holes of plane k.

    ``todo[j, i]``: holes not filled yet (cleared where this element fills); ``box``: known
    voxels per cube. Returns how many holes were filled. With ``emulate`` the sums run in
    PLUS's order (i outermost, k innermost) and GAUSSIAN_ACCUMULATION's weight is PLUS's
    float32 product of the accumulation buffer and the (float32) kernel.
    """
    nk, nj, ni, nc = vals.shape
    r = size // 2
    filled = 0
    for j in range(nj):
        for i in range(ni):
            if not todo[j, i] or not box[j, i] > need:
                continue  # known, filled, or too few known voxels in the cube to pass
            sw = 0.0
            for c in range(nc):
                sums[c] = 0.0
            if emulate:
                for ii in range(max(i - r, 0), min(i + r, ni - 1) + 1):
                    for jj in range(max(j - r, 0), min(j + r, nj - 1) + 1):
                        for kk in range(max(k - r, 0), min(k + r, nk - 1) + 1):
                            if known[kk, jj, ii] == 0:
                                continue
                            w = kernels[e, kk - k + r, jj - j + r, ii - i + r]
                            if use_weight:
                                w = np.float64(np.float32(np.float32(wgt[kk, jj, ii]) * np.float32(w)))
                            sw += w
                            for c in range(nc):
                                sums[c] += _value(vals, den, divide, kk, jj, ii, c) * w
                if sw > 0.0:
                    for c in range(nc):
                        _store(out, k, j, i, c, sums[c] / sw, store)
                    todo[j, i] = False
                    filled += 1
                continue
            for kk in range(max(k - r, 0), min(k + r, nk - 1) + 1):
                for jj in range(max(j - r, 0), min(j + r, nj - 1) + 1):
                    for ii in range(max(i - r, 0), min(i + r, ni - 1) + 1):
                        if known[kk, jj, ii] == 0:
                            continue
                        w = kernels[e, kk - k + r, jj - j + r, ii - i + r]
                        if use_weight:
                            w *= np.float64(wgt[kk, jj, ii]) * wscale
                        sw += w
                        for c in range(nc):
                            sums[c] += w * _value(vals, den, divide, kk, jj, ii, c)
            if sw > 0.0:
                for c in range(nc):
                    _store(out, k, j, i, c, sums[c] / sw, store)
                todo[j, i] = False
                filled += 1
    return filled


@njit(nogil=True, cache=True, error_model="numpy")
def _nearest_plane(k, todo, box, known, vals, den, divide, size, need, out, store, sums):
    """NEAREST_NEIGHBOR for the holes of plane k: mean of the smallest cube holding known voxels."""
    nk, nj, ni, nc = vals.shape
    filled = 0
    for j in range(nj):
        for i in range(ni):
            if not todo[j, i] or not box[j, i] > need:
                continue
            for r in range(1, size // 2 + 1):
                count = 0
                for c in range(nc):
                    sums[c] = 0.0
                for kk in range(max(k - r, 0), min(k + r, nk - 1) + 1):
                    for jj in range(max(j - r, 0), min(j + r, nj - 1) + 1):
                        for ii in range(max(i - r, 0), min(i + r, ni - 1) + 1):
                            if known[kk, jj, ii] != 0:
                                count += 1
                                for c in range(nc):
                                    sums[c] += _value(vals, den, divide, kk, jj, ii, c)
                if count > 0:
                    if count > need:
                        for c in range(nc):
                            _store(out, k, j, i, c, sums[c] / count, store)
                        todo[j, i] = False
                        filled += 1
                    break
    return filled


@njit(nogil=True, cache=True, error_model="numpy")
def _next_distance(nxt, known_next, cap):
    """Distance from v given the neighbour v + s: 1 if it is known, else its distance + 1 (0 = none).

    Distances stop at ``cap``. Branch-free, so that the scans vectorise.
    """
    one = nxt - nxt + 1
    kn = (known_next != 0) * one
    grow = ((nxt >= one) & (nxt < cap)) * (nxt + one)
    return kn | ((one - kn) * grow)


@njit(nogil=True, cache=True, error_model="numpy")
def _distances_row(src_p, src_k, si, cap, dst):
    """``dst[i] = step(src_p[i + si], src_k[i + si])`` (0 where i + si is outside).

    One loop per ``si`` so that each has a constant offset and vectorises; ``dst`` must not
    share memory with ``src_p`` (else the loops do not vectorise).
    """
    ni = dst.shape[0]
    if si == 1:
        for i in range(ni - 1):
            dst[i] = _next_distance(src_p[i + 1], src_k[i + 1], cap)
        dst[ni - 1] = 0
    elif si == -1:
        dst[0] = 0
        for i in range(1, ni):
            dst[i] = _next_distance(src_p[i - 1], src_k[i - 1], cap)
    else:
        for i in range(ni):
            dst[i] = _next_distance(src_p[i], src_k[i], cap)


@njit(nogil=True, cache=True, error_model="numpy")
def _distances_across(known, kn, si, sj, prev, cap, out):
    """``out[j, i]``: steps along (si, sj, kn - k) to the nearest known voxel (<= cap, 0 = none).

    ``prev`` holds those distances for plane ``kn`` (the neighbour plane, inside the volume);
    it must be a different allocation than ``out``.
    """
    nj, ni = out.shape
    for j in range(nj):
        jn = j + sj
        if jn < 0 or jn >= nj:
            out[j, :] = 0
        else:
            _distances_row(prev[jn], known[kn, jn], si, cap, out[j])


@njit(nogil=True, cache=True, error_model="numpy")
def _distances_within(known, k, si, sj, cap, out, row):
    """``out[j, i]``: steps along (si, sj, 0) in plane ``k`` to the nearest known voxel (0 = none).

    ``row`` is scratch of length n_i.
    """
    nj, ni = out.shape
    if sj != 0:
        j_first, j_last, j_step = (nj - 1, -1, -1) if sj > 0 else (0, nj, 1)
        for j in range(j_first, j_last, j_step):
            jn = j + sj
            dst = out[j]
            if jn < 0 or jn >= nj:
                dst[:] = 0
                continue
            _distances_row(out[jn], known[k, jn], si, cap, row)
            for i in range(ni):
                dst[i] = row[i]
        return
    # Along the row itself: the distance to the nearest known voxel after (before) i.
    for j in range(nj):
        dst = out[j]
        src = known[k, j]
        if si > 0:
            p = ni + cap + 1
            for i in range(ni - 1, -1, -1):
                d = p - i
                dst[i] = d if d <= cap else 0
                p = i if src[i] != 0 else p
        else:
            p = -cap - 2
            for i in range(ni):
                d = i - p
                dst[i] = d if d <= cap else 0
                p = i if src[i] != 0 else p


@njit(nogil=True, cache=True, error_model="numpy")
def _stick_senses(dirs):
    """The 26 senses (+d, -d for each direction) as (si, sj, sk) and their storage class.

    Class 0: within a plane; 1: towards higher k (block buffers); 2: towards lower k (rolling).
    ``slot`` indexes the class's buffers.
    """
    nd = dirs.shape[0]
    senses = np.zeros((2 * nd, 3), dtype=np.int64)
    cls = np.zeros(2 * nd, dtype=np.int64)
    slot = np.zeros(2 * nd, dtype=np.int64)
    n_cls = np.zeros(3, dtype=np.int64)
    for d in range(nd):
        for q in range(2):
            sign = 1 if q == 0 else -1
            s = 2 * d + q
            for a in range(3):
                senses[s, a] = sign * dirs[d, a]
            c = 0 if senses[s, 2] == 0 else (1 if senses[s, 2] > 0 else 2)
            cls[s] = c
            slot[s] = n_cls[c]
            n_cls[c] += 1
    return senses, cls, slot, n_cls


@njit(nogil=True, cache=True, error_model="numpy")
def _up_block(known, b0, b1, cap, senses, cls, slot, up_even, up_odd, tmp_even, tmp_odd, zero):
    """Distances towards higher k for planes b0..b1-1 into ``up_<parity of k>[slot, (k - b0) // 2]``.

    Computed downwards from ``b1 - 1 + cap`` (or the last plane): a nearest known voxel is at
    most ``cap`` planes away, so starting there (with no distances above) is exact. Planes of
    even and odd k live in separate arrays, so that a plane and its neighbour never share an
    allocation (the scans then vectorise).
    """
    nk = known.shape[0]
    top = min(nk - 1, b1 - 1 + cap)
    for s in range(senses.shape[0]):
        if cls[s] != 1:
            continue
        q = slot[s]
        for kk in range(top, b0 - 1, -1):
            if kk < b1:
                out = up_even[q, (kk - b0) // 2] if kk % 2 == 0 else up_odd[q, (kk - b0) // 2]
            else:
                out = tmp_even[q] if kk % 2 == 0 else tmp_odd[q]
            if kk + 1 >= nk:
                out[:, :] = 0
                continue
            kp = kk + 1
            if kk == top:
                prev = zero
            elif kp < b1:
                prev = up_even[q, (kp - b0) // 2] if kp % 2 == 0 else up_odd[q, (kp - b0) // 2]
            else:
                prev = tmp_even[q] if kp % 2 == 0 else tmp_odd[q]
            _distances_across(known, kp, senses[s, 0], senses[s, 1], prev, cap, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _down_plane(known, kk, first, cap, senses, cls, slot, down_even, down_odd, zero):
    """Distances towards lower k for plane ``kk`` into ``down_<parity of kk>[slot]`` (rolling)."""
    for s in range(senses.shape[0]):
        if cls[s] != 2:
            continue
        q = slot[s]
        out = down_even[q] if kk % 2 == 0 else down_odd[q]
        if kk == 0:
            out[:, :] = 0
            continue
        if kk == first:
            prev = zero
        else:
            prev = down_odd[q] if kk % 2 == 0 else down_even[q]
        _distances_across(known, kk - 1, senses[s, 0], senses[s, 1], prev, cap, out)


#: Bit index of a power of two below 2**32 (de Bruijn sequence 0x077CB531).
_DEBRUIJN = np.array(
    [0, 1, 28, 2, 29, 14, 24, 3, 30, 22, 20, 15, 25, 17, 4, 8,
     31, 27, 13, 23, 21, 19, 16, 7, 26, 12, 18, 6, 11, 5, 10, 9],
    dtype=np.int64,
)


@njit(nogil=True, cache=True, error_model="numpy")
def _stick_ties(dist, j, s2s, limit, keys, ties):
    """Row j: ``ties[i]`` = bit mask of the directions whose stick is the best (0: none usable).

    A stick of n voxels along a direction of squared step s2 (1, 2 or 3) has weight
    1 / (n sqrt(s2)); ranking by the integer n^2 s2 instead gives the same order and the same
    ties (n sqrt(s2) are distinct reals for distinct (n, s2)). In int32 (the caller makes sure
    the keys fit), so that the loops over the row vectorise.
    """
    nd = s2s.shape[0]
    ni = keys.shape[0]
    none = np.int32(2**31 - 1)
    lim = np.int32(limit)
    for i in range(ni):
        keys[i] = none
        ties[i] = 0
    for d in range(nd):
        s2 = np.int32(s2s[d])
        fr = dist[2 * d, j]
        rr = dist[2 * d + 1, j]
        for i in range(ni):
            f = np.int32(fr[i])
            r = np.int32(rr[i])
            n = f + r + np.int32(1)
            usable = (f != 0) & (r != 0) & (n <= lim)
            key = n * n * s2
            keys[i] = min(keys[i], key if usable else none)
    for d in range(nd):
        s2 = np.int32(s2s[d])
        fr = dist[2 * d, j]
        rr = dist[2 * d + 1, j]
        bit = np.int32(1) << np.int32(d)
        for i in range(ni):
            f = np.int32(fr[i])
            r = np.int32(rr[i])
            n = f + r + np.int32(1)
            hit = (f != 0) & (r != 0) & (n <= lim) & (n * n * s2 == keys[i])
            ties[i] |= bit if hit else np.int32(0)


@njit(nogil=True, cache=True, error_model="numpy")
def _stick_plane_best(k, todo, dist, vals, den, divide, dirs, s2s, wtabs, ftabs, e, limit, emulate, int_out,
                      out, store, sums, keys, ties):
    """STICK with one stick per hole for the holes of plane k (from the distances ``dist``).

    ``dist[2d (+d) / 2d+1 (-d), j, i]``; the best sticks of a row are found at once
    (:func:`_stick_ties`). Returns how many holes were filled (and clears them in ``todo``).
    """
    nk, nj, ni, nc = vals.shape
    filled = 0
    for j in range(nj):
        _stick_ties(dist, j, s2s, limit, keys, ties)
        for i in range(ni):
            mask = ties[i]
            if not todo[j, i] or mask == 0:
                continue
            sw = 0.0
            for c in range(nc):
                sums[c] = 0.0
            while mask != 0:  # average the sticks that tie for the best, in direction order
                low = mask & -mask
                mask ^= low
                d = _DEBRUIJN[((low * 0x077CB531) & 0xFFFFFFFF) >> 27]
                f = np.int64(dist[2 * d, j, i])
                r = np.int64(dist[2 * d + 1, j, i])
                w = wtabs[e, d, f + r + 1]
                a = ftabs[e, f, r]
                sw += w
                di, dj, dk = dirs[d, 0], dirs[d, 1], dirs[d, 2]
                for c in range(nc):
                    x = a * _value(vals, den, divide, k + f * dk, j + f * dj, i + f * di, c) + (1.0 - a) * _value(
                        vals, den, divide, k - r * dk, j - r * dj, i - r * di, c
                    )
                    if emulate and int_out:
                        x = math.floor(x)
                    sums[c] += w * x
            for c in range(nc):
                _store(out, k, j, i, c, sums[c] / sw, store)
            todo[j, i] = False
            filled += 1
    return filled


@njit(nogil=True, cache=True, error_model="numpy")
def _stick_plane_several(k, todo, dist, vals, den, divide, dirs, wtabs, ftabs, e, limit, n_use, emulate, int_out,
                         out, store, stick_w, stick_v, sums):
    """STICK for the holes of plane k, stick by stick per hole: the best ``n_use`` sticks (ties
    included), each weighted by its own weight. With ``n_use == 1`` the same as
    :func:`_stick_plane_best`."""
    nk, nj, ni, nc = vals.shape
    nd = dirs.shape[0]
    filled = 0
    for j in range(nj):
        for i in range(ni):
            if not todo[j, i]:
                continue
            any_stick = False
            for d in range(nd):
                stick_w[d] = 0.0
                f = np.int64(dist[2 * d, j, i])
                r = np.int64(dist[2 * d + 1, j, i])
                n = f + r + 1
                if f == 0 or r == 0 or n > limit:
                    continue
                stick_w[d] = wtabs[e, d, n]
                a = ftabs[e, f, r]
                any_stick = True
                di, dj, dk = dirs[d, 0], dirs[d, 1], dirs[d, 2]
                for c in range(nc):
                    x = a * _value(vals, den, divide, k + f * dk, j + f * dj, i + f * di, c) + (1.0 - a) * _value(
                        vals, den, divide, k - r * dk, j - r * dj, i - r * di, c
                    )
                    stick_v[d, c] = math.floor(x) if (emulate and int_out) else x
            if not any_stick:
                continue
            sw = 0.0
            for c in range(nc):
                sums[c] = 0.0
            used = 0
            while used < n_use:
                top = 0.0
                for d in range(nd):
                    if stick_w[d] > top:
                        top = stick_w[d]
                if top == 0.0:
                    break
                for d in range(nd):
                    if stick_w[d] == top:
                        sw += top
                        for c in range(nc):
                            sums[c] += top * stick_v[d, c]
                        used += 1
                        stick_w[d] = 0.0
            for c in range(nc):
                _store(out, k, j, i, c, sums[c] / sw, store)
            todo[j, i] = False
            filled += 1
    return filled


@njit(nogil=True, cache=True, error_model="numpy")
def _copy_plane(src, dst):
    """``dst[...] = src`` for two C-contiguous planes (a flat loop: a memcpy)."""
    a = src.ravel()
    b = dst.ravel()
    for t in range(a.shape[0]):
        b[t] = a[t]


@njit(nogil=True, cache=True, error_model="numpy")
def _stick_advance(known, k, k0, k1, first, cap, block, holes, sense_info, bufs):
    """Bring the STICK distances to plane k (rolling downward ones always, the rest if ``holes``)."""
    senses, cls, slot = sense_info
    dist, zero, up_even, up_odd, tmp_even, tmp_odd, down_even, down_odd, row = bufs
    _down_plane(known, k, first, cap, senses, cls, slot, down_even, down_odd, zero)
    if (k - k0) % block == 0:
        _up_block(known, k, min(k1, k + block), cap, senses, cls, slot, up_even, up_odd, tmp_even, tmp_odd, zero)
    if not holes:
        return
    b0 = k0 + ((k - k0) // block) * block
    z = (k - b0) // 2
    for s in range(senses.shape[0]):
        c = cls[s]
        if c == 0:
            _distances_within(known, k, senses[s, 0], senses[s, 1], cap, dist[s], row)
        elif c == 1:
            _copy_plane(up_even[slot[s], z] if k % 2 == 0 else up_odd[slot[s], z], dist[s])
        else:
            _copy_plane(down_even[slot[s]] if k % 2 == 0 else down_odd[slot[s]], dist[s])


@njit(nogil=True, cache=True, error_model="numpy")
def _plane_holes(known, k, todo):
    """``todo[j, i]`` = voxel (k, j, i) is a hole; returns whether the plane has any."""
    nj, ni = todo.shape
    any_hole = False
    for j in range(nj):
        for i in range(ni):
            hole = known[k, j, i] == 0
            todo[j, i] = hole
            any_hole |= hole
    return any_hole


@njit(nogil=True, cache=True, error_model="numpy")
def _mark_filled(known, k, todo, filled):
    nj, ni = todo.shape
    for j in range(nj):
        for i in range(ni):
            if known[k, j, i] == 0 and not todo[j, i]:
                filled[k, j, i] = True


def _fill_chunk(k0, k1, known, vals, den, divide, wgt, wscale, out, store, filled, params, cap, block,
                sense_info, cube_ws, stick_ws, counts):
    """Fill the holes of planes k0..k1-1, trying the elements in order for each hole.

    The loop over planes is Python; each plane's work is one compiled call per element (the
    per-element functions are compiled once per combination of array types, which keeps the
    compilation short).
    """
    kinds, sizes, needs, kernels, dirs, wtabs, ftabs, limits, n_uses, emulate, int_out = params
    s2s = (dirs * dirs).sum(axis=1)
    ring, ring_plane, box, tmp, todo, sums = cube_ws
    keys, ties, stick_w, stick_v, bufs = stick_ws
    dist = bufs[0]
    first = max(0, k0 - cap)
    if cap > 0:
        for kk in range(first, k0):  # warm up the rolling downward distances
            _stick_advance(known, kk, k0, k1, first, cap, block, False, sense_info, bufs)
    for k in range(k0, k1):
        any_hole = _plane_holes(known, k, todo)
        if cap > 0:
            _stick_advance(known, k, k0, k1, first, cap, block, any_hole, sense_info, bufs)
        if not any_hole:
            continue
        for e, kind in enumerate(kinds.tolist()):
            if kind == _STICK:
                limit, n_use = int(limits[e]), int(n_uses[e])
                if n_use == 1 and 3 * (2 * min(limit, cap + 1) + 1) ** 2 < 2**31:  # int32 ranking keys
                    n = _stick_plane_best(k, todo, dist, vals, den, divide, dirs, s2s, wtabs, ftabs, e, limit,
                                          emulate, int_out, out, store, sums, keys, ties)
                else:
                    n = _stick_plane_several(k, todo, dist, vals, den, divide, dirs, wtabs, ftabs, e, limit, n_use,
                                             emulate, int_out, out, store, stick_w, stick_v, sums)
            else:
                r = int(sizes[e]) // 2
                _cube_counts(known, k, r, ring[e, : 2 * r + 1], ring_plane[e, : 2 * r + 1], tmp, box)
                if kind == _NEAREST:
                    n = _nearest_plane(k, todo, box, known, vals, den, divide, int(sizes[e]), float(needs[e]), out,
                                       store, sums)
                else:
                    n = _cube_plane(k, todo, box, known, vals, den, divide, wgt, wscale, kernels, e, int(sizes[e]),
                                    float(needs[e]), kind == 1, out, store, sums, emulate)
            counts[e] += n
        if filled is not None:
            _mark_filled(known, k, todo, filled)


def _workspace(nj: int, ni: int, nc: int, elements, cap: int, block: int):
    """One worker's scratch buffers for :func:`_fill_chunk` (a few planes, not volumes)."""
    n_el = len(elements)
    nd = STICK_DIRECTIONS.shape[0]
    rmax = max([e.size // 2 for e in elements if _KIND[e.type] != _STICK] + [0])
    cube_ws = (
        np.zeros((n_el, 2 * rmax + 1, nj, ni), dtype=np.int32),  # ring of 2D box counts per element
        np.full((n_el, 2 * rmax + 1), -1, dtype=np.int64),  # which plane each ring slot holds
        np.zeros((nj, ni), dtype=np.int32),  # cube counts of the current plane
        np.zeros((nj, ni), dtype=np.int32),
        np.zeros((nj, ni), dtype=np.bool_),  # holes of the current plane not filled yet
        np.zeros(nc),
    )
    dt = np.uint8 if cap <= 254 else np.uint16
    pj, pi = (nj, ni) if cap > 0 else (1, 1)
    n_cls = _stick_senses(STICK_DIRECTIONS)[3]
    half = (block + 1) // 2 if cap > 0 else 1
    bufs = (
        np.zeros((2 * nd, pj, pi), dtype=dt),  # distances of the current plane per sense
        np.zeros((pj, pi), dtype=dt),
        np.zeros((n_cls[1], half, pj, pi), dtype=dt),  # upward senses, even planes of a block
        np.zeros((n_cls[1], half, pj, pi), dtype=dt),  # odd planes
        np.zeros((n_cls[1], pj, pi), dtype=dt),
        np.zeros((n_cls[1], pj, pi), dtype=dt),
        np.zeros((n_cls[2], pj, pi), dtype=dt),  # downward senses, rolling
        np.zeros((n_cls[2], pj, pi), dtype=dt),
        np.zeros(pi, dtype=dt),
    )
    stick_ws = (np.zeros(ni, dtype=np.int32), np.zeros(ni, dtype=np.int32), np.zeros(nd), np.zeros((nd, nc)), bufs)
    return cube_ws, stick_ws


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _element_arrays(elements, emulate: bool):
    """Pack the elements' parameters into arrays for :func:`_fill_chunk`."""
    n_el = len(elements)
    kinds = np.zeros(n_el, dtype=np.int64)
    sizes = np.ones(n_el, dtype=np.int64)
    needs = np.zeros(n_el)
    limits = np.full(n_el, 3, dtype=np.int64)
    n_uses = np.ones(n_el, dtype=np.int64)
    cube = max([e.size for e in elements if _KIND[e.type] != _STICK] + [1])
    lim = max([e.stick_length_limit for e in elements if _KIND[e.type] == _STICK] + [3])
    kernels = np.zeros((n_el, cube, cube, cube))
    wtabs = np.zeros((n_el, STICK_DIRECTIONS.shape[0], lim + 1))
    ftabs = np.zeros((n_el, lim + 1, lim + 1))
    for n, element in enumerate(elements):
        kind = _KIND[element.type]
        kinds[n] = kind
        if kind == _STICK:
            limits[n] = element.stick_length_limit
            n_uses[n] = element.number_of_sticks_to_use
            w, f = _stick_tables(element.stick_length_limit, emulate)
            wtabs[n, :, : w.shape[1]] = w
            ftabs[n, : f.shape[0], : f.shape[1]] = f
        else:
            size = element.size
            sizes[n] = size
            if emulate:
                needs[n] = _plus_need(element.minimum_known_voxels_ratio, size)
                kernels[n, :size, :size, :size] = _plus_cube_weights(kind, size, element.stdev)
            else:
                needs[n] = element.minimum_known_voxels_ratio * size * size * size
                kernels[n, :size, :size, :size] = _cube_weights(kind, size, element.stdev)
    return kinds, sizes, needs, kernels, wtabs, ftabs, limits, n_uses


def fill_holes_into(
    out: np.ndarray,
    values: np.ndarray,
    known: np.ndarray,
    weight: np.ndarray,
    elements,
    *,
    divide: bool = False,
    weight_scale: float = 1.0,
    store: int = STORE_RAW,
    n_threads: int = 1,
    emulate_plus: bool = False,
    integer_values: bool = False,
    filled: np.ndarray | None = None,
    planes: tuple[int, int] | None = None,
) -> HoleFillingStats:
    """Fill holes reading the known voxels of ``values`` and writing the holes of ``out``.

    The reconstruction's own entry point: the known values can come straight from its
    accumulators (``divide``: the value is ``values / weight``) and the filled values go,
    rounded as ``store`` says, into the output volume; nothing volume-sized is allocated.

    Parameters
    ----------
    out : (n_k, n_j, n_i, n_channels) float64, float32 or uint8
        Receives the filled holes (may be ``values`` itself); other voxels are not touched.
    values : (n_k, n_j, n_i, n_channels) numeric
        The known voxels' values (or weighted sums when ``divide``).
    known : (n_k, n_j, n_i) numeric or bool
        Non-zero where a voxel is known (e.g. the weight volume itself).
    weight : (n_k, n_j, n_i) numeric
        Accumulated weights: the divisor when ``divide``, and GAUSSIAN_ACCUMULATION's weights
        (times ``weight_scale``).
    elements : sequence of HoleFillingElement
    divide, weight_scale, store
        See above; ``store`` is :data:`STORE_RAW`, :data:`STORE_ROUND` or :data:`STORE_FLOOR`.
    n_threads : int
        Worker threads (the result does not depend on it).
    emulate_plus, integer_values
        As in :func:`fill_holes`.
    filled : (n_k, n_j, n_i) bool, optional
        Set where a hole was filled.
    planes : (first, stop), optional
        Fill only the holes of planes ``first .. stop - 1`` (the arrays' other planes are read
        as neighbours: a slab and its halo in a batch reconstruction); default all.

    Returns
    -------
    HoleFillingStats

    Raises
    ------
    ValueError
        The arrays' shapes do not fit together.
    """
    start = time.perf_counter()
    elements = list(elements)
    if values.ndim != 4 or out.ndim != 4:
        raise ValueError(
            f"fill_holes: values and out must be (n_k, n_j, n_i, n_channels), got shapes {values.shape} and {out.shape}"
        )
    if out.shape != values.shape or known.shape != values.shape[:3] or weight.shape != values.shape[:3]:
        raise ValueError(
            f"fill_holes: shapes do not match: values {values.shape}, out {out.shape}, known {known.shape}, "
            f"weight {weight.shape} (expected out like values, known and weight (n_k, n_j, n_i) = {values.shape[:3]})"
        )
    nk = known.shape[0]
    p0, p1 = (0, nk) if planes is None else (max(0, int(planes[0])), min(nk, int(planes[1])))
    n_holes = int(known[p0:p1].size - np.count_nonzero(known[p0:p1])) if p1 > p0 else 0
    counts = np.zeros((1, max(1, len(elements))), dtype=np.int64)
    if elements and n_holes:
        packed = _element_arrays(elements, bool(emulate_plus))
        cap = max([e.stick_length_limit - 1 for e in elements if _KIND[e.type] == _STICK] + [0])
        cap = min(cap, max(known.shape))  # no known voxel is farther away than the volume is long
        # Each chunk first rolls the downward STICK distances over ``cap`` planes: chunks of
        # fewer than 2 * cap planes would spend more on that than on filling.
        n_chunks = 1 if n_threads <= 1 else max(1, min(p1 - p0, 2 * int(n_threads), (p1 - p0) // max(1, 2 * cap)))
        bounds = np.linspace(p0, p1, n_chunks + 1).astype(np.int64)
        counts = np.zeros((n_chunks, len(elements)), dtype=np.int64)
        kinds, sizes, needs, kernels, wtabs, ftabs, limits, n_uses = packed
        params = (kinds, sizes, needs, kernels, STICK_DIRECTIONS, wtabs, ftabs, limits, n_uses,
                  bool(emulate_plus), bool(integer_values))
        nj, ni, nc = known.shape[1], known.shape[2], values.shape[3]
        # Upward STICK distances are computed a block of planes at a time, never past a chunk.
        block = int(min(64, max(4, _STICK_BLOCK_BYTES // max(1, 9 * nj * ni)), max(4, int(np.diff(bounds).max()))))
        senses, cls, slot, _ = _stick_senses(STICK_DIRECTIONS)
        # The divisor is read only when dividing; otherwise a fixed stand-in keeps the number of
        # compiled variants down.
        den = weight if divide else np.ones((1, 1, 1))
        common = (known, values, den, bool(divide), weight, float(weight_scale), out, int(store), filled,
                  params, int(cap), block, (senses, cls, slot))

        def run(n, a, b):  # scratch allocated when the chunk starts: one set per busy thread
            _fill_chunk(a, b, *common, *_workspace(nj, ni, nc, elements, cap, block), counts[n])

        chunks = [(n, int(a), int(b)) for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        if len(chunks) == 1:
            run(*chunks[0])
        else:
            with ThreadPoolExecutor(max_workers=int(n_threads)) as pool:
                for fut in [pool.submit(run, *chunk) for chunk in chunks]:
                    fut.result()
    per_element = tuple(int(v) for v in counts.sum(axis=0)[: len(elements)])
    return HoleFillingStats(n_holes, per_element, time.perf_counter() - start)


def fill_holes(
    values: np.ndarray,
    known: np.ndarray,
    weight: np.ndarray,
    elements,
    *,
    n_threads: int = 1,
    emulate_plus: bool = False,
    integer_values: bool = False,
):
    """Fill the holes of a reconstruction in place.

    Parameters
    ----------
    values : (n_k, n_j, n_i, n_channels) float64, C-contiguous
        Reconstructed values (unrounded); holes are overwritten where an element succeeds.
    known : (n_k, n_j, n_i) bool
        Voxels that received pixels.
    weight : (n_k, n_j, n_i) float64
        Accumulated weights (for GAUSSIAN_ACCUMULATION).
    elements : sequence of HoleFillingElement
        Tried in order.
    n_threads : int
    emulate_plus : bool
        STICK as PLUS computes it: ends weighted ``(reverse + 1) / length`` and each stick's
        value truncated when ``integer_values``.
    integer_values : bool
        The output type is an integer type (uint8).

    Returns
    -------
    filled : (n_k, n_j, n_i) bool
        Holes that were filled.
    stats : HoleFillingStats
    """
    known = np.ascontiguousarray(known, dtype=np.bool_)
    filled = np.zeros(known.shape, dtype=bool)
    stats = fill_holes_into(
        values, values, known, weight, elements, n_threads=n_threads, emulate_plus=emulate_plus,
        integer_values=integer_values, filled=filled,
    )
    return filled, stats

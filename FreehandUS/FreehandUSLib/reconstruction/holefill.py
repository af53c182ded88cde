"""Hole filling with PLUS's kernels (``vtkPlusFillHolesInVolume``), compiled with numba.

A *hole* is a voxel that received no pixel (weight 0). For each hole the elements of
``options.hole_filling`` are tried in order until one succeeds; every element reads only the
*known* voxels of the reconstruction (never values filled by another element), so holes are
independent and are processed in parallel, deterministically.

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

Values are computed in float64 from the float64 (unrounded) reconstruction; the caller rounds
once at the end.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import ndimage

__all__ = ["HoleFillingStats", "fill_holes", "STICK_DIRECTIONS"]

_KIND = {"GAUSSIAN": 0, "GAUSSIAN_ACCUMULATION": 1, "DISTANCE_WEIGHT_INVERSE": 2, "NEAREST_NEIGHBOR": 3, "STICK": 4}

#: The 13 stick directions (di, dj, dk): axes, face diagonals, space diagonals (as PLUS).
STICK_DIRECTIONS = np.array(
    [
        (1, 0, 0), (0, 1, 0), (0, 0, 1),
        (1, 1, 0), (1, 0, 1), (0, 1, 1),
        (1, -1, 0), (1, 0, -1), (0, 1, -1),
        (1, 1, 1), (-1, 1, 1), (1, -1, 1), (-1, -1, 1),
    ],
    dtype=np.int64,
)


@dataclass(frozen=True)
class HoleFillingStats:
    """What hole filling did: holes before, filled per element, seconds."""

    holes: int
    filled_per_element: tuple
    seconds: float

    @property
    def filled(self) -> int:
        return int(sum(self.filled_per_element))

    def to_dict(self) -> dict:
        return {
            "holes": self.holes,
            "filled": self.filled,
            "filled_per_element": list(self.filled_per_element),
            "seconds": self.seconds,
        }


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


@njit(nogil=True, cache=True)
def _fill_cube(holes, values, known, weight, kernel, use_weight, ratio, ok):
    """GAUSSIAN / GAUSSIAN_ACCUMULATION / DISTANCE_WEIGHT_INVERSE for each hole."""
    nk, nj, ni, nc = values.shape
    size = kernel.shape[0]
    r = size // 2
    need = ratio * size * size * size
    sums = np.zeros(nc)
    for h in range(holes.shape[0]):
        idx = holes[h]
        k = idx // (nj * ni)
        j = (idx // ni) % nj
        i = idx % ni
        sw = 0.0
        count = 0
        for c in range(nc):
            sums[c] = 0.0
        for dz in range(-r, r + 1):
            kk = k + dz
            if kk < 0 or kk >= nk:
                continue
            for dy in range(-r, r + 1):
                jj = j + dy
                if jj < 0 or jj >= nj:
                    continue
                for dx in range(-r, r + 1):
                    ii = i + dx
                    if ii < 0 or ii >= ni or not known[kk, jj, ii]:
                        continue
                    w = kernel[dz + r, dy + r, dx + r]
                    if use_weight:
                        w *= weight[kk, jj, ii]
                    sw += w
                    count += 1
                    for c in range(nc):
                        sums[c] += w * values[kk, jj, ii, c]
        if sw > 0.0 and count > need:
            for c in range(nc):
                values[k, j, i, c] = sums[c] / sw
            ok[h] = True


@njit(nogil=True, cache=True)
def _fill_nearest(holes, values, known, size, ratio, ok):
    """NEAREST_NEIGHBOR: mean of the known voxels in the smallest cube that has any."""
    nk, nj, ni, nc = values.shape
    need = ratio * size * size * size
    sums = np.zeros(nc)
    for h in range(holes.shape[0]):
        idx = holes[h]
        k = idx // (nj * ni)
        j = (idx // ni) % nj
        i = idx % ni
        for r in range(1, size // 2 + 1):
            count = 0
            for c in range(nc):
                sums[c] = 0.0
            for kk in range(max(k - r, 0), min(k + r, nk - 1) + 1):
                for jj in range(max(j - r, 0), min(j + r, nj - 1) + 1):
                    for ii in range(max(i - r, 0), min(i + r, ni - 1) + 1):
                        if known[kk, jj, ii]:
                            count += 1
                            for c in range(nc):
                                sums[c] += values[kk, jj, ii, c]
            if count > 0:
                if count > need:
                    for c in range(nc):
                        values[k, j, i, c] = sums[c] / count
                    ok[h] = True
                break


@njit(nogil=True, cache=True, inline="always")
def _next_distance(nxt, known_next, limit):
    """Distance from v given the distance ``nxt`` from v + d (branch-free: 0 = none)."""
    grow = np.uint8((nxt >= 1) & (nxt < limit)) * np.uint8(nxt + 1)
    return np.uint8(known_next) | (np.uint8(1 - np.uint8(known_next)) * grow)


@njit(nogil=True, cache=True)
def _stick_distances(known, di, dj, dk, limit, out):
    """out[v] = steps (1 .. limit) to the nearest known voxel from v along (di, dj, dk), else 0.

    A recurrence along each line, visiting v + d before v; voxels whose neighbour v + d is
    outside the volume are 0. Rows are walked as slices with non-negative indices, so the
    inner loops vectorise (no index wrap-around checks).
    """
    nk, nj, ni = known.shape
    out[:] = 0
    k_first, k_last, k_step = (nk - 2, -1, -1) if dk > 0 else ((1, nk, 1) if dk < 0 else (0, nk, 1))
    j_first, j_last, j_step = (nj - 2, -1, -1) if dj > 0 else ((1, nj, 1) if dj < 0 else (0, nj, 1))
    i_lo = 0 if di >= 0 else 1
    i_hi = ni - 1 if di > 0 else ni
    n = i_hi - i_lo
    lim = np.uint8(limit)
    for k in range(k_first, k_last, k_step):
        for j in range(j_first, j_last, j_step):
            src_known = known[k + dk, j + dj, i_lo + di : i_hi + di]
            src_out = out[k + dk, j + dj, i_lo + di : i_hi + di]
            dst = out[k, j, i_lo:i_hi]
            if dk == 0 and dj == 0 and di > 0:
                for t in range(n - 1, -1, -1):  # along the row itself, against the direction
                    dst[t] = _next_distance(src_out[t], src_known[t], lim)
            else:
                for t in range(n):
                    dst[t] = _next_distance(src_out[t], src_known[t], lim)


@njit(nogil=True, cache=True)
def _stick_slab(known, todo, values, k0, k1, directions, length_limit, n_use, emulate, int_out, filled):
    """STICK for the holes of planes k0..k1-1, from distance scans over those planes + a halo.

    The nearest known voxel along each direction (and its opposite) is at most
    ``length_limit - 1`` steps away, so scanning ``length_limit - 1`` extra planes on both
    sides gives exact distances for the slab. Each hole then evaluates its 13 sticks in
    registers and keeps the best ``n_use`` (ties included).
    """
    nk, nj, ni, nc = values.shape
    nd = directions.shape[0]
    cap = length_limit - 1
    ks = max(0, k0 - cap)
    ke = min(nk, k1 + cap)
    sub = known[ks:ke]
    # One contiguous distance volume per direction and sense (the scans vectorise).
    dist = np.empty((2 * nd, ke - ks, nj, ni), dtype=np.uint8)
    for d in range(nd):
        di, dj, dk = directions[d, 0], directions[d, 1], directions[d, 2]
        _stick_distances(sub, di, dj, dk, cap, dist[2 * d])
        _stick_distances(sub, -di, -dj, -dk, cap, dist[2 * d + 1])
    weights = np.zeros((nd, length_limit + 1))
    for d in range(nd):
        step = math.sqrt(directions[d, 0] ** 2 + directions[d, 1] ** 2 + directions[d, 2] ** 2)
        for n in range(1, length_limit + 1):
            weights[d, n] = 1.0 / (n * step)
    # Weight of the forward end for (forward, reverse) distances.
    forward = np.zeros((length_limit + 1, length_limit + 1))
    for f in range(1, length_limit + 1):
        for r in range(1, length_limit + 1):
            forward[f, r] = (r + 1.0) / (f + r + 1) if emulate else r / (f + r)
    offsets = np.zeros(nd, dtype=np.int64)
    for d in range(nd):
        offsets[d] = directions[d, 2] * nj * ni + directions[d, 1] * ni + directions[d, 0]
    flat = values.reshape(-1, nc)
    stick_w = np.zeros(nd)
    stick_v = np.zeros((nd, nc))
    sums = np.zeros(nc)
    for k in range(k0, k1):
        z = k - ks
        for j in range(nj):
            for i in range(ni):
                if not todo[k, j, i]:
                    continue
                v = (k * nj + j) * ni + i
                sw = 0.0
                if n_use == 1:
                    # Pass 1: the best weight (distances only); pass 2: average the sticks
                    # that tie with it, in direction order, reading values only for those.
                    best = 0.0
                    for d in range(nd):
                        f = np.int64(dist[2 * d, z, j, i])
                        r = np.int64(dist[2 * d + 1, z, j, i])
                        if f == 0 or r == 0 or f + r + 1 > length_limit:
                            continue
                        w = weights[d, f + r + 1]
                        if w > best:
                            best = w
                    if best == 0.0:
                        continue
                    for c in range(nc):
                        sums[c] = 0.0
                    for d in range(nd):
                        f = np.int64(dist[2 * d, z, j, i])
                        r = np.int64(dist[2 * d + 1, z, j, i])
                        if f == 0 or r == 0 or f + r + 1 > length_limit:
                            continue
                        w = weights[d, f + r + 1]
                        if w != best:
                            continue
                        a = forward[f, r]
                        sw += w
                        for c in range(nc):
                            x = a * flat[v + f * offsets[d], c] + (1.0 - a) * flat[v - r * offsets[d], c]
                            if emulate and int_out:
                                x = math.floor(x)
                            sums[c] += w * x
                else:
                    any_stick = False
                    for d in range(nd):
                        stick_w[d] = 0.0
                        f = np.int64(dist[2 * d, z, j, i])
                        r = np.int64(dist[2 * d + 1, z, j, i])
                        if f == 0 or r == 0 or f + r + 1 > length_limit:
                            continue
                        stick_w[d] = weights[d, f + r + 1]
                        a = forward[f, r]
                        any_stick = True
                        for c in range(nc):
                            x = a * flat[v + f * offsets[d], c] + (1.0 - a) * flat[v - r * offsets[d], c]
                            stick_v[d, c] = math.floor(x) if (emulate and int_out) else x
                    if not any_stick:
                        continue
                    used = 0
                    for c in range(nc):
                        sums[c] = 0.0
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
                    flat[v, c] = sums[c] / sw
                filled[k, j, i] = True


def _fill_sticks_slabs(values, known, todo, element, emulate, int_out, n_threads, pool):
    """Run :func:`_stick_slab` over k-slabs (distance buffers of about 64 MiB per worker)."""
    nk, nj, ni, _ = values.shape
    cap = element.stick_length_limit - 1
    per_plane = 2 * STICK_DIRECTIONS.shape[0] * nj * ni
    depth = max(4 * cap, (64 * 1024 * 1024) // max(per_plane, 1) - 2 * cap)
    depth = max(1, min(depth, -(-nk // max(1, n_threads))))
    filled = np.zeros(known.shape, dtype=np.bool_)
    slabs = [(k, min(nk, k + depth)) for k in range(0, nk, depth)]
    args = (known, todo, values)
    tail = (STICK_DIRECTIONS, element.stick_length_limit, element.number_of_sticks_to_use, emulate, int_out, filled)
    if pool is None or len(slabs) == 1:
        for k0, k1 in slabs:
            _stick_slab(*args, k0, k1, *tail)
    else:
        futures = [pool.submit(_stick_slab, *args, k0, k1, *tail) for k0, k1 in slabs]
        for fut in futures:
            fut.result()
    return filled


def _near_known(known: np.ndarray, radius: int) -> np.ndarray:
    """Voxels with a known voxel within Chebyshev distance ``radius`` (cheap pre-filter)."""
    if radius <= 0:
        return known.copy()
    return ndimage.maximum_filter(known.view(np.uint8), size=2 * radius + 1, mode="constant", cval=0).astype(bool)


def _run_chunks(func, holes, n_threads, pool, *args):
    ok = np.zeros(holes.shape[0], dtype=np.bool_)
    if holes.shape[0] == 0:
        return ok
    n_chunks = max(1, min(n_threads * 4, holes.shape[0] // 2048))
    if n_threads <= 1 or n_chunks == 1:
        func(holes, *args, ok)
        return ok
    bounds = np.linspace(0, holes.shape[0], n_chunks + 1).astype(np.int64)
    futures = [
        pool.submit(func, holes[a:b], *args, ok[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ]
    for fut in futures:
        fut.result()
    return ok


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
    start = time.perf_counter()
    known = np.ascontiguousarray(known, dtype=np.bool_)
    holes = np.flatnonzero(~known).astype(np.int64)
    n_holes = int(holes.size)
    filled = np.zeros(known.shape, dtype=bool)
    per_element = []
    pool = ThreadPoolExecutor(max_workers=n_threads) if n_threads > 1 else None
    try:
        remaining = holes
        for element in elements:
            kind = _KIND[element.type]
            reach = element.stick_length_limit - 1 if kind == 4 else element.size // 2
            if remaining.size == 0 or reach < 1:
                per_element.append(0)
                continue
            if kind == 4:
                todo = np.zeros(known.shape, dtype=np.bool_)
                todo.reshape(-1)[remaining] = True
                stick_filled = _fill_sticks_slabs(
                    values, known, todo, element, bool(emulate_plus), bool(integer_values), n_threads, pool
                )
                candidates = remaining
                ok = stick_filled.reshape(-1)[remaining]
            elif kind == 3:
                candidates = remaining[_near_known(known, reach).reshape(-1)[remaining]]
                ok = _run_chunks(
                    _fill_nearest, candidates, n_threads, pool, values, known, element.size,
                    element.minimum_known_voxels_ratio,
                )
            else:
                candidates = remaining[_near_known(known, reach).reshape(-1)[remaining]]
                kernel = _cube_weights(kind, element.size, element.stdev)
                ok = _run_chunks(
                    _fill_cube, candidates, n_threads, pool, values, known, weight, kernel, kind == 1,
                    element.minimum_known_voxels_ratio,
                )
            done = candidates[ok]
            filled.reshape(-1)[done] = True
            per_element.append(int(done.size))
            if done.size:
                remaining = remaining[~filled.reshape(-1)[remaining]]
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return filled, HoleFillingStats(n_holes, tuple(per_element), time.perf_counter() - start)

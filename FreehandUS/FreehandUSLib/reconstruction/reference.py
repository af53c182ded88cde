"""A straightforward vectorised-numpy reconstruction, to check and benchmark the compiled kernels.

Same geometry and rules as :mod:`.kernels` (nearest voxel ``floor(p + 0.5)``, trilinear weights
``wx * (wy * wz)``, max/latest only where the trilinear weight is >= 1/8), written the obvious
way: per frame, every kept pixel's voxel indices as arrays, then ``np.bincount`` (mean),
``np.maximum.at`` (max) or fancy assignment (latest). Not used by the reconstruction itself.
"""

from __future__ import annotations

import numpy as np

from .masks import row_ranges_to_mask

__all__ = ["insert_frames_numpy", "fill_holes_reference"]


def insert_frames_numpy(
    frames: np.ndarray,
    matrices: np.ndarray,
    row_ranges: np.ndarray,
    shape,
    *,
    compounding: str = "mean",
    linear: bool = False,
    importance: np.ndarray | None = None,
    pixel_rejection_threshold: float | None = None,
):
    """Reconstruct with numpy only.

    Parameters
    ----------
    frames : (n, n_rows, n_cols[, n_channels]) uint8/float32
    matrices : (n, 3, 3) float64, pixel (x, y, 1) -> continuous voxel index (i, j, k)
    row_ranges : (n_rows, 4) int32 kept pixels (see :mod:`.masks`)
    shape : (n_k, n_j, n_i)
    compounding : "mean", "max", "latest" or "importance_mask"

    Returns
    -------
    acc : (n_k, n_j, n_i, n_channels) float64 (sums for mean, values for max/latest)
    weight : (n_k, n_j, n_i) float64
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    n, n_rows, n_cols, nc = frames.shape
    nk, nj, ni = (int(v) for v in shape)
    n_vox = nk * nj * ni
    acc = np.zeros((n_vox, nc))
    weight = np.zeros(n_vox)
    keep = row_ranges_to_mask(row_ranges, n_cols)
    ys, xs = np.nonzero(keep)
    for f in range(n):
        pix = frames[f][ys, xs].astype(np.float64)  # (m, nc)
        x, y = xs.astype(np.float64), ys.astype(np.float64)
        ok = np.ones(xs.size, dtype=bool)
        if pixel_rejection_threshold is not None:
            ok &= pix.sum(axis=1) >= pixel_rejection_threshold * nc
        scale = np.ones(xs.size)
        if compounding == "importance_mask":
            scale = importance[ys, xs].astype(np.float64)
            ok &= scale > 0
        m = matrices[f]
        p = [m[a, 0] * x + m[a, 1] * y + m[a, 2] for a in range(3)]
        if not linear:
            i, j, k = (np.floor(q + 0.5).astype(np.int64) for q in p)
            inside = ok & (i >= 0) & (i < ni) & (j >= 0) & (j < nj) & (k >= 0) & (k < nk)
            corners = [((k * nj + j) * ni + i, np.ones(xs.size), inside)]
        else:
            base = [np.floor(q).astype(np.int64) for q in p]
            frac = [q - b for q, b in zip(p, base)]
            corners = []
            for dk in (0, 1):
                for dj in (0, 1):
                    for di in (0, 1):
                        i, j, k = base[0] + di, base[1] + dj, base[2] + dk
                        wx = frac[0] if di else 1.0 - frac[0]
                        wy = frac[1] if dj else 1.0 - frac[1]
                        wz = frac[2] if dk else 1.0 - frac[2]
                        w = wx * (wy * wz)
                        inside = ok & (w > 0) & (i >= 0) & (i < ni) & (j >= 0) & (j < nj) & (k >= 0) & (k < nk)
                        if compounding in ("max", "latest"):
                            inside &= w >= 0.125
                        corners.append(((k * nj + j) * ni + i, w, inside))
        if compounding == "latest":
            # The last pixel (row, column order; corner order within a pixel) wins.
            order = np.arange(xs.size)
            idx = np.concatenate([c[0][c[2]] for c in corners])
            w = np.concatenate([c[1][c[2]] for c in corners])
            vals = np.concatenate([pix[c[2]] for c in corners])
            rank = np.concatenate([order[c[2]] * 8 + q for q, c in enumerate(corners)])
            sort = np.argsort(rank, kind="stable")
            idx, w, vals = idx[sort], w[sort], vals[sort]
            last = np.zeros(n_vox, dtype=np.int64) - 1
            np.maximum.at(last, idx, np.arange(idx.size))  # position of each voxel's last write
            hit = last >= 0
            acc[hit] = vals[last[hit]]
            weight += np.bincount(idx, weights=w, minlength=n_vox)
            continue
        for idx, w, inside in corners:
            idx, w, vals = idx[inside], w[inside], pix[inside]
            if compounding in ("mean", "importance_mask"):
                w = w * scale[inside]
                weight += np.bincount(idx, weights=w, minlength=n_vox)
                for c in range(nc):
                    acc[:, c] += np.bincount(idx, weights=w * vals[:, c], minlength=n_vox)
            else:  # max
                for c in range(nc):
                    col = acc[:, c]
                    first = np.full(n_vox, -np.inf)
                    np.maximum.at(first, idx, vals[:, c])
                    touched = np.isfinite(first)
                    new = np.where(weight == 0, first, np.maximum(col, first))
                    col[touched] = new[touched]
                weight += np.bincount(idx, weights=w, minlength=n_vox)
    return acc.reshape(nk, nj, ni, nc), weight.reshape(nk, nj, ni)


def fill_holes_reference(values, known, weight, elements, *, emulate_plus: bool = False, integer_values: bool = False):
    """Hole filling written the obvious way: each element over all remaining holes at once.

    The same rules as :mod:`.holefill` (see its docstring) and the same floating-point
    operations in the same order, so the compiled version must match it exactly: cube
    elements sum their neighbourhood in (dz, dy, dx) order, STICK finds the nearest known
    voxel along each direction by stepping out one voxel at a time and averages the best
    sticks in direction order. Slow (a pass over the holes per neighbour); for tests.

    Parameters
    ----------
    values : (n_k, n_j, n_i, n_channels) float
    known : (n_k, n_j, n_i) bool
    weight : (n_k, n_j, n_i) float
    elements : sequence of HoleFillingElement
    emulate_plus, integer_values : bool
        As in :func:`~.holefill.fill_holes`.

    Returns
    -------
    filled_values : (n_k, n_j, n_i, n_channels) float64
        A copy of ``values`` with the filled holes.
    filled : (n_k, n_j, n_i) bool
    """
    from .holefill import STICK_DIRECTIONS, _cube_weights, _plus_cube_weights, _plus_need, _stick_tables

    vals = np.array(values, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    wgt = np.asarray(weight, dtype=np.float64)
    shape = np.array(known.shape)
    nc = vals.shape[3]
    filled = np.zeros(known.shape, dtype=bool)
    kinds = {"GAUSSIAN": 0, "GAUSSIAN_ACCUMULATION": 1, "DISTANCE_WEIGHT_INVERSE": 2, "NEAREST_NEIGHBOR": 3, "STICK": 4}
    for element in elements:
        holes = np.argwhere(~known & ~filled)  # (m, 3) k, j, i
        if holes.size == 0:
            break
        kind = kinds[element.type]

        def neighbour(offset, holes=holes):
            p = holes + np.asarray(offset)
            inside = np.all((p >= 0) & (p < shape), axis=1)
            p = np.where(inside[:, None], p, 0)
            ok = inside & known[p[:, 0], p[:, 1], p[:, 2]]
            return p, ok

        sums = np.zeros((len(holes), nc))
        sw = np.zeros(len(holes))
        if kind == 4:
            limit = element.stick_length_limit
            wtab, ftab = _stick_tables(limit, emulate_plus)
            nd = len(STICK_DIRECTIONS)
            dist = np.zeros((2, nd, len(holes)), dtype=np.int64)
            steps_kji = STICK_DIRECTIONS[:, ::-1]  # (di, dj, dk) -> offsets in (k, j, i)
            for d, direction in enumerate(steps_kji):
                for side, sign in ((0, 1), (1, -1)):
                    for step in range(1, limit):
                        _, ok = neighbour(sign * step * direction)
                        new = ok & (dist[side, d] == 0)
                        dist[side, d][new] = step
            f, r = dist
            n = f + r + 1
            usable = (f > 0) & (r > 0) & (n <= limit)
            stick_w = np.where(usable, wtab[np.arange(nd)[:, None], np.minimum(n, limit)], 0.0)
            stick_v = np.zeros((nd, len(holes), nc))
            for d, direction in enumerate(steps_kji):
                a = ftab[np.minimum(f[d], limit), np.minimum(r[d], limit)]
                pf, _ = neighbour(np.outer(f[d], direction))
                pr, _ = neighbour(-np.outer(r[d], direction))
                x = a[:, None] * vals[pf[:, 0], pf[:, 1], pf[:, 2]] + (1.0 - a[:, None]) * vals[pr[:, 0], pr[:, 1], pr[:, 2]]
                stick_v[d] = np.floor(x) if (emulate_plus and integer_values) else x
            used = np.zeros(len(holes), dtype=np.int64)
            for _ in range(nd):
                top = stick_w.max(axis=0)
                active = (used < element.number_of_sticks_to_use) & (top > 0.0)
                for d in range(nd):
                    hit = active & (stick_w[d] == top)
                    sw = sw + np.where(hit, top, 0.0)
                    sums = sums + np.where(hit[:, None], top[:, None] * stick_v[d], 0.0)
                    used += hit
                    stick_w[d][hit] = 0.0
            ok = sw > 0.0
        elif kind == 3:
            size = element.size
            need = element.minimum_known_voxels_ratio * size * size * size
            if emulate_plus:
                need = _plus_need(element.minimum_known_voxels_ratio, size)
            ok = np.zeros(len(holes), dtype=bool)
            decided = np.zeros(len(holes), dtype=bool)
            for radius in range(1, size // 2 + 1):
                count = np.zeros(len(holes), dtype=np.int64)
                part = np.zeros((len(holes), nc))
                span = range(-radius, radius + 1)
                for dz in span:
                    for dy in span:
                        for dx in span:
                            p, hit = neighbour((dz, dy, dx))
                            count += hit
                            part = part + np.where(hit[:, None], vals[p[:, 0], p[:, 1], p[:, 2]], 0.0)
                now = ~decided & (count > 0)
                sums[now] = part[now]
                sw[now] = count[now]
                ok |= now & (count > need)
                decided |= now
        else:
            size = element.size
            r = size // 2
            if emulate_plus:  # PLUS: float32 kernel and ratio, sums over dx, then dy, then dz innermost
                kernel = _plus_cube_weights(kind, size, element.stdev)
                need = _plus_need(element.minimum_known_voxels_ratio, size)
                order = [(dz, dy, dx) for dx in range(-r, r + 1) for dy in range(-r, r + 1) for dz in range(-r, r + 1)]
            else:
                kernel = _cube_weights(kind, size, element.stdev)
                need = element.minimum_known_voxels_ratio * size * size * size
                order = [(dz, dy, dx) for dz in range(-r, r + 1) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
            count = np.zeros(len(holes), dtype=np.int64)
            for dz, dy, dx in order:
                p, hit = neighbour((dz, dy, dx))
                w = np.full(len(holes), kernel[dz + r, dy + r, dx + r])
                if kind == 1 and emulate_plus:  # PLUS: float32(buffer * kernel)
                    w = (wgt[p[:, 0], p[:, 1], p[:, 2]].astype(np.float32) * w.astype(np.float32)).astype(np.float64)
                elif kind == 1:
                    w = w * (wgt[p[:, 0], p[:, 1], p[:, 2]] * 1.0)
                count += hit
                sw = sw + np.where(hit, w, 0.0)
                sums = sums + np.where(hit[:, None], w[:, None] * vals[p[:, 0], p[:, 1], p[:, 2]], 0.0)
            ok = (count > need) & (sw > 0.0)
        idx = holes[ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            vals[idx[:, 0], idx[:, 1], idx[:, 2]] = sums[ok] / sw[ok][:, None]
        filled[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return vals, filled

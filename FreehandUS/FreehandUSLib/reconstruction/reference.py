"""A straightforward vectorised-numpy reconstruction, to check and benchmark the compiled kernels.

Same geometry and rules as :mod:`.kernels` (nearest voxel ``floor(p + 0.5)``, trilinear weights
``wx * (wy * wz)``, max/latest only where the trilinear weight is >= 1/8), written the obvious
way: per frame, every kept pixel's voxel indices as arrays, then ``np.bincount`` (mean),
``np.maximum.at`` (max) or fancy assignment (latest). Not used by the reconstruction itself.
"""

from __future__ import annotations

import numpy as np

from .masks import row_ranges_to_mask

__all__ = ["insert_frames_numpy"]


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

"""Batch reconstruction a slab of k-planes at a time: accumulators for a few planes, not the volume.

A batch reconstruction knows all its frames up front, so it does not need accumulators for
the whole grid at once. The grid's k-planes are processed in order, a slab at a time: every
frame that reaches the slab is inserted (only its pixels that land in the slab's planes), the
slab's planes are turned into output voxels, and the accumulators are reused for the next
slab. Each voxel still receives its pixels in the same order (frame, row, column), so the
volume is bit-identical to accumulating the whole grid at once.

Hole filling reads known voxels up to :func:`~.holefill.hole_filling_reach` planes away, so
the accumulators also keep the last ``2 * reach`` planes of the previous slab: after slab
``[k0, k1)`` is inserted, the holes of planes ``[k0 - reach, k1 - reach)`` have all their
neighbours at hand and are filled.

Peak memory is then the output volumes (and the coverage map, if asked for) plus the slab
buffers, which :func:`plan_slabs` keeps under half the output volumes' bytes or
:data:`MIN_SLAB_BYTES`, whichever is larger (and at least a few planes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SlabPlan", "plan_slabs", "slab_budget_bytes", "frame_plane_ranges", "MIN_SLAB_BYTES", "SLAB_OUTPUT_FRACTION"]

#: Slab buffers may always use this much, about one batch of 32 frames of 820 x 616 pixels:
#: thin slabs cost time (rows are clipped per slab, trilinear cells straddle slab borders,
#: hole filling re-reads its reach at every slab) and save nothing that matters.
MIN_SLAB_BYTES = 16 * 2**20
#: Otherwise the slab buffers stay under this fraction of the output volumes' bytes.
SLAB_OUTPUT_FRACTION = 0.5
#: Fewest new planes per slab: below this, rows crossing slab borders dominate the work (a
#: trilinear cell spans two planes).
_MIN_CORE_NEAREST, _MIN_CORE_LINEAR = 4, 8


@dataclass(frozen=True)
class SlabPlan:
    """How a grid of ``n_k`` planes is cut into slabs.

    Attributes
    ----------
    edges : (n_slabs + 1,) int
        Slab ``s`` inserts planes ``edges[s] .. edges[s + 1] - 1``.
    keep : int
        Planes carried over from the previous slab for hole filling (``2 * reach``).
    reach : int
        Hole filling's reach in planes (0 without hole filling).
    buffer_planes : int
        Planes the slab buffers hold (the largest slab plus ``keep``).
    """

    edges: tuple
    keep: int
    reach: int
    buffer_planes: int

    @property
    def n_slabs(self) -> int:
        return len(self.edges) - 1


def plan_slabs(n_k: int, plane_voxels: int, acc_bytes_per_voxel: int, out_bytes_per_voxel: int, *, linear: bool,
               reach: int = 0, budget_bytes: int | None = None) -> SlabPlan:
    """Cut ``n_k`` planes into slabs whose buffers fit the budget.

    Parameters
    ----------
    n_k : int
        Planes in the grid.
    plane_voxels : int
        Voxels per plane (``n_j * n_i``).
    acc_bytes_per_voxel : int
        Bytes of the accumulators per voxel (sums of every channel + weight, + 1 for the
        known-voxel mask when filling holes).
    out_bytes_per_voxel : int
        Bytes of the output volumes per voxel (all channels).
    linear : bool
        Trilinear interpolation (slabs of at least 8 planes, else 4).
    reach : int
        Hole filling's reach in planes (0: no hole filling).
    budget_bytes : int, optional
        Slab buffer budget; default ``max(MIN_SLAB_BYTES, SLAB_OUTPUT_FRACTION * output bytes)``.

    Returns
    -------
    SlabPlan
    """
    n_k = int(n_k)
    reach = max(0, int(reach))
    keep = 2 * reach
    plane_bytes = max(1, int(plane_voxels) * int(acc_bytes_per_voxel))
    if budget_bytes is None:
        budget_bytes = slab_budget_bytes(n_k * int(plane_voxels) * out_bytes_per_voxel)
    core = max(_MIN_CORE_LINEAR if linear else _MIN_CORE_NEAREST, int(budget_bytes) // plane_bytes - keep)
    if core + keep >= n_k:
        return SlabPlan((0, n_k), 0, reach, n_k)  # one slab: the whole grid, nothing to carry over
    n_slabs = math.ceil(n_k / core)
    edges = tuple(int(e) for e in np.linspace(0, n_k, n_slabs + 1).round().astype(np.int64))
    largest = max(b - a for a, b in zip(edges[:-1], edges[1:]))
    return SlabPlan(edges, keep, reach, min(n_k, largest + keep))


def slab_budget_bytes(output_bytes: int) -> int:
    """The slab buffers' budget for outputs of ``output_bytes``: half of them, at least :data:`MIN_SLAB_BYTES`."""
    return int(max(MIN_SLAB_BYTES, SLAB_OUTPUT_FRACTION * int(output_bytes)))


def frame_plane_ranges(voxel_matrices: np.ndarray, corners_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k-planes each frame can put pixels into (a safe superset).

    Parameters
    ----------
    voxel_matrices : (n, 3, 3) float64
        Pixel (x, y, 1) -> continuous voxel index (i, j, k).
    corners_px : (4, 2) float
        The kept image rectangle's corners (x, y), pixels; every kept pixel lies inside.

    Returns
    -------
    first, last : (n,) int64
        Planes ``first .. last`` (unclipped) cover every nearest voxel and trilinear corner.
    """
    pts = np.concatenate([np.asarray(corners_px, dtype=np.float64), np.ones((len(corners_px), 1))], axis=1)
    k = np.einsum("nc,pc->np", voxel_matrices[:, 2, :], pts)
    return np.floor(k.min(axis=1)).astype(np.int64) - 1, np.ceil(k.max(axis=1)).astype(np.int64) + 1

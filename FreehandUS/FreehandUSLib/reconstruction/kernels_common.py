"""What the insertion kernels (:mod:`.kernels`, :mod:`.kernels_plus`, :mod:`.native`) share, without numba.

The compounding mode codes, PLUS's fixed-point scale and 16-bit accumulation buffer constants,
the accumulator types, the pixel -> voxel matrices and the workers' plane ranges: everything the
reconstructor needs before and around an insertion, importable without numba (a process whose
insertion runs on the C kernels never loads it). Constants from here are built into the
compiled kernels that use them, and numba's cache checks only the source file of the kernel it
compiled: after editing a constant here, clear the cache (``__pycache__/*.nbi``, ``*.nbc`` of
this package, or ``NUMBA_CACHE_DIR``) so the kernel modules are compiled again.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "MODE_MEAN",
    "MODE_MAX",
    "MODE_LATEST",
    "MODE_IMPORTANCE",
    "MODE_MEAN_PLUS",
    "MODE_CODES",
    "FIXED_POINT_SCALE",
    "SUM_LIMIT_UINT8",
    "COUNT_LIMIT",
    "accumulator_types",
    "pixels_per_voxel_bound",
    "default_threads",
    "voxel_matrices",
    "run_workers",
]

MODE_MEAN, MODE_MAX, MODE_LATEST, MODE_IMPORTANCE, MODE_MEAN_PLUS = 0, 1, 2, 3, 4
MODE_CODES = {"mean": MODE_MEAN, "max": MODE_MAX, "latest": MODE_LATEST, "importance_mask": MODE_IMPORTANCE}
#: PLUS's fixed point (14 fractional bits) used when emulating PLUS's arithmetic.
FIXED_POINT_SCALE = 16384.0
#: PLUS's 16-bit accumulation buffer: +256 per nearest-neighbour hit, saturating.
_PLUS_UNIT, _PLUS_THRESHOLD, _PLUS_MAXIMUM = 256.0, 65279.0, 65535.0
_MIN_LINEAR_WEIGHT = 0.125  # PLUS: max/latest act only on voxels with trilinear weight >= 1/8


#END

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
    if (emulate_plus or mode == MODE_MEAN_PLUS) and mode != MODE_IMPORTANCE:
        # PLUS's own buffers: the output type for the values, its 16-bit accumulation buffer.
        return frame_dtype, np.dtype(np.uint16), None
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


def run_workers(work, n_workers: int, executor=None) -> None:
    """Call ``work(g)`` for ``g`` in ``0 .. n_workers - 1`` on threads and wait for all of them.

    On ``executor`` when given (kept open: live reconstruction reuses it), else on a pool made
    for this call. The first worker's exception is raised.
    """
    own = executor is None
    pool = ThreadPoolExecutor(max_workers=n_workers) if own else executor
    try:
        futures = [pool.submit(work, g) for g in range(n_workers)]
        for fut in futures:
            fut.result()
    finally:
        if own:
            pool.shutdown(wait=True)

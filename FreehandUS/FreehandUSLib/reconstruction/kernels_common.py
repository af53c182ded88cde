"""What the insertion kernels (:mod:`.kernels`) and PLUS's emulated ones (:mod:`.kernels_plus`) share.

The compounding mode codes, PLUS's fixed-point scale and 16-bit accumulation buffer constants,
and the pixel-rejection test. Compiled functions and constants from here are built into the
kernels that use them, and numba's cache checks only the source file of the kernel it
compiled: after editing this file, clear the cache (``__pycache__/*.nbi``, ``*.nbc`` of this
package, or ``NUMBA_CACHE_DIR``) so the two kernel modules are compiled again.
"""

from __future__ import annotations

from numba import njit

__all__ = [
    "MODE_MEAN",
    "MODE_MAX",
    "MODE_LATEST",
    "MODE_IMPORTANCE",
    "MODE_MEAN_PLUS",
    "MODE_CODES",
    "FIXED_POINT_SCALE",
]

MODE_MEAN, MODE_MAX, MODE_LATEST, MODE_IMPORTANCE, MODE_MEAN_PLUS = 0, 1, 2, 3, 4
MODE_CODES = {"mean": MODE_MEAN, "max": MODE_MAX, "latest": MODE_LATEST, "importance_mask": MODE_IMPORTANCE}
#: PLUS's fixed point (14 fractional bits) used when emulating PLUS's arithmetic.
FIXED_POINT_SCALE = 16384.0
#: PLUS's 16-bit accumulation buffer: +256 per nearest-neighbour hit, saturating.
_PLUS_UNIT, _PLUS_THRESHOLD, _PLUS_MAXIMUM = 256.0, 65279.0, 65535.0
_MIN_LINEAR_WEIGHT = 0.125  # PLUS: max/latest act only on voxels with trilinear weight >= 1/8


@njit(nogil=True, cache=True, inline="always")
def _rejected(frames, f, y, x, nc, reject):
    s = 0.0
    for c in range(nc):
        s += frames[f, y, x, c]
    return s < reject * nc

"""The emulated nearest-neighbour span kernel against PLUS's rule written out pixel by pixel.

:func:`kernels_plus._nearest_span_fixed` finds each row's pixels inside the volume from exact
integer bounds and runs specialised loops (grey max / latest / mean with a reciprocal
multiply). Here a plain per-pixel transcription of PLUS's optimized nearest-neighbour paste
(position in units of 2**-14, cell ``(p + 2**13) >> 14``, bounds tested per pixel, the 16-bit
accumulation buffer) is the reference: random rows that enter and leave the volume through
every face, with zero, positive and negative slopes, skip segments, worker plane ranges,
uint8 and uint16 frames, one and three channels, a reject level, and buffers that start empty,
part full, saturated or (as no nearest insertion makes them) not a multiple of 256.
"""

from __future__ import annotations

import numpy as np
import pytest

from FreehandUSLib.reconstruction import kernels as K
from FreehandUSLib.reconstruction import kernels_plus


def _reference_span(frames, f, y, xa, xb, s0, s1, b, a, acc, weight, klo, khi, mode, use_reject, reject):
    """PLUS's nearest-neighbour insertion of row ``y``, pixels ``xa..xb`` minus ``s0..s1``,
    one pixel at a time in Python integers (integer output types)."""
    nk, nj, ni, nc = acc.shape
    bq = [int(np.int64(v * 16384.0)) + 8192 for v in b]
    aq = [int(np.int64(v * 16384.0)) for v in a]
    inserted = 0
    for x in range(xa, xb + 1):
        if s0 <= x <= s1:
            continue
        ii, jj, kk = ((bq[d] + x * aq[d]) >> 14 for d in range(3))
        if not (klo <= kk <= khi and 0 <= ii < ni and 0 <= jj < nj):
            continue
        values = [int(frames[f, y, x, c]) for c in range(nc)]
        if use_reject and sum(values) < reject * nc:
            continue
        if mode == K.MODE_MEAN_PLUS:
            buf = int(weight[kk, jj, ii])
            if buf <= 65279:
                for c in range(nc):
                    acc[kk, jj, ii, c] = (values[c] * 256 + int(acc[kk, jj, ii, c]) * buf) // (buf + 256)
                weight[kk, jj, ii] = min(buf + 256, 65535)
            else:  # saturated: new/256 + old*255/256 on the first channel only
                acc[kk, jj, ii, 0] = (values[0] + 255 * int(acc[kk, jj, ii, 0])) >> 8
        else:
            for c in range(nc):
                if mode == K.MODE_LATEST or values[c] > acc[kk, jj, ii, c]:
                    acc[kk, jj, ii, c] = values[c]
            weight[kk, jj, ii] = 256
        inserted += 1
    return inserted


def _random_case(rng, dtype, nc):
    shape = (int(rng.integers(3, 9)), int(rng.integers(3, 9)), int(rng.integers(3, 9)))  # k, j, i
    top = 255 if dtype == np.uint8 else 65535
    frames = rng.integers(0, top + 1, size=(2, 4, 120, nc)).astype(dtype)
    acc = rng.integers(0, top + 1, size=(*shape, nc)).astype(dtype)
    kind = rng.integers(0, 4)
    if kind == 0:
        weight = np.zeros(shape, np.uint16)
    elif kind == 1:
        weight = (rng.integers(0, 256, size=shape) * 256).astype(np.uint16)  # k hits, some saturated
    elif kind == 2:
        weight = rng.choice(np.array([65279, 65280, 65535, 65024], np.uint16), size=shape)
    else:
        weight = rng.integers(0, 65536, size=shape).astype(np.uint16)  # arbitrary buffers
    if rng.random() < 0.5:  # on a lattice: positions land exactly on cell boundaries (x.5 in voxels)
        slope = lambda: float(rng.integers(-5, 6)) / 16.0  # noqa: E731
        b = tuple(float(rng.integers(-64, 16 * n + 48)) / 16.0 for n in (shape[2], shape[1], shape[0]))
    else:
        slope = lambda: float(rng.choice([0.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.02, 0.02)]))  # noqa: E731
        # Start outside or inside the volume so rows cross its faces at either end.
        b = tuple(float(rng.uniform(-4.0, n + 3.0)) for n in (shape[2], shape[1], shape[0]))
    a = (slope(), slope(), slope())
    # Multiples of 2**-14 as the reconstructor makes them (its matrices are rounded to PLUS's fixed point).
    a = tuple(np.round(np.array(a) * 16384.0) / 16384.0)
    b = tuple(np.round(np.array(b) * 16384.0) / 16384.0)
    xa, xb = sorted(int(v) for v in rng.integers(0, 120, size=2))
    if rng.random() < 0.5:
        s0, s1 = sorted(int(v) for v in rng.integers(xa, xb + 1, size=2))
    else:
        s0, s1 = 0, -1
    klo = int(rng.integers(0, shape[0]))
    khi = int(rng.integers(klo, shape[0])) if rng.random() < 0.5 else shape[0] - 1
    return frames, acc, weight, a, b, xa, xb, s0, s1, klo, khi


@pytest.mark.parametrize("mode", [K.MODE_MEAN_PLUS, K.MODE_MAX, K.MODE_LATEST], ids=["mean", "max", "latest"])
@pytest.mark.parametrize("dtype, nc", [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3)], ids=["u8", "u16", "rgb"])
def test_nearest_span_fixed_matches_plus_pixel_by_pixel(mode, dtype, nc):
    rng = np.random.default_rng(2024 + mode * 10 + nc + (dtype == np.uint16))
    for case in range(150):
        frames, acc, weight, a, b, xa, xb, s0, s1, klo, khi = _random_case(rng, dtype, nc)
        use_reject = bool(case % 5 == 4)
        reject = float(rng.integers(0, 200))
        y, f = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        want_acc, want_weight = acc.copy(), weight.copy()
        want = _reference_span(frames, f, y, xa, xb, s0, s1, b, a, want_acc, want_weight, klo, khi, mode,
                               use_reject, reject)
        got = kernels_plus._nearest_span_fixed(frames, f, y, xa, xb, s0, s1, b[0], b[1], b[2], a[0], a[1], a[2], acc,
                                               weight, klo, khi, mode, use_reject, reject, True)
        assert got == want, f"case {case}: {got} pixels inserted, PLUS inserts {want}"
        np.testing.assert_array_equal(acc, want_acc, err_msg=f"case {case}: values")
        np.testing.assert_array_equal(weight, want_weight, err_msg=f"case {case}: accumulation buffer")


def test_reciprocal_table_divides_exactly():
    """``(n * M[d]) >> 32 == n // d`` for every 16-bit numerator and divisor 1..256."""
    n = np.arange(65536, dtype=np.int64)
    for d in range(1, 257):
        np.testing.assert_array_equal((n * kernels_plus._RECIPROCAL_32[d]) >> 32, n // d, err_msg=f"divisor {d}")

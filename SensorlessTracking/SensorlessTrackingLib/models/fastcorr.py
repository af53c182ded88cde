"""CPU kernel for :func:`~.common.pair_correlation`: the same float32 numbers, faster.

Used at inference and in training (the correlation carries no gradient).

:func:`~.common.pair_correlation` pools 3 x 25 shifted products of every frame pair with
``avg_pool2d`` on one-channel images (about 70 % of the shipped model's CPU time). Its
correlations are *not* well conditioned: in dark, nearly flat windows the variances are
float32 rounding noise (clamped at 1e-6) and the correlation is a ratio of two rounding
errors, to which the model's output is sensitive (~1e-3 on PLUS SpinePhantomFreehand when the
correlation is computed in float64). A faster but merely *accurate* method would therefore change
the results. This kernel instead repeats the float32 operations of the torch code in the same
order (``avg_pool2d`` sums the valid pixels of a window row by row into a float32 accumulator and
divides by their count; then ``(mean(a s) - mean(a) mean(s)) / sqrt(var(a) var(s))`` with the
variances clamped at 1e-6), fused, with the frame pairs as the innermost (SIMD) axis. No fast-math:
every product and sum is rounded as in torch; the final square root and division run in torch,
whose vectorised sqrt is not always correctly rounded, so a value may differ by one ulp (tested:
within 2.5e-7 relative, flat windows included; an accurate float64 computation is not).

numba is optional: without it (or for tensors that are not float32 on the CPU)
:func:`pair_correlation_fast` calls the torch implementation.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F

from .common import pair_correlation

__all__ = ["pair_correlation_fast", "compiled_kernel"]

log = logging.getLogger(__name__)


def _kernel(a, nbp, radius, window, stride, pad, num, den):  # pragma: no cover - compiled by numba
    """a (h, w, L) frames, nbp (h + 2r, w + 2r, L) replicate-padded next frames (L = frame pairs)
    -> num, den (K, oh, ow, L): covariance and product of the clamped variances per shift."""
    h, w, n_lanes = a.shape
    oh, ow = num.shape[1], num.shape[2]
    d = 2 * radius + 1
    eps = np.float32(1e-6)
    acc = np.zeros((5, n_lanes), dtype=np.float32)
    for oy in range(oh):
        y0 = oy * stride - pad
        y1 = min(y0 + window, h)
        y0 = max(y0, 0)
        for ox in range(ow):
            x0 = ox * stride - pad
            x1 = min(x0 + window, w)
            x0 = max(x0, 0)
            count = np.float32((y1 - y0) * (x1 - x0))
            acc[:2] = 0
            # avg_pool2d: the window's valid pixels, row by row, into a float32 sum / count
            for y in range(y0, y1):
                for x in range(x0, x1):
                    av = a[y, x]
                    for q in range(n_lanes):
                        v = av[q]
                        acc[0, q] += v
                        acc[1, q] += v * v
            for dy in range(d):
                for dx in range(d):
                    k = dy * d + dx
                    acc[2:] = 0
                    for y in range(y0, y1):
                        for x in range(x0, x1):
                            av = a[y, x]
                            sv = nbp[y + dy, x + dx]
                            for q in range(n_lanes):
                                s = sv[q]
                                acc[2, q] += s
                                acc[3, q] += s * s
                                acc[4, q] += av[q] * s
                    for q in range(n_lanes):
                        ma = acc[0, q] / count
                        va = max(acc[1, q] / count - ma * ma, eps)
                        ms = acc[2, q] / count
                        vs = max(acc[3, q] / count - ms * ms, eps)
                        num[k, oy, ox, q] = acc[4, q] / count - ma * ms
                        den[k, oy, ox, q] = va * vs


@functools.lru_cache(maxsize=1)
def compiled_kernel():
    """The numba-compiled kernel (cached on disk by numba), or None without numba."""
    try:
        from numba import njit
    except ImportError:  # numba is a FreehandUS dependency, but the torch path works without it
        log.info("numba is not installed: the pair correlation runs in torch (slower, same result)")
        return None
    return njit(nogil=True, cache=True)(_kernel)


def pair_correlation_fast(frames: torch.Tensor, radius: int, window: int, stride: int, gap: int = 1) -> torch.Tensor:
    """:func:`~.common.pair_correlation` on the CPU, faster: same arguments, same output (to 1 ulp).

    frames : (B, T, H, W) float32 -> (B, (2 radius + 1)^2, T, H', W') float32 (frame ``t``
    correlated with frame ``t + gap``; the last ``gap`` frames of each clip get zeros), with
    H' = (H + 2 p - window) // stride + 1, p = (window - stride) // 2.
    """
    kernel = compiled_kernel()
    if (
        kernel is None
        or frames.dtype != torch.float32
        or frames.device.type != "cpu"
        or frames.dim() != 4
        or frames.shape[1] <= gap
        or frames.requires_grad
        or int(gap) < 1
    ):
        return pair_correlation(frames, radius, window, stride, gap)
    with torch.no_grad():
        b, t, h, w = frames.shape
        pad = (window - stride) // 2
        oh = (h + 2 * pad - window) // stride + 1
        ow = (w + 2 * pad - window) // stride + 1
        # lanes = (clip, pair) in the order of the torch code's reshape(-1, 1, h, w)
        a = frames[:, :-gap].reshape(-1, h, w).permute(1, 2, 0).contiguous().numpy()
        nb = frames[:, gap:].reshape(-1, 1, h, w)
        nbp = F.pad(nb, (radius, radius, radius, radius), mode="replicate")[:, 0].permute(1, 2, 0).contiguous().numpy()
        k = (2 * radius + 1) ** 2
        num = np.empty((k, oh, ow, a.shape[2]), dtype=np.float32)
        den = np.empty_like(num)
        kernel(a, nbp, int(radius), int(window), int(stride), int(pad), num, den)
        # the square root in torch, like the torch code (its vectorised sqrt is not always
        # correctly rounded: this keeps most values bit-identical, the rest within 1 ulp)
        corr = torch.from_numpy(num) / torch.sqrt(torch.from_numpy(den))
        corr = corr.reshape(k, oh, ow, b, t - gap).permute(3, 0, 4, 1, 2)
        result = torch.zeros((b, k, t, oh, ow), dtype=torch.float32)
        result[:, :, : t - gap] = corr
        return result

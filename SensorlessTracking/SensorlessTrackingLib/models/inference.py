"""A faster, inference-only twin of DualTrack's :class:`~.dualtrack.LocalEncoder`.

:class:`FastLocalEncoder` computes what ``LocalEncoder.eval()`` computes, from the same weights,
arranged for the CPU:

- batch norms folded into the convolution before them (eval mode: an affine map per channel);
- every feature map kept as frames x rows x cols x channels (``channels_last``, the frames of all
  clips as one batch), so that the spatial ``(1, k, k)`` convolutions run as 2D convolutions, the
  3-frame stem as one 2D convolution over the stacked neighbours ``(t - 1, t, t + 1)``, the
  temporal ``(3, 1, 1)`` convolutions as 2D ``(3, 1)`` convolutions over (frames, pixels) and the
  strided 1x1 shortcuts as matrix products (torch's ``Conv3d`` has no fast CPU path for those
  shapes);
- the pair correlation from :func:`~.fastcorr.pair_correlation_fast`.

Only the order of float32 additions changes (about 1e-6 relative); the correlation, whose
flat-window values are sensitive to rounding, is computed exactly as in training. Build one per
model with :func:`fast_local_encoder` (None when the model has another architecture).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fastcorr import pair_correlation_fast

__all__ = ["FastLocalEncoder", "fast_local_encoder"]


def _fold(conv, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` (eval mode) as one convolution (float64 arithmetic)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight.float().contiguous(), bias.float().contiguous()


class _Block:
    """A folded :class:`~.common.Block2Plus1d` on (B, T, H, W, C) channels-last features."""

    def __init__(self, block):
        if tuple(block.spatial.kernel_size) != (1, 3, 3) or tuple(block.temporal.kernel_size) != (3, 1, 1):
            raise ValueError("FastLocalEncoder supports Block2Plus1d with (1, 3, 3) and (3, 1, 1) kernels only")
        self.stride = int(block.spatial.stride[1])
        w, self.b_spatial = _fold(block.spatial, block.bn1)
        self.w_spatial = w[:, :, 0].contiguous(memory_format=torch.channels_last)  # (C_out, C_in, 3, 3)
        w, self.b_temporal = _fold(block.temporal, block.bn2)  # (C, C, 3, 1, 1)
        self.w_temporal = w[..., 0].contiguous(memory_format=torch.channels_last)  # (C, C, 3, 1)
        w, self.b_short = _fold(block.short[0], block.short[1])
        self.w_short = w[:, :, 0, 0, 0].t().contiguous()  # (C_in, C_out)
        self.short_stride = int(block.short[0].stride[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c_in = x.shape
        x2d = x.reshape(b * t, h, w, c_in).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        y = F.conv2d(x2d, self.w_spatial, self.b_spatial, stride=self.stride, padding=1).relu_()
        y = y.permute(0, 2, 3, 1)  # (N, h', w', C): contiguous for a channels_last result
        n, hh, ww, c = y.shape
        # the temporal convolution as a 2D one over (frames, pixels) of each clip
        yv = y.reshape(b, t, hh * ww, c).permute(0, 3, 1, 2)
        out = F.conv2d(yv, self.w_temporal, self.b_temporal, padding=(1, 0)).permute(0, 2, 3, 1)
        out = out.reshape(b, t, hh, ww, c)
        s = self.short_stride
        short = torch.matmul(x[:, :, ::s, ::s, :], self.w_short)
        out += short
        out += self.b_short
        return out.relu_()  # (B, T, h', w', C_out), contiguous


class FastLocalEncoder:
    """``LocalEncoder.eval()`` on the CPU, faster (see the module docstring).

    ``encoder(frames)`` : (B, T, H, W) float32 normalised clips -> (B, T, token_dim) tokens.
    """

    def __init__(self, local):
        conv, bn = local.stem[0], local.stem[1]
        if tuple(conv.kernel_size) != (3, 5, 5) or tuple(conv.stride) != (1, 2, 2) or tuple(conv.padding) != (1, 2, 2):
            raise ValueError("FastLocalEncoder supports the (3, 5, 5) stride-(1, 2, 2) stem only")
        w, self.b_stem = _fold(conv, bn)  # (C, 1, 3, 5, 5)
        self.w_stem = w[:, 0].contiguous(memory_format=torch.channels_last)  # input channels = frames t-1, t, t+1
        self.first = _Block(local.first)
        self.blocks = [_Block(blk) for blk in local.blocks]
        self.pair_radius = int(local.pair_radius)
        self.pair_gaps = tuple(local.pair_gaps)
        weight = local.proj.weight.detach()  # (D, C * 16), features ordered (c, i, j)
        d = weight.shape[0]
        c = weight.shape[1] // 16
        # reorder to the (i, j, c) order of pooled channels-last features
        self.w_proj = weight.reshape(d, c, 16).permute(2, 1, 0).reshape(16 * c, d).contiguous()
        self.b_proj = local.proj.bias.detach().clone()

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, h, w = frames.shape
        padded = F.pad(frames, (0, 0, 0, 0, 1, 1))  # zero frames before and after the clip
        stack = torch.stack([padded[:, 0:t], padded[:, 1 : t + 1], padded[:, 2 : t + 2]], dim=-1)
        stack = stack.reshape(b * t, h, w, 3).permute(0, 3, 1, 2)  # channels_last
        x = F.conv2d(stack, self.w_stem, self.b_stem, stride=2, padding=2).relu_()
        x = x.permute(0, 2, 3, 1)
        x = self.first(x.reshape(b, t, *x.shape[1:]))  # (B, T, h, w, C)
        if self.pair_radius > 0:
            corr = torch.cat([pair_correlation_fast(frames, self.pair_radius, 8, 4, gap) for gap in self.pair_gaps],
                             dim=1)  # (B, K * gaps, T, h, w)
            x = torch.cat([x, corr.permute(0, 2, 3, 4, 1)], dim=-1)
        for block in self.blocks:
            x = block(x)
        bb, tt, hh, ww, c = x.shape
        pooled = F.adaptive_avg_pool2d(x.reshape(bb * tt, hh, ww, c).permute(0, 3, 1, 2), (4, 4))
        pooled = pooled.permute(0, 2, 3, 1).reshape(bb, tt, 16 * c)
        return torch.addmm(self.b_proj, pooled.reshape(bb * tt, -1), self.w_proj).reshape(bb, tt, -1)


def fast_local_encoder(model):
    """A :class:`FastLocalEncoder` for a DualTrack ``model``; None for other models/layouts."""
    local = getattr(model, "local", None)
    if local is None or type(local).__name__ != "LocalEncoder":
        return None
    try:
        return FastLocalEncoder(local)
    except (ValueError, AttributeError, IndexError):
        return None

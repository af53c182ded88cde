"""``moglo``: motion from global-local attention features and feature correlation, integrated by
an LSTM (after MoGLo-Net, Lee et al., IEEE TMI 2025).

- a ResNet-style encoder per frame (shared weights) -> feature maps at 1/8 resolution;
- global-local attention on each map: multi-head self-attention over all positions (global)
  added to a depthwise 3x3 convolution (local);
- the correlation (cost volume) between consecutive feature maps over displacements up to
  ``corr_radius`` cells, plus both maps, -> a small CNN -> one motion feature per pair;
- an LSTM over the pairs of the (overlapping) clip -> 6 DoF per pair.

The motion-weighted loss that goes with it is in :mod:`..losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ResBlock2d, ScaledOutput, normalise_clip
from .config import ModelConfig

__all__ = ["MoGLo", "GlobalLocalAttention", "local_correlation"]


def local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Cost volume: ``<a(p), b(p + d)> / C`` for all ``|d|_inf <= radius``.

    a, b : (N, C, H, W) -> (N, (2 radius + 1)^2, H, W)
    """
    n, c, h, w = a.shape
    bp = F.pad(b, (radius, radius, radius, radius))
    out = []
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out.append((a * bp[:, :, dy : dy + h, dx : dx + w]).mean(dim=1))
    return torch.stack(out, dim=1)


class GlobalLocalAttention(nn.Module):
    """x + MHSA(x) (all positions) + depthwise 3x3 conv(x), on a (N, C, H, W) map."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        heads = heads if channels % heads == 0 else 1
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.local = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels)

    def forward(self, x):
        n, c, h, w = x.shape
        seq = self.norm(x.flatten(2).transpose(1, 2))
        g, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + g.transpose(1, 2).reshape(n, c, h, w) + self.local(x)


class MoGLo(nn.Module):
    """``forward(frames)``: (B, T, H, W) float32 -> (B, T - 1, 6) frame-to-frame poses."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config.channels
        depth = min(3, len(c) - 1)  # 1/8 resolution feature maps
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c[0], 5, 2, 2, bias=False),
            nn.BatchNorm2d(c[0]),
            nn.ReLU(),
            *[ResBlock2d(c[i], c[i + 1], stride=2 if i < depth - 1 else 1) for i in range(depth)],
        )
        fc = c[depth]
        self.attention = GlobalLocalAttention(fc, config.heads)
        r = config.corr_radius
        n_corr = (2 * r + 1) ** 2
        self.motion = nn.Sequential(
            nn.Conv2d(n_corr + 2 * fc, 64, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 96, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(96 * 16, config.token_dim),
            nn.ReLU(),
        )
        self.lstm = nn.LSTM(config.token_dim, config.lstm_hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * config.lstm_hidden, 6)
        self.out = ScaledOutput(config.target_scale)

    def forward(self, frames: torch.Tensor, **context) -> torch.Tensor:
        b, t, h, w = frames.shape
        x = normalise_clip(frames).reshape(b * t, 1, h, w)
        feats = self.attention(self.encoder(x))
        _, c, fh, fw = feats.shape
        feats = feats.reshape(b, t, c, fh, fw)
        a = feats[:, :-1].reshape(b * (t - 1), c, fh, fw)
        nb = feats[:, 1:].reshape(b * (t - 1), c, fh, fw)
        corr = local_correlation(a, nb, self.config.corr_radius)
        m = self.motion(torch.cat([corr, a, nb], dim=1)).reshape(b, t - 1, -1)
        y, _ = self.lstm(m)
        return self.out(self.head(y))

"""``pairwise``: the TUS-REC baseline idea -- two stacked frames -> one 6-DoF transform."""

from __future__ import annotations

import torch
from torch import nn

from .common import ResBlock2d, ScaledOutput, normalise_clip
from .config import ModelConfig

__all__ = ["Pairwise"]


class Pairwise(nn.Module):
    """A 2D ResNet over the two frames of each consecutive pair, stacked as channels.

    ``forward(frames)``: (B, T, rows, cols) float32 -> (B, T - 1, 6) frame-to-frame poses
    (mm, deg). Pairs are independent (no temporal context beyond the pair).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.stem = nn.Sequential(nn.Conv2d(2, c[0], 5, 2, 2, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU())
        self.blocks = nn.Sequential(*[ResBlock2d(c[i], c[i + 1]) for i in range(len(c) - 1)])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c[-1] * 16, config.token_dim), nn.ReLU(), nn.Linear(config.token_dim, 6)
        )
        self.out = ScaledOutput(config.target_scale)

    def forward(self, frames: torch.Tensor, **context) -> torch.Tensor:
        b, t, h, w = frames.shape
        pairs = torch.stack([frames[:, :-1], frames[:, 1:]], dim=2).reshape(b * (t - 1), 2, h, w)
        pairs = normalise_clip(pairs)
        y = self.head(self.pool(self.blocks(self.stem(pairs))))
        return self.out(y.reshape(b, t - 1, 6))

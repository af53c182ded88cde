"""Building blocks shared by the tracking models (torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["normalise_clip", "pair_correlation", "PositionEncoding", "ResBlock2d", "Block2Plus1d", "MotionHead", "ScaledOutput"]


def normalise_clip(frames: torch.Tensor) -> torch.Tensor:
    """Standardise each clip (mean 0, std 1 over its frames and pixels).

    Gain and dynamic range act on log-compressed frames as an affine map, so this makes every
    model blind to them. ``frames``: (batch, T, rows, cols) -> same shape.
    """
    dims = tuple(range(1, frames.dim()))
    mean = frames.mean(dim=dims, keepdim=True)
    std = frames.std(dim=dims, keepdim=True).clamp_min(1e-3)
    return (frames - mean) / std


def pair_correlation(frames: torch.Tensor, radius: int, window: int, stride: int, gap: int = 1) -> torch.Tensor:
    """Local normalised cross-correlation of each frame with the one ``gap`` frames later.

    For every displacement ``d`` with ``|d|_inf <= radius`` pixels and every ``window`` x
    ``window`` patch (taken every ``stride`` pixels), the Pearson correlation of frame ``t``
    with frame ``t + gap`` shifted by ``d``. Its peak value is the local speckle decorrelation
    (elevational motion), its position the in-plane motion. The last ``gap`` frames get zeros
    (all frames, when the clip has no more than ``gap`` frames).

    frames : (B, T, H, W) -> (B, (2 radius + 1)^2, T, H / stride, W / stride), no gradient.
    """
    if int(gap) < 1:
        raise ValueError(f"pair_correlation: gap must be >= 1 frame, got {gap}")
    with torch.no_grad():
        b, t, h, w = frames.shape
        if t <= gap:
            pad = (window - stride) // 2
            out_hw = ((h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1)
            return frames.new_zeros((b, (2 * radius + 1) ** 2, t, *out_hw))
        a = frames[:, :-gap].reshape(-1, 1, h, w)
        nb = frames[:, gap:].reshape(-1, 1, h, w)

        def pool(x):
            return F.avg_pool2d(x, window, stride, padding=(window - stride) // 2, count_include_pad=False)

        mean_a = pool(a)
        var_a = (pool(a * a) - mean_a**2).clamp_min(1e-6)
        padded = F.pad(nb, (radius, radius, radius, radius), mode="replicate")
        out = []
        for dy in range(2 * radius + 1):
            for dx in range(2 * radius + 1):
                s = padded[:, :, dy : dy + h, dx : dx + w]
                mean_s = pool(s)
                var_s = (pool(s * s) - mean_s**2).clamp_min(1e-6)
                out.append((pool(a * s) - mean_a * mean_s) / torch.sqrt(var_a * var_s))
        corr = torch.cat(out, dim=1)  # (B*(T-gap), K, h', w')
        k, hh, ww = corr.shape[1:]
        corr = corr.reshape(b, t - gap, k, hh, ww)
        corr = torch.cat([corr, torch.zeros_like(corr[:, :1]).expand(-1, gap, -1, -1, -1)], dim=1)
        return corr.permute(0, 2, 1, 3, 4).contiguous()


class PositionEncoding(nn.Module):
    """Sinusoidal encoding of a frame's position in its sweep (0..1) -> ``dim`` features."""

    def __init__(self, dim: int, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freq", (2.0 ** torch.arange(n_freq, dtype=torch.float32)) * math.pi / 4, persistent=False)
        self.proj = nn.Linear(2 * n_freq, dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, dim)
        x = pos[..., None] * self.freq
        return self.proj(torch.cat([torch.sin(x), torch.cos(x)], dim=-1))


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with batch norm and a (strided) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


class Block2Plus1d(nn.Module):
    """(2+1)D block: a strided 3x3 spatial convolution, then a 3-frame temporal convolution
    (stride 1, 'same' padding: no temporal downsampling), with a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.spatial = nn.Conv3d(c_in, c_out, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), 1, (1, 0, 0), bias=False)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.short = nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, (1, stride, stride), bias=False), nn.BatchNorm3d(c_out)
        )

    def forward(self, x):  # (B, C, T, H, W)
        y = torch.relu(self.bn1(self.spatial(x)))
        y = self.bn2(self.temporal(y))
        return torch.relu(y + self.short(x))


class MotionHead(nn.Module):
    """Per-pair regression from the features of frames ``t`` and ``t + 1`` -> 6 numbers."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T-1, 6)
        a, b = tokens[:, :-1], tokens[:, 1:]
        return self.net(torch.cat([a, b, b - a], dim=-1))


class ScaledOutput(nn.Module):
    """Multiplies normalised predictions by ``target_scale`` (a buffer saved with the model)."""

    def __init__(self, target_scale):
        super().__init__()
        self.register_buffer("scale", torch.tensor(target_scale, dtype=torch.float32))

    def forward(self, x):
        return x * self.scale

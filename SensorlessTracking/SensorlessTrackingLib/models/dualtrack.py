"""``dualtrack``: local spatiotemporal + global sweep context (after DualTrack, 2025).

- **Local encoder**: dense (2+1)D convolutions over the clip at the model's full resolution
  (a 3D stem, then blocks of strided spatial + stride-1 temporal convolutions: no temporal
  downsampling), pooled to a 4 x 4 grid and projected to one token per frame.
- **Global encoder**: a 2D CNN on frames downsampled to ``global_size``, taken every k-th frame
  of the *whole* sweep (at most ``max_global_tokens``), plus temporal self-attention.
- **Fusion**: cross-attention from the local tokens to the global tokens (both carry their
  position in the sweep), then a per-pair motion head -> 6 DoF per consecutive pair.

``use_global=False`` is the local-only ablation (same local encoder and head, no fusion).
``global_drop`` > 0 trains that share of the clips without the fusion (drop-path), so the motion
head cannot rely on the global tokens alone; inference always fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Block2Plus1d, MotionHead, PositionEncoding, ResBlock2d, ScaledOutput, normalise_clip
from .config import ModelConfig
from .fastcorr import pair_correlation_fast

__all__ = ["DualTrack", "LocalEncoder", "GlobalEncoder"]


class LocalEncoder(nn.Module):
    """(B, T, H, W) -> (B, T, token_dim): one token per frame, temporal resolution kept.

    With ``pair_radius > 0`` the local correlation of each frame with the frames ``pair_gaps``
    later (:func:`~.common.pair_correlation`, at 1/4 resolution, one set of channels per gap)
    joins the features after the first block: a speckle-decorrelation cue the network would
    otherwise have to learn to compute.
    It is computed by :func:`~.fastcorr.pair_correlation_fast` in training too: the
    correlation has no gradient, and that kernel gives the torch code's float32 numbers (to 1 ulp)
    faster on the CPU, where the torch code was most of a training step's time with three gaps
    (on a GPU it falls back to the torch code).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.pair_radius = int(config.pair_radius)
        self.pair_gaps = tuple(config.pair_gaps)
        n_pair = len(self.pair_gaps) * (2 * self.pair_radius + 1) ** 2 if self.pair_radius > 0 else 0
        self.stem = nn.Sequential(
            nn.Conv3d(1, c[0], (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False), nn.BatchNorm3d(c[0]), nn.ReLU()
        )
        widths = [c[0], c[1] + n_pair, *c[2:]]
        self.first = Block2Plus1d(c[0], c[1])
        self.blocks = nn.Sequential(*[Block2Plus1d(widths[i], c[i + 1]) for i in range(1, len(c) - 1)])
        self.proj = nn.Linear(c[-1] * 16, config.token_dim)

    def forward(self, frames):
        x = self.first(self.stem(frames[:, None]))  # (B, C, T, H/4, W/4)
        if self.pair_radius > 0:
            corr = [pair_correlation_fast(frames, self.pair_radius, 8, 4, gap) for gap in self.pair_gaps]
            x = torch.cat([x, *corr], dim=1)
        x = self.blocks(x)  # (B, C, T, h, w)
        x = F.adaptive_avg_pool3d(x, (x.shape[2], 4, 4))
        b, c, t = x.shape[:3]
        x = x.permute(0, 2, 1, 3, 4).reshape(b, t, c * 16)
        return self.proj(x)


class GlobalEncoder(nn.Module):
    """(B, G, g, g) downsampled sweep frames + positions (B, G) -> (B, G, token_dim)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.cnn = nn.Sequential(
            nn.Conv2d(1, c[0], 5, 2, 2, bias=False),
            nn.BatchNorm2d(c[0]),
            nn.ReLU(),
            *[ResBlock2d(c[i], c[i + 1]) for i in range(len(c) - 1)],
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c[-1] * 4, config.token_dim),
        )
        self.pos = PositionEncoding(config.token_dim)
        layer = nn.TransformerEncoderLayer(
            config.token_dim, config.heads, 2 * config.token_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.attention = nn.TransformerEncoder(layer, config.global_layers, enable_nested_tensor=False)

    def forward(self, frames, positions):
        b, g, h, w = frames.shape
        tokens = self.cnn(frames.reshape(b * g, 1, h, w)).reshape(b, g, -1)
        return self.attention(tokens + self.pos(positions))


class DualTrack(nn.Module):
    """See the module docstring.

    ``forward(frames, positions=None, global_frames=None, global_positions=None)``:

    - frames : (B, T, H, W) float32 clip at the model spacing
    - positions : (B, T) position of each clip frame in its sweep, 0..1 (default: 0.5)
    - global_frames : (B, G, g, g) float32 every k-th frame of the whole sweep, downsampled
    - global_positions : (B, G) their positions, 0..1

    Returns (B, T - 1, 6) frame-to-frame poses (mm, deg).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.token_dim
        self.local = LocalEncoder(config)
        self.head = MotionHead(d)
        self.out = ScaledOutput(config.target_scale)
        if config.use_global:
            self.global_encoder = GlobalEncoder(config)
            self.local_pos = PositionEncoding(d)
            self.cross = nn.MultiheadAttention(d, config.heads, batch_first=True)
            self.norm1 = nn.LayerNorm(d)
            self.norm2 = nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def encode_global(self, global_frames, global_positions):
        """Global tokens (B, G, D) of a sweep; computed once per sweep at inference."""
        return self.global_encoder(normalise_clip(global_frames), global_positions)

    def forward(self, frames, positions=None, global_frames=None, global_positions=None, global_tokens=None):
        tokens = self.local(normalise_clip(frames))
        if self.config.use_global and global_tokens is None:
            if global_frames is None:
                raise ValueError("dualtrack with use_global=True needs global_frames (or global_tokens)")
            if global_positions is None:
                g = global_frames.shape[1]
                global_positions = torch.linspace(0, 1, g, device=frames.device).expand(frames.shape[0], g)
            global_tokens = self.encode_global(global_frames, global_positions)
        return self.decode(tokens, positions, global_tokens)

    def decode(self, tokens, positions=None, global_tokens=None):
        """Local tokens (B, T, D) (+ global tokens (B, G, D), positions (B, T)) -> (B, T - 1, 6) poses.

        The part of :meth:`forward` after the local encoder (fusion and motion head).
        """
        if self.config.use_global:
            if global_tokens is None:
                raise ValueError("dualtrack with use_global=True needs global_tokens to decode")
            if positions is None:
                positions = torch.full(tokens.shape[:2], 0.5, device=tokens.device)
            q = self.norm1(tokens + self.local_pos(positions))
            fused, _ = self.cross(q, global_tokens, global_tokens, need_weights=False)
            if self.training and self.config.global_drop > 0:
                fused = fused * self._keep_mask(fused)
            tokens = tokens + fused
            tokens = tokens + self.ffn(self.norm2(tokens))
        return self.out(self.head(tokens))

    def _keep_mask(self, fused):
        """(B, 1, 1) per-clip drop-path mask of the global fusion, scaled so its mean is 1."""
        p = self.config.global_drop
        keep = torch.rand(fused.shape[0], 1, 1, device=fused.device) >= p
        return keep.to(fused.dtype) / (1.0 - p)

"""Training losses and differentiable pose maths (torch); conventions of :mod:`.pose`.

The loss of a clip has three parts (weights in :class:`LossConfig`):

- **parameters**: smooth-L1 between predicted and true frame-to-frame parameters, each divided
  by the model's ``target_scale``. With ``motion_weighted`` (the MoGLo-style loss) each pair
  is weighted by ``1 + alpha * |motion| / mean |motion|`` over the batch, so the fast frames,
  which make most of the drift, are not drowned by the many slow ones;
- **points**: mean distance (mm) between the image corners + centre moved by the predicted and
  by the true frame-to-frame transform (the TUS-REC corner-point loss);
- **accumulated**: the same point distance for every frame relative to the first frame of the
  clip, composing the predicted transforms (penalises drift inside the clip);
- **cumulative** (off by default): smooth-L1 of the running sums of the scaled parameter errors,
  ``S_k = sum_{i<=k} (pred_i - true_i) / scale`` divided by ``sqrt(k)``, for ``k = 1 .. T-1``.
  Errors that are independent from frame to frame keep the size of the per-frame term, while
  errors that persist (a rotation shrunk towards zero frame after frame, a scale bias) grow as
  ``sqrt(k)``: the loss then weights the low-frequency error that makes the drift of a whole
  sweep. The per-frame minimum of the parameter loss under uncertainty shrinks weakly visible
  motions (out-of-plane rotations) towards their mean; that shrinkage is a persistent error
  and this term penalises it. Longer training clips (``TrainConfig.clip_length``) lengthen the
  horizon of the sums.

``component_weights`` weight the six parameters (tx, ty, tz, rx, ry, rz) in the parameter and
cumulative terms (normalised to mean 1, so the default of ones gives the plain mean).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

__all__ = [
    "LossConfig",
    "params_to_matrix",
    "compose_relative",
    "corner_points_mm",
    "point_distance",
    "cumulative_error",
    "tracking_loss",
]


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (see the module docstring).

    Attributes
    ----------
    param_weight : weight of the smooth-L1 of the scaled frame-to-frame parameters
    point_weight : weight of the frame-to-frame corner-point distance (mm)
    accumulated_weight : weight of the clip-accumulated corner-point distance (mm), divided by
        the number of pairs
    motion_weighted, motion_alpha : MoGLo-style weighting of the parameter term by motion size
    cumulative_weight : weight of the cumulative (running-sum) parameter term; 0 = off (the
        shipped model's recipe)
    component_weights : six weights (tx, ty, tz, rx, ry, rz) of the parameter and cumulative
        terms, >= 0, normalised to mean 1
    """

    param_weight: float = 1.0
    point_weight: float = 0.5
    accumulated_weight: float = 0.25
    motion_weighted: bool = False
    motion_alpha: float = 1.0
    cumulative_weight: float = 0.0
    component_weights: tuple[float, ...] = field(default=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0))

    def __post_init__(self):
        if not (math.isfinite(self.cumulative_weight) and self.cumulative_weight >= 0):
            raise ValueError(f"LossConfig.cumulative_weight must be a finite number >= 0, got {self.cumulative_weight}")
        w = tuple(float(v) for v in self.component_weights)
        if len(w) != 6 or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
            raise ValueError(
                "LossConfig.component_weights must be 6 finite numbers >= 0 (tx, ty, tz, rx, ry, rz), not all 0, "
                f"got {self.component_weights}"
            )
        object.__setattr__(self, "component_weights", w)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["component_weights"] = list(self.component_weights)
        return d


def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([z, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], z, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )


def params_to_matrix(params: torch.Tensor) -> torch.Tensor:
    """(..., 6) (mm, rotation vector in degrees) -> (..., 4, 4) rigid, differentiable."""
    rot = torch.linalg.matrix_exp(_skew(params[..., 3:] * (math.pi / 180.0)))
    top = torch.cat([rot, params[..., :3, None]], dim=-1)
    bottom = torch.zeros(params.shape[:-1] + (1, 4), dtype=params.dtype, device=params.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def compose_relative(f2f: torch.Tensor) -> torch.Tensor:
    """(B, T-1, 4, 4) frame-to-frame -> (B, T-1, 4, 4) frames 1..T-1 relative to frame 0."""
    out = []
    acc = None
    for i in range(f2f.shape[1]):
        acc = f2f[:, i] if acc is None else acc @ f2f[:, i]
        out.append(acc)
    return torch.stack(out, dim=1)


def corner_points_mm(image_size, spacing_mm: float, device=None) -> torch.Tensor:
    """(4, 5) homogeneous corners + centre of the model input in its centred image-mm frame."""
    rows, cols = image_size
    hx = 0.5 * (cols - 1) * spacing_mm
    hy = 0.5 * (rows - 1) * spacing_mm
    pts = torch.tensor(
        [[-hx, hx, -hx, hx, 0.0], [-hy, -hy, hy, hy, 0.0], [0.0] * 5, [1.0] * 5], dtype=torch.float32, device=device
    )
    return pts


def point_distance(a: torch.Tensor, b: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Mean distance between ``a @ points`` and ``b @ points``; a, b (..., 4, 4)."""
    d = ((a - b)[..., :3, :] @ points).pow(2).sum(dim=-2)
    return (d + 1e-12).sqrt().mean()


def cumulative_error(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Running sums of the scaled parameter errors, each divided by the square root of its length.

    Parameters
    ----------
    pred, target : (B, T-1, 6) float32 frame-to-frame parameters (mm, deg)
    scale : (6,) float32 target scale (mm, deg)

    Returns
    -------
    (B, T-1, 6) float32, dimensionless: entry ``k - 1`` is
    ``sum_{i<=k} (pred_i - target_i) / scale / sqrt(k)``
    """
    e = (pred - target) / scale
    k = torch.arange(1, e.shape[1] + 1, dtype=e.dtype, device=e.device).sqrt()
    return e.cumsum(dim=1) / k[:, None]


def tracking_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, points: torch.Tensor, cfg: LossConfig):
    """Loss of a batch of clips (see the module docstring).

    pred, target : (B, T-1, 6) frame-to-frame parameters (mm, deg)
    scale : (6,) target scale; points : (4, m) homogeneous points in mm

    Returns the scalar loss and a dict of its parts (floats, for logging).
    """
    weights = None
    if any(w != 1.0 for w in cfg.component_weights):
        weights = torch.tensor(cfg.component_weights, dtype=pred.dtype, device=pred.device)
        weights = weights / weights.mean()
    err = torch.nn.functional.smooth_l1_loss(pred / scale, target / scale, reduction="none", beta=0.5)
    err = (err if weights is None else err * weights).mean(dim=-1)
    if cfg.motion_weighted:
        motion = (target / scale).norm(dim=-1)
        weight = 1.0 + cfg.motion_alpha * motion / motion.mean().clamp_min(1e-6)
        weight = weight / weight.mean()
        param = (weight * err).mean()
    else:
        param = err.mean()
    loss = cfg.param_weight * param
    parts = {"param": float(param.detach())}
    if cfg.cumulative_weight > 0:
        cum = cumulative_error(pred, target, scale)
        cum = torch.nn.functional.smooth_l1_loss(cum, torch.zeros_like(cum), reduction="none", beta=0.5)
        cum = (cum if weights is None else cum * weights).mean()
        loss = loss + cfg.cumulative_weight * cum
        parts["cumulative"] = float(cum.detach())
    if cfg.point_weight > 0 or cfg.accumulated_weight > 0:
        mp = params_to_matrix(pred)
        mt = params_to_matrix(target)
        if cfg.point_weight > 0:
            pts = point_distance(mp, mt, points)
            loss = loss + cfg.point_weight * pts
            parts["points_mm"] = float(pts.detach())
        if cfg.accumulated_weight > 0 and pred.shape[1] > 1:
            acc = point_distance(compose_relative(mp), compose_relative(mt), points)
            loss = loss + cfg.accumulated_weight * acc / pred.shape[1]
            parts["accumulated_mm"] = float(acc.detach())
    return loss, parts

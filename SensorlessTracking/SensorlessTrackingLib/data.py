"""Training data: tracked sequences -> model-resolution sweeps -> augmented clips.

Any tracked sequence FreehandUS reads (PLUS ``.igs.mha``/``.igs.nrrd``, Slicer ``.seq.nrrd``,
TUS-REC ``.h5``) can train a model once its per-frame ``ImageToReference`` is known: directly,
or through ``ImageToProbe`` (in the file, given as a matrix, or from a PLUS config) and
``ProbeToReference``/``ProbeToTracker`` (+ ``ReferenceToTracker``). Without a Reference the
Tracker frame is used.

:func:`prepare_sweep` resamples the frames to the model's pixel spacing (spacing taken from
ImageToReference, so any probe depth and image size works) and centres them in a fixed-size
canvas; the per-frame absolute poses (image-mm frame, :mod:`.pose`) come along.
:class:`ClipDataset` draws clips with augmentations: reversed sweeps (frames backwards with the
poses mirrored across the image plane, so the elevational direction convention is kept, see
:func:`~.pose.mirror_z`), frame dropping, horizontal flip (with the matching mirror of the
poses), crop jitter, gain/contrast.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import cv2
import numpy as np

from FreehandUSLib.errors import SequenceError, TransformError

from .conventions import column_mirror, image_handedness
from .pose import absolute_to_frame_to_frame, matrices_to_params, mirror_x, mirror_z, mm_to_pixel, rigid, translate

__all__ = [
    "ClipItem",
    "AugmentConfig",
    "PreparedSweep",
    "image_to_reference_of",
    "pixel_spacing_of",
    "resample_frames",
    "prepare_sweep",
    "load_sweep",
    "split_by_group",
    "ClipDataset",
    "clip_targets",
]

log = logging.getLogger(__name__)


class ClipItem(TypedDict):
    """One training sample (torch tensors, float32).

    frames : (T, rows, cols) model input, grey levels / 255, model spacing
    targets : (T - 1, 6) true frame-to-frame poses (mm, deg) in the clip's image-mm frames
    positions : (T,) position of each frame in its sweep, 0..1 (after reversal)
    global_frames : (G, g, g) every k-th frame of the whole sweep, downsampled, / 255
    global_positions : (G,) their positions, 0..1
    """

    frames: object
    targets: object
    positions: object
    global_frames: object
    global_positions: object


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (probabilities and ranges)."""

    reverse: float = 0.5
    flip: float = 0.5
    drop: float = 0.3  # probability that a clip skips frames (steps of 1-3 frames)
    max_step: int = 3
    crop_jitter_px: int = 8
    gain: float = 0.25  # multiplicative gain range +-
    offset: float = 0.1  # additive offset range +- (fraction of full scale)

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = AugmentConfig(reverse=0.0, flip=0.0, drop=0.0, crop_jitter_px=0, gain=0.0, offset=0.0)


def image_to_reference_of(sequence, *, image_to_probe=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ImageToReference of a tracked sequence and its validity.

    ``image_to_probe`` (4x4) overrides / supplies the calibration. Resolution order:
    ``ImageToReference`` in the file; else ImageToProbe + a chain to ``Reference``; else to
    ``Tracker``.

    Returns
    -------
    matrices : (n, 4, 4) float64 (NaN where invalid), valid : (n,) bool

    Raises
    ------
    TransformError
        No chain from Image to Reference or Tracker (names what is missing).
    """
    if image_to_probe is None and "ImageToReference" in sequence.transforms:
        ft = sequence.transforms["ImageToReference"]
        mats = np.where(ft.valid[:, None, None], ft.matrices, np.nan)
        return mats, ft.valid.copy()
    fixed = {}
    if image_to_probe is not None:
        fixed["ImageToProbe"] = np.asarray(image_to_probe, dtype=np.float64)
    items = sequence.transform_items()
    if image_to_probe is not None:
        items.pop("ImageToProbe", None)
        items.pop("ImageToReference", None)
    from FreehandUSLib.transforms import TransformRepository

    repo = TransformRepository(items, fixed=fixed, n_frames=sequence.n_frames)
    for target in ("ImageToReference", "ImageToTracker"):
        if repo.has(target):
            mats = repo.get(target)
            return mats, np.all(np.isfinite(mats), axis=(1, 2))
    raise TransformError(
        "cannot find ImageToReference: the sequence needs ImageToReference, or ImageToProbe (give "
        "--image-to-probe / a PLUS config) and ProbeToReference or ProbeToTracker; it has "
        f"{', '.join(sequence.transform_names) or 'no transforms'}"
    )


def pixel_spacing_of(image_to_reference: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Pixel spacing (sx, sy) mm: lengths of the first two columns of the first valid matrix."""
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        raise TransformError("no frame has a valid ImageToReference: the pixel spacing is unknown")
    m = image_to_reference[idx[0]]
    sx, sy = float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1]))
    if not (sx > 0 and sy > 0):
        raise TransformError(f"ImageToReference has a zero pixel spacing ({sx}, {sy})")
    return sx, sy


def resample_frames(frames, spacing_mm, target_spacing_mm: float, canvas: tuple[int, int]) -> np.ndarray:
    """Resample frames to ``target_spacing_mm`` and centre them in a ``canvas`` (rows, cols).

    The centre of the input (pixel ``((cols-1)/2, (rows-1)/2)``) lands on the canvas centre;
    content beyond the canvas is cut, missing content is 0. Downsampling is anti-aliased.

    Parameters
    ----------
    frames : (n, rows, cols) uint8 or float32
    spacing_mm : (sx, sy) of the input

    Returns
    -------
    (n, canvas_rows, canvas_cols), same dtype
    """
    f = np.asarray(frames)
    if f.ndim != 3:
        raise SequenceError(f"frames must be (n, rows, cols) (one channel), got shape {f.shape}")
    n, rows, cols = f.shape
    sx, sy = spacing_mm
    fx, fy = target_spacing_mm / sx, target_spacing_mm / sy  # input pixels per output pixel
    ch, cw = canvas
    m = np.array(
        [
            [fx, 0.0, (cols - 1) / 2.0 - fx * (cw - 1) / 2.0],
            [0.0, fy, (rows - 1) / 2.0 - fy * (ch - 1) / 2.0],
        ]
    )
    out = np.empty((n, ch, cw), dtype=f.dtype)
    blur = (0.45 * math.sqrt(max(fx * fx - 1, 0)), 0.45 * math.sqrt(max(fy * fy - 1, 0)))
    smooth = blur[0] > 0.3 or blur[1] > 0.3
    sigma = (max(blur[0], 0.01), max(blur[1], 0.01))
    roi = smooth and f.dtype == np.uint8
    if roi:
        # Blur only the input pixels the canvas samples (plus the kernel's reach) and place them in
        # a full-size buffer: warpAffine then reads exactly the values a full-image blur gives
        # (uint8 only: OpenCV's float blur may round differently on a differently sized image).
        reach = [int(math.ceil(4.0 * sg)) + 2 for sg in sigma]
        xs = (m[0, 2], m[0, 2] + fx * (cw - 1))
        ys = (m[1, 2], m[1, 2] + fy * (ch - 1))
        x0 = min(max(int(math.floor(xs[0])) - 1, 0), cols)
        x1 = max(min(int(math.ceil(xs[1])) + 2, cols), x0)
        y0 = min(max(int(math.floor(ys[0])) - 1, 0), rows)
        y1 = max(min(int(math.ceil(ys[1])) + 2, rows), y0)
        bx0, bx1 = max(x0 - reach[0], 0), min(x1 + reach[0], cols)
        by0, by1 = max(y0 - reach[1], 0), min(y1 + reach[1], rows)
        buffer = np.zeros((rows, cols), dtype=f.dtype)
    for i in range(n):
        img = f[i]
        if roi:
            if x1 > x0 and y1 > y0:
                part = cv2.GaussianBlur(np.ascontiguousarray(img[by0:by1, bx0:bx1]), (0, 0), sigmaX=sigma[0], sigmaY=sigma[1])
                buffer[y0:y1, x0:x1] = part[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
            img = buffer  # (all zeros when the canvas lies outside the image)
        elif smooth:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma[0], sigmaY=sigma[1])
        out[i] = cv2.warpAffine(
            img, m, (cw, ch), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return out


@dataclass(eq=False)
class PreparedSweep:
    """One tracked sweep at the model's resolution.

    Attributes
    ----------
    frames : (n, rows, cols) uint8, model spacing, centred canvas (model size + 2 * margin)
    global_frames : (n, g, g) uint8, the central model-size region downsampled to ``g``
    poses : (n, 4, 4) float64 absolute image-mm poses, origin at the canvas centre (rigid)
    spacing_mm : model pixel spacing
    name : where it came from
    group : subject / split group
    source_spacing_mm : (sx, sy) of the original frames
    """

    frames: np.ndarray
    global_frames: np.ndarray
    poses: np.ndarray
    spacing_mm: float
    name: str = ""
    group: str = ""
    source_spacing_mm: tuple[float, float] = (0.0, 0.0)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    f = frames.astype(np.float32)
    lo, hi = np.nanpercentile(f, [0.5, 99.5])
    return np.clip((f - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)


def prepare_sweep(
    frames,
    image_to_reference,
    valid=None,
    *,
    model_spacing_mm: float,
    image_size: tuple[int, int],
    global_size: int = 64,
    margin_px: int = 0,
    name: str = "",
    group: str = "",
) -> PreparedSweep:
    """Resample a tracked sweep for a model (see the module docstring).

    Parameters
    ----------
    frames : (n, rows, cols) uint8 or float32, MF
    image_to_reference : (n, 4, 4) float64 pixel -> Reference mm
    valid : (n,) bool or None; invalid frames are dropped
    model_spacing_mm, image_size : the model's input geometry
    margin_px : extra canvas on every side (room for crop jitter)

    A mirrored ``image_to_reference`` (det < 0) is prepared as its right-handed equivalent:
    frames mirrored left-right, calibration mirrored with them (:mod:`.conventions`).

    Raises
    ------
    SequenceError
        Fewer than 2 valid frames, or frames that are not one-channel (n, rows, cols).
    TransformError
        Frames of both handednesses.
    """
    f = np.asarray(frames)
    if f.ndim == 4 and f.shape[-1] == 1:
        f = f[..., 0]
    if f.ndim != 3:
        raise SequenceError(f"{name or 'sequence'}: frames must be (n, rows, cols) one channel, got {f.shape}")
    m = np.asarray(image_to_reference, dtype=np.float64)
    if valid is None:
        valid = np.all(np.isfinite(m), axis=(1, 2))
    valid = np.asarray(valid, dtype=bool)
    if valid.sum() < 2:
        raise SequenceError(f"{name or 'sequence'}: needs at least 2 frames with a valid pose, got {int(valid.sum())}")
    if not valid.all():
        log.warning("%s: dropping %d frames without a valid pose", name or "sequence", int((~valid).sum()))
    f = _as_uint8(f[valid])
    m = m[valid]
    rows, cols = f.shape[1:]
    if image_handedness(m) < 0:
        # a mirrored calibration (det < 0): train in the right-handed frame the estimation uses
        # (:mod:`.conventions`): the frames mirrored left-right with the calibration
        f = np.ascontiguousarray(f[:, :, ::-1])
        m = m @ column_mirror(cols)
    spacing = pixel_spacing_of(m, np.ones(len(m), dtype=bool))
    canvas = (image_size[0] + 2 * margin_px, image_size[1] + 2 * margin_px)
    out = resample_frames(f, spacing, model_spacing_mm, canvas)
    centre = ((cols - 1) / 2.0, (rows - 1) / 2.0)
    poses = rigid(m @ mm_to_pixel(spacing, centre))
    inner = out[:, margin_px : margin_px + image_size[0], margin_px : margin_px + image_size[1]]
    glob = np.stack([cv2.resize(x, (global_size, global_size), interpolation=cv2.INTER_AREA) for x in inner])
    return PreparedSweep(out, glob, poses, float(model_spacing_mm), name, group, spacing)


def load_sweep(path, model_config, *, image_to_probe=None, margin_px: int = 0, group: str | None = None) -> PreparedSweep:
    """Read a tracked sequence file and prepare it for ``model_config`` (a ModelConfig)."""
    from FreehandUSLib.io import read_sequence

    seq = read_sequence(path)
    mats, valid = image_to_reference_of(seq, image_to_probe=image_to_probe)
    valid &= seq.image_ok
    path = Path(path)
    return prepare_sweep(
        seq.frames,
        mats,
        valid,
        model_spacing_mm=model_config.pixel_spacing_mm,
        image_size=model_config.image_size,
        global_size=model_config.global_size,
        margin_px=margin_px,
        name=str(path),
        group=group if group is not None else path.parent.name,
    )


def split_by_group(items, val_fraction: float, seed: int = 0, *, key=lambda x: x.group):
    """Split items (sweeps) into train/validation so that no group (subject) is in both.

    Returns (train, validation) lists. With a single group the split is by item.
    """
    items = list(items)
    groups = sorted({key(x) for x in items})
    rng = np.random.default_rng(seed)
    if len(groups) < 2:
        order = rng.permutation(len(items))
        n_val = int(round(val_fraction * len(items)))
        if val_fraction > 0 and len(items) > 1:
            n_val = max(1, n_val)
        val_idx = set(order[:n_val].tolist())
        return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
    order = rng.permutation(len(groups))
    n_val = max(1, int(round(val_fraction * len(groups)))) if val_fraction > 0 else 0
    val_groups = {groups[i] for i in order[:n_val]}
    return [x for x in items if key(x) not in val_groups], [x for x in items if key(x) in val_groups]


def clip_targets(poses: np.ndarray) -> np.ndarray:
    """(T, 4, 4) absolute poses -> (T - 1, 6) frame-to-frame parameters (float32)."""
    return matrices_to_params(absolute_to_frame_to_frame(poses)).astype(np.float32)


class ClipDataset:
    """Augmented clips from prepared sweeps; a map-style dataset (works with a torch DataLoader).

    Item ``k`` of epoch ``e`` is a pure function of ``(seed, e, k)``: call :meth:`set_epoch`.
    ``clip_length`` (frames per clip, >= 2) defaults to ``model_config.clip_length``; a longer
    one lengthens the horizon of the clip-level loss terms without changing the model.
    """

    def __init__(
        self,
        sweeps,
        model_config,
        *,
        clips_per_epoch: int = 256,
        augment: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
        clip_length: int | None = None,
    ):
        sweeps = list(sweeps)
        t = int(model_config.clip_length if clip_length is None else clip_length)
        if t < 2:
            raise ValueError(f"clip_length must be >= 2 frames, got {clip_length}")
        self.clip_length = t
        self.sweeps = [s for s in sweeps if s.n_frames >= t]
        if len(self.sweeps) < len(sweeps):
            log.warning("skipping %d sweeps shorter than the clip length (%d frames)", len(sweeps) - len(self.sweeps), t)
        if not self.sweeps:
            raise SequenceError(f"no sweep with at least {t} frames (the clip length) to train on")
        self.cfg = model_config
        self.clips_per_epoch = int(clips_per_epoch)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        weights = np.array([s.n_frames for s in self.sweeps], dtype=np.float64)
        self.weights = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.clips_per_epoch

    def __getitem__(self, k: int) -> ClipItem:
        import torch

        rng = np.random.default_rng([self.seed, self.epoch, int(k)])
        aug = self.augment
        sweep = self.sweeps[int(rng.choice(len(self.sweeps), p=self.weights))]
        n = sweep.n_frames
        t = self.clip_length
        step_max = aug.max_step if rng.random() < aug.drop else 1
        step_max = max(1, min(step_max, (n - 1) // (t - 1)))
        steps = rng.integers(1, step_max + 1, size=t - 1)
        span = int(steps.sum())
        start = int(rng.integers(0, n - span))
        idx = start + np.concatenate([[0], np.cumsum(steps)])
        reverse = rng.random() < aug.reverse
        flip = rng.random() < aug.flip
        if reverse:
            idx = idx[::-1]
        rows, cols = self.cfg.image_size
        margin = (sweep.frames.shape[1] - rows) // 2
        jit = min(aug.crop_jitter_px, margin)
        oy, ox = (rng.integers(-jit, jit + 1, size=2) if jit > 0 else (0, 0))
        y0, x0 = margin + oy, (sweep.frames.shape[2] - cols) // 2 + ox
        frames = sweep.frames[idx, y0 : y0 + rows, x0 : x0 + cols].astype(np.float32) / 255.0
        # The crop's image-mm origin sits (ox, oy) pixels from the canvas centre.
        poses = sweep.poses[idx] @ translate((ox * sweep.spacing_mm, oy * sweep.spacing_mm, 0.0))
        g_idx = np.linspace(0, n - 1, self.cfg.max_global_tokens).round().astype(int)
        glob = sweep.global_frames[g_idx].astype(np.float32) / 255.0
        pos = idx / max(n - 1, 1)
        g_pos = g_idx / max(n - 1, 1)
        if reverse:
            glob, g_pos = glob[::-1], g_pos[::-1]
            pos, g_pos = 1.0 - pos, 1.0 - g_pos
            # Played backwards = the mirrored probe moving forwards (see pose.mirror_z): the
            # elevational direction of the sweep stays what it was.
            poses = poses @ mirror_z()
        if flip:
            frames = frames[:, :, ::-1]
            glob = glob[:, :, ::-1]
            poses = poses @ mirror_x()
        if aug.gain > 0 or aug.offset > 0:
            a = 1.0 + rng.uniform(-aug.gain, aug.gain)
            b = rng.uniform(-aug.offset, aug.offset)
            frames = np.clip(frames * a + b, 0.0, 1.0)
            glob = np.clip(glob * a + b, 0.0, 1.0)
        return ClipItem(
            frames=torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)),
            targets=torch.from_numpy(clip_targets(poses)),
            positions=torch.from_numpy(np.asarray(pos, dtype=np.float32)),
            global_frames=torch.from_numpy(np.ascontiguousarray(glob, dtype=np.float32)),
            global_positions=torch.from_numpy(np.asarray(g_pos, dtype=np.float32)),
        )

"""One training loop for every tracking model.

``train(cfg, out_dir) -> Path`` trains ``cfg.model`` on the tracked sequences in
``cfg.sequences`` (or on already prepared sweeps), with a subject/sequence-level validation
split, augmentations (:class:`~.data.AugmentConfig`), AdamW + cosine learning rate, a
deterministic seed, CUDA when present, and a tqdm progress bar showing the loss.

Checkpoints (``out_dir/last.pt`` after every epoch, ``out_dir/best.pt`` at the best validation
loss) hold ``{"model_config", "state_dict", "optimizer", "epoch", "version", ...}``, tensors and
plain values only (the architecture as a JSON-able dict), so they are read weights-only
(:func:`~.predict.read_checkpoint`: no code in a model file runs); a second
call with the same ``out_dir`` resumes from ``last.pt``. A non-finite loss stops training with
:class:`TrainingError`; the checkpoints of the last good epoch stay untouched.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from FreehandUSLib.errors import FreehandUSError

from .data import NO_AUGMENT, AugmentConfig, ClipDataset, clip_targets, load_sweep, split_by_group
from .losses import LossConfig, corner_points_mm, tracking_loss
from .models import ModelConfig, build_model
from .predict import ModelFileError, read_checkpoint

__all__ = [
    "TrainConfig",
    "TrainingError",
    "train",
    "CHECKPOINT_VERSION",
    "select_device",
    "label_scale",
    "seed_everything",
    "checkpoint_model_config",
]

log = logging.getLogger(__name__)

#: Version of the checkpoint layout (bump when the dict changes incompatibly).
CHECKPOINT_VERSION = 1


class TrainingError(FreehandUSError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, no data)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (stored in the checkpoints).

    Attributes
    ----------
    model : the architecture and input geometry
    sequences : tracked sequence files (any format FreehandUS reads)
    image_to_probe : optional 4x4 calibration used for files that lack one
    val_fraction : share of groups (subjects: a file's parent folder) held out
    val_group : the group held out for validation (overrides ``val_fraction``; None: drawn)
    epochs, clips_per_epoch, batch_size, lr, weight_decay : optimisation
    val_clips : fixed validation clips per epoch
    augment, loss : augmentations and loss weights
    auto_target_scale : set the model's target scale from the training labels
    seed : seeds Python, numpy and torch
    device : "auto" (CUDA when present), "cpu" or "cuda"
    num_threads : torch CPU threads (None: torch's default)
    max_minutes : stop after the epoch during which this much time has passed (None: no limit)
    init_from : checkpoint whose weights start the training (fine-tuning, e.g. the shipped model
        on the user's own probe); ``model`` must describe the same architecture and pixel spacing
        (:func:`checkpoint_model_config` reads it; ``image_size``, ``global_drop`` and
        ``max_global_tokens`` may differ), and the
        checkpoint's target scale is kept. Ignored when ``out_dir`` already holds a ``last.pt`` to resume.
    clip_length : frames per training and validation clip (None: ``model.clip_length``); a longer
        clip lengthens the horizon of the clip-level loss terms (accumulated, cumulative) while
        the model and its inference windows stay as they are
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    sequences: tuple[str, ...] = ()
    image_to_probe: tuple | None = None
    val_fraction: float = 0.15
    val_group: str | None = None
    epochs: int = 20
    clips_per_epoch: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_clips: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    auto_target_scale: bool = True
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    max_minutes: float | None = None
    init_from: str | None = None
    clip_length: int | None = None

    def __post_init__(self):
        if self.clip_length is not None and int(self.clip_length) < 2:
            raise ValueError(f"TrainConfig.clip_length must be >= 2 frames (or None: the model's), got {self.clip_length}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["loss"] = self.loss.to_dict()
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def label_scale(sweeps) -> tuple[float, ...]:
    """Typical magnitude per frame-to-frame parameter: 1.4826 * median absolute value (robust)."""
    params = np.concatenate([clip_targets(s.poses) for s in sweeps], axis=0)
    scale = 1.4826 * np.median(np.abs(params), axis=0)
    scale = np.maximum(scale, np.maximum(0.2 * scale.max(), 1e-3))
    return tuple(float(v) for v in scale)


def _read_checkpoint(path) -> dict:
    """:func:`.predict.read_checkpoint` (weights only: runs no code from the file), its errors as
    :class:`TrainingError`."""
    try:
        return read_checkpoint(path)
    except ModelFileError as exc:
        raise TrainingError(f"not a FreehandUS tracking checkpoint: {exc}") from exc


def checkpoint_model_config(path) -> ModelConfig:
    """The :class:`~.models.ModelConfig` stored in a checkpoint (to fine-tune it on new data)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}: give a file written by 'freehandus track train' or 'default'")
    ckpt = _read_checkpoint(path)
    try:
        return ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"{path} is not a FreehandUS tracking checkpoint (model_config: {exc})") from exc


def _load_init(path, model_cfg: ModelConfig):
    """(model config, state_dict) of the checkpoint that starts a fine-tuning run.

    The input size may differ from the checkpoint's: every model pools its image features
    adaptively to a fixed grid, so the same weights fit any size (a fine-tuning can see a larger
    part of the user's image than the generic model did). So may ``global_drop`` (a training
    regulariser) and ``max_global_tokens`` (the global encoder encodes each frame's position in the
    sweep, not its index). Everything else must match.
    """
    saved = checkpoint_model_config(path)
    # no weights depend on them
    free = dict(image_size=model_cfg.image_size, global_drop=model_cfg.global_drop,
                max_global_tokens=model_cfg.max_global_tokens)
    if replace(saved, target_scale=model_cfg.target_scale, **free) != model_cfg:
        raise TrainingError(
            f"{path} holds a {saved.name} model for pixels of {saved.pixel_spacing_mm} mm, not the requested "
            f"{model_cfg.name} for pixels of {model_cfg.pixel_spacing_mm} mm, or another architecture; train with "
            "the checkpoint's own configuration (checkpoint_model_config; only image_size, global_drop and "
            "max_global_tokens may differ)"
        )
    return replace(saved, **free), _read_checkpoint(path)["state_dict"]


def _batch_to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(model, batch):
    return model(
        batch["frames"],
        positions=batch["positions"],
        global_frames=batch["global_frames"],
        global_positions=batch["global_positions"],
    )


def _plain(value):
    """``value`` as plain Python (dicts, lists, str, int, float, bool, None) via JSON, so that
    a checkpoint holds nothing ``torch.load(weights_only=True)`` refuses (e.g. numpy scalars)."""
    return json.loads(json.dumps(value))


def _save(path: Path, model, optimizer, scheduler, epoch, cfg: TrainConfig, history, best_val) -> None:
    """Write a checkpoint: tensors and plain values only (:func:`.predict.read_checkpoint` reads it
    weights-only), to a temporary file renamed when complete."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model_config": _plain(model.config.to_dict()),
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": int(epoch),
            "version": CHECKPOINT_VERSION,
            "train_config": _plain(cfg.to_dict()),
            "history": _plain(history),
            "best_val": float(best_val),
        },
        tmp,
    )
    tmp.replace(path)


def train(cfg: TrainConfig, out_dir, *, sweeps=None, progress: bool = True) -> Path:
    """Train (or resume) a model; returns the path of the best checkpoint.

    Parameters
    ----------
    cfg : TrainConfig
    out_dir : folder for ``last.pt``, ``best.pt`` and ``history.json``
    sweeps : optional prepared sweeps (:class:`~.data.PreparedSweep`, canvas margin at least
        ``cfg.augment.crop_jitter_px``) used instead of reading ``cfg.sequences``
    progress : show a tqdm progress bar with the loss

    Raises
    ------
    TrainingError
        Non-finite loss (the last good checkpoint is kept), an incompatible checkpoint in
        ``out_dir``, or no usable data.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = select_device(cfg.device)
    if sweeps is None:
        if not cfg.sequences:
            raise TrainingError("no training sequences given")
        itp = None if cfg.image_to_probe is None else np.asarray(cfg.image_to_probe, dtype=np.float64)
        sweeps = [load_sweep(p, cfg.model, image_to_probe=itp, margin_px=cfg.augment.crop_jitter_px) for p in cfg.sequences]
    sweeps = list(sweeps)
    if cfg.val_group is not None:
        train_sweeps = [s for s in sweeps if s.group != cfg.val_group]
        val_sweeps = [s for s in sweeps if s.group == cfg.val_group]
        if not val_sweeps:
            raise TrainingError(f"no sweep of the validation group {cfg.val_group!r}")
    else:
        train_sweeps, val_sweeps = split_by_group(sweeps, cfg.val_fraction, cfg.seed)
    if not train_sweeps:
        raise TrainingError("the validation split left no training sweeps; lower val_fraction or add sequences")
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    resume = _read_checkpoint(last_path) if last_path.is_file() else None
    model_cfg = cfg.model
    init_state = None
    if resume is None and cfg.init_from:
        model_cfg, init_state = _load_init(cfg.init_from, model_cfg)
        log.info("fine-tuning the weights of %s", cfg.init_from)
    if resume is not None:
        saved = ModelConfig.from_dict(resume["model_config"])
        if replace(saved, target_scale=model_cfg.target_scale) != model_cfg:
            raise TrainingError(
                f"{last_path} holds a different model ({saved.name}, {saved.image_size}); "
                "use another output folder or delete it"
            )
        model_cfg = saved
    elif cfg.auto_target_scale and init_state is None:
        model_cfg = replace(model_cfg, target_scale=label_scale(train_sweeps))
    model = build_model(model_cfg).to(device)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(cfg.clips_per_epoch / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warmup = min(200, max(1, total // 20))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.98 + 0.02

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start_epoch, history, best_val = 0, [], float("inf")
    if resume is not None:
        model.load_state_dict(resume["state_dict"], strict=True)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = int(resume["epoch"]) + 1
        history = list(resume.get("history", []))
        best_val = float(resume.get("best_val", float("inf")))
        log.info("resuming %s from epoch %d", last_path, start_epoch)
    train_set = ClipDataset(
        train_sweeps, model_cfg, clips_per_epoch=cfg.clips_per_epoch, augment=cfg.augment, seed=cfg.seed,
        clip_length=cfg.clip_length,
    )
    val_set = (
        ClipDataset(
            val_sweeps, model_cfg, clips_per_epoch=cfg.val_clips, augment=NO_AUGMENT, seed=cfg.seed + 1,
            clip_length=cfg.clip_length,
        )
        if val_sweeps
        else None
    )
    points = corner_points_mm(model_cfg.image_size, model_cfg.pixel_spacing_mm, device)
    scale = torch.tensor(model_cfg.target_scale, dtype=torch.float32, device=device)
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, unit="step", desc=f"train {model_cfg.name}")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_set.set_epoch(epoch)
            # Shuffling seeded per epoch: a resumed run sees the same batches as an uninterrupted one.
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(
                train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, num_workers=0, drop_last=False
            )
            model.train()
            losses = []
            for step, batch in enumerate(loader):
                batch = _batch_to(batch, device)
                pred = _forward(model, batch)
                loss, parts = tracking_loss(pred, batch["targets"], scale, points, cfg.loss)
                if not torch.isfinite(loss):
                    kept = f"the last good checkpoint is {last_path}" if last_path.is_file() else "no checkpoint was written"
                    raise TrainingError(
                        f"training stopped: the loss became {float(loss.detach())} at epoch {epoch} step {step}; {kept}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.4f}")
            val = _validate(model, val_set, cfg, scale, points, device) if val_set is not None else float("nan")
            if val_set is not None and not math.isfinite(val):
                kept = f"the last good checkpoint is {last_path}" if last_path.is_file() else "no checkpoint was written"
                raise TrainingError(f"training stopped: the validation loss became {val} at epoch {epoch}; {kept}")
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val, "seconds": time.perf_counter() - started}
            history.append(record)
            log.info("epoch %d: train %.4f val %.4f", epoch, record["train_loss"], val)
            improved = val_set is None or val < best_val
            if val_set is not None and val < best_val:
                best_val = val
            _save(last_path, model, optimizer, scheduler, epoch, cfg, history, best_val)
            if improved:
                _save(best_path, model, optimizer, scheduler, epoch, cfg, history, best_val)
            (out_dir / "history.json").write_text(json.dumps(history, indent=2))
            if cfg.max_minutes is not None and time.perf_counter() - started > 60.0 * cfg.max_minutes:
                log.warning("stopping after epoch %d: the time limit of %.1f min is reached", epoch, cfg.max_minutes)
                break
    finally:
        if bar is not None:
            bar.close()
    return best_path if best_path.is_file() else last_path


@torch.no_grad()
def _validate(model, dataset, cfg: TrainConfig, scale, points, device) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    total, count = 0.0, 0
    for batch in loader:
        batch = _batch_to(batch, device)
        loss, _ = tracking_loss(_forward(model, batch), batch["targets"], scale, points, cfg.loss)
        total += float(loss) * batch["frames"].shape[0]
        count += batch["frames"].shape[0]
    return total / max(count, 1)

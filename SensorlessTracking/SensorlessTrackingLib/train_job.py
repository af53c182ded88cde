"""Training as a separate process that streams its progress as JSON lines.

The Sensorless Tracking module trains outside Slicer's GUI thread, as Slicer's AI extensions
do: :func:`~SensorlessTrackingLib.mrml_tracking.start_training_job` prepares the training
sweeps from the browsers (fast), writes them with the training configuration into a job folder
(:func:`write_job`) and starts ``python -m SensorlessTrackingLib.train_job <job.json>`` with
Slicer's Python (:class:`FreehandUSLib.jobs.ProcessJob`). The user goes on using Slicer; the
panel polls the job's lines from a timer; Cancel kills the process by PID (the checkpoints of
the finished epochs stay, and a later run on the same output folder resumes).

Lines written to standard output, one JSON object each:

- ``{"event": "started", "pid": 123, "epochs": 10, "out_dir": "..."}``
- ``{"event": "progress", "done": 3, "total": 10, "train_loss": 0.41, "val_loss": 0.52}``
  after every epoch (epochs done, epochs asked);
- ``{"event": "done", "checkpoint": ".../best.pt"}`` and exit status 0;
- ``{"event": "error", "message": "..."}`` (one line) and exit status 2 (bad job or
  training error) or 1 (anything else).

The job file (``job.json``) holds ``train_config`` (:meth:`TrainConfig.to_dict`), ``out_dir``
and ``sweeps`` (an ``.npz`` of the prepared sweeps, read with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from FreehandUSLib.errors import FreehandUSError

__all__ = ["write_job", "read_job", "train_epochs", "train_config_from_dict", "main"]

logger = logging.getLogger(__name__)

_SWEEP_ARRAYS = ("frames", "global_frames", "poses")


def train_config_from_dict(d: dict):
    """:class:`~SensorlessTrackingLib.train.TrainConfig` from :meth:`TrainConfig.to_dict` (JSON lists -> tuples)."""
    from .data import AugmentConfig
    from .losses import LossConfig
    from .models import ModelConfig
    from .train import TrainConfig

    def build(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise FreehandUSError(f"training job: unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    d = dict(d)
    model = ModelConfig.from_dict(d.pop("model"))
    augment = build(AugmentConfig, d.pop("augment"))
    loss = build(LossConfig, d.pop("loss"))
    if d.get("image_to_probe") is not None:
        d["image_to_probe"] = tuple(tuple(row) for row in d["image_to_probe"])
    return dataclasses.replace(build(TrainConfig, d), model=model, augment=augment, loss=loss)


def write_job(job_dir, cfg, sweeps, out_dir) -> Path:
    """Write a training job (configuration, prepared sweeps, output folder); returns ``job.json``.

    Parameters
    ----------
    job_dir : str or Path
        Folder for ``job.json`` and ``sweeps.npz`` (created).
    cfg : TrainConfig
    sweeps : list of PreparedSweep
    out_dir : str or Path
        Where the training writes its checkpoints.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, sweep in enumerate(sweeps):
        for key in _SWEEP_ARRAYS:
            arrays[f"{i}_{key}"] = getattr(sweep, key)
        arrays[f"{i}_spacing_mm"] = np.float64(sweep.spacing_mm)
        arrays[f"{i}_source_spacing_mm"] = np.asarray(sweep.source_spacing_mm, dtype=np.float64)
        arrays[f"{i}_name"] = np.str_(sweep.name)
        arrays[f"{i}_group"] = np.str_(sweep.group)
    np.savez(job_dir / "sweeps.npz", **arrays)
    spec = {
        "train_config": cfg.to_dict(),
        "out_dir": str(Path(out_dir).resolve()),
        "sweeps": "sweeps.npz",
        "n_sweeps": len(sweeps),
    }
    path = job_dir / "job.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def read_job(path):
    """(TrainConfig, list of PreparedSweep, out_dir Path) of a job written by :func:`write_job`."""
    from .data import PreparedSweep

    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        cfg = train_config_from_dict(spec["train_config"])
        with np.load(path.parent / spec["sweeps"], allow_pickle=False) as data:
            sweeps = [
                PreparedSweep(
                    **{key: data[f"{i}_{key}"] for key in _SWEEP_ARRAYS},
                    spacing_mm=float(data[f"{i}_spacing_mm"]),
                    name=str(data[f"{i}_name"]),
                    group=str(data[f"{i}_group"]),
                    source_spacing_mm=tuple(float(v) for v in data[f"{i}_source_spacing_mm"]),
                )
                for i in range(int(spec["n_sweeps"]))
            ]
        return cfg, sweeps, Path(spec["out_dir"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FreehandUSError(f"training job {path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def _epochs_done(out_dir: Path) -> list:
    history = out_dir / "history.json"
    try:
        return json.loads(history.read_text())
    except (OSError, ValueError) as exc:
        raise FreehandUSError(f"{history}: training wrote no readable history ({exc})") from exc


def train_epochs(cfg, sweeps, out_dir, *, progress=None) -> Path:
    """Train epoch by epoch, calling ``progress(done, total, record)`` after each; returns the checkpoint.

    One :func:`~SensorlessTrackingLib.train.train` call per epoch (each resumes ``last.pt``
    with the same schedule), so progress comes after every epoch and stopping between epochs
    keeps every finished one. ``record`` is the epoch's history entry (``train_loss``,
    ``val_loss``, ``seconds``).
    """
    from .train import train

    out_dir = Path(out_dir)
    if progress is None:
        return train(cfg, out_dir, sweeps=sweeps, progress=False)
    started = time.perf_counter()
    path = None
    for _ in range(int(cfg.epochs)):
        path = train(dataclasses.replace(cfg, max_minutes=0.0), out_dir, sweeps=sweeps, progress=False)
        history = _epochs_done(out_dir)
        progress(min(len(history), cfg.epochs), cfg.epochs, history[-1] if history else {})
        if len(history) >= cfg.epochs:
            break
        if cfg.max_minutes is not None and time.perf_counter() - started > 60.0 * cfg.max_minutes:
            logger.warning("stopping after epoch %d: the time limit of %.1f min is reached", len(history) - 1,
                           cfg.max_minutes)
            break
    return path


def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _finite(value):
    return value if isinstance(value, (int, float)) and np.isfinite(value) else None


def main(argv=None) -> int:
    """``python -m SensorlessTrackingLib.train_job JOB.json``: train, one JSON line per event."""
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(argv) != 1:
        _emit(event="error", message="usage: python -m SensorlessTrackingLib.train_job JOB.json")
        return 2
    try:
        cfg, sweeps, out_dir = read_job(argv[0])
        _emit(event="started", pid=os.getpid(), epochs=int(cfg.epochs), out_dir=str(out_dir))

        def report(done, total, record):
            _emit(event="progress", done=int(done), total=int(total), train_loss=_finite(record.get("train_loss")),
                  val_loss=_finite(record.get("val_loss")))

        path = train_epochs(cfg, sweeps, out_dir, progress=report)
    except FreehandUSError as exc:
        _emit(event="error", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 2
    except Exception as exc:  # noqa: BLE001  (reported to the panel as one line, traceback on stderr)
        logger.exception("training failed")
        _emit(event="error", message=f"{type(exc).__name__}: {exc}")
        return 1
    _emit(event="done", checkpoint=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

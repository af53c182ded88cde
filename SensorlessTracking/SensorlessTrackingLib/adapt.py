"""Per-probe adaptation: a tracking model for the user's own probe from a few tracked sweeps.

A model trained on one probe reads another probe's speckle with the wrong elevational scale: the
decorrelation of speckle with out-of-plane distance follows the elevational beam width, which
differs between probes (on the independent test simulator the shipped model's best factor on
its out-of-plane motion is 0.6-1.1 depending on the probe). :func:`adapt_model` fits what the
user's tracked sweeps of their probe support, cheapest first:

1. **the out-of-plane scale** (always): one factor ``k`` on the estimated out-of-plane
   frame-to-frame parameters ``(tz, rx, ry)`` (centred image-mm frame, :mod:`.pose`), the factor
   that minimises the mean drift of the image centre over the adaptation sweeps
   (:func:`fit_probe_scale`); stored in the checkpoint under ``"adaptation"`` and applied by
   :func:`.predict.track_sequence` to every estimate of the adapted model;
2. **fine-tuning** (``fine_tune=True``): the network's weights trained further on the
   adaptation sweeps (:func:`.train.train` from the base weights, a low learning rate, few
   epochs, a time limit), keeping the epoch with the lowest loss on the held-back sweep; the
   scale is then fitted again for the fine-tuned weights. The fine-tuned weights are kept only
   when they lower the held-back sweep's final drift.

One sweep (the last) is held back: the scale is fitted on the others and judged on it
(``validation`` in the result: its final drift with the base model and with the fitted scale),
then fitted again on all sweeps for the output. Each sweep is estimated with the direction its
tracking moved (:func:`.conventions.elevational_displacement_mm`), so sweeps in both directions
can be mixed.

The module also runs as a separate process for the Sensorless Tracking panel (``python -m
SensorlessTrackingLib.adapt JOB.json``, :func:`write_job`, :func:`main`), streaming JSON lines as
:mod:`.train_job` does: ``{"event": "progress", "done": 1, "total": 3, "message": "..."}``, then
``{"event": "done", "checkpoint": "...", "summary": "..."}`` or ``{"event": "error", "message": "..."}``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from FreehandUSLib.errors import FreehandUSError

from .attribution import GROUPS, SCALE_RANGE, out_of_plane_problem
from .conventions import elevational_displacement_mm
from .pose import frame_to_frame_to_relative, params_to_matrices

__all__ = [
    "AdaptConfig",
    "AdaptationResult",
    "AdaptationError",
    "ADAPTATION_KEY",
    "fit_probe_scale",
    "apply_out_of_plane_scale",
    "adapt_model",
    "tracked_direction",
    "write_job",
    "main",
]

log = logging.getLogger(__name__)

#: Key of a checkpoint's adaptation record (``{"out_of_plane_scale": k, ...}``, plain values).
ADAPTATION_KEY = "adaptation"


class AdaptationError(FreehandUSError):
    """Adaptation sweeps that cannot adapt a model (too few, untracked)."""


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt_model`.

    Attributes
    ----------
    fine_tune : also fine-tune the network's weights (slower; see the module docstring)
    max_minutes : fine-tuning stops after the epoch during which this much time has passed
    epochs, lr, clips_per_epoch, batch_size : fine-tuning optimisation (few epochs and a low
        learning rate: a regulariser against forgetting what the base model learnt)
    seed : seeds the fine-tuning
    device : torch device of estimation and fine-tuning ("auto": CUDA when available)
    """

    fine_tune: bool = False
    max_minutes: float = 15.0
    epochs: int = 6
    lr: float = 1e-4
    clips_per_epoch: int = 128
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if not self.max_minutes > 0:
            raise ValueError(f"AdaptConfig.max_minutes must be positive, got {self.max_minutes}")
        if int(self.epochs) < 1:
            raise ValueError(f"AdaptConfig.epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"AdaptConfig.lr must be positive, got {self.lr}")


@dataclass(frozen=True, eq=False)
class AdaptationResult:
    """What :func:`adapt_model` did.

    Attributes
    ----------
    checkpoint : the adapted model file
    base : the model it started from
    out_of_plane_scale : the factor on (tz, rx, ry) stored in the checkpoint (fitted on all sweeps)
    fine_tuned : whether the stored weights are fine-tuned (else the base weights)
    validation : the held-back sweep: ``name``, ``fdr_base_percent`` (the base model),
        ``scale_from_others``, ``fdr_scaled_percent`` (with that scale) and, after a
        fine-tuning, ``fdr_fine_tuned_percent`` (fine-tuned, its scale fitted on the others)
    sweeps : per sweep: ``name``, ``direction``, ``frames``, ``path_mm``, ``fdr_base_percent``
    seconds : wall time
    """

    checkpoint: Path
    base: str
    out_of_plane_scale: float
    fine_tuned: bool
    validation: dict
    sweeps: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d

    def __str__(self) -> str:
        v = self.validation
        lines = [
            f"adapted {self.base} to the probe of {len(self.sweeps)} tracked sweeps in {self.seconds:.0f} s (checked on "
            f"the last, held back, then fitted on all): {self.checkpoint}",
            f"  out-of-plane scale {self.out_of_plane_scale:.3f} (the factor on the estimated out-of-plane motion)"
            + ("; weights fine-tuned" if self.fine_tuned else ""),
            f"  held-back sweep {v['name']}: final drift {v['fdr_base_percent']:.1f} % of path with the base model, "
            f"{v['fdr_scaled_percent']:.1f} % with the scale fitted on the other sweeps ({v['scale_from_others']:.3f})",
        ]
        if "fdr_fine_tuned_percent" in v:
            lines.append(f"  fine-tuned: {v['fdr_fine_tuned_percent']:.1f} % on the held-back sweep"
                         + ("" if self.fine_tuned else " (not better: the base weights are kept)"))
        if v["fdr_scaled_percent"] > v["fdr_base_percent"]:
            lines.append("  warning: the fitted scale did not help on the held-back sweep; record more (or longer) "
                         "tracked sweeps of this probe")
        return "\n".join(lines)


def apply_out_of_plane_scale(params, scale: float) -> np.ndarray:
    """Frame-to-frame parameters ``(..., 6)`` (mm, deg; centred image-mm frame) with the
    out-of-plane ones (tz, rx, ry) multiplied by ``scale``."""
    out = np.array(params, dtype=np.float64)
    out[..., list(GROUPS["out_of_plane"])] *= float(scale)
    return out


def _mean_drift_percent(p_est: np.ndarray, poses_t: np.ndarray, path_mm: float, scale: float) -> float:
    """Mean over frames of the image centre's drift (% of the path) with the scale applied."""
    rel = frame_to_frame_to_relative(params_to_matrices(apply_out_of_plane_scale(p_est, scale)))
    centres = (poses_t[0] @ rel)[:, :3, 3]
    return 100.0 * float(np.linalg.norm(centres - poses_t[:, :3, 3], axis=1).mean()) / path_mm


def fit_probe_scale(truths, estimates, image_shapes) -> float:
    """The one out-of-plane scale of a probe, fitted on several tracked sweeps.

    Parameters
    ----------
    truths, estimates : lists of (n_i, 4, 4) float64 ImageToReference (pixel -> Reference mm),
        the tracking and a model's estimate of each sweep
    image_shapes : list of (rows, cols)

    Returns
    -------
    float
        The factor in :data:`.attribution.SCALE_RANGE` on the estimated (tz, rx, ry) that
        minimises the mean over sweeps of the mean drift of the image centre (% of each sweep's
        path; every frame counts, so one sweep's end point does not decide it).

    Raises
    ------
    ValueError
        No sweeps, lists of different lengths, or as :func:`~.metrics.tracking_metrics`.
    """
    if not (len(truths) == len(estimates) == len(image_shapes)) or not truths:
        raise ValueError(f"fit_probe_scale: needs as many truths, estimates and shapes (>= 1), got "
                         f"{len(truths)}, {len(estimates)}, {len(image_shapes)}")
    problems = [out_of_plane_problem(t, e, s) for t, e, s in zip(truths, estimates, image_shapes)]
    problems = [p for p in problems if p[2] > 0]
    if not problems:
        raise ValueError("fit_probe_scale: no sweep moved (every tracked path has zero length)")

    def cost(log_k: float) -> float:
        return float(np.mean([_mean_drift_percent(p, t, path, np.exp(log_k)) for p, t, path in problems]))

    grid = np.linspace(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1]), 41)
    values = [cost(g) for g in grid]
    k = int(np.argmin(values))
    res = minimize_scalar(cost, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x if res.fun < values[k] else grid[k]))


def tracked_direction(image_to_reference, image_shape) -> str:
    """``"toward"`` or ``"away"``: the way a tracked sweep moved out of the image plane from its
    first to its last frame (:mod:`.conventions`)."""
    n = len(image_to_reference)
    return "away" if elevational_displacement_mm(image_to_reference, image_shape, 0, n - 1) > 0 else "toward"


def _tracked(sequences, image_to_probe):
    from .data import image_to_reference_of

    out = []
    for name, seq in sequences:
        try:
            truth, valid = image_to_reference_of(seq, image_to_probe=image_to_probe)
        except FreehandUSError:
            raise AdaptationError(f"{name}: not tracked (no ImageToReference): adaptation needs tracked sweeps of "
                                  "the probe") from None
        if not valid.all():
            raise AdaptationError(f"{name}: {int((~valid).sum())} of {valid.size} frames have no tracked pose; "
                                  "adaptation needs sweeps tracked throughout")
        shape = (seq.n_rows, seq.n_cols)
        out.append({"name": name, "sequence": seq, "truth": truth, "shape": shape,
                    "direction": tracked_direction(truth, shape)})
    return out


def _estimate(model, sweep, image_to_probe, device) -> np.ndarray:
    from .predict import track_sequence

    res = track_sequence(sweep["sequence"], model, image_to_probe=image_to_probe, device=device,
                         sweep_direction=sweep["direction"])
    return res.sequence.transforms["ImageToReference"].matrices


def _fdr(sweep, estimate, scale) -> float:
    p, poses_t, path = out_of_plane_problem(sweep["truth"], estimate, sweep["shape"])
    rel = frame_to_frame_to_relative(params_to_matrices(apply_out_of_plane_scale(p, scale)))
    end = (poses_t[0] @ rel[-1])[:3, 3]
    return 100.0 * float(np.linalg.norm(end - poses_t[-1, :3, 3])) / path if path > 0 else float("nan")


def _scale_fit(model, sweeps, image_to_probe, device):
    """Estimates of every sweep (with the model's own scale), the scale fitted on all but the
    last, and the one fitted on all (both relative to the model's own)."""
    estimates = [_estimate(model, s, image_to_probe, device) for s in sweeps]
    fit = sweeps[:-1]
    k_others = fit_probe_scale([s["truth"] for s in fit], estimates[:-1], [s["shape"] for s in fit])
    k_all = fit_probe_scale([s["truth"] for s in sweeps], estimates, [s["shape"] for s in sweeps])
    return estimates, k_others, k_all


def _fine_tune(base_path, model_cfg, sweeps, cfg: AdaptConfig, work_dir: Path) -> Path:
    """Fine-tune ``base_path`` on the sweeps, the last held back for early stopping; returns
    the best checkpoint. "away" sweeps are trained with their motion mirrored across the image
    plane (:func:`~.pose.mirror_z`), the "toward" convention the model estimates in."""
    from .data import AugmentConfig, prepare_sweep
    from .pose import mirror_z
    from .train import TrainConfig, train

    margin = AugmentConfig().crop_jitter_px
    prepared = []
    for i, s in enumerate(sweeps):
        p = prepare_sweep(s["sequence"].frames, s["truth"], model_spacing_mm=model_cfg.pixel_spacing_mm,
                          image_size=model_cfg.image_size, global_size=model_cfg.global_size, margin_px=margin,
                          name=s["name"], group="held-back" if i == len(sweeps) - 1 else "adaptation")
        if s["direction"] == "away":
            p = replace(p, poses=mirror_z() @ p.poses @ mirror_z())
        prepared.append(p)
    tcfg = TrainConfig(model=model_cfg, init_from=str(base_path), val_group="held-back", epochs=int(cfg.epochs),
                       clips_per_epoch=int(cfg.clips_per_epoch), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                       seed=int(cfg.seed), device=cfg.device, max_minutes=float(cfg.max_minutes))
    return train(tcfg, work_dir, sweeps=prepared, progress=False)


def adapt_model(sequences, out_path, *, base="default", image_to_probe=None, config: AdaptConfig | None = None,
                progress=None) -> AdaptationResult:
    """Adapt a tracking model to a probe from tracked sweeps of it (see the module docstring).

    Parameters
    ----------
    sequences : list of ``(name, TrackedSequence)``, at least 2 tracked sweeps of one probe (the
        last is held back for validation)
    out_path : the adapted checkpoint to write (``.pt``; its folder is made)
    base : the model to adapt: a checkpoint path or "default" (the shipped model); an already
        adapted checkpoint is adapted further (its scale multiplies the new one)
    image_to_probe : (4, 4) calibration for sequences that have ImageToProbe + ProbeToReference
        missing (as :func:`.data.image_to_reference_of`)
    config : :class:`AdaptConfig`
    progress : optional ``progress(message)`` called between the steps

    Returns
    -------
    AdaptationResult

    Raises
    ------
    AdaptationError
        Fewer than 2 sweeps, or a sweep not tracked throughout.
    ModelFileError
        An unreadable base model.
    """
    import torch

    from .predict import default_model_path, load_model, read_checkpoint
    from .train import _plain, select_device

    cfg = config or AdaptConfig()
    device = str(select_device(cfg.device))  # "auto": CUDA when available
    sequences = list(sequences)
    if len(sequences) < 2:
        raise AdaptationError(f"adaptation needs at least 2 tracked sweeps of the probe (one is held back to check "
                              f"the result), got {len(sequences)}")
    report = progress or (lambda message: None)
    started = time.perf_counter()
    sweeps = _tracked(sequences, image_to_probe)
    base_path = default_model_path() if str(base) == "default" else Path(base)
    ckpt = read_checkpoint(base_path)
    model = load_model(base_path, device)
    base_scale = float(getattr(model, "out_of_plane_scale", 1.0))
    report(f"estimating {len(sweeps)} sweeps with {base}")
    estimates, k_others, k_all = _scale_fit(model, sweeps, image_to_probe, device)
    held = sweeps[-1]
    validation = {"name": held["name"], "fdr_base_percent": _fdr(held, estimates[-1], 1.0),
                  "scale_from_others": base_scale * k_others, "fdr_scaled_percent": _fdr(held, estimates[-1], k_others)}
    scale, state, fine_tuned = base_scale * k_all, ckpt["state_dict"], False
    if cfg.fine_tune:
        report(f"fine-tuning for at most {cfg.epochs} epochs / {cfg.max_minutes:g} min")
        with tempfile.TemporaryDirectory(prefix="freehandus-adapt-") as work:
            best = _fine_tune(base_path, model.config, sweeps, cfg, Path(work))
            tuned = load_model(best, device)
            tuned_ckpt = read_checkpoint(best)
        report("fitting the scale of the fine-tuned weights")
        t_estimates, t_others, t_all = _scale_fit(tuned, sweeps, image_to_probe, device)
        validation["fdr_fine_tuned_percent"] = _fdr(held, t_estimates[-1], t_others)
        validation["fine_tuned_scale_from_others"] = t_others
        if validation["fdr_fine_tuned_percent"] < validation["fdr_scaled_percent"]:
            scale, state, fine_tuned = t_all, tuned_ckpt["state_dict"], True
            ckpt = {**ckpt, "model_config": tuned_ckpt["model_config"]}
    per_sweep = [{"name": s["name"], "direction": s["direction"], "frames": int(s["sequence"].n_frames),
                  "path_mm": out_of_plane_problem(s["truth"], e, s["shape"])[2], "fdr_base_percent": _fdr(s, e, 1.0)}
                 for s, e in zip(sweeps, estimates)]
    record = {"out_of_plane_scale": float(scale), "base": str(base), "fine_tuned": fine_tuned,
              "sweeps": [s["name"] for s in sweeps], "validation": validation}
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler")}  # nothing to resume
    out.update({"state_dict": state, ADAPTATION_KEY: _plain(record)})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(out, tmp)
    tmp.replace(out_path)
    return AdaptationResult(out_path, str(base), float(scale), fine_tuned, _plain(validation), _plain(per_sweep),
                            time.perf_counter() - started)


def write_job(job_dir, sequences, out_path, *, base="default", config: AdaptConfig | None = None) -> Path:
    """Write an adaptation job for :func:`main`; returns its ``job.json``.

    Parameters
    ----------
    job_dir : folder for ``job.json`` and the sweeps (``sweep<i>.seq.nrrd``; created)
    sequences : list of ``(name, TrackedSequence)`` with their tracked ``ImageToReference``
    out_path : the adapted checkpoint the job writes
    base, config : as for :func:`adapt_model`
    """
    from FreehandUSLib.io import write_sequence

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    sweeps = []
    for i, (name, seq) in enumerate(sequences):
        written = write_sequence(seq, job_dir / f"sweep{i}.seq.nrrd")
        sweeps.append({"name": str(name), "file": Path(written).name})
    spec = {"sweeps": sweeps, "out": str(Path(out_path).resolve()), "base": str(base),
            "config": asdict(config or AdaptConfig())}
    path = job_dir / "job.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    """``python -m SensorlessTrackingLib.adapt JOB.json``: adapt, one JSON line per event
    (see the module docstring); exit status 0, 2 (bad job or input) or 1 (anything else)."""
    import os

    from FreehandUSLib.io import read_sequence

    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(argv) != 1:
        _emit(event="error", message="usage: python -m SensorlessTrackingLib.adapt JOB.json")
        return 2
    steps = {"n": 0}
    try:
        path = Path(argv[0])
        try:
            spec = json.loads(path.read_text())
            cfg = AdaptConfig(**spec["config"])
            sequences = [(s["name"], read_sequence(path.parent / s["file"])) for s in spec["sweeps"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FreehandUSError(f"adaptation job {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
        total = 3 if cfg.fine_tune else 1
        _emit(event="started", pid=os.getpid(), total=total)

        def report(message):
            steps["n"] += 1
            _emit(event="progress", done=min(steps["n"] - 1, total), total=total, message=message)

        result = adapt_model(sequences, spec["out"], base=spec["base"], config=cfg, progress=report)
    except FreehandUSError as exc:
        _emit(event="error", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 2
    except Exception as exc:  # noqa: BLE001  (reported to the panel as one line, traceback on stderr)
        log.exception("adaptation failed")
        _emit(event="error", message=f"{type(exc).__name__}: {exc}")
        return 1
    _emit(event="done", checkpoint=str(result.checkpoint), summary=str(result), result=result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())

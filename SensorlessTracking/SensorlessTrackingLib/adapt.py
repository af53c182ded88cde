"""Per-probe adaptation: a tracking model for the user's own probe from a few tracked sweeps.

A model trained on one probe reads another probe's speckle with the wrong elevational scale: the
decorrelation of speckle with out-of-plane distance follows the elevational beam width, which
differs between probes (on the independent test simulator the shipped model's best factor on
its out-of-plane motion is 0.6-1.4 depending on the probe and the sweep). Measured on that
simulator (``Testing/benchmarks/bench_sensorless_adapt.py``, :func:`.attribution.drift_attribution`
per sweep), the elevational step ``tz`` is what limits the drift: with the true ``tz`` and
everything else estimated the final drift falls from 10-40 % to 2-17 % of the path, while true
tilts or true in-plane motion change it by a few points. What varies from sweep to sweep is the
factor on ``tz`` (and pauses, read as motion), not a constant bias, so per-probe linear
corrections of all six parameters (separate scales, in-plane biases) did no better on held-out
sweeps than the one scale; blending in the speckle decorrelation's own ``tz`` did, on one probe
of three, and on another no correction helped at all. :func:`adapt_model` therefore fits every
candidate below on the user's tracked sweeps and keeps the one whose drift is lowest on sweeps
it was not fitted on (leave-one-sweep-out), ``"none"`` included; the reference, the calibrated
decorrelation (``"none"`` when that is not a candidate), is kept unless the best one's gain over
it is larger than its own standard error across the sweeps (:data:`_REFERENCES`: with the
decorrelation's curve calibrated per depth band it was the best single candidate on development
sweeps of all three of the independent simulator's probes):

- ``"none"``: the model as it is;
- ``"scale"``: one factor ``k`` on the estimated out-of-plane frame-to-frame parameters
  ``(tz, rx, ry)`` (centred image-mm frame, :mod:`.pose`) that minimises the mean drift of the
  image centre (:func:`fit_probe_scale`); stored as ``out_of_plane_scale``;
- ``"decorrelation-blend"``: ``tz = a * tz_model + c * tz_decorrelation`` and ``(rx, ry) *= r``,
  the decorrelation (:mod:`.decorrelation`) calibrated on the same sweeps, ``(a, c, r)``
  minimising the mean drift (:func:`fit_decorrelation_blend`); stored as ``decorrelation_blend``
  and applied by :func:`.predict.track_sequence` through :func:`apply_decorrelation_blend`;
- ``"decorrelation"``: the network not used at all, the probe's speckle decorrelation calibrated
  on the same sweeps (:func:`.decorrelation.calibrate_decorrelation`) estimates instead (on the
  independent simulator's convex probe calibrated decorrelation alone drifted less than the
  model, adapted or not); stored as ``decorrelation`` (the
  :class:`.decorrelation.DecorrelationConfig` as plain values), with which
  :func:`.predict.track_sequence` estimates.

The decorrelation (:func:`.decorrelation.calibrate_decorrelation`: its curve per depth band) is
calibrated anew in each leave-one-sweep-out fold on the other sweeps only, so the last two
candidates' figures are as honest as the others'; the stored one is calibrated on all the sweeps.

With ``fine_tune=True`` the network's weights are also trained further on the adaptation sweeps
(:func:`.train.train` from the base weights, a low learning rate, few epochs, a time limit),
keeping the epoch with the lowest loss on the held-back sweep (the last), then the correction is
chosen again for the fine-tuned weights. The fine-tuned weights are kept only when they lower the
held-back sweep's final drift.

The checkpoint's ``"adaptation"`` record holds plain values only (weights-only loading):
``correction``, ``out_of_plane_scale`` (1.0 unless the correction is ``"scale"``),
``decorrelation_blend`` (or None), ``decorrelation`` (or None), ``candidates`` (each candidate's leave-one-out mean final
drift) and the validation of the held-back sweep. Each sweep is estimated with the direction
its tracking moved (:func:`.conventions.elevational_displacement_mm`), so sweeps in both
directions can be mixed; corrections act on the models' own convention ("toward").

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
from scipy.optimize import minimize, minimize_scalar

from FreehandUSLib.errors import FreehandUSError

from .attribution import SCALE_RANGE, out_of_plane_problem
from .corrections import apply_decorrelation_blend, apply_out_of_plane_scale, check_decorrelation_blend
from .conventions import elevational_displacement_mm, reverse_direction
from .pose import frame_to_frame_to_relative, params_to_matrices

__all__ = [
    "AdaptConfig",
    "AdaptationResult",
    "AdaptationError",
    "ADAPTATION_KEY",
    "CORRECTIONS",
    "fit_probe_scale",
    "fit_decorrelation_blend",
    "apply_out_of_plane_scale",
    "apply_decorrelation_blend",
    "check_decorrelation_blend",
    "adapt_model",
    "tracked_direction",
    "write_job",
    "main",
]

log = logging.getLogger(__name__)

#: Key of a checkpoint's adaptation record (``{"out_of_plane_scale": k, ...}``, plain values).
ADAPTATION_KEY = "adaptation"

#: The corrections :func:`adapt_model` chooses from (see the module docstring).
CORRECTIONS = ("none", "scale", "decorrelation-blend", "decorrelation")

#: The candidates that need the decorrelation calibrated on the sweeps.
_NEED_DECORRELATION = ("decorrelation-blend", "decorrelation")

#: The candidate :func:`_choose` keeps unless another is clearly better: the first of these that
#: is a candidate. The calibrated decorrelation first: on development sweeps of the independent
#: simulator (not its test sweeps; 14 sweeps per probe, 10 random choices of 6 to adapt on) it was
#: the best single candidate on all three probes, and keeping it unless another was clearly
#: better drifted less on the other sweeps than keeping "none" (median final drift, mean over the
#: choices: C-3.5 13.6 against 13.9 %, L-7 11.5 against 12.0 %, L-5 10.9 against 12.0 %).
_REFERENCES = ("decorrelation", "none")

#: Weight of the pull of the blend's parameters toward "the model as it is" (log a, c, log r
#: all 0), in % of drift per unit squared: small, so the data decide, yet a flat cost stays put.
_BLEND_REGULARISATION = 0.1


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
    corrections : the candidates of :data:`CORRECTIONS` to choose from (by leave-one-sweep-out
        drift); ``("scale",)`` forces the one scale
    """

    fine_tune: bool = False
    max_minutes: float = 15.0
    epochs: int = 6
    lr: float = 1e-4
    clips_per_epoch: int = 128
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    corrections: tuple = CORRECTIONS

    def __post_init__(self):
        object.__setattr__(self, "corrections", tuple(self.corrections))  # a list from a job file
        unknown = [c for c in self.corrections if c not in CORRECTIONS]
        if unknown or not self.corrections:
            raise ValueError(f"AdaptConfig.corrections must be a non-empty subset of {CORRECTIONS}, got "
                             f"{self.corrections}")
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
    out_of_plane_scale : the factor on (tz, rx, ry) stored in the checkpoint (fitted on all
        sweeps; 1.0 unless ``correction`` is "scale")
    fine_tuned : whether the stored weights are fine-tuned (else the base weights)
    validation : the held-back sweep (the last): ``name``, ``fdr_base_percent`` (the base
        model), ``fdr_adapted_percent`` (the chosen correction fitted on the other sweeps),
        ``scale_from_others`` and ``fdr_scaled_percent`` (the one scale fitted on the others)
        and, after a fine-tuning, ``fdr_fine_tuned_percent`` (fine-tuned, its correction fitted
        on the others)
    sweeps : per sweep: ``name``, ``direction``, ``frames``, ``path_mm``, ``fdr_base_percent``
    seconds : wall time
    correction : the chosen one of :data:`CORRECTIONS`
    decorrelation_blend : its parameters when ``correction`` is "decorrelation-blend", else None
    decorrelation : the calibrated :class:`.decorrelation.DecorrelationConfig` (plain values)
        when ``correction`` is "decorrelation", else None
    candidates : each candidate's mean final drift (% of path) over the sweeps, each estimated
        with the candidate fitted on the other sweeps (leave-one-sweep-out)
    """

    checkpoint: Path
    base: str
    out_of_plane_scale: float
    fine_tuned: bool
    validation: dict
    sweeps: list = field(default_factory=list)
    seconds: float = 0.0
    correction: str = "scale"
    decorrelation_blend: dict | None = None
    candidates: dict = field(default_factory=dict)
    decorrelation: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d

    def __str__(self) -> str:
        v = self.validation
        what = {"none": "none (no correction clearly beat the model as it is on sweeps it was not fitted on)",
                "scale": f"out-of-plane scale {self.out_of_plane_scale:.3f} (the factor on the estimated out-of-plane "
                         "motion)"}
        if self.decorrelation_blend is not None:
            b = self.decorrelation_blend
            what["decorrelation-blend"] = (
                f"elevational step = {b['model_tz_weight']:.2f} x the model's + {b['decorrelation_tz_weight']:.2f} x the "
                f"speckle decorrelation's (sigma {b['decorrelation']['sigma_mm']:.2f} mm), tilts x "
                f"{b['rotation_scale']:.2f}")
        if self.decorrelation is not None:
            bands = self.decorrelation.get("sigma_bands_mm") or ()
            per_band = f", per depth band {' / '.join(f'{v:.2f}' for v in bands)} mm" if bands else ""
            lag = self.decorrelation.get("coherence_lag_px") or 0
            coherence = (f", coherent scattering removed (sideways shift {lag} px, speckle's correlation per band "
                         f"{' / '.join(f'{v:.2f}' for v in self.decorrelation['coherence_reference_bands'])})"
                         if lag else "")
            rotations = self.decorrelation.get("out_of_plane_rotations", "lateral")
            what["decorrelation"] = (
                f"the probe's calibrated speckle decorrelation (sigma {self.decorrelation['sigma_mm']:.2f} mm{per_band}"
                f"{coherence}; tilts: {rotations}) estimates instead of the network")
        loo = ", ".join(f"{k} {x:.1f} %" for k, x in self.candidates.items())
        lines = [
            f"adapted {self.base} to the probe of {len(self.sweeps)} tracked sweeps in {self.seconds:.0f} s: "
            f"{self.checkpoint}",
            f"  correction: {what.get(self.correction, self.correction)}" + ("; weights fine-tuned" if self.fine_tuned else ""),
            f"  mean final drift of each sweep with each correction fitted on the others (% of path): {loo}",
            f"  held-back sweep {v['name']}: final drift {v['fdr_base_percent']:.1f} % of path with the base model, "
            f"{v['fdr_adapted_percent']:.1f} % with the correction fitted on the other sweeps",
        ]
        if "fdr_fine_tuned_percent" in v:
            lines.append(f"  fine-tuned: {v['fdr_fine_tuned_percent']:.1f} % on the held-back sweep"
                         + ("" if self.fine_tuned else " (not better: the base weights are kept)"))
        if v["fdr_adapted_percent"] > v["fdr_base_percent"]:
            lines.append("  warning: the correction did not help on the held-back sweep; record more (or longer) "
                         "tracked sweeps of this probe")
        return "\n".join(lines)


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
    return _fit_scale(problems)


def _fit_scale(problems) -> float:
    """:func:`fit_probe_scale` on ``(p_est, poses_t, path_mm)`` triples (:func:`.attribution.out_of_plane_problem`)."""

    def cost(log_k: float) -> float:
        return float(np.mean([_mean_drift_percent(p, t, path, np.exp(log_k)) for p, t, path in problems]))

    grid = np.linspace(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1]), 41)
    values = [cost(g) for g in grid]
    k = int(np.argmin(values))
    res = minimize_scalar(cost, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x if res.fun < values[k] else grid[k]))


def _centres(problem: dict, params: np.ndarray) -> np.ndarray:
    """(n, 3) image centres of a sweep from corrected parameters in the models' convention."""
    p = params if problem["direction"] == "toward" else reverse_direction(params)
    return (problem["poses"][0] @ frame_to_frame_to_relative(params_to_matrices(p)))[:, :3, 3]


def _drifts(problem: dict, params: np.ndarray) -> tuple[float, float]:
    """(mean, final) drift of the image centre, % of the sweep's path."""
    d = np.linalg.norm(_centres(problem, params) - problem["poses"][:, :3, 3], axis=1)
    return 100.0 * float(d.mean()) / problem["path"], 100.0 * float(d[-1]) / problem["path"]


def _blend_of(x, dec_cfg) -> dict:
    return {"model_tz_weight": float(np.exp(x[0])), "decorrelation_tz_weight": float(x[1]),
            "rotation_scale": float(np.exp(x[2])), "decorrelation": dec_cfg.to_dict()}


def fit_decorrelation_blend(problems, decorrelation_config) -> dict:
    """The blend of the model's and the decorrelation's elevational step that fits the sweeps.

    Parameters
    ----------
    problems : list of dicts, one per tracked sweep: ``p`` (n - 1, 6) the model's and ``dec``
        (n - 1, 6) the decorrelation's frame-to-frame parameters (models' "toward"
        convention), ``direction`` ("toward"/"away", the tracked one), ``poses`` (n, 4, 4) the
        true centred image-mm poses (mm), ``path`` (path length of the image centre, mm)
    decorrelation_config : the :class:`.decorrelation.DecorrelationConfig` of ``dec``

    Returns
    -------
    dict
        ``decorrelation_blend`` (:func:`apply_decorrelation_blend`): the weights minimising the
        mean over sweeps of the mean drift of the image centre (% of path), pulled weakly toward
        the model as it is (a = 1, c = 0, r = 1).
    """
    def cost(x):
        b = _blend_of(x, decorrelation_config)
        drift = np.mean([_drifts(pr, apply_decorrelation_blend(pr["p"], None, None, b, decorrelation_params=pr["dec"]))[0]
                         for pr in problems])
        return float(drift) + _BLEND_REGULARISATION * float(np.sum(np.square(x)))

    res = minimize(cost, np.zeros(3), method="Powell", options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 3000})
    return _blend_of(res.x, decorrelation_config)


def _fit_correction(name: str, problems, dec_cfg):
    """(params -> corrected params function of a problem, record) of one candidate fitted on ``problems``."""
    if name == "none":
        return (lambda pr: pr["p"]), {}
    if name == "scale":
        # the scale commutes with the direction's sign flip: fitted on the estimates as moved
        k = _fit_scale([(pr["p"] if pr["direction"] == "toward" else reverse_direction(pr["p"]), pr["poses"], pr["path"])
                        for pr in problems])
        return (lambda pr: apply_out_of_plane_scale(pr["p"], k)), {"out_of_plane_scale": k}
    if name == "decorrelation":
        return (lambda pr: pr["dec"]), {"decorrelation": asdict(dec_cfg)}
    b = fit_decorrelation_blend(problems, dec_cfg)
    return (lambda pr: apply_decorrelation_blend(pr["p"], None, None, b, decorrelation_params=pr["dec"])), \
        {"decorrelation_blend": b}


def _with_decorrelation(problems, dec_cfg) -> list:
    """The problems with ``dec`` estimated from their measured patches (``cal``, a
    :class:`.decorrelation.CalibrationSweep`) with ``dec_cfg``, in the models' "toward"
    convention (as :func:`.predict.track_sequence` estimates with the decorrelation)."""
    from .decorrelation import params_from_patches

    dec = replace(dec_cfg, direction=-1)
    return [{**pr, "dec": params_from_patches(pr["cal"].measurements, dec)} for pr in problems]


def _fold_decorrelation(problems, held: int):
    """(decorrelation settings, problems with their ``dec``) of the leave-one-sweep-out fold
    that holds back sweep ``held``: the decorrelation calibrated on the other sweeps' ``cal``
    only (:func:`.decorrelation.calibrate_decorrelation`), so the held-back sweep's figure is
    one it was not calibrated on."""
    from .decorrelation import calibrate_decorrelation

    cfg = calibrate_decorrelation([pr["cal"] for j, pr in enumerate(problems) if j != held])
    return cfg, _with_decorrelation(problems, cfg)


def _choose(problems, names, dec_cfg):
    """Leave-one-sweep-out final drift of each candidate; returns (chosen name, {name: mean
    final drift %}, {name: final drift % of the last sweep with the candidate fitted on the
    others}, {name: record of the candidate fitted on the others for the last sweep}).

    When the problems carry their measured patches (``cal``) and a candidate needs the
    decorrelation, it is calibrated anew in each fold on the other sweeps
    (:func:`_fold_decorrelation`; ``dec_cfg`` is then unused), else the problems' ``dec``
    (calibrated with ``dec_cfg``) is used in every fold.

    The candidate with the lowest mean is chosen, except that the reference (the first of
    :data:`_REFERENCES` among the candidates) is kept unless the best one's gain over it, sweep
    by sweep, exceeds one standard error of those gains: with a handful of sweeps a small mean
    gain is as likely noise (on the independent simulator's convex probe a correction that looked
    better on 6 sweeps was worse on 10 others).
    """
    per_fold = any(n in _NEED_DECORRELATION for n in names) and all(pr.get("cal") is not None for pr in problems)
    folds = [_fold_decorrelation(problems, i) if per_fold else (dec_cfg, problems) for i in range(len(problems))]
    per_sweep, last, last_rec = {}, {}, {}
    for name in names:
        fdrs = []
        for i, (cfg_i, fold) in enumerate(folds):
            correct, rec = _fit_correction(name, fold[:i] + fold[i + 1:], cfg_i)
            fdrs.append(_drifts(fold[i], correct(fold[i]))[1])
        per_sweep[name], last[name], last_rec[name] = np.array(fdrs), fdrs[-1], rec
    loo = {name: float(v.mean()) for name, v in per_sweep.items()}
    chosen = min(names, key=lambda n: (loo[n], names.index(n)))
    reference = next((r for r in _REFERENCES if r in names), None)
    if reference is not None and chosen != reference:
        gain = per_sweep[reference] - per_sweep[chosen]
        if not gain.mean() > gain.std(ddof=1) / np.sqrt(gain.size):
            chosen = reference
    return chosen, loo, last, last_rec


def tracked_direction(image_to_reference, image_shape) -> str:
    """``"toward"`` or ``"away"``: the way a tracked sweep moved out of the image plane from its
    first to its last frame (:mod:`.conventions`)."""
    n = len(image_to_reference)
    return "away" if elevational_displacement_mm(image_to_reference, image_shape, 0, n - 1) > 0 else "toward"


def _tracked(sequences, image_to_probe):
    """The adaptation sweeps with their tracked ImageToReference (``truth``, pixel -> mm), frame
    shape (rows, cols), pixel spacing (mm) and direction; refuses untracked sweeps, sweeps that
    did not move and sweeps of different frame sizes or pixel spacings (another probe, depth or
    zoom: the decorrelation curve and the scale belong to one imaging setting)."""
    from .data import image_to_reference_of, pixel_spacing_of

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
        centre = np.array([(seq.n_cols - 1) / 2.0, (seq.n_rows - 1) / 2.0, 0.0, 1.0])  # pixel (column, row)
        path_mm = float(np.linalg.norm(np.diff((truth @ centre)[:, :3], axis=0), axis=1).sum())
        if not path_mm > 1e-6:
            raise AdaptationError(f"{name}: the tracked probe did not move (zero path over {seq.n_frames} frames); "
                                  "adaptation needs sweeps that move the probe")
        out.append({"name": name, "sequence": seq, "truth": truth, "shape": shape,
                    "spacing_mm": pixel_spacing_of(truth, np.ones(len(truth), dtype=bool)),
                    "direction": tracked_direction(truth, shape)})
    first = out[0]
    for s in out[1:]:
        if s["shape"] != first["shape"] or not np.allclose(s["spacing_mm"], first["spacing_mm"], rtol=0.01):
            raise AdaptationError(
                f"{s['name']} has {s['shape'][0]}x{s['shape'][1]} px frames of "
                f"{s['spacing_mm'][0]:.3g} x {s['spacing_mm'][1]:.3g} mm, {first['name']} "
                f"{first['shape'][0]}x{first['shape'][1]} px of {first['spacing_mm'][0]:.3g} x "
                f"{first['spacing_mm'][1]:.3g} mm: adaptation fits one probe at one depth and zoom; "
                "adapt on sweeps recorded with the same imaging settings")
    return out


def _problems(model, sweeps, image_to_probe, device, dec_cfg, cals=None) -> list:
    """Per sweep what the corrections are fitted on (:func:`fit_decorrelation_blend`): the
    model's estimate (adaptation not applied) and, with ``dec_cfg``, the decorrelation's, in
    the models' "toward" convention, with the true poses; with ``cals`` (the sweeps'
    :class:`.decorrelation.CalibrationSweep`) the decorrelation's estimate comes from their
    measured patches and each problem keeps its ``cal`` (per-fold calibration, :func:`_choose`)."""
    from .predict import track_sequence

    out = []
    for s in sweeps:
        res = track_sequence(s["sequence"], model, image_to_probe=image_to_probe, device=device,
                             sweep_direction=s["direction"])
        p = res.frame_to_frame if s["direction"] == "toward" else reverse_direction(res.frame_to_frame)
        _, poses, path = out_of_plane_problem(s["truth"], res.sequence.transforms["ImageToReference"].matrices,
                                              s["shape"])
        dec = None
        if dec_cfg is not None and cals is None:
            d = track_sequence(s["sequence"], "decorrelation", image_to_probe=image_to_probe, decorrelation=dec_cfg,
                               sweep_direction=s["direction"]).frame_to_frame
            dec = d if s["direction"] == "toward" else reverse_direction(d)
        out.append({"p": p, "dec": dec, "direction": s["direction"], "poses": poses, "path": path})
    if dec_cfg is not None and cals is not None:
        out = _with_decorrelation([{**pr, "cal": c} for pr, c in zip(out, cals)], dec_cfg)
    return out


def _raw(model):
    """The model with any adaptation it was loaded with switched off (the corrections are
    fitted anew on the network's own estimates)."""
    model.out_of_plane_scale = 1.0
    model.decorrelation_blend = None
    model.adapted_decorrelation = None
    return model


def _select(model, sweeps, image_to_probe, device, dec_cfg, names, cals=None):
    """Problems, the chosen correction fitted on all sweeps (record), and the leave-one-out figures."""
    problems = _problems(_raw(model), sweeps, image_to_probe, device, dec_cfg, cals)
    moved = [pr for pr in problems if pr["path"] > 0]
    if len(moved) < len(problems):
        raise AdaptationError(f"{len(problems) - len(moved)} of the sweeps did not move (zero tracked path); "
                              "adaptation needs sweeps that move the probe")
    chosen, loo, last, last_rec = _choose(problems, list(names), dec_cfg)
    _, record = _fit_correction(chosen, problems, dec_cfg)
    return problems, chosen, record, loo, last, last_rec


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
        adapted checkpoint's network is adapted anew (its correction is replaced)
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
        Fewer than 2 sweeps, a sweep not tracked throughout, or one that does not move.
    ModelFileError
        An unreadable base model.
    """
    import torch

    from .decorrelation import calibrate_decorrelation, calibration_sweep
    from .predict import default_model_path, input_spacing, load_model, read_checkpoint
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
    dec_cfg = cals = None
    if any(c in cfg.corrections for c in _NEED_DECORRELATION):
        report(f"calibrating the speckle decorrelation on {len(sweeps)} sweeps")
        try:
            cals = [calibration_sweep(s["sequence"].frames, s["truth"],
                                      input_spacing(s["sequence"], image_to_probe=image_to_probe)[0]) for s in sweeps]
            dec_cfg = calibrate_decorrelation(cals)
        except ValueError as exc:  # frames too small for its patches, no pair of frames that decorrelated
            raise AdaptationError(f"the speckle decorrelation cannot be calibrated on these sweeps: {exc}") from None
    report(f"estimating {len(sweeps)} sweeps with {base} and choosing the correction")
    problems, chosen, record, loo, last, last_rec = _select(model, sweeps, image_to_probe, device, dec_cfg,
                                                            cfg.corrections, cals)
    held = sweeps[-1]
    validation = {"name": held["name"], "fdr_base_percent": _drifts(problems[-1], problems[-1]["p"])[1],
                  "correction": chosen, "fdr_adapted_percent": last[chosen]}
    if "scale" in last:
        validation.update(scale_from_others=last_rec["scale"]["out_of_plane_scale"], fdr_scaled_percent=last["scale"])
    state, fine_tuned = ckpt["state_dict"], False
    if cfg.fine_tune:
        report(f"fine-tuning for at most {cfg.epochs} epochs / {cfg.max_minutes:g} min")
        with tempfile.TemporaryDirectory(prefix="freehandus-adapt-") as work:
            best = _fine_tune(base_path, model.config, sweeps, cfg, Path(work))
            tuned = load_model(best, device)
            tuned_ckpt = read_checkpoint(best)
        report("choosing the correction of the fine-tuned weights")
        _, t_chosen, t_record, t_loo, t_last, _ = _select(tuned, sweeps, image_to_probe, device, dec_cfg,
                                                          cfg.corrections, cals)
        validation["fdr_fine_tuned_percent"] = t_last[t_chosen]
        validation["fine_tuned_correction"] = t_chosen
        if validation["fdr_fine_tuned_percent"] < validation["fdr_adapted_percent"]:
            chosen, record, loo, state, fine_tuned = t_chosen, t_record, t_loo, tuned_ckpt["state_dict"], True
            ckpt = {**ckpt, "model_config": tuned_ckpt["model_config"]}
    scale = float(record.get("out_of_plane_scale", 1.0))
    blend = record.get("decorrelation_blend")
    dec_record = record.get("decorrelation")
    per_sweep = [{"name": s["name"], "direction": s["direction"], "frames": int(s["sequence"].n_frames),
                  "path_mm": pr["path"], "fdr_base_percent": _drifts(pr, pr["p"])[1]}
                 for s, pr in zip(sweeps, problems)]
    record = {"out_of_plane_scale": scale, "correction": chosen, "decorrelation_blend": blend, "decorrelation": dec_record,
              "base": str(base),
              "fine_tuned": fine_tuned, "sweeps": [s["name"] for s in sweeps], "candidates": loo,
              "validation": validation,
              "imaging": {"frame_shape": list(sweeps[0]["shape"]), "pixel_spacing_mm": list(sweeps[0]["spacing_mm"])}}
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", ADAPTATION_KEY)}  # nothing to resume
    out.update({"state_dict": state, ADAPTATION_KEY: _plain(record)})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(out, tmp)
    tmp.replace(out_path)
    return AdaptationResult(out_path, str(base), scale, fine_tuned, _plain(validation), _plain(per_sweep),
                            time.perf_counter() - started, chosen, _plain(blend), _plain(loo), _plain(dec_record))


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
        total = (4 if cfg.fine_tune else 2) if any(
            c in cfg.corrections for c in _NEED_DECORRELATION) else (3 if cfg.fine_tune else 1)
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

"""Inference: frames -> trajectory, with a learned model or the decorrelation baseline.

- :func:`load_model` reads a checkpoint (strict, weights only: :func:`read_checkpoint` runs no code
  from the file), :func:`default_model_path` is the shipped one.
- :func:`predict_poses` runs a model over frames already at its input geometry, in overlapping
  windows of ``clip_length`` frames (each pair is taken from the window where it is most
  central; DualTrack's global tokens are computed once per sweep) -> frame-to-frame poses.
- :func:`track_sequence` does it for a whole tracked (or untracked) sequence: pixel spacing from
  ImageToReference / ImageToProbe / ``spacing_mm``, resampling to the model's spacing, inference,
  and an output sequence whose ``ImageToReference`` is the estimate, anchored at the input's first
  pose when known (else at ``diag(sx, sy, 1)``: pixels scaled to mm, first frame at the origin).

torch is imported inside the functions that need it, so the decorrelation method works
without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from FreehandUSLib.errors import FreehandUSError, SequenceError
from FreehandUSLib.sequence import TrackedSequence

from .confidence import (
    DECORRELATION_CALIBRATION,
    LEARNED_CALIBRATION,
    FrameUncertainty,
    decorrelated_frames,
    frame_uncertainty,
)
from .conventions import (
    SWEEP_DIRECTIONS,
    check_sweep_direction,
    column_mirror,
    elevational_direction_check,
    image_handedness,
    opposite_direction,
    reverse_direction,
)
from .decorrelation import DecorrelationConfig, estimate_frame_to_frame
from .mirror_average import check_mode, conjugate, unreverse
from .pose import mirror_x, trajectory_from_frame_to_frame  # the latter also part of this module's API

__all__ = [
    "ModelFileError",
    "TrackingResult",
    "default_model_path",
    "load_model",
    "read_checkpoint",
    "predict_poses",
    "track_sequence",
    "trajectory_from_frame_to_frame",
    "input_spacing",
    "TRAJECTORY_SOURCE_KEY",
    "ESTIMATED_TRAJECTORY_PREFIX",
    "FLAG_FIELD",
    "UNCERTAINTY_FIELDS",
]

log = logging.getLogger(__name__)

#: Metadata key of a ``track predict`` output that says where its ImageToReference comes from.
TRAJECTORY_SOURCE_KEY = "TrajectorySource"
#: Start of the :data:`TRAJECTORY_SOURCE_KEY` value of an estimated trajectory.
ESTIMATED_TRAJECTORY_PREFIX = "sensorless estimate"
#: Per-frame field of a ``track predict`` output: :data:`.confidence.FLAG_OK`, ``empty`` or ``decorrelated``.
FLAG_FIELD = "SensorlessFlag"
#: Per-frame fields of a ``track predict`` output with the uncertainty (:func:`.confidence.frame_uncertainty`):
#: sigma of the step into the frame out of the image plane (mm) and of its tilt (deg), and the 95 %
#: drift band of the frame's image centre (mm).
UNCERTAINTY_FIELDS = {
    "elevational_sigma_mm": "SensorlessElevationalSigmaMm",
    "out_of_plane_sigma_deg": "SensorlessOutOfPlaneSigmaDeg",
    "drift_band_mm": "SensorlessDriftBandMm",
}

#: Name of the shipped model inside ``SensorlessTracking/Resources/Models``.
DEFAULT_MODEL_NAME = "sensorless_dualtrack.pt"


class ModelFileError(FreehandUSError):
    """A model file is missing, unreadable, or does not fit the input."""


def default_model_path() -> Path:
    """The shipped model (``SensorlessTracking/Resources/Models/sensorless_dualtrack.pt``)."""
    return Path(__file__).resolve().parents[1] / "Resources" / "Models" / DEFAULT_MODEL_NAME


def read_checkpoint(path) -> dict:
    """The contents of a FreehandUS checkpoint, read without running any code from the file.

    A checkpoint (:func:`~.train.train` writes it) is a dict of tensors and plain values: the
    architecture as a JSON-able ``model_config`` dict (:meth:`~.models.ModelConfig.to_dict`), the
    ``state_dict``, and for resuming the optimiser's state and the training settings. It is read
    with ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers, so
    a file holding any other Python object (a pickled class or function, which ``pickle`` would
    run) is refused instead of executed.

    Raises
    ------
    ModelFileError
        Missing file, a file holding other Python objects, not a torch file, or a dict without
        ``model_config`` (a plain dict) and ``state_dict``.
    """
    import pickle
    import re

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the class or function the file asks for ("GLOBAL posix.system"); without one
        # the file is not a pickle at all
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ModelFileError(
                f"{path}: refused: the file holds a Python object ({found.group(1)}) besides weights and plain "
                "settings, and loading it could run code; only checkpoints written by FreehandUS (track train) load"
            ) from exc
        raise ModelFileError(f"{path}: not a readable torch checkpoint (not a torch file)") from exc
    except Exception as exc:  # torch raises many kinds on a corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"{path}: not a readable torch checkpoint ({first})") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or "state_dict" not in ckpt:
        raise ModelFileError(f"{path}: not a FreehandUS tracking checkpoint (needs 'model_config' and 'state_dict')")
    return ckpt


def load_model(path, device="cpu"):
    """Load a checkpoint written by :func:`~.train.train` (strict); the model is in eval mode.

    The returned ``torch.nn.Module`` has ``.config`` (:class:`~.models.ModelConfig`) and
    ``.out_of_plane_scale`` (1.0, or the factor of a per-probe adaptation, :mod:`.adapt`, which
    :func:`track_sequence` applies) and ``.decorrelation_blend`` (None, or the adaptation's
    blend with speckle decorrelation, :func:`.corrections.apply_decorrelation_blend`) and
    ``.adapted_decorrelation`` (None, or the probe's calibrated speckle decorrelation settings that
    :func:`track_sequence` estimates with instead of the network) and ``.adapted_imaging`` (None, or
    the adaptation sweeps' frame size and pixel spacing: :func:`track_sequence` warns on others).

    Raises
    ------
    ModelFileError
        Missing file, not a FreehandUS checkpoint, or weights that do not fit the architecture.
    """
    import torch

    from .models import ModelConfig, build_model

    path = Path(path)
    ckpt = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: bad model_config: {exc}") from exc
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit a {config.name} model: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model = model.to(torch.device(device))
    # a per-probe adaptation (:mod:`.adapt`): the factor on the estimated out-of-plane motion
    adaptation = ckpt.get("adaptation")
    scale = adaptation.get("out_of_plane_scale", 1.0) if isinstance(adaptation, dict) else 1.0
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ModelFileError(f"{path}: bad adaptation out_of_plane_scale {scale!r} (a positive number)")
    model.out_of_plane_scale = float(scale)
    from .corrections import check_adapted_decorrelation, check_adapted_imaging, check_decorrelation_blend

    try:
        model.adapted_imaging = check_adapted_imaging(adaptation.get("imaging") if isinstance(adaptation, dict) else None)
        model.decorrelation_blend = check_decorrelation_blend(
            adaptation.get("decorrelation_blend") if isinstance(adaptation, dict) else None)
        model.adapted_decorrelation = check_adapted_decorrelation(
            adaptation.get("decorrelation") if isinstance(adaptation, dict) else None)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    return model


def _decorrelation_estimate(frames, spacing, config: DecorrelationConfig) -> np.ndarray:
    """:func:`.decorrelation.estimate_frame_to_frame`, with frames it cannot measure (too small for
    its patches, or for the calibrated coherence correction's shift) refused as a :class:`SequenceError`."""
    try:
        return estimate_frame_to_frame(frames, spacing, config)
    except ValueError as exc:
        raise SequenceError(f"speckle decorrelation cannot track these frames: {exc}") from None


def _check_frames(frames, size) -> np.ndarray:
    if isinstance(frames, (list, tuple)):
        shapes = {np.asarray(f).shape for f in frames}
        if len(shapes) > 1:
            raise SequenceError(f"frames have different sizes: {sorted(shapes)}")
        frames = np.stack([np.asarray(f) for f in frames]) if frames else np.zeros((0, 1, 1))
    f = np.asarray(frames)
    if f.ndim != 3:
        raise SequenceError(f"frames must be (n_frames, rows, cols), got shape {f.shape}")
    if f.shape[0] < 2:
        raise SequenceError(f"tracking needs at least 2 frames, got {f.shape[0]}")
    if tuple(f.shape[1:]) != tuple(size):
        raise ModelFileError(
            f"the model expects {size[0]}x{size[1]} (rows x cols) input frames, got {f.shape[1]}x{f.shape[2]}; "
            "resample with track_sequence() or use a model for this input size"
        )
    return f


def _windows(n: int, clip_length: int) -> tuple[int, list[int]]:
    """Inference windows: (frames per window, start of each window).

    Windows of ``t = min(clip_length, n)`` frames overlap by ``2 * (t // 4) + 1`` frames (for
    t >= 8): each pair is later taken from the window where it is most central, away from the
    clip ends the temporal convolutions pad with zeros.
    """
    t = min(clip_length, n)
    margin = t // 4 if t >= 8 else 0
    stride = max(1, t - 1 - 2 * margin)
    starts = list(range(0, max(n - t, 0) + 1, stride))
    if starts[-1] != n - t:
        starts.append(n - t)
    return t, starts


def predict_poses(
    frames, model, *, device="cpu", batch_size: int = 8, global_frames=None, fast: bool = True
) -> np.ndarray:
    """Frame-to-frame poses of a sweep already at the model's input geometry.

    Parameters
    ----------
    frames : (n, rows, cols) uint8 (or float in 0..1), rows x cols = ``model.config.image_size``
    model : a loaded model (:func:`load_model`)
    device : torch device
    batch_size : windows per forward pass
    global_frames : (n, g, g) downsampled frames for DualTrack's global encoder (default: made
        from ``frames``)
    fast : on the CPU, run DualTrack's local encoder as
        :class:`~.models.inference.FastLocalEncoder` (same weights and numbers to about 1e-6;
        False = the model's own ``forward``)

    Returns
    -------
    (n - 1, 6) float64 frame-to-frame parameters (mm, deg), pair ``i`` = frame ``i + 1`` -> ``i``

    Raises
    ------
    SequenceError
        Fewer than 2 frames, or frames of different sizes.
    ModelFileError
        Frames of another size than the model input.
    """
    import cv2
    import torch

    from .models.common import normalise_clip
    from .models.inference import fast_local_encoder

    cfg = model.config
    f = _check_frames(frames, cfg.image_size)
    scale = 255.0 if f.dtype == np.uint8 else 1.0
    n = f.shape[0]
    t, starts = _windows(n, cfg.clip_length)
    device = torch.device(device)
    encoder = fast_local_encoder(model) if fast and device.type == "cpu" else None
    out = np.zeros((n - 1, 6))
    best = np.full(n - 1, np.inf)
    global_tokens = None
    with torch.inference_mode():
        if getattr(cfg, "use_global", False) and cfg.name == "dualtrack":
            if global_frames is None:
                g = cfg.global_size
                global_frames = np.stack([cv2.resize(x, (g, g), interpolation=cv2.INTER_AREA) for x in f])
            g_idx = np.linspace(0, n - 1, cfg.max_global_tokens).round().astype(int)
            gf = torch.from_numpy(np.asarray(global_frames)[g_idx].astype(np.float32) / scale)[None].to(device)
            gp = torch.from_numpy((g_idx / max(n - 1, 1)).astype(np.float32))[None].to(device)
            global_tokens = model.encode_global(gf, gp)
        # the sweep as float32 once (the same values as converting every window)
        sweep = torch.from_numpy(np.ascontiguousarray(f)).to(device=device, dtype=torch.float32) / scale
        for b0 in range(0, len(starts), batch_size):
            chunk = starts[b0 : b0 + batch_size]
            x = torch.stack([sweep[s : s + t] for s in chunk])
            pos = torch.from_numpy(
                np.stack([np.arange(s, s + t) / max(n - 1, 1) for s in chunk]).astype(np.float32)
            ).to(device)
            g_tok = None if global_tokens is None else global_tokens.expand(len(chunk), -1, -1)
            if encoder is not None:
                y = model.decode(encoder(normalise_clip(x)), pos, g_tok)
            else:
                kwargs = {"positions": pos}
                if g_tok is not None:
                    kwargs["global_tokens"] = g_tok
                y = model(x, **kwargs)
            y = y.cpu().numpy().astype(np.float64)
            for k, s in enumerate(chunk):
                pairs = np.arange(s, s + t - 1)
                dist = np.abs(pairs - (s + (t - 2) / 2.0))
                take = dist < best[pairs]
                out[pairs[take]] = y[k, take]
                best[pairs[take]] = dist[take]
    return out


def input_spacing(sequence: TrackedSequence, *, image_to_probe=None, spacing_mm=None) -> tuple[tuple[float, float], np.ndarray | None, np.ndarray | None]:
    """Pixel spacing of a sequence and its ImageToReference (if any) and ImageToProbe (if any).

    Order: ``spacing_mm`` given; ImageToReference (or ImageToProbe + a chain); ImageToProbe;
    ``sequence.pixel_spacing_mm``. Raises SequenceError when none is known.
    """
    from .data import image_to_reference_of, pixel_spacing_of

    itr = None
    try:
        mats, valid = image_to_reference_of(sequence, image_to_probe=image_to_probe)
        if valid.any():
            itr = mats
    except FreehandUSError:
        itr = None
    itp = None
    if image_to_probe is not None:
        itp = np.asarray(image_to_probe, dtype=np.float64)
    elif "ImageToProbe" in sequence.transforms and sequence.transforms["ImageToProbe"].valid.any():
        ft = sequence.transforms["ImageToProbe"]
        itp = ft.matrices[np.flatnonzero(ft.valid)[0]]
    if spacing_mm is not None:
        sp = spacing_mm if np.ndim(spacing_mm) else (spacing_mm, spacing_mm)
        return (float(sp[0]), float(sp[1])), itr, itp
    if itr is not None:
        return pixel_spacing_of(itr, np.all(np.isfinite(itr), axis=(1, 2))), itr, itp
    if itp is not None:
        return (float(np.linalg.norm(itp[:3, 0])), float(np.linalg.norm(itp[:3, 1]))), itr, itp
    if sequence.pixel_spacing_mm is not None:
        return tuple(sequence.pixel_spacing_mm), itr, itp
    raise SequenceError(
        "the pixel spacing of the input is unknown: give --spacing, an ImageToProbe, or a sequence with ImageToReference"
    )


_DIRECTION_WORDS = {"toward": "the image plane moved out of the screen, toward the viewer",
                    "away": "the image plane moved into the screen, away from the viewer"}


@dataclass(frozen=True, eq=False)
class TrackingResult:
    """An estimated trajectory.

    Attributes
    ----------
    sequence : the input frames with the estimated ``ImageToReference`` (plus ``ImageToProbe``
        and ``ProbeToReference`` when the calibration is known)
    frame_to_frame : (n - 1, 6) estimated frame-to-frame parameters (mm, deg), centred image-mm
        frame of the estimation (right-handed: for a mirrored calibration, the frame of the
        left-right mirrored image; :mod:`.conventions`), for the assumed sweep direction
    method : model name or "decorrelation"
    seconds : inference wall time (resampling included)
    true_image_to_reference : (n, 4, 4) the input's tracked ImageToReference, or None
    info : what the estimate assumed and found (sweep direction, flags, uncertainty as a dict, warnings)
    uncertainty : per-frame uncertainty (:class:`~.confidence.FrameUncertainty`)
    """

    sequence: TrackedSequence
    frame_to_frame: np.ndarray
    method: str
    seconds: float
    true_image_to_reference: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    uncertainty: FrameUncertainty | None = None

    @property
    def frames_per_second(self) -> float:
        return self.sequence.n_frames / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "frames": self.sequence.n_frames,
            "seconds": self.seconds,
            "frames_per_second": self.frames_per_second,
            "anchored_at_input_pose": self.true_image_to_reference is not None,
            **self.info,
        }

    def __str__(self) -> str:
        lines = [
            f"{self.method}: {self.sequence.n_frames} frames tracked in {self.seconds:.2f} s "
            f"({self.frames_per_second:.0f} frames/s), estimated (not tracked)"
        ]
        direction = self.info.get("sweep_direction")
        if direction is not None:
            lines.append(f"  assumed sweep direction: {direction} ({_DIRECTION_WORDS[direction]}; the images cannot "
                         "show it: set it if the probe went the other way)")
        if self.info.get("image_frame") == "mirrored":
            lines.append("  mirrored calibration (det < 0): estimated on the left-right mirrored frames and mapped back")
        check = self.info.get("direction_check")
        if check is not None and check["agrees"] is not None:
            lines.append(f"  direction check against the tracked frames {check['first_frame']}-{check['last_frame']}: "
                         f"{'agrees' if check['agrees'] else 'DISAGREES'} (tracked "
                         f"{check['tracked_elevational_mm']:+.1f} mm, estimated {check['estimated_elevational_mm']:+.1f} mm "
                         "out of the plane)")
        unc = self.info.get("uncertainty")
        if unc is not None:
            pct = unc.get("final_drift_band_percent_of_path")
            lines.append(f"  uncertainty: the last frame lies within {unc['final_drift_band_mm']:.1f} mm of its estimated place "
                         f"(95 % band{f', {pct:.0f} % of the estimated path' if pct is not None else ''}); per step "
                         f"sigma {unc['median_elevational_sigma_mm']:.2f} mm out of the plane, "
                         f"{unc['median_out_of_plane_sigma_deg']:.2f} deg tilt (median; per frame: the "
                         f"{UNCERTAINTY_FIELDS['drift_band_mm']} field)")
        flags = self.info.get("frame_flags")
        if flags is not None:
            lines.append(f"  unreliable frames: {flags['empty_frames']} empty, {flags['decorrelated_frames']} decorrelated "
                         f"(per frame: the {FLAG_FIELD} field of the output)")
        lines += [f"  warning: {w}" for w in self.info.get("warnings", [])]
        return "\n".join(lines)


def track_sequence(
    sequence: TrackedSequence,
    model="default",
    *,
    image_to_probe=None,
    spacing_mm=None,
    device="cpu",
    batch_size: int = 8,
    decorrelation: DecorrelationConfig | None = None,
    mirror_average: str = "none",
    sweep_direction: str = "toward",
) -> TrackingResult:
    """Estimate the trajectory of ``sequence`` (see the module docstring).

    Parameters
    ----------
    sequence : TrackedSequence, one-channel frames (tracking transforms optional)
    model : a loaded model, a checkpoint path, "default" (the shipped model) or "decorrelation"
    image_to_probe : optional (4, 4) calibration (pixel spacing, output ProbeToReference)
    spacing_mm : optional pixel spacing (sx, sy) or one number, when nothing else gives it
    device, batch_size : inference settings
    decorrelation : settings of the decorrelation method
    mirror_average : learned models only: "none", "flip" or "flip+reverse", average the estimate
        over the sweep's mirror images (:mod:`.mirror_average`; 2x / 4x the inference time)
    sweep_direction : "toward" (default, the training convention) or "away": which way the
        image plane moved along its normal, seen on the screen with row 0 at the top and column
        0 on the left (for a mirrored calibration: in the image mirrored back;
        :mod:`.conventions`); images cannot show it. For the decorrelation method it replaces
        ``decorrelation.direction``.

    A mirrored calibration (``det < 0``) is handled by estimating on the left-right mirrored
    frames and mapping the estimate back (:mod:`.conventions`). The result's ``info`` holds
    ``sweep_direction``, ``image_frame`` ("right-handed" or "mirrored"), the per-frame flags
    (:func:`.confidence.decorrelated_frames`, also the ``SensorlessFlag`` frame field of the
    output sequence), the per-frame ``uncertainty`` (:func:`.confidence.frame_uncertainty`:
    sigmas of the steps and the 95 % drift band, also the :data:`UNCERTAINTY_FIELDS` frame
    fields; the result's ``uncertainty`` attribute) and, when part of the input is tracked, ``direction_check``
    (:func:`.conventions.elevational_direction_check`; a warning in ``info["warnings"]`` when
    the estimate moves the other way than the tracking; one also when an adapted model gets frames
    of another size or pixel spacing than it was adapted on). The output sequence's metadata say the
    trajectory is estimated (``TrajectorySource``).

    Raises
    ------
    SequenceError
        Fewer than 2 frames, several channels, unknown pixel spacing.
    TransformError
        A calibration whose handedness is inconsistent (see :func:`.conventions.image_handedness`).
    ModelFileError
        Missing or unfit model file.
    """
    check_mode(mirror_average)
    check_sweep_direction(sweep_direction)
    if sequence.n_frames < 2:
        raise SequenceError(f"tracking needs at least 2 frames, got {sequence.n_frames}")
    if sequence.frames.ndim != 3:
        raise SequenceError(f"tracking needs one-channel frames, got shape {sequence.frames.shape}")
    spacing, itr, itp = input_spacing(sequence, image_to_probe=image_to_probe, spacing_mm=spacing_mm)
    rows, cols = sequence.n_rows, sequence.n_cols
    tracked = None if itr is None else np.all(np.isfinite(itr), axis=(1, 2))
    handedness = image_handedness(itr, tracked, itp)
    start = time.perf_counter()
    info = {"input_spacing_mm": list(spacing), "sweep_direction": sweep_direction,
            "image_frame": "right-handed" if handedness > 0 else "mirrored"}
    # estimation runs in a right-handed image frame: a mirrored calibration's frames are mirrored
    # left-right (with the calibration); the sweep direction is defined in that frame
    frames_in = sequence.frames if handedness > 0 else np.ascontiguousarray(sequence.frames[:, :, ::-1])
    mirror = np.eye(4) if handedness > 0 else column_mirror(cols)
    flags = decorrelated_frames(frames_in)
    if flags.n_empty == sequence.n_frames:
        raise SequenceError(f"every one of the {sequence.n_frames} frames is blank (no contrast): there is nothing to "
                            "track; check the recording's image channel")
    if handedness < 0:
        log.info("mirrored calibration (det < 0): estimating on the left-right mirrored frames, mapped back")
    imaging_warning = None
    if isinstance(model, str) and model == "decorrelation":
        if mirror_average != "none":
            raise ValueError(
                "mirror averaging is for learned models; the decorrelation method has no learned bias to average out"
            )
        cfg_dec = replace(decorrelation or DecorrelationConfig(), direction=-1)  # "toward", as the models
        params = _decorrelation_estimate(frames_in, spacing, cfg_dec)
        method = "decorrelation"
        uses_decorrelation = True
    else:
        uses_decorrelation = False
        from .data import _as_uint8, resample_frames

        if isinstance(model, (str, Path)):
            model = load_model(default_model_path() if str(model) == "default" else model, device)
        cfg = model.config
        coarse = max(spacing) / cfg.pixel_spacing_mm
        if coarse > 1.5:
            log.warning(
                "input pixels (%.3f x %.3f mm) are %.1fx coarser than the model's training spacing %.3f mm: "
                "the speckle the model relies on is not resolved; expect poor accuracy",
                spacing[0], spacing[1], coarse, cfg.pixel_spacing_mm,
            )
            info["warning"] = f"input spacing {max(spacing):.3f} mm is coarser than the model's {cfg.pixel_spacing_mm} mm"
        method = cfg.name if cfg.name != "dualtrack" or cfg.use_global else "dualtrack-local"
        from .corrections import imaging_mismatch

        imaging_warning = imaging_mismatch(getattr(model, "adapted_imaging", None), (rows, cols), spacing)
        adapted_dec = getattr(model, "adapted_decorrelation", None)
        if adapted_dec is not None:  # adapted to a probe whose calibrated decorrelation beat the model (:mod:`.adapt`)
            from .corrections import adapted_decorrelation_config

            params = _decorrelation_estimate(frames_in, spacing, adapted_decorrelation_config(adapted_dec))
            method += " (adapted: the probe's calibrated speckle decorrelation used instead of the network)"
            info["adapted_decorrelation"] = adapted_dec
            uses_decorrelation = True
        else:
            frames = resample_frames(_as_uint8(frames_in), spacing, cfg.pixel_spacing_mm, cfg.image_size)
            params = predict_poses_averaged(
                frames, model, mode=mirror_average, device=device, batch_size=batch_size
            )
        scale = float(getattr(model, "out_of_plane_scale", 1.0))
        blend = getattr(model, "decorrelation_blend", None)
        if blend is not None:  # a model adapted to the probe with the decorrelation blended in (:mod:`.adapt`)
            from .corrections import apply_decorrelation_blend

            params = apply_decorrelation_blend(params, frames_in, spacing, blend)
            method += " (adapted, blended with speckle decorrelation)"
            info["decorrelation_blend"] = blend
        if scale != 1.0:  # a model adapted to the probe (:mod:`.adapt`)
            from .corrections import apply_out_of_plane_scale

            params = apply_out_of_plane_scale(params, scale)
            method += f" (adapted, out-of-plane scale {scale:.3f})"
            info["out_of_plane_scale"] = scale
        if mirror_average != "none" and not uses_decorrelation:
            method += f" ({mirror_average} averaged)"
            info["mirror_average"] = mirror_average
    if sweep_direction != SWEEP_DIRECTIONS[0]:  # the models' and decorrelation's own convention: "toward"
        params = reverse_direction(params)
    first = None
    if itr is not None and np.all(np.isfinite(itr[0])):
        first = itr[0] @ mirror
    # the estimate of the internal (right-handed) pixels, mapped back to the stored pixels
    est = trajectory_from_frame_to_frame(params, spacing, (rows, cols), first) @ mirror
    seconds = time.perf_counter() - start
    n = sequence.n_frames
    info["frame_flags"] = flags.to_dict()
    centres = est @ np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    uncertainty = frame_uncertainty(
        params, flags, calibration=DECORRELATION_CALIBRATION if uses_decorrelation else LEARNED_CALIBRATION,
        path_length_mm=float(np.linalg.norm(np.diff(centres[:, :3], axis=0), axis=1).sum()))
    info["uncertainty"] = uncertainty.to_dict()
    warnings = [] if imaging_warning is None else [imaging_warning]
    if flags.unreliable.any():
        warnings.append(str(flags))
    if tracked is not None:
        check = elevational_direction_check(itr, tracked, est, (rows, cols))
        if check is not None:
            info["direction_check"] = check
            if check["agrees"] is False:
                warnings.append(
                    f"the tracked frames {check['first_frame']}-{check['last_frame']} moved "
                    f"{check['tracked_elevational_mm']:+.1f} mm out of the image plane and the estimate "
                    f"{check['estimated_elevational_mm']:+.1f} mm: the sweep went the other way than the assumed "
                    f"'{sweep_direction}'; estimate again with sweep direction '{opposite_direction(sweep_direction)}'"
                )
    for w in warnings:
        log.warning("%s", w)
    if warnings:
        info["warnings"] = warnings
    valid = np.ones(n, dtype=bool)
    transforms = {"ImageToReference": (est, valid)}
    if itp is not None:
        transforms["ImageToProbe"] = (np.broadcast_to(itp, (n, 4, 4)).copy(), valid.copy())
        transforms["ProbeToReference"] = (est @ np.linalg.inv(itp), valid.copy())
    metadata = dict(sequence.metadata)
    metadata[TRAJECTORY_SOURCE_KEY] = (
        f"{ESTIMATED_TRAJECTORY_PREFIX} ({method}, sweep direction {sweep_direction}): ImageToReference is estimated "
        "from the images, not tracked"
    )
    out = TrackedSequence(
        frames=sequence.frames,
        timestamps_s=sequence.timestamps_s.copy(),
        transforms=transforms,
        image_ok=sequence.image_ok.copy(),
        pixel_spacing_mm=spacing,
        frame_fields={FLAG_FIELD: flags.flags.tolist(), **{
            field: [f"{v:.4g}" for v in getattr(uncertainty, key)] for key, field in UNCERTAINTY_FIELDS.items()}},
        metadata=metadata,
    )
    return TrackingResult(out, params, method, seconds, itr, info, uncertainty)


def predict_poses_averaged(frames, model, *, mode: str = "flip+reverse", **predict_kwargs) -> np.ndarray:
    """Frame-to-frame poses of a sweep, averaged over its mirror images.

    Parameters
    ----------
    frames : (n, rows, cols) frames already at the model's input geometry (as for :func:`predict_poses`)
    model : a loaded learned model
    mode : one of :data:`.mirror_average.MODES`
    predict_kwargs : passed on to :func:`predict_poses` (device, batch_size, fast);
        not ``global_frames``, which every variant makes from its own frames

    Returns
    -------
    (n - 1, 6) float64 frame-to-frame parameters (mm, deg) in the centred image-mm frame, pair
    ``i`` = frame ``i + 1`` -> ``i``, as :func:`predict_poses`.
    """
    check_mode(mode)
    if "global_frames" in predict_kwargs:
        raise ValueError("predict_poses_averaged makes each variant's global frames itself; do not pass global_frames")
    f = np.asarray(frames)
    estimates = [predict_poses(f, model, **predict_kwargs)]
    if mode == "none":
        return estimates[0]
    mx = mirror_x()
    flipped = np.ascontiguousarray(f[:, :, ::-1])
    estimates.append(conjugate(predict_poses(flipped, model, **predict_kwargs), mx))
    if mode == "flip+reverse":
        estimates.append(unreverse(predict_poses(np.ascontiguousarray(f[::-1]), model, **predict_kwargs)))
        back_flipped = unreverse(predict_poses(np.ascontiguousarray(flipped[::-1]), model, **predict_kwargs))
        estimates.append(conjugate(back_flipped, mx))
    return np.mean(estimates, axis=0)

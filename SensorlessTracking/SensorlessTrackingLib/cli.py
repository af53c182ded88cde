"""``freehandus track train|adapt|predict|evaluate``: sensorless tracking from the command line.

Registered by the main command line as::

    from SensorlessTrackingLib.cli import add_parsers
    add_parsers(sub)          # sub = the top-level subparsers; adds "track"

torch is imported only when a learned model is trained or run, so ``freehandus --help`` and
``track predict --model decorrelation`` work without it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from FreehandUSLib.cli_support import (
    add_progress_option,
    check_output_path,
    finite_float,
    float_in,
    int_in,
    non_negative_float,
    positive_float,
    positive_int,
    progress_enabled,
    seed,
    spacing_mm,
    threads,
)
from FreehandUSLib.errors import FileFormatError, FreehandUSError

from .conventions import SWEEP_DIRECTION_HELP, SWEEP_DIRECTIONS
from .mirror_average import MODES

__all__ = ["add_parsers", "read_image_to_probe", "with_input_transforms", "drift_against_tracking", "band_check",
           "tracked_name"]

log = logging.getLogger(__name__)


def read_image_to_probe(path) -> np.ndarray:
    """An ImageToProbe 4x4 from a file: PLUS config ``.xml`` (``<Transform From="Image"
    To="Probe">``), ``.json`` (``{"ImageToProbe": [[...]]}`` or a bare 4x4 list), a TUS-REC
    ``calib_matrix.csv`` (two 4x4 blocks: ``spatial @ scaling`` with 1-based pixels, as the
    TUS-REC reader does), or text with 16 numbers (``.txt``, ``.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: calibration file not found")
    suffix = path.suffix.lower()
    if suffix == ".xml":
        from FreehandUSLib.io import read_plus_config

        return read_plus_config(path).require_transform("ImageToProbe")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            if "ImageToProbe" not in data:
                raise FileFormatError(f"{path}: no 'ImageToProbe' key (keys: {sorted(data)})")
            data = data["ImageToProbe"]
        m = np.asarray(data, dtype=np.float64)
    else:
        text = path.read_text().replace(",", " ").split()
        values = []
        for token in text:
            try:
                values.append(float(token))
            except ValueError:
                if suffix != ".csv":  # TUS-REC csv files label their two blocks
                    raise FileFormatError(f"{path}: expected 16 numbers for ImageToProbe, found {token!r}") from None
        if suffix == ".csv" and len(values) == 32:
            from FreehandUSLib.io.tusrec import read_tusrec_calibration

            scaling, spatial = read_tusrec_calibration(path)
            shift = np.eye(4)
            shift[:2, 3] = 1.0  # TUS-REC pixel indices start at 1
            values = (spatial @ scaling @ shift).ravel().tolist()
        m = np.asarray(values, dtype=np.float64)
    if m.size != 16:
        raise FileFormatError(f"{path}: ImageToProbe must have 16 numbers (4x4), got {m.size}")
    from FreehandUSLib.transforms import check_matrix

    return check_matrix(m.reshape(4, 4), name="ImageToProbe", source=str(path))


def add_parsers(subparsers):
    """Add ``track`` (with ``train``, ``adapt``, ``predict``, ``evaluate``) to the top-level sub-parsers."""
    track = subparsers.add_parser("track", help="sensorless tracking: train, adapt, predict, evaluate")
    sub = track.add_subparsers(dest="track_command", required=True, metavar="TRACK_COMMAND")

    p = sub.add_parser("train", help="train a tracking model on tracked sequences (or simulated sweeps)")
    p.add_argument("sequences", nargs="*", help="tracked sequence files (.igs.mha .igs.nrrd .seq.nrrd .h5)")
    p.add_argument("--out", required=True, help="output folder (checkpoints; an existing last.pt is resumed)")
    p.add_argument("--model", choices=["dualtrack", "moglo", "pairwise"], default="dualtrack")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from these weights ('default': the shipped model) to fine-tune on your own "
                        "probe; the architecture and pixel spacing then come from the checkpoint, the input size "
                        "too unless --image-size is given")
    p.add_argument("--local-only", action="store_true", help="dualtrack without the global encoder (ablation)")
    p.add_argument("--simulated", type=int_in(0, 100_000), default=0, help="also train on this many simulated sweeps")
    p.add_argument("--image-to-probe", help="calibration for files without one (.xml PLUS config, .json, .txt)")
    p.add_argument("--spacing-mm", type=spacing_mm, help="model pixel spacing in mm (default 0.3)")
    p.add_argument("--image-size", nargs="+", metavar="ROWS COLS | fit",
                   help="model input size in pixels of the model spacing, multiples of 16 (default 96 96); with "
                        "--init, a larger size lets the fine-tuned model see more of your probe's image. 'fit': "
                        "the largest size that every recording fills (at most 160 pixels a side)")
    p.add_argument("--clip-length", type=int_in(2, 4096), help="frames per clip (default 16)")
    p.add_argument("--pair-gaps", type=positive_int, nargs="+", metavar="FRAMES",
                   help="dualtrack: correlate each frame with the frames this many later (default 1; the "
                        "shipped model uses 1 2 3)")
    p.add_argument("--global-drop", type=finite_float, metavar="P",
                   help="dualtrack with the global encoder: train a share P of the clips without the global "
                        "context (drop-path, a regulariser against recognising training sweeps; default 0: off; "
                        "allowed with --init)")
    p.add_argument("--global-tokens", type=int, metavar="N",
                   help="dualtrack with the global encoder: frames of the whole sweep it sees, evenly spaced "
                        "(default 16; no weights depend on it, so allowed with --init)")
    p.add_argument("--train-clip-length", type=int_in(2, 4096), metavar="FRAMES",
                   help="frames per training clip (default: the model's clip length); longer clips lengthen the "
                        "horizon of the clip-level losses, the model and its inference windows stay as they are")
    p.add_argument("--cumulative-weight", type=non_negative_float, metavar="W",
                   help="weight of the cumulative (running-sum) parameter loss, which penalises errors that persist "
                        "over frames, e.g. out-of-plane rotations shrunk towards zero (default 0: off)")
    p.add_argument("--component-weights", type=non_negative_float, nargs=6, metavar=("TX", "TY", "TZ", "RX", "RY", "RZ"),
                   help="weights of the six parameters in the parameter and cumulative losses (default all 1)")
    p.add_argument("--epochs", type=int_in(1, 1_000_000), default=20)
    p.add_argument("--clips-per-epoch", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--val-fraction", type=float_in(0.0, 1.0, high_open=True), default=0.15,
                   help="share of subjects (parent folders) held out")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=threads, help="torch CPU threads")
    p.add_argument("--max-minutes", type=positive_float, help="stop after the epoch that passes this time")
    add_progress_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="estimate the trajectory of a sequence from its images")
    p.add_argument("sequence", help="input sequence (tracked or not)")
    p.add_argument("--model", default="default", help="checkpoint, 'default' (shipped model) or 'decorrelation'")
    p.add_argument("--out", required=True, help="output sequence with the estimated ImageToReference")
    _add_input_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("adapt", help="adapt a model to your probe from a few tracked sweeps of it (the last is held "
                                     "back to check the result)")
    p.add_argument("sweeps", nargs="+", help="tracked sequences of the probe (2 or more; 3-6 recommended)")
    p.add_argument("--out", required=True, help="the adapted model file (.pt), for track predict --model")
    p.add_argument("--base", default="default", help="model to adapt: 'default' (the shipped model) or a checkpoint")
    p.add_argument("--fine-tune", action="store_true",
                   help="also fine-tune the network (slower; kept only when it lowers the held-back sweep's drift)")
    p.add_argument("--max-minutes", type=positive_float, default=15.0, help="fine-tuning time limit (default 15)")
    p.add_argument("--epochs", type=int_in(1, 1000), default=6, help="fine-tuning epochs at most (default 6)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--image-to-probe", help="calibration for files without one (.xml PLUS config, .json, .txt)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=threads, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_adapt)

    p = sub.add_parser("evaluate", help="drift metrics of estimated trajectories against the tracked one")
    p.add_argument("sequence", help="tracked sequence (the truth: its ImageToReference)")
    p.add_argument("--model", action="append", help="model(s) to run: checkpoint, 'default', 'decorrelation' (repeatable)")
    p.add_argument("--estimate", action="append", help="already estimated sequence(s) to score (repeatable)")
    _add_input_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_evaluate)
    return track


def _add_input_options(p):
    p.add_argument("--image-to-probe", help="calibration (.xml PLUS config, .json, .txt) for spacing and ProbeToReference")
    p.add_argument("--spacing", type=spacing_mm, nargs="+", metavar="MM", help="pixel spacing (one or two numbers)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--threads", type=threads, help="torch CPU threads")
    p.add_argument("--mirror-average", choices=MODES, default="none",
                   help="learned models: average the estimate over the left-right mirrored sweep (flip) and also the "
                        "backwards sweep (flip+reverse); cancels the model's odd biases, 2x / 4x the inference time")
    p.add_argument("--sweep-direction", choices=SWEEP_DIRECTIONS, default=SWEEP_DIRECTIONS[0],
                   help=SWEEP_DIRECTION_HELP + "; the images cannot show it. With tracked frames in the input, an "
                        "estimate that moves the other way is warned about")


def _threads(n):
    if n:
        import torch

        torch.set_num_threads(int(n))


def _spacing(args):
    if not args.spacing:
        return None
    if len(args.spacing) > 2:
        raise FreehandUSError(f"--spacing takes one or two numbers, got {len(args.spacing)}")
    return tuple(args.spacing) if len(args.spacing) == 2 else (args.spacing[0], args.spacing[0])


def _image_size_arg(args, spacing_mm: float) -> tuple[int, int]:
    """--image-size: two integers, or 'fit' (the recordings' common field of view, read from the files)."""
    values = list(args.image_size)
    if values == ["fit"]:
        if not args.sequences:
            raise FreehandUSError("--image-size fit fits the input to tracked sequence files; give some (simulated "
                                  "sweeps alone have no probe to fit)")
        from FreehandUSLib.io import read_sequence

        from .input_size import fitting_image_size, sequence_field_of_view_mm

        itp = read_image_to_probe(args.image_to_probe) if args.image_to_probe else None
        # one file at a time: the recordings need not fit in memory together
        fields = [sequence_field_of_view_mm(read_sequence(p), image_to_probe=itp) for p in args.sequences]
        size = fitting_image_size(fields, spacing_mm, names=args.sequences)
        print(f"model input fitted to the recordings: {size[0]} x {size[1]} pixels of {spacing_mm} mm",
              file=sys.stderr)
        return size
    try:
        size = tuple(int(v) for v in values)
    except ValueError:
        size = ()
    if len(size) != 2:
        raise FreehandUSError(f"--image-size takes ROWS COLS (two integers) or 'fit', got {' '.join(values)}")
    if any(v < 16 or v % 16 for v in size):
        raise FreehandUSError(f"--image-size: ROWS and COLS must be multiples of 16 (>= 16), got {size[0]} {size[1]}")
    return size


def _cmd_train(args) -> int:
    from dataclasses import replace

    from .models import ModelConfig

    init = None
    if args.init:
        from .predict import default_model_path
        from .train import checkpoint_model_config

        init = str(default_model_path()) if args.init == "default" else args.init
        model_cfg = checkpoint_model_config(init)
    try:
        if init is None:
            model_cfg = ModelConfig(name=args.model, use_global=not args.local_only)
        changes = {}
        if args.spacing_mm:
            changes["pixel_spacing_mm"] = args.spacing_mm
        if args.clip_length:
            changes["clip_length"] = args.clip_length
        if args.pair_gaps:
            changes["pair_gaps"] = tuple(args.pair_gaps)
        if init is not None and changes:
            raise FreehandUSError(
                f"--init {args.init}: the model's architecture and pixel spacing come from the checkpoint; "
                "drop --spacing-mm/--clip-length/--pair-gaps (only --image-size, --global-drop and --global-tokens "
                "may change)"
            )
        for flag, field, value, off in (("--global-drop", "global_drop", args.global_drop, 0),
                                        ("--global-tokens", "max_global_tokens", args.global_tokens, None)):
            if value is None:
                continue
            if value != off and (model_cfg.name != "dualtrack" or not model_cfg.use_global):
                what = "a local-only dualtrack" if model_cfg.name == "dualtrack" else f"a {model_cfg.name} model"
                raise FreehandUSError(f"{flag} is a setting of dualtrack's global context; {what} has none "
                                      f"(drop {flag}, or train dualtrack without --local-only)")
            changes[field] = value
        if args.image_size:  # after the checks above: 'fit' reads every recording
            changes["image_size"] = _image_size_arg(args, changes.get("pixel_spacing_mm", model_cfg.pixel_spacing_mm))
        model_cfg = replace(model_cfg, **changes)
    except ValueError as exc:
        raise FreehandUSError(str(exc)) from exc
    if not args.sequences and args.simulated <= 0:
        raise FreehandUSError("give tracked sequence files and/or --simulated N")
    if args.device != "auto":
        _torch_device(args.device)
    _threads(args.threads)
    from .data import AugmentConfig, load_sweep
    from .train import TrainConfig, train

    from .losses import LossConfig

    loss_changes = {}
    if args.cumulative_weight is not None:
        loss_changes["cumulative_weight"] = args.cumulative_weight
    if args.component_weights is not None:
        loss_changes["component_weights"] = tuple(args.component_weights)
    try:
        loss_cfg = LossConfig(**loss_changes)
        if args.train_clip_length is not None and args.train_clip_length < 2:
            raise ValueError(f"--train-clip-length must be >= 2 frames, got {args.train_clip_length}")
    except ValueError as exc:
        raise FreehandUSError(str(exc)) from exc
    itp = read_image_to_probe(args.image_to_probe) if args.image_to_probe else None
    cfg = TrainConfig(
        model=model_cfg,
        sequences=tuple(str(s) for s in args.sequences),
        image_to_probe=None if itp is None else tuple(map(tuple, itp.tolist())),
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        clips_per_epoch=args.clips_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        num_threads=args.threads,
        max_minutes=args.max_minutes,
        init_from=init,
        loss=loss_cfg,
        clip_length=args.train_clip_length,
    )
    margin = AugmentConfig().crop_jitter_px
    sweeps = [load_sweep(p, model_cfg, image_to_probe=itp, margin_px=margin) for p in args.sequences]
    if args.simulated > 0:
        from .simdata import simulated_sweeps, train_seeds

        sim, _, _ = simulated_sweeps(train_seeds(args.simulated), model_cfg, margin_px=margin)
        sweeps += sim
    path = train(cfg, args.out, sweeps=sweeps, progress=progress_enabled(args))
    history_file = Path(args.out) / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    result = {"checkpoint": str(path), "model": model_cfg.name, "sweeps": len(sweeps), "history": history}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        last = history[-1] if history else {}
        print(f"trained {model_cfg.name} on {len(sweeps)} sweeps: {path} "
              f"(epoch {last.get('epoch')}, train loss {last.get('train_loss', float('nan')):.4f}, "
              f"validation loss {last.get('val_loss', float('nan')):.4f})")
    return 0


def _load_method(name, device):
    if name in ("decorrelation", "default"):
        if name == "default":
            from .predict import default_model_path, load_model

            return load_model(default_model_path(), device)
        return name
    from .predict import load_model

    return load_model(name, device)


def _torch_device(name: str) -> str:
    """Check ``--device`` before any work: a torch device name this torch build can use."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FreehandUSError(f"--device {name}: not a torch device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FreehandUSError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FreehandUSError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s) "
                                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise FreehandUSError(f"--device {name}: this torch has no MPS (Apple GPU) support; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise FreehandUSError(f"--device {name}: not supported (cpu, cuda, cuda:N or mps)")
    return name


#: Transforms a ``track predict`` output holds for the estimate (:func:`.predict.track_sequence`).
ESTIMATE_NAMES = ("ImageToReference", "ImageToProbe", "ProbeToReference")


def tracked_name(name: str) -> str:
    """The name under which ``track predict`` keeps an input transform whose name the estimate
    takes: ``ImageToReference`` -> ``ImageToTrackedReference``."""
    from FreehandUSLib.transforms import split_transform_name

    source, target = split_transform_name(name)
    return f"{source}ToTracked{target}"


def with_input_transforms(estimate, sequence):
    """The estimate's sequence plus the input's own transforms (and per-frame fields).

    The estimate keeps its names (``ImageToReference``, and with a calibration ``ImageToProbe``
    and ``ProbeToReference``), so a reconstruction or ``track evaluate --estimate`` of the output
    uses the estimate. An input transform of another name is kept as it is (``ProbeToTracker``,
    ``ReferenceToTracker``, ...); one the estimate takes is kept as :func:`tracked_name` (the
    tracked ``ImageToReference`` as ``ImageToTrackedReference``), unless it equals the estimate's
    (the same calibration).
    """
    from dataclasses import replace

    transforms = dict(estimate.transforms)
    for name, ft in sequence.transforms.items():
        if name not in transforms:
            transforms[name] = ft
            continue
        same = np.array_equal(ft.valid, transforms[name].valid) and np.allclose(
            np.where(ft.valid[:, None, None], ft.matrices, 0.0),
            np.where(ft.valid[:, None, None], transforms[name].matrices, 0.0), rtol=0.0, atol=1e-12)
        if not same:
            transforms[tracked_name(name)] = ft
    fields = {**sequence.frame_fields, **estimate.frame_fields}
    return replace(estimate, transforms=transforms, frame_fields=fields)


def drift_against_tracking(result, sequence, image_to_probe=None):
    """Tracking metrics (:class:`.metrics.TrackingMetrics`) of the estimate against the input's
    own tracking, or a sentence saying why there are none (no tracking, or frames without it)."""
    from .data import image_to_reference_of
    from .metrics import tracking_metrics

    try:
        truth, valid = image_to_reference_of(sequence, image_to_probe=image_to_probe)
    except FreehandUSError:
        return "input is not tracked (no ImageToReference): no drift to report"
    if not valid.any():
        return "input has no valid tracked pose: no drift to report"
    if not valid.all():
        return (f"drift not computed: {int((~valid).sum())} of {valid.size} frames have no tracked pose "
                "(track evaluate needs all)")
    estimate = result.sequence.transforms["ImageToReference"].matrices
    return tracking_metrics(truth, estimate, (sequence.n_rows, sequence.n_cols))


def tracking_drift_per_frame(true_image_to_reference, est_image_to_reference, image_shape) -> np.ndarray:
    """(n,) distance (mm) of each frame's estimated image centre from the tracked one, the estimate
    anchored at the tracked first frame (as :func:`.metrics.tracking_metrics`)."""
    from .metrics import checked_trajectories

    t, e = checked_trajectories(true_image_to_reference, est_image_to_reference)
    e = t[0] @ np.linalg.inv(e[0]) @ e
    rows, cols = image_shape
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    return np.linalg.norm((t @ centre)[:, :3] - (e @ centre)[:, :3], axis=1)


def _cmd_predict(args) -> int:
    from FreehandUSLib.io import read_sequence, write_sequence

    from .predict import track_sequence

    out = _check_sequence_output(args.out)
    if args.model == "decorrelation" and args.mirror_average != "none":
        raise FreehandUSError("--mirror-average is for learned models; the decorrelation method has no learned bias to "
                              "average out (leave --mirror-average at none)")
    if args.model != "decorrelation":
        _torch_device(args.device)
        _threads(args.threads)
    model = _load_method(args.model, args.device)  # a refused model file: before reading the input
    seq = read_sequence(args.sequence)
    itp = read_image_to_probe(args.image_to_probe) if args.image_to_probe else None
    result = track_sequence(seq, model, image_to_probe=itp, spacing_mm=_spacing(args), device=args.device,
                            batch_size=args.batch_size, mirror_average=args.mirror_average,
                            sweep_direction=args.sweep_direction)
    drift = drift_against_tracking(result, seq, itp)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_sequence(with_input_transforms(result.sequence, seq), out)
    d = {**result.to_dict(), "input": str(args.sequence), "output": str(written)}
    band = band_check(result, drift)
    if isinstance(drift, str):
        d["drift"], d["drift_note"] = None, drift
    else:
        d["drift"] = drift.to_dict()
        d["drift_inside_band"] = None if band is None else band["inside"]
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        inside = "" if band is None else f"\n  {band['text']}"
        print(f"{result}\n  drift against the tracking: {drift}{inside}\n  wrote {written}")
    return 0


def band_check(result, drift) -> dict | None:
    """Whether the tracked final drift lies inside the estimate's 95 % drift band: ``inside``
    (bool) and a sentence; None without tracking metrics or uncertainty."""
    if isinstance(drift, str) or result.uncertainty is None:
        return None
    band = result.uncertainty.final_drift_band_mm
    inside = bool(drift.final_drift_mm <= band)
    return {"inside": inside,
            "text": f"the tracked final drift {drift.final_drift_mm:.1f} mm is {'inside' if inside else 'OUTSIDE'} the "
                    f"estimate's 95 % band of {band:.1f} mm"}


def _check_sequence_output(text) -> Path:
    """--out of a sequence: a known extension and an existing folder, checked before any work."""
    from FreehandUSLib.io import sequence_format

    out = check_output_path(text, what="sequence file (.igs.mha, .seq.nrrd, ...)")
    sequence_format(out)
    return out


def _cmd_adapt(args) -> int:
    from FreehandUSLib.io import read_sequence

    if len(args.sweeps) < 2:
        raise FreehandUSError(f"track adapt needs at least 2 tracked sweeps of the probe (one is held back to check "
                              f"the result), got {len(args.sweeps)}")
    out = check_output_path(args.out, what="model file (.pt)")
    _torch_device(args.device)
    _threads(args.threads)
    from .adapt import AdaptConfig, adapt_model
    from .predict import default_model_path, read_checkpoint

    read_checkpoint(default_model_path() if args.base == "default" else args.base)  # a bad model before reading sweeps
    itp = read_image_to_probe(args.image_to_probe) if args.image_to_probe else None
    try:
        cfg = AdaptConfig(fine_tune=args.fine_tune, max_minutes=args.max_minutes, epochs=args.epochs, lr=args.lr,
                          device=args.device)
    except ValueError as exc:
        raise FreehandUSError(str(exc)) from exc
    sequences = [(str(p), read_sequence(p)) for p in args.sweeps]
    result = adapt_model(sequences, out, base=args.base, image_to_probe=itp, config=cfg,
                         progress=lambda message: print(message, file=sys.stderr))
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0


def _cmd_evaluate(args) -> int:
    from FreehandUSLib.io import read_sequence

    from .attribution import fit_out_of_plane_scale
    from .data import image_to_reference_of
    from .metrics import tracking_metrics
    from .predict import track_sequence

    def score(estimate) -> dict:
        m = tracking_metrics(truth, estimate, shape).to_dict()
        m["out_of_plane_scale"], m["fdr_scale_fitted_percent"] = fit_out_of_plane_scale(truth, estimate, shape)
        return m

    seq = read_sequence(args.sequence)
    itp = read_image_to_probe(args.image_to_probe) if args.image_to_probe else None
    truth, valid = image_to_reference_of(seq, image_to_probe=itp)
    if not valid.all():
        raise FreehandUSError(
            f"{args.sequence}: {int((~valid).sum())} frames have no tracked ImageToReference; evaluation needs all"
        )
    shape = (seq.n_rows, seq.n_cols)
    rows = {}
    for est_path in args.estimate or []:
        est_seq = read_sequence(est_path)
        if est_seq.n_frames != seq.n_frames:
            raise FreehandUSError(f"{est_path}: {est_seq.n_frames} frames, the tracked sequence has {seq.n_frames}")
        if "ImageToReference" not in est_seq.transforms:
            raise FreehandUSError(f"{est_path}: no ImageToReference to evaluate")
        est = est_seq.transforms["ImageToReference"].matrices
        rows[str(est_path)] = score(est)
    models = args.model or ([] if args.estimate else ["default"])
    if any(m != "decorrelation" for m in models):
        _torch_device(args.device)
        _threads(args.threads)
    for name in models:
        model = _load_method(name, args.device)
        # one --mirror-average for all learned models; decorrelation has nothing to average out
        average = "none" if name == "decorrelation" else args.mirror_average
        result = track_sequence(seq, model, image_to_probe=itp, spacing_mm=_spacing(args), device=args.device,
                                batch_size=args.batch_size, mirror_average=average, sweep_direction=args.sweep_direction)
        metrics = score(result.sequence.transforms["ImageToReference"].matrices)
        metrics["frames_per_second"] = result.frames_per_second
        metrics["sweep_direction"] = args.sweep_direction
        metrics["direction_check"] = result.info.get("direction_check")
        metrics["frame_flags"] = result.info["frame_flags"]
        unc = result.uncertainty
        metrics["final_drift_band_mm"] = unc.final_drift_band_mm
        metrics["drift_inside_band"] = bool(metrics["final_drift_mm"] <= unc.final_drift_band_mm)
        metrics["frames_inside_band"] = float(np.mean(
            tracking_drift_per_frame(truth, result.sequence.transforms["ImageToReference"].matrices, shape)
            <= unc.drift_band_mm + 1e-9))
        metrics["warnings"] = result.info.get("warnings", [])
        rows[f"{name} ({result.method})" if name != result.method else name] = metrics
    if args.json:
        print(json.dumps({"sequence": str(args.sequence), "results": rows}, indent=2))
    else:
        print(f"{args.sequence}: {seq.n_frames} frames")
        header = (f"  {'method':<36} {'final drift mm':>14} {'FDR path %':>10} {'FDR e2e %':>10} {'max drift':>9} "
                  f"{'GPE':>7} {'LPE':>7} {'angle':>7} {'oop scale':>9} {'FDR scaled %':>12}")
        print(header)
        for name, m in rows.items():
            print(
                f"  {name[:36]:<36} {m['final_drift_mm']:>14.2f} {m['fdr_path_percent']:>10.1f} "
                f"{m['fdr_end_to_end_percent']:>10.1f} {m['max_drift_mm']:>9.2f} {m['gpe_mm']:>7.2f} "
                f"{m['lpe_mm']:>7.3f} {m['mean_angle_error_deg']:>7.2f} {m['out_of_plane_scale']:>9.2f} "
                f"{m['fdr_scale_fitted_percent']:>12.1f}"
            )
        print(f"  assumed sweep direction: {args.sweep_direction} (--sweep-direction)")
        for name, m in rows.items():
            if m.get("direction_check") and m["direction_check"]["agrees"] is False:
                print(f"  warning: {name}: the estimate moves the other way out of the image plane than the tracking "
                      f"(tracked {m['direction_check']['tracked_elevational_mm']:+.1f} mm, estimated "
                      f"{m['direction_check']['estimated_elevational_mm']:+.1f} mm): the sweep direction is not "
                      f"'{args.sweep_direction}'")
            if m.get("final_drift_band_mm") is not None:
                print(f"  {name}: final drift {m['final_drift_mm']:.1f} mm is {'inside' if m['drift_inside_band'] else 'OUTSIDE'} "
                      f"the estimate's 95 % band of {m['final_drift_band_mm']:.1f} mm; "
                      f"{100 * m['frames_inside_band']:.0f} % of the frames lie inside their band")
            if m.get("frame_flags") and (m["frame_flags"]["empty_frames"] or m["frame_flags"]["decorrelated_frames"]):
                print(f"  {name}: {m['frame_flags']['empty_frames']} empty and {m['frame_flags']['decorrelated_frames']} "
                      "decorrelated frames (the images do not show the motion into them)")
        print("  oop scale: the factor on the estimated out-of-plane motion (tz, rx, ry) that best fits the tracked "
              "trajectory,\n  FDR scaled: the drift left with it. A factor far from 1 that removes most of the drift "
              "means the model\n  misjudges this probe's elevational beam width: fine-tune it on tracked sweeps of "
              "this probe (track train --init).")
    return 0

"""``freehandus detect``, ``freehandus calibrate`` and ``freehandus simulate nwire``.

The main parser (``FreehandUSLib.cli``) calls :func:`add_parsers` with its subparsers and
:func:`add_simulate_nwire` with the subparsers of its ``simulate`` group. Each command parses,
loads files, calls the same Lib functions as the Slicer Logic (:mod:`.pipeline`,
:mod:`.simulate`), writes JSON and prints ``str(result)`` (or the JSON with ``--json``).
Library errors (``FreehandUSError``) propagate to the main parser, which prints one line and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

__all__ = ["add_parsers", "add_simulate_nwire", "cmd_detect", "cmd_calibrate", "cmd_simulate_nwire", "time_offset_arg"]

logger = logging.getLogger(__name__)


def _progress(args, total_label: str):
    """A tqdm progress callback on stderr (None when tqdm is missing or --json is given)."""
    if getattr(args, "json", False):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    bar = {"bar": None}

    def update(done, total):
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=total_label, unit="frame", leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def _write_json(path, data) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def time_offset_arg(text: str):
    """argparse type of ``--time-offset``: ``auto`` or seconds (:func:`.temporal.parse_time_offset`)."""
    from .temporal import parse_time_offset

    try:
        return parse_time_offset(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_from_args(args):
    from .pipeline import load_setup

    return load_setup(args.config, phantom=args.phantom, pixel_spacing_mm=args.pixel_spacing,
                      use_clip_rectangle=not args.no_clip)


def _add_common(p):
    p.add_argument("--config", help="PLUS device-set configuration (phantom, PhantomToReference, segmentation hints)")
    p.add_argument("--phantom", help="phantom: built-in name (fCal-2.0...), .json or PLUS .xml; overrides the config's")
    p.add_argument("--detector", default="hessian", choices=("hessian", "plus", "agcfd", "tacd"),
                   help="dot detector (default hessian: Liu et al. 2025)")
    p.add_argument("--pixel-spacing", type=float, metavar="MM",
                   help="approximate mm per pixel (overrides ApproximateSpacingMmPerPixel)")
    p.add_argument("--no-clip", action="store_true", help="ignore the config's clip rectangle")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_detect(args) -> int:
    """``freehandus detect SEQ --config PLUS.xml --out DOTS.json``."""
    from FreehandUSLib.io import read_sequence

    from .pipeline import detect_sequence

    setup = _setup_from_args(args)
    seq = read_sequence(args.sequence)
    result = detect_sequence(seq, setup, detector=args.detector, progress=_progress(args, "detect"))
    data = result.to_dict()
    data["sequence"] = str(args.sequence)
    if args.out:
        _write_json(args.out, data)
    print(json.dumps(data, indent=2) if args.json else str(result))
    return 0


def cmd_calibrate(args) -> int:
    """``freehandus calibrate CAL [--validation VAL] --config PLUS.xml --out R.json``."""
    from FreehandUSLib.io import read_sequence

    from .pipeline import calibrate

    setup = _setup_from_args(args)
    cal = read_sequence(args.calibration)
    val = read_sequence(args.validation) if args.validation else None
    result = calibrate(cal, val, setup, solver=args.solver, phantom_pose=args.phantom_pose, detector=args.detector,
                       progress=_progress(args, "detect"), seed=args.seed, ransac_iterations=args.ransac_iterations,
                       ransac_threshold_mm=args.ransac_threshold, time_offset=args.time_offset)
    data = result.to_dict()
    data.update({"calibration_sequence": str(args.calibration),
                 "validation_sequence": str(args.validation) if args.validation else None,
                 "config": str(args.config) if args.config else None,
                 "time_offset_s": result.info.get("time_offset_s", 0.0)})
    if args.out:
        _write_json(args.out, data)
    if args.plus_xml:
        Path(args.plus_xml).write_text(result.plus_transform_element() + "\n", encoding="utf-8")
    print(json.dumps(data, indent=2) if args.json else str(result))
    return 0


def cmd_simulate_nwire(args) -> int:
    """``freehandus simulate nwire --out SEQ.igs.mha``: a tracked N-wire recording with known truth."""
    from .simulate import SimulationSettings, simulate_nwire, write_simulation

    settings = SimulationSettings(
        phantom=args.phantom, probe=args.probe, depth_mm=args.depth_mm, n_frames=args.frames,
        image_size_px=(args.width, args.height), outlier_fraction=args.outlier_fraction,
        dropout_fraction=args.dropout_fraction, tracker_noise_mm=args.tracker_noise_mm,
        tracker_noise_deg=args.tracker_noise_deg, seed=args.seed,
    )
    sim = simulate_nwire(settings)
    files = write_simulation(sim, args.out, config_path=args.config_out, truth_path=args.truth_out)
    summary = sim.summary()
    summary["files"] = {k: str(v) for k, v in files.items()}
    print(json.dumps(summary, indent=2) if args.json else
          f"{sim}\n" + "\n".join(f"  wrote {k}: {v}" for k, v in files.items()))
    return 0


def add_parsers(subparsers) -> None:
    """Register ``detect`` and ``calibrate`` on the main parser's subparsers."""
    p = subparsers.add_parser("detect", help="detect N-wire phantom dots in a tracked sequence",
                              description="Detect and label the N-wire dots of every frame (MF pixels, PLUS wire "
                                          "order) and write them as JSON.")
    p.add_argument("sequence", help="tracked sequence (.igs.mha, .igs.nrrd, ...)")
    p.add_argument("--out", help="output JSON: per frame {index, ok, points} plus totals")
    _add_common(p)
    p.set_defaults(func=cmd_detect)

    p = subparsers.add_parser("calibrate", help="N-wire probe calibration (ImageToProbe)",
                              description="Detect the N-wire dots and compute ImageToProbe; report PLUS's 3D/2D "
                                          "errors on the calibration and (optional) validation recordings.")
    p.add_argument("calibration", help="calibration recording")
    p.add_argument("--validation", help="validation recording (same session)")
    p.add_argument("--out", help="output JSON (ImageToProbe, pixel_spacing_mm, calibration/validation errors)")
    p.add_argument("--solver", default="ransac-lm", choices=("lsq", "lm", "ransac-lm"),
                   help="lsq: PLUS linear least squares; lm: Levenberg-Marquardt; ransac-lm (default)")
    p.add_argument("--phantom-pose", default="auto", choices=("known", "estimate", "auto"),
                   help="use the config's PhantomToReference (known) or estimate it (no stylus registration); "
                        "auto: known when the config has one")
    p.add_argument("--seed", type=int, default=0, help="RANSAC seed (default 0)")
    p.add_argument("--ransac-iterations", type=int, default=3000, help="RANSAC iterations (default 3000)")
    p.add_argument("--ransac-threshold", type=float, default=0.5, metavar="MM",
                   help="RANSAC inlier threshold in mm (default 0.5; raised to the data's noise level)")
    p.add_argument("--time-offset", type=time_offset_arg, default="auto", metavar="auto|SECONDS",
                   help="video-to-tracker time offset: the tracking at t + offset is used for the frame at t (both "
                        "recordings). auto (default): estimated from the calibration recording and applied when "
                        "held-out frames confirm it; 0: use the recorded poses")
    p.add_argument("--plus-xml", metavar="FILE", help="also write the PLUS <Transform From=\"Image\" To=\"Probe\"> element")
    _add_common(p)
    p.set_defaults(func=cmd_calibrate)


def add_simulate_nwire(simulate_subparsers) -> None:
    """Register ``nwire`` on the subparsers of the ``simulate`` group."""
    p = simulate_subparsers.add_parser(
        "nwire", help="simulate a tracked N-wire calibration recording with known ImageToProbe",
        description="Render a tracked N-wire recording (speckle, depth-dependent PSF, wall reflections, "
                    "reverberation, dropouts, tracker noise, outlier poses) with a known calibration, plus a PLUS "
                    "config and a truth JSON.")
    p.add_argument("--out", required=True, help="output sequence (.igs.mha / .igs.nrrd)")
    p.add_argument("--phantom", default="fCal-2.0", help="phantom name or file (default fCal-2.0)")
    p.add_argument("--probe", default="linear", choices=("linear", "convex"))
    p.add_argument("--depth-mm", type=float, default=80.0, help="imaging depth in mm (default 80)")
    p.add_argument("--frames", type=int, default=100, help="number of frames (default 100)")
    p.add_argument("--width", type=int, default=820, help="image width in pixels (default 820)")
    p.add_argument("--height", type=int, default=616, help="image height in pixels (default 616)")
    p.add_argument("--outlier-fraction", type=float, default=0.0, help="fraction of frames with a wrong pose")
    p.add_argument("--dropout-fraction", type=float, default=0.0, help="fraction of frames missing a wire echo")
    p.add_argument("--tracker-noise-mm", type=float, default=0.1, help="tracker position noise (mm, 1 sigma)")
    p.add_argument("--tracker-noise-deg", type=float, default=0.1, help="tracker rotation noise (deg, 1 sigma)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-out", help="PLUS config to write (default: <out>.config.xml)")
    p.add_argument("--truth-out", help="truth JSON to write (default: <out>.truth.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_simulate_nwire)


def build_standalone_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (for tests and ``python -m NWireCalibrationLib.cli``)."""
    parser = argparse.ArgumentParser(prog="freehandus")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    sim = sub.add_parser("simulate", help="simulate recordings")
    add_simulate_nwire(sim.add_subparsers(dest="simulate_command", required=True))
    return parser

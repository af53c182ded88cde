"""``freehandus detect``, ``freehandus calibrate`` and ``freehandus simulate nwire``.

The main parser (``FreehandUSApp.cli``) calls :func:`add_parsers` with its subparsers and
:func:`add_simulate_nwire` with the subparsers of its ``simulate`` group. Each command parses,
loads files, calls the same Lib functions as the Slicer Logic (:mod:`.pipeline`,
:mod:`.simulate`), writes JSON and prints ``str(result)`` (or the JSON with ``--json``).
Library errors (``FreehandUSError``) propagate to the main parser, which prints one line and
exits 2; numbers are checked at the argparse edge (:mod:`FreehandUSLib.cli_support`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from FreehandUSLib.cli_support import (
    ArgumentParser,
    add_progress_option,
    check_output_path,
    fraction,
    int_in,
    non_negative_float,
    positive_float,
    positive_int,
    progress_bar,
    no_partial_outputs,
    progress_enabled,
    seed,
    spacing_mm,
    write_text_atomic,
)

from .errors import NWireError
from .sim_choices import OVERLAYS, PROBES

__all__ = ["add_parsers", "add_simulate_nwire", "cmd_detect", "cmd_calibrate", "cmd_simulate_nwire", "time_offset_arg"]

logger = logging.getLogger(__name__)


def _check_output_file(flag: str, text) -> None:
    """Before any work: an output file name (not a folder) whose folder exists or can be made."""
    if text:
        check_output_path(text, flag=flag)


def _write_json(path, data) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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
    p.add_argument("--pixel-spacing", type=spacing_mm, metavar="MM",
                   help="approximate mm per pixel (overrides ApproximateSpacingMmPerPixel)")
    p.add_argument("--no-clip", action="store_true", help="ignore the config's clip rectangle")
    p.add_argument("--no-sequence-stage", action="store_true",
                   help="label every frame alone: no recovery of failed frames from their neighbours and the "
                        "tracked motion, no refusal of labels that jump (default: on for the hessian detector)")
    p.add_argument("--no-plane-refinement", action="store_true",
                   help="keep every measured dot centre: no replacement of a frame's dots by the crossings of one "
                        "fitted image plane with the phantom's wires (default: on for the hessian detector)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_progress_option(p)


def cmd_detect(args) -> int:
    """``freehandus detect SEQ --config PLUS.xml --out DOTS.json``."""
    from FreehandUSLib.io import read_sequence

    from .pipeline import detect_sequence

    _check_output_file("--out", args.out)
    setup = _setup_from_args(args)
    seq = read_sequence(args.sequence)
    with progress_bar(progress_enabled(args), "detect") as progress:
        result = detect_sequence(seq, setup, detector=args.detector, progress=progress,
                                 sequence_stage=False if args.no_sequence_stage else None,
                                 plane_refinement=False if args.no_plane_refinement else None)
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

    _check_output_file("--out", args.out)
    _check_output_file("--plus-xml", args.plus_xml)
    setup = _setup_from_args(args)
    cal = read_sequence(args.calibration)
    val = read_sequence(args.validation) if args.validation else None
    with progress_bar(progress_enabled(args), "detect") as progress:
        result = calibrate(cal, val, setup, solver=args.solver, phantom_pose=args.phantom_pose,
                           detector=args.detector, progress=progress, seed=args.seed,
                           ransac_iterations=args.ransac_iterations, ransac_threshold_mm=args.ransac_threshold,
                           time_offset=args.time_offset,
                           sequence_stage=False if args.no_sequence_stage else None,
                           plane_refinement=False if args.no_plane_refinement else None)
    data = result.to_dict()
    data.update({"calibration_sequence": str(args.calibration),
                 "validation_sequence": str(args.validation) if args.validation else None,
                 "config": str(args.config) if args.config else None,
                 "time_offset_s": result.info.get("time_offset_s", 0.0)})
    with no_partial_outputs(args.out, args.plus_xml):
        if args.out:
            _write_json(args.out, data)
        if args.plus_xml:
            Path(args.plus_xml).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.plus_xml, result.plus_transform_element() + "\n")
    print(json.dumps(data, indent=2) if args.json else str(result))
    return 0


#: File name of ``simulate nwire --out FOLDER/`` (its config and truth get the same stem).
SIMULATION_FILE_NAME = "nwire.igs.mha"


def simulation_output(text: str) -> Path:
    """``simulate nwire --out``: a sequence file, or a folder (existing, or written with a trailing
    ``/``) that gets :data:`SIMULATION_FILE_NAME`. Checked before any work: a sequence extension,
    and no file where a folder must be."""
    from FreehandUSLib.io import sequence_format

    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        out = out / SIMULATION_FILE_NAME
    sequence_format(out)  # unknown extension -> FileFormatError
    return check_output_path(out, what="sequence file")


def cmd_simulate_nwire(args) -> int:
    """``freehandus simulate nwire --out SEQ.igs.mha`` (or ``--out FOLDER/``): a tracked N-wire
    recording with known truth."""
    from .simulate import SimulationSettings, simulate_nwire, write_simulation

    out = simulation_output(args.out)
    _check_output_file("--config-out", args.config_out)
    _check_output_file("--truth-out", args.truth_out)
    try:
        settings = SimulationSettings(
            phantom=args.phantom, probe=args.probe, depth_mm=args.depth_mm, n_frames=args.frames,
            image_size_px=(args.width, args.height), outlier_fraction=args.outlier_fraction,
            dropout_fraction=args.dropout_fraction, tracker_noise_mm=args.tracker_noise_mm,
            tracker_noise_deg=args.tracker_noise_deg, seed=args.seed, partial_fraction=args.partial_fraction,
            gain=args.gain, overlays=tuple(dict.fromkeys(args.overlay or ())),
        )
        sim = simulate_nwire(settings)
    except ValueError as exc:  # settings that do not fit together (depth, image size, phantom)
        raise NWireError(str(exc)) from exc
    stem = out.name.split(".")[0]  # write_simulation's default names, given explicitly
    config_path = Path(args.config_out) if args.config_out else out.with_name(stem + ".config.xml")
    truth_path = Path(args.truth_out) if args.truth_out else out.with_name(stem + ".truth.json")
    with no_partial_outputs(out, config_path, truth_path):
        files = write_simulation(sim, out, config_path=config_path, truth_path=truth_path)
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
    p.add_argument("--seed", type=seed, default=0, help="RANSAC seed (default 0)")
    p.add_argument("--ransac-iterations", type=positive_int, default=3000, help="RANSAC iterations (default 3000)")
    p.add_argument("--ransac-threshold", type=positive_float, default=0.5, metavar="MM",
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
    p.add_argument("--out", required=True,
                   help=f"output sequence (.igs.mha / .igs.nrrd), or a folder (gets {SIMULATION_FILE_NAME})")
    p.add_argument("--phantom", default="fCal-2.0", help="phantom name or file (default fCal-2.0)")
    p.add_argument("--probe", default="linear", choices=PROBES, help="probe type (default linear)")
    p.add_argument("--depth-mm", type=positive_float, default=80.0, help="imaging depth in mm (default 80)")
    p.add_argument("--frames", type=int_in(1, 100_000), default=100, help="number of frames (default 100)")
    p.add_argument("--width", type=int_in(16, 8192), default=820, help="image width in pixels (default 820)")
    p.add_argument("--height", type=int_in(16, 8192), default=616, help="image height in pixels (default 616)")
    p.add_argument("--outlier-fraction", type=fraction, default=0.0, help="fraction of frames with a wrong pose")
    p.add_argument("--dropout-fraction", type=fraction, default=0.0, help="fraction of frames missing a wire echo")
    p.add_argument("--partial-fraction", type=fraction, default=0.0,
                   help="fraction of frames with some wires outside the field of view")
    p.add_argument("--gain", type=positive_float, default=1.0, help="overall grey-level gain (default 1)")
    p.add_argument("--overlay", action="append", choices=OVERLAYS,
                   help="frame-grabbed screen content to add (repeatable): " + ", ".join(OVERLAYS))
    p.add_argument("--tracker-noise-mm", type=non_negative_float, default=0.1, help="tracker position noise (mm, 1 sigma)")
    p.add_argument("--tracker-noise-deg", type=non_negative_float, default=0.1, help="tracker rotation noise (deg, 1 sigma)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--config-out", help="PLUS config to write (default: <out>.config.xml)")
    p.add_argument("--truth-out", help="truth JSON to write (default: <out>.truth.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_simulate_nwire)


def build_standalone_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (for tests and ``python -m NWireCalibrationLib.cli``)."""
    parser = ArgumentParser(prog="freehandus")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    sim = sub.add_parser("simulate", help="simulate recordings")
    add_simulate_nwire(sim.add_subparsers(dest="simulate_command", required=True))
    return parser

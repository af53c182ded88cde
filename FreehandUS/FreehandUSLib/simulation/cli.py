"""``freehandus simulate sweep``: a simulated tracked freehand sweep written to a sequence file.

Registered by the main command line as::

    from .simulation.cli import add_simulate_sweep
    simulate = sub.add_parser("simulate", ...).add_subparsers(dest="simulate_command", required=True)
    add_simulate_sweep(simulate)

Everything not given on the command line is drawn from ``--seed`` (probe, tissue, trajectory),
so ``--seed`` alone reproduces a sweep exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..cli_support import (
    add_progress_option,
    check_output_path,
    float_in,
    int_in,
    progress_bar,
    progress_enabled,
    seed,
    write_text_atomic,
)
from ..errors import FreehandUSError

__all__ = ["add_simulate_sweep", "run_simulate_sweep", "photoacoustic_path"]

log = logging.getLogger(__name__)


def photoacoustic_path(out: Path) -> Path:
    """``sweep.igs.mha`` -> ``sweep_pa.igs.mha`` (the photoacoustic frames' file)."""
    name = out.name
    for suffix in (".igs.mha", ".igs.mhd", ".igs.nrrd", ".seq.nrrd", ".seq.mha", ".mha", ".mhd", ".nrrd", ".h5"):
        if name.lower().endswith(suffix):
            return out.with_name(name[: -len(suffix)] + "_pa" + name[-len(suffix) :])
    return out.with_name(name + "_pa")


def _output_path(text: str) -> Path:
    """``--out``: a sequence file, or a folder (existing, or written with a trailing ``/``) that
    gets ``sweep.igs.mha``. Checked before any work: the extension, and that the folder that will
    hold the file exists or can be made (its nearest existing parent is a folder)."""
    from ..io import sequence_format

    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        out = out / "sweep.igs.mha"
    sequence_format(out)  # unknown extension -> FileFormatError before any work
    return check_output_path(out, what="sequence file")


def add_simulate_sweep(simulate_subparsers):
    """Add the ``sweep`` subcommand to the ``simulate`` sub-parsers; returns its parser."""
    p = simulate_subparsers.add_parser(
        "sweep",
        help="simulate a tracked freehand speckle sweep (true ImageToReference + ImageToProbe)",
        description=(
            "Simulate a freehand sweep over a random 3D tissue (layers, vessels, inclusions) with "
            "speckle from point scatterers. Options not given are drawn from --seed."
        ),
    )
    p.add_argument("--out", required=True,
                   help="output sequence (.igs.mha, .igs.nrrd, .seq.nrrd, .h5), or a folder (gets sweep.igs.mha)")
    p.add_argument("--seed", type=seed, default=0, help="random seed of everything not given (default 0)")
    p.add_argument("--frames", type=int_in(2, 100_000), help="number of frames (default: random 150-400)")
    p.add_argument("--length-mm", type=float_in(0.0, 10_000.0), help="path length in mm (default: random 50-250)")
    p.add_argument("--shape", choices=["straight", "C", "S"], help="sweep shape (default: random)")
    p.add_argument("--probe", choices=["random", "default"], default="random",
                   help="random probe parameters (default) or the fixed default probe")
    p.add_argument("--geometry", choices=["linear", "convex"], help="probe geometry")
    p.add_argument("--rows", type=int_in(8, 8192), help="image rows (default 256)")
    p.add_argument("--cols", type=int_in(8, 8192), help="image columns (default 256)")
    p.add_argument("--depth-mm", type=float_in(1.0, 1000.0), help="imaging depth in mm")
    p.add_argument("--frequency-mhz", type=float_in(0.1, 100.0), help="centre frequency in MHz")
    p.add_argument("--elevation-sigma-mm", type=float_in(0.01, 100.0),
                   help="elevational PSF sigma in mm (= sigma of the decorrelation curve)")
    p.add_argument("--scatterers-per-cell", type=float_in(0.0, 1000.0, low_open=True), default=10.0, help="scatterers per resolution cell (default 10)")
    p.add_argument("--fps", type=float_in(0.0, 10_000.0, low_open=True), default=20.0, help="frame rate for the timestamps (default 20)")
    p.add_argument("--photoacoustic", action="store_true",
                   help="also write photoacoustic frames (absorbers in vessels) to <out>_pa.<ext>")
    p.add_argument("--config-out", help="also write the full simulation config (JSON) here")
    add_progress_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_simulate_sweep)
    return p


def run_simulate_sweep(args) -> int:
    """Body of ``freehandus simulate sweep`` (argparse namespace in, exit code out)."""
    from ..io import write_sequence
    from .probe import ProbeConfig
    from .sweep import random_sweep_config, simulate_sweep

    out = _output_path(args.out)
    if args.config_out:
        check_output_path(args.config_out, flag="--config-out")
    probe_overrides = {}
    for option, name in (
        ("geometry", "geometry"),
        ("rows", "n_rows"),
        ("cols", "n_cols"),
        ("depth_mm", "depth_mm"),
        ("frequency_mhz", "center_frequency_mhz"),
        ("elevation_sigma_mm", "sigma_elevation_mm"),
    ):
        value = getattr(args, option)
        if value is not None:
            probe_overrides[name] = value
    traj_overrides = {}
    if args.frames is not None:
        traj_overrides["n_frames"] = int(args.frames)
    if args.length_mm is not None:
        traj_overrides["length_mm"] = float(args.length_mm)
    if args.shape is not None:
        traj_overrides["shape"] = args.shape
    try:
        cfg = random_sweep_config(
            args.seed,
            probe_overrides=probe_overrides,
            trajectory_overrides=traj_overrides,
            scatterers_per_cell=args.scatterers_per_cell,
            frame_rate_hz=args.fps,
            photoacoustic=args.photoacoustic,
        )
        if args.probe == "default":
            from dataclasses import replace

            cfg = replace(cfg, probe=ProbeConfig(**probe_overrides))
    except ValueError as exc:
        raise FreehandUSError(str(exc)) from exc

    with progress_bar(progress_enabled(args), "simulate", total=cfg.trajectory.n_frames) as progress:
        try:
            result = simulate_sweep(cfg, progress=progress)
        except ValueError as exc:  # settings that do not fit together
            raise FreehandUSError(str(exc)) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    try:
        written["sequence"] = write_sequence(result.sequence, out)
        if result.photoacoustic is not None:
            written["photoacoustic"] = write_sequence(result.photoacoustic_sequence(), photoacoustic_path(out))
        if args.config_out:
            Path(args.config_out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.config_out, json.dumps(result.config.to_dict(), indent=2))
            written["config"] = Path(args.config_out)
    except BaseException:  # interrupted or failed: no half set of outputs
        for path in written.values():
            Path(path).unlink(missing_ok=True)
        raise
    written = {key: str(path) for key, path in written.items()}
    if args.json:
        d = result.to_dict()
        d["files"] = written
        print(json.dumps(d, indent=2))
    else:
        print(str(result))
        for key, path in written.items():
            print(f"  {key}: {path}")
    return 0

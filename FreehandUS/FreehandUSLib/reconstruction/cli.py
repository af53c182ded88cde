"""``freehandus reconstruct``: volume reconstruction from the command line.

``add_parser(subparsers)`` registers the subcommand on the ``freehandus`` parser (the main
``cli.build_parser`` calls it). Options given on the command line override the PLUS config's
``<VolumeReconstruction>``; ``--json`` prints :meth:`ReconstructionResult.to_dict` plus the
files written.

Examples
--------
::

    freehandus reconstruct SpinePhantomFreehand.igs.mha \\
        --config PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml --out spine.mha
    freehandus reconstruct sweep.igs.mha --image-to-probe ImageToProbe.json --spacing 0.3 \\
        --interpolation linear --compounding max --fill-holes --out sweep.mha --json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from ..cli_support import (
    add_progress_option,
    check_output_path,
    finite_float,
    index,
    int_in,
    non_negative_float,
    positive_float,
    positive_int,
    progress_bar,
    progress_enabled,
    spacing_mm,
    threads,
)
from ..errors import ConfigError, FileFormatError
from .config import COMPOUNDINGS, INTERPOLATIONS, HoleFillingElement, ReconstructionOptions

__all__ = ["add_parser", "run_reconstruct", "load_image_to_probe"]

log = logging.getLogger(__name__)

#: Hole filling used by ``--fill-holes`` when the config has none (PLUS's example chain).
DEFAULT_HOLE_FILLING = (
    HoleFillingElement("GAUSSIAN_ACCUMULATION", size=3, stdev=0.6667, minimum_known_voxels_ratio=0.5),
    HoleFillingElement("STICK", stick_length_limit=9, number_of_sticks_to_use=1),
)


def load_image_to_probe(text: str) -> np.ndarray:
    """ImageToProbe from a JSON file (``{"ImageToProbe": 4x4}`` or a bare 4x4 list) or 16 numbers.

    Raises
    ------
    FileFormatError
        Unreadable file or not a 4x4 matrix.
    """
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise FileFormatError(f"{path}: file not found")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not a JSON file ({exc})") from exc
        if isinstance(data, dict):
            data = data.get("ImageToProbe", data.get("matrix"))
        source = str(path)
    else:
        data = text.replace(",", " ").split()
        source = "--image-to-probe"
    try:
        matrix = np.asarray(data, dtype=np.float64).reshape(4, 4)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"{source}: expected a 4x4 ImageToProbe matrix (16 numbers)") from exc
    return matrix


def _spacing(values):
    if values is None:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 3:
        return tuple(values)
    raise ConfigError(f"--spacing: expected 1 or 3 values (mm), got {len(values)}")


def _check_extent(extent):
    """--extent i0 i1 j0 j1 k0 k1: each max >= its min (the voxel count is checked against the
    memory budget by the reconstruction)."""
    if extent is None:
        return None
    for axis, (low, high) in zip("ijk", zip(extent[0::2], extent[1::2])):
        if high < low:
            raise ConfigError(f"--extent: {axis}1 = {high} is below {axis}0 = {low} (expected i0 i1 j0 j1 k0 k1, "
                              "each max >= its min)")
    return tuple(extent)


def _check_output(out: Path, *, flag: str = "--out") -> None:
    """Before any work: an output volume name with a volume extension, whose folder exists or can
    be made (``--out nodir/x.mha`` makes ``nodir``)."""
    from ..io import sequence_format

    check_output_path(out, flag=flag, what="volume file (.mha, .mhd, .nrrd, .nhdr)")
    sequence_format(out)  # unknown extension -> FileFormatError


def _channel_path(out: Path, name: str) -> Path:
    text = out.name
    for suffix in (".seq.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if text.lower().endswith(suffix):
            return out.with_name(text[: -len(suffix)] + f"_{name}" + text[-len(suffix):])
    return out.with_name(text + f"_{name}")


#: The flag of each :class:`ReconstructionOptions` field set on the command line (for messages).
FLAG_OF_OPTION = {
    "output_spacing_mm": "--spacing", "output_origin_mm": "--origin", "output_extent": "--extent",
    "interpolation": "--interpolation", "compounding": "--compounding", "clip_rectangle_origin_px": "--clip-origin",
    "clip_rectangle_size_px": "--clip-size", "fan_angles_deg": "--fan-angles", "fan_origin_px": "--fan-origin",
    "fan_radius_start_px": "--fan-radius", "fan_radius_stop_px": "--fan-radius",
    "fan_angles_auto_detect": "--fan-auto-detect", "pixel_rejection_threshold": "--pixel-rejection-threshold",
    "skip_interval": "--skip-interval", "image_to_reference_transform": "--image-to-reference-transform",
    "importance_mask_file": "--importance-mask", "number_of_threads": "--threads",
    "memory_budget_bytes": "--memory-budget-gib", "grid_alignment": "--grid-alignment",
    "emulate_plus": "--emulate-plus", "engine": "--engine", "fill_holes": "--fill-holes",
}


def _with_flag_name(exc: ConfigError, overrides: dict) -> ConfigError:
    """``exc`` with the option field names of values given on the command line replaced by their
    flags (``output_extent: ...`` -> ``--extent: ...``); names of values from the PLUS config stay."""
    text = str(exc)
    for field in sorted(FLAG_OF_OPTION, key=len, reverse=True):
        if overrides.get(field) is not None:
            text = text.replace(field, FLAG_OF_OPTION[field])
    text = text.replace("--fan-radius/--fan-radius", "--fan-radius")
    return exc if text == str(exc) else type(exc)(text)


def _budget_bytes(gib: float) -> int:
    """--memory-budget-gib -> bytes (refuses budgets beyond what any machine has: 1 EiB)."""
    if gib > 2.0**30:
        raise ConfigError(f"--memory-budget-gib: {gib:g} GiB is more memory than any machine has (at most {2**30} GiB)")
    return max(1, int(gib * 1024**3))


def _remove_written(path: Path) -> None:
    """Remove an output this run wrote (and a ``.mhd``'s data file beside it)."""
    paths = [path]
    if path.suffix.lower() == ".mhd":
        paths += [path.with_suffix(".raw"), path.with_suffix(".zraw")]
    if path.suffix.lower() == ".nhdr":
        paths += [path.with_suffix(".raw"), path.with_suffix(".raw.gz")]
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def run_reconstruct(args) -> int:
    """Body of ``freehandus reconstruct`` (see the module docstring)."""
    from ..io import read_sequence, write_volume
    from .reconstructor import options_from_plus_config, reconstruct_volume

    out = Path(args.out)
    _check_output(out)
    if args.weight_out:
        _check_output(Path(args.weight_out), flag="--weight-out")
    transforms = None
    if args.config:
        from ..io.plus_config import read_plus_config

        config = read_plus_config(args.config)
        transforms = config.coordinate_definitions.repository_fixed()
        if config.volume_reconstruction is not None:
            options = options_from_plus_config(config)
        else:
            log.warning("%s has no <VolumeReconstruction>; using FreehandUS defaults", args.config)
            options = ReconstructionOptions()
    else:
        options = ReconstructionOptions()
    if args.image_to_probe:
        transforms = dict(transforms or {})
        transforms["ImageToProbe"] = load_image_to_probe(args.image_to_probe)
    overrides = {
        "output_spacing_mm": _spacing(args.spacing),
        "output_origin_mm": args.origin,
        "output_extent": _check_extent(args.extent),
        "interpolation": args.interpolation,
        "compounding": args.compounding,
        "clip_rectangle_origin_px": args.clip_origin,
        "clip_rectangle_size_px": args.clip_size,
        "fan_angles_deg": args.fan_angles,
        "fan_origin_px": args.fan_origin,
        "fan_radius_start_px": None if args.fan_radius is None else args.fan_radius[0],
        "fan_radius_stop_px": None if args.fan_radius is None else args.fan_radius[1],
        "fan_angles_auto_detect": True if args.fan_auto_detect else None,
        "pixel_rejection_threshold": args.pixel_rejection_threshold,
        "skip_interval": args.skip_interval,
        "image_to_reference_transform": args.image_to_reference_transform,
        "importance_mask_file": args.importance_mask,
        "number_of_threads": args.threads,
        "memory_budget_bytes": None if args.memory_budget_gib is None else _budget_bytes(args.memory_budget_gib),
        "grid_alignment": args.grid_alignment,
        "emulate_plus": True if args.emulate_plus else None,
        "engine": args.engine,
    }
    if args.fill_holes is not None:
        overrides["fill_holes"] = args.fill_holes
        if args.fill_holes and not options.hole_filling:
            overrides["hole_filling"] = DEFAULT_HOLE_FILLING
    try:
        options = options.replace(**overrides)
    except ConfigError as exc:  # name the flag that gave the value, not the option's field
        raise _with_flag_name(exc, overrides) from exc
    sequence = read_sequence(args.sequence)
    with progress_bar(progress_enabled(args), "reconstruct", total=sequence.n_frames) as progress:
        result = reconstruct_volume(sequence, transforms, options, progress=progress)
    # a sequence whose trajectory was estimated (``track predict`` writes TrajectorySource) makes a
    # volume that says so, in its header and on the command line
    source = sequence.metadata.get("TrajectorySource")
    if source:
        for volume in result.volumes:
            volume.metadata["TrajectorySource"] = source
    written = {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.weight_out:
            Path(args.weight_out).parent.mkdir(parents=True, exist_ok=True)
        for c, (name, volume) in enumerate(zip(result.channel_names, result.volumes)):
            path = out if c == 0 else _channel_path(out, name)
            written[name] = write_volume(volume, path)
        if args.weight_out:
            written["weight"] = write_volume(result.weight, Path(args.weight_out))
    except BaseException:
        # a part of the outputs is no output: remove what this run wrote (each file is written
        # under a temporary name and renamed when complete, so no file is left half-written)
        for path in written.values():
            _remove_written(Path(path))
        raise
    written = {name: str(path) for name, path in written.items()}
    if args.json:
        info = result.to_dict()
        info["files"] = written
        info["trajectory_source"] = source
        print(json.dumps(info, indent=2))
    else:
        print(str(result))
        if source:
            print(f"  trajectory: {source} (the volume's TrajectorySource field says so too)")
        for name, path in written.items():
            print(f"  wrote {name}: {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reconstruct`` on ``subparsers`` (the ``freehandus`` subcommand parsers)."""
    p = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a 3D volume from a tracked sequence (PLUS-compatible)",
        description=(
            "Reconstruct a volume from tracked frames. Settings come from the PLUS config's "
            "<VolumeReconstruction> and <CoordinateDefinitions>; options given here override them."
        ),
    )
    p.add_argument("sequence", help="tracked sequence (.igs.mha/.igs.nrrd/.seq.nrrd/.h5)")
    p.add_argument("--config", help="PLUS device-set configuration (.xml)")
    p.add_argument("--out", required=True, help="output volume (.mha/.nrrd); more channels get _<name> suffixes")
    p.add_argument("--weight-out", help="also write the accumulated weight (coverage) volume here")
    p.add_argument("--image-to-probe", help="ImageToProbe: JSON file or 16 numbers (instead of/over the config)")
    p.add_argument(
        "--image-to-reference-transform",
        help="transform from image pixels to the output frame (default ImageToReference, or the config's)",
    )
    p.add_argument("--spacing", type=spacing_mm, nargs="+", metavar="MM", help="output voxel size: 1 or 3 values")
    p.add_argument("--origin", type=finite_float, nargs=3, metavar=("X", "Y", "Z"), help="output origin, mm")
    p.add_argument(
        "--extent", type=index, nargs=6, metavar="I", help="output extent i0 i1 j0 j1 k0 k1 (with --origin: a fixed ROI)"
    )
    p.add_argument("--interpolation", choices=INTERPOLATIONS)
    p.add_argument("--compounding", choices=COMPOUNDINGS)
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None, help="hole filling on/off")
    p.add_argument("--clip-origin", type=index, nargs=2, metavar=("X", "Y"), help="clip rectangle origin, pixels")
    p.add_argument("--clip-size", type=int_in(1, 2**31 - 1), nargs=2, metavar=("W", "H"), help="clip rectangle size, pixels")
    p.add_argument("--fan-angles", type=finite_float, nargs=2, metavar=("LEFT", "RIGHT"), help="fan angles, degrees")
    p.add_argument("--fan-origin", type=finite_float, nargs=2, metavar=("X", "Y"), help="fan apex, pixels")
    p.add_argument("--fan-radius", type=non_negative_float, nargs=2, metavar=("START", "STOP"), help="fan radii, pixels")
    p.add_argument("--fan-auto-detect", action="store_true", help="detect the fan angles of each frame")
    p.add_argument("--pixel-rejection-threshold", type=finite_float, help="skip pixels darker than this")
    p.add_argument("--skip-interval", type=positive_int, help="use every n-th frame")
    p.add_argument("--importance-mask", help="importance mask image for --compounding importance_mask")
    p.add_argument("--threads", type=threads, help="worker threads (default: all cores; results do not change)")
    p.add_argument("--memory-budget-gib", type=positive_float, help="refuse volumes needing more memory (default 4)")
    p.add_argument("--grid-alignment", choices=("plus", "snap"), help="automatic grid: PLUS's or spacing-aligned")
    p.add_argument("--emulate-plus", action="store_true", help="reproduce PLUS's arithmetic: the volume PLUS makes with the same settings, voxel for voxel "
                   "(Optimization FULL or NONE from the config). Default: exact arithmetic (each mean rounded once "
                   "when stored), more accurate, a few grey levels from PLUS's volume in many voxels")
    p.add_argument("--engine", choices=("auto", "numba", "torch"),
                   help="insertion engine (default auto: torch on a CUDA GPU, else the numba CPU kernels)")
    add_progress_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_reconstruct)
    return p

"""The ``freehandus`` command line: the headless twin of the Slicer modules.

Each subcommand parses its options, loads files, calls the same Lib function the Slicer Logic
calls, prints ``str(result)`` (or JSON with ``--json``) and returns an exit code. Errors caused by
the input (:class:`~FreehandUSLib.errors.FreehandUSError`, a bad number or a file that cannot be
opened or written) print one line to stderr and exit 2; Ctrl-C prints one line and exits 130.
Numbers are checked by argparse with the types of :mod:`FreehandUSLib.cli_support`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from FreehandUSLib import __version__
from FreehandUSLib.cli_support import ArgumentParser, add_progress_option, progress_enabled
from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.sequence import sequence_info

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def _format_info(info: dict) -> str:
    lines = [
        f"{info['file']}",
        f"  frames: {info['frames']}  size: {info['width']}x{info['height']}"
        f"  channels: {info['channels']}  type: {info['dtype']}",
        f"  orientation: {info['orientation']} (file: {info['source_orientation']})"
        f"  duration: {info['duration_s']:.3f} s",
        f"  frames without image: {info['frames_without_image']}",
    ]
    for name in info["transforms"]:
        lines.append(
            f"  {name}: valid in {info['valid_transform_frames'][name]}/{info['frames']} frames"
        )
    return "\n".join(lines)


def _cmd_info(args) -> int:
    from FreehandUSLib.io import read_sequence

    seq = read_sequence(args.sequence)
    info = sequence_info(seq, args.sequence)
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


def _cmd_convert(args) -> int:
    from FreehandUSLib.io import read_sequence, sequence_format, write_sequence

    read_options = {}
    if args.calibration:
        if sequence_format(args.input) != "tusrec":
            raise FreehandUSError("--calibration applies to TUS-REC .h5 input only")
        read_options["calibration_csv"] = args.calibration
    seq = read_sequence(args.input, **read_options)
    write_options = {}
    if sequence_format(args.output) in ("metafile", "nrrd"):
        write_options["compress"] = not args.no_compress
    out = write_sequence(seq, args.output, **write_options)
    info = sequence_info(seq, out)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out}: {seq}")
    return 0


def _cmd_demo(args) -> int:
    from FreehandUSApp.demo import run_demo

    result = run_demo(Path(args.out), quick=args.quick, browser_check=not args.no_browser_check,
                      progress=progress_enabled(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0


def _reconstruction_for_serve():
    """The reconstruction capability's ReconstructVolume for ``serve`` (imported when it runs)."""
    from FreehandUSLib.reconstruction import live

    return live


def _add_stream_parsers(subparsers) -> None:
    """``serve`` and ``record`` (the stream transport), with reconstruction behind ``serve``."""
    from FreehandUSLib.igtl.cli import add_parsers

    add_parsers(subparsers, reconstruction=_reconstruction_for_serve)


#: The commands the other parts register, and where: ``module, function`` (imported only when
#: needed, so that e.g. ``freehandus reconstruct`` does not import torch, opencv or the
#: OpenIGTLink code). ``simulate`` is assembled from two parts (see :func:`_add_simulate`).
_REGISTRARS = {
    "reconstruct": ("FreehandUSLib.reconstruction.cli", "add_parser"),
    "detect": ("NWireCalibrationLib.cli", "add_parsers"),
    "calibrate": ("NWireCalibrationLib.cli", "add_parsers"),
    "simulate": None,
    "track": ("SensorlessTrackingLib.cli", "add_parsers"),
    "serve": ("FreehandUSApp.cli", "_add_stream_parsers"),
    "record": ("FreehandUSApp.cli", "_add_stream_parsers"),
    "calibrate-live": ("NWireCalibrationLib.live_calibration", "add_live_calibration_parser"),
}


def _add_simulate(sub) -> None:
    from NWireCalibrationLib.cli import add_simulate_nwire

    from FreehandUSLib.simulation.cli import add_simulate_sweep

    simulate = sub.add_parser("simulate", help="generate tracked acquisitions with known truth")
    simulate_sub = simulate.add_subparsers(dest="what", required=True, metavar="WHAT")
    add_simulate_nwire(simulate_sub)
    add_simulate_sweep(simulate_sub)


def _requested_command(argv) -> str | None:
    """The command word of ``argv`` (its first argument that is not an option), if any."""
    for word in sys.argv[1:] if argv is None else argv:
        if not str(word).startswith("-"):
            return str(word)
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``freehandus`` parser.

    Parameters
    ----------
    command : str, optional
        Register only this command's parser when it is one of the other parts' commands (a
        command runs without importing the code of the others); default, or for an unknown
        word: every command (``--help`` lists them all).
    """
    parser = ArgumentParser(
        prog="freehandus",
        description="Freehand 3D ultrasound: calibration, reconstruction, sensorless tracking, streams.",
    )
    parser.add_argument("--version", action="version", version=f"freehandus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="summarise a tracked sequence file")
    p.add_argument("sequence", help=".igs.mha/.igs.mhd/.igs.nrrd/.seq.nrrd/.h5 file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert a tracked sequence between file formats")
    p.add_argument("input", help="input sequence file")
    p.add_argument("output", help="output file; the format follows the extension")
    p.add_argument("--calibration", help="TUS-REC calibration csv (for .h5 input)")
    p.add_argument("--no-compress", action="store_true", help="write uncompressed pixel data")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on generated data",
        description="Simulate, calibrate (N-wire), stream + record (OpenIGTLink loopback), reconstruct US + PA, "
        "track without the tracker, and write report.html, volumes, sequences, the calibration and a Slicer scene.",
    )
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--quick", action="store_true", help="reduced run (fewer, smaller frames; about a minute)")
    p.add_argument("--no-browser-check", action="store_true",
                   help="do not render report.html with a headless Chromium to check it (report.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_progress_option(p)
    p.set_defaults(func=_cmd_demo)

    # The other parts' commands, each registered by its own module (in this order for --help).
    wanted = [command] if command in _REGISTRARS else list(_REGISTRARS)
    done = set()
    for name in wanted:
        registrar = _REGISTRARS[name]
        if registrar is None:
            _add_simulate(sub)
            continue
        if registrar in done:  # one function registers several commands
            continue
        done.add(registrar)
        module_name, function = registrar
        getattr(importlib.import_module(module_name), function)(sub)
    return parser


def _command_name(args) -> str:
    """``freehandus track predict`` etc.: the program and the subcommands the user typed."""
    words = [args.command]
    for key in ("what", "track_command", "simulate_command"):
        word = getattr(args, key, None)
        if isinstance(word, str):
            words.append(word)
    return "freehandus " + " ".join(words)


def _os_error_text(exc: OSError) -> str:
    """One line for an OSError: ``<file>: <reason>`` (no errno tuple, no traceback)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def main(argv=None) -> int:
    """Entry point of ``freehandus``; returns the process exit code.

    0 on success; 2 on bad input (one line on stderr: a :class:`FreehandUSError`, an input or
    output file that cannot be opened or written, or, from argparse, a bad option); 130 when
    interrupted (Ctrl-C). Outputs are written to temporary names and renamed when complete, so
    an interrupted command leaves no truncated file under the name asked for.
    """
    parser = build_parser(_requested_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    name = _command_name(args)
    try:
        return int(args.func(args) or 0)
    except FreehandUSError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{name}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{name}: error: out of memory (use smaller inputs or outputs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

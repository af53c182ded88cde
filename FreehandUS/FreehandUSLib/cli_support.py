"""Shared pieces of the ``freehandus`` command line: number types, the parser, progress bars.

Every subcommand (those of NWireCalibrationLib and SensorlessTrackingLib too) checks its numbers
here, at the argparse edge: a NaN, an infinity, or a zero or negative value where it makes no
sense is refused before any file is read, with one line naming the flag::

    freehandus reconstruct: error: argument --memory-budget-gib: must be a finite number, got 'nan' (see ...)

:class:`ArgumentParser` prints every parse error as that one line and exits 2 (argparse's default
also prints the usage). :func:`progress_bar` shows a tqdm bar on stderr only on a terminal unless
``--progress`` asks for it, so logs of scripted runs hold no ``\\r`` updates.
:func:`check_output_path` checks an output name before any work, :func:`no_partial_outputs` and
:func:`write_text_atomic` keep an interrupted command from leaving half of its outputs.

This module imports only the standard library and :mod:`.errors` (``freehandus --help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from .errors import FileFormatError

__all__ = [
    "ArgumentParser",
    "finite_float",
    "positive_float",
    "non_negative_float",
    "fraction",
    "positive_int",
    "non_negative_int",
    "int_at_least",
    "int_in",
    "index",
    "seed",
    "threads",
    "float_in",
    "spacing_mm",
    "MAX_MAGNITUDE",
    "add_progress_option",
    "progress_enabled",
    "progress_bar",
    "no_partial_outputs",
    "write_text_atomic",
    "check_output_path",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with every usage error on one line (``prog: error: ...``) and exit 2.

    Sub-parsers made with ``add_subparsers`` inherit the class.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse(text: str, kind) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


#: Largest magnitude any number option takes (mm, pixels, degrees, seconds, GiB): far beyond any
#: real use, and small enough that squares and products of such values stay finite.
MAX_MAGNITUDE = 1e12


def _finite(text: str) -> float:
    value = _parse(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(value) > MAX_MAGNITUDE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_MAGNITUDE:g} in magnitude, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN, infinities and magnitudes over :data:`MAX_MAGNITUDE`
    refused; so for every float type here)."""
    return _finite(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """argparse type factory: a finite number in ``[low, high]`` (``(`` / ``)`` where open)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        value = _finite(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, got {text!r}")
        return value

    parse.__name__ = f"float_in_{low:g}_{high:g}"
    return parse


#: argparse type: a share in [0, 1].
fraction = float_in(0.0, 1.0)
#: argparse type: a pixel or voxel size in mm, 1 um to 1 m (finer grids only overflow counts).
spacing_mm = float_in(1e-3, 1e3)


def int_at_least(minimum: int):
    """argparse type factory: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = _parse(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def int_in(low: int, high: int):
    """argparse type factory: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _parse(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = f"int_in_{low}_{high}"
    return parse


#: argparse type: a voxel or pixel index (a 32-bit signed integer).
index = int_in(-(2**31), 2**31 - 1)
#: argparse type: a random seed (what numpy's legacy seeding takes).
seed = int_in(0, 2**32 - 1)
#: argparse type: a number of worker threads.
threads = int_in(1, 4096)
#: argparse type: an integer >= 1.
positive_int = int_at_least(1)
#: argparse type: an integer >= 0 (seeds, offsets).
non_negative_int = int_at_least(0)


def add_progress_option(parser) -> None:
    """Add ``--progress/--no-progress`` (default: a bar only when stderr is a terminal)."""
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar on stderr (default: only on a terminal, and not with --json)",
    )  # fmt: skip


def progress_enabled(args, stream=None) -> bool:
    """Whether a command shows progress: ``--progress``/``--no-progress`` if given, else only when
    ``stream`` (default stderr) is a terminal and ``--json`` is not given."""
    choice = getattr(args, "progress", None)
    if choice is not None:
        return bool(choice)
    if getattr(args, "json", False):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


@contextlib.contextmanager
def progress_bar(enabled: bool, desc: str, *, total: int | None = None, unit: str = "frame"):
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar, or None when not ``enabled``.

    The bar is created on the first call (so ``total`` may come from the callback) and closed
    on exit, also when the work is interrupted.
    """
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    state = {"bar": None}

    def progress(done, total_now=None):
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(total=total_now if total_now is not None else total, desc=desc, unit=unit,
                                      leave=False, dynamic_ncols=True, file=sys.stderr)
        elif total_now is not None and total_now != bar.total:
            bar.total = total_now
        bar.update(max(0, int(done) - bar.n))

    try:
        yield progress
    finally:
        if state["bar"] is not None:
            state["bar"].close()


@contextlib.contextmanager
def no_partial_outputs(*paths):
    """Run a command's writes: if they fail or are interrupted (Ctrl-C), remove those of
    ``paths`` (None entries ignored) that did not exist before, so a command leaves its whole
    set of new outputs or none of them (a ``.mhd`` header takes its ``.raw``/``.zraw`` along)."""
    new = [Path(p) for p in paths if p is not None and not Path(p).exists()]
    try:
        yield
    except BaseException:
        for path in new:
            companions = [path.with_suffix(".raw"), path.with_suffix(".zraw")] if path.suffix.lower() == ".mhd" else []
            for p in [path, *companions]:
                with contextlib.suppress(OSError):
                    p.unlink()
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it to ``path`` when
    complete: an interrupted write leaves no truncated file under the name asked for."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def check_output_path(text, *, flag: str = "--out", what: str = "file") -> Path:
    """Check an output file name before any work: not a folder, and its folder exists or can be
    made (the nearest existing parent is a folder; the writer makes the missing ones).

    Raises
    ------
    FileFormatError
        Naming ``flag`` and the path.
    """
    path = Path(text)
    if path.is_dir():
        raise FileFormatError(f"{flag} {text}: is a folder; give a {what} name")
    parent = path.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileFormatError(f"{flag} {text}: {parent} is a file, not a folder")
    return path

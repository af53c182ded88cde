"""Checks every file reader makes before it trusts a number or a path taken from a file.

A header states sizes; the file on disk holds a certain number of bytes. The readers check the
one against the other *before* they allocate anything (sizes are multiplied as Python ints,
which cannot wrap), decompress with a limit of the size the header implies, and refuse data
files outside the header's folder. These helpers are shared by the metafile, NRRD and TUS-REC
readers:

- :func:`shown`: a value as it may appear in a one-line error message (no line breaks, at most
  80 characters, plain Python numbers rather than numpy reprs).
- :func:`data_file_beside`: resolve a data file named in a header, refusing absolute paths
  outside, ``..``, symbolic links that lead elsewhere, and anything but a regular file.
- :func:`check_memory`: refuse a result larger than the memory this process can still get
  (``MemAvailable`` + ``SwapFree`` and the address-space limit, Linux), as one line instead of a
  ``MemoryError`` or the kernel's out-of-memory killer.
- :data:`MAX_INFLATE_RATIO`: deflate (zlib, gzip) expands data by at most ~1032x, so a compressed
  block of ``n`` bytes can never hold more than ``MAX_INFLATE_RATIO * n`` bytes.
"""

from __future__ import annotations

import os
import resource
import stat
from pathlib import Path

import numpy as np

from ..errors import FileFormatError

__all__ = ["shown", "data_file_beside", "check_memory", "format_bytes", "MAX_INFLATE_RATIO"]

#: deflate cannot expand data by more than ~1032x (zlib's technical note); bzip2 is bounded by
#: the same order of magnitude for the data we read, and we use the same bound for it.
MAX_INFLATE_RATIO = 1100
_SHOWN_CHARS = 80


def shown(value, limit: int = _SHOWN_CHARS, *, quote: bool = True) -> str:
    """``repr``-like text of ``value`` for a one-line message: no line breaks, at most ``limit``
    characters (``...`` marks the cut), numpy scalars and arrays as plain numbers; strings in
    quotes unless ``quote`` is False."""
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        text = repr(value) if quote else value
    elif isinstance(value, (list, tuple)):
        items = [str(v.item() if isinstance(v, np.generic) else v) for v in value]
        if isinstance(value, tuple):
            text = "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        else:
            text = "[" + ", ".join(items) + "]"
    else:
        text = str(value)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def format_bytes(n: int) -> str:
    """``n`` bytes as text with a binary unit (``12.7 GiB``)."""
    n = int(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def data_file_beside(header_path, name: str, field: str) -> Path:
    """The data file ``name`` (as a header's ``field`` gives it), checked to lie beside the header.

    Parameters
    ----------
    header_path : str or Path
        The header file that names the data file.
    name : str
        The value of ``field`` (``ElementDataFile``, ``data file``...), relative to the header's
        folder (an absolute path is accepted only when it points into that folder).
    field : str
        The header field, for messages.

    Returns
    -------
    Path
        The data file, resolved (symbolic links followed).

    Raises
    ------
    FileFormatError
        The data file lies outside the header's folder (``..``, an absolute path elsewhere, a link
        that leads out), is missing, or is not a regular file (a device, a FIFO, a folder).
    """
    header_path = Path(header_path)
    folder = header_path.resolve().parent
    target = Path(name)
    candidate = target if target.is_absolute() else folder / target
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        raise FileFormatError(
            f"{header_path}: {field} = {shown(name)} cannot be resolved ({exc.__class__.__name__})"
        ) from None
    if not resolved.is_relative_to(folder):
        raise FileFormatError(
            f"{header_path}: {field} = {shown(name)} lies outside the header's folder; data files "
            f"must be in the same folder as the header or below it"
        )
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise FileFormatError(f"{header_path}: data file {shown(name)} ({field}) not found") from None
    except (OSError, ValueError) as exc:
        raise FileFormatError(
            f"{header_path}: data file {shown(name)} ({field}) cannot be read ({exc.__class__.__name__})"
        ) from None
    if not stat.S_ISREG(mode):
        raise FileFormatError(
            f"{header_path}: data file {shown(name)} ({field}) is not a regular file"
        )
    return resolved


def _available_memory() -> int | None:
    """Bytes this process can still allocate (Linux), or None when unknown."""
    limits = []
    free, found = 0, False
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(("MemAvailable:", "SwapFree:")):
                    free += int(line.split()[1]) * 1024
                    found = True
        if found:
            limits.append(free)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(soft - used, 0))
        except (OSError, ValueError, IndexError):
            limits.append(soft)
    return min(limits) if limits else None


def check_memory(nbytes: int, path, what: str) -> None:
    """Raise :class:`FileFormatError` if ``nbytes`` (a result about to be allocated) cannot fit.

    Parameters
    ----------
    nbytes : int
        Bytes the reader is about to allocate, computed from sizes already checked against the
        file (so this is a memory check, not a file check).
    path : str or Path
        The file read, for the message.
    what : str
        What the memory is for (``"the frames"``...).
    """
    available = _available_memory()
    if available is not None and nbytes > available:
        raise FileFormatError(
            f"{path}: {what} need {format_bytes(nbytes)} of memory but only "
            f"{format_bytes(available)} are available"
        )

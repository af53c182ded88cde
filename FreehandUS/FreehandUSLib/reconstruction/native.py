"""PLUS's fixed-point insertion and STICK hole filling from a C library (``native/``), without numba.

:func:`insert_per_pixel_native` is :func:`.kernels_plus.insert_per_pixel` for the cases PLUS
emulation uses most (``fixed_point``: nearest and trilinear, PLUS's MEAN / MAXIMUM / LATEST,
uint8 or float32 frames, C-contiguous buffers), on the same threads-over-slabs plan, with
bit-identical buffers (tested against the numba kernels and IGSIO's reference volumes). The
point is start-up: importing numba and loading its compiled kernels costs about half a second
and 60 MB before the first frame, more than IGSIO's whole run on a short recording.

:func:`fill_holes_native` is :func:`.holefill.fill_holes_into` for hole filling made of STICK
elements on PLUS's value buffers (``native/stick_fill.c``), likewise bit-identical.

The library is built at install time (:mod:`.native_build`). :func:`available` is False when it
is missing, was built from other sources (a stale build is never used), or
``FREEHANDUS_KERNELS=numba`` is set; callers then use the numba kernels. ``FREEHANDUS_KERNELS=
native`` makes a missing library an error instead (:func:`require`).
"""

from __future__ import annotations

import ctypes
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import InvalidOptionError, ReconstructionError
from .kernels_common import run_workers

__all__ = ["C_FILES", "LIBRARY_NAME", "NATIVE_DIR", "available", "require", "supports", "source_hash",
           "insert_per_pixel_native", "kernels_choice", "reload", "supports_hole_filling", "fill_holes_native"]

NATIVE_DIR = Path(__file__).resolve().parent / "native"
LIBRARY_NAME = "libfreehandus_plus.so"
C_FILES = ("plus_insert.c", "stick_fill.c")
_SOURCES = (*C_FILES, "plus_insert_impl.h")
_MODE_MAX, _MODE_LATEST, _MODE_MEAN_PLUS = 1, 2, 4

_state: dict = {}


def source_hash() -> str:
    """A checksum of the C sources (CRC-32 of each file, in hex; the build embeds it).

    It only has to tell an edited source from the one a library was built from (zlib is loaded
    by the readers already; hashlib would cost a few milliseconds of start-up).
    """
    return "".join(f"{zlib.crc32(name.encode() + (NATIVE_DIR / name).read_bytes()):08x}" for name in _SOURCES)


def kernels_choice() -> str:
    """``FREEHANDUS_KERNELS``: ``auto`` (the default: C when built), ``native`` or ``numba``."""
    choice = os.environ.get("FREEHANDUS_KERNELS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "native", "numba"):
        raise InvalidOptionError(f"FREEHANDUS_KERNELS={choice!r}: use auto, native or numba (or unset it)")
    return choice


def _load():
    """(library or None, reason it is not usable or "")."""
    path = NATIVE_DIR / LIBRARY_NAME
    if not path.is_file():
        return None, f"{path} is not built (python -m FreehandUSLib.reconstruction.native_build)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"{path} does not load ({exc}); rebuild it"
    lib.fh_source_hash.restype = ctypes.c_char_p
    built = lib.fh_source_hash().decode("ascii", "replace")
    if built != source_hash():
        return None, f"{path} was built from other sources ({built}); rebuild it"
    if lib.fh_arithmetic_shift() != 1:
        return None, f"{path}: this compiler's >> is not an arithmetic shift"
    lib.fh_init()
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("fh_plus_insert_u8", "fh_plus_insert_f32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i32, i32, i32, ctypes.c_double, ptr, ptr, i64, i64,
                       i64, ptr, i64, i64, i64, ptr]
    lib.fh_stick_fill.restype = i64
    lib.fh_stick_fill.argtypes = [ptr, i32, i64, ptr, ptr, ptr, ptr, i32, i32, i64, i64, i64, i64, i64, ptr, i64, i64,
                                  ptr, ptr, i32]
    lib.fh_near_known.restype = None
    lib.fh_near_known.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
    return lib, ""


def _library():
    if "lib" not in _state:
        _state["lib"], _state["reason"] = _load()
    return _state["lib"]


def reload() -> bool:
    """Load the library again (after a build); returns :func:`available`."""
    _state.clear()
    return available()


def available() -> bool:
    """True when the C kernels are built from these sources and not switched off."""
    return kernels_choice() != "numba" and _library() is not None


def require() -> None:
    """Raise :class:`~.errors.ReconstructionError` (with what to do) when ``FREEHANDUS_KERNELS=native``
    but the library is unusable."""
    if kernels_choice() == "native" and _library() is None:
        raise ReconstructionError(f"FREEHANDUS_KERNELS=native: {_state['reason']}")


def supports(*, mode: int, fixed_point: bool, unoptimized: bool, frame_dtype, acc=None, weight=None) -> bool:
    """Whether :func:`insert_per_pixel_native` covers this insertion (else use the numba kernels)."""
    if not fixed_point or unoptimized or int(mode) not in (_MODE_MEAN_PLUS, _MODE_MAX, _MODE_LATEST):
        return False
    dtype = np.dtype(frame_dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
        return False
    if acc is not None and (acc.dtype != dtype or not acc.flags.c_contiguous or acc.ndim != 4):
        return False
    if weight is not None and (weight.dtype != np.uint16 or not weight.flags.c_contiguous or weight.ndim != 3):
        return False
    return True


def insert_per_pixel_native(frames, frame_ids, matrices, row_ranges, mask_ids, acc, weight, mode, linear, use_reject,
                            reject, n_threads=1, executor=None, slab=None) -> np.ndarray:
    """:func:`.kernels_plus.insert_per_pixel` with ``fixed_point=True`` on the C kernels.

    Parameters are those of :func:`.kernels.insert_frames` (frames ``(n_all, rows, cols, c)``
    uint8/float32 C-contiguous; matrices pixel -> voxel index, multiples of 2**-14; acc of the
    frames' type and weight uint16, C-contiguous, PLUS's buffers). Returns pixels inserted per
    frame ``(n,)`` int64.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(_state.get("reason", "native kernels unavailable"))
    if not supports(mode=mode, fixed_point=True, unoptimized=False, frame_dtype=frames.dtype, acc=acc, weight=weight):
        raise ValueError("insert_per_pixel_native: unsupported mode, dtype or buffer layout")
    frames = np.ascontiguousarray(frames)
    frame_ids = np.ascontiguousarray(frame_ids, dtype=np.int64)
    mask_ids = np.ascontiguousarray(mask_ids, dtype=np.int64)
    matrices = np.ascontiguousarray(matrices, dtype=np.float64)
    row_ranges = np.ascontiguousarray(row_ranges, dtype=np.int32)
    n = frame_ids.shape[0]
    nk, nj, ni, nc = acc.shape
    if frames.ndim != 4 or frames.shape[3] != nc or row_ranges.shape[1:] != (frames.shape[1], 4):
        raise ValueError("insert_per_pixel_native: frames, buffers and row ranges do not agree")
    if n and (frame_ids.min() < 0 or frame_ids.max() >= frames.shape[0]
              or mask_ids.min() < 0 or mask_ids.max() >= row_ranges.shape[0]
              or matrices.shape != (n, 3, 3) or mask_ids.shape != (n,)):
        raise ValueError("insert_per_pixel_native: frame ids, mask ids or matrices out of range")
    if slab is None:
        slab = max(8 if linear else 4, min(16, nk // (4 * max(1, int(n_threads)))))
    slab = max(1, int(slab))
    groups = max(1, min(int(n_threads), (nk + slab - 1) // slab))
    counts = np.zeros((groups, n), dtype=np.int64)
    if n == 0:
        return counts.sum(axis=0)
    fn = lib.fh_plus_insert_u8 if frames.dtype == np.uint8 else lib.fh_plus_insert_f32
    n_rows, n_cols = frames.shape[1], frames.shape[2]
    fixed = (frames.ctypes.data, n_rows, n_cols, nc, frame_ids.ctypes.data, n, matrices.ctypes.data,
             row_ranges.ctypes.data, mask_ids.ctypes.data, int(bool(linear)), int(mode), int(bool(use_reject)),
             float(reject), acc.ctypes.data, weight.ctypes.data, nk, nj, ni)

    def work(g, spans):
        if fn(*fixed, counts[g].ctypes.data, groups, g, slab, spans.ctypes.data) != 0:
            raise ValueError("insert_per_pixel_native: the library refused the mode")

    if groups == 1:
        work(0, np.empty((max(1, n_rows), 5), dtype=np.int64))
        return counts[0]
    pieces = n_rows * (((nk + slab - 1) // slab) // groups + 2)  # as kernels_plus.insert_per_pixel
    run_workers(lambda g: work(g, np.empty((pieces, 5), dtype=np.int64)), groups, executor)
    return counts.sum(axis=0)


_VALUE_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.float32): 1}


def supports_hole_filling(elements, *, divide: bool, values=None, out_dtype=None) -> bool:
    """Whether :func:`fill_holes_native` covers this hole filling (else use :mod:`.holefill`).

    Only STICK elements, on values that are the voxels themselves (``divide`` False: PLUS's
    buffers, not sums), uint8 or float32 in and out.
    """
    elements = list(elements)
    if divide or not elements or any(e.type != "STICK" for e in elements):
        return False
    if values is not None and (np.dtype(values.dtype) not in _VALUE_TYPES or values.ndim != 4
                               or not values.flags.c_contiguous):
        return False
    return out_dtype is None or np.dtype(out_dtype) in _VALUE_TYPES


def fill_holes_native(out, values, channel: int, known, elements, *, store: int, n_threads: int = 1,
                      emulate_plus: bool = False, integer_values: bool = False):
    """STICK hole filling of one channel on the C kernels (:func:`.holefill.fill_holes_into`'s rules).

    Parameters
    ----------
    out : (n_k, n_j, n_i) uint8 or float32, C-contiguous
        Receives the filled holes; other voxels are not touched.
    values : (n_k, n_j, n_i, n_channels) uint8 or float32, C-contiguous
        The known voxels' values (PLUS's value buffer); channel ``channel`` is read.
    known : (n_k, n_j, n_i) bool, C-contiguous
    elements : sequence of STICK :class:`~.config.HoleFillingElement`
    store : int
        ``STORE_RAW`` / ``STORE_ROUND`` / ``STORE_FLOOR`` (:mod:`.holefill_common`).
    n_threads : int
        Workers over runs of planes (the result does not depend on it).
    emulate_plus, integer_values : bool
        PLUS's forward-end weights; floored stick values for integer output.

    Returns
    -------
    HoleFillingStats
    """
    import time

    from .holefill_common import STICK_DIRECTIONS, HoleFillingStats, _stick_tables

    start = time.perf_counter()
    lib = _library()
    if lib is None:
        raise RuntimeError(_state.get("reason", "native kernels unavailable"))
    elements = list(elements)
    if not supports_hole_filling(elements, divide=False, values=values, out_dtype=out.dtype):
        raise ValueError("fill_holes_native: only STICK elements on uint8 / float32 value buffers")
    known = np.ascontiguousarray(known, dtype=bool)
    nk, nj, ni, nc = values.shape
    if out.shape != (nk, nj, ni) or known.shape != (nk, nj, ni) or not out.flags.c_contiguous:
        raise ValueError(f"fill_holes_native: shapes do not match: values {values.shape}, out {out.shape}, "
                         f"known {known.shape}")
    if not 0 <= int(channel) < nc:
        raise ValueError(f"fill_holes_native: channel {channel} of {nc}")
    n_holes = int(known.size - np.count_nonzero(known))
    filled_per_element = []
    done = np.zeros(known.shape, dtype=np.uint8) if len(elements) > 1 else None
    dirs = np.ascontiguousarray(STICK_DIRECTIONS, dtype=np.int64)
    n_chunks = max(1, min(int(n_threads), nk))
    bounds = np.linspace(0, nk, n_chunks + 1).astype(np.int64)
    base = values.ctypes.data + int(channel) * values.itemsize
    for element in elements:
        limit = int(element.stick_length_limit)
        wtab, ftab = _stick_tables(limit, bool(emulate_plus))
        near = np.empty(known.shape, dtype=np.uint8)  # holes that can have a stick (a cube of limit - 1)
        scratch = np.empty_like(near)  # named: a temporary's memory would be freed before the call
        lib.fh_near_known(known.ctypes.data, near.ctypes.data, scratch.ctypes.data, nk, nj, ni, max(0, limit - 1))
        del scratch
        args = (base, _VALUE_TYPES[np.dtype(values.dtype)], nc, known.ctypes.data, near.ctypes.data,
                None if done is None else done.ctypes.data, out.ctypes.data, _VALUE_TYPES[np.dtype(out.dtype)],
                int(store), nk, nj, ni)
        tail = (dirs.ctypes.data, limit, int(element.number_of_sticks_to_use), wtab.ctypes.data, ftab.ctypes.data,
                int(bool(emulate_plus and integer_values)))
        chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if len(chunks) == 1:
            counts = [lib.fh_stick_fill(*args, *chunks[0], *tail)]
        else:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                counts = list(pool.map(lambda ab: lib.fh_stick_fill(*args, ab[0], ab[1], *tail), chunks))
        filled_per_element.append(int(sum(counts)))
    return HoleFillingStats(n_holes, tuple(filled_per_element), time.perf_counter() - start)

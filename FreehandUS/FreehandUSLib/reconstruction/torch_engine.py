"""Pixel insertion with torch, on the CPU or a CUDA GPU: the vectorised twin of :mod:`.kernels`.

:class:`TorchAccumulators` holds the accumulators ``acc`` / ``weight`` as torch tensors on one
device and inserts frames with exactly the semantics of :func:`.kernels.insert_frames` (read
that module's docstring): nearest / linear x mean / max / latest / importance_mask, PLUS's 1/8
weight rule for linear max/latest, pixel rejection, importance weights and row-range (fan)
masks. :meth:`TorchAccumulators.to_numpy` returns the buffers in the types the numba path uses
(:func:`.kernels.accumulator_types`), so either engine's result goes through the same output
code. PLUS emulation (``MODE_MEAN_PLUS``, fixed-point weights) stays with the numba engine.

How a batch is inserted (no per-pixel Python):

1. Frames are taken in chunks of consecutive frames holding at most ``chunk_pixels`` kept
   pixels (at least one frame), grouped by their mask.
2. The continuous voxel position of every kept pixel of every frame of a group is computed at
   once by broadcasting the ``(n, 3, 3)`` matrices over the pixels' ``(x, y)``. The arithmetic
   is the numba kernel's, operation for operation (``(m[a, 2] + y * m[a, 1]) + x * m[a, 0]``
   in float64, separate multiplies and adds, so no fused multiply-add), rather than a matmul,
   whose summation order may differ in the last bit: nearest voxel indices and trilinear
   weights are therefore bit-identical to the numba kernel's, on every device.
3. Masks (grid, rejection, importance > 0) are combined and the surviving pixels are
   compacted in (frame, row, column) order. Linear interpolation then handles the 8 corners of
   a pixel side by side, in the kernel's corner order; a corner that must not act (outside the
   grid, zero weight, or below 1/8 for max/latest) is sent to one of 1024 spare voxels
   after the grid instead of being compacted away (cheaper, and spread over
   slots so that GPU atomics do not pile up on one address).
4. ``mean`` / ``importance_mask``: ``scatter_add_`` of values and weights on flattened voxel
   indices.
   ``max``: ``scatter_reduce_(amax)``. ``latest``: every pixel gets a serial number in
   (frame, row, column) order; the largest serial per voxel is found with
   ``scatter_reduce_(amax)`` into a persistent int32 ``stamp`` buffer, and only the pixels
   whose serial won write their value (one writer per voxel, so the last pixel wins exactly as
   in the numba kernel, whatever the device and whatever the chunking).

Speed: the engine is meant for CUDA. On the CPU it makes many passes over memory where the
numba kernels make one, and was 10-20x slower than them for nearest and for linear
interpolation (50 frames of 820x616, one thread each, on a loaded machine), so
:func:`resolve_engine` picks torch only when a CUDA GPU is present and passes
:func:`self_check` (a small fixed scene inserted on the GPU and by the numba kernels must agree).
The CPU device is what the tests compare with numba.

Precision and determinism:

- Integer sums and counts (nearest, uint8 mean; nearest counts) are int64 on the device:
  exact, whatever the order. :meth:`~TorchAccumulators.to_numpy` converts them to uint32
  (float64 if a voxel passed what uint32 holds, as the numba path widens).
- Float sums (float32 frames, linear weights, importance weights) are float64 on every
  device. On the CPU torch's ``scatter_add_`` adds in source order, so the sums are the numba
  kernel's to the bit; on CUDA the atomic adds run in an unspecified order: sums then agree to
  float64 rounding (relative ~1e-15 per addition), not bit for bit, and may differ between
  runs. float64 atomics are fast on data-centre GPUs (V100/A100/H100) and slower on consumer
  ones.
- ``max`` / ``latest`` values, all counts and all voxel indices are bit-identical on every
  device. (NaN pixel values are not supported by ``max``: the numba kernel ignores a NaN that
  comes after a number, ``amax`` propagates it.)

Memory (bounded):

- Persistent, per voxel: ``acc`` (int64 or float64 sums, 8 bytes per channel; max/latest:
  the frames' type) + ``weight`` (int64 or float64, 8 bytes) + for ``latest`` a 4-byte stamp.
  That is more than the numba path's compact types (e.g. 16 instead of 8 bytes per voxel for
  nearest mean of uint8): exact on every device without overflow guards.
- Per chunk: the chunk's frames plus temporaries of at most about
  :data:`BYTES_PER_PIXEL_NEAREST` (nearest) or :data:`BYTES_PER_PIXEL_LINEAR` (linear) bytes
  per kept pixel (measured on the CPU with one channel: 47-56 and 212-229 bytes; each extra
  channel adds about 8 / 64), so at most ``chunk_pixels * BYTES_PER_PIXEL_*``: with the default
  chunks (:data:`DEFAULT_CHUNK_PIXELS_CPU` / :data:`DEFAULT_CHUNK_PIXELS_CUDA` kept pixels)
  about 0.1 / 0.4 GB on the CPU and 0.4 / 1.7 GB on CUDA, or one frame's worth when a single
  frame holds more kept pixels than a chunk.

Example
-------
>>> acc = TorchAccumulators((n_k, n_j, n_i), 1, mode=MODE_MEAN, linear=False,
...                         frame_dtype=np.uint8, device="cuda")       # or "cpu", None = auto
>>> counts = acc.insert_frames(frames4d, frame_ids, vox, row_ranges, mask_ids)
>>> acc_np, weight_np = acc.to_numpy()                                  # numba-path types
"""

from __future__ import annotations

import ctypes.util
import functools
import hashlib
import logging
import os
import sys

import numpy as np

from .errors import InvalidOptionError, ReconstructionError
from .kernels import (
    COUNT_LIMIT,
    MODE_IMPORTANCE,
    MODE_LATEST,
    MODE_MAX,
    MODE_MEAN,
    MODE_MEAN_PLUS,
    accumulator_types,
)

__all__ = [
    "ENGINES",
    "DEFAULT_CHUNK_PIXELS_CPU",
    "DEFAULT_CHUNK_PIXELS_CUDA",
    "BYTES_PER_PIXEL_NEAREST",
    "BYTES_PER_PIXEL_LINEAR",
    "cuda_available",
    "default_device",
    "resolve_engine",
    "self_check",
    "TorchAccumulators",
]

log = logging.getLogger(__name__)

#: Engine names accepted by :func:`resolve_engine` (``auto``: torch on CUDA, else numba).
ENGINES = ("auto", "numba", "torch")
#: Kept pixels per chunk on the CPU (~2 frames of 820x616).
DEFAULT_CHUNK_PIXELS_CPU = 1 << 20
#: Kept pixels per chunk on CUDA (~8 frames of 820x616).
DEFAULT_CHUNK_PIXELS_CUDA = 1 << 22
#: Upper estimate of the temporaries per kept pixel and channel, nearest interpolation, bytes.
BYTES_PER_PIXEL_NEAREST = 100
#: Upper estimate of the temporaries per kept pixel and channel, linear interpolation, bytes.
BYTES_PER_PIXEL_LINEAR = 400

_MODE_NAMES = {MODE_MEAN: "mean", MODE_MAX: "max", MODE_LATEST: "latest", MODE_IMPORTANCE: "importance_mask"}
_MIN_LINEAR_WEIGHT = 0.125  # PLUS: linear max/latest act only on voxels with weight >= 1/8
_STAMP_LIMIT = 2**31 - 1  # int32 serial numbers of `latest`; the stamps restart before passing it
_UINT32_MAX = 2**32 - 1
_TRASH_SLOTS = 1024  # spare voxels after the grid (a power of two)


def _import_torch():
    """torch, or a clear error when it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise ReconstructionError(
            "the torch reconstruction engine needs PyTorch, which is not installed "
            "(pip install torch==2.13.0; in Slicer: the PyTorch extension); use engine='numba'"
        ) from exc
    return torch


@functools.lru_cache(maxsize=1)
def _nvidia_driver_present() -> bool:
    """Cheap hint that a CUDA driver exists (so machines without one never pay torch's import).

    Linux: the driver's /proc entry or device node; Windows: nvcuda.dll on the search path
    (``find_library`` is a path lookup there, while on Linux it spawns compilers, so it is not
    used); macOS has no CUDA.
    """
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    if sys.platform == "win32":
        return ctypes.util.find_library("nvcuda") is not None
    return False


def cuda_available() -> bool:
    """True when torch can be imported and sees a CUDA device (never raises).

    torch is imported only if it already is, or if an NVIDIA driver is installed.
    """
    if "torch" not in sys.modules and not _nvidia_driver_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 (a broken CUDA install is "no CUDA")
        return False


def default_device() -> str:
    """``"cuda"`` when :func:`cuda_available`, else ``"cpu"``."""
    return "cuda" if cuda_available() else "cpu"


def resolve_engine(engine: str = "auto") -> str:
    """The insertion engine to use: ``"numba"`` or ``"torch"``.

    Parameters
    ----------
    engine : {"auto", "numba", "torch"}
        ``auto``: torch when a CUDA GPU is available and passes :func:`self_check` (once per
        process), else numba (the numba kernels are the faster CPU path); a GPU that fails the
        check is logged as a warning.

    Raises
    ------
    InvalidOptionError
        An unknown name.
    ReconstructionError
        ``"torch"`` asked for and torch is not installed.
    """
    name = str(engine).lower()
    if name not in ENGINES:
        raise InvalidOptionError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if name == "auto":
        if not cuda_available():
            return "numba"
        problem = _cuda_self_check()
        if problem is None:
            return "torch"
        _warn_cuda_fallback(problem)
        return "numba"
    if name == "torch":
        _import_torch()
    return name


def self_check(device) -> str | None:
    """Insert a small fixed scene on ``device`` and on the numba kernels and compare.

    ``auto`` runs this once per process before it trusts a CUDA device (a driver, torch build
    or GPU that computes wrong results must not silently change a volume), and falls back to
    numba when it fails.

    Parameters
    ----------
    device : str or torch.device
        ``"cuda"``, ``"cpu"``, ...

    Returns
    -------
    str or None
        None when every mode agrees (counts, indices and max/latest values exactly, float sums
        within 1e-9 relative); otherwise what differed or failed, in words.
    """
    from .kernels import insert_frames
    from .masks import fan_row_ranges

    rng = np.random.default_rng(20261122)
    n_rows, n_cols, shape = 24, 32, (10, 12, 14)
    frames = rng.integers(0, 256, size=(4, n_rows, n_cols, 1), dtype=np.uint8)
    mats = np.zeros((4, 3, 3))
    for f in range(4):  # oblique planes through the grid, 2-3 pixels per voxel, spilling over its faces
        angle = 0.3 * f + 0.2
        mats[f, :, 0] = [0.4 * np.cos(angle), 0.1, 0.4 * np.sin(angle)]
        mats[f, :, 1] = [-0.05, 0.4, 0.1 * f]
        mats[f, :, 2] = [1.0 - 0.5 * f, -1.5, 2.0 + 1.7 * f]
    ranges = fan_row_ranges(n_rows, n_cols)[None]
    ids, mask_ids = np.arange(4), np.zeros(4, dtype=np.int64)
    cases = [("nearest mean", MODE_MEAN, False, np.uint8), ("nearest max", MODE_MAX, False, np.uint8),
             ("linear mean", MODE_MEAN, True, np.float32), ("linear latest", MODE_LATEST, True, np.uint8)]
    for label, mode, linear, dtype in cases:
        data = frames.astype(dtype)
        try:
            acc_t, w_t = _self_check_torch(data, mats, ranges, shape, mode, linear, device)
        except Exception as exc:  # noqa: BLE001 (any failure on the device means "do not use it")
            return f"{label}: the torch engine failed on {device}: {type(exc).__name__}: {exc}"
        acc_dtype, weight_dtype, _ = accumulator_types(mode, linear, data.dtype)
        acc_n = np.zeros(shape + (1,), dtype=acc_dtype)
        w_n = np.zeros(shape, dtype=weight_dtype)
        insert_frames(data, ids, mats, ranges, mask_ids, acc_n, w_n, mode=mode, linear=linear)
        if not np.any(w_n):
            return f"{label}: the self-check scene missed the grid (a bug in the check itself)"
        exact = not linear or mode != MODE_MEAN
        same_acc = np.array_equal(acc_t, acc_n) if exact else np.allclose(acc_t, acc_n, rtol=1e-9, atol=1e-9)
        same_w = (np.array_equal(w_t, w_n) if not linear
                  else np.allclose(w_t, w_n, rtol=1e-6 if mode != MODE_MEAN else 1e-9, atol=1e-9))
        if not (same_acc and same_w):
            what = "values" if not same_acc else "weights"
            return f"{label}: {what} on {device} differ from the numba kernels' on a fixed test scene"
    return None


def _self_check_torch(frames, mats, ranges, shape, mode, linear, device):
    engine = TorchAccumulators(shape, 1, mode=mode, linear=linear, frame_dtype=frames.dtype, device=device,
                               chunk_pixels=1000)
    engine.insert_frames(frames, np.arange(len(frames)), mats, ranges, np.zeros(len(frames), dtype=np.int64),
                         mode=mode, linear=linear)
    return engine.to_numpy()


@functools.lru_cache(maxsize=1)
def _cuda_self_check() -> str | None:
    return self_check("cuda")


@functools.lru_cache(maxsize=1)
def _warn_cuda_fallback(problem: str) -> None:
    log.warning("engine auto: not using the CUDA GPU, reconstructing on the CPU (numba) instead: %s", problem)


def _check_mode(mode) -> int:
    if mode == MODE_MEAN_PLUS:
        raise InvalidOptionError(
            "mode: MODE_MEAN_PLUS (PLUS emulation, emulate_plus=True) is not supported by the torch "
            "engine; use engine='numba'"
        )
    if mode not in _MODE_NAMES:
        raise InvalidOptionError(f"mode: expected one of MODE_MEAN/MAX/LATEST/IMPORTANCE (0-3), got {mode!r}")
    return int(mode)


class TorchAccumulators:
    """Reconstruction accumulators on a torch device, filled by :meth:`insert_frames`.

    Parameters
    ----------
    shape : (n_k, n_j, n_i) int
        Output grid size (voxels ``[k, j, i]``).
    n_channels : int
        Channels per pixel.
    mode : int
        ``MODE_MEAN``, ``MODE_MAX``, ``MODE_LATEST`` or ``MODE_IMPORTANCE`` (:mod:`.kernels`).
        ``MODE_MEAN_PLUS`` is refused (PLUS emulation stays with the numba engine).
    linear : bool
        Trilinear splat instead of nearest voxel.
    frame_dtype : numpy dtype
        uint8 or float32: the type of the frames that will be inserted.
    device : str or torch.device, optional
        Default :func:`default_device` (CUDA when available).
    chunk_pixels : int, optional
        Kept pixels per chunk (bounds the temporaries, see the module docstring). Default
        :data:`DEFAULT_CHUNK_PIXELS_CUDA` on CUDA, else :data:`DEFAULT_CHUNK_PIXELS_CPU`.

    Attributes
    ----------
    acc : torch.Tensor (n_k, n_j, n_i, n_channels)
        Sums (int64 for nearest mean of uint8, else float64) or values (max/latest: the
        frames' type; float max keeps -inf in voxels without weight).
    weight : torch.Tensor (n_k, n_j, n_i)
        int64 pixel counts (nearest, except importance) or float64 summed weights.

    Raises
    ------
    InvalidOptionError
        Bad shape, channels, mode (``MODE_MEAN_PLUS`` included), frame type or chunk size.
    ReconstructionError
        torch is not installed.
    """

    def __init__(self, shape, n_channels: int = 1, *, mode: int = MODE_MEAN, linear: bool = False,
                 frame_dtype=np.uint8, device=None, chunk_pixels: int | None = None):
        torch = _import_torch()
        self._torch = torch
        try:
            dims = tuple(int(v) for v in shape)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"shape: expected (n_k, n_j, n_i) positive integers, got {shape!r}") from None
        if len(dims) != 3 or min(dims) < 1:
            raise InvalidOptionError(f"shape: expected (n_k, n_j, n_i) positive integers, got {shape!r}")
        if int(n_channels) < 1:
            raise InvalidOptionError(f"n_channels: expected a positive integer, got {n_channels!r}")
        self.mode = _check_mode(mode)
        self.linear = bool(linear)
        self.frame_dtype = np.dtype(frame_dtype)
        if self.frame_dtype not in (np.uint8, np.float32):
            raise InvalidOptionError(f"frame_dtype: expected uint8 or float32, got {self.frame_dtype}")
        self.shape = dims
        self.n_channels = int(n_channels)
        self.device = torch.device(default_device() if device is None else device)
        if chunk_pixels is None:
            chunk_pixels = DEFAULT_CHUNK_PIXELS_CUDA if self.device.type == "cuda" else DEFAULT_CHUNK_PIXELS_CPU
        if int(chunk_pixels) < 1:
            raise InvalidOptionError(f"chunk_pixels: expected a positive integer, got {chunk_pixels!r}")
        self.chunk_pixels = int(chunk_pixels)
        acc_dtype, weight_dtype = self._internal_types()
        n_voxels = dims[0] * dims[1] * dims[2]
        self._n_voxels = n_voxels
        # Flat buffers with _TRASH_SLOTS spare voxels after the grid: linear corners that must not
        # count go there instead of being compacted away (spread over slots: no atomic hot spot).
        self._acc_flat = torch.zeros((n_voxels + _TRASH_SLOTS) * self.n_channels, dtype=acc_dtype, device=self.device)
        self._weight_flat = torch.zeros(n_voxels + _TRASH_SLOTS, dtype=weight_dtype, device=self.device)
        self.acc = self._acc_flat[: n_voxels * self.n_channels].view(dims + (self.n_channels,))
        self.weight = self._weight_flat[:n_voxels].view(dims)
        if self._float_max:
            self.acc.fill_(-float("inf"))  # "no value yet": any pixel value is larger
        self._stamp = None  # latest: int32 serial number of the winning pixel per voxel
        self._stamp_base = 0
        self._stamp_limit = _STAMP_LIMIT
        self._pixel_cache_key = None
        self._pixel_cache: dict = {}
        self._size_f64 = torch.tensor([dims[2], dims[1], dims[0]], dtype=torch.float64, device=self.device)  # i, j, k

    # -- types ---------------------------------------------------------------------------------
    @property
    def _float_max(self) -> bool:
        return self.mode == MODE_MAX and self.frame_dtype == np.float32

    @property
    def _mean_like(self) -> bool:
        return self.mode in (MODE_MEAN, MODE_IMPORTANCE)

    def _internal_types(self):
        torch = self._torch
        if self.mode in (MODE_MAX, MODE_LATEST):
            acc = torch.uint8 if self.frame_dtype == np.uint8 else torch.float32
        elif self.mode == MODE_MEAN and not self.linear and self.frame_dtype == np.uint8:
            acc = torch.int64
        else:
            acc = torch.float64
        counts = not self.linear and self.mode != MODE_IMPORTANCE
        return acc, (torch.int64 if counts else torch.float64)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device by the persistent buffers."""
        total = self.acc.numel() * self.acc.element_size() + self.weight.numel() * self.weight.element_size()
        if self._stamp is not None:
            total += self._stamp.numel() * self._stamp.element_size()
        return int(total)

    def __repr__(self) -> str:
        return (
            f"TorchAccumulators(shape={self.shape}, n_channels={self.n_channels}, mode={_MODE_NAMES[self.mode]}, "
            f"linear={self.linear}, frame_dtype={self.frame_dtype}, device={self.device})"
        )

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_numpy(cls, acc: np.ndarray, weight: np.ndarray, *, mode: int, linear: bool, frame_dtype,
                   device=None, chunk_pixels: int | None = None) -> "TorchAccumulators":
        """Accumulators holding the numba path's buffers (e.g. to go on after a grid grew).

        Parameters
        ----------
        acc : (n_k, n_j, n_i, n_channels)
            Types of :func:`.kernels.accumulator_types`, or float64 (widened).
        weight : (n_k, n_j, n_i)
        mode, linear, frame_dtype, device, chunk_pixels
            As for the constructor.

        Raises
        ------
        InvalidOptionError
            ``acc`` is not 4-D or ``weight`` does not match its grid.
        """
        acc = np.asarray(acc)
        weight = np.asarray(weight)
        if acc.ndim != 4:
            raise InvalidOptionError(f"acc: expected (n_k, n_j, n_i, n_channels), got shape {acc.shape}")
        if weight.shape != acc.shape[:3]:
            raise InvalidOptionError(f"weight: expected shape {acc.shape[:3]} (the grid of acc), got {weight.shape}")
        out = cls(acc.shape[:3], acc.shape[3], mode=mode, linear=linear, frame_dtype=frame_dtype, device=device,
                  chunk_pixels=chunk_pixels)
        torch = out._torch
        out.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight).astype(_numpy_type(out.weight.dtype))))
        values = np.ascontiguousarray(acc).astype(_numpy_type(out.acc.dtype))
        out.acc.copy_(torch.from_numpy(values))
        if out._float_max:
            out.acc[out.weight == 0] = -float("inf")
        return out

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """The accumulators as numpy arrays in the numba path's types.

        Returns
        -------
        acc : (n_k, n_j, n_i, n_channels)
            :func:`.kernels.accumulator_types`' ``acc`` type (uint32 / float64 sums, the
            values for max/latest; 0 where no pixel went).
        weight : (n_k, n_j, n_i)
            uint32 counts, float32 (linear max/latest) or float64 weights.

        Notes
        -----
        Where a uint32 buffer could not hold a voxel exactly (more than 16,843,009 uint8 pixels
        summed, or 2**32 - 1 counted), both buffers (mean) or the weight (max/latest) come back
        as float64, as :class:`~.reconstructor.IncrementalReconstructor` widens them.
        """
        acc_dtype, weight_dtype, _ = accumulator_types(self.mode, self.linear, self.frame_dtype)
        acc = self.acc.detach().cpu().numpy()
        weight = self.weight.detach().cpu().numpy()
        if self._float_max:
            acc = np.where(weight[..., None] == 0, np.float32(0.0), acc)
        too_big = acc.size and (acc.max() > _UINT32_MAX or weight.max() > COUNT_LIMIT)
        if acc_dtype == np.uint32 and too_big:
            log.info("sums exceed uint32: returning float64 accumulators")
            acc_dtype, weight_dtype = np.dtype(np.float64), np.dtype(np.float64)
        elif weight_dtype == np.uint32 and weight.size and weight.max() > COUNT_LIMIT:
            log.info("counts exceed uint32: returning a float64 weight")
            weight_dtype = np.dtype(np.float64)
        return acc.astype(acc_dtype, copy=False), weight.astype(weight_dtype, copy=False)

    # -- insertion -----------------------------------------------------------------------------
    def insert_frames(
        self,
        frames,
        frame_ids,
        matrices,
        row_ranges,
        mask_ids,
        *,
        mode: int | None = None,
        linear: bool | None = None,
        importance=None,
        pixel_rejection_threshold: float | None = None,
        fixed_point: bool = False,
    ) -> np.ndarray:
        """Insert frames into the accumulators and count the pixels each frame added.

        Same meaning as :func:`.kernels.insert_frames` (without the threading arguments).

        Parameters
        ----------
        frames : (n_all, n_rows, n_cols, n_channels) uint8 or float32, numpy array or tensor
            The type given to the constructor (``frame_dtype``), MF pixels.
        frame_ids : (n,) int
            Which frames to insert, in this order.
        matrices : (n, 3, 3) float64
            Pixel (x, y, 1) -> continuous voxel index (i, j, k) of each inserted frame
            (:func:`.kernels.voxel_matrices`).
        row_ranges : (n_masks, n_rows, 4) int
            Kept pixels per row (:mod:`.masks`).
        mask_ids : (n,) int
            Which ``row_ranges`` entry each inserted frame uses.
        mode, linear : optional
            Must match the constructor's when given (the accumulator types depend on them).
        importance : (n_rows, n_cols) float32, optional
            Per-pixel weights, required for ``MODE_IMPORTANCE`` (pixels with weight <= 0 are
            skipped).
        pixel_rejection_threshold : float, optional
            Pixels whose channel sum is below ``threshold * n_channels`` are skipped.
        fixed_point : bool
            PLUS's fixed-point arithmetic: not supported here (raises when True).

        Returns
        -------
        (n,) int64 : pixels inserted per frame.

        Raises
        ------
        InvalidOptionError
            Inconsistent inputs (the message names the argument, the expected and the actual
            value), ``MODE_MEAN_PLUS`` or ``fixed_point``.
        """
        torch = self._torch
        if fixed_point:
            raise InvalidOptionError(
                "fixed_point: PLUS's fixed-point arithmetic (emulate_plus=True) is not supported by the torch "
                "engine; use engine='numba'"
            )
        if mode is not None and _check_mode(mode) != self.mode:
            raise InvalidOptionError(
                f"mode: these accumulators were made for {_MODE_NAMES[self.mode]}, got {_MODE_NAMES[int(mode)]}"
            )
        if linear is not None and bool(linear) != self.linear:
            raise InvalidOptionError(f"linear: these accumulators were made for linear={self.linear}, got {linear}")
        frames = self._check_frames(frames)
        n_all, n_rows, n_cols, _ = frames.shape
        frame_ids = _int_vector(frame_ids, "frame_ids")
        n = frame_ids.size
        matrices = np.asarray(matrices, dtype=np.float64)
        if matrices.shape != (n, 3, 3):
            raise InvalidOptionError(f"matrices: expected shape ({n}, 3, 3) for {n} frame_ids, got {matrices.shape}")
        mask_ids = _int_vector(mask_ids, "mask_ids")
        if mask_ids.size != n:
            raise InvalidOptionError(f"mask_ids: expected {n} entries (one per frame_id), got {mask_ids.size}")
        row_ranges = np.asarray(row_ranges)
        if row_ranges.ndim != 3 or row_ranges.shape[1:] != (n_rows, 4):
            raise InvalidOptionError(
                f"row_ranges: expected shape (n_masks, {n_rows}, 4) for {n_rows}-row frames, got {row_ranges.shape}"
            )
        if n and (frame_ids.min() < 0 or frame_ids.max() >= n_all):
            raise InvalidOptionError(
                f"frame_ids: expected values in 0..{n_all - 1}, got {frame_ids.min()}..{frame_ids.max()}"
            )
        if n and (mask_ids.min() < 0 or mask_ids.max() >= row_ranges.shape[0]):
            raise InvalidOptionError(
                f"mask_ids: expected values in 0..{row_ranges.shape[0] - 1}, got {mask_ids.min()}..{mask_ids.max()}"
            )
        imp = None
        if self.mode == MODE_IMPORTANCE:
            if importance is None:
                raise InvalidOptionError("importance: MODE_IMPORTANCE needs an (n_rows, n_cols) weight image, got None")
            importance = np.asarray(importance, dtype=np.float32)
            if importance.shape != (n_rows, n_cols):
                raise InvalidOptionError(f"importance: expected shape ({n_rows}, {n_cols}), got {importance.shape}")
            imp = torch.from_numpy(np.ascontiguousarray(importance).reshape(-1)).to(self.device, torch.float64)
        reject = None if pixel_rejection_threshold is None else float(pixel_rejection_threshold)
        counts = np.zeros(n, dtype=np.int64)
        if n == 0:
            return counts
        pixels = self._kept_pixels(row_ranges, n_cols)
        kept = np.array([pixels[int(m)][0].numel() for m in range(row_ranges.shape[0])], dtype=np.int64)[mask_ids]
        mats = torch.from_numpy(np.ascontiguousarray(matrices)).to(self.device)
        start = 0
        while start < n:
            stop = start + 1  # at least one frame per chunk
            total = int(kept[start])
            while stop < n and total + kept[stop] <= self.chunk_pixels:
                total += int(kept[stop])
                stop += 1
            chunk = self._frames_chunk(frames, frame_ids[start:stop])
            serial0 = self._next_serials((stop - start) * n_rows * n_cols)
            for m in np.unique(mask_ids[start:stop]):
                local = np.flatnonzero(mask_ids[start:stop] == m)
                if pixels[int(m)][0].numel() == 0:
                    continue
                sel = torch.from_numpy(local).to(self.device)
                got = self._insert_group(chunk.index_select(0, sel), mats[start:stop].index_select(0, sel),
                                         pixels[int(m)], imp, reject, serial0, sel, n_rows * n_cols)
                counts[start + local] = got.cpu().numpy()
            start = stop
        return counts

    # -- helpers -------------------------------------------------------------------------------
    def _check_frames(self, frames):
        torch = self._torch
        if isinstance(frames, torch.Tensor):
            dtype = _numpy_type(frames.dtype)
        else:
            frames = np.asarray(frames)
            dtype = frames.dtype
        if frames.ndim != 4:
            raise InvalidOptionError(
                f"frames: expected (n_all, n_rows, n_cols, n_channels), got shape {tuple(frames.shape)}"
            )
        if dtype != self.frame_dtype:
            raise InvalidOptionError(f"frames: expected {self.frame_dtype} (frame_dtype), got {dtype}")
        if frames.shape[3] != self.n_channels:
            raise InvalidOptionError(f"frames: expected {self.n_channels} channel(s), got {frames.shape[3]}")
        return frames

    def _frames_chunk(self, frames, ids: np.ndarray):
        """``(len(ids), n_rows, n_cols, n_channels)`` tensor of ``frames[ids]`` on the device."""
        torch = self._torch
        if isinstance(frames, torch.Tensor):
            index = torch.from_numpy(ids).to(frames.device)
            return frames.index_select(0, index).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(frames[ids])).to(self.device)

    def _kept_pixels(self, row_ranges: np.ndarray, n_cols: int) -> list:
        """Per mask: (flat pixel index int64, x float64, y float64) tensors, row-major order (cached)."""
        torch = self._torch
        ranges = np.ascontiguousarray(row_ranges, dtype=np.int64)
        key = (ranges.shape, n_cols, hashlib.sha1(ranges.tobytes()).hexdigest())
        if key != self._pixel_cache_key:
            self._pixel_cache_key = key
            self._pixel_cache = {}
            x = np.arange(n_cols)[None, :]
            for m in range(ranges.shape[0]):
                r = ranges[m]
                keep = (x >= r[:, 0:1]) & (x <= r[:, 1:2]) & ~((x >= r[:, 2:3]) & (x <= r[:, 3:4]))
                flat = np.flatnonzero(keep)
                t = torch.from_numpy(flat).to(self.device)
                self._pixel_cache[m] = (
                    t,
                    torch.from_numpy((flat % n_cols).astype(np.float64)).to(self.device),
                    torch.from_numpy((flat // n_cols).astype(np.float64)).to(self.device),
                )
        return [self._pixel_cache[m] for m in range(ranges.shape[0])]

    def _next_serials(self, count: int) -> int:
        """First serial number of the next ``count`` pixels (``latest``); restarts the stamps when needed."""
        if self.mode != MODE_LATEST:
            return 0
        torch = self._torch
        if self._stamp is None:
            self._stamp = torch.full((self._n_voxels + _TRASH_SLOTS,), -1, dtype=torch.int32, device=self.device)
            self._stamp_base = 0
        if self._stamp_base + count > self._stamp_limit:
            # Only the order within a chunk matters once its winners are written: start over.
            self._stamp.fill_(-1)
            self._stamp_base = 0
        if count > self._stamp_limit:
            raise ReconstructionError(f"a chunk of {count} pixels exceeds the {self._stamp_limit} serial numbers")
        first = self._stamp_base
        self._stamp_base += count
        return first

    def _positions(self, mats, xs, ys):
        """``(m[:, a, 2] + y * m[:, a, 1]) + x * m[:, a, 0]`` for a = i, j, k: (3, G, K) float64.

        The numba kernel's operations in its order (separate multiplies and adds), so the
        positions are bit-identical to its positions.
        """
        m = mats.permute(1, 0, 2)  # (3, G, 3): [axis, frame, (x, y, 1) column]
        pos = ys[None, None, :] * m[:, :, 1, None]
        pos.add_(m[:, :, 2, None])
        pos.add_(xs[None, None, :] * m[:, :, 0, None])
        return pos

    def _insert_group(self, frames, mats, pixels, imp, reject, serial0, positions, frame_size):
        """Insert G frames sharing one mask; return (G,) int64 counts (a tensor)."""
        torch = self._torch
        flat, xs, ys = pixels
        g, n_rows, n_cols, nc = frames.shape
        k = flat.numel()
        nk, nj, ni = self.shape
        size = self._size_f64[:, None, None]
        pos = self._positions(mats, xs, ys)  # (3, G, K)
        if self.linear:
            corner = pos.floor()  # lower corner
            keep = ((corner >= -1.0) & (corner < size)).all(dim=0)  # some corner may be inside
        else:
            corner = pos.add_(0.5).floor_()  # the nearest voxel
            keep = ((corner >= 0.0) & (corner < size)).all(dim=0)  # (G, K)
        values = frames.reshape(g, n_rows * n_cols, nc).index_select(1, flat)  # (G, K, C)
        if reject is not None:
            s = values[..., 0].to(torch.float64)
            for c in range(1, nc):
                s = s + values[..., c].to(torch.float64)
            keep &= ~(s < reject * nc)
            del s
        w_scale = None
        if imp is not None:
            scale = imp.index_select(0, flat)  # (K,) float64
            keep &= ~(scale <= 0.0)[None, :]
            w_scale = scale[None, :].expand(g, k)
        counts = keep.sum(dim=1)
        sel = keep.reshape(-1).nonzero().squeeze(1)  # kept pixels in (frame, row, column) order
        if sel.numel() == 0:
            return counts
        v = values.reshape(g * k, nc).index_select(0, sel)  # (P, C)
        del values
        if w_scale is not None:
            w_scale = w_scale.reshape(-1).index_select(0, sel)
        serial = None
        if self.mode == MODE_LATEST:
            serial = (positions[:, None] * frame_size + flat[None, :] + serial0).to(torch.int32)
            serial = serial.reshape(-1).index_select(0, sel)
        voxel = (corner[2] * nj + corner[1]).mul_(ni).add_(corner[0])  # (G, K), exact in float64
        voxel = voxel.reshape(-1).index_select(0, sel).to(torch.int64)
        if self.linear:
            frac = (pos - corner).reshape(3, -1).index_select(1, sel)  # (3, P)
            lower = corner.reshape(3, -1).index_select(1, sel)
            del pos, corner
            return self._splat_linear(v, voxel, lower, frac, w_scale, serial, keep, sel)
        del pos, corner
        if self.mode == MODE_LATEST:
            self._write_latest(voxel, v, serial)
        elif self.mode == MODE_MAX:
            self._scatter_max(voxel, v)
        elif w_scale is not None:
            self._scatter_sum(voxel, v.to(torch.float64) * w_scale[:, None])
            self.weight.view(-1).scatter_add_(0, voxel, w_scale)
            return counts
        else:
            self._scatter_sum(voxel, v.to(self.acc.dtype))
        self.weight.view(-1).scatter_add_(0, voxel, torch.ones_like(voxel))
        return counts

    def _splat_linear(self, v, base, lower, frac, w_scale, serial, keep, sel):
        """Trilinear splat of P kept pixels (corners that must not act go to the trash slots).

        ``base`` (P,) int64 flat index of the lower corner (may lie outside the grid),
        ``lower`` (3, P) float64 lower corner (i, j, k), ``frac`` (3, P) its offsets t in [0, 1).
        Returns the (G,) counts: pixels with at least one usable corner.
        """
        torch = self._torch
        nk, nj, ni = self.shape
        size = self._size_f64[:, None]
        # weights (1 - t, t) per axis, zeroed where that corner is outside the grid (a zero
        # weight is never used: mean skips it, max/latest need >= 1/8)
        wt = torch.stack([1.0 - frac, frac], dim=2)  # (3, P, 2)
        wt[:, :, 0].masked_fill_((lower < 0) | (lower >= size), 0.0)
        wt[:, :, 1].masked_fill_((lower < -1) | (lower >= size - 1), 0.0)
        del frac, lower
        # corners in the kernel's order q = 4 dk + 2 dj + di, w = wx * (wy * wz) as in the kernel
        wyz = wt[1, :, None, :] * wt[2, :, :, None]  # (P, dk, dj) = wy * wz
        w = (wt[0, :, None, None, :] * wyz[:, :, :, None]).reshape(-1, 8)  # (P, 8)
        del wt, wyz
        ok = (w != 0.0) if self._mean_like else (w >= _MIN_LINEAR_WEIGHT)
        used = torch.zeros(keep.numel(), dtype=torch.int64, device=self.device)
        used.index_copy_(0, sel, ok.any(dim=1).to(torch.int64))
        counts = used.view(keep.shape).sum(dim=1)
        del used
        offsets = torch.tensor(
            [dk * nj * ni + dj * ni + di for dk in range(2) for dj in range(2) for di in range(2)],
            dtype=torch.int64, device=self.device,
        )
        voxel = base[:, None] + offsets[None, :]  # (P, 8): pixel-major, corners in the kernel's order
        voxel = torch.where(ok, voxel, (voxel & (_TRASH_SLOTS - 1)) + self._n_voxels).reshape(-1)
        del ok, base
        if w_scale is not None:
            w = w * w_scale[:, None]
        weight = w.reshape(-1)
        del w
        if self.mode == MODE_LATEST:
            self._write_latest(voxel, v[:, None, :].expand(-1, 8, -1).reshape(-1, v.shape[1]),
                               serial[:, None].expand(-1, 8).reshape(-1))
        elif self.mode == MODE_MAX:
            self._scatter_max(voxel, v[:, None, :].expand(-1, 8, -1).reshape(-1, v.shape[1]))
        else:
            self._scatter_sum(voxel, (v.to(torch.float64)[:, None, :] * weight.view(-1, 8, 1)).reshape(-1, v.shape[1]))
        self._weight_flat.scatter_add_(0, voxel, weight)
        return counts

    def _channel_index(self, voxel, c: int):
        return voxel if self.n_channels == 1 else voxel * self.n_channels + c

    def _scatter_sum(self, voxel, v):
        acc = self._acc_flat
        for c in range(self.n_channels):
            acc.scatter_add_(0, self._channel_index(voxel, c), v[:, c].contiguous())

    def _scatter_max(self, voxel, v):
        acc = self._acc_flat
        for c in range(self.n_channels):
            acc.scatter_reduce_(0, self._channel_index(voxel, c), v[:, c].contiguous(), "amax", include_self=True)

    def _write_latest(self, voxel, v, serial):
        """The pixel with the largest serial number per voxel writes its value (one writer per voxel)."""
        self._stamp.scatter_reduce_(0, voxel, serial, "amax", include_self=True)
        win = self._stamp.index_select(0, voxel) == serial
        self._acc_flat.view(-1, self.n_channels)[voxel[win]] = v[win]


def _int_vector(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidOptionError(f"{name}: expected a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _numpy_type(torch_dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (``torch.empty(0, dtype=...).numpy()`` without a tensor)."""
    import torch

    return np.dtype(torch.empty(0, dtype=torch_dtype).numpy().dtype)

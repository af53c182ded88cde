"""The insertion engines behind one interface, and the one place that chooses between them.

Two back ends paste frames into the accumulation buffers of
:class:`~.reconstructor.IncrementalReconstructor`: the numba kernels (:mod:`.kernels`: CPU,
threads over slabs of planes, and the only one with PLUS's fixed-point arithmetic) and the torch
engine (:mod:`.torch_engine`: a CUDA GPU, on device copies of the buffers). Within the numba
engine, PLUS's fixed-point insertion runs on the C library of :mod:`.native` when it is built
(bit-identical, and a process that uses only it never imports numba). The reconstructor
asks :func:`choose_engine` which to use and talks to either through :func:`open_insertion`:

>>> insertion = open_insertion("numba", acc, weight, mode=MODE_MEAN, linear=True)   # doctest: +SKIP
>>> counts = insertion.insert(frames, ids, voxel_matrices, row_ranges, mask_ids)      # doctest: +SKIP
>>> acc, weight = insertion.finish()                                                  # doctest: +SKIP

``insert`` takes frames ``(n, rows, cols, channels)`` with the ids of the ones to paste,
ImageToVoxel matrices ``(len(ids), 3, 3)`` (pixel -> voxel index, the reconstructor's
:func:`~.kernels.voxel_matrices`), the pixel masks' row ranges and each frame's mask id, and
returns how many pixels each frame added. ``finish`` returns the buffers in the numba layout
(for the torch engine: copied back from the device), so grid growth and results are shared.
"""

from __future__ import annotations

import numpy as np

from . import native

__all__ = ["choose_engine", "open_insertion", "NativeInsertion", "NumbaInsertion", "TorchInsertion"]


def choose_engine(options) -> str:
    """``"numba"`` or ``"torch"`` for :class:`~.config.ReconstructionOptions` ``options``.

    PLUS emulation (``emulate_plus``: fixed point, saturating 16-bit weights) exists in the
    numba kernels only; otherwise :func:`~.torch_engine.resolve_engine` decides from
    ``options.engine`` (``auto``: torch on a working CUDA GPU, else numba).
    """
    if options.emulate_plus:
        return "numba"
    from .torch_engine import resolve_engine

    return resolve_engine(options.engine)


class NumbaInsertion:
    """The numba kernels (:func:`~.kernels.insert_frames`) on the reconstructor's own buffers."""

    engine = "numba"

    def __init__(self, acc, weight, *, mode, linear, n_threads=1, executor=None, fixed_point=False,
                 unoptimized=False):
        self.acc, self.weight = acc, weight
        self._options = dict(mode=mode, linear=linear, n_threads=n_threads, executor=executor,
                             fixed_point=fixed_point, unoptimized=unoptimized)

    def insert(self, frames, frame_ids, matrices, row_ranges, mask_ids, *, importance=None,
               pixel_rejection_threshold=None) -> np.ndarray:
        from .kernels import insert_frames

        return insert_frames(frames, frame_ids, matrices, row_ranges, mask_ids, self.acc, self.weight,
                             importance=importance, pixel_rejection_threshold=pixel_rejection_threshold,
                             **self._options)

    def finish(self):
        return self.acc, self.weight


class NativeInsertion:
    """PLUS's fixed-point insertion on the C kernels (:func:`.native.insert_per_pixel_native`)."""

    engine = "native"

    def __init__(self, acc, weight, *, mode, linear, n_threads=1, executor=None):
        self.acc, self.weight = acc, weight
        self._options = dict(mode=mode, linear=linear, n_threads=n_threads, executor=executor)

    def insert(self, frames, frame_ids, matrices, row_ranges, mask_ids, *, importance=None,
               pixel_rejection_threshold=None) -> np.ndarray:
        use_reject = pixel_rejection_threshold is not None
        reject = float(pixel_rejection_threshold) if use_reject else 0.0
        o = self._options
        return native.insert_per_pixel_native(frames, frame_ids, matrices, row_ranges, mask_ids, self.acc, self.weight,
                                              o["mode"], o["linear"], use_reject, reject, o["n_threads"],
                                              o["executor"])

    def finish(self):
        return self.acc, self.weight


class TorchInsertion:
    """The torch engine on device copies of the buffers (64-bit sums and counts, no overflow)."""

    engine = "torch"

    def __init__(self, acc, weight, *, mode, linear, frame_dtype):
        from .torch_engine import TorchAccumulators

        self._accumulators = TorchAccumulators.from_numpy(acc, weight, mode=mode, linear=linear,
                                                          frame_dtype=frame_dtype)

    def insert(self, frames, frame_ids, matrices, row_ranges, mask_ids, *, importance=None,
               pixel_rejection_threshold=None) -> np.ndarray:
        return self._accumulators.insert_frames(frames, frame_ids, matrices, row_ranges, mask_ids,
                                                importance=importance,
                                                pixel_rejection_threshold=pixel_rejection_threshold)

    def finish(self):
        return self._accumulators.to_numpy()


def open_insertion(engine: str, acc, weight, *, mode, linear, frame_dtype=np.uint8, n_threads=1, executor=None,
                   fixed_point=False, unoptimized=False):
    """A :class:`NumbaInsertion`, :class:`NativeInsertion` or :class:`TorchInsertion`.

    ``engine`` comes from :func:`choose_engine`. ``fixed_point``/``unoptimized`` (PLUS
    emulation) are numba's only; for ``"numba"`` with ``fixed_point``, the C kernels take the
    insertion when :func:`.native.available` and :func:`.native.supports` say so
    (``FREEHANDUS_KERNELS=numba`` keeps numba; ``=native`` makes a missing library an error).
    ``n_threads``/``executor`` are ignored by torch.
    """
    if engine == "torch":
        if fixed_point or unoptimized:
            raise ValueError("PLUS emulation runs on the numba engine only (choose_engine picks it)")
        return TorchInsertion(acc, weight, mode=mode, linear=linear, frame_dtype=frame_dtype)
    if engine != "numba":
        raise ValueError(f"unknown insertion engine {engine!r}")
    if fixed_point and native.supports(mode=mode, fixed_point=fixed_point, unoptimized=unoptimized,
                                       frame_dtype=frame_dtype, acc=acc, weight=weight):
        native.require()
        if native.available():
            return NativeInsertion(acc, weight, mode=mode, linear=linear, n_threads=n_threads, executor=executor)
    return NumbaInsertion(acc, weight, mode=mode, linear=linear, n_threads=n_threads, executor=executor,
                          fixed_point=fixed_point, unoptimized=unoptimized)

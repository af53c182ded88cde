"""The insertion engines behind one interface, and the one place that chooses between them.

Two back ends paste frames into the accumulation buffers of
:class:`~.reconstructor.IncrementalReconstructor`: the numba kernels (:mod:`.kernels`: CPU,
threads over slabs of planes, and the only one with PLUS's fixed-point arithmetic) and the torch
engine (:mod:`.torch_engine`: a CUDA GPU, on device copies of the buffers). The reconstructor
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

from .kernels import insert_frames
from .torch_engine import TorchAccumulators, resolve_engine

__all__ = ["choose_engine", "open_insertion", "NumbaInsertion", "TorchInsertion"]


def choose_engine(options) -> str:
    """``"numba"`` or ``"torch"`` for :class:`~.config.ReconstructionOptions` ``options``.

    PLUS emulation (``emulate_plus``: fixed point, saturating 16-bit weights) exists in the
    numba kernels only; otherwise :func:`~.torch_engine.resolve_engine` decides from
    ``options.engine`` (``auto``: torch on a working CUDA GPU, else numba).
    """
    return "numba" if options.emulate_plus else resolve_engine(options.engine)


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
        return insert_frames(frames, frame_ids, matrices, row_ranges, mask_ids, self.acc, self.weight,
                             importance=importance, pixel_rejection_threshold=pixel_rejection_threshold,
                             **self._options)

    def finish(self):
        return self.acc, self.weight


class TorchInsertion:
    """The torch engine on device copies of the buffers (64-bit sums and counts, no overflow)."""

    engine = "torch"

    def __init__(self, acc, weight, *, mode, linear, frame_dtype):
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
    """A :class:`NumbaInsertion` or :class:`TorchInsertion` (``engine`` from :func:`choose_engine`).

    ``fixed_point``/``unoptimized`` (PLUS emulation) are numba's only; ``n_threads``/``executor``
    are ignored by torch.
    """
    if engine == "torch":
        if fixed_point or unoptimized:
            raise ValueError("PLUS emulation runs on the numba engine only (choose_engine picks it)")
        return TorchInsertion(acc, weight, mode=mode, linear=linear, frame_dtype=frame_dtype)
    if engine != "numba":
        raise ValueError(f"unknown insertion engine {engine!r}")
    return NumbaInsertion(acc, weight, mode=mode, linear=linear, n_threads=n_threads, executor=executor,
                          fixed_point=fixed_point, unoptimized=unoptimized)

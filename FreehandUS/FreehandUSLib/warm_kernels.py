"""Compile the reconstruction kernels in a separate process, before the first reconstruction needs them.

numba compiles the reconstruction kernels the first time they run after an installation (about
5 s for the default options, more over all of them) and keeps them in its on-disk cache
(``cache=True``). In 3D Slicer that first compile would block the GUI, with no progress and no
way to cancel; the Freehand US module therefore runs ``python -m FreehandUSLib.warm_kernels``
with Slicer's Python in the background when it opens (:class:`FreehandUSLib.jobs.ProcessJob`):
a tiny synthetic sweep is reconstructed with every interpolation, the mean/max/latest
compounding and hole filling on and off, which fills the cache; Slicer's own process then loads
the compiled kernels from it. When the cache is warm already the run takes about a second.

Lines written to standard output (JSON): ``{"event": "started", "variants": 12}``,
``{"event": "progress", "done": 3, "total": 12}`` after every variant, ``{"event": "done",
"seconds": 41.2}``; ``{"event": "error", "message": "..."}`` and exit status 1 on failure.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

__all__ = ["VARIANTS", "warm", "main"]

#: (interpolation, compounding, fill_holes) reconstructed once each.
VARIANTS = tuple(
    (interpolation, compounding, fill)
    for interpolation in ("nearest", "linear")
    for compounding in ("mean", "max", "latest")
    for fill in (False, True)
)


def _tiny_sweep():
    from .sequence import TrackedSequence

    n, rows, cols = 6, 24, 20
    rng = np.random.default_rng(0)
    mats = np.tile(np.eye(4), (n, 1, 1))
    mats[:, 0, 0] = mats[:, 1, 1] = 0.5
    mats[:, 2, 3] = 0.7 * np.arange(n)
    mats[:, 0, 3] = 0.2 * np.arange(n)
    return TrackedSequence(
        frames=rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8),
        timestamps_s=0.05 * np.arange(n),
        transforms={"ImageToReference": (mats, np.ones(n, dtype=bool))},
    )


def warm(progress=None) -> int:
    """Reconstruct a tiny sweep with each of :data:`VARIANTS`; returns how many ran.

    Parameters
    ----------
    progress : callable(done, total), optional
    """
    from .reconstruction import ReconstructionOptions, reconstruct_volume
    from .reconstruction.cli import DEFAULT_HOLE_FILLING

    sweep = _tiny_sweep()
    for i, (interpolation, compounding, fill) in enumerate(VARIANTS):
        options = ReconstructionOptions(
            output_spacing_mm=0.5,
            interpolation=interpolation,
            compounding=compounding,
            fill_holes=fill,
            hole_filling=DEFAULT_HOLE_FILLING if fill else (),
            image_to_reference_transform="ImageToReference",
        )
        reconstruct_volume(sweep, None, options)
        if progress is not None:
            progress(i + 1, len(VARIANTS))
    return len(VARIANTS)


def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    """``python -m FreehandUSLib.warm_kernels``: compile (or load) every kernel variant, JSON lines out."""
    started = time.perf_counter()
    _emit(event="started", variants=len(VARIANTS))
    try:
        warm(lambda done, total: _emit(event="progress", done=done, total=total))
    except Exception as exc:  # noqa: BLE001  (one line for the panel; the traceback goes to stderr)
        import traceback

        traceback.print_exc()
        _emit(event="error", message=f"{type(exc).__name__}: {exc}")
        return 1
    _emit(event="done", seconds=round(time.perf_counter() - started, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

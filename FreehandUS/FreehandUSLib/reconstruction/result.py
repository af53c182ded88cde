"""The result of a reconstruction: the volumes and what went into them.

:class:`ReconstructionResult` is what :func:`~.reconstructor.reconstruct_volume` and
:meth:`~.reconstructor.IncrementalReconstructor.result` return; :data:`SKIP_REASONS` names why
a frame did not go into the volume.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..volume import Volume
from .config import ReconstructionOptions
from .geometry import OutputGrid
from .holefill_common import HoleFillingStats

__all__ = ["SKIP_REASONS", "ReconstructionResult"]

#: Why a frame did not go into the volume.
SKIP_REASONS = {
    "invalid_transform": "ImageToReference is invalid or not finite for this frame",
    "no_image": "the frame carries no image (ImageStatus not OK)",
    "empty_image": "no bright fan sector found (automatic fan-angle detection)",
    "outside_volume": "no pixel of the frame falls inside the output volume",
    "no_pixels_kept": "every pixel inside the volume was masked or rejected",
    "skip_interval": "left out by skip_interval",
    "over_memory_budget": "growing the volume to include the frame would exceed the memory budget",
    "dropped_behind": "dropped: the reconstruction was falling behind the live stream",
}


@dataclass(frozen=True, eq=False)
class ReconstructionResult:
    """A reconstructed volume (one per channel) and what went into it.

    Attributes
    ----------
    volumes : tuple of Volume
        One volume per image channel, voxels ``(n_k, n_j, n_i)``, uint8 or float32 like the
        input channel, Reference frame (mm), geometry of :attr:`grid`.
    channel_names : tuple of str
    weight : Volume or None
        Accumulated insertion weight per voxel, float32 (number of pixels for nearest
        interpolation): the coverage map.
    grid : OutputGrid
    frames_total : int
        Frames offered.
    frames_used : int
        Frames that put at least one pixel into the volume.
    frames_skipped : dict frame index -> reason key (see :data:`SKIP_REASONS`)
    frames_dropped : int
        Live mode: frames dropped because the reconstruction fell behind (also in
        ``frames_skipped`` with reason ``dropped_behind``).
    pixels_inserted : int
    coverage_fraction : float
        Fraction of voxels that received pixels.
    filled_fraction : float
        Fraction of voxels holding a value after hole filling.
    seconds : float
        Wall time of the whole reconstruction (insertion + hole filling + output).
    insertion_seconds, hole_filling_seconds : float
    hole_filling : HoleFillingStats or None
    options : ReconstructionOptions
    """

    volumes: tuple
    channel_names: tuple
    weight: Volume | None
    grid: OutputGrid
    frames_total: int
    frames_used: int
    frames_skipped: dict
    frames_dropped: int
    pixels_inserted: int
    coverage_fraction: float
    filled_fraction: float
    seconds: float
    insertion_seconds: float
    hole_filling_seconds: float
    hole_filling: HoleFillingStats | None
    options: ReconstructionOptions

    @property
    def volume(self) -> Volume:
        """The first channel's volume."""
        return self.volumes[0]

    @property
    def frames_per_second(self) -> float:
        """Frames used per second of total reconstruction time."""
        return self.frames_used / self.seconds if self.seconds > 0 else float("inf")

    @property
    def skipped_by_reason(self) -> dict:
        return dict(Counter(self.frames_skipped.values()))

    def to_dict(self) -> dict:
        """JSON-safe summary (what ``freehandus reconstruct --json`` prints)."""
        return {
            "frames_total": self.frames_total,
            "frames_used": self.frames_used,
            "frames_skipped": len(self.frames_skipped),
            "frames_skipped_by_reason": self.skipped_by_reason,
            "skipped_frames": [{"frame": int(i), "reason": r} for i, r in sorted(self.frames_skipped.items())],
            "frames_dropped": self.frames_dropped,
            "dimensions": list(self.grid.dims),
            "spacing": list(self.grid.spacing_mm),
            "origin": list(self.grid.origin_mm),
            "directions": self.grid.directions.tolist(),
            "channels": list(self.channel_names),
            "dtype": [str(v.voxels.dtype) for v in self.volumes],
            "pixels_inserted": self.pixels_inserted,
            "coverage_fraction": self.coverage_fraction,
            "filled_fraction": self.filled_fraction,
            "seconds": self.seconds,
            "insertion_seconds": self.insertion_seconds,
            "hole_filling_seconds": self.hole_filling_seconds,
            "frames_per_second": self.frames_per_second,
            "hole_filling": None if self.hole_filling is None else self.hole_filling.to_dict(),
            "interpolation": self.options.interpolation,
            "compounding": self.options.compounding,
        }

    def __str__(self) -> str:
        lines = [
            f"Reconstructed {self.grid}",
            f"  channels: {', '.join(f'{n} ({v.voxels.dtype})' for n, v in zip(self.channel_names, self.volumes))}",
            f"  frames: {self.frames_used} used of {self.frames_total}"
            + (f", {len(self.frames_skipped)} skipped" if self.frames_skipped else ""),
        ]
        for reason, count in sorted(self.skipped_by_reason.items()):
            lines.append(f"    {count} x {reason}: {SKIP_REASONS.get(reason, reason)}")
        lines.append(
            f"  {self.options.interpolation} / {self.options.compounding}; coverage {100 * self.coverage_fraction:.1f} %"
            f", filled {100 * self.filled_fraction:.1f} %"
        )
        lines.append(
            f"  {self.seconds:.3f} s ({self.frames_per_second:.1f} frames/s; insertion {self.insertion_seconds:.3f} s"
            f", hole filling {self.hole_filling_seconds:.3f} s)"
        )
        return "\n".join(lines)

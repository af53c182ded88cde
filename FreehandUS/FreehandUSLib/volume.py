"""A 3D image on a regular grid with its geometry in millimetres.

``voxels`` is indexed ``[k, j, i]`` (slowest to fastest, as ``slicer.util.arrayFromVolume``
returns it and as MetaImage/NRRD store it), shape ``(n_k, n_j, n_i)`` or
``(n_k, n_j, n_i, n_channels)``. The voxel ``(i, j, k)`` lies at
``origin_mm + directions @ (spacing_mm * (i, j, k))`` in the volume's world frame (for PLUS
reconstructions: the Reference frame, in mm; LPS/RAS does not enter here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import FreehandUSError

__all__ = ["Volume"]


@dataclass(eq=False)
class Volume:
    """Voxels plus spacing ``(si, sj, sk)`` mm, origin ``(x, y, z)`` mm and a 3x3 direction matrix
    whose columns are the i, j, k axes."""

    voxels: np.ndarray
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    directions: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.voxels = np.asarray(self.voxels)
        if self.voxels.ndim not in (3, 4):
            raise FreehandUSError(f"volume voxels must be (k, j, i[, c]), got shape {self.voxels.shape}")
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        self.origin_mm = tuple(float(v) for v in self.origin_mm)
        self.directions = np.asarray(self.directions, dtype=np.float64).reshape(3, 3)
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise FreehandUSError(f"volume spacing must be 3 positive values (mm), got {self.spacing_mm}")
        if len(self.origin_mm) != 3:
            raise FreehandUSError(f"volume origin must be 3 values (mm), got {self.origin_mm}")

    @property
    def dimensions(self) -> tuple[int, int, int]:
        """``(n_i, n_j, n_k)``: the MetaImage ``DimSize`` order."""
        k, j, i = self.voxels.shape[:3]
        return (int(i), int(j), int(k))

    @property
    def ijk_to_world(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices (i, j, k) to world mm."""
        m = np.eye(4)
        m[:3, :3] = self.directions * np.asarray(self.spacing_mm)[None, :]
        m[:3, 3] = self.origin_mm
        return m

    def __str__(self) -> str:
        return (
            f"Volume {self.dimensions} {self.voxels.dtype}, spacing {self.spacing_mm} mm, "
            f"origin {tuple(round(v, 4) for v in self.origin_mm)} mm"
        )

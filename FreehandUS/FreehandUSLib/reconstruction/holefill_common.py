"""What hole filling shares with the reconstructor, without numba (see :mod:`.holefill`).

The element kinds, how filled values are stored, the stick directions, the statistics record and
how far the elements reach; :mod:`.holefill`'s compiled kernels are imported only when holes
are filled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "hole_filling_reach",
    "HoleFillingStats",
    "STICK_DIRECTIONS",
    "STORE_RAW",
    "STORE_ROUND",
    "STORE_FLOOR",
]

_KIND = {"GAUSSIAN": 0, "GAUSSIAN_ACCUMULATION": 1, "DISTANCE_WEIGHT_INVERSE": 2, "NEAREST_NEIGHBOR": 3, "STICK": 4}
_STICK = 4
_NEAREST = 3
#: Memory per worker for the STICK distances towards higher k (a block of planes per sense).
_STICK_BLOCK_BYTES = 8 * 1024 * 1024

#: How filled values are stored: as computed (float output), rounded half up and clipped to
#: 0..255 (uint8 output), or truncated and clipped (uint8 output, PLUS emulation).
STORE_RAW, STORE_ROUND, STORE_FLOOR = 0, 1, 2

#: The 13 stick directions (di, dj, dk): axes, face diagonals, space diagonals (as PLUS).
STICK_DIRECTIONS = np.array(
    [
        (1, 0, 0), (0, 1, 0), (0, 0, 1),
        (1, 1, 0), (1, 0, 1), (0, 1, 1),
        (1, -1, 0), (1, 0, -1), (0, 1, -1),
        (1, 1, 1), (-1, 1, 1), (1, -1, 1), (-1, -1, 1),
    ],
    dtype=np.int64,
)


@dataclass(frozen=True)
class HoleFillingStats:
    """What hole filling did: holes before, filled per element, seconds."""

    holes: int
    filled_per_element: tuple
    seconds: float

    @property
    def filled(self) -> int:
        return int(sum(self.filled_per_element))

    def to_dict(self) -> dict:
        return {
            "holes": self.holes,
            "filled": self.filled,
            "filled_per_element": list(self.filled_per_element),
            "seconds": self.seconds,
        }


def hole_filling_reach(elements) -> int:
    """How many planes away (voxels along any axis) the elements read known voxels.

    Cube elements (GAUSSIAN, GAUSSIAN_ACCUMULATION, NEAREST_NEIGHBOR, DISTANCE_WEIGHT_INVERSE)
    reach ``size // 2``; a STICK reaches ``stick_length_limit - 1`` steps. Filling one plane
    needs the known voxels of the planes this far on either side.
    """
    reach = 0
    for e in elements:
        if _KIND[e.type] == _STICK:
            reach = max(reach, int(e.stick_length_limit) - 1)
        else:
            reach = max(reach, int(e.size) // 2)
    return reach


def _stick_tables(limit: int, emulate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stick weights ``(13, limit + 1)`` by direction and length, and the forward-end weights.

    ``weights[d, n] = 1 / (n * step_d)``; ``forward[f, r]`` weights the end ``f`` steps ahead
    given the other end ``r`` steps behind: ``r / (f + r)`` (linear interpolation), or PLUS's
    ``(r + 1) / (f + r + 1)`` when emulating.
    """
    weights = np.zeros((STICK_DIRECTIONS.shape[0], limit + 1))
    for d, (di, dj, dk) in enumerate(STICK_DIRECTIONS.tolist()):
        step = math.sqrt(di * di + dj * dj + dk * dk)
        for n in range(1, limit + 1):
            weights[d, n] = 1.0 / (n * step)
    forward = np.zeros((limit + 1, limit + 1))
    for f in range(1, limit + 1):
        for r in range(1, limit + 1):
            forward[f, r] = (r + 1.0) / (f + r + 1) if emulate else r / (f + r)
    return weights, forward

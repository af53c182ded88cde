"""The tracked ultrasound sequence: the one data model every FreehandUS part speaks.

A :class:`TrackedSequence` holds

- ``frames``: ``(n_frames, n_rows, n_cols)`` or ``(n_frames, n_rows, n_cols, n_channels)``,
  uint8 or float32, always in **MF** orientation in memory (i = column to the right = marked
  side left, j = row down = far from the transducer). Readers flip MN/UF/UN files to MF.
- ``timestamps_s``: ``(n_frames,)`` float64, seconds (tracker/PLUS clock).
- ``transforms``: name (``"ProbeToTracker"``, no ``Transform`` suffix) -> :class:`FrameTransforms`
  holding ``(n_frames, 4, 4)`` float64 matrices and a ``(n_frames,)`` bool validity mask.
  Invalid matrices are kept as they were read (PLUS writes them too) but never used.
- ``image_ok``: ``(n_frames,)`` bool; False for frames that carry no pixels (PLUS
  ``ImageStatus`` other than OK). Their pixels are zeros.
- ``pixel_spacing_mm``: optional ``(sx, sy)`` mm per pixel along columns/rows, a hint only: the
  geometry that counts is ImageToProbe.
- ``frame_fields``: other per-frame text fields (``ProbePosition``...) kept for round trips.
- ``metadata``: other header fields kept for round trips (``UltrasoundImageType``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SequenceError
from .transforms import TransformRepository, interpolate_transforms, split_transform_name

__all__ = ["FrameTransforms", "TrackedSequence", "ORIENTATIONS", "sequence_info"]

#: PLUS ultrasound image orientations (first letter: marked side Left=M / right=U of the image,
#: second letter: Far or Near side at the bottom). In memory frames are always MF.
ORIENTATIONS = ("MF", "MN", "UF", "UN")

_ALLOWED_DTYPES = (np.uint8, np.float32)


@dataclass(eq=False)
class FrameTransforms:
    """Per-frame 4x4 transforms of one name.

    Attributes
    ----------
    matrices : (n_frames, 4, 4) float64
    valid : (n_frames,) bool
    """

    matrices: np.ndarray
    valid: np.ndarray

    def __post_init__(self):
        self.matrices = np.asarray(self.matrices, dtype=np.float64)
        self.valid = np.asarray(self.valid, dtype=bool)
        if self.matrices.ndim != 3 or self.matrices.shape[1:] != (4, 4):
            raise SequenceError(f"transform matrices must be (n, 4, 4), got {self.matrices.shape}")
        if self.valid.shape != (self.matrices.shape[0],):
            raise SequenceError(
                f"transform validity must be ({self.matrices.shape[0]},), got {self.valid.shape}"
            )
        # A non-finite matrix can never be used: mark it invalid rather than propagate NaN.
        self.valid = self.valid & np.all(np.isfinite(self.matrices), axis=(1, 2))

    def take(self, index) -> FrameTransforms:
        return FrameTransforms(self.matrices[index].copy(), self.valid[index].copy())


@dataclass(eq=False)
class TrackedSequence:
    """Tracked 2D ultrasound frames with named per-frame transforms (see module docstring)."""

    frames: np.ndarray
    timestamps_s: np.ndarray | None = None
    transforms: dict[str, FrameTransforms] = field(default_factory=dict)
    image_ok: np.ndarray | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    frame_fields: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        frames = np.asarray(self.frames)
        if frames.ndim not in (3, 4):
            raise SequenceError(
                f"frames must be (n_frames, n_rows, n_cols[, n_channels]), got shape {frames.shape}"
            )
        if frames.dtype not in _ALLOWED_DTYPES:
            raise SequenceError(f"frames must be uint8 or float32, got {frames.dtype}")
        self.frames = frames
        n = frames.shape[0]
        if self.timestamps_s is None:
            self.timestamps_s = np.arange(n, dtype=np.float64)
        self.timestamps_s = np.asarray(self.timestamps_s, dtype=np.float64).reshape(-1)
        if self.timestamps_s.shape != (n,):
            raise SequenceError(f"{n} frames but {self.timestamps_s.size} timestamps")
        if self.image_ok is None:
            self.image_ok = np.ones(n, dtype=bool)
        self.image_ok = np.asarray(self.image_ok, dtype=bool).reshape(-1)
        if self.image_ok.shape != (n,):
            raise SequenceError(f"{n} frames but {self.image_ok.size} image status flags")
        converted = {}
        for name, value in self.transforms.items():
            split_transform_name(name)
            if not isinstance(value, FrameTransforms):
                value = FrameTransforms(*value)
            if value.matrices.shape[0] != n:
                raise SequenceError(
                    f"transform {name!r} has {value.matrices.shape[0]} frames, sequence has {n}"
                )
            converted[_strip_suffix(name)] = value
        self.transforms = converted
        for key, values in self.frame_fields.items():
            if len(values) != n:
                raise SequenceError(f"frame field {key!r} has {len(values)} values, sequence has {n}")
        if self.pixel_spacing_mm is not None:
            sx, sy = (float(v) for v in self.pixel_spacing_mm)
            if not (sx > 0 and sy > 0):
                raise SequenceError(f"pixel_spacing_mm must be positive, got {(sx, sy)}")
            self.pixel_spacing_mm = (sx, sy)

    # -- shape -------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    def __len__(self) -> int:
        return self.n_frames

    @property
    def n_rows(self) -> int:
        return int(self.frames.shape[1])

    @property
    def n_cols(self) -> int:
        return int(self.frames.shape[2])

    @property
    def n_channels(self) -> int:
        return 1 if self.frames.ndim == 3 else int(self.frames.shape[3])

    @property
    def orientation(self) -> str:
        """Pixel orientation in memory: always ``"MF"``."""
        return "MF"

    @property
    def duration_s(self) -> float:
        return float(self.timestamps_s[-1] - self.timestamps_s[0]) if self.n_frames else 0.0

    @property
    def transform_names(self) -> list[str]:
        return list(self.transforms)

    def __str__(self) -> str:
        ch = f"x{self.n_channels}" if self.n_channels > 1 else ""
        names = ", ".join(self.transform_names) or "none"
        return (
            f"TrackedSequence: {self.n_frames} frames {self.n_cols}x{self.n_rows}{ch} "
            f"{self.frames.dtype}, MF, {self.duration_s:.3f} s, transforms: {names}"
        )

    # -- transforms ---------------------------------------------------------------------------
    def transform_items(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-frame transforms as ``{name: (matrices, valid)}`` for a :class:`TransformRepository`."""
        return {k: (v.matrices, v.valid) for k, v in self.transforms.items()}

    def repository(self, fixed=None) -> TransformRepository:
        """A :class:`TransformRepository` over this sequence's transforms plus ``fixed`` ones."""
        return TransformRepository(self.transform_items(), fixed=fixed, n_frames=self.n_frames)

    def set_transform(self, name: str, matrices, valid=None) -> None:
        """Add or replace a per-frame transform (``valid`` defaults to all finite frames)."""
        matrices = np.asarray(matrices, dtype=np.float64)
        if valid is None:
            valid = np.ones(matrices.shape[0], dtype=bool)
        split_transform_name(name)
        value = FrameTransforms(matrices, valid)
        if value.matrices.shape[0] != self.n_frames:
            raise SequenceError(
                f"transform {name!r} has {value.matrices.shape[0]} frames, sequence has {self.n_frames}"
            )
        self.transforms[_strip_suffix(name)] = value

    def interpolate_transforms(self, query_s, names=None) -> dict[str, FrameTransforms]:
        """Resample the (rigid) per-frame transforms at ``query_s`` seconds.

        Linear translation + slerp between the valid samples bracketing each time; no
        extrapolation (out-of-range queries are invalid).
        """
        names = list(self.transforms) if names is None else names
        out = {}
        for name in names:
            ft = self.transforms[_strip_suffix(name)]
            mats, valid = interpolate_transforms(self.timestamps_s, ft.matrices, ft.valid, query_s)
            out[_strip_suffix(name)] = FrameTransforms(mats, valid)
        return out

    # -- selection ----------------------------------------------------------------------------
    def select(self, index) -> TrackedSequence:
        """A new sequence with the frames picked by ``index`` (slice, int array or bool mask)."""
        if isinstance(index, slice):
            index = np.arange(self.n_frames)[index]
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (self.n_frames,):
                raise SequenceError(f"boolean mask must have {self.n_frames} entries, got {index.shape}")
            index = np.flatnonzero(index)
        index = index.astype(np.intp).reshape(-1)
        if index.size and (index.min() < -self.n_frames or index.max() >= self.n_frames):
            raise SequenceError(f"frame index out of range for {self.n_frames} frames: {index}")
        return TrackedSequence(
            frames=self.frames[index].copy(),
            timestamps_s=self.timestamps_s[index].copy(),
            transforms={k: v.take(index) for k, v in self.transforms.items()},
            image_ok=self.image_ok[index].copy(),
            pixel_spacing_mm=self.pixel_spacing_mm,
            frame_fields={k: [v[i] for i in index] for k, v in self.frame_fields.items()},
            metadata=dict(self.metadata),
        )

    def __getitem__(self, index) -> TrackedSequence:
        if isinstance(index, (int, np.integer)):
            index = [index]
        return self.select(index)

    @staticmethod
    def concatenate(sequences) -> TrackedSequence:
        """Join sequences with equal frame shape/dtype; transforms missing in one part are invalid."""
        sequences = list(sequences)
        if not sequences:
            raise SequenceError("concatenate: no sequences given")
        first = sequences[0]
        for s in sequences[1:]:
            if s.frames.shape[1:] != first.frames.shape[1:] or s.frames.dtype != first.frames.dtype:
                raise SequenceError(
                    f"concatenate: frames {s.frames.shape[1:]} {s.frames.dtype} do not match "
                    f"{first.frames.shape[1:]} {first.frames.dtype}"
                )
        names = list(dict.fromkeys(n for s in sequences for n in s.transforms))
        transforms = {}
        for name in names:
            mats, valid = [], []
            for s in sequences:
                if name in s.transforms:
                    mats.append(s.transforms[name].matrices)
                    valid.append(s.transforms[name].valid)
                else:
                    mats.append(np.broadcast_to(np.eye(4), (s.n_frames, 4, 4)))
                    valid.append(np.zeros(s.n_frames, dtype=bool))
            transforms[name] = FrameTransforms(np.concatenate(mats), np.concatenate(valid))
        fields = list(dict.fromkeys(k for s in sequences for k in s.frame_fields))
        frame_fields = {
            k: [v for s in sequences for v in s.frame_fields.get(k, [""] * s.n_frames)] for k in fields
        }
        return TrackedSequence(
            frames=np.concatenate([s.frames for s in sequences]),
            timestamps_s=np.concatenate([s.timestamps_s for s in sequences]),
            transforms=transforms,
            image_ok=np.concatenate([s.image_ok for s in sequences]),
            pixel_spacing_mm=first.pixel_spacing_mm,
            frame_fields=frame_fields,
            metadata=dict(first.metadata),
        )

    def copy(self) -> TrackedSequence:
        return self.select(slice(None))


def _strip_suffix(name: str) -> str:
    return name[: -len("Transform")] if name.endswith("Transform") else name


def sequence_info(sequence, path=None) -> dict:
    """JSON-safe summary of a tracked sequence (what ``freehandus info --json`` prints)."""
    info = {
        "file": str(path) if path is not None else None,
        "frames": sequence.n_frames,
        "width": sequence.n_cols,
        "height": sequence.n_rows,
        "channels": sequence.n_channels,
        "dtype": str(sequence.frames.dtype),
        "orientation": sequence.orientation,
        "source_orientation": sequence.metadata.get("SourceOrientation", sequence.orientation),
        "transforms": sequence.transform_names,
        "valid_transform_frames": {
            name: int(ft.valid.sum()) for name, ft in sequence.transforms.items()
        },
        "frames_without_image": int((~sequence.image_ok).sum()),
        "duration_s": sequence.duration_s,
        "pixel_spacing_mm": list(sequence.pixel_spacing_mm) if sequence.pixel_spacing_mm else None,
    }
    if sequence.n_frames > 1:
        dt = np.diff(sequence.timestamps_s)
        info["frames_per_second"] = float(1.0 / np.median(dt)) if np.median(dt) > 0 else None
    return info

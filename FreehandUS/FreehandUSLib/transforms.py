"""Named 4x4 transforms, the transform repository and pose interpolation.

Conventions (PLUS): a transform is named ``<From>To<To>`` (``ImageToProbe``, ``ProbeToTracker``),
is a 4x4 float64 matrix applied to column vectors, and maps coordinates in ``From`` to ``To``.
Chains therefore read right to left::

    image_to_reference = probe_to_reference @ image_to_probe

ImageToProbe includes the pixel spacing (mm per pixel), so not every transform is rigid.
Per-frame transforms are stacks ``(n_frames, 4, 4)`` with a boolean validity mask ``(n_frames,)``;
results of the repository carry NaN matrices on invalid frames (a failure on one frame is data).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping

import numpy as np

from .errors import TransformError

__all__ = [
    "split_transform_name",
    "transform_name",
    "check_matrix",
    "invert_transforms",
    "rigid_part",
    "interpolate_transforms",
    "TransformRepository",
]

_NAME_RE = re.compile(r"^([A-Za-z0-9_]+?)To([A-Z][A-Za-z0-9_]*)$")


def split_transform_name(name: str) -> tuple[str, str]:
    """Split ``"ImageToProbe"`` (or ``"ImageToProbeTransform"``) into ``("Image", "Probe")``.

    Raises
    ------
    TransformError
        If the name is not of the form ``<From>To<To>``.
    """
    base = name[: -len("Transform")] if name.endswith("Transform") else name
    match = _NAME_RE.match(base)
    if not match:
        raise TransformError(
            f"transform name {name!r} is not of the form <From>To<To> (e.g. 'ImageToProbe')"
        )
    return match.group(1), match.group(2)


def transform_name(from_frame: str, to_frame: str) -> str:
    """Return ``"<from_frame>To<to_frame>"``."""
    return f"{from_frame}To{to_frame}"


def check_matrix(matrix, *, name: str = "transform", source: str = "") -> np.ndarray:
    """Validate one 4x4 (or a stack ``(n, 4, 4)``) of finite, invertible homogeneous matrices.

    Returns the matrices as float64. Raises :class:`TransformError` naming ``name`` and
    ``source`` (e.g. a file) when a matrix has the wrong shape, holds NaN/inf, has a last row
    other than ``0 0 0 1``, or is singular.
    """
    where = f" in {source}" if source else ""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[-2:] != (4, 4):
        raise TransformError(f"{name}{where}: expected a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise TransformError(f"{name}{where}: matrix holds NaN or infinite values")
    if not np.allclose(m[..., 3, :], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise TransformError(f"{name}{where}: last row must be 0 0 0 1, got {m[..., 3, :]}")
    det = np.linalg.det(m[..., :3, :3])
    if np.any(np.abs(det) < 1e-12):
        raise TransformError(f"{name}{where}: matrix is not invertible (determinant {det})")
    return m


def invert_transforms(matrices: np.ndarray) -> np.ndarray:
    """Invert a stack of homogeneous matrices ``(..., 4, 4)``; singular or NaN ones become NaN."""
    m = np.asarray(matrices, dtype=np.float64)
    out = np.full_like(m, np.nan)
    finite = np.all(np.isfinite(m), axis=(-2, -1))
    if m.ndim == 2:
        if finite and abs(np.linalg.det(m[:3, :3])) > 1e-12:
            out = np.linalg.inv(m)
        return out
    good = finite.copy()
    good[finite] = np.abs(np.linalg.det(m[finite][:, :3, :3])) > 1e-12
    out[good] = np.linalg.inv(m[good])
    return out


def rigid_part(matrices: np.ndarray) -> np.ndarray:
    """Nearest rotation (polar decomposition) of the 3x3 blocks of ``(n, 4, 4)`` matrices.

    Returns ``(n, 3, 3)`` proper rotations; used so that slightly non-orthonormal tracker
    matrices (6-digit text in PLUS files) can be interpolated with slerp.
    """
    u, _, vt = np.linalg.svd(matrices[..., :3, :3])
    r = u @ vt
    flip = np.linalg.det(r) < 0
    if np.any(flip):
        u = u.copy()
        u[flip, :, -1] *= -1
        r = u @ vt
    return r


def interpolate_transforms(
    timestamps_s: np.ndarray,
    matrices: np.ndarray,
    valid: np.ndarray,
    query_s: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample rigid per-frame transforms at arbitrary times.

    Translation is interpolated linearly, rotation by spherical linear interpolation between
    the two valid samples that bracket each query time (invalid samples are skipped, as PLUS
    does). Queries outside the valid time range are not extrapolated: they come back invalid.

    Parameters
    ----------
    timestamps_s : (n,) float64, strictly increasing, seconds
    matrices : (n, 4, 4) float64, rigid transforms
    valid : (n,) bool
    query_s : (m,) float64, seconds

    Returns
    -------
    out : (m, 4, 4) float64, NaN where invalid
    out_valid : (m,) bool
    """
    t = np.asarray(timestamps_s, dtype=np.float64)
    q = np.atleast_1d(np.asarray(query_s, dtype=np.float64))
    mats = np.asarray(matrices, dtype=np.float64)
    ok = np.asarray(valid, dtype=bool) & np.all(np.isfinite(mats), axis=(1, 2))
    out = np.full((q.size, 4, 4), np.nan)
    out_valid = np.zeros(q.size, dtype=bool)
    tv, mv = t[ok], mats[ok]
    if tv.size == 0:
        return out, out_valid
    if np.any(np.diff(tv) <= 0):
        raise TransformError("interpolate_transforms: timestamps of valid samples must increase")
    inside = (q >= tv[0]) & (q <= tv[-1])
    if not np.any(inside):
        return out, out_valid
    qi = q[inside]
    if tv.size == 1:
        out[inside] = mv[0]
        out_valid[inside] = True
        return out, out_valid
    upper = np.clip(np.searchsorted(tv, qi, side="right"), 1, tv.size - 1)
    lower = upper - 1
    w = ((qi - tv[lower]) / (tv[upper] - tv[lower]))[:, None]
    trans = (1.0 - w) * mv[lower, :3, 3] + w * mv[upper, :3, 3]
    from scipy.spatial.transform import Rotation, Slerp  # 0.3 s to import: only when interpolating

    rotations = Rotation.from_matrix(rigid_part(mv))
    rot = Slerp(tv, rotations)(qi).as_matrix()
    res = np.zeros((qi.size, 4, 4))
    res[:, :3, :3] = rot
    res[:, :3, 3] = trans
    res[:, 3, 3] = 1.0
    # Exact sample times return the stored matrix untouched (no polar-decomposition drift).
    exact = np.isclose(qi, tv[lower], rtol=0.0, atol=0.0)
    res[exact] = mv[lower[exact]]
    exact_up = qi == tv[upper]
    res[exact_up] = mv[upper[exact_up]]
    out[inside] = res
    out_valid[inside] = True
    return out, out_valid


class TransformRepository:
    """Resolve named transforms through chains and inverses, vectorised over frames.

    Holds per-frame transforms (``(n, 4, 4)`` + validity) and fixed ones (a single 4x4, such as
    ImageToProbe from calibration or PhantomToReference from a PLUS ``<CoordinateDefinitions>``).
    :meth:`get` finds the shortest chain of known edges between two coordinate frames.

    Parameters
    ----------
    per_frame : mapping name -> (matrices (n, 4, 4), valid (n,) bool), optional
    fixed : mapping name -> (4, 4) matrix, optional
    n_frames : int, optional
        Number of frames; inferred from ``per_frame`` when omitted (1 if there is none).

    Examples
    --------
    >>> repo = TransformRepository(seq.transform_items(), fixed={"ImageToProbe": image_to_probe})
    >>> image_to_reference = repo.get("ImageToReference")   # (n, 4, 4), NaN on invalid frames
    """

    def __init__(self, per_frame=None, fixed: Mapping | None = None, n_frames: int | None = None):
        self._edges: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        sizes = set()
        for name, (mats, valid) in (dict(per_frame or {})).items():
            mats = np.asarray(mats, dtype=np.float64)
            valid = np.asarray(valid, dtype=bool)
            if mats.ndim != 3 or mats.shape[1:] != (4, 4) or valid.shape != (mats.shape[0],):
                raise TransformError(
                    f"per-frame transform {name!r}: expected (n, 4, 4) matrices and (n,) validity, "
                    f"got {mats.shape} and {valid.shape}"
                )
            sizes.add(mats.shape[0])
            self._add(name, mats, valid)
        if len(sizes) > 1:
            raise TransformError(f"per-frame transforms disagree on the frame count: {sorted(sizes)}")
        self.n_frames = n_frames if n_frames is not None else (sizes.pop() if sizes else 1)
        for name, matrix in (dict(fixed or {})).items():
            self.set_fixed(name, matrix)

    def _add(self, name: str, mats: np.ndarray, valid: np.ndarray) -> None:
        src, dst = split_transform_name(name)
        if src == dst:
            raise TransformError(f"transform {name!r} maps a frame to itself")
        self._edges[(src, dst)] = (mats, valid)
        self._edges.pop((dst, src), None)

    def set_fixed(self, name: str, matrix) -> None:
        """Add or replace a transform that is the same for every frame (4x4, validated)."""
        m = check_matrix(matrix, name=name)
        if m.shape != (4, 4):
            raise TransformError(f"fixed transform {name!r} must be one 4x4 matrix, got {m.shape}")
        self._add(name, m[None], np.ones(1, dtype=bool))

    @property
    def names(self) -> list[str]:
        """Names of the transforms stored directly (not derived)."""
        return [transform_name(s, d) for s, d in self._edges]

    @property
    def frames(self) -> set[str]:
        """Coordinate frames that appear in any stored transform."""
        return {f for edge in self._edges for f in edge}

    def _path(self, src: str, dst: str) -> list[tuple[str, str, bool]]:
        graph: dict[str, list[tuple[str, str, str, bool]]] = {}
        for a, b in self._edges:
            graph.setdefault(a, []).append((b, a, b, False))
            graph.setdefault(b, []).append((a, a, b, True))
        prev: dict[str, tuple[str, tuple[str, str, bool]]] = {src: ("", ("", "", False))}
        queue = deque([src])
        while queue:
            node = queue.popleft()
            if node == dst:
                break
            for nxt, a, b, inverse in graph.get(node, []):
                if nxt not in prev:
                    prev[nxt] = (node, (a, b, inverse))
                    queue.append(nxt)
        if dst not in prev:
            raise TransformError(self._missing_message(src, dst, set(prev)))
        steps = []
        node = dst
        while node != src:
            parent, step = prev[node]
            steps.append(step)
            node = parent
        return steps[::-1]

    def _missing_message(self, src: str, dst: str, reachable: set[str]) -> str:
        known = ", ".join(sorted(self.names)) or "none"
        if src not in self.frames:
            link = f"no known transform involves the '{src}' frame"
        elif dst not in self.frames:
            link = f"no known transform involves the '{dst}' frame"
        else:
            link = (
                f"'{src}' connects only to {sorted(reachable - {src})}; add a transform linking "
                f"one of them to '{dst}' (e.g. {transform_name(sorted(reachable)[0], dst)})"
            )
        return f"cannot resolve {transform_name(src, dst)}: {link}. Known transforms: {known}"

    def has(self, name: str) -> bool:
        """Whether ``name`` can be resolved."""
        try:
            self._path(*split_transform_name(name))
        except TransformError:
            return False
        return True

    def get(self, name: str, frame: int | None = None) -> np.ndarray:
        """Resolve ``name`` for every frame, ``(n_frames, 4, 4)``, NaN where any link is invalid.

        With ``frame`` given, returns that frame's 4x4 matrix.
        """
        src, dst = split_transform_name(name)
        if src == dst:
            result = np.broadcast_to(np.eye(4), (self.n_frames, 4, 4)).copy()
        else:
            result = None
            for a, b, inverse in self._path(src, dst):
                mats, valid = self._edges[(a, b)]
                step = np.where(valid[:, None, None], mats, np.nan)
                if inverse:
                    step = invert_transforms(step)
                result = step if result is None else step @ result
            result = np.broadcast_to(result, (self.n_frames, 4, 4)).copy()
        if frame is not None:
            return result[frame]
        return result

    def valid(self, name: str) -> np.ndarray:
        """``(n_frames,)`` bool: frames on which every link of ``name``'s chain is valid."""
        return np.all(np.isfinite(self.get(name)), axis=(1, 2))

"""N-wire geometric filtering and labeling: dot candidates -> wires, in PLUS order.

Given dot candidates of one image, find for every pattern of the phantom three collinear dots
(A, B, C) and assign them to wires the way PLUS does: lines sorted top to bottom give the
patterns in definition order, dots sorted right to left (MF image) give the wires of a pattern.
The geometric prior (Liu et al. 2025, "N-wire structural prior") accepts only sets of lines that

1. are collinear within each pattern: the middle dot's distance from line AC is below
   ``collinearity_eps * |AC|`` (paper: 0.05);
2. are parallel between patterns: slopes within ``parallel_eps`` of the main slope (the slope
   shared by most candidate lines, found by a sliding window over the sorted slopes; paper:
   0.05);
3. have consistent distances: the image plane cuts all pattern planes with the same obliquity,
   so the line spacings are the phantom's layer spacings times one common factor, and the
   side-wire distances ``|AC|`` the phantom's side spacings times another; each is checked to
   ``distance_tolerance_mm`` (paper: 10 px);
4. put the middle dot where the diagonal can be: ``alpha = |AB|/|AC|`` within the range the
   pattern's diagonal spans (plus ``alpha_margin``);
5. are consistent in 3D: one image-plane pose and pixel spacing put every dot on its wire
   (:func:`pose_residual_mm`).

Among the accepted sets the one with the largest total dot strength wins. Distances are
measured in mm using an approximate pixel spacing; the scale factors are bounded by
``scale_range`` to tolerate a spacing hint that is off by some tens of percent.

Where the tolerances come from
------------------------------
Nothing here is tuned on one phantom or one image size. The absolute tolerances (distances,
collinearity, the 3D check) absorb the error of a dot centre, which has two parts: one that does
not shrink with the pixel (the echo's centre is biased by the beam width and the wire's
thickness, and a real phantom's wires sit a few tenths of a mm off its drawing: the ``_mm``
floors, physical) and one that grows with the pixel (sub-pixel localisation and quantisation:
the ``_px`` terms, times the image's pixel spacing; statistical, a few times the detector's
sub-pixel error; none for the 3D check, see ``max_wire_distance_px``). Each tolerance is the
larger of the two, and at most
``geometry_fraction`` of the phantom's smallest separation (:func:`min_separation_mm`: a dot of
the neighbouring wire or layer is at least that far, so a tolerance below a fraction of it
cannot take one for the other). The relative tolerances (``collinearity_eps``, ``parallel_eps``:
the paper's 0.05) get the same pixel term over the shortest line a pattern can make, which on a
coarse image is only a few tens of pixels long, and so does ``alpha_margin`` (the slack on
the diagonal's position ``|AB|/|AC|``); ``scale_range`` is scale-free.
:meth:`LabelingSettings.resolved` computes all of them for a phantom and a pixel spacing;
:func:`label_dots` does so itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .phantom import NWirePhantom

__all__ = ["LabelingSettings", "LabelingResult", "label_dots", "order_pattern_dots", "pose_residual_mm",
           "min_separation_mm", "REJECTION_REASONS"]

#: Why a frame is rejected: stable codes (JSON, counts) and what each means. ``reason`` texts
#: add the specifics (which pattern and wires, which numbers).
REJECTION_REASONS = {
    "no-image": "the frame has no image",
    "too-few-dots": "fewer dot candidates than wires",
    "no-n-triple": "no three collinear dots match any N-wire (side spacing, diagonal position)",
    "too-few-lines": "fewer collinear dot triples than N-wire patterns",
    "pattern-missing": "one pattern's wires are not found (no collinear triple with its spacing and diagonal)",
    "parallel-prior": "a pattern's line is not parallel to the others",
    "layer-spacing-prior": "a pattern's line is not at the phantom's layer spacing from the others",
    "obliquity-prior": "a pattern's side-wire distance disagrees with the others' (one common tilt)",
    "shared-dots-prior": "the only lines for a pattern reuse dots of the others",
    "3d-check": "no labelled set fits one image-plane pose (dot-wire distance too large)",
    "3d-check-refined": "the sub-pixel dots fail the 3D check",
    "dot-at-border": "labelled dots stay on the image border after refinement (screen marks cut by the frame)",
    "motion-inconsistent": "the labelled dots lie far from where the tracked motion and the neighbouring frames put "
                           "them (a wrong label; the sequence stage could not label the frame either)",
}


def min_separation_mm(phantom: NWirePhantom) -> float:
    """The smallest distance between two different wires' crossings that the labeling tells apart, mm.

    The smaller of the smallest step between the phantom's layers (a line of the neighbouring
    pattern) and half its smallest side-wire spacing (the diagonal's crossing can lie anywhere
    between the side wires; half the spacing is where it is equally far from both), both in a cut
    perpendicular to the wires. The labeling tolerances stay below a fraction of it
    (:attr:`LabelingSettings.geometry_fraction`).
    """
    half_side = 0.5 * float(np.min(phantom.side_spacings_mm))
    layers = np.unique(np.round(np.asarray(phantom.layer_offsets_mm, dtype=np.float64), 6))
    steps = np.diff(layers)
    steps = steps[steps > 0]
    return min(half_side, float(steps.min())) if steps.size else half_side


@dataclass(frozen=True)
class LabelingSettings:
    """Tolerances of the N-wire geometric filter.

    Derived for each phantom and pixel spacing (module docstring, :meth:`resolved`): the
    absolute ones (mm) are ``max(<name>_mm, <name>_px * pixel spacing)``, at most
    ``geometry_fraction`` times the phantom's :func:`min_separation_mm`; the relative ones (the
    paper's) at least ``<name>_px`` pixels over the shortest line a pattern makes. ``_px``
    values are pixels of the image.

    Attributes
    ----------
    collinearity_eps : float
        Middle dot distance from line AC relative to ``|AC|`` (paper 0.05) ...
    collinearity_eps_px : float
        ... at least this many pixels over the shortest line a pattern makes
        (``scale_range[0]`` times the smallest side-wire spacing): on a coarse image a short
        line is a few tens of pixels, and a fraction of a pixel of noise on each dot bends it by
        more than 5 % (statistical: about three times the perpendicular error of 0.5 px dots).
    parallel_eps : float
        Largest slope difference between pattern lines (paper 0.05; slopes measured along the
        main direction) ...
    parallel_eps_px : float
        ... at least the slope of this many pixels over the shortest line (statistical: two
        lines' slopes, each from end dots 0.5 px off, differ by about 1 px over the line).
    distance_tolerance_mm : float
        Allowed deviation of line spacings and side distances from the common-scale prediction:
        the physical floor (a dot centre's bias from the echo's shape and the phantom's build
        tolerance, which do not shrink with the pixel). 0.8 mm is the paper's 10 px at the
        0.078 mm/px of its images, where the pixel term is below it.
    distance_tolerance_px : float
        ... and the part that grows with the pixel: this many pixels (statistical: the
        deviation of a distance between two sub-pixel dot centres, about 0.5 px per dot, times
        about 5; a coarse image's correct sets deviate by 2-3 px).
    alpha_margin : float
        Slack on the diagonal's alpha range (the error of ``|AB|/|AC|``) ...
    alpha_margin_px : float
        ... at least this many pixels over the shortest line (statistical: ``|AB|`` of dots
        0.5 px off is about 0.7 px off; three times that).
    scale_range : (float, float)
        Allowed ratio between image distances (mm, using the spacing hint) and phantom
        distances. 1 when the image plane is perpendicular to the wires; larger when tilted.
        Physical choices: a spacing hint off by up to 20 % (0.8) and a tilt of the image plane
        from the wires' normal up to 66 deg (2.5 = 1 / cos 66 deg).
    max_line_angle_deg : float
        Lines steeper than this (from the image x axis) are rejected (PLUS: 70 deg).
    collinearity_max_mm, collinearity_max_px : float
        Absolute cap on the middle dot's distance from line AC (the three crossings are exactly
        collinear; this only has to absorb localisation noise): physical floor and pixel term,
        as for the distances (the perpendicular error of the middle of three noisy dots is about
        that of a distance between two).
    max_triples : int
        Cap on candidate lines kept (the strongest), bounds the search (computation).
    beam_width : int
        Partial assignments kept per pattern in the search (computation).
    main_slope_window : bool
        Search first among the lines within ``parallel_eps`` of the main slope (the paper's
        sliding-window step) and fall back to all lines. Off by default: when false lines (from
        speckle or wall reflections) outnumber the true ones, the main slope is theirs, and a
        weaker false set inside the window can hide the true set; the pairwise parallelism test
        of the search enforces the same prior.
    max_wire_distance_mm : float
        3D consistency check (:func:`pose_residual_mm`): after fitting one image-plane pose and
        pixel spacing, every dot must lie within this distance of its wire. A set containing a
        dot of another echo fails by about that dot's displacement. The physical floor: correct
        sets stay below 0.2 mm in simulations and 0.45 mm on PLUS's fCal 2.0 recordings (a real
        phantom's wires are a few tenths of a mm off its drawing). 0 disables.
    max_wire_distance_px : float
        ... and a pixel term, 0 by default: a middle dot moved along its line is consistent with
        another point of the diagonal wire, and such a wrong set's distance is a physical length
        (0.7-1.8 mm for a speckle peak some pixels off on fCal 2.0 at 0.8 mm/px), not a number of
        pixels, so a limit that grows with the pixel lets it through. At coarse spacings the
        check refuses some correct sets instead; the sequence stage labels those from the
        tracked prediction, which does not use it.
    geometry_fraction : float
        The absolute tolerances stay below this fraction of :func:`min_separation_mm` (a
        wrong wire or layer is at least 0.8 times that separation away in the image; a quarter
        leaves room for the noise of both dots).
    verify_top : int
        Best-scoring complete sets tried against the 3D check before giving up (computation).
    """

    collinearity_eps: float = 0.05
    collinearity_eps_px: float = 1.5
    parallel_eps: float = 0.05
    parallel_eps_px: float = 2.0
    distance_tolerance_mm: float = 0.8
    distance_tolerance_px: float = 4.0
    alpha_margin: float = 0.08
    alpha_margin_px: float = 2.0
    scale_range: tuple = (0.8, 2.5)
    max_line_angle_deg: float = 70.0
    collinearity_max_mm: float = 1.0
    collinearity_max_px: float = 4.0
    max_triples: int = 2000
    beam_width: int = 400
    main_slope_window: bool = False
    max_wire_distance_mm: float = 0.6
    max_wire_distance_px: float = 0.0
    geometry_fraction: float = 0.25
    verify_top: int = 30

    def __post_init__(self):
        for name in ("collinearity_eps", "parallel_eps", "distance_tolerance_mm", "geometry_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("distance_tolerance_px", "collinearity_max_px", "max_wire_distance_px", "max_wire_distance_mm",
                     "collinearity_eps_px", "parallel_eps_px", "alpha_margin", "alpha_margin_px"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        lo, hi = self.scale_range
        if not 0 < lo < hi:
            raise ValueError(f"scale_range: expected 0 < low < high, got {self.scale_range!r}")

    def resolved(self, phantom: NWirePhantom, pixel_spacing_mm) -> LabelingSettings:
        """These settings with the tolerances derived for a phantom and a pixel spacing.

        Each of ``distance_tolerance_mm``, ``collinearity_max_mm`` and ``max_wire_distance_mm``
        (unless 0: disabled) becomes ``min(geometry_fraction * min_separation_mm(phantom),
        max(<name>_mm, <name>_px * spacing))``; ``collinearity_eps``, ``parallel_eps`` and
        ``alpha_margin`` become
        ``max(<name>, <name>_px * spacing / shortest)``, ``shortest = scale_range[0] * min(side
        spacings)`` (mm); spacing is the mean of ``pixel_spacing_mm`` (mm/px). Resolving resolved
        settings again (same phantom and spacing) changes nothing.
        """
        sp = float(np.mean(np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=np.float64), (2,))))
        if not sp > 0:
            raise ValueError(f"pixel_spacing_mm: expected a positive spacing (mm/px), got {pixel_spacing_mm!r}")
        cap = self.geometry_fraction * min_separation_mm(phantom)
        # The shortest line a pattern can make in the image (mm): its side-wire spacing at the
        # smallest scale. A few pixels of noise at its ends tilt it and bend it most.
        shortest_mm = self.scale_range[0] * float(np.min(phantom.side_spacings_mm))

        def derive(mm, px):
            return min(cap, max(mm, px * sp))

        return replace(self, collinearity_eps=max(self.collinearity_eps, self.collinearity_eps_px * sp / shortest_mm),
                       parallel_eps=max(self.parallel_eps, self.parallel_eps_px * sp / shortest_mm),
                       alpha_margin=max(self.alpha_margin, self.alpha_margin_px * sp / shortest_mm),
                       distance_tolerance_mm=derive(self.distance_tolerance_mm, self.distance_tolerance_px),
                       collinearity_max_mm=derive(self.collinearity_max_mm, self.collinearity_max_px),
                       max_wire_distance_mm=(derive(self.max_wire_distance_mm, self.max_wire_distance_px)
                                             if self.max_wire_distance_mm > 0 else 0.0))


@dataclass(frozen=True, eq=False)
class LabelingResult:
    """Outcome of labeling one image.

    Attributes
    ----------
    ok : bool
        A complete, consistent pattern set was found.
    points_px : (n_wires, 2) float64
        Dots in phantom wire order (NaN when not ok).
    indices : (n_wires,) int
        Index of each wire's dot in the candidate list (-1 when not ok).
    n_lines : int
        Candidate lines (collinear triples) considered.
    score : float
        Total strength of the chosen dots (0 when not ok).
    reason : str
        Why labeling failed ("" when ok): the code's meaning with the specifics.
    wire_distance_mm : float
        The 3D check's largest dot-wire distance of the chosen set (NaN when not computed).
    reason_code : str
        Key of :data:`REJECTION_REASONS` ("" when ok).
    """

    ok: bool
    points_px: np.ndarray
    indices: np.ndarray
    n_lines: int = 0
    score: float = 0.0
    reason: str = ""
    wire_distance_mm: float = float("nan")
    reason_code: str = ""


def order_pattern_dots(points_px) -> np.ndarray:
    """Sort the dots of one line right to left (decreasing x), PLUS's wire order in MF images."""
    p = np.asarray(points_px, dtype=np.float64)
    return p[np.argsort(-p[:, 0], kind="stable")]


def _failed(phantom, code, reason, n_lines=0) -> LabelingResult:
    if code not in REJECTION_REASONS:
        raise KeyError(f"unknown rejection reason code {code!r}")
    return LabelingResult(False, np.full((phantom.n_wires, 2), np.nan), np.full(phantom.n_wires, -1), n_lines, 0.0,
                          reason, reason_code=code)


def _pattern_label(phantom: NWirePhantom, k: int) -> str:
    return f"pattern {k + 1} ({', '.join(phantom.patterns[k].names)})"


def _line_fits(alpha, length, phantom: NWirePhantom, k: int, s: LabelingSettings) -> np.ndarray:
    """Which candidate lines (diagonal position ``alpha``, side distance ``length`` mm) can be pattern ``k``."""
    lo_a = phantom.patterns[k].alpha_range[0] - s.alpha_margin
    hi_a = phantom.patterns[k].alpha_range[1] + s.alpha_margin
    d = phantom.side_spacings_mm[k]
    tol = s.distance_tolerance_mm
    return ((alpha >= lo_a) & (alpha <= hi_a) & (length >= s.scale_range[0] * d - tol)
            & (length <= s.scale_range[1] * d + tol))


def _missing_text(phantom: NWirePhantom, patterns, s: LabelingSettings) -> str:
    return "; ".join(
        f"{_pattern_label(phantom, k)} not found: no collinear dot triple with its side-wire spacing "
        f"({phantom.side_spacings_mm[k]:.1f} mm x {s.scale_range[0]:g}-{s.scale_range[1]:g}) and diagonal position"
        for k in patterns)


def _candidate_lines(q, strength, phantom, s: LabelingSettings):
    """Collinear triples (A right, B middle, C left) compatible with some pattern."""
    n = len(q)
    if n < 3:
        return None
    d_side = phantom.side_spacings_mm
    lo = s.scale_range[0] * d_side.min() - s.distance_tolerance_mm
    hi = s.scale_range[1] * d_side.max() + s.distance_tolerance_mm
    i, j = np.triu_indices(n, 1)
    # A is the right point (larger x), C the left one.
    swap = q[i, 0] < q[j, 0]
    a = np.where(swap, j, i)
    c = np.where(swap, i, j)
    ac = q[c] - q[a]
    length = np.linalg.norm(ac, axis=1)
    angle = np.degrees(np.arctan2(-ac[:, 1], -ac[:, 0]))  # direction A->C reversed: left->right
    ok = (length >= lo) & (length <= hi) & (np.abs(angle) <= s.max_line_angle_deg)
    a, c, ac, length = a[ok], c[ok], ac[ok], length[ok]
    if a.size == 0:
        return None
    u = ac / length[:, None]
    rel = q[None, :, :] - q[a][:, None, :]  # (pairs, n, 2)
    t = np.einsum("pnk,pk->pn", rel, u) / length[:, None]
    perp = np.abs(rel[..., 0] * u[:, None, 1] - rel[..., 1] * u[:, None, 0]) / length[:, None]
    amin = min(p.alpha_range[0] for p in phantom.patterns) - s.alpha_margin
    amax = max(p.alpha_range[1] for p in phantom.patterns) + s.alpha_margin
    perp_mm = perp * length[:, None]
    good = ((perp < s.collinearity_eps) & (perp_mm < s.collinearity_max_mm) & (t > max(amin, 0.02))
            & (t < min(amax, 0.98)))
    good[np.arange(a.size), a] = False
    good[np.arange(a.size), c] = False
    pair_idx, b = np.nonzero(good)
    if pair_idx.size == 0:
        return None
    a, c, alpha, col = a[pair_idx], c[pair_idx], t[pair_idx, b], perp[pair_idx, b]
    length = length[pair_idx]
    direction = -u[pair_idx]  # left -> right
    slope = direction[:, 1] / direction[:, 0]
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)  # points down (+y) for near-horizontal lines
    centre = (q[a] + q[b] + q[c]) / 3.0
    score = strength[a] + strength[b] + strength[c] - col / s.collinearity_eps * 0.1
    order = np.argsort(-score)[: s.max_triples]
    return {
        "a": a[order], "b": b[order], "c": c[order], "alpha": alpha[order], "length": length[order],
        "slope": slope[order], "centre": centre[order], "score": score[order], "normal": normal[order],
    }


def _main_slope_mask(slope, eps):
    """Lines within ``eps`` of the slope shared by most lines (sliding window over sorted slopes)."""
    srt = np.sort(slope)
    hi = np.searchsorted(srt, srt + 2 * eps, side="right")
    counts = hi - np.arange(srt.size)
    # Every window start with the maximal count is a candidate main slope; keep all of them.
    best = counts.max()
    mask = np.zeros(slope.size, dtype=bool)
    for start in np.flatnonzero(counts == best):
        centre = 0.5 * (srt[start] + srt[hi[start] - 1])
        mask |= np.abs(slope - centre) <= eps
    return mask


def label_dots(candidates_px, strength, phantom: NWirePhantom, pixel_spacing_mm, *,
               settings: LabelingSettings | None = None) -> LabelingResult:
    """Pick and label the phantom's dots among candidates.

    Parameters
    ----------
    candidates_px : (n, 2) float
        Candidate dot centres (x, y), pixels, MF image.
    strength : (n,) float
        Detector response of each candidate (larger is better); normalised internally.
    phantom : NWirePhantom
    pixel_spacing_mm : float or (sx, sy)
        Approximate mm per pixel (a hint; errors of ~20 % are tolerated by ``scale_range``).
    settings : LabelingSettings, optional
        Its absolute tolerances are derived for ``phantom`` and ``pixel_spacing_mm``
        (:meth:`LabelingSettings.resolved`).

    Returns
    -------
    LabelingResult
    """
    s = settings or LabelingSettings()
    cand = np.asarray(candidates_px, dtype=np.float64).reshape(-1, 2)
    st = np.asarray(strength, dtype=np.float64).reshape(-1)
    if st.shape[0] != cand.shape[0]:
        raise ValueError(f"strength: expected {cand.shape[0]} values (one per candidate), got {st.shape[0]}")
    need = phantom.n_wires
    if cand.shape[0] < need:
        return _failed(phantom, "too-few-dots", f"{cand.shape[0]} dot candidates, {need} needed")
    sp = np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=np.float64), (2,))
    s = s.resolved(phantom, sp)
    q = cand * sp
    st = st / max(st.max(), 1e-12)
    lines = _candidate_lines(q, st, phantom, s)
    if lines is None:
        return _failed(phantom, "no-n-triple", "no collinear dot triple matches an N-wire")
    n_lines = lines["a"].size
    K = phantom.n_patterns
    if n_lines < K:
        missing = [k for k in range(K) if not _line_fits(lines["alpha"], lines["length"], phantom, k, s).any()]
        if missing:
            return _failed(phantom, "pattern-missing", _missing_text(phantom, missing, s) + f" ({n_lines} candidate "
                                                       f"lines, {K} needed)", n_lines)
        return _failed(phantom, "too-few-lines", f"{n_lines} candidate lines, {K} needed", n_lines)

    cands = None
    if s.main_slope_window:
        keep = _main_slope_mask(lines["slope"], s.parallel_eps)
        if keep.sum() < n_lines:
            cands, _ = _search(lines, phantom, s, np.flatnonzero(keep))
    if not cands:
        cands, failure = _search(lines, phantom, s, np.arange(n_lines))
    if not cands:
        code, detail = failure
        return _failed(phantom, code, f"{detail} ({n_lines} candidate lines)", n_lines)
    dots = np.stack([lines["a"], lines["b"], lines["c"]], axis=1)
    best = None
    smallest_residual = np.inf
    for chosen, score in cands[: max(1, s.verify_top)]:
        idx = []
        for li in chosen:
            trip = dots[li]
            idx.extend(trip[np.argsort(-cand[trip, 0], kind="stable")].tolist())  # right to left
        res = float("nan")
        if s.max_wire_distance_mm > 0:
            res = pose_residual_mm(cand[idx], phantom)
            if not res <= s.max_wire_distance_mm:
                smallest_residual = min(smallest_residual, res)
                continue
        best = (np.asarray(idx), score, res)
        break
    if best is None:
        return _failed(phantom, "3d-check", f"no candidate set passed the 3D consistency check (best dot-wire "
                                            f"distance {smallest_residual:.2f} mm > {s.max_wire_distance_mm:g} mm)",
                       n_lines)
    indices, score, res = best
    return LabelingResult(True, cand[indices].copy(), indices, n_lines, score, "", res)


def pose_residual_mm(points_px, phantom: NWirePhantom) -> float:
    """Largest distance (mm) of the dots from their wires after fitting one image-plane pose.

    The image plane's pose in the phantom (rotation, translation) and the pixel spacing (sx, sy)
    are fitted (Levenberg-Marquardt, 8 parameters) so that every dot lies on its wire; a
    correctly labeled set fits to the localisation noise, a set with a dot from another echo
    (speckle, a reverberation) does not. The start comes from the dots' phantom positions
    implied by the image (alpha for the middle wires; see :mod:`.correspondences`).

    Returns ``inf`` when the fit cannot start (degenerate dots).
    """
    from scipy.spatial.transform import Rotation

    pts = np.asarray(points_px, dtype=np.float64)
    init = _initial_plane_pose(pts, phantom)
    if init is None:
        return float("inf")
    p0 = phantom.wire_front_mm
    d = phantom.wire_directions
    proj = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # (w, 3, 3) removes the along-wire part
    rot = Rotation.from_rotvec(init[:3]).as_matrix()
    t, sc = init[3:6].copy(), init[6:8].copy()
    lam = 1e-3

    def evaluate(rot, t, sc):
        local = np.column_stack([pts * sc, np.zeros(len(pts))])
        q = local @ rot.T + t
        return np.einsum("wij,wj->wi", proj, q - p0), local

    r, local = evaluate(rot, t, sc)
    cost = float((r * r).sum())
    for _ in range(30):
        rq = local @ rot.T  # (w, 3)
        skew = np.zeros((len(pts), 3, 3))
        skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = rq[:, 2], -rq[:, 1], rq[:, 0]
        skew[:, 1, 0], skew[:, 2, 0], skew[:, 2, 1] = -rq[:, 2], rq[:, 1], -rq[:, 0]
        jq = np.concatenate([skew, np.broadcast_to(np.eye(3), (len(pts), 3, 3)),
                             (rot[:, 0][None, :] * pts[:, :1])[:, :, None],
                             (rot[:, 1][None, :] * pts[:, 1:2])[:, :, None]], axis=2)  # (w, 3, 8)
        jac = np.einsum("wij,wjk->wik", proj, jq).reshape(-1, 8)
        g = jac.T @ r.ravel()
        h = jac.T @ jac
        step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
        new_rot = Rotation.from_rotvec(step[:3]).as_matrix() @ rot
        new_t, new_sc = t + step[3:6], sc + step[6:8]
        new_r, new_local = evaluate(new_rot, new_t, new_sc)
        new_cost = float((new_r * new_r).sum())
        if new_cost < cost:
            rot, t, sc, r, local = new_rot, new_t, new_sc, new_r, new_local
            lam = max(lam / 10.0, 1e-9)
            done = cost - new_cost < 1e-6 * max(cost, 1e-4)  # mm^2: far below what the check resolves
            cost = new_cost
            if done:
                break
        else:
            lam *= 10.0
            if lam > 1e6:
                break
    return float(np.linalg.norm(r, axis=1).max())


def _initial_plane_pose(pts, phantom, *, through_line: bool = False):
    """(rotvec, t, sx, sy) of an image plane through the dots' alpha-implied phantom positions.

    With ``through_line`` the plane is the one through the line of the middle points that is
    as perpendicular to the wires as possible, even where the points span a plane (which they
    do only weakly when the diagonals share one image column)."""
    from scipy.spatial.transform import Rotation

    from .correspondences import middle_wire_points_mm, wire_plane_intersections

    middle = middle_wire_points_mm(pts[None], phantom)[0]
    if not np.all(np.isfinite(middle)):
        return None
    d0 = phantom.patterns[0].wires[0].direction
    c = middle.mean(axis=0)
    if len(middle) >= 3 and not through_line:
        _, sv, vt = np.linalg.svd(middle - c)
        normal = vt[2] if sv[1] > 1e-3 * max(sv[0], 1e-9) else d0
    else:
        normal = d0
    if len(middle) >= 2 and len(middle) < 3 or normal is d0:
        # Plane through the middle points, as perpendicular to the wires as possible.
        e = middle[-1] - middle[0]
        e = e / max(np.linalg.norm(e), 1e-9)
        normal = d0 - (d0 @ e) * e
        normal /= max(np.linalg.norm(normal), 1e-9)
    p3 = wire_plane_intersections(c[None], normal[None], phantom)[0]
    mid_idx = np.arange(phantom.n_patterns) * 3 + 1
    p3[mid_idx] = middle
    if not np.all(np.isfinite(p3)):
        return None
    a = np.column_stack([pts, np.ones(len(pts))])
    coef, *_ = np.linalg.lstsq(a, p3, rcond=None)
    sx, sy = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    if sx < 1e-9 or sy < 1e-9:
        return None
    x, y = coef[0] / sx, coef[1] / sy
    z = np.cross(x, y)
    if np.linalg.norm(z) < 1e-6:
        return None
    u, _, vt = np.linalg.svd(np.stack([x, y, z / np.linalg.norm(z)], axis=1))
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return np.concatenate([Rotation.from_matrix(r).as_rotvec(), coef[2], [sx, sy]])


def _search(lines, phantom: NWirePhantom, s: LabelingSettings, subset: np.ndarray):
    """Beam search over patterns (top to bottom) for the best consistent set of lines.

    Returns (candidates, failure): candidates a list of (line indices in pattern order, score),
    best first (empty when nothing is consistent); failure ``(code, text)`` saying which pattern
    and which prior stopped the search (None when candidates were found).
    """
    K = phantom.n_patterns
    if subset.size < K:
        return [], ("too-few-lines", f"{subset.size} candidate lines, {K} needed")
    d_side = phantom.side_spacings_mm
    offsets = phantom.layer_offsets_mm
    tol = s.distance_tolerance_mm
    slo, shi = s.scale_range
    alpha = lines["alpha"][subset]
    length = lines["length"][subset]
    slope = lines["slope"][subset]
    centre = lines["centre"][subset]
    normal = lines["normal"][subset]
    score = lines["score"][subset]
    dots = np.stack([lines["a"], lines["b"], lines["c"]], axis=1)[subset]
    use_bits = int(dots.max()) < 64
    if use_bits:
        bits = np.left_shift(np.uint64(1), dots.astype(np.uint64)).sum(axis=1, dtype=np.uint64)

    def fits(k):
        return _line_fits(alpha, length, phantom, k, s)

    def missing(k):
        return [], ("pattern-missing", _missing_text(phantom, [k], s))

    # Beam: rows of chosen line indices (into subset), with running score.

    beam = np.flatnonzero(fits(0))[:, None]
    if beam.size == 0:
        return missing(0)
    beam_score = score[beam[:, 0]]
    beam_bits = bits[beam[:, 0]] if use_bits else None
    for k in range(1, K):
        cand = np.flatnonzero(fits(k))
        if cand.size == 0:
            return missing(k)
        first = beam[:, 0]
        n0 = normal[first]  # (b, 2)
        gap = np.einsum("bck,bk->bc", centre[cand][None, :, :] - centre[first][:, None, :], n0)  # (b, c)
        dh = offsets[k] - offsets[0]
        parallel = np.abs(slope[cand][None, :] - slope[first][:, None]) <= s.parallel_eps
        if k == 1:
            spaced = (gap >= slo * dh - tol) & (gap <= shi * dh + tol)
        else:
            # Image gap per mm of layer offset: least squares over every chosen line below the
            # first (with one of them, the gap of the second line over its offset). Extrapolating
            # from the first gap alone multiplies its error by dh / (offsets[1] - offsets[0]),
            # too much for stacks spanning several times their first step (Lego 3.1 6N: 92 / 10 mm).
            g = np.stack([np.einsum("bk,bk->b", centre[beam[:, j]] - centre[first], n0) for j in range(1, k)], axis=1)
            dhs = offsets[1:k] - offsets[0]
            c1 = g @ dhs / (dhs @ dhs)
            # The tolerance holds for extrapolating by up to 2x (fCal's third layer from its
            # second); beyond that it grows with the extrapolation, as the prediction's error does.
            reach = abs(dh) / np.sqrt(dhs @ dhs)
            spaced = np.abs(gap - c1[:, None] * dh) <= tol * max(1.0, reach / 2.0)
            spaced &= gap > np.einsum("bk,bk->b", centre[beam[:, -1]] - centre[first], n0)[:, None]
        # Side distances: one common obliquity factor for all patterns.
        c2 = np.stack([length[beam[:, j]] / d_side[j] for j in range(k)], axis=1).mean(axis=1)
        oblique = np.abs(length[cand][None, :] / d_side[k] - c2[:, None]) * d_side[k] <= 1.5 * tol
        # Disjoint dots.
        if use_bits:
            disjoint = (beam_bits[:, None] & bits[cand][None, :]) == 0
        else:
            used = dots[beam].reshape(beam.shape[0], -1)  # (b, 3k)
            disjoint = ~(dots[cand][None, :, :, None] == used[:, None, None, :]).any(axis=(2, 3))
        ok = parallel & spaced & oblique & disjoint
        bi, ci = np.nonzero(ok)
        if bi.size == 0:
            # Which prior removed the last candidates, taken in the order a user reads them:
            # lines made of other patterns' dots first, then parallelism, layer spacing, tilt.
            failed, left = "shared-dots-prior", disjoint
            for code, mask in (("parallel-prior", parallel), ("layer-spacing-prior", spaced),
                               ("obliquity-prior", oblique)):
                if not left.any():
                    break
                failed, left = code, left & mask
            what = {"parallel-prior": f"is parallel to pattern 1 (slope within {s.parallel_eps:g})",
                    "layer-spacing-prior": f"lies at the layer spacing ({dh:.1f} mm) from pattern 1",
                    "obliquity-prior": "has a side-wire distance consistent with the patterns above (one tilt)",
                    "shared-dots-prior": "uses dots not already taken by the patterns above"}[failed]
            return [], (failed, f"{_pattern_label(phantom, k)}: none of its {cand.size} candidate lines {what}")
        new_score = beam_score[bi] + score[cand[ci]]
        order = np.argsort(-new_score)[: s.beam_width]
        beam = np.concatenate([beam[bi[order]], cand[ci[order]][:, None]], axis=1)
        beam_score = new_score[order]
        if use_bits:
            beam_bits = beam_bits[bi[order]] | bits[cand[ci[order]]]
    order = np.argsort(-beam_score)
    return [([int(subset[i]) for i in beam[j]], float(beam_score[j])) for j in order], None

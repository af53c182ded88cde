"""The sequence stage of N-wire detection: recover near-misses, refuse labels that jump.

A probe moves little between frames, so the dots of one frame are predicted well by its
neighbours'. After every frame has been labelled alone (:mod:`.labeling`), this stage

1. fits a provisional ImageToProbe to the accepted frames and their tracked poses (RANSAC+LM,
   :func:`~.solvers.calibrate_ransac_lm`; the registered PhantomToReference, or an estimated one
   for phantoms with >= 3 N-wires) when the recording is tracked. The wires' crossings of each
   frame's image plane then predict its dots ("tracked" prediction), corrected by the mean
   residual of the nearest accepted frames (which removes most of the provisional model's
   error and the tracking lag);
2. refuses an accepted labelling whose dots lie far from that prediction (``motion-inconsistent``:
   a wrong label, e.g. a burned-in scale tick taken for a wire, is several mm off while correct
   labels stay within the model's own scatter) when a third of its wires (at least two) agree
   with the prediction, confirming the tracked pose. When hardly any wire agrees, the pose is
   suspect (a tracking glitch moves every dot): the frame keeps its single-frame labels unless
   strong single-frame candidates at the predicted positions relabel it (``pose_suspect`` in
   the summary; but a labelling that no wire confirms is refused where the tracking puts a wire
   outside the image or its imaged area). Without tracking, a labelling far from the interpolation of the frames
   just before and after it is refused;
3. labels each frame that failed alone (or was refused) from the tracked prediction: every
   wire takes the strongest response peak within a radius of its predicted position derived
   from how well the prediction does on the accepted frames; the sub-pixel centres then pass
   the detector's border rule, the labelling's collinearity test per pattern, a strength test
   (no dot weaker than ``min_strength_ratio`` of the frame's median), and must stay within
   that radius of the prediction, which is the 3D
   check with the tracked pose ("tracked" stage; the single-frame check
   :func:`~.labeling.pose_residual_mm` fits a pose to the frame's own dots, which amplifies
   their noise at coarse spacings and refuses correct sets there);
4. labels what is still missing, in frames without a tracked prediction, from the accepted
   frames within ``max_gap_frames`` before and after it in image space (linear interpolation
   between both sides, or extrapolation of one side's motion), with the same candidate
   matching, the border rule and the single-frame 3D check ("neighbours" stage).

Every radius and tolerance is in pixels of the frame, derived from the accepted frames'
prediction errors (robust statistics: 95th percentiles, medians). Their floors are the larger of
a physical length in mm (converted by the pixel spacing hint) and a few pixels (sub-pixel
localisation and the pixel grid of the candidates), and the jump floor stays below half the
phantom's smallest wire separation (:func:`~.labeling.min_separation_mm`), so a wrong label one
wire over is refused on small phantoms too; the search radius stays below a fraction of the
frame's smallest predicted dot distance. Nothing is tuned on one recording. A frame that
stays rejected keeps its single-frame reason, with why the sequence could not label it
appended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import CalibrationError
from .labeling import LabelingSettings, min_separation_mm, pose_residual_mm
from .phantom import NWirePhantom
from .solvers import MIN_CALIBRATION_FRAMES, calibrate_ransac_lm

__all__ = ["STAGES", "SequenceSettings", "SequenceOutcome", "label_sequence", "predicted_dots_px"]

logger = logging.getLogger(__name__)

#: How a detected frame was labelled: alone, from the tracked prediction, from its neighbours in
#: image space.
STAGES = ("single-frame", "tracked", "neighbours")


@dataclass(frozen=True)
class SequenceSettings:
    """Settings of the sequence stage (lengths in mm are converted with the pixel spacing hint).

    Attributes
    ----------
    enabled : bool
        Run the stage at all.
    max_gap_frames : int
        Neighbours used for a prediction lie at most this many frames away.
    min_radius_mm : float
        Floor of the search radius around a predicted dot: the localisation error of a dot that
        does not shrink with the pixel (physical: the echo's size) ...
    min_radius_px : float
        ... or this many pixels, whichever is larger (a candidate peak on the pixel grid lies up
        to 0.71 px from the true centre; one pixel leaves room for the prediction's noise, and no
        more, so a strong peak next to a faint echo is not taken for it).
    radius_factor : float
        The radius is this many times the 95th percentile of the prediction's error on the
        accepted frames (when that is above the floor).
    max_radius_fraction : float
        The radius stays below this fraction of the smallest distance between two predicted
        dots of the frame, so a dot cannot be taken for its neighbour wire's (geometric: below
        one half, with room for the noise of both dots).
    jump_factor : float
        An accepted labelling is refused when a dot lies farther from the prediction than this
        many times the 95th percentile of the accepted frames' errors (statistical) ...
    min_jump_mm : float
        ... and farther than this (a wrong label is a wire spacing or a screen mark away; a
        physical length, the error of a correct dot never reaches it) ...
    min_jump_fraction : float
        ... which is at most this fraction of the phantom's smallest wire separation
        (:func:`~.labeling.min_separation_mm`; geometric: a label one wire over is that far).
    min_strength_ratio : float
        A recovered dot's detector response is at least this fraction of the median of the
        frame's recovered dots (a noise peak where an echo is missing is refused).
    model_iterations : int
        RANSAC iterations of the provisional calibration.
    seed : int
        Its random seed.
    """

    enabled: bool = True
    max_gap_frames: int = 3
    min_radius_mm: float = 1.0
    min_radius_px: float = 1.0
    radius_factor: float = 2.0
    max_radius_fraction: float = 0.4
    jump_factor: float = 3.0
    min_jump_mm: float = 2.0
    min_jump_fraction: float = 0.5
    min_strength_ratio: float = 0.2
    model_iterations: int = 300
    seed: int = 0

    def __post_init__(self):
        if int(self.max_gap_frames) < 1:
            raise ValueError(f"max_gap_frames: expected >= 1, got {self.max_gap_frames!r}")
        for name in ("min_radius_mm", "min_radius_px", "radius_factor", "max_radius_fraction", "jump_factor",
                     "min_jump_mm", "min_jump_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")


@dataclass(frozen=True, eq=False)
class SequenceOutcome:
    """Labels after the sequence stage.

    Attributes
    ----------
    points_px : (n, n_wires, 2) float64
        Dots, MF image pixels (x, y), phantom wire order; NaN rows where rejected.
    ok : (n,) bool
    stages : list of str
        Per frame, the :data:`STAGES` entry that labelled it ("" where rejected).
    reasons, reason_codes : list of str
        Per frame failure text and :data:`~.labeling.REJECTION_REASONS` code ("" where ok).
    summary : dict
        JSON-safe: ``tracked_model`` (used or why not, its tolerances in px),
        ``recovered`` (frame indices per stage), ``refused`` (indices of refused labellings),
        ``radius_px`` per prediction.
    """

    points_px: np.ndarray
    ok: np.ndarray
    stages: list
    reasons: list
    reason_codes: list
    summary: dict = field(default_factory=dict)


def predicted_dots_px(probe_to_reference, image_to_probe, phantom_to_reference, phantom: NWirePhantom) -> np.ndarray:
    """Where each wire crosses each frame's image plane.

    Parameters
    ----------
    probe_to_reference : (n, 4, 4) float64
        Tracked poses (NaN where not tracked).
    image_to_probe : (4, 4) float64
        Pixels (MF image) -> Probe mm.
    phantom_to_reference : (4, 4) float64
    phantom : NWirePhantom

    Returns
    -------
    (n, n_wires, 2) float64
        Image pixels (x, y); NaN for untracked frames and wires parallel to the plane.
    """
    poses = np.asarray(probe_to_reference, dtype=np.float64)
    tracked = np.all(np.isfinite(poses), axis=(1, 2))
    safe = np.where(tracked[:, None, None], poses, np.eye(4))
    phantom_to_image = np.linalg.inv(safe @ np.asarray(image_to_probe, dtype=np.float64)) @ np.asarray(
        phantom_to_reference, dtype=np.float64)
    rot, t = phantom_to_image[:, :3, :3], phantom_to_image[:, None, :3, 3]
    front = np.einsum("fij,wj->fwi", rot, phantom.wire_front_mm) + t
    back = np.einsum("fij,wj->fwi", rot, phantom.wire_back_mm) + t
    dz = back[..., 2] - front[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        s = -front[..., 2] / dz
    out = front[..., :2] + s[..., None] * (back[..., :2] - front[..., :2])
    out[np.abs(dz) < 1e-12] = np.nan
    out[~tracked] = np.nan
    return out


def _p95(values, default: float) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.percentile(v, 95)) if v.size >= 5 else default


def _neighbours(ok, i: int, gap: int, side: int) -> list:
    """Accepted frames on one side of ``i`` (side -1 before, +1 after), nearest first, within ``gap``."""
    n = ok.size
    return [j for j in range(i + side, i + side * (gap + 1), side) if 0 <= j < n and ok[j]]


def _tracked_model(points, ok, poses, phantom, phantom_to_reference, s: SequenceSettings):
    """(image_to_probe, phantom_to_reference, inlier frames) or (None, reason)."""
    tracked = np.all(np.isfinite(poses), axis=(1, 2))
    usable = ok & tracked
    if usable.sum() < MIN_CALIBRATION_FRAMES:
        return None, f"{int(usable.sum())} tracked frames labelled alone, {MIN_CALIBRATION_FRAMES} needed"
    if phantom_to_reference is None and phantom.n_patterns < 3:
        return None, f"no PhantomToReference and {phantom.n_patterns} N-wires (3 needed to estimate it)"
    pts = np.where(usable[:, None, None], points, np.nan)
    try:
        sol = calibrate_ransac_lm(pts, poses, phantom, phantom_to_reference=phantom_to_reference,
                                  n_iterations=s.model_iterations, seed=s.seed)
    except (CalibrationError, np.linalg.LinAlgError, ValueError) as exc:
        return None, f"the provisional calibration failed: {exc}"
    return (sol.image_to_probe, sol.phantom_to_reference, sol.frames_used & usable), ""


def _corrected(pred, resid, good, i, gap):
    """Prediction for frame ``i`` corrected by the mean residual of the nearest good frames."""
    js = _neighbours(good, i, gap, -1)[:2] + _neighbours(good, i, gap, +1)[:2]
    if not js:
        return pred[i], False
    return pred[i] + resid[js].mean(axis=0), True


def _match(pred_px, candidates, strengths, radius_px: float, min_strength_ratio: float):
    """Each wire's strongest candidate within ``radius_px`` of its prediction: (points, missing wires, weak wires).

    A wire is weak when its dot's strength is below ``min_strength_ratio`` times the median of
    the frame's chosen dots (a noise peak where the echo is missing).
    """
    cand = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    w_all = list(range(len(pred_px)))
    if cand.shape[0] == 0:
        return None, w_all, []
    st = np.ones(cand.shape[0]) if strengths is None else np.asarray(strengths, dtype=np.float64).reshape(-1)
    d = np.linalg.norm(pred_px[:, None, :] - cand[None, :, :], axis=2)  # (w, c)
    near = d <= radius_px
    missing = [w for w in w_all if not near[w].any()]
    if missing:
        return None, missing, []
    chosen = np.argmax(np.where(near, st[None, :], -np.inf), axis=1)
    if np.unique(chosen).size < chosen.size:
        return None, [w for w in w_all if np.sum(chosen == chosen[w]) > 1], []
    weak = [w for w in w_all if st[chosen[w]] < min_strength_ratio * float(np.median(st[chosen]))]
    if weak:
        return None, [], weak
    return cand[chosen].copy(), [], []


def _no_match_text(phantom, missing, weak, radius, what):
    if missing:
        return (f"no dot candidate of {', '.join(phantom.wire_names[w] for w in missing)} within {radius:.1f} px "
                f"of {what}")
    return f"only a weak peak for {', '.join(phantom.wire_names[w] for w in weak)} near {what}"


def _pattern_names(phantom: NWirePhantom, k: int) -> str:
    return f"pattern {k + 1} ({', '.join(phantom.patterns[k].names)})"


def _not_collinear(points_px, phantom: NWirePhantom, spacing_mm, s: LabelingSettings):
    """First pattern whose middle dot is off the line of its side dots (labelling's collinearity test), else None.

    The three crossings of an N-wire pattern are collinear; dots taken from noise peaks are not.
    ``s``: the labeling settings resolved for the phantom and spacing.
    """
    q = np.asarray(points_px, dtype=np.float64) * spacing_mm
    for k in range(phantom.n_patterns):
        a, b, c = q[3 * k: 3 * k + 3]
        ac = c - a
        length = float(np.linalg.norm(ac))
        if length <= 0:
            return k
        perp = abs(ac[0] * (b - a)[1] - ac[1] * (b - a)[0]) / length  # mm
        if not (perp < s.collinearity_eps * length and perp < s.collinearity_max_mm):
            return k
    return None


def _radius(pred_px, base_px: float, s: SequenceSettings) -> float:
    d = np.linalg.norm(pred_px[:, None, :] - pred_px[None, :, :], axis=2)
    d[np.eye(len(pred_px), dtype=bool)] = np.inf
    return float(min(base_px, s.max_radius_fraction * d.min()))


def label_sequence(points_px, ok, candidates, phantom: NWirePhantom, pixel_spacing_mm, *, reasons, reason_codes,
                   probe_to_reference=None, phantom_to_reference=None, verify=None, search=None,
                   image_size_px=None, imaged=None, max_wire_distance_mm=None, labeling=None,
                   settings: SequenceSettings | None = None) -> SequenceOutcome:
    """Refuse labels that jump and label failed frames from the sequence (see the module docstring).

    Parameters
    ----------
    points_px : (n, n_wires, 2) float
        Single-frame dots (MF image pixels, phantom wire order), NaN rows where rejected.
    ok : (n,) bool
        Frames labelled alone.
    candidates : list of (m_i, 2) float arrays
        Every frame's dot candidates (pixels), searched near the predictions unless ``search``
        is given.
    phantom : NWirePhantom
    pixel_spacing_mm : float or (sx, sy)
        The spacing hint (mm floors -> pixels).
    reasons, reason_codes : list of str
        Single-frame failure texts and codes ("" where ok).
    probe_to_reference : (n, 4, 4) float, optional
        Tracked poses (NaN rows where not tracked); without them only the image-space stage runs.
    phantom_to_reference : (4, 4) float, optional
        The phantom registration (estimated when absent and the phantom has >= 3 N-wires).
    verify : callable(frame index, (n_wires, 2) points) -> (points or None, code, text), optional
        Sub-pixel refinement and the detector's border rule; ``None`` takes the candidates as
        they are (the checks below apply either way).
    search : callable(frame index) -> ((m, 2) points px, (m,) strengths), optional
        The candidates searched near a frame's predicted dots (e.g. every response peak, without
        the single-frame filters); default: ``candidates`` with equal strengths.
    image_size_px : (cols, rows), optional
        A frame whose tracked prediction puts a wire outside the image is not searched.
    imaged : callable(frame index, (n_wires, 2) points px) -> (n_wires,) bool, optional
        Whether each point lies in the imaged area (not on the empty screen around a sector).
    max_wire_distance_mm : float, optional
        The single-frame 3D check's limit for the image-space stage (default: the labeling's,
        derived for the phantom and spacing).
    labeling : LabelingSettings, optional
        The single-frame labeling's settings (default :class:`~.labeling.LabelingSettings`),
        resolved for the phantom and spacing (:meth:`~.labeling.LabelingSettings.resolved`):
        their collinearity test and 3D check apply to the recovered frames.
    settings : SequenceSettings, optional

    Returns
    -------
    SequenceOutcome
    """
    s = settings or SequenceSettings()
    pts = np.array(points_px, dtype=np.float64, copy=True)
    ok = np.array(ok, dtype=bool, copy=True).reshape(-1)
    n = ok.size
    if pts.shape != (n, phantom.n_wires, 2):
        raise ValueError(f"points_px: expected shape ({n}, {phantom.n_wires}, 2) (one row per frame of ok and wire "
                         f"of {phantom.name}), got {pts.shape}")
    for name, value in (("candidates", candidates), ("reasons", reasons), ("reason_codes", reason_codes)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} entries (one per frame), got {len(value)}")
    reasons = list(reasons)
    codes = list(reason_codes)
    stages = ["single-frame" if v else "" for v in ok]
    has_image = np.array([c != "no-image" for c in codes], dtype=bool)  # frames without an image stay rejected
    spacing_mm = np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=np.float64), (2,))
    mm_to_px = 1.0 / float(np.mean(spacing_mm))
    floor_px = max(s.min_radius_mm * mm_to_px, s.min_radius_px)
    min_jump_px = min(s.min_jump_mm, s.min_jump_fraction * min_separation_mm(phantom)) * mm_to_px
    summary = {"tracked_model": {"used": False}, "recovered": {"tracked": [], "neighbours": []}, "refused": []}
    if not s.enabled or n == 0:
        summary["enabled"] = False
        return SequenceOutcome(pts, ok, stages, reasons, codes, summary)
    summary["enabled"] = True
    if verify is None:
        def verify(i, p):
            return p, "", ""
    lab = (labeling or LabelingSettings()).resolved(phantom, spacing_mm)
    limit = lab.max_wire_distance_mm if max_wire_distance_mm is None else float(max_wire_distance_mm)
    searched = {}

    def search_in(i):
        if i not in searched:
            searched[i] = search(i) if search is not None else (candidates[i], None)
        return searched[i]
    tried = {}  # frame -> why each sequence prediction could not label it

    def accept(i, guess, stage, predicted_px=None, radius_px=None):
        refined, code, text = verify(i, guess)
        if refined is None:
            return text or code
        bent = _not_collinear(refined, phantom, spacing_mm, lab)
        if bent is not None:
            return f"the dots of {_pattern_names(phantom, bent)} are not on one line"
        if predicted_px is not None:
            # The tracked prediction is the 3D check here, with the tracked pose instead of a
            # pose fitted to the frame's own dots (which amplifies the dots' noise at coarse
            # spacings and near-perpendicular views): every refined dot stays near it.
            off = np.linalg.norm(refined - predicted_px, axis=1)
            if not np.all(off <= radius_px):
                w = int(np.nanargmax(off))
                return (f"the refined dot of {phantom.wire_names[w]} lies {off[w]:.1f} px from the prediction "
                        f"(radius {radius_px:.1f} px)")
        else:
            res = pose_residual_mm(refined, phantom) if limit > 0 else 0.0
            if not res <= limit:
                return f"its dots fail the 3D check ({res:.2f} mm > {limit:g} mm)"
        pts[i] = refined
        ok[i] = True
        stages[i] = stage
        reasons[i] = ""
        codes[i] = ""
        summary["recovered"][stage].append(int(i))
        return ""

    # 1-3: the tracked prediction.
    poses = None if probe_to_reference is None else np.asarray(probe_to_reference, dtype=np.float64)
    model = None
    predicted = np.zeros(n, dtype=bool)  # frames the tracked prediction has decided on
    if poses is not None and poses.shape[0] == n:
        model, why = _tracked_model(pts, ok, poses, phantom, phantom_to_reference, s)
        if model is None:
            summary["tracked_model"]["reason"] = why
    else:
        summary["tracked_model"]["reason"] = "the recording is not tracked"
    if model is not None:
        x, y, inl = model
        pred = predicted_dots_px(poses, x, y, phantom)
        resid = pts - pred
        raw = np.linalg.norm(resid, axis=2).max(axis=1)  # (n,) largest dot error per frame, px
        # Leave-one-out error of the corrected prediction on the model's inlier frames.
        loo = []
        for i in np.flatnonzero(inl):
            inl_i = inl.copy()
            inl_i[i] = False
            p, corrected = _corrected(pred, resid, inl_i, i, s.max_gap_frames)
            if corrected:
                loo.append(float(np.linalg.norm(pts[i] - p, axis=1).max()))
        scale_raw = _p95(raw[inl], floor_px)
        jump_px = max(s.jump_factor * scale_raw, min_jump_px)
        base_px = max(floor_px, s.radius_factor * _p95(loo, floor_px))
        summary["tracked_model"] = {"used": True, "frames": int(inl.sum()), "error_p95_px": round(scale_raw, 2),
                                    "jump_tolerance_px": round(jump_px, 2), "radius_px": round(base_px, 2)}
        # A wrong label leaves the other wires where the tracked motion puts them: a third of the
        # wires (at least two) within the model's scatter confirm the frame's pose, and the frame
        # is refused. Otherwise the tracked pose itself may be wrong (a tracking glitch moves
        # every dot): the labelling is kept unless strong single-frame candidates at the
        # predicted positions label the frame anew.
        agree_px = max(floor_px, s.radius_factor * scale_raw)
        dist = np.linalg.norm(resid, axis=2)
        suspect = {}
        for i in np.flatnonzero(ok & (raw > jump_px)):
            w = int(np.nanargmax(dist[i]))
            confirmed = int(np.sum(dist[i] <= agree_px)) >= max(2, -(-phantom.n_wires // 3))
            # Nothing agrees and the tracking puts wires outside the image: the labelling cannot
            # be a whole pattern there (a partial view labelled with other echoes), refuse it.
            outside = image_size_px is not None and bool(np.any(
                (pred[i, :, 0] < 0) | (pred[i, :, 0] > image_size_px[0] - 1) | (pred[i, :, 1] < 0)
                | (pred[i, :, 1] > image_size_px[1] - 1)))
            if not outside and imaged is not None:
                outside = not bool(np.all(imaged(int(i), pred[i])))
            confirmed = confirmed or outside
            if not confirmed:
                suspect[int(i)] = (pts[i].copy(), w)
            pts[i] = np.nan
            ok[i] = False
            stages[i] = ""
            codes[i] = "motion-inconsistent"
            reasons[i] = (f"wire {phantom.wire_names[w]}'s dot lies {raw[i]:.1f} px from where the tracked motion "
                          f"puts it (tolerance {jump_px:.1f} px)")
            if confirmed:
                summary["refused"].append(int(i))
        summary["tracked_model"]["pattern_agreement_px"] = round(agree_px, 2)
        good = inl & ok
        for i in np.flatnonzero(~ok & has_image & np.all(np.isfinite(pred), axis=(1, 2))):
            guess_at, corrected = _corrected(pred, resid, good, i, s.max_gap_frames)
            predicted[i] = True
            if image_size_px is not None:
                outside = ((guess_at[:, 0] < 0) | (guess_at[:, 0] > image_size_px[0] - 1) | (guess_at[:, 1] < 0)
                           | (guess_at[:, 1] > image_size_px[1] - 1))
                if outside.any():
                    tried.setdefault(i, []).append(
                        f"the tracked motion puts {', '.join(phantom.wire_names[w] for w in np.flatnonzero(outside))} "
                        "outside the image")
                    continue
            radius = _radius(guess_at, base_px if corrected else max(base_px, s.radius_factor * scale_raw), s)
            if i in suspect:
                # The pose is in doubt: only strong single-frame candidates may relabel the frame.
                found = _match(guess_at, candidates[i], None, radius, s.min_strength_ratio)
            else:
                found = _match(guess_at, *search_in(i), radius, s.min_strength_ratio)
            guess, missing, weak = found
            if guess is None:
                tried.setdefault(i, []).append(_no_match_text(phantom, missing, weak, radius, "the tracked prediction"))
                continue
            why = accept(i, guess, "tracked", guess_at, radius)
            if why:
                tried.setdefault(i, []).append(f"the tracked prediction's dots: {why}")
        for i, (kept, w) in suspect.items():
            if ok[i]:  # relabelled from the prediction: the single-frame labelling was wrong
                summary["refused"].append(i)
                continue
            pts[i] = kept
            ok[i] = True
            stages[i] = "single-frame"
            reasons[i] = ""
            codes[i] = ""
            tried.pop(i, None)
            summary.setdefault("pose_suspect", []).append(i)
        if suspect:
            logger.info("frames whose tracked pose disagrees with every pattern (kept as labelled alone): %s",
                        summary.get("pose_suspect", []))
    else:
        # Without tracking: refuse labellings far from the interpolation of both adjacent frames.
        both = np.zeros(n, dtype=bool)
        both[1:-1] = ok[:-2] & ok[1:-1] & ok[2:]
        interp = np.full(n, np.nan)
        for i in np.flatnonzero(both):
            interp[i] = np.linalg.norm(pts[i] - 0.5 * (pts[i - 1] + pts[i + 1]), axis=1).max()
        # The errors include the jumps themselves (and half of them at the adjacent frames): a
        # scale robust to a few, 2.5 medians (about the 95th percentile of well-behaved errors).
        finite = interp[np.isfinite(interp)]
        scale = min(_p95(finite, floor_px), 2.5 * float(np.median(finite))) if finite.size else floor_px
        jump_px = max(s.jump_factor * scale, min_jump_px)
        summary["image_jump_tolerance_px"] = round(jump_px, 2)
        padded = np.nan_to_num(np.concatenate([[0.0], interp, [0.0]]), nan=0.0)
        # Only the frame that jumps most: its neighbours' interpolations include it and deviate by half.
        peak = (padded[1:-1] >= padded[:-2]) & (padded[1:-1] >= padded[2:])
        bad = np.flatnonzero((interp > jump_px) & peak)
        for i in bad:
            w = int(np.argmax(np.linalg.norm(pts[i] - 0.5 * (pts[i - 1] + pts[i + 1]), axis=1)))
            codes[i] = "motion-inconsistent"
            reasons[i] = (f"wire {phantom.wire_names[w]}'s dot jumps {interp[i]:.1f} px from between the adjacent "
                          f"frames' (tolerance {jump_px:.1f} px)")
            summary["refused"].append(int(i))
        pts[bad] = np.nan
        ok[bad] = False
        for i in bad:
            stages[i] = ""

    # 4: image-space continuity from the accepted neighbours, for frames without a tracked
    # prediction (the tracked one already holds the neighbours' dots and the motion).
    single = np.array([st == "single-frame" for st in stages])
    errs = {"interpolated": [], "extrapolated": []}
    for i in range(n):
        if not single[i]:
            continue
        if 0 < i < n - 1 and single[i - 1] and single[i + 1]:
            errs["interpolated"].append(np.linalg.norm(pts[i] - 0.5 * (pts[i - 1] + pts[i + 1]), axis=1).max())
        if i >= 2 and single[i - 1] and single[i - 2]:
            errs["extrapolated"].append(np.linalg.norm(pts[i] - (2 * pts[i - 1] - pts[i - 2]), axis=1).max())
    base = {k: max(floor_px, s.radius_factor * _p95(v, floor_px)) for k, v in errs.items()}
    summary["radius_px"] = {k: round(v, 2) for k, v in base.items()}
    for i in np.flatnonzero(~ok & ~predicted & has_image):
        before = _neighbours(ok, i, s.max_gap_frames, -1)
        after = _neighbours(ok, i, s.max_gap_frames, +1)
        if before and after:
            a, b = before[0], after[0]
            f = (i - a) / (b - a)
            guess_at = (1 - f) * pts[a] + f * pts[b]
            radius = base["interpolated"] * max(1.0, (b - a) / 2.0)
        elif before or after:
            side = before or after
            a = side[0]
            if len(side) > 1 and abs(side[1] - a) == 1:
                guess_at = pts[a] + (pts[a] - pts[side[1]]) * abs(i - a)
            else:
                guess_at = pts[a]
            radius = base["extrapolated"] * abs(i - a)
        else:
            tried.setdefault(i, []).append(f"no frame labelled within {s.max_gap_frames} frames")
            continue
        radius = _radius(guess_at, radius, s)
        guess, missing, weak = _match(guess_at, *search_in(i), radius, s.min_strength_ratio)
        if guess is None:
            tried.setdefault(i, []).append(_no_match_text(phantom, missing, weak, radius, "the neighbours' dots"))
            continue
        why = accept(i, guess, "neighbours")
        if why:
            tried.setdefault(i, []).append(f"the neighbours' prediction's dots: {why}")
    for i, why in tried.items():
        if not ok[i] and reasons[i]:
            reasons[i] = f"{reasons[i]}; sequence: {'; '.join(why)}"
    summary["refused"] = sorted(summary["refused"])
    if summary["recovered"]["tracked"] or summary["recovered"]["neighbours"] or summary["refused"]:
        logger.info("sequence stage: %d frames recovered from the tracked prediction, %d from the neighbours, "
                    "%d labels refused", len(summary["recovered"]["tracked"]),
                    len(summary["recovered"]["neighbours"]), len(summary["refused"]))
    return SequenceOutcome(pts, ok, stages, reasons, codes, summary)

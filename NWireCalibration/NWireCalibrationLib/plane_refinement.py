"""Joint refinement of a frame's dots from the phantom's geometry (issue 23).

The dots of one frame are not independent: they are where ONE image plane crosses the
phantom's known straight wires. Given the plane's pose in the Phantom frame (rotation and
translation, 6 degrees of freedom) and the image's pixel spacing ``(sx, sy)``, every dot is
determined: wire ``j`` (point ``p_j``, direction ``d_j``) crosses the plane with normal ``n``
through ``t`` at ``q_j = p_j + d_j n.(t - p_j) / n.d_j``, which lies at pixel
``((q_j - t).e_x / sx, (q_j - t).e_y / sy)`` (``e_x``, ``e_y`` the image axes in the Phantom
frame). Fitting that pose to a frame's ``w`` labelled dots (``2 w`` coordinates, 6 unknowns)
averages the single-dot localisation noise (speckle moves each echo's centre independently):
for independent noise the fitted positions scatter by ``sqrt(p / 2w)`` of the measured ones on
average (``p`` fitted parameters), e.g. ``sqrt(6 / 18) = 0.58`` for 9 dots.

Why the spacing is fitted once per recording
--------------------------------------------
The spacing a detector gets is a hint (PLUS ``ApproximateSpacingMmPerPixel``, rounded): a
0.5 % error moves a dot 400 px from the image centre by 2 px, far more than the noise, so the
pose with the hint's spacing cannot replace any dot. The true spacing is one per recording
(one depth setting), so it is estimated from the recording itself: every frame is first fitted
with its own pose and spacing (8 parameters), the recording's spacing is the median of the
frames' spacings, and the final per-frame fits hold it fixed (6 parameters; fitting 8 per frame
would leave ``sqrt(8 / 18) = 0.67`` of the noise for a 9-dot phantom instead of 0.58, and
spacings of nearby frames that disagree are not physical). The spacing stays a per-axis scale
(``sx``, ``sy``): B-mode images are scan-converted to a Cartesian grid, so an in-plane shear or
rotation is not a degree of freedom of the image; see ``docs`` in the module's benchmark note.

When a dot is replaced
----------------------
The noise of the measured centres (per image axis: lateral and axial resolution differ) is
estimated from the recording's residuals (median absolute residual, corrected for the fitted
degrees of freedom). Each frame is fitted robustly (soft-L1 loss at one noise sigma), then:

- a dot whose residual exceeds the 99.9 % quantile of the noise (chi-square, 2 degrees of
  freedom) is an **outlier** and is left out of the fit. Where its measured centre still lies
  within the echo's own extent of the model's position (``echo_radius_mm``, half the Hessian
  detector's ``echo_size_mm``) it is on the predicted echo and speckle moved it (the noise has
  heavier tails than a Gaussian): it is replaced like the others, provided the other dots
  predict it more precisely than a measurement (the fit's covariance; in a two-N phantom
  nothing but the diagonal's own dot fixes its lateral position). Farther out the model
  disagrees strongly (an echo merged with another, another echo): the measured centre is kept
  and the dot is reported;
- the pose is fitted again to the other dots (ordinary least squares), and when their
  residuals together are consistent with the noise (chi-square test at 99.9 %, ``2 w' - 6``
  degrees of freedom) they are replaced by the model's positions; otherwise the frame keeps
  every measured centre (**model rejected**: e.g. a phantom definition that does not match
  the phantom, a curved image) and the frame is reported.

Too few dots for a redundant fit (fewer than 2 coordinates beyond the parameters) leave the
frame unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation
from scipy.stats import chi2

from .phantom import NWirePhantom
from .results import format_plane_fit

__all__ = [
    "PlaneRefinementSettings",
    "FramePlaneFit",
    "PlaneRefinement",
    "predict_dots_px",
    "fit_frame_plane",
    "refine_dots_by_plane",
]

logger = logging.getLogger(__name__)

#: Parameters of the final per-frame fit (rotation, translation).
_POSE_DOF = 6


@dataclass(frozen=True)
class PlaneRefinementSettings:
    """Options of :func:`refine_dots_by_plane`.

    Attributes
    ----------
    spacing : str
        ``"recording"`` (default): one ``(sx, sy)`` for the whole recording, the median of the
        per-frame fits; ``"frame"``: each frame fits its own (8 parameters); ``"hint"``: the
        given spacing is exact (6 parameters, no spacing fit).
    outlier_probability : float
        A dot is an outlier when noise alone exceeds its residual with this probability
        (chi-square, 2 degrees of freedom); the same level tests a frame's fit as a whole.
    min_noise_px : float
        Lower bound of the estimated noise (pixels): exact (noise-free) dots would otherwise make
        rounding errors look like outliers.
    echo_radius_mm : float
        Half a wire echo's extent (the Hessian detector's ``echo_size_mm / 2``): an outlier dot
        (left out of the fit) whose measured centre is within this distance of the model's
        position lies on the predicted echo and is replaced too; farther out it keeps its measured
        centre and is reported.
    """

    spacing: str = "recording"
    outlier_probability: float = 1e-3
    min_noise_px: float = 0.01
    echo_radius_mm: float = 0.5

    def __post_init__(self):
        if self.spacing not in ("recording", "frame", "hint"):
            raise ValueError(f"spacing: expected 'recording', 'frame' or 'hint', got {self.spacing!r}")
        if not 0.0 < self.outlier_probability < 0.5:
            raise ValueError(f"outlier_probability: expected a probability in (0, 0.5), got {self.outlier_probability!r}")
        if not self.echo_radius_mm >= 0:
            raise ValueError(f"echo_radius_mm: expected >= 0 mm, got {self.echo_radius_mm!r}")
        if not self.min_noise_px > 0:
            raise ValueError(f"min_noise_px: expected > 0 pixels, got {self.min_noise_px!r}")


def _spacing_pair(pixel_spacing_mm) -> np.ndarray:
    sp = np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=np.float64), (2,)).copy()
    if not np.all(np.isfinite(sp) & (sp > 0)):
        raise ValueError(f"pixel_spacing_mm: expected positive mm per pixel (sx, sy), got {pixel_spacing_mm!r}")
    return sp


def predict_dots_px(image_to_phantom, phantom: NWirePhantom, wires=None) -> np.ndarray:
    """Where the wires cross the image plane, in image pixels.

    Parameters
    ----------
    image_to_phantom : (4, 4) float
        Maps ``(x, y, 0, 1)`` pixels to Phantom mm (columns 0 and 1 carry the pixel spacing).
    phantom : NWirePhantom
    wires : (k,) int, optional
        Wire indices (default every wire, in phantom order).

    Returns
    -------
    (k, 2) float64, (x, y) pixels, MF image; NaN where a wire is parallel to the plane.
    """
    m = np.asarray(image_to_phantom, dtype=np.float64)
    idx = np.arange(phantom.n_wires) if wires is None else np.asarray(wires, dtype=int)
    ex, ey, t = m[:3, 0], m[:3, 1], m[:3, 3]
    n = np.cross(ex, ey)
    return _predict(ex, ey, n, t, phantom.wire_front_mm[idx], phantom.wire_directions[idx])


def _predict(ex, ey, n, t, p0, d):
    """Pixels of the wires' crossings with the plane ``t + x ex + y ey`` (``ex``, ``ey`` mm per pixel)."""
    den = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ((t - p0) @ n) / den
    q = p0 + s[:, None] * d - t
    # Solve q = x ex + y ey (ex, ey orthogonal but scaled by the spacing).
    return np.column_stack([q @ ex / (ex @ ex), q @ ey / (ey @ ey)])


def _rotation(v: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (Rodrigues; cheaper than building a scipy Rotation per call)."""
    theta = float(np.sqrt(v @ v))
    k = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    if theta < 1e-12:
        return np.eye(3) + k
    return np.eye(3) + (np.sin(theta) / theta) * k + ((1.0 - np.cos(theta)) / theta ** 2) * (k @ k)


def _matrix(rot: np.ndarray, t: np.ndarray, sp: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = rot[:, 0] * sp[0], rot[:, 1] * sp[1], rot[:, 2]
    m[:3, 3] = t
    return m


@dataclass(frozen=True, eq=False)
class FramePlaneFit:
    """One frame's image plane fitted to its dots.

    Attributes
    ----------
    ok : bool
        The fit converged with redundancy (more coordinates than parameters).
    image_to_phantom : (4, 4) float64
        ``(x, y, 0, 1)`` pixels -> Phantom mm (NaN when not ok).
    pixel_spacing_mm : (2,) float64
        ``(sx, sy)`` used or fitted.
    predicted_px : (w, 2) float64
        The model's dots, (x, y) pixels (NaN when not ok).
    residual_px : (w, 2) float64
        ``measured - predicted`` (NaN for missing dots).
    used : (w,) bool
        The dots the final fit used (not missing, not an outlier).
    prediction_sd_px : (w, 2) float64
        Standard deviation of each predicted dot along x and y from the fit's covariance (the
        measured centres' noise ``noise_px`` propagated through the fitted parameters), pixels;
        about ``sqrt(h) noise`` for a dot the fit used (``h`` its leverage), and as large as
        the parameters it alone would fix are uncertain for one the fit left out.
    """

    ok: bool
    image_to_phantom: np.ndarray
    pixel_spacing_mm: np.ndarray
    predicted_px: np.ndarray
    residual_px: np.ndarray
    used: np.ndarray
    prediction_sd_px: np.ndarray = None


#: Tilt (radians) of the extra starts of a frame's plane fit about each image axis (:func:`fit_frame_plane`).
_RESTART_TILT_RAD = float(np.radians(15.0))


def _initial(points_px, phantom, sp_hint, *, through_line: bool = False):
    from .labeling import _initial_plane_pose

    init = _initial_plane_pose(points_px, phantom, through_line=through_line)
    if init is None or not np.all(np.isfinite(init)):
        return None
    return Rotation.from_rotvec(init[:3]).as_matrix(), init[3:6].copy(), init[6:8].copy()


def fit_frame_plane(points_px, phantom: NWirePhantom, pixel_spacing_mm, *, fit_spacing: bool = True,
                    noise_px=(1.0, 1.0), loss: str = "soft_l1", use=None, start=None) -> FramePlaneFit:
    """Fit one image plane's pose (and optionally the pixel spacing) to a frame's dots.

    Parameters
    ----------
    points_px : (w, 2) float
        The frame's dots in phantom wire order, (x, y) pixels, MF image; NaN rows are missing.
    phantom : NWirePhantom
    pixel_spacing_mm : float or (sx, sy)
        mm per pixel: the starting value with ``fit_spacing``, else held fixed.
    fit_spacing : bool
        Fit ``(sx, sy)`` too (8 parameters) instead of the pose alone (6).
    noise_px : (2,) float
        Noise sigma of the measured centres along x and y (pixels): the residuals are divided
        by it, and the robust loss turns linear beyond one sigma.
    loss : str
        :func:`scipy.optimize.least_squares` loss (``"soft_l1"``, ``"linear"``, ...).
    use : (w,) bool, optional
        Dots the fit may use (default: every finite dot).
    start : FramePlaneFit, optional
        Start from this fit's pose instead of the dots' alpha-implied plane.

    Returns
    -------
    FramePlaneFit
    """
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.shape != (phantom.n_wires, 2):
        raise ValueError(f"points_px: expected shape ({phantom.n_wires}, 2) for phantom {phantom.name!r}, "
                         f"got {pts.shape}")
    sp0 = _spacing_pair(pixel_spacing_mm)
    noise = np.broadcast_to(np.asarray(noise_px, dtype=np.float64), (2,))
    finite = np.all(np.isfinite(pts), axis=1)
    sel = finite if use is None else finite & np.asarray(use, dtype=bool)
    w = phantom.n_wires
    nan2 = np.full((w, 2), np.nan)

    def failed():
        return FramePlaneFit(False, np.full((4, 4), np.nan), sp0, nan2.copy(), nan2.copy(), sel)

    n_par = _POSE_DOF + (2 if fit_spacing else 0)
    if 2 * sel.sum() < n_par + 2:  # a redundancy of at least 2 coordinates
        return failed()
    if start is not None and start.ok:
        m = start.image_to_phantom
        sp_start = np.linalg.norm(m[:3, :2], axis=0)
        rot0 = np.column_stack([m[:3, 0] / sp_start[0], m[:3, 1] / sp_start[1], m[:3, 2]])
        t0 = m[:3, 3].copy()
    else:
        if not finite.all():
            return failed()  # the alpha-implied start needs every dot
        init = _initial(pts, phantom, sp0)
        if init is None:
            return failed()
        rot0, t0, _ = init
    # An orthonormal start (the alpha-implied one is a least-squares fit).
    u, _, vt = np.linalg.svd(rot0)
    rot0 = u @ vt
    if np.linalg.det(rot0) < 0:
        return failed()
    p0, d = phantom.wire_front_mm[sel], phantom.wire_directions[sel]
    meas = pts[sel]

    def unpack(x):
        rot = rot0 @ _rotation(x[:3])
        sp = x[6:8] if fit_spacing else sp0
        return rot, x[3:6], sp

    def residuals(x):
        rot, t, sp = unpack(x)
        pred = _predict(rot[:, 0] * sp[0], rot[:, 1] * sp[1], rot[:, 2], t, p0, d)
        return ((pred - meas) / noise).ravel()

    x0 = np.concatenate([np.zeros(3), t0] + ([sp0] if fit_spacing else []))
    if not np.all(np.isfinite(residuals(x0))):
        return failed()
    starts = [x0]
    if start is None or not start.ok:
        # The cost has more than one minimum where a rotation out of the image plane is weakly
        # fixed, and the dots' alpha-implied plane can start far from the right one: a phantom
        # whose diagonals share one image column puts their middle points on a line, around which
        # the plane through them turns freely (seen 70 deg off), and the turn about the image's
        # vertical axis is then fixed only through the parallel wires' spacing (its cosine). So
        # the fit also starts from the plane through that line as perpendicular to the wires as
        # possible; where the two fits end apart (more than one minimum within reach), also
        # tilted either way about the image's two axes. The lowest cost is kept.
        line = _initial(pts, phantom, sp0, through_line=True)
        if line is not None:
            u, _, vt = np.linalg.svd(line[0])
            if np.linalg.det(u @ vt) > 0:
                x = x0.copy()
                x[:3] = Rotation.from_matrix(rot0.T @ (u @ vt)).as_rotvec()
                x[3:6] = line[1]
                starts.append(x)
        tilted = []
        for axis in range(2):
            for sign in (-1.0, 1.0):
                x = x0.copy()
                x[axis] = sign * _RESTART_TILT_RAD
                tilted.append(x)
        if len(starts) == 1:
            starts += tilted
            tilted = []
    else:
        tilted = []
    fits = []  # (cost, solution) of each start that converged; inf where one did not

    def run(x_start):
        try:
            # Converged when a step moves the plane by ~1e-7 of its distance from the phantom origin
            # (~1e-5 mm, far below a pixel) or lowers the cost by a relative 1e-6.
            trial = least_squares(residuals, x_start, loss=loss, f_scale=1.0, x_scale="jac", method="trf", ftol=1e-6,
                                  xtol=1e-7)
        except (ValueError, np.linalg.LinAlgError) as exc:
            logger.debug("plane fit failed: %s", exc)
            fits.append((np.inf, None))
            return
        good = trial.success and np.all(np.isfinite(trial.x))
        fits.append((trial.cost if good else np.inf, trial if good else None))

    for x_start in starts:
        run(x_start)
    costs = [c for c, _ in fits]
    if tilted and not (len(costs) >= 2 and abs(costs[0] - costs[1]) <= 1e-3 * (1.0 + min(costs))):
        for x_start in tilted:  # the first two starts ended apart (or one failed)
            run(x_start)
    sol = min(fits, key=lambda f: f[0])[1] if fits else None
    if sol is None:
        return failed()
    rot, t, sp = unpack(sol.x)
    if not (sol.success and np.all(np.isfinite(sol.x)) and np.all(sp > 0)):
        return failed()
    m = _matrix(rot, t, sp)
    pw, dw = phantom.wire_front_mm, phantom.wire_directions
    pred = _predict(m[:3, 0], m[:3, 1], rot[:, 2], t, pw, dw)

    def predict_all(x):
        r_, t_, s_ = unpack(x)
        return _predict(r_[:, 0] * s_[0], r_[:, 1] * s_[1], r_[:, 2], t_, pw, dw).ravel()

    # Covariance of the parameters from the used dots (noise units), propagated to every dot.
    steps = np.concatenate([np.full(3, 1e-6), np.full(3, 1e-4)] + ([np.full(2, 1e-7)] if fit_spacing else []))
    jac = np.column_stack([(predict_all(sol.x + e) - predict_all(sol.x - e)) / (2 * e[k])
                           for k, e in enumerate(np.diag(steps))])  # (2w, p), pixels per parameter
    scale = np.tile(1.0 / noise, phantom.n_wires)
    rows = np.repeat(sel, 2)
    ju = jac[rows] * scale[rows, None]
    try:
        cov = np.linalg.inv(ju.T @ ju)
        var = np.einsum("ij,jk,ik->i", jac, cov, jac).reshape(-1, 2)
        sd = np.sqrt(np.maximum(var, 0.0))
    except np.linalg.LinAlgError:
        sd = np.full((phantom.n_wires, 2), np.inf)
    return FramePlaneFit(True, m, np.asarray(sp, dtype=np.float64).copy(), pred, pts - pred, sel, sd)


@dataclass(frozen=True, eq=False)
class PlaneRefinement:
    """Outcome of :func:`refine_dots_by_plane` on a recording.

    Attributes
    ----------
    points_px : (n, w, 2) float64
        The dots: the model's position where a dot was replaced, else the measured one.
    replaced : (n, w) bool
        Dots replaced by the model's position.
    outliers : (n, w) bool
        Dots whose residual exceeded the noise (left out of the fit; replaced when within
        ``echo_radius_mm`` of the model's position, else their measured centre is kept).
    model_rejected : (n,) bool
        Frames whose fit as a whole was inconsistent with the noise (every centre kept).
    residual_px : (n, w, 2) float64
        ``measured - model`` of the final fit (NaN where not fitted).
    image_to_phantom : (n, 4, 4) float64
        Fitted ``(x, y, 0, 1)`` pixels -> Phantom mm per frame (NaN where not fitted).
    pixel_spacing_mm : (2,) float64
        The spacing the final fits held (``"recording"``: the median of the frames' fits).
    noise_px : (2,) float64
        Estimated noise sigma of the measured centres along x and y, pixels.
    summary : dict
        JSON-safe counts (frames fitted, dots replaced, outliers with frame/wire/residual,
        model-rejected frames, spacing, noise).
    """

    points_px: np.ndarray
    replaced: np.ndarray
    outliers: np.ndarray
    model_rejected: np.ndarray
    residual_px: np.ndarray
    image_to_phantom: np.ndarray
    pixel_spacing_mm: np.ndarray
    noise_px: np.ndarray
    summary: dict

    def __str__(self) -> str:
        return format_plane_fit(self.summary)


def _robust_sigma(r: np.ndarray, dof_fraction: float, floor: float) -> float:
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan")
    # 1.4826 MAD estimates a Gaussian's sigma; fitted residuals shrink by sqrt(1 - p / m) on average.
    return max(floor, 1.4826 * float(np.median(np.abs(r))) / np.sqrt(max(1e-3, 1.0 - dof_fraction)))


def refine_dots_by_plane(points_px, ok, phantom: NWirePhantom, pixel_spacing_mm, *,
                         settings: PlaneRefinementSettings | None = None) -> PlaneRefinement:
    """Replace each labelled frame's dots by the fitted image plane's crossings with the wires.

    See the module docstring for the model and the tests that decide which dots are replaced.

    Parameters
    ----------
    points_px : (n, w, 2) float
        Labelled dots per frame in phantom wire order, (x, y) pixels, MF image; NaN where missing.
    ok : (n,) bool
        Frames to refine (the detected ones).
    phantom : NWirePhantom
    pixel_spacing_mm : float or (sx, sy)
        The spacing hint (mm per pixel): the start of the spacing fit (or, with
        ``settings.spacing="hint"``, the spacing).
    settings : PlaneRefinementSettings, optional

    Returns
    -------
    PlaneRefinement
    """
    s = settings or PlaneRefinementSettings()
    pts = np.array(points_px, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (phantom.n_wires, 2):
        raise ValueError(f"points_px: expected shape (n_frames, {phantom.n_wires}, 2) for phantom "
                         f"{phantom.name!r}, got {pts.shape}")
    ok = np.asarray(ok, dtype=bool)
    if ok.shape != (pts.shape[0],):
        raise ValueError(f"ok: expected shape ({pts.shape[0]},), got {ok.shape}")
    hint = _spacing_pair(pixel_spacing_mm)
    n, w = pts.shape[:2]
    frames = np.flatnonzero(ok & np.any(np.all(np.isfinite(pts), axis=2), axis=1))

    def first_pass(wire_ok, starts):
        """1. Every frame with its own pose and spacing (unit weights, loss linear beyond a pixel):
        the recording's spacing (their median) and the noise of the dots."""
        first: dict[int, FramePlaneFit] = {}
        for i in frames:
            st = starts.get(i)
            f = fit_frame_plane(pts[i], phantom, hint if st is None else st.pixel_spacing_mm,
                                fit_spacing=s.spacing != "hint", use=wire_ok, start=st)
            if f.ok:
                first[i] = f
        if not first:
            return first, hint, np.full(2, np.nan)
        spacings = np.array([f.pixel_spacing_mm for f in first.values()])
        res1 = np.concatenate([f.residual_px[f.used] for f in first.values()])
        n_par1 = _POSE_DOF + (2 if s.spacing != "hint" else 0)
        dof_fraction = n_par1 / np.mean([2.0 * f.used.sum() for f in first.values()])
        noise = np.array([_robust_sigma(res1[:, k], dof_fraction, s.min_noise_px) for k in range(2)])
        return first, (np.median(spacings, axis=0) if s.spacing == "recording" else hint), noise

    wire_ok = np.ones(w, bool)
    first, spacing, noise = first_pass(wire_ok, {})
    d2_limit = float(chi2.isf(s.outlier_probability, 2))
    fit_sp = s.spacing == "frame"
    n_par = _POSE_DOF + (2 if fit_sp else 0)
    systematic = []
    fits: dict[int, FramePlaneFit] = {}
    rounds = 0
    while True:
        previous, fits = fits, {}
        for i, f1 in first.items():
            sp = f1.pixel_spacing_mm if fit_sp else spacing
            # 2. Robust fit in noise units; outliers by their own residual.
            robust = fit_frame_plane(pts[i], phantom, sp, fit_spacing=fit_sp, noise_px=noise,
                                     start=previous.get(i, f1), use=wire_ok)
            if not robust.ok:
                continue
            fits[i] = robust
        # 4. The model must agree with each wire over the recording: a wire whose residuals keep one
        # sign (a wire that is not where the phantom definition puts it, a detector bias on its
        # echo) would hand its model error to every replaced dot. Replacing a dot changes its
        # mean squared error from sigma^2 to about b^2 + sigma^2 p / 2w (b the wire's systematic
        # residual, sigma the scatter about it, p / 2w the fit's share of the noise left), so it
        # only helps while |b| < sigma sqrt(1 - p / 2w). A failing wire keeps its measured
        # centres and leaves the fits. Every wire is checked again against the fits without the
        # failing ones (a wire that only failed through a bad neighbour's pull comes back), until
        # the set of failing wires stays the same.
        if len(fits) < 2:
            break
        res = np.stack([f.residual_px for f in fits.values()])  # (m, w, 2)
        use = np.stack([f.used for f in fits.values()])
        share = n_par / (2.0 * np.mean(use.sum(axis=1)))
        agree, systematic = np.ones(w, bool), []
        for j in range(w):
            r = res[np.all(np.isfinite(res[:, j]), axis=1), j]
            if len(r) < 2:
                continue
            bias = np.median(r, axis=0)
            scatter = np.maximum(1.4826 * np.median(np.abs(r - bias), axis=0), s.min_noise_px)
            if np.any(np.abs(bias) > scatter * np.sqrt(max(1e-3, 1.0 - share))):
                agree[j] = False
                systematic.append({"wire": phantom.wire_names[j], "bias_px": [round(float(v), 3) for v in bias],
                                   "scatter_px": [round(float(v), 3) for v in scatter]})
        rounds += 1
        if np.array_equal(agree, wire_ok) or rounds > w:
            break
        wire_ok = agree
        if 2 * wire_ok.sum() < n_par + 2:
            fits = {}
            break
        # The spacing and the noise again without the wires that disagree (they pulled both).
        first, spacing, noise = first_pass(wire_ok, first)
    for d in systematic:
        logger.info("plane refinement: wire %s disagrees with the model over the recording (bias %s px, "
                    "scatter %s px): its measured centres are kept", d["wire"], d["bias_px"], d["scatter_px"])
    finals = {}
    for i, robust in fits.items():
        # 3. Least squares on the other dots. A far-off dot still pulls the robust fit a little,
        # so the dots are tested again against the least-squares fit without the outliers (a
        # dot it explains is taken back) until the outliers stay the same.
        fit, out_i = robust, np.zeros(w, bool)
        for _ in range(3):
            d2 = np.sum((fit.residual_px / noise) ** 2, axis=1)
            new_out = robust.used & (d2 > d2_limit)
            if fit is not robust and np.array_equal(new_out, out_i):
                break
            out_i = new_out
            fit = fit_frame_plane(pts[i], phantom, robust.pixel_spacing_mm, fit_spacing=fit_sp, noise_px=noise,
                                  loss="linear", use=robust.used & ~out_i, start=robust)
            if not fit.ok:
                break
        if fit.ok and fit is not robust:
            finals[i] = (fit, out_i)
    fits = finals

    if fits:  # the noise of the dots the final fits used (wires that disagree no longer inflate it)
        res = np.concatenate([f.residual_px[f.used] for f, _ in fits.values()])
        share = n_par / np.mean([2.0 * f.used.sum() for f, _ in fits.values()])
        noise = np.array([_robust_sigma(res[:, k], share, s.min_noise_px) for k in range(2)])
    out = pts.copy()
    replaced = np.zeros((n, w), bool)
    outliers = np.zeros((n, w), bool)
    rejected = np.zeros(n, bool)
    residual = np.full((n, w, 2), np.nan)
    i2p = np.full((n, 4, 4), np.nan)
    kept = []
    sp_mm = np.asarray(spacing, dtype=np.float64)
    for i, (final, out_i) in fits.items():
        residual[i], i2p[i] = final.residual_px, final.image_to_phantom
        outliers[i] = out_i
        # The frame's fit as a whole must be consistent with the noise.
        dof = 2 * int(final.used.sum()) - n_par
        chi = float(np.sum((final.residual_px[final.used] / noise) ** 2))
        if chi > chi2.isf(s.outlier_probability, dof):
            rejected[i] = True
            continue
        # An outlier within the echo's own extent of the model's position: the measured centre
        # lies on the echo the model predicts, the speckle moved it (the localisation noise has
        # heavier tails than a Gaussian); the phantom is rigid and this wire and the frame's other
        # dots agree with the model, so the model's position is the better estimate. Farther
        # out the measured centre lies on something else (another echo, a merged pair): kept.
        # The model's position must also be better known than a measured centre: a dot whose
        # coordinate only it fixes (a diagonal's lateral position in a two-N phantom) is not
        # predicted by the other dots at all once it is left out.
        on_echo = (out_i & (np.hypot(*(final.residual_px * sp_mm).T) <= s.echo_radius_mm)
                   & np.all(final.prediction_sd_px < noise, axis=1))
        take = final.used | on_echo
        out[i, take] = final.predicted_px[take]
        replaced[i] = take
        for j in np.flatnonzero(out_i & ~on_echo):
            kept.append({"frame": int(i), "wire": phantom.wire_names[j],
                         "residual_px": [round(float(v), 3) for v in final.residual_px[j]]})
    summary = {
        "spacing_model": s.spacing,
        "frames_fitted": int(np.isfinite(i2p[:, 0, 0]).sum()),
        "frames_refined": int(replaced.any(axis=1).sum()),
        "dots_replaced": int(replaced.sum()),
        "outlier_dots": int(outliers.sum()),
        "outlier_dots_kept": len(kept),
        "frames_model_rejected": int(rejected.sum()),
        "model_rejected_frames": [int(i) for i in np.flatnonzero(rejected)],
        "kept_dots": kept,
        "wires_kept_as_measured": systematic,
        "pixel_spacing_mm": [float(v) for v in spacing],
        "pixel_spacing_hint_mm": [float(v) for v in hint],
        "noise_px": [None if not np.isfinite(v) else float(v) for v in noise],
    }
    result = PlaneRefinement(out, replaced, outliers, rejected, residual, i2p, np.asarray(spacing, float),
                             noise, summary)
    logger.info("%s", result)
    return result

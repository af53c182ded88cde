"""N-wire calibration benchmark: our detector and solvers vs PLUS and the baselines (issue 4).

Run ``python Testing/benchmarks/bench_nwire.py [--quick] [--frames N]``; prints tables and
writes ``Testing/benchmarks/results/nwire.json``. Under pytest (``make benchmark``) a quick run
checks that every part produces sane numbers; it never asserts on speed.

Parts:

- **PLUS data** (``../shared/data/plus``; skipped when absent): the PLUS-compatible linear solver
  on PLUS's own dots vs PLUS's ImageToProbe; every detector (hessian, plus, agcfd, tacd) on the
  fCal 2.0 calibration (190) and validation (103) recordings: frames detected, PLUS dots matched
  within 5 px, dots on a wrong echo, frames/s (all OpenCV threads, and the Hessian detector on one
  thread); calibration accuracy (PLUS 3D error on the validation set, best 95 % and all) of each
  solver from our dots, from the PLUS-style detector's dots, and PLUS's reported numbers; wall
  time of a full ``calibrate`` (detect 190 + 103 frames + solve); calibration reproducibility
  (CRE) over random halves of the calibration frames; calibration variants (time offset 0 / auto,
  solvers, robust LM losses) with their blocked cross-validation error on the calibration
  recording (the selection criterion) next to the validation error.
- **Simulation**: linear and convex probes at 5, 8, 10, 12 cm with 10 % outlier poses and 5 %
  echo dropouts: recognition / false-detection rates of all detectors against the truth, and the
  image-plane target error (mean over the field of view) of LM, RANSAC+LM (known phantom pose)
  and RANSAC+LM with the phantom pose estimated, plus the gap between estimated- and known-pose
  solutions.
- **Keyframes**: frames consumed until convergence and the convergence curve.
- **Every phantom** (issue 23; ``--only-phantoms`` runs just this): each built-in phantom (every
  PLUS phantom) simulated with linear, convex and TRUS probes, frame-grabbed screens (burned-in
  text, calipers, a grey-level bar, letterboxing) and partial/oblique views. Quick by default
  (5 cases of 20 frames at 410x308 px, also under ``--quick``); ``--phantoms-full``: 9 cases of
  60 frames at 820x616 px, with gains and depths:
  detection recall (whole-pattern frames detected with every dot within 5 px), precision,
  dots within 1 px of the truth, wrong labels, and the rejected frames' reasons; the frames the
  sequence stage recovered (from the tracked prediction / the neighbours) and refused, and the
  recall and wrong labels of single-frame labelling alone (``--no-sequence-stage`` semantics)
  for comparison; the dots' mean error (bias) and spread along x and y. ``--refine-model peak``
  runs the table with another sub-pixel centre estimator (the one before issue 23's
  ``"adaptive"``), ``--phantoms NAME ...`` with some phantoms only, ``--cases LABEL ...`` with some
  cases only (labels as printed, e.g. ``"linear, gain 0.6"``), ``--no-plane-refinement`` without
  the joint image-plane refinement of each frame's dots (:mod:`NWireCalibrationLib.plane_refinement`,
  default on; each row records what it did: dots replaced, outliers, wires kept as measured).

Other engineers share the machine's cores: the load average is recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PLUS = REPO.parent / "shared" / "data" / "plus"
RESULTS = HERE / "results" / "nwire.json"
PLUS_REPORTED = {"validation_trimmed95_mm": 0.539932, "validation_mean_all_mm": 0.569,
                 "calibration_trimmed95_mm": 0.479116, "calibration_frames": 184, "validation_frames": 103}

sys.path.insert(0, str(REPO / "Testing"))  # script mode: the test helpers


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _f(x, nd=3):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


# --------------------------------------------------------------------------------------------
# PLUS fCal 2.0 data
# --------------------------------------------------------------------------------------------


def bench_plus(quick: bool) -> dict | None:
    from FreehandUSLib.io import read_sequence

    from NWireCalibrationLib.metrics import (
        calibration_reproducibility,
        detection_rates,
        reprojection_errors_3d,
        trimmed_statistics,
    )
    from NWireCalibrationLib.pipeline import DETECTORS, calibrate, calibrate_from_points, detect_sequence, load_setup
    from NWireCalibrationLib.plus_results import read_plus_calibration_results
    from NWireCalibrationLib.solvers import calibrate_linear

    cfg = PLUS / "ConfigFiles" / "PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml"
    if not cfg.is_file():
        return None
    setup = load_setup(cfg)
    cal = read_sequence(PLUS / "TestImages" / "fCal_Test_Calibration_3NWires_fCal2.0.igs.mha")
    val = read_sequence(PLUS / "TestImages" / "fCal_Test_Validation_3NWires_fCal2.0.igs.mha")
    res = read_plus_calibration_results(PLUS / "TestImages" / "FreehandCalibration3NWires_fCal2.0.results.xml")
    ref_c = res.calibration.points_for(cal.n_frames)
    ref_v = res.validation.points_for(val.n_frames)
    poses_c = cal.repository().get("ProbeToReference")
    poses_v = val.repository().get("ProbeToReference")
    out: dict = {"plus_reported": PLUS_REPORTED, "load_before": _load()}

    lin = calibrate_linear(ref_c, poses_c, setup.phantom_to_reference, setup.phantom)
    out["linear_solver_vs_plus"] = {"max_abs_element_difference": float(np.abs(lin.image_to_probe - res.image_to_probe).max()),
                                    "frames": int(lin.info["frames_usable"])}

    det_out = {}
    dots = {}
    for name in DETECTORS:
        dc = detect_sequence(cal, setup, detector=name)
        dv = detect_sequence(val, setup, detector=name)
        rc, rv = detection_rates(dc.points_px, ref_c), detection_rates(dv.points_px, ref_v)
        det_out[name] = {
            "calibration_frames_detected": dc.frames_detected, "validation_frames_detected": dv.frames_detected,
            "plus_dots_matched_5px": int(rc.dots_matched + rv.dots_matched),
            "plus_dots_total": int(rc.dots_reference + rv.dots_reference),
            "plus_dots_matched_fraction": _f((rc.dots_matched + rv.dots_matched) / (rc.dots_reference + rv.dots_reference), 4),
            "dots_beyond_5px_of_plus": int(rc.dots_false + rv.dots_false),
            "dots_on_wrong_echo": int(rc.dots_wrong + rv.dots_wrong),
            "mean_distance_to_plus_px": _f((rc.mean_distance_px + rv.mean_distance_px) / 2, 2),
            "frames_per_second": _f((cal.n_frames + val.n_frames) / (dc.seconds + dv.seconds), 1),
            "failed_calibration_frames": [int(i) for i in np.flatnonzero(~dc.ok)],
        }
        dots[name] = (dc.points_px, dv.points_px)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    detect_sequence(cal, setup)
    det_out["hessian"]["frames_per_second_1_thread"] = _f(cal.n_frames / (time.perf_counter() - t0), 1)
    cv2.setNumThreads(threads)
    out["detection"] = det_out
    out["opencv_threads"] = threads

    acc = {}
    iters = 500 if quick else 3000
    for label, (pc, pv) in (("hessian", dots["hessian"]), ("plus-style", dots["plus"])):
        for solver, pose in (("lsq", "known"), ("lm", "known"), ("ransac-lm", "known"), ("ransac-lm", "estimate")):
            r = calibrate_from_points(pc, poses_c, setup.phantom, phantom_to_reference=setup.phantom_to_reference,
                                      solver=solver, phantom_pose=pose, validation_points_px=pv,
                                      validation_poses=poses_v, ransac_iterations=iters)
            acc[f"{label} dots, {solver}, pose {pose}"] = {
                "validation_trimmed95_mm": _f(r.validation.error3d_trimmed95_mean_mm, 4),
                "validation_mean_all_mm": _f(r.validation.error3d_mean_mm, 4),
                "validation_max_mm": _f(r.validation.error3d_max_mm, 3),
                "calibration_trimmed95_mm": _f(r.calibration.error3d_trimmed95_mean_mm, 4),
                "validation_error2d_px": _f(r.validation.error2d_mean_px, 2),
                "frames_used": r.calibration.frames_used, "solve_seconds": _f(r.seconds, 2),
                "warnings": r.warnings,
            }
    out["accuracy"] = acc

    from NWireCalibrationLib.detect_hessian import HessianSettings

    fitted = HessianSettings(refine_model="clipped-gaussian")  # opt-in: better CV, worse validation
    fitted_dots = (detect_sequence(cal, setup, hessian=fitted).points_px,
                   detect_sequence(val, setup, hessian=fitted).points_px)
    out["variants"] = bench_variants(cal, val, setup, dots["hessian"], iters,
                                     other_centres={"clipped-gaussian": fitted_dots})

    t0 = time.perf_counter()
    full = calibrate(cal, val, setup, solver="ransac-lm", ransac_iterations=iters)
    out["full_calibration_seconds"] = _f(time.perf_counter() - t0, 2)
    out["full_calibration_validation_trimmed95_mm"] = _f(full.validation.error3d_trimmed95_mean_mm, 4)
    out["full_calibration_validation_mean_all_mm"] = _f(full.validation.error3d_mean_mm, 4)
    out["full_calibration_time_offset_s"] = _f(full.info.get("time_offset_s", 0.0), 4)

    rng = np.random.default_rng(0)
    pc = dots["hessian"][0]
    cre = {}
    for solver in ("lsq", "lm", "ransac-lm"):
        mats = []
        for _ in range(6 if quick else 10):
            keep = np.zeros(cal.n_frames, bool)
            keep[rng.choice(cal.n_frames, cal.n_frames // 2, replace=False)] = True
            sub = np.where(keep[:, None, None], pc, np.nan)
            r = calibrate_from_points(sub, poses_c, setup.phantom, phantom_to_reference=setup.phantom_to_reference,
                                      solver=solver, ransac_iterations=300)
            mats.append(r.image_to_probe)
        cre[solver] = {k: (_f(v) if isinstance(v, float) else v)
                       for k, v in calibration_reproducibility(mats, (cal.n_cols, cal.n_rows)).items()}
    out["cre_random_halves"] = cre
    e_plus = trimmed_statistics(reprojection_errors_3d(ref_v, poses_v, res.image_to_probe, setup.phantom_to_reference,
                                                       setup.phantom))
    out["plus_matrix_recomputed_validation_trimmed95_mm"] = _f(e_plus.trimmed_mean, 4)
    out["load_after"] = _load()
    return out


def bench_variants(cal, val, setup, dots, iters: int, other_centres=None) -> dict:
    """Calibration variants on fCal 2.0: blocked-CV error on the calibration recording and validation error.

    The calibration-CV error (the selection criterion) splits the calibration frames into 5
    contiguous blocks, predicts each from a calibration fitted to the other 4 and reports the
    95 %-trimmed mean of PLUS's 3D middle-wire error; the validation recording only gives the
    final number. Variants: time offset 0 vs auto (estimated on the calibration recording), each
    solver, LM with robust losses, RANSAC+LM with noise-weighted residuals (``weighting="noise"``),
    and RANSAC+LM on dots from another sub-pixel centre estimator (``other_centres``: label ->
    (calibration dots, validation dots); the default dots are ``HessianSettings().refine_model``'s).
    """
    from NWireCalibrationLib.detect_hessian import HessianSettings
    from NWireCalibrationLib.metrics import reprojection_errors_3d, trimmed_statistics
    from NWireCalibrationLib.pipeline import calibrate_from_points
    from NWireCalibrationLib.solvers import calibrate_lm
    from NWireCalibrationLib.temporal import estimate_time_offset, probe_to_reference_at

    pc, pv = dots
    y, ph = setup.phantom_to_reference, setup.phantom
    t0 = time.perf_counter()
    est = estimate_time_offset(pc, cal, ph, phantom_to_reference=y)
    out = {"time_offset": est.to_dict(), "time_offset_seconds": _f(time.perf_counter() - t0, 2), "rows": []}

    def fit(points, poses, solver, loss, weighting):
        if loss is None:
            return calibrate_from_points(points, poses, ph, phantom_to_reference=y, solver=solver,
                                         ransac_iterations=iters, weighting=weighting).image_to_probe
        return calibrate_lm(points, poses, ph, phantom_to_reference=y, loss=loss).image_to_probe

    variants = (("lsq", None, "none"), ("lm", None, "none"), ("ransac-lm", None, "none"), ("lm", "huber", "none"),
                ("lm", "cauchy", "none"), ("ransac-lm", None, "noise"))
    default_centre = HessianSettings().refine_model
    runs = [(lab, off, sv, ls, wt, default_centre, pc, pv) for lab, off in (("0", 0.0), ("auto", est.offset_s))
            for sv, ls, wt in variants]
    for centre, (oc, ov) in (other_centres or {}).items():
        off = estimate_time_offset(oc, cal, ph, phantom_to_reference=y).offset_s
        runs.append(("auto", off, "ransac-lm", None, "none", centre, oc, ov))
    for offset_label, offset, solver, loss, weighting, centre, pc, pv in runs:
        poses_c, poses_v = probe_to_reference_at(cal, offset), probe_to_reference_at(val, offset)
        held = []
        for block in np.array_split(np.arange(cal.n_frames), 5):
            train = pc.copy()
            train[block] = np.nan
            m_train = fit(train, poses_c, solver, loss, weighting)
            e = reprojection_errors_3d(pc[block], poses_c[block], m_train, y, ph)
            held.append(e[np.all(np.isfinite(e), axis=1)])
        cv = trimmed_statistics(np.concatenate(held))
        m = fit(pc, poses_c, solver, loss, weighting)
        ev = reprojection_errors_3d(pv, poses_v, m, y, ph)
        vs = trimmed_statistics(ev[np.all(np.isfinite(ev), axis=1)])
        out["rows"].append({"time_offset": offset_label, "time_offset_s": _f(offset, 4), "solver": solver,
                            "loss": loss or "linear", "weighting": weighting, "centre": centre,
                            "calibration_cv_trimmed95_mm": _f(cv.trimmed_mean, 4),
                            "calibration_cv_mean_all_mm": _f(cv.mean, 4),
                            "validation_trimmed95_mm": _f(vs.trimmed_mean, 4),
                            "validation_mean_all_mm": _f(vs.mean, 4)})
    return out


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


def bench_simulation(quick: bool, n_frames: int) -> dict:
    from NWireCalibrationLib.metrics import detection_rates, target_errors_mm
    from NWireCalibrationLib.pipeline import DETECTORS, calibrate_from_points, detect_sequence, probe_to_reference
    from NWireCalibrationLib.simulate import simulate_nwire
    from nwire_synthetic import setup_for

    depths = (50.0, 120.0) if quick else (50.0, 80.0, 100.0, 120.0)
    size = (410, 308) if quick else (820, 616)
    rows = []
    for probe in ("linear", "convex"):
        for depth in depths:
            sim = simulate_nwire(probe=probe, depth_mm=depth, n_frames=n_frames, seed=11, image_size_px=size,
                                 outlier_fraction=0.1, dropout_fraction=0.05)
            setup = setup_for(sim)
            row = {"probe": probe, "depth_mm": depth, "frames": n_frames, "frames_visible": int(sim.visible.sum()),
                   "outlier_poses": int(sim.outlier.sum()), "pixel_spacing_mm": [round(v, 4) for v in sim.pixel_spacing_mm]}
            truth = np.where(sim.visible[:, None, None], sim.true_points_px, np.nan)
            hess = None
            for name in DETECTORS if not quick else ("hessian", "plus"):
                det = detect_sequence(sim.sequence, setup, detector=name)
                r = detection_rates(det.points_px, truth, tolerance_px=5.0)
                row[name] = {"recognition": _f(r.recognition_rate, 4),
                             "false_rate": _f((r.dots_false + 9 * r.frames_false) / max(1, 9 * det.frames_detected), 4),
                             "frames_false": r.frames_false, "dots_wrong": r.dots_wrong,
                             "mean_error_px": _f(r.mean_distance_px, 2),
                             "frames_per_second": _f(det.frames_per_second, 1)}
                if name == "hessian":
                    hess = det
            poses = probe_to_reference(sim.sequence)
            fov = sim.fov_points_px()
            sols = {}
            for key, solver, pose in (("lm_known", "lm", "known"), ("ransac_lm_known", "ransac-lm", "known"),
                                      ("ransac_lm_estimate", "ransac-lm", "estimate")):
                t0 = time.perf_counter()
                res = calibrate_from_points(hess.points_px, poses, sim.phantom,
                                            phantom_to_reference=sim.phantom_to_reference, solver=solver,
                                            phantom_pose=pose, ransac_iterations=1000 if quick else 3000)
                sols[key] = res.image_to_probe
                row[f"target_error_mm_{key}"] = _f(target_errors_mm(res.image_to_probe, sim.image_to_probe,
                                                                    points_px=fov).mean())
                row[f"seconds_{key}"] = _f(time.perf_counter() - t0, 2)
            row["estimate_vs_known_mm"] = _f(target_errors_mm(sols["ransac_lm_estimate"], sols["ransac_lm_known"],
                                                              points_px=fov).mean())
            lm, rl = row["target_error_mm_lm_known"], row["target_error_mm_ransac_lm_known"]
            row["ransac_improvement_over_lm"] = _f(1.0 - rl / lm, 3) if lm else None
            rows.append(row)
            print(f"  simulated {probe} {depth:g} mm done", file=sys.stderr, flush=True)
    return {"cases": rows, "image_size_px": list(size)}


def frame_scores(points_px, truth_px, whole, *, tolerance_px: float = 5.0) -> dict:
    """Detection scores of one simulated case against the truth.

    Parameters
    ----------
    points_px : (n, w, 2) detected dots (NaN rows where a frame was rejected), MF pixels.
    truth_px : (n, w, 2) simulated dots (NaN for wires outside the field of view), MF pixels.
    whole : (n,) bool, frames where the whole pattern is visible (every wire echoes in the image).

    Returns
    -------
    dict: ``recall`` (whole frames detected correctly / whole frames), ``precision`` (correct
    frames / detected frames: a detection on a partial frame, or with a dot more than
    ``tolerance_px`` from its wire's truth, is wrong), ``dots_within_1px`` (of the dots of the
    detected whole frames), ``dot_error_px`` (their signed error ``found - truth``: mean ``bias`` and
    standard deviation ``spread`` along image x (lateral for linear probes) and y (axial), pixels,
    over the dots within ``tolerance_px``), ``wrong_labels`` (detected dots nearer another wire's true dot than
    ``tolerance_px``), and the counts.
    """
    det = np.all(np.isfinite(points_px), axis=(1, 2))
    d = np.linalg.norm(points_px - truth_px, axis=2)  # (n, w), NaN where either is missing
    correct = det & whole & np.all(d <= tolerance_px, axis=1)
    other = np.linalg.norm(points_px[:, :, None, :] - truth_px[:, None, :, :], axis=3)  # (n, w, w)
    w = points_px.shape[1]
    other[:, np.arange(w), np.arange(w)] = np.inf
    wrong = int(np.sum(det[:, None] & np.any(np.nan_to_num(other, nan=np.inf) <= tolerance_px, axis=2)
                       & ~(np.nan_to_num(d, nan=np.inf) <= tolerance_px)))
    dots = d[det & whole]
    err = (points_px - truth_px)[det & whole].reshape(-1, 2)
    err = err[np.linalg.norm(err, axis=1) <= tolerance_px]
    return {"frames": int(det.size), "frames_whole": int(whole.sum()), "frames_detected": int(det.sum()),
            "frames_correct": int(correct.sum()),
            "recall": _f(correct.sum() / whole.sum(), 4) if whole.any() else None,
            "precision": _f(correct.sum() / det.sum(), 4) if det.any() else None,
            "dots_within_1px": _f(np.mean(dots <= 1.0), 4) if dots.size else None,
            "dot_error_px": ({"bias": [_f(v) for v in err.mean(axis=0)], "spread": [_f(v) for v in err.std(axis=0)]}
                             if len(err) else None),
            "wrong_labels": wrong}


def _phantom_cases(quick: bool):
    """(label, probe, overrides) per case of the per-phantom table."""
    grab = ("text", "calipers", "colour-bar")
    cases = [("linear", "linear", {}),
             ("convex, screen text+calipers+bar", "convex", {"overlays": grab}),
             ("TRUS, letterbox+text", "trus", {"overlays": ("letterbox", "text")}),
             ("linear, 30 % partial, oblique", "linear", {"partial_fraction": 0.3, "tilt_deg": 18.0}),
             ("linear, +20 mm depth", "linear", {"depth_extra_mm": 20.0})]
    if not quick:
        cases += [("linear, gain 0.6", "linear", {"gain": 0.6}),
                  ("linear, gain 1.6 (saturating)", "linear", {"gain": 1.6}),
                  ("convex, +30 mm depth, all overlays", "convex",
                   {"depth_extra_mm": 30.0, "overlays": grab + ("letterbox",)}),
                  ("TRUS, 30 % partial, calipers", "trus", {"partial_fraction": 0.3, "overlays": ("calipers",)})]
    return cases


def bench_phantoms(quick: bool, n_frames: int, phantoms=None, refine_model: str | None = None, cases=None,
                   plane_refinement: bool = True) -> dict:
    """Every built-in phantom under several probes, screen overlays and partial/oblique views (issue 23).

    Each case simulates ``n_frames`` frames with :func:`settings_for_phantom` (a depth and width
    that show the phantom) and runs the default (Hessian) detector with the phantom and a rounded
    spacing hint; :func:`frame_scores` scores it against the truth. ``refine_model`` replaces the
    default sub-pixel centre estimator (``HessianSettings.refine_model``), to compare them.
    """
    from NWireCalibrationLib.detect_hessian import HessianSettings
    from NWireCalibrationLib.phantom import builtin_phantom_names
    from NWireCalibrationLib.pipeline import detect_sequence
    from NWireCalibrationLib.simulate import settings_for_phantom, simulate_nwire
    from nwire_synthetic import setup_for

    size = (410, 308) if quick else (820, 616)
    hessian = HessianSettings(refine_model=refine_model) if refine_model else HessianSettings()
    rows = []
    load = _load()
    t_all = time.perf_counter()
    for name in phantoms or builtin_phantom_names():
        for k, (label, probe, over) in enumerate(_phantom_cases(quick)):
            if cases is not None and label not in cases:
                continue
            over = dict(over)
            extra = over.pop("depth_extra_mm", 0.0)
            st = settings_for_phantom(name, probe, n_frames=n_frames, image_size_px=size, seed=100 + k, **over)
            if extra:
                st = settings_for_phantom(name, probe, n_frames=n_frames, image_size_px=size, seed=100 + k,
                                          depth_mm=st.depth_mm + extra, **over)
            row = {"phantom": name, "case": label, "probe": probe, "depth_mm": st.depth_mm}
            try:
                sim = simulate_nwire(st)
            except ValueError as exc:
                row["error"] = str(exc)
                rows.append(row)
                continue
            setup = setup_for(sim)
            alone = frame_scores(detect_sequence(sim.sequence, setup, sequence_stage=False, hessian=hessian,
                                                 plane_refinement=plane_refinement).points_px,
                                 sim.true_points_px, sim.visible)
            det = detect_sequence(sim.sequence, setup, hessian=hessian, plane_refinement=plane_refinement)
            row.update(frame_scores(det.points_px, sim.true_points_px, sim.visible))
            row["single_frame"] = {k: alone[k] for k in ("recall", "precision", "wrong_labels", "frames_detected")}
            row["detected_by_stage"] = det.stage_counts()
            row["refused_by_sequence"] = len(det.refused_frames())
            row["rejected_by_reason"] = det.rejection_counts()
            row["rejected_whole_frames_by_reason"] = {}
            for i in np.flatnonzero(~det.ok & sim.visible):
                code = det.reason_code(i)
                row["rejected_whole_frames_by_reason"][code] = row["rejected_whole_frames_by_reason"].get(code, 0) + 1
            row["frames_per_second"] = _f(det.frames_per_second, 1)
            if det.plane_fit is not None:
                pf = det.plane_fit
                row["plane_refinement"] = {k: pf[k] for k in ("dots_replaced", "outlier_dots", "frames_model_rejected",
                                                              "pixel_spacing_mm", "noise_px")}
                row["plane_refinement"]["wires_kept_as_measured"] = [d["wire"] for d in pf["wires_kept_as_measured"]]
                row["pixel_spacing_true_mm"] = [float(v) for v in sim.pixel_spacing_mm]
            rows.append(row)
        print(f"  phantom {name} done", file=sys.stderr, flush=True)
    return {"cases": rows, "image_size_px": list(size), "frames_per_case": n_frames,
            "refine_model": hessian.refine_model, "plane_refinement": plane_refinement, "load_before": load,
            "load_after": _load(), "seconds": _f(time.perf_counter() - t_all, 1)}


def bench_keyframes(quick: bool) -> dict:
    from NWireCalibrationLib.keyframes import select_keyframes
    from NWireCalibrationLib.metrics import target_errors_mm
    from NWireCalibrationLib.pipeline import detect_sequence, probe_to_reference
    from NWireCalibrationLib.simulate import simulate_nwire
    from nwire_synthetic import setup_for

    n = 150 if quick else 400
    sim = simulate_nwire(probe="linear", depth_mm=60.0, n_frames=n, seed=21, image_size_px=(410, 308), tilt_deg=12.0)
    det = detect_sequence(sim.sequence, setup_for(sim))
    t0 = time.perf_counter()
    kc, consumed = select_keyframes(det.points_px, probe_to_reference(sim.sequence), sim.phantom, (410, 308),
                                    phantom_to_reference=sim.phantom_to_reference)
    return {"frames_offered": n, "frames_consumed": consumed, "keyframes": kc.n_keyframes, "converged": kc.converged,
            "seconds": _f(time.perf_counter() - t0, 2),
            "target_error_mm": _f(target_errors_mm(kc.image_to_probe, sim.image_to_probe,
                                                   points_px=sim.fov_points_px()).mean()),
            "curve": [c.to_dict() for c in kc.curve]}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _print_tables(report: dict) -> None:
    plus = report.get("plus")
    if plus:
        print("\nPLUS fCal 2.0 data (PLUS: 184/190 + 103/103 frames, validation 0.540 mm best 95 %, 0.569 mm all)")
        print(f"  linear solver on PLUS dots: max |ImageToProbe - PLUS| = "
              f"{plus['linear_solver_vs_plus']['max_abs_element_difference']:.2e}")
        print(f"  {'detector':10s} {'cal':>7s} {'val':>7s} {'PLUS dots<5px':>14s} {'wrong':>6s} {'fps':>7s}")
        for name, d in plus["detection"].items():
            print(f"  {name:10s} {d['calibration_frames_detected']:>3d}/190 {d['validation_frames_detected']:>3d}/103 "
                  f"{100 * (d['plus_dots_matched_fraction'] or 0):>13.2f}% {d['dots_on_wrong_echo']:>6d} "
                  f"{d['frames_per_second']:>7.1f}")
        print(f"  hessian on 1 OpenCV thread: {plus['detection']['hessian']['frames_per_second_1_thread']} frames/s "
              f"(load {plus['load_before']})")
        print(f"  {'dots, solver, pose':40s} {'val95':>7s} {'valAll':>7s} {'cal95':>7s}")
        for k, a in plus["accuracy"].items():
            print(f"  {k:40s} {a['validation_trimmed95_mm']:>7.4f} {a['validation_mean_all_mm']:>7.4f} "
                  f"{a['calibration_trimmed95_mm']:>7.4f}")
        var = plus.get("variants")
        if var:
            to = var["time_offset"]
            print(f"  time offset (auto, calibration recording): {to['estimated_s']} s, applied={to['applied']}: "
                  f"{to['reason']}")
            print(f"  {'offset':6s} {'solver':10s} {'loss':7s} {'weights':7s} {'centre':16s} {'calCV95':>8s} "
                  f"{'calCVall':>8s} {'val95':>7s} {'valAll':>7s}")
            for r in var["rows"]:
                print(f"  {r['time_offset']:6s} {r['solver']:10s} {r['loss']:7s} {r.get('weighting', 'none'):7s} "
                      f"{r.get('centre', ''):16s} "
                      f"{r['calibration_cv_trimmed95_mm']:>8.4f} "
                      f"{r['calibration_cv_mean_all_mm']:>8.4f} {r['validation_trimmed95_mm']:>7.4f} "
                      f"{r['validation_mean_all_mm']:>7.4f}")
        print(f"  full calibrate (190 + 103 frames, ransac-lm, default time offset auto = "
              f"{plus.get('full_calibration_time_offset_s')} s): {plus['full_calibration_seconds']} s, validation "
              f"{plus['full_calibration_validation_trimmed95_mm']} mm (best 95 %), "
              f"{plus.get('full_calibration_validation_mean_all_mm')} mm (all)")
        print("  CRE (random halves): " + ", ".join(f"{k} {v['cre_mean_mm']} mm" for k, v in plus["cre_random_halves"].items()))
    if report.get("simulation"):
        sim = report["simulation"]["cases"]
        print("\nSimulation (10 % outlier poses, 5 % dropouts); target error = mean over the field of view vs truth")
        print(f"  {'probe':7s} {'depth':>5s} {'recog':>6s} {'false':>6s} {'LM':>6s} {'R+LM':>6s} {'R+LM est':>8s} "
              f"{'est-known':>9s} {'fps':>6s}")
        for r in sim:
            h = r["hessian"]
            print(f"  {r['probe']:7s} {r['depth_mm']:>5.0f} {100 * h['recognition']:>5.1f}% {100 * h['false_rate']:>5.2f}% "
                  f"{r['target_error_mm_lm_known']:>6.3f} {r['target_error_mm_ransac_lm_known']:>6.3f} "
                  f"{r['target_error_mm_ransac_lm_estimate']:>8.3f} {r['estimate_vs_known_mm']:>9.3f} "
                  f"{h['frames_per_second']:>6.1f}")
        base = [k for k in ("plus", "agcfd", "tacd") if k in sim[0]]
        if base:
            print("  baselines recognition: " + "; ".join(
                f"{r['probe']} {r['depth_mm']:.0f}: " + ", ".join(f"{b} {100 * r[b]['recognition']:.0f}%" for b in base)
                for r in sim))
    ph = report.get("phantoms")
    if ph:
        print(f"\nEvery phantom (hessian detector, sub-pixel centre {ph.get('refine_model')!r}, "
              f"plane refinement {'on' if ph.get('plane_refinement', False) else 'off'}, "
              f"{ph['frames_per_case']} frames per case, "
              f"{ph['image_size_px'][0]}x{ph['image_size_px'][1]} px, load {ph['load_before']} -> {ph['load_after']})")
        print(f"  {'phantom':18s} {'case':36s} {'depth':>5s} {'whole':>5s} {'recall':>7s} {'precis':>7s} "
              f"{'<=1px':>7s} {'wrong':>5s} {'trk':>3s} {'nbr':>3s} {'ref':>3s} | {'alone':>7s} {'wrong':>5s} | "
              f"{'bias x,y px':>11s} {'sd x,y px':>9s}")
        for r in ph["cases"]:
            if "error" in r:
                print(f"  {r['phantom']:18s} {r['case']:36s} not simulated: {r['error']}")
                continue

            def pct(v):
                return f"{100 * v:6.1f}%" if v is not None else "    n/a"

            st, one = r.get("detected_by_stage", {}), r.get("single_frame", {})
            e = r.get("dot_error_px")
            err = f"{e['bias'][0]:5.2f},{e['bias'][1]:5.2f} {e['spread'][0]:4.2f},{e['spread'][1]:4.2f}" if e else ""
            print(f"  {r['phantom']:18s} {r['case']:36s} {r['depth_mm']:>5.0f} {r['frames_whole']:>5d} "
                  f"{pct(r['recall'])} {pct(r['precision'])} {pct(r['dots_within_1px'])} {r['wrong_labels']:>5d} "
                  f"{st.get('tracked', 0):>3d} {st.get('neighbours', 0):>3d} {r.get('refused_by_sequence', 0):>3d} | "
                  f"{pct(one.get('recall'))} {one.get('wrong_labels', 0):>5d} | {err}")
        rows = [r for r in ph["cases"] if "error" not in r]
        if rows:
            print(f"  totals: wrong labels {sum(r['wrong_labels'] for r in rows)} (alone "
                  f"{sum(r['single_frame']['wrong_labels'] for r in rows)}); cases below 99 % recall "
                  f"{sum(1 for r in rows if (r['recall'] or 0) < 0.99)} (alone "
                  f"{sum(1 for r in rows if (r['single_frame']['recall'] or 0) < 0.99)}) of {len(rows)}; "
                  f"trk/nbr: frames recovered from the tracked prediction / the neighbours, ref: labels refused")
            print(f"  cases below 99 % of dots within 1 px: "
                  f"{sum(1 for r in rows if r['dots_within_1px'] is None or r['dots_within_1px'] < 0.99)} of {len(rows)}")
            planes = [r["plane_refinement"] for r in rows if "plane_refinement" in r]
            if planes:
                print(f"  plane refinement: {sum(p['dots_replaced'] for p in planes)} dots replaced, "
                      f"{sum(p['outlier_dots'] for p in planes)} outlier dots and "
                      f"{sum(p['frames_model_rejected'] for p in planes)} frames kept as measured, wires kept as "
                      f"measured in {sum(1 for p in planes if p['wires_kept_as_measured'])} cases")
    kf = report.get("keyframes")
    if kf:
        print(f"\nKeyframes: converged={kf['converged']} after {kf['frames_consumed']}/{kf['frames_offered']} "
              f"frames ({kf['keyframes']} keyframes), target error {kf['target_error_mm']} mm")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cases, smaller images")
    p.add_argument("--frames", type=int, default=None, help="simulated frames per case (default 150, quick 60)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-plus", action="store_true", help="skip the PLUS data part")
    p.add_argument("--only-phantoms", action="store_true", help="run only the every-phantom table")
    p.add_argument("--phantom-frames", type=int, default=None,
                   help="simulated frames per phantom case (default 20, --phantoms-full 60)")
    p.add_argument("--phantoms-full", action="store_true",
                   help="every-phantom table with all cases at 820x616 px (slow)")
    p.add_argument("--phantoms", nargs="+", default=None, metavar="NAME",
                   help="every-phantom table: only these built-in phantoms")
    p.add_argument("--cases", nargs="+", default=None, metavar="LABEL",
                   help="every-phantom table: only these cases (labels as printed, e.g. 'linear, gain 0.6')")
    p.add_argument("--no-plane-refinement", action="store_true",
                   help="every-phantom table: without the joint image-plane refinement of the dots")
    p.add_argument("--refine-model", default=None,
                   help="every-phantom table: sub-pixel centre estimator (HessianSettings.refine_model; default its default)")
    args = p.parse_args(argv)
    n_frames = args.frames or (60 if args.quick else 150)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_start": _load(),
                          "python": sys.version.split()[0], "opencv": cv2.__version__},
              "quick": bool(args.quick)}
    t0 = time.perf_counter()
    if not args.only_phantoms:
        report["plus"] = None if args.no_plus else bench_plus(args.quick)
        report["simulation"] = bench_simulation(args.quick, n_frames)
        report["keyframes"] = bench_keyframes(args.quick)
    full = args.phantoms_full and not args.quick
    known = [c[0] for c in _phantom_cases(not full)]
    unknown = [c for c in args.cases or () if c not in known]
    if unknown:
        p.error(f"--cases: unknown label(s) {unknown}; expected some of {known}")
    report["phantoms"] = bench_phantoms(not full, args.phantom_frames or (60 if full else 20), args.phantoms,
                                        args.refine_model, args.cases, not args.no_plane_refinement)
    report["machine"]["load_end"] = _load()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_tables(report)
    print(f"\nwrote {out} ({report['seconds']} s)")
    return report


def test_bench_nwire_quick(tmp_path):
    """Quick run: every part produces numbers (correctness only, no timing assertions)."""
    report = main(["--quick", "--frames", "30", "--no-plus", "--phantom-frames", "4", "--out", str(tmp_path / "nwire.json")])
    cases = report["simulation"]["cases"]
    assert len(cases) == 4 and all(c["hessian"]["recognition"] > 0.9 for c in cases)
    assert all(c["target_error_mm_ransac_lm_known"] < 1.0 for c in cases)
    assert (tmp_path / "nwire.json").is_file()
    from NWireCalibrationLib.phantom import builtin_phantom_names

    rows = report["phantoms"]["cases"]
    assert {r["phantom"] for r in rows} == set(builtin_phantom_names())
    assert not [r for r in rows if "error" in r]  # every phantom simulated in every case
    assert all(r["frames_detected"] >= r["frames_correct"] for r in rows)
    assert all(sum(r["detected_by_stage"].values()) == r["frames_detected"] for r in rows)
    assert all(r["single_frame"]["frames_detected"] <= r["frames"] for r in rows)


def test_frame_scores_counts_swaps_misses_and_partial_frames():
    import pytest

    truth = np.array([[[10.0, 10], [20, 10], [30, 10]]] * 4)
    truth[3, 0] = np.nan  # a partial frame: wire 1 outside the field of view
    whole = np.array([True, True, True, False])
    det = truth.copy()
    det[0] += 0.5  # within 1 px
    det[1] = det[1][[1, 0, 2]]  # wires 1 and 2 swapped: two wrong labels
    det[2] = np.nan  # missed
    det[3] = [[40.0, 10], [20, 10], [30, 10]]  # a detection on a partial frame is wrong
    s = frame_scores(det, truth, whole)
    assert (s["frames_whole"], s["frames_detected"], s["frames_correct"]) == (3, 3, 1)
    assert s["recall"] == pytest.approx(1 / 3, abs=1e-4) and s["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["wrong_labels"] == 2
    assert s["dots_within_1px"] == pytest.approx(4 / 6, abs=1e-4)  # frames 0 (3 of 3) and 1 (wire 3 only)
    # Signed error of the dots within 5 px of their truth: (0.5, 0.5) x 3 and (0, 0).
    assert s["dot_error_px"]["bias"] == pytest.approx([0.375, 0.375], abs=1e-3)
    assert s["dot_error_px"]["spread"] == pytest.approx([0.2165, 0.2165], abs=1e-3)


if __name__ == "__main__":
    main()

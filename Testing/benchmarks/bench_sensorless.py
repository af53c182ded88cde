"""Sensorless tracking benchmark: all methods side by side on held-out simulated sweeps + PLUS data.

    python Testing/benchmarks/bench_sensorless.py [--sweeps 20] [--models DIR] [--cache DIR]

Held-out sweeps use ``SensorlessTrackingLib.simdata.test_seeds`` (disjoint from the training
seeds): random probes, random tissue, 150-400 frames over 60-250 mm, shapes cycling
straight / C / S. Methods:

- the shipped model (``SensorlessTracking/Resources/Models/sensorless_dualtrack.pt``);
- every other checkpoint ``*.pt`` in ``--models`` (e.g. ``pairwise.pt``, ``dualtrack_global.pt``,
  ``moglo.pt`` made by ``train_shipped_model.py --model ... --out DIR/NAME.pt``);
- ``decorrelation``, calibrated (sigma, direction, rotation model) on 6 training sweeps.

Per sweep and method: final drift, FDR (path and end-to-end), max drift, GPE/LPE, mean angle
error, inference frames/s, and where the drift comes from
(:func:`SensorlessTrackingLib.attribution.drift_attribution`: FDR with only the rotations, only
the translations, only the out-of-plane or only the in-plane parameters estimated, the
elevational scale error, and the FDR left once one out-of-plane scale factor per sweep is fitted
to the truth), set against each simulated probe's elevational beam width in
wavelengths (drawn at random, 2-6, and invisible in the images). The global-context ablation pairs
each dualtrack checkpoint that has the global encoder with the local-only one of the same
architecture and training sweeps, sweep by sweep. Prints a table of medians and writes
``Testing/benchmarks/results/sensorless.json``. Also scores the PLUS SpinePhantomFreehand and
BoneUltrasound_L14 sequences when ../shared/data/plus is present.

Run by ``make benchmark`` through pytest (``test_sensorless_benchmark``) as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "Testing" / "benchmarks" / "results"
SHAPES = ("straight", "C", "S")
PLUS = REPO.parent / "shared" / "data" / "plus"
PLUS_CASES = (
    ("SpinePhantomFreehand", "TestImages/SpinePhantomFreehand.igs.mha", "ConfigFiles/PlusDeviceSet_SpinePhantomFreehandReconstructionOnly.xml"),
    ("BoneUltrasound_L14", "TestImages/BoneUltrasound_L14.igs.mha", "ConfigFiles/BoneUltrasound_L14_config.xml"),
)
KEYS = (
    "final_drift_mm",
    "fdr_path_percent",
    "fdr_end_to_end_percent",
    "max_drift_mm",
    "gpe_mm",
    "lpe_mm",
    "mean_angle_error_deg",
    "frames_per_second",
    "fdr_rotation_only_percent",
    "fdr_translation_only_percent",
    "fdr_out_of_plane_only_percent",
    "fdr_in_plane_only_percent",
    "elevation_scale",
    "out_of_plane_scale",
    "fdr_scale_fitted_percent",
)


#: Row of the shipped model averaged over the mirrored and backwards sweep.
SHIPPED_AVERAGED = "shipped, flip+reverse averaged"


def _methods(models_dir: Path | None):
    from SensorlessTrackingLib.predict import default_model_path

    methods = {}
    if default_model_path().is_file():
        methods["shipped (" + default_model_path().stem + ")"] = default_model_path()
    if models_dir is not None and models_dir.is_dir():
        for p in sorted(models_dir.glob("*.pt")):
            methods[p.stem] = p
    methods["decorrelation"] = "decorrelation"
    return methods


def _held_out(n: int, cache: Path | None, log):
    from FreehandUSLib.io import read_sequence, write_sequence
    from SensorlessTrackingLib.simdata import simulate_sequence, test_seeds

    out = []
    for k, seed in enumerate(test_seeds(n)):
        path = cache / f"test_{seed}.igs.mha" if cache else None
        if path is not None and path.is_file():
            seq = read_sequence(path)
        else:
            t = time.perf_counter()
            seq = simulate_sequence(seed, shape=SHAPES[k % 3]).sequence
            log.info("simulated held-out sweep %d (%d frames) in %.1f s", seed, seq.n_frames, time.perf_counter() - t)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_sequence(seq, path, compress=False)
        out.append((f"sim-{seed}-{SHAPES[k % 3]}", seq))
    return out


def _elevation_beams(n: int) -> dict:
    """Each held-out sweep's elevational beam sigma, in mm and in wavelengths (its probe's draw)."""
    from FreehandUSLib.simulation import random_sweep_config
    from FreehandUSLib.simulation.probe import SPEED_OF_SOUND_MM_PER_US
    from SensorlessTrackingLib.simdata import test_seeds

    out = {}
    for k, seed in enumerate(test_seeds(n)):
        probe = random_sweep_config(seed).probe  # the probe is drawn before the trajectory: shape-independent
        wavelength = SPEED_OF_SOUND_MM_PER_US / probe.center_frequency_mhz
        out[f"sim-{seed}-{SHAPES[k % 3]}"] = {
            "sigma_elevation_mm": probe.sigma_elevation_mm,
            "sigma_elevation_wavelengths": probe.sigma_elevation_mm / wavelength,
        }
    return out


def _scale_vs_beam(per_sweep: dict, beams: dict) -> dict:
    """Per method: correlation of the per-sweep elevation scale with the beam width (mm, wavelengths)."""
    out = {}
    for mname, rows in per_sweep.items():
        names = [s for s in rows if s in beams and np.isfinite(rows[s]["elevation_scale"])]
        if len(names) < 3:
            continue
        scale = np.array([rows[s]["elevation_scale"] for s in names])
        out[mname] = {
            f"corr_with_{key}": float(np.corrcoef(scale, [beams[s][key] for s in names])[0, 1])
            for key in ("sigma_elevation_mm", "sigma_elevation_wavelengths")
        }
    return out


def _simulator_speed(log) -> dict:
    """Frames per second of the simulator at 256 x 256 (default linear probe; wall and CPU time)."""
    from FreehandUSLib.simulation import SweepConfig, TrajectoryConfig, simulate_sweep

    simulate_sweep(SweepConfig(trajectory=TrajectoryConfig(n_frames=2, length_mm=0.5)))  # compile
    cpu, wall = time.process_time(), time.perf_counter()
    res = simulate_sweep(SweepConfig(trajectory=TrajectoryConfig(n_frames=200, length_mm=100.0, seed=1), seed=1))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    out = {
        "frames": res.sequence.n_frames,
        "image": [res.sequence.n_rows, res.sequence.n_cols],
        "frames_per_second_wall": res.sequence.n_frames / wall,
        "frames_per_second_cpu": res.sequence.n_frames / cpu,
        "load_average": os.getloadavg()[0],
    }
    log.info("simulator: %.1f frames/s wall, %.1f frames/s of CPU time (load %.1f)", out["frames_per_second_wall"],
             out["frames_per_second_cpu"], out["load_average"])
    return out


def _calibrated_decorrelation(log):
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation
    from SensorlessTrackingLib.simdata import simulate_sequence, train_seeds

    data = []
    for seed in train_seeds(6):
        seq = simulate_sequence(seed, n_frames=(150, 200)).sequence
        data.append((seq.frames, seq.transforms["ImageToReference"].matrices, seq.pixel_spacing_mm))
    cfg = calibrate_decorrelation(data)
    log.info("decorrelation calibrated on 6 training sweeps: sigma %.3f mm, direction %+d, rotations %s", cfg.sigma_mm, cfg.direction, cfg.out_of_plane_rotations)
    return cfg


def _plus_sequences(log):
    out = []
    if not PLUS.is_dir():
        return out
    from FreehandUSLib.io import read_plus_config, read_sequence
    from SensorlessTrackingLib.data import image_to_reference_of

    for name, seq_rel, cfg_rel in PLUS_CASES:
        if not (PLUS / seq_rel).is_file() or not (PLUS / cfg_rel).is_file():
            continue
        seq = read_sequence(PLUS / seq_rel)
        itp = read_plus_config(PLUS / cfg_rel).require_transform("ImageToProbe")
        mats, valid = image_to_reference_of(seq, image_to_probe=itp)
        keep = valid & seq.image_ok
        seq = seq.select(keep)
        seq.set_transform("ImageToReference", mats[keep])
        seq.set_transform("ImageToProbe", np.broadcast_to(itp, (seq.n_frames, 4, 4)).copy())
        log.info("%s: %d frames with a valid pose", name, seq.n_frames)
        out.append((name, seq))
    return out


def _warm_up(loaded, log) -> None:
    """One small run per learned model before timing: numba's kernel (compiled or loaded from its
    cache) and oneDNN's kernels are made on first use and would count against the first sweep."""
    from SensorlessTrackingLib.predict import predict_poses

    for name, model in loaded.items():
        if model == "decorrelation":
            continue
        t = time.perf_counter()
        frames = np.random.default_rng(0).integers(0, 256, (model.config.clip_length + 2, *model.config.image_size), dtype=np.uint8)
        predict_poses(frames, model)
        log.info("warm-up %s: %.2f s", name, time.perf_counter() - t)


def _score(seq, method, decorrelation_cfg, threads, mirror_average="none"):
    """Accuracy metrics + inference speed (``track_sequence`` wall time: resampling to the model
    grid, windows, encoders, fusion and trajectory; reading excluded) with ``threads`` torch threads;
    ``mirror_average`` as in ``track_sequence``."""
    import torch

    from SensorlessTrackingLib.attribution import drift_attribution
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import track_sequence

    truth = seq.transforms["ImageToReference"].matrices
    res = track_sequence(seq, method, decorrelation=decorrelation_cfg, mirror_average=mirror_average)
    estimate = res.sequence.transforms["ImageToReference"].matrices
    m = tracking_metrics(truth, estimate, (seq.n_rows, seq.n_cols)).to_dict()
    m |= {k: v for k, v in drift_attribution(truth, estimate, (seq.n_rows, seq.n_cols)).items() if k != "fdr_path_percent"}
    m["frames_per_second"] = res.frames_per_second
    m["inference_seconds"] = res.seconds
    m["torch_threads"] = torch.get_num_threads()
    m["method"] = res.method
    return m


def run(n_sweeps: int = 20, models_dir: Path | None = None, cache: Path | None = None, threads: int = 1) -> dict:
    """Run the benchmark; returns (and writes) the results dict."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless")
    import torch

    torch.set_num_threads(threads)
    from SensorlessTrackingLib.predict import load_model

    methods = _methods(models_dir)
    loaded = {k: (v if v == "decorrelation" else load_model(v)) for k, v in methods.items()}
    # the shipped model once more, averaged over the sweep's mirror images (track_sequence's mirror_average)
    averaged = {}
    shipped = next((k for k in loaded if k.startswith("shipped")), None)
    if shipped is not None:
        averaged[SHIPPED_AVERAGED] = "flip+reverse"
        loaded[SHIPPED_AVERAGED] = loaded[shipped]
        methods[SHIPPED_AVERAGED] = f"{methods[shipped]} (mirror_average flip+reverse)"
    _warm_up(loaded, log)
    simulator = _simulator_speed(log)
    decor = _calibrated_decorrelation(log)
    sweeps = _held_out(n_sweeps, cache, log)
    per_sweep = {name: {} for name in loaded}
    for sname, seq in sweeps:
        for mname, model in loaded.items():
            per_sweep[mname][sname] = _score(seq, model, decor, threads, mirror_average=averaged.get(mname, "none"))
            m = per_sweep[mname][sname]
            log.info("%s %s: FDR %.1f %% (drift %.1f of %.0f mm), %.0f frames/s with %d torch thread(s)", sname, mname,
                     m["fdr_path_percent"], m["final_drift_mm"], m["path_length_mm"], m["frames_per_second"], m["torch_threads"])
    summary = {}
    for mname, rows in per_sweep.items():
        summary[mname] = {f"median_{k}": float(np.nanmedian([r[k] for r in rows.values()])) for k in KEYS}
        summary[mname]["mean_fdr_path_percent"] = float(np.nanmean([r["fdr_path_percent"] for r in rows.values()]))
    comparisons = {}
    if shipped is not None:
        for other in summary:
            if other != shipped:
                a = summary[shipped]["median_fdr_path_percent"]
                b = summary[other]["median_fdr_path_percent"]
                comparisons[f"{shipped} vs {other}"] = {
                    "median_fdr_path_percent": [a, b],
                    "drift_reduction_percent": 100.0 * (1.0 - a / b) if b > 0 else float("nan"),
                }
    beams = _elevation_beams(n_sweeps)
    ablation = _global_context_ablation(loaded, methods, per_sweep)
    real = {}
    for name, seq in _plus_sequences(log):
        real[name] = {mname: _score(seq, model, decor, threads, mirror_average=averaged.get(mname, "none"))
                      for mname, model in loaded.items()}
    result = {
        "sweeps": [
            {"name": s, "frames": q.n_frames, "path_length_mm": per_sweep["decorrelation"][s]["path_length_mm"]} for s, q in sweeps
        ],
        "methods": {k: str(v) for k, v in methods.items()},
        "decorrelation_calibration": decor.to_dict(),
        "summary": summary,
        "comparisons": comparisons,
        "global_context_ablation": ablation,
        "elevation_beams": beams,
        "elevation_scale_vs_beam": _scale_vs_beam(per_sweep, beams),
        "per_sweep": per_sweep,
        "plus_real_data": real,
        "simulator_speed": simulator,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _global_context_ablation(loaded, methods, per_sweep) -> dict:
    """Each dualtrack checkpoint with the global encoder against the local-only checkpoint of the
    same architecture otherwise, trained on the same sweeps (the seeds in the ``.json`` report
    that ``train_shipped_model.py`` writes beside it): the issue's ablation, local vs local + global.

    Paired, because the sweeps differ far more from each other than the models do: the sweeps on
    which the global variant drifts less, and the mean and standard error of
    log(FDR global / FDR local) over the sweeps (negative: the global context helps).
    """
    def config(model):
        return getattr(model, "config", None)

    def training_data(name):
        report = Path(str(methods[name])).with_suffix(".json")
        if not report.is_file():
            return None
        info = json.loads(report.read_text())
        return info.get("train_seeds"), info.get("training_frames")

    local = {name: config(m) for name, m in loaded.items()
             if config(m) is not None and config(m).name == "dualtrack" and not config(m).use_global}
    out = {}
    for name, model in loaded.items():
        cfg = config(model)
        if cfg is None or cfg.name != "dualtrack" or not cfg.use_global:
            continue
        for lname, lcfg in local.items():
            if lcfg.local_part() != cfg.local_part() or training_data(lname) != training_data(name):
                continue
            keys = sorted(per_sweep[name])
            g = np.array([per_sweep[name][k]["fdr_path_percent"] for k in keys])
            loc = np.array([per_sweep[lname][k]["fdr_path_percent"] for k in keys])
            ratio = np.log(g / loc)
            out[f"{name} vs {lname}"] = {
                "global_drop": cfg.global_drop,
                "max_global_tokens": cfg.max_global_tokens,
                "median_fdr_path_percent": [float(np.median(g)), float(np.median(loc))],
                "sweeps_global_better": int(np.sum(g < loc)),
                "sweeps": len(keys),
                "mean_log_ratio": float(ratio.mean()),
                "mean_log_ratio_se": float(ratio.std(ddof=1) / np.sqrt(len(ratio))) if len(ratio) > 1 else float("nan"),
            }
    return out


def _print_table(result) -> None:
    sim = result.get("simulator_speed", {})
    if sim:
        print(f"\nSimulator, 256x256 default probe: {sim['frames_per_second_wall']:.1f} frames/s wall, "
              f"{sim['frames_per_second_cpu']:.1f} frames/s of CPU time (load average {sim['load_average']:.1f})")
    threads = result.get("torch_threads", "?")
    print(f"\nSensorless tracking on {len(result['sweeps'])} held-out simulated sweeps (medians; inference frames/s "
          f"with {threads} torch thread(s), resampling included, reading excluded)")
    head = f"{'method':<34} {'FDR path %':>10} {'FDR e2e %':>10} {'final mm':>9} {'max mm':>8} {'GPE mm':>7} {'LPE mm':>7} {'angle':>6} {'frames/s':>9}"
    print(head)
    print("-" * len(head))
    for name, s in sorted(result["summary"].items(), key=lambda kv: kv[1]["median_fdr_path_percent"]):
        print(
            f"{name[:34]:<34} {s['median_fdr_path_percent']:>10.1f} {s['median_fdr_end_to_end_percent']:>10.1f} "
            f"{s['median_final_drift_mm']:>9.1f} {s['median_max_drift_mm']:>8.1f} {s['median_gpe_mm']:>7.1f} "
            f"{s['median_lpe_mm']:>7.3f} {s['median_mean_angle_error_deg']:>6.1f} {s['median_frames_per_second']:>9.0f}"
        )
    print("\nWhere the drift comes from (median FDR path % with only these parameters estimated, the rest true; "
          "elevation scale = true / estimated elevational steps, and its correlation with the probe's elevational "
          "beam width in wavelengths; scale-fitted = FDR path % once the out-of-plane steps of each sweep are "
          "multiplied by the one factor that suits it best)")
    head = (f"{'method':<34} {'rotation':>9} {'transl.':>8} {'out-of-pl':>9} {'in-plane':>8} {'elev. scale':>11} {'corr':>6}"
            f" {'scale-fitted':>12}")
    print(head)
    print("-" * len(head))
    corr = result.get("elevation_scale_vs_beam", {})
    for name, s in sorted(result["summary"].items(), key=lambda kv: kv[1]["median_fdr_path_percent"]):
        c = corr.get(name, {}).get("corr_with_sigma_elevation_wavelengths", float("nan"))
        print(
            f"{name[:34]:<34} {s['median_fdr_rotation_only_percent']:>9.1f} {s['median_fdr_translation_only_percent']:>8.1f} "
            f"{s['median_fdr_out_of_plane_only_percent']:>9.1f} {s['median_fdr_in_plane_only_percent']:>8.1f} "
            f"{s['median_elevation_scale']:>11.2f} {c:>6.2f} {s['median_fdr_scale_fitted_percent']:>12.1f}"
        )
    for name, c in result.get("comparisons", {}).items():
        print(f"{name}: median FDR {c['median_fdr_path_percent'][0]:.1f} % vs {c['median_fdr_path_percent'][1]:.1f} % "
              f"({c['drift_reduction_percent']:+.0f} % less drift)")
    for name, a in result.get("global_context_ablation", {}).items():
        print(f"global-context ablation, {name} (global_drop {a['global_drop']:g}, "
              f"{a['max_global_tokens']} global frames): median FDR "
              f"{a['median_fdr_path_percent'][0]:.1f} % vs {a['median_fdr_path_percent'][1]:.1f} %, global better on "
              f"{a['sweeps_global_better']} of {a['sweeps']} sweeps, mean log ratio {a['mean_log_ratio']:+.2f} "
              f"+/- {a['mean_log_ratio_se']:.2f} (negative: the global context helps)")
    for case, rows in result["plus_real_data"].items():
        print(f"\n{case} (real PLUS data)")
        for name, m in rows.items():
            print(
                f"  {name[:32]:<32} final drift {m['final_drift_mm']:.1f} mm, FDR {m['fdr_path_percent']:.1f} % of "
                f"{m['path_length_mm']:.1f} mm, GPE {m['gpe_mm']:.1f} mm, {m['frames_per_second']:.0f} frames/s "
                f"({m.get('torch_threads', threads)} thread(s))"
            )


def _independent_sim_module():
    """Testing/sensorless/independent_sim.py (a test module, not a package: loaded by path)."""
    import importlib.util

    path = REPO / "Testing" / "sensorless" / "independent_sim.py"
    spec = importlib.util.spec_from_file_location("independent_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["independent_sim"] = module
    spec.loader.exec_module(module)
    return module


def run_independent(n_per_probe: int = 2, n_frames: int = 80, models_dir: Path | None = None, threads: int = 1) -> dict:
    """The shipped model, pairwise checkpoints (``*.pt`` in ``models_dir`` whose model is
    ``pairwise``) and the decorrelation baseline (uncalibrated, and calibrated per probe on one
    more tracked sweep of it) on sweeps of the **independent**
    simulator (``Testing/sensorless/independent_sim.py``: other scatterers, PSF, tissue,
    attenuation/TGC, linear and convex probes, pauses and direction changes; never trained on).
    Each sweep is estimated with its true ``sweep_direction`` (a user states it). Writes
    ``results/sensorless_independent.json`` and prints a table: median / mean final drift (% of
    path), mean angle error, out-of-plane scale (the factor on tz, rx, ry that fits best), per
    probe and overall, with the load average of the machine."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless")
    import torch

    from SensorlessTrackingLib.attribution import fit_out_of_plane_scale
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import default_model_path, load_model, track_sequence

    torch.set_num_threads(threads)
    isim = _independent_sim_module()
    methods = {}
    if default_model_path().is_file():
        methods["shipped"] = load_model(default_model_path())
    if models_dir is not None and models_dir.is_dir():
        for p in sorted(models_dir.glob("*.pt")):
            model = load_model(p)
            if model.config.name == "pairwise":
                methods[p.stem] = model
    methods["decorrelation (uncalibrated)"] = "decorrelation"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    sweeps = isim.benchmark_sweeps(n_per_probe, n_frames=n_frames)
    # decorrelation calibrated per probe on one more tracked sweep of it (another seed), as a user with a tracker would
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation

    calibrated = {}
    for j, probe in enumerate(isim.PROBES):
        cal = isim.simulate(probe, 5_000_000 + 1000 * j + 500, n_frames=n_frames, length_mm=60.0).sequence
        calibrated[probe.name] = calibrate_decorrelation(
            [(cal.frames, cal.transforms["ImageToReference"].matrices, cal.pixel_spacing_mm)])
        log.info("decorrelation calibrated on one %s sweep: %s", probe.name, calibrated[probe.name])
    methods["decorrelation (calibrated, 1 sweep)"] = "decorrelation"
    sim_seconds = time.perf_counter() - t0
    log.info("independent simulator: %d sweeps in %.0f s", len(sweeps), sim_seconds)
    rows = {m: {} for m in methods}
    for sname, sw in sweeps:
        seq = sw.sequence
        truth = seq.transforms["ImageToReference"].matrices
        shape = (seq.n_rows, seq.n_cols)
        for mname, model in methods.items():
            cfg = calibrated[sw.probe.name] if mname.startswith("decorrelation (calibrated") else None
            res = track_sequence(seq, model, sweep_direction=sw.direction, decorrelation=cfg)
            est = res.sequence.transforms["ImageToReference"].matrices
            m = tracking_metrics(truth, est, shape).to_dict()
            m["out_of_plane_scale"], m["fdr_scale_fitted_percent"] = fit_out_of_plane_scale(truth, est, shape)
            m["frames_per_second"] = res.frames_per_second
            m["probe"] = sw.probe.name
            m["direction"] = sw.direction
            m["flagged_frames"] = len(res.info["frame_flags"]["flagged_frame_indices"])
            m["direction_check_agrees"] = res.info["direction_check"]["agrees"]
            rows[mname][sname] = m
            log.info("%s %s: FDR %.1f %% of %.0f mm, angle %.1f deg, oop scale %.2f", sname, mname,
                     m["fdr_path_percent"], m["path_length_mm"], m["mean_angle_error_deg"], m["out_of_plane_scale"])
    summary = {}
    probes = [p.name for p in isim.PROBES]
    for mname, per in rows.items():
        summary[mname] = {}
        for group in probes + ["all"]:
            sel = [r for r in per.values() if group == "all" or r["probe"] == group]
            summary[mname][group] = {
                "sweeps": len(sel),
                "median_fdr_path_percent": float(np.median([r["fdr_path_percent"] for r in sel])),
                "mean_fdr_path_percent": float(np.mean([r["fdr_path_percent"] for r in sel])),
                "mean_angle_error_deg": float(np.mean([r["mean_angle_error_deg"] for r in sel])),
                "median_out_of_plane_scale": float(np.median([r["out_of_plane_scale"] for r in sel])),
                "direction_check_agrees": int(sum(r["direction_check_agrees"] is True for r in sel)),
                "flagged_frames": int(sum(r["flagged_frames"] for r in sel)),
            }
    result = {
        "simulator": "Testing/sensorless/independent_sim.py",
        "probes": {p.name: asdict(p) for p in isim.PROBES},
        "sweeps_per_probe": n_per_probe,
        "frames_per_sweep": n_frames,
        "summary": summary,
        "per_sweep": rows,
        "decorrelation_calibrations": {k: v.to_dict() for k, v in calibrated.items()},
        "simulation_seconds": sim_seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless_independent.json").write_text(json.dumps(result, indent=2))
    print(f"\nIndependent simulator ({n_per_probe} sweeps x {len(probes)} probes, {n_frames} frames each; load average "
          f"{load_before:.1f} -> {result['load_average_after']:.1f} on {os.cpu_count()} CPUs)")
    head = (f"{'method':<36} {'probe':<7} {'n':>2} {'median FDR %':>12} {'mean FDR %':>10} {'angle deg':>9} "
            f"{'oop scale':>9} {'dir. agrees':>11} {'flagged':>7}")
    print(head)
    print("-" * len(head))
    for mname, groups in summary.items():
        for group, s in groups.items():
            print(f"{mname[:36]:<36} {group:<7} {s['sweeps']:>2} {s['median_fdr_path_percent']:>12.1f} "
                  f"{s['mean_fdr_path_percent']:>10.1f} {s['mean_angle_error_deg']:>9.1f} "
                  f"{s['median_out_of_plane_scale']:>9.2f} {s['direction_check_agrees']:>11} {s['flagged_frames']:>7}")
    print("FDR: final drift / path length; angle: mean orientation error; oop scale: the factor on the estimated "
          "out-of-plane motion that fits best (<1: the method moves too far out of the plane); dir. agrees: sweeps "
          "whose estimate moves out of the plane the way the tracking does (sweep direction given); flagged: frames "
          "flagged empty or decorrelated")
    return result


def test_sensorless_independent_benchmark():
    """``make benchmark``: the independent-simulator section (SENSORLESS_INDEPENDENT_SWEEPS per probe, default 2);
    every method gives finite drift, and with the true sweep direction every estimate moves the right way."""
    n = int(os.environ.get("SENSORLESS_INDEPENDENT_SWEEPS", "2"))
    result = run_independent(n, 80, RESULTS / "sensorless_models")
    for name, groups in result["summary"].items():
        assert np.isfinite(groups["all"]["median_fdr_path_percent"]), name
        assert groups["all"]["direction_check_agrees"] == groups["all"]["sweeps"], name


def test_sensorless_benchmark():
    """``make benchmark``: the full run; asserts only that every method produced finite numbers."""
    result = run(int(os.environ.get("SENSORLESS_BENCH_SWEEPS", "20")), RESULTS / "sensorless_models", RESULTS / "sensorless_sweeps")
    for name, s in result["summary"].items():
        assert np.isfinite(s["median_final_drift_mm"]), name


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", type=int, default=20)
    ap.add_argument("--models", type=Path, default=RESULTS / "sensorless_models", help="folder of extra checkpoints")
    ap.add_argument("--cache", type=Path, default=RESULTS / "sensorless_sweeps", help="cache of simulated sweeps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--independent", type=int, metavar="N", help="only the independent-simulator section, N sweeps "
                    "per probe (quick version: 2)")
    ap.add_argument("--independent-frames", type=int, default=80, help="frames per independent-simulator sweep")
    a = ap.parse_args()
    if a.independent:
        run_independent(a.independent, a.independent_frames, a.models, a.threads)
        sys.exit(0)
    run(a.sweeps, a.models, a.cache, a.threads)
    sys.exit(0)

"""The elevational scale ambiguity of image-only tracking, measured on the independent simulator.

Issue 25 asks that the shipped sensorless model, without adaptation, be no worse than speckle
decorrelation calibrated on the probe. This benchmark shows why no image-only estimator can
promise that without a calibration. Take a sweep whose probe only translates (no tilts) and its
*stretched twin* (``Testing/sensorless/independent_sim.py``, ``simulate(..., tilts=False,
elevation_stretch=k)``): the probe's elevational beam, the scatterers' coordinate along the
sweep and the probe's elevational motion all times ``k``. Every frame is the same, but the true
elevational path is ``k`` times longer. So an estimator that sees only the images (the shipped
network; decorrelation with its built-in, uncalibrated curve) returns the same trajectory for
both. If it is right on one, then on the other it is off by ``(k - 1)`` times that sweep's
elevational motion. The twins start from the same orientation and move the same in plane, so
one estimate ends the image centre some ``E`` along the normal where the truths end it ``D``
and ``k D``: on one of the two the final drift is at least ``(k - 1) |D| / (L1 + Lk)`` of its
path (``L1``, ``Lk`` the two paths), i.e. ``(k - 1) / (k + 1)`` for a sweep that only moves
forward along its normal. Decorrelation calibrated on tracked sweeps of the same probe (same
``k``) learns the wider beam and can be right on both.

For each probe of ``independent_sim.PROBES`` and ``k`` in ``(1, --stretch)``, the benchmark runs
``--test`` test sweeps (seeds ``5_000_000 + 1000 * probe + i``, 40-80 mm, directions
alternating, no tilts) and ``--calib`` tracked calibration sweeps (seeds ``... + 800 + i``, the
same ``k``). Methods, each given the sweep's true direction:

- ``shipped``: the shipped model as it is (``SensorlessTrackingLib.predict.default_model_path``);
- ``decorrelation (uncalibrated)``: ``track_sequence(..., "decorrelation")`` with the library's
  built-in ``DecorrelationConfig()`` (``sigma_mm`` 0.75, one curve for every depth);
- ``decorrelation (calibrated)``: :func:`SensorlessTrackingLib.decorrelation.calibrate_decorrelation`
  (its defaults: a curve per depth band and the coherence correction) on the calibration sweeps
  of the same probe and ``k``.

Per probe and ``k`` it reports the largest ``|frame difference|`` (grey levels) between each
test sweep and its twin at ``k = 1``, each method's median final drift (% of the true path,
:func:`SensorlessTrackingLib.metrics.tracking_metrics`) and the largest difference between the
method's frame-to-frame estimates (mm and deg, ``TrackingResult.frame_to_frame``) on the twin and
on the sweep at ``k = 1`` (0 means the same trajectory), and per probe the median over the
sweeps of the worse final drift of a sweep and its twin next to that least possible value
(and on how many pairs each method is at or above it). Simulated sweeps are cached in
``results/sensorless_scale_ambiguity_sweeps`` (git-ignored). Writes
``results/sensorless_scale_ambiguity.json`` and prints a markdown table.

    .venv/bin/python Testing/benchmarks/bench_sensorless_scale_ambiguity.py --stretch 1.6 --test 4 --calib 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("shipped", "decorrelation (uncalibrated)", "decorrelation (calibrated)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sensorless_adapt import _isim  # noqa: E402  (the independent simulator, loaded by path)


def _sweeps(isim, probe, seeds, n_frames, stretch, cache: Path):
    """(name, TrackedSequence, direction) of each seed without tilts, elevation stretched by
    ``stretch``, simulated once into ``cache``."""
    from FreehandUSLib.io import read_sequence, write_sequence

    out = []
    for i, seed in enumerate(seeds):
        length = float(np.random.default_rng(seed).uniform(40.0, 80.0))
        direction = "toward" if i % 2 == 0 else "away"
        name = f"{probe.name}-{seed}-{direction}"
        path = cache / f"{name}-flat-x{stretch:g}-{n_frames}.igs.mha"
        if path.is_file():
            seq = read_sequence(path)
        else:
            seq = isim.simulate(probe, seed, n_frames=n_frames, length_mm=length, direction=direction, tilts=False,
                                elevation_stretch=stretch).sequence
            cache.mkdir(parents=True, exist_ok=True)
            write_sequence(seq, path)
        out.append((name, seq, direction))
    return out


def run(stretch=1.6, n_test=4, n_calib=4, n_frames=80, probes=None, threads=1,
        cache: Path = RESULTS / "sensorless_scale_ambiguity_sweeps") -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless_scale_ambiguity")
    import torch

    from SensorlessTrackingLib.conventions import elevational_displacement_mm
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import default_model_path, load_model, track_sequence

    if not stretch > 1.0:
        raise ValueError(f"--stretch must be > 1, got {stretch}")
    torch.set_num_threads(threads)
    isim = _isim()
    shipped = load_model(default_model_path())
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    stretches = (1.0, float(stretch))
    per_sweep, calibrations, summary = [], {}, []
    for j, probe in enumerate(isim.PROBES):
        if probes and probe.name not in probes:
            continue
        base = 5_000_000 + 1000 * j
        estimates = {}  # (k, sweep name, method) -> (n - 1, 6) frame-to-frame estimate
        frames_k1 = {}
        for k in stretches:
            t0 = time.perf_counter()
            test_sw = _sweeps(isim, probe, [base + i for i in range(n_test)], n_frames, k, cache)
            calib_sw = _sweeps(isim, probe, [base + 800 + i for i in range(n_calib)], n_frames, k, cache)
            log.info("%s x%g: %d + %d sweeps ready in %.0f s", probe.name, k, n_test, n_calib, time.perf_counter() - t0)
            t0 = time.perf_counter()
            dec = calibrate_decorrelation([(s.frames, s.transforms["ImageToReference"].matrices, s.pixel_spacing_mm)
                                           for _, s, _ in calib_sw])
            calibrations[f"{probe.name} x{k:g}"] = {**dec.to_dict(), "seconds": time.perf_counter() - t0}
            log.info("%s x%g calibrated: sigma per depth band %s mm", probe.name, k,
                     ", ".join(f"{v:.3f}" for v in dec.sigma_bands_mm))
            models = {"shipped": (shipped, None), "decorrelation (uncalibrated)": ("decorrelation", None),
                      "decorrelation (calibrated)": ("decorrelation", dec)}
            for sname, seq, direction in test_sw:
                truth = seq.transforms["ImageToReference"].matrices
                if k == 1.0:
                    frames_k1[sname] = seq.frames
                frame_diff = int(np.abs(seq.frames.astype(np.int16) - frames_k1[sname].astype(np.int16)).max())
                row = {"probe": probe.name, "stretch": k, "sweep": sname, "direction": direction,
                       "max_frame_difference": frame_diff,
                       "net_elevational_mm": elevational_displacement_mm(truth, (seq.n_rows, seq.n_cols), 0,
                                                                         seq.n_frames - 1)}
                for mname, (model, cfg) in models.items():
                    r = track_sequence(seq, model, sweep_direction=direction, decorrelation=cfg)
                    m = tracking_metrics(truth, r.sequence.transforms["ImageToReference"].matrices,
                                         (seq.n_rows, seq.n_cols))
                    estimates[(k, sname, mname)] = r.frame_to_frame
                    diff = np.abs(r.frame_to_frame - estimates[(1.0, sname, mname)])
                    row[mname] = {"fdr_path_percent": m.fdr_path_percent, "final_drift_mm": m.final_drift_mm,
                                  "path_mm": m.path_length_mm,
                                  "max_estimate_difference_mm": float(diff[:, :3].max()),
                                  "max_estimate_difference_deg": float(diff[:, 3:].max())}
                    log.info("%s x%g %s: FDR %.1f %% of %.0f mm", sname, k, mname, m.fdr_path_percent, m.path_length_mm)
                per_sweep.append(row)
            rows = [r for r in per_sweep if r["probe"] == probe.name and r["stretch"] == k]
            summary.append({
                "probe": probe.name, "stretch": k, "sweeps": len(rows),
                "max_frame_difference": max(r["max_frame_difference"] for r in rows),
                "median_path_mm": float(np.median([r["shipped"]["path_mm"] for r in rows])),
                "calibrated_sigma_bands_mm": list(dec.sigma_bands_mm),
                **{mname: {"median_fdr_path_percent": float(np.median([r[mname]["fdr_path_percent"] for r in rows])),
                           "max_estimate_difference_mm": max(r[mname]["max_estimate_difference_mm"] for r in rows),
                           "max_estimate_difference_deg": max(r[mname]["max_estimate_difference_deg"] for r in rows)}
                   for mname in METHODS},
            })
    # Per pair (a sweep and its twin): the worse final drift of each method, and the least any estimator
    # that returns one trajectory for both can have. Both twins start from the same orientation and
    # move the same in plane; one estimate moves the image centre by some E along the normal while
    # the truths move it by D and k D, so the worse drift is at least
    # min_E max(|E - D| / L1, |E - k D| / Lk) = (k - 1) |D| / (L1 + Lk) of the paths L1, Lk.
    pairs, worse = [], {}
    for r1 in (r for r in per_sweep if r["stretch"] == 1.0):
        rk = next(r for r in per_sweep if r["stretch"] != 1.0 and r["sweep"] == r1["sweep"])
        k = rk["stretch"]
        pairs.append({
            "probe": r1["probe"], "sweep": r1["sweep"], "net_elevational_mm": [r1["net_elevational_mm"],
                                                                                rk["net_elevational_mm"]],
            "lower_bound_percent": 100.0 * (k - 1.0) * abs(r1["net_elevational_mm"])
            / (r1["shipped"]["path_mm"] + rk["shipped"]["path_mm"]),
            **{m: max(r1[m]["fdr_path_percent"], rk[m]["fdr_path_percent"]) for m in METHODS}})
    for pname in dict.fromkeys(p["probe"] for p in pairs):
        sel = [p for p in pairs if p["probe"] == pname]
        worse[pname] = {key: float(np.median([p[key] for p in sel])) for key in ("lower_bound_percent",) + METHODS}
        worse[pname]["pairs"] = len(sel)
        worse[pname]["pairs_at_or_above_bound"] = {m: sum(p[m] >= p["lower_bound_percent"] for p in sel)
                                                   for m in METHODS}
    result = {"simulator": "Testing/sensorless/independent_sim.py (tilts=False, elevation_stretch)",
              "stretches": list(stretches), "test_sweeps": n_test, "calibration_sweeps": n_calib,
              "frames_per_sweep": n_frames, "lower_bound_fraction_of_path": (stretch - 1.0) / (stretch + 1.0),
              "summary": summary, "worse_twin_median_fdr_path_percent": worse, "pairs": pairs, "calibrations": calibrations, "per_sweep": per_sweep,
              "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), "torch_threads": threads, "seconds": time.perf_counter() - t_start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless_scale_ambiguity.json").write_text(json.dumps(result, indent=2))
    print(f"\nElevational scale ambiguity on the independent simulator: {n_test} test sweeps per probe and k "
          f"(no tilts, {n_frames} frames, 40-80 mm), their twins stretched x{stretch:g}; decorrelation calibrated on "
          f"{n_calib} tracked sweeps of the same probe and k. Median final drift % of path; in brackets the largest "
          f"difference of the frame-to-frame estimates from those at k = 1 (mm). Load (1 min) {load_before[0]:.1f} -> "
          f"{result['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs, {result['seconds']:.0f} s.\n")
    print("| probe | k | median path mm | max frame diff | shipped | decorr. uncalibrated | decorr. calibrated | "
          "calibrated sigma per band mm |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        cells = " | ".join(f"{s[m]['median_fdr_path_percent']:.1f} ({s[m]['max_estimate_difference_mm']:.2g})"
                           for m in METHODS)
        sig = ", ".join(f"{v:.2f}" for v in s["calibrated_sigma_bands_mm"])
        print(f"| {s['probe']} | {s['stretch']:g} | {s['median_path_mm']:.0f} | {s['max_frame_difference']} | {cells} "
              f"| {sig} |")
    print("\nThe worse of a sweep and its twin: median over the sweeps of the larger final drift % of path; "
          "the least possible for an estimator that returns one trajectory for both, (k - 1) |D| / (L1 + Lk) "
          "(D: the net elevational displacement at k = 1, L1, Lk: the paths); in brackets the pairs at or above "
          "it\n")
    print("| probe | least possible | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for pname, w in worse.items():
        print(f"| {pname} | {w['lower_bound_percent']:.1f} | "
              + " | ".join(f"{w[m]:.1f} ({w['pairs_at_or_above_bound'][m]}/{w['pairs']})" for m in METHODS) + " |")
    print(f"\n(k - 1) / (k + 1) = {100 * result['lower_bound_fraction_of_path']:.0f} %: the same bound for a sweep "
          "that only moves forward along its normal (|D| = L1, Lk = k L1).")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stretch", type=float, default=1.6, help="k of the stretched twins (> 1; k = 1 always runs)")
    ap.add_argument("--test", type=int, default=4, help="test sweeps per probe and k")
    ap.add_argument("--calib", type=int, default=4, help="tracked calibration sweeps per probe and k")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--probes", nargs="*", help="probe names (default: all three)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=RESULTS / "sensorless_scale_ambiguity_sweeps",
                    help="simulated sweeps, kept")
    a = ap.parse_args()
    if not a.stretch > 1.0:
        ap.error(f"--stretch must be > 1, got {a.stretch}")
    run(a.stretch, a.test, a.calib, a.frames, a.probes, a.threads, a.cache)

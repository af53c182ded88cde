"""Per-probe adaptation on the independent test simulator: shipped vs adapted vs calibrated decorrelation.

For each probe of ``Testing/sensorless/independent_sim.py`` (never trained on), ``--adapt N``
tracked adaptation sweeps (seeds ``5_000_000 + 1000 * probe + 700 + k``, directions alternating;
the last is held back by the adaptation) and ``--test M`` other sweeps of the probe (the
independent benchmark's seeds ``... + k``). Methods on the test sweeps, each with the sweep's
true direction:

- ``shipped``: the shipped model as it is;
- ``adapted``: :func:`SensorlessTrackingLib.adapt.adapt_model` as ``freehandus track adapt`` runs it
  (the correction chosen by leave-one-sweep-out drift on the adaptation sweeps: none, the
  out-of-plane scale, the blend with speckle decorrelation or the calibrated decorrelation instead);
- ``scale only``: the same forced to the one out-of-plane scale (``corrections=("scale",)``);
- ``fine-tuned`` (``--fine-tune``): ``adapted`` with ``fine_tune=True`` (``--max-minutes``);
- ``decorrelation (calibrated)``: the baseline, :func:`~SensorlessTrackingLib.decorrelation.calibrate_decorrelation`
  on the same adaptation sweeps as it was before the coherence correction: its curve per depth band
  (4 x 4 patches), the tilt mode with the lowest drift on the adaptation sweeps themselves;
- ``decorrelation + coherence``: its default now, which the adaptation's ``decorrelation``
  candidate uses: the coherence correction and the tilt mode chosen on held-out sweeps.

The adaptation calibrates the decorrelation anew in each leave-one-sweep-out fold (the held-out
sweep never seen) and keeps the calibrated decorrelation unless another candidate is clearly better.

With ``--plus`` it scores the real PLUS recordings in ``../shared/data/plus`` instead
(SpinePhantomFreehand, BoneUltrasound_L14; item 6 of issue 25): each recording is cut into a first
and a second half by frame; the model is adapted on one half (cut into ``--segments`` consecutive
pieces, the last held back) and scored on the other, both ways round, next to the shipped model
and the decorrelation calibrated on the same half. Each half is estimated with the direction
its tracking moved (``--sweep-direction away`` for BoneUltrasound_L14, as a user would give it).
Writes ``results/sensorless_adapt_plus.json``.

Writes ``results/sensorless_adapt.json`` (``sensorless_adapt_fine_tune.json`` with
``--fine-tune``) and prints a table (median / mean final drift % of
path, mean angle error, adaptation seconds, the chosen correction) and where the drift comes
from (:func:`~SensorlessTrackingLib.attribution.drift_attribution`: the drift with only the
elevational step, only the tilts or only the in-plane motion estimated).

    .venv/bin/python Testing/benchmarks/bench_sensorless_adapt.py --adapt 6 --test 10 --threads 1
    .venv/bin/python Testing/benchmarks/bench_sensorless_adapt.py --adapt 6 --test 10 --splits 5 --threads 1
    .venv/bin/python Testing/benchmarks/bench_sensorless_adapt.py --plus --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"

#: Where each test sweep's final drift comes from (:func:`SensorlessTrackingLib.attribution.drift_attribution`):
#: the final drift with only that group of parameters estimated, the rest true.
ATTRIBUTION = ("fdr_elevational_only_percent", "fdr_tilt_only_percent", "fdr_in_plane_only_percent")


def _isim():
    import importlib.util

    spec = importlib.util.spec_from_file_location("independent_sim", REPO / "Testing" / "sensorless" / "independent_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["independent_sim"] = module
    spec.loader.exec_module(module)
    return module


def _sweeps(isim, probe, seeds, n_frames, cache: Path):
    """(name, TrackedSequence, direction) of each seed, simulated once into ``cache``."""
    from FreehandUSLib.io import read_sequence, write_sequence

    out = []
    for k, seed in enumerate(seeds):
        length = float(np.random.default_rng(seed).uniform(40.0, 80.0))
        direction = "toward" if k % 2 == 0 else "away"
        name = f"{probe.name}-{seed}-{direction}"
        path = cache / f"{name}-{n_frames}.igs.mha"
        if path.is_file():
            seq = read_sequence(path)
        else:
            seq = isim.simulate(probe, seed, n_frames=n_frames, length_mm=length, direction=direction).sequence
            cache.mkdir(parents=True, exist_ok=True)
            write_sequence(seq, path)
        out.append((name, seq, direction))
    return out


def run(n_adapt=4, n_test=4, n_frames=80, probes=None, fine_tune=False, max_minutes=5.0, epochs=4, threads=1,
        cache: Path = RESULTS / "sensorless_adapt_sweeps", lr=1e-4, split_seed=None, write=True) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless_adapt")
    import torch

    from SensorlessTrackingLib.adapt import CORRECTIONS, AdaptConfig, adapt_model
    from SensorlessTrackingLib.attribution import drift_attribution
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import default_model_path, load_model, track_sequence

    torch.set_num_threads(threads)
    isim = _isim()
    shipped = load_model(default_model_path())
    load_before = os.getloadavg()[0]
    rows, adaptations = {}, {}
    for j, probe in enumerate(isim.PROBES):
        if probes and probe.name not in probes:
            continue
        base = 5_000_000 + 1000 * j
        t0 = time.perf_counter()
        adapt_sw = _sweeps(isim, probe, [base + 700 + k for k in range(n_adapt)], n_frames, cache)
        test_sw = _sweeps(isim, probe, [base + k for k in range(n_test)], n_frames, cache)
        log.info("%s: %d + %d sweeps simulated in %.0f s", probe.name, n_adapt, n_test, time.perf_counter() - t0)
        if split_seed is not None:  # another choice of the adaptation sweeps among all of them
            pool = adapt_sw + test_sw
            order = np.random.default_rng(split_seed).permutation(len(pool))
            adapt_sw, test_sw = [pool[i] for i in order[:n_adapt]], [pool[i] for i in order[n_adapt:]]
        methods = {"shipped": shipped}
        info = {}
        with tempfile.TemporaryDirectory() as tmp:
            variants = [("adapted", False, CORRECTIONS), ("scale only", False, ("scale",))]
            variants += [("fine-tuned", True, CORRECTIONS)] if fine_tune else []
            for name, tune, corrections in variants:
                t0 = time.perf_counter()
                res = adapt_model([(n, s) for n, s, _ in adapt_sw], Path(tmp) / f"{name.replace(' ', '-')}.pt",
                                  config=AdaptConfig(fine_tune=tune, max_minutes=max_minutes, epochs=epochs, lr=lr,
                                                     corrections=corrections))
                info[name] = {**res.to_dict(), "seconds": time.perf_counter() - t0}
                log.info("%s %s:\n%s", probe.name, name, res)
                methods[name] = load_model(res.checkpoint)
        decs = {}
        for dname, kw in (("decorrelation (calibrated)", {"coherence": False, "rotation_choice": "in-sample"}),
                          ("decorrelation + coherence", {})):
            t0 = time.perf_counter()
            decs[dname] = calibrate_decorrelation([(s.frames, s.transforms["ImageToReference"].matrices,
                                                    s.pixel_spacing_mm) for _, s, _ in adapt_sw], **kw)
            info[dname] = {**decs[dname].to_dict(), "seconds": time.perf_counter() - t0}
            methods[dname] = "decorrelation"
        adaptations[probe.name] = info
        for sname, seq, direction in test_sw:
            truth = seq.transforms["ImageToReference"].matrices
            for mname, model in methods.items():
                r = track_sequence(seq, model, sweep_direction=direction, decorrelation=decs.get(mname))
                est = r.sequence.transforms["ImageToReference"].matrices
                m = tracking_metrics(truth, est, (seq.n_rows, seq.n_cols))
                parts = drift_attribution(truth, est, (seq.n_rows, seq.n_cols))
                rows.setdefault(mname, {})[sname] = {"probe": probe.name, **m.to_dict(),
                                                     **{k: parts[k] for k in ATTRIBUTION}}
                log.info("%s %s: FDR %.1f %%, angle %.1f deg", sname, mname, m.fdr_path_percent,
                         m.mean_angle_error_deg)
    summary = {}
    for mname, per in rows.items():
        for group in sorted({r["probe"] for r in per.values()}) + ["all"]:
            sel = [r for r in per.values() if group == "all" or r["probe"] == group]
            summary.setdefault(mname, {})[group] = {
                "sweeps": len(sel),
                "median_fdr_path_percent": float(np.median([r["fdr_path_percent"] for r in sel])),
                "mean_fdr_path_percent": float(np.mean([r["fdr_path_percent"] for r in sel])),
                "mean_angle_error_deg": float(np.mean([r["mean_angle_error_deg"] for r in sel])),
                **{f"median_{k}": float(np.median([r[k] for r in sel])) for k in ATTRIBUTION},
            }
    result = {"simulator": "Testing/sensorless/independent_sim.py", "adaptation_sweeps": n_adapt,
              "test_sweeps": n_test, "frames_per_sweep": n_frames, "fine_tune": fine_tune,
              "max_minutes": max_minutes, "epochs": epochs, "lr": lr, "summary": summary, "adaptations": adaptations,
              "per_sweep": rows, "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "cpu_count": os.cpu_count(), "torch_threads": threads}
    if not write:
        return result
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sensorless_adapt{'_fine_tune' if fine_tune else ''}.json").write_text(json.dumps(result, indent=2))
    print(f"\nPer-probe adaptation on the independent simulator: {n_adapt} adaptation sweeps (1 held back), {n_test} "
          f"test sweeps per probe, {n_frames} frames; load {load_before:.1f} -> {result['load_average_after']:.1f} "
          f"on {os.cpu_count()} CPUs")
    head = f"{'method':<28} {'probe':<7} {'n':>2} {'median FDR %':>12} {'mean FDR %':>10} {'angle deg':>9}"
    print(head + "\n" + "-" * len(head))
    for mname, groups in summary.items():
        for group, s in groups.items():
            print(f"{mname:<28} {group:<7} {s['sweeps']:>2} {s['median_fdr_path_percent']:>12.1f} "
                  f"{s['mean_fdr_path_percent']:>10.1f} {s['mean_angle_error_deg']:>9.1f}")
    print("\nWhere the drift comes from: median final drift % with only the elevational step tz / only the tilts "
          "(rx, ry) / only the in-plane motion (tx, ty, rz) estimated, the rest true")
    for mname, groups in summary.items():
        for group, s in groups.items():
            print(f"{mname:<28} {group:<7} " + " / ".join(f"{s[f'median_{k}']:5.1f}" for k in ATTRIBUTION))
    for pname, info in adaptations.items():
        for mname, d in info.items():
            if "correction" in d:
                loo = ", ".join(f"{k} {v:.1f}" for k, v in d["candidates"].items())
                what = f"correction {d['correction']} (leave-one-sweep-out mean FDR %: {loo})"
                if d["correction"] == "scale":
                    what += f", scale {d['out_of_plane_scale']:.3f}"
                elif d["decorrelation_blend"]:
                    b = d["decorrelation_blend"]
                    what += (f", tz = {b['model_tz_weight']:.2f} model + {b['decorrelation_tz_weight']:.2f} "
                             f"decorrelation, tilts x {b['rotation_scale']:.2f}")
                elif d.get("decorrelation"):
                    what += f", decorrelation sigma {d['decorrelation']['sigma_mm']:.3f} mm"
            else:
                what = f"sigma {d['sigma_mm']:.3f} mm"
            print(f"  {pname} {mname}: {what}, {d['seconds']:.0f} s"
                  + (f", fine-tuned kept: {d['fine_tuned']}" if "fine_tuned" in d else ""))
    return result


def run_splits(n_splits, n_adapt=6, n_test=10, **kw) -> dict:
    """:func:`run` for ``n_splits`` random choices of the ``n_adapt`` adaptation sweeps among all
    ``n_adapt + n_test`` sweeps of each probe (the rest tested): how much the table depends on
    which sweeps the user happened to record. Writes ``results/sensorless_adapt_splits.json``."""
    runs = [run(n_adapt, n_test, split_seed=k, write=False, **kw) for k in range(1, n_splits + 1)]
    table = {}
    for r in runs:
        for mname, groups in r["summary"].items():
            for group, s in groups.items():
                t = table.setdefault(mname, {}).setdefault(group, {"median": [], "mean": []})
                t["median"].append(s["median_fdr_path_percent"])
                t["mean"].append(s["mean_fdr_path_percent"])
    result = {"splits": n_splits, "adaptation_sweeps": n_adapt, "test_sweeps": n_test, "per_split": table,
              "corrections": [{p: d["adapted"]["correction"] for p, d in r["adaptations"].items()} for r in runs]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless_adapt_splits.json").write_text(json.dumps(result, indent=2))
    print(f"\n{n_splits} random choices of {n_adapt} adaptation sweeps among {n_adapt + n_test} per probe: median "
          "final drift % of path on the other sweeps, mean over the choices (min-max)")
    for mname, groups in table.items():
        for group, t in groups.items():
            m = np.array(t["median"])
            print(f"{mname:<28} {group:<7} {m.mean():5.1f} ({m.min():.1f}-{m.max():.1f})   mean FDR {np.mean(t['mean']):5.1f}")
    print("chosen corrections:", result["corrections"])
    return result


def run_plus(segments=2, threads=1) -> dict:
    """Adapt on one half of each PLUS recording, score on the other (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless_adapt")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sensorless import _plus_sequences

    from SensorlessTrackingLib.adapt import AdaptConfig, adapt_model, tracked_direction
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation
    from SensorlessTrackingLib.metrics import tracking_metrics
    from SensorlessTrackingLib.predict import default_model_path, input_spacing, load_model, track_sequence

    torch.set_num_threads(threads)
    shipped = load_model(default_model_path())
    rows = []
    for name, seq in _plus_sequences(log):
        n = seq.n_frames
        halves = {"first half": np.arange(n // 2), "second half": np.arange(n // 2, n)}
        for adapt_name, test_name in (("first half", "second half"), ("second half", "first half")):
            adapt_seq, test_seq = seq.select(halves[adapt_name]), seq.select(halves[test_name])
            cuts = np.array_split(np.arange(adapt_seq.n_frames), segments)
            pieces = [(f"{name} {adapt_name} part {i + 1}", adapt_seq.select(c)) for i, c in enumerate(cuts)]
            truth = test_seq.transforms["ImageToReference"].matrices
            shape = (test_seq.n_rows, test_seq.n_cols)
            direction = tracked_direction(truth, shape)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = adapt_model(pieces, Path(tmp) / "probe.pt", config=AdaptConfig())
                log.info("%s adapted on the %s in %.0f s:\n%s", name, adapt_name, time.perf_counter() - t0, res)
                adapted = load_model(res.checkpoint)
            dec = calibrate_decorrelation([(s.frames, s.transforms["ImageToReference"].matrices, input_spacing(s)[0])
                                           for _, s in pieces])
            row = {"recording": name, "adapted_on": adapt_name, "tested_on": test_name, "test_frames": test_seq.n_frames,
                   "direction": direction, "correction": res.correction, "candidates": res.candidates,
                   "out_of_plane_scale": res.out_of_plane_scale, "decorrelation_blend": res.decorrelation_blend,
                   "decorrelation": res.decorrelation,
                   "adaptation_seconds": res.seconds}
            for mname, model in (("shipped", shipped), ("adapted", adapted), ("decorrelation (calibrated)", "decorrelation")):
                r = track_sequence(test_seq, model, sweep_direction=direction,
                                   decorrelation=dec if model == "decorrelation" else None)
                m = tracking_metrics(truth, r.sequence.transforms["ImageToReference"].matrices, shape)
                row[mname] = {"fdr_path_percent": m.fdr_path_percent, "mean_angle_error_deg": m.mean_angle_error_deg,
                              "path_mm": m.path_length_mm}
            rows.append(row)
    result = {"data": "../shared/data/plus", "segments": segments, "rows": rows, "torch_threads": threads,
              "load_average": os.getloadavg()[0]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless_adapt_plus.json").write_text(json.dumps(result, indent=2))
    print(f"\nAdaptation on half of a real PLUS recording ({segments} pieces, the last held back), scored on the "
          "other half: final drift % of path (mean angle error, deg)")
    head = (f"{'recording':<22} {'adapted on':<12} {'dir':<6} {'path mm':>7} {'shipped':>13} {'adapted':>13} "
            f"{'decorr. cal.':>13}  correction")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = " ".join(f"{r[m]['fdr_path_percent']:>6.1f} ({r[m]['mean_angle_error_deg']:>4.1f})"
                         for m in ("shipped", "adapted", "decorrelation (calibrated)"))
        print(f"{r['recording']:<22} {r['adapted_on']:<12} {r['direction']:<6} {r['shipped']['path_mm']:>7.0f} "
              f"{cells}  {r['correction']}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapt", type=int, default=4, help="adaptation sweeps per probe (the last held back)")
    ap.add_argument("--test", type=int, default=4, help="test sweeps per probe")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--probes", nargs="*", help="probe names (default: all three)")
    ap.add_argument("--fine-tune", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=5.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=RESULTS / "sensorless_adapt_sweeps", help="simulated sweeps, kept")
    ap.add_argument("--plus", action="store_true", help="the real PLUS recordings (half to adapt, half to test) instead")
    ap.add_argument("--segments", type=int, default=2, help="--plus: pieces the adaptation half is cut into")
    ap.add_argument("--splits", type=int, default=0,
                    help="also N random choices of the adaptation sweeps among all the probe's sweeps (not the table's)")
    a = ap.parse_args()
    if a.plus:
        run_plus(a.segments, a.threads)
        sys.exit(0)
    if a.splits:
        run_splits(a.splits, a.adapt, a.test, n_frames=a.frames, probes=a.probes, threads=a.threads, cache=a.cache)
        sys.exit(0)
    run(a.adapt, a.test, a.frames, a.probes, a.fine_tune, a.max_minutes, a.epochs, a.threads, a.cache, a.lr)

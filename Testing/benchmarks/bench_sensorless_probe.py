"""Sensorless tracking for one probe: the shipped model fine-tuned on that probe's tracked sweeps.

    python Testing/benchmarks/bench_sensorless_probe.py [--train-sweeps 24] [--sweeps 20] [--minutes 20]

The scenario of a user with a tracker: record sweeps with *their* probe, then
``freehandus track train RECORDINGS --init default`` adapts the shipped model to it. Here the
probe is the simulator's default linear probe (7.5 MHz, 40 mm deep, 256 x 256 pixels of about
0.16 mm, elevational PSF sigma 0.7 mm); its sweeps differ in tissue, trajectory (straight / C / S,
150-400 frames over 60-250 mm) and scatterers. Training sweeps use seeds from
``PROBE_TRAIN_SEED_BASE``, held-out sweeps from ``PROBE_TEST_SEED_BASE`` (disjoint from each
other and from the generic training and test seeds).

The fine-tuning runs through the command line (``track train --init default``), exactly as a
user would. Scored side by side on the held-out sweeps: the shipped model, the fine-tuned model,
and the decorrelation baseline calibrated on 6 of this probe's training sweeps. Writes
``Testing/benchmarks/results/sensorless_probe.json`` and prints a table of medians.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sensorless import KEYS, SHAPES, _score  # noqa: E402

REPO = HERE.parents[1]
RESULTS = REPO / "Testing" / "benchmarks" / "results"
PROBE_TRAIN_SEED_BASE = 5_000
PROBE_TEST_SEED_BASE = 950_000


def _probe_overrides() -> dict:
    from FreehandUSLib.simulation.probe import ProbeConfig

    return asdict(ProbeConfig())


def _sweeps(seeds, folder: Path, log, *, subject_folders: bool):
    """Simulate (or read back) the sweeps of ``seeds`` with the fixed probe; returns [(name, path)]."""
    from FreehandUSLib.io import write_sequence
    from SensorlessTrackingLib.simdata import simulate_sequence

    out = []
    for k, seed in enumerate(seeds):
        shape = SHAPES[k % 3]
        path = folder / (f"subject{seed}/sweep.igs.mha" if subject_folders else f"sweep_{seed}.igs.mha")
        if not path.is_file():
            t = time.perf_counter()
            seq = simulate_sequence(seed, shape=shape, probe_overrides=_probe_overrides()).sequence
            path.parent.mkdir(parents=True, exist_ok=True)
            write_sequence(seq, path, compress=False)
            log.info("simulated %s (%d frames) in %.1f s", path.name, seq.n_frames, time.perf_counter() - t)
        out.append((f"probe-{seed}-{shape}", path))
    return out


def _fine_tune(train_files, out_dir: Path, minutes: float, epochs: int, threads: int, log) -> Path:
    from FreehandUSLib.cli import main

    best = out_dir / "best.pt"
    history = out_dir / "history.json"
    if best.is_file() and history.is_file() and len(json.loads(history.read_text())) >= epochs:
        return best
    argv = ["track", "train", *[str(p) for _, p in train_files], "--init", "default", "--out", str(out_dir),
            "--epochs", str(epochs), "--clips-per-epoch", "256", "--lr", "5e-4", "--val-fraction", "0.15",
            "--threads", str(threads), "--max-minutes", str(minutes), "--no-progress"]
    log.info("freehandus %s", " ".join(argv))
    started = time.perf_counter()
    if main(argv) != 0:
        raise RuntimeError("fine-tuning failed (see the log above)")
    log.info("fine-tuning took %.1f min", (time.perf_counter() - started) / 60.0)
    return best


def run(n_train: int = 24, n_test: int = 20, minutes: float = 20.0, epochs: int = 40, threads: int = 1,
        work: Path | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log = logging.getLogger("bench_sensorless_probe")
    import torch

    torch.set_num_threads(threads)
    from FreehandUSLib.io import read_sequence
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation
    from SensorlessTrackingLib.predict import default_model_path, load_model

    work = work or RESULTS / "sensorless_probe"
    t0 = time.perf_counter()
    train_files = _sweeps([PROBE_TRAIN_SEED_BASE + k for k in range(n_train)], work / "train", log, subject_folders=True)
    test_files = _sweeps([PROBE_TEST_SEED_BASE + k for k in range(n_test)], work / "test", log, subject_folders=False)
    sim_minutes = (time.perf_counter() - t0) / 60.0
    t1 = time.perf_counter()
    tuned_path = _fine_tune(train_files, work / "fine_tuned", minutes, epochs, threads, log)
    tune_minutes = (time.perf_counter() - t1) / 60.0
    calib = []
    for _, p in train_files[:6]:
        seq = read_sequence(p)
        calib.append((seq.frames, seq.transforms["ImageToReference"].matrices, seq.pixel_spacing_mm))
    decor = calibrate_decorrelation(calib)
    log.info("decorrelation calibrated on 6 of this probe's sweeps: sigma %.3f mm", decor.sigma_mm)
    methods = {
        "shipped (generic)": load_model(default_model_path()),
        "fine-tuned on this probe": load_model(tuned_path),
        "decorrelation (calibrated on this probe)": "decorrelation",
    }
    per_sweep = {m: {} for m in methods}
    for name, path in test_files:
        seq = read_sequence(path)
        for m, model in methods.items():
            per_sweep[m][name] = r = _score(seq, model, decor, threads)
            log.info("%s %s: FDR %.1f %%", name, m, r["fdr_path_percent"])
    summary = {m: {f"median_{k}": float(np.nanmedian([r[k] for r in rows.values()])) for k in KEYS} for m, rows in per_sweep.items()}
    history = json.loads((work / "fine_tuned" / "history.json").read_text())
    result = {
        "probe": _probe_overrides(),
        "train_sweeps": n_train,
        "test_sweeps": [{"name": n, "path_length_mm": per_sweep["decorrelation (calibrated on this probe)"][n]["path_length_mm"]} for n, _ in test_files],
        "simulation_minutes": sim_minutes,
        "fine_tuning": {"minutes": tune_minutes, "epochs": len(history), "threads": threads, "checkpoint": str(tuned_path),
                        "history": history},
        "decorrelation_calibration": decor.to_dict(),
        "summary": summary,
        "per_sweep": per_sweep,
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensorless_probe.json").write_text(json.dumps(result, indent=2))
    print(f"\nOne probe ({n_train} training sweeps, fine-tuned {len(history)} epochs in {tune_minutes:.1f} min), "
          f"{n_test} held-out sweeps, medians")
    head = f"{'method':<42} {'FDR path %':>10} {'final mm':>9} {'GPE mm':>7} {'angle':>6} {'frames/s':>9}"
    print(head)
    print("-" * len(head))
    for m, s in sorted(summary.items(), key=lambda kv: kv[1]["median_fdr_path_percent"]):
        print(f"{m:<42} {s['median_fdr_path_percent']:>10.1f} {s['median_final_drift_mm']:>9.1f} {s['median_gpe_mm']:>7.1f} "
              f"{s['median_mean_angle_error_deg']:>6.1f} {s['median_frames_per_second']:>9.0f}")
    return result


def test_sensorless_probe_benchmark():
    """``make benchmark``: the full run (about an hour on 2 cores); asserts finite numbers only."""
    result = run()
    for name, s in result["summary"].items():
        assert np.isfinite(s["median_final_drift_mm"]), name


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sweeps", type=int, default=24)
    ap.add_argument("--sweeps", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=20.0, help="fine-tuning time budget")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, help="folder for the sweeps and the fine-tuned model")
    a = ap.parse_args()
    run(a.train_sweeps, a.sweeps, a.minutes, a.epochs, a.threads, a.work)
    sys.exit(0)

"""Sensorless tracking for one probe: the shipped model fine-tuned on that probe's tracked sweeps.

    python Testing/benchmarks/bench_sensorless_probe.py [--train-sweeps 24] [--sweeps 20] [--minutes 120]
        [--epochs 120] [--cumulative-weight 0] [--train-clip-length N] [--clips-per-epoch 256] [--init default]
        [--seed 0] [--val-fraction 0.15] [--image-size 128 112]

The scenario of a user with a tracker: record sweeps with *their* probe, then
``freehandus track train RECORDINGS --init default`` adapts the shipped model to it. Here the
probe is the simulator's default linear probe (7.5 MHz, 40 mm deep, 256 x 256 pixels of about
0.16 mm, elevational PSF sigma 0.7 mm); its sweeps differ in tissue, trajectory (straight / C / S,
150-400 frames over 60-250 mm) and scatterers. Training sweeps use seeds from
``PROBE_TRAIN_SEED_BASE``, held-out sweeps from ``PROBE_TEST_SEED_BASE`` (disjoint from each
other and from the generic training and test seeds).

The fine-tuning runs through the command line (``track train --init default``), exactly as a
user would, with the recipe given by the options (learning rate, epochs, clips per epoch, the
cumulative loss weight and the training clip length). The ``pairwise`` baseline is fine-tuned
the same way (same sweeps, recipe and budget) from the generic pairwise checkpoint
``results/sensorless_models/pairwise.pt`` when it is there, else trained from scratch on the
probe's sweeps. Scored side by side on the held-out sweeps: the shipped model, the fine-tuned
model, the fine-tuned pairwise baseline and the decorrelation baseline calibrated on 6 of this
probe's training sweeps; both learned models also with ``mirror_average="flip+reverse"`` (each
estimate averaged over the mirrored and backwards sweep, 4x the inference time). Writes
``Testing/benchmarks/results/sensorless_probe.json`` (with the issue's criteria: median FDR
<= 5 % and >= 30 % below decorrelation and below the better pairwise row, for the fine-tuned
model and again for it mirror-averaged) and prints a table of medians; its last column is the
FDR left once each sweep's out-of-plane steps are scaled by the one factor that suits that sweep
best (``SensorlessTrackingLib.attribution``): how much of the drift a wrong elevational scale
causes.

``--init`` names the checkpoint the fine-tuning starts from (default: the shipped model), and
the "generic" row scores that same checkpoint. Fine-tuned models are cached in
``WORK/dualtrack_fine_tuned_<first 12 hex digits of the init checkpoint's SHA-256>`` (so a new
shipped model never reuses a fine-tuning of the old one) and ``WORK/pairwise_fine_tuned``; a
cached run made with another recipe or on other training sweeps is refused (delete the folder or give ``--work``).
``--seed N`` seeds both fine-tunings (validation split, clip sampling, augmentation);
``--val-fraction 0`` trains on all training sweeps and keeps the last epoch. ``--image-size``
sets the input size both models are fine-tuned at (``track train --init ... --image-size``; the
weights fit any size): by default 128 x 112 pixels of 0.3 mm, nearly all of this probe's image,
where the checkpoints see 96 x 96 (see ``RECIPE``). A seed other than 0,
another ``--train-sweeps``, ``--val-fraction`` or ``--image-size`` adds ``_seedN`` / ``_Nsweeps`` /
``_valF`` / ``_ROWSxCOLS`` to both cache folders and to the result file. Fine-tunings that differ only
in their seed drift differently by more than a point (see ``RECIPE``), so a claim about the
recipe needs several seeds.
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
#: Tracked sweeps of the probe that the fine-tunings learn from.
TRAIN_SWEEPS = 24
#: Mirror averaging scored as extra rows (``track_sequence(..., mirror_average=...)``). On the 10
#: validation sweeps of this probe (seeds 960000-960009) "flip+reverse" took the fine-tunings with
#: seeds 0 / 1 / 2 from a median FDR of 5.99 / 5.75 / 6.26 % to 5.06 / 4.38 / 5.05 % (better on 8 of
#: 10 sweeps each); on the 20 held-out sweeps it did not carry over: 4.7 / 5.6 / 5.7 % against
#: 4.5 / 5.2 / 5.9 % (mean angle error 3.5 / 4.0 / 4.2 against 4.0 / 4.7 / 4.1 degrees; pairwise
#: 11.0 / 13.1 / 9.7 % against 12.3 / 14.6 / 11.9 %). So the best model stays the plain fine-tuning,
#: and the averaged rows get their own criteria.
MIRROR_AVERAGE = "flip+reverse"
BEST = "fine-tuned on this probe"
AVERAGED = f"fine-tuned, {MIRROR_AVERAGE} averaged"


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


def _recipe_args(recipe: dict) -> list[str]:
    args = ["--epochs", str(recipe["epochs"]), "--clips-per-epoch", str(recipe["clips_per_epoch"]), "--lr", str(recipe["lr"]),
            "--val-fraction", str(recipe["val_fraction"]), "--cumulative-weight", str(recipe["cumulative_weight"]),
            "--seed", str(recipe.get("seed", 0))]
    if recipe.get("train_clip_length"):
        args += ["--train-clip-length", str(recipe["train_clip_length"])]
    if recipe.get("image_size"):
        args += ["--image-size", *map(str, recipe["image_size"])]
    return args


def _same_recipe(train_config: dict, recipe: dict) -> bool:
    return (
        int(train_config.get("epochs", -1)) == recipe["epochs"]
        and int(train_config.get("clips_per_epoch", -1)) == recipe["clips_per_epoch"]
        and float(train_config.get("lr", -1)) == recipe["lr"]
        and float(train_config.get("val_fraction", -1)) == recipe["val_fraction"]
        and float(train_config.get("loss", {}).get("cumulative_weight", 0.0)) == recipe["cumulative_weight"]
        and train_config.get("clip_length") == recipe.get("train_clip_length")
        and int(train_config.get("seed", 0)) == int(recipe.get("seed", 0))
        and (not recipe.get("image_size")
             or list(train_config.get("model", {}).get("image_size", ())) == list(recipe["image_size"]))
    )


def _sweep_names(paths) -> list[str]:
    """Subject folder + file name of each path, sorted: the same sweeps whatever the working directory."""
    return sorted("/".join(Path(p).parts[-2:]) for p in paths)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fine_tune(train_files, out_dir: Path, minutes: float, recipe: dict, threads: int, log, *, init: str = "default",
               model: str | None = None) -> tuple[Path, bool]:
    """Fine-tune ``init`` (or train ``model`` from scratch when ``init`` is None) through the command line.

    Returns the best checkpoint and whether it was trained now (False: a cached run of the same recipe).
    """
    import torch

    from FreehandUSApp.cli import main

    best = out_dir / "best.pt"
    history = out_dir / "history.json"
    last = out_dir / "last.pt"
    if last.is_file():
        done = torch.load(last, map_location="cpu", weights_only=True).get("train_config", {})
        if not _same_recipe(done, recipe):
            raise RuntimeError(f"{out_dir} holds a run with another recipe; delete it or give --work")
        if _sweep_names(done.get("sequences", ())) != _sweep_names(p for _, p in train_files):
            raise RuntimeError(f"{out_dir} holds a run on other training sweeps (not these {len(train_files)}); "
                               "delete it or give --work")
    if best.is_file() and history.is_file() and len(json.loads(history.read_text())) >= recipe["epochs"]:
        log.info("using the cached fine-tuning in %s", out_dir)
        return best, False
    argv = ["track", "train", *[str(p) for _, p in train_files], "--out", str(out_dir), *_recipe_args(recipe),
            "--threads", str(threads), "--max-minutes", str(minutes), "--no-progress"]
    argv += ["--init", init] if init else ["--model", model]
    log.info("freehandus %s", " ".join(argv))
    started = time.perf_counter()
    if main(argv) != 0:
        raise RuntimeError("fine-tuning failed (see the log above)")
    log.info("fine-tuning took %.1f min", (time.perf_counter() - started) / 60.0)
    return best, True


#: The fine-tuning recipe of the benchmark: the shipped model's loss (no cumulative term), 120 epochs of
#: 256 clips. Candidates with the cumulative loss (weight 1, clips of 16 / 32 / 64 frames, 36 epochs)
#: did not lower the held-out drift (8.0 / 8.7 / 9.9 % against 7.9 %), so they are options, not the default.
#: 120 epochs rather than 60 were chosen on 10 validation sweeps of this probe (seeds 960000-960009, the
#: one-gap model: median FDR 5.9 % against 7.2 %, better on 6 of 10); on the held-out sweeps the
#: three-gap model then drifted 4.5 % against 5.9 % (pairwise, fine-tuned the same way: 12.3 / 13.2 %).
#: Fine-tunings differ with their seed (the validation split, clip sampling, augmentation): with
#: ``--seed 0 / 1 / 2`` the fine-tuned model drifted 4.5 / 5.2 / 5.9 % (pairwise 12.3 / 14.6 / 11.9 %),
#: so one seed's result is known to about +-0.7 points. Twice the probe's sweeps, all used for
#: training (``--train-sweeps 48 --val-fraction 0``, same steps), was not a clear gain on the validation
#: sweeps: 4.4 / 6.4 / 6.0 % for seeds 0 / 1 / 2 against 6.0 / 5.8 / 6.3 % (better on 19 of 30 sweep-seed
#: pairs); training on all 24 sweeps instead of 20 (``--val-fraction 0``, seed 0) gave 6.0 % as well.
#: Both models are fine-tuned at 128 x 112 pixels of 0.3 mm (38.4 x 33.6 mm, nearly all of this probe's
#: 40 x 38 mm image) rather than the shipped model's 96 x 96 (the central 28.8 mm): most of the drift
#: was out-of-plane rotation, which shows as a difference in decorrelation across the image, and a
#: wider image is a longer lever for it. Chosen on the validation sweeps (seeds 0 / 1: 4.5 / 4.1 %
#: against 6.0 / 5.8 %, better on 9 and 7 of 10); on the held-out sweeps, seeds 0 / 1 / 2,
#: 5.0 / 4.1 / 4.7 % against 4.5 / 5.2 / 5.9 % (mean 5.8 / 5.3 / 5.5 against 6.6 / 7.1 / 7.4 %,
#: better on 38 of 60 sweep-seed pairs, mean log ratio -0.26 +- 0.08; median mean angle error
#: 3.1 / 2.5 / 2.6 against 4.0 / 4.7 / 4.1 degrees), pairwise 10.9 / 12.6 / 12.2 % against
#: 12.3 / 14.6 / 11.9 %. ``--image-size 96 96`` gives the former recipe.
RECIPE = {"epochs": 120, "clips_per_epoch": 256, "lr": 5e-4, "val_fraction": 0.15, "cumulative_weight": 0.0,
          "train_clip_length": None, "seed": 0, "image_size": [128, 112]}
PAIRWISE_INIT = RESULTS / "sensorless_models" / "pairwise.pt"


def _criteria(model: str, summary: dict, pairwise: float, decorrelation: float) -> dict:
    """The issue's criteria for ``model``'s median FDR against the baselines' (percent of path)."""
    fdr = summary[model]["median_fdr_path_percent"]
    return {
        "best_model": model,
        "median_fdr_path_percent": fdr,
        "pairwise_reference_percent": pairwise,
        "reduction_vs_pairwise_percent": 100.0 * (1.0 - fdr / pairwise),
        "reduction_vs_decorrelation_percent": 100.0 * (1.0 - fdr / decorrelation),
        "fdr_at_most_5_percent": bool(fdr <= 5.0),
        "at_least_30_percent_lower_than_both": bool(fdr <= 0.7 * pairwise and fdr <= 0.7 * decorrelation),
    }


def variant_suffix(n_train: int, val_fraction: float, seed: int, image_size=None) -> str:
    """What sets a run apart from the defaults (training sweeps, validation share, seed, input
    size), for its cache folders and result file; "" for the defaults."""
    parts = []
    if image_size and list(image_size) != list(RECIPE["image_size"] or ()):
        parts.append(f"{image_size[0]}x{image_size[1]}")
    if n_train != TRAIN_SWEEPS:
        parts.append(f"{n_train}sweeps")
    if val_fraction != RECIPE["val_fraction"]:
        parts.append(f"val{val_fraction:g}")
    if seed:
        parts.append(f"seed{seed}")
    return "".join("_" + part for part in parts)


def run(n_train: int = TRAIN_SWEEPS, n_test: int = 20, minutes: float = 120.0, epochs: int = RECIPE["epochs"],
        threads: int = 1, work: Path | None = None, *, cumulative_weight: float = RECIPE["cumulative_weight"],
        train_clip_length: int | None = RECIPE["train_clip_length"], clips_per_epoch: int = RECIPE["clips_per_epoch"],
        lr: float = RECIPE["lr"], init: str = "default", seed: int = RECIPE["seed"],
        val_fraction: float = RECIPE["val_fraction"], image_size=RECIPE["image_size"]) -> dict:
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
    recipe = {**RECIPE, "epochs": int(epochs), "clips_per_epoch": int(clips_per_epoch), "lr": float(lr),
              "cumulative_weight": float(cumulative_weight), "val_fraction": float(val_fraction),
              "train_clip_length": int(train_clip_length) if train_clip_length else None, "seed": int(seed),
              "image_size": [int(v) for v in image_size] if image_size else None}
    suffix = variant_suffix(n_train, recipe["val_fraction"], recipe["seed"], recipe["image_size"])
    init_path = default_model_path() if init == "default" else Path(init)
    init_sha = _sha256(init_path)
    tuned_dir = work / f"dualtrack_fine_tuned_{init_sha[:12]}{suffix}"
    tuned_path, tuned_now = _fine_tune(train_files, tuned_dir, minutes, recipe, threads, log, init=str(init_path))
    tune_minutes = (time.perf_counter() - t1) / 60.0
    t2 = time.perf_counter()
    pairwise_init = str(PAIRWISE_INIT) if PAIRWISE_INIT.is_file() else None
    pairwise_dir = work / f"pairwise_fine_tuned{suffix}"
    pairwise_path, pairwise_now = _fine_tune(train_files, pairwise_dir, minutes, recipe, threads, log,
                                             init=pairwise_init, model="pairwise")
    pairwise_minutes = (time.perf_counter() - t2) / 60.0
    calib = []
    for _, p in train_files[:6]:
        seq = read_sequence(p)
        calib.append((seq.frames, seq.transforms["ImageToReference"].matrices, seq.pixel_spacing_mm))
    decor = calibrate_decorrelation(calib)
    log.info("decorrelation calibrated on 6 of this probe's sweeps: sigma %.3f mm", decor.sigma_mm)
    tuned, pairwise = load_model(tuned_path), load_model(pairwise_path)
    # (model, mirror averaging) per row; both learned models with and without the averaging
    methods = {
        "shipped (generic)" if init == "default" else f"{init_path.stem} (generic)": (load_model(init_path), "none"),
        BEST: (tuned, "none"),
        AVERAGED: (tuned, MIRROR_AVERAGE),
        "pairwise (fine-tuned on this probe)": (pairwise, "none"),
        f"pairwise (fine-tuned, {MIRROR_AVERAGE} averaged)": (pairwise, MIRROR_AVERAGE),
        "decorrelation (calibrated on this probe)": ("decorrelation", "none"),
    }
    per_sweep = {m: {} for m in methods}
    for name, path in test_files:
        seq = read_sequence(path)
        for m, (model, average) in methods.items():
            per_sweep[m][name] = r = _score(seq, model, decor, threads, mirror_average=average)
            log.info("%s %s: FDR %.1f %%", name, m, r["fdr_path_percent"])
    summary = {m: {f"median_{k}": float(np.nanmedian([r[k] for r in rows.values()])) for k in KEYS} for m, rows in per_sweep.items()}
    history = json.loads((tuned_dir / "history.json").read_text())
    pairwise_history = json.loads((pairwise_dir / "history.json").read_text())
    if not tuned_now:  # cached: the training time is the one its history recorded
        tune_minutes = history[-1]["seconds"] / 60.0
    if not pairwise_now:
        pairwise_minutes = pairwise_history[-1]["seconds"] / 60.0
    # the stricter reference: the better pairwise row, with or without the mirror averaging
    pw = min(v["median_fdr_path_percent"] for k, v in summary.items() if k.startswith("pairwise"))
    dec = summary["decorrelation (calibrated on this probe)"]["median_fdr_path_percent"]
    criteria = _criteria(BEST, summary, pw, dec)
    criteria["with_mirror_average"] = _criteria(AVERAGED, summary, pw, dec)
    result = {
        "probe": _probe_overrides(),
        "train_sweeps": n_train,
        "test_sweeps": [{"name": n, "path_length_mm": per_sweep["decorrelation (calibrated on this probe)"][n]["path_length_mm"]} for n, _ in test_files],
        "simulation_minutes": sim_minutes,
        "fine_tuning": {"minutes": tune_minutes, "cached": not tuned_now, "epochs": len(history), "threads": threads,
                        "checkpoint": str(tuned_path), "init": str(init_path), "init_sha256": init_sha,
                        "history": history},
        "pairwise_fine_tuning": {"minutes": pairwise_minutes, "cached": not pairwise_now, "epochs": len(pairwise_history),
                                 "threads": threads,
                                 "checkpoint": str(pairwise_path), "init": pairwise_init, "history": pairwise_history},
        "recipe": recipe,
        "criteria": criteria,
        "decorrelation_calibration": decor.to_dict(),
        "summary": summary,
        "per_sweep": per_sweep,
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sensorless_probe{suffix}.json").write_text(json.dumps(result, indent=2))
    print(f"\nOne probe ({n_train} training sweeps, fine-tuned {len(history)} epochs in {tune_minutes:.1f} min), "
          f"{n_test} held-out sweeps, medians")
    head = f"{'method':<46} {'FDR path %':>10} {'final mm':>9} {'GPE mm':>7} {'angle':>6} {'frames/s':>9} {'scale-fitted':>12}"
    print(head)
    print("-" * len(head))
    for m, s in sorted(summary.items(), key=lambda kv: kv[1]["median_fdr_path_percent"]):
        print(f"{m:<46} {s['median_fdr_path_percent']:>10.1f} {s['median_final_drift_mm']:>9.1f} {s['median_gpe_mm']:>7.1f} "
              f"{s['median_mean_angle_error_deg']:>6.1f} {s['median_frames_per_second']:>9.0f} "
              f"{s['median_fdr_scale_fitted_percent']:>12.1f}")
    for c in (criteria, criteria["with_mirror_average"]):
        print(f"{c['best_model']}: {c['reduction_vs_pairwise_percent']:.0f} % below pairwise, "
              f"{c['reduction_vs_decorrelation_percent']:.0f} % below decorrelation; <= 5 %: "
              f"{c['fdr_at_most_5_percent']}, >= 30 % below both: {c['at_least_30_percent_lower_than_both']}")
    return result


def test_sensorless_probe_benchmark():
    """``make benchmark``: the full run (about 2.5 h on 2 cores); asserts finite numbers only."""
    result = run()
    for name, s in result["summary"].items():
        assert np.isfinite(s["median_final_drift_mm"]), name


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sweeps", type=int, default=TRAIN_SWEEPS)
    ap.add_argument("--sweeps", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=120.0,
                    help="fine-tuning time budget of each model (120 epochs take 45 min at 96 x 96, 70 at 128 x 112)")
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, help="folder for the sweeps and the fine-tuned model")
    ap.add_argument("--cumulative-weight", type=float, default=RECIPE["cumulative_weight"],
                    help="weight of the cumulative (running-sum) loss in the fine-tuning (0: the shipped recipe)")
    ap.add_argument("--train-clip-length", type=int, default=RECIPE["train_clip_length"],
                    help="frames per training clip (default or 0: the model's)")
    ap.add_argument("--clips-per-epoch", type=int, default=RECIPE["clips_per_epoch"])
    ap.add_argument("--lr", type=float, default=RECIPE["lr"])
    ap.add_argument("--init", default="default", help="checkpoint to fine-tune (default: the shipped model)")
    ap.add_argument("--seed", type=int, default=RECIPE["seed"],
                    help="seed of both fine-tunings (another seed: its own cache folders and results/sensorless_probe_seedN.json)")
    ap.add_argument("--val-fraction", type=float, default=RECIPE["val_fraction"],
                    help="share of the training sweeps held out to pick the best epoch (0: train on all, keep the last)")
    ap.add_argument("--image-size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=RECIPE["image_size"],
                    help="input size both models are fine-tuned at (default 128 112; 96 96: the checkpoints' own)")
    a = ap.parse_args()
    run(a.train_sweeps, a.sweeps, a.minutes, a.epochs, a.threads, a.work, cumulative_weight=a.cumulative_weight,
        train_clip_length=a.train_clip_length, clips_per_epoch=a.clips_per_epoch, lr=a.lr, init=a.init, seed=a.seed,
        val_fraction=a.val_fraction, image_size=a.image_size)
    sys.exit(0)

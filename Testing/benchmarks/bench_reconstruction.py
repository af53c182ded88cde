"""Volume reconstruction speed: compiled kernels vs a vectorised-numpy reference, and hole filling.

Run ``python Testing/benchmarks/bench_reconstruction.py [--quick]``; prints a table and writes
``Testing/benchmarks/results/reconstruction.json``. Cases (issue 3):

- the 21 SpinePhantomFreehand frames (820x616) at 0.5 mm (needs ../shared/data/plus),
- those frames repeated 10x (210 frames),
- 300 synthetic 820x616 frames at 0.3 mm,

each for nearest+max, nearest+mean, linear+mean, linear+max, with and without hole filling (the spine
config's STICK), on 1 thread and on all cores; the numpy reference runs on the same frames
(capped at ``--numpy-frames`` per case: it is slow). Also:

- hole filling of a 300^3 volume with 30 % of its voxels known at random, through the public
  :func:`fill_holes` (float64 values) and through the reconstruction's own path (uint32 sums
  and counts read as means, filled values rounded into the uint8 output), wall and CPU time;
- peak memory of the 300-frame synthetic reconstruction per mode, with and without the
  float32 coverage map, measured in a fresh subprocess as the growth of the resident set
  (VmHWM after resetting it, so everything counts: numpy, numba, scratch) and with
  tracemalloc (numpy allocations), relative to the returned volumes; checked against the
  target "< 2x the output volumes + one batch of 32 frames"; side by side, the same
  reconstruction through the live path (accumulators for the whole grid);
- how far PLUS's saturating MEAN (``emulate_plus``) drifts from the exact mean on the 10x
  spine data.

- side by side with IGSIO's ``VolumeReconstructorTest`` (the C++ engine inside PLUS) when
  ``$IGSIO_VOLUME_RECONSTRUCTOR`` names it (build it with ``build_igsio.sh``; without it this part
  says so and the rest runs): both as whole processes on the same files, ours as
  ``freehandus reconstruct --config C --emulate-plus``, on SpinePhantomFreehand repeated to 21,
  210 and 1050 frames (``--igsio-frames``), 1 and 2 threads (``NumberOfThreads`` in a copy of the
  config), modes NN_MEAN+STICK, LN_MAXI, NN_LATE (fan), LI_MEAN, NN_MAXI, LI_LATEST; per row the
  median wall time of ``--igsio-repeats`` alternating runs, their ratio, each process's peak
  resident set, and the share of non-empty voxels identical in both outputs. Writes
  ``results/reconstruction_igsio.json`` and a markdown table beside it (``.md``). Alone:
  ``--igsio-only`` (with ``--quick``: 21 and 210 frames, 1 thread, 3 runs). IGSIO splits each
  frame's pixel extent between its threads, which paste into one volume at the same time; its
  output with 2 threads is not its 1-thread output (LI_MEAN on 21 frames: 98.6 % of non-empty
  voxels identical; three 2-thread runs agreed with each other), while ours does not change
  with threads, so 2-thread rows compare against that.

Timings are wall-clock (plus CPU seconds where noted) and depend on the machine's load
(recorded in the JSON: 1-minute load average at each row; load averages before and after the
IGSIO section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from FreehandUSLib import TrackedSequence
from FreehandUSLib.reconstruction import (
    HoleFillingElement,
    IncrementalReconstructor,
    ReconstructionOptions,
    fill_holes,
    reconstruct_volume,
)
from FreehandUSLib.reconstruction.holefill import STORE_ROUND, fill_holes_into
from FreehandUSLib.reconstruction.kernels import default_threads, voxel_matrices
from FreehandUSLib.reconstruction.masks import fan_row_ranges
from FreehandUSLib.reconstruction.reference import insert_frames_numpy

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PLUS = REPO.parent / "shared" / "data" / "plus"
MODES = [("nearest", "max"), ("nearest", "mean"), ("linear", "mean"), ("linear", "max")]
STICK = HoleFillingElement("STICK", stick_length_limit=9, number_of_sticks_to_use=1)


def load():
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover
        return (float("nan"),) * 3


def spine_case():
    from FreehandUSLib.io import read_sequence
    from FreehandUSLib.io.plus_config import read_plus_config

    seq = read_sequence(PLUS / "TestImages" / "SpinePhantomFreehand.igs.mha")
    config = read_plus_config(PLUS / "ConfigFiles" / "PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    return seq, config.coordinate_definitions.repository_fixed()


def synthetic_case(n_frames=300, seed=0):
    """300 speckle frames 820x616, 0.08 mm pixels, sweeping 0.2 mm per frame with a slow tilt."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n_frames, 616, 820), dtype=np.uint8)
    mats = np.tile(np.diag([0.08, 0.08, 1.0, 1.0]), (n_frames, 1, 1))
    mats[:, 2, 3] = 0.2 * np.arange(n_frames)
    tilt = np.deg2rad(8 * np.sin(np.linspace(0, np.pi, n_frames)))
    rot = np.zeros((n_frames, 3, 3))
    rot[:, 0, 0] = rot[:, 2, 2] = np.cos(tilt)
    rot[:, 0, 2], rot[:, 2, 0] = np.sin(tilt), -np.sin(tilt)
    rot[:, 1, 1] = 1
    mats[:, :3, :3] = rot @ mats[:, :3, :3]
    seq = TrackedSequence(frames=frames, transforms={"ImageToReference": (mats, np.ones(n_frames, bool))})
    return seq, None


def time_ours(seq, transforms, opts, repeats):
    best = None
    for _ in range(repeats):
        result = reconstruct_volume(seq, transforms, opts)
        if best is None or result.seconds < best.seconds:
            best = result
    return best


def time_numpy(seq, transforms, opts, grid, n_frames):
    from FreehandUSLib.reconstruction.reconstructor import resolve_image_to_reference

    mats, _ = resolve_image_to_reference(seq, transforms, opts.image_to_reference_transform)
    n = min(n_frames, seq.n_frames)
    vox = voxel_matrices(mats[:n], grid.reference_to_voxel)
    ranges = fan_row_ranges(seq.n_rows, seq.n_cols)
    start = time.perf_counter()
    insert_frames_numpy(seq.frames[:n], vox, ranges, grid.shape, compounding=opts.compounding,
                        linear=opts.interpolation == "linear")
    return n, time.perf_counter() - start


def run_case(name, seq, transforms, spacing, threads_list, numpy_frames, repeats, rows):
    for interpolation, compounding in MODES:
        for fill in (False, True):
            for threads in threads_list:
                opts = ReconstructionOptions(
                    output_spacing_mm=spacing, interpolation=interpolation, compounding=compounding,
                    fill_holes=fill, hole_filling=(STICK,) if fill else (), number_of_threads=threads,
                )
                result = time_ours(seq, transforms, opts, repeats)
                row = {
                    "case": name, "frames": seq.n_frames, "spacing_mm": spacing,
                    "interpolation": interpolation, "compounding": compounding, "fill_holes": fill,
                    "threads": threads, "dimensions": list(result.grid.dims),
                    "seconds": result.seconds, "insertion_seconds": result.insertion_seconds,
                    "hole_filling_seconds": result.hole_filling_seconds,
                    "frames_per_second": seq.n_frames / result.seconds,
                    "insertion_frames_per_second": seq.n_frames / result.insertion_seconds,
                    "load": list(load()),
                }
                if not fill and threads == threads_list[0]:
                    n, sec = time_numpy(seq, transforms, opts, result.grid, numpy_frames)
                    row["numpy_frames"] = n
                    row["numpy_frames_per_second"] = n / sec
                rows.append(row)
                print(_format(row), flush=True)


def _format(row):
    numpy_fps = f"{row['numpy_frames_per_second']:8.1f}" if "numpy_frames_per_second" in row else " " * 8
    return (
        f"{row['case']:<14} {row['interpolation']:<7} {row['compounding']:<5} "
        f"{'holes' if row['fill_holes'] else '     '} t={row['threads']} "
        f"{row['frames_per_second']:8.1f} fps (insert {row['insertion_frames_per_second']:7.1f}, "
        f"fill {row['hole_filling_seconds']:6.3f} s) numpy {numpy_fps} fps  grid {'x'.join(map(str, row['dimensions']))}"
    )


def hole_filling_300(threads_list, size=300, fraction=0.3):
    """Hole filling of a size^3 volume with ``fraction`` of its voxels known at random."""
    rng = np.random.default_rng(0)
    shape = (size, size, size)
    known = rng.random(shape, dtype=np.float32) < fraction
    base = np.where(known[..., None], rng.uniform(0, 255, size=shape + (1,)), 0.0)
    weight = known.astype(np.float64)
    # The reconstruction's representation: uint32 sums and counts of uint8 pixels.
    counts = np.where(known, rng.integers(1, 40, size=shape), 0).astype(np.uint32)
    sums = (counts * rng.integers(0, 256, size=shape)).astype(np.uint32)[..., None]
    out = []
    chains = {
        "STICK(9,1)": [STICK],
        "GAUSSIAN(3,0.667,0.5)+STICK": [HoleFillingElement("GAUSSIAN", size=3, stdev=0.6667, minimum_known_voxels_ratio=0.5), STICK],
    }
    small = tuple(slice(0, 12) for _ in range(3))
    for name, elements in chains.items():  # compile before timing
        fill_holes(base[small].copy(), known[small].copy(), weight[small].copy(), elements)
        fill_holes_into(np.zeros((12, 12, 12, 1), np.uint8), sums[small].copy(), known[small].copy(),
                        counts[small].copy(), elements, divide=True, store=STORE_ROUND)
    for name, elements in chains.items():
        for path in ("fill_holes float64", "recon uint32->uint8"):
            for threads in threads_list:
                if path.startswith("fill_holes"):
                    values = base.copy()
                    start, cpu = time.perf_counter(), time.process_time()
                    _, stats = fill_holes(values, known, weight, elements, n_threads=threads)
                else:
                    values = np.zeros(shape + (1,), np.uint8)
                    start, cpu = time.perf_counter(), time.process_time()
                    stats = fill_holes_into(values, sums, known, counts, elements, divide=True, store=STORE_ROUND,
                                            n_threads=threads)
                sec, cpu = time.perf_counter() - start, time.process_time() - cpu
                out.append({"volume": f"{size}^3", "known_fraction": fraction, "elements": name, "path": path,
                            "threads": threads, "seconds": sec, "cpu_seconds": cpu, "filled": stats.filled,
                            "holes": stats.holes, "load": list(load())})
                print(f"hole filling {size}^3 ({100 * fraction:.0f} % known) {name:<28} {path:<20} t={threads} "
                      f"{sec:6.2f} s (cpu {cpu:5.2f} s; {stats.filled:,} of {stats.holes:,} holes filled; "
                      f"load {load()[0]:.1f})", flush=True)
                del values
    return out


def plus_mean_drift(seq, transforms):
    """Share of voxels where PLUS's saturating, truncating MEAN differs from the exact mean by > 2."""
    opts = ReconstructionOptions(output_spacing_mm=0.5, compounding="mean")
    exact = reconstruct_volume(seq, transforms, opts)
    plus = reconstruct_volume(seq, transforms, opts.replace(emulate_plus=True))
    both = (exact.weight.voxels > 0) & (plus.weight.voxels > 0)
    diff = np.abs(exact.volume.voxels[both].astype(int) - plus.volume.voxels[both].astype(int))
    return {"voxels": int(both.sum()), "share_off_by_more_than_2": float(np.mean(diff > 2)),
            "mean_abs_difference": float(diff.mean())}


MEMORY_MODES = [("nearest", "max", False), ("nearest", "mean", False), ("linear", "mean", False),
                ("linear", "max", False), ("nearest", "mean", True)]
BATCH_FRAMES = 32  # frames per insertion batch (the target allows one batch beside 2x the output)


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_child(interpolation, compounding, fill, n_frames, spacing, coverage=True, path="batch"):
    """Run in a fresh process: peak memory of one reconstruction of the synthetic sweep.

    ``path``: ``batch`` (:func:`reconstruct_volume`, slabs) or ``live`` (an
    :class:`IncrementalReconstructor` on the same grid: accumulators for the whole grid).
    """
    seq, _ = synthetic_case(n_frames=n_frames)
    opts = ReconstructionOptions(output_spacing_mm=spacing, interpolation=interpolation, compounding=compounding,
                                 fill_holes=fill, hole_filling=(STICK,) if fill else (), number_of_threads=1,
                                 output_weight=coverage)
    grid = reconstruct_volume(seq, None, opts).grid  # compile / load the kernels first

    def run():
        if path == "batch":
            return reconstruct_volume(seq, None, opts)
        recon = IncrementalReconstructor(opts, image_shape=(seq.n_rows, seq.n_cols), grid=grid)
        recon.add_frames(seq.frames, seq.transforms["ImageToReference"].matrices)
        return recon.result(consume=True)
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        rss0 = _status_bytes("VmRSS:")
    except OSError:  # pragma: no cover (not Linux)
        rss0 = None
    tracemalloc.start()
    result = run()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss = _status_bytes("VmHWM:") - rss0 if rss0 is not None else None
    out_bytes = result.volume.voxels.nbytes
    returned = out_bytes + (result.weight.voxels.nbytes if result.weight is not None else 0)
    peak = rss if rss is not None else traced
    batch = BATCH_FRAMES * seq.n_rows * seq.n_cols * seq.frames.itemsize
    return {
        "mode": f"{interpolation}+{compounding}" + ("+holes" if fill else ""), "path": path,
        "coverage_map": coverage, "frames": n_frames,
        "dimensions": list(result.grid.dims), "output_volume_bytes": out_bytes, "returned_volumes_bytes": returned,
        "batch_of_frames_bytes": batch, "peak_rss_growth_bytes": rss, "peak_traced_bytes": traced,
        "peak_over_output": peak / out_bytes, "peak_over_returned": peak / returned,
        "traced_over_output": traced / out_bytes, "target_bytes": 2 * returned + batch,
        "meets_target": bool(peak < 2 * returned + batch), "seconds": result.seconds,
    }


def peak_memory(n_frames, spacing=0.3):
    """:func:`peak_memory_child` for each of :data:`MEMORY_MODES`, each in its own process."""
    rows = []
    for interpolation, compounding, fill in MEMORY_MODES:
        for coverage, path in ((True, "batch"), (False, "batch"), (False, "live")):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-child",
                   json.dumps([interpolation, compounding, fill, n_frames, spacing, coverage, path])]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            mb = (row["peak_rss_growth_bytes"] or 0) / 2**20
            print(f"peak memory {row['mode']:<20} {path:<5} {'output+coverage' if coverage else 'output only    '} "
                  f"{mb:7.1f} MiB = {row['peak_over_returned']:5.2f} x returned volumes "
                  f"(target < 2x + one batch of frames: {'met' if row['meets_target'] else 'NOT met'})", flush=True)
    return rows


# -- IGSIO side by side (issue 24) -----------------------------------------------------------
# Ours (`freehandus reconstruct --emulate-plus`) and IGSIO's VolumeReconstructorTest (the engine
# inside PLUS; build it with build_igsio.sh) as whole processes on the same files, paired.

IGSIO_ENV = "IGSIO_VOLUME_RECONSTRUCTOR"
SPINE_SEQUENCE = PLUS / "TestImages" / "SpinePhantomFreehand.igs.mha"
SPINE_CONFIG = PLUS / "ConfigFiles" / "PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml"
# The fan of ../shared/data/igsio's configs (BoneUltrasound_L14: 820x616 frames, like the spine's).
FAN = {"FanAnglesDeg": "-28 31", "FanOriginPixel": "405 -300", "FanRadiusStartPixel": "330",
       "FanRadiusStopPixel": "900"}
NO_HOLES = {"FillHoles": "OFF"}
# <VolumeReconstruction> attributes over PLUS's SpinePhantom NN_MEAN config (STICK hole filling,
# 0.5 mm, full 820x616 clip rectangle); "LN_MAXI" is then PLUS's own LN_MAXI config.
IGSIO_MODES = {
    "NN_MEAN+STICK": {},
    "LN_MAXI": {"Interpolation": "LINEAR", "CompoundingMode": "MAXIMUM", **NO_HOLES},
    "NN_LATE (fan)": {"Interpolation": "NEAREST_NEIGHBOR", "CompoundingMode": "LATEST", **NO_HOLES, **FAN},
    "LI_MEAN": {"Interpolation": "LINEAR", "CompoundingMode": "MEAN", **NO_HOLES},
    "NN_MAXI": {"Interpolation": "NEAREST_NEIGHBOR", "CompoundingMode": "MAXIMUM", **NO_HOLES},
    "LI_LATEST": {"Interpolation": "LINEAR", "CompoundingMode": "LATEST", **NO_HOLES},
}
IGSIO_FRAMES = (21, 210, 1050)
IGSIO_FRAMES_QUICK = (21, 210)

# Runs one command in a fresh, stdlib-only Python: its wall time around the child alone and the
# child's peak resident set (ru_maxrss of RUSAGE_CHILDREN; this launcher's own ~10 MB is the floor).
_MEASURE = """\
import json, resource, subprocess, sys, time
cmd, log, cwd = json.loads(sys.argv[1])
with open(log, "wb") as f:
    start = time.perf_counter()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "returncode": rc, "peak_rss_bytes": peak}))
"""


def igsio_executable(env=None) -> tuple[Path | None, str]:
    """IGSIO's VolumeReconstructorTest from ``$IGSIO_VOLUME_RECONSTRUCTOR``: ``(path, "")`` or ``(None, why not)``."""
    value = (os.environ if env is None else env).get(IGSIO_ENV, "")
    hint = "build it with Testing/benchmarks/build_igsio.sh"
    if not value:
        return None, f"{IGSIO_ENV} is not set ({hint})"
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        return None, f"{IGSIO_ENV}={value} is not an executable file ({hint})"
    return path.resolve(), ""


def write_mode_config(template, attributes, threads, path) -> Path:
    """Copy the PLUS config ``template`` to ``path`` with ``<VolumeReconstruction>`` ``attributes``
    set and ``NumberOfThreads=threads``; with ``FillHoles="OFF"`` its ``<HoleFilling>`` is dropped."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(template)
    element = tree.getroot().find("VolumeReconstruction")
    if element is None:
        raise ValueError(f"{template}: no <VolumeReconstruction> element")
    for key, value in {**attributes, "NumberOfThreads": str(threads)}.items():
        element.set(key, value)
    if element.get("FillHoles", "OFF").upper() == "OFF":
        for child in element.findall("HoleFilling"):
            element.remove(child)
    tree.write(path, encoding="utf-8", xml_declaration=False)
    return Path(path)


def repeated_sequence(seq, n_frames):
    """``seq`` played again and again up to ``n_frames`` frames, in order, with all its transforms.

    Timestamps (s) grow by one recording length (plus one mean frame interval) per repetition,
    so the result is a valid, monotonic recording.
    """
    index = np.arange(n_frames) % seq.n_frames
    out = seq.select(index)
    ts = seq.timestamps_s
    period = float(ts[-1] - ts[0]) + (float(np.mean(np.diff(ts))) if seq.n_frames > 1 else 1.0)
    out.timestamps_s = ts[index] + (np.arange(n_frames) // seq.n_frames) * period
    return out


def run_measured(cmd, log, cwd) -> dict:
    """Run ``cmd`` (a list) as a whole process from a fresh launcher: wall seconds around the
    child, its return code and peak resident set in bytes. Output goes to ``log``."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _MEASURE, json.dumps([list(map(str, cmd)), str(log),
                                                                                    str(cwd)])],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def voxel_fidelity(ours_path, igsio_path) -> dict:
    """Agreement of two reconstructions (grey levels): over the voxels non-empty (non-zero) in
    either, the share identical and the share within 2; ``same_grid`` False when dimensions,
    origin (to 1e-3 mm) or spacing differ (then nothing else is compared)."""
    from FreehandUSLib.io import read_volume

    ours, theirs = read_volume(ours_path), read_volume(igsio_path)
    same = (ours.voxels.shape == theirs.voxels.shape
            and np.allclose(ours.origin_mm, theirs.origin_mm, atol=1e-3)
            and np.allclose(ours.spacing_mm, theirs.spacing_mm, atol=1e-6))
    out = {"same_grid": bool(same), "ours_shape": list(ours.voxels.shape), "igsio_shape": list(theirs.voxels.shape)}
    if not same:
        return out
    a, b = ours.voxels.astype(np.int64), theirs.voxels.astype(np.int64)
    nonempty = (a != 0) | (b != 0)
    diff = np.abs(a - b)[nonempty]
    n = int(nonempty.sum())
    out.update({"nonempty_voxels": n,
                "identical_share": float(np.mean(diff == 0)) if n else 1.0,
                "within_2_share": float(np.mean(diff <= 2)) if n else 1.0,
                "max_abs_difference": int(diff.max()) if n else 0})
    return out


def _tail(log) -> str:
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def _commit() -> dict:
    def git(*a):
        done = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "FreehandUS")
    return {"commit": git("log", "-1", "--format=%h %s"),
            "uncommitted_library_files": [line.strip() for line in changed.splitlines()] if changed else []}


def side_by_side(exe, ours_cli, *, frame_counts, threads_list, modes, repeats, workdir) -> list:
    """Paired whole-process timings of ours and IGSIO's on the spine recording repeated to each of
    ``frame_counts``, per mode of :data:`IGSIO_MODES` and thread count; medians of ``repeats``
    runs, the order alternating (ours first on even runs). Each (mode, threads) first runs once
    untimed at the smallest frame count (JIT cache, file cache); its times are kept apart."""
    from FreehandUSLib.io import read_sequence, write_sequence

    workdir = Path(workdir)
    spine = read_sequence(SPINE_SEQUENCE)
    rows, warmed = [], set()
    for n_frames in frame_counts:
        seq_path = workdir / f"spine{n_frames}.igs.mha"
        write_sequence(repeated_sequence(spine, n_frames), seq_path)
        for mode in modes:
            for threads in threads_list:
                config = write_mode_config(SPINE_CONFIG, IGSIO_MODES[mode], threads, workdir / "config.xml")
                ours_out, igsio_out = workdir / "ours.mha", workdir / "igsio.mha"
                cmds = {
                    "ours": [ours_cli, "reconstruct", seq_path, "--config", config, "--out", ours_out,
                             "--emulate-plus", "--no-progress"],
                    "igsio": [exe, f"--config-file={config}", f"--source-seq-file={seq_path}",
                              f"--output-volume-file={igsio_out}", "--image-to-reference-transform=ImageToReference"],
                }
                row = {"frames": n_frames, "mode": mode, "threads": threads, "repeats": repeats,
                       "load_before": list(load())}
                if (mode, threads) not in warmed:
                    warmed.add((mode, threads))
                    for who in ("ours", "igsio"):
                        row[f"{who}_first_run_seconds"] = run_measured(cmds[who], workdir / f"{who}.log",
                                                                       workdir)["seconds"]
                runs = {"ours": [], "igsio": []}
                for r in range(repeats):
                    for who in (("ours", "igsio") if r % 2 == 0 else ("igsio", "ours")):
                        res = run_measured(cmds[who], workdir / f"{who}.log", workdir)
                        if res["returncode"] != 0:
                            row["error"] = f"{who} exited {res['returncode']}: {_tail(workdir / f'{who}.log')}"
                            break
                        runs[who].append(res)
                    if "error" in row:
                        break
                row["load_after"] = list(load())
                if "error" not in row:
                    for who in ("ours", "igsio"):
                        row[f"{who}_seconds"] = float(np.median([x["seconds"] for x in runs[who]]))
                        row[f"{who}_seconds_all"] = [x["seconds"] for x in runs[who]]
                        row[f"{who}_peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs[who])
                    row["ratio_ours_over_igsio"] = row["ours_seconds"] / row["igsio_seconds"]
                    row["memory_ratio_ours_over_igsio"] = row["ours_peak_rss_bytes"] / row["igsio_peak_rss_bytes"]
                    row["fidelity"] = voxel_fidelity(ours_out, igsio_out)
                    if threads > 1:
                        # IGSIO's multi-threaded paste is not deterministic (threads split the image,
                        # and two may update one voxel in either order): also compare with its
                        # single-threaded volume, which ours (any thread count) reproduces.
                        one = write_mode_config(SPINE_CONFIG, IGSIO_MODES[mode], 1, workdir / "config_t1.xml")
                        igsio_t1 = workdir / "igsio_t1.mha"
                        res = run_measured([exe, f"--config-file={one}", f"--source-seq-file={seq_path}",
                                            f"--output-volume-file={igsio_t1}",
                                            "--image-to-reference-transform=ImageToReference"],
                                           workdir / "igsio_t1.log", workdir)
                        if res["returncode"] == 0:
                            row["fidelity_vs_igsio_1_thread"] = voxel_fidelity(ours_out, igsio_t1)
                            row["igsio_fidelity_vs_its_1_thread"] = voxel_fidelity(igsio_out, igsio_t1)
                rows.append(row)
                print(_igsio_line(row), flush=True)
        seq_path.unlink()
    return rows


def _igsio_line(row) -> str:
    head = f"{row['frames']:>5} frames  {row['mode']:<14} t={row['threads']}"
    if "error" in row:
        return f"{head}  FAILED: {row['error']}"
    fid = row["fidelity"]
    ident = f"{100 * fid['identical_share']:6.2f} %" if fid["same_grid"] else "grids differ"
    return (f"{head}  ours {row['ours_seconds']:7.2f} s  IGSIO {row['igsio_seconds']:7.2f} s  "
            f"ratio {row['ratio_ours_over_igsio']:5.2f}  RSS {row['ours_peak_rss_bytes'] / 1e6:6.0f} / "
            f"{row['igsio_peak_rss_bytes'] / 1e6:6.0f} MB  identical {ident}  load {row['load_after'][0]:.1f}")


def igsio_markdown(report) -> str:
    """The side-by-side report as markdown: a header (commit, machine, load) and one table row per case."""
    lines = ["# Reconstruction: ours vs IGSIO's VolumeReconstructorTest (whole processes, paired)", ""]
    if "skipped" in report:
        return "\n".join(lines + [f"Skipped: {report['skipped']}", ""])
    m = report["machine"]

    def commit(c):
        files = c["uncommitted_library_files"]
        return c["commit"] + (f" (uncommitted: {', '.join(files)})" if files else "")

    start, end = commit(report["commit"]), commit(report.get("commit_at_end", report["commit"]))
    lines += [
        f"- commit: {start}" + ("" if end == start else f"; at the end: {end}"),
        f"- machine: {m['cpus']} CPUs, Python {m['python']}; load average (1/5/15 min) before "
        f"{'/'.join(f'{v:.2f}' for v in m['load_start'])}, after {'/'.join(f'{v:.2f}' for v in m['load_end'])}",
        f"- SpinePhantomFreehand repeated; ours: `freehandus reconstruct --emulate-plus` "
        f"(kernels: {report.get('kernels', 'numba')}; bytecode: {report.get('bytecode', 'not compiled first')}); "
        f"IGSIO: {report['igsio']}",
        f"- median of {report['repeats']} alternating runs; ratio = ours / IGSIO (> 1: ours slower); peak RSS per "
        "process; identical / within 2: share of voxels non-empty in either output; with several threads, "
        "also ours against IGSIO's single-threaded volume and IGSIO's own run against it (IGSIO's threads "
        "can update a voxel in either order)",
        "",
        "| frames | mode | threads | ours s | IGSIO s | ours/IGSIO | ours MB | IGSIO MB | identical | within 2 "
        "| ours = IGSIO 1 thread | IGSIO = IGSIO 1 thread | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def share(fid):
        return "" if fid is None else (f"{100 * fid['identical_share']:.2f} %" if fid["same_grid"] else "grids differ")

    for row in report["rows"]:
        lead = f"| {row['frames']} | {row['mode']} | {row['threads']} |"
        if "error" in row:
            lines.append(f"{lead} failed: {row['error'].replace('|', '/')} |||||||||| ")
            continue
        fid = row["fidelity"]
        if fid["same_grid"]:
            ident, within = f"{100 * fid['identical_share']:.2f} %", f"{100 * fid['within_2_share']:.2f} %"
        else:
            ident = within = "grids differ"
        lines.append(
            f"{lead} {row['ours_seconds']:.2f} | {row['igsio_seconds']:.2f} | {row['ratio_ours_over_igsio']:.2f} | "
            f"{row['ours_peak_rss_bytes'] / 1e6:.0f} | {row['igsio_peak_rss_bytes'] / 1e6:.0f} | {ident} | {within} | "
            f"{share(row.get('fidelity_vs_igsio_1_thread'))} | {share(row.get('igsio_fidelity_vs_its_1_thread'))} | "
            f"{row['load_after'][0]:.2f} |")
    return "\n".join(lines + [""])


def run_igsio_side_by_side(args) -> dict:
    """The side-by-side section: runs it (or says why not), writes JSON and markdown, returns the report."""
    import tempfile

    exe, why = igsio_executable()
    ours_cli = Path(sys.executable).with_name("freehandus")  # the project's entry point beside its python
    if exe is None:
        report = {"skipped": why}
    elif not ours_cli.is_file():
        report = {"skipped": f"{ours_cli} not found: run the benchmark with the project's .venv/bin/python"}
    elif not SPINE_SEQUENCE.is_file():
        report = {"skipped": f"PLUS data not found: {SPINE_SEQUENCE}"}
    else:
        from FreehandUSLib.reconstruction import native

        # Our runs use the C kernels when they are built, and then must: a library gone stale
        # during the run (its sources edited) stops a row with an error instead of timing numba.
        kernels = "native" if native.available() else "numba"
        os.environ["FREEHANDUS_KERNELS"] = kernels
        # Our modules' bytecode, written as `pip install` does for an installed package: with
        # PYTHONDONTWRITEBYTECODE set (as on our machines) an editable checkout otherwise compiles
        # every module from source in every run, ~50 ms that no installed copy pays.
        roots = [str(REPO / d) for d in ("FreehandUS/FreehandUSLib", "FreehandUS/FreehandUSApp")]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *roots], check=True, capture_output=True)
        report = {"igsio": str(exe), "repeats": args.igsio_repeats, "commit": _commit(), "kernels": kernels,
                  "bytecode": "compiled before timing (compileall); PYTHONDONTWRITEBYTECODE="
                              + os.environ.get("PYTHONDONTWRITEBYTECODE", "unset"),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": list(load())}}
        with tempfile.TemporaryDirectory(prefix="bench_igsio_") as tmp:
            report["rows"] = side_by_side(exe, ours_cli, frame_counts=args.igsio_frames,
                                          threads_list=args.igsio_threads, modes=args.igsio_modes,
                                          repeats=args.igsio_repeats, workdir=tmp)
        report["machine"]["load_end"] = list(load())
        report["commit_at_end"] = _commit()  # the working tree may change during a long run
    if "skipped" in report:
        print(f"IGSIO side by side skipped: {report['skipped']}", flush=True)
    out = Path(args.igsio_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = igsio_markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 60 synthetic frames, 200^3 hole filling")
    parser.add_argument("--numpy-frames", type=int, default=21, help="frames given to the numpy reference per case")
    parser.add_argument("--out", default=str(HERE / "results" / "reconstruction.json"))
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    igsio = parser.add_argument_group(f"IGSIO side by side (needs ${IGSIO_ENV}, see build_igsio.sh)")
    igsio.add_argument("--igsio-only", action="store_true", help="run only the IGSIO side-by-side section")
    igsio.add_argument("--igsio-frames", type=int, nargs="+", metavar="N",
                       help=f"frame counts (default {' '.join(map(str, IGSIO_FRAMES))}; "
                            f"with --quick {' '.join(map(str, IGSIO_FRAMES_QUICK))})")
    igsio.add_argument("--igsio-threads", type=int, nargs="+", metavar="T", help="thread counts (default 1 2; "
                                                                                  "with --quick 1)")
    igsio.add_argument("--igsio-repeats", type=int, help="paired runs per row, median reported (default 5; "
                                                          "with --quick 3)")
    igsio.add_argument("--igsio-modes", nargs="+", choices=list(IGSIO_MODES), default=list(IGSIO_MODES),
                       metavar="MODE", help=f"modes (default all: {', '.join(IGSIO_MODES)})")
    igsio.add_argument("--igsio-out", default=str(HERE / "results" / "reconstruction_igsio.json"),
                       help="JSON output; the markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    if args.peak_child:
        print(json.dumps(peak_memory_child(*json.loads(args.peak_child))))
        return 0
    if args.igsio_frames is None:
        args.igsio_frames = list(IGSIO_FRAMES_QUICK if args.quick else IGSIO_FRAMES)
    if args.igsio_threads is None:
        args.igsio_threads = [1] if args.quick else [1, 2]
    if args.igsio_repeats is None:
        args.igsio_repeats = 3 if args.quick else 5
    for name in ("igsio_frames", "igsio_threads"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer each, got {getattr(args, name)}")
    if args.igsio_repeats < 1:
        parser.error(f"--igsio-repeats: expected a positive integer, got {args.igsio_repeats}")
    if args.igsio_only:
        run_igsio_side_by_side(args)
        return 0
    threads_list = sorted({1, default_threads()})
    repeats = 1 if args.quick else 3
    rows: list = []
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": list(load())}}
    # Compile the kernels before timing anything.
    warm, _ = synthetic_case(n_frames=2)
    for interpolation, compounding in MODES:
        reconstruct_volume(warm, None, ReconstructionOptions(interpolation=interpolation, compounding=compounding,
                                                             fill_holes=True, hole_filling=(STICK,)))
    print(f"{'case':<14} {'interp':<7} {'comp':<5} holes threads  frames/s (insertion, hole filling)  numpy reference")
    if (PLUS / "TestImages" / "SpinePhantomFreehand.igs.mha").is_file():
        spine, fixed = spine_case()
        run_case("spine21", spine, fixed, 0.5, threads_list, args.numpy_frames, repeats, rows)
        spine10 = TrackedSequence.concatenate([spine] * 10)
        run_case("spine21x10", spine10, fixed, 0.5, threads_list, args.numpy_frames, repeats, rows)
        report["plus_mean_drift_spine_x10"] = plus_mean_drift(spine10, fixed)
        print("PLUS MEAN vs exact mean on spine x10:", report["plus_mean_drift_spine_x10"], flush=True)
    else:
        print(f"PLUS data not found in {PLUS}: spine cases skipped")
    synth, _ = synthetic_case(n_frames=60 if args.quick else 300)
    run_case(f"synthetic{synth.n_frames}", synth, None, 0.3, threads_list, args.numpy_frames, 1, rows)
    report["peak_memory_synthetic"] = peak_memory(synth.n_frames, 0.3)
    report["hole_filling"] = hole_filling_300(threads_list, size=200 if args.quick else 300)
    report["rows"] = rows
    report["igsio_side_by_side"] = run_igsio_side_by_side(args)
    report["machine"]["load_end"] = list(load())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

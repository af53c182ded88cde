"""Draw the extension's catalog screenshot from a demo run: a reconstructed volume and a calibration.

    python Resources/make_screenshot.py                      # runs `freehandus demo --quick` first
    python Resources/make_screenshot.py --demo results/demo  # from an existing demo output folder
    # -> docs/images/FreehandUS-screenshot.png (the EXTENSION_SCREENSHOTURLS of CMakeLists.txt)

Left: two slices through the centre of the volume reconstructed from the demo's tracked sweep
(``volumes/us_tracked.nrrd``), in mm. Right: one frame of the simulated N-wire
calibration recording with the wire dots the Hessian detector finds (as the N-Wire Calibration
module overlays them) and the calibration result the module shows (errors, frames used,
ImageToProbe). Everything comes from files the demo writes; nothing is drawn by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "FreehandUS-screenshot.png"
#: Figure size (inches) and resolution: 1500 x 760 pixels.
FIGSIZE_IN = (15.0, 7.6)
DPI = 100


def _paths() -> None:
    for module in ("FreehandUS", "NWireCalibration", "SensorlessTracking"):
        folder = str(REPO_ROOT / module)
        if folder not in sys.path:
            sys.path.insert(0, folder)


def run_quick_demo(out_dir: Path) -> Path:
    """``freehandus demo --quick --out out_dir`` (about 30 s); returns ``out_dir``."""
    _paths()
    from FreehandUSApp.cli import main

    code = main(["demo", "--quick", "--out", str(out_dir), "--no-browser-check"])
    if code != 0:
        raise RuntimeError(f"freehandus demo --quick failed (exit {code})")
    return out_dir


def centre_slices(voxels: np.ndarray, spacing_mm) -> list[tuple[str, np.ndarray, tuple[float, float, float, float]]]:
    """Slices through the centre of a (k, j, i) volume, cropped to where frames reached.

    Returns
    -------
    list of (title, 2D array, extent in mm for ``imshow``)
        The slice at the middle j (across the sweep: one image plane's worth) and at the middle
        k (along the sweep), in the Reference frame's voxel axes.
    """
    sx, sy, sz = (float(v) for v in spacing_mm)
    reached = np.argwhere(voxels > 0)
    low, high = (reached.min(axis=0), reached.max(axis=0) + 1) if len(reached) else ((0, 0, 0), voxels.shape)
    box = voxels[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    nk, nj, ni = box.shape
    k, j = nk // 2, nj // 2
    x0, y0, z0 = low[2] * sx, low[1] * sy, low[0] * sz
    return [
        (f"slice j = {low[1] + j}", box[:, j, :], (x0, x0 + ni * sx, z0 + nk * sz, z0)),
        (f"slice k = {low[0] + k}", box[k], (x0, x0 + ni * sx, y0 + nj * sy, y0)),
    ]


def calibration_lines(calibration: dict) -> list[str]:
    """The calibration result as the N-Wire Calibration panel reports it."""
    cal, val = calibration["calibration"], calibration["validation"]
    matrix = np.asarray(calibration["ImageToProbe"], dtype=float)
    lines = [
        f"Phantom {calibration['phantom']}, solver {calibration['solver']}",
        f"Calibration: {cal['frames_used']} of {cal['frames_total']} frames used, "
        f"3D error {cal['error3d_mean_mm']:.2f} mm",
        f"Validation: {val['frames_used']} of {val['frames_total']} frames, "
        f"3D error {val['error3d_mean_mm']:.2f} mm",
        f"Pixel spacing {calibration['pixel_spacing_mm'][0]:.3f} x {calibration['pixel_spacing_mm'][1]:.3f} mm",
        "ImageToProbe:",
    ]
    lines += ["  " + "  ".join(f"{v:8.3f}" for v in row) for row in matrix]
    return lines


def render(demo_dir: Path, out: Path) -> Path:
    """Draw the screenshot from a demo output folder; returns ``out``."""
    _paths()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from NWireCalibrationLib.pipeline import detect_sequence, load_setup

    from FreehandUSLib import TrackedSequence
    from FreehandUSLib.io import read_sequence, read_volume

    demo_dir = Path(demo_dir)
    volume = read_volume(demo_dir / "volumes" / "us_tracked.nrrd")
    calibration = json.loads((demo_dir / "calibration" / "calibration.json").read_text())
    recording = read_sequence(demo_dir / "sequences" / "nwire_calibration.seq.nrrd")
    setup = load_setup(demo_dir / "calibration" / "nwire_config.xml")
    detection = detect_sequence(recording, setup, detector="hessian")
    shown = int(np.flatnonzero(detection.ok)[len(np.flatnonzero(detection.ok)) // 2])
    frame = recording.frames[shown]
    dots = detection.points_px[shown]
    assert isinstance(recording, TrackedSequence)

    figure = Figure(figsize=FIGSIZE_IN, dpi=DPI, facecolor="#202124")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=[1.6, 1.0], left=0.04, right=0.99, top=0.9, bottom=0.06,
                               wspace=0.12, hspace=0.3)  # fmt: skip
    text_colour = "#e8eaed"
    figure.suptitle("FreehandUS: volume reconstructed from a tracked sweep, and an automatic N-wire calibration",
                    color=text_colour, fontsize=15)  # fmt: skip
    voxels = np.asarray(volume.voxels, dtype=np.float32)
    high = float(np.percentile(voxels[voxels > 0], 99.5)) if np.any(voxels > 0) else 1.0
    for row, (title, image, extent) in enumerate(centre_slices(voxels, volume.spacing_mm)):
        axes = figure.add_subplot(grid[row, 0])
        axes.imshow(image, cmap="gray", vmin=0.0, vmax=high, extent=extent, interpolation="nearest")
        axes.set_title(f"Reconstructed volume (demo sweep), {title}, mm", color=text_colour, fontsize=11)
        axes.tick_params(colors=text_colour, labelsize=8)

    axes = figure.add_subplot(grid[0, 1])
    axes.imshow(frame, cmap="gray", interpolation="nearest")
    axes.scatter(dots[:, 0], dots[:, 1], s=60, facecolors="none", edgecolors="#fbbc04", linewidths=1.5)
    axes.set_title(f"N-wire frame {shown}: {len(dots)} wire dots detected", color=text_colour, fontsize=11)
    axes.set_axis_off()

    axes = figure.add_subplot(grid[1, 1])
    axes.set_axis_off()
    axes.text(0.0, 1.0, "\n".join(calibration_lines(calibration)), va="top", ha="left", family="monospace",
              fontsize=10, color=text_colour, transform=axes.transAxes)  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, facecolor=figure.get_facecolor())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="demo output folder (default: run `freehandus demo --quick`)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.demo is not None and not (args.demo / "demo_summary.json").is_file():
        print(f"error: {args.demo} is not a demo output folder (no demo_summary.json)", file=sys.stderr)
        return 2
    if args.demo is None:
        with tempfile.TemporaryDirectory(prefix="freehandus-demo-") as folder:
            written = render(run_quick_demo(Path(folder)), args.out)
    else:
        written = render(args.demo, args.out)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

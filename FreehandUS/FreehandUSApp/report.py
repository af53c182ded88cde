"""Self-contained HTML reports with embedded figures, and a headless look at them.

- Building blocks: :func:`figure_to_data_uri` (a matplotlib figure as a base64 PNG ``data:``
  URI), :func:`html_table`, :func:`render_page` (one HTML file, inline CSS, no external
  resource, so it opens anywhere, offline, and can be mailed).
- The demo report: :class:`DemoReportData` (what :func:`FreehandUSApp.demo.run_demo` measured)
  and :func:`write_demo_report` (figures: detected dots on sample frames, calibration residuals
  and error maps, sample sweep frames, orthogonal slices and maximum-intensity projections of
  the US and PA volumes, tracked vs sensorless volumes, trajectories, drift over time).
- Looking at it as a person would: :func:`render_report_png` renders an HTML file with a
  headless Chromium (Debian package ``chromium``) to a PNG, :func:`check_png_not_blank` checks
  that the picture has content (size, grey-level variance, distinct colours, non-background
  area). ``Resources/render_report.py`` is the command-line twin.

matplotlib is used through :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
display, no global state).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from FreehandUSLib.errors import FreehandUSError

__all__ = [
    "figure_to_data_uri",
    "html_table",
    "render_page",
    "DemoReportData",
    "DEMO_FIGURES",
    "demo_figures",
    "write_demo_report",
    "find_chromium",
    "render_report_png",
    "check_png_not_blank",
]

log = logging.getLogger(__name__)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d2330; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 28px 60px; background: #fff; }
header { background: #1f3b57; color: #fff; padding: 22px 28px; }
header h1 { margin: 0 0 6px; font-size: 26px; }
header p { margin: 0; color: #c9d6e3; }
h2 { border-bottom: 2px solid #1f3b57; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-bottom: 6px; }
pre.summary { background: #0f1724; color: #d7e3f0; padding: 14px 16px; border-radius: 6px; font-size: 13px;
              overflow-x: auto; line-height: 1.45; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 14px; }
th, td { border: 1px solid #c9ced6; padding: 5px 10px; text-align: left; }
th { background: #e8edf3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #e7f6e7; }
figure { margin: 10px 0 24px; }
figure img { width: 100%; height: auto; border: 1px solid #d5d9df; }
figcaption { font-size: 13px; color: #4a5568; margin-top: 4px; }
.note { background: #fff6dd; border-left: 5px solid #e0a800; padding: 10px 14px; margin: 12px 0; }
.ok { background: #e7f6e7; border-left: 5px solid #2e8b3d; padding: 10px 14px; margin: 12px 0; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
pre.code { background: #f0f2f5; padding: 10px 12px; border-radius: 4px; overflow-x: auto; }
.small { font-size: 13px; color: #4a5568; }
"""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_data_uri(fig, *, dpi: int = 90) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is not kept)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_table(header, rows, *, highlight_row: int | None = None) -> str:
    """An HTML table; cells are escaped text (floats formatted with 3 significant decimals)."""

    def cell(v):
        if isinstance(v, bool) or v is None or not isinstance(v, (int, float, np.integer, np.floating)):
            return "<td>" + html.escape("n/a" if v is None else str(v)) + "</td>"
        if isinstance(v, (float, np.floating)):
            v = float(v)
            text = "n/a" if not math.isfinite(v) else (f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
        else:
            text = str(int(v))
        return f'<td class="num">{text}</td>'

    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="best"' if highlight_row == i else ""
        out.append(f"<tr{cls}>" + "".join(cell(v) for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure_html(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def render_page(title: str, subtitle: str, body: str) -> str:
    """One self-contained HTML page (inline CSS, nothing loaded from elsewhere)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>\n"
        f"<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------
# Demo figures
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DemoReportData:
    """Everything the demo report shows (filled by :func:`FreehandUSApp.demo.run_demo`).

    Attributes
    ----------
    settings : DemoSettings
    calibration : the demo's calibration step (simulations, detections, results, summary dict)
    sweep : the demo's sweep step (probe, SweepResult, sequences, calibrations)
    stream : dict, streaming summary (``us``, ``pa``, ``frames_equal``)
    recon, recon_sensorless : ReconstructionResult (the second may be None)
    sensorless : dict, sensorless summary (methods, notes, metrics)
    centres : dict name -> (n, 3) image-centre positions (Reference mm): ``truth``, ``tracked``,
        ``decorrelation`` and, with the shipped model, ``model``
    timestamps_s : (n,) seconds from the first sweep frame
    metrics : dict name -> TrackingMetrics
    scene : dict, what the scene step wrote
    timings_s : dict step -> seconds
    files : dict name -> path
    out_dir : Path
    """

    settings: object
    calibration: object
    sweep: object
    stream: dict
    recon: object
    recon_sensorless: object
    sensorless: dict
    centres: dict
    timestamps_s: np.ndarray
    metrics: dict
    scene: dict
    timings_s: dict
    files: dict
    out_dir: Path
    summary_lines: list = field(default_factory=list)


def _sample_frame_indices(det_default, det_baseline, visible, n: int = 3) -> list[int]:
    """Frames to show: one where both detectors succeed, one where only the default does, one
    with an echo dropout (or evenly spaced ones)."""
    ok_a = np.asarray(det_default.ok)
    ok_b = np.asarray(det_baseline.ok)
    both = np.flatnonzero(ok_a & ok_b)
    only_a = np.flatnonzero(ok_a & ~ok_b)
    dropout = np.flatnonzero(~np.asarray(visible))
    picks = []
    for group in (both, only_a, dropout, both[len(both) // 2 :]):
        for i in group:
            if int(i) not in picks:
                picks.append(int(i))
                break
        if len(picks) == n:
            break
    for i in np.linspace(0, len(ok_a) - 1, n + 2).astype(int)[1:-1]:
        if len(picks) >= n:
            break
        if int(i) not in picks:
            picks.append(int(i))
    return picks[:n]


def fig_detected_dots(data: DemoReportData):
    cal = data.calibration
    sim = cal.sim
    frames = sim.sequence.frames
    picks = _sample_frame_indices(cal.detection, cal.baseline_detection, sim.visible)
    fig = _new_figure(13.5, 7.6)
    axes = fig.subplots(2, len(picks))
    axes = np.atleast_2d(axes)
    truth = np.asarray(sim.true_points_px)
    for col, f in enumerate(picks):
        img = frames[f]
        pts_t = truth[f]
        pts_a = cal.detection.points_px[f]
        pts_b = cal.baseline_detection.points_px[f]
        good = np.all(np.isfinite(pts_t), axis=1)
        lo = np.nanmin(pts_t[good], axis=0) - 45 if good.any() else np.array([0, 0])
        hi = np.nanmax(pts_t[good], axis=0) + 45 if good.any() else np.array(img.shape[::-1])
        for row, (ax, zoom) in enumerate(((axes[0, col], False), (axes[1, col], True))):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            drop = "" if sim.visible[f] else ", one wire without echo"
            status_a = "found" if cal.detection.ok[f] else "failed"
            status_b = "found" if cal.baseline_detection.ok[f] else "failed"
            ax.plot(pts_t[:, 0], pts_t[:, 1], "+", color="#4aa3ff", ms=14 if zoom else 8, mew=1.5, label="truth")
            ax.plot(pts_a[:, 0], pts_a[:, 1], "o", mfc="none", mec="#39e639", ms=12 if zoom else 7, mew=1.6,
                    label=f"Hessian ({status_a})")
            ax.plot(pts_b[:, 0], pts_b[:, 1], "x", color="#ff5050", ms=10 if zoom else 6, mew=1.6,
                    label=f"PLUS-style ({status_b})")
            if zoom:
                ax.set_xlim(lo[0], hi[0])
                ax.set_ylim(hi[1], lo[1])
                ax.set_title(f"zoom on the wires", fontsize=10)
            else:
                ax.set_title(f"calibration frame {f}{drop}", fontsize=10)
                ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def fig_calibration_residuals(data: DemoReportData):
    from NWireCalibrationLib.metrics import reprojection_errors_2d, reprojection_errors_3d, target_errors_mm
    from NWireCalibrationLib.pipeline import probe_to_reference

    cal = data.calibration
    sim, sim_v = cal.sim, cal.sim_validation
    phantom = cal.setup.phantom
    poses_v = probe_to_reference(sim_v.sequence)
    poses_c = probe_to_reference(sim.sequence)
    fig = _new_figure(14.0, 3.9)
    ax = fig.subplots(1, 4)
    colors = {"default": "#2e8b3d", "baseline": "#d0453a"}
    labels = {"default": "Hessian + RANSAC-LM", "baseline": "PLUS-style + LSQ"}
    runs = {
        "default": (cal.result, cal.detection, cal.detection_validation),
        "baseline": (cal.baseline, cal.baseline_detection, cal.baseline_detection_validation),
    }
    e3_all = {}
    for key, (res, det_c, det_v) in runs.items():
        e3 = reprojection_errors_3d(det_v.points_px, poses_v, res.image_to_probe, res.phantom_to_reference, phantom)
        e3_all[key] = e3[np.isfinite(e3)]
    top = max([np.percentile(v, 98) for v in e3_all.values() if v.size] + [0.5])
    bins = np.linspace(0, top * 1.05, 30)
    for key, v in e3_all.items():
        ax[0].hist(np.clip(v, 0, bins[-1]), bins=bins, alpha=0.55, color=colors[key],
                   label=f"{labels[key]} (mean {v.mean():.2f} mm)" if v.size else labels[key])
    ax[0].set_xlabel("PLUS 3D reprojection error, validation (mm)")
    ax[0].set_ylabel("middle-wire points")
    ax[0].legend(fontsize=8)
    for key, (res, det_c, det_v) in runs.items():
        e2 = reprojection_errors_2d(det_c.points_px, poses_c, res.image_to_probe, res.phantom_to_reference, phantom)
        e2 = e2.reshape(-1, 2)
        e2 = e2[np.all(np.isfinite(e2), axis=1)]
        ax[1].scatter(e2[:, 0], e2[:, 1], s=4, alpha=0.35, color=colors[key], label=labels[key])
    lim = 6.0
    ax[1].set_xlim(-lim, lim)
    ax[1].set_ylim(-lim, lim)
    ax[1].set_aspect("equal")
    ax[1].axhline(0, color="#888", lw=0.6)
    ax[1].axvline(0, color="#888", lw=0.6)
    ax[1].set_xlabel("2D residual x (px)")
    ax[1].set_ylabel("2D residual y (px)")
    ax[1].set_title("dot minus wire crossing (calibration)", fontsize=10)
    ax[1].legend(fontsize=8, markerscale=3)
    mask = sim.fov_mask
    h, w = mask.shape
    step = max(4, int(max(h, w) / 120))
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)
    inside = mask[ys.ravel(), xs.ravel()]
    maps = {}
    for key, (res, _, _) in runs.items():
        err = np.full(pts.shape[0], np.nan)
        err[inside] = target_errors_mm(res.image_to_probe, sim.image_to_probe, points_px=pts[inside])
        maps[key] = err.reshape(ys.shape)
    vmax = max(float(np.nanmax(m)) for m in maps.values())
    for a, key in zip(ax[2:], ("default", "baseline")):
        im = a.imshow(maps[key], extent=(0, w * data.calibration.sim.pixel_spacing_mm[0], h * sim.pixel_spacing_mm[1], 0),
                      cmap="viridis", vmin=0, vmax=vmax)
        a.set_title(f"error vs truth: {labels[key]}\nmean {np.nanmean(maps[key]):.2f} mm, max {np.nanmax(maps[key]):.2f} mm",
                    fontsize=10)
        a.set_xlabel("lateral (mm)")
        a.set_ylabel("depth (mm)")
    fig.colorbar(im, ax=ax[2:], shrink=0.85, label="mm")
    return fig


def fig_sweep_frames(data: DemoReportData):
    us = data.sweep.us.frames
    pa = data.sweep.pa.frames
    n = us.shape[0]
    picks = [int(round(v)) for v in np.linspace(0, n - 1, 3)]
    sx, sy = data.sweep.us.pixel_spacing_mm
    rows, cols = us.shape[1:]
    extent = (-(cols - 1) / 2 * sx, (cols - 1) / 2 * sx, rows * sy, 0)
    fig = _new_figure(14.0, 3.6)
    ax = fig.subplots(1, 4)
    pa_top = max(1.0, float(np.percentile(pa, 99.95)))
    for a, f in zip(ax[:3], picks):
        a.imshow(us[f], cmap="gray", vmin=0, vmax=255, extent=extent)
        overlay = np.ma.masked_less(pa[f].astype(float), 0.25 * pa_top)
        a.imshow(overlay, cmap="inferno", vmin=0, vmax=pa_top, alpha=0.85, extent=extent)
        a.set_title(f"US + PA overlay, frame {f} (t = {data.timestamps_s[f]:.2f} s)", fontsize=10)
        a.set_xlabel("lateral (mm)")
    ax[0].set_ylabel("image rows (mm)")
    ax[3].imshow(pa[picks[1]], cmap="inferno", vmin=0, vmax=pa_top, extent=extent)
    ax[3].set_title(f"photoacoustic channel, frame {picks[1]}", fontsize=10)
    ax[3].set_xlabel("lateral (mm)")
    return fig


def _slice_positions(pa_voxels: np.ndarray, weight: np.ndarray):
    """(k, j, i) voxel through which the slices pass: the middle of the sweep, the brightest
    photoacoustic column (a vessel) and its depth."""
    from scipy.ndimage import uniform_filter

    nk, nj, ni = pa_voxels.shape
    j = nj // 2
    pa = uniform_filter(pa_voxels.astype(np.float32), size=3)
    column = pa.max(axis=0)  # (j, i)
    if np.any(column > 0):
        jj, i = np.unravel_index(int(np.argmax(uniform_filter(column, size=7))), column.shape)
        k = int(np.argmax(pa[:, jj, i]))
    else:
        covered = np.argwhere(weight > 0)
        k, _, i = covered[len(covered) // 2] if covered.size else (nk // 2, nj // 2, ni // 2)
    return int(k), int(j), int(i)


def _volume_axes(volume):
    """Voxel-centre coordinates (x, y, z) in mm along i, j, k (volumes on the Reference axes)."""
    nk, nj, ni = volume.voxels.shape[:3]
    o, s = volume.origin_mm, volume.spacing_mm
    return (o[0] + s[0] * np.arange(ni), o[1] + s[1] * np.arange(nj), o[2] + s[2] * np.arange(nk))


def _extent(a, b, flip=False):
    lo_a, hi_a = a[0], a[-1]
    lo_b, hi_b = b[0], b[-1]
    return (lo_a, hi_a, hi_b, lo_b) if flip else (lo_a, hi_a, lo_b, hi_b)


def _volume_panels(fig_axes, volume, weight, kji, *, cmap, vmax, label, mip: bool = True):
    x, y, z = _volume_axes(volume)
    k, j, i = kji
    v = volume.voxels
    mask = weight > 0
    show = lambda arr, m: np.ma.masked_where(~m, arr)  # noqa: E731
    a = fig_axes
    a[0].imshow(show(v[:, j, :], mask[:, j, :]), cmap=cmap, vmin=0, vmax=vmax, extent=_extent(x, z, True), aspect="equal")
    a[0].set_title(f"{label}: cross-section y = {y[j]:.0f} mm", fontsize=10)
    a[0].set_xlabel("x (mm)")
    a[0].set_ylabel("depth z (mm)")
    a[1].imshow(show(v[:, :, i], mask[:, :, i]), cmap=cmap, vmin=0, vmax=vmax, extent=_extent(y, z, True), aspect="equal")
    a[1].set_title(f"{label}: along the sweep, x = {x[i]:.0f} mm", fontsize=10)
    a[1].set_xlabel("y (mm)")
    a[2].imshow(show(v[k], mask[k]), cmap=cmap, vmin=0, vmax=vmax, extent=_extent(x, y), origin="lower", aspect="equal")
    a[2].set_title(f"{label}: depth z = {z[k]:.0f} mm", fontsize=10)
    a[2].set_xlabel("x (mm)")
    a[2].set_ylabel("y (mm)")
    if mip:
        m = mask.any(axis=0)
        a[3].imshow(show(v.max(axis=0), m), cmap=cmap, vmin=0, vmax=vmax, extent=_extent(x, y), origin="lower", aspect="equal")
        a[3].set_title(f"{label}: maximum-intensity projection (top view)", fontsize=10)
        a[3].set_xlabel("x (mm)")
    for ax in a:
        ax.set_facecolor("#202020")


def _pa_vmax(v) -> float:
    nz = v[v > 0]
    return max(1.0, float(np.percentile(nz, 99.9))) if nz.size else 1.0


def fig_volumes(data: DemoReportData):
    recon = data.recon
    us, pa = recon.volumes[0], recon.volumes[1]
    w = recon.weight.voxels
    kji = _slice_positions(pa.voxels, w)
    fig = _new_figure(15.0, 7.4)
    ax = fig.subplots(2, 4)
    _volume_panels(ax[0], us, w, kji, cmap="gray", vmax=255, label="US")
    _volume_panels(ax[1], pa, w, kji, cmap="inferno", vmax=_pa_vmax(pa.voxels), label="PA")
    return fig


def fig_sensorless_volumes(data: DemoReportData):
    rt, rs = data.recon, data.recon_sensorless
    kji = _slice_positions(rt.volumes[1].voxels, rt.weight.voxels)
    method = data.sensorless.get("primary_method", "sensorless")
    fig = _new_figure(15.0, 7.4)
    ax = fig.subplots(2, 3)
    vmax_pa = _pa_vmax(rt.volumes[1].voxels)
    for row, (res, label) in enumerate(((rt, "tracked"), (rs, method))):
        us, pa = res.volumes[0], res.volumes[1]
        w = res.weight.voxels
        x, y, z = _volume_axes(us)
        k, j, i = kji
        m = w > 0
        ax[row, 0].imshow(np.ma.masked_where(~m[:, :, i], us.voxels[:, :, i]), cmap="gray", vmin=0, vmax=255,
                          extent=_extent(y, z, True), aspect="equal")
        ax[row, 0].set_title(f"US {label}: along the sweep, x = {x[i]:.0f} mm", fontsize=10)
        ax[row, 0].set_xlabel("y (mm)")
        ax[row, 0].set_ylabel("depth z (mm)")
        ax[row, 1].imshow(np.ma.masked_where(~m[k], us.voxels[k]), cmap="gray", vmin=0, vmax=255,
                          extent=_extent(x, y), origin="lower", aspect="equal")
        ax[row, 1].set_title(f"US {label}: depth z = {z[k]:.0f} mm", fontsize=10)
        ax[row, 1].set_xlabel("x (mm)")
        ax[row, 1].set_ylabel("y (mm)")
        ax[row, 2].imshow(np.ma.masked_where(~m.any(axis=0), pa.voxels.max(axis=0)), cmap="inferno", vmin=0,
                          vmax=vmax_pa, extent=_extent(x, y), origin="lower", aspect="equal")
        ax[row, 2].set_title(f"PA {label}: maximum-intensity projection", fontsize=10)
        ax[row, 2].set_xlabel("x (mm)")
        for a in ax[row]:
            a.set_facecolor("#202020")
    return fig


_TRAJ_STYLE = {
    "truth": dict(color="#3b6fd8", lw=2.2, label="truth (simulation)"),
    "tracked": dict(color="#2e8b3d", lw=1.8, ls="--", label="tracked (recorded, estimated calibration)"),
    "model": dict(color="#f08a24", lw=1.8, label="sensorless: shipped model"),
    "decorrelation": dict(color="#b03aa8", lw=1.5, ls="-.", label="sensorless: decorrelation baseline"),
}


def fig_trajectories(data: DemoReportData):
    fig = _new_figure(14.0, 4.4)
    ax = fig.subplots(1, 3)
    for key, pts in data.centres.items():
        style = _TRAJ_STYLE.get(key, dict(label=key))
        ax[0].plot(pts[:, 0], pts[:, 1], **style)
        ax[1].plot(pts[:, 1], pts[:, 2], **style)
        ax[0].plot(pts[-1, 0], pts[-1, 1], "o", color=style.get("color", "k"), ms=4)
        ax[1].plot(pts[-1, 1], pts[-1, 2], "o", color=style.get("color", "k"), ms=4)
    ax[0].set_xlabel("x (mm)")
    ax[0].set_ylabel("y (mm, sweep direction)")
    ax[0].set_title("image-centre path, top view", fontsize=10)
    ax[0].set_aspect("equal", adjustable="datalim")
    ax[1].set_xlabel("y (mm)")
    ax[1].set_ylabel("depth z (mm)")
    ax[1].invert_yaxis()
    ax[1].set_title("image-centre path, side view", fontsize=10)
    ax[0].legend(fontsize=8, loc="best")
    t = data.timestamps_s
    truth = data.centres["truth"]
    for key, pts in data.centres.items():
        if key == "truth":
            continue
        style = dict(_TRAJ_STYLE.get(key, dict(label=key)))
        ax[2].plot(t, np.linalg.norm(pts - truth, axis=1), **style)
    ax[2].set_xlabel("time (s)")
    ax[2].set_ylabel("distance to the true image centre (mm)")
    ax[2].set_title("error against the truth", fontsize=10)
    ax[2].set_yscale("symlog", linthresh=1.0)
    ax[2].grid(alpha=0.3)
    return fig


def fig_drift(data: DemoReportData):
    fig = _new_figure(14.0, 3.8)
    ax = fig.subplots(1, 2)
    t = data.timestamps_s
    tracked = data.centres["tracked"]
    for key, pts in data.centres.items():
        if key in ("truth", "tracked"):
            continue
        style = dict(_TRAJ_STYLE.get(key, dict(label=key)))
        drift = np.linalg.norm(pts - tracked, axis=1)
        ax[0].plot(t, drift, **style)
        path = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(tracked, axis=0), axis=1))])
        with np.errstate(invalid="ignore", divide="ignore"):
            ax[1].plot(path[1:], 100.0 * drift[1:] / path[1:], **style)
    ax[0].set_xlabel("time (s)")
    ax[0].set_ylabel("drift from the tracked image centre (mm)")
    ax[0].set_title("sensorless drift over time (against the tracked trajectory)", fontsize=10)
    ax[0].grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("path length travelled (mm)")
    ax[1].set_ylabel("drift / path length (%)")
    ax[1].set_title("drift rate", fontsize=10)
    ax[1].grid(alpha=0.3)
    return fig


#: Figure name -> (builder, caption), in report order.
DEMO_FIGURES = {
    "dots": (fig_detected_dots, "Detected N-wire dots on sample calibration frames (blue +: true wire crossings; green o: "
             "Hessian detector; red x: PLUS-style detector). Top: whole frame; bottom: zoom on the wires."),
    "residuals": (fig_calibration_residuals, "Calibration residuals: PLUS 3D reprojection errors on the validation "
                  "recording, 2D residuals of every dot, and the error of each ImageToProbe against the truth over "
                  "the probe's field of view."),
    "sweep": (fig_sweep_frames, "Sample frames of the simulated sweep: B-mode with the photoacoustic channel overlaid "
              "(vessels), and one photoacoustic frame."),
    "volumes": (fig_volumes, "Volumes reconstructed from the recorded (tracked) poses: orthogonal slices through a "
                "vessel and maximum-intensity projections (Reference frame, mm)."),
    "trajectories": (fig_trajectories, "Image-centre trajectories: truth, tracked (recorded poses with the estimated "
                     "calibration) and sensorless estimates; right: distance to the truth over time."),
    "drift": (fig_drift, "Sensorless drift against the tracked trajectory over time, and as a fraction of the path "
              "length travelled."),
    "sensorless_volumes": (fig_sensorless_volumes, "Tracked (top) vs sensorless (bottom) reconstructions on the same "
                           "grid: US along the sweep, US at one depth, PA maximum-intensity projection."),
}


def demo_figures(data: DemoReportData, *, progress=None) -> dict:
    """Render every figure of :data:`DEMO_FIGURES` to a data URI (name -> (uri, caption)).

    A figure that cannot be drawn (e.g. no sensorless volume) is left out and logged.
    """
    out = {}
    for n, (name, (builder, caption)) in enumerate(DEMO_FIGURES.items()):
        if name == "sensorless_volumes" and data.recon_sensorless is None:
            continue
        fig = builder(data)
        out[name] = (figure_to_data_uri(fig), caption)
        if progress is not None:
            progress(n + 1)
    return out


def _rel(path, out_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(path)


def _demo_body(data: DemoReportData, figures: dict) -> str:
    cal = data.calibration.summary
    m_default, m_base = cal["methods"]["default"], cal["methods"]["baseline"]
    parts = []
    parts.append("<h2>Summary</h2>")
    parts.append('<pre class="summary">' + html.escape("\n".join(data.summary_lines)) + "</pre>")
    sens = data.sensorless
    if not sens["model_available"] or sens["primary"] != "model":
        parts.append('<div class="note"><b>Sensorless tracking:</b> ' + html.escape(" ".join(sens["notes"])) + "</div>")
    else:
        parts.append(f'<div class="ok"><b>Sensorless tracking</b> uses the shipped model '
                     f'<span class="mono">{html.escape(sens["model_path"])}</span>.</div>')
    if data.settings.quick:
        parts.append('<div class="note">This is the reduced <b>--quick</b> run (fewer, smaller frames, coarser voxels) '
                     "used by the end-to-end test; run <span class=\"mono\">freehandus demo</span> for the full one.</div>")

    # 1. calibration
    parts.append("<h2>1. Probe calibration with an N-wire phantom</h2>")
    parts.append(
        f"<p>Simulated tracked sessions: {cal['probe']} probe, phantom {html.escape(cal['phantom'])}, "
        f"{cal['frames'][0]} calibration + {cal['frames'][1]} validation frames of "
        f"{cal['image_px'][0]}x{cal['image_px'][1]} pixels with speckle, reverberations, wall echoes, "
        f"{cal['frames_with_dropout']} frames with a missing wire echo, tracker noise "
        f"and {cal['outlier_poses']} outlier poses. Both ImageToProbe are compared with the true one at points "
        "covering the field of view (error vs truth); the PLUS 3D reprojection error is what PLUS/fCal reports.</p>")
    rows = []
    for m in (m_default, m_base):
        rows.append([
            m["label"], f"{m['frames_detected'][0]}/{m['frames_total'][0]} + {m['frames_detected'][1]}/{m['frames_total'][1]}",
            None if m["recognition_rate"] is None else 100.0 * m["recognition_rate"],
            m["frames_used"], m["error_vs_truth_mean_mm"], m["error_vs_truth_max_mm"],
            m["calibration_error3d_mm"], m["validation_error3d_mm"], m["error2d_px"],
            ", ".join(f"{v:+.2f}" for v in m["spacing_error_percent"]), m["detection_seconds"] + m["seconds"],
        ])
    parts.append(html_table(
        ["method", "frames detected (cal + val)", "frames with all wires visible recognised (%)", "frames used", "error vs truth mean (mm)",
         "error vs truth max (mm)", "PLUS 3D error cal (mm)", "PLUS 3D error val (mm)", "2D error (px)",
         "spacing error x, y (%)", "time (s)"], rows, highlight_row=0))
    warnings = m_default["warnings"] + m_base["warnings"]
    if warnings:
        parts.append('<p class="small">Solver warnings: ' + html.escape("; ".join(warnings)) + "</p>")
    for key in ("dots", "residuals"):
        if key in figures:
            parts.append(_figure_html(*figures[key]))
    itp = np.asarray(cal["ImageToProbe"])
    parts.append("<p>Estimated ImageToProbe (pixels to Probe mm), also in "
                 f"<span class=\"mono\">{html.escape(_rel(data.files.get('calibration', ''), data.out_dir))}</span> and as a PLUS "
                 f"element in <span class=\"mono\">{html.escape(_rel(data.files.get('calibration_plus_xml', ''), data.out_dir))}</span>:</p>")
    parts.append('<pre class="code">' + "\n".join("  ".join(f"{v: .6f}" for v in row) for row in itp) + "</pre>")

    # 2. sweep + stream
    sw = data.sweep.summary
    st = data.stream
    parts.append("<h2>2. Freehand sweep, streamed and recorded over OpenIGTLink</h2>")
    parts.append(
        f"<p>The same probe sweeps a tissue phantom with layers, {sw['vessels']} vessels and three lesions: "
        f"{sw['frames']} frames of {sw['image_px'][1]}x{sw['image_px'][0]} pixels ({sw['pixel_spacing_mm'][0]:.3f} mm), "
        f"a {sw['shape']}-shaped path of {sw['path_length_mm']:.0f} mm at {sw['frame_rate_hz']:g} frames/s, with an "
        "ultrasound and a photoacoustic channel (absorbers in the vessel lumens). The images are formed at the true "
        "image plane; the tracking uses the recorded marker poses (tracker noise) and the calibration estimated above, "
        "moved to the sweep preset's pixel grid, exactly as PlusServer does with a calibration in its configuration.</p>")
    rows = []
    for key, label in (("us", "ultrasound (Image_Reference)"), ("pa", "photoacoustic (PA_Reference)")):
        s = st[key]
        rows.append([label, s["frames_sent"], s["frames_recorded"], "yes" if s["pixels_identical"] else "NO",
                     s["dropped"], s["rejected"], s.get("max_pose_difference_mm"), s["seconds"]])
    parts.append(html_table(["stream", "frames sent", "frames recorded", "pixels identical", "dropped", "rejected",
                             "max pose difference (mm, float32 on the wire)", "time (s)"], rows))
    parts.append('<p class="small">Replayed as fast as the recorder takes the frames (back-pressure), with the '
                 "recording's own timestamps, so the recorded file can be compared with the sent one.</p>")
    if "sweep" in figures:
        parts.append(_figure_html(*figures["sweep"]))

    # 3. reconstruction
    r = data.recon
    g = r.grid
    parts.append("<h2>3. Volume reconstruction from the tracked poses</h2>")
    parts.append(
        f"<p>US and PA reconstructed in one pass (linear splatting, mean compounding, fan mask of the convex probe) "
        f"into {g.dims[0]}x{g.dims[1]}x{g.dims[2]} voxels of {data.settings.voxel_mm:g} mm: {r.frames_used} frames in "
        f"{r.seconds:.2f} s ({r.frames_per_second:.0f} frames/s), {100 * r.coverage_fraction:.0f} % of the voxels "
        "received pixels.</p>")
    if "volumes" in figures:
        parts.append(_figure_html(*figures["volumes"]))

    # 4. sensorless
    parts.append("<h2>4. Sensorless tracking: the trajectory from the images alone</h2>")
    labels = {"model": "shipped model", "decorrelation": "speckle decorrelation (physics baseline)"}
    rows = []
    tvt = sens["tracked_vs_truth"]
    rows.append(["tracked vs truth", None, tvt["final_drift_mm"], tvt["max_drift_mm"], tvt["fdr_path_percent"],
                 tvt["fdr_end_to_end_percent"], tvt["gpe_mm"], tvt["lpe_mm"], tvt["mean_angle_error_deg"]])
    for key, m in sens["methods"].items():
        for ref in ("vs_tracked", "vs_truth"):
            q = m[ref]
            rows.append([f"{labels.get(key, key)} ({m['method']}) {ref.replace('_', ' ')}", m["seconds"],
                         q["final_drift_mm"], q["max_drift_mm"], q["fdr_path_percent"], q["fdr_end_to_end_percent"],
                         q["gpe_mm"], q["lpe_mm"], q["mean_angle_error_deg"]])
    parts.append(html_table(["trajectory", "tracking time (s)", "final drift (mm)", "max drift (mm)",
                             "final drift / path (%)", "final drift / end-to-end (%)", "GPE (mm)", "LPE (mm)",
                             "mean angle error (deg)"], rows))
    parts.append('<p class="small">Metrics as in TUS-REC: GPE/LPE are mean pixel errors relative to the first / previous '
                 "frame; drift is the distance between image centres. The estimate starts at the tracked first frame.</p>")
    for key in ("trajectories", "drift"):
        if key in figures:
            parts.append(_figure_html(*figures[key]))
    rs = data.recon_sensorless
    ncc = data.sensorless.get("volume_similarity_ncc") or {}
    if rs is not None:
        parts.append(f"<p>The same frames reconstructed with the sensorless trajectory on the tracked volume's grid "
                     f"({rs.seconds:.2f} s).</p>")
        if "sensorless_volumes" in figures:
            parts.append(_figure_html(*figures["sensorless_volumes"]))
    if ncc:
        parts.append("<p>Normalised cross-correlation of the sensorless and tracked volumes over the voxels both cover: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in ncc.items() if k != "overlap_fraction" and v is not None)
                     + (f" (overlap {100 * ncc['overlap_fraction']:.0f} % of the tracked volume)." if ncc.get("overlap_fraction") is not None else ".")
                     + "</p>")

    # 5. files + Slicer
    parts.append("<h2>5. Files and the Slicer scene</h2>")
    rows = [[k, _rel(v, data.out_dir)] for k, v in sorted(data.files.items())]
    parts.append(html_table(["what", "file (relative to this report)"], rows))
    scene = data.scene
    if scene.get("written"):
        rel = _rel(scene["path"], data.out_dir)
        parts.append(
            f"<p>Open <span class=\"mono\">{html.escape(rel)}</span> in 3D Slicer (File / Add Data, or drag it onto the "
            f"window): volumes {html.escape(', '.join(scene['volumes']))}, trajectory models "
            f"{html.escape(', '.join(scene['models']))}, the recorded sweep as a sequence browser "
            f"(<span class=\"mono\">{html.escape(str(scene['browser']))}</span>) and ImageToProbe. From the Python console:</p>")
        parts.append('<pre class="code">slicer.util.loadScene(r"' + html.escape(str(Path(scene["path"]).resolve()))
                     + '")\nvolume = slicer.util.getNode("US_tracked")\n'
                     'slicer.util.setSliceViewerLayers(background=volume, fit=True)</pre>')
    else:
        parts.append(f'<div class="note">No Slicer scene: {html.escape(scene.get("reason", ""))}</div>')

    # timings
    parts.append("<h2>6. Timings</h2>")
    rows = [[k, v] for k, v in data.timings_s.items()]
    parts.append(html_table(["step", "seconds"], rows))
    parts.append('<p class="small">Settings: ' + html.escape(", ".join(f"{k}={v}" for k, v in data.settings.to_dict().items()))
                 + "</p>")
    return "\n".join(parts)


def write_demo_report(path, data: DemoReportData, *, progress=None) -> Path:
    """Write the demo's self-contained HTML report; returns its path.

    Parameters
    ----------
    path : str or Path
    data : DemoReportData
    progress : callable(figures_done), optional
    """
    path = Path(path)
    figures = demo_figures(data, progress=progress)
    mode = "quick run" if data.settings.quick else "full run"
    body = _demo_body(data, figures)
    text = render_page("FreehandUS demo: freehand 3D ultrasound end to end",
                       f"Simulated data with known truth ({mode}): N-wire calibration, tracked sweep with US + PA, "
                       "OpenIGTLink streaming and recording, reconstruction, sensorless tracking.", body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Headless look
# --------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """Path of a Chromium (Debian's ``/usr/bin/chromium``, or ``chromium``/``chromium-browser``
    on the PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def render_report_png(html_path, png_path, *, chromium: str | None = None, window=(1400, 4000),
                      timeout_s: float = 120.0) -> Path:
    """Render an HTML file with a headless Chromium to a PNG screenshot of ``window`` pixels.

    Parameters
    ----------
    html_path, png_path : str or Path
    chromium : str, optional
        Browser executable (default: :func:`find_chromium`).
    window : (width, height) in CSS pixels
    timeout_s : float
        The browser is killed after this long.

    Returns
    -------
    Path of the PNG.

    Raises
    ------
    FreehandUSError
        No browser, the browser failed or timed out, or it wrote no PNG.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise FreehandUSError(f"{html_path}: report not found")
    exe = chromium or find_chromium()
    if exe is None:
        raise FreehandUSError("no Chromium found (Debian: apt-get install chromium)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    profile = tempfile.mkdtemp(prefix="freehandus-chromium-")
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={png_path}",
        f"--window-size={int(window[0])},{int(window[1])}", html_path.as_uri(),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "HOME": profile})
    except subprocess.TimeoutExpired as exc:
        raise FreehandUSError(f"Chromium did not finish rendering {html_path.name} within {timeout_s:g} s") from exc
    except OSError as exc:
        raise FreehandUSError(f"cannot run {exe}: {exc}") from exc
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if not png_path.is_file() or png_path.stat().st_size == 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        raise FreehandUSError(f"Chromium (exit {proc.returncode}) wrote no screenshot of {html_path.name}: {' | '.join(tail)}")
    return png_path


def check_png_not_blank(png_path, *, min_size=(800, 600), min_std: float = 12.0, min_colours: int = 24,
                        min_content_fraction: float = 0.05) -> dict:
    """Measure whether a screenshot shows content, as a person glancing at it would.

    Returns a dict with ``width``, ``height``, ``grey_std`` (standard deviation of the grey
    levels), ``colours`` (distinct colours after reducing to 4 bits per channel),
    ``content_fraction`` (pixels differing from the most common colour by more than 24 grey
    levels) and ``ok`` (all above the thresholds), plus ``problems`` (what failed).
    """
    from PIL import Image

    with Image.open(png_path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    h, w = rgb.shape[:2]
    grey = rgb.mean(axis=2)
    reduced = (rgb >> 4).reshape(-1, 3)
    codes = reduced[:, 0] * 256 + reduced[:, 1] * 16 + reduced[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    background = values[np.argmax(counts)]
    bg_rgb = np.array([background // 256, (background // 16) % 16, background % 16]) * 16 + 8
    content = np.abs(rgb - bg_rgb).max(axis=2) > 24
    out = {
        "width": int(w),
        "height": int(h),
        "grey_std": float(grey.std()),
        "colours": int(values.size),
        "content_fraction": float(content.mean()),
    }
    problems = []
    if w < min_size[0] or h < min_size[1]:
        problems.append(f"size {w}x{h} < {min_size[0]}x{min_size[1]}")
    if out["grey_std"] < min_std:
        problems.append(f"grey-level std {out['grey_std']:.1f} < {min_std}")
    if out["colours"] < min_colours:
        problems.append(f"{out['colours']} colours < {min_colours}")
    if out["content_fraction"] < min_content_fraction:
        problems.append(f"content covers {100 * out['content_fraction']:.1f} % < {100 * min_content_fraction:.0f} %")
    out["ok"] = not problems
    out["problems"] = problems
    return out

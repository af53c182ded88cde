#!/usr/bin/env python3
"""Draw the FreehandUS icons (128x128 RGBA PNG) with matplotlib.

Writes the extension icon and one icon per module::

    Resources/Icons/FreehandUS.png                          extension: probe, fan, volume cube
    FreehandUS/Resources/Icons/FreehandUS.png               probe sweeping a stack of frames
    NWireCalibration/Resources/Icons/NWireCalibration.png   N-wire phantom cut by the image plane
    SensorlessTracking/Resources/Icons/SensorlessTracking.png  frames along an estimated trajectory

Run from anywhere: ``python Resources/make_icons.py`` (``--out DIR`` writes all four flat into DIR
instead, for a look without touching the repository). The drawing is deterministic and the PNG
carries no software/version metadata, so re-running with the same matplotlib gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyBboxPatch, Polygon, Wedge  # noqa: E402

__all__ = ["ICONS", "SIZE_PX", "draw_icon", "main"]

SIZE_PX = 128
REPO_ROOT = Path(__file__).resolve().parents[1]

# Palette: dark slate probe, teal beam, warm accents for what the module computes.
PROBE = "#2b3a4a"
PROBE_FACE = "#8fa3b5"
BEAM = "#21a0b8"
BEAM_DARK = "#15707f"
ACCENT = "#e4572e"
ACCENT_2 = "#f3a712"
FRAME = "#3d5a80"
WHITE = "#ffffff"


def _canvas():
    """A 128x128 px figure with data coordinates 0..128 (y up) and no margins."""
    fig = plt.figure(figsize=(SIZE_PX / 100, SIZE_PX / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, SIZE_PX)
    ax.set_ylim(0, SIZE_PX)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _probe(ax, x, y_face, *, width=26, height=30, angle_deg=0.0):
    """Probe body standing on its transducer face at (x, y_face), tilted by angle_deg."""
    theta = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    def place(points):
        return np.asarray(points, dtype=float) @ rot.T + (x, y_face)

    half = width / 2
    # Handle: a tapered body with a narrower cable end.
    body = place([(-half, 0), (half, 0), (half * 0.75, height), (-half * 0.75, height)])
    ax.add_patch(Polygon(body, closed=True, fc=PROBE, ec=PROBE, lw=1.5, joinstyle="round", zorder=5))
    cable = place(
        [(-half * 0.2, height), (half * 0.2, height), (half * 0.12, height + 9), (-half * 0.12, height + 9)]
    )
    ax.add_patch(Polygon(cable, closed=True, fc=PROBE, ec=PROBE, lw=1, zorder=5))
    # Transducer face and the orientation marker (PLUS "marked side", left in MF).
    face = place([(-half, 0), (half, 0), (half, 3.5), (-half, 3.5)])
    ax.add_patch(Polygon(face, closed=True, fc=PROBE_FACE, ec=PROBE_FACE, lw=0.5, zorder=6))
    mx, my = place([(-half * 0.55, height * 0.6)])[0]
    ax.add_patch(Circle((mx, my), 2.2, fc=ACCENT_2, ec="none", zorder=7))


def _fan(ax, apex, radius, *, direction_deg=-90.0, half_angle_deg=32.0, alpha=0.9, arcs=3):
    """Ultrasound sector from ``apex`` pointing along ``direction_deg``, with depth arcs."""
    start = direction_deg - half_angle_deg
    end = direction_deg + half_angle_deg
    ax.add_patch(Wedge(apex, radius, start, end, fc=BEAM, ec=BEAM_DARK, lw=1.2, alpha=alpha, zorder=2))
    for k in range(1, arcs + 1):
        r = radius * k / (arcs + 1)
        ax.add_patch(Wedge(apex, r, start, end, width=0.0, fc="none", ec=WHITE, lw=0.8, alpha=0.55, zorder=3))


def _cube(ax, origin, size, *, depth=0.45, color=ACCENT, lw=2.0):
    """Wireframe cube (oblique projection) with its front-lower-left corner at ``origin``."""
    x, y = origin
    dx, dy = size * depth * 0.8, size * depth * 0.6
    front = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    back = [(px + dx, py + dy) for px, py in front]
    ax.add_patch(Polygon(back, closed=True, fc=color, ec=color, lw=lw, alpha=0.18, zorder=8))
    ax.add_patch(Polygon(front, closed=True, fc=color, ec=color, lw=lw, alpha=0.30, zorder=9))
    ax.add_patch(Polygon(back, closed=True, fc="none", ec=color, lw=lw, zorder=9))
    ax.add_patch(Polygon(front, closed=True, fc="none", ec=color, lw=lw, zorder=10))
    for (fx, fy), (bx, by) in zip(front, back, strict=True):
        ax.plot([fx, bx], [fy, by], color=color, lw=lw, solid_capstyle="round", zorder=10)


def _frame(ax, center, width, height, *, skew=0.0, color=FRAME, alpha=1.0, zorder=4):
    """A parallelogram image frame (a 2D ultrasound frame seen obliquely)."""
    cx, cy = center
    hw, hh = width / 2, height / 2
    points = [
        (cx - hw - skew, cy - hh),
        (cx + hw - skew, cy - hh),
        (cx + hw + skew, cy + hh),
        (cx - hw + skew, cy + hh),
    ]
    ax.add_patch(Polygon(points, closed=True, fc=color, ec=WHITE, lw=1.2, alpha=alpha, zorder=zorder))


def draw_extension(ax):
    """Extension icon: probe over its beam, the beam filling a reconstructed volume."""
    _fan(ax, (52, 84), 70, half_angle_deg=30)
    _probe(ax, 52, 84, width=30, height=26)
    _cube(ax, (66, 12), 38)


def draw_freehand(ax):
    """Freehand US: the probe swept by hand; earlier poses fade out behind the current one."""
    for x, angle, alpha in ((30, 14, 0.22), (50, 7, 0.42)):
        _fan(ax, (x, 82), 62, direction_deg=-90 + angle, half_angle_deg=24, alpha=alpha, arcs=0)
    _fan(ax, (72, 82), 62, direction_deg=-90, half_angle_deg=24, alpha=0.95)
    _probe(ax, 72, 82, width=26, height=24)
    ax.annotate(
        "",
        xy=(122, 100),
        xytext=(96, 100),
        arrowprops={"arrowstyle": "-|>", "color": ACCENT, "lw": 3, "mutation_scale": 16},
        zorder=9,
    )


def draw_nwire(ax):
    """N-Wire Calibration: three N-shaped wire layers; the image plane cuts them into dots."""
    ax.add_patch(
        FancyBboxPatch(
            (8, 10), 112, 78, boxstyle="round,pad=0,rounding_size=8", fc="#e9eef3", ec=FRAME, lw=2, zorder=1
        )
    )
    tops, bottoms = 78, 20
    lefts = (14, 52, 90)  # three N layers, 24 px wide, 14 px apart
    for left in lefts:
        a, b = left, left + 24
        ax.plot([a, a], [bottoms, tops], color=PROBE, lw=2.6, solid_capstyle="round", zorder=3)
        ax.plot([b, b], [bottoms, tops], color=PROBE, lw=2.6, solid_capstyle="round", zorder=3)
        ax.plot([a, b], [tops, bottoms], color=PROBE, lw=2.6, solid_capstyle="round", zorder=3)
    # The image plane (seen edge-on) and where it meets each wire: the dots fCal segments.
    plane_y = 46
    ax.plot([10, 118], [plane_y, plane_y], color=BEAM, lw=3.5, alpha=0.9, zorder=4)
    for left in lefts:
        a, b = left, left + 24
        middle = b - (plane_y - bottoms) / (tops - bottoms) * (b - a)
        for x in (a, middle, b):
            ax.add_patch(Circle((x, plane_y), 4.2, fc=ACCENT, ec=WHITE, lw=1.2, zorder=6))
    _probe(ax, 64, 96, width=22, height=18)


def draw_sensorless(ax):
    """Sensorless Tracking: frames along a trajectory estimated by a network from the images."""
    t = np.linspace(0, 1, 200)
    x = 12 + 96 * t
    y = 22 + 26 * np.sin(np.pi * t * 1.2) + 18 * t
    ax.plot(x, y, color=ACCENT, lw=3.2, zorder=3, solid_capstyle="round")
    ax.annotate(
        "",
        xy=(x[-1] + 8, y[-1] + 5),
        xytext=(x[-4], y[-4]),
        arrowprops={"arrowstyle": "-|>", "color": ACCENT, "lw": 3, "mutation_scale": 16},
        zorder=3,
    )
    for tk in (0.05, 0.35, 0.65, 0.92):
        i = int(tk * (len(t) - 1))
        _frame(ax, (x[i], y[i]), 12, 28, skew=3, alpha=0.95, zorder=5)
    # A small network glyph: the trajectory comes from a model, not a tracker.
    nodes_in = [(22, 94), (22, 114)]
    nodes_hidden = [(46, 88), (46, 104), (46, 120)]
    nodes_out = [(70, 104)]
    for layer_a, layer_b in ((nodes_in, nodes_hidden), (nodes_hidden, nodes_out)):
        for pa in layer_a:
            for pb in layer_b:
                ax.plot([pa[0], pb[0]], [pa[1], pb[1]], color=FRAME, lw=1.2, alpha=0.8, zorder=6)
    for p in nodes_in + nodes_hidden + nodes_out:
        ax.add_patch(Circle(p, 4.5, fc=BEAM, ec=WHITE, lw=1, zorder=7))
    ax.annotate(
        "",
        xy=(96, 76),
        xytext=(78, 98),
        arrowprops={"arrowstyle": "-|>", "color": BEAM_DARK, "lw": 2.4, "mutation_scale": 14},
        zorder=8,
    )


#: icon path (relative to the repository root) -> drawing function
ICONS = {
    "Resources/Icons/FreehandUS.png": draw_extension,
    "FreehandUS/Resources/Icons/FreehandUS.png": draw_freehand,
    "NWireCalibration/Resources/Icons/NWireCalibration.png": draw_nwire,
    "SensorlessTracking/Resources/Icons/SensorlessTracking.png": draw_sensorless,
}


def draw_icon(draw, path: Path) -> Path:
    """Render one icon with ``draw(ax)`` to a 128x128 RGBA PNG at ``path``."""
    fig, ax = _canvas()
    try:
        draw(ax)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, transparent=True, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw the FreehandUS icons (128x128 PNG).")
    parser.add_argument(
        "--out", type=Path, default=None, help="write all icons flat into this folder instead"
    )
    args = parser.parse_args(argv)
    for relative, draw in ICONS.items():
        target = REPO_ROOT / relative if args.out is None else args.out / relative.replace("/", "_")
        print(f"wrote {draw_icon(draw, target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

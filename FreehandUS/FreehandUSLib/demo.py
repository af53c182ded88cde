"""``freehandus demo``: the end-to-end walk-through on generated data.

Today it generates a tracked freehand sweep over an analytic phantom (a vessel and two
inclusions in speckle), writes it as a PLUS sequence metafile and a Slicer ``.seq.nrrd``, reads
both back and summarises them. The later stages (calibration, reconstruction, sensorless
tracking, streaming, report) join as they land.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from .sequence import TrackedSequence

__all__ = ["DemoResult", "simulate_analytic_sweep", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class DemoResult:
    """Files written by the demo and the summary of each."""

    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "files": dict(self.files),
            "summaries": self.summaries,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        lines = [f"FreehandUS demo finished in {self.seconds:.1f} s; results in {self.out_dir}"]
        for key, path in self.files.items():
            s = self.summaries.get(key, {})
            lines.append(
                f"  {key}: {path} ({s.get('frames')} frames {s.get('width')}x{s.get('height')}, "
                f"transforms {', '.join(s.get('transforms', []))})"
            )
        return "\n".join(lines)


def simulate_analytic_sweep(
    n_frames: int = 60,
    n_rows: int = 160,
    n_cols: int = 128,
    *,
    pixel_spacing_mm: float = 0.3,
    step_mm: float = 0.5,
    seed: int = 0,
) -> tuple[TrackedSequence, np.ndarray]:
    """A linear sweep over an analytic phantom, tracked by a ProbeToTracker transform.

    The phantom (Tracker frame, mm) holds a vessel along y and two spherical inclusions in
    multiplicative speckle. The probe moves along +y by ``step_mm`` per frame with a slow rock.

    Returns
    -------
    sequence : TrackedSequence with ProbeToTracker (all valid), frames uint8 (n, rows, cols), MF
    image_to_probe : (4, 4) float64, pixel -> Probe mm (spacing ``pixel_spacing_mm``, image
        centred laterally on the probe origin, depth along +z)
    """
    rng = np.random.default_rng(seed)
    # Image i (columns) -> Probe x, image j (rows, depth) -> Probe z, image normal -> Probe -y (right-handed).
    image_to_probe = np.zeros((4, 4))
    image_to_probe[3, 3] = 1.0
    image_to_probe[0, 0] = pixel_spacing_mm
    image_to_probe[2, 1] = pixel_spacing_mm
    image_to_probe[1, 2] = -1.0
    image_to_probe[0, 3] = -0.5 * n_cols * pixel_spacing_mm

    t = np.arange(n_frames)
    probe_to_tracker = np.tile(np.eye(4), (n_frames, 1, 1))
    rock_deg = 4.0 * np.sin(t / max(n_frames - 1, 1) * np.pi)
    rock = Rotation.from_euler("y", rock_deg[:, None], degrees=True)
    probe_to_tracker[:, :3, :3] = rock.as_matrix()
    probe_to_tracker[:, 1, 3] = t * step_mm

    jj, ii = np.mgrid[0:n_rows, 0:n_cols]
    pixels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
    image_to_tracker = probe_to_tracker @ image_to_probe
    points = (image_to_tracker @ pixels)[:, :3, :]  # (n, 3, rows*cols) mm
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    depth = n_rows * pixel_spacing_mm
    echo = np.full(x.shape, 0.35)
    vessel = (x - 0.0) ** 2 + (z - 0.45 * depth) ** 2 < (0.12 * depth) ** 2
    echo[vessel] = 0.05
    for cx, cy, cz, r, level in ((-8.0, 8.0, 0.7 * depth, 5.0, 0.9), (9.0, 20.0, 0.25 * depth, 4.0, 0.8)):
        inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r**2
        echo[inside] = level
    speckle = rng.rayleigh(scale=0.6, size=echo.shape)
    frames = np.clip(255.0 * echo * speckle, 0, 255).astype(np.uint8).reshape(n_frames, n_rows, n_cols)
    seq = TrackedSequence(
        frames=frames,
        timestamps_s=t / 20.0,
        transforms={"ProbeToTracker": (probe_to_tracker, np.ones(n_frames, dtype=bool))},
        pixel_spacing_mm=(pixel_spacing_mm, pixel_spacing_mm),
        metadata={"UltrasoundImageType": "BRIGHTNESS"},
    )
    return seq, image_to_probe


def run_demo(out_dir: Path) -> DemoResult:
    """Generate, write and re-read a tracked sweep in ``out_dir``; return what was written."""
    from .cli import sequence_info
    from .io import read_sequence, write_sequence

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seq, image_to_probe = simulate_analytic_sweep()
    files, summaries = {}, {}
    for key, name in (("metafile", "sweep.igs.mha"), ("slicer_sequence", "sweep.seq.nrrd")):
        path = write_sequence(seq, out_dir / name)
        back = read_sequence(path)
        files[key] = str(path)
        summaries[key] = sequence_info(back, path)
    (out_dir / "ImageToProbe.json").write_text(
        json.dumps({"ImageToProbe": image_to_probe.tolist()}, indent=2)
    )
    files["calibration"] = str(out_dir / "ImageToProbe.json")
    return DemoResult(out_dir, files, summaries, time.perf_counter() - start)

"""``freehandus demo``: the whole freehand 3D ultrasound workflow, end to end, on simulated data.

:func:`run_demo` does what a user does with a tracked probe, with every step checked against the
simulation's known truth, and writes everything to one folder:

1. **Calibration.** A tracked N-wire session (fCal-2.0 phantom, convex probe of 8 cm depth,
   speckle, reverberations, wall echoes, echo dropouts, tracker noise and outlier poses) is
   simulated (a calibration and a validation recording) and calibrated automatically twice: with
   the default method (Hessian dot detector + RANSAC/Levenberg-Marquardt solver) and with the
   PLUS-style baseline (PLUS detector + PLUS's linear least squares). Both ImageToProbe are
   compared with the true one over the probe's field of view.
2. **Sweep.** A freehand sweep of the *same probe* over a tissue phantom with vessels is
   simulated with an ultrasound (B-mode) and a photoacoustic channel.
3. **Stream.** The sweep is streamed through the PLUS-like replay server on loopback and recorded
   with the recorder (OpenIGTLink both ways); the recorded frames are checked against the sent
   ones. The US and PA volumes are reconstructed from the recorded (tracked) poses.
4. **Sensorless.** The trajectory is estimated from the images alone (the shipped model when it
   is there, else the speckle-decorrelation baseline, said so plainly) and the volumes are
   reconstructed again on the same grid; trajectories, drift and volumes are compared.
5. **Outputs.** ``report.html`` (self-contained), volumes (``.nrrd``), sequences
   (``.seq.nrrd``), the calibration (JSON + PLUS ``<Transform>`` element) and a Slicer scene
   (``scene/FreehandUSDemo.mrml`` with its data files, when slicer-core or Slicer is there).

What "tracking with the calibration just estimated" means
---------------------------------------------------------
The N-wire session and the sweep are recorded with one physical probe and one tracker, but the
scanner runs two presets: the calibration images (820 x 616 pixels) and the sweep images (a
coarser grid over the same sector). The **physics** uses the truth: the sweep images are formed
where the true image plane is, i.e. the marker pose is ``ProbeToReference_true =
TransducerToReference @ inv(TransducerToProbe_true)`` with ``TransducerToProbe_true`` the true
image-plane pose on the marker (from the N-wire truth). The **tracking** uses the estimate, as
PlusServer does once the calibration is pasted into its configuration: the recorded marker poses
(with tracker noise) are combined with ``ImageToProbe_est(sweep) = ImageToProbe_est(N-wire) @ A``
where ``A`` maps sweep pixels to N-wire pixels (the known change of pixel grid between the two
presets; it involves no truth). So the sweep's tracked ImageToReference carries exactly the
calibration error of step 1 (plus tracker noise), and the report measures it against the truth.

Everything is seeded; a run is reproducible. ``quick=True`` makes a reduced run (fewer and
smaller frames, coarser voxels) for the end-to-end test.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.sequence import TrackedSequence

__all__ = [
    "DemoSettings",
    "DemoResult",
    "demo_probe",
    "demo_tissue",
    "sweep_pixels_to_nwire_pixels",
    "sensorless_estimates",
    "run_demo",
]

log = logging.getLogger(__name__)

#: Name of the Slicer scene written by the demo (inside ``<out>/scene``).
SCENE_NAME = "FreehandUSDemo.mrml"


# --------------------------------------------------------------------------------------------
# Settings and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run (the defaults are the full demo; :meth:`quick_settings` the test run).

    Attributes
    ----------
    calibration_frames, validation_frames : int
        Frames of the simulated N-wire calibration / validation recordings.
    nwire_image_px : (width, height)
        Image size of the N-wire recordings (the calibration preset).
    ransac_iterations : int
        RANSAC iterations of the default solver (paper: 3000).
    sweep_frames : int
        Frames of the freehand sweep.
    sweep_length_mm : float
        Path length of the sweep on the skin.
    sweep_image_px : (rows, cols)
        Image size of the sweep preset (same 8 cm convex sector, coarser pixels).
    scatterers_per_cell : float
        Speckle scatterer density of the sweep simulation (>= 10: fully developed speckle).
    voxel_mm : float
        Voxel size of the reconstructions.
    seed : int
        Seed of every random choice.
    quick : bool
        Marks a reduced run (written in the report).
    """

    calibration_frames: int = 100
    validation_frames: int = 40
    nwire_image_px: tuple = (820, 616)
    ransac_iterations: int = 3000
    sweep_frames: int = 180
    sweep_length_mm: float = 70.0
    sweep_image_px: tuple = (208, 368)
    scatterers_per_cell: float = 10.0
    voxel_mm: float = 0.5
    seed: int = 7
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides) -> DemoSettings:
        """The reduced run of ``freehandus demo --quick`` (the end-to-end test)."""
        fields = dict(
            calibration_frames=40,
            validation_frames=15,
            nwire_image_px=(640, 480),
            ransac_iterations=1000,
            sweep_frames=40,
            sweep_length_mm=16.0,
            sweep_image_px=(112, 192),
            scatterers_per_cell=8.0,
            voxel_mm=1.0,
            quick=True,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class DemoResult:
    """What the demo wrote and measured.

    Attributes
    ----------
    out_dir : Path
    files : dict name -> path (str) of everything written (``report``, ``scene``, volumes...)
    summaries : dict of JSON-safe results per step (``calibration``, ``sweep``, ``stream``,
        ``reconstruction``, ``sensorless``, ``scene``, ``report``, ``timings_s``, ``settings``)
    seconds : float, wall time of the whole demo
    summary_lines : list of str, the 10-line summary printed by the command line
    """

    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    summary_lines: list = field(default_factory=list)

    @property
    def report_path(self) -> Path | None:
        return Path(self.files["report"]) if "report" in self.files else None

    def to_dict(self) -> dict:
        """JSON-safe (numpy numbers as Python numbers, NaN as None)."""
        return _finite_or_none({
            "out_dir": str(self.out_dir),
            "files": dict(self.files),
            "summaries": self.summaries,
            "seconds": self.seconds,
            "summary": list(self.summary_lines),
        })

    def __str__(self) -> str:
        head = f"FreehandUS demo finished in {self.seconds:.0f} s; results in {self.out_dir}"
        lines = [head]
        if self.report_path is not None:
            lines.append(f"Report: {self.report_path.resolve()}")
        lines.extend(self.summary_lines)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The demo's probe, tissue and geometry
# --------------------------------------------------------------------------------------------

#: The convex probe of the demo: 8 cm depth, 60 mm radius, 70 degree sector (N-wire and sweep).
PROBE_DEPTH_MM = 80.0
PROBE_RADIUS_MM = 60.0
PROBE_SECTOR_DEG = 70.0


def demo_probe(n_rows: int, n_cols: int):
    """The sweep preset of the demo's convex probe (:class:`~.simulation.ProbeConfig`).

    3.5 MHz abdominal probe, 8 cm depth, the same sector as the N-wire simulation.
    """
    from FreehandUSLib.simulation import ProbeConfig

    return ProbeConfig(
        geometry="convex",
        n_rows=int(n_rows),
        n_cols=int(n_cols),
        depth_mm=PROBE_DEPTH_MM,
        radius_mm=PROBE_RADIUS_MM,
        sector_deg=PROBE_SECTOR_DEG,
        center_frequency_mhz=3.5,
        sigma_axial_mm=0.25,
        sigma_lateral_mm=0.6,
        sigma_elevation_mm=1.0,
        gain_db=2.0,
        dynamic_range_db=55.0,
        noise_db=-45.0,
    )


def demo_tissue(length_mm: float):
    """A tissue phantom along a sweep of ``length_mm`` (Reference frame: the sweep runs along +y
    from the origin, depth along +z): fat, muscle and a deep layer, three vessels (two along the
    sweep, one crossing it; they hold the photoacoustic absorber), a cyst, a bright nodule and a
    hypoechoic lesion placed along the path."""
    from FreehandUSLib.simulation import Inclusion, Layer, TissueConfig, Vessel

    L = float(length_mm)
    return TissueConfig(
        background=0.9,
        layers=(
            Layer(depth_mm=6.0, echogenicity=0.55, amplitude_mm=1.0, wavelength_mm=70.0, angle_deg=20.0,
                  interface_mm=0.6, interface_echogenicity=2.2),
            Layer(depth_mm=20.0, echogenicity=1.1, amplitude_mm=2.5, wavelength_mm=90.0, angle_deg=75.0,
                  phase=1.0, interface_mm=0.8, interface_echogenicity=2.0),
            Layer(depth_mm=62.0, echogenicity=0.75, amplitude_mm=3.0, wavelength_mm=120.0, angle_deg=-30.0,
                  interface_mm=1.0, interface_echogenicity=2.4),
        ),
        vessels=(
            Vessel(start_mm=(-22.0, -20.0, 36.0), direction=(0.06, 1.0, 0.03), radius_mm=4.5, wall_mm=0.8,
                   wall_echogenicity=2.2, lumen_echogenicity=0.03, wobble_mm=1.5, wobble_period_mm=60.0,
                   absorption=1.0),
            Vessel(start_mm=(16.0, -20.0, 24.0), direction=(-0.12, 1.0, 0.06), radius_mm=2.8, wall_mm=0.7,
                   wall_echogenicity=2.0, lumen_echogenicity=0.04, absorption=0.8),
            Vessel(start_mm=(-70.0, 0.45 * L - 8.0, 50.0), direction=(1.0, 0.25, -0.05), radius_mm=2.2, wall_mm=0.5,
                   wall_echogenicity=1.8, lumen_echogenicity=0.05, absorption=0.7),
        ),
        inclusions=(
            Inclusion(center_mm=(32.0, 0.3 * L, 46.0), radii_mm=(6.0, min(6.0, 0.3 * L), 5.0), echogenicity=0.12),
            Inclusion(center_mm=(-48.0, 0.65 * L, 28.0), radii_mm=(5.0, min(5.0, 0.3 * L), 4.0), echogenicity=2.2),
            Inclusion(center_mm=(4.0, 0.8 * L, 64.0), radii_mm=(8.0, min(6.0, 0.3 * L), 6.0), echogenicity=0.35),
        ),
        texture=0.15,
        texture_scale_mm=10.0,
        seed=11,
    )


def _transducer_to_plane() -> np.ndarray:
    """Sweep-simulator Probe frame (x lateral, y elevational, z depth) -> N-wire image plane frame
    (u lateral, v depth, w = image normal): ``(x, y, z) -> (x, z, -y)`` (a proper rotation)."""
    m = np.zeros((4, 4))
    m[0, 0] = 1.0
    m[1, 2] = 1.0
    m[2, 1] = -1.0
    m[3, 3] = 1.0
    return m


def sweep_pixels_to_nwire_pixels(probe, nwire_spacing_mm, nwire_face_centre_px) -> np.ndarray:
    """The change of pixel grid between the sweep preset and the N-wire (calibration) preset.

    Both presets image the same sector of the same probe; the N-wire image has pixel spacing
    ``(sx, sy)`` with the transducer face centre (the sector's top centre) at pixel
    ``nwire_face_centre_px`` and its normal scaled by ``(sx + sy) / 2`` (the simulator's and the
    solvers' convention), the sweep image is described by ``probe`` (:class:`ProbeConfig`).

    Returns
    -------
    (4, 4) float64 ``A``: sweep pixel -> N-wire pixel, so that ``ImageToProbe(sweep) =
    ImageToProbe(N-wire) @ A`` for any calibration of the N-wire preset.
    """
    from FreehandUSLib.simulation import image_to_probe_matrix

    sx, sy = (float(v) for v in nwire_spacing_mm)
    cx, cy = (float(v) for v in nwire_face_centre_px)
    pixel_to_plane = np.array([
        [sx, 0.0, 0.0, -cx * sx],
        [0.0, sy, 0.0, -cy * sy],
        [0.0, 0.0, 0.5 * (sx + sy), 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    return np.linalg.inv(pixel_to_plane) @ _transducer_to_plane() @ image_to_probe_matrix(probe)


def _face_centre_px(fov_mask: np.ndarray) -> tuple[float, float]:
    """Transducer face centre of a convex field-of-view mask: top of the sector on its axis."""
    h, w = fov_mask.shape
    cx = (w - 1) / 2.0
    column = fov_mask[:, int(round(cx))]
    rows = np.flatnonzero(column)
    if rows.size == 0:
        raise FreehandUSError("the N-wire field-of-view mask is empty on its centre column")
    return cx, float(rows[0])


def _random_rigid(rng, sigma_mm: float, sigma_deg: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.radians(sigma_deg) * rng.standard_normal(3)).as_matrix()
    m[:3, 3] = sigma_mm * rng.standard_normal(3)
    return m


def _centres(image_to_reference: np.ndarray, shape) -> np.ndarray:
    """Reference-frame position (n, 3) of the image centre pixel of each frame."""
    rows, cols = shape
    p = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    return (np.asarray(image_to_reference) @ p)[:, :3]


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    return value


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class _Progress:
    """tqdm bars on stderr: ``enabled`` None on a terminal only, True always, False never."""

    def __init__(self, enabled: bool | None):
        self.enabled = enabled
        self._disable = None if enabled is None else False  # tqdm: None = off unless a terminal
        self._tqdm = None
        if enabled is not False:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._tqdm = None

    @contextmanager
    def bar(self, desc: str, total: int, unit: str = "frame"):
        """Yields ``update(done, total=None)`` for a bar of ``total`` units."""
        if self._tqdm is None:
            yield lambda done, total=None: None
            return
        bar = self._tqdm(total=total, desc=desc, unit=unit, leave=False, disable=self._disable, dynamic_ncols=True)

        def update(done, total=None):
            if total is not None and total != bar.total:
                bar.total = total
            bar.update(max(0, int(done) - bar.n))

        try:
            yield update
        finally:
            bar.close()


# --------------------------------------------------------------------------------------------
# Step 1: calibration
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Calibration:
    sim: object
    sim_validation: object
    setup: object
    detection: object
    detection_validation: object
    baseline_detection: object
    baseline_detection_validation: object
    result: object
    baseline: object
    summary: dict


def _truth_points(sim) -> np.ndarray:
    ref = np.array(sim.true_points_px, dtype=np.float64)
    ref[~np.asarray(sim.visible)] = np.nan
    return ref


def _calibration_step(settings: DemoSettings, out: Path, progress: _Progress, files: dict) -> _Calibration:
    from NWireCalibrationLib.metrics import detection_rates, target_errors_mm
    from NWireCalibrationLib.pipeline import calibrate, detect_sequence, load_setup
    from NWireCalibrationLib.simulate import SimulationSettings, simulate_nwire

    from FreehandUSLib.io import write_sequence

    cal_dir = out / "calibration"
    seq_dir = out / "sequences"
    cal_dir.mkdir(parents=True, exist_ok=True)
    seq_dir.mkdir(parents=True, exist_ok=True)
    base = SimulationSettings(
        phantom="fCal-2.0",
        probe="convex",
        depth_mm=PROBE_DEPTH_MM,
        convex_radius_mm=PROBE_RADIUS_MM,
        convex_fov_deg=PROBE_SECTOR_DEG,
        n_frames=settings.calibration_frames,
        image_size_px=tuple(settings.nwire_image_px),
        dropout_fraction=0.05,
        tracker_noise_mm=0.1,
        tracker_noise_deg=0.1,
        outlier_fraction=0.05,
        seed=settings.seed,
    )
    with progress.bar("simulate N-wire recordings", 2, unit="recording") as update:
        sim = simulate_nwire(base)
        update(1)
        sim_v = simulate_nwire(replace(base, n_frames=settings.validation_frames, outlier_fraction=0.0,
                                       seed=settings.seed + 1))
        update(2)
    if not (np.allclose(sim.image_to_probe, sim_v.image_to_probe)
            and np.allclose(sim.phantom_to_reference, sim_v.phantom_to_reference)):
        raise FreehandUSError("the simulated calibration and validation recordings disagree on the truth")
    config_path = cal_dir / "nwire_config.xml"
    config_path.write_text(sim.config_xml(), encoding="utf-8")
    files["nwire_config"] = str(config_path)
    truth = sim.summary()
    truth["ImageToProbe_note"] = "true calibration of the N-wire preset (pixels -> Probe mm)"
    (cal_dir / "nwire_truth.json").write_text(json.dumps(_finite_or_none(truth), indent=1) + "\n")
    files["nwire_truth"] = str(cal_dir / "nwire_truth.json")
    setup = load_setup(config_path)

    n_all = sim.sequence.n_frames + sim_v.sequence.n_frames
    detections = {}
    for detector in ("hessian", "plus"):
        with progress.bar(f"detect dots ({detector})", n_all) as update:
            det_c = detect_sequence(sim.sequence, setup, detector=detector, progress=lambda i, n: update(i))
            offset = sim.sequence.n_frames
            det_v = detect_sequence(sim_v.sequence, setup, detector=detector,
                                    progress=lambda i, n: update(offset + i))
        detections[detector] = (det_c, det_v)
    with progress.bar("calibrate", 2, unit="solver") as update:
        result = calibrate(sim.sequence, sim_v.sequence, setup, solver="ransac-lm", detector="hessian",
                           calibration_detection=detections["hessian"][0],
                           validation_detection=detections["hessian"][1],
                           ransac_iterations=settings.ransac_iterations, seed=settings.seed)
        update(1)
        baseline = calibrate(sim.sequence, sim_v.sequence, setup, solver="lsq", detector="plus",
                             calibration_detection=detections["plus"][0], validation_detection=detections["plus"][1])
        update(2)

    fov_points = sim.fov_points_px(grid=21)
    truth_ref = _truth_points(sim)
    truth_ref_v = _truth_points(sim_v)
    methods = {}
    for key, res, dets in (("default", result, detections["hessian"]), ("baseline", baseline, detections["plus"])):
        err = target_errors_mm(res.image_to_probe, sim.image_to_probe, points_px=fov_points)
        true_spacing = np.asarray(sim.pixel_spacing_mm)
        rates = detection_rates(np.concatenate([dets[0].points_px, dets[1].points_px]),
                                np.concatenate([truth_ref, truth_ref_v]), tolerance_px=5.0)
        methods[key] = {
            "label": ("Hessian detector + RANSAC-LM (default)" if key == "default"
                      else "PLUS-style baseline: PLUS detector + LSQ"),
            "detector": res.info.get("detector"),
            "solver": res.solver,
            "frames_detected": [dets[0].frames_detected, dets[1].frames_detected],
            "frames_total": [dets[0].n_frames, dets[1].n_frames],
            "recognition_rate": rates.recognition_rate,
            "false_dot_rate": rates.false_rate,
            "error_vs_truth_mean_mm": float(err.mean()),
            "error_vs_truth_max_mm": float(err.max()),
            "spacing_error_percent": (100.0 * (np.asarray(res.pixel_spacing_mm) / true_spacing - 1.0)).tolist(),
            "calibration_error3d_mm": res.calibration.error3d_trimmed95_mean_mm,
            "validation_error3d_mm": res.validation.error3d_trimmed95_mean_mm if res.validation else None,
            "validation_error3d_untrimmed_mm": res.validation.error3d_mean_mm if res.validation else None,
            "error2d_px": res.calibration.error2d_mean_px,
            "frames_used": res.calibration.frames_used,
            "seconds": res.seconds,
            "detection_seconds": dets[0].seconds + dets[1].seconds,
            "warnings": list(res.warnings),
        }
    for key, res in (("calibration", result), ("calibration_baseline", baseline)):
        d = res.to_dict()
        d["error_vs_truth"] = methods["default" if key == "calibration" else "baseline"]
        d["ImageToProbe_true"] = sim.image_to_probe.tolist()
        path = cal_dir / f"{key}.json"
        path.write_text(json.dumps(_finite_or_none(d), indent=1) + "\n")
        files[key] = str(path)
    xml_path = cal_dir / "ImageToProbe.xml"
    xml_path.write_text(
        "<!-- FreehandUS demo: paste into <CoordinateDefinitions> of your PLUS configuration -->\n"
        + result.plus_transform_element() + "\n",
        encoding="utf-8",
    )
    files["calibration_plus_xml"] = str(xml_path)
    with progress.bar("write N-wire sequences", 2, unit="file") as update:
        files["nwire_calibration_sequence"] = str(write_sequence(sim.sequence, seq_dir / "nwire_calibration.seq.nrrd"))
        update(1)
        files["nwire_validation_sequence"] = str(write_sequence(sim_v.sequence, seq_dir / "nwire_validation.seq.nrrd"))
        update(2)
    summary = {
        "phantom": sim.phantom.name,
        "probe": f"convex, {PROBE_DEPTH_MM:g} mm deep, radius {PROBE_RADIUS_MM:g} mm, {PROBE_SECTOR_DEG:g} deg",
        "image_px": list(settings.nwire_image_px),
        "frames": [sim.sequence.n_frames, sim_v.sequence.n_frames],
        "frames_with_dropout": int((~sim.visible).sum() + (~sim_v.visible).sum()),
        "outlier_poses": int(sim.outlier.sum()),
        "true_pixel_spacing_mm": list(sim.pixel_spacing_mm),
        "methods": methods,
        "ImageToProbe": result.image_to_probe.tolist(),
        "ImageToProbe_true": sim.image_to_probe.tolist(),
    }
    return _Calibration(sim, sim_v, setup, detections["hessian"][0], detections["hessian"][1], detections["plus"][0],
                        detections["plus"][1], result, baseline, _finite_or_none(summary))


# --------------------------------------------------------------------------------------------
# Step 2: sweep
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Sweep:
    probe: object
    sweep: object  # SweepResult
    us: TrackedSequence  # frames + recorded tracker transforms (what PlusServer has)
    pa: TrackedSequence
    image_to_probe_est: np.ndarray
    image_to_probe_true: np.ndarray
    true_image_to_reference: np.ndarray
    summary: dict


def _sweep_step(settings: DemoSettings, cal: _Calibration, progress: _Progress) -> _Sweep:
    from FreehandUSLib.simulation import SweepConfig, TrajectoryConfig, image_to_probe_matrix, simulate_sweep

    rows, cols = settings.sweep_image_px
    probe = demo_probe(rows, cols)
    trajectory = TrajectoryConfig(
        n_frames=settings.sweep_frames,
        length_mm=settings.sweep_length_mm,
        shape="C",
        turn_deg=20.0,
        speed_variation=0.3,
        tilt_deg=4.0,
        rock_deg=3.0,
        twist_deg=3.0,
        lift_mm=0.5,
        tremor_mm=0.05,
        tremor_deg=0.15,
        seed=settings.seed,
    )
    config = SweepConfig(probe=probe, trajectory=trajectory, tissue=demo_tissue(settings.sweep_length_mm),
                         scatterers_per_cell=settings.scatterers_per_cell, frame_rate_hz=20.0, photoacoustic=True,
                         seed=settings.seed)
    with progress.bar("simulate sweep (US + PA)", settings.sweep_frames) as update:
        sweep = simulate_sweep(config, progress=lambda i, n: update(i))

    # Calibration of the sweep preset: the N-wire calibration moved to the sweep's pixel grid.
    sim = cal.sim
    grid_change = sweep_pixels_to_nwire_pixels(probe, sim.pixel_spacing_mm, _face_centre_px(sim.fov_mask))
    itp_true = sim.image_to_probe @ grid_change
    itp_est = cal.result.image_to_probe @ grid_change
    transducer_to_probe = itp_true @ np.linalg.inv(image_to_probe_matrix(probe))
    rot = transducer_to_probe[:3, :3]
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-6):
        raise FreehandUSError("internal: the true transducer-to-marker transform of the sweep is not rigid")

    # Tracker: the N-wire session's ReferenceToTracker; marker poses with the same tracker noise.
    n = sweep.sequence.n_frames
    transducer_to_reference = sweep.sequence.transforms["ProbeToReference"].matrices
    probe_to_reference_true = transducer_to_reference @ np.linalg.inv(transducer_to_probe)
    reference_to_tracker = cal.sim.sequence.transforms["ReferenceToTracker"].matrices[0]
    rng = np.random.default_rng([settings.seed, 5])
    st = sim.settings
    noisy = np.stack([p @ _random_rigid(rng, st.tracker_noise_mm, st.tracker_noise_deg) for p in probe_to_reference_true])
    valid = np.ones(n, dtype=bool)
    tracker = {
        "ProbeToTracker": (reference_to_tracker @ noisy, valid),
        "ReferenceToTracker": (np.repeat(reference_to_tracker[None], n, axis=0), valid.copy()),
    }
    us = TrackedSequence(
        frames=sweep.sequence.frames,
        timestamps_s=sweep.sequence.timestamps_s + 1000.0,
        transforms=dict(tracker),
        pixel_spacing_mm=sweep.sequence.pixel_spacing_mm,
        metadata={"UltrasoundImageType": "BRIGHTNESS"},
    )
    pa = TrackedSequence(
        frames=sweep.photoacoustic,
        timestamps_s=us.timestamps_s.copy(),
        transforms={k: (v[0].copy(), v[1].copy()) for k, v in tracker.items()},
        pixel_spacing_mm=sweep.sequence.pixel_spacing_mm,
        metadata={"UltrasoundImageType": "PHOTOACOUSTIC"},
    )
    true_itr = sweep.sequence.transforms["ImageToReference"].matrices
    summary = {
        "frames": n,
        "image_px": [int(rows), int(cols)],
        "pixel_spacing_mm": list(sweep.sequence.pixel_spacing_mm),
        "path_length_mm": sweep.path_length_mm,
        "shape": trajectory.shape,
        "frame_rate_hz": config.frame_rate_hz,
        "probe": probe.to_dict(),
        "seconds": sweep.seconds,
        "frames_per_second": sweep.frames_per_second,
        "vessels": len(config.tissue.vessels),
        "ImageToProbe_estimated": itp_est.tolist(),
        "ImageToProbe_true": itp_true.tolist(),
        "grid_change_sweep_to_nwire_pixels": grid_change.tolist(),
        "tracker_noise": [st.tracker_noise_mm, st.tracker_noise_deg],
    }
    return _Sweep(probe, sweep, us, pa, itp_est, itp_true, true_itr, _finite_or_none(summary))


# --------------------------------------------------------------------------------------------
# Step 3: stream, record, reconstruct
# --------------------------------------------------------------------------------------------


def _stream_one(sequence: TrackedSequence, path: Path, *, image_name: str, image_to_probe, progress: _Progress,
                desc: str, timeout_s: float):
    """Serve ``sequence`` on loopback (ephemeral port) and record it; returns (recorded, summary dict)."""
    from FreehandUSLib.igtl import ReplayServer, record_stream
    from FreehandUSLib.io import read_sequence

    n = sequence.n_frames
    image_frame = f"{image_name}ToProbe"
    transform_names = list(sequence.transforms) if image_name == "Image" else []
    server = ReplayServer(sequence, host="127.0.0.1", port=0, fps=0, timestamps="original", image_name=image_name,
                          fixed_transforms={image_frame: image_to_probe}, transform_names=transform_names,
                          wait_for_clients=1)
    t0 = time.perf_counter()
    server.start()
    try:
        with progress.bar(desc, n) as update:
            summary = record_stream("127.0.0.1", server.port, path, frames=n, duration_s=timeout_s,
                                    connect_timeout_s=min(30.0, timeout_s), progress=update,
                                    embedded_transform=f"{image_name}ToReference")
    finally:
        server.stop(timeout_s=5.0)
    seconds = time.perf_counter() - t0
    recorded = read_sequence(summary.path)
    info = summary.to_dict()
    info.update({"device": server.image_device, "frames_sent": server.stats.frames_sent, "seconds": seconds,
                 "port": server.port})
    return recorded, info


def _compare_stream(sent: TrackedSequence, recorded: TrackedSequence, sent_itr: np.ndarray, name: str) -> dict:
    same_count = recorded.n_frames == sent.n_frames
    identical = bool(same_count and np.array_equal(recorded.frames, sent.frames))
    out = {"frames_sent": sent.n_frames, "frames_recorded": recorded.n_frames, "pixels_identical": identical}
    if same_count:
        out["max_timestamp_difference_s"] = float(np.max(np.abs(recorded.timestamps_s - sent.timestamps_s)))
        rec = recorded.transforms[name].matrices
        out["max_pose_difference_mm"] = float(np.max(np.abs(rec[:, :3, 3] - sent_itr[:, :3, 3])))
        out["max_matrix_difference"] = float(np.max(np.abs(rec[:, :3, :3] - sent_itr[:, :3, :3])))
    out["frames_equal"] = bool(identical)
    return out


def _fan_options(probe, voxel_mm: float, **extra):
    """Reconstruction options with the convex probe's fan mask (pixels outside the sector are not inserted)."""
    from FreehandUSLib.reconstruction import ReconstructionOptions
    from FreehandUSLib.simulation import image_to_probe_matrix

    m = image_to_probe_matrix(probe)
    sx, sy = probe.pixel_spacing_mm
    apex_px = ((0.0 - m[0, 3]) / sx, (-probe.radius_mm - m[2, 3]) / sy)
    half = probe.sector_deg / 2.0 - 0.5
    return ReconstructionOptions(
        output_spacing_mm=(voxel_mm,) * 3,
        interpolation="linear",
        compounding="mean",
        fan_angles_deg=(-half, half),
        fan_origin_px=apex_px,
        fan_radius_start_px=probe.radius_mm / sy + 1.0,
        fan_radius_stop_px=(probe.radius_mm + probe.depth_mm) / sy - 1.0,
        **extra,
    )


def _volume_ncc(a, b, mask) -> float:
    x = np.asarray(a, dtype=np.float64)[mask]
    y = np.asarray(b, dtype=np.float64)[mask]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# --------------------------------------------------------------------------------------------
# Step 4: sensorless
# --------------------------------------------------------------------------------------------


def sensorless_estimates(sequence: TrackedSequence, image_to_probe, *, sigma_elevation_mm: float, model_path=None,
                         progress=None) -> dict:
    """Trajectories of ``sequence`` from its images alone: the shipped model (when it is there)
    and the speckle-decorrelation baseline.

    Parameters
    ----------
    sequence : TrackedSequence
        One-channel frames; its tracked first pose anchors the estimates (as in the TUS-REC
        evaluation) and, with ``image_to_probe``, gives the pixel spacing.
    image_to_probe : (4, 4) float64, the calibration of these frames
    sigma_elevation_mm : float
        Elevational beam sigma of the probe (the decorrelation curve).
    model_path : str or Path, optional
        Model checkpoint (default: the shipped one, ``SensorlessTrackingLib.predict.default_model_path()``).
        When it is missing or unusable the reason is added to ``notes`` and only the baseline runs.
    progress : callable(done, total), optional

    Returns
    -------
    dict with ``results`` (``"model"`` and/or ``"decorrelation"`` -> TrackingResult), ``primary``
    (the model when it ran, else the baseline), ``model_path``, ``model_available`` and ``notes``.
    """
    from SensorlessTrackingLib.decorrelation import DecorrelationConfig
    from SensorlessTrackingLib.predict import ModelFileError, default_model_path, track_sequence

    model_path = Path(model_path) if model_path is not None else default_model_path()
    out = {"model_path": str(model_path), "model_available": model_path.is_file(), "notes": []}
    results = {}
    if model_path.is_file():
        try:
            results["model"] = track_sequence(sequence, model_path, image_to_probe=image_to_probe)
        except (ModelFileError, ImportError) as exc:
            out["notes"].append(f"the shipped model could not be used ({exc}); the decorrelation baseline is shown")
    else:
        out["notes"].append(
            f"no shipped sensorless model at {model_path} (train it with "
            "SensorlessTracking/Resources/Models/train_shipped_model.py); the speckle-decorrelation "
            "baseline is shown instead"
        )
    if progress is not None:
        progress(1, 2)
    decor = DecorrelationConfig(sigma_mm=float(sigma_elevation_mm), direction=-1)
    results["decorrelation"] = track_sequence(sequence, "decorrelation", image_to_probe=image_to_probe,
                                              decorrelation=decor)
    if progress is not None:
        progress(2, 2)
    out["results"] = results
    out["primary"] = "model" if "model" in results else "decorrelation"
    return out


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def _stage(timings: dict, name: str):
    @contextmanager
    def timer():
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = time.perf_counter() - t0

    return timer()


def run_demo(out_dir, *, quick: bool = False, settings: DemoSettings | None = None, progress: bool | None = None,
             browser_check: bool = True, stream_timeout_s: float = 120.0) -> DemoResult:
    """Run the end-to-end demo (module docstring) and write everything to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; files of an earlier run are overwritten.
    quick : bool
        The reduced run (:meth:`DemoSettings.quick_settings`) used by the end-to-end test.
    settings : DemoSettings, optional
        Overrides ``quick``.
    progress : bool or None
        tqdm progress bars on stderr: None (default) only when stderr is a terminal, True always,
        False never.
    browser_check : bool
        Render ``report.html`` with a headless Chromium (when installed) to ``report.png`` and
        check that the picture is not blank.
    stream_timeout_s : float
        Upper bound of each streaming run (server and recorder are stopped after it).

    Returns
    -------
    DemoResult

    Raises
    ------
    FreehandUSError
        A step failed (the message says which).
    """
    from FreehandUSApp import report as report_mod
    from FreehandUSLib.io import write_sequence, write_volume
    from FreehandUSLib.reconstruction import reconstruct_volume

    start = time.perf_counter()
    settings = settings or (DemoSettings.quick_settings() if quick else DemoSettings())
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FreehandUSError(f"demo output {out}: exists and is not a folder; give a folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    bars = _Progress(progress)
    files: dict[str, str] = {}
    timings: dict[str, float] = {}
    summaries: dict[str, dict] = {"settings": settings.to_dict()}

    # 1. calibration
    with _stage(timings, "calibration"):
        cal = _calibration_step(settings, out, bars, files)
    summaries["calibration"] = cal.summary
    log.info("calibration: %s", cal.result)

    # 2. sweep
    with _stage(timings, "sweep simulation"):
        sweep = _sweep_step(settings, cal, bars)
    summaries["sweep"] = sweep.summary
    sweep_cal = out / "calibration" / "ImageToProbe_sweep.json"
    sweep_cal.write_text(json.dumps({
        "ImageToProbe": sweep.image_to_probe_est.tolist(),
        "note": "the estimated calibration moved to the sweep preset's pixel grid "
                f"({settings.sweep_image_px[1]}x{settings.sweep_image_px[0]} px); use it with the sweep sequences",
    }, indent=1) + "\n")
    files["calibration_sweep"] = str(sweep_cal)

    # 3. stream + record
    seq_dir = out / "sequences"
    with _stage(timings, "streaming"):
        from FreehandUSLib.igtl.recorder import recording_files

        # The demo's own outputs of an earlier run, including the working files a run that was
        # stopped mid-recording left (the recorder never replaces a file by itself).
        for output in (seq_dir / "sweep_us.seq.nrrd", seq_dir / "sweep_pa.seq.nrrd"):
            for stale in recording_files(output):
                stale.unlink(missing_ok=True)
        rec_us, info_us = _stream_one(sweep.us, seq_dir / "sweep_us.seq.nrrd", image_name="Image",
                                      image_to_probe=sweep.image_to_probe_est, progress=bars,
                                      desc="stream + record US", timeout_s=stream_timeout_s)
        rec_pa, info_pa = _stream_one(sweep.pa, seq_dir / "sweep_pa.seq.nrrd", image_name="PA",
                                      image_to_probe=sweep.image_to_probe_est, progress=bars,
                                      desc="stream + record PA", timeout_s=stream_timeout_s)
    files["sweep_us_sequence"] = info_us["path"]
    files["sweep_pa_sequence"] = info_pa["path"]
    tracked_itr = sweep.us.repository(fixed={"ImageToProbe": sweep.image_to_probe_est}).get("ImageToReference")
    stream = {
        "us": {**info_us, **_compare_stream(sweep.us, rec_us, tracked_itr, "ImageToReference")},
        "pa": {**info_pa, **_compare_stream(sweep.pa, rec_pa, tracked_itr, "PAToReference")},
    }
    stream["frames_equal"] = bool(stream["us"]["frames_equal"] and stream["pa"]["frames_equal"])
    summaries["stream"] = _finite_or_none(stream)
    if not stream["frames_equal"]:
        raise FreehandUSError(
            f"streaming lost or changed frames: US {stream['us']['frames_recorded']}/{stream['us']['frames_sent']}, "
            f"PA {stream['pa']['frames_recorded']}/{stream['pa']['frames_sent']} recorded"
        )
    if not np.allclose(rec_us.timestamps_s, rec_pa.timestamps_s, atol=1e-6):
        raise FreehandUSError("the recorded US and PA frames have different timestamps")

    # reconstruction from the tracked (recorded) poses
    vol_dir = out / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    options = _fan_options(sweep.probe, settings.voxel_mm)
    with _stage(timings, "reconstruction kernels (compile or load)"):
        # The compiled kernels are made (or loaded from numba's cache) on first use: do that on
        # two frames first, so that the reported rate is the insertion's own.
        reconstruct_volume(rec_us[:2], None, options, extra_channels={"PA": rec_pa.frames[:2]}, channel_names=["US"])
    with _stage(timings, "reconstruction (tracked)"):
        with bars.bar("reconstruct US + PA (tracked)", rec_us.n_frames) as update:
            recon = reconstruct_volume(rec_us, None, options, extra_channels={"PA": rec_pa.frames},
                                       channel_names=["US"], progress=lambda i, n: update(i, n))
    grid = recon.grid
    fixed_roi = replace(options, output_origin_mm=tuple(grid.origin_mm),
                        output_extent=tuple(v for d in grid.dims for v in (0, d - 1)))

    # 4. sensorless
    with _stage(timings, "sensorless tracking"):
        with bars.bar("sensorless tracking", 2, unit="method") as update:
            # The images only; the tracked first frame anchors the estimate (as in TUS-REC
            # evaluations) and the calibration gives the pixel spacing.
            sens = sensorless_estimates(rec_us, sweep.image_to_probe_est,
                                        sigma_elevation_mm=sweep.probe.sigma_elevation_mm, progress=update)
    primary = sens["results"][sens["primary"]]
    est_itr = primary.sequence.transforms["ImageToReference"].matrices
    est_seq = TrackedSequence(
        frames=rec_us.frames,
        timestamps_s=rec_us.timestamps_s.copy(),
        transforms={"ImageToReference": (est_itr, np.ones(rec_us.n_frames, dtype=bool))},
        pixel_spacing_mm=rec_us.pixel_spacing_mm,
        metadata={"UltrasoundImageType": "BRIGHTNESS", "TrackingMethod": primary.method},
    )
    with _stage(timings, "reconstruction (sensorless)"):
        with bars.bar("reconstruct US + PA (sensorless)", rec_us.n_frames) as update:
            try:
                recon_s = reconstruct_volume(est_seq, None, fixed_roi, extra_channels={"PA": rec_pa.frames},
                                             channel_names=["US"], progress=lambda i, n: update(i, n))
            except FreehandUSError as exc:
                recon_s = None
                sens["notes"].append(f"the sensorless trajectory leaves the tracked volume: {exc}")

    from SensorlessTrackingLib.metrics import tracking_metrics

    shape = (rec_us.n_rows, rec_us.n_cols)
    metrics = {
        "tracked_vs_truth": tracking_metrics(sweep.true_image_to_reference, tracked_itr, shape),
    }
    for key, res in sens["results"].items():
        metrics[f"{key}_vs_tracked"] = tracking_metrics(tracked_itr, res.sequence.transforms["ImageToReference"].matrices, shape)
        metrics[f"{key}_vs_truth"] = tracking_metrics(sweep.true_image_to_reference,
                                                      res.sequence.transforms["ImageToReference"].matrices, shape)
    centres = {
        "truth": _centres(sweep.true_image_to_reference, shape),
        "tracked": _centres(tracked_itr, shape),
    }
    for key, res in sens["results"].items():
        centres[key] = _centres(res.sequence.transforms["ImageToReference"].matrices, shape)
    volume_similarity = {}
    if recon_s is not None:
        both = (recon.weight.voxels > 0) & (recon_s.weight.voxels > 0)
        for i, name in enumerate(recon.channel_names):
            volume_similarity[name] = _volume_ncc(recon.volumes[i].voxels, recon_s.volumes[i].voxels, both)
        volume_similarity["overlap_fraction"] = float(both.sum() / max(1, (recon.weight.voxels > 0).sum()))

    # files: volumes, sequences, trajectories
    with _stage(timings, "writing files"):
        with bars.bar("write volumes + sequences", 6, unit="file") as update:
            names = {"US": "us", "PA": "pa"}
            for i, channel in enumerate(recon.channel_names):
                files[f"{names[channel]}_tracked_volume"] = str(write_volume(recon.volumes[i], vol_dir / f"{names[channel]}_tracked.nrrd"))
                update(i + 1)
            if recon_s is not None:
                for i, channel in enumerate(recon_s.channel_names):
                    files[f"{names[channel]}_sensorless_volume"] = str(write_volume(recon_s.volumes[i], vol_dir / f"{names[channel]}_sensorless.nrrd"))
                    update(3 + i)
            files["sweep_sensorless_sequence"] = str(write_sequence(est_seq, seq_dir / "sweep_sensorless.seq.nrrd"))
            update(5)
            traj = {
                "frame_rate_hz": sweep.summary["frame_rate_hz"],
                "timestamps_s": rec_us.timestamps_s.tolist(),
                "image_centres_mm": {k: v.tolist() for k, v in centres.items()},
                "ImageToReference_true": sweep.true_image_to_reference.tolist(),
            }
            (out / "trajectories.json").write_text(json.dumps(traj) + "\n")
            files["trajectories"] = str(out / "trajectories.json")
            update(6)

    recon_summary = {
        "voxel_mm": settings.voxel_mm,
        "dims": list(grid.dims),
        "tracked": {"seconds": recon.seconds, "frames_used": recon.frames_used, "frames_per_second": recon.frames_per_second,
                    "coverage_fraction": recon.coverage_fraction, "channels": list(recon.channel_names)},
    }
    if recon_s is not None:
        recon_summary["sensorless"] = {"seconds": recon_s.seconds, "frames_used": recon_s.frames_used,
                                       "coverage_fraction": recon_s.coverage_fraction}
    recon_summary["volume_similarity_ncc"] = volume_similarity
    summaries["reconstruction"] = _finite_or_none(recon_summary)
    sens_summary = {
        "model_available": sens["model_available"],
        "model_path": sens["model_path"],
        "primary_method": primary.method,
        "primary": sens["primary"],
        "notes": list(sens["notes"]),
        "methods": {k: {**r.to_dict(), "vs_tracked": metrics[f"{k}_vs_tracked"].to_dict(),
                        "vs_truth": metrics[f"{k}_vs_truth"].to_dict()} for k, r in sens["results"].items()},
        "tracked_vs_truth": metrics["tracked_vs_truth"].to_dict(),
        "drift_reported": True,
        "volume_similarity_ncc": volume_similarity,
    }
    summaries["sensorless"] = _finite_or_none(sens_summary)

    # 5. scene
    with _stage(timings, "Slicer scene"):
        with bars.bar("write Slicer scene", 1, unit="scene") as update:
            try:
                from FreehandUSLib.demo_scene import write_demo_scene

                scene_dir = out / "scene"
                if scene_dir.is_dir():  # the demo's own folder: no stale data files of an earlier run
                    shutil.rmtree(scene_dir)

                scene_info = write_demo_scene(
                    out / "scene" / SCENE_NAME,
                    volumes={"US_tracked": recon.volumes[0], "PA_tracked": recon.volumes[1],
                             **({"US_sensorless": recon_s.volumes[0], "PA_sensorless": recon_s.volumes[1]}
                                if recon_s is not None else {})},
                    trajectories={"Trajectory_tracked": centres["tracked"],
                                  f"Trajectory_{sens['primary']}": centres[sens["primary"]],
                                  "Trajectory_truth": centres["truth"]},
                    sequence=rec_us,
                    image_to_probe=sweep.image_to_probe_est,
                )
                files["scene"] = scene_info["path"]
            except ImportError as exc:
                scene_info = {"written": False, "reason": f"no MRML classes (install slicer-core or run in Slicer): {exc}"}
            update(1)
    summaries["scene"] = scene_info

    # report
    summaries["timings_s"] = dict(timings)
    lines = _summary_lines(settings, summaries, time.perf_counter() - start)
    with _stage(timings, "report"):
        data = report_mod.DemoReportData(
            settings=settings, calibration=cal, sweep=sweep, stream=summaries["stream"], recon=recon, recon_sensorless=recon_s,
            sensorless=summaries["sensorless"], centres=centres, timestamps_s=rec_us.timestamps_s - rec_us.timestamps_s[0],
            metrics=metrics, scene=scene_info, timings_s=timings, files=files, out_dir=out, summary_lines=lines,
        )
        with bars.bar("write report", len(report_mod.DEMO_FIGURES), unit="figure") as update:
            report_path = report_mod.write_demo_report(out / "report.html", data, progress=update)
    files["report"] = str(report_path)
    report_info = {"path": str(report_path), "bytes": report_path.stat().st_size}
    if browser_check:
        with _stage(timings, "report check (Chromium)"):
            chromium = report_mod.find_chromium()
            if chromium is None:
                report_info["browser_check"] = "skipped: no Chromium found (apt-get install chromium)"
            else:
                try:
                    png = report_mod.render_report_png(report_path, out / "report.png", chromium=chromium)
                    report_info["browser_check"] = report_mod.check_png_not_blank(png)
                    files["report_png"] = str(png)
                except FreehandUSError as exc:
                    report_info["browser_check"] = f"failed: {exc}"
    summaries["report"] = report_info
    summaries["timings_s"] = dict(timings)
    seconds = time.perf_counter() - start
    lines = _summary_lines(settings, summaries, seconds)
    result = DemoResult(out, files, summaries, seconds, lines)
    (out / "demo_summary.json").write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    files["summary"] = str(out / "demo_summary.json")
    return result


def _fmt(v, spec=".2f", unit=""):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{unit}"


def _summary_lines(settings: DemoSettings, s: dict, seconds: float) -> list[str]:
    c = s["calibration"]
    d, b = c["methods"]["default"], c["methods"]["baseline"]
    sw = s["sweep"]
    st = s["stream"]
    r = s["reconstruction"]
    sens = s["sensorless"]
    prim = sens["methods"][sens["primary"]]
    vt = prim["vs_tracked"]
    label = ("shipped model " + prim["method"]) if sens["primary"] == "model" else (
        "decorrelation baseline" + ("" if sens["model_available"] else ", NO shipped model found"))
    sim_ncc = r.get("volume_similarity_ncc", {})
    scene = s["scene"]
    tt = r["tracked"]
    lines = [
        f" 1. N-wire calibration ({c['probe']}): {sum(d['frames_detected'])}/{sum(d['frames_total'])} frames detected "
        f"(Hessian), {sum(b['frames_detected'])}/{sum(b['frames_total'])} (PLUS-style)",
        f" 2. ImageToProbe error vs truth (RANSAC-LM): {_fmt(d['error_vs_truth_mean_mm'], '.3f')} mm mean, "
        f"{_fmt(d['error_vs_truth_max_mm'], '.3f')} mm max over the field of view",
        f" 3. PLUS-style baseline (PLUS detector + LSQ): {_fmt(b['error_vs_truth_mean_mm'], '.3f')} mm mean, "
        f"{_fmt(b['error_vs_truth_max_mm'], '.3f')} mm max; PLUS validation error {_fmt(d['validation_error3d_mm'], '.2f')}"
        f" vs {_fmt(b['validation_error3d_mm'], '.2f')} mm",
        f" 4. Sweep: {sw['frames']} frames {sw['image_px'][1]}x{sw['image_px'][0]} US + PA, {sw['shape']}-shaped "
        f"{sw['path_length_mm']:.0f} mm path, simulated in {sw['seconds']:.0f} s",
        f" 5. OpenIGTLink loopback: US {st['us']['frames_recorded']}/{st['us']['frames_sent']} and PA "
        f"{st['pa']['frames_recorded']}/{st['pa']['frames_sent']} frames recorded, pixels identical: "
        f"{'yes' if st['frames_equal'] else 'NO'}, dropped {st['us']['dropped'] + st['pa']['dropped']}",
        f" 6. Reconstruction (tracked, US + PA in one pass): {r['dims'][0]}x{r['dims'][1]}x{r['dims'][2]} voxels of "
        f"{r['voxel_mm']:g} mm in {tt['seconds']:.1f} s ({tt['frames_per_second']:.0f} frames/s)",
        f" 7. Tracked trajectory vs truth: final {_fmt(sens['tracked_vs_truth']['final_drift_mm'])} mm, "
        f"max {_fmt(sens['tracked_vs_truth']['max_drift_mm'])} mm (calibration error + tracker noise)",
        f" 8. Sensorless ({label}): final drift {_fmt(vt['final_drift_mm'], '.1f')} mm = "
        f"{_fmt(vt['fdr_path_percent'], '.1f')} % of the {vt['path_length_mm']:.0f} mm path, max {_fmt(vt['max_drift_mm'], '.1f')} mm",
        f" 9. Sensorless vs tracked volume: NCC US {_fmt(sim_ncc.get('US'))}, PA {_fmt(sim_ncc.get('PA'))}; "
        f"tracking {prim['seconds']:.1f} s",
        f"10. Slicer scene: {scene['path'] if scene.get('written') else 'not written (' + scene.get('reason', '') + ')'}"
        f"; total {seconds:.0f} s{' (quick run)' if settings.quick else ''}",
    ]
    return lines

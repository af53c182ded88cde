"""MRML bridge for sensorless tracking: sequence browsers in, estimated trajectories out.

What the "Sensorless Tracking" module's Logic calls (it holds no tracking code itself), and what
the headless tests exercise with the real MRML classes of the ``slicer-core`` wheel:

- :func:`estimate_trajectory_to_browser` — the frames of a sequence browser in, the estimated
  trajectory written as a transform sequence **into the same browser** (one item per image
  item, same index values, with a proxy transform node), a summary returned; when the browser
  also holds the tracked ImageToReference, the summary holds the accuracy of the estimate
  (:func:`~SensorlessTrackingLib.metrics.tracking_metrics`);
- :func:`trajectory_table` / :func:`trajectory_plot` — the image-centre positions of the
  estimated (and tracked) trajectory per frame as a table node and a plot chart; the table
  also holds the per-frame uncertainty (:func:`estimate_uncertainty`: step sigmas, 95 % drift band);
- :func:`reconstruct_estimated` — volume reconstruction from the estimated trajectory (through
  :func:`FreehandUSLib.mrml_reconstruction.reconstruct_browser_to_volume_node`);
- :func:`train_from_browsers` — train a model on tracked browsers (through
  :func:`~SensorlessTrackingLib.train.train`).

Like :mod:`FreehandUSLib.mrml_reconstruction` it works on MRML nodes through their methods and
``vtk`` and leaves everything that needs the ``slicer`` package to :mod:`FreehandUSLib.mrml`; it
needs 3D Slicer's Python or the ``slicer-core`` wheel and is not imported by
``import SensorlessTrackingLib``. torch is imported only when a learned model runs or trains.

The estimated transform
-----------------------
The estimate is stored as ``ImageToEstimatedReference`` (:data:`ESTIMATED_TRANSFORM_NAME`):
pixel -> mm, one 4x4 per frame, anchored at the tracked first pose when the browser has one
(so it overlays the tracked ImageToReference and drifts away from it), else at
``diag(sx, sy, 1)`` (first frame at the origin, pixels scaled to mm). Its target frame is named
*EstimatedReference* on purpose: transform repositories never chain it with the tracker's
transforms, :func:`~FreehandUSLib.mrml.browser_to_sequence` reads it back under that name, and
a second estimate never takes it for the tracking it is compared with. The sequence carries the
attribute ``FreehandUS.SensorlessTracking.Estimate = "true"`` (:data:`ATTR_ESTIMATE`); a new
estimate refills that sequence and leaves every other sequence of the browser untouched.

Coordinate convention: as in :mod:`FreehandUSLib.mrml`, the Reference frame *is* Slicer's RAS
world (PLUS millimetres, no LPS flip). When the recording's image proxy sits under transforms
(e.g. a ``ReferenceToRAS``), the estimate's proxy and a volume reconstructed from it are placed
under the transform of that tree that holds the Reference frame, so they show where the tracked
frames show (``parent_transform`` in the summary).

Example (3D Slicer Python console)
----------------------------------
>>> from SensorlessTrackingLib import mrml_tracking as mt
>>> browser = slicer.util.getNode("SweepBrowser")
>>> summary = mt.estimate_trajectory_to_browser(browser)          # the shipped model
>>> print(mt.summary_text(summary))
>>> chart = mt.trajectory_plot(browser)
>>> result = mt.reconstruct_estimated(browser, output_spacing_mm=0.5)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import vtk

from FreehandUSLib import jobs, mrml
from FreehandUSLib.errors import ConfigError, SequenceError, TransformError
from FreehandUSLib.sequence import TrackedSequence

from .attribution import fit_out_of_plane_scale
from .metrics import tracking_metrics
from .mirror_average import check_mode
from .predict import ModelFileError, TrackingResult, default_model_path, input_spacing, load_model, track_sequence

__all__ = [
    "estimate_trajectory_to_browser",
    "find_estimate_sequence",
    "estimated_trajectory",
    "trajectory_table",
    "trajectory_plot",
    "reconstruct_estimated",
    "train_from_browsers",
    "start_training_job",
    "start_adaptation_job",
    "summary_text",
    "estimate_uncertainty",
    "ESTIMATED_TRANSFORM_NAME",
    "ATTR_ESTIMATE_UNCERTAINTY",
    "ATTR_ESTIMATE",
    "ATTR_ESTIMATE_SUMMARY",
    "ATTR_ESTIMATE_MODEL",
    "ATTR_RECON_TRAJECTORY",
    "REF_TRAJECTORY_TABLE",
    "REF_TRAJECTORY_CHART",
    "REF_ESTIMATE_SEQUENCE",
]

logger = logging.getLogger(__name__)

#: Name of the estimated transform (sequence attribute, default sequence and proxy node name).
ESTIMATED_TRANSFORM_NAME = "ImageToEstimatedReference"
#: ``"true"`` on the transform sequence written by :func:`estimate_trajectory_to_browser`.
ATTR_ESTIMATE = "FreehandUS.SensorlessTracking.Estimate"
#: On the estimate sequence: JSON of the summary returned by the estimate.
ATTR_ESTIMATE_SUMMARY = "FreehandUS.SensorlessTracking.Summary"
#: On the estimate sequence: JSON of the per-frame uncertainty
#: (:meth:`~SensorlessTrackingLib.confidence.FrameUncertainty.to_dict`: sigmas per frame, 95 % drift band).
ATTR_ESTIMATE_UNCERTAINTY = "FreehandUS.SensorlessTracking.Uncertainty"
#: On the estimate sequence: the model (file path, ``"default"`` or ``"decorrelation"``).
ATTR_ESTIMATE_MODEL = "FreehandUS.SensorlessTracking.Model"
#: On a volume made by :func:`reconstruct_estimated`: the transform it was reconstructed with.
ATTR_RECON_TRAJECTORY = "FreehandUS.SensorlessTracking.Trajectory"
#: Attribute of a volume reconstructed from an estimate: says the trajectory is estimated.
ATTR_RECON_SOURCE = "FreehandUS.SensorlessTracking.TrajectorySource"
#: Node reference from the estimate sequence to its trajectory table.
REF_TRAJECTORY_TABLE = "FreehandUS.SensorlessTracking.TrajectoryTable"
#: Node reference from the estimate sequence to its trajectory plot chart.
REF_TRAJECTORY_CHART = "FreehandUS.SensorlessTracking.TrajectoryChart"
#: Node reference from a reconstructed volume to the estimate sequence it used.
REF_ESTIMATE_SEQUENCE = "FreehandUS.SensorlessTracking.EstimateSequence"

_BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
#: On plot series nodes made here (so that a refreshed chart drops only its own series).
_ATTR_SERIES = "FreehandUS.SensorlessTracking.Series"
#: Relative difference between a given and the recorded pixel spacing that is reported.
_SPACING_MISMATCH = 0.05
#: The input must cover at least this share of the model's field of view along each axis.
_MIN_FIELD_OF_VIEW = 0.5
_AXES = ("x", "y", "z")
#: Series colours: x red, y green, z blue (Slicer's R, A, S axes); drift grey.
_AXIS_COLORS = {"x": (0.85, 0.2, 0.2), "y": (0.2, 0.65, 0.2), "z": (0.2, 0.35, 0.9)}
_DRIFT_COLOR = (0.35, 0.35, 0.35)


# --------------------------------------------------------------------------------------------
# Browser access
# --------------------------------------------------------------------------------------------


def _check_browser(browser_node, what: str = "input") -> str:
    """The browser's name; SequenceError for None or another node class."""
    if browser_node is None:
        raise SequenceError(f"{what}: no sequence browser given (select the recording, a vtkMRMLSequenceBrowserNode)")
    if not browser_node.IsA(_BROWSER_CLASS):
        raise SequenceError(
            f"{what}: {browser_node.GetName()!r} is a {browser_node.GetClassName()}; "
            "expected a vtkMRMLSequenceBrowserNode"
        )
    if browser_node.GetScene() is None:
        raise SequenceError(f"{what}: browser {browser_node.GetName()!r} is not in a scene")
    return browser_node.GetName()


def _browser_sequences(browser_node) -> list:
    coll = vtk.vtkCollection()
    browser_node.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _holds(seq_node, cls: str) -> bool:
    if seq_node.GetNumberOfDataNodes() == 0:
        return False
    node = seq_node.GetNthDataNode(0)
    return node is not None and node.IsA(cls)


def _image_sequence(browser_node):
    """The browser's image (volume) sequence, picked as :func:`FreehandUSLib.mrml.browser_to_sequence` does."""
    sequences = _browser_sequences(browser_node)
    volumes = [s for s in sequences if _holds(s, "vtkMRMLVolumeNode")]
    if not volumes:
        names = [s.GetName() for s in sequences]
        raise SequenceError(
            f"browser {browser_node.GetName()!r} holds no images (no sequence of volume nodes; its sequences: "
            f"{names or 'none'})"
        )
    for s in volumes:
        if s.GetAttribute(mrml.ATTR_ROLE) == "Image":
            return s
    master = browser_node.GetMasterSequenceNode()
    for s in volumes:
        if master is not None and s.GetID() == master.GetID():
            return s
    return volumes[0]


def find_estimate_sequence(browser_node):
    """The estimated-trajectory sequence of a browser (attribute :data:`ATTR_ESTIMATE`), or None."""
    if browser_node is None or not browser_node.IsA(_BROWSER_CLASS):
        return None
    for seq_node in _browser_sequences(browser_node):
        if seq_node.GetAttribute(ATTR_ESTIMATE) == "true":
            return seq_node
    return None


def _estimate_names(browser_node) -> set[str]:
    """Transform names under which browser_to_sequence reads estimate sequences."""
    names = set()
    for seq_node in _browser_sequences(browser_node):
        if seq_node.GetAttribute(ATTR_ESTIMATE) == "true":
            names.add(seq_node.GetAttribute(mrml.ATTR_TRANSFORM_NAME) or ESTIMATED_TRANSFORM_NAME)
    return names


def _read_browser(browser_node, *, purpose: str, progress=None, cancel=None) -> TrackedSequence:
    """The browser's frames and transforms, without earlier estimates; >= 2 one-channel frames."""
    name = _check_browser(browser_node)
    _image_sequence(browser_node)  # names the browser when it holds no images
    try:
        sequence = mrml.browser_to_sequence(browser_node, progress=progress, cancel=cancel)
    except SequenceError as exc:
        raise SequenceError(f"cannot {purpose}: {exc}") from exc  # names the browser
    estimates = _estimate_names(browser_node)
    if estimates & set(sequence.transforms):
        sequence = TrackedSequence(
            frames=sequence.frames,
            timestamps_s=sequence.timestamps_s,
            transforms={k: v for k, v in sequence.transforms.items() if k not in estimates},
            image_ok=sequence.image_ok,
            pixel_spacing_mm=sequence.pixel_spacing_mm,
            frame_fields=sequence.frame_fields,
            metadata=sequence.metadata,
        )
    if sequence.n_frames < 2:
        raise SequenceError(
            f"browser {name!r} holds {sequence.n_frames} frame: cannot {purpose} from fewer than 2 frames (a sweep)"
        )
    if sequence.frames.ndim != 3:
        raise SequenceError(
            f"browser {name!r}: frames of shape {sequence.frames.shape[1:]} have several channels; cannot "
            f"{purpose} from them (one-channel grey frames are needed)"
        )
    return sequence


def _read_matrices(seq_node) -> np.ndarray:
    """(n, 4, 4) float64 matrices to parent of a linear-transform sequence."""
    out = np.empty((seq_node.GetNumberOfDataNodes(), 4, 4))
    m = vtk.vtkMatrix4x4()
    for i in range(out.shape[0]):
        seq_node.GetNthDataNode(i).GetMatrixTransformToParent(m)
        out[i] = mrml.vtk_to_matrix(m)
    return out


def _tracked_image_to_reference(sequence: TrackedSequence, image_to_probe=None):
    """(n, 4, 4) tracked ImageToReference (NaN where invalid), or None without tracking."""
    from .data import image_to_reference_of

    try:
        mats, valid = image_to_reference_of(sequence, image_to_probe=image_to_probe)
    except TransformError:
        return None
    if not np.any(valid):
        return None
    return np.where(valid[:, None, None], mats, np.nan)


# --------------------------------------------------------------------------------------------
# Estimating a trajectory
# --------------------------------------------------------------------------------------------


def _resolve_model(model, device):
    """(model for track_sequence, label for the summary)."""
    if model is None or (isinstance(model, str) and model == "default"):
        path = default_model_path()
        return load_model(path, device), str(path)
    if isinstance(model, str) and model == "decorrelation":
        return "decorrelation", "decorrelation"
    if isinstance(model, (str, Path)):
        return load_model(Path(model), device), str(model)
    if hasattr(model, "config") and hasattr(model, "eval"):
        return model, f"(loaded {model.config.name} model)"
    raise ModelFileError(
        f"model: expected None (the shipped model), a checkpoint path, 'decorrelation' or a loaded model, "
        f"got {type(model).__name__}"
    )


def _resolve_device(device) -> str:
    if device in (None, "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _check_field_of_view(model, spacing, shape, browser_name: str, warnings: list) -> None:
    """ModelFileError when the frames cover too little of the model's input (another input size)."""
    cfg = model.config
    rows_mm, cols_mm = shape[0] * spacing[1], shape[1] * spacing[0]
    need_rows, need_cols = (v * cfg.pixel_spacing_mm for v in cfg.image_size)
    cover = min(rows_mm / need_rows, cols_mm / need_cols)
    if cover < _MIN_FIELD_OF_VIEW:
        raise ModelFileError(
            f"the model is for input frames of about {need_rows:.1f} x {need_cols:.1f} mm "
            f"({cfg.image_size[0]}x{cfg.image_size[1]} pixels of {cfg.pixel_spacing_mm} mm); the frames of browser "
            f"{browser_name!r} are {rows_mm:.1f} x {cols_mm:.1f} mm ({shape[0]}x{shape[1]} pixels of "
            f"{spacing[0]:.3g} x {spacing[1]:.3g} mm) and would fill less than {100 * _MIN_FIELD_OF_VIEW:.0f} % of "
            "it: use a model trained for this image size (train one with these recordings) or check the pixel spacing"
        )
    if cover < 0.9:
        warnings.append(
            f"the frames ({rows_mm:.1f} x {cols_mm:.1f} mm) fill only part of the model's input "
            f"({need_rows:.1f} x {need_cols:.1f} mm); accuracy may suffer"
        )


def _recorded_in(browser_node, node) -> bool:
    """Whether a transform node is the proxy of a synchronised sequence of the browser (changes per frame)."""
    seq_node = browser_node.GetSequenceNode(node)
    return seq_node is not None and any(s.GetID() == seq_node.GetID() for s in _browser_sequences(browser_node))


def _world_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToWorld(m)
    return mrml.vtk_to_matrix(m)


def _estimate_parent(browser_node, tracked_image_to_reference):
    """The transform node the estimate is shown under, so that it shows where the tracked frames show.

    The estimate maps pixels to (Estimated)Reference mm. Slicer shows the recording's frames
    through the transforms above the image proxy (:func:`FreehandUSLib.mrml.image_placement`):
    e.g. frames placed in Reference (``Image_Reference``) under a ``ReferenceToRAS``. The parent
    is the lowest transform of that tree above which nothing is recorded and whose
    transform to world equals the Reference -> world placement of the tracked frames,
    ``ImageToWorld @ inv(ImageToReference)``, on every tracked frame (0.05 mm, 1e-4). Without
    tracking, the image proxy's parent when the frames are placed in Reference and nothing above
    them is recorded. Frames with pixel geometry whose lowest transform above is named from
    Reference (``ReferenceToRAS``, nothing recorded above): that transform, the frame
    :func:`FreehandUSLib.mrml_reconstruction.reconstruct_browser_to_volume_node` reconstructs
    them in. None (world) otherwise, e.g. when the image hangs under a recorded
    ProbeToTracker whose tracker moves relative to Reference (logged).
    """
    try:
        placement = mrml.image_placement(browser_node)
    except (SequenceError, TransformError) as exc:
        logger.warning("browser %s: the estimate stays in world: %s", browser_node.GetName(), exc)
        return None
    if placement is None:
        return None
    scene = browser_node.GetScene()
    chain = [scene.GetNodeByID(node_id) for node_id in placement.parent_ids]
    static_from = 0
    for i, node in enumerate(chain):
        if _recorded_in(browser_node, node):
            static_from = i + 1
    candidates = chain[static_from:]
    if not candidates:
        logger.warning("browser %s: every transform above the image is recorded; the estimate stays in world",
                       browser_node.GetName())
        return None
    if placement.geometry_frame is None and static_from == 0 and (
        mrml.tree_start_frame(scene, placement) == "Reference"
    ):
        # Pixel frames hung under e.g. ReferenceToRAS: reconstruction places them in Reference
        # through ImageToProbe and the tracking, then through that tree; the estimate likewise.
        return candidates[0]
    if tracked_image_to_reference is None:
        if static_from == 0 and placement.geometry_frame == "Reference":
            return candidates[0]
        return None
    ok = placement.valid & np.all(np.isfinite(tracked_image_to_reference), axis=(1, 2))
    if not np.any(ok):
        return None
    reference_to_world = placement.ijk_to_world[ok] @ np.linalg.inv(tracked_image_to_reference[ok])
    for node in candidates:
        to_world = _world_matrix(node)
        if np.allclose(reference_to_world[:, :3, :3], to_world[:3, :3], rtol=0, atol=1e-4) and np.allclose(
            reference_to_world[:, :3, 3], to_world[:3, 3], rtol=0, atol=0.05
        ):
            return node
    logger.warning(
        "browser %s: no transform above the image places the Reference frame where the tracked frames show; "
        "the estimate stays in world", browser_node.GetName()
    )
    return None


def _write_estimate_sequence(browser_node, image_seq, matrices: np.ndarray, *, name: str | None, parent=None):
    """Fill (or make) the browser's estimate sequence and its proxy (under ``parent``); returns the sequence node."""
    scene = browser_node.GetScene()
    index_values = [image_seq.GetNthIndexValue(i) for i in range(image_seq.GetNumberOfDataNodes())]
    if len(index_values) != matrices.shape[0]:
        raise SequenceError(
            f"browser {browser_node.GetName()!r}: {matrices.shape[0]} poses for {len(index_values)} image items"
        )
    seq_node = find_estimate_sequence(browser_node)
    created = seq_node is None
    if created:
        seq_node = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name or ESTIMATED_TRANSFORM_NAME)
    elif name:
        seq_node.SetName(name)
    transform_name = ESTIMATED_TRANSFORM_NAME
    was_modifying = seq_node.StartModify()
    try:
        seq_node.RemoveAllDataNodes()
        seq_node.SetIndexName(image_seq.GetIndexName())
        seq_node.SetIndexUnit(image_seq.GetIndexUnit())
        seq_node.SetIndexType(image_seq.GetIndexType())
        seq_node.SetNumericIndexValueTolerance(image_seq.GetNumericIndexValueTolerance())
        seq_node.SetAttribute(mrml.ATTR_ROLE, "Transform")
        seq_node.SetAttribute(mrml.ATTR_TRANSFORM_NAME, transform_name)
        seq_node.SetAttribute(ATTR_ESTIMATE, "true")
        data = scene.CreateNodeByClass("vtkMRMLLinearTransformNode")
        data.UnRegister(None)  # CreateNodeByClass hands over a reference; Python keeps its own
        data.SetName(seq_node.GetName())
        data.SetAttribute(mrml.ATTR_TRANSFORM_NAME, transform_name)
        data.SetAttribute(mrml.ATTR_TRANSFORM_VALID, "true")
        for i, value in enumerate(index_values):
            data.SetMatrixTransformToParent(mrml.matrix_to_vtk(matrices[i]))
            seq_node.SetDataNodeAtValue(data, value)  # deep copy
    finally:
        seq_node.EndModify(was_modifying)
    if created:
        browser_node.AddSynchronizedSequenceNodeID(seq_node.GetID())
    item = max(browser_node.GetSelectedItemNumber(), 0)
    proxy = browser_node.GetProxyNode(seq_node)
    if proxy is None:
        proxy = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", seq_node.GetName())
        browser_node.AddProxyNode(proxy, seq_node, False)
    proxy.SetAttribute(mrml.ATTR_TRANSFORM_NAME, transform_name)
    proxy.SetAndObserveTransformNodeID(None if parent is None else parent.GetID())
    proxy.SetMatrixTransformToParent(mrml.matrix_to_vtk(matrices[min(item, matrices.shape[0] - 1)]))
    return seq_node


def _centres(image_to_reference: np.ndarray, shape) -> np.ndarray:
    """(n, 3) image-centre positions (Reference mm) of (n, 4, 4) pixel -> mm matrices."""
    rows, cols = shape
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    return (image_to_reference @ centre)[:, :3]


def _path_length_mm(positions: np.ndarray) -> float:
    ok = np.all(np.isfinite(positions), axis=1)
    p = positions[ok]
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) if len(p) > 1 else 0.0


def estimate_trajectory_to_browser(
    browser_node,
    *,
    model=None,
    spacing_mm=None,
    image_to_probe=None,
    name: str | None = None,
    device="cpu",
    batch_size: int = 8,
    mirror_average: str = "none",
    progress=None,
    cancel=None,
    sweep_direction: str = "toward",
) -> dict:
    """Estimate the probe trajectory of a recording and add it to the recording's browser.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
        The recording: an image sequence of 2D one-channel frames (``Image_Reference`` from
        :func:`~FreehandUSLib.mrml.sequence_to_browser` or a Slicer recording), optionally with
        tracking (read by :func:`~FreehandUSLib.mrml.browser_to_sequence`); tracking is used
        only to anchor the estimate at the first tracked pose and to measure its accuracy.
    model : None, str, Path or loaded model
        ``None``/``"default"``: the shipped model
        (:func:`~SensorlessTrackingLib.predict.default_model_path`); a checkpoint path
        (:func:`~SensorlessTrackingLib.predict.load_model`); a loaded model; or
        ``"decorrelation"`` (the speckle-decorrelation baseline, no torch).
    spacing_mm : float or (sx, sy), optional
        Pixel spacing of the frames (mm), when the recording does not give it (no
        ImageToReference, no ImageToProbe, no ``FreehandUS.PixelSpacing``). Given for a
        recording that has one, it wins and a difference of more than 5 % is reported.
    image_to_probe : (4, 4) array_like, optional
        ImageToProbe calibration (pixels -> Probe mm): pixel spacing, and the tracked
        ImageToReference through ProbeToReference when the frames lack it.
    name : str, optional
        Name of the output sequence and its proxy (default ``ImageToEstimatedReference``).
    device : {"cpu", "cuda", "auto"}
        Where the model runs (``"auto"``: CUDA when torch sees a GPU).
    batch_size : int
        Windows per forward pass.
    mirror_average : {"none", "flip", "flip+reverse"}
        Learned models: average the estimate over the mirrored (and backwards) sweep
        (:mod:`~SensorlessTrackingLib.mirror_average`, 2x / 4x the time). The decorrelation
        baseline runs without it (with a warning when it was asked for).
    sweep_direction : {"toward", "away"}
        Which way the image plane moved, seen on the screen with the probe face at the top
        (:mod:`~SensorlessTrackingLib.conventions`; the images cannot show it): ``"toward"``
        (the viewer, the training convention) or ``"away"``. With tracked frames, an estimate
        that moves the other way adds a warning.
    progress : callable(done, total), optional
        Called at the start (0 of 3), again with 0 of 3 every few frames and transform items
        while the browser is read, after reading (1 of 3), while tracking (1 of 3, every 0.1 s
        when ``cancel`` is given), after tracking (2) and writing (3).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked at each report while the browser is read (a cancel there stops within a fraction
        of a second, before the model is loaded or run). The tracking then runs on a worker
        thread while this thread reports progress (1 of 3) every 0.1 s and checks the token:
        once set, the call stops with
        :class:`~FreehandUSLib.jobs.Cancelled` within 0.1 s and the browser is left as it was
        (the estimate is written only at the end). A learned model also stops itself before its
        next layer (forward pre-hooks); the decorrelation baseline runs on to its end in the
        background and its result is dropped.

    Returns
    -------
    dict
        JSON-safe summary, also stored in the output sequence's
        ``FreehandUS.SensorlessTracking.Summary`` attribute: ``browser``, ``sequence`` (the
        output sequence node name), ``sequence_id``, ``transform`` (``ImageToEstimatedReference``),
        ``parent_transform`` (name of the transform the estimate's proxy is placed under so that
        it shows where the tracked frames show, e.g. the image's ``ReferenceToRAS``; None: world),
        ``frames``, ``method`` (model name or ``decorrelation``), ``model`` (path or label),
        ``input_spacing_mm``, ``path_length_mm`` (of the estimated image centre), ``seconds``
        (tracking, resampling included), ``frames_per_second``, ``total_seconds`` (with MRML
        reading and writing), ``anchored_at_tracked_pose``, ``tracked`` (the browser has a
        tracked ImageToReference), ``metrics`` (``None`` without tracking, else
        :meth:`~SensorlessTrackingLib.metrics.TrackingMetrics.to_dict`: ``final_drift_mm``,
        ``fdr_path_percent``, ``fdr_end_to_end_percent``, ``gpe_mm``, ``lpe_mm``,
        ``mean_angle_error_deg``...; over the frames whose tracking is valid; plus
        ``out_of_plane_scale`` and ``fdr_scale_fitted_percent`` from
        :func:`~SensorlessTrackingLib.attribution.fit_out_of_plane_scale`), ``warnings``
        (list of str: spacing mismatch, coarse pixels, partial field of view, invalid
        tracking, a sweep direction the tracking contradicts, empty or decorrelated frames...),
        ``sweep_direction``, ``direction_check`` (None without tracking, else
        :func:`~SensorlessTrackingLib.conventions.elevational_direction_check`), ``image_frame``
        (``"mirrored"`` for a det < 0 calibration), ``frame_flags``
        (:meth:`~SensorlessTrackingLib.confidence.FrameFlags.to_dict`), ``uncertainty`` (the
        scalar part of :meth:`~SensorlessTrackingLib.confidence.FrameUncertainty.to_dict`:
        ``final_drift_band_mm``, median sigmas; per frame: :func:`estimate_uncertainty`, the
        :data:`ATTR_ESTIMATE_UNCERTAINTY` attribute of the estimate sequence), with tracking
        ``drift_inside_band`` (the tracked final drift lies inside the 95 % band) and
        ``estimated`` (True).

    Raises
    ------
    SequenceError
        No browser, a browser without images, fewer than 2 frames, frames of different sizes
        or with several channels, unknown pixel spacing (names the browser).
    ModelFileError
        Missing or unreadable model file, or a model for another input size (the frames would
        cover less than half of its field of view).
    """
    done_progress = progress  # the last report comes after writing: it must not cancel
    if cancel is not None:
        cancel.check()
        progress = jobs.cancellable_progress(progress, cancel)
    started = time.perf_counter()
    bname = _check_browser(browser_node)
    _report(progress, 0, 3)
    image_seq = _image_sequence(browser_node)
    # Reading a long recording takes seconds: the bar stays at its start (the calls keep their
    # k-of-3 steps) while the reads report, so Slicer's events run and a cancel stops the read
    # before the model is loaded or run.
    reading = None if progress is None else (lambda _done, _total: progress(0, 3))
    sequence = _read_browser(browser_node, purpose="estimate a trajectory", progress=reading, cancel=cancel)
    _report(progress, 1, 3)
    warnings: list[str] = []
    try:
        spacing, _, _ = input_spacing(sequence, image_to_probe=image_to_probe, spacing_mm=spacing_mm)
    except SequenceError as exc:
        raise SequenceError(
            f"browser {bname!r}: the pixel spacing of the frames is unknown (no ImageToReference, ImageToProbe or "
            "pixel spacing in the recording): give spacing_mm (mm per pixel) or an ImageToProbe calibration"
        ) from exc
    if spacing_mm is not None:
        try:
            recorded, _, _ = input_spacing(sequence, image_to_probe=image_to_probe)
        except SequenceError:
            recorded = None
        relative = None if recorded is None else np.abs(np.subtract(spacing, recorded)) / np.asarray(recorded)
        if relative is not None and np.max(relative) > _SPACING_MISMATCH:
            warnings.append(
                f"spacing_mm {spacing[0]:.4g} x {spacing[1]:.4g} mm differs from the recording's "
                f"{recorded[0]:.4g} x {recorded[1]:.4g} mm; the given spacing was used"
            )
    device = _resolve_device(device)
    tracker, model_label = _resolve_model(model, device)
    learned = not isinstance(tracker, str)
    if learned:
        _check_field_of_view(tracker, spacing, sequence.frames.shape[1:], bname, warnings)
    check_mode(mirror_average)
    if not learned and mirror_average != "none":
        warnings.append("mirror averaging is for learned models; the decorrelation baseline ran without it")
        mirror_average = "none"
    truth = _tracked_image_to_reference(sequence, image_to_probe)
    hooks = []
    if cancel is not None and learned:
        # Every layer checks (a cheap flag test): the fast CPU path calls the model's parts, not its forward.
        hooks = [m.register_forward_pre_hook(lambda _module, _inputs: cancel.check()) for m in tracker.modules()]
    def run():
        return track_sequence(
            sequence,
            tracker,
            image_to_probe=image_to_probe,
            spacing_mm=spacing_mm,
            device=device,
            batch_size=batch_size,
            mirror_average=mirror_average,
            sweep_direction=sweep_direction,
        )

    try:
        if cancel is None:
            result = run()
        else:  # on a worker thread: this one keeps reporting (Slicer's events) and checking
            result = jobs.run_in_thread(run, cancel=cancel, heartbeat=lambda: _report(progress, 1, 3))
    except SequenceError as exc:
        raise SequenceError(f"browser {bname!r}: {exc}") from exc
    except ValueError as exc:
        if learned:
            raise
        raise SequenceError(f"browser {bname!r}: speckle decorrelation cannot track these frames: {exc}") from exc
    finally:
        for hook in hooks:
            hook.remove()
    if "warning" in result.info:
        warnings.append(str(result.info["warning"]))
    warnings += result.info.get("warnings", [])
    _report(progress, 2, 3)

    est = result.sequence.transforms["ImageToReference"].matrices
    parent = _estimate_parent(browser_node, truth)
    seq_node = _write_estimate_sequence(browser_node, image_seq, est, name=name, parent=parent)
    metrics = None
    if truth is not None:
        ok = np.all(np.isfinite(truth), axis=(1, 2))
        if ok.sum() >= 2:
            metrics = tracking_metrics(truth[ok], est[ok], sequence.frames.shape[1:]).to_dict()
            metrics["out_of_plane_scale"], metrics["fdr_scale_fitted_percent"] = fit_out_of_plane_scale(
                truth[ok], est[ok], sequence.frames.shape[1:]
            )
            if not ok.all():
                warnings.append(f"{int((~ok).sum())} frames without valid tracking are left out of the metrics")
        else:
            warnings.append("fewer than 2 frames have valid tracking: no accuracy metrics")
    itr = result.true_image_to_reference
    anchored = itr is not None and bool(np.all(np.isfinite(itr[0])))
    if not anchored:
        warnings.append(
            "no tracked pose of the first frame: the trajectory starts at the origin (first frame, pixels scaled to mm)"
        )
    summary = {
        "browser": bname,
        "sequence": seq_node.GetName(),
        "sequence_id": seq_node.GetID(),
        "transform": ESTIMATED_TRANSFORM_NAME,
        "parent_transform": None if parent is None else parent.GetName(),
        "frames": int(sequence.n_frames),
        "method": result.method,
        "model": model_label,
        "input_spacing_mm": [float(v) for v in spacing],
        "path_length_mm": _path_length_mm(_centres(est, sequence.frames.shape[1:])),
        "seconds": float(result.seconds),
        "frames_per_second": float(result.frames_per_second),
        "total_seconds": time.perf_counter() - started,
        "anchored_at_tracked_pose": anchored,
        "tracked": truth is not None,
        "metrics": metrics,
        "warnings": warnings,
        "sweep_direction": sweep_direction,
        "direction_check": result.info.get("direction_check"),
        "image_frame": result.info.get("image_frame"),
        "frame_flags": result.info.get("frame_flags"),
        "uncertainty": result.uncertainty.to_dict(per_frame=False),
        "estimated": True,
    }
    if metrics is not None:
        summary["drift_inside_band"] = bool(metrics["final_drift_mm"] <= result.uncertainty.final_drift_band_mm)
    seq_node.SetAttribute(ATTR_ESTIMATE_SUMMARY, json.dumps(summary))
    seq_node.SetAttribute(ATTR_ESTIMATE_UNCERTAINTY, json.dumps(result.uncertainty.to_dict()))
    seq_node.SetAttribute(ATTR_ESTIMATE_MODEL, model_label)
    for text in warnings:
        logger.warning("browser %s: %s", bname, text)
    logger.info("estimated trajectory of %s: %s", bname, summary_text(summary).replace("\n", "; "))
    _report(done_progress, 3, 3)
    return summary


def _report(progress, done, total) -> None:
    if progress is not None:
        progress(done, total)


def summary_text(summary: dict) -> str:
    """A few readable lines of an estimate summary (for a label in the panel or a log)."""
    lines = [
        f"{summary['frames']} frames tracked by {summary['method']} in {summary['seconds']:.2f} s "
        f"({summary['frames_per_second']:.0f} frames/s)",
        f"estimated path {summary['path_length_mm']:.1f} mm -> {summary['sequence']}",
    ]
    if summary.get("sweep_direction"):
        lines.append(f"assumed sweep direction: {summary['sweep_direction']} (as seen on the screen, probe face at the "
                     "top; the images cannot show it)")
    m = summary.get("metrics")
    if m:
        lines.append(
            f"vs tracking: final drift {m['final_drift_mm']:.2f} mm ({m['fdr_path_percent']:.1f} % of the "
            f"{m['path_length_mm']:.1f} mm path), GPE {m['gpe_mm']:.2f} mm, mean angle error "
            f"{m['mean_angle_error_deg']:.2f} deg"
        )
        k = m.get("out_of_plane_scale")
        if k is not None and np.isfinite(k):
            hint = ""
            if abs(np.log(k)) >= np.log(1.15):
                hint = ": the method misjudges this probe's elevational beam width"
                if summary.get("method") != "decorrelation":
                    hint += "; fine-tune the model on tracked sweeps of this probe"
            lines.append(
                f"out-of-plane motion x {k:.2f} would fit best (drift {m['fdr_scale_fitted_percent']:.1f} %){hint}"
            )
    elif not summary.get("tracked"):
        lines.append("no tracking in the recording: no accuracy metrics")
    u = summary.get("uncertainty")
    if u:
        pct = u.get("final_drift_band_percent_of_path")
        inside = summary.get("drift_inside_band")
        check = "" if inside is None else f"; the tracked drift is {'inside' if inside else 'OUTSIDE'} it"
        lines.append(f"uncertainty: last frame within {u['final_drift_band_mm']:.1f} mm of its estimated place (95 % band"
                     f"{f', {pct:.0f} % of the path' if pct is not None else ''}){check}; per step "
                     f"{u['median_elevational_sigma_mm']:.2f} mm out of the plane, "
                     f"{u['median_out_of_plane_sigma_deg']:.2f} deg tilt (sigma, median)")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------------


def estimated_trajectory(source) -> dict:
    """The estimated (and tracked) trajectory of a browser or a tracking result, as arrays.

    Parameters
    ----------
    source : vtkMRMLSequenceBrowserNode or TrackingResult
        A browser on which :func:`estimate_trajectory_to_browser` ran, or the result of
        :func:`~SensorlessTrackingLib.predict.track_sequence`.

    Returns
    -------
    dict
        ``estimated`` (n, 4, 4) pixel -> mm; ``tracked`` (n, 4, 4) with NaN where invalid, or
        None; ``times_s`` (n,); ``image_shape`` (rows, cols); ``name`` (a label);
        ``uncertainty`` (:func:`estimate_uncertainty`'s dict, or None when the estimate has none).

    Raises
    ------
    SequenceError
        A browser without an estimate (run :func:`estimate_trajectory_to_browser` first).
    TypeError
        Neither a browser nor a TrackingResult.
    """
    if isinstance(source, TrackingResult):
        seq = source.sequence
        tracked = source.true_image_to_reference
        return {
            "estimated": seq.transforms["ImageToReference"].matrices,
            "tracked": None if tracked is None else np.asarray(tracked, dtype=np.float64),
            "times_s": seq.timestamps_s,
            "image_shape": seq.frames.shape[1:3],
            "name": source.method,
            "uncertainty": None if source.uncertainty is None else source.uncertainty.to_dict(),
        }
    if source is None or not hasattr(source, "IsA") or not source.IsA(_BROWSER_CLASS):
        got = "None" if source is None else getattr(source, "GetClassName", lambda: type(source).__name__)()
        raise TypeError(f"expected a vtkMRMLSequenceBrowserNode or a TrackingResult, got {got}")
    bname = source.GetName()
    seq_node = find_estimate_sequence(source)
    if seq_node is None:
        raise SequenceError(
            f"browser {bname!r} has no estimated trajectory: run estimate_trajectory_to_browser "
            "(Estimate trajectory) first"
        )
    sequence = _read_browser(source, purpose="plot a trajectory")
    estimated = _read_matrices(seq_node)
    if estimated.shape[0] != sequence.n_frames:
        raise SequenceError(
            f"browser {bname!r}: the estimate {seq_node.GetName()!r} has {estimated.shape[0]} items for "
            f"{sequence.n_frames} frames; estimate the trajectory again"
        )
    uncertainty = _stored_uncertainty(seq_node)
    if uncertainty is not None and len(uncertainty["drift_band_mm"]) != estimated.shape[0]:
        uncertainty = None
    return {
        "estimated": estimated,
        "tracked": _tracked_image_to_reference(sequence),
        "times_s": sequence.timestamps_s,
        "image_shape": sequence.frames.shape[1:3],
        "name": bname,
        "uncertainty": uncertainty,
    }


def _stored_uncertainty(seq_node) -> dict | None:
    text = seq_node.GetAttribute(ATTR_ESTIMATE_UNCERTAINTY)
    if not text:
        return None
    try:
        u = json.loads(text)
    except json.JSONDecodeError:
        return None
    keys = ("elevational_sigma_mm", "out_of_plane_sigma_deg", "drift_band_mm")
    if not isinstance(u, dict) or not all(isinstance(u.get(k), list) for k in keys):
        return None
    return u


def estimate_uncertainty(browser_node) -> dict:
    """The per-frame uncertainty of a browser's estimate (for the panel).

    Returns
    -------
    dict
        :meth:`~SensorlessTrackingLib.confidence.FrameUncertainty.to_dict`: per frame
        ``elevational_sigma_mm`` (sigma of the step into the frame out of the image plane, mm),
        ``out_of_plane_sigma_deg`` (of its tilt, degrees) and ``drift_band_mm`` (the frame's image
        centre lies within this distance of its estimated place in about 95 % of cases), and
        ``final_drift_band_mm``, medians, the calibration.

    Raises
    ------
    SequenceError
        A browser without an estimate, or an estimate made before uncertainty was reported
        (estimate again).
    TypeError
        Not a sequence browser node.
    """
    if browser_node is None or not hasattr(browser_node, "IsA") or not browser_node.IsA(_BROWSER_CLASS):
        got = "None" if browser_node is None else getattr(browser_node, "GetClassName", lambda: type(browser_node).__name__)()
        raise TypeError(f"expected a vtkMRMLSequenceBrowserNode, got {got}")
    seq_node = find_estimate_sequence(browser_node)
    if seq_node is None:
        raise SequenceError(f"browser {browser_node.GetName()!r} has no estimated trajectory: run "
                            "estimate_trajectory_to_browser (Estimate trajectory) first")
    u = _stored_uncertainty(seq_node)
    if u is None:
        raise SequenceError(f"browser {browser_node.GetName()!r}: the estimate {seq_node.GetName()!r} carries no "
                            "uncertainty (made by an older version): estimate the trajectory again")
    return u


def _column(table: vtk.vtkTable, name: str, values, cls=vtk.vtkDoubleArray) -> None:
    array = cls()
    array.SetName(name)
    array.SetNumberOfTuples(len(values))
    for i, v in enumerate(values):
        array.SetValue(i, v)
    table.AddColumn(array)


def trajectory_table(source, scene=None, *, table_node=None):
    """A table node with the image-centre position of every frame (estimated, tracked, drift).

    Parameters
    ----------
    source : vtkMRMLSequenceBrowserNode or TrackingResult
        See :func:`estimated_trajectory`.
    scene : vtkMRMLScene, optional
        Where to add the table (default: the browser's scene; needed for a TrackingResult).
    table_node : vtkMRMLTableNode, optional
        Refilled in place. Default: the browser's earlier table (a node reference of its
        estimate sequence), else a new ``<browser>EstimatedTrajectory`` table.

    Returns
    -------
    vtkMRMLTableNode
        One row per frame. Columns: ``frame`` (index, int), ``time_s``,
        ``estimated_x_mm``/``_y_mm``/``_z_mm`` (image centre in the Reference frame = RAS,
        mm) and, with tracking, ``tracked_x_mm``/``_y_mm``/``_z_mm`` (NaN where invalid) and
        ``drift_mm`` (distance between the two centres); with the estimate's uncertainty
        (:func:`estimate_uncertainty`) ``elevational_sigma_mm``, ``out_of_plane_sigma_deg`` (of
        the step into the frame) and ``drift_band_mm`` (95 % band of the centre's drift).
    """
    traj = estimated_trajectory(source)
    seq_node = None
    if not isinstance(source, TrackingResult):
        scene = scene if scene is not None else source.GetScene()
        seq_node = find_estimate_sequence(source)
        if table_node is None:
            table_node = seq_node.GetNodeReference(REF_TRAJECTORY_TABLE)
    if scene is None:
        raise ValueError("trajectory_table: give the scene to add the table to")
    if table_node is None:
        table_node = scene.AddNewNodeByClass(
            "vtkMRMLTableNode", scene.GenerateUniqueName(f"{traj['name']}EstimatedTrajectory")
        )
    elif not table_node.IsA("vtkMRMLTableNode"):
        raise TypeError(f"table_node: expected a vtkMRMLTableNode, got {table_node.GetClassName()}")
    est = _centres(traj["estimated"], traj["image_shape"])
    n = est.shape[0]
    table = vtk.vtkTable()
    _column(table, "frame", list(range(n)), vtk.vtkIntArray)
    _column(table, "time_s", np.asarray(traj["times_s"], dtype=float).tolist())
    for k, axis in enumerate(_AXES):
        _column(table, f"estimated_{axis}_mm", est[:, k].tolist())
    if traj["tracked"] is not None:
        tracked = _centres(traj["tracked"], traj["image_shape"])
        for k, axis in enumerate(_AXES):
            _column(table, f"tracked_{axis}_mm", tracked[:, k].tolist())
        _column(table, "drift_mm", np.linalg.norm(tracked - est, axis=1).tolist())
    unc = traj.get("uncertainty")
    if unc is not None:
        for col in ("elevational_sigma_mm", "out_of_plane_sigma_deg", "drift_band_mm"):
            _column(table, col, [float(v) for v in unc[col]])
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for column in range(table.GetNumberOfColumns()):
        col = table.GetColumnName(column)
        if col.endswith("_mm"):
            table_node.SetColumnUnitLabel(col, "mm")
        elif col == "time_s":
            table_node.SetColumnUnitLabel(col, "s")
        elif col.endswith("_deg"):
            table_node.SetColumnUnitLabel(col, "deg")
    table_node.SetColumnDescription("frame", "frame index")
    if seq_node is not None:
        seq_node.SetNodeReferenceID(REF_TRAJECTORY_TABLE, table_node.GetID())
    return table_node


def trajectory_plot(source, scene=None, *, table_node=None, chart_node=None):
    """A plot chart of the image-centre x, y, z (mm) per frame: estimated solid, tracked dashed.

    Parameters
    ----------
    source : vtkMRMLSequenceBrowserNode or TrackingResult
        See :func:`estimated_trajectory`.
    scene : vtkMRMLScene, optional
        Default: the browser's scene (needed for a TrackingResult).
    table_node, chart_node : optional
        Refilled in place (default: the browser's earlier ones, else new nodes).

    Returns
    -------
    vtkMRMLPlotChartNode
        With one ``vtkMRMLPlotSeriesNode`` per column of :func:`trajectory_table` (frame on the
        x axis): ``estimated x/y/z``, with tracking ``tracked x/y/z`` and ``drift``, and with the
        estimate's uncertainty ``drift band`` (95 % band of the drift, dotted grey). The
        chart references the table (``FreehandUS.SensorlessTracking.TrajectoryTable``).
        In Slicer show it with ``slicer.modules.plots.logic().ShowChartInLayout(chart)``.
    """
    table_node = trajectory_table(source, scene, table_node=table_node)
    scene = table_node.GetScene()
    seq_node = None if isinstance(source, TrackingResult) else find_estimate_sequence(source)
    if chart_node is None and seq_node is not None:
        chart_node = seq_node.GetNodeReference(REF_TRAJECTORY_CHART)
    if chart_node is None:
        chart_name = scene.GenerateUniqueName(f"{table_node.GetName()}Chart")
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", chart_name)
    elif not chart_node.IsA("vtkMRMLPlotChartNode"):
        raise TypeError(f"chart_node: expected a vtkMRMLPlotChartNode, got {chart_node.GetClassName()}")
    for i in reversed(range(chart_node.GetNumberOfPlotSeriesNodes())):
        old = chart_node.GetNthPlotSeriesNode(i)
        if old is not None and old.GetAttribute(_ATTR_SERIES) == "true":
            chart_node.RemovePlotSeriesNodeID(old.GetID())
            scene.RemoveNode(old)
    table = table_node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    for col in columns:
        if not col.endswith("_mm") or col == "elevational_sigma_mm":  # a step's sigma: not a position
            continue
        kind, *axis = col[: -len("_mm")].split("_")
        label = f"{kind} {axis[0]}" if axis else kind
        series_name = scene.GenerateUniqueName(f"{table_node.GetName()} {label}")
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", series_name)
        series.SetAttribute(_ATTR_SERIES, "true")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("frame")
        series.SetYColumnName(col)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetLineStyle(
            {"estimated": series.LineStyleSolid, "tracked": series.LineStyleDash}.get(kind, series.LineStyleDot)
        )
        series.SetColor(*(_AXIS_COLORS.get(axis[0], _DRIFT_COLOR) if axis else _DRIFT_COLOR))
        chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    chart_node.SetTitle(f"Image centre per frame: {table_node.GetName()}")
    chart_node.SetXAxisTitle("frame")
    chart_node.SetYAxisTitle("position in Reference (mm)")
    chart_node.SetNodeReferenceID(REF_TRAJECTORY_TABLE, table_node.GetID())
    if seq_node is not None:
        seq_node.SetNodeReferenceID(REF_TRAJECTORY_CHART, chart_node.GetID())
    return chart_node


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _roi_in_frame_of(roi_node, frame_node):
    """Have ``roi_node`` read (in world) as in ``frame_node``'s frame for the block; restored after.

    The estimate's volume is made in its own frame and then hung under ``frame_node`` (e.g.
    ReferenceToRAS); an ROI the user placed around the frames *as shown* is in world. For the
    block, the ROI hangs under a temporary transform ``inv(FrameToWorld) @ ROIParentToWorld``,
    so its world box is the same box in the frame; its own parent is put back afterwards and the
    temporary node removed. Nothing happens without an ROI or a frame node, or when the ROI's
    parent transform is not linear (logged).
    """
    if roi_node is None or frame_node is None or roi_node.GetScene() is None:
        yield
        return
    old_parent = roi_node.GetParentTransformNode()
    if old_parent is not None and not old_parent.IsTransformToWorldLinear():
        logger.warning("ROI %s: its transform is not linear; read in world as it is", roi_node.GetName())
        yield
        return
    roi_to_world = np.eye(4) if old_parent is None else _world_matrix(old_parent)
    scene = roi_node.GetScene()
    temporary = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName("ROIInEstimateFrame"))
    temporary.SetMatrixTransformToParent(mrml.matrix_to_vtk(np.linalg.inv(_world_matrix(frame_node)) @ roi_to_world))
    roi_node.SetAndObserveTransformNodeID(temporary.GetID())
    try:
        yield
    finally:
        roi_node.SetAndObserveTransformNodeID(None if old_parent is None else old_parent.GetID())
        scene.RemoveNode(temporary)


def reconstruct_estimated(browser_node, output_volume_node=None, *, reconstruct, progress=None, cancel=None,
                          **options):
    """Reconstruct a volume from the frames placed by the estimated trajectory.

    Calls ``reconstruct`` (the reconstruction capability's
    :func:`FreehandUSLib.mrml_reconstruction.reconstruct_browser_to_volume_node`, handed in by
    the application: the Sensorless Tracking module's Logic; this capability does not import
    another) with
    ``image_to_reference_transform="ImageToEstimatedReference"``; the volume lies in the
    estimate's frame (the tracked Reference when the estimate is anchored at the tracked first
    pose, so it overlays a reconstruction from tracking) and is placed under the same transform
    as the estimate's proxy (the recording's ``ReferenceToRAS``, say), so it shows where the
    estimate shows. The transforms above the image are not applied to the frames (the estimate
    places them); an ``roi_node`` is read where it is shown (world) and taken into the
    estimate's frame.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
        A browser on which :func:`estimate_trajectory_to_browser` ran.
    output_volume_node : vtkMRMLScalarVolumeNode, optional
        Default: a new ``<browser>EstimatedReconstruction`` node.
    reconstruct : callable
        ``reconstruct_browser_to_volume_node(browser, volume_node, *, image_to_reference_transform,
        progress, cancel, **options) -> ReconstructionResult``.
    progress : callable(done, total), optional
    cancel : FreehandUSLib.jobs.CancelToken, optional
        As for :func:`FreehandUSLib.mrml_reconstruction.reconstruct_browser_to_volume_node`
        (the new output node is removed when cancelled).
    **options
        Passed on: ``roi_node``, ``coverage_volume_node``, ``config``, ``options`` and
        :class:`~FreehandUSLib.reconstruction.ReconstructionOptions` fields
        (``output_spacing_mm=0.5``, ``interpolation="linear"``, ``fill_holes=True``...).
        ``image_to_probe_node`` and ``image_to_reference_transform`` are not accepted (the
        estimate already maps pixels to mm).

    Returns
    -------
    ReconstructionResult
        Also written to the output node, whose ``FreehandUS.SensorlessTracking.Trajectory``
        attribute names the transform used.

    Raises
    ------
    SequenceError
        Not a browser, or a browser without an estimate.
    ConfigError
        ``image_to_probe_node``/``image_to_reference_transform`` given, or a bad option
        (``FreehandUSLib.reconstruction.InvalidOptionError``, a ConfigError, from the reconstruction).
    ReconstructionError, TransformError
        From the reconstruction.
    """
    bname = _check_browser(browser_node)
    stack = contextlib.ExitStack()
    if cancel is not None:
        cancel.check()
        stack.enter_context(jobs.scene_rollback(browser_node.GetScene()))
    with stack:
        return _reconstruct_estimated(browser_node, output_volume_node, bname, reconstruct, progress, cancel, options)


def _reconstruct_estimated(browser_node, output_volume_node, bname: str, reconstruct, progress, cancel, options):
    """The work of :func:`reconstruct_estimated` (inside the scene rollback when cancellable)."""
    seq_node = find_estimate_sequence(browser_node)
    if seq_node is None:
        raise SequenceError(
            f"browser {bname!r} has no estimated trajectory: run estimate_trajectory_to_browser "
            "(Estimate trajectory) first"
        )
    for key in ("image_to_probe_node", "image_to_reference_transform"):
        if options.get(key) is not None:
            raise ConfigError(
                f"reconstruct_estimated: {key} cannot be set: the estimated {ESTIMATED_TRANSFORM_NAME} already maps "
                "pixels to mm (reconstruct from tracking with the Freehand US module instead)"
            )
        options.pop(key, None)
    transform_name = seq_node.GetAttribute(mrml.ATTR_TRANSFORM_NAME) or ESTIMATED_TRANSFORM_NAME
    if output_volume_node is None:
        scene = browser_node.GetScene()
        output_volume_node = scene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(f"{bname}EstimatedReconstruction")
        )
    proxy = browser_node.GetProxyNode(seq_node)
    parent_id = None if proxy is None else proxy.GetTransformNodeID()
    roi_node = options.get("roi_node")
    with _roi_in_frame_of(roi_node, None if proxy is None else proxy.GetParentTransformNode()):
        result = reconstruct(
            browser_node,
            output_volume_node,
            image_to_reference_transform=transform_name,
            progress=progress,
            cancel=cancel,
            **options,
        )
    output_volume_node.SetAndObserveTransformNodeID(parent_id)  # shown where the estimate is shown
    coverage = options.get("coverage_volume_node")
    if coverage is not None:
        coverage.SetAndObserveTransformNodeID(parent_id)
    output_volume_node.SetAttribute(ATTR_RECON_TRAJECTORY, transform_name)
    output_volume_node.SetAttribute(ATTR_RECON_SOURCE, "sensorless estimate: the frames are placed by an estimated "
                                    "trajectory, not by tracking")
    output_volume_node.SetNodeReferenceID(REF_ESTIMATE_SEQUENCE, seq_node.GetID())
    return result


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _training_recording(browser_node, image_to_probe, *, progress=None, cancel=None):
    """(name, sequence, tracked ImageToReference (n, 4, 4), valid (n,)) of a training browser."""
    bname = _check_browser(browser_node, "training recording")
    sequence = _read_browser(browser_node, purpose="train", progress=progress, cancel=cancel)
    truth = _tracked_image_to_reference(sequence, image_to_probe)
    if truth is None:
        raise TransformError(
            f"browser {bname!r} has no tracking: training needs the tracked ImageToReference of every frame (frames "
            "placed by tracking, or ImageToProbe + ProbeToReference/ProbeToTracker); its transforms: "
            f"{', '.join(sequence.transform_names) or 'none'}"
        )
    valid = np.all(np.isfinite(truth), axis=(1, 2)) & sequence.image_ok
    if valid.sum() < 2:
        raise SequenceError(
            f"browser {bname!r}: {int(valid.sum())} frames have valid tracking and image; training needs at least 2"
        )
    return bname, sequence, truth, valid


def _training_sweep(browser_node, model_config, *, image_to_probe, margin_px: int, progress=None, cancel=None):
    """A PreparedSweep from a tracked browser (its own split group).

    ``progress``: reading the browser is its first half, resampling the frames the second (on a
    worker thread when ``cancel`` is given: this thread reports and checks every 0.1 s).
    """
    from .data import prepare_sweep

    bname, sequence, truth, valid = _training_recording(
        browser_node, image_to_probe, progress=jobs.step_progress(progress, 0.0, 0.5), cancel=cancel
    )

    def prepare():
        return prepare_sweep(
            sequence.frames,
            truth,
            valid,
            model_spacing_mm=model_config.pixel_spacing_mm,
            image_size=model_config.image_size,
            global_size=model_config.global_size,
            margin_px=margin_px,
            name=bname,
            group=bname,
        )

    if cancel is None:
        return prepare()
    relay = jobs.ProgressRelay(jobs.step_progress(progress, 0.5, 1.0), cancel)
    return jobs.run_in_thread(prepare, cancel=cancel, heartbeat=relay.beat)


def _per_browser(progress, index: int, count: int):
    """The part of ``progress`` (the whole preparation) that browser ``index`` of ``count`` covers."""
    return jobs.step_progress(progress, index / count, (index + 1) / count)


def _geometry(model_config) -> tuple:
    return (model_config.name, tuple(model_config.image_size), float(model_config.pixel_spacing_mm))


def _describe(model_config) -> str:
    rows, cols = model_config.image_size
    return f"{model_config.name} model for {rows}x{cols} input pixels of {model_config.pixel_spacing_mm} mm"


def _check_resume(out_dir: Path, model_config) -> None:
    """ModelFileError when ``out_dir`` holds a checkpoint for another model or input size."""
    last = out_dir / "last.pt"
    if not last.is_file():
        return
    saved = load_model(last).config
    if _geometry(saved) != _geometry(model_config):
        raise ModelFileError(
            f"{last}: holds a {_describe(saved)}, this training asks for a {_describe(model_config)}; training "
            "would resume it: choose another output folder (or delete it)"
        )


def train_from_browsers(
    browser_nodes,
    out_dir,
    *,
    epochs: int | None = None,
    model_config=None,
    init_model=None,
    image_size=None,
    config=None,
    clips_per_epoch: int | None = None,
    batch_size: int | None = None,
    val_fraction: float | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    image_to_probe=None,
    progress=None,
) -> Path:
    """Train a tracking model on tracked recordings held by sequence browsers.

    Each browser is one sweep (and its own group of the validation split, so with several
    browsers whole recordings are held out). A second call with the same ``out_dir`` resumes
    (:func:`~SensorlessTrackingLib.train.train`).

    Parameters
    ----------
    browser_nodes : vtkMRMLSequenceBrowserNode or iterable of them
        Recordings with tracking: the tracked ImageToReference of every frame (frames placed by
        tracking, as PLUS/SlicerOpenIGTLink record ``Image_Reference``; or ImageToProbe +
        ProbeToReference). Frames without valid tracking are left out.
    out_dir : str or Path
        Folder for ``last.pt``, ``best.pt``, ``history.json``.
    epochs, clips_per_epoch, batch_size, val_fraction, lr, seed, device, num_threads : optional
        Override the fields of ``config`` (``device``: ``"auto"``, ``"cpu"`` or ``"cuda"``).
    model_config : ModelConfig, optional
        Architecture and input geometry (default: ``config.model``, the shipped model's; with
        ``init_model``, that model's).
    init_model : None, "default", str or Path, optional
        Fine-tune: start from the weights of this checkpoint (``"default"``: the shipped model)
        instead of random ones; its architecture and input geometry are used (``image_size``
        may replace its input size). Ignored when ``out_dir`` already holds a run to resume.
    image_size : (rows, cols) or "fit", optional
        Model input in pixels of the model's spacing (multiples of 16), replacing the size of
        ``model_config`` or of ``init_model``: a checkpoint's weights fit any size, so a fine-tuning
        can see more of the probe's image than the shipped model's 96 x 96 (28.8 mm) square.
        ``"fit"``: the largest size that every recording's frames fill, at most 160 pixels a
        side (:func:`~SensorlessTrackingLib.input_size.fitting_image_size`).
    config : TrainConfig, optional
        Starting configuration (default: :class:`~SensorlessTrackingLib.train.TrainConfig`
        defaults); its ``sequences`` are ignored.
    image_to_probe : (4, 4) array_like, optional
        Calibration for recordings that hold ProbeToReference but no placed frames.
    progress : callable(done, total), optional
        Called after every epoch with (epochs done, epochs); raise in it to stop (the
        checkpoints of the finished epochs stay).

    Returns
    -------
    Path
        The best checkpoint (``best.pt``; ``last.pt`` without validation data), readable by
        :func:`~SensorlessTrackingLib.predict.load_model`.

    Raises
    ------
    SequenceError
        No browser, a browser without images, fewer than 2 (tracked) frames, frames of
        different sizes or several channels; with ``image_size="fit"``, a recording smaller
        than 16 model pixels on a side.
    TransformError
        A browser without tracking (names it and lists its transforms).
    ModelFileError
        ``init_model`` missing or unreadable, or ``init_model``/``out_dir``'s checkpoint is a
        model for another input size than ``model_config``.
    TrainingError
        Non-finite loss, an incompatible checkpoint in ``out_dir``, sweeps shorter than the
        clip length.
    ValueError
        ``epochs`` < 1, an ``image_size`` that is not two multiples of 16 or ``"fit"``.
    """
    from .train_job import train_epochs

    cfg, sweeps, out_dir = _training_plan(
        browser_nodes, out_dir, epochs=epochs, model_config=model_config, init_model=init_model,
        image_size=image_size, config=config, clips_per_epoch=clips_per_epoch, batch_size=batch_size,
        val_fraction=val_fraction, lr=lr, seed=seed, device=device, num_threads=num_threads,
        image_to_probe=image_to_probe,
    )
    if progress is None:
        return train_epochs(cfg, sweeps, out_dir)
    return train_epochs(cfg, sweeps, out_dir, progress=lambda done, total, _record: progress(done, total))


def start_training_job(browser_nodes, out_dir, *, job_dir=None, python=None, prepare_progress=None, cancel=None,
                       **options):
    """Train on tracked browsers in a separate process; returns the running job at once.

    The sweeps are prepared here from the browsers (as :func:`train_from_browsers` does, with
    the same options and checks, so a bad input fails at once with the same message), written
    with the configuration to ``job_dir`` (:func:`~SensorlessTrackingLib.train_job.write_job`)
    and trained by ``python -m SensorlessTrackingLib.train_job`` with this Python (Slicer's
    ``PythonSlicer`` in Slicer), so Slicer stays usable.

    Parameters
    ----------
    browser_nodes, out_dir
        As for :func:`train_from_browsers`.
    job_dir : str or Path, optional
        Folder for the job files (default: a new temporary folder; ``job.job_dir``).
    python : str, optional
        The Python to run (default: this one).
    prepare_progress : callable(done, total), optional
        Progress of reading and resampling the browsers here, before the process starts
        (one share per browser; the training's own progress comes from ``job.poll()``).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked while the sweeps are prepared (reading every few frames, the resampling on a
        worker thread): a cancel stops within a fraction of a second, before any file is
        written or process started; the scene is not changed by the preparation.
    **options
        The keyword options of :func:`train_from_browsers` except ``progress``.

    Returns
    -------
    FreehandUSLib.jobs.ProcessJob
        ``poll()`` gives the JSON events (``progress`` after every epoch with ``done``,
        ``total``, ``train_loss``, ``val_loss``; then ``done`` with ``checkpoint``, or
        ``error`` with ``message``); ``cancel()`` kills the process (finished epochs stay in
        ``out_dir`` and a later run resumes them).

    Raises
    ------
    The errors of :func:`train_from_browsers` about its inputs (before any process starts);
    :class:`~FreehandUSLib.jobs.Cancelled` when cancelled.
    """
    import tempfile

    from FreehandUSLib.jobs import ProcessJob

    from .train_job import write_job

    if "progress" in options:
        raise TypeError("start_training_job: progress comes from the job's events (job.poll()), not a callback")
    cfg, sweeps, out_dir = _training_plan(browser_nodes, out_dir, progress=prepare_progress, cancel=cancel, **options)
    if cancel is not None:
        cancel.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    job_dir = Path(job_dir) if job_dir is not None else Path(tempfile.mkdtemp(prefix="freehandus-train-"))
    spec = write_job(job_dir, cfg, sweeps, out_dir)
    # In Slicer the modules' folders are on sys.path only: give them to the child.
    package_roots = {str(Path(__file__).resolve().parents[1]), str(Path(mrml.__file__).resolve().parents[1])}
    job = ProcessJob.python_module(
        "SensorlessTrackingLib.train_job", str(spec), python=python, pythonpath=sorted(package_roots)
    )
    job.job_dir = job_dir
    job.out_dir = out_dir
    logger.info("training job %d started (%s -> %s)", job.pid, spec, out_dir)
    return job


def start_adaptation_job(browser_nodes, out_path, *, base="default", fine_tune=False, max_minutes=15.0,
                         image_to_probe=None, device="cpu", job_dir=None, python=None, prepare_progress=None,
                         cancel=None):
    """Adapt a model to the probe of tracked browsers in a separate process; returns the running job.

    The tracked sweeps are read from the browsers here (frames without valid tracking or image
    left out; a browser without tracking fails at once, naming it), written with the settings to
    ``job_dir`` (:func:`~SensorlessTrackingLib.adapt.write_job`) and adapted by ``python -m
    SensorlessTrackingLib.adapt`` (:func:`~SensorlessTrackingLib.adapt.adapt_model`: the
    correction chosen on the recordings, and with ``fine_tune`` the weights), so Slicer stays usable.

    Parameters
    ----------
    browser_nodes : iterable of vtkMRMLSequenceBrowserNode
        At least 2 tracked recordings of the probe; the last is held back to check the result.
    out_path : str or Path
        The adapted model file (``.pt``) the job writes.
    base : "default" (the shipped model) or a checkpoint path
    fine_tune, max_minutes, device : :class:`~SensorlessTrackingLib.adapt.AdaptConfig` settings
    image_to_probe : (4, 4) calibration for recordings with ProbeToReference only
    job_dir, python, prepare_progress, cancel : as for :func:`start_training_job` (reading the
        browsers here is what ``prepare_progress`` shows and ``cancel`` stops)

    Returns
    -------
    FreehandUSLib.jobs.ProcessJob
        ``poll()`` gives ``progress`` events (``done``, ``total``, ``message``), then ``done``
        (``checkpoint``, ``summary``) or ``error`` (``message``).

    Raises
    ------
    SequenceError
        Fewer than 2 browsers, a browser without images or with fewer than 2 tracked frames.
    TransformError
        A browser without tracking.
    """
    import tempfile

    from FreehandUSLib.jobs import ProcessJob

    from .adapt import AdaptConfig, write_job

    if browser_nodes is None:
        browser_nodes = []
    browser_nodes = [browser_nodes] if hasattr(browser_nodes, "IsA") else list(browser_nodes)
    if len(browser_nodes) < 2:
        raise SequenceError(f"adaptation needs at least 2 tracked recordings of the probe (one is held back to check "
                            f"the result); {len(browser_nodes)} selected")
    cfg = AdaptConfig(fine_tune=bool(fine_tune), max_minutes=float(max_minutes), device=device)
    sequences = []
    for index, b in enumerate(browser_nodes):
        bname, sequence, truth, valid = _training_recording(
            b, image_to_probe, progress=_per_browser(prepare_progress, index, len(browser_nodes)), cancel=cancel
        )
        if not valid.all():
            logger.warning("%s: %d frames without valid tracking or image left out of the adaptation", bname,
                           int((~valid).sum()))
        sweep = TrackedSequence(frames=sequence.frames[valid], timestamps_s=sequence.timestamps_s[valid],
                                transforms={}, image_ok=np.ones(int(valid.sum()), dtype=bool))
        sweep.set_transform("ImageToReference", truth[valid])
        sequences.append((bname, sweep))
    if cancel is not None:
        cancel.check()
    job_dir = Path(job_dir) if job_dir is not None else Path(tempfile.mkdtemp(prefix="freehandus-adapt-"))
    spec = write_job(job_dir, sequences, out_path, base=base, config=cfg)
    package_roots = {str(Path(__file__).resolve().parents[1]), str(Path(mrml.__file__).resolve().parents[1])}
    job = ProcessJob.python_module("SensorlessTrackingLib.adapt", str(spec), python=python,
                                   pythonpath=sorted(package_roots))
    job.job_dir = job_dir
    logger.info("adaptation job %d started (%s -> %s)", job.pid, spec, out_path)
    return job


def _training_plan(browser_nodes, out_dir, *, epochs=None, model_config=None, init_model=None, image_size=None,
                   config=None, clips_per_epoch=None, batch_size=None, val_fraction=None, lr=None, seed=None,
                   device=None, num_threads=None, image_to_probe=None, progress=None, cancel=None):
    """(TrainConfig, prepared sweeps, out_dir) of :func:`train_from_browsers`, every input checked.

    ``progress``/``cancel``: of the sweeps' preparation (one share per browser; with
    ``image_size="fit"`` the browsers are read once more before, checking ``cancel``).
    """
    from .train import TrainConfig

    if browser_nodes is None:
        raise SequenceError("training: no sequence browsers given (select the tracked recordings to train on)")
    if hasattr(browser_nodes, "IsA"):
        browser_nodes = [browser_nodes]
    browser_nodes = list(browser_nodes)
    if not browser_nodes:
        raise SequenceError("training: no sequence browsers given (select the tracked recordings to train on)")
    cfg = config if config is not None else TrainConfig()
    init_path = None
    if init_model is not None:
        init_path = default_model_path() if str(init_model) == "default" else Path(init_model)
        saved = load_model(init_path).config
        if model_config is not None and _geometry(model_config) != _geometry(saved):
            raise ModelFileError(
                f"{init_path}: the model to fine-tune is a {_describe(saved)}; the requested model_config is a "
                f"{_describe(model_config)}: leave model_config out (the checkpoint's is used) or train from scratch"
            )
        model_config = saved
    if image_size is not None:
        base = model_config if model_config is not None else cfg.model
        if isinstance(image_size, str) and image_size == "fit":
            image_size = _fitted_image_size(browser_nodes, base.pixel_spacing_mm, image_to_probe, cancel=cancel)
        elif isinstance(image_size, str):
            raise ValueError(f"image_size must be (rows, cols) or 'fit', got {image_size!r}")
        model_config = replace(base, image_size=tuple(int(v) for v in image_size))
    overrides = {
        "model": model_config,
        "epochs": epochs,
        "clips_per_epoch": clips_per_epoch,
        "batch_size": batch_size,
        "val_fraction": val_fraction,
        "lr": lr,
        "seed": seed,
        "device": device,
        "num_threads": num_threads,
        "init_from": None if init_path is None else str(init_path),
    }
    cfg = replace(cfg, sequences=(), **{k: v for k, v in overrides.items() if v is not None})
    if int(cfg.epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {cfg.epochs}")
    sweeps = [
        _training_sweep(
            b, cfg.model, image_to_probe=image_to_probe, margin_px=cfg.augment.crop_jitter_px,
            progress=_per_browser(progress, index, len(browser_nodes)), cancel=cancel,
        )  # fmt: skip
        for index, b in enumerate(browser_nodes)
    ]
    out_dir = Path(out_dir)
    _check_resume(out_dir, cfg.model)
    logger.info(
        "training %s on %d browsers (%s), %d epochs -> %s",
        cfg.model.name, len(sweeps), ", ".join(s.name for s in sweeps), cfg.epochs, out_dir,
    )  # fmt: skip
    return cfg, sweeps, out_dir


def _fitted_image_size(browser_nodes, spacing_mm: float, image_to_probe, *, cancel=None) -> tuple[int, int]:
    """The largest model input (pixels of ``spacing_mm``) that every training recording fills."""
    from .data import pixel_spacing_of
    from .input_size import field_of_view_mm, fitting_image_size

    names, fields = [], []
    for b in browser_nodes:  # one recording in memory at a time
        bname, sequence, truth, valid = _training_recording(b, image_to_probe, cancel=cancel)
        names.append(bname)
        fields.append(field_of_view_mm(sequence.frames.shape[1:3], pixel_spacing_of(truth, valid)))
    return fitting_image_size(fields, spacing_mm, names=names)

"""MRML bridge for volume reconstruction: sequence browsers and live image nodes -> volume nodes.

What the "Freehand US" module's Logic calls (it holds no reconstruction code itself), and what
the headless tests exercise with the real MRML classes of the ``slicer-core`` wheel:

- :func:`reconstruct_browser_to_volume_node` — a tracked recording (sequence browser) in, the
  reconstructed volume (and optionally its coverage map) written into volume nodes, provenance
  recorded as node attributes;
- :class:`LiveReconstruction` — observes a live image node (``Image_Reference`` as
  SlicerOpenIGTLink updates it), feeds every new frame to an
  :class:`~FreehandUSLib.reconstruction.IncrementalReconstructor` and refreshes the output
  volume node every ``update_interval_s`` seconds; it counts every frame it could not use;
- helpers: :func:`roi_node_options` (markups ROI -> output grid),
  :func:`image_to_probe_from_node`, :func:`image_to_reference_of_node`,
  :func:`frame_from_volume_node`, :func:`write_result_to_nodes`.

Like :mod:`FreehandUSLib.mrml` (which this module uses for everything that needs ``slicer``),
it needs 3D Slicer's Python or the ``slicer-core`` wheel and is not imported by
``import FreehandUSLib``. It never imports qt, ctk or ``slicer.util``: periodic work is driven
by the frames themselves or by whoever calls :meth:`LiveReconstruction.update_output` (the
module's Widget runs a ``qt.QTimer`` for that).

Coordinate convention: as in :mod:`FreehandUSLib.mrml`, the Reference frame *is* Slicer's RAS
world (PLUS millimetres, no LPS flip). A frame's ImageToReference is its image node's IJKToRAS
(pixels -> mm, what SlicerOpenIGTLink sets from PlusServer's ``Image_Reference`` message)
composed with the node's parent transforms to world, if any. A recording is reconstructed the
same way: when its image proxy sits under transforms (a ``ReferenceToRAS``, or a SlicerIGT tree
whose ProbeToTracker is recorded), they are composed per frame as SlicerIGT's Volume
Reconstruction does and the volume is made in RAS (:func:`reconstruct_browser_to_volume_node`).
A markups ROI is read in world coordinates (its parent transforms applied).

Example (3D Slicer Python console)
----------------------------------
>>> from FreehandUSLib import mrml_reconstruction as mr
>>> browser = slicer.util.getNode("SpinePhantomFreehand")
>>> result = mr.reconstruct_browser_to_volume_node(
...     browser, None, image_to_probe_node=slicer.util.getNode("ImageToProbe"),
...     output_spacing_mm=0.5, interpolation="linear", compounding="max")
>>> print(result)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from . import jobs, mrml
from .errors import FreehandUSError, SequenceError, TransformError
from .reconstruction import (
    IncrementalReconstructor,
    ReconstructionError,
    ReconstructionOptions,
    ReconstructionResult,
    options_from_plus_config,
    reconstruct_volume,
    roi_options,
)
from .reconstruction.cli import DEFAULT_HOLE_FILLING
from .reconstruction.errors import InvalidOptionError
from .sequence import TrackedSequence
from .transforms import split_transform_name

__all__ = [
    "reconstruct_browser_to_volume_node",
    "write_result_to_nodes",
    "roi_node_options",
    "image_to_probe_from_node",
    "image_to_reference_of_node",
    "frame_from_volume_node",
    "build_options",
    "LiveReconstruction",
    "ATTR_RECON_MODE",
    "ATTR_RECON_SOURCE",
    "ATTR_RECON_OPTIONS",
    "ATTR_RECON_SUMMARY",
    "ATTR_RECON_FRAMES_TOTAL",
    "ATTR_RECON_FRAMES_USED",
    "ATTR_RECON_FRAMES_SKIPPED",
    "ATTR_RECON_FRAMES_DROPPED",
    "ATTR_RECON_SECONDS",
    "ATTR_RECON_COVERAGE",
    "ATTR_RECON_CHANNEL",
    "REF_RECON_SOURCE",
    "REF_RECON_COVERAGE",
    "REF_RECON_IMAGE_TO_PROBE",
    "REF_RECON_ROI",
]

logger = logging.getLogger(__name__)

#: ``"batch"`` (from a sequence browser) or ``"live"`` (from a live image node).
ATTR_RECON_MODE = "FreehandUS.Reconstruction.Mode"
#: Name of the browser or live image node the volume was reconstructed from.
ATTR_RECON_SOURCE = "FreehandUS.Reconstruction.Source"
#: JSON of every :class:`~FreehandUSLib.reconstruction.ReconstructionOptions` field used.
ATTR_RECON_OPTIONS = "FreehandUS.Reconstruction.Options"
#: JSON of :meth:`~FreehandUSLib.reconstruction.ReconstructionResult.to_dict` (frames skipped
#: and why, geometry, timings, coverage).
ATTR_RECON_SUMMARY = "FreehandUS.Reconstruction.Summary"
ATTR_RECON_FRAMES_TOTAL = "FreehandUS.Reconstruction.FramesTotal"
ATTR_RECON_FRAMES_USED = "FreehandUS.Reconstruction.FramesUsed"
#: Number of frames skipped (invalid transform, no image, outside the ROI, dropped...).
ATTR_RECON_FRAMES_SKIPPED = "FreehandUS.Reconstruction.FramesSkipped"
#: Live: frames dropped because the reconstruction fell behind the stream.
ATTR_RECON_FRAMES_DROPPED = "FreehandUS.Reconstruction.FramesDropped"
#: Wall time of the reconstruction, seconds (live: insertion time so far plus the last output).
ATTR_RECON_SECONDS = "FreehandUS.Reconstruction.Seconds"
#: Fraction of the output voxels that received pixels (0..1).
ATTR_RECON_COVERAGE = "FreehandUS.Reconstruction.CoverageFraction"
#: The image channel held by the node (``image``, ``channel0``... or ``weight``).
ATTR_RECON_CHANNEL = "FreehandUS.Reconstruction.Channel"
#: Node reference from the output volume to the browser / live image node.
REF_RECON_SOURCE = "FreehandUS.ReconstructionSource"
#: Node reference from the output volume to its coverage volume.
REF_RECON_COVERAGE = "FreehandUS.ReconstructionCoverage"
#: Node reference from the output volume to the ImageToProbe transform node used.
REF_RECON_IMAGE_TO_PROBE = "FreehandUS.ImageToProbe"
#: Node reference from the output volume to the markups ROI used.
REF_RECON_ROI = "FreehandUS.ReconstructionROI"

#: Colour table for the coverage map, when the scene has it (Slicer's default tables).
_COVERAGE_COLOR_ID = "vtkMRMLColorTableNodeRainbow"
_BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
#: Axes closer than this to the world axes give an axis-aligned grid (no output_directions).
_AXIS_TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------
# Options, ROI, transforms
# --------------------------------------------------------------------------------------------


def build_options(options=None, *, config=None, **overrides) -> ReconstructionOptions:
    """The reconstruction options: defaults, a PLUS config, or given options, then overrides.

    Parameters
    ----------
    options : ReconstructionOptions, optional
        Starting point (default: the config's ``<VolumeReconstruction>`` if ``config`` is given,
        else :class:`~FreehandUSLib.reconstruction.ReconstructionOptions` defaults).
    config : PlusConfig, optional
        A PLUS device-set config (:func:`FreehandUSLib.io.plus_config.read_plus_config`).
    **overrides
        :class:`~FreehandUSLib.reconstruction.ReconstructionOptions` field values
        (``output_spacing_mm=0.5``, ``interpolation="linear"``...); ``None`` values are ignored.
        ``fill_holes=True`` without any ``hole_filling`` elements uses the command line's
        default chain (GAUSSIAN_ACCUMULATION then STICK).

    Raises
    ------
    InvalidOptionError
        An unknown option name or an invalid value (names the option).
    """
    if options is None:
        options = ReconstructionOptions()
        if config is not None and getattr(config, "volume_reconstruction", None) is not None:
            options = options_from_plus_config(config)
    elif not isinstance(options, ReconstructionOptions):
        raise InvalidOptionError(f"options: expected ReconstructionOptions, got {type(options).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("fill_holes") and not options.hole_filling and not overrides.get("hole_filling"):
        overrides["hole_filling"] = DEFAULT_HOLE_FILLING
    return options.replace(**overrides)


def _read_config(config):
    """A PlusConfig from a PlusConfig or a path (None stays None)."""
    if config is None or hasattr(config, "coordinate_definitions"):
        return config
    from .io.plus_config import read_plus_config

    return read_plus_config(Path(config))


def roi_node_options(roi_node, options: ReconstructionOptions) -> ReconstructionOptions:
    """Options whose output grid is the box of a markups ROI node (world = Reference, mm).

    Parameters
    ----------
    roi_node : vtkMRMLMarkupsROINode
        Its centre, size and axes are read in world coordinates (parent transforms applied).
    options : ReconstructionOptions
        Its ``output_spacing_mm`` is kept.

    Returns
    -------
    ReconstructionOptions
        With ``output_origin_mm``/``output_extent`` (and ``output_directions`` when the ROI is
        rotated) set: a fixed grid whose voxel centres cover the box.

    Raises
    ------
    ReconstructionError
        Not a markups ROI node, or an ROI of zero size (names the node).
    """
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        got = "None" if roi_node is None else roi_node.GetClassName()
        raise ReconstructionError(f"ROI: expected a vtkMRMLMarkupsROINode, got {got}")
    center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    roi_node.GetSizeWorld(size)
    axes = np.zeros((3, 3))
    for column, getter in enumerate((roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld)):
        axis = [0.0, 0.0, 0.0]
        getter(axis)
        axes[:, column] = axis
    if not np.all(np.asarray(size) > 0):
        raise ReconstructionError(
            f"ROI {roi_node.GetName()!r}: size {np.round(size, 3).tolist()} mm; every edge must be > 0 "
            "(place the ROI around the scanned region, or select no ROI to enclose all frames)"
        )
    norms = np.linalg.norm(axes, axis=0)
    axes = axes / np.where(norms > 0, norms, 1.0)
    aligned = np.allclose(axes, np.eye(3), rtol=0, atol=_AXIS_TOLERANCE)
    try:
        return roi_options(options, center, size, None if aligned else axes)
    except InvalidOptionError as exc:
        raise ReconstructionError(f"ROI {roi_node.GetName()!r}: {exc}") from exc


def image_to_probe_from_node(transform_node) -> np.ndarray:
    """The ImageToProbe calibration held by a linear transform node (its matrix to parent).

    The matrix *to parent* is used, so the node may sit under ProbeToReference in a SlicerIGT
    transform hierarchy.

    Returns
    -------
    (4, 4) float64, pixels -> Probe mm (includes the pixel spacing)

    Raises
    ------
    TransformError
        Not a transform node, a non-linear transform, or a singular/non-finite matrix.
    """
    if transform_node is None or not transform_node.IsA("vtkMRMLTransformNode"):
        got = "None" if transform_node is None else transform_node.GetClassName()
        raise TransformError(f"ImageToProbe: expected a linear transform node, got {got}")
    if not transform_node.IsLinear():
        raise TransformError(f"ImageToProbe node {transform_node.GetName()!r} holds a non-linear transform")
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToParent(m)
    matrix = mrml.vtk_to_matrix(m)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise TransformError(
            f"ImageToProbe node {transform_node.GetName()!r}: matrix is singular or not finite "
            f"({np.round(matrix, 6).tolist()})"
        )
    return matrix


def image_to_reference_of_node(volume_node) -> tuple[np.ndarray, bool]:
    """A 2D image node's ImageToReference: parent-to-world @ IJKToRAS.

    Parameters
    ----------
    volume_node : vtkMRMLVolumeNode
        E.g. ``Image_Reference`` from SlicerOpenIGTLink (IJKToRAS = ImageToReference), or an
        ``Image_Image`` node placed under ImageToProbe / ProbeToReference transforms.

    Returns
    -------
    image_to_reference : (4, 4) float64
        Pixel (x = column, y = row, 0, 1) -> Reference (world) mm.
    valid : bool
        False when the node carries ``FreehandUS.TransformValid = "false"`` or the matrix is
        not finite.

    Raises
    ------
    TransformError
        A parent transform that is not linear.
    """
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = mrml.vtk_to_matrix(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise TransformError(
                f"image node {volume_node.GetName()!r}: parent transform {parent.GetName()!r} is not linear"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = mrml.vtk_to_matrix(to_world) @ ijk_to_ras
    flag = volume_node.GetAttribute(mrml.ATTR_TRANSFORM_VALID)
    valid = (flag is None or flag.strip().lower() not in ("false", "0", "no", "invalid")) and bool(
        np.all(np.isfinite(ijk_to_ras))
    )
    return ijk_to_ras, valid


def frame_from_volume_node(volume_node) -> tuple[np.ndarray, np.ndarray, bool]:
    """The current 2D frame of an image node (a copy), its ImageToReference and image status.

    Multi-component (RGB/RGBA) frames are converted to grey (mean of the first three
    components, rounded for uint8). Scalar types other than uint8/float32 become float32.

    Returns
    -------
    frame : (rows, cols) uint8 or float32, MF (rows top to bottom as stored in the node)
    image_to_reference : (4, 4) float64 (NaN when the pose is invalid)
    image_ok : bool
        False when the node carries ``FreehandUS.ImageStatus`` other than ``OK``.

    Raises
    ------
    FreehandUSError
        No image data, or a 3D image (more than one slice).
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLVolumeNode"):
        got = "None" if volume_node is None else volume_node.GetClassName()
        raise ReconstructionError(f"live image: expected a vtkMRMLVolumeNode, got {got}")
    frame = mrml.grey_frame_of_image_node(volume_node, round_uint8=True)
    matrix, valid = image_to_reference_of_node(volume_node)
    if not valid:
        matrix = np.full((4, 4), np.nan)
    status = volume_node.GetAttribute(mrml.ATTR_IMAGE_STATUS)
    image_ok = status is None or status.strip().upper() == "OK"
    return frame, matrix, image_ok


# --------------------------------------------------------------------------------------------
# Writing results into volume nodes
# --------------------------------------------------------------------------------------------


def _set_voxels(node, voxels: np.ndarray, spacing, origin, directions) -> None:
    """Put ``[k, j, i]`` (or ``[k, j, i, c]``) voxels and geometry into a volume node."""
    voxels = np.ascontiguousarray(voxels)
    n_k, n_j, n_i = voxels.shape[:3]
    n_c = voxels.shape[3] if voxels.ndim == 4 else 1
    vtk_type = numpy_support.get_vtk_array_type(voxels.dtype)
    was_modifying = node.StartModify()
    try:
        image = node.GetImageData()
        scalars = None if image is None or image.GetPointData() is None else image.GetPointData().GetScalars()
        reuse = (
            scalars is not None
            and tuple(image.GetDimensions()) == (n_i, n_j, n_k)
            and scalars.GetDataType() == vtk_type
            and scalars.GetNumberOfComponents() == n_c
        )
        if reuse:  # live updates: copy into the existing buffer, no reallocation
            numpy_support.vtk_to_numpy(scalars).reshape(voxels.shape)[...] = voxels
            scalars.Modified()
            image.Modified()
        else:
            image = vtk.vtkImageData()
            image.SetDimensions(int(n_i), int(n_j), int(n_k))
            flat = voxels.reshape(-1, n_c) if n_c > 1 else voxels.reshape(-1)
            array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk_type)
            array.SetName("ImageScalars")
            image.GetPointData().SetScalars(array)
            node.SetAndObserveImageData(image)
        node.SetSpacing(*(float(v) for v in spacing))
        node.SetOrigin(*(float(v) for v in origin))
        node.SetIJKToRASDirections(np.asarray(directions, dtype=float).tolist())
    finally:
        node.EndModify(was_modifying)


def _check_volume_node(node, what: str) -> None:
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        got = "None" if node is None else node.GetClassName()
        raise ReconstructionError(f"{what}: expected a vtkMRMLScalarVolumeNode, got {got}")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ReconstructionError(f"{what}: {node.GetName()!r} is a label map; select a scalar volume")


def write_result_to_nodes(
    result: ReconstructionResult,
    output_volume_node,
    coverage_volume_node=None,
    *,
    source_node=None,
    mode: str = "batch",
    image_to_probe_node=None,
    roi_node=None,
) -> None:
    """Write a reconstruction into volume nodes and record its provenance on them.

    Parameters
    ----------
    result : ReconstructionResult
    output_volume_node : vtkMRMLScalarVolumeNode
        Receives the first channel (a ``vtkMRMLVectorVolumeNode`` receives all channels, when
        they share one scalar type). Geometry: IJKToRAS = the grid's voxel-to-Reference matrix.
        Attributes: ``FreehandUS.Reconstruction.*`` (options JSON, summary JSON, frames
        total/used/skipped/dropped, seconds, coverage fraction, source, mode); node references
        to the source, coverage, ImageToProbe and ROI nodes. A parent transform is removed
        (the voxels are already in the Reference frame).
    coverage_volume_node : vtkMRMLScalarVolumeNode, optional
        Receives the accumulated insertion weight (float32; the number of pixels per voxel for
        nearest interpolation); displayed with a rainbow colour table, zero transparent in
        slice views (threshold).
    source_node : vtkMRMLNode, optional
        The browser or live image node (provenance).
    mode : {"batch", "live"}
    image_to_probe_node, roi_node : vtkMRMLNode, optional
        Recorded as node references.

    Raises
    ------
    ReconstructionError
        Output (or coverage) node missing or not a scalar volume, the same node given twice,
        or a coverage node given for a result without a weight volume.
    """
    _check_volume_node(output_volume_node, "output volume")
    if coverage_volume_node is not None:
        _check_volume_node(coverage_volume_node, "coverage volume")
        if coverage_volume_node is output_volume_node or coverage_volume_node.GetID() == output_volume_node.GetID():
            raise ReconstructionError("the coverage volume must be another node than the output volume")
        if result.weight is None:
            raise ReconstructionError("the result has no weight volume (reconstruct with output_weight=True)")
    volumes = result.volumes
    if output_volume_node.IsA("vtkMRMLVectorVolumeNode") and len(volumes) > 1:
        voxels = np.stack([v.voxels for v in volumes], axis=-1)
        channel = ",".join(result.channel_names)
    else:
        if len(volumes) > 1:
            logger.warning(
                "%d channels reconstructed (%s); %s receives %r only",
                len(volumes),
                ", ".join(result.channel_names),
                output_volume_node.GetName(),
                result.channel_names[0],
            )
        voxels = volumes[0].voxels
        channel = result.channel_names[0]
    first = volumes[0]
    output_volume_node.SetAndObserveTransformNodeID(None)
    _set_voxels(output_volume_node, voxels, first.spacing_mm, first.origin_mm, first.directions)
    if output_volume_node.GetDisplayNode() is None:
        output_volume_node.CreateDefaultDisplayNodes()
    summary = result.to_dict()
    attributes = {
        ATTR_RECON_MODE: mode,
        ATTR_RECON_SOURCE: "" if source_node is None else (source_node.GetName() or ""),
        ATTR_RECON_OPTIONS: json.dumps(result.options.to_dict()),
        ATTR_RECON_SUMMARY: json.dumps(summary),
        ATTR_RECON_FRAMES_TOTAL: str(result.frames_total),
        ATTR_RECON_FRAMES_USED: str(result.frames_used),
        ATTR_RECON_FRAMES_SKIPPED: str(len(result.frames_skipped)),
        ATTR_RECON_FRAMES_DROPPED: str(result.frames_dropped),
        ATTR_RECON_SECONDS: repr(float(result.seconds)),
        ATTR_RECON_COVERAGE: repr(float(result.coverage_fraction)),
    }
    for key, value in attributes.items():
        output_volume_node.SetAttribute(key, value)
    output_volume_node.SetAttribute(ATTR_RECON_CHANNEL, channel)
    for role, node in (
        (REF_RECON_SOURCE, source_node),
        (REF_RECON_COVERAGE, coverage_volume_node),
        (REF_RECON_IMAGE_TO_PROBE, image_to_probe_node),
        (REF_RECON_ROI, roi_node),
    ):
        output_volume_node.SetNodeReferenceID(role, None if node is None else node.GetID())
    if coverage_volume_node is not None:
        weight = result.weight
        coverage_volume_node.SetAndObserveTransformNodeID(None)
        _set_voxels(coverage_volume_node, weight.voxels.astype(np.float32, copy=False), weight.spacing_mm,
                    weight.origin_mm, weight.directions)  # fmt: skip
        first_time = coverage_volume_node.GetAttribute(ATTR_RECON_CHANNEL) != "weight"
        for key in (ATTR_RECON_MODE, ATTR_RECON_SOURCE, ATTR_RECON_COVERAGE, ATTR_RECON_FRAMES_USED):
            coverage_volume_node.SetAttribute(key, attributes[key])
        coverage_volume_node.SetAttribute(ATTR_RECON_CHANNEL, "weight")
        if first_time or coverage_volume_node.GetDisplayNode() is None:
            _style_coverage(coverage_volume_node)  # once: live refreshes keep the user's display settings


def _style_coverage(node) -> None:
    """Rainbow colours, uncovered voxels transparent (threshold just above zero)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is None:
        return
    scene = node.GetScene()
    if scene is not None and scene.GetNodeByID(_COVERAGE_COLOR_ID) is not None:
        display.SetAndObserveColorNodeID(_COVERAGE_COLOR_ID)
    if display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        display.SetAutoThreshold(0)
        display.SetThreshold(1e-6, float(np.finfo(np.float32).max))
        display.SetApplyThreshold(1)


def _new_output_node(scene, name: str, what: str):
    if scene is None:
        raise ReconstructionError(f"{what}: no output volume node given and the source node is not in a scene")
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))


# --------------------------------------------------------------------------------------------
# Batch: sequence browser -> volume node
# --------------------------------------------------------------------------------------------


def _without_image_geometry(sequence: TrackedSequence) -> TrackedSequence:
    """The sequence without ``ImageTo*`` transforms (read from the frames' IJKToRAS).

    Used when an ImageToProbe calibration is given: ImageToReference is then resolved through
    it and the tracking transforms, not taken from the geometry the frames were shown with.
    """
    dropped = [name for name in sequence.transforms if split_transform_name(name)[0] == "Image"]
    if not dropped:
        return sequence
    logger.info("ImageToProbe given: ignoring %s read from the frames' IJKToRAS", ", ".join(dropped))
    return TrackedSequence(
        frames=sequence.frames,
        timestamps_s=sequence.timestamps_s,
        transforms={k: v for k, v in sequence.transforms.items() if k not in dropped},
        image_ok=sequence.image_ok,
        pixel_spacing_mm=sequence.pixel_spacing_mm,
        frame_fields=sequence.frame_fields,
        metadata=sequence.metadata,
    )


def _in_world(sequence, placement, fixed, opts, *, name: str, image_to_probe_node):
    """(sequence, options) that reconstruct a recording in world (RAS) where Slicer shows its frames.

    ``placement`` (:func:`FreehandUSLib.mrml.image_placement`) holds the transforms above the
    image proxy, per frame. They are composed as SlicerIGT's Volume Reconstruction composes them
    while browsing:

    - frames placed in a tracked frame (``Image_Reference``: IJKToRAS = ImageToReference) under
      e.g. ``ReferenceToRAS``: ImageToRAS = ParentToWorld @ ImageToReference, the latter from the
      frames or, with an ImageToProbe node, from it and the recorded tracking;
    - frames with pixel geometry under a SlicerIGT tree (ImageToProbe -> ProbeToTracker ->
      TrackerToRAS): ImageToRAS = the tree @ IJKToRAS; with an ImageToProbe node that is not in
      the tree, the tree starts at the frame its lowest transform is named from when the
      recording knows that frame (``ReferenceToRAS``: ImageToRAS = tree @ ImageToReference from
      ImageToProbe and the recorded tracking, invalid where the tracking is), else at the Probe
      frame: ImageToRAS = tree @ ImageToProbe.

    The result holds a per-frame ``ImageToRAS`` (invalid where a recorded transform of the tree
    or the image's own geometry is) and the options reconstruct in RAS, so the output volume and
    an ROI (read in world coordinates) are in the same frame as the scene shows the frames. When
    the options ask for another frame than the one the frames are placed in, the tree cannot be
    applied and the request is kept (logged); so is a request for a transform the recording
    holds itself when its frames have pixel geometry (e.g. a sensorless estimate).
    """
    frame = placement.geometry_frame
    target_frame = split_transform_name(opts.image_to_reference_transform)[1]
    if frame is None and image_to_probe_node is None and opts.image_to_reference_transform in sequence.transforms:
        # The recording places its frames itself in the asked frame (e.g. a sensorless estimate,
        # ImageToEstimatedReference): the tree above the pixels is another placement.
        logger.info(
            "browser %s: reconstructing with its recorded %s; the transforms above its image are not applied",
            name, opts.image_to_reference_transform,
        )
        return sequence, opts
    if frame is not None:
        if target_frame != frame:
            logger.warning(
                "browser %s: its image is placed from the %s frame by transforms above it, but %s was "
                "asked; reconstructing in %s without them",
                name, frame, opts.image_to_reference_transform, target_frame,
            )
            return sequence, opts
        image_to_frame = sequence.repository(fixed).get(f"ImageTo{frame}")
        image_to_world = placement.parent_to_world @ image_to_frame
    elif image_to_probe_node is not None and image_to_probe_node.GetID() not in placement.parent_ids:
        start = mrml.tree_start_frame(image_to_probe_node.GetScene(), placement)
        known = {part for n in (*sequence.transform_names, *fixed) for part in split_transform_name(n)}
        if start is None or start == "Probe" or start not in known:
            image_to_world = placement.parent_to_world @ fixed["ImageToProbe"]
        else:  # e.g. the image hung under ReferenceToRAS: the tree starts at Reference
            image_to_world = placement.parent_to_world @ sequence.repository(fixed).get(f"ImageTo{start}")
    else:
        image_to_world = placement.ijk_to_world
    valid = placement.valid & np.all(np.isfinite(image_to_world), axis=(1, 2))
    sequence.set_transform("ImageToRAS", np.where(valid[:, None, None], image_to_world, np.nan), valid)
    logger.info(
        "browser %s: reconstructing in RAS through the transforms above its image (%s)", name, placement
    )
    return sequence, opts.replace(image_to_reference_transform="ImageToRAS")


def reconstruct_browser_to_volume_node(
    browser_node,
    output_volume_node=None,
    *,
    image_to_probe_node=None,
    roi_node=None,
    coverage_volume_node=None,
    config=None,
    options: ReconstructionOptions | None = None,
    progress=None,
    cancel=None,
    **overrides,
) -> ReconstructionResult:
    """Reconstruct the recording held by a sequence browser into a volume node.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
        A tracked recording: an image sequence (e.g. ``Image_Reference``) and synchronised
        transform sequences (``ProbeToTracker``...), read by
        :func:`FreehandUSLib.mrml.browser_to_sequence`. When its image proxy sits under
        transforms (``ReferenceToRAS``, a SlicerIGT tree with recorded ProbeToTracker...), the
        frames are placed through them, per frame, as Slicer shows them, and the volume is
        made in RAS (world): see :func:`FreehandUSLib.mrml.image_placement`.
    output_volume_node : vtkMRMLScalarVolumeNode, optional
        Receives the volume (default: a new node ``<browser>Reconstruction``).
    image_to_probe_node : vtkMRMLLinearTransformNode, optional
        ImageToProbe calibration (its matrix to parent). When given, ImageToReference is
        resolved through it and the tracking transforms, and the frames' own IJKToRAS is
        ignored. Without it, ImageToReference comes from the frames' IJKToRAS (recordings of
        ``Image_Reference``) or from ``config``'s ``<CoordinateDefinitions>``.
    roi_node : vtkMRMLMarkupsROINode, optional
        Box to reconstruct, in world coordinates (the frame the volume is made in).
        Default: the box that encloses all frames.
    coverage_volume_node : vtkMRMLScalarVolumeNode, optional
        Receives the coverage map (accumulated weight per voxel).
    config : PlusConfig or str or Path, optional
        A PLUS device-set config: its ``<VolumeReconstruction>`` gives the default options and
        its ``<CoordinateDefinitions>`` the fixed transforms (ImageToProbe...).
    options : ReconstructionOptions, optional
        Starting options (instead of the defaults / the config's).
    progress : callable(done, total), optional
        Called after each batch of inserted frames (raise in it to cancel).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked at every progress step (every batch of frames): once set, the call stops with
        :class:`~FreehandUSLib.jobs.Cancelled` and the nodes it added (a new output volume)
        are removed; given output nodes are written only at the end, so they stay as they were.
    **overrides
        Option fields, e.g. ``output_spacing_mm=0.5``, ``interpolation="linear"``,
        ``compounding="max"``, ``fill_holes=True``, ``fan_angles_deg=(-30, 30)``,
        ``image_to_reference_transform="ImageToTracker"`` (see :func:`build_options`).

    Returns
    -------
    ReconstructionResult
        Also written to the nodes (see :func:`write_result_to_nodes`).

    Raises
    ------
    ReconstructionError
        No browser / not a browser, bad output or ROI node, no usable frame, the ROI misses
        every frame (all :class:`~FreehandUSLib.errors.FreehandUSError`).
    SequenceError
        The browser holds no image sequence or no frames.
    TransformError
        ImageToReference cannot be resolved (e.g. no ImageToProbe for a recording made without
        calibration); the message names the browser and what to select.
    InvalidOptionError
        An invalid option value.
    VolumeTooLargeError
        The grid exceeds the memory budget (the message suggests a spacing that fits).
    """
    args = (browser_node, output_volume_node, image_to_probe_node, roi_node, coverage_volume_node, config, options,
            progress, cancel, overrides)
    if cancel is None:
        return _reconstruct_browser(*args)
    cancel.check()
    scene = None if browser_node is None else browser_node.GetScene()
    with jobs.scene_rollback(scene) if scene is not None else contextlib.nullcontext():
        return _reconstruct_browser(*args)


def _reconstruct_browser(browser_node, output_volume_node, image_to_probe_node, roi_node, coverage_volume_node, config,
                         options, progress, cancel, overrides) -> ReconstructionResult:
    """The work of :func:`reconstruct_browser_to_volume_node` (with ``cancel``: the computation on a worker thread)."""
    if browser_node is None:
        raise ReconstructionError(
            "no sequence browser given: select the tracked recording (a vtkMRMLSequenceBrowserNode)"
        )
    if not browser_node.IsA(_BROWSER_CLASS):
        raise ReconstructionError(
            f"input {browser_node.GetName()!r} is a {browser_node.GetClassName()}; expected a "
            "vtkMRMLSequenceBrowserNode (for a live image node use LiveReconstruction)"
        )
    name = browser_node.GetName()
    if output_volume_node is None:
        output_volume_node = _new_output_node(browser_node.GetScene(), f"{name}Reconstruction", "output volume")
    _check_volume_node(output_volume_node, "output volume")
    if coverage_volume_node is not None:
        _check_volume_node(coverage_volume_node, "coverage volume")
        if coverage_volume_node.GetID() == output_volume_node.GetID():
            raise ReconstructionError("the coverage volume must be another node than the output volume")
    plus_config = _read_config(config)
    opts = build_options(options, config=plus_config, **overrides)
    if roi_node is not None:
        opts = roi_node_options(roi_node, opts)
    opts = opts.replace(output_weight=coverage_volume_node is not None)

    # Reading a long recording takes seconds: the bar stays at its start (it counts inserted
    # frames) while the reads report, so Slicer's events run and a cancel is seen.
    reading = None if progress is None else (lambda _done, _total: progress(0, 1))
    try:
        sequence = mrml.browser_to_sequence(browser_node, progress=reading, cancel=cancel)
    except SequenceError as exc:
        raise SequenceError(f"cannot reconstruct from browser {name!r}: {exc}") from exc
    fixed = dict(plus_config.coordinate_definitions.repository_fixed()) if plus_config is not None else {}
    if image_to_probe_node is not None:
        fixed["ImageToProbe"] = image_to_probe_from_node(image_to_probe_node)
        sequence = _without_image_geometry(sequence)
    try:
        placement = mrml.image_placement(browser_node)
        if placement is not None:
            sequence, opts = _in_world(
                sequence, placement, fixed, opts, name=name, image_to_probe_node=image_to_probe_node
            )
        if cancel is None:
            result = reconstruct_volume(sequence, fixed or None, opts, progress=progress)
        else:  # on a worker thread: this one passes its progress on (Slicer's events run) and checks
            relay = jobs.ProgressRelay(progress, cancel)
            result = jobs.run_in_thread(
                lambda: reconstruct_volume(sequence, fixed or None, opts, progress=relay.report),
                cancel=cancel, heartbeat=relay.beat,
            )
    except TransformError as exc:
        raise TransformError(
            f"browser {name!r}: {exc} In Slicer: select the ImageToProbe calibration transform, or set "
            f"image_to_reference_transform (transforms in the recording: "
            f"{', '.join(sequence.transform_names) or 'none'})."
        ) from exc
    write_result_to_nodes(
        result,
        output_volume_node,
        coverage_volume_node,
        source_node=browser_node,
        mode="batch",
        image_to_probe_node=image_to_probe_node,
        roi_node=roi_node,
    )
    logger.info("reconstructed %s into %s: %s", name, output_volume_node.GetName(), result)
    return result


# --------------------------------------------------------------------------------------------
# Live: an image node updated by SlicerOpenIGTLink -> volume node
# --------------------------------------------------------------------------------------------


class LiveReconstruction:
    """Reconstruct a volume from a live image node, frame by frame, refreshing an output node.

    Typical use (the module's Logic does this)::

        live = LiveReconstruction(outputNode, update_interval_s=2.0, output_spacing_mm=0.5)
        live.observe(slicer.util.getNode("Image_Reference"))
        ...                       # frames arrive; the output node refreshes every 2 s
        result = live.stop()      # last frames inserted, hole filling, final output

    Which events are frames
    -----------------------
    SlicerOpenIGTLink updates an image node by writing the new pixels into its image data
    (``ImageDataModifiedEvent``, still with the *previous* IJKToRAS), then setting IJKToRAS
    and calling ``Modified()`` (``ModifiedEvent``). A frame is therefore captured on
    ``ModifiedEvent`` (and on direct calls of :meth:`on_image_modified` without an event),
    and only when the pixels are new (the image data's modification time or object changed):
    geometry-only or display changes are ignored. ``ImageDataModifiedEvent`` only marks the
    pixels as pending; if new pixels arrive again before any ``ModifiedEvent`` the earlier
    ones were overwritten unseen and are counted in ``frames_missed``. A producer that never
    calls ``Modified()`` after writing pixels should use ``capture_on_image_data=True``.

    Timing
    ------
    Frames are queued (:meth:`IncrementalReconstructor.submit`) with their arrival time and
    inserted in batches every ``process_interval_s`` or ``batch_frames`` frames; the output
    node is refreshed by :meth:`update_output`, which the frame callback also calls whenever
    ``update_interval_s`` has passed since the last refresh (so, with no timer at all, the
    output follows the stream while frames arrive; a caller's timer refreshes it when the
    stream pauses). Frames queued more than ``max_lag_s`` behind the newest, or beyond
    ``max_pending_frames``, are dropped and counted (``dropped_behind``).

    Parameters
    ----------
    output_volume_node : vtkMRMLScalarVolumeNode, optional
        Refreshed by :meth:`update_output` (default: a new node ``<image>Reconstruction`` made
        on the first refresh, in the image node's scene).
    options : ReconstructionOptions, optional
    roi_node : vtkMRMLMarkupsROINode, optional
        A fixed box (read once, here). Default: a grid that grows with the sweep (unless
        ``options`` have an ``output_extent``).
    coverage_volume_node : vtkMRMLScalarVolumeNode, optional
        Refreshed with the coverage map.
    update_interval_s : float
        Seconds between output refreshes triggered by frames (> 0).
    process_interval_s : float
        Seconds between insertions of the queued frames.
    batch_frames : int
        Insert as soon as this many frames are queued.
    max_pending_frames : int
    max_lag_s : float
        As in :class:`~FreehandUSLib.reconstruction.IncrementalReconstructor`.
    fill_holes_on_update : bool
        Fill holes on every refresh (default: only in the final output of :meth:`stop`).
    capture_on_image_data : bool
        Capture frames on ``ImageDataModifiedEvent`` too (see above).
    clock : callable() -> float
        Seconds (default ``time.monotonic``); tests pass a fake clock.
    **overrides
        Option fields (see :func:`build_options`).
    """

    def __init__(
        self,
        output_volume_node=None,
        *,
        options: ReconstructionOptions | None = None,
        roi_node=None,
        coverage_volume_node=None,
        update_interval_s: float = 2.0,
        process_interval_s: float = 0.2,
        batch_frames: int = 16,
        max_pending_frames: int = 256,
        max_lag_s: float = 3.0,
        fill_holes_on_update: bool = False,
        capture_on_image_data: bool = False,
        clock=time.monotonic,
        **overrides,
    ):
        if not float(update_interval_s) > 0:
            raise InvalidOptionError(f"update_interval_s: expected > 0 s, got {update_interval_s}")
        if not float(process_interval_s) >= 0:
            raise InvalidOptionError(f"process_interval_s: expected >= 0 s, got {process_interval_s}")
        if int(batch_frames) < 1:
            raise InvalidOptionError(f"batch_frames: expected >= 1, got {batch_frames}")
        if output_volume_node is not None:
            _check_volume_node(output_volume_node, "output volume")
        if coverage_volume_node is not None:
            _check_volume_node(coverage_volume_node, "coverage volume")
            if output_volume_node is not None and coverage_volume_node.GetID() == output_volume_node.GetID():
                raise ReconstructionError("the coverage volume must be another node than the output volume")
        opts = build_options(options, **overrides)
        if roi_node is not None:
            opts = roi_node_options(roi_node, opts)
        self.options = opts.replace(output_weight=True)
        self.output_volume_node = output_volume_node
        self.coverage_volume_node = coverage_volume_node
        self.roi_node = roi_node
        self.update_interval_s = float(update_interval_s)
        self.process_interval_s = float(process_interval_s)
        self.batch_frames = int(batch_frames)
        self.max_pending_frames = int(max_pending_frames)
        self.max_lag_s = float(max_lag_s)
        self.fill_holes_on_update = bool(fill_holes_on_update)
        self.capture_on_image_data = bool(capture_on_image_data)
        self._clock = clock
        self.reconstructor: IncrementalReconstructor | None = None
        self.image_node = None
        self._observations: list = []
        self._last_pixels = None
        self._pixels_pending = False
        now = clock()
        self._last_process = now
        self._last_update = now
        self.events = 0
        self.events_ignored = 0
        self.frames_captured = 0
        self.frames_missed = 0
        self.frames_rejected = 0
        self.updates = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_result: ReconstructionResult | None = None

    # -- observation -------------------------------------------------------------------------
    def observe(self, image_node) -> LiveReconstruction:
        """Start observing ``image_node`` (ModifiedEvent and ImageDataModifiedEvent)."""
        if image_node is None or not image_node.IsA("vtkMRMLVolumeNode"):
            got = "None" if image_node is None else image_node.GetClassName()
            raise ReconstructionError(f"live image: expected a vtkMRMLVolumeNode (e.g. Image_Reference), got {got}")
        for node in (self.output_volume_node, self.coverage_volume_node):
            if node is not None and node.GetID() == image_node.GetID():
                raise ReconstructionError(
                    f"live image {image_node.GetName()!r} is also the output/coverage volume; select another node"
                )
        self.unobserve()
        self.image_node = image_node
        self._observations = [
            image_node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_modified_event),
            image_node.AddObserver(image_node.ImageDataModifiedEvent, self._on_image_data_event),
        ]
        logger.info("live reconstruction: observing %s", image_node.GetName())
        return self

    def unobserve(self) -> None:
        """Stop observing (frames already received stay in the volume)."""
        if self.image_node is not None:
            for tag in self._observations:
                self.image_node.RemoveObserver(tag)
        self._observations = []

    @property
    def observing(self) -> bool:
        return bool(self._observations)

    def _on_modified_event(self, caller, event) -> None:
        self._guarded(caller, "ModifiedEvent")

    def _on_image_data_event(self, caller, event) -> None:
        self._guarded(caller, "ImageDataModifiedEvent")

    def _guarded(self, node, event: str) -> None:
        """Event callback: never lets an exception escape into VTK (counted and logged)."""
        try:
            self.on_image_modified(node, event)
        except FreehandUSError as exc:
            self.errors += 1
            self.last_error = str(exc)
            logger.warning("live reconstruction: %s", exc)

    # -- frames ------------------------------------------------------------------------------
    def on_image_modified(self, volume_node, event: str | None = None) -> bool:
        """Handle an update of the live image node; True when a new frame was captured.

        Parameters
        ----------
        volume_node : vtkMRMLVolumeNode
        event : {"ModifiedEvent", "ImageDataModifiedEvent", None}
            ``None`` (a direct call) and ``"ModifiedEvent"`` capture the frame if its pixels
            are new; ``"ImageDataModifiedEvent"`` marks the pixels pending (see the class
            docstring).
        """
        self.events += 1
        if event == "ImageDataModifiedEvent" and not self.capture_on_image_data:
            if self._pixels_key(volume_node) != self._last_pixels:
                if self._pixels_pending:
                    self.frames_missed += 1  # overwritten before any ModifiedEvent showed them
                self._pixels_pending = True
            return False
        key = self._pixels_key(volume_node)
        if key is None or key == self._last_pixels:
            self.events_ignored += 1
            return False
        self._last_pixels = key
        self._pixels_pending = False
        try:
            frame, matrix, image_ok = frame_from_volume_node(volume_node)
        except FreehandUSError:
            self.frames_rejected += 1
            raise
        now = self._clock()
        recon = self._reconstructor_for(frame, volume_node)
        if recon is None:
            return False
        recon.submit(frame, matrix, timestamp_s=now, image_ok=image_ok)
        self.frames_captured += 1
        if recon.pending >= self.batch_frames or now - self._last_process >= self.process_interval_s:
            self.process_pending()
        if now - self._last_update >= self.update_interval_s:
            self.update_output()
        return True

    @staticmethod
    def _pixels_key(volume_node):
        image = volume_node.GetImageData() if volume_node is not None else None
        if image is None:
            return None
        return (image.GetAddressAsString("vtkImageData"), image.GetMTime())

    def _reconstructor_for(self, frame: np.ndarray, volume_node) -> IncrementalReconstructor | None:
        recon = self.reconstructor
        if recon is None:
            recon = IncrementalReconstructor(
                self.options,
                image_shape=frame.shape[:2],
                dtype=frame.dtype,
                max_pending_frames=self.max_pending_frames,
                max_lag_s=self.max_lag_s,
            )
            self.reconstructor = recon
            return recon
        if frame.shape[:2] != recon.image_shape:
            self.frames_rejected += 1
            raise ReconstructionError(
                f"live image {volume_node.GetName()!r}: frame is {frame.shape[1]}x{frame.shape[0]} pixels, "
                f"the reconstruction started with {recon.image_shape[1]}x{recon.image_shape[0]}; "
                "stop and restart the live reconstruction after changing the imaging depth or size"
            )
        return recon

    def process_pending(self) -> int:
        """Insert the queued frames now; returns how many went into the volume."""
        self._last_process = self._clock()
        if self.reconstructor is None:
            return 0
        return self.reconstructor.process_pending()

    # -- output ------------------------------------------------------------------------------
    def update_output(self, output_volume_node=None, *, fill_holes: bool | None = None) -> ReconstructionResult | None:
        """Insert the queued frames and write the volume so far into the output node(s).

        Parameters
        ----------
        output_volume_node : vtkMRMLScalarVolumeNode, optional
            Replaces the output node given at construction.
        fill_holes : bool, optional
            Default: ``fill_holes_on_update`` (hole filling is slow for live previews).

        Returns
        -------
        ReconstructionResult or None
            None while no frame has gone into the volume yet.
        """
        if output_volume_node is not None:
            _check_volume_node(output_volume_node, "output volume")
            self.output_volume_node = output_volume_node
        self.process_pending()
        self._last_update = self._clock()
        recon = self.reconstructor
        if recon is None or recon.frames_used == 0:
            return None
        do_fill = self.fill_holes_on_update if fill_holes is None else bool(fill_holes)
        result = recon.result(fill_holes=do_fill)
        if self.output_volume_node is None:
            source = self.image_node
            scene = None if source is None else source.GetScene()
            base = "Live" if source is None else source.GetName()
            self.output_volume_node = _new_output_node(scene, f"{base}Reconstruction", "live output volume")
        write_result_to_nodes(
            result,
            self.output_volume_node,
            self.coverage_volume_node,
            source_node=self.image_node,
            mode="live",
            roi_node=self.roi_node,
        )
        self.updates += 1
        self.last_result = result
        return result

    def stop(self, *, fill_holes: bool | None = None) -> ReconstructionResult | None:
        """Stop observing, insert the last frames and write the final volume.

        Parameters
        ----------
        fill_holes : bool, optional
            Default: ``options.fill_holes``.
        """
        self.unobserve()
        result = None
        try:
            if self.reconstructor is not None:
                fill = self.options.fill_holes if fill_holes is None else bool(fill_holes)
                result = self.update_output(fill_holes=fill)
        finally:
            if self.reconstructor is not None:
                self.reconstructor.close()
        logger.info("live reconstruction stopped: %s", json.dumps(self.status()))
        return result

    def status(self) -> dict:
        """Counters so far (JSON-safe).

        Keys: ``observing``, ``image_node``, ``events``, ``events_ignored`` (no new pixels),
        ``frames_captured``, ``frames_missed`` (pixels overwritten before a complete update),
        ``frames_rejected`` (unreadable or wrong-size frames), ``updates``, ``errors``,
        ``last_error``, ``seconds_since_update``, and the reconstructor's counters
        (``frames_received``, ``frames_used``, ``frames_skipped``,
        ``frames_skipped_by_reason``, ``frames_dropped``, ``frames_pending``,
        ``pixels_inserted``, ``insertion_seconds``, ``grid``), plus ``coverage_fraction`` of
        the last output.
        """
        info = {
            "observing": self.observing,
            "image_node": None if self.image_node is None else self.image_node.GetName(),
            "events": self.events,
            "events_ignored": self.events_ignored,
            "frames_captured": self.frames_captured,
            "frames_missed": self.frames_missed,
            "frames_rejected": self.frames_rejected,
            "updates": self.updates,
            "errors": self.errors,
            "last_error": self.last_error,
            "seconds_since_update": self._clock() - self._last_update,
            "coverage_fraction": None if self.last_result is None else self.last_result.coverage_fraction,
        }
        if self.reconstructor is not None:
            info.update(self.reconstructor.status())
        else:
            info.update({"frames_received": 0, "frames_used": 0, "frames_skipped": 0,
                         "frames_skipped_by_reason": {}, "frames_dropped": 0, "frames_pending": 0})  # fmt: skip
        return info

    def __str__(self) -> str:
        s = self.status()
        text = (
            f"live reconstruction of {s['image_node'] or '(no image)'}: {s['frames_used']} frames used of "
            f"{s['frames_captured']} captured"
        )
        extra = [f"{v} {k}" for k, v in sorted(s["frames_skipped_by_reason"].items())]
        if s["frames_missed"]:
            extra.append(f"{s['frames_missed']} missed")
        if s["frames_rejected"]:
            extra.append(f"{s['frames_rejected']} rejected")
        if extra:
            text += " (" + ", ".join(extra) + ")"
        if s["coverage_fraction"] is not None:
            text += f"; coverage {100 * s['coverage_fraction']:.1f} %"
        return text

"""MRML bridge: tracked sequences, volumes and transforms <-> 3D Slicer MRML nodes.

It works on the MRML classes of the scene it is given (3D Slicer's Python, or the ``slicer-core``
wheel for headless tests) through ``vtk`` and scene methods, without importing ``slicer``, and is
the only place that thinks about RAS/LPS. ``import FreehandUSLib`` does not import it; import it explicitly
(``from FreehandUSLib import mrml``).

Coordinate convention (what PLUS and SlicerOpenIGTLink do)
----------------------------------------------------------
PlusServer sends each image as an OpenIGTLink IMAGE message named ``Image_Reference`` whose
matrix is ImageToReference (pixels -> mm), and SlicerOpenIGTLink uses that matrix directly as
the image node's IJKToRAS. PLUS coordinates are millimetres with no anatomical meaning, so the
**Reference frame is taken as Slicer's RAS, with no LPS flip**:

- a tracked frame becomes a single-slice volume whose IJK is ``(i = column, j = row, k = 0)`` of
  the MF image and whose **IJKToRAS = ImageToReference** (mm; includes the pixel spacing). The
  proxy volume then lands where PLUS would put the image, with no parent transform;
- a :class:`~FreehandUSLib.volume.Volume` becomes a volume node with
  **IJKToRAS = Volume.ijk_to_world** (spacing, origin and direction columns copied as they are:
  the volume's world frame, usually Reference, is RAS);
- a 4x4 transform ``AToB`` becomes a linear transform node whose matrix *to parent* is the
  matrix itself (applied to column vectors, mm).

Nodes made by :func:`sequence_to_browser`
-----------------------------------------
Named the way Slicer names a recording it loads from a file (Slicer's sequence storage nodes,
SlicerIGSIO), ``<base>-<Source>-Seq`` with the PLUS name in the ``Sequences.Source``
attribute, where ``<base>`` is the recording's name (the browser's name, made unique):

- a ``vtkMRMLSequenceNode`` ``<base>-Image_Reference-Seq`` (source ``f"{image_name}_{reference_frame}"``,
  the PLUS/SlicerOpenIGTLink device name) holding one ``vtkMRMLScalarVolumeNode`` per frame
  (``vtkMRMLVectorVolumeNode`` for multi-channel frames), index = timestamps (name ``time``,
  unit ``s``, numeric, written with ``repr`` so that they read back exactly);
- one ``vtkMRMLSequenceNode`` of ``vtkMRMLLinearTransformNode`` per per-frame transform of the
  sequence (``<base>-ProbeToTracker-Seq``, ...), an item at each frame whose transform is valid;
- a ``vtkMRMLSequenceBrowserNode`` ``<base>`` with the image sequence as master and the
  transform sequences synchronised, and one proxy node per sequence named ``<base>-<Source>``.
  No node is named like a live device (``Image_Reference``, ``ProbeToTracker``): connecting
  SlicerOpenIGTLink to a PlusServer later makes its own nodes and never writes into a
  loaded recording.

Invalid data (the way PLUS and Slicer's sequence metafile writer mark it)
--------------------------------------------------------------------------
An invalid per-frame transform (PLUS ``<Name>TransformStatus = INVALID``) is a **missing item**
at that frame's time in the transform sequence. Slicer's sequence metafile writer writes such a
gap as ``TransformStatus = INVALID`` when it writes transforms along an image sequence and
leaves the frame out of a transform sequence written alone (File > Save: ``.seq.mha``); either
way it comes back as a gap, which a per-item attribute would not (the metafile has no place for
it), and the browser shows the previous valid pose there. An image frame keeps its pixels;
when its ImageToReference cannot be formed it holds the last valid geometry (the first valid
one before any, pixel spacing only if there is none) and carries
``FreehandUS.TransformValid = "false"`` (Slicer's volume sequence writers, ``.seq.nrrd`` and
``.seq.mrb``, keep it). Provenance is recorded as node attributes (see the ``ATTR_*``
constants), which :func:`browser_to_sequence` reads back. When ImageToReference cannot be
resolved at all (no ImageToProbe, no chain to the reference frame), the image source is
``image_name`` and IJKToRAS holds the pixel spacing only (``FreehandUS.ImageGeometry = "pixels"``).

Reading recordings that Slicer made
-----------------------------------
:func:`browser_to_sequence` recognises a transform sequence by, in order, ``FreehandUS.TransformName``,
``Sequences.Source`` (Slicer's sequence readers, SlicerIGSIO), then the ``-``-separated parts
of the sequence name (``<base>-<Name>-Seq`` from the readers, ``<proxy>-Sequence`` from the
Sequences recorder, in any language) and of its proxy's name (a SlicerOpenIGTLink device name).
Transform items are matched to image frames by index value; Slicer's metafile reader rounds
times to 1 ms, so a transform sequence whose times are the image times rounded to 1 ms is
matched frame by frame too (a frame without an item is invalid); a sequence recorded on its
own clock (the Sequences recorder) is interpolated at the image times. That reader keeps the
matrix of a frame PLUS marked ``TransformStatus = INVALID`` and drops the status: when a
transform sequence was read from a PLUS file by ``vtkMRMLLinearTransformSequenceStorageNode``,
the status is read back from that file, and the index values of its INVALID frames are kept
on the sequence node (``FreehandUS.InvalidItems``, a scene attribute): Slicer's ``.seq.mha``
writer, at File > Save, writes those frames with ``TransformStatus = OK``, and the attribute
keeps them invalid once the scene is opened again. The status is read
(:func:`mark_plus_invalid_items`) the first time :func:`browser_to_sequence` reads the
sequence and, in 3D Slicer, as soon as Slicer's reader has read the file: the Freehand US
module installs a :class:`~FreehandUSLib.plus_status_observer.PlusStatusObserver` on the scene
at start-up, so a scene saved before any module looked at the recording keeps them too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import vtk
    from vtk.util import numpy_support
except ImportError as exc:  # pragma: no cover - exercised only without Slicer/slicer-core
    raise ImportError(
        "FreehandUSLib.mrml needs 3D Slicer's Python or the slicer-core wheel "
        "(pip install slicer-core); the rest of FreehandUSLib works without it"
    ) from exc

from . import jobs
from .errors import FileFormatError, SequenceError, TransformError
from .sequence import TrackedSequence
from .transforms import check_matrix, interpolate_transforms, split_transform_name
from .volume import Volume

__all__ = [
    "grey_frame_of_image_node",
    "tree_start_frame",
    "sequence_to_browser",
    "browser_to_sequence",
    "load_sequence_file",
    "save_browser_sequence",
    "image_placement",
    "ImagePlacement",
    "volume_to_node",
    "node_to_volume",
    "matrix_to_vtk",
    "vtk_to_matrix",
    "transform_to_node",
    "save_scene",
    "ATTR_ROLE",
    "ATTR_TRANSFORM_NAME",
    "ATTR_TRANSFORM_VALID",
    "ATTR_IMAGE_STATUS",
    "ATTR_IMAGE_GEOMETRY",
    "ATTR_PIXEL_SPACING",
    "ATTR_FIELD_PREFIX",
    "ATTR_METADATA_PREFIX",
    "ATTR_SEQUENCES_SOURCE",
    "ATTR_INVALID_ITEMS",
    "mark_plus_invalid_items",
]

logger = logging.getLogger(__name__)

#: On sequence nodes: ``"Image"`` (the volume sequence) or ``"Transform"``.
ATTR_ROLE = "FreehandUS.Role"
#: On transform sequence nodes: the PLUS transform name (``"ProbeToTracker"``).
ATTR_TRANSFORM_NAME = "FreehandUS.TransformName"
#: On each frame's data node: ``"true"``/``"false"``; for image frames it is the validity of
#: the geometry (ImageToReference), for transform frames the validity of the matrix.
ATTR_TRANSFORM_VALID = "FreehandUS.TransformValid"
#: On each image frame: ``"OK"`` or ``"INVALID"`` (PLUS ``ImageStatus``).
ATTR_IMAGE_STATUS = "FreehandUS.ImageStatus"
#: On the image sequence: the transform that IJKToRAS holds (``"ImageToReference"``) or
#: ``"pixels"`` when it holds the pixel spacing only.
ATTR_IMAGE_GEOMETRY = "FreehandUS.ImageGeometry"
#: On the image sequence: ``"sx sy"`` (TrackedSequence.pixel_spacing_mm), when known.
ATTR_PIXEL_SPACING = "FreehandUS.PixelSpacing"
#: Prefix of per-frame text fields on image frames (``FreehandUS.Field.ProbePosition``).
ATTR_FIELD_PREFIX = "FreehandUS.Field."
#: Prefix of metadata attributes on the image sequence / volume node.
ATTR_METADATA_PREFIX = "FreehandUS.Metadata."
#: On a transform sequence read from a PLUS file by Slicer's reader: the index values (space
#: separated) of the items PLUS marked ``TransformStatus = INVALID``, which that reader drops and
#: Slicer's ``.seq.mha`` writer writes as ``OK``; kept in the scene file.
ATTR_INVALID_ITEMS = "FreehandUS.InvalidItems"
#: Slicer's own attribute (sequence readers, SlicerIGSIO, ``.seq.mha`` writer): the PLUS name of
#: what a sequence holds (``"ProbeToTracker"``, ``"Image"``).
ATTR_SEQUENCES_SOURCE = "Sequences.Source"

_PIXEL_GEOMETRY = "pixels"
_BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
#: Timestamps closer than this (s) would be merged by the sequence node.
_INDEX_TOLERANCE_S = 1e-9
_VTK_TO_NUMPY_OK = (np.uint8, np.float32)
#: Slicer's sequence metafile reader keeps 3 decimals of each time (s); a transform time this
#: close to an image time is that image's time rounded.
_ROUNDED_INDEX_TOLERANCE_S = 0.5e-3 + 1e-9
#: Frames (or transform items) between two progress reports (and cancel checks): well under
#: 0.1 s of copying even for large frames.
_REPORT_EVERY = 16


# -- matrices -------------------------------------------------------------------------------
def matrix_to_vtk(m) -> vtk.vtkMatrix4x4:
    """A ``vtkMatrix4x4`` holding ``m``.

    Parameters
    ----------
    m : (4, 4) array_like of float, finite

    Returns
    -------
    vtkMatrix4x4
        A new matrix (no memory shared with ``m``).

    Raises
    ------
    TransformError
        If ``m`` is not 4x4 or holds NaN/inf.
    """
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (4, 4):
        raise TransformError(f"matrix_to_vtk: expected a 4x4 matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise TransformError("matrix_to_vtk: matrix holds NaN or infinite values")
    out = vtk.vtkMatrix4x4()
    out.DeepCopy(a.ravel().tolist())
    return out


def vtk_to_matrix(vtkmat) -> np.ndarray:
    """The elements of a ``vtkMatrix4x4`` as a ``(4, 4)`` float64 array (a copy)."""
    if not isinstance(vtkmat, vtk.vtkMatrix4x4):
        raise TypeError(f"vtk_to_matrix: expected a vtkMatrix4x4, got {type(vtkmat).__name__}")
    return np.array([[vtkmat.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def transform_to_node(scene, matrix, *, name: str):
    """Add a ``vtkMRMLLinearTransformNode`` named ``name`` whose matrix to parent is ``matrix``.

    Parameters
    ----------
    scene : vtkMRMLScene
    matrix : (4, 4) array_like, finite and invertible (may include scaling, e.g. ImageToProbe
        with the pixel spacing), mm
    name : str
        Node name, e.g. ``"ImageToProbe"``; PLUS-style ``<From>To<To>`` names are also stored
        in the ``FreehandUS.TransformName`` attribute.

    Returns
    -------
    vtkMRMLLinearTransformNode
    """
    if not name:
        raise ValueError("transform_to_node: name must be a non-empty string")
    m = check_matrix(matrix, name=name)
    if m.shape != (4, 4):
        raise TransformError(f"{name}: expected one 4x4 matrix, got shape {m.shape}")
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(matrix_to_vtk(m))
    if _parses_as_transform(name):
        node.SetAttribute(ATTR_TRANSFORM_NAME, name)
    return node


# -- volumes --------------------------------------------------------------------------------
def volume_to_node(scene, volume: Volume, *, name: str):
    """Add a volume node holding ``volume`` (Reference mm taken as RAS, see module docstring).

    Parameters
    ----------
    scene : vtkMRMLScene
    volume : Volume
        ``voxels`` ``(n_k, n_j, n_i)`` -> ``vtkMRMLScalarVolumeNode``;
        ``(n_k, n_j, n_i, n_channels)`` -> ``vtkMRMLVectorVolumeNode``. Boolean voxels are
        stored as uint8.
    name : str
        Node name.

    Returns
    -------
    vtkMRMLScalarVolumeNode or vtkMRMLVectorVolumeNode
        With ``IJKToRAS = volume.ijk_to_world`` (spacing, origin, directions set separately,
        so they read back exactly) and ``volume.metadata`` as ``FreehandUS.Metadata.*``
        attributes, plus default display nodes.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume_to_node: expected a Volume, got {type(volume).__name__}")
    if not name:
        raise ValueError("volume_to_node: name must be a non-empty string")
    voxels = volume.voxels
    if voxels.dtype == bool:
        voxels = voxels.astype(np.uint8)
    vector = voxels.ndim == 4
    cls = "vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    node.SetAndObserveImageData(_image_data(voxels))
    node.SetSpacing(*volume.spacing_mm)
    node.SetOrigin(*volume.origin_mm)
    node.SetIJKToRASDirections(volume.directions.tolist())
    for key, value in volume.metadata.items():
        node.SetAttribute(ATTR_METADATA_PREFIX + str(key), str(value))
    node.CreateDefaultDisplayNodes()
    return node


def node_to_volume(node) -> Volume:
    """A :class:`~FreehandUSLib.volume.Volume` (a copy) from a scalar or vector volume node.

    The geometry is the node's own IJKToRAS (RAS taken as the Reference frame, mm); a parent
    transform of the node is not applied (a warning is logged).

    Raises
    ------
    TypeError
        If ``node`` is not a volume node.
    FileFormatError
        If the node holds no image data.
    """
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        got = "None" if node is None else node.GetClassName()
        raise TypeError(f"node_to_volume: expected a vtkMRMLVolumeNode, got {got}")
    if node.GetParentTransformNode() is not None:
        logger.warning(
            "node_to_volume: %s has a parent transform %s; it is not applied",
            node.GetName(),
            node.GetParentTransformNode().GetName(),
        )
    voxels = _array_from_image(node.GetImageData(), what=f"volume node {node.GetName()!r}")
    directions = [[0.0] * 3 for _ in range(3)]
    node.GetIJKToRASDirections(directions)
    metadata = {
        key[len(ATTR_METADATA_PREFIX) :]: node.GetAttribute(key)
        for key in node.GetAttributeNames()
        if key.startswith(ATTR_METADATA_PREFIX)
    }
    return Volume(
        voxels=voxels.copy(),
        spacing_mm=node.GetSpacing(),
        origin_mm=node.GetOrigin(),
        directions=np.array(directions, dtype=np.float64),
        metadata=metadata,
    )


# -- tracked sequences ----------------------------------------------------------------------
def sequence_to_browser(
    scene,
    sequence: TrackedSequence,
    *,
    image_to_probe=None,
    fixed=None,
    image_name: str = "Image",
    reference_frame: str = "Reference",
    browser_name: str | None = None,
    progress=None,
    cancel=None,
):
    """Put a tracked sequence into the scene as sequences + a browser, like a PLUS recording.

    Parameters
    ----------
    scene : vtkMRMLScene
        A scene on which the Sequences module logic is set (always so in Slicer; headless,
        ``vtkSlicerSequencesLogic().SetMRMLScene(scene)`` registers the sequence classes).
    sequence : TrackedSequence
        Frames ``(n, rows, cols[, channels])`` uint8/float32 in MF; timestamps must increase.
    image_to_probe : (4, 4) array_like, optional
        Calibration (pixels -> Probe mm), added to the fixed transforms.
    fixed : mapping name -> (4, 4), optional
        Other fixed transforms (e.g. ``{"ImageToProbe": ...}`` or ``{"PhantomToReference": ...}``).
    image_name : str
        First part of the image sequence name (PLUS device name), default ``"Image"``.
    reference_frame : str
        Frame the image is placed in; IJKToRAS of each frame is ``ImageTo<reference_frame>``.
    browser_name : str, optional
        The recording's name (e.g. the file name without extensions), default ``"Recording"``;
        made unique in the scene. It names the browser and is the ``<base>`` of the sequence
        (``<base>-<Source>-Seq``) and proxy (``<base>-<Source>``) names.
    progress : callable(done, total), optional
        Called every few frames (frames and transform items copied into the sequences).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked at every report: raises :class:`~FreehandUSLib.jobs.Cancelled` within a
        fraction of a second of a cancel. Whenever this function raises (cancelled or an
        error), the nodes it added are removed again: the scene is left as it was.

    Returns
    -------
    vtkMRMLSequenceBrowserNode
        Master: the image sequence (``<base>-Image_Reference-Seq``); synchronised: one transform
        sequence per per-frame transform that is valid on at least one frame (an item per valid
        frame); proxies created, first item selected.

    Raises
    ------
    SequenceError
        Empty sequence, or timestamps that are not finite and strictly increasing.
    TransformError
        ``image_to_probe``/``fixed`` given (or invalid) but ``ImageTo<reference_frame>`` still
        cannot be resolved from them and the sequence's transforms.
    ValueError
        The scene has no Sequences logic, or a name is empty/invalid.
    """
    if not isinstance(sequence, TrackedSequence):
        raise TypeError(f"sequence_to_browser: expected a TrackedSequence, got {type(sequence).__name__}")
    _require_sequences(scene)
    if not image_name or not re.fullmatch(r"[A-Za-z0-9]+", image_name):
        raise ValueError(f"sequence_to_browser: image_name must be letters/digits, got {image_name!r}")
    n = sequence.n_frames
    if n == 0:
        raise SequenceError("sequence_to_browser: the sequence has no frames")
    ts = sequence.timestamps_s
    if not np.all(np.isfinite(ts)):
        bad = np.flatnonzero(~np.isfinite(ts))
        raise SequenceError(f"sequence_to_browser: timestamps of frames {bad.tolist()} are not finite")
    steps = np.diff(ts)
    if np.any(steps <= _INDEX_TOLERANCE_S):
        bad = int(np.flatnonzero(steps <= _INDEX_TOLERANCE_S)[0]) + 1
        raise SequenceError(
            f"sequence_to_browser: timestamps must strictly increase (a Slicer sequence is indexed "
            f"by time); frame {bad} has {ts[bad]!r} s after {ts[bad - 1]!r} s. Drop or re-time "
            f"such frames first (TrackedSequence.select)"
        )

    geometry_name, image_to_ref, geom_valid = _image_geometry(
        sequence, image_to_probe=image_to_probe, fixed=fixed, reference_frame=reference_frame
    )
    report = _reporter(progress, cancel)
    with jobs.scene_rollback(scene):
        return _make_browser(
            scene, sequence, geometry_name, image_to_ref, geom_valid, image_name=image_name,
            reference_frame=reference_frame, browser_name=browser_name, report=report,
        )  # fmt: skip


def _make_browser(scene, sequence, geometry_name, image_to_ref, geom_valid, *, image_name, reference_frame,
                  browser_name, report):
    """The nodes of :func:`sequence_to_browser` (inputs checked), reporting to ``report``."""
    n = sequence.n_frames
    ts = sequence.timestamps_s
    index_values = [repr(float(t)) for t in ts]
    image_source = f"{image_name}_{reference_frame}" if geometry_name != _PIXEL_GEOMETRY else image_name
    base = _recording_base_name(scene, browser_name)

    image_seq = _new_sequence(scene, base, image_source, role="Image")
    image_seq.SetAttribute(ATTR_IMAGE_GEOMETRY, geometry_name)
    if sequence.pixel_spacing_mm is not None:
        image_seq.SetAttribute(ATTR_PIXEL_SPACING, " ".join(repr(v) for v in sequence.pixel_spacing_mm))
    for key, value in sequence.metadata.items():
        image_seq.SetAttribute(ATTR_METADATA_PREFIX + str(key), str(value))
    frames = sequence.frames
    if frames.ndim == 4 and frames.shape[3] == 1:
        frames = frames[..., 0]  # one channel: a scalar volume (reads back as (n, rows, cols))
    vector = frames.ndim == 4
    frame_node = _scratch_node(scene, "vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode")
    frame_node.SetName(f"{base}-{image_source}")
    good_items = {
        name: np.flatnonzero(ft.valid & np.all(np.isfinite(ft.matrices), axis=(1, 2)))
        for name, ft in sequence.transforms.items()
    }
    total = n + sum(g.size for g in good_items.values())
    done = 0
    for i in range(n):
        if report is not None and i % _REPORT_EVERY == 0:
            report(done, total)
        done += 1
        # No copy here: SetDataNodeAtValue deep-copies the node while `frames` is alive.
        frame_node.SetAndObserveImageData(_image_data(frames[i][np.newaxis], deep=False))
        frame_node.SetIJKToRASMatrix(matrix_to_vtk(image_to_ref[i]))
        frame_node.SetAttribute(ATTR_TRANSFORM_VALID, _bool_text(geom_valid[i]))
        frame_node.SetAttribute(ATTR_IMAGE_STATUS, "OK" if sequence.image_ok[i] else "INVALID")
        for key, values in sequence.frame_fields.items():
            frame_node.SetAttribute(ATTR_FIELD_PREFIX + key, str(values[i]))
        image_seq.SetDataNodeAtValue(frame_node, index_values[i])

    transform_seqs = []
    for name, ft in sequence.transforms.items():
        good = good_items[name]
        if good.size == 0:
            logger.warning("sequence_to_browser: %s is invalid on every frame; no sequence made for it", name)
            continue
        tseq = _new_sequence(scene, base, name, role="Transform")
        tseq.SetAttribute(ATTR_TRANSFORM_NAME, name)
        tnode = _scratch_node(scene, "vtkMRMLLinearTransformNode")
        tnode.SetName(f"{base}-{name}")
        for k, i in enumerate(good):  # an invalid frame has no item (PLUS/Slicer: TransformStatus = INVALID)
            if report is not None and k % _REPORT_EVERY == 0:
                report(done, total)
            done += 1
            tnode.SetMatrixTransformToParent(matrix_to_vtk(ft.matrices[i]))
            tseq.SetDataNodeAtValue(tnode, index_values[i])
        transform_seqs.append(tseq)

    browser = scene.AddNewNodeByClass(_BROWSER_CLASS, base)
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    for tseq in transform_seqs:
        browser.AddSynchronizedSequenceNodeID(tseq.GetID())
    browser.SetIndexDisplayFormat("%.3f")
    browser.SetSelectedItemNumber(0)
    for seq_node in [image_seq, *transform_seqs]:
        proxy_name = f"{base}-{seq_node.GetAttribute(ATTR_SEQUENCES_SOURCE)}"
        proxy = browser.GetProxyNode(seq_node)
        if proxy is None:
            _add_proxy(scene, browser, seq_node, name=proxy_name)
        else:
            proxy.SetName(proxy_name)
    logger.info(
        "sequence_to_browser: %d frames -> %s (geometry %s, %d transform sequences)",
        n,
        browser.GetName(),
        geometry_name,
        len(transform_seqs),
    )
    return browser


def browser_to_sequence(browser_node, *, progress=None, cancel=None) -> TrackedSequence:
    """Read a sequence browser back into a :class:`TrackedSequence`.

    Works on browsers made by :func:`sequence_to_browser` (exact round trip of frames,
    timestamps, valid transforms, image status, frame fields, metadata), on those saved and
    reloaded with Slicer's own storage nodes, and on recordings Slicer makes (its sequence
    readers, SlicerIGSIO, a SlicerOpenIGTLink stream recorded with the Sequences module); see
    "Reading recordings that Slicer made" in the module docstring.

    - frames: the image (volume) sequence, volume arrays ``[k=0, j, i]`` -> ``(n, rows, cols)``;
      dtypes other than uint8/float32 are converted to float32;
    - timestamps: the image sequence's index values (s);
    - transforms: every synchronised linear-transform sequence whose name is ``<From>To<To>``
      (``FreehandUS.TransformName``, ``Sequences.Source``, a part of the sequence or proxy
      name). Items at the image times (exactly, or rounded to 1 ms) are taken frame by frame and
      a frame with no item is invalid, as is an item with ``FreehandUS.TransformValid = "false"``
      or one that the PLUS file it was read from marks ``TransformStatus = INVALID``;
      sequences recorded at other times are interpolated at the image timestamps
      (:func:`~FreehandUSLib.transforms.interpolate_transforms`, no extrapolation);
    - ``ImageTo<Frame>`` from each frame's IJKToRAS (``<Frame>`` from the
      ``FreehandUS.ImageGeometry`` attribute, else from an ``<Image>_<Frame>`` source or
      sequence name part), unless a transform sequence of that name exists; invalid where the
      frame's ``FreehandUS.TransformValid`` says so.

    ``progress(done, total)`` is called every few frames and transform items (optional);
    ``cancel`` (a :class:`~FreehandUSLib.jobs.CancelToken`, optional) is checked at each
    report, so a long recording stops within a fraction of a second of a cancel. Reading
    changes nothing in the scene but the ``FreehandUS.InvalidItems`` record of
    :func:`mark_plus_invalid_items`.

    Raises
    ------
    TypeError
        If ``browser_node`` is not a sequence browser.
    SequenceError
        No volume sequence, no frames, frames of different shapes or 3D frames, or transform
        sequences that cannot be matched to the image items.
    Cancelled
        When ``cancel`` was cancelled.
    """
    if browser_node is None or not browser_node.IsA(_BROWSER_CLASS):
        got = "None" if browser_node is None else browser_node.GetClassName()
        raise TypeError(f"browser_to_sequence: expected a vtkMRMLSequenceBrowserNode, got {got}")
    bname = browser_node.GetName()
    sequences = _browser_sequences(browser_node)
    image_seq = _pick_image_sequence(browser_node, sequences)
    n = image_seq.GetNumberOfDataNodes()
    if n == 0:
        raise SequenceError(f"browser {bname!r}: image sequence {image_seq.GetName()!r} has no frames")

    index_values = [image_seq.GetNthIndexValue(i) for i in range(n)]
    timestamps = _index_to_seconds(image_seq, index_values)
    report = _reporter(progress, cancel)
    transform_seqs = [s for s in sequences if s is not image_seq]
    total = n + sum(s.GetNumberOfDataNodes() for s in transform_seqs)
    frames, ijk_to_ras, geom_valid, image_ok, fields = [], [], [], [], {}
    for i in range(n):
        if report is not None and i % _REPORT_EVERY == 0:
            report(i, total)
        node = image_seq.GetNthDataNode(i)
        what = f"browser {bname!r}, {image_seq.GetName()!r} item {i}"
        if node is None or not node.IsA("vtkMRMLVolumeNode"):
            raise SequenceError(f"{what}: not a volume node")
        arr = _array_from_image(node.GetImageData(), what=what)
        if arr.shape[0] != 1:
            raise SequenceError(f"{what}: expected a 2D frame (one slice), got {arr.shape[0]} slices")
        frames.append(arr[0])
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        ijk_to_ras.append(vtk_to_matrix(m))
        geom_valid.append(_text_bool(node.GetAttribute(ATTR_TRANSFORM_VALID), default=True))
        status = node.GetAttribute(ATTR_IMAGE_STATUS)
        image_ok.append(status is None or status.strip().upper() == "OK")
        for key in node.GetAttributeNames():
            if key.startswith(ATTR_FIELD_PREFIX):
                fields.setdefault(key[len(ATTR_FIELD_PREFIX) :], [""] * n)[i] = node.GetAttribute(key)
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise SequenceError(f"browser {bname!r}: frames have different shapes {sorted(shapes)}")
    dtypes = {f.dtype for f in frames}
    stack = np.stack(frames)
    if stack.dtype not in _VTK_TO_NUMPY_OK or len(dtypes) > 1:
        logger.warning("browser %r: frames of type %s converted to float32", bname, sorted(map(str, dtypes)))
        stack = stack.astype(np.float32)

    transforms = {}
    done = n
    for seq_node in transform_seqs:
        name = _transform_sequence_name(browser_node, seq_node)
        if name is not None:
            step = None if report is None else (lambda k, m, start=done: report(start + k, total))
            transforms[name] = _read_transform_sequence(
                seq_node, index_values, timestamps, what=f"browser {bname!r}", report=step
            )
        done += seq_node.GetNumberOfDataNodes()

    geometry = _geometry_name_of(image_seq)
    if geometry is not None and geometry not in transforms:
        transforms[geometry] = (np.stack(ijk_to_ras), np.array(geom_valid, dtype=bool))

    spacing = image_seq.GetAttribute(ATTR_PIXEL_SPACING)
    metadata = {
        key[len(ATTR_METADATA_PREFIX) :]: image_seq.GetAttribute(key)
        for key in image_seq.GetAttributeNames()
        if key.startswith(ATTR_METADATA_PREFIX)
    }
    return TrackedSequence(
        frames=stack,
        timestamps_s=timestamps,
        transforms=transforms,
        image_ok=np.array(image_ok, dtype=bool),
        pixel_spacing_mm=tuple(float(v) for v in spacing.split()) if spacing else None,
        frame_fields=fields,
        metadata=metadata,
    )


def load_sequence_file(
    scene,
    path,
    *,
    image_to_probe=None,
    browser_name: str | None = None,
    progress=None,
    cancel=None,
):
    """Read a tracked sequence file into the scene as a sequence browser (:func:`sequence_to_browser`).

    Parameters
    ----------
    scene : vtkMRMLScene
    path : str or Path
        ``.igs.mha``/``.igs.mhd`` (PLUS), ``.igs.nrrd``/``.seq.nrrd`` or ``.h5`` (TUS-REC);
        frames flipped to MF on read (:func:`FreehandUSLib.io.read_sequence`).
    image_to_probe, browser_name
        As for :func:`sequence_to_browser`.
    progress : callable(done, total), optional
        The whole load: reading the file is the first half (no steps of its own: the bar
        stays at its start while the file is read), making the nodes the second.
    cancel : FreehandUSLib.jobs.CancelToken, optional
        The file is then read on a worker thread while this thread checks the token and calls
        ``progress`` every 0.1 s; a cancel stops the load within a fraction of a second and no
        node stays in the scene.

    Returns
    -------
    vtkMRMLSequenceBrowserNode

    Raises
    ------
    FileFormatError, SequenceError, TransformError
        As :func:`~FreehandUSLib.io.read_sequence` and :func:`sequence_to_browser`.
    Cancelled
        When cancelled (nothing added to the scene).
    """
    from .io import read_sequence

    reading = jobs.step_progress(progress, 0.0, 0.5)
    if cancel is None:
        if reading is not None:
            reading(0, 1)
        sequence = read_sequence(path)
    else:
        relay = jobs.ProgressRelay(reading, cancel)
        sequence = jobs.run_in_thread(lambda: read_sequence(path), cancel=cancel, heartbeat=relay.beat)
    return sequence_to_browser(
        scene,
        sequence,
        image_to_probe=image_to_probe,
        browser_name=browser_name,
        progress=jobs.step_progress(progress, 0.5, 1.0),
        cancel=cancel,
    )


def save_browser_sequence(browser_node, path, *, progress=None, cancel=None) -> Path:
    """Write the recording held by a browser to a file; the format follows the file name.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode
        Read by :func:`browser_to_sequence`.
    path : str or Path
        ``.igs.mha``/``.igs.mhd``/``.seq.mha`` (PLUS metafile), ``.igs.nrrd``/``.seq.nrrd``
        or ``.h5`` (:func:`FreehandUSLib.io.write_sequence`).
    progress : callable(done, total), optional
        The whole save: reading the browser is the first half, writing the file the second
        (no steps of its own).
    cancel : FreehandUSLib.jobs.CancelToken, optional
        Checked while the browser is read; the file is then written on a worker thread into a
        private folder beside ``path`` and put in place only when not cancelled
        (:func:`~FreehandUSLib.jobs.write_cancellable`): a cancel leaves no new file and an
        existing ``path`` as it was.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    FileFormatError
        A file name whose format is not known (before anything is read), or a write error.
    Cancelled
        When cancelled (nothing written).
    """
    from .io import sequence_format, write_sequence

    sequence_format(path)  # an unknown extension fails before the browser is read
    sequence = browser_to_sequence(browser_node, progress=jobs.step_progress(progress, 0.0, 0.5), cancel=cancel)
    writing = jobs.step_progress(progress, 0.5, 1.0)
    if cancel is None:
        if writing is not None:
            writing(0, 1)
        return Path(write_sequence(sequence, path))
    relay = jobs.ProgressRelay(writing, cancel)
    return jobs.write_cancellable(lambda target: write_sequence(sequence, target), path, cancel=cancel,
                                  heartbeat=relay.beat)


@dataclass(frozen=True, eq=False)
class ImagePlacement:
    """Where Slicer shows each frame of a recording: its image proxy's transform tree, per frame.

    Attributes
    ----------
    parent_to_world : (n, 4, 4) float64
        The transforms above the image proxy composed up to world (RAS, mm), at each image
        frame: a transform recorded in the same browser (a proxy of one of its sequences) takes
        that sequence's item at the frame (as when browsing to it), any other its current
        matrix. NaN where a recorded one is invalid.
    valid : (n,) bool
        Frames on which every recorded transform of the tree is valid.
    ijk_to_world : (n, 4, 4) float64
        ``parent_to_world @ IJKToRAS`` of each frame: pixel (i, j, 0) -> world mm, as shown.
    geometry_frame : str or None
        The frame the frames' own IJKToRAS is in (``"Reference"`` for ``Image_Reference``), or
        None when it holds the pixel spacing only.
    recorded : tuple of str
        Names of the tree's transforms taken from the recording.
    parent_ids : tuple of str
        MRML IDs of every transform of the tree, the image proxy's parent first.
    """

    parent_to_world: np.ndarray
    valid: np.ndarray
    ijk_to_world: np.ndarray
    geometry_frame: str | None
    recorded: tuple
    parent_ids: tuple

    def __str__(self) -> str:
        frame = self.geometry_frame or "pixels"
        return (
            f"ImagePlacement: {self.valid.size} frames ({frame} geometry), {int(self.valid.sum())} placed; "
            f"recorded parents: {', '.join(self.recorded) or 'none'}"
        )


def image_placement(browser_node) -> ImagePlacement | None:
    """The image proxy's transform tree of a recording per frame, or None when it has no parent.

    What SlicerIGT's Volume Reconstruction composes by browsing through the recording: the
    image proxy's parent transforms (e.g. a ``ReferenceToRAS`` the user placed it under, or a
    SlicerIGT tree ImageToProbe -> ProbeToTracker -> TrackerToRAS whose ProbeToTracker is
    recorded) applied to each frame's IJKToRAS. Recorded parents are read at the image times
    the way :func:`browser_to_sequence` reads transform sequences.

    Parameters
    ----------
    browser_node : vtkMRMLSequenceBrowserNode

    Returns
    -------
    ImagePlacement or None
        None when the image proxy is missing or has no parent transform.

    Raises
    ------
    TypeError
        If ``browser_node`` is not a sequence browser.
    SequenceError
        No volume sequence or no frames.
    TransformError
        A transform of the tree is not linear (names it).
    """
    if browser_node is None or not browser_node.IsA(_BROWSER_CLASS):
        got = "None" if browser_node is None else browser_node.GetClassName()
        raise TypeError(f"image_placement: expected a vtkMRMLSequenceBrowserNode, got {got}")
    sequences = _browser_sequences(browser_node)
    image_seq = _pick_image_sequence(browser_node, sequences)
    proxy = browser_node.GetProxyNode(image_seq)
    node = None if proxy is None else proxy.GetParentTransformNode()
    if node is None:
        return None
    n = image_seq.GetNumberOfDataNodes()
    if n == 0:
        raise SequenceError(f"browser {browser_node.GetName()!r}: image sequence {image_seq.GetName()!r} has no frames")
    index_values = [image_seq.GetNthIndexValue(i) for i in range(n)]
    timestamps = _index_to_seconds(image_seq, index_values)
    synchronized = {s.GetID() for s in sequences}
    to_world = np.broadcast_to(np.eye(4), (n, 4, 4)).copy()
    valid = np.ones(n, dtype=bool)
    recorded, parent_ids = [], []
    while node is not None:
        parent_ids.append(node.GetID())
        if not node.IsLinear():
            raise TransformError(
                f"browser {browser_node.GetName()!r}: transform {node.GetName()!r} above the image "
                f"{proxy.GetName()!r} is not linear"
            )
        seq_node = browser_node.GetSequenceNode(node)
        if seq_node is not None and seq_node.GetID() in synchronized and seq_node.GetNumberOfDataNodes() > 0:
            mats, ok = _read_transform_sequence(
                seq_node, index_values, timestamps, what=f"browser {browser_node.GetName()!r}"
            )
            mats = np.where(ok[:, None, None], mats, np.nan)
            recorded.append(node.GetName())
        else:
            m = vtk.vtkMatrix4x4()
            node.GetMatrixTransformToParent(m)
            mats, ok = vtk_to_matrix(m)[np.newaxis], np.ones(n, dtype=bool)
        to_world = mats @ to_world
        valid &= ok
        node = node.GetParentTransformNode()
    ijk_to_ras = np.empty((n, 4, 4))
    for i in range(n):
        m = vtk.vtkMatrix4x4()
        image_seq.GetNthDataNode(i).GetIJKToRASMatrix(m)
        ijk_to_ras[i] = vtk_to_matrix(m)
    geometry = _geometry_name_of(image_seq)
    return ImagePlacement(
        parent_to_world=to_world,
        valid=valid,
        ijk_to_world=to_world @ ijk_to_ras,
        geometry_frame=None if geometry is None else split_transform_name(geometry)[1],
        recorded=tuple(recorded),
        parent_ids=tuple(parent_ids),
    )


# -- scene files ----------------------------------------------------------------------------
def save_scene(scene, path) -> Path:
    """Write the scene as a ``.mrml`` file with its data files beside it, through MRML storage nodes.

    Every storable node with data gets a storage node and a file in the ``.mrml`` file's
    folder (names from node names, made unique): volumes ``.nrrd``
    (``vtkMRMLVolumeArchetypeStorageNode``), transforms ``.h5``
    (``vtkMRMLTransformStorageNode``), and **every sequence ``.seq.mrb``**
    (``vtkMRMLSequenceStorageNode``: an MRML bundle of the data nodes). The bundle is chosen
    for sequences because it is lossless: ``.seq.nrrd`` cannot hold per-frame IJKToRAS
    (tracked frames), and ``.seq.mha`` transform sequences (Slicer's default for them) keep 6
    significant digits of each matrix and read back with their times rounded to 1 ms (which
    :func:`browser_to_sequence` still matches to the frames, gaps included). The scene then
    records the files relative to its folder (``scene.SetRootDirectory``, ``SetURL``,
    ``Commit``) and the scene's URL now points to ``path``.

    Reading it back: ``scene.SetURL(path); scene.Import()`` in 3D Slicer (File / Add Data) or
    in a headless scene whose Sequences logic is set and whose DataIOManager has a cache
    manager with a remote cache directory (``.seq.mrb`` files are unpacked there).

    Parameters
    ----------
    scene : vtkMRMLScene
    path : str or Path
        The ``.mrml`` file to write; its folder is created if needed.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``path`` does not end with ``.mrml``.
    FileFormatError
        If a data file or the scene file cannot be written (names the node and the file).
    """
    path = Path(path)
    if path.suffix.lower() != ".mrml":
        raise ValueError(f"save_scene: path must end with .mrml, got {path.name!r}")
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / path.name
    used: set[str] = {path.name.lower()}
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    written = 0
    for node in nodes:
        if node is None or not node.IsA("vtkMRMLStorableNode") or not node.GetSaveWithScene():
            continue  # e.g. the default color tables, which Slicer does not save either
        if not _has_data(node):
            continue
        storage = _storage_node_for(scene, node)
        if storage is None:
            logger.info(
                "save_scene: %s (%s) has no file format; kept in the .mrml only",
                node.GetName(),
                node.GetClassName(),
            )
            continue
        ext = storage.GetDefaultWriteFileExtension() or "dat"
        file_name = _unique_file_name(node.GetName() or node.GetID(), ext, used)
        storage.SetFileName(str(folder / file_name))
        if not storage.WriteData(node):
            raise FileFormatError(
                f"{folder / file_name}: could not write node {node.GetName()!r} ({node.GetClassName()}) "
                f"with {storage.GetClassName()}"
            )
        written += 1
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(path))
    if not scene.Commit():
        raise FileFormatError(f"{path}: could not write the MRML scene file")
    logger.info("save_scene: %s with %d data files", path, written)
    return path


# -- helpers --------------------------------------------------------------------------------
def _require_sequences(scene) -> None:
    if scene is None or not scene.IsA("vtkMRMLScene"):
        raise ValueError(f"scene must be a vtkMRMLScene, got {type(scene).__name__}")
    if not scene.IsNodeClassRegistered(_BROWSER_CLASS):
        raise ValueError(
            "scene has no vtkMRMLSequenceBrowserNode class registered: the Sequences module logic "
            "must be set on it (Slicer does; headless: vtkSlicerSequencesLogic().SetMRMLScene(scene))"
        )


def _parses_as_transform(name: str) -> bool:
    try:
        split_transform_name(name)
    except TransformError:
        return False
    return True


def _bool_text(value) -> str:
    return "true" if bool(value) else "false"


def _text_bool(text, *, default: bool) -> bool:
    if text is None:
        return default
    return text.strip().lower() not in ("false", "0", "no", "invalid")


def _vtk_type(dtype: np.dtype) -> int:
    try:
        return numpy_support.get_vtk_array_type(dtype)
    except TypeError as exc:
        raise TypeError(f"voxel type {dtype} has no VTK equivalent") from exc


def _image_data(voxels: np.ndarray, *, deep: bool = True) -> vtk.vtkImageData:
    """vtkImageData from ``[k, j, i]`` or ``[k, j, i, c]`` voxels (``deep=False``: shares memory)."""
    voxels = np.ascontiguousarray(voxels)
    n_k, n_j, n_i = voxels.shape[:3]
    n_c = voxels.shape[3] if voxels.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(int(n_i), int(n_j), int(n_k))
    flat = voxels.reshape(-1, n_c) if n_c > 1 else voxels.reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=deep, array_type=_vtk_type(voxels.dtype))
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def _array_from_image(image, *, what: str) -> np.ndarray:
    """``[k, j, i]`` or ``[k, j, i, c]`` view of a vtkImageData's scalars."""
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise FileFormatError(f"{what}: holds no image data")
    scalars = image.GetPointData().GetScalars()
    n_i, n_j, n_k = image.GetDimensions()
    n_c = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars)
    shape = (n_k, n_j, n_i) + ((n_c,) if n_c > 1 else ())
    return arr.reshape(shape)


def _hold_last_valid(matrices: np.ndarray, valid: np.ndarray, *, fallback: np.ndarray) -> np.ndarray:
    """Replace invalid matrices by the last valid one (the first valid before any; else fallback)."""
    out = np.array(matrices, dtype=np.float64, copy=True)
    good = np.flatnonzero(valid)
    if good.size == 0:
        out[:] = fallback
        return out
    last = out[good[0]].copy()
    for i in range(out.shape[0]):
        if valid[i]:
            last = out[i]
        else:
            out[i] = last
    return out


def _image_geometry(sequence, *, image_to_probe, fixed, reference_frame):
    """(name, (n, 4, 4) IJKToRAS, (n,) validity) for the image frames."""
    target = f"ImageTo{reference_frame}"
    try:
        split_transform_name(target)
    except TransformError as exc:
        raise ValueError(f"reference_frame {reference_frame!r} is not a valid frame name") from exc
    n = sequence.n_frames
    sx, sy = sequence.pixel_spacing_mm or (1.0, 1.0)
    pixels = np.diag([sx, sy, 1.0, 1.0])
    fixed_all = dict(fixed or {})
    if image_to_probe is not None:
        fixed_all["ImageToProbe"] = image_to_probe
    repo = sequence.repository(fixed=fixed_all)
    if not repo.has(target):
        if fixed_all:
            repo.get(target)  # raises TransformError naming what is missing
        logger.info(
            "sequence_to_browser: %s cannot be resolved (no ImageToProbe?); frames keep pixel geometry",
            target,
        )
        return _PIXEL_GEOMETRY, np.broadcast_to(pixels, (n, 4, 4)).copy(), np.zeros(n, dtype=bool)
    mats = repo.get(target)
    valid = np.all(np.isfinite(mats), axis=(1, 2))
    valid[valid] = np.abs(np.linalg.det(mats[valid][:, :3, :3])) > 1e-12
    held = _hold_last_valid(mats, valid, fallback=pixels)
    return target, held, valid


def _scratch_node(scene, class_name: str):
    """A node of ``class_name`` that is not added to the scene (filled, then copied into sequences)."""
    node = scene.CreateNodeByClass(class_name)
    node.UnRegister(None)  # CreateNodeByClass hands over a reference; Python's wrapper holds its own
    return node


def _recording_base_name(scene, browser_name) -> str:
    """The ``<base>`` of a new recording's node names: ``browser_name`` (default ``"Recording"``),
    made unique among the scene's node names (a second load of one file gets ``<base>_1``)."""
    base = "Recording" if browser_name is None else str(browser_name)
    if not base.strip():
        raise ValueError("sequence_to_browser: browser_name must be a non-empty string")
    return scene.GetUniqueNameByString(base)


def _new_sequence(scene, base: str, source: str, *, role: str):
    """A time-indexed sequence named as Slicer's readers name one (``<base>-<source>-Seq``)."""
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{base}-{source}-Seq")
    seq.SetAttribute(ATTR_SEQUENCES_SOURCE, source)
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    seq.SetIndexType(seq.NumericIndex)
    seq.SetNumericIndexValueTolerance(_INDEX_TOLERANCE_S)
    seq.SetAttribute(ATTR_ROLE, role)
    return seq


def _add_proxy(scene, browser, seq_node, *, name: str) -> None:
    """Create a proxy node when no Sequences logic is observing the scene."""
    data = seq_node.GetNthDataNode(max(browser.GetSelectedItemNumber(), 0))
    proxy = scene.AddNewNodeByClass(seq_node.GetDataNodeClassName(), name)
    if data is not None:
        proxy.CopyContent(data)
    browser.AddProxyNode(proxy, seq_node, False)
    logger.debug("created proxy %s for %s without a Sequences logic", proxy.GetID(), seq_node.GetName())


def _browser_sequences(browser) -> list:
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)
    return [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]


def _first_data_node_is(seq_node, cls: str) -> bool:
    if seq_node.GetNumberOfDataNodes() == 0:
        return False
    node = seq_node.GetNthDataNode(0)
    return node is not None and node.IsA(cls)


def _pick_image_sequence(browser, sequences):
    volumes = [s for s in sequences if _first_data_node_is(s, "vtkMRMLVolumeNode")]
    if not volumes:
        names = [s.GetName() for s in sequences]
        raise SequenceError(f"browser {browser.GetName()!r} has no volume sequence (sequences: {names})")
    for s in volumes:
        if s.GetAttribute(ATTR_ROLE) == "Image":
            return s
    master = browser.GetMasterSequenceNode()
    if master is not None and any(s is master or s.GetID() == master.GetID() for s in volumes):
        return master
    return volumes[0]


def _index_to_seconds(seq_node, values) -> np.ndarray:
    try:
        ts = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        logger.warning(
            "sequence %s: index values are not numbers; using item numbers as times", seq_node.GetName()
        )
        return np.arange(len(values), dtype=np.float64)
    unit = (seq_node.GetIndexUnit() or "s").strip()
    if unit == "ms":
        ts = ts / 1000.0
    elif unit not in ("s", ""):
        logger.warning("sequence %s: index unit %r taken as seconds", seq_node.GetName(), unit)
    return ts


def _name_parts(text: str) -> list[str]:
    """Where a PLUS name sits in a Slicer node name: ``text`` itself, else its last or
    second-to-last ``-``-separated part (``<base>-<Name>-Seq`` from the readers,
    ``<proxy>-Sequence`` from the recorder, ``<base>-<Name>`` proxies); a proxy name's
    ``" [time=...]"`` tail is dropped first."""
    text = text.split(" [", 1)[0].strip()
    parts = text.split("-")
    return [text] if len(parts) == 1 else [text, parts[-1], parts[-2]]


def _plus_transform_name(text) -> str | None:
    if not text:
        return None
    for part in _name_parts(text):
        if _parses_as_transform(part):
            return part[: -len("Transform")] if part.endswith("Transform") else part
    return None


def _transform_sequence_name(browser, seq_node) -> str | None:
    if not _first_data_node_is(seq_node, "vtkMRMLLinearTransformNode"):
        return None
    candidates = [
        seq_node.GetAttribute(ATTR_TRANSFORM_NAME),
        seq_node.GetAttribute(ATTR_SEQUENCES_SOURCE),
        seq_node.GetName(),
    ]
    proxy = browser.GetProxyNode(seq_node)
    if proxy is not None:
        candidates += [proxy.GetAttribute(ATTR_TRANSFORM_NAME), proxy.GetName()]
    for text in candidates:
        name = _plus_transform_name(text)
        if name is not None:
            return name
    logger.warning(
        "browser %s: transform sequence %r is not named <From>To<To> (nor is its Sequences.Source "
        "or proxy); skipped",
        browser.GetName(),
        seq_node.GetName(),
    )
    return None


def _read_transform_sequence(seq_node, image_index_values, image_ts, *, what: str, report=None):
    """``(n_image, 4, 4)`` matrices and ``(n_image,)`` validity of a transform sequence at the image items."""
    m_count = seq_node.GetNumberOfDataNodes()
    mats = np.empty((m_count, 4, 4))
    valid = np.empty(m_count, dtype=bool)
    values = []
    for k in range(m_count):
        if report is not None and k % _REPORT_EVERY == 0:
            report(k, m_count)
        node = seq_node.GetNthDataNode(k)
        m = vtk.vtkMatrix4x4()
        node.GetMatrixTransformToParent(m)
        mats[k] = vtk_to_matrix(m)
        valid[k] = _text_bool(node.GetAttribute(ATTR_TRANSFORM_VALID), default=True)
        values.append(seq_node.GetNthIndexValue(k))
    invalid_items = set(mark_plus_invalid_items(seq_node))
    if invalid_items:
        valid &= np.array([v not in invalid_items for v in values], dtype=bool)
    n = len(image_index_values)
    if values == list(image_index_values):
        return mats, valid
    item_of_frame = _items_at_image_times(seq_node, values, image_index_values, image_ts)
    if item_of_frame is not None:
        out = np.full((n, 4, 4), np.nan)
        out_valid = np.zeros(n, dtype=bool)
        has = item_of_frame >= 0
        out[has] = mats[item_of_frame[has]]
        out_valid[has] = valid[item_of_frame[has]]
        logger.debug(
            "%s: %s matched frame by frame, %d frames without an item", what, seq_node.GetName(), n - has.sum()
        )
        return out, out_valid
    if seq_node.GetIndexType() != seq_node.NumericIndex:
        raise SequenceError(
            f"{what}: transform sequence {seq_node.GetName()!r} has a text index that does not "
            f"match the image items ({m_count} vs {n} items)"
        )
    t = _index_to_seconds(seq_node, values)
    return interpolate_transforms(t, mats, valid, image_ts)


def mark_plus_invalid_items(seq_node) -> list[str]:
    """Keep on a transform sequence the items its PLUS file marks ``TransformStatus = INVALID``.

    Slicer's ``vtkMRMLLinearTransformSequenceStorageNode`` reads every matrix of a PLUS
    sequence metafile and drops ``Seq_Frame<i>_<Name>TransformStatus``; its ``.seq.mha`` writer
    (File > Save) then writes those frames ``OK``. While the sequence's storage node still
    points to the PLUS file, the status is read back from that file's header and the index
    values of its INVALID items are added to the ``FreehandUS.InvalidItems`` attribute (saved
    in the scene file), where :func:`browser_to_sequence` finds them after any save and
    reload. Items already listed stay listed; nothing is ever removed.

    Called by :func:`browser_to_sequence` and, as soon as Slicer's reader has read a file, by
    :class:`~FreehandUSLib.plus_status_observer.PlusStatusObserver`.

    Parameters
    ----------
    seq_node : vtkMRMLSequenceNode

    Returns
    -------
    list of str
        Every index value the attribute now lists (seconds, as the sequence writes them),
        sorted by time; empty when there are none.
    """
    invalid_items = set((seq_node.GetAttribute(ATTR_INVALID_ITEMS) or "").split())
    status = _metafile_transform_status(seq_node)
    lost = {v for v, ok in status.items() if not ok} - invalid_items
    if lost:
        invalid_items |= lost
        seq_node.SetAttribute(ATTR_INVALID_ITEMS, " ".join(sorted(invalid_items, key=_index_sort_key)))
        logger.info(
            "sequence %s: %d items marked TransformStatus = INVALID in %s kept as invalid",
            seq_node.GetName(),
            len(lost),
            seq_node.GetStorageNode().GetFileName(),
        )
    return sorted(invalid_items, key=_index_sort_key)


def _reporter(progress, cancel):
    """``progress`` that also checks ``cancel`` (checked once now); None when both are None."""
    if cancel is None:
        return progress
    cancel.check()
    return jobs.cancellable_progress(progress, cancel)


def _index_sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _metafile_transform_status(seq_node) -> dict[str, bool]:
    """``{index value: status is OK}`` from the PLUS sequence metafile that Slicer's
    ``vtkMRMLLinearTransformSequenceStorageNode`` read ``seq_node`` from.

    That reader keeps every matrix but drops ``Seq_Frame<i>_<Name>TransformStatus`` (PLUS's mark
    of an invalid pose), and indexes each item by the frame's timestamp with 3 decimals; the
    status is read back from the same file under the same index values. Empty when the
    sequence was not read from such a file (or it is gone).
    """
    storage = seq_node.GetStorageNode()
    source = seq_node.GetAttribute(ATTR_SEQUENCES_SOURCE)
    if storage is None or not storage.IsA("vtkMRMLLinearTransformSequenceStorageNode") or not source:
        return {}
    path = Path(storage.GetFullNameFromFileName() or "")
    if path.suffix.lower() not in (".mha", ".mhd") or not path.is_file():
        return {}
    from .io.metaimage import read_metaimage_header

    try:
        header, _ = read_metaimage_header(path)
    except FileFormatError as exc:
        logger.warning("sequence %s: TransformStatus not read from %s: %s", seq_node.GetName(), path, exc)
        return {}
    frames: dict[str, dict[str, str]] = {}
    for key, value in header.items():
        match = re.fullmatch(r"Seq_Frame(\d+)_(Timestamp|.+TransformStatus)", key)
        if match:
            frames.setdefault(match.group(1), {})[match.group(2)] = value.strip()
    status = {}
    for fields in frames.values():
        try:
            index_value = f"{float(fields['Timestamp']):.3f}"
        except (KeyError, ValueError):
            continue
        text = fields.get(f"{source}TransformStatus")
        if text is not None:
            status[index_value] = text.upper() == "OK"
    return status


def _items_at_image_times(seq_node, values, image_index_values, image_ts):
    """``(n_image,)`` item number per image frame (-1: none) when every item sits at an image
    time (the same index value, or that time rounded to 1 ms as Slicer's metafile reader writes
    it, each image frame at most once); else None (recorded on another clock)."""
    position = {v: i for i, v in enumerate(image_index_values)}
    frames = [position.get(v, -1) for v in values]
    if -1 in frames and seq_node.GetIndexType() == seq_node.NumericIndex:
        try:
            [float(v) for v in values]
        except ValueError:
            return None
        t = _index_to_seconds(seq_node, values)
        if image_ts.size > 1 and np.min(np.diff(image_ts)) <= 2 * _ROUNDED_INDEX_TOLERANCE_S:
            return None  # image frames closer than the rounding: a rounded time is ambiguous
        after = np.clip(np.searchsorted(image_ts, t), 0, image_ts.size - 1)
        before = np.clip(after - 1, 0, image_ts.size - 1)
        nearest = np.where(np.abs(image_ts[before] - t) <= np.abs(image_ts[after] - t), before, after)
        close = np.abs(image_ts[nearest] - t) <= _ROUNDED_INDEX_TOLERANCE_S
        frames = [int(f) if f_ok else -1 for f, f_ok in zip(nearest, close)]
    if -1 in frames or len(set(frames)) != len(frames):
        return None
    item_of_frame = np.full(len(image_index_values), -1, dtype=np.int64)
    item_of_frame[frames] = np.arange(len(frames))
    return item_of_frame


def _geometry_name_of(image_seq) -> str | None:
    geometry = image_seq.GetAttribute(ATTR_IMAGE_GEOMETRY)
    if geometry == _PIXEL_GEOMETRY:
        return None
    if geometry and _parses_as_transform(geometry):
        return geometry
    for text in (image_seq.GetAttribute(ATTR_SEQUENCES_SOURCE), image_seq.GetName()):
        for part in _name_parts(text or ""):
            pieces = part.rsplit("_", 1)
            if len(pieces) == 2 and pieces[1] and _parses_as_transform(f"ImageTo{pieces[1]}"):
                return f"ImageTo{pieces[1]}"
    return None


def _has_data(node) -> bool:
    if node.IsA("vtkMRMLVolumeNode"):
        image = node.GetImageData()
        return image is not None and image.GetNumberOfPoints() > 0
    if node.IsA("vtkMRMLSequenceNode"):
        return node.GetNumberOfDataNodes() > 0
    return True


def _storage_node_for(scene, node):
    if node.IsA("vtkMRMLSequenceNode"):
        storage = node.GetStorageNode()
        if storage is None or storage.GetClassName() != "vtkMRMLSequenceStorageNode":
            storage = scene.AddNewNodeByClass("vtkMRMLSequenceStorageNode")
            node.SetAndObserveStorageNodeID(storage.GetID())
        return storage
    if node.GetStorageNode() is None and not node.AddDefaultStorageNode():
        return None
    return node.GetStorageNode()


def _unique_file_name(name: str, ext: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "node"
    candidate = f"{base}.{ext}"
    counter = 1
    while candidate.lower() in used:
        candidate = f"{base}_{counter}.{ext}"
        counter += 1
    used.add(candidate.lower())
    return candidate


def tree_start_frame(scene, placement) -> str | None:
    """The frame the image proxy's parent transform maps from, when its name says it
    (``ReferenceToRAS``, ``<recording>-ProbeToTracker``: ``"Reference"``, ``"Probe"``), else None.

    ``placement``: :func:`image_placement`'s result. Reconstruction and the sensorless estimate
    both place frames by it."""
    node = scene.GetNodeByID(placement.parent_ids[0]) if scene is not None and placement.parent_ids else None
    name = _plus_transform_name(None if node is None else node.GetName())
    return None if name is None else split_transform_name(name)[0]


def grey_frame_of_image_node(image_node, *, what: str = "image node", round_uint8: bool = False) -> np.ndarray:
    """The current 2D frame of a volume node as a grey ``(rows, cols)`` array (a copy).

    Shared by live reconstruction and live calibration. Rows top to bottom and columns as stored
    (MF, row ``j``, column ``i``). Multi-component (RGB/RGBA) frames become grey: the mean of the
    first three components as float32, rounded back to uint8 with ``round_uint8`` when the
    node's scalars are uint8. Scalar types other than uint8/float32 become float32.

    Raises
    ------
    SequenceError
        No image data, or more than one slice (``what`` names the node in the message).
    """
    image = image_node.GetImageData()
    name = image_node.GetName()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise SequenceError(f"{what} {name!r} holds no image data")
    n_i, n_j, n_k = image.GetDimensions()
    if n_k != 1:
        raise SequenceError(f"{what} {name!r}: expected a 2D frame (one slice), got {n_k} slices")
    scalars = image.GetPointData().GetScalars()
    n_c = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars).reshape((n_j, n_i, n_c))
    if n_c == 1:
        frame = arr[..., 0]
    else:
        grey = arr[..., : min(n_c, 3)].astype(np.float32).mean(axis=2)
        frame = np.floor(grey + 0.5).astype(np.uint8) if round_uint8 and arr.dtype == np.uint8 else grey
    if frame.dtype not in (np.uint8, np.float32):
        frame = frame.astype(np.float32)
    return np.array(frame, copy=True)

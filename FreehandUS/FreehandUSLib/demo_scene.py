"""The demo's 3D Slicer scene, written headless through the real MRML classes (slicer-core).

Needs the ``slicer-core`` wheel: :func:`new_scene` takes the scene and logic classes from its
compiled modules (``slicer_core.MRMLCore`` ...), not from the ``slicer`` package, and imports them
only when called (a clear ``ImportError`` without slicer-core), so importing this module, and
everything the Slicer modules use, stays free of ``slicer``. :func:`new_scene` sets a scene up the way
Slicer sets up its own (application logic with its selection/interaction singletons, default
color tables, the Sequences logic that registers the sequence node classes, a cache manager for
reading ``.seq.mrb`` bundles back); :func:`write_demo_scene` fills it with the demo's volumes,
trajectory models (polylines through the image centres, Reference mm = RAS as in the bridge),
the recorded sweep as a sequence browser and the calibration, and saves ``.mrml`` + data files.

Open the result in Slicer with File / Add Data (or drag the ``.mrml`` file onto Slicer), or::

    slicer.util.loadScene("results/demo/scene/FreehandUSDemo.mrml")
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["new_scene", "release_scene", "trajectory_model", "write_demo_scene", "load_scene", "TRAJECTORY_COLORS"]

log = logging.getLogger(__name__)

_KEEP = "freehandus_scene_objects"

#: Display colours (RGB 0-1) of the trajectory models, by name suffix.
TRAJECTORY_COLORS = {
    "tracked": (0.2, 0.8, 0.2),
    "truth": (0.3, 0.5, 1.0),
    "model": (1.0, 0.55, 0.1),
    "decorrelation": (1.0, 0.55, 0.1),
}


def _scene_classes() -> dict:
    """The MRML scene and logic classes of the slicer-core wheel, by name (ImportError without it)."""
    try:
        from slicer_core.MRMLCore import vtkCacheManager, vtkDataIOManager, vtkMRMLScene
        from slicer_core.vtkSlicerBaseLogic import vtkSlicerApplicationLogic
        from slicer_core.vtkSlicerSequencesModuleLogic import vtkSlicerSequencesLogic
    except ImportError as exc:
        raise ImportError(
            "writing the demo's Slicer scene headless needs the slicer-core wheel (pip install slicer-core)"
        ) from exc
    return {
        "vtkMRMLScene": vtkMRMLScene,
        "vtkCacheManager": vtkCacheManager,
        "vtkDataIOManager": vtkDataIOManager,
        "vtkSlicerApplicationLogic": vtkSlicerApplicationLogic,
        "vtkSlicerSequencesLogic": vtkSlicerSequencesLogic,
    }


def new_scene(cache_dir=None):
    """A ``vtkMRMLScene`` set up like Slicer's: application logic, colors, Sequences logic, IO manager.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Remote cache directory of the scene's cache manager (``.seq.mrb`` bundles are unpacked
        there when a scene is read); default: a new temporary folder.

    Returns
    -------
    vtkMRMLScene
        Keeps its logics alive; call :func:`release_scene` when done.
    """
    classes = _scene_classes()
    scene = classes["vtkMRMLScene"]()
    app_logic = classes["vtkSlicerApplicationLogic"]()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    sequences = classes["vtkSlicerSequencesLogic"]()
    sequences.SetMRMLApplicationLogic(app_logic)
    sequences.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Sequences", sequences)
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="freehandus-mrml-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    cache_manager = classes["vtkCacheManager"]()
    cache_manager.SetRemoteCacheDirectory(str(cache))
    io_manager = classes["vtkDataIOManager"]()
    io_manager.SetCacheManager(cache_manager)
    scene.SetDataIOManager(io_manager)
    setattr(scene, _KEEP, {"app_logic": app_logic, "logics": [color_logic, sequences], "io": (io_manager, cache_manager)})
    return scene


def release_scene(scene) -> None:
    """Detach the logics of :func:`new_scene` and clear the scene (frees its data)."""
    kept = getattr(scene, _KEEP, None)
    if kept is None:
        return
    for logic in kept["logics"]:
        logic.SetMRMLScene(None)
    kept["app_logic"].SetMRMLScene(None)
    scene.Clear(1)
    delattr(scene, _KEEP)


def trajectory_model(scene, points_mm, *, name: str, color=(1.0, 1.0, 0.0), line_width: float = 3.0):
    """Add a ``vtkMRMLModelNode`` holding a polyline through ``points_mm``.

    Parameters
    ----------
    scene : vtkMRMLScene
    points_mm : (n, 3) float, Reference mm (taken as RAS, as everywhere in the bridge)
    name : str
    color : (r, g, b) in 0..1
    line_width : float, pixels

    Returns
    -------
    vtkMRMLModelNode with a display node (visible in 3D and as slice intersections)
    """
    import vtk

    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    if pts.shape[0] < 2 or not np.all(np.isfinite(pts)):
        raise ValueError(f"trajectory_model {name!r}: expected at least 2 finite (x, y, z) points, got shape {pts.shape}")
    points = vtk.vtkPoints()
    points.SetNumberOfPoints(pts.shape[0])
    for i, p in enumerate(pts):
        points.SetPoint(i, *p)
    line = vtk.vtkPolyLine()
    line.GetPointIds().SetNumberOfIds(pts.shape[0])
    for i in range(pts.shape[0]):
        line.GetPointIds().SetId(i, i)
    cells = vtk.vtkCellArray()
    cells.InsertNextCell(line)
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetLines(cells)
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(poly)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetColor(*color)
    display.SetLineWidth(line_width)
    if hasattr(display, "SetVisibility2D"):
        display.SetVisibility2D(True)
    node.SetAttribute("FreehandUS.Role", "Trajectory")
    return node


def write_demo_scene(path, *, volumes: dict, trajectories: dict, sequence=None, image_to_probe=None) -> dict:
    """Write the demo scene (volumes, trajectory models, recorded sweep, calibration) to ``path``.

    Parameters
    ----------
    path : str or Path
        The ``.mrml`` file; data files go beside it.
    volumes : dict name -> :class:`~FreehandUSLib.volume.Volume`
    trajectories : dict name -> (n, 3) image-centre positions, Reference mm; the colour follows
        the name's last ``_`` part (:data:`TRAJECTORY_COLORS`)
    sequence : TrackedSequence, optional
        The recorded sweep (with per-frame ImageToReference): a sequence browser to replay it.
    image_to_probe : (4, 4), optional
        The calibration, as a transform node ``ImageToProbe``.

    Returns
    -------
    dict with ``written`` (True), ``path``, ``volumes``, ``models``, ``browser`` (node names),
    ``data_files`` (file names beside the scene).

    Raises
    ------
    ImportError
        Without slicer-core / Slicer.
    """
    from . import mrml

    path = Path(path)
    scene = new_scene()
    try:
        vol_names = []
        for name, volume in volumes.items():
            node = mrml.volume_to_node(scene, volume, name=name)
            if name.startswith("PA"):
                display = node.GetDisplayNode()
                color = scene.GetFirstNodeByName("Inferno") or scene.GetFirstNodeByName("Hot")
                if display is not None and color is not None:
                    display.SetAndObserveColorNodeID(color.GetID())
            vol_names.append(name)
        model_names = []
        for name, pts in trajectories.items():
            key = name.rsplit("_", 1)[-1]
            trajectory_model(scene, pts, name=name, color=TRAJECTORY_COLORS.get(key, (1.0, 1.0, 0.0)))
            model_names.append(name)
        browser_name = None
        if sequence is not None:
            browser = mrml.sequence_to_browser(scene, sequence, browser_name="SweepBrowser")
            browser_name = browser.GetName()
        if image_to_probe is not None:
            mrml.transform_to_node(scene, image_to_probe, name="ImageToProbe")
        mrml.save_scene(scene, path)
    finally:
        release_scene(scene)
    data_files = sorted(p.name for p in path.parent.iterdir() if p.is_file() and p.name != path.name)
    log.info("wrote %s with %d data files", path, len(data_files))
    return {"written": True, "path": str(path), "volumes": vol_names, "models": model_names, "browser": browser_name,
            "data_files": data_files}


def load_scene(path):
    """Read a ``.mrml`` scene (with its data files) into a new scene from :func:`new_scene`.

    Returns
    -------
    vtkMRMLScene (call :func:`release_scene` when done)

    Raises
    ------
    FileNotFoundError
        No such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scene file not found")
    scene = new_scene()
    scene.SetURL(str(path.resolve()))
    scene.Import()
    return scene

"""A headless MRML scene set up the way 3D Slicer sets up its own, for tests (slicer-core).

In slicer-core the MRML classes of loadable modules (sequences, markups) are registered on a
scene only when that module's logic gets the scene, and the Markups logic expects the
selection/interaction singletons that an application logic adds. :func:`make_scene` does that
once: application logic (+ default color tables), Sequences and Markups logics, and a
DataIOManager with a cache directory (needed to read ``.seq.mrb`` files back).

The logics are kept alive on the scene object; call :func:`release_scene` when done.
:func:`save_like_slicer` writes a scene the way Slicer's File > Save does by default (each
node's default storage node, e.g. ``.seq.mha`` for a transform sequence), and
:func:`reload_scene` opens it again in a new scene. :func:`load_plus_like_slicer` adds a PLUS
``.igs.mha`` recording the way Slicer's readers lay it out.
Only imports ``slicer`` when called, so test modules can import this file without slicer-core.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["make_scene", "release_scene", "save_like_slicer", "reload_scene", "load_plus_like_slicer"]

_KEEP = "freehandus_test_objects"


def make_scene(cache_dir=None):
    """A new ``vtkMRMLScene`` with the application, Sequences and Markups logics set on it.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Remote cache directory of the scene's cache manager (``.seq.mrb`` files are unpacked
        there when a scene is read). Defaults to a new temporary directory.

    Returns
    -------
    vtkMRMLScene
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)  # adds the selection and interaction singletons
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()  # display nodes reference e.g. vtkMRMLColorTableNodeGrey
    logics = {"Colors": color_logic}
    for name, cls in (
        ("Sequences", slicer.vtkSlicerSequencesLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic

    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="mrml-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    cache_manager = slicer.vtkCacheManager()
    cache_manager.SetRemoteCacheDirectory(str(cache))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache_manager)
    scene.SetDataIOManager(io_manager)

    setattr(scene, _KEEP, {"app_logic": app_logic, "logics": logics, "io": (io_manager, cache_manager)})
    return scene


def release_scene(scene) -> None:
    """Detach the logics made by :func:`make_scene` and clear the scene (frees its data)."""
    kept = getattr(scene, _KEEP, None)
    if kept is None:
        return
    for logic in kept["logics"].values():
        logic.SetMRMLScene(None)
    kept["app_logic"].SetMRMLScene(None)
    scene.Clear(1)
    delattr(scene, _KEEP)


def save_like_slicer(scene, path) -> Path:
    """Write ``scene`` as Slicer's File > Save does with its default choices, return the ``.mrml``.

    Every storable node with data keeps its storage node or gets its default one
    (``AddDefaultStorageNode``: a transform sequence gets Slicer's
    ``vtkMRMLLinearTransformSequenceStorageNode`` and a ``.seq.mha`` file, a volume sequence
    ``.seq.nrrd`` when its frames share one geometry, else a ``.seq.mrb`` bundle), is written
    next to the scene file under its node name with the format's default extension, and the
    scene is committed.
    """
    import re

    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    used = set()
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if not node.IsA("vtkMRMLStorableNode") or not node.GetSaveWithScene():
            continue
        if node.IsA("vtkMRMLSequenceNode") and node.GetNumberOfDataNodes() == 0:
            continue
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is None:
            continue
        if node.GetStorageNode() is None and not node.AddDefaultStorageNode():
            continue
        storage = node.GetStorageNode()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName())
        name = f"{stem}.{storage.GetDefaultWriteFileExtension()}"
        while name.lower() in used:
            stem += "_"
            name = f"{stem}.{storage.GetDefaultWriteFileExtension()}"
        used.add(name.lower())
        storage.SetFileName(str(folder / name))
        if not storage.WriteData(node):
            raise OSError(f"{storage.GetClassName()} could not write {node.GetName()!r} to {name}")
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(path))
    if not scene.Commit():
        raise OSError(f"could not write {path}")
    return path


def reload_scene(path, cache_dir=None):
    """A new scene (:func:`make_scene`) with the ``.mrml`` file ``path`` imported, as File > Open does."""
    scene = make_scene(cache_dir=cache_dir)
    scene.SetURL(str(path))
    if scene.Import() != 1:
        release_scene(scene)
        raise OSError(f"could not read {path}")
    return scene


def load_plus_like_slicer(scene, path):
    """Add the PLUS sequence metafile ``path`` to ``scene`` as Slicer's readers lay it out; return the browser.

    The first transform of the file is read by Slicer's own ``vtkMRMLLinearTransformSequenceStorageNode``
    (``<base>-<Name>-Seq``, PLUS name in ``Sequences.Source``, times with 3 decimals, every
    matrix kept and ``TransformStatus`` dropped; the storage node stays attached, as after File >
    Add Data). slicer-core does not wrap the reader's call that makes one sequence per transform
    nor SlicerIGSIO's image importer, so the other transforms and the image sequence
    (``<base>-Image-Seq``, source ``Image``, one single-slice volume per frame with the file's
    pixel geometry: IJKToRAS = the identity for ``ElementSpacing = 1 1 1``) are added node by
    node with the same names, attributes and index values. The browser ``<base>`` has the image
    sequence as master and proxies made by the Sequences logic.
    """
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    from FreehandUSLib import mrml
    from FreehandUSLib.io import read_sequence

    path = Path(path)
    base = path.name[: -len(".mha")] if path.name.lower().endswith(".mha") else path.stem
    recording = read_sequence(path)
    first = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = scene.AddNewNodeByClass("vtkMRMLLinearTransformSequenceStorageNode")
    storage.SetFileName(str(path))
    first.SetAndObserveStorageNodeID(storage.GetID())
    if storage.ReadData(first) != 1:
        raise OSError(f"Slicer's transform sequence reader could not read {path}")
    values = [first.GetNthIndexValue(i) for i in range(first.GetNumberOfDataNodes())]

    def time_sequence(name, source):
        seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{base}-{name}-Seq")
        seq.SetIndexName("time")
        seq.SetIndexUnit("s")
        seq.SetAttribute("Sequences.Source", source)
        return seq

    image_seq = time_sequence("Image", "Image")
    spacing = recording.pixel_spacing_mm if recording.pixel_spacing_mm is not None else (1.0, 1.0)
    ijk_to_ras = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
    for i, value in enumerate(values):
        node = scene.CreateNodeByClass("vtkMRMLScalarVolumeNode")
        node.UnRegister(None)
        node.SetName(f"Image_{i:04d}")
        image = vtk.vtkImageData()
        frame = np.ascontiguousarray(recording.frames[i])
        image.SetDimensions(frame.shape[1], frame.shape[0], 1)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(frame.ravel(), deep=True))
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(mrml.matrix_to_vtk(ijk_to_ras))
        image_seq.SetDataNodeAtValue(node, value)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", base)
    browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
    browser.AddSynchronizedSequenceNodeID(first.GetID())
    read_by_slicer = first.GetAttribute("Sequences.Source")
    for name, ft in recording.transforms.items():
        if name == read_by_slicer:
            continue
        seq = time_sequence(name, name)
        for i, value in enumerate(values):
            node = scene.CreateNodeByClass("vtkMRMLLinearTransformNode")
            node.UnRegister(None)
            node.SetName(f"{name}Transform_{i:04d}")
            matrix = ft.matrices[i] if np.all(np.isfinite(ft.matrices[i])) else np.eye(4)
            node.SetMatrixTransformToParent(mrml.matrix_to_vtk(matrix))
            seq.SetDataNodeAtValue(node, value)
        browser.AddSynchronizedSequenceNodeID(seq.GetID())
    getattr(scene, _KEEP)["logics"]["Sequences"].UpdateProxyNodesFromSequences(browser)
    return browser

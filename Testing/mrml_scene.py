"""A headless MRML scene set up the way 3D Slicer sets up its own, for tests (slicer-core).

In slicer-core the MRML classes of loadable modules (sequences, markups) are registered on a
scene only when that module's logic gets the scene, and the Markups logic expects the
selection/interaction singletons that an application logic adds. :func:`make_scene` does that
once: application logic (+ default color tables), Sequences and Markups logics, and a
DataIOManager with a cache directory (needed to read ``.seq.mrb`` files back).

The logics are kept alive on the scene object; call :func:`release_scene` when done.
:func:`save_like_slicer` writes a scene the way Slicer's File > Save does by default (each
node's default storage node, e.g. ``.seq.mha`` for a transform sequence), and
:func:`reload_scene` opens it again in a new scene.
Only imports ``slicer`` when called, so test modules can import this file without slicer-core.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["make_scene", "release_scene", "save_like_slicer", "reload_scene"]

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

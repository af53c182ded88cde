"""Keep PLUS's INVALID tracking of recordings that 3D Slicer's own reader loads.

Slicer's ``vtkMRMLLinearTransformSequenceStorageNode`` (File > Add Data of a PLUS ``.igs.mha``
or ``.seq.mha``, File > Open of a scene that refers to one) keeps the matrix of every frame and
drops PLUS's ``<Name>TransformStatus``; its ``.seq.mha`` writer (File > Save) then writes every
frame ``OK`` and points the storage node to the new file. Once that happened, PLUS's INVALID
marks are gone for good, unless something read them from the original file before.

:class:`PlusStatusObserver` does that as soon as the reader has finished: it observes the
scene's storage nodes of that class, and when one has read a file (its read state goes back to
idle) it calls :func:`FreehandUSLib.mrml.mark_plus_invalid_items` on the sequences it read,
which keeps the INVALID items in the ``FreehandUS.InvalidItems`` attribute that the scene file
saves. The Freehand US module installs one on Slicer's scene when Slicer has started, so no
FreehandUS module needs to be opened for this.

Imports only what 3D Slicer bundles (numpy, vtk) besides the standard library, so the module
file can install it at start-up, before the extension's own packages are installed.
"""

from __future__ import annotations

import logging

import vtk

from . import mrml

__all__ = ["PlusStatusObserver", "STORAGE_CLASS", "observe"]

logger = logging.getLogger(__name__)

#: The storage node class whose reads are watched (Slicer's PLUS sequence metafile reader).
STORAGE_CLASS = "vtkMRMLLinearTransformSequenceStorageNode"
#: Where :func:`observe` keeps a scene's observer (an attribute of the scene's Python object).
_ON_SCENE = "freehandus_plus_status_observer"


def observe(scene) -> "PlusStatusObserver":
    """The scene's :class:`PlusStatusObserver`, made on the first call (later calls return it).

    What the Freehand US module calls on ``slicer.mrmlScene`` when Slicer has started and again
    when its panel is opened, so that one observer watches the scene however often it is called
    (a module reloaded, a module loaded after start-up).
    """
    existing = getattr(scene, _ON_SCENE, None)
    if existing is not None:
        return existing
    observer = PlusStatusObserver(scene)
    setattr(scene, _ON_SCENE, observer)
    return observer


class PlusStatusObserver:
    """Marks INVALID PLUS tracking on transform sequences as Slicer's reader reads them.

    Parameters
    ----------
    scene : vtkMRMLScene
        The scene to observe (``slicer.mrmlScene`` in Slicer). Sequences already in it whose
        storage node still points to a PLUS file are marked at once.

    Notes
    -----
    Observes the scene's ``NodeAddedEvent``/``NodeRemovedEvent`` and each storage node of
    :data:`STORAGE_CLASS` (``ModifiedEvent``: ``vtkMRMLStorageNode::ReadData`` sets the read
    state to "transfer done" before reading and back to "idle" after). Nothing is done on
    other changes (a new file name at File > Save), so the written file is never read. Call
    :meth:`remove` to stop observing.
    """

    def __init__(self, scene):
        if scene is None or not scene.IsA("vtkMRMLScene"):
            raise TypeError(f"PlusStatusObserver: expected a vtkMRMLScene, got {type(scene).__name__}")
        self._scene = scene
        self._watched = {}  # storage node ID -> [storage node, observer tag, last read state]
        self._scene_tags = [
            scene.AddObserver(scene.NodeAddedEvent, self._on_node_added),
            scene.AddObserver(scene.NodeRemovedEvent, self._on_node_removed),
        ]
        for storage in _nodes_of_class(scene, STORAGE_CLASS):
            self._watch(storage)
            self._mark_read_by(storage)

    @property
    def watched_storage_ids(self) -> list[str]:
        """MRML IDs of the storage nodes observed now."""
        return sorted(self._watched)

    def remove(self) -> None:
        """Stop observing the scene and its storage nodes."""
        for tag in self._scene_tags:
            self._scene.RemoveObserver(tag)
        self._scene_tags = []
        for storage, tag, _state in self._watched.values():
            storage.RemoveObserver(tag)
        self._watched.clear()

    # -- observers ---------------------------------------------------------------------------
    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_added(self, _scene, _event, node) -> None:
        if node is not None and node.IsA(STORAGE_CLASS):
            self._watch(node)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, _scene, _event, node) -> None:
        if node is None:
            return
        entry = self._watched.pop(node.GetID(), None)
        if entry is not None:
            entry[0].RemoveObserver(entry[1])

    def _watch(self, storage) -> None:
        if storage.GetID() in self._watched:
            return
        tag = storage.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_storage_modified)
        self._watched[storage.GetID()] = [storage, tag, storage.GetReadState()]

    def _on_storage_modified(self, storage, _event) -> None:
        entry = self._watched.get(storage.GetID())
        if entry is None:
            return
        previous, entry[2] = entry[2], storage.GetReadState()
        if entry[2] == storage.Idle and previous != storage.Idle:  # a read has just finished
            self._mark_read_by(storage)

    def _mark_read_by(self, storage) -> None:
        for seq_node in _nodes_of_class(self._scene, "vtkMRMLSequenceNode"):
            if seq_node.GetStorageNodeID() != storage.GetID():
                continue
            try:
                mrml.mark_plus_invalid_items(seq_node)
            except Exception:  # an observer must never break Slicer's loading
                logger.exception("sequence %s: PLUS TransformStatus not read", seq_node.GetName())


def _nodes_of_class(scene, class_name: str) -> list:
    nodes = scene.GetNodesByClass(class_name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]

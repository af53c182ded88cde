"""FreehandUSLib: the Slicer-free core of the FreehandUS extension.

The ground floor (docs/architecture.md): tracked sequences, transforms, file IO (PLUS
metafiles, NRRD sequences, TUS-REC h5, PLUS configs), volumes, the OpenIGTLink transport
(``igtl``), simulation primitives, jobs and the MRML bridge (imported separately:
``FreehandUSLib.mrml``); and, in ``FreehandUSLib.reconstruction`` (+ ``mrml_reconstruction``),
the reconstruction capability. The ``freehandus`` command line is in ``FreehandUSApp``.
Nothing here imports slicer, qt or ctk.
"""

from .errors import ConfigError, FileFormatError, FreehandUSError, SequenceError, TransformError
from .sequence import FrameTransforms, TrackedSequence
from .transforms import TransformRepository, interpolate_transforms, split_transform_name
from .volume import Volume

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FileFormatError",
    "FreehandUSError",
    "SequenceError",
    "TransformError",
    "FrameTransforms",
    "TrackedSequence",
    "TransformRepository",
    "interpolate_transforms",
    "split_transform_name",
    "Volume",
]

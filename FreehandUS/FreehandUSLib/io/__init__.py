"""Reading and writing tracked sequences, volumes and PLUS configurations.

Format is chosen by file name:

================================  ==================================================
``.igs.mha`` ``.mha`` ``.mhd``    PLUS sequence metafile (sequence) / MetaImage (volume)
``.igs.nrrd`` ``.seq.nrrd``       PLUS / Slicer NRRD sequence (pynrrd)
``.nrrd`` ``.nhdr``               NRRD volume
``.h5`` ``.hdf5``                 TUS-REC scan (``frames``, ``tforms``)
================================  ==================================================
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FileFormatError
from .plus_config import PlusConfig, read_plus_config, transform_element

__all__ = [
    "read_sequence",
    "write_sequence",
    "read_volume",
    "write_volume",
    "sequence_format",
    "read_plus_config",
    "PlusConfig",
    "transform_element",
]

_SEQ_FORMATS = {
    ".igs.mha": "metafile",
    ".igs.mhd": "metafile",
    ".seq.mha": "metafile",
    ".seq.mhd": "metafile",
    ".mha": "metafile",
    ".mhd": "metafile",
    ".igs.nrrd": "nrrd",
    ".seq.nrrd": "nrrd",
    ".seq.nhdr": "nrrd",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".h5": "tusrec",
    ".hdf5": "tusrec",
}


def sequence_format(path) -> str:
    """``"metafile"``, ``"nrrd"`` or ``"tusrec"`` from the file name; raise if unknown."""
    name = Path(path).name.lower()
    for suffix in sorted(_SEQ_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return _SEQ_FORMATS[suffix]
    raise FileFormatError(
        f"{path}: unknown file type; expected one of {', '.join(sorted(set(_SEQ_FORMATS)))}"
    )


def _check_input_file(path) -> None:
    """Raise unless ``path`` is an existing regular file (not a folder, FIFO or device)."""
    path = Path(path)
    if path.is_file():
        return
    if path.exists():
        raise FileFormatError(f"{path}: not a regular file")
    raise FileFormatError(f"{path}: file not found")


def read_sequence(path, **options):
    """Read a tracked sequence (frames flipped to MF) from any supported file."""
    fmt = sequence_format(path)
    _check_input_file(path)
    if fmt == "metafile":
        from .metaimage import read_sequence_metafile

        return read_sequence_metafile(path, **options)
    if fmt == "nrrd":
        from .nrrd_io import read_sequence_nrrd

        return read_sequence_nrrd(path, **options)
    from .tusrec import read_tusrec_h5

    return read_tusrec_h5(path, **options)


def write_sequence(sequence, path, **options) -> Path:
    """Write a tracked sequence; the format follows the file name. Returns the path written."""
    fmt = sequence_format(path)
    if fmt == "metafile":
        from .metaimage import write_sequence_metafile

        return write_sequence_metafile(sequence, path, **options)
    if fmt == "nrrd":
        from .nrrd_io import write_sequence_nrrd

        return write_sequence_nrrd(sequence, path, **options)
    from .tusrec import write_tusrec_h5

    return write_tusrec_h5(sequence, path, **options)


def read_volume(path, **options):
    """Read a 3D volume (:class:`~FreehandUSLib.volume.Volume`) from ``.mha/.mhd/.nrrd/.nhdr``."""
    fmt = sequence_format(path)
    _check_input_file(path)
    if fmt == "metafile":
        from .metaimage import read_volume_metafile

        return read_volume_metafile(path, **options)
    if fmt == "nrrd":
        from .nrrd_io import read_volume_nrrd

        return read_volume_nrrd(path, **options)
    raise FileFormatError(f"{path}: volumes are read from .mha, .mhd, .nrrd or .nhdr files")


def write_volume(volume, path, **options) -> Path:
    """Write a 3D volume to ``.mha/.mhd/.nrrd/.nhdr``. Returns the path written."""
    fmt = sequence_format(path)
    if fmt == "metafile":
        from .metaimage import write_volume_metafile

        return write_volume_metafile(volume, path, **options)
    if fmt == "nrrd":
        from .nrrd_io import write_volume_nrrd

        return write_volume_nrrd(volume, path, **options)
    raise FileFormatError(f"{path}: volumes are written to .mha, .mhd, .nrrd or .nhdr files")

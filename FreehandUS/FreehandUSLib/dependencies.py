"""The Python packages the Slicer modules need beyond Slicer's own: read, check, constrain.

3D Slicer bundles numpy, scipy, vtk and ``packaging``; the FreehandUS modules also need the
packages listed in ``FreehandUS/Resources/requirements.txt`` (one file for the three modules:
they install into one ``qt-scripted-modules`` folder, where a ``Resources/requirements.txt`` per
module would overwrite each other). ``FreehandUS.ensureRequirements`` checks them with
:func:`unmet_requirements` before any Lib import that needs them and installs what is missing
or too old through ``slicer.packaging`` (Slicer 5.12 and later) or ``slicer.util.pip_install``,
with :func:`core_constraints` so that pip leaves Slicer's own numpy and scipy alone.

Nothing here imports slicer, and nothing is installed here: this module only reads files and
installed-package metadata (``importlib.metadata``), so it runs the same in the command line,
in the tests and in Slicer.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import FreehandUSError

__all__ = [
    "IMPORT_NAMES",
    "SLICER_CORE_PACKAGES",
    "RequirementsFileError",
    "UnmetRequirement",
    "core_constraints",
    "import_name",
    "read_requirements",
    "unmet_requirements",
]

#: Import name of each required distribution whose import name differs from its name.
IMPORT_NAMES = {"opencv-python-headless": "cv2", "pynrrd": "nrrd"}

#: Distributions Slicer ships and other Slicer modules rely on: an install must not change them.
SLICER_CORE_PACKAGES = ("numpy", "scipy", "packaging")


class RequirementsFileError(FreehandUSError):
    """A requirements file is missing or holds a line that is not a requirement."""


@dataclass(frozen=True, eq=False)
class UnmetRequirement:
    """A requirement and the installed version that does not satisfy it (None: not installed)."""

    requirement: Requirement
    installed: str | None

    def __str__(self) -> str:
        found = "not installed" if self.installed is None else f"installed {self.installed}"
        return f"{self.requirement} ({found})"

    def to_dict(self) -> dict:
        return {"requirement": str(self.requirement), "installed": self.installed}


def import_name(distribution: str) -> str:
    """The top-level module a required distribution installs (``pynrrd`` -> ``nrrd``)."""
    name = canonicalize_name(distribution)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def read_requirements(path) -> list[Requirement]:
    """The requirements of a pip requirements file (comments and blank lines skipped).

    Only plain requirement lines are accepted (``name>=1.0,<2``, optionally with a marker):
    pip options (``-r``, ``--index-url``) and inline comments are refused, because
    ``slicer.packaging.load_requirements`` would skip or misread them.

    Raises
    ------
    RequirementsFileError
        If the file does not exist, or a line is not a requirement (the message names the
        file and the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise RequirementsFileError(f"{path}: requirements file not found")
    requirements = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-") or " #" in line:
            raise RequirementsFileError(
                f"{path}:{number}: expected a requirement such as 'numba>=0.60,<1', got {line!r} "
                "(pip options and inline comments are not supported)"
            )
        try:
            requirements.append(Requirement(line))
        except InvalidRequirement as exc:
            raise RequirementsFileError(f"{path}:{number}: {line!r} is not a requirement: {exc}") from None
    return requirements


def _installed_version(distribution: str) -> str | None:
    try:
        # Looked up through the module at call time, so a test can simulate a missing package.
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(requirements) -> list[UnmetRequirement]:
    """The requirements that the installed packages do not satisfy, in the given order.

    A requirement is met when its distribution is installed at a version inside its specifier
    (pre-releases count); one whose marker does not apply here (``; sys_platform == "win32"``)
    is always met. Versions come from the installed metadata, not from importing.

    Parameters
    ----------
    requirements : iterable of packaging.requirements.Requirement or str

    Returns
    -------
    list of UnmetRequirement
    """
    unmet = []
    for requirement in requirements:
        if isinstance(requirement, str):
            requirement = Requirement(requirement)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = _installed_version(requirement.name)
        if installed is None:
            unmet.append(UnmetRequirement(requirement, None))
            continue
        try:
            ok = requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            unmet.append(UnmetRequirement(requirement, installed))
    return unmet


def core_constraints(packages=SLICER_CORE_PACKAGES) -> list[str]:
    """pip constraint lines pinning the installed version of each of ``packages``.

    Given to pip (``-c``) with an install, they keep it from upgrading or downgrading the numpy
    and scipy that Slicer was built with; a requirement that cannot be met without changing them
    then fails to install instead of breaking Slicer. Packages that are not installed are left out.

    Returns
    -------
    list of str
        E.g. ``["numpy==2.0.2", "scipy==1.13.1", "packaging==25.0"]``.
    """
    lines = []
    for package in packages:
        installed = _installed_version(package)
        if installed is not None:
            lines.append(f"{canonicalize_name(package)}=={installed}")
    return lines

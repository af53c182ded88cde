"""The floors of the code (docs/architecture.md), checked on the import graph.

Every ``import`` and ``from ... import`` in the packages, module-level or inside a function
(lazy imports count: they run too), is an edge from the importing module to the module it
names. Floors, bottom up:

0. ground: ``FreehandUSLib`` (sequence model, transforms, IO, OpenIGTLink transport,
   simulation primitives, MRML bridge, jobs) except the reconstruction capability;
1. capabilities: reconstruction (``FreehandUSLib.reconstruction``, ``mrml_reconstruction``,
   ``warm_kernels``), calibration (``NWireCalibrationLib``), sensorless tracking
   (``SensorlessTrackingLib``);
2. application: ``FreehandUSApp`` (command line, demo, report) and the three Slicer module files.

No edge may go up a floor, none may go from one capability to another, and no package may
import itself in a circle (``SensorlessTrackingLib``'s predict / decorrelation / mirror_average
were one).
"""

from __future__ import annotations

import ast
from pathlib import Path

from testdata import REPO_ROOT

PACKAGES = {
    "FreehandUSLib": "FreehandUS/FreehandUSLib",
    "FreehandUSApp": "FreehandUS/FreehandUSApp",
    "NWireCalibrationLib": "NWireCalibration/NWireCalibrationLib",
    "SensorlessTrackingLib": "SensorlessTracking/SensorlessTrackingLib",
}
MODULE_FILES = {
    "FreehandUS": "FreehandUS/FreehandUS.py",
    "NWireCalibration": "NWireCalibration/NWireCalibration.py",
    "SensorlessTracking": "SensorlessTracking/SensorlessTracking.py",
}
#: The reconstruction capability inside FreehandUSLib (the rest of FreehandUSLib is ground).
RECONSTRUCTION = ("FreehandUSLib.reconstruction", "FreehandUSLib.mrml_reconstruction", "FreehandUSLib.warm_kernels")
GROUND, APPLICATION = "ground", "application"
CAPABILITIES = ("reconstruction", "calibration", "sensorless")


def floor_of(module: str) -> str:
    """``ground``, one of :data:`CAPABILITIES` or ``application``."""
    top = module.split(".")[0]
    if top == "FreehandUSApp" or top in MODULE_FILES:
        return APPLICATION
    if top == "NWireCalibrationLib":
        return "calibration"
    if top == "SensorlessTrackingLib":
        return "sensorless"
    if top == "FreehandUSLib":
        if any(module == r or module.startswith(r + ".") for r in RECONSTRUCTION):
            return "reconstruction"
        return GROUND
    raise ValueError(f"{module}: not a module of the project")


def _rank(floor: str) -> int:
    return 0 if floor == GROUND else 2 if floor == APPLICATION else 1


def modules_of(root: Path, packages: dict, module_files: dict) -> dict:
    """``{module name: file}`` for every ``.py`` in ``packages`` and the ``module_files``."""
    out = {}
    for name, folder in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            module = ".".join((name, *parts))
            out[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    for name, path in module_files.items():
        if (root / path).is_file():
            out[name] = root / path
    return out


def import_edges(modules: dict) -> set:
    """``(importer, imported)`` module pairs among ``modules`` (a name imported from a package
    counts as its submodule when it is one, else as the package)."""

    def known(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) if parts else None

    edges = set()
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for target in targets:
                hit = known(target)
                if hit is not None and hit != module:
                    edges.add((module, hit))
    return edges


def layering_violations(edges) -> list:
    """The edges that go up a floor or from one capability to another."""
    bad = []
    for a, b in sorted(edges):
        fa, fb = floor_of(a), floor_of(b)
        if _rank(fb) > _rank(fa) or (_rank(fa) == _rank(fb) == 1 and fa != fb):
            bad.append(f"{a} ({fa}) imports {b} ({fb})")
    return bad


def circles(edges) -> list:
    """Import circles (strongly connected sets of more than one module) inside each package; a
    package importing its own submodules (``__init__`` re-exports) does not count."""
    graph = {}
    for a, b in edges:
        if a.split(".")[0] == b.split(".")[0] and not b.startswith(a + "."):
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_goes_up_a_floor_or_across_capabilities():
    modules = modules_of(REPO_ROOT, PACKAGES, MODULE_FILES)
    assert len(modules) > 100  # the packages were found
    violations = layering_violations(import_edges(modules))
    assert not violations, "layering (docs/architecture.md):\n" + "\n".join(violations)


def test_no_import_circle_inside_a_package():
    found = circles(import_edges(modules_of(REPO_ROOT, PACKAGES, MODULE_FILES)))
    assert not found, f"import circles: {found}"


def _tiny_project(tmp_path: Path, files: dict) -> dict:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules_of(tmp_path, {"FreehandUSLib": "G/FreehandUSLib", "NWireCalibrationLib": "C/NWireCalibrationLib",
                                 "SensorlessTrackingLib": "S/SensorlessTrackingLib", "FreehandUSApp": "G/FreehandUSApp"},
                      {})


def test_the_checks_find_what_they_forbid(tmp_path):
    modules = _tiny_project(tmp_path, {
        "G/FreehandUSLib/__init__.py": "from .io import read\n",
        "G/FreehandUSLib/io.py": "def read():\n    from FreehandUSApp import cli\n",  # ground -> application, lazily
        "G/FreehandUSLib/igtl.py": "from NWireCalibrationLib.live import sink\n",  # ground -> capability
        "G/FreehandUSLib/reconstruction/__init__.py": "",
        "G/FreehandUSLib/reconstruction/live.py": "from ..igtl import x\n",  # capability -> ground: fine
        "C/NWireCalibrationLib/__init__.py": "",
        "C/NWireCalibrationLib/live.py": "from FreehandUSLib.reconstruction import live\n",  # across capabilities
        "S/SensorlessTrackingLib/__init__.py": "",
        "S/SensorlessTrackingLib/a.py": "from . import b\n",
        "S/SensorlessTrackingLib/b.py": "def f():\n    from .a import g\n",  # a circle through a lazy import
        "G/FreehandUSApp/__init__.py": "",
        "G/FreehandUSApp/cli.py": "import NWireCalibrationLib.live\nimport SensorlessTrackingLib.a\n",  # fine
    })
    edges = import_edges(modules)
    assert layering_violations(edges) == [
        "FreehandUSLib.igtl (ground) imports NWireCalibrationLib.live (calibration)",
        "FreehandUSLib.io (ground) imports FreehandUSApp.cli (application)",
        "NWireCalibrationLib.live (calibration) imports FreehandUSLib.reconstruction.live (reconstruction)",
    ]
    assert circles(edges) == [["SensorlessTrackingLib.a", "SensorlessTrackingLib.b"]]

"""Run a module's self-test as in a fresh 3D Slicer whose Python lacks the extension's packages.

Run as a script in its own interpreter (the tests start it with ``subprocess``): it hides the
packages of ``FreehandUS/Resources/requirements.txt`` (an import raises ModuleNotFoundError,
``importlib.metadata`` reports them missing, as in a Slicer where nothing was installed yet),
sets up the parts of Slicer's Python API the module files import on top of slicer-core (real
MRML classes and scene; stand-ins for qt, ``slicer.i18n``, the parameter node wrapper and the
ScriptedLoadableModule base classes), and replaces the installers: ``slicer.util.pip_install``
and, with ``--packaging``, ``slicer.packaging.pip_ensure`` (as in Slicer 5.12+) record their
arguments and "install" by un-hiding the packages.

Then it runs the named test methods of ``<Module>Test``, each after ``setUp()`` as runTest does, and prints one JSON line:
the installer calls, and which hidden package was imported first and from where, if any was
imported before an installer ran (the failure this guards against).

What it cannot cover: the Qt panels (qt is a stand-in), parameter nodes (the wrapper is a
stand-in: tests that read parameters cannot run here).

Usage: ``python fresh_slicer_harness.py MODULE TEST_METHOD [TEST_METHOD...] [--packaging]``
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import json
import sys
import tempfile
import traceback
import types
import unittest
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = ("FreehandUS", "NWireCalibration", "SensorlessTracking")

HIDDEN_IMPORTS: set[str] = set()
HIDDEN_DISTRIBUTIONS: set[str] = set()
EVENTS: dict = {"installs": [], "premature_import": None}


class HidingPathFinder(importlib.machinery.PathFinder):
    """sys.path finder that does not find the hidden top-level packages (as if not installed).

    ``import numba`` then raises ModuleNotFoundError and ``importlib.util.find_spec("numba")``
    returns None, exactly as in a Python without numba. An import attempt (not a mere
    ``find_spec``) of a hidden package is recorded with the calls of the repository's code that
    led to it.
    """

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in HIDDEN_IMPORTS:
            frame, importing = sys._getframe(1), False
            while frame is not None:
                importing = importing or frame.f_code.co_name == "_find_and_load"
                frame = frame.f_back
            if importing and EVENTS["premature_import"] is None:
                stack = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]]
                ours = [s for s in stack if s.startswith(("FreehandUS", "NWireCalibration", "SensorlessTracking"))]
                EVENTS["premature_import"] = {"module": top, "from": ours[-6:]}
            return None
        return super().find_spec(fullname, path, target)


def _hide(requirements_file: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "FreehandUS"))
    from FreehandUSLib.dependencies import import_name, read_requirements

    for requirement in read_requirements(requirements_file):
        HIDDEN_DISTRIBUTIONS.add(requirement.name)
        HIDDEN_IMPORTS.add(import_name(requirement.name))
    already = sorted(name for name in HIDDEN_IMPORTS if name in sys.modules)
    if already:
        raise SystemExit(f"harness: {already} imported before hiding")
    real_version = importlib.metadata.version

    def version(name):
        if name in HIDDEN_DISTRIBUTIONS:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    importlib.metadata.version = version
    index = sys.meta_path.index(importlib.machinery.PathFinder)
    sys.meta_path[index] = HidingPathFinder


def _install(kind: str, arguments, requirements) -> None:
    """What the fake installers do: record, then make the named packages importable again."""
    from packaging.requirements import Requirement

    sys.path.insert(0, str(REPO_ROOT / "FreehandUS"))
    from FreehandUSLib.dependencies import import_name

    constraints = arguments.get("constraints") if isinstance(arguments, dict) else (
        arguments[arguments.index("-c") + 1] if "-c" in arguments else None)  # fmt: skip
    pinned = Path(constraints).read_text().split() if constraints else []
    EVENTS["installs"].append({"via": kind, "arguments": arguments, "constraints": pinned})
    items = [requirements] if isinstance(requirements, str) else list(requirements)
    names = [Requirement(str(item)).name for item in items]
    for name in names:
        HIDDEN_DISTRIBUTIONS.discard(name)
        HIDDEN_IMPORTS.discard(import_name(name))


def _stub_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class Signal:
    """A Qt signal stand-in for panel tests: ``connect``/``disconnect`` slots, ``emit`` calls them."""

    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self):
        for slot in list(self.slots):
            slot()


class Widget:
    """A stand-in for a panel's button, label or progress bar: the attributes the modules set
    (``visible``, ``enabled``, ``value``, ``maximum``, ``text``) and a ``clicked`` signal."""

    def __init__(self):
        self.visible, self.enabled, self.value, self.maximum, self.text = None, True, 0, 100, ""
        self.clicked = Signal()

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


def capture_messages() -> list:
    """Route ``slicer.util.showStatusMessage`` / ``errorDisplay`` into the returned list (errors
    prefixed ``"ERROR "``); call after :func:`setup_slicer`."""
    import slicer

    messages = []
    slicer.util.showStatusMessage = lambda text, msec=0: messages.append(text)
    slicer.util.errorDisplay = lambda text, **kw: messages.append("ERROR " + text)
    return messages


def setup_slicer(with_packaging: bool, temporary: Path):
    """slicer-core's ``slicer`` plus the application parts the module files use; module folders on sys.path."""
    import slicer
    import slicer.util

    sys.path.insert(0, str(REPO_ROOT / "Testing"))
    from mrml_scene import make_scene

    class Anything:
        """qt stand-in: every attribute and call gives another stand-in."""

        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return Anything()

        def __call__(self, *args, **kwargs):
            return Anything()

    qt = _stub_module("qt")
    qt.__getattr__ = lambda name: Anything
    _stub_module("ctk").__getattr__ = lambda name: Anything

    class App:
        temporaryPath = str(temporary)

        @staticmethod
        def testingEnabled():
            return True

        @staticmethod
        def processEvents():
            pass

    slicer.app = App()
    slicer.mrmlScene = make_scene()

    def pip_install(requirements):
        arguments = requirements.split() if isinstance(requirements, str) else list(requirements)
        named = [a for i, a in enumerate(arguments) if not a.startswith("-") and (i == 0 or arguments[i - 1] != "-c")]
        _install("slicer.util.pip_install", arguments, named)

    def confirm(*args, **kwargs):
        raise AssertionError("asked the user while Slicer runs tests")

    slicer.util.pip_install = pip_install
    slicer.util.confirmOkCancelDisplay = confirm
    if with_packaging:

        def pip_ensure(requirements, **options):
            recorded = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
            _install("slicer.packaging.pip_ensure", {"requirements": list(requirements), **recorded}, requirements)

        slicer.packaging = _stub_module("slicer.packaging", pip_ensure=pip_ensure)

    slicer.i18n = _stub_module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)

    def parameterNodeWrapper(cls):
        return cls

    slicer.parameterNodeWrapper = _stub_module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, WithinRange=lambda *a: None
    )

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            raise NotImplementedError("parameter nodes are not available in this harness")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    slicer.ScriptedLoadableModule = _stub_module(
        "slicer.ScriptedLoadableModule",
        ScriptedLoadableModule=ScriptedLoadableModule,
        ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (), {}),
        ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
    )
    _stub_module("vtkSlicerSequencesModuleMRMLPython", vtkMRMLSequenceBrowserNode=slicer.vtkMRMLSequenceBrowserNode)
    _stub_module(
        "vtkSlicerMarkupsModuleMRMLPython",
        vtkMRMLMarkupsROINode=slicer.vtkMRMLMarkupsROINode,
        vtkMRMLMarkupsFiducialNode=slicer.vtkMRMLMarkupsFiducialNode,
    )
    for module in MODULES:
        sys.path.insert(0, str(REPO_ROOT / module))
    return slicer


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    with_packaging = "--packaging" in args
    args = [a for a in args if a != "--packaging"]
    module_name, methods = args[0], args[1:]
    temporary = Path(tempfile.mkdtemp(prefix="fresh-slicer-"))
    _hide(REPO_ROOT / "FreehandUS" / "Resources" / "requirements.txt")
    setup_slicer(with_packaging, temporary)
    module = importlib.import_module(module_name)
    test = getattr(module, f"{module_name}Test")()
    error = None
    try:
        for method in methods:  # as runTest does: setUp before each test
            test.setUp()
            getattr(test, method)()
    except Exception as exc:  # reported, not raised: the JSON line is the result
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({**EVENTS, "error": error}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python packages the Slicer modules need: declared once, checked by version, installed first.

- ``FreehandUSLib.dependencies``: reading ``FreehandUS/Resources/requirements.txt``, version checks
  against installed metadata, the constraints that keep Slicer's numpy/scipy.
- The requirements file is complete: every Lib module the module files import loads with only
  Slicer's own packages, the file's packages and torch (everything else installed here hidden).
- Order: in the module files, every function that imports a Lib calls the dependency check first.
- A fresh Slicer (``fresh_slicer_harness.py``): the modules' own self-tests run with the packages
  hidden until an installer (``slicer.util.pip_install``, or ``slicer.packaging.pip_ensure`` on
  5.12+) "installs" them; nothing imports a hidden package before that.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from FreehandUSLib import dependencies
from FreehandUSLib.dependencies import (
    RequirementsFileError,
    core_constraints,
    import_name,
    read_requirements,
    unmet_requirements,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO_ROOT / "FreehandUS" / "Resources" / "requirements.txt"
HARNESS = Path(__file__).with_name("fresh_slicer_harness.py")
MODULES = ("FreehandUS", "NWireCalibration", "SensorlessTracking")
#: What Slicer's Python has without any install (Slicer's SuperBuild) and what the PyTorch
#: extension provides; slicer-core stands for Slicer's own modules.
SLICER_PROVIDES = {"numpy", "scipy", "vtk", "packaging", "slicer-core", "torch"}
#: Calls that run the dependency check.
CHECKS = {"ensureRequirements", "installDependencies"}
#: Lib modules the module files may import before the check: they import only the standard
#: library, ``packaging`` and the Lib's errors (test_check_free_lib_modules_import_nothing_else).
CHECK_FREE = {
    "FreehandUSLib.dependencies": "dependencies.py",
    "FreehandUSLib.jobs": "jobs.py",
    "FreehandUSLib.sample_data": "sample_data.py",
}
#: Lib modules the module files use at start-up, before any check, that import only the standard
#: library and what Slicer bundles (numpy, vtk): test_plus_status_observer.py installs and runs
#: them in a fresh Slicer with the requirements hidden.
SLICER_BUNDLED_ONLY = {"FreehandUSLib.plus_status_observer"}


# ----------------------------------------------------------------------------- the Lib


def _fake_versions(monkeypatch, versions: dict) -> None:
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_read_requirements_skips_comments_and_keeps_bounds(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# header\n\nnumba>=0.60,<1\n  pynrrd>=1.1  \nh5py; sys_platform == 'win32'\n")
    requirements = read_requirements(path)
    assert [r.name for r in requirements] == ["numba", "pynrrd", "h5py"]
    assert str(requirements[0].specifier) == "<1,>=0.60"


@pytest.mark.parametrize(
    "line, message",
    [
        ("numba>=0.60  # kernels", "inline comments"),
        ("-r other.txt", "pip options"),
        ("numba>=>0.60", "is not a requirement"),
    ],
)
def test_read_requirements_refuses_a_bad_line_naming_it(tmp_path, line, message):
    path = tmp_path / "requirements.txt"
    path.write_text(f"# ok\n{line}\n")
    with pytest.raises(RequirementsFileError, match=rf"requirements.txt:2: .*{message}"):
        read_requirements(path)


def test_read_requirements_missing_file(tmp_path):
    with pytest.raises(RequirementsFileError, match="requirements file not found"):
        read_requirements(tmp_path / "none.txt")


def test_unmet_requirements_checks_versions_not_just_presence(monkeypatch):
    _fake_versions(monkeypatch, {"numba": "0.58.1", "pynrrd": "1.1.3", "h5py": "4.0.0rc1", "weird": "x!y"})
    unmet = unmet_requirements(
        ["numba>=0.60,<1", "pynrrd>=1.1,<2", "opencv-python-headless>=4.10", "h5py>=3.11", "weird>=1",
         "winonly>=1; sys_platform == 'nonexistent'"]
    )  # fmt: skip
    assert [(u.requirement.name, u.installed) for u in unmet] == [
        ("numba", "0.58.1"),
        ("opencv-python-headless", None),
        ("weird", "x!y"),
    ]
    assert str(unmet[0]) == "numba<1,>=0.60 (installed 0.58.1)"
    assert unmet[1].to_dict() == {"requirement": "opencv-python-headless>=4.10", "installed": None}


def test_core_constraints_pin_what_is_installed(monkeypatch):
    _fake_versions(monkeypatch, {"numpy": "2.0.2", "scipy": "1.13.1"})
    assert core_constraints() == ["numpy==2.0.2", "scipy==1.13.1"]


def test_import_names():
    assert import_name("opencv-python-headless") == "cv2"
    assert import_name("pynrrd") == "nrrd"
    assert import_name("h5py") == "h5py"
    assert import_name("Some_Package") == "some_package"


# ----------------------------------------------------------------------------- the files


def test_requirements_file_has_bounds_and_only_what_slicer_lacks():
    requirements = read_requirements(REQUIREMENTS)
    names = {r.name for r in requirements}
    assert names == {"numba", "opencv-python-headless", "pynrrd", "h5py"}
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, f"{requirement}: needs a lower and an upper bound"
    assert not names & SLICER_PROVIDES, "never pip-install Slicer's own packages (or torch: PyTorch extension)"
    import slicer  # noqa: F401  (slicer-core: the same loader slicer.packaging.load_requirements uses)

    for line in REQUIREMENTS.read_text().splitlines():  # what slicer.packaging.load_requirements reads
        if line.strip() and not line.startswith("#"):
            Requirement(line.strip())


def test_pyproject_agrees_with_the_requirements_file():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pyproject = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for requirement in read_requirements(REQUIREMENTS):
        assert requirement.name in pyproject, f"{requirement.name} missing from pyproject dependencies"
        assert pyproject[requirement.name].specifier == requirement.specifier, requirement.name
    assert "packaging" in pyproject, "FreehandUSLib.dependencies imports packaging"
    # Nothing imports scikit-image; pyigtl is only the benchmark's (and the tests') reference.
    assert "scikit-image" not in pyproject and "pyigtl" not in pyproject
    assert [Requirement(r).name for r in project["optional-dependencies"]["benchmark"]] == ["pyigtl"]


def test_no_code_imports_scikit_image():
    offenders = []
    for path in REPO_ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            offenders += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "skimage"]
    assert not offenders


def test_requirements_file_is_packaged_with_the_module():
    text = (REPO_ROOT / "FreehandUS" / "CMakeLists.txt").read_text()
    assert "Resources/requirements.txt" in text
    assert "FreehandUSLib/dependencies.py" in text
    for module in ("NWireCalibration", "SensorlessTracking"):
        assert not (REPO_ROOT / module / "Resources" / "requirements.txt").exists(), (
            "the three modules install into one folder: a second Resources/requirements.txt would overwrite it"
        )


# ----------------------------------------------------------------------------- order in the module files


def _lib_imports(function: ast.FunctionDef) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [
            (node.lineno, n)
            for n in names
            if n.split(".")[0].endswith("Lib") and n not in CHECK_FREE and n not in SLICER_BUNDLED_ONLY
        ]
    return found


def _called_names(function: ast.FunctionDef) -> list[tuple[int, str]]:
    calls = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name:
                calls.append((node.lineno, name))
    return calls


def functions_importing_libs_unchecked(source: str) -> list[str]:
    """Functions that import a Lib module before (or without) running the dependency check.

    A function runs the check when it calls ``ensureRequirements``/``installDependencies`` or a
    function of the same file that does, before its first Lib import; a test method also when
    its class's ``setUp`` does (Slicer calls setUp before each test).
    """
    tree = ast.parse(source)
    functions = {}
    owners = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    owners[id(item)] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            functions.setdefault(node.name, []).append(node)

    checking = set(CHECKS)
    changed = True
    while changed:  # functions that (transitively) call a check
        changed = False
        for name, defs in functions.items():
            if name not in checking and any(n in checking for d in defs for _, n in _called_names(d)):
                checking.add(name)
                changed = True

    problems = []
    for defs in functions.values():
        for function in defs:
            imports = _lib_imports(function)
            if not imports or function.name in CHECKS:
                continue
            first_import = min(line for line, _ in imports)
            first_check = min((line for line, n in _called_names(function) if n in checking), default=None)
            if first_check is not None and first_check < first_import:
                continue
            owner = owners.get(id(function))
            if owner is not None and function.name.startswith("test_"):
                setups = [f for f in owner.body if isinstance(f, ast.FunctionDef) and f.name == "setUp"]
                if setups and any(n in checking for _, n in _called_names(setups[0])):
                    continue
            problems.append(f"{function.name}:{first_import} imports {imports[0][1]}")
    return problems


@pytest.mark.parametrize("module", MODULES)
def test_module_checks_dependencies_before_importing_a_lib(module):
    source = (REPO_ROOT / module / f"{module}.py").read_text()
    problems = functions_importing_libs_unchecked(source)
    assert not problems, f"{module}.py imports a Lib before the dependency check: {problems}"


def test_order_checker_finds_an_unchecked_import():
    source = (
        "def ensureRequirements():\n    pass\n"
        "def helper():\n    ensureRequirements()\n"
        "def good():\n    helper()\n    from FreehandUSLib import mrml_reconstruction\n"
        "def late():\n    from FreehandUSLib.reconstruction import fill_holes\n    ensureRequirements()\n"
        "class T:\n    def setUp(self):\n        pass\n"
        "    def test_x(self):\n        from SensorlessTrackingLib import mrml_tracking\n"
        "class U:\n    def setUp(self):\n        helper()\n"
        "    def test_y(self):\n        from SensorlessTrackingLib import mrml_tracking\n"
        "def pure():\n    from FreehandUSLib.dependencies import read_requirements\n"
    )
    assert functions_importing_libs_unchecked(source) == [
        "late:9 imports FreehandUSLib.reconstruction",
        "test_x:15 imports SensorlessTrackingLib",
    ]


@pytest.mark.parametrize("module", sorted(CHECK_FREE))
def test_check_free_lib_modules_import_nothing_else(module):
    path = REPO_ROOT / "FreehandUS" / "FreehandUSLib" / CHECK_FREE[module]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." + (node.module or "") if node.level else node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"packaging", ".errors"}
    assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}: call the check before importing it"


# ----------------------------------------------------------------------------- completeness


def _allowed_distributions() -> set[str]:
    """The file's packages, Slicer's and torch, with everything they depend on."""
    allowed, todo = set(), [*SLICER_PROVIDES, *(r.name for r in read_requirements(REQUIREMENTS))]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in allowed:
            continue
        allowed.add(name)
        if name in ("vtk", "slicer-core"):
            continue  # Slicer builds these itself, without the PyPI wheels' dependencies (matplotlib)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return allowed


def _module_file_lib_imports() -> list[str]:
    names = set()
    for module in MODULES:
        for node in ast.walk(ast.parse((REPO_ROOT / module / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and "Lib" in node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return sorted(names)


@pytest.mark.mrml
def test_requirements_file_is_complete_for_what_the_modules_import():
    """Hide every installed distribution outside the allowed set; the modules' Lib imports still load."""
    pytest.importorskip("slicer")
    allowed = _allowed_distributions()
    hidden = set()
    for top, distributions in importlib.metadata.packages_distributions().items():
        if not any(d.lower().replace("_", "-") in allowed for d in distributions):
            hidden.add(top)
    hidden -= {"FreehandUSLib", "NWireCalibrationLib", "SensorlessTrackingLib", "_distutils_hack", "pip", "setuptools"}
    assert "matplotlib" in hidden and "numba" not in hidden
    script = f"""
import importlib, importlib.machinery, importlib.util, sys
HIDDEN = {sorted(hidden)!r}
class Hiding(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in HIDDEN:
            return None
        return super().find_spec(fullname, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Hiding
for folder in {[str(REPO_ROOT / m) for m in MODULES]!r}:
    sys.path.insert(0, folder)
failed = []
for name in {_module_file_lib_imports()!r}:
    if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
        continue
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in HIDDEN:
            failed.append(f"{{name}} needs {{exc.name}}")
    except ImportError:
        pass  # a name imported from a module, not a module
print(failed)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", f"not in requirements.txt: {result.stdout}"


# ----------------------------------------------------------------------------- a fresh Slicer


def _run_harness(*args) -> dict:
    result = subprocess.run(
        [sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FRESH_SLICER_RUNS = [
    ("SensorlessTracking", ["test_recordingFromBrowser", "test_estimatePlotReconstruct"]),
    ("FreehandUS", ["test_sequenceFromBrowser", "test_loadAndSave", "test_liveReconstruction"]),
    ("NWireCalibration", ["test_recordingsFromBrowsers", "test_liveCalibration"]),
]


@pytest.mark.mrml
@pytest.mark.slow
@pytest.mark.parametrize("packaging_api", [False, True], ids=["pip_install", "slicer.packaging"])
@pytest.mark.parametrize("module, methods", FRESH_SLICER_RUNS, ids=[m for m, _ in FRESH_SLICER_RUNS])
def test_self_test_in_a_fresh_slicer_installs_before_importing(module, methods, packaging_api):
    """The module's own self-test (setUp + tests) in a Slicer without numba, OpenCV, pynrrd, h5py."""
    pytest.importorskip("slicer")
    result = _run_harness(module, *methods, *(["--packaging"] if packaging_api else []))
    assert result["premature_import"] is None, f"imported before the installation: {result['premature_import']}"
    assert result["error"] is None, result["error"]
    assert len(result["installs"]) == 1, "one installation, of everything missing, at the first use"
    install = result["installs"][0]
    wanted = sorted(str(r) for r in read_requirements(REQUIREMENTS))
    if packaging_api:
        assert install["via"] == "slicer.packaging.pip_ensure"
        assert sorted(install["arguments"]["requirements"]) == wanted
        assert install["arguments"]["skip_in_testing"] is False and install["arguments"]["prompt_install"] is False
    else:
        assert install["via"] == "slicer.util.pip_install"
        assert sorted(a for a in install["arguments"] if not a.startswith("-") and "constraints" not in a) == wanted
    assert any(line.startswith("numpy==") for line in install["constraints"]), "Slicer's numpy must stay"


def test_dependencies_module_reads_versions_at_call_time(monkeypatch):
    """The harness hides packages by replacing importlib.metadata.version: the Lib must see it."""
    _fake_versions(monkeypatch, {})
    assert dependencies.unmet_requirements(["numpy>=1"])[0].installed is None


# ----------------------------------------------------------------------------- torch (PyTorch extension)

_TORCH_SCRIPT = r"""
import importlib.metadata, json, sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import fresh_slicer_harness as harness
harness.setup_slicer(False, Path(sys.argv[2]))
torch_version, with_extension = sys.argv[3], sys.argv[4] == "1"
real_version = importlib.metadata.version
installed = {"torch": torch_version}
importlib.metadata.version = lambda name: installed.get(name) or real_version(name)
calls = []
if with_extension:
    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement=None):
            calls.append(torchVersionRequirement)
            installed["torch"] = "2.5.1"
            return types.SimpleNamespace(__version__="2.5.1")
    sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
import SensorlessTracking
error = None
try:
    SensorlessTracking.SensorlessTrackingLogic._ensurePackages(torchNeeded=True)
except RuntimeError as exc:
    error = str(exc)
print(json.dumps({"installTorch": calls, "error": error}))
"""


def _torch_check(tmp_path, torch_version: str, with_extension: bool) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _TORCH_SCRIPT, str(HARNESS.parent), str(tmp_path), torch_version,
         "1" if with_extension else "0"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.mrml
@pytest.mark.parametrize(
    "torch_version, with_extension, calls, error",
    [
        ("2.13.0+cpu", False, [], None),  # a torch of a supported version is used as it is
        ("1.13.1", True, [">=2.0"], None),  # too old: PyTorchUtils installs a supported one
        ("1.13.1", False, [], "needs PyTorch >=2.0 from the PyTorch extension"),
    ],
    ids=["supported", "too-old-updated", "too-old-no-extension"],
)
def test_torch_version_is_checked_not_just_importability(tmp_path, torch_version, with_extension, calls, error):
    pytest.importorskip("slicer")
    result = _torch_check(tmp_path, torch_version, with_extension)
    assert result["installTorch"] == calls
    assert (result["error"] is None) if error is None else (error in result["error"])

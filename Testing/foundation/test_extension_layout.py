"""The 3D Slicer extension skeleton, checked without a Slicer application.

Slicer finds most mistakes in these files only at run time, inside the application: a Lib file
missing from a module's CMakeLists (not packaged), a ``self.ui.name`` that the .ui lacks, a
``SlicerParameterName`` that is not a parameter, a widget type ``connectGui`` cannot bind, a
combo box never given the scene. These tests read the files (ast, XML, JSON, PNG) instead.

slicer-core (the MRML wheel) has ``slicer.util`` but neither ``slicer.ScriptedLoadableModule`` nor
``slicer.parameterNodeWrapper`` (nor qt/ctk), so the module files are not imported here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = ("FreehandUS", "NWireCalibration", "SensorlessTracking")
TITLES = {
    "FreehandUS": "Freehand US",
    "NWireCalibration": "N-Wire Calibration",
    "SensorlessTracking": "Sensorless Tracking",
}
FORBIDDEN_IN_LIBS = ("slicer", "qt", "ctk", "__main__")
#: Properties of the catalog entry schema v1.0.2 (Slicer/Schemas; additionalProperties: false).
CATALOG_PROPERTIES = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "dicom_support_rule",
    "build_subdirectory",
    "enabled",
    "tier",
}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
#: Widget classes that slicer.parameterNodeWrapper.connectGui binds, per parameter kind
#: (it compares type(widget) exactly, so subclasses such as ctkComboBox do not bind).
BINDABLE_WIDGETS = {
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "bool": {"QCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox"},
}
#: Methods of a parameterNodeWrapper object (not parameters).
WRAPPER_METHODS = {
    "connectGui",
    "disconnectGui",
    "parameterNode",
    "default",
    "getValue",
    "setValue",
    "isCached",
}
ICONS = [
    "Resources/Icons/FreehandUS.png",
    *(f"{m}/Resources/Icons/{m}.png" for m in MODULES),
]
ICON_SIZE = 128


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def updater():
    """Resources/update_cmake_lists.py loaded as a module (it is a script, not a package)."""
    path = REPO_ROOT / "Resources" / "update_cmake_lists.py"
    spec = importlib.util.spec_from_file_location("update_cmake_lists", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@functools.cache
def _tree(module: str) -> ast.Module:
    path = REPO_ROOT / module / f"{module}.py"
    return ast.parse(path.read_text(), filename=str(path))


def _classes(module: str) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in _tree(module).body if isinstance(node, ast.ClassDef)}


def _names(node) -> set[str]:
    """Simple and dotted names in an expression (``a.b`` gives ``b`` and ``a``)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _enum_names(module: str) -> set[str]:
    return {name for name, cls in _classes(module).items() if any("Enum" in _names(b) for b in cls.bases)}


def _parameter_class(module: str) -> ast.ClassDef:
    return _classes(module)[f"{module}ParameterNode"]


def _parameter_fields(module: str) -> dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class."""
    return {
        node.target.id: node.annotation
        for node in _parameter_class(module).body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def _field_kind(annotation: ast.expr, enums: set[str]) -> tuple[str, str | None, bool]:
    """(kind, node class or None, bounded) of a parameter annotation."""
    bounded = False
    if isinstance(annotation, ast.Subscript) and _names(annotation.value) & {"Annotated"}:
        elements = annotation.slice.elts
        annotation = elements[0]
        extras = set().union(*(_names(e) for e in elements[1:]))
        bounded = "WithinRange" in extras or {"Minimum", "Maximum"} <= extras
    name = annotation.attr if isinstance(annotation, ast.Attribute) else getattr(annotation, "id", "")
    if name.startswith("vtkMRML"):
        return "node", name, bounded
    if name in enums:
        return "enum", None, bounded
    if name in ("Path", "PurePath", "PosixPath", "WindowsPath"):
        return "path", None, bounded
    if name in ("float", "int", "bool", "str"):
        return name, None, bounded
    raise AssertionError(f"unexpected parameter annotation {ast.unparse(annotation)}")


@functools.cache
def _ui_root(module: str) -> ET.Element:
    return ET.parse(REPO_ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


def _ui_widgets(module: str) -> list[ET.Element]:
    return list(_ui_root(module).iter("widget"))


def _ui_object_names(module: str) -> set[str]:
    root = _ui_root(module)
    return {e.get("name") for tag in ("widget", "layout", "spacer", "action") for e in root.iter(tag)}


def _property(widget: ET.Element, name: str) -> ET.Element | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def _parameter_widgets(module: str) -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    bound = {}
    for widget in _ui_widgets(module):
        prop = _property(widget, "SlicerParameterName")
        if prop is not None:
            name = prop.findtext("string")
            assert name not in bound, f"{module}.ui binds parameter {name!r} to two widgets"
            bound[name] = widget
    return bound


def _method_names(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _is_self_attr(node, attr: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _self_ui_references(cls: ast.ClassDef) -> set[str]:
    """Names ``X`` used as ``self.ui.X`` in a class."""
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and _is_self_attr(n.value, "ui")}


def _parameter_attribute_uses(cls: ast.ClassDef) -> set[str]:
    """Attributes read or written on ``self._parameterNode`` (or a local alias of it)."""
    used = set()
    for function in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
        aliases = {
            target.id
            for assign in ast.walk(function)
            if isinstance(assign, ast.Assign) and _is_self_attr(assign.value, "_parameterNode")
            for target in assign.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute):
                continue
            if _is_self_attr(node.value, "_parameterNode") or (
                isinstance(node.value, ast.Name) and node.value.id in aliases
            ):
                used.add(node.attr)
    return used


def forbidden_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of slicer/qt/ctk/__main__ anywhere in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in FORBIDDEN_IN_LIBS:
                found.append((node.lineno, module))
    return found


def _cmake_text(path: Path) -> str:
    """CMake source without comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def _cmake_set(text: str, var: str) -> list[str]:
    match = re.search(r"set\(\s*" + re.escape(var) + r"\b([^)]*)\)", text)
    assert match, f"set({var} ...) not found"
    return [item.strip('"') for item in match.group(1).split()]


def _png_info(path: Path) -> dict:
    """Parse a PNG: checks the signature and every chunk CRC; returns IHDR fields and pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG file"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", f"{path}: IHDR/IEND missing"
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[0][1][:10])
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return {"width": width, "height": height, "depth": depth, "color_type": color_type, "raw": raw}


# ----------------------------------------------------------------------------- CMake


def test_module_cmake_lists_list_every_file(updater):
    problems = updater.check(REPO_ROOT)
    assert not problems, "\n".join(problems) + f"\n{updater.HINT}"


def test_top_level_cmakelists():
    text = _cmake_text(REPO_ROOT / "CMakeLists.txt")
    assert "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)" in text, "as Slicer's extension template"
    assert re.search(r"project\(\s*FreehandUS\s*\)", text)
    for var in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        match = re.search(r"set\(\s*" + var + r'\s+"([^"]+)"\s*\)', text)
        assert match and match.group(1).strip(), f"{var} is not set to a non-empty string"
    assert _cmake_set(text, "EXTENSION_DEPENDS") == ["SlicerOpenIGTLink", "PyTorch"]
    assert re.search(r"find_package\(\s*Slicer\s+REQUIRED\s*\)", text)
    assert "include(${Slicer_USE_FILE})" in text
    subdirectories = re.findall(r"add_subdirectory\(\s*(\w+)\s*\)", text)
    assert subdirectories == list(MODULES)
    generate = text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})")
    cpack = text.index("include(${Slicer_EXTENSION_CPACK})")
    assert text.rindex("add_subdirectory") < generate < cpack, "config and CPack must come after the modules"


def test_extension_icon_url_points_at_the_committed_icon():
    text = _cmake_text(REPO_ROOT / "CMakeLists.txt")
    url = re.search(r'set\(\s*EXTENSION_ICONURL\s+"([^"]+)"', text).group(1)
    relative = url.split("/main/", 1)[1]
    assert relative == "Resources/Icons/FreehandUS.png"
    assert (REPO_ROOT / relative).is_file()


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists(module):
    text = _cmake_text(REPO_ROOT / module / "CMakeLists.txt")
    assert re.search(r"set\(\s*MODULE_NAME\s+" + module + r"\s*\)", text)
    scripts = _cmake_set(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_set(text, "MODULE_PYTHON_RESOURCES")
    assert scripts[0] == "${MODULE_NAME}.py"
    assert scripts[1:] == sorted(scripts[1:]), "Lib scripts must be listed sorted"
    assert "Resources/Icons/${MODULE_NAME}.png" in resources
    assert "Resources/UI/${MODULE_NAME}.ui" in resources
    call = re.search(r"slicerMacroBuildScriptedModule\(([^)]*)\)", text)
    assert call, "slicerMacroBuildScriptedModule(...) not found"
    arguments = call.group(1).split()
    assert arguments == [
        "NAME",
        "${MODULE_NAME}",
        "SCRIPTS",
        "${MODULE_PYTHON_SCRIPTS}",
        "RESOURCES",
        "${MODULE_PYTHON_RESOURCES}",
        "WITH_GENERIC_TESTS",
    ]


# ----------------------------------------------------------------------------- update script


def _fake_extension(root: Path, *, scripts=("${MODULE_NAME}.py",)) -> Path:
    """A one-module extension ``Mod`` with a Lib, a sub-package, a JSON resource and clutter."""
    (root / "CMakeLists.txt").write_text("project(Fake)\nadd_subdirectory(Mod) # the module\n")
    module = root / "Mod"
    for relative in (
        "Mod.py",
        "Resources/Icons/Mod.png",
        "Resources/UI/Mod.ui",
        "Resources/Translations/Mod_fr.ts",
        "ModLib/__init__.py",
        "ModLib/core.py",
        "ModLib/sub/__init__.py",
        "ModLib/sub/alpha.py",
        "ModLib/data/phantom.json",
        "ModLib/__pycache__/core.cpython-311.pyc",
        "ModLib/.scratch.py",
    ):
        (module / relative).parent.mkdir(parents=True, exist_ok=True)
        (module / relative).write_text("")
    listed = "\n".join(f"  {s}" for s in scripts)
    (module / "CMakeLists.txt").write_text(
        "set(MODULE_NAME Mod)\n"
        f"set(MODULE_PYTHON_SCRIPTS\n{listed}\n  )\n"
        "set(MODULE_PYTHON_RESOURCES\n"
        "  Resources/Icons/${MODULE_NAME}.png\n  Resources/UI/${MODULE_NAME}.ui\n  )\n"
        "slicerMacroBuildScriptedModule(NAME ${MODULE_NAME} SCRIPTS ${MODULE_PYTHON_SCRIPTS}"
        " RESOURCES ${MODULE_PYTHON_RESOURCES} WITH_GENERIC_TESTS)\n"
    )
    return module


def test_update_script_check_names_missing_files(tmp_path, updater):
    _fake_extension(tmp_path)
    problems = "\n".join(updater.check(tmp_path))
    for name in ("ModLib/__init__.py", "ModLib/core.py", "ModLib/sub/alpha.py", "ModLib/sub/__init__.py"):
        assert name in problems
    assert "MODULE_PYTHON_RESOURCES is missing ModLib/data/phantom.json" in problems
    assert "__pycache__" not in problems and ".scratch" not in problems and "Translations" not in problems


def test_update_script_rewrites_lists_sorted_and_is_idempotent(tmp_path, updater):
    module = _fake_extension(tmp_path)
    assert updater.update(tmp_path) == [module / "CMakeLists.txt"]
    assert updater.check(tmp_path) == []
    text = (module / "CMakeLists.txt").read_text()
    assert _cmake_set(text, "MODULE_PYTHON_SCRIPTS") == [
        "${MODULE_NAME}.py",
        "ModLib/__init__.py",
        "ModLib/core.py",
        "ModLib/sub/__init__.py",
        "ModLib/sub/alpha.py",
    ]
    assert _cmake_set(text, "MODULE_PYTHON_RESOURCES") == [
        "Resources/Icons/${MODULE_NAME}.png",
        "Resources/UI/${MODULE_NAME}.ui",
        "ModLib/data/phantom.json",
    ]
    assert "slicerMacroBuildScriptedModule(NAME ${MODULE_NAME}" in text, "the rest of the file is kept"
    assert updater.update(tmp_path) == []


def test_update_script_drops_entries_for_deleted_files(tmp_path, updater):
    module = _fake_extension(tmp_path, scripts=("${MODULE_NAME}.py", "ModLib/gone.py"))
    assert "MODULE_PYTHON_SCRIPTS lists files that do not exist: ModLib/gone.py" in "\n".join(
        updater.check(tmp_path)
    )
    updater.update(tmp_path)
    assert "ModLib/gone.py" not in (module / "CMakeLists.txt").read_text()
    assert updater.check(tmp_path) == []


def test_update_script_flags_non_python_file_in_scripts(tmp_path, updater):
    _fake_extension(tmp_path, scripts=("${MODULE_NAME}.py", "ModLib/data/phantom.json"))
    problems = "\n".join(updater.check(tmp_path))
    assert "ModLib/data/phantom.json, which is not a .py file" in problems
    assert "MODULE_PYTHON_RESOURCES" in problems


def test_update_script_command_line(tmp_path, updater, capsys):
    _fake_extension(tmp_path)
    assert updater.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ModLib/core.py" in out and updater.HINT in out
    assert updater.main(["--root", str(tmp_path)]) == 0
    assert updater.main(["--check", "--root", str(tmp_path)]) == 0


def test_update_script_reports_a_cmakelists_without_the_block(tmp_path, updater, capsys):
    module = _fake_extension(tmp_path)
    (module / "CMakeLists.txt").write_text("set(MODULE_NAME Mod)\n")
    with pytest.raises(ValueError, match=r"Mod/CMakeLists.txt: no set\(MODULE_PYTHON_SCRIPTS"):
        updater.check(tmp_path)
    assert updater.main(["--check", "--root", str(tmp_path)]) == 2
    assert "MODULE_PYTHON_SCRIPTS" in capsys.readouterr().err


def test_update_script_needs_add_subdirectory(tmp_path, updater):
    (tmp_path / "CMakeLists.txt").write_text("project(Fake)\n# add_subdirectory(Commented)\n")
    with pytest.raises(ValueError, match="no add_subdirectory"):
        updater.module_names(tmp_path)


# ----------------------------------------------------------------------------- catalog entry


def test_catalog_entry():
    entry = json.loads((REPO_ROOT / "FreehandUS.json").read_text())
    assert CATALOG_REQUIRED <= set(entry), f"missing {CATALOG_REQUIRED - set(entry)}"
    assert set(entry) <= CATALOG_PROPERTIES, f"not in the schema: {set(entry) - CATALOG_PROPERTIES}"
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
        r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#",
        entry["$schema"],
    )
    assert entry["category"] == "Ultrasound"
    assert entry["scm_url"].startswith("https://github.com/")
    assert isinstance(entry["enabled"], bool)
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["build_subdirectory"] == "."
    cmake = _cmake_text(REPO_ROOT / "CMakeLists.txt")
    assert entry["build_dependencies"] == _cmake_set(cmake, "EXTENSION_DEPENDS")
    assert entry["category"] == _cmake_set(cmake, "EXTENSION_CATEGORY")[0]


def test_license_is_bsd3():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "FreehandUS developers" in text
    assert "Neither the name of the copyright holder" in text


# ----------------------------------------------------------------------------- module files


@pytest.mark.parametrize("module", MODULES)
def test_module_defines_template_classes_in_order(module):
    classes = _classes(module)
    expected = [module, f"{module}ParameterNode", f"{module}Widget", f"{module}Logic", f"{module}Test"]
    order = [name for name in classes if name in expected]
    assert order == expected, f"{module}.py classes out of template order: {order}"
    bases = {name: set().union(*(_names(b) for b in classes[name].bases)) for name in expected}
    assert "ScriptedLoadableModule" in bases[module]
    assert {"ScriptedLoadableModuleWidget", "VTKObservationMixin"} <= bases[f"{module}Widget"]
    assert "ScriptedLoadableModuleLogic" in bases[f"{module}Logic"]
    assert "ScriptedLoadableModuleTest" in bases[f"{module}Test"]
    decorators = set().union(*(_names(d) for d in classes[f"{module}ParameterNode"].decorator_list))
    assert "parameterNodeWrapper" in decorators


def _module_attribute_values(module: str) -> dict[str, ast.expr]:
    """``self.parent.<attr> = value`` assignments in the Module class."""
    init = next(
        n for n in _classes(module)[module].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    values = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and _is_self_attr(target.value, "parent"):
                values[target.attr] = node.value
    return values


def _strings(node: ast.expr) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata(module):
    values = _module_attribute_values(module)
    assert TITLES[module] in _strings(values["title"])
    assert "Ultrasound" in _strings(values["categories"])
    dependencies = ast.literal_eval(values["dependencies"])
    assert "Sequences" in dependencies
    if module != "FreehandUS":
        assert "FreehandUS" in dependencies, "FreehandUSLib is found through the FreehandUS module folder"
    assert ast.literal_eval(values["contributors"])
    help_text = "".join(_strings(values["helpText"]))
    assert "<pre>" in help_text and f"{module}.{module}Logic()" in help_text, "help needs a console example"
    assert "".join(_strings(values["acknowledgementText"])).strip()


@pytest.mark.parametrize("module", MODULES)
def test_widget_uses_only_names_the_ui_defines(module):
    widget = _classes(module)[f"{module}Widget"]
    missing = _self_ui_references(widget) - _ui_object_names(module)
    assert not missing, f"{module}Widget uses self.ui.{sorted(missing)} that {module}.ui does not define"
    assert _self_ui_references(widget), "the widget uses no ui element at all"


@pytest.mark.parametrize("module", MODULES)
def test_widget_connects_existing_slots_and_logic_methods(module):
    classes = _classes(module)
    widget, logic = classes[f"{module}Widget"], classes[f"{module}Logic"]
    widget_methods, logic_methods = _method_names(widget), _method_names(logic)
    slots = set()
    for call in (n for n in ast.walk(widget) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Attribute) and call.func.attr == "connect" and len(call.args) == 2:
            slot = call.args[1]
            if _is_self_attr(slot, getattr(slot, "attr", "")):
                slots.add(slot.attr)
    assert slots, "no button is connected"
    assert slots <= widget_methods, f"connected to undefined slots {sorted(slots - widget_methods)}"
    logic_calls = {
        n.attr for n in ast.walk(widget) if isinstance(n, ast.Attribute) and _is_self_attr(n.value, "logic")
    }
    assert logic_calls <= logic_methods, (
        f"Widget calls missing Logic methods {sorted(logic_calls - logic_methods)}"
    )


@pytest.mark.parametrize("module", MODULES)
def test_widget_uses_only_existing_parameters(module):
    widget = _classes(module)[f"{module}Widget"]
    used = _parameter_attribute_uses(widget) - WRAPPER_METHODS
    fields = set(_parameter_fields(module))
    assert used, "the widget reads no parameter"
    assert used <= fields, f"{module}Widget uses parameters {sorted(used - fields)} that are not defined"


@pytest.mark.parametrize("module", MODULES)
def test_widget_reload_drops_its_lib(module):
    widget = _classes(module)[f"{module}Widget"]
    reload = next((n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onReload"), None)
    assert reload is not None, f"{module}Widget has no onReload"
    assert f"{module}Lib" in _strings(reload) and "modules" in _names(reload), (
        "onReload must purge sys.modules"
    )
    imported = {alias.name for n in ast.walk(_tree(module)) if isinstance(n, ast.Import) for alias in n.names}
    assert "imp" not in imported, "the imp module is gone in Python 3.12"


def test_logic_public_api():
    assert {"getParameterNode", "loadSequence", "sequenceFromBrowser", "saveSequence", "sequenceSummary"} <= (
        _method_names(_classes("FreehandUS")["FreehandUSLogic"])
    )
    for module in ("NWireCalibration", "SensorlessTracking"):
        assert {"getParameterNode", "sequenceFromBrowser"} <= _method_names(
            _classes(module)[f"{module}Logic"]
        )


@pytest.mark.parametrize("module", MODULES)
def test_self_test_runs_setup_and_tests(module):
    test_class = _classes(module)[f"{module}Test"]
    run = next(n for n in test_class.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    called = {
        n.func.attr for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    tests = {name for name in _method_names(test_class) if name.startswith("test_")}
    assert "setUp" in called and tests and tests <= called, f"runTest must call setUp and {sorted(tests)}"
    logic_used = any(
        f"{module}Logic" in _names(fn) for fn in test_class.body if isinstance(fn, ast.FunctionDef)
    )
    assert logic_used, "the self-test must call the Logic"


def _enum_values(module: str, enum_name: str) -> dict[str, str]:
    cls = _classes(module)[enum_name]
    return {
        node.targets[0].id: node.value.value
        for node in cls.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }


def _parameter_defaults(module: str) -> dict[str, str]:
    return {
        node.target.id: ast.unparse(node.value)
        for node in _parameter_class(module).body
        if isinstance(node, ast.AnnAssign) and node.value is not None
    }


def test_reconstruction_choices_and_defaults_follow_the_lib():
    """The panel's choices are option strings of FreehandUSLib.reconstruction, with its defaults."""
    from FreehandUSLib.reconstruction import COMPOUNDINGS, INTERPOLATIONS, ReconstructionOptions

    interpolations = _enum_values("FreehandUS", "Interpolation")
    compoundings = _enum_values("FreehandUS", "Compounding")
    assert set(interpolations.values()) == set(INTERPOLATIONS)
    assert set(compoundings.values()) <= set(COMPOUNDINGS)
    defaults = ReconstructionOptions()
    panel = _parameter_defaults("FreehandUS")
    assert interpolations[panel["interpolation"].split(".")[1]] == defaults.interpolation
    assert compoundings[panel["compounding"].split(".")[1]] == defaults.compounding
    assert float(panel["outputSpacingMm"]) == pytest.approx(min(np.atleast_1d(defaults.output_spacing_mm)))
    assert ast.literal_eval(panel["fillHoles"]) == defaults.fill_holes
    assert ast.literal_eval(panel["plusArithmetic"]) == defaults.emulate_plus


def test_torch_comes_from_the_pytorch_extension():
    """torch is never pip-installed by the modules (PyTorchUtils picks a build for the GPU driver);
    the other packages are in FreehandUS/Resources/requirements.txt (test_slicer_dependencies.py)."""
    sensorless_source = (REPO_ROOT / "SensorlessTracking" / "SensorlessTracking.py").read_text()
    assert "PyTorchUtils" in sensorless_source
    assert "pip_install" not in sensorless_source


# ----------------------------------------------------------------------------- .ui files


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_structure(module):
    root = _ui_root(module)
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == module
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module
    widgets = _ui_widgets(module)
    names = [w.get("name") for w in widgets]
    assert len(names) == len(set(names)), "object names must be unique"
    classes = {w.get("class") for w in widgets}
    assert "ctkCollapsibleButton" in classes and "QPushButton" in classes
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {c for c in classes if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"custom widgets not declared in <customwidgets>: {sorted(custom - declared)}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_bind_to_parameters(module):
    fields = _parameter_fields(module)
    enums = _enum_names(module)
    bound = _parameter_widgets(module)
    assert bound, f"{module}.ui has no SlicerParameterName property"
    unknown = set(bound) - set(fields)
    assert not unknown, f"{module}.ui binds {sorted(unknown)}, which are not fields of {module}ParameterNode"
    for name, widget in bound.items():
        kind, node_class, bounded = _field_kind(fields[name], enums)
        widget_class = widget.get("class")
        assert widget_class in BINDABLE_WIDGETS[kind], (
            f"{module}.ui: parameter {name!r} ({kind}) is bound to a {widget_class}, "
            f"which connectGui cannot bind; use one of {sorted(BINDABLE_WIDGETS[kind])}"
        )
        if widget_class in ("ctkSliderWidget", "QSlider"):
            assert bounded, f"{name}: a slider needs WithinRange (or Minimum and Maximum)"
        if kind == "node":
            node_types = _property(widget, "nodeTypes")
            assert node_types is not None and node_types.findtext("stringlist/string") == node_class


@pytest.mark.parametrize("module", MODULES)
def test_ui_node_selectors_get_the_scene(module):
    root = _ui_root(module)
    selectors = {w.get("name") for w in _ui_widgets(module) if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == module
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors, "no node selector"
    assert selectors <= connected, f"selectors never given the scene: {sorted(selectors - connected)}"
    bound = {w.get("name") for w in _parameter_widgets(module).values()}
    assert selectors <= bound, "every node selector is bound to a parameter"


# ----------------------------------------------------------------------------- icons


@pytest.mark.parametrize("relative", ICONS)
def test_icons_are_128px_rgba_png(relative):
    info = _png_info(REPO_ROOT / relative)
    assert (info["width"], info["height"]) == (ICON_SIZE, ICON_SIZE)
    assert (info["depth"], info["color_type"]) == (8, 6), "8-bit RGBA expected"
    assert len(info["raw"]) == ICON_SIZE * (1 + ICON_SIZE * 4)
    assert any(info["raw"]), "icon is empty"


def test_png_checker_rejects_a_corrupt_file(tmp_path):
    data = bytearray((REPO_ROOT / ICONS[0]).read_bytes())
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="bad CRC"):
        _png_info(bad)


def test_committed_icons_match_make_icons(tmp_path):
    """The PNGs in the repository are what Resources/make_icons.py draws (within antialiasing)."""
    pytest.importorskip("matplotlib")
    image = pytest.importorskip("PIL.Image")
    spec = importlib.util.spec_from_file_location("make_icons", REPO_ROOT / "Resources" / "make_icons.py")
    make_icons = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icons)
    assert set(make_icons.ICONS) == set(ICONS)
    for relative, draw in make_icons.ICONS.items():
        fresh = make_icons.draw_icon(draw, tmp_path / relative.replace("/", "_"))
        committed = np.asarray(image.open(REPO_ROOT / relative).convert("RGBA"), dtype=float)
        drawn = np.asarray(image.open(fresh).convert("RGBA"), dtype=float)
        assert committed.shape == drawn.shape == (ICON_SIZE, ICON_SIZE, 4)
        assert np.abs(committed - drawn).mean() < 2.0, (
            f"{relative} is stale: run python Resources/make_icons.py"
        )


# ----------------------------------------------------------------------------- Lib purity


def _lib_files() -> list[Path]:
    files = []
    for module in MODULES:
        for lib in sorted((REPO_ROOT / module).glob("*Lib")):
            files.extend(p for p in sorted(lib.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def test_libs_do_not_import_slicer_qt_ctk():
    files = _lib_files()
    assert any(f.name == "sequence.py" for f in files), "Lib files not found"
    offenders = []
    for path in files:
        relative = path.relative_to(REPO_ROOT).as_posix()
        offenders += [f"{relative}:{line} imports {name}" for line, name in forbidden_imports(path.read_text())]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import qt\n", [(1, "qt")]),
        ("def f():\n    from slicer.util import arrayFromVolume\n", [(2, "slicer.util")]),
        ("import numpy, ctk\n", [(1, "ctk")]),
        ("from __main__ import slicer\n", [(1, "__main__")]),
        ("import slicerx\nfrom . import slicer\nimport qtpy\nfrom slicer_core.MRMLCore import vtkMRMLScene\n", []),
    ],
)
def test_forbidden_import_scanner(source, expected):
    assert forbidden_imports(source) == expected


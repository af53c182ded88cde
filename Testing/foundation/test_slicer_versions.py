"""Supported Slicer versions: stated in one wording everywhere, and the code runs on their Python.

The modules run on 3D Slicer 5.10 and later: Slicer 5.10, 5.12 and the 5.13 preview bundle
Python 3.12 (Slicer 5.8 and older bundle Python 3.9, which the code does not support: it uses
3.10+ syntax and libraries). The command line needs Python 3.11+ (pyproject's requires-python).

Checked here without those interpreters: every Python file parses with the grammar of the oldest
stated Python (``ast.parse(feature_version=...)``), compiles with warnings as errors (invalid
escape sequences are errors-to-be from 3.12 on), imports no standard-library module that a stated
Python removed, and evaluates no ``X | Y`` annotation at definition time on a Python older than
3.10. Where a Python 3.12 interpreter is installed (Slicer's), every file is compiled with it too.
"""

from __future__ import annotations

import ast
import glob
import json
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = ("FreehandUS", "NWireCalibration", "SensorlessTracking")
#: The oldest supported Slicer and the Python it bundles (Slicer's CMakeLists, 5.10.0: 3.12.10).
MINIMUM_SLICER = "5.10"
SLICER_PYTHON = (3, 12)
#: The wording used in README, the module help and the catalog description.
STATEMENT = f"Slicer {MINIMUM_SLICER} and later"
#: Standard-library modules removed by Python 3.12 and 3.13 (PEP 594, PEP 632, imp).
REMOVED_MODULES = {
    "distutils", "imp", "asynchat", "asyncore", "smtpd",
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",
}  # fmt: skip


def _python_files() -> list[Path]:
    folders = [REPO_ROOT / m for m in MODULES] + [REPO_ROOT / "Resources", REPO_ROOT / "Testing"]
    return sorted(p for folder in folders for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _cli_minimum() -> tuple[int, int]:
    spec = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def _oldest_python() -> tuple[int, int]:
    return min(_cli_minimum(), SLICER_PYTHON)


def pep604_at_definition_time(source: str, python: tuple[int, int]) -> list[int]:
    """Lines where ``X | Y`` in an annotation is evaluated when the definition runs, on ``python``.

    Function signatures and class/module-level annotations are evaluated at definition time
    unless the module starts with ``from __future__ import annotations``; ``X | Y`` of types
    raises TypeError there before Python 3.10.
    """
    if python >= (3, 10):
        return []
    tree = ast.parse(source)
    future = any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    if future:
        return []
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
            every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
            annotations += [a.annotation for a in every if a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    lines = set()
    for annotation in annotations:
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                lines.add(sub.lineno)
    return sorted(lines)


def test_pep604_checker_finds_definition_time_unions():
    source = "def f(x: int | None) -> str | None:\n    y: int | None = None\n    return None\n"
    assert pep604_at_definition_time(source, (3, 9)) == [1, 2]
    assert pep604_at_definition_time(source, (3, 10)) == []
    assert pep604_at_definition_time("from __future__ import annotations\n" + source, (3, 9)) == []


def test_no_definition_time_unions_on_the_oldest_python():
    oldest = _oldest_python()
    offenders = {}
    for path in _python_files():
        lines = pep604_at_definition_time(path.read_text(), oldest)
        if lines:
            offenders[str(path.relative_to(REPO_ROOT))] = lines
    assert not offenders


@pytest.mark.parametrize("python", sorted({(3, 11), SLICER_PYTHON}), ids=lambda v: f"py{v[0]}.{v[1]}")
def test_every_file_parses_with_each_stated_python_grammar(python):
    if python < _oldest_python():
        pytest.fail(f"Python {python} is below the oldest stated one")
    problems = []
    for path in _python_files():
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=python)
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(REPO_ROOT)}:{exc.lineno}: {exc.msg}")
    assert not problems


def test_every_file_compiles_with_warnings_as_errors():
    problems = []
    for path in _python_files():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(), str(path), "exec")
            except (SyntaxError, SyntaxWarning, DeprecationWarning) as exc:
                problems.append(f"{path.relative_to(REPO_ROOT)}: {exc}")
    assert not problems


def test_compile_check_catches_an_invalid_escape():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises((SyntaxError, SyntaxWarning, DeprecationWarning)):
            compile('pattern = "\\d+"\n', "bad.py", "exec")


def test_no_import_of_a_removed_standard_library_module():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(REPO_ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in REMOVED_MODULES
            ]
    assert not offenders


def _slicer_python() -> str | None:
    """A Python 3.12 interpreter (Slicer's version), if one is installed here."""
    pyenv = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12*/bin/python3.12")))
    found = shutil.which("python3.12")
    candidates = [*pyenv, *([found] if found and "shims" not in Path(found).parts else [])]
    return next(iter(candidates), None)


def test_every_file_compiles_with_slicers_python():
    python = _slicer_python()
    if python is None:
        pytest.skip("no Python 3.12 interpreter installed (Slicer 5.10+ bundles 3.12)")
    script = (
        "import json, sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "bad = []\n"
        "for path in json.loads(sys.stdin.read()):\n"
        "    try:\n"
        "        with open(path, encoding='utf-8') as f:\n"
        "            compile(f.read(), path, 'exec')\n"
        "    except (SyntaxError, Warning) as exc:\n"
        "        bad.append(f'{path}: {exc}')\n"
        "print(json.dumps([sys.version_info[:2], bad]))\n"
    )
    files = json.dumps([str(p) for p in _python_files()])
    result = subprocess.run([python, "-c", script], input=files, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    version, bad = json.loads(result.stdout)
    assert tuple(version) == SLICER_PYTHON
    assert not bad


# ----------------------------------------------------------------------------- where it is stated


def test_supported_versions_are_stated_everywhere():
    assert _cli_minimum() <= SLICER_PYTHON, "Slicer's Python must satisfy requires-python"
    readme = (REPO_ROOT / "README.md").read_text()
    assert STATEMENT in readme and f"Python {SLICER_PYTHON[0]}.{SLICER_PYTHON[1]}" in readme
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    description = re.search(r'set\(EXTENSION_DESCRIPTION\s+"([^"]+)"\)', cmake).group(1)
    assert STATEMENT in description
    for module in MODULES:
        help_text = (REPO_ROOT / module / f"{module}.py").read_text()
        assert f"3D {STATEMENT} (their bundled Python {SLICER_PYTHON[0]}.{SLICER_PYTHON[1]})" in help_text, module


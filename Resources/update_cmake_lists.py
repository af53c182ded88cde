#!/usr/bin/env python3
"""Keep each module's ``CMakeLists.txt`` in step with the files on disk.

Slicer packages only the files a scripted module lists in its ``CMakeLists.txt``:

- ``MODULE_PYTHON_SCRIPTS``: Python files. ``slicerMacroBuildScriptedModule`` hands them to CTK's
  ``ctkMacroCompilePythonScript``, which copies and byte-compiles them and appends ``.py`` to any
  entry whose extension does not match ``py`` -- so a ``.json`` listed here would be looked for as
  ``x.json.py`` and the build fails.
- ``MODULE_PYTHON_RESOURCES``: every other file (icons, ``.ui``, ``*.json`` inside a Lib...). They
  are copied as they are, keeping their path relative to the module folder, so
  ``FreehandUSLib/data/x.json`` lands next to the installed ``FreehandUSLib/`` package.

The modules are the ``add_subdirectory(...)`` entries of the top-level ``CMakeLists.txt``. For a
module ``M`` the files that must be listed are:

- scripts: ``M.py`` and every ``.py`` file under ``M/*Lib/``;
- resources: every file under ``M/Resources/`` (except ``Translations/``) and every non-``.py``
  file under ``M/*Lib/``;

skipping ``__pycache__``, compiled files and names that start with a dot. Entries outside the Libs
that are already listed (``${MODULE_NAME}.py``, ``Resources/Icons/${MODULE_NAME}.png``...) keep their
spelling and order; Lib entries are rewritten sorted.

Usage::

    python Resources/update_cmake_lists.py            # rewrite the lists in place
    python Resources/update_cmake_lists.py --check    # exit 1 and name missing / extra files
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HINT",
    "ModuleLists",
    "check",
    "check_module",
    "expected_files",
    "main",
    "module_names",
    "parse_cmake_list",
    "update",
    "update_module",
]

#: What to tell a developer whose lists are out of date.
HINT = "run python Resources/update_cmake_lists.py"

SCRIPTS_VAR = "MODULE_PYTHON_SCRIPTS"
RESOURCES_VAR = "MODULE_PYTHON_RESOURCES"

REPO_ROOT = Path(__file__).resolve().parents[1]

# Build outputs are not sources: the C kernels (reconstruction/native) are built on the machine.
_SKIPPED_SUFFIXES = (".pyc", ".pyo", ".so")
_SKIPPED_RESOURCE_DIRS = ("Translations",)


def _set_block_pattern(var: str) -> re.Pattern:
    # Entries never contain ")" (CMake variables use braces), so the first ")" closes the block.
    return re.compile(r"set\(\s*" + re.escape(var) + r"\b(?P<body>[^)]*)\)", re.IGNORECASE)


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0]


def parse_cmake_list(text: str, var: str, *, source: str = "CMakeLists.txt") -> list[str]:
    """Entries of ``set(<var> ...)`` in CMake ``text``, comments removed, in order.

    Raises
    ------
    ValueError
        If ``text`` has no ``set(<var> ...)`` block (the message names ``source`` and ``var``).
    """
    match = _set_block_pattern(var).search(text)
    if match is None:
        raise ValueError(f"{source}: no set({var} ...) block found")
    entries = []
    for line in match.group("body").splitlines():
        entries.extend(_strip_comment(line).split())
    return entries


def module_names(root: Path) -> list[str]:
    """Module folders named by ``add_subdirectory(...)`` in ``root/CMakeLists.txt``, in order.

    Raises
    ------
    FileNotFoundError
        If ``root/CMakeLists.txt`` does not exist.
    ValueError
        If it has no ``add_subdirectory`` entry.
    """
    cmake = Path(root) / "CMakeLists.txt"
    if not cmake.is_file():
        raise FileNotFoundError(f"{cmake}: top-level CMakeLists.txt not found")
    text = "\n".join(_strip_comment(line) for line in cmake.read_text().splitlines())
    names = re.findall(r"add_subdirectory\(\s*([^\s)]+)", text, flags=re.IGNORECASE)
    if not names:
        raise ValueError(f"{cmake}: no add_subdirectory(...) entry, expected one per module")
    return names


def _walk_files(folder: Path):
    """Files under ``folder`` (relative paths), skipping caches, compiled and hidden files."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and not path.name.endswith(_SKIPPED_SUFFIXES):
            yield path


def _lib_dirs(module_dir: Path) -> list[Path]:
    return sorted(
        d
        for d in module_dir.iterdir()
        if d.is_dir() and d.name.endswith("Lib") and (d / "__init__.py").is_file()
    )


def _is_lib_entry(entry: str, lib_names: set[str]) -> bool:
    return entry.split("/", 1)[0] in lib_names


@dataclass
class ModuleLists:
    """What a module's CMakeLists lists, compared with what it should list.

    All paths are POSIX paths relative to the module folder, ``${MODULE_NAME}`` expanded.
    """

    name: str
    cmake_path: Path
    missing_scripts: list[str] = field(default_factory=list)
    extra_scripts: list[str] = field(default_factory=list)
    missing_resources: list[str] = field(default_factory=list)
    extra_resources: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing_scripts
            or self.extra_scripts
            or self.missing_resources
            or self.extra_resources
            or self.misplaced
        )

    def problems(self) -> list[str]:
        """One human-readable line per kind of mismatch."""
        where = f"{self.name}/CMakeLists.txt"
        lines = []
        if self.missing_scripts:
            lines.append(f"{where}: {SCRIPTS_VAR} is missing {', '.join(self.missing_scripts)}")
        if self.extra_scripts:
            lines.append(
                f"{where}: {SCRIPTS_VAR} lists files that do not exist: {', '.join(self.extra_scripts)}"
            )
        if self.missing_resources:
            lines.append(f"{where}: {RESOURCES_VAR} is missing {', '.join(self.missing_resources)}")
        if self.extra_resources:
            lines.append(
                f"{where}: {RESOURCES_VAR} lists files that do not exist: {', '.join(self.extra_resources)}"
            )
        for item in self.misplaced:
            lines.append(f"{where}: {item}")
        return lines


def expected_files(module_dir: Path) -> tuple[list[str], list[str]]:
    """Sorted ``(scripts, resources)`` a module must list (POSIX paths relative to ``module_dir``)."""
    module_dir = Path(module_dir)
    name = module_dir.name
    scripts = [f"{name}.py"] if (module_dir / f"{name}.py").is_file() else []
    resources = []
    resource_dir = module_dir / "Resources"
    if resource_dir.is_dir():
        for path in _walk_files(resource_dir):
            rel = path.relative_to(module_dir)
            if rel.parts[1] in _SKIPPED_RESOURCE_DIRS:
                continue
            resources.append(rel.as_posix())
    lib_scripts = []
    for lib in _lib_dirs(module_dir):
        for path in _walk_files(lib):
            rel = path.relative_to(module_dir).as_posix()
            (lib_scripts if path.suffix == ".py" else resources).append(rel)
    return scripts + sorted(lib_scripts), sorted(resources)


def _read_lists(module_dir: Path) -> tuple[Path, str, list[str], list[str]]:
    cmake = module_dir / "CMakeLists.txt"
    if not cmake.is_file():
        raise FileNotFoundError(f"{cmake}: module CMakeLists.txt not found")
    text = cmake.read_text()
    source = f"{module_dir.name}/CMakeLists.txt"
    return (
        cmake,
        text,
        parse_cmake_list(text, SCRIPTS_VAR, source=source),
        parse_cmake_list(text, RESOURCES_VAR, source=source),
    )


def _expand(entry: str, name: str) -> str:
    return entry.replace("${MODULE_NAME}", name)


def check_module(module_dir: Path) -> ModuleLists:
    """Compare one module's CMake lists with its files (see the module docstring for the rules)."""
    module_dir = Path(module_dir)
    name = module_dir.name
    cmake, _, scripts, resources = _read_lists(module_dir)
    want_scripts, want_resources = expected_files(module_dir)
    have_scripts = [_expand(e, name) for e in scripts]
    have_resources = [_expand(e, name) for e in resources]
    result = ModuleLists(name=name, cmake_path=cmake)
    result.missing_scripts = [f for f in want_scripts if f not in have_scripts]
    result.missing_resources = [f for f in want_resources if f not in have_resources]
    result.extra_scripts = [f for f in have_scripts if not (module_dir / f).is_file()]
    result.extra_resources = [f for f in have_resources if not (module_dir / f).is_file()]
    for entry in have_scripts:
        if not entry.endswith(".py"):
            result.misplaced.append(
                f"{SCRIPTS_VAR} holds {entry}, which is not a .py file (CTK would look for {entry}.py); "
                f"list it in {RESOURCES_VAR}"
            )
    for entry in have_resources:
        if entry.endswith(".py") and entry in want_scripts:
            result.misplaced.append(
                f"{RESOURCES_VAR} holds {entry}, a Python file that is not byte-compiled there; "
                f"list it in {SCRIPTS_VAR}"
            )
    return result


def check(root: Path = REPO_ROOT) -> list[str]:
    """Problems (one line each) across all modules; an empty list when every list is complete."""
    problems = []
    for name in module_names(root):
        problems.extend(check_module(Path(root) / name).problems())
    return problems


def _render_block(var: str, entries: list[str]) -> str:
    body = "".join(f"  {entry}\n" for entry in entries)
    return f"set({var}\n{body}  )"


def _rewritten_entries(
    current: list[str], wanted: list[str], module_dir: Path, lib_names: set[str]
) -> list[str]:
    """Keep existing non-Lib entries that exist (as spelled), add missing ones, then sorted Lib files."""
    name = module_dir.name
    kept, seen = [], set()
    for entry in current:
        expanded = _expand(entry, name)
        if _is_lib_entry(expanded, lib_names) or expanded in seen:
            continue
        if (module_dir / expanded).is_file() and expanded in wanted:
            kept.append(entry)
            seen.add(expanded)
    extra_non_lib = [
        ("${MODULE_NAME}.py" if f == f"{name}.py" else f)
        for f in wanted
        if f not in seen and not _is_lib_entry(f, lib_names)
    ]
    lib_entries = sorted(f for f in wanted if _is_lib_entry(f, lib_names))
    return kept + extra_non_lib + lib_entries


def update_module(module_dir: Path) -> bool:
    """Rewrite one module's two lists from disk. Returns True if the file changed."""
    module_dir = Path(module_dir)
    cmake, text, scripts, resources = _read_lists(module_dir)
    want_scripts, want_resources = expected_files(module_dir)
    lib_names = {d.name for d in _lib_dirs(module_dir)}
    new_text = text
    for var, current, wanted in (
        (SCRIPTS_VAR, scripts, want_scripts),
        (RESOURCES_VAR, resources, want_resources),
    ):
        entries = _rewritten_entries(current, wanted, module_dir, lib_names)
        block = _render_block(var, entries)
        new_text = _set_block_pattern(var).sub(lambda _m, b=block: b, new_text, count=1)
    if new_text != text:
        cmake.write_text(new_text)
        return True
    return False


def update(root: Path = REPO_ROOT) -> list[Path]:
    """Rewrite every module's lists; returns the CMakeLists.txt files that changed."""
    changed = []
    for name in module_names(root):
        module_dir = Path(root) / name
        if update_module(module_dir):
            changed.append(module_dir / "CMakeLists.txt")
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a list is out of date")
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT, help="extension source folder (default: this repo)"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.root)
            for line in problems:
                print(line)
            if problems:
                print(HINT)
                return 1
            print("CMake lists are complete.")
            return 0
        changed = update(args.root)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"updated {path}")
    if not changed:
        print("CMake lists were already complete.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

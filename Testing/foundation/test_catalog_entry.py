"""The extension is ready for the Slicer extensions catalog (the ExtensionsIndex's checks, offline).

The Slicer ExtensionsIndex runs a check script on every submitted description file
(``scripts/check_description_files.py`` there). :func:`catalog_problems` makes the same checks
in our own code, without network access:

- the file is JSON with LF line endings and valid against the catalog entry schema v1.0.2
  (required keys, no other keys, types, ``scm_type`` and ``tier`` ranges);
- the extension name (the file's name) does not start with "Slicer"; the repository name in
  ``scm_url`` does (``Slicer``, ``Slicer-``, ``Slicer_``, ``SlicerExtension-``...); ``scm_url`` is
  ``scheme://host/path`` with scheme git or https; the category is one the index accepts;
- the top-level CMakeLists.txt: ``project()`` is the extension name; ``EXTENSION_ICONURL`` and
  ``EXTENSION_SCREENSHOTURLS`` are set (with the index's own patterns) to http(s) URLs of images.
  Offline, an image URL must be a raw.githubusercontent.com URL of this repository at
  ``scm_revision`` whose file is committed here and is a valid PNG (the index downloads it);
- a license file in the repository root; the repository under 100 MB.

Not checked here (they need the network): that the GitHub repository exists and carries the
``3d-slicer-extension`` topic, and that the build dependencies are catalog entries (SlicerOpenIGTLink
and PyTorch are). The supported Slicer versions cannot be stated in FreehandUS.json: the schema
allows no other key; they are in EXTENSION_DESCRIPTION, README and the module help
(test_slicer_versions.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION = "FreehandUS"
MODULES = ("FreehandUS", "NWireCalibration", "SensorlessTracking")
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
#: Catalog entry schema v1.0.2: property -> (JSON type, extra rule or None); required keys.
SCHEMA_PROPERTIES = {
    "$schema": (str, None),
    "category": (str, None),
    "scm_url": (str, None),
    "scm_revision": (str, None),
    "scm_type": (str, lambda v: v in ("git", "local")),
    "build_dependencies": (list, lambda v: all(isinstance(item, str) for item in v)),
    "dicom_support_rule": (str, None),
    "build_subdirectory": (str, None),
    "enabled": (bool, None),
    "tier": (int, lambda v: not isinstance(v, bool) and 1 <= v <= 5),
}
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
#: Some of the categories the ExtensionsIndex accepts (its list has about 60; these are the ones
#: an ultrasound/IGT extension could use).
ACCEPTED_CATEGORIES = {"Ultrasound", "IGT", "Tracking", "Sequences", "Registration", "Utilities"}
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
SIZE_LIMIT_MB = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _schema_problems(entry) -> list[str]:
    if not isinstance(entry, dict):
        return ["the description is not a JSON object"]
    problems = [f"required key {key!r} is missing" for key in SCHEMA_REQUIRED if key not in entry]
    for key, value in entry.items():
        if key not in SCHEMA_PROPERTIES:
            problems.append(f"{key!r} is not allowed by the schema (additionalProperties: false)")
            continue
        kind, rule = SCHEMA_PROPERTIES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{key!r} must be a {kind.__name__}, got {type(value).__name__}")
        elif rule is not None and not rule(value):
            problems.append(f"{key!r} has an invalid value {value!r}")
    return problems


def _repository_files(root: Path) -> list[Path]:
    """Files git tracks (plus untracked, not ignored ones): what a clone of the repository holds."""
    if shutil.which("git") and (root / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout.decode().split("\0")  # fmt: skip
        return [root / name for name in listed if name and (root / name).is_file()]
    return [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]


def _image_url_problems(url: str, what: str, root: Path, owner_repo: str, revision: str) -> list[str]:
    if not url.startswith("http"):
        return [f"{what} {url!r} should be a URL starting with 'http'"]
    if not url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")):
        return [f"{what} {url!r} does not name an image file"]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{revision}/"
    if not url.startswith(prefix):
        return [f"{what} {url!r} is not a file of {owner_repo} at {revision!r} ({prefix}...)"]
    path = root / url[len(prefix) :]
    if not path.is_file():
        return [f"{what} {url!r}: {path.relative_to(root)} is not in the repository"]
    if path.suffix.lower() == ".png" and path.read_bytes()[:8] != PNG_SIGNATURE:
        return [f"{what} {url!r}: {path.relative_to(root)} is not a PNG file"]
    return []


def catalog_problems(root: Path, extension: str = EXTENSION) -> list[str]:
    """Every problem the ExtensionsIndex checks would report for ``root/<extension>.json``."""
    root = Path(root)
    description = root / f"{extension}.json"
    raw = description.read_bytes()
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as exc:
        return [f"{description.name}: invalid JSON: {exc}"]
    problems = []
    if b"\r" in raw:
        problems.append(f"{description.name}: CR or CRLF line endings (LF only)")
    problems += [f"{description.name}: {p}" for p in _schema_problems(entry)]
    if not isinstance(entry, dict):
        return problems
    if entry.get("$schema") != SCHEMA_URL:
        problems.append(f"$schema is {entry.get('$schema')!r}, expected {SCHEMA_URL!r}")
    if extension.lower().startswith("slicer"):
        problems.append(f"extension name {extension!r} should not start with 'Slicer'")
    if entry.get("category") not in ACCEPTED_CATEGORIES:
        problems.append(f"category {entry.get('category')!r} is not an accepted catalog category")

    url = str(entry.get("scm_url", ""))
    parts = urllib.parse.urlsplit(url)
    if "://" not in url or parts.scheme not in ("git", "https"):
        problems.append(f"scm_url {url!r} must be scheme://host/path with scheme git or https")
    repository = Path(parts.path.strip("/")).name.removesuffix(".git")
    if not repository.startswith(REPOSITORY_PREFIXES):
        problems.append(f"repository name {repository!r} (from scm_url) should start with 'Slicer'")
    owner_repo = parts.path.strip("/").removesuffix(".git")
    revision = entry.get("scm_revision", "main")

    cmake_file = root / "CMakeLists.txt"
    if not cmake_file.is_file():
        return problems + ["CMakeLists.txt not found in the repository root"]
    cmake = cmake_file.read_text(encoding="utf-8", errors="ignore")
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake, re.IGNORECASE | re.MULTILINE)
    if not project:
        problems.append("no project() declaration in CMakeLists.txt")
    elif project[0].strip("\"'") != extension:
        problems.append(f"project({project[0]}) in CMakeLists.txt does not match the extension name {extension!r}")
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE | re.MULTILINE)
    if not icon:
        problems.append("no EXTENSION_ICONURL in CMakeLists.txt")
    else:
        problems += _image_url_problems(icon[0].strip(), "EXTENSION_ICONURL", root, owner_repo, revision)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.IGNORECASE | re.MULTILINE)
    if not shots:
        problems.append("no EXTENSION_SCREENSHOTURLS in CMakeLists.txt")
    else:
        for shot in shots[0].split():
            problems += _image_url_problems(shot, "EXTENSION_SCREENSHOTURLS", root, owner_repo, revision)

    if not any((root / name).is_file() for name in LICENSE_NAMES):
        problems.append("no license file in the repository root")
    size_mb = sum(p.stat().st_size for p in _repository_files(root)) / 2**20
    if size_mb > SIZE_LIMIT_MB:
        problems.append(f"repository size {size_mb:.1f} MB exceeds {SIZE_LIMIT_MB} MB")
    return problems


def test_extension_passes_the_catalog_checks():
    assert catalog_problems(REPO_ROOT) == []


def _copy_for_checks(tmp_path: Path) -> Path:
    """The files the checks read: description, CMakeLists, license, icon and screenshot."""
    for relative in ("FreehandUS.json", "CMakeLists.txt", "LICENSE", "Resources/Icons/FreehandUS.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / relative, tmp_path / relative)
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    shot = re.search(r'EXTENSION_SCREENSHOTURLS\s*"([^"]+)"', cmake).group(1).split("/main/", 1)[1]
    (tmp_path / shot).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / shot, tmp_path / shot)
    return tmp_path


def _edit_json(root: Path, **changes) -> None:
    path = root / "FreehandUS.json"
    entry = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            entry.pop(key.replace("_dollar_", "$"), None)
        else:
            entry[key] = value
    path.write_text(json.dumps(entry, indent=2) + "\n")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"scm_url": "https://github.com/freehandus/FreehandUS.git"}, "should start with 'Slicer'"),
        ({"scm_url": "ssh://git@github.com/freehandus/SlicerFreehandUS.git"}, "scheme git or https"),
        ({"tier": 7}, "'tier' has an invalid value 7"),
        ({"enabled": "yes"}, "'enabled' must be a bool"),
        ({"homepage": "https://example.org"}, "'homepage' is not allowed"),
        ({"category": "Ultrasonics"}, "not an accepted catalog category"),
        ({"scm_revision": "v1.0"}, "is not a file of freehandus/SlicerFreehandUS at 'v1.0'"),
        ({"_dollar_schema": None}, "required key '$schema' is missing"),
    ],
)
def test_catalog_checks_catch_a_bad_description(tmp_path, change, expected):
    root = _copy_for_checks(tmp_path)
    assert catalog_problems(root) == []
    _edit_json(root, **change)
    problems = "\n".join(catalog_problems(root))
    assert expected in problems


def test_catalog_checks_catch_bad_cmake_and_files(tmp_path):
    root = _copy_for_checks(tmp_path)
    cmake = root / "CMakeLists.txt"
    text = cmake.read_text()
    cmake.write_text(text.replace("project(FreehandUS)", "project(SlicerFreehandUS)"))
    assert any("does not match the extension name" in p for p in catalog_problems(root))
    cmake.write_text(text)
    shot = re.search(r'EXTENSION_SCREENSHOTURLS\s*"([^"]+)"', text).group(1).split("/main/", 1)[1]
    (root / shot).write_bytes(b"not a png")
    assert any("is not a PNG file" in p for p in catalog_problems(root))
    (root / shot).unlink()
    assert any("is not in the repository" in p for p in catalog_problems(root))
    (root / "LICENSE").unlink()
    assert "no license file in the repository root" in catalog_problems(root)
    (root / "FreehandUS.json").write_bytes((REPO_ROOT / "FreehandUS.json").read_bytes().replace(b"\n", b"\r\n"))
    assert any("CRLF" in p for p in catalog_problems(root))
    shutil.copy(root / "FreehandUS.json", root / "SlicerFreehandUS.json")
    assert "extension name 'SlicerFreehandUS' should not start with 'Slicer'" in catalog_problems(
        root, extension="SlicerFreehandUS"
    )


# ----------------------------------------------------------------------------- links and people


def _homepage() -> str:
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    return re.search(r'set\(\s*EXTENSION_HOMEPAGE\s+"([^"]+)"', cmake).group(1)


def test_homepage_help_links_and_repository_agree():
    homepage = _homepage()
    entry = json.loads((REPO_ROOT / "FreehandUS.json").read_text())
    assert entry["scm_url"] == homepage + ".git"
    for module in MODULES:
        source = (REPO_ROOT / module / f"{module}.py").read_text()
        links = re.findall(r'href="(https?://[^"]+)"', source)
        assert links, f"{module}: the help has no documentation link"
        for link in links:
            if "github.com" in link:
                assert link.startswith(homepage + "#") or link == homepage, f"{module}: {link} is not {homepage}"
    readme = (REPO_ROOT / "README.md").read_text()
    assert "raw.githubusercontent.com/freehandus/FreehandUS/" not in readme

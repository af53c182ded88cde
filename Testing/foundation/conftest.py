"""Fixtures of the foundation tests: ``mrml_scene``, a headless Slicer scene (slicer-core)."""

from __future__ import annotations

import pytest
from mrml_scene import make_scene, release_scene


@pytest.fixture
def mrml_scene(tmp_path_factory):
    """A fresh vtkMRMLScene with the Sequences/Markups logics set (skips without slicer-core)."""
    pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
    scene = make_scene(cache_dir=tmp_path_factory.mktemp("mrml-cache"))
    yield scene
    release_scene(scene)
